//! meshlink's transport plumbing, written once for every listener and every dialled connection.
//!
//! For the data plane (the gateway, the sidecar): [`serve_connections`] (the accept loop, spread
//! over worker threads, with drain), [`tcp`] (keepalive and no-delay on every socket accepted
//! or dialled, dialling with a deadline), [`dial`] (a peer dialled in plaintext, in mTLS, or in
//! mTLS with a transport header), [`direct`] (Linkerd's mTLS + transport-header inbound
//! connection, each refusal with its reason), [`Pending`] (a bounded handshake set in which a
//! newcomer evicts the oldest), [`Share`] (a share of the connections per client address or
//! identity), [`copy_bidirectional`] (opaque forwarding that holds no buffer while idle),
//! [`Tracked`]/[`Activity`] (byte and idle accounting), and [`files`] (the connection limit
//! fitted under the open-file limit).
//!
//! For the control-plane services: [`serve_tls`], one bounded accept loop that terminates TLS 1.3
//! and serves HTTP/2 (gRPC), or HTTP/1.1 too (the injector webhook), until cancelled, then
//! drains.
//!
//! Every listener built on it gets the same protections: at most
//! [`ServerLimits::max_connections`] connections at once (the next client waits in the
//! kernel's backlog), a deadline on the TLS handshake, a cap on concurrent streams per
//! connection, back-off when `accept` fails (a process out of file descriptors must not spin),
//! optionally a lifetime per connection (drained gracefully when it ends), a choice of
//! whether a client must present a certificate from the trust anchors, and a share per client
//! address ([`ServerLimits::per_peer_connections`]), so that one pod cannot take every slot.
//! Servers of short calls add [`WithDeadlines`] so that stalled calls end.

mod accept;
mod activity;
mod deadline;
pub mod dial;
pub mod direct;
mod duplex;
pub mod files;
mod listen;
mod metrics;
mod orig_dst;
mod pending;
mod share;
pub mod tcp;

pub use self::{
    accept::{ACCEPT_BACKOFF_MAX, ACCEPT_BACKOFF_MIN, accept},
    activity::{Activity, Tracked},
    deadline::{BodyDeadline, CallDeadlines, TimedBody, WithDeadlines},
    duplex::{BUFFER, Moved, copy_bidirectional, forward},
    listen::{serve_connections, worker_runtimes},
    metrics::{Direction, Open, TcpMetrics},
    orig_dst::orig_dst,
    pending::{Pending, Slot},
    share::{Held, PeerShare, PeerSlot, Share},
};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Whether a client must present a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Any client may call (it authenticates in the request, as Certify's token does).
    Optional,
    /// Only clients with a certificate from the trust anchors, and loopback clients (a
    /// process's own sidecar, and tests).
    RequiredExceptLoopback,
}

/// The bounds of one server.
#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_streams_per_connection: u32,
    /// When set, a connection is drained gracefully after this long (clients that open a
    /// connection per call); long-lived watch streams want `None`.
    pub connection_lifetime: Option<Duration>,
    /// HTTP/2 keep-alive pings: a dead peer's connection is closed after one unanswered ping.
    pub keep_alive_interval: Duration,
    pub client_auth: ClientAuth,
}

impl ServerLimits {
    /// Connections one client address may hold at once: an eighth of the total (at least 16,
    /// a node's worth of Linkerd clients behind one address), so that one pod, however many
    /// connections it opens, leaves seven eighths of the slots to everyone else. Its concurrent
    /// streams are bounded with it, by `max_streams_per_connection` on each.
    pub fn per_peer_connections(&self) -> usize {
        (self.max_connections / 8).max(16).min(self.max_connections)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// The HTTP versions a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/2 only (gRPC).
    Http2,
    /// HTTP/1.1 and HTTP/2, told apart by the first bytes (an admission webhook: the API
    /// server calls webhooks over HTTP/1.1).
    Http1And2,
}

/// Binds `addr`; the returned future serves `service` in `protocol` until `cancel` fires, then
/// drains every connection gracefully (in-flight calls finish; the caller bounds how long with
/// a timeout).
pub async fn serve_tls<S, B>(
    addr: SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    service: S,
    limits: ServerLimits,
    protocol: Protocol,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), BindError>
where
    S: tower_service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| BindError { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok((local, async move {
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let peers = Arc::new(PeerShare::new(limits.per_peer_connections()));
        let tracker = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                p = permits.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { break };
            let (tcp, peer) = tokio::select! {
                () = cancel.cancelled() => break,
                a = accept(&listener) => a,
            };
            // Over its address's share: closed at once, so that its permit goes back.
            let Some(share) = peers.enter_ip(peer.ip()) else {
                tracing::debug!(%peer, share = peers.share(), "refused: the address holds its share of connections");
                continue;
            };
            // gRPC messages are small and latency-bound (no Nagle delay); keepalive frees a
            // vanished client's slot.
            if let Err(error) = tcp::configure(&tcp) {
                tracing::debug!(%peer, %error, "setting socket options");
            }
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(service.clone());
            let cancel = cancel.clone();
            let limits = limits.clone();
            tracker.spawn(async move {
                let _permit = (permit, share);
                let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                if !authorized(limits.client_auth, peer, tls.get_ref().1) {
                    tracing::info!(%peer, "refused: no client certificate from the trust anchors");
                    return;
                }
                let mut builder = auto::Builder::new(TokioExecutor::new());
                if protocol == Protocol::Http2 {
                    builder = builder.http2_only();
                }
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.handshake_timeout);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(limits.max_streams_per_connection)
                    .keep_alive_interval(limits.keep_alive_interval)
                    .keep_alive_timeout(limits.keep_alive_interval);
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                let mut conn = std::pin::pin!(conn);
                let lifetime = limits.connection_lifetime;
                let deadline = tokio::time::sleep(lifetime.unwrap_or(Duration::MAX / 4));
                tokio::pin!(deadline);
                let mut draining = false;
                loop {
                    tokio::select! {
                        res = conn.as_mut() => {
                            if let Err(error) = res {
                                tracing::debug!(%peer, %error, "connection ended");
                            }
                            return;
                        }
                        () = cancel.cancelled(), if !draining => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        () = &mut deadline, if !draining && lifetime.is_some() => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }))
}

/// Whether a client that completed its handshake may go on.
fn authorized(
    auth: ClientAuth,
    peer: SocketAddr,
    conn: &tokio_rustls::rustls::ServerConnection,
) -> bool {
    match auth {
        ClientAuth::Optional => true,
        ClientAuth::RequiredExceptLoopback => {
            peer.ip().to_canonical().is_loopback() || proxy_identity::tls::client_id(conn).is_some()
        }
    }
}
