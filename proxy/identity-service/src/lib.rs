//! The identity service: Linkerd's `io.linkerd.proxy.identity.Identity/Certify`.
//!
//! A workload sends its ServiceAccount token, the identity it wants and a CSR. The service asks
//! the API server who the token belongs to (a TokenReview, with an audience), checks that the
//! identity is exactly `<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>`
//! for that account, signs a short-lived leaf with the cluster's issuer and returns the leaf,
//! the issuer certificate and the expiry. The issuer comes from a `kubernetes.io/tls` Secret
//! and is reloaded when the Secret changes. Refusals are gRPC errors that say why and are
//! counted by reason.

mod issuer;
mod server;
mod token;

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse, identity_server};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use proxy_identity::{Id, ca::CsrError};
use tonic::{Request, Response, Status};

pub use self::issuer::{IssuerStore, IssuerWatch, watch_secret};
pub use self::server::{DEADLINES, ServeError, limits, serve, serve_with};

/// Who a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reviewed {
    /// A ServiceAccount's token, valid for the audience.
    ServiceAccount { namespace: String, name: String },
    /// Authenticated, but not as a ServiceAccount (a user's token).
    Other(String),
    /// Not authenticated (expired, wrong audience, unknown signer...), with the API's reason.
    Refused(String),
}

/// Why a token could not be reviewed.
#[derive(Debug, thiserror::Error)]
#[error("TokenReview failed: {0}")]
pub struct ReviewError(#[source] kube::Error);

/// Reviews tokens. The real one asks the API server; unit tests use a table.
pub trait Authenticator: Send + Sync + 'static {
    fn review(&self, token: String) -> impl Future<Output = Result<Reviewed, ReviewError>> + Send;
}

/// Asks the API server with a TokenReview.
#[derive(Clone)]
pub struct TokenReviews {
    api: kube::Api<TokenReview>,
    audience: Option<String>,
}

impl std::fmt::Debug for TokenReviews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviews")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviews {
    /// `audience`: the token must be issued for it (Linkerd's projected tokens use
    /// `identity.l5d.io`); `None` accepts the API server's default audience.
    pub fn new(client: kube::Client, audience: Option<String>) -> Self {
        Self {
            api: kube::Api::all(client),
            audience,
        }
    }
}

impl Authenticator for TokenReviews {
    async fn review(&self, token: String) -> Result<Reviewed, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token,
                audiences: self.audience.clone().map(|a| vec![a]),
            },
            ..TokenReview::default()
        };
        let status = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError)?
            .status
            .unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Reviewed::Refused(
                status
                    .error
                    .filter(|e| !e.is_empty())
                    .unwrap_or_else(|| "the token is not valid".into()),
            ));
        }
        if let Some(aud) = &self.audience
            && !status.audiences.unwrap_or_default().contains(aud)
        {
            return Ok(Reviewed::Refused(format!(
                "the token is not issued for audience {aud}"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        Ok(
            match username
                .strip_prefix("system:serviceaccount:")
                .and_then(|r| r.split_once(':'))
            {
                Some((ns, sa)) => Reviewed::ServiceAccount {
                    namespace: ns.to_owned(),
                    name: sa.to_owned(),
                },
                None => Reviewed::Other(username),
            },
        )
    }
}

/// What a Certify call ended in: the metric label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Outcome {
    Ok,
    InvalidIdentity,
    NoToken,
    MalformedToken,
    BadToken,
    NotServiceAccount,
    IdentityMismatch,
    MalformedCsr,
    ReviewUnavailable,
    NoIssuer,
    SignFailed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidIdentity => "invalid_identity",
            Self::NoToken => "no_token",
            Self::MalformedToken => "malformed_token",
            Self::BadToken => "bad_token",
            Self::NotServiceAccount => "not_service_account",
            Self::IdentityMismatch => "identity_mismatch",
            Self::MalformedCsr => "malformed_csr",
            Self::ReviewUnavailable => "token_review_unavailable",
            Self::NoIssuer => "no_issuer",
            Self::SignFailed => "sign_failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    result: &'static str,
}

/// The service's metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    certify: Family<OutcomeLabels, Counter>,
    pub(crate) issuer_reloads: Family<OutcomeLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "identity_certify_requests",
            "Certify calls, by result (ok, or the reason for a refusal)",
            self.certify.clone(),
        );
        registry.register(
            "identity_issuer_reloads",
            "Issuer Secret loads, by result",
            self.issuer_reloads.clone(),
        );
    }
}

/// The identity rules of one control plane.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust_domain: String,
    pub control_plane_namespace: String,
    pub leaf_lifetime: Duration,
    /// The audience tokens must be issued for (checked cheaply before the TokenReview too);
    /// `None` accepts any.
    pub token_audience: Option<String>,
}

/// The Certify service.
#[derive(Debug)]
pub struct Identity<A> {
    settings: Settings,
    issuer: IssuerStore,
    auth: A,
    metrics: Metrics,
}

impl<A: Authenticator> Identity<A> {
    pub fn new(settings: Settings, issuer: IssuerStore, auth: A, metrics: Metrics) -> Self {
        Self {
            settings,
            issuer,
            auth,
            metrics,
        }
    }

    /// The tonic service to serve.
    pub fn into_service(self) -> identity_server::IdentityServer<Self> {
        // A CSR and a token are a few KiB; nothing legitimate comes near this.
        identity_server::IdentityServer::new(self).max_decoding_message_size(64 * 1024)
    }

    async fn certify_inner(
        &self,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, (Outcome, Status)> {
        let requested = Id::parse(&req.identity).map_err(|e| {
            (
                Outcome::InvalidIdentity,
                Status::invalid_argument(format!("identity: {e}")),
            )
        })?;
        let token = String::from_utf8(req.token)
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        if token.is_empty() {
            return Err((
                Outcome::NoToken,
                Status::invalid_argument("no ServiceAccount token in the request"),
            ));
        }
        // Garbage is refused before it costs a TokenReview (the token is never logged).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(why) = token::precheck(&token, self.settings.token_audience.as_deref(), now) {
            return Err((
                Outcome::MalformedToken,
                Status::unauthenticated(format!("bad token: {why}")),
            ));
        }
        let (namespace, sa) = match self.auth.review(token).await {
            Ok(Reviewed::ServiceAccount { namespace, name }) => (namespace, name),
            Ok(Reviewed::Other(user)) => {
                return Err((
                    Outcome::NotServiceAccount,
                    Status::permission_denied(format!(
                        "the token belongs to {user:?}, not to a ServiceAccount"
                    )),
                ));
            }
            Ok(Reviewed::Refused(why)) => {
                return Err((
                    Outcome::BadToken,
                    Status::unauthenticated(format!("bad token: {why}")),
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "TokenReview failed");
                return Err((
                    Outcome::ReviewUnavailable,
                    Status::unavailable("the token could not be reviewed; try again"),
                ));
            }
        };
        let expected = Id::service_account(
            &sa,
            &namespace,
            &self.settings.control_plane_namespace,
            &self.settings.trust_domain,
        )
        .map_err(|e| {
            (
                Outcome::IdentityMismatch,
                Status::permission_denied(format!("no identity for {namespace}/{sa}: {e}")),
            )
        })?;
        if expected != requested {
            return Err((
                Outcome::IdentityMismatch,
                Status::permission_denied(format!(
                    "identity mismatch: the token of ServiceAccount {namespace}/{sa} may only request {expected}, not {requested}"
                )),
            ));
        }
        let issuer = self.issuer.current().ok_or((
            Outcome::NoIssuer,
            Status::unavailable("no issuer loaded yet; try again"),
        ))?;
        let leaf = issuer
            .signer
            .sign_csr(
                &req.certificate_signing_request,
                &requested,
                self.settings.leaf_lifetime,
            )
            .map_err(|e| match e {
                CsrError::Sign(_) => (Outcome::SignFailed, Status::internal(e.to_string())),
                _ => (
                    Outcome::MalformedCsr,
                    Status::invalid_argument(format!("malformed CSR: {e}")),
                ),
            })?;
        Ok(CertifyResponse {
            leaf_certificate: leaf.der,
            intermediate_certificates: vec![issuer.signer.cert_der().to_vec()],
            valid_until: Some(prost_types::Timestamp::from(leaf.not_after)),
        })
    }
}

#[tonic::async_trait]
impl<A: Authenticator> identity_server::Identity for Identity<A> {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let identity = request.get_ref().identity.clone();
        let result = self.certify_inner(request.into_inner()).await;
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err((o, _)) => *o,
        };
        self.metrics
            .certify
            .get_or_create(&OutcomeLabels {
                result: outcome.as_str(),
            })
            .inc();
        match result {
            Ok(rsp) => {
                tracing::info!(%identity, "certified");
                Ok(Response::new(rsp))
            }
            Err((outcome, status)) => {
                tracing::info!(%identity, reason = outcome.as_str(), message = status.message(), "refused");
                Err(status)
            }
        }
    }
}

/// The identity service's own name, as clients check it.
pub fn service_id(
    service_account: &str,
    settings: &Settings,
) -> Result<Id, proxy_identity::InvalidId> {
    Id::service_account(
        service_account,
        &settings.control_plane_namespace,
        &settings.control_plane_namespace,
        &settings.trust_domain,
    )
}

#[cfg(test)]
mod tests;
