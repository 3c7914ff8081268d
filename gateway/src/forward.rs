//! Forwarding an accepted connection: opaque TCP as a bidirectional copy (half-close passed
//! on), or HTTP/1 and HTTP/2 served and proxied request by request, balanced across endpoints.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use proxy_http::{
    MAX_HTTP1_HEAD, OrigProto, forwarded_by, http1_server, set_client_id, strip_hop_by_hop,
};
use proxy_transport_header::SessionProtocol;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Metrics, Refusal,
    metrics::{DirectionLabels, StatusLabels},
    server::{Inner, Target},
};

/// Connections to endpoints for HTTP. An HTTP/2 connection to an endpoint is shared by every
/// request for it (multiplexed); HTTP/1 connections are kept per client connection
/// ([`Http1Conns`]), which serves one request at a time, so no pool has to be locked or searched
/// per request (what a general-purpose pooled client costs: see the gateway benchmark).
#[derive(Debug)]
pub(crate) struct Clients {
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Incoming>>>,
    connect_timeout: Duration,
}

/// Why a request could not be sent to an endpoint.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {0}: timed out")]
    ConnectTimeout(SocketAddr),
    #[error("HTTP to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl Clients {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self {
            http2: Mutex::default(),
            connect_timeout,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TokioIo<TcpStream>, SendError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| SendError::ConnectTimeout(addr))?
            .map_err(|source| SendError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        Ok(TokioIo::new(tcp))
    }

    async fn send_http2(
        &self,
        addr: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, SendError> {
        let cached = self
            .http2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned();
        let req = match cached {
            Some(mut sender) => match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp),
                // Not sent (the connection went away): once more on a new connection.
                Err(mut e) => e.take_message().ok_or_else(|| SendError::Http {
                    addr,
                    source: e.into_error(),
                })?,
            },
            None => req,
        };
        let io = self.connect(addr).await?;
        let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/2 endpoint connection ended");
            }
        });
        {
            let mut conns = self
                .http2
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            conns.retain(|_, s| !s.is_closed());
            conns.insert(addr, sender.clone());
        }
        sender
            .send_request(req)
            .await
            .map_err(|source| SendError::Http { addr, source })
    }
}

/// One client connection's HTTP/1 connections to endpoints, each reused while it lives.
#[derive(Debug, Default)]
struct Http1Conns(Mutex<HashMap<SocketAddr, http1::SendRequest<Incoming>>>);

impl Http1Conns {
    /// Sends on the kept connection to `addr`, or a new one. With `wait`, a kept connection
    /// still busy with the previous response is waited for (a client connection speaking
    /// HTTP/1 sends one request at a time, so it is nearly done); without (many requests of one
    /// HTTP/2 client, downgraded), a busy one is left to its request and another is opened, so
    /// that one slow response does not hold up the others.
    async fn send(
        &self,
        clients: &Clients,
        addr: SocketAddr,
        req: Request<Incoming>,
        wait: bool,
    ) -> Result<Response<Incoming>, SendError> {
        let cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&addr);
        let mut req = req;
        let reusable = match cached.filter(|s| !s.is_closed()) {
            Some(sender) if wait || sender.is_ready() => Some(sender),
            Some(busy) => {
                self.put(addr, busy);
                None
            }
            None => None,
        };
        // Ready once the previous response's body is done.
        if let Some(mut sender) = reusable
            && sender.ready().await.is_ok()
        {
            let sent = sender.try_send_request(req);
            self.put(addr, sender);
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
        let io = clients.connect(addr).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|source| SendError::Http { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%addr, %error, "HTTP/1 endpoint connection ended");
            }
        });
        let sent = sender.send_request(req);
        self.put(addr, sender);
        sent.await
            .map_err(|source| SendError::Http { addr, source })
    }

    fn put(&self, addr: SocketAddr, sender: http1::SendRequest<Incoming>) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(addr, sender);
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) async fn forward<IO>(
    inner: &Arc<Inner>,
    io: IO,
    target: Target,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let inbound = DirectionLabels {
        direction: "inbound",
    };
    let client = Tracked::new(io, &activity, &inner.metrics, &inbound);
    match target.header.protocol {
        None => opaque(inner, client, &target, activity).await,
        Some(protocol) => http(inner, client, target, protocol, activity, cancel).await,
    }
}

/// Connects to the first endpoint that accepts, trying each once in round-robin order.
async fn connect(inner: &Inner, target: &Target) -> Option<(TcpStream, SocketAddr)> {
    for addr in target.endpoints.ordered() {
        match tokio::time::timeout(inner.options.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, addr));
            }
            Ok(Err(error)) => {
                tracing::info!(%addr, target = %target.name, %error, "endpoint refused")
            }
            Err(_) => tracing::info!(%addr, target = %target.name, "endpoint connect timed out"),
        }
    }
    None
}

async fn opaque<IO>(
    inner: &Inner,
    mut client: Tracked<IO>,
    target: &Target,
    activity: Arc<Activity>,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // On shutdown an opaque stream cannot be asked to finish: it runs until it ends or the
    // process's drain deadline.
    let Some((stream, addr)) = connect(inner, target).await else {
        inner.metrics.refuse(Refusal::NoEndpoints);
        tracing::info!(target = %target.name, reason = Refusal::NoEndpoints.as_str(), "connection refused");
        return;
    };
    let outbound = DirectionLabels {
        direction: "outbound",
    };
    inner.metrics.open_total.get_or_create(&outbound).inc();
    let mut server = Tracked::new(stream, &activity, &inner.metrics, &outbound);
    // copy_bidirectional shuts down each write side when the other side's read ends, so a
    // half-close travels through and the other direction keeps flowing.
    // 32 KiB buffers: two TLS records' plaintext per read and write (tokio's default of 8 KiB
    // splits each record into two sends). Measured by the gateway benchmark at 16 bulk
    // connections: 8 KiB 18 %, 16 KiB 27 %, 32 KiB 29-42 %, 64 KiB 31 % of direct TCP (1 and 2
    // threads). 64 KiB per forwarded opaque connection, bounded by --max-connections.
    let copy =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, 32 * 1024, 32 * 1024);
    tokio::pin!(copy);
    let idle = inner.options.idle_timeout;
    loop {
        tokio::select! {
            res = &mut copy => {
                match res {
                    Ok((up, down)) => tracing::debug!(%addr, up, down, "opaque connection closed"),
                    Err(error) => tracing::debug!(%addr, %error, "opaque connection failed"),
                }
                return;
            }
            () = tokio::time::sleep_until(activity.deadline(idle)) => {
                if activity.idle_for() >= idle {
                    tracing::info!(%addr, ?idle, "idle connection closed");
                    return;
                }
            }
        }
    }
}

async fn http<IO>(
    inner: &Arc<Inner>,
    client: Tracked<IO>,
    target: Target,
    protocol: SessionProtocol,
    activity: Arc<Activity>,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let target = Arc::new(target);
    let http1 = Arc::new(Http1Conns::default());
    let service = {
        let inner = inner.clone();
        hyper::service::service_fn(move |req| {
            let inner = inner.clone();
            let target = target.clone();
            let http1 = http1.clone();
            async move { Ok::<_, Infallible>(proxy(&inner, &target, &http1, req).await) }
        })
    };
    let io = TokioIo::new(client);
    let idle = inner.options.idle_timeout;
    macro_rules! drive {
        ($conn:expr) => {{
            let conn = $conn;
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(error) = res {
                            tracing::debug!(%error, "HTTP connection ended");
                        }
                        break;
                    }
                    () = cancel.cancelled(), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = tokio::time::sleep_until(activity.deadline(idle)), if !draining => {
                        if activity.idle_for() >= idle {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        }};
    }
    match protocol {
        SessionProtocol::Http1 => drive!(
            http1_server()
                .header_read_timeout(inner.options.header_timeout)
                .serve_connection(io, service)
        ),
        SessionProtocol::Http2 => drive!(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(1000)
                .max_header_list_size(u32::try_from(MAX_HTTP1_HEAD).unwrap_or(u32::MAX))
                .keep_alive_interval(Duration::from_secs(30))
                .serve_connection(io, service)
        ),
    }
}

async fn proxy(
    inner: &Inner,
    target: &Target,
    http1: &Http1Conns,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let own = inner.creds.id().as_str();
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if target.client.as_str() == own || forwarded_by(req.headers(), own) {
        tracing::info!(client = %target.client, target = %target.name, "gateway loop refused");
        return error(
            inner,
            StatusCode::LOOP_DETECTED,
            is_grpc,
            10,
            "gateway loop",
            true,
        );
    }
    // An HTTP/1 request a Linkerd proxy carried as HTTP/2 goes to the backend as HTTP/1.
    let orig = OrigProto::downgrade(&mut req);
    let authority = format!("{}:{}", target.name, target.header.port);
    let forwarded = format!(
        "by={own};for={};host={authority};proto=https",
        target.client
    );
    strip_hop_by_hop(req.headers_mut());
    // The backend learns who called from the certificate, never from the client's own claim.
    set_client_id(req.headers_mut(), target.client.as_str());
    if let Ok(v) = HeaderValue::try_from(forwarded) {
        req.headers_mut().append(header::FORWARDED, v);
    }
    let http2 = req.version() == http::Version::HTTP_2;
    if !http2 && let Ok(v) = HeaderValue::try_from(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    // One endpoint per request, round-robin. A failed request is not replayed elsewhere: its
    // body may already have been sent.
    let Some(addr) = target.endpoints.ordered().next() else {
        return error(
            inner,
            StatusCode::SERVICE_UNAVAILABLE,
            is_grpc,
            14,
            "no endpoints",
            false,
        );
    };
    // HTTP/2 needs the absolute form (it becomes :scheme and :authority); HTTP/1 sends the path.
    let uri = if http2 {
        http::Uri::try_from(format!("http://{addr}{path}"))
    } else if orig.is_some_and(|o| o.absolute_form) {
        http::Uri::try_from(format!("http://{authority}{path}"))
    } else {
        http::Uri::try_from(path)
    };
    let Ok(uri) = uri else {
        return error(
            inner,
            StatusCode::BAD_REQUEST,
            is_grpc,
            3,
            "invalid request path",
            false,
        );
    };
    *req.uri_mut() = uri;
    let sent = if http2 {
        inner.clients.send_http2(addr, req).await
    } else {
        http1.send(&inner.clients, addr, req, orig.is_none()).await
    };
    match sent {
        Ok(rsp) => {
            let (mut parts, body) = rsp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if orig.is_some() {
                let mut head = Response::from_parts(parts, ());
                OrigProto::upgrade_response(&mut head);
                parts = head.into_parts().0;
            }
            inner
                .metrics
                .http_responses
                .get_or_create(&StatusLabels {
                    http_status: parts.status.as_u16(),
                })
                .inc();
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            tracing::info!(%addr, target = %target.name, error = %e, "endpoint request failed");
            if matches!(e, SendError::ConnectTimeout(_)) {
                error(
                    inner,
                    StatusCode::GATEWAY_TIMEOUT,
                    is_grpc,
                    4,
                    "endpoint connect timed out",
                    false,
                )
            } else {
                error(
                    inner,
                    StatusCode::BAD_GATEWAY,
                    is_grpc,
                    14,
                    "endpoint connection error",
                    false,
                )
            }
        }
    }
}

/// An error response as Linkerd's proxy writes it: `l5d-proxy-error`, and for gRPC a
/// `grpc-status` in a 200.
fn error(
    inner: &Inner,
    status: StatusCode,
    grpc: bool,
    grpc_code: u8,
    message: &'static str,
    close: bool,
) -> Response<Body> {
    let mut rsp = Response::new(
        Full::new(Bytes::from_static(message.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    if grpc {
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        rsp.headers_mut()
            .insert("grpc-status", HeaderValue::from(u16::from(grpc_code)));
        rsp.headers_mut()
            .insert("grpc-message", HeaderValue::from_static(message));
        *rsp.body_mut() = Full::new(Bytes::new())
            .map_err(|never: Infallible| match never {})
            .boxed();
    } else {
        *rsp.status_mut() = status;
    }
    rsp.headers_mut()
        .insert("l5d-proxy-error", HeaderValue::from_static(message));
    if close {
        rsp.headers_mut()
            .insert("l5d-proxy-connection", HeaderValue::from_static("close"));
    }
    inner
        .metrics
        .http_responses
        .get_or_create(&StatusLabels {
            http_status: rsp.status().as_u16(),
        })
        .inc();
    rsp
}

/// When a connection last moved a byte, either way.
#[derive(Debug)]
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn idle_for(&self) -> Duration {
        self.last().elapsed()
    }

    fn deadline(&self, idle: Duration) -> Instant {
        self.last() + idle
    }
}

/// A stream that records activity and counts bytes.
struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    read: Counter,
    write: Counter,
}

impl<IO> Tracked<IO> {
    fn new(
        io: IO,
        activity: &Arc<Activity>,
        metrics: &Metrics,
        direction: &DirectionLabels,
    ) -> Self {
        Self {
            io,
            activity: activity.clone(),
            read: metrics.read_bytes.get_or_create(direction).clone(),
            write: metrics.write_bytes.get_or_create(direction).clone(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.touch();
            self.read.inc_by(n as u64);
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.activity.touch();
            self.write.inc_by(n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
