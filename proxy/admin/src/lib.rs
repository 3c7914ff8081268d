//! The admin server every meshlink process runs: `/live`, `/ready` and `/metrics` over plain
//! HTTP/1 (kubelet probes and Prometheus scrape it).
//!
//! `/metrics` can be limited ([`MetricsAccess`]): the gateway's admin port is reachable from
//! other clusters (the probe), and its metrics name clients and targets, so there only loopback,
//! configured networks, and clients with a certificate from the trust anchors (TLS on the same
//! port, told apart by its first byte), optionally only listed identities among them, may read
//! them.
//!
//! Anyone may connect, so the port is bounded so that kubelet's probe (1 s timeout) is answered
//! during a flood: a connection must send its request head within [`HEADER_TIMEOUT`]; a client
//! without a certificate gets one request per connection and at most [`PLAIN_LIFETIME`] for it
//! (no keep-alive to hold a slot with); an mTLS client may keep its connection for
//! [`TLS_LIFETIME`]; at most [`MAX_CONNECTIONS`] are open at once, and a new one evicts the
//! oldest (every request is answered from memory at once, so the oldest connection is an idle
//! or stalled one), so silent connections never queue ahead of the probe in the kernel's
//! backlog; `accept` errors back off (`proxy_transport::accept`).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use proxy_identity::Id;
use proxy_transport::Pending;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

/// How long a client may take to send its request head (or finish its TLS handshake). A probe
/// sends its request at once, and kubelet gives up after 1 s by default.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client without a certificate may keep its connection (one request).
pub const PLAIN_LIFETIME: Duration = Duration::from_secs(10);
/// How long an mTLS client (a Prometheus scraping every few seconds) may keep its connection
/// before it is drained; it reconnects.
pub const TLS_LIFETIME: Duration = Duration::from_secs(300);
/// Connections open at once; a new one evicts the oldest.
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
    /// When set, only these mTLS identities (any certificate from the anchors otherwise).
    identities: Option<Arc<[Id]>>,
}

impl std::fmt::Debug for MetricsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsAccess")
            .field("restricted", &self.restricted)
            .field("networks", &self.networks)
            .field("tls", &self.tls.is_some())
            .field("identities", &self.identities)
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
            identities: None,
        }
    }

    /// Of the TLS clients, only those whose certificate names one of `identities` (a
    /// workload of a linked cluster has a certificate from the same anchors, and must not read
    /// who calls whom).
    pub fn identities(mut self, identities: Vec<Id>) -> Self {
        self.identities = Some(identities.into());
        self
    }

    fn allows_plain(&self, peer: std::net::IpAddr) -> bool {
        !self.restricted
            || peer.to_canonical().is_loopback()
            || self
                .networks
                .iter()
                .any(|n| n.contains(&peer.to_canonical()))
    }

    /// Whether a TLS client with a certificate from the anchors naming `client` may read.
    fn allows_tls(&self, client: Option<&Id>) -> bool {
        match (&self.identities, client) {
            (None, _) => true,
            (Some(ids), Some(client)) => ids.contains(client),
            (Some(_), None) => false,
        }
    }
}

/// Who may read `/metrics` over mTLS: `configured`, or else the Prometheus of Linkerd viz in
/// the proxy's own install (`prometheus.linkerd-viz.serviceaccount.identity.<the suffix of
/// the proxy's own identity>`): the metrics name every client identity and target, and every
/// workload of every linked cluster has a certificate from the same anchors. Empty when the
/// proxy's identity is not Linkerd-shaped (then only loopback and the networks may read).
pub fn metrics_identities(configured: &[Id], own: &Id) -> Vec<Id> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    const MARK: &str = ".serviceaccount.identity.";
    let Id::Dns(own) = own else { return vec![] };
    own.find(MARK)
        .and_then(|i| {
            Id::parse(&format!(
                "prometheus.linkerd-viz{MARK}{}",
                &own[i + MARK.len()..]
            ))
            .ok()
        })
        .into_iter()
        .collect()
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
        let open = Arc::new(Pending::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = proxy_transport::accept(&listener) => accepted,
            };
            if let Err(error) = proxy_transport::tcp::configure(&stream) {
                tracing::debug!(%peer, %error, "setting socket options");
            }
            let this = self.clone();
            let cancel = cancel.clone();
            let open = open.clone();
            tokio::spawn(async move {
                let slot = open.enter();
                tokio::select! {
                    () = this.connection(stream, peer, cancel) => {}
                    () = slot.evicted.cancelled() => {
                        tracing::debug!(%peer, "admin connection evicted by a newer one");
                    }
                }
            });
        }
    }

    async fn connection(self, stream: TcpStream, peer: SocketAddr, cancel: CancellationToken) {
        let Some(acceptor) = self.access.tls.clone() else {
            let metrics = self.access.allows_plain(peer.ip());
            return self.http(stream, peer, metrics, false, cancel).await;
        };
        // A TLS record starts with 0x16 (handshake); HTTP starts with a method's letter.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEADER_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == 0x16 => {
                match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let conn = tls.get_ref().1;
                        let authenticated = conn.peer_certificates().is_some();
                        let client = proxy_identity::tls::client_id(conn);
                        let metrics = authenticated && self.access.allows_tls(client.as_ref());
                        if authenticated && !metrics {
                            tracing::debug!(%peer, client = ?client.as_ref().map(Id::as_str), "identity may not read /metrics");
                        }
                        self.http(tls, peer, metrics, authenticated, cancel).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "admin TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                }
            }
            Ok(Ok(_)) => {
                let metrics = self.access.allows_plain(peer.ip());
                self.http(stream, peer, metrics, false, cancel).await;
            }
            _ => {}
        }
    }

    /// Serves HTTP/1 on `io`: one request for a client without a certificate, keep-alive for
    /// an authenticated one, each within its lifetime.
    async fn http<IO>(
        self,
        io: IO,
        peer: SocketAddr,
        metrics: bool,
        authenticated: bool,
        cancel: CancellationToken,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.route(&req, metrics)) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(authenticated)
            .serve_connection(TokioIo::new(io), service);
        let lifetime = if authenticated {
            TLS_LIFETIME
        } else {
            PLAIN_LIFETIME
        };
        let mut conn = std::pin::pin!(conn);
        let drain = tokio::time::sleep(lifetime);
        tokio::pin!(drain);
        let mut draining = false;
        // A drained connection still has HEADER_TIMEOUT to finish what it is sending.
        let end = tokio::time::sleep(lifetime + HEADER_TIMEOUT);
        tokio::pin!(end);
        loop {
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(error) = res {
                        tracing::debug!(%peer, %error, "admin connection ended");
                    }
                    return;
                }
                () = cancel.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut drain, if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = &mut end => {
                    tracing::debug!(%peer, ?lifetime, "admin connection outlived its lifetime");
                    return;
                }
            }
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
                "metrics are served to loopback, the configured networks and the configured mTLS identities only\n",
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
        // A condition whose sender is gone keeps its last value for ever: a finished "ready"
        // stays ready (a check that completes once and ends), a finished "not ready" never is.
        let mut stuck = false;
        loop {
            let now = !stuck && conditions.iter_mut().all(|c| *c.borrow_and_update());
            if tx.send_if_modified(|v| std::mem::replace(v, now) != now) {
                tracing::info!(ready = now, "readiness changed");
            }
            if conditions.is_empty() {
                return tx.closed().await;
            }
            let closed = {
                let changed = futures::future::select_all(
                    conditions.iter_mut().map(|c| Box::pin(c.changed())),
                );
                tokio::select! {
                    (res, i, _) = changed => res.is_err().then_some(i),
                    () = tx.closed() => return,
                }
            };
            if let Some(i) = closed {
                let finished = conditions.remove(i);
                stuck |= !*finished.borrow();
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

/// Sets up logging for a meshlink program: human-readable lines on stderr, filtered by `filter`
/// (its `--log` flag, `MESHLINK_LOG`; e.g. `info` or `info,kube=warn`).
pub fn init_logging(filter: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    Ok(())
}

#[cfg(test)]
mod tests {

    /// A condition that finished ready (its sender gone) stays ready: the rest still decide.
    #[tokio::test]
    async fn finished_conditions_keep_their_last_value() {
        let (done_tx, done) = watch::channel(false);
        let (cert_tx, cert) = watch::channel(false);
        let mut ready = all_ready(vec![done, cert]);
        done_tx.send(true).unwrap();
        drop(done_tx);
        // Let the readiness task see the finished condition before the other one changes (a
        // current-thread runtime: it runs until it waits again).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!*ready.borrow());
        cert_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .expect("ready once the certificate came")
            .unwrap();
    }

    #[test]
    fn metrics_identities_default_to_the_installs_prometheus() {
        let id = |s: &str| Id::parse(s).unwrap();
        let gw =
            id("linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.example");
        let cases = [
            (
                vec![],
                gw.clone(),
                vec![id(
                    "prometheus.linkerd-viz.serviceaccount.identity.linkerd.east.example",
                )],
            ),
            (
                vec![id(
                    "scraper.mon.serviceaccount.identity.linkerd.cluster.local",
                )],
                gw.clone(),
                vec![id(
                    "scraper.mon.serviceaccount.identity.linkerd.cluster.local",
                )],
            ),
            (vec![], id("gateway.example.com"), vec![]),
            (vec![], id("spiffe://cluster.local/ns/a/sa/b"), vec![]),
        ];
        for (configured, own, expected) in cases {
            assert_eq!(
                super::metrics_identities(&configured, &own),
                expected,
                "{own}"
            );
        }
    }
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

    /// Kubelet's probe is answered within its 1 s while anyone holds 300 connections open,
    /// half silent and half keep-alive: they cannot hold every slot nor queue ahead of it.
    #[tokio::test]
    async fn probes_are_answered_during_a_connection_flood() {
        let (_tx, rx) = watch::channel(true);
        let cancel = CancellationToken::new();
        let (addr, serve) = Admin::new(Registry::default(), rx)
            .bind("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap();
        tokio::spawn(serve);
        let mut flood = Vec::new();
        for i in 0..300 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /live HTTP/1.1\r\nhost: x\r\n\r\n")
                    .await
                    .unwrap();
            }
            flood.push(s);
        }
        // Every flood connection is accepted or waiting in the backlog: the probe comes after.
        let mut slowest = Duration::ZERO;
        for _ in 0..10 {
            let start = std::time::Instant::now();
            let rsp = tokio::time::timeout(Duration::from_secs(1), get(addr, "/ready"))
                .await
                .expect("/ready answered within kubelet's 1 s during the flood");
            assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
            slowest = slowest.max(start.elapsed());
        }
        eprintln!("slowest /ready during a flood of 300 connections: {slowest:?}");
        // The keep-alive clients got their one answer and were closed right after it, not
        // kept until the header timeout (2 s) ends their idle wait for a second request.
        let mut buf = Vec::new();
        let keep_alive = &mut flood[298];
        tokio::time::timeout(HEADER_TIMEOUT / 2, keep_alive.read_to_end(&mut buf))
            .await
            .expect("a client without a certificate gets one request per connection")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
        cancel.cancel();
    }

    struct Pki {
        anchors: proxy_identity::TrustAnchors,
        issuer: proxy_identity::ca::Signer,
    }

    fn pki() -> Pki {
        proxy_identity::tls::install_default_provider();
        let anchor = proxy_identity::ca::new_anchor("root", Duration::from_secs(3600)).unwrap();
        let issuer =
            proxy_identity::ca::new_issuer(&anchor, "issuer", Duration::from_secs(3600)).unwrap();
        Pki {
            anchors: proxy_identity::TrustAnchors::from_pem(&anchor.cert_pem).unwrap(),
            issuer: proxy_identity::ca::Signer::from_pem(&issuer.cert_pem, &issuer.key_pem)
                .unwrap(),
        }
    }

    impl Pki {
        fn creds(&self, id: &str) -> Arc<proxy_identity::Credentials> {
            let id = Id::parse(id).unwrap();
            let creds = proxy_identity::Credentials::new(id.clone(), self.anchors.clone());
            let (leaf, key) = self.issuer.issue(&id, Duration::from_secs(3600)).unwrap();
            creds
                .install(leaf, vec![self.issuer.cert_der().to_vec()], &key)
                .unwrap();
            creds
        }
    }

    async fn get_tls(
        addr: SocketAddr,
        client: &Arc<proxy_identity::Credentials>,
        server: &Id,
        path: &str,
    ) -> String {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let config = proxy_identity::tls::client_config(client, &[b"http/1.1"]);
        let mut s = proxy_identity::tls::connect(config, tcp, server)
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    const PROMETHEUS: &str = "prometheus.linkerd-viz.serviceaccount.identity.linkerd.cluster.local";
    const WEB: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";
    const GATEWAY: &str =
        "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local";

    /// Over mTLS, only the listed identities read /metrics; another workload with a
    /// certificate from the same anchors is refused (and may still probe).
    #[tokio::test]
    async fn metrics_only_for_listed_identities() {
        let pki = pki();
        let server = pki.creds(GATEWAY);
        let tls = proxy_identity::tls::server_config(&server, &[b"http/1.1"]);
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        c.inc();
        registry.register("secrets", "who called whom", c);
        let (_tx, rx) = watch::channel(true);
        let cancel = CancellationToken::new();
        let access = MetricsAccess::restricted(vec![], Some(tls))
            .identities(vec![Id::parse(PROMETHEUS).unwrap()]);
        let (addr, serve) = Admin::new(registry, rx)
            .metrics_access(access)
            .bind("127.0.0.1:0".parse().unwrap(), cancel.clone())
            .await
            .unwrap();
        tokio::spawn(serve);
        let gateway = Id::parse(GATEWAY).unwrap();

        let prometheus = get_tls(addr, &pki.creds(PROMETHEUS), &gateway, "/metrics").await;
        assert!(prometheus.starts_with("HTTP/1.1 200"), "{prometheus}");
        assert!(prometheus.contains("secrets_total 1"), "{prometheus}");
        let web = pki.creds(WEB);
        let refused = get_tls(addr, &web, &gateway, "/metrics").await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(!refused.contains("secrets_total"), "{refused}");
        let ready = get_tls(addr, &web, &gateway, "/ready").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        cancel.cancel();
    }

    #[test]
    fn metrics_access_by_identity() {
        let prom = Id::parse(PROMETHEUS).unwrap();
        let web = Id::parse(WEB).unwrap();
        let any = MetricsAccess::restricted(vec![], None);
        let listed = MetricsAccess::restricted(vec![], None).identities(vec![prom.clone()]);
        let nobody = MetricsAccess::restricted(vec![], None).identities(vec![]);
        let cases = [
            (&any, Some(&web), true),
            (&any, None, true),
            (&listed, Some(&prom), true),
            (&listed, Some(&web), false),
            (&listed, None, false),
            (&nobody, Some(&prom), false),
        ];
        for (access, client, allowed) in cases {
            assert_eq!(access.allows_tls(client), allowed, "{access:?} {client:?}");
        }
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
