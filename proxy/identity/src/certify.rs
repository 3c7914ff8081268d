//! The identity client: keeps a workload's certificate fresh by calling Linkerd's
//! `io.linkerd.proxy.identity.Identity/Certify`.
//!
//! As in linkerd2-proxy (`proxy/identity-client/src/certify.rs`): one key and CSR per process,
//! the ServiceAccount token re-read on every call, one connection per call, the next call at
//! 70 % of the certificate's remaining lifetime clamped to `[min_refresh, max_refresh]`. Failed
//! calls are retried with jittered exponential backoff, never later than the certificate's
//! expiry allows.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use hyper_util::rt::TokioIo;
use linkerd2_proxy_api::identity::{CertifyRequest, identity_client::IdentityClient};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rand::RngExt;
use tokio_util::sync::CancellationToken;

use crate::{Credentials, Id, ca, tls};

/// Where and how to ask for certificates.
#[derive(Clone, Debug)]
pub struct Config {
    /// `host:port` of the identity service.
    pub addr: String,
    /// The identity service's own identity (checked against its certificate).
    pub server_id: Id,
    /// A file holding the ServiceAccount token (re-read on every call: kubelet rotates it).
    pub token_file: PathBuf,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

/// Linkerd's defaults: `LINKERD2_PROXY_IDENTITY_MIN_REFRESH` 10 s and `..._MAX_REFRESH` 24 h.
pub const MIN_REFRESH: Duration = Duration::from_secs(10);
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Why one Certify call failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("reading the token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("connecting to the identity service at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::ConnectError),
    #[error("gRPC connection to the identity service: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("the identity service refused: {}: {}", .0.code(), .0.message())]
    Refused(#[from] tonic::Status),
    #[error("the identity service's answer has no valid_until")]
    NoValidUntil,
    #[error("the new certificate was not installed: {0}")]
    Install(#[from] crate::creds::InstallError),
}

impl CertifyError {
    fn label(&self) -> &'static str {
        match self {
            Self::Token { .. } | Self::EmptyToken(_) => "token",
            Self::Connect { .. } | Self::Tls(_) | Self::Transport(_) => "connect",
            Self::Refused(_) => "refused",
            Self::NoValidUntil | Self::Install(_) => "invalid_response",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Linkerd's certificate metrics (`control_identity_cert_*`).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    expiration: Gauge,
    refresh: Gauge,
    refreshes: Family<ResultLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "control_identity_cert_expiration_timestamp_seconds",
            "When the current certificate expires",
            self.expiration.clone(),
        );
        registry.register(
            "control_identity_cert_refresh_timestamp_seconds",
            "When the certificate was last refreshed",
            self.refresh.clone(),
        );
        registry.register(
            "control_identity_cert_refreshes",
            "Certify calls, by result",
            self.refreshes.clone(),
        );
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Keeps `creds` certified until `cancel` fires.
pub async fn run(
    config: Config,
    creds: Arc<Credentials>,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), rcgen::Error> {
    let (csr, key) = ca::new_csr(creds.id())?;
    let mut failures = 0u32;
    loop {
        let wait = match certify(&config, &creds, &csr, &key).await {
            Ok(expiry) => {
                failures = 0;
                metrics
                    .refreshes
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                metrics.expiration.set(unix(expiry));
                metrics.refresh.set(unix(SystemTime::now()));
                let wait = refresh_in(expiry, SystemTime::now(), &config);
                tracing::info!(id = %creds.id(), expires_in = ?expiry.duration_since(SystemTime::now()).unwrap_or_default(), next_in = ?wait, "certified");
                wait
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                metrics
                    .refreshes
                    .get_or_create(&ResultLabels {
                        result: error.label(),
                    })
                    .inc();
                let wait = retry_in(failures, creds.expiry(), SystemTime::now(), &config);
                tracing::warn!(%error, id = %creds.id(), attempt = failures, retry_in = ?wait, "certify failed");
                wait
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One Certify call: sends the token, identity and CSR, checks and installs the answer.
/// `csr` and `key` come from [`ca::new_csr`].
pub async fn certify(
    config: &Config,
    creds: &Arc<Credentials>,
    csr: &[u8],
    key: &[u8],
) -> Result<SystemTime, CertifyError> {
    let token = tokio::fs::read(&config.token_file)
        .await
        .map_err(|source| CertifyError::Token {
            path: config.token_file.clone(),
            source,
        })?;
    if token.iter().all(u8::is_ascii_whitespace) {
        return Err(CertifyError::EmptyToken(config.token_file.clone()));
    }
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&config.addr),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    .map_err(|source| CertifyError::Connect {
        addr: config.addr.clone(),
        source,
    })?;
    // Before the first certificate the client presents none; afterwards its current one while
    // it is in date, as Linkerd's does, and none once it has expired (the token is the
    // credential), so that a renewal gap longer than the certificate's life heals itself.
    let stream = tls::connect(
        tls::certify_client_config(creds, &[b"h2"]),
        tcp,
        &config.server_id,
    )
    .await?;
    let mut io = Some(TokioIo::new(stream));
    // tonic dials through a connector; this one hands over the single connection made above.
    let channel = tonic::transport::Endpoint::from_static("http://identity.invalid")
        .timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_| {
            let io = io.take();
            async move { io.ok_or_else(|| std::io::Error::other("connection already used")) }
        }))
        .await?;
    let rsp = IdentityClient::new(channel)
        .certify(CertifyRequest {
            identity: creds.id().to_string(),
            token,
            certificate_signing_request: csr.to_vec(),
        })
        .await?
        .into_inner();
    if rsp.valid_until.is_none() {
        return Err(CertifyError::NoValidUntil);
    }
    Ok(creds.install(rsp.leaf_certificate, rsp.intermediate_certificates, key)?)
}

/// When to renew a certificate that expires at `expiry`: 70 % of what is left, clamped.
fn refresh_in(expiry: SystemTime, now: SystemTime, config: &Config) -> Duration {
    let left = expiry.duration_since(now).unwrap_or_default();
    left.mul_f64(0.7).clamp(
        config.min_refresh.min(config.max_refresh),
        config.max_refresh,
    )
}

/// When to retry after `failures` failed calls: exponential from 1 s with full jitter, capped
/// by the refresh bounds, and never past the time a still-valid certificate should be renewed.
fn retry_in(
    failures: u32,
    expiry: Option<SystemTime>,
    now: SystemTime,
    config: &Config,
) -> Duration {
    let cap = config
        .min_refresh
        .max(Duration::from_secs(1))
        .min(Duration::from_secs(30));
    let ceiling = Duration::from_secs(1)
        .saturating_mul(1 << failures.min(6))
        .min(cap);
    let mut wait = rand::rng().random_range(ceiling / 2..=ceiling);
    // A certificate about to expire is retried sooner; one already expired gains nothing from
    // haste, and every expired workload retrying ten times a second would flood the identity
    // service just as it comes back: it backs off like any other failure.
    if let Some(left) = expiry
        .and_then(|e| e.duration_since(now).ok())
        .filter(|d| !d.is_zero())
    {
        wait = wait.min(left.mul_f64(0.7).max(Duration::from_millis(100)));
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            addr: String::new(),
            server_id: Id::parse("identity.linkerd").unwrap(),
            token_file: PathBuf::new(),
            min_refresh: MIN_REFRESH,
            max_refresh: MAX_REFRESH,
        }
    }

    #[test]
    fn refreshes_at_seventy_percent_clamped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = config();
        assert_eq!(
            refresh_in(now + Duration::from_secs(24 * 3600), now, &c),
            Duration::from_secs(24 * 3600).mul_f64(0.7)
        );
        assert_eq!(
            refresh_in(now + Duration::from_secs(5), now, &c),
            MIN_REFRESH
        );
        assert_eq!(
            refresh_in(now + Duration::from_secs(100 * 24 * 3600), now, &c),
            MAX_REFRESH
        );
        assert_eq!(
            refresh_in(now, now + Duration::from_secs(1), &c),
            MIN_REFRESH
        );
    }

    #[test]
    fn retries_back_off_with_jitter_within_bounds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let c = config();
        for failures in 1..20 {
            let w = retry_in(failures, None, now, &c);
            assert!(
                w >= Duration::from_millis(500) && w <= Duration::from_secs(10),
                "{w:?}"
            );
        }
        // A certificate about to expire is retried soon, whatever the backoff says.
        let w = retry_in(10, Some(now + Duration::from_secs(2)), now, &c);
        assert!(w <= Duration::from_millis(1400), "{w:?}");
        // An expired one backs off as any failure does (no retry storm after an outage).
        for expired in [now, now - Duration::from_secs(60)] {
            let w = retry_in(10, Some(expired), now, &c);
            assert!(w >= Duration::from_secs(5), "{w:?}");
        }
    }
}
