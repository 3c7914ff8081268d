//! The outbound side: connections the application opened, redirected to 4140 by `init`'s rules.
//!
//! Per connection: the original destination (`SO_ORIGINAL_DST`; loopback refused), the
//! protocol (opaque when discovery's profile says so, else detected), then:
//! - HTTP: each request routed by its authority (a name), or by the original `ip:port` when it
//!   has none, balanced per request over the target's endpoints;
//! - opaque: balanced per connection over the original `ip:port`'s endpoints.
//!
//! A target discovery does not know (outside the cluster) is forwarded to its original address
//! unchanged, in plaintext.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use http::{Request, Response, Uri, uri::Authority};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proxy_discovery::{Resolution, Resolve, Resolver};
use proxy_http::{Protocol, ProxyBody, ProxyError, ServeSettings, Version, is_grpc};
use proxy_transport::{Activity, orig_dst};
use proxy_transport_header::Prefixed;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::{
    balance::{AnyError, Backoff, BalanceError, Balancer, Failed},
    cache::Cache,
    config::Timeouts,
    endpoint::{
        AbsoluteForm, Dialer, HttpEndpoint, TcpEndpoint, is_connect_timeout, plain_endpoint, tls_of,
    },
    metrics::{Direction, End, Labels, Metrics, Tls},
};

/// How long a new target waits for its first profile before it is treated as not opaque
/// (Linkerd's `LINKERD2_PROXY_DESTINATION_PROFILE_INITIAL_TIMEOUT`).
const PROFILE_INITIAL_TIMEOUT: Duration = Duration::from_millis(500);

type HttpBalancer = Balancer<Request<Incoming>, Backoff<Metered, ConnectFailed>>;
type TcpBalancer = Balancer<(), Backoff<TcpEndpoint, AnyError>>;

/// An HTTP endpoint's fault: its connection failed (a request's own failure is not).
#[derive(Debug)]
enum ConnectFailed {}

impl Failed<tower::BoxError> for ConnectFailed {
    fn failed(error: &tower::BoxError) -> bool {
        error
            .downcast_ref::<crate::endpoint::HttpError>()
            .is_some_and(hyper_util::client::legacy::Error::is_connect)
    }
}

/// A target's route: its endpoints, or its original address when discovery has none.
#[derive(Debug)]
enum Route<B, F> {
    Balanced(B),
    Forward(F),
}

type HttpRoute = Route<HttpBalancer, Metered>;
type TcpRoute = Route<TcpBalancer, ()>;

/// Discovery did not answer within the fail-fast timeout: the request fails (and nothing is
/// cached), rather than going around the mesh in plaintext.
const DISCOVERY_UNAVAILABLE: ProxyError = ProxyError::new(
    http::StatusCode::SERVICE_UNAVAILABLE,
    14,
    "service discovery unavailable",
);

/// The outbound side's shared state.
#[derive(Debug)]
pub struct Outbound {
    timeouts: Timeouts,
    dialer: Dialer,
    resolver: Resolver,
    metrics: Metrics,
    http: Cache<String, HttpRoute>,
    tcp: Cache<SocketAddr, TcpRoute>,
    serve: ServeSettings,
}

impl Outbound {
    pub fn new(
        timeouts: Timeouts,
        dialer: Dialer,
        resolver: Resolver,
        metrics: Metrics,
        idle: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            serve: ServeSettings {
                header_timeout: timeouts.detect,
                idle_timeout: timeouts.idle,
                max_streams: 1000,
            },
            timeouts,
            dialer,
            resolver,
            metrics,
            http: Cache::new(idle),
            tcp: Cache::new(idle),
        })
    }

    /// Serves one redirected connection until it ends.
    pub async fn handle(self: Arc<Self>, tcp: TcpStream, cancel: CancellationToken) {
        match orig_dst(&tcp) {
            Ok(orig) => self.handle_to(tcp, orig, cancel).await,
            Err(error) => {
                tracing::info!(%error, "no original destination: not redirected by init's rules; closed");
                self.metrics
                    .error(Direction::Outbound, "no original destination");
            }
        }
    }

    /// Serves one connection whose original destination was `orig`.
    pub async fn handle_to(
        self: Arc<Self>,
        mut tcp: TcpStream,
        orig: SocketAddr,
        cancel: CancellationToken,
    ) {
        // The proxy's own ports and the pod's loopback services are never proxied (Linkerd
        // refuses loopback targets, which would loop back into this listener).
        // 0.0.0.0 and :: dial this host too.
        let ip = orig.ip().to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            tracing::info!(%orig, "loopback target refused");
            self.metrics.error(Direction::Outbound, "loopback");
            return;
        }
        let opaque = self.opaque(orig).await;
        let mut buf = BytesMut::new();
        let protocol = if opaque {
            Protocol::Opaque
        } else {
            match proxy_http::detect(&mut tcp, &mut buf, self.timeouts.detect).await {
                Ok(p) => p,
                Err(error) => {
                    tracing::debug!(%orig, %error, "reading the first bytes");
                    return;
                }
            }
        };
        let io = Prefixed::new(buf.freeze(), tcp);
        let activity = Arc::new(Activity::default());
        match protocol {
            Protocol::Opaque => self.forward_tcp(io, orig, &activity).await,
            Protocol::Http1 | Protocol::Http2 => {
                let version = if protocol == Protocol::Http2 {
                    Version::Http2
                } else {
                    Version::Http1
                };
                let labels =
                    Labels::new(Direction::Outbound, None, orig, &Tls::None("loopback"), []);
                let (io, _conn) = self.metrics.tcp(&labels, End::Src, io, &activity);
                let this = self.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.request(req, orig).await) }
                });
                proxy_http::serve_connection(io, version, svc, self.serve, &activity, &cancel)
                    .await;
            }
        }
    }

    /// Whether discovery marks `orig` opaque (its port in the Service's or pod's opaque ports):
    /// such a connection is not detected, so protocols where the server speaks first work.
    async fn opaque(&self, orig: SocketAddr) -> bool {
        let mut profile = self.resolver.profile(&orig.to_string());
        tokio::time::timeout(PROFILE_INITIAL_TIMEOUT, profile.first())
            .await
            .is_ok_and(|p| p.profile().is_some_and(|p| p.opaque))
    }

    /// Waits (within the fail-fast timeout) for discovery's first answer about `target`:
    /// `Ok(None)` when the target is not discovery's (outside the cluster), `Err` when
    /// discovery did not answer in time.
    async fn first(&self, target: &str) -> Result<Option<Resolve>, ()> {
        let mut resolve = self.resolver.resolve(target);
        match tokio::time::timeout(self.timeouts.failfast, resolve.first()).await {
            Ok(Resolution::NotFound) => Ok(None),
            Ok(_) => Ok(Some(resolve)),
            Err(_) => {
                tracing::warn!(%target, wait = ?self.timeouts.failfast, "no answer from the destination service");
                Err(())
            }
        }
    }

    async fn forward_tcp(
        self: Arc<Self>,
        io: Prefixed<TcpStream>,
        orig: SocketAddr,
        activity: &Arc<Activity>,
    ) {
        let Some(route) = self.tcp_route(orig).await else {
            self.metrics
                .error(Direction::Outbound, "discovery unavailable");
            return;
        };
        let picked = match &*route {
            Route::Balanced(b) => b.call(()).await.map_err(|e| e.to_string()),
            Route::Forward(()) => self
                .dialer
                .plain(orig)
                .await
                .map(|io| (io, Arc::new(plain_endpoint(orig))))
                .map_err(|e| e.to_string()),
        };
        let (remote, ep) = match picked {
            Ok(p) => p,
            Err(error) => {
                tracing::info!(%orig, %error, "no connection to the target");
                self.metrics.error(Direction::Outbound, "connect");
                return;
            }
        };
        let labels = Labels::new(Direction::Outbound, None, ep.addr, &tls_of(&ep), &ep.labels);
        let (mut client, _src) = self.metrics.tcp(&labels, End::Src, io, activity);
        let (mut remote, _dst) = self.metrics.tcp(&labels, End::Dst, remote, activity);
        let idle = self.timeouts.idle;
        match proxy_transport::forward(&mut client, &mut remote, activity, idle).await {
            Ok(Some(_)) => {}
            Ok(None) => tracing::debug!(%orig, ?idle, "idle connection closed"),
            Err(error) => tracing::debug!(%orig, %error, "opaque connection ended"),
        }
        self.tcp.touch(&orig);
    }

    async fn tcp_route(&self, orig: SocketAddr) -> Option<Arc<TcpRoute>> {
        if let Some(route) = self.tcp.get(&orig) {
            return Some(route);
        }
        // Discovery's first answer is awaited outside the cache's lock; two first connections
        // may both ask, and the first answer stored is the one kept.
        let found = self.first(&orig.to_string()).await.ok()?;
        let dialer = self.dialer.clone();
        let failfast = self.timeouts.failfast;
        Some(self.tcp.get_or_insert_with(&orig, move || match found {
            None => Route::Forward(()),
            Some(resolve) => Route::Balanced(Balancer::discovered(
                resolve,
                move |ep| Backoff::new(TcpEndpoint::new(&dialer, ep)),
                failfast,
            )),
        }))
    }

    async fn http_route(&self, target: &str, orig: SocketAddr) -> Option<Arc<HttpRoute>> {
        let key = target.to_owned();
        if let Some(route) = self.http.get(&key) {
            return Some(route);
        }
        // A name discovery does not know may still be a Service's address: a short name the
        // application's resolver completed ("web"), or an alias. Its original destination
        // decides before the request leaves the mesh.
        let by_addr = orig.to_string();
        let found = match self.first(target).await.ok()? {
            None if target != by_addr => self.first(&by_addr).await.ok()?,
            found => found,
        };
        let dialer = self.dialer.clone();
        let metrics = self.metrics.clone();
        let failfast = self.timeouts.failfast;
        let authority = key.clone();
        Some(self.http.get_or_insert_with(&key, move || match found {
            // Outside the mesh: the original address, in plaintext, one client (and its
            // connection pool) for every request.
            None => Route::Forward(Metered::new(
                HttpEndpoint::new(&dialer, Arc::new(plain_endpoint(orig))),
                &metrics,
                &authority,
            )),
            Some(resolve) => Route::Balanced(Balancer::discovered(
                resolve,
                move |ep| {
                    let http = HttpEndpoint::new(&dialer, ep.clone());
                    Backoff::new(Metered::new(http, &metrics, &authority))
                },
                failfast,
            )),
        }))
    }

    /// One request: routed, balanced, answered (by the endpoint, or with the proxy's error).
    async fn request(&self, mut req: Request<Incoming>, orig: SocketAddr) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let absolute_form = req.uri().scheme().is_some();
        let (target, authority) = target_of(&req, orig);
        if let Err(error) = set_absolute(&mut req, &authority) {
            tracing::info!(%orig, %error, "unroutable request");
            return ProxyError::BAD_PATH.response(grpc);
        }
        // An upgrade (WebSocket) keeps its Upgrade header; the client's side of it is taken now,
        // before the request goes on, and joined to the endpoint's when it answers 101.
        let downstream = proxy_http::upgrade::take(&mut req);
        if absolute_form {
            req.extensions_mut().insert(AbsoluteForm);
        }
        let Some(route) = self.http_route(&target, orig).await else {
            return DISCOVERY_UNAVAILABLE.response(grpc);
        };
        let result = match &*route {
            Route::Balanced(b) => b.call(req).await,
            Route::Forward(fwd) => tower::Service::call(&mut fwd.clone(), req)
                .await
                .map_err(BalanceError::Endpoint),
        };
        match result {
            Ok(mut rsp) => {
                if let Some(downstream) = downstream {
                    proxy_http::upgrade::splice(downstream, &mut rsp);
                }
                rsp.map(|b| b.boxed())
            }
            Err(BalanceError::Unavailable(wait)) => {
                tracing::info!(%target, ?wait, "no endpoint ready");
                let labels = Labels::new(
                    Direction::Outbound,
                    Some(&target),
                    orig,
                    &Tls::None("no_endpoints"),
                    [],
                );
                self.metrics.response(&labels, 503, wait);
                ProxyError::NO_ENDPOINTS.response(grpc)
            }
            Err(BalanceError::Endpoint(error)) => {
                let timeout = is_connect_timeout(&*error);
                tracing::info!(%target, %error, "request failed");
                if timeout {
                    ProxyError::CONNECT_TIMEOUT.response(grpc)
                } else {
                    ProxyError::ENDPOINT.response(grpc)
                }
            }
        }
    }
}

/// The discovery target of a request and its authority: its `host:port` (the original port
/// when it names none) when the authority is a name; the original `ip:port` otherwise. Pure.
pub fn target_of<B>(req: &Request<B>, orig: SocketAddr) -> (String, String) {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(authority) = authority.and_then(|a| a.parse::<Authority>().ok()) else {
        return (orig.to_string(), orig.to_string());
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        return (orig.to_string(), authority.as_str().to_owned());
    }
    let port = authority.port_u16().unwrap_or(orig.port());
    let target = format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase());
    (target, authority.as_str().to_owned())
}

/// Gives the request an absolute URI (scheme and authority): HTTP/2 needs them, and hyper's
/// client pools by them.
fn set_absolute<B>(req: &mut Request<B>, authority: &str) -> Result<(), http::Error> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()?;
    Ok(())
}

/// An endpoint's HTTP service, counted in the request metrics with its labels.
#[derive(Clone, Debug)]
pub struct Metered {
    inner: HttpEndpoint,
    metrics: Metrics,
    labels: Labels,
}

impl Metered {
    fn new(inner: HttpEndpoint, metrics: &Metrics, authority: &str) -> Self {
        let labels = Labels::new(
            Direction::Outbound,
            Some(authority),
            inner.ep.addr,
            &tls_of(&inner.ep),
            &inner.ep.labels,
        );
        Self {
            inner,
            metrics: metrics.clone(),
            labels,
        }
    }
}

impl tower::Service<Request<Incoming>> for Metered {
    type Response = Response<Incoming>;
    type Error = tower::BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<Incoming>, tower::BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), tower::BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.metrics.request(&self.labels);
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        let labels = self.labels.clone();
        Box::pin(async move {
            let result = fut.await;
            let status = match &result {
                Ok(rsp) => rsp.status().as_u16(),
                Err(e) if is_connect_timeout(e) => 504,
                Err(_) => 502,
            };
            metrics.response(&labels, status, start.elapsed());
            result.map_err(Into::into)
        })
    }
}
