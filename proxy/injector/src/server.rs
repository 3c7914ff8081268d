//! The webhook's HTTP side: an `AdmissionReview` in, the [`review`](crate::review) decision
//! out, each one logged with its fields and counted.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    core::admission::{AdmissionRequest, AdmissionReview},
    runtime::reflector::{ObjectRef, Store},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use proxy_inject::ConfigArgs;

use crate::review::{Decision, review};

/// The largest AdmissionReview read: a Pod of the API server's largest request (3 MiB) fits.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    reason: &'static str,
}

/// The webhook's metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pods: Family<DecisionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("injector");
        registry.register(
            "pods",
            "Pods the webhook was asked about, by outcome (injected, already_injected, skipped, refused, ignored) and reason",
            self.pods.clone(),
        );
        registry.register(
            "request_errors",
            "Requests the webhook could not answer (the API server then admits the Pod unchanged: failurePolicy Ignore)",
            self.errors.clone(),
        );
    }

    fn decided(&self, decision: &Decision) {
        let outcome = match decision {
            Decision::Injected => "injected",
            Decision::AlreadyInjected => "already_injected",
            Decision::Skipped { .. } => "skipped",
            Decision::Refused { .. } => "refused",
            Decision::Ignored(_) => "ignored",
        };
        self.pods
            .get_or_create(&DecisionLabels {
                outcome,
                reason: decision.label(),
            })
            .inc();
    }

    fn failed(&self, error: &'static str) {
        self.errors.get_or_create(&ErrorLabels { error }).inc();
    }
}

/// What each request needs.
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("trust_anchors_file", &self.inner.trust_anchors_file)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: ConfigArgs,
    trust_anchors_file: PathBuf,
    namespaces: Store<Namespace>,
    namespace_api: Api<Namespace>,
    metrics: Metrics,
}

impl Webhook {
    pub fn new(
        settings: ConfigArgs,
        trust_anchors_file: PathBuf,
        namespaces: Store<Namespace>,
        namespace_api: Api<Namespace>,
        metrics: Metrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                trust_anchors_file,
                namespaces,
                namespace_api,
                metrics,
            }),
        }
    }
}

type Body = Full<Bytes>;

fn plain(status: StatusCode, text: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(text)))
        .expect("a fixed status and header always build")
}

impl Inner {
    async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() != Method::POST {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST an AdmissionReview\n".into(),
            );
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(error) => {
                self.metrics.failed("body");
                tracing::warn!(%error, limit = MAX_BODY, "reading an AdmissionReview");
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("reading the body: {error}\n"),
                );
            }
        };
        let request: AdmissionRequest<Pod> =
            match serde_json::from_slice::<AdmissionReview<Pod>>(&body)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    r.try_into()
                        .map_err(|e: kube::core::admission::ConvertAdmissionReviewError| {
                            e.to_string()
                        })
                }) {
                Ok(r) => r,
                Err(error) => {
                    self.metrics.failed("malformed");
                    tracing::warn!(%error, "a request that is not an AdmissionReview of a Pod");
                    return plain(
                        StatusCode::BAD_REQUEST,
                        format!("not an AdmissionReview of a Pod: {error}\n"),
                    );
                }
            };
        // Read at each admission, so that a rotated bundle is injected without a restart.
        let config = match std::fs::read_to_string(&self.trust_anchors_file)
            .map_err(|e| {
                format!(
                    "reading the trust anchors {}: {e}",
                    self.trust_anchors_file.display()
                )
            })
            .and_then(|pem| self.settings.config(&pem).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(error) => {
                self.metrics.failed("config");
                tracing::error!(%error, "cannot inject: the injector's own configuration is broken");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"));
            }
        };
        let namespace = request.namespace.clone().unwrap_or_default();
        let annotations = match self.namespace_annotations(&namespace).await {
            Ok(a) => a,
            Err(error) => {
                self.metrics.failed("namespace");
                tracing::warn!(%namespace, %error, "reading the Pod's namespace");
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("reading namespace {namespace}: {error}\n"),
                );
            }
        };
        let (response, decision) = review(&request, &annotations, &config);
        self.metrics.decided(&decision);
        let pod = request
            .object
            .as_ref()
            .and_then(|p| {
                p.metadata
                    .name
                    .clone()
                    .or_else(|| p.metadata.generate_name.clone())
            })
            .unwrap_or_default();
        match &decision {
            Decision::Injected => {
                tracing::info!(%namespace, %pod, dry_run = request.dry_run, "injected the proxy")
            }
            Decision::Skipped { label, why } => {
                tracing::info!(%namespace, %pod, reason = %label, %why, "not injected");
            }
            Decision::Refused { label, why } => {
                tracing::warn!(%namespace, %pod, reason = %label, %why, "refused the Pod");
            }
            Decision::AlreadyInjected | Decision::Ignored(_) => {
                tracing::debug!(%namespace, %pod, decision = decision.label(), "admitted unchanged");
            }
        }
        match serde_json::to_vec(&response.into_review()) {
            Ok(json) => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(json)))
                .expect("a fixed header always builds"),
            Err(error) => {
                self.metrics.failed("serialize");
                plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
            }
        }
    }

    /// The namespace's annotations, from the watch's cache, or from the API server for a
    /// namespace created so recently that the watch has not brought it yet.
    async fn namespace_annotations(
        &self,
        name: &str,
    ) -> Result<BTreeMap<String, String>, kube::Error> {
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(name)) {
            return Ok(ns.metadata.annotations.clone().unwrap_or_default());
        }
        let ns = self.namespace_api.get(name).await?;
        Ok(ns.metadata.annotations.unwrap_or_default())
    }
}

impl<B> tower_service::Service<Request<B>> for Webhook
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move { Ok(inner.handle(req).await) })
    }
}
