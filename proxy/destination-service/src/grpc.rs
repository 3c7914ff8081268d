//! The gRPC services: Linkerd's `Destination`, `OutboundPolicies` and `InboundServerPolicies`,
//! each a thin shell over the pure answers of [`resolve`] and [`policy`] and the store's
//! subscriptions.
//!
//! Every streaming call follows one shape ([`follow`]): answer now, register for what the answer
//! depended on, then after each wake-up answer again from the current state and send only what
//! changed. A slow client is never queued for: while it does not read, its stream is not polled,
//! and every change in between is one wake-up, answered from the state at that moment.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::{StreamExt, stream::BoxStream};
use ipnet::IpNet;
use linkerd2_proxy_api::{
    destination::{
        DestinationProfile, GetDestination, Update,
        destination_server::{Destination, DestinationServer},
    },
    inbound::{
        PortSpec, Server,
        inbound_server_policies_server::{InboundServerPolicies, InboundServerPoliciesServer},
    },
    outbound::{
        OutboundPolicy, TrafficSpec,
        outbound_policies_server::{OutboundPolicies, OutboundPoliciesServer},
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, server::NamedService};

use crate::{
    policy::{self, DefaultPolicy},
    resolve::{self, Resolution, Sent},
    store::{Store, Subscription},
};

/// A call's API, as metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: &'static str,
}

/// The gRPC side's metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    streams: Family<ApiLabel, Gauge>,
    updates: Family<ApiLabel, Counter>,
    refused: Family<ApiLabel, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "destination_streams",
            "Open streams, by API (get, get_profile, outbound, inbound)",
            self.streams.clone(),
        );
        registry.register(
            "destination_updates",
            "Messages sent on streams, by API",
            self.updates.clone(),
        );
        registry.register(
            "destination_streams_refused",
            "Streams refused because the stream limit was reached, by API",
            self.refused.clone(),
        );
    }
}

/// What the policy answers need besides the index.
#[derive(Clone, Debug)]
pub struct PolicySettings {
    pub default_inbound: DefaultPolicy,
    pub cluster_networks: Vec<IpNet>,
}

/// The three services; cheap to clone.
#[derive(Clone, Debug)]
pub struct Api {
    store: Arc<Store>,
    streams: Arc<Semaphore>,
    metrics: Metrics,
    policy: Arc<PolicySettings>,
}

/// Held by every open stream: its share of the stream limit and its gauge.
struct StreamGuard {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

type Stream_<T> = BoxStream<'static, Result<T, Status>>;

impl Api {
    /// `max_streams`: open streams across every connection and API.
    pub fn new(
        store: Arc<Store>,
        max_streams: usize,
        metrics: Metrics,
        policy: PolicySettings,
    ) -> Self {
        Self {
            store,
            streams: Arc::new(Semaphore::new(max_streams)),
            metrics,
            policy: Arc::new(policy),
        }
    }

    fn guard(&self, api: &'static str) -> Result<StreamGuard, Status> {
        let label = ApiLabel { api };
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            self.metrics.refused.get_or_create(&label).inc();
            Status::resource_exhausted("too many open streams; try again later")
        })?;
        let gauge = self.metrics.streams.get_or_create(&label).clone();
        gauge.inc();
        Ok(StreamGuard {
            _permit: permit,
            gauge,
        })
    }

    /// The router that serves all three APIs on one port.
    pub fn router(self) -> Router {
        Router {
            destination: DestinationServer::new(self.clone()),
            outbound: OutboundPoliciesServer::new(self.clone()),
            inbound: InboundServerPoliciesServer::new(self),
        }
    }
}

/// Streams `first`, then, after each change, what `next` makes of the state (nothing when
/// nothing changed for this stream).
fn follow<T, S>(
    sub: Subscription,
    state: S,
    first: Vec<T>,
    guard: StreamGuard,
    updates: Counter,
    next: impl FnMut(&mut Subscription, &mut S) -> Vec<T> + Send + 'static,
) -> Stream_<T>
where
    T: Send + 'static,
    S: Send + 'static,
{
    struct Follow<T, S, F> {
        sub: Subscription,
        state: S,
        pending: VecDeque<T>,
        next: F,
        _guard: StreamGuard,
        updates: Counter,
    }
    let init = Follow {
        sub,
        state,
        pending: first.into(),
        next,
        _guard: guard,
        updates,
    };
    futures::stream::unfold(init, |mut f| async move {
        loop {
            if let Some(item) = f.pending.pop_front() {
                f.updates.inc();
                return Some((Ok(item), f));
            }
            f.sub.changed().await;
            let items = (f.next)(&mut f.sub, &mut f.state);
            f.pending.extend(items);
        }
    })
    .boxed()
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

#[tonic::async_trait]
impl Destination for Api {
    type GetStream = Stream_<Update>;
    type GetProfileStream = Stream_<DestinationProfile>;

    async fn get(&self, req: Request<GetDestination>) -> Result<Response<Self::GetStream>, Status> {
        let target =
            resolve::parse_target(&req.get_ref().path, &self.store.settings().cluster_domain)
                .map_err(invalid)?;
        let guard = self.guard("get")?;
        let mut sub = self.store.subscribe();
        let res = self.store.resolve(&mut sub, &target).map_err(invalid)?;
        let (first, sent) = resolve::diff(None, &res);
        let store = self.store.clone();
        let updates = self
            .metrics
            .updates
            .get_or_create(&ApiLabel { api: "get" })
            .clone();
        Ok(Response::new(follow(
            sub,
            sent,
            first,
            guard,
            updates,
            move |sub, sent: &mut Sent| {
                // An address that stops being known is a target without endpoints.
                let res = store
                    .resolve(sub, &target)
                    .unwrap_or_else(|_| Resolution::default());
                let (updates, now) = resolve::diff(Some(sent), &res);
                *sent = now;
                updates
            },
        )))
    }

    async fn get_profile(
        &self,
        req: Request<GetDestination>,
    ) -> Result<Response<Self::GetProfileStream>, Status> {
        let target =
            resolve::parse_target(&req.get_ref().path, &self.store.settings().cluster_domain)
                .map_err(invalid)?;
        let guard = self.guard("get_profile")?;
        let mut sub = self.store.subscribe();
        let profile = self.store.profile(&mut sub, &target).map_err(invalid)?;
        let store = self.store.clone();
        Ok(Response::new(self.latest(
            "get_profile",
            guard,
            sub,
            profile,
            move |sub| store.profile(sub, &target).ok(),
        )))
    }
}

impl Api {
    /// A stream of whole answers (a profile, a policy): the first, then each one that differs
    /// from the last sent; a moment without an answer (an object briefly gone) sends nothing.
    fn latest<T: Clone + PartialEq + Send + 'static>(
        &self,
        api: &'static str,
        guard: StreamGuard,
        sub: Subscription,
        first: T,
        mut answer: impl FnMut(&mut Subscription) -> Option<T> + Send + 'static,
    ) -> Stream_<T> {
        let updates = self
            .metrics
            .updates
            .get_or_create(&ApiLabel { api })
            .clone();
        follow(
            sub,
            first.clone(),
            vec![first],
            guard,
            updates,
            move |sub, last: &mut T| match answer(sub) {
                Some(v) if v != *last => {
                    *last = v.clone();
                    vec![v]
                }
                _ => Vec::new(),
            },
        )
    }

    fn outbound_answer(
        &self,
        sub: &mut Subscription,
        target: &policy::OutboundTarget,
    ) -> Result<OutboundPolicy, Status> {
        self.store
            .answer(sub, |idx, settings| {
                match policy::outbound_policy(idx, settings, target) {
                    Ok((p, topics)) => (Ok(p), topics),
                    Err(e) => (Err(e), Vec::new()),
                }
            })
            .map_err(|e| match e {
                policy::OutboundError::NotAService(..) => Status::not_found(e.to_string()),
                _ => invalid(e),
            })
    }

    fn inbound_answer(
        &self,
        sub: &mut Subscription,
        pod: &crate::model::Key,
        port: u32,
    ) -> Result<Server, Status> {
        let policy = self.policy.clone();
        self.store
            .answer(sub, |idx, _| {
                match policy::inbound_server(
                    idx,
                    policy.default_inbound,
                    &policy.cluster_networks,
                    pod,
                    port,
                ) {
                    Ok((s, topics)) => (Ok(s), topics),
                    // Listen anyway: a Pod looked up before its watch event arrives.
                    Err(e) => (Err(e), vec![crate::index::Topic::Pod(pod.clone())]),
                }
            })
            .map_err(|e| match e {
                policy::InboundError::UnknownPod(..) => Status::not_found(e.to_string()),
                _ => invalid(e),
            })
    }
}

#[tonic::async_trait]
impl OutboundPolicies for Api {
    type WatchStream = Stream_<OutboundPolicy>;

    async fn get(&self, req: Request<TrafficSpec>) -> Result<Response<OutboundPolicy>, Status> {
        let target = policy::outbound_target(req.into_inner().target).map_err(invalid)?;
        let mut sub = self.store.subscribe();
        self.outbound_answer(&mut sub, &target).map(Response::new)
    }

    async fn watch(
        &self,
        req: Request<TrafficSpec>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let target = policy::outbound_target(req.into_inner().target).map_err(invalid)?;
        let guard = self.guard("outbound")?;
        let mut sub = self.store.subscribe();
        let first = self.outbound_answer(&mut sub, &target)?;
        let this = self.clone();
        Ok(Response::new(self.latest(
            "outbound",
            guard,
            sub,
            first,
            move |sub| this.outbound_answer(sub, &target).ok(),
        )))
    }
}

#[tonic::async_trait]
impl InboundServerPolicies for Api {
    type WatchPortStream = Stream_<Server>;

    async fn get_port(&self, req: Request<PortSpec>) -> Result<Response<Server>, Status> {
        let spec = req.into_inner();
        let pod = policy::parse_workload(&spec.workload).map_err(invalid)?;
        let mut sub = self.store.subscribe();
        self.inbound_answer(&mut sub, &pod, spec.port)
            .map(Response::new)
    }

    async fn watch_port(
        &self,
        req: Request<PortSpec>,
    ) -> Result<Response<Self::WatchPortStream>, Status> {
        let spec = req.into_inner();
        let pod = policy::parse_workload(&spec.workload).map_err(invalid)?;
        let guard = self.guard("inbound")?;
        let mut sub = self.store.subscribe();
        let first = self.inbound_answer(&mut sub, &pod, spec.port)?;
        let this = self.clone();
        Ok(Response::new(self.latest(
            "inbound",
            guard,
            sub,
            first,
            move |sub| this.inbound_answer(sub, &pod, spec.port).ok(),
        )))
    }
}

/// Serves the three APIs on one port, by the gRPC path's service name.
#[derive(Clone, Debug)]
pub struct Router {
    destination: DestinationServer<Api>,
    outbound: OutboundPoliciesServer<Api>,
    inbound: InboundServerPoliciesServer<Api>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<B> tower_service::Service<http::Request<B>> for Router
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The generated services are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let service = req
            .uri()
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        if service == DestinationServer::<Api>::NAME {
            Box::pin(self.destination.call(req))
        } else if service == OutboundPoliciesServer::<Api>::NAME {
            Box::pin(self.outbound.call(req))
        } else if service == InboundServerPoliciesServer::<Api>::NAME {
            Box::pin(self.inbound.call(req))
        } else {
            Box::pin(async move {
                Ok(Status::unimplemented(format!("no service {service:?}")).into_http())
            })
        }
    }
}
