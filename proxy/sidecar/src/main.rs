//! `meshlink-proxy`: the sidecar proxy, configured from Linkerd's `LINKERD2_PROXY_*`
//! environment; `meshlink-proxy init` sets up a pod's redirect rules (Linkerd's proxy-init).

use anyhow::{Context, Result};
use clap::Parser;
use proxy_sidecar::{Config, Metrics, ProcessEnv, Proxy};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    about = "meshlink's sidecar proxy: configured from LINKERD2_PROXY_* (no arguments); `init` writes the pod's iptables rules",
    version
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Redirects the pod's TCP to the proxy (run once per pod, with NET_ADMIN, before the proxy).
    Init(proxy_init::Options),
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::Init(options)) = args.command {
        tracing_subscriber::fmt().with_env_filter("info").init();
        let report = proxy_init::run(&options)?;
        // The rules, as iptables-restore read them (all there is to see with --dry-run).
        std::io::Write::write_all(&mut std::io::stdout(), report.to_string().as_bytes())?;
        return Ok(());
    }
    // Everything is read and checked before a socket is bound.
    let config = Config::from_env(&ProcessEnv).context("invalid configuration")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workers = proxy_transport::worker_runtimes(config.cores, "proxy-worker")?;
    runtime.block_on(run(config, workers))
}

async fn run(config: Config, workers: Vec<tokio::runtime::Handle>) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log).context("LINKERD2_PROXY_LOG")?,
        )
        .init();
    proxy_identity::tls::install_default_provider();
    let creds = config
        .identity
        .credentials()
        .context("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")?;
    let cancel = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::default();
    metrics.register(&mut registry);
    let certify = config
        .identity
        .spawn_certify(creds.clone(), &mut registry, cancel.clone());
    let proxy = Proxy::bind(&config, &creds, &metrics).await?;
    // Ready once certified and the inbound policy of every declared port is known.
    let (policy_tx, policy_ready) = tokio::sync::watch::channel(config.inbound_ports.is_empty());
    let policies = proxy.policies.clone();
    let ports = config.inbound_ports.clone();
    tokio::spawn(async move {
        for port in ports {
            policies.ready(port).await;
        }
        let _ = policy_tx.send(true);
    });
    let ready = proxy_admin::all_ready(vec![creds.valid(), policy_ready]);
    // /metrics names every client and target of the pod: restricted as the gateway's is.
    let metrics_identities =
        proxy_admin::metrics_identities(&config.metrics_identities, creds.id());
    let (admin_addr, admin) = proxy_admin::Admin::new(registry, ready)
        .metrics_access(
            proxy_admin::MetricsAccess::restricted(
                config.metrics_networks.clone(),
                Some(proxy_identity::tls::server_config(&creds, &[b"http/1.1"])),
            )
            .identities(metrics_identities),
        )
        .bind(config.admin_addr, cancel.clone())
        .await?;
    tracing::info!(
        inbound = %proxy.inbound_addr, outbound = %proxy.outbound_addr, admin = %admin_addr,
        identity = %creds.id(), "proxy listening"
    );
    let admin = tokio::spawn(admin);
    let serve = tokio::spawn(proxy.serve(workers, cancel.clone()));

    proxy_admin::shutdown_signal().await;
    tracing::info!(grace = ?config.shutdown_grace_period, "shutting down: draining connections");
    cancel.cancel();
    if tokio::time::timeout(config.shutdown_grace_period, serve)
        .await
        .is_err()
    {
        tracing::warn!("connections still open at the end of the grace period; closing them");
    }
    let _ = tokio::join!(admin, certify);
    Ok(())
}
