//! One admission decision: what the webhook answers for a Pod, from the request, the Pod's
//! namespace annotations and the injection settings. Pure; the server runs it.

use std::collections::BTreeMap;

use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use proxy_inject::{InjectConfig, Origin, Outcome, PodContext, inject_pod_spec};

/// What the webhook did with one request, for its logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The proxy was added.
    Injected,
    /// The Pod already had the proxy (`meshlink inject` output, or a second webhook round).
    AlreadyInjected,
    /// Admitted unchanged: `label` is a fixed name for metrics, `why` says it for people.
    Skipped { label: &'static str, why: String },
    /// Denied: the Pod asks for the proxy but something it says cannot be honoured (an
    /// invalid `config.linkerd.io/*` annotation, a container named like the proxy's).
    Refused { label: &'static str, why: String },
    /// Not a Pod being created (the webhook is registered for CREATE of Pods only; anything
    /// else is admitted unchanged).
    Ignored(&'static str),
}

impl Decision {
    /// A fixed name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Injected => "injected",
            Self::AlreadyInjected => "already_injected",
            Self::Skipped { label, .. } | Self::Refused { label, .. } => label,
            Self::Ignored(label) => label,
        }
    }
}

/// The answer to `req`. `namespace_annotations` are those of the Pod's namespace.
pub fn review(
    req: &AdmissionRequest<Pod>,
    namespace_annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> (AdmissionResponse, Decision) {
    let admit = AdmissionResponse::from(req);
    if req.operation != Operation::Create {
        return (admit, Decision::Ignored("not_create"));
    }
    let Some(original) = req.object.as_ref() else {
        return (admit, Decision::Ignored("no_object"));
    };
    let mut pod = original.clone();
    let Pod { metadata, spec, .. } = &mut pod;
    let Some(spec) = spec.as_mut() else {
        return (admit, Decision::Ignored("no_spec"));
    };
    // A Pod made by a controller has no namespace of its own yet; the request has it.
    let namespace = req.namespace.clone().or_else(|| metadata.namespace.clone());
    let owner = owner_of(metadata);
    let ctx = PodContext {
        origin: Origin::Webhook,
        owner: owner.as_ref().map(|(k, n)| (k.as_str(), n.as_str())),
        namespace: namespace.as_deref(),
        namespace_annotations,
    };
    match inject_pod_spec(&ctx, metadata, spec, config) {
        Ok(Outcome::Injected) => {
            let patched = serde_json::to_value(original)
                .and_then(|before| Ok(json_patch::diff(&before, &serde_json::to_value(&pod)?)))
                .map_err(|e| e.to_string())
                .and_then(|patch| admit.clone().with_patch(patch).map_err(|e| e.to_string()));
            match patched {
                Ok(response) => (response, Decision::Injected),
                Err(error) => {
                    let why = format!("the patch cannot be written: {error}");
                    (
                        admit.deny(&why),
                        Decision::Refused {
                            label: "serialize",
                            why,
                        },
                    )
                }
            }
        }
        Ok(Outcome::AlreadyInjected) => (admit, Decision::AlreadyInjected),
        Ok(Outcome::Skipped(reason)) => (
            admit,
            Decision::Skipped {
                label: reason.label(),
                why: reason.to_string(),
            },
        ),
        Err(error) => {
            let why = format!(
                "meshlink-injector cannot add the proxy: {error}; fix the Pod template, or annotate it linkerd.io/inject: disabled"
            );
            (
                admit.deny(&why),
                Decision::Refused {
                    label: error.label(),
                    why,
                },
            )
        }
    }
}

/// The workload a Pod belongs to, as Linkerd names it in the `linkerd.io/proxy-<kind>` label:
/// its controlling owner, and for a ReplicaSet made by a Deployment (it carries the
/// `pod-template-hash` label and is named `<deployment>-<hash>`), that Deployment.
fn owner_of(meta: &ObjectMeta) -> Option<(String, String)> {
    let owner = meta
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return Some(("Deployment".to_owned(), deployment.to_owned()));
    }
    Some((owner.kind.clone(), owner.name.clone()))
}

#[cfg(test)]
mod tests {
    use kube::core::admission::AdmissionReview;
    use proxy_inject::PROXY_CONTAINER_NAME;
    use serde_json::{Value, json};

    use super::*;

    const ANCHOR: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn config() -> InjectConfig {
        InjectConfig::new("linkerd", "cluster.local", "cluster.local", ANCHOR)
    }

    fn request(operation: &str, pod: Value) -> AdmissionRequest<Pod> {
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "3f0c",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "requestKind": { "group": "", "version": "v1", "kind": "Pod" },
                "requestResource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop",
                "operation": operation,
                "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
                "object": pod,
                "dryRun": false,
            }
        }))
        .unwrap();
        review.try_into().unwrap()
    }

    fn pod(annotations: Value, spec_extra: Value) -> Value {
        let mut spec = json!({ "containers": [{ "name": "web", "image": "web:1", "ports": [{ "containerPort": 8080 }] }] });
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
            spec.extend(extra.clone());
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "web-6d4b9c7f8d-",
                "annotations": annotations,
                "labels": { "app": "web", "pod-template-hash": "6d4b9c7f8d" },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-6d4b9c7f8d",
                    "uid": "1", "controller": true,
                }],
            },
            "spec": spec,
        })
    }

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The Pod the API server stores: the request's object with the response's patch applied.
    fn patched(req: &AdmissionRequest<Pod>, response: &AdmissionResponse) -> Value {
        let mut pod = serde_json::to_value(req.object.as_ref().unwrap()).unwrap();
        if let Some(patch) = &response.patch {
            let patch: json_patch::Patch = serde_json::from_slice(patch).unwrap();
            json_patch::patch(&mut pod, &patch).unwrap();
        }
        pod
    }

    fn containers(pod: &Value) -> Vec<&str> {
        pod["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn decisions() {
        let enabled = annotations(&[("linkerd.io/inject", "enabled")]);
        let none = BTreeMap::new();
        // (case, operation, pod annotations, spec extras, namespace annotations, decision label,
        // allowed, containers stored)
        type Case<'a> = (
            &'a str,
            &'a str,
            Value,
            Value,
            &'a BTreeMap<String, String>,
            &'a str,
            bool,
            &'a [&'a str],
        );
        let cases: &[Case<'_>] = &[
            (
                "namespace enabled",
                "CREATE",
                json!({}),
                json!({}),
                &enabled,
                "injected",
                true,
                &[PROXY_CONTAINER_NAME, "web"],
            ),
            (
                "template enabled",
                "CREATE",
                json!({ "linkerd.io/inject": "enabled" }),
                json!({}),
                &none,
                "injected",
                true,
                &[PROXY_CONTAINER_NAME, "web"],
            ),
            (
                "nothing enabled",
                "CREATE",
                json!({}),
                json!({}),
                &none,
                "injection_not_enabled",
                true,
                &["web"],
            ),
            (
                "template disabled in an enabled namespace",
                "CREATE",
                json!({ "linkerd.io/inject": "disabled" }),
                json!({}),
                &enabled,
                "injection_disabled",
                true,
                &["web"],
            ),
            (
                "host network",
                "CREATE",
                json!({}),
                json!({ "hostNetwork": true }),
                &enabled,
                "host_network",
                true,
                &["web"],
            ),
            (
                "invalid override",
                "CREATE",
                json!({ "config.linkerd.io/opaque-ports": "http-nope" }),
                json!({}),
                &enabled,
                "invalid_override",
                false,
                &["web"],
            ),
            (
                "an update",
                "UPDATE",
                json!({}),
                json!({}),
                &enabled,
                "not_create",
                true,
                &["web"],
            ),
        ];
        for (case, op, pod_annotations, extra, ns, label, allowed, stored) in cases {
            let req = request(op, pod(pod_annotations.clone(), extra.clone()));
            let (response, decision) = review(&req, ns, &config());
            assert_eq!(decision.label(), *label, "{case}: {decision:?}");
            assert_eq!(response.allowed, *allowed, "{case}");
            assert_eq!(response.uid, "3f0c", "{case}: the answer names the request");
            assert_eq!(containers(&patched(&req, &response)), *stored, "{case}");
            if !allowed {
                assert!(
                    response
                        .result
                        .message
                        .contains("config.linkerd.io/opaque-ports"),
                    "{case}: the denial names the annotation: {}",
                    response.result.message
                );
            }
        }
    }

    #[test]
    fn injected_pod_names_its_deployment_and_namespace() {
        let req = request("CREATE", pod(json!({}), json!({})));
        let ns = annotations(&[("linkerd.io/inject", "enabled")]);
        let (response, _) = review(&req, &ns, &config());
        let pod = patched(&req, &response);
        assert_eq!(
            pod["metadata"]["labels"]["linkerd.io/proxy-deployment"],
            "web"
        );
        assert_eq!(pod["metadata"]["labels"]["linkerd.io/workload-ns"], "shop");
        // The patch is exactly what the injector changed: a second review of the stored Pod
        // changes nothing.
        let again = request("CREATE", pod);
        let (response, decision) = review(&again, &ns, &config());
        assert_eq!(decision, Decision::AlreadyInjected);
        assert!(response.patch.is_none());
    }

    #[test]
    fn owners() {
        let meta = |kind: &str, name: &str, hash: Option<&str>| ObjectMeta {
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    kind: kind.to_owned(),
                    name: name.to_owned(),
                    controller: Some(true),
                    ..Default::default()
                },
            ]),
            labels: hash.map(|h| annotations(&[("pod-template-hash", h)])),
            ..Default::default()
        };
        let owned = |k: &str, n: &str| Some((k.to_owned(), n.to_owned()));
        assert_eq!(
            owner_of(&meta("ReplicaSet", "web-abc12", Some("abc12"))),
            owned("Deployment", "web")
        );
        // A ReplicaSet of its own (no template hash, or a name that does not end with it).
        assert_eq!(
            owner_of(&meta("ReplicaSet", "web", None)),
            owned("ReplicaSet", "web")
        );
        assert_eq!(
            owner_of(&meta("ReplicaSet", "web", Some("abc12"))),
            owned("ReplicaSet", "web")
        );
        assert_eq!(
            owner_of(&meta("StatefulSet", "db", None)),
            owned("StatefulSet", "db")
        );
        assert_eq!(owner_of(&ObjectMeta::default()), None);
    }
}
