//! The issuer: loaded from a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`) and reloaded
//! whenever the Secret changes. A new issuer is used only once it is proven to chain to the
//! trust anchors (the service issues its own serving certificate with it and checks that);
//! a bad one is refused with a log line and a metric, and the previous issuer stays in use.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use proxy_identity::{Credentials, Id, ca::Signer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Metrics, OutcomeLabels};

/// The issuer in use.
#[derive(Debug)]
pub struct Loaded {
    pub signer: Signer,
}

/// Shared by the Certify handler and the Secret watch.
#[derive(Clone, Debug)]
pub struct IssuerStore {
    current: Arc<RwLock<Option<Arc<Loaded>>>>,
    loaded: watch::Sender<bool>,
}

impl Default for IssuerStore {
    fn default() -> Self {
        Self {
            current: Arc::default(),
            loaded: watch::Sender::new(false),
        }
    }
}

/// Why an issuer was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the Secret has no {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Ca(#[from] proxy_identity::ca::CaError),
    #[error("a certificate it issues is refused: {0}")]
    Install(#[from] proxy_identity::InstallError),
}

/// How long the service's own serving certificate lives; it is re-issued with every issuer load
/// and well before it runs out.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl IssuerStore {
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// True once an issuer is loaded.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Loads an issuer from PEM, issuing the service's own serving certificate (`own`) with it
    /// into `creds`, which checks that it chains to the anchors.
    pub fn load(
        &self,
        cert_pem: &str,
        key_pem: &str,
        creds: &Credentials,
        own: &Id,
    ) -> Result<(), LoadError> {
        let signer = Signer::from_pem(cert_pem, key_pem)?;
        let (leaf, key) = signer.issue(own, SERVING_LIFETIME)?;
        creds.install(leaf, vec![signer.cert_der().to_vec()], &key)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(Loaded { signer }));
        self.loaded.send_replace(true);
        Ok(())
    }
}

/// What [`watch_secret`] keeps loaded.
#[allow(missing_debug_implementations, reason = "kube::Client has no Debug")]
pub struct IssuerWatch {
    pub client: kube::Client,
    /// Where the Secret is.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    pub store: IssuerStore,
    /// The service's own serving credentials, re-issued with every issuer.
    pub creds: Arc<Credentials>,
    /// The service's own identity.
    pub own: Id,
    pub metrics: Metrics,
}

/// Watches the issuer Secret and loads every version of it, until `cancel`. Also re-issues the
/// serving certificate at half its lifetime.
pub async fn watch_secret(watch: IssuerWatch, cancel: CancellationToken) {
    let IssuerWatch {
        client,
        namespace,
        name,
        store,
        creds,
        own,
        metrics,
    } = watch;
    let api = kube::Api::<Secret>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    let mut last: Option<(String, String)> = None;
    let mut refresh = tokio::time::interval(SERVING_LIFETIME / 2);
    refresh.tick().await;
    loop {
        let secret = tokio::select! {
            () = cancel.cancelled() => return,
            _ = refresh.tick() => match &last {
                Some(_) => None,
                None => continue,
            },
            event = events.next() => match event {
                Some(Ok(secret)) => Some(secret),
                Some(Err(error)) => {
                    tracing::warn!(%error, %namespace, secret = %name, "watching the issuer Secret");
                    continue;
                }
                None => return,
            },
        };
        let pem = match secret {
            Some(secret) => {
                let data = secret.data.unwrap_or_default();
                let get = |k: &'static str| {
                    data.get(k)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                        .ok_or(LoadError::Missing(k))
                };
                match get("tls.crt").and_then(|c| Ok((c, get("tls.key")?))) {
                    Ok(pem) => pem,
                    Err(error) => {
                        refused(&metrics, &namespace, &name, &error);
                        continue;
                    }
                }
            }
            None => match &last {
                Some(pem) => pem.clone(),
                None => continue,
            },
        };
        match store.load(&pem.0, &pem.1, &creds, &own) {
            Ok(()) => {
                metrics
                    .issuer_reloads
                    .get_or_create(&OutcomeLabels { result: "ok" })
                    .inc();
                tracing::info!(%namespace, secret = %name, "issuer loaded");
                last = Some(pem);
            }
            Err(error) => refused(&metrics, &namespace, &name, &error),
        }
    }
}

fn refused(metrics: &Metrics, namespace: &str, name: &str, error: &LoadError) {
    metrics
        .issuer_reloads
        .get_or_create(&OutcomeLabels { result: "refused" })
        .inc();
    tracing::error!(%error, %namespace, secret = %name, "issuer refused; the previous issuer stays in use. Give the Secret tls.crt (an intermediate CA signed by the trust anchor) and tls.key (its PKCS#8 ECDSA P-256 key)");
}
