//! `meshlink-proxy`, the sidecar beside every meshed application container, built from the
//! `proxy/` libraries the gateway uses. It stands in for Linkerd's proxy in a pod: the same
//! ports (inbound 4143, outbound 4140, admin 4191), environment, transport header, identity and
//! metrics, talking to meshlink's (or Linkerd's) destination, policy and identity services.
//!
//! - [`config`]: Linkerd's `LINKERD2_PROXY_*` environment, checked before anything is bound.
//! - [`outbound`]: the application's connections: discovery, per-request balancing, mTLS.
//! - [`inbound`]: connections to the pod: mTLS termination, policy, `l5d-client-id`.
//! - [`endpoint`], [`balance`]: dialling an endpoint as discovery describes it; peak-EWMA P2C.
//! - [`metrics`]: Linkerd's proxy metric names and labels.

pub mod balance;
mod cache;
pub mod config;
pub mod endpoint;
pub mod inbound;
pub mod metrics;
pub mod outbound;
#[cfg(test)]
mod tests;

pub use self::{
    config::{Config, ConfigError, Env, ProcessEnv},
    inbound::Inbound,
    metrics::Metrics,
    outbound::Outbound,
};

use std::{future::Future, net::SocketAddr, sync::Arc};

use proxy_discovery::{InboundPolicies, Resolver};
use proxy_identity::Credentials;
use proxy_transport::direct::{Admission, Limits};
use tokio::{net::TcpListener, runtime::Handle, sync::Semaphore};
use tokio_util::sync::CancellationToken;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the {service} service: {source}")]
    Control {
        service: &'static str,
        #[source]
        source: proxy_discovery::control::ChannelError,
    },
}

/// The proxy's two data-plane listeners, bound.
#[derive(Debug)]
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub policies: InboundPolicies,
    inbound: (TcpListener, Arc<Inbound>),
    outbound: (TcpListener, Arc<Outbound>),
    max_connections: usize,
}

impl Proxy {
    /// Builds both sides and binds their listeners. Discovery is lazy: nothing is dialled
    /// until a connection needs it.
    pub async fn bind(
        config: &Config,
        creds: &Arc<Credentials>,
        metrics: &Metrics,
    ) -> Result<Self, StartError> {
        let channel = |service, c: &config::ControlAddr| {
            proxy_discovery::channel(&c.addr, c.name.clone(), creds, config.outbound.connect)
                .map_err(|source| StartError::Control { service, source })
        };
        let resolver = Resolver::new(
            channel("destination", &config.destination)?,
            config.destination_context.clone(),
            config.discovery_idle_timeout,
        );
        let policies = InboundPolicies::new(
            channel("policy", &config.policy)?,
            config.workload.clone(),
            config.default_policy.clone(),
        );
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let inbound_listener = bind(config.inbound_addr).await?;
        let outbound_listener = bind(config.outbound_addr).await?;
        let local = |l: &TcpListener, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { addr, source })
        };
        let inbound_addr = local(&inbound_listener, config.inbound_addr)?;
        let outbound_addr = local(&outbound_listener, config.outbound_addr)?;
        let direct = Admission::new(
            creds.id().clone(),
            proxy_identity::tls::server_config(creds, &[proxy_transport_header::PROTOCOL]),
            Limits {
                handshake_timeout: config.inbound.detect,
                header_timeout: config.inbound.detect,
                max_handshakes: 256,
                max_connections: config.max_connections,
                per_identity: config.max_connections,
            },
        );
        let inbound = Inbound::new(
            creds,
            direct,
            policies.clone(),
            config.inbound_opaque_ports.clone(),
            inbound_addr.port(),
            config.inbound,
            metrics.clone(),
        );
        let outbound = Outbound::new(
            config.outbound,
            endpoint::Dialer::new(creds, config.outbound.connect),
            resolver,
            metrics.clone(),
            config.discovery_idle_timeout,
        );
        Ok(Self {
            inbound_addr,
            outbound_addr,
            policies,
            inbound: (inbound_listener, inbound),
            outbound: (outbound_listener, outbound),
            max_connections: config.max_connections,
        })
    }

    /// Serves both listeners until `cancel` fires, then drains: the returned future ends when
    /// every connection has.
    pub fn serve(
        self,
        workers: Vec<Handle>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> {
        let (in_listener, inbound) = self.inbound;
        let (out_listener, outbound) = self.outbound;
        let in_permits = Arc::new(Semaphore::new(self.max_connections));
        let out_permits = Arc::new(Semaphore::new(self.max_connections));
        let in_cancel = cancel.clone();
        let inbound = proxy_transport::serve_connections(
            in_listener,
            workers.clone(),
            cancel.clone(),
            move |tcp, peer| {
                let inbound = inbound.clone();
                let cancel = in_cancel.clone();
                let permit = in_permits.clone().try_acquire_owned();
                async move {
                    // Past the limit a connection is closed at once, so that one client's flood
                    // cannot hold the pod's other clients out for long.
                    let Ok(_permit) = permit else {
                        tracing::warn!(%peer, "inbound connection limit reached; closed");
                        return;
                    };
                    inbound.handle(tcp, peer, cancel).await;
                }
            },
        );
        let out_cancel = cancel.clone();
        let outbound =
            proxy_transport::serve_connections(out_listener, workers, cancel, move |tcp, peer| {
                let outbound = outbound.clone();
                let cancel = out_cancel.clone();
                let permit = out_permits.clone().try_acquire_owned();
                async move {
                    let Ok(_permit) = permit else {
                        tracing::warn!(%peer, "outbound connection limit reached; closed");
                        return;
                    };
                    outbound.handle(tcp, cancel).await;
                }
            });
        async move {
            tokio::join!(inbound, outbound);
        }
    }
}
