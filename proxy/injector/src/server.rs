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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use kube::runtime::watcher;
    use serde_json::json;
    use tower_service::Service;

    use super::*;

    const ANCHOR: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    /// A webhook whose namespace cache holds `shop` (annotated for injection), and whose API
    /// client is kube's mock service: a test that reached the API server would hang, so these
    /// requests are answered from the cache alone.
    fn webhook(dir: &std::path::Path) -> (Webhook, Metrics) {
        let anchors = dir.join("anchors.pem");
        std::fs::write(&anchors, ANCHOR).unwrap();
        let (store, mut writer) = kube::runtime::reflector::store::<Namespace>();
        let shop: Namespace = serde_json::from_value(json!({
            "metadata": { "name": "shop", "annotations": { "linkerd.io/inject": "enabled" } },
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(shop));
        let (mock, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(mock, "default");
        let settings = <ConfigArgs as clap::FromArgMatches>::from_arg_matches(
            &<ConfigArgs as clap::Args>::augment_args(clap::Command::new("t"))
                .get_matches_from(["t"]),
        )
        .unwrap();
        let metrics = Metrics::default();
        (
            Webhook::new(settings, anchors, store, Api::all(client), metrics.clone()),
            metrics,
        )
    }

    fn review(namespace: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {},
                "object": { "apiVersion": "v1", "kind": "Pod", "metadata": { "generateName": "web-" },
                            "spec": { "containers": [{ "name": "web", "image": "web" }] } },
            }
        }))
        .unwrap()
    }

    async fn call(w: &mut Webhook, method: Method, body: Vec<u8>) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri("/")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let rsp = w.call(req).await.unwrap();
        let status = rsp.status();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn answers_reviews_and_refuses_everything_else() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, metrics) = webhook(dir.path());

        let (status, body) = call(&mut w, Method::POST, review("shop")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "u1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");

        let (status, _) = call(&mut w, Method::GET, Vec::new()).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, body) = call(&mut w, Method::POST, b"{not json".to_vec()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("not an AdmissionReview"), "{body}");
        // A body over the limit is refused without being read whole.
        let (status, body) = call(&mut w, Method::POST, vec![b' '; MAX_BODY + 1]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("reading the body"), "{body}");

        let mut text = String::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("injector_pods_total{outcome=\"injected\",reason=\"injected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("injector_request_errors_total{error=\"malformed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("injector_request_errors_total{error=\"body\"} 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_broken_anchor_file_is_a_server_error_that_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = webhook(dir.path());
        std::fs::write(dir.path().join("anchors.pem"), "not a certificate").unwrap();
        let (status, body) = call(&mut w, Method::POST, review("shop")).await;
        // The API server then applies failurePolicy; the injector says why in its answer.
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("trust_anchors_pem"), "{body}");
    }
}
