//! The inbound side: connections to the pod, redirected to 4143 by `init`'s rules, and direct
//! connections to 4143 from peer proxies (opaque transport).
//!
//! Per connection: the original destination; TLS whose SNI is this pod's identity is
//! terminated (mTLS: the client's identity is known), TLS for another name and plaintext pass
//! through; the port's policy (from the policy service) decides whether the client may connect;
//! then HTTP (detected, or as the policy says) is served request by request to the application
//! on `127.0.0.1:<port>` with `l5d-client-id`, and anything else is forwarded as bytes.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use bytes::BytesMut;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{client::legacy::Client, rt::TokioIo};
use proxy_discovery::{ClientTls, InboundPolicies, ServerPolicy, authorize};
use proxy_http::{
    L5D_CLIENT_ID, OrigProto, Protocol, ProxyBody, ProxyError, ServeSettings, Version, is_grpc,
};
use proxy_identity::{Credentials, Id};
use proxy_transport::{Activity, direct::Admission, orig_dst};
use proxy_transport_header::Prefixed;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Timeouts,
    metrics::{Direction, End, Labels, Metrics, Tls},
};

/// Linkerd reads up to 8 KiB of a ClientHello before giving up on finding its SNI.
const MAX_CLIENT_HELLO: usize = 8 * 1024;

/// The forbidden answer, as Linkerd's inbound proxy writes it.
const UNAUTHORIZED: ProxyError = ProxyError::new(
    http::StatusCode::FORBIDDEN,
    7,
    "unauthorized request on route",
);

/// The inbound side's shared state.
#[derive(Debug)]
pub struct Inbound {
    own: Id,
    tls: Arc<ServerConfig>,
    direct: Admission,
    policies: InboundPolicies,
    /// Ports configured opaque (no detection), whatever the policy says.
    opaque_ports: Vec<u16>,
    inbound_port: u16,
    timeouts: Timeouts,
    metrics: Metrics,
    serve: ServeSettings,
    /// HTTP to the application, per port, shared by every client connection.
    apps: std::sync::Mutex<HashMap<u16, AppClients>>,
}

/// Connections to the application on one loopback port, whatever a request's URI names.
#[derive(Clone, Debug)]
struct AppConnector {
    addr: SocketAddr,
    timeout: std::time::Duration,
}

impl tower::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = proxy_transport::tcp::ConnectError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move {
            Ok(TokioIo::new(
                proxy_transport::tcp::connect(addr, timeout).await?,
            ))
        })
    }
}

/// The clients of one application port: pooled HTTP/1 (a peer's multiplexed requests reach the
/// application at once, each on a connection of its own) and multiplexed HTTP/2.
#[derive(Clone, Debug)]
struct AppClients {
    h1: Client<AppConnector, Incoming>,
    h2: Client<AppConnector, Incoming>,
}

/// What the first bytes of a connection were.
enum Opening {
    /// TLS for this pod: terminated.
    Mesh,
    /// TLS for another name (passed through) with its SNI.
    Passthru(Option<String>),
    Plain,
}

impl Inbound {
    #[allow(clippy::too_many_arguments)] // each is one of the proxy's settings
    pub fn new(
        creds: &Arc<Credentials>,
        direct: Admission,
        policies: InboundPolicies,
        opaque_ports: Vec<u16>,
        inbound_port: u16,
        timeouts: Timeouts,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            own: creds.id().clone(),
            tls: proxy_identity::tls::server_config(creds, &[]),
            direct,
            policies,
            opaque_ports,
            inbound_port,
            serve: ServeSettings {
                header_timeout: timeouts.detect,
                idle_timeout: timeouts.idle,
                max_streams: 1000,
            },
            apps: std::sync::Mutex::default(),
            timeouts,
            metrics,
        })
    }

    /// Whether `port` is opaque: configured so, or by its policy.
    fn is_opaque(&self, port: u16, policy: &ServerPolicy) -> bool {
        self.opaque_ports.contains(&port)
            || matches!(
                policy.protocol,
                proxy_discovery::Protocol::Opaque | proxy_discovery::Protocol::Tls
            )
    }

    /// The clients of the application's `port`.
    fn app(&self, port: u16) -> AppClients {
        let mut apps = self
            .apps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        apps.entry(port)
            .or_insert_with(|| {
                let connector = AppConnector {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    timeout: self.timeouts.connect,
                };
                AppClients {
                    h1: proxy_http::pooled_client(connector.clone(), false),
                    h2: proxy_http::pooled_client(connector, true),
                }
            })
            .clone()
    }

    /// Serves one connection until it ends.
    pub async fn handle(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        cancel: CancellationToken,
    ) {
        let orig = match orig_dst(&tcp) {
            Ok(a) => a,
            // Not redirected: dialled at the inbound port itself (a direct connection).
            Err(_) => match tcp.local_addr() {
                Ok(a) => a,
                Err(_) => return,
            },
        };
        self.handle_to(tcp, peer, orig, cancel).await;
    }

    /// Serves one connection whose original destination was `orig`.
    pub async fn handle_to(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        orig: SocketAddr,
        cancel: CancellationToken,
    ) {
        if orig.port() == self.inbound_port {
            return self.direct(tcp, peer, cancel).await;
        }
        let policy = self.policies.port(orig.port()).borrow().clone();
        let mut tcp = tcp;
        let mut buf = BytesMut::new();
        // On an opaque port nothing is read first: meshed clients reach it by opaque transport
        // (mTLS to the inbound port, which discovery tells them), so a connection to the port
        // itself is plaintext, and its client may be waiting for the server to speak first
        // (waiting for its first bytes would hold such a protocol for the detect timeout).
        let opening = if self.is_opaque(orig.port(), &policy) {
            Ok(Ok(Opening::Plain))
        } else {
            tokio::time::timeout(
                self.timeouts.detect,
                read_opening(&mut tcp, &mut buf, &self.own),
            )
            .await
        };
        let opening = match opening {
            Ok(Ok(o)) => o,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "reading the first bytes");
                return;
            }
            // A client that says nothing (a server-speaks-first protocol) is plaintext.
            Err(_) => Opening::Plain,
        };
        let io = Prefixed::new(buf.freeze(), tcp);
        match opening {
            Opening::Mesh => {
                let tls = match tokio::time::timeout(
                    self.timeouts.detect,
                    TlsAcceptor::from(self.tls.clone()).accept(io),
                )
                .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "TLS handshake failed");
                        self.metrics.error(Direction::Inbound, "tls handshake");
                        return;
                    }
                    Err(_) => {
                        self.metrics
                            .error(Direction::Inbound, "tls detection timeout");
                        return;
                    }
                };
                let client = proxy_identity::tls::client_id(tls.get_ref().1);
                let tls_label = Tls::Established(client.clone());
                self.serve(
                    tls,
                    peer,
                    orig,
                    &policy,
                    ClientTls::Tls {
                        identity: client.as_ref(),
                    },
                    tls_label,
                    cancel,
                )
                .await;
            }
            Opening::Passthru(sni) => {
                self.serve(
                    io,
                    peer,
                    orig,
                    &policy,
                    ClientTls::None,
                    Tls::Passthru(sni),
                    cancel,
                )
                .await;
            }
            Opening::Plain => {
                self.serve(
                    io,
                    peer,
                    orig,
                    &policy,
                    ClientTls::None,
                    Tls::None("no_tls_from_remote"),
                    cancel,
                )
                .await;
            }
        }
    }

    /// After the TLS step: authorization, protocol, then the application.
    #[allow(clippy::too_many_arguments)] // one connection's facts
    async fn serve<IO>(
        self: Arc<Self>,
        mut io: IO,
        peer: SocketAddr,
        orig: SocketAddr,
        policy: &ServerPolicy,
        client: ClientTls<'_>,
        tls: Tls,
        cancel: CancellationToken,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use proxy_discovery::Protocol as P;
        let mut buf = BytesMut::new();
        let protocol = match policy.protocol {
            P::Opaque | P::Tls => Protocol::Opaque,
            P::Detect { .. } if self.opaque_ports.contains(&orig.port()) => Protocol::Opaque,
            P::Http1 => Protocol::Http1,
            P::Http2 | P::Grpc => Protocol::Http2,
            P::Detect { .. } => {
                match proxy_http::detect(&mut io, &mut buf, self.timeouts.detect).await {
                    Ok(p) => p,
                    Err(_) => return,
                }
            }
        };
        let io = Prefixed::new(buf.freeze(), io);
        let decision = authorize(
            policy,
            &proxy_discovery::Client {
                ip: peer.ip(),
                tls: client,
            },
        );
        let client_id = match client {
            ClientTls::Tls { identity } => identity.cloned(),
            ClientTls::None => None,
        };
        let allowed = match &decision {
            Ok(authz) => {
                self.metrics.authz(false, true, &policy.name, &authz.name);
                true
            }
            Err(denied) => {
                tracing::info!(
                    %peer, port = orig.port(), client = ?client_id.as_ref().map(Id::as_str),
                    server = %denied.server, protocol = protocol.as_str(),
                    "connection refused by the inbound policy"
                );
                false
            }
        };
        let activity = Arc::new(Activity::default());
        let labels = Labels::new(Direction::Inbound, None, orig, &tls, []);
        let (io, _conn) = self.metrics.tcp(&labels, End::Src, io, &activity);
        match protocol {
            Protocol::Opaque => {
                if !allowed {
                    self.metrics.authz(false, false, &policy.name, "");
                    return;
                }
                let app = SocketAddr::from(([127, 0, 0, 1], orig.port()));
                let remote = match proxy_transport::tcp::connect(app, self.timeouts.connect).await {
                    Ok(r) => r,
                    Err(error) => {
                        tracing::info!(%app, %error, "the application refused the connection");
                        self.metrics.error(Direction::Inbound, "connect");
                        return;
                    }
                };
                let (mut remote, _dst) = self.metrics.tcp(&labels, End::Dst, remote, &activity);
                let mut io = io;
                let idle = self.timeouts.idle;
                match proxy_transport::forward(&mut io, &mut remote, &activity, idle).await {
                    Ok(Some(_)) => {}
                    Ok(None) => tracing::debug!(%peer, ?idle, "idle connection closed"),
                    Err(error) => tracing::debug!(%peer, %error, "opaque connection ended"),
                }
            }
            Protocol::Http1 | Protocol::Http2 => {
                let version = if protocol == Protocol::Http2 {
                    Version::Http2
                } else {
                    Version::Http1
                };
                let conn = Arc::new(Conn {
                    app: self.app(orig.port()),
                    inbound: self.clone(),
                    app_port: orig.port(),
                    client_id,
                    allowed,
                    server: policy.name.clone(),
                    labels,
                });
                let svc = hyper::service::service_fn(move |req| {
                    let conn = conn.clone();
                    async move { Ok::<_, Infallible>(conn.request(req).await) }
                });
                proxy_http::serve_connection(io, version, svc, self.serve, &activity, &cancel)
                    .await;
            }
        }
    }

    /// A connection to the inbound port itself: a peer proxy's opaque transport (mTLS and a
    /// transport header naming the application's port).
    async fn direct(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, cancel: CancellationToken) {
        // This pod's address, whichever the peer dialled.
        let Ok(local) = tcp.local_addr() else { return };
        let admitted = match self.direct.admit(tcp, |_| true, &cancel).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(reason) => {
                tracing::info!(%peer, reason = reason.as_str(), "direct connection refused");
                self.metrics.error(Direction::Inbound, reason.as_str());
                return;
            }
        };
        // A sidecar is not a gateway: a named target is refused.
        if admitted.header.name.is_some() {
            tracing::info!(%peer, client = %admitted.client, "transport header names a target: this proxy is not a gateway");
            self.metrics
                .error(Direction::Inbound, "gateway domain invalid");
            return;
        }
        let port = admitted.header.port;
        let orig = SocketAddr::new(local.ip(), port);
        let policy = self.policies.port(port).borrow().clone();
        let client = admitted.client.clone();
        let tls = Tls::Established(Some(client.clone()));
        let protocol = admitted.header.protocol;
        let (_places, io) = (admitted.places, admitted.io);
        // The header says what follows; no detection.
        let mut policy = (*policy).clone();
        policy.protocol = match protocol {
            Some(proxy_transport_header::SessionProtocol::Http2) => {
                proxy_discovery::Protocol::Http2
            }
            Some(proxy_transport_header::SessionProtocol::Http1) => {
                proxy_discovery::Protocol::Http1
            }
            None => proxy_discovery::Protocol::Opaque,
        };
        self.serve(
            io,
            peer,
            orig,
            &policy,
            ClientTls::Tls {
                identity: Some(&client),
            },
            tls,
            cancel,
        )
        .await;
    }
}

/// Reads the first bytes (kept in `buf`): TLS whose SNI is `own`, other TLS, or not TLS.
async fn read_opening<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    own: &Id,
) -> std::io::Result<Opening> {
    let own_name = proxy_identity::tls::server_name(own).map(|n| n.to_str().into_owned());
    loop {
        match client_hello_sni(buf) {
            Hello::NotTls => return Ok(Opening::Plain),
            Hello::Sni(sni) if sni.is_some() && sni == own_name => return Ok(Opening::Mesh),
            Hello::Sni(sni) => return Ok(Opening::Passthru(sni)),
            Hello::NeedMore if buf.len() >= MAX_CLIENT_HELLO => return Ok(Opening::Passthru(None)),
            Hello::NeedMore => {}
        }
        buf.reserve(MAX_CLIENT_HELLO - buf.len());
        let mut limited = (&mut *io).take((MAX_CLIENT_HELLO - buf.len()) as u64);
        if limited.read_buf(buf).await? == 0 {
            return Ok(if buf.is_empty() {
                Opening::Plain
            } else {
                Opening::Passthru(None)
            });
        }
    }
}

/// What a connection's first bytes say about TLS.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    NotTls,
    NeedMore,
    /// A ClientHello, with the server name it asked for.
    Sni(Option<String>),
}

/// Reads a ClientHello's SNI with rustls's own parser. Pure: the bytes are not consumed.
pub fn client_hello_sni(buf: &[u8]) -> Hello {
    // A TLS record starts with the handshake content type (22) and version 3.x.
    match buf {
        [] => return Hello::NeedMore,
        [22] | [22, 3, ..] => {}
        _ => return Hello::NotTls,
    }
    if buf.len() < 2 {
        return Hello::NeedMore;
    }
    let mut acceptor = tokio_rustls::rustls::server::Acceptor::default();
    let mut cursor = std::io::Cursor::new(buf);
    while (cursor.position() as usize) < buf.len() {
        if acceptor.read_tls(&mut cursor).is_err() {
            return Hello::NotTls;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Sni(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) => Hello::NeedMore,
        Err(_) => Hello::NotTls,
    }
}

/// One HTTP connection to the application.
struct Conn {
    inbound: Arc<Inbound>,
    /// The application's clients, looked up once for the connection.
    app: AppClients,
    app_port: u16,
    client_id: Option<Id>,
    allowed: bool,
    server: String,
    labels: Labels,
}

impl Conn {
    async fn request(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let m = &self.inbound.metrics;
        let grpc = is_grpc(req.headers());
        m.request(&self.labels);
        let start = Instant::now();
        if !self.allowed {
            m.authz(true, false, &self.server, "");
            m.response(&self.labels, 403, start.elapsed());
            return UNAUTHORIZED.response(grpc);
        }
        // The peer's upgrade undone: the application gets the version its client spoke.
        let orig = OrigProto::downgrade(&mut req);
        let downstream = proxy_http::upgrade::take(&mut req);
        // Only a verified identity reaches the application; a client's own claim never does.
        match &self.client_id {
            Some(id) => proxy_http::set_client_id(req.headers_mut(), id.as_str()),
            None => {
                req.headers_mut().remove(L5D_CLIENT_ID);
            }
        }
        let app = SocketAddr::from(([127, 0, 0, 1], self.app_port));
        let client = if req.version() == http::Version::HTTP_2 {
            &self.app.h2
        } else {
            set_host(&mut req);
            &self.app.h1
        };
        absolute(&mut req, app);
        let mut rsp = match client.request(req).await {
            Ok(mut rsp) => {
                if let Some(downstream) = downstream {
                    proxy_http::upgrade::splice(downstream, &mut rsp);
                }
                rsp.map(|b| b.boxed())
            }
            Err(error) => {
                tracing::info!(%app, %error, "the application did not answer");
                let e = if crate::endpoint::is_connect_timeout(&error) {
                    ProxyError::CONNECT_TIMEOUT
                } else {
                    ProxyError::ENDPOINT
                };
                m.response(&self.labels, e.status.as_u16(), start.elapsed());
                return e.response(grpc);
            }
        };
        m.response(&self.labels, rsp.status().as_u16(), start.elapsed());
        if orig.is_some() {
            OrigProto::upgrade_response(&mut rsp);
        }
        rsp
    }
}

/// A request leaving HTTP/2 for the application's HTTP/1 keeps its authority as `Host`.
fn set_host<B>(req: &mut Request<B>) {
    if !req.headers().contains_key(header::HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(header::HOST, v);
    }
}

/// The client pools by the URI's authority and needs one: a request in origin form gets its
/// `Host` (or else the application's address). HTTP/1 goes out in origin form again.
fn absolute<B>(req: &mut Request<B>, app: SocketAddr) {
    if req.uri().authority().is_some() {
        return;
    }
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| app.to_string(), str::to_owned);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_tls_from_plaintext() {
        assert_eq!(client_hello_sni(b""), Hello::NeedMore);
        assert_eq!(client_hello_sni(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(client_hello_sni(b"PRI * HTTP/2.0"), Hello::NotTls);
        assert_eq!(client_hello_sni(&[22]), Hello::NeedMore);
        assert_eq!(client_hello_sni(&[22, 3, 1, 0]), Hello::NeedMore);
        assert_eq!(client_hello_sni(&[22, 9, 9, 9, 9, 9]), Hello::NotTls);
    }
}
