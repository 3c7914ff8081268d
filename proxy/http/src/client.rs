//! Connections to endpoints for proxied HTTP.
//!
//! HTTP/2 ([`Http2Pool`]): connections are kept per endpoint *and per client* (the gateway
//! keys them by the caller's verified identity), and a client's requests open another
//! connection when those it has carry [`PoolLimits::streams_per_connection`] requests already.
//! A client cannot fill a connection that others use: not its stream limit (uploads that never
//! end), nor its flow-control window (responses it never reads); what it stalls is its own.
//!
//! HTTP/1 ([`Http1Conns`]): kept per client connection, which sends one request at a time, so
//! no pool is locked or searched per request.
//!
//! Both dial a [`Peer`] with a [`Dialer`]: plaintext to an endpoint without an identity, mTLS
//! to a meshed one (whose proxy detects HTTP/1 or HTTP/2 inside the TLS it terminates).

use std::{
    collections::HashMap,
    hash::Hash,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proxy_transport::dial::{DialError, Dialer, Peer};
use tokio::time::Instant;

/// How long an unused HTTP/1 connection to an endpoint is kept (Linkerd's
/// `LINKERD2_PROXY_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT`).
pub const HTTP1_POOL_IDLE: Duration = Duration::from_secs(3);

/// A client of one endpoint (whatever the request's URI says, `connector` decides where
/// connections go): HTTP/2 multiplexed on one connection with `http2_only`, otherwise a pool
/// of HTTP/1 connections, as many as requests in flight, idle ones kept [`HTTP1_POOL_IDLE`].
/// The request's own `Host` is sent unchanged.
pub fn pooled_client<C>(
    connector: C,
    http2_only: bool,
) -> hyper_util::client::legacy::Client<C, Incoming>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(HTTP1_POOL_IDLE)
        .set_host(false)
        .http2_only(http2_only)
        .http2_keep_alive_interval(Duration::from_secs(30));
    builder.build(connector)
}

/// Why a request could not be sent to an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("HTTP to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl SendError {
    /// Whether the endpoint did not answer the connection attempt in time (a 504, not a 502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Dial(e) if e.is_timeout())
    }
}

/// The bounds of an [`Http2Pool`].
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    /// Requests in flight on one connection before the client's next request opens another
    /// (below the 100 streams an HTTP/2 server must allow at least, so that a server's own
    /// limit never queues a request).
    pub streams_per_connection: usize,
    /// Connections one client may hold to one endpoint; past it, requests share the least busy.
    pub connections_per_client: usize,
    /// A connection that carried nothing for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            streams_per_connection: 64,
            connections_per_client: 8,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// HTTP/2 connections to endpoints, per endpoint and client `K`.
#[derive(Debug)]
pub struct Http2Pool<K> {
    limits: PoolLimits,
    dialer: Dialer,
    entries: Mutex<HashMap<(Peer, K), Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    conns: Vec<Conn>,
    /// One connection opened at a time per client and endpoint: a burst of requests waits for
    /// it rather than opening a connection each.
    opening: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug)]
struct Conn {
    sender: http2::SendRequest<Incoming>,
    in_flight: Arc<AtomicUsize>,
    last_used: Instant,
}

impl<K: Hash + Eq + Clone> Http2Pool<K> {
    pub fn new(limits: PoolLimits, dialer: Dialer) -> Self {
        Self {
            limits,
            dialer,
            entries: Mutex::default(),
        }
    }

    /// Sends `req` to `peer` on one of `client`'s connections. The request counts against its
    /// connection until the response's body is done or dropped.
    pub async fn send(
        &self,
        peer: &Peer,
        client: &K,
        req: Request<Incoming>,
    ) -> Result<Response<InFlightBody>, SendError> {
        let addr = peer.addr;
        let key = (peer.clone(), client.clone());
        let (mut sender, guard) = self.sender(&key).await?;
        let req = match sender.try_send_request(req).await {
            Ok(rsp) => {
                return Ok(rsp.map(|body| InFlightBody {
                    body,
                    _guard: guard,
                }));
            }
            // Not sent (the connection went away): once more, on a new connection.
            Err(mut e) => e.take_message().ok_or_else(|| SendError::Http {
                addr,
                source: e.into_error(),
            })?,
        };
        drop(guard);
        let (mut sender, guard) = self.open(&key).await?;
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        Ok(rsp.map(|body| InFlightBody {
            body,
            _guard: guard,
        }))
    }

    /// How many connections the pool holds, all clients together.
    pub fn connections(&self) -> usize {
        self.lock().values().map(|e| e.conns.len()).sum()
    }

    async fn sender(
        &self,
        key: &(Peer, K),
    ) -> Result<(http2::SendRequest<Incoming>, InFlight), SendError> {
        if let Some(picked) = self.pick(key) {
            return Ok(picked);
        }
        let opening = self.lock().entry(key.clone()).or_default().opening.clone();
        let _one_at_a_time = opening.lock().await;
        // Another request may have opened one meanwhile.
        if let Some(picked) = self.pick(key) {
            return Ok(picked);
        }
        self.open(key).await
    }

    /// The least busy of the client's connections, unless all carry their share of streams
    /// and it may open another.
    fn pick(&self, key: &(Peer, K)) -> Option<(http2::SendRequest<Incoming>, InFlight)> {
        let mut entries = self.lock();
        let entry = entries.get_mut(key)?;
        entry.conns.retain(|c| !c.sender.is_closed());
        let full = entry.conns.len() >= self.limits.connections_per_client;
        let conn = entry
            .conns
            .iter_mut()
            .min_by_key(|c| c.in_flight.load(Ordering::Relaxed))
            .filter(|c| {
                full || c.in_flight.load(Ordering::Relaxed) < self.limits.streams_per_connection
            })?;
        conn.last_used = Instant::now();
        Some((conn.sender.clone(), InFlight::new(&conn.in_flight)))
    }

    async fn open(
        &self,
        key: &(Peer, K),
    ) -> Result<(http2::SendRequest<Incoming>, InFlight), SendError> {
        let addr = key.0.addr;
        let io = self.dialer.peer(&key.0).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 endpoint connection ended");
            }
        });
        let in_flight = Arc::new(AtomicUsize::new(0));
        let guard = InFlight::new(&in_flight);
        let now = Instant::now();
        let mut entries = self.lock();
        // Closed and long-idle connections go (the last sender dropped closes a connection).
        let idle = self.limits.idle_timeout;
        entries.retain(|_, e| {
            e.conns.retain(|c| {
                !c.sender.is_closed()
                    && (c.in_flight.load(Ordering::Relaxed) > 0 || now - c.last_used < idle)
            });
            !e.conns.is_empty() || Arc::strong_count(&e.opening) > 1
        });
        entries.entry(key.clone()).or_default().conns.push(Conn {
            sender: sender.clone(),
            in_flight,
            last_used: now,
        });
        Ok((sender, guard))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Peer, K), Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A request counted on its connection until dropped.
#[derive(Debug)]
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted on its connection until it is done.
#[derive(Debug)]
pub struct InFlightBody {
    body: Incoming,
    _guard: InFlight,
}

impl Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// One client connection's HTTP/1 connections to endpoints, each reused while it lives.
#[derive(Debug, Default)]
pub struct Http1Conns(Mutex<HashMap<Peer, http1::SendRequest<Incoming>>>);

impl Http1Conns {
    /// Sends on the kept connection to `peer`, or a new one dialled with `dialer`. With `wait`, a kept connection
    /// still busy with the previous response is waited for (a client connection speaking
    /// HTTP/1 sends one request at a time, so it is nearly done); without (many requests of one
    /// HTTP/2 client, downgraded), a busy one is left to its request and another is opened, so
    /// that one slow response does not hold up the others.
    pub async fn send(
        &self,
        dialer: &Dialer,
        peer: &Peer,
        req: Request<Incoming>,
        wait: bool,
    ) -> Result<Response<Incoming>, SendError> {
        let addr = peer.addr;
        let cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(peer);
        let mut req = req;
        let reusable = match cached.filter(|s| !s.is_closed()) {
            Some(sender) if wait || sender.is_ready() => Some(sender),
            Some(busy) => {
                self.put(peer, busy);
                None
            }
            None => None,
        };
        // Ready once the previous response's body is done.
        if let Some(mut sender) = reusable
            && sender.ready().await.is_ok()
        {
            let sent = sender.try_send_request(req);
            self.put(peer, sender);
            match sent.await {
                Ok(rsp) => return Ok(rsp),
                // Not sent (the endpoint closed the idle connection): once more on a new one.
                Err(mut e) => {
                    req = e.take_message().ok_or_else(|| SendError::Http {
                        addr,
                        source: e.into_error(),
                    })?;
                }
            }
        }
        let io = dialer.peer(peer).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/1 endpoint connection ended");
            }
        });
        let sent = sender.send_request(req);
        self.put(peer, sender);
        sent.await
            .map_err(|source| SendError::Http { addr, source })
    }

    fn put(&self, peer: &Peer, sender: http1::SendRequest<Incoming>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer.clone(), sender);
    }
}
