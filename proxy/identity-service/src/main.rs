//! `meshlink-identity`: the identity service (Linkerd's Certify API).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use proxy_identity::{Credentials, TrustAnchors};
use proxy_identity_service::{Identity, IssuerStore, Metrics, Settings, TokenReviews};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    about = "Signs workload certificates for authenticated ServiceAccounts (Linkerd's Certify API)",
    version
)]
struct Args {
    /// The trust domain of identities (`<sa>.<ns>.serviceaccount.identity.<cp-ns>.<domain>`).
    #[arg(long, env = "MESHLINK_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The control-plane namespace: part of every identity, and where the issuer Secret is.
    #[arg(
        long,
        env = "MESHLINK_CONTROL_PLANE_NAMESPACE",
        default_value = "linkerd"
    )]
    control_plane_namespace: String,
    /// This service's own ServiceAccount: its serving identity is derived from it.
    #[arg(
        long,
        env = "MESHLINK_SERVICE_ACCOUNT",
        default_value = "linkerd-identity"
    )]
    service_account: String,
    /// The `kubernetes.io/tls` Secret holding the issuer (tls.crt, tls.key).
    #[arg(
        long,
        env = "MESHLINK_ISSUER_SECRET",
        default_value = "linkerd-identity-issuer"
    )]
    issuer_secret: String,
    /// PEM file of the trust anchors (one or more certificates).
    #[arg(long, env = "MESHLINK_TRUST_ANCHORS_FILE")]
    trust_anchors: PathBuf,
    /// The audience tokens must be issued for; "" accepts the API server's default audience.
    #[arg(
        long,
        env = "MESHLINK_TOKEN_AUDIENCE",
        default_value = "identity.l5d.io"
    )]
    token_audience: String,
    /// Lifetime of the certificates issued (e.g. 24h, 30m, 90s).
    #[arg(long, env = "MESHLINK_LEAF_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
    leaf_lifetime: Duration,
    /// Address of the Certify gRPC server.
    #[arg(long, env = "MESHLINK_IDENTITY_ADDR", default_value = "0.0.0.0:8080")]
    addr: SocketAddr,
    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, env = "MESHLINK_ADMIN_ADDR", default_value = "0.0.0.0:9990")]
    admin_addr: SocketAddr,
    /// Log filter, e.g. `info`.
    #[arg(long, env = "MESHLINK_LOG", default_value = "info")]
    log: String,
}

/// A leaf lifetime in humantime syntax (`24h`, `90s`; Linkerd's `<int>(ms|s|m|h|d)` parses the
/// same), at least 5 s: shorter lifetimes are for renewal tests, and below that renewals would
/// storm the service.
fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d < Duration::from_secs(5) {
        return Err(format!("{s:?}: a certificate must live at least 5s"));
    }
    Ok(d)
}

/// How long stopping may take before the process exits anyway.
const DRAIN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    proxy_admin::init_logging(&args.log).context("--log")?;
    proxy_identity::tls::install_default_provider();

    let pem = std::fs::read_to_string(&args.trust_anchors)
        .with_context(|| format!("reading --trust-anchors {}", args.trust_anchors.display()))?;
    let anchors = TrustAnchors::from_pem(&pem).context("--trust-anchors")?;
    let audience = Some(args.token_audience).filter(|a| !a.is_empty());
    let settings = Settings {
        trust_domain: args.trust_domain,
        control_plane_namespace: args.control_plane_namespace,
        leaf_lifetime: args.leaf_lifetime,
        token_audience: audience.clone(),
    };
    let own = proxy_identity_service::service_id(&args.service_account, &settings)
        .context("--service-account, --control-plane-namespace or --trust-domain")?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;

    let metrics = Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let creds = Credentials::new(own.clone(), anchors);
    let issuer = IssuerStore::default();
    let cancel = CancellationToken::new();

    let (admin_addr, admin) = proxy_admin::Admin::new(registry, issuer.loaded())
        .bind(args.admin_addr, cancel.clone())
        .await?;
    let admin = tokio::spawn(admin);
    let watch = tokio::spawn(proxy_identity_service::watch_secret(
        proxy_identity_service::IssuerWatch {
            client: client.clone(),
            namespace: settings.control_plane_namespace.clone(),
            name: args.issuer_secret,
            store: issuer.clone(),
            creds: creds.clone(),
            own: own.clone(),
            metrics: metrics.clone(),
        },
        cancel.clone(),
    ));
    let service = Identity::new(
        settings,
        issuer,
        TokenReviews::new(client, audience),
        metrics,
    );
    let (addr, serve) =
        proxy_identity_service::serve(args.addr, service.into_service(), creds, cancel.clone())
            .await?;
    tracing::info!(%addr, %admin_addr, identity = %own, "serving Certify");
    let serve = tokio::spawn(serve);

    proxy_admin::shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    let drained = tokio::time::timeout(DRAIN, async {
        let _ = tokio::join!(serve, watch, admin);
    })
    .await;
    if drained.is_err() {
        tracing::warn!(deadline = ?DRAIN, "connections still open at the drain deadline");
    }
    Ok(())
}
