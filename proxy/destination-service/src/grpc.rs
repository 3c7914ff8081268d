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
            destination: DestinationServer::new(self.clone())
                .max_decoding_message_size(MAX_REQUEST),
            outbound: OutboundPoliciesServer::new(self.clone())
                .max_decoding_message_size(MAX_REQUEST),
            inbound: InboundServerPoliciesServer::new(self.clone())
                .max_decoding_message_size(MAX_REQUEST),
            api: self,
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
                if f.pending.is_empty() {
                    // An idle stream keeps no queue's worth of memory.
                    f.pending = VecDeque::new();
                }
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
///
/// The four streaming methods are served by [`streaming`] rather than by the generated
/// servers: tonic gives every call an encode buffer (8 KiB up front, then as large as the
/// largest message) that lives as long as the call, which for a long-lived, mostly idle stream
/// was most of its memory. Here each message is encoded into its own buffer, freed once sent.
#[derive(Clone, Debug)]
pub struct Router {
    api: Api,
    destination: DestinationServer<Api>,
    outbound: OutboundPoliciesServer<Api>,
    inbound: InboundServerPoliciesServer<Api>,
}

/// The largest request accepted: a path, a workload or a traffic spec is well under this.
const MAX_REQUEST: usize = 16 * 1024;
/// A gRPC message's prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Reads a unary gRPC request (uncompressed, at most [`MAX_REQUEST`] bytes).
async fn read_request<M, B>(body: B) -> Result<M, Status>
where
    M: prost::Message + Default,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    use http_body_util::BodyExt as _;
    let bytes = http_body_util::Limited::new(body, MAX_REQUEST + PREFIX)
        .collect()
        .await
        .map_err(|_| Status::resource_exhausted("the request is too large or was cut off"))?
        .to_bytes();
    let Some((&compressed, rest)) = bytes.split_first() else {
        return Err(Status::invalid_argument("no request message"));
    };
    if compressed != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not accepted",
        ));
    }
    let (len, message) = rest
        .split_at_checked(PREFIX - 1)
        .ok_or_else(|| Status::invalid_argument("a truncated request"))?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if message.len() != len {
        return Err(Status::invalid_argument(
            "the request's length does not match its prefix",
        ));
    }
    M::decode(message)
        .map_err(|e| Status::invalid_argument(format!("the request does not decode: {e}")))
}

/// A streaming response body: each message is encoded into a buffer of its own when the
/// stream yields it; the call ends with the status in trailers.
struct MessageBody<T> {
    stream: Stream_<T>,
    done: bool,
}

impl<T: prost::Message> http_body::Body for MessageBody<T> {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match self.stream.poll_next_unpin(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(message))) => {
                use bytes::BufMut as _;
                let len = message.encoded_len();
                let mut buf = bytes::BytesMut::with_capacity(PREFIX + len);
                buf.put_u8(0);
                buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
                if message.encode(&mut buf).is_err() {
                    Status::internal("a message did not encode")
                } else {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(buf.freeze()))));
                }
            }
            Poll::Ready(Some(Err(status))) => status,
            Poll::Ready(None) => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        let _ = status.add_header(&mut trailers);
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Serves one streaming call: the request decoded, `method` called, its stream sent.
fn streaming<B, Req, Resp, F, Fut>(
    req: http::Request<B>,
    method: F,
) -> BoxFuture<Result<http::Response<tonic::body::Body>, Infallible>>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Request<Req>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<Stream_<Resp>>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let request = match read_request::<Req, B>(req.into_body()).await {
            Ok(r) => r,
            Err(status) => return Ok(status.into_http()),
        };
        Ok(match method(Request::new(request)).await {
            Ok(rsp) => {
                let body = MessageBody {
                    stream: rsp.into_inner(),
                    done: false,
                };
                let mut http = http::Response::new(tonic::body::Body::new(body));
                http.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                http
            }
            Err(status) => status.into_http(),
        })
    })
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
        let api = self.api.clone();
        match req.uri().path() {
            "/io.linkerd.proxy.destination.Destination/Get" => {
                return streaming(req, move |r| async move { Destination::get(&api, r).await });
            }
            "/io.linkerd.proxy.destination.Destination/GetProfile" => {
                return streaming(req, move |r| async move {
                    Destination::get_profile(&api, r).await
                });
            }
            "/io.linkerd.proxy.outbound.OutboundPolicies/Watch" => {
                return streaming(req, move |r| async move {
                    OutboundPolicies::watch(&api, r).await
                });
            }
            "/io.linkerd.proxy.inbound.InboundServerPolicies/WatchPort" => {
                return streaming(req, move |r| async move {
                    InboundServerPolicies::watch_port(&api, r).await
                });
            }
            _ => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model, resolve::Settings};

    fn api(max_streams: usize) -> Api {
        let store = Store::new(Settings {
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            control_plane_ns: "linkerd".into(),
        });
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }))
        .unwrap();
        store.update(|i| {
            i.apply_service(
                ("shop".into(), "web".into()),
                Some(model::service_info(&svc)),
            )
        });
        Api::new(
            store,
            max_streams,
            Metrics::default(),
            PolicySettings {
                default_inbound: DefaultPolicy::AllUnauthenticated,
                cluster_networks: Vec::new(),
            },
        )
    }

    fn get(path: &str) -> Request<GetDestination> {
        Request::new(GetDestination {
            path: path.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn streams_are_limited_and_released_when_closed() {
        let api = api(2);
        let a = Destination::get(&api, get("web.shop.svc.cluster.local:80"))
            .await
            .unwrap();
        // Any name costs a stream, known or not.
        let b = Destination::get(&api, get("nothing.shop.svc.cluster.local:80"))
            .await
            .unwrap();
        let refused = Destination::get(&api, get("web.shop.svc.cluster.local:80"))
            .await
            .err()
            .unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(a);
        let mut c = Destination::get(&api, get("web.shop.svc.cluster.local:80"))
            .await
            .expect("a closed stream frees its place")
            .into_inner();
        assert!(c.next().await.is_some(), "the first answer");
        drop(b);
    }

    #[tokio::test]
    async fn bad_paths_are_invalid_arguments_and_cost_no_stream() {
        let api = api(1);
        for path in ["example.com:80", "10.9.9.9:80"] {
            let err = Destination::get(&api, get(path)).await.err().unwrap();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{path}");
        }
        assert!(
            Destination::get(&api, get("web.shop.svc.cluster.local:80"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_stream_sends_only_what_changed_and_coalesces_while_unread() {
        let api = api(10);
        let mut s = Destination::get(&api, get("web.shop.svc.cluster.local:80"))
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            s.next().await,
            Some(Ok(Update {
                update: Some(linkerd2_proxy_api::destination::update::Update::NoEndpoints(_))
            }))
        ));
        // 100 slice versions while the client reads nothing: it then gets one answer, the last.
        for i in 1..=100u8 {
            let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"port": 80}],
                "endpoints": [{"addresses": [format!("10.0.0.{i}")]}],
            }))
            .unwrap();
            api.store.update(|idx| {
                idx.apply_slice(
                    crate::index::Cluster::Local,
                    ("shop".into(), "web-1".into()),
                    model::slice_info(&slice),
                )
            });
        }
        let Some(Ok(Update {
            update: Some(linkerd2_proxy_api::destination::update::Update::Add(set)),
        })) = s.next().await
        else {
            panic!("an add");
        };
        assert_eq!(set.addrs.len(), 1);
        let addr = std::net::SocketAddr::try_from(set.addrs[0].addr.unwrap()).unwrap();
        assert_eq!(addr.to_string(), "10.0.0.100:80");
        // Nothing more is pending.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), s.next())
                .await
                .is_err()
        );
    }
}
