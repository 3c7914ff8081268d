//! The admin server every meshlink process runs: `/live`, `/ready` and `/metrics` over plain
//! HTTP/1 (kubelet probes and Prometheus scrape it).
//!
//! `/metrics` can be limited ([`MetricsAccess`]): the gateway's admin port is reachable from
//! other clusters (the probe), and its metrics name clients and targets, so there only loopback,
//! configured networks, and clients with a certificate from the trust anchors (TLS on the same
//! port, told apart by its first byte) may read them.
//!
//! It is bounded like every listener: a connection must send its request head within
//! [`HEADER_TIMEOUT`], at most [`MAX_CONNECTIONS`] are served at once (others wait in the
//! kernel's backlog), requests have no body to read, and nothing else is routed.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 128;

/// Content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding the admin server to {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Who may read `/metrics`.
#[derive(Clone, Default)]
pub struct MetricsAccess {
    restricted: bool,
    networks: Vec<ipnet::IpNet>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for MetricsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsAccess")
            .field("restricted", &self.restricted)
            .field("networks", &self.networks)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl MetricsAccess {
    /// Only loopback clients, clients in `networks`, and (when `tls` is given) TLS clients that
    /// present a certificate the config's verifier accepts.
    pub fn restricted(
        networks: Vec<ipnet::IpNet>,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> Self {
        Self {
            restricted: true,
            networks,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        }
    }

    fn allows_plain(&self, peer: std::net::IpAddr) -> bool {
        !self.restricted
            || peer.to_canonical().is_loopback()
            || self
                .networks
                .iter()
                .any(|n| n.contains(&peer.to_canonical()))
    }
}

/// What the admin server serves.
#[derive(Clone, Debug)]
pub struct Admin {
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
    access: MetricsAccess,
}

impl Admin {
    /// Serves `registry` on `/metrics` and `ready` on `/ready`.
    pub fn new(registry: Registry, ready: watch::Receiver<bool>) -> Self {
        Self {
            registry: Arc::new(registry),
            ready,
            access: MetricsAccess::default(),
        }
    }

    /// Limits who may read `/metrics` (everyone may by default).
    pub fn metrics_access(mut self, access: MetricsAccess) -> Self {
        self.access = access;
        self
    }

    /// Binds `addr`; the returned future serves until `cancel` fires.
    pub async fn bind(
        self,
        addr: SocketAddr,
        cancel: CancellationToken,
    ) -> Result<(SocketAddr, impl Future<Output = ()>), BindError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        Ok((local, self.serve(listener, cancel)))
    }

    async fn serve(self, listener: TcpListener, cancel: CancellationToken) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = tokio::select! {
                () = cancel.cancelled() => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (stream, peer) = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        continue;
                    }
                },
            };
            let this = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.connection(stream, peer, cancel).await;
            });
        }
    }

    async fn connection(self, stream: TcpStream, peer: SocketAddr, cancel: CancellationToken) {
        let Some(acceptor) = self.access.tls.clone() else {
            let metrics = self.access.allows_plain(peer.ip());
            return self.http(stream, peer, metrics, cancel).await;
        };
        // A TLS record starts with 0x16 (handshake); HTTP starts with a method's letter.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {
                match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let authenticated = tls.get_ref().1.peer_certificates().is_some();
                        self.http(tls, peer, authenticated, cancel).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "admin TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                }
            }
            Ok(Ok(_)) => {
                let metrics = self.access.allows_plain(peer.ip());
                self.http(stream, peer, metrics, cancel).await;
            }
            _ => {}
        }
    }

    async fn http<IO>(self, io: IO, peer: SocketAddr, metrics: bool, cancel: CancellationToken)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.route(&req, metrics)) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(error) = res {
                    tracing::debug!(%peer, %error, "admin connection ended");
                }
            }
            () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
        }
    }

    fn route(&self, req: &Request<Incoming>, metrics_allowed: bool) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/ready" if *self.ready.borrow() => text(StatusCode::OK, "ready\n"),
            "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" if !metrics_allowed => text(
                StatusCode::FORBIDDEN,
                "metrics are served to loopback, the configured networks and mTLS clients only\n",
            ),
            "/metrics" => {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &self.registry) {
                    Ok(()) => Response::builder()
                        .header(header::CONTENT_TYPE, OPENMETRICS)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default(),
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Ready while every one of `conditions` is true (a certificate in date, watches synced, ...);
/// follows them for as long as the result is watched.
pub fn all_ready(conditions: Vec<watch::Receiver<bool>>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut conditions = conditions;
        loop {
            let now = conditions.iter_mut().all(|c| *c.borrow_and_update());
            if tx.send_if_modified(|v| std::mem::replace(v, now) != now) {
                tracing::info!(ready = now, "readiness changed");
            }
            if conditions.is_empty() {
                return tx.closed().await;
            }
            let changed =
                futures::future::select_all(conditions.iter_mut().map(|c| Box::pin(c.changed())));
            tokio::select! {
                (res, _, _) = changed => if res.is_err() { return },
                () = tx.closed() => return,
            }
        }
    });
    rx
}

/// Resolves on SIGTERM (kubelet stopping the pod) or Ctrl-C: when every meshlink process starts
/// draining.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail on Unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        c.inc();
        registry.register("probes", "probes made", c);
        let (ready_tx, ready_rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let (addr, serve) = Admin::new(registry, ready_rx)
            .bind("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap();
        let server = tokio::spawn(serve);

        assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 503"));
        ready_tx.send(true).unwrap();
        assert!(get(addr, "/ready").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("probes_total 1"), "{metrics}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn metrics_access_by_network() {
        let open = MetricsAccess::default();
        assert!(open.allows_plain("10.0.0.5".parse().unwrap()));
        let closed = MetricsAccess::restricted(vec!["10.1.0.0/16".parse().unwrap()], None);
        assert!(!closed.allows_plain("10.0.0.5".parse().unwrap()));
        assert!(closed.allows_plain("10.1.2.3".parse().unwrap()));
        assert!(closed.allows_plain("127.0.0.1".parse().unwrap()));
        assert!(closed.allows_plain("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!closed.allows_plain("::ffff:10.0.0.5".parse().unwrap()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_cut_off() {
        let (_tx, rx) = watch::channel(true);
        let cancel = CancellationToken::new();
        let (addr, serve) = Admin::new(Registry::default(), rx)
            .bind("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap();
        tokio::spawn(serve);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /live HTTP/1.1\r\n").await.unwrap();
        let mut buf = Vec::new();
        // Time is paused: the header timeout fires without waiting 10 real seconds.
        let n = tokio::time::timeout(HEADER_TIMEOUT * 2, s.read_to_end(&mut buf))
            .await
            .expect("the server closes a connection that never finishes its request head")
            .unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&buf).contains("408"),
            "{buf:?}"
        );
        cancel.cancel();
    }
}
