//! The destination service: Linkerd's discovery API (`io.linkerd.proxy.destination.Destination`)
//! and its policy APIs (`OutboundPolicies`, `InboundServerPolicies`) at their defaults, for
//! meshlink's sidecar and for an unmodified Linkerd proxy.
//!
//! One process per cluster watches the API server once per resource and answers every proxy,
//! so proxies need no Kubernetes credentials and the API server sees one watch, not one per pod:
//!
//! ```text
//!  API server ──watch──▶ watch::run ──project──▶ Index ──topics──▶ Store ──wake──▶ streams
//!  (Services, slices,     (one per kind;          (model.rs          (who listens    (grpc.rs:
//!   Pods, Namespaces,      linked clusters'        projections;       to what)        answer,
//!   Links, Secrets)        slices and Pods)        pure)                              diff, send)
//! ```
//!
//! Answers are pure functions of the index ([`resolve`], [`policy`]); a stream answers again
//! only when a topic it depends on changed, and sends the difference.

pub mod grpc;
pub mod index;
pub mod model;
pub mod opaque;
pub mod policy;
pub mod resolve;
pub mod store;
pub mod watch;

pub use self::{
    grpc::{Api, Metrics as GrpcMetrics, PolicySettings, Router},
    resolve::Settings,
    store::Store,
    watch::{Metrics as WatchMetrics, Watches},
};

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proxy_identity::Credentials;
use proxy_transport::{BindError, ClientAuth, ServerLimits};
use tokio_util::sync::CancellationToken;

/// The bounds of the gRPC server.
#[derive(Clone, Debug, clap::Args)]
pub struct Limits {
    /// Connections served at once (each proxy holds one).
    #[arg(long, env = "MESHLINK_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Concurrent streams on one connection (a proxy opens one per destination it uses).
    #[arg(
        long,
        env = "MESHLINK_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1_000
    )]
    pub max_streams_per_connection: u32,
    /// Open streams in total, across connections and APIs.
    #[arg(long, env = "MESHLINK_MAX_STREAMS", default_value_t = 100_000)]
    pub max_streams: usize,
}

/// Serves the three APIs over TLS 1.3 to clients with a certificate from the trust anchors
/// (and loopback clients), until `cancel`.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    creds: &Arc<Credentials>,
    limits: &Limits,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + use<>), BindError> {
    let server = ServerLimits {
        max_connections: limits.max_connections,
        handshake_timeout: Duration::from_secs(10),
        max_streams_per_connection: limits.max_streams_per_connection,
        connection_lifetime: None,
        keep_alive_interval: Duration::from_secs(10),
        client_auth: ClientAuth::RequiredExceptLoopback,
    };
    proxy_transport::serve_tls(
        addr,
        proxy_identity::tls::server_config(creds, &[b"h2"]),
        router,
        server,
        proxy_transport::Protocol::Http2,
        cancel,
    )
    .await
}
