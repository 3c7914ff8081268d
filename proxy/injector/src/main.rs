//! `meshlink-injector`: the proxy injector webhook.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    core::v1::{Namespace, Secret},
};
use kube::{
    Api,
    runtime::{WatchStreamExt, reflector, watcher},
};
use proxy_inject::ConfigArgs;
use proxy_injector::{Metrics, ServingCert, Target, Webhook, cert};
use proxy_transport::{CallDeadlines, ClientAuth, Protocol, ServerLimits, WithDeadlines};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    about = "Adds meshlink-proxy to Pods annotated linkerd.io/inject: enabled (a mutating admission webhook)",
    version
)]
struct Args {
    /// Address of the webhook's HTTPS server (its Service's targetPort).
    #[arg(long, env = "MESHLINK_INJECTOR_ADDR", default_value = "0.0.0.0:8443")]
    addr: SocketAddr,
    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, env = "MESHLINK_ADMIN_ADDR", default_value = "0.0.0.0:9995")]
    admin_addr: SocketAddr,
    /// The injector's namespace: its Service's and its CA Secret's.
    #[arg(long, env = "MESHLINK_NAMESPACE", default_value = "linkerd")]
    namespace: String,
    /// The Service the API server calls (its certificate names <service>.<namespace>.svc).
    #[arg(long, default_value = "linkerd-proxy-injector")]
    service: String,
    /// The MutatingWebhookConfiguration whose CA bundle the injector keeps.
    #[arg(long, default_value = "linkerd-proxy-injector-webhook-config")]
    webhook_configuration: String,
    /// The Secret holding the CA that signs the serving certificates (made if missing).
    #[arg(long, default_value = "linkerd-proxy-injector-ca")]
    ca_secret: String,
    /// The trust anchors (PEM) injected proxies trust; re-read at each admission.
    #[arg(long, env = "MESHLINK_TRUST_ANCHORS_FILE")]
    trust_anchors_file: PathBuf,
    #[command(flatten)]
    inject: ConfigArgs,
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

    // Everything is checked before a socket is bound.
    let anchors = std::fs::read_to_string(&args.trust_anchors_file).with_context(|| {
        format!(
            "reading --trust-anchors-file {}",
            args.trust_anchors_file.display()
        )
    })?;
    args.inject
        .config(&anchors)
        .context("the injection flags")?;
    let dns_name = proxy_identity::Id::parse(&format!("{}.{}.svc", args.service, args.namespace))
        .context("--service and --namespace must make a DNS name")?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let ca = cert::ensure_ca(&secrets, &args.namespace, &args.ca_secret).await?;
    let serving = Arc::new(ServingCert::default());
    serving.renew(&ca.ca, &dns_name)?;
    let (bundle_tx, bundle_rx) = watch::channel(ca.bundle.clone());

    let cancel = CancellationToken::new();
    let metrics = Metrics::default();
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);

    let namespace_api: Api<Namespace> = Api::all(client.clone());
    let (namespaces, writer) = reflector::store();
    let watch_namespaces = reflector(
        writer,
        watcher(namespace_api.clone(), watcher::Config::default()).default_backoff(),
    )
    .for_each(|_| async {});
    let watch_namespaces = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            tokio::select! {
                () = watch_namespaces => {}
                () = cancel.cancelled() => {}
            }
        }
    });
    let (synced_tx, synced_rx) = watch::channel(false);
    tokio::spawn({
        let namespaces = namespaces.clone();
        async move {
            if namespaces.wait_until_ready().await.is_ok() {
                synced_tx.send_replace(true);
            }
        }
    });

    // Readiness does not wait for the bundle to be in place: the configuration may be applied
    // after the injector starts, and the API server reaches only ready endpoints.
    let keep_bundle = tokio::spawn(proxy_injector::keep_ca_bundle(
        Api::<MutatingWebhookConfiguration>::all(client.clone()),
        Target {
            configuration: args.webhook_configuration.clone(),
            service_namespace: args.namespace.clone(),
            service_name: args.service.clone(),
        },
        bundle_rx,
        cancel.clone(),
    ));

    let renew = tokio::spawn({
        let cancel = cancel.clone();
        let serving = serving.clone();
        let (namespace, name, dns_name) = (
            args.namespace.clone(),
            args.ca_secret.clone(),
            dns_name.clone(),
        );
        async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(cert::LEAF_RENEW_EVERY) => {}
                }
                match cert::ensure_ca(&secrets, &namespace, &name).await {
                    Ok(ca) => match serving.renew(&ca.ca, &dns_name) {
                        Ok(()) => {
                            bundle_tx.send_replace(ca.bundle);
                            tracing::info!("renewed the serving certificate");
                        }
                        Err(error) => tracing::error!(%error, "renewing the serving certificate"),
                    },
                    Err(error) => {
                        tracing::error!(%error, "reading the webhook CA; the current certificate stays")
                    }
                }
            }
        }
    });

    let (admin_addr, admin) = proxy_admin::Admin::new(registry, synced_rx)
        .bind(args.admin_addr, cancel.clone())
        .await?;
    let admin = tokio::spawn(admin);
    let webhook = Webhook::new(
        args.inject,
        args.trust_anchors_file,
        namespaces,
        namespace_api,
        metrics,
    );
    let limits = ServerLimits {
        max_connections: 256,
        handshake_timeout: Duration::from_secs(5),
        max_streams_per_connection: 100,
        // The API server keeps its connections alive: a lifetime spreads its calls over the
        // replicas as they come and go.
        connection_lifetime: Some(Duration::from_secs(60)),
        keep_alive_interval: Duration::from_secs(30),
        client_auth: ClientAuth::Optional,
    };
    // Under the API server's default webhook timeout (10 s).
    let deadlines = CallDeadlines {
        body: Duration::from_secs(5),
        call: Duration::from_secs(8),
    };
    let (addr, serve) = proxy_transport::serve_tls(
        args.addr,
        cert::server_config(serving),
        WithDeadlines::new(webhook, deadlines),
        limits,
        Protocol::Http1And2,
        cancel.clone(),
    )
    .await?;
    tracing::info!(%addr, %admin_addr, name = %dns_name, "serving the proxy injector");
    let serve = tokio::spawn(serve);

    proxy_admin::shutdown_signal().await;
    tracing::info!("shutting down");
    cancel.cancel();
    let drained = tokio::time::timeout(DRAIN, async {
        let _ = tokio::join!(serve, admin, keep_bundle, renew, watch_namespaces);
    })
    .await;
    if drained.is_err() {
        tracing::warn!(deadline = ?DRAIN, "connections still open at the drain deadline");
    }
    Ok(())
}
