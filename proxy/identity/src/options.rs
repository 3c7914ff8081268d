//! The identity settings every data-plane process takes, under Linkerd's environment names
//! (`LINKERD2_PROXY_IDENTITY_*`) so that a Linkerd proxy's manifest reads the same.

use std::{path::PathBuf, sync::Arc, time::Duration};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::{Credentials, Id, TrustAnchors, certify};

#[derive(clap::Args, Clone, Debug)]
pub struct IdentityOptions {
    /// This workload's identity (its TLS server name and client identity).
    #[arg(long = "identity", env = "LINKERD2_PROXY_IDENTITY_LOCAL_NAME")]
    pub local_name: Id,
    /// The trust anchors, as PEM text (Linkerd passes the contents, not a path).
    #[arg(
        long,
        env = "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
        hide_env_values = true,
        required_unless_present = "trust_anchors_file"
    )]
    pub trust_anchors: Option<String>,
    /// A PEM file of trust anchors, instead of --trust-anchors.
    #[arg(
        long,
        env = "MESHLINK_TRUST_ANCHORS_FILE",
        conflicts_with = "trust_anchors"
    )]
    pub trust_anchors_file: Option<PathBuf>,
    /// `host:port` of the identity service.
    #[arg(long, env = "LINKERD2_PROXY_IDENTITY_SVC_ADDR")]
    pub identity_addr: String,
    /// The identity service's identity, checked against its certificate.
    #[arg(long, env = "LINKERD2_PROXY_IDENTITY_SVC_NAME")]
    pub identity_name: Id,
    /// The ServiceAccount token file sent to Certify (re-read on every call).
    #[arg(long, env = "LINKERD2_PROXY_IDENTITY_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Earliest renewal after a certificate arrives.
    #[arg(long, env = "LINKERD2_PROXY_IDENTITY_MIN_REFRESH", default_value = "10s", value_parser = humantime::parse_duration)]
    pub min_refresh: Duration,
    /// Latest renewal after a certificate arrives.
    #[arg(long, env = "LINKERD2_PROXY_IDENTITY_MAX_REFRESH", default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_refresh: Duration,
}

/// Why the identity settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading the trust anchors file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Anchors(#[from] crate::tls::NoAnchors),
}

impl IdentityOptions {
    /// Reads the anchors; call before binding anything.
    pub fn credentials(&self) -> Result<Arc<Credentials>, IdentityError> {
        let pem = match (&self.trust_anchors, &self.trust_anchors_file) {
            (Some(pem), _) => pem.clone(),
            (None, Some(path)) => {
                std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
                    path: path.clone(),
                    source,
                })?
            }
            (None, None) => String::new(),
        };
        Ok(Credentials::new(
            self.local_name.clone(),
            TrustAnchors::from_pem(&pem)?,
        ))
    }

    /// Spawns the Certify loop that keeps `creds` fresh.
    pub fn spawn_certify(
        &self,
        creds: Arc<Credentials>,
        registry: &mut Registry,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = certify::Metrics::default();
        metrics.register(registry);
        let config = certify::Config {
            addr: self.identity_addr.clone(),
            server_id: self.identity_name.clone(),
            token_file: self.token_file.clone(),
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
        };
        tokio::spawn(async move {
            if let Err(error) = certify::run(config, creds, metrics, cancel).await {
                tracing::error!(%error, "cannot make a key and CSR; no certificate will be requested");
            }
        })
    }
}
