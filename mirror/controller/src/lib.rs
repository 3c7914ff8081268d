//! meshlink's service-mirror controller: keeps, in this cluster, mirrors of the Services that
//! linked clusters export, compatible with Linkerd's multicluster extension.
//!
//! [`desired`] holds the pure rules (remote objects + Link -> local objects) and `plan` decides,
//! as a pure function, what to do about one remote Service; [`run`] serves the Links of a
//! namespace against a real API server.
//!
//! # Tasks
//!
//! ```text
//! run ── leader::run_while_leader ── holds the Lease; a Claim gates every write
//!          │  (on losing it: cancel, await every task below, then release)
//!          └─ links::run ── kube Controller of Links (+ their credentials Secrets)
//!               ├─ federation::Task ── every <svc>-federated Service ── Queue ── Writer
//!               └─ per Link, restarted when its spec or credentials change:
//!                    ├─ worker::LinkWorker ── watches (remote Services and slices, local
//!                    │     mirrors, namespaces) -> Queue -> plan::plan -> Writer
//!                    ├─ gateway::resolve_forever ── gateway addresses -> worker
//!                    ├─ probe::run ── gateway liveness and latency -> worker, status
//!                    └─ StatusHandle::flush_forever ── Link status (server-side apply)
//! ```
//!
//! Every task runs in a span naming its Link. `queue::Queue` is the one work queue (keys
//! de-duplicated, failed keys retried with jittered exponential backoff, owned by its task);
//! `apply::Writer` is the one way to write (server-side apply only when something changed,
//! under a deadline, behind the claim). [`Readiness`] turns true once this replica is leader
//! or follower, the Links are listed and every worker (and the federation task) has reconciled
//! everything once.

mod apply;
mod cache;
pub mod desired;
mod federation;
mod gateway;
pub mod leader;
mod links;
mod metrics;
mod plan;
mod probe;
mod queue;
mod ready;
mod status;
mod worker;

use std::{net::SocketAddr, sync::Arc};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use kube::Client;
use tokio_util::sync::CancellationToken;

pub use mirror_credentials::CredentialsError;

pub use self::ready::Readiness;

pub use self::{leader::LeaseOptions, links::FINALIZER, metrics::Metrics};

/// How the controller runs.
#[derive(Clone, Debug, clap::Args)]
pub struct Options {
    /// Namespace of the Links, their credentials Secrets and the Lease.
    #[arg(long, env = "MESHLINK_NAMESPACE", default_value = link_crd::keys::DEFAULT_MULTICLUSTER_NAMESPACE)]
    pub namespace: String,

    /// Serve only this Link (as Linkerd's per-Link deployments do); every Link of the namespace
    /// otherwise.
    #[arg(long, env = "MESHLINK_LINK")]
    pub link: Option<String>,

    /// Create a mirrored Service's namespace when this cluster lacks it. Off by default: the
    /// Service is then reported as MissingNamespace and mirrored once the namespace exists.
    #[arg(long, env = "MESHLINK_ENABLE_NAMESPACE_CREATION")]
    pub enable_namespace_creation: bool,

    /// This cluster's own members of federated Services (a label selector, as `kubectl -l`
    /// takes); "" for none. Linkerd's local service mirror uses the same default.
    #[arg(long, env = "MESHLINK_LOCAL_FEDERATED_SELECTOR", default_value = "mirror.linkerd.io/federated=member", value_parser = selector)]
    pub local_federated_selector: String,

    /// Label keys of this cluster's own federated members that `<svc>-federated` does not copy
    /// (comma-separated; `example.com/*` excludes a whole prefix), as Linkerd's local service
    /// mirror's `-excluded-labels`.
    #[arg(long, env = "MESHLINK_LOCAL_EXCLUDED_LABELS", value_delimiter = ',')]
    pub local_excluded_labels: Vec<String>,

    /// Annotation keys of this cluster's own federated members that `<svc>-federated` does not
    /// copy, as Linkerd's `-excluded-annotations`.
    #[arg(
        long,
        env = "MESHLINK_LOCAL_EXCLUDED_ANNOTATIONS",
        value_delimiter = ','
    )]
    pub local_excluded_annotations: Vec<String>,

    /// Mirror headless Services as headless, with a mirror per named pod
    /// (`<hostname>-<cluster>`), so that `<hostname>.<svc>-<cluster>.<ns>.svc` reaches one pod.
    /// On by default (Linkerd's `-enable-headless-services` is off by default); `=false`
    /// mirrors them as ClusterIP Services.
    #[arg(long, env = "MESHLINK_ENABLE_HEADLESS_SERVICES", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub enable_headless_services: bool,

    /// DNS server that resolves gateway names (host:port); the system's resolver otherwise.
    #[arg(long, env = "MESHLINK_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
}

/// A label selector in `kubectl -l` syntax, checked here so that a typo stops the start with a
/// clear message rather than a watch the API server keeps refusing.
fn selector(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    s.parse::<link_crd::LabelSelector>()
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

impl Options {
    fn resolver(&self) -> Result<TokioResolver, hickory_resolver::net::NetError> {
        match self.dns_server {
            Some(addr) => {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut server.connections {
                    c.port = addr.port();
                }
                let config = ResolverConfig::from_parts(None, Vec::new(), vec![server]);
                Ok(
                    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                        .build()?,
                )
            }
            None => Ok(TokioResolver::builder_tokio()?.build()?),
        }
    }
}

/// Serves Links while this replica holds the Lease, until `cancel` fires. Stopping, or losing
/// the Lease, leaves every mirror in place.
pub async fn run(
    client: Client,
    options: Options,
    lease: LeaseOptions,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    cancel: CancellationToken,
) {
    let name = link_crd::keys::controller_lease(options.link.as_deref());
    let namespace = options.namespace.clone();
    leader::run_while_leader(
        client.clone(),
        &namespace,
        &name,
        &lease,
        leader::Report {
            gauge: metrics.leader.clone(),
            readiness: readiness.clone(),
        },
        cancel,
        move |token, claim| {
            links::run(
                client.clone(),
                options.clone(),
                metrics.clone(),
                readiness.clone(),
                claim,
                token,
            )
        },
    )
    .await;
}
