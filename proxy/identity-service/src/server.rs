//! Serves Certify over TLS 1.3 (the service's own certificate from the issuer) and HTTP/2, on
//! the shared accept loop of `proxy-transport`. Any pod may call (the token in the request is
//! the credential), so client certificates are optional; each connection has a lifetime
//! (Linkerd's clients open one connection per call).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use proxy_identity::{Credentials, tls};
use proxy_transport::{ClientAuth, ServerLimits};
use tokio_util::sync::CancellationToken;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open; it is then drained gracefully.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

pub use proxy_transport::BindError as ServeError;

/// Binds `addr`; the returned future serves until `cancel` fires, then drains.
pub async fn serve<S: Identity>(
    addr: SocketAddr,
    service: IdentityServer<S>,
    creds: Arc<Credentials>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let limits = ServerLimits {
        max_connections: MAX_CONNECTIONS,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        max_streams_per_connection: 16,
        connection_lifetime: Some(CONNECTION_LIFETIME),
        keep_alive_interval: Duration::from_secs(20),
        client_auth: ClientAuth::Optional,
    };
    proxy_transport::serve_h2(
        addr,
        tls::server_config(&creds, &[b"h2"]),
        service,
        limits,
        cancel,
    )
    .await
}
