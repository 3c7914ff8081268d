//! Load balancing as Linkerd's proxy does it: power of two choices over peak-EWMA latency
//! (tower's `p2c` and `PeakEwma`), the endpoints fed by a discovery watch, behind a fail-fast
//! gate: a request that finds no ready endpoint within the timeout fails rather than waits.
//!
//! Requests take the balancer only to pick an endpoint; the response is awaited without it, so
//! requests to one target run concurrently.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use futures::Stream;
use proxy_discovery::{Endpoint, Resolution};
use tokio::sync::{Mutex, watch};
use tower::{
    BoxError, Service, ServiceExt,
    balance::p2c::Balance,
    discover::Change,
    load::{CompleteOnResponse, PeakEwmaDiscover},
};

/// Linkerd's defaults for a profile without its own (`default_rtt` 30 ms, `decay` 10 s).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
const DECAY: Duration = Duration::from_secs(10);

type Discover<S> = Pin<Box<dyn Stream<Item = Result<Change<SocketAddr, S>, Infallible>> + Send>>;

/// Why a balanced call failed.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// No endpoint was ready within the fail-fast timeout.
    #[error("no endpoint ready within {0:?}")]
    Unavailable(Duration),
    #[error(transparent)]
    Endpoint(BoxError),
}

/// A balancer over services of type `S`, one per endpoint.
pub struct Balancer<Req, S> {
    inner: Mutex<Balance<PeakEwmaDiscover<Discover<S>, CompleteOnResponse>, Req>>,
    failfast: Duration,
    /// The discovery stream the endpoints come from, kept open while the balancer lives (a
    /// receiver alone stops hearing updates once the resolver's idle timeout closes it).
    _discovery: Option<proxy_discovery::Resolve>,
}

impl<Req, S> std::fmt::Debug for Balancer<Req, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("failfast", &self.failfast)
            .finish_non_exhaustive()
    }
}

impl<Req, S> Balancer<Req, S>
where
    Req: Send + 'static,
    S: Service<Req> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    /// A balancer whose endpoints follow `endpoints`, each made a service by `make`.
    pub fn new(
        endpoints: watch::Receiver<Resolution>,
        make: impl Fn(Arc<Endpoint>) -> S + Send + 'static,
        failfast: Duration,
    ) -> Self {
        let discover: Discover<S> = Box::pin(changes(endpoints, make));
        let ewma =
            PeakEwmaDiscover::new(discover, DEFAULT_RTT, DECAY, CompleteOnResponse::default());
        Self {
            inner: Mutex::new(Balance::new(ewma)),
            failfast,
            _discovery: None,
        }
    }

    /// A balancer over the endpoints of `discovery`, which it keeps open.
    pub fn discovered(
        discovery: proxy_discovery::Resolve,
        make: impl Fn(Arc<Endpoint>) -> S + Send + 'static,
        failfast: Duration,
    ) -> Self {
        Self {
            _discovery: Some(discovery.clone()),
            ..Self::new(discovery.watch(), make, failfast)
        }
    }

    /// Sends `req` to one of two endpoints picked at random, the less loaded.
    pub async fn call(&self, req: Req) -> Result<S::Response, BalanceError> {
        let pick = async {
            let mut inner = self.inner.lock().await;
            inner.ready().await.map_err(BalanceError::Endpoint)?;
            Ok::<_, BalanceError>(inner.call(req))
        };
        let response = tokio::time::timeout(self.failfast, pick)
            .await
            .map_err(|_| BalanceError::Unavailable(self.failfast))??;
        response.await.map_err(BalanceError::Endpoint)
    }
}

/// The changes between two endpoint sets, removals first. Pure.
pub fn diff(
    old: &BTreeMap<SocketAddr, Arc<Endpoint>>,
    new: &BTreeMap<SocketAddr, Endpoint>,
) -> (Vec<SocketAddr>, Vec<Endpoint>) {
    let removed = old
        .keys()
        .filter(|a| !new.contains_key(a))
        .copied()
        .collect();
    let changed = new
        .values()
        .filter(|ep| old.get(&ep.addr).is_none_or(|o| **o != **ep))
        .cloned()
        .collect();
    (removed, changed)
}

/// Discovery's answers as tower's endpoint changes. The stream never ends: a balancer whose
/// discovery went away keeps what it had.
fn changes<S>(
    rx: watch::Receiver<Resolution>,
    make: impl Fn(Arc<Endpoint>) -> S + Send + 'static,
) -> impl Stream<Item = Result<Change<SocketAddr, S>, Infallible>> + Send
where
    S: Send + 'static,
{
    struct State<F> {
        rx: watch::Receiver<Resolution>,
        current: BTreeMap<SocketAddr, Arc<Endpoint>>,
        queue: VecDeque<Change<SocketAddr, Arc<Endpoint>>>,
        first: bool,
        make: F,
    }
    let state = State {
        rx,
        current: BTreeMap::new(),
        queue: VecDeque::new(),
        first: true,
        make,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(change) = st.queue.pop_front() {
                let change = match change {
                    Change::Insert(addr, ep) => Change::Insert(addr, (st.make)(ep)),
                    Change::Remove(addr) => Change::Remove(addr),
                };
                return Some((Ok(change), st));
            }
            if !std::mem::take(&mut st.first) && st.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            let next = match &*st.rx.borrow_and_update() {
                Resolution::Endpoints(eps) => eps.clone(),
                Resolution::NotFound => Arc::default(),
                Resolution::Pending => continue,
            };
            let (removed, changed) = diff(&st.current, &next);
            for addr in removed {
                st.current.remove(&addr);
                st.queue.push_back(Change::Remove(addr));
            }
            for ep in changed {
                let ep = Arc::new(ep);
                st.current.insert(ep.addr, ep.clone());
                st.queue.push_back(Change::Insert(ep.addr, ep));
            }
        }
    })
}

/// An endpoint that failed to connect is not picked again until a backoff has passed
/// (Linkerd's endpoint stack reconnects with backoff), so that while another endpoint is ready
/// requests go there instead of failing; a success resets it. The balancer sees the endpoint
/// not ready meanwhile.
pub struct Backoff<S, F> {
    inner: S,
    state: Arc<std::sync::Mutex<BackoffState>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    failed: std::marker::PhantomData<fn() -> F>,
}

/// Which errors of a service are its endpoint's fault (a failed connection), not the request's.
pub trait Failed<E> {
    fn failed(error: &E) -> bool;
}

/// Every error is the endpoint's (opening a connection is all the service does).
#[derive(Debug)]
pub enum AnyError {}

impl<E> Failed<E> for AnyError {
    fn failed(_: &E) -> bool {
        true
    }
}

impl<S, F> std::fmt::Debug for Backoff<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backoff").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct BackoffState {
    delays: proxy_discovery::backoff::Backoff,
    until: Option<tokio::time::Instant>,
}

impl<S, F> Backoff<S, F> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: Arc::new(std::sync::Mutex::new(BackoffState {
                delays: proxy_discovery::backoff::Backoff::new(),
                until: None,
            })),
            sleep: None,
            failed: std::marker::PhantomData,
        }
    }
}

fn lock(state: &std::sync::Mutex<BackoffState>) -> std::sync::MutexGuard<'_, BackoffState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<Req, S, F> Service<Req> for Backoff<S, F>
where
    S: Service<Req>,
    F: Failed<S::Error>,
    S::Future: Send + 'static,
    S::Response: 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        let until = lock(&self.state).until;
        if let Some(until) = until.filter(|u| *u > tokio::time::Instant::now()) {
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            std::task::ready!(sleep.as_mut().poll(cx));
        }
        self.sleep = None;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let fut = self.inner.call(req);
        let state = self.state.clone();
        Box::pin(async move {
            let result = fut.await;
            let mut st = lock(&state);
            match &result {
                Err(e) if F::failed(e) => {
                    let delay = st.delays.next_delay();
                    st.until = Some(tokio::time::Instant::now() + delay);
                }
                Err(_) => {}
                Ok(_) => {
                    if st.until.take().is_some() {
                        st.delays.reset();
                    }
                }
            }
            result
        })
    }
}
