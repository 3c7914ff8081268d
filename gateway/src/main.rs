//! `meshlink-gateway`: the multicluster gateway.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use gateway::{Discovery, Gateway, Mesh, Metrics, Options};
use proxy_identity::IdentityOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    about = "Accepts cross-cluster mTLS on 4143 and forwards to local Services",
    version
)]
struct Args {
    #[command(flatten)]
    gateway: Options,
    #[command(flatten)]
    identity: IdentityOptions,
    /// Address of the admin server (/live, /ready, /metrics); kubelet and remote probes use it.
    #[arg(
        long,
        env = "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
        default_value = "0.0.0.0:4191"
    )]
    admin_addr: std::net::SocketAddr,
    /// Networks (CIDRs, comma-separated) that may read /metrics over plain HTTP, besides
    /// loopback.
    #[arg(long, env = "MESHLINK_METRICS_NETWORKS", value_delimiter = ',')]
    metrics_networks: Vec<ipnet::IpNet>,
    /// Identities (comma-separated) that may read /metrics over mTLS on the admin port; any
    /// other certificate is refused (403). Default: the Prometheus ServiceAccount of Linkerd
    /// viz in this install, `prometheus.linkerd-viz.serviceaccount.identity.<the gateway's
    /// control-plane namespace and trust domain>`.
    #[arg(long, env = "MESHLINK_METRICS_IDENTITIES", value_delimiter = ',')]
    metrics_identities: Vec<proxy_identity::Id>,
    /// How long open connections may take to finish on shutdown.
    #[arg(long, env = "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace_period: Duration,
    /// Log filter, e.g. `info` or `gateway=debug,info`.
    #[arg(long, env = "MESHLINK_LOG", default_value = "info")]
    log: String,
    /// Threads. 1 (Linkerd's default) runs everything on one thread, the cheapest in memory and
    /// wake-ups; N spreads connections over N threads, each connection staying on one.
    #[arg(long, env = "LINKERD2_PROXY_CORES", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    cores: u16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // This thread accepts and serves its share of connections; each other worker is a
    // single-threaded runtime on a thread of its own.
    let workers = proxy_transport::worker_runtimes(args.cores.into(), "gateway-worker")?;
    runtime.block_on(run(args, workers))
}

async fn run(args: Args, workers: Vec<tokio::runtime::Handle>) -> Result<()> {
    proxy_admin::init_logging(&args.log).context("--log")?;
    proxy_identity::tls::install_default_provider();
    let mut options = args.gateway;
    // The connection limit, not the open-file limit, must be what refuses a client: past the
    // file limit, accept fails for everyone, probes and certificate renewal included.
    options.max_connections = proxy_transport::files::fit_connections_to_limit(
        options.max_connections,
        2,
        options.reserved_files(),
    );
    // Everything is parsed and read before a socket is bound.
    let creds = args.identity.credentials().context("identity settings")?;
    // Meshed endpoints are dialled as the identities this gateway's own control plane issues.
    let mesh = Mesh::of(creds.id()).with_context(|| {
        format!(
            "--identity {} is not <sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>",
            creds.id()
        )
    })?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;

    let cancel = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::default();
    metrics.register(&mut registry);
    let certify = args
        .identity
        .spawn_certify(creds.clone(), &mut registry, cancel.clone());
    tracing::info!(control_plane = %mesh.control_plane_ns, trust_domain = %mesh.trust_domain, "meshed endpoints are dialled over mTLS");
    let discovery = Discovery::new(Some(mesh));
    let ready = proxy_admin::all_ready(vec![creds.valid(), discovery.synced()]);
    let admin_tls = proxy_identity::tls::server_config(&creds, &[b"http/1.1"]);
    let metrics_identities = proxy_admin::metrics_identities(&args.metrics_identities, creds.id());
    tracing::info!(identities = ?metrics_identities, "who may read /metrics over mTLS");
    let (admin_addr, admin) = proxy_admin::Admin::new(registry, ready)
        .metrics_access(
            proxy_admin::MetricsAccess::restricted(args.metrics_networks, Some(admin_tls))
                .identities(metrics_identities),
        )
        .bind(args.admin_addr, cancel.clone())
        .await?;
    let watch = tokio::spawn(discovery.clone().run(client, cancel.clone()));
    let (addr, serve) = Gateway::new(options, creds.clone(), discovery, metrics)
        .workers(workers)
        .bind(cancel.clone())
        .await?;
    tracing::info!(%addr, %admin_addr, identity = %creds.id(), "gateway listening");
    let admin = tokio::spawn(admin);
    let serve = tokio::spawn(serve);

    proxy_admin::shutdown_signal().await;
    tracing::info!(grace = ?args.shutdown_grace_period, "shutting down: draining connections");
    cancel.cancel();
    if tokio::time::timeout(args.shutdown_grace_period, serve)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of the grace period; closing them");
    }
    let _ = tokio::join!(admin, watch, certify);
    Ok(())
}
