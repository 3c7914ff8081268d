//! `meshlink-destination`: Linkerd's discovery and policy APIs for one cluster.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use ipnet::IpNet;
use proxy_destination_service::{
    Api, GrpcMetrics, Limits, PolicySettings, Settings, Store, WatchMetrics, Watches,
    policy::DefaultPolicy,
};
use proxy_identity::IdentityOptions;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    about = "Tells proxies where every Service's endpoints are, with their identities (Linkerd's destination and policy APIs)",
    version
)]
struct Args {
    #[command(flatten)]
    identity: IdentityOptions,
    #[command(flatten)]
    limits: Limits,
    /// Address of the gRPC server (Linkerd's destination port).
    #[arg(
        long,
        env = "MESHLINK_DESTINATION_ADDR",
        default_value = "0.0.0.0:8086"
    )]
    addr: SocketAddr,
    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, env = "MESHLINK_ADMIN_ADDR", default_value = "0.0.0.0:9996")]
    admin_addr: SocketAddr,
    /// The cluster's DNS domain: names are `<svc>.<ns>.svc.<domain>`.
    #[arg(long, env = "MESHLINK_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// The trust domain of this cluster's identities.
    #[arg(long, env = "MESHLINK_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control-plane namespace: part of every identity; Pods labelled
    /// `linkerd.io/control-plane-ns` with it are meshed.
    #[arg(
        long,
        env = "MESHLINK_CONTROL_PLANE_NAMESPACE",
        default_value = "linkerd"
    )]
    control_plane_namespace: String,
    /// Where the Links and their credentials Secrets are.
    #[arg(long, env = "MESHLINK_MULTICLUSTER_NAMESPACE", default_value = link_crd::keys::DEFAULT_MULTICLUSTER_NAMESPACE)]
    multicluster_namespace: String,
    /// The inbound policy of Pods whose Pod and namespace set none.
    #[arg(
        long,
        env = "MESHLINK_DEFAULT_INBOUND_POLICY",
        default_value = "all-unauthenticated"
    )]
    default_inbound_policy: DefaultPolicy,
    /// The cluster's Pod and Service networks, for the `cluster-*` inbound policies.
    #[arg(long, env = "MESHLINK_CLUSTER_NETWORKS", value_delimiter = ',', default_value = proxy_destination_service::policy::DEFAULT_CLUSTER_NETWORKS)]
    cluster_networks: Vec<IpNet>,
    /// Networks (CIDRs) that may read /metrics over plain HTTP, besides loopback.
    #[arg(long, env = "MESHLINK_METRICS_NETWORKS", value_delimiter = ',')]
    metrics_networks: Vec<IpNet>,
    /// Log filter, e.g. `info`.
    #[arg(long, env = "MESHLINK_LOG", default_value = "info")]
    log: String,
}

/// How long stopping may take before the process exits anyway.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    proxy_admin::init_logging(&args.log).context("--log")?;
    proxy_identity::tls::install_default_provider();
    let creds = args.identity.credentials().context("identity settings")?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;

    let cancel = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let certify = args
        .identity
        .spawn_certify(creds.clone(), &mut registry, cancel.clone());
    let store = Store::new(Settings {
        cluster_domain: args.cluster_domain,
        trust_domain: args.trust_domain,
        control_plane_ns: args.control_plane_namespace,
    });
    let (grpc_metrics, watch_metrics) = (GrpcMetrics::default(), WatchMetrics::default());
    grpc_metrics.register(&mut registry);
    watch_metrics.register(&mut registry);
    let (synced, watches) = Watches {
        client,
        multicluster_namespace: args.multicluster_namespace,
        store: store.clone(),
        metrics: watch_metrics,
    }
    .spawn(cancel.clone());
    let ready = proxy_admin::all_ready(vec![creds.valid(), synced]);
    let admin_tls = proxy_identity::tls::server_config(&creds, &[b"http/1.1"]);
    let (admin_addr, admin) = proxy_admin::Admin::new(registry, ready)
        .metrics_access(proxy_admin::MetricsAccess::restricted(
            args.metrics_networks,
            Some(admin_tls),
        ))
        .bind(args.admin_addr, cancel.clone())
        .await?;
    let api = Api::new(
        store,
        args.limits.max_streams,
        grpc_metrics,
        PolicySettings {
            default_inbound: args.default_inbound_policy,
            cluster_networks: args.cluster_networks,
        },
    );
    let (addr, serve) = proxy_destination_service::serve(
        args.addr,
        api.router(),
        &creds,
        &args.limits,
        cancel.clone(),
    )
    .await?;
    tracing::info!(%addr, %admin_addr, identity = %creds.id(), "serving destinations");
    let (admin, serve) = (tokio::spawn(admin), tokio::spawn(serve));

    proxy_admin::shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    if tokio::time::timeout(DRAIN, async {
        let _ = tokio::join!(serve, watches, admin, certify);
    })
    .await
    .is_err()
    {
        tracing::warn!(deadline = ?DRAIN, "streams still open at the drain deadline");
    }
    Ok(())
}
