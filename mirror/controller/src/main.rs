//! `meshlink-mirror`: the service-mirror controller.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "Mirrors the Services that linked clusters export", version)]
struct Args {
    #[command(flatten)]
    options: mirror_controller::Options,

    #[command(flatten)]
    lease: mirror_controller::LeaseOptions,

    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, env = "MESHLINK_ADMIN_ADDR", default_value = "0.0.0.0:9999")]
    admin_addr: SocketAddr,

    /// Log filter, e.g. `info` or `mirror_controller=debug,info`.
    #[arg(long, env = "MESHLINK_LOG", default_value = "info")]
    log: String,
}

/// How long stopping may take before the process exits anyway.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    proxy_admin::init_logging(&args.log).context("--log")?;
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(mirror_controller::Metrics::default());
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    let cancel = CancellationToken::new();
    let (readiness, ready_rx) = mirror_controller::Readiness::new();
    let (admin_addr, admin) = proxy_admin::Admin::new(registry, ready_rx)
        .bind(args.admin_addr, cancel.clone())
        .await?;
    tracing::info!(%admin_addr, namespace = %args.options.namespace, "starting");
    let admin = tokio::spawn(admin);
    let controller = tokio::spawn(mirror_controller::run(
        client,
        args.options,
        args.lease,
        metrics,
        readiness,
        cancel.clone(),
    ));

    proxy_admin::shutdown_signal().await;
    tracing::info!("stopping; mirrors stay in place");
    cancel.cancel();
    let _ = tokio::time::timeout(DRAIN, async {
        let _ = controller.await;
        let _ = admin.await;
    })
    .await;
    Ok(())
}
