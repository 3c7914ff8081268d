//! Serves Certify over TLS 1.3 (the service's own certificate from the issuer) and HTTP/2, on
//! the shared accept loop of `proxy-transport`. Any pod may call (the token in the request is
//! the credential), so client certificates are optional; each connection has a lifetime
//! (Linkerd's clients open one connection per call). Since any pod may call, each call has a
//! deadline on its request body and on the whole call, and each client address a share of the
//! connections (`proxy_transport`), so stalled calls from one pod cannot exhaust the service.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use proxy_identity::{Credentials, tls};
use proxy_transport::{CallDeadlines, ClientAuth, ServerLimits, WithDeadlines};
use tokio_util::sync::CancellationToken;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open; it is then drained gracefully.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// A Certify request (a token and a CSR, a few KiB) is sent at once, so a body still missing
/// after 5 s is a stall; the whole call also waits for a TokenReview, which an API server
/// answers in milliseconds, so 15 s leaves room for a slow one while bounding what a stalled
/// call holds (Linkerd's client retries a failed call).
pub const DEADLINES: CallDeadlines = CallDeadlines {
    body: Duration::from_secs(5),
    call: Duration::from_secs(15),
};

pub use proxy_transport::BindError as ServeError;

/// The service's connection limits: any pod may connect, each address gets its share.
pub fn limits() -> ServerLimits {
    ServerLimits {
        max_connections: MAX_CONNECTIONS,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        // Linkerd's client makes one call per connection.
        max_streams_per_connection: 4,
        connection_lifetime: Some(CONNECTION_LIFETIME),
        keep_alive_interval: Duration::from_secs(20),
        client_auth: ClientAuth::Optional,
    }
}

/// Binds `addr`; the returned future serves until `cancel` fires, then drains.
pub async fn serve<S: Identity>(
    addr: SocketAddr,
    service: IdentityServer<S>,
    creds: Arc<Credentials>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    serve_with(addr, service, creds, limits(), DEADLINES, cancel).await
}

/// [`serve`] with other limits and deadlines (tests make them small).
pub async fn serve_with<S: Identity>(
    addr: SocketAddr,
    service: IdentityServer<S>,
    creds: Arc<Credentials>,
    limits: ServerLimits,
    deadlines: CallDeadlines,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    proxy_transport::serve_tls(
        addr,
        tls::server_config(&creds, &[b"h2"]),
        WithDeadlines::new(service, deadlines),
        limits,
        proxy_transport::Protocol::Http2,
        cancel,
    )
    .await
}
