//! Writes with server-side apply, only when they would change something.
//!
//! A resync in which nothing changed must make no write at all. Comparing the desired object
//! with the live one is not enough on its own: other controllers add fields (the API server
//! defaults `protocol`, allocates `clusterIP`), and a key this controller stopped wanting must
//! still be removed. So an apply is needed exactly when the desired object is not contained in
//! the live one, or when the live object has a label or annotation this controller owns (per
//! `metadata.managedFields`) that the desired object no longer has.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, Resource,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    core::NamespaceResourceScope,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use link_crd::keys;

use crate::{
    desired::FIELD_MANAGER,
    metrics::{Metrics, WriteLabels},
};

/// Whether server-side applying `desired` as `manager` would change `live`.
pub fn needs_apply(desired: &Value, live: &Value, manager: &str) -> bool {
    !contains(live, desired) || owns_dropped_keys(desired, live, manager)
}

/// Whether every field of `want` is in `have` with the same value. Lists are compared whole
/// (they are owned whole: ports, subsets, endpoints), maps key by key; absent, `null`, `[]` and
/// `{}` are the same thing (the API server omits empty lists).
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (_, w) if is_empty(w) => is_empty(have),
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| contains(h.get(k).unwrap_or(&Value::Null), wv)),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| contains(hv, wv))
        }
        (h, w) => h == w,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Whether `live` has a label or annotation applied by `manager` that `desired` lacks.
fn owns_dropped_keys(desired: &Value, live: &Value, manager: &str) -> bool {
    let Some(entries) = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return false;
    };
    entries
        .iter()
        .filter(|e| {
            e.get("manager").and_then(Value::as_str) == Some(manager)
                && e.get("operation").and_then(Value::as_str) == Some("Apply")
        })
        .filter_map(|e| e.get("fieldsV1"))
        .flat_map(owned_keys)
        .any(|owned| {
            let Some((map, key)) = owned.split_once('/') else {
                return false;
            };
            !desired
                .pointer(&format!("/metadata/{map}"))
                .and_then(Value::as_object)
                .is_some_and(|w: &Map<String, Value>| w.contains_key(key))
        })
}

/// Keeps, of a local object's `managedFields`, only what [`needs_apply`] reads: this controller's
/// entries, and of those only the label and annotation keys, as a flat list of
/// `labels/<key>` and `annotations/<key>` strings in place of the `fieldsV1` tree.
///
/// Stored objects are only ever read (never written back), and the full tree (every other
/// manager, the field sets of ports, subsets and endpoints, one JSON map per level) was about half
/// of each stored mirror's memory: some 3.5 KB of 7 KB per object.
pub(crate) fn keep_own_fields<K: Resource>(obj: &mut K) {
    if let Some(fields) = obj.meta_mut().managed_fields.as_mut() {
        fields.retain(|f| f.manager.as_deref() == Some(FIELD_MANAGER));
        for f in fields.iter_mut() {
            f.time = None;
            f.api_version = None;
            f.fields_type = None;
            if let Some(v1) = f.fields_v1.as_mut() {
                v1.0 = Value::Array(owned_keys(&v1.0).into_iter().map(Value::String).collect());
            }
        }
    }
}

/// The label and annotation keys a `fieldsV1` tree (or its compact form) owns, as
/// `labels/<key>` and `annotations/<key>`.
fn owned_keys(fields: &Value) -> Vec<String> {
    if let Value::Array(compact) = fields {
        return compact
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
    }
    let mut owned = Vec::new();
    for map in ["labels", "annotations"] {
        let keys = fields
            .pointer(&format!("/f:metadata/f:{map}"))
            .and_then(Value::as_object);
        owned.extend(
            keys.into_iter()
                .flat_map(|k| k.keys())
                .filter_map(|k| Some(format!("{map}/{}", k.strip_prefix("f:")?))),
        );
    }
    owned
}

/// Per object (kind, namespace, name): the body last applied and the resourceVersion it got.
type InFlight = HashMap<(&'static str, String, String), (u64, Option<String>)>;

/// A write failed; the key is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("writing {kind} {namespace}/{name}: {source}")]
    Write {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("not writing {kind} {namespace}/{name}: this replica does not hold the Lease")]
    NotLeader {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("calling the API for {kind} {namespace}/{name}: no answer within {CALL_DEADLINE:?}")]
    Timeout {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("deleting {kind} {namespace}/{name}: {source}")]
    Delete {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// The metric label of this kind of failure.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Self::Write { .. } => "write",
            Self::Read { .. } => "read",
            Self::NotLeader { .. } => "not_leader",
            Self::Timeout { .. } => "timeout",
            Self::Delete { .. } => "delete",
        }
    }
}

/// Writes local objects with server-side apply as [`FIELD_MANAGER`], skipping writes that would
/// change nothing, and counts every call.
pub(crate) struct Writer {
    client: Client,
    metrics: Arc<Metrics>,
    /// The `target_cluster_name` label of the write metrics ("" for federated Services).
    cluster: String,
    /// What was last applied to each object, and the resourceVersion the API server gave it,
    /// until the local watch delivers that version. Between the write and its watch event the
    /// store still shows the old object (or none); without this, every trigger in that window
    /// would write the same thing again.
    in_flight: Mutex<InFlight>,
    /// Checked before every call: only the Lease holder writes.
    claim: crate::leader::Claim,
}

/// How long one API call may take before it counts as failed (and is retried with backoff):
/// kube's default read timeout is 295 s, far longer than a Lease.
pub(crate) const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl Writer {
    pub(crate) fn new(
        client: Client,
        metrics: Arc<Metrics>,
        cluster: String,
        claim: crate::leader::Claim,
    ) -> Self {
        Self {
            client,
            metrics,
            cluster,
            in_flight: Mutex::new(HashMap::new()),
            claim,
        }
    }

    /// The refusal of a write when this replica does not hold the Lease (`None`: it does).
    fn gate(&self, kind: &'static str, namespace: &str, name: &str) -> Option<Error> {
        (!self.claim.holds()).then(|| Error::NotLeader {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    fn flights(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every write in flight: after a relist the stores are the truth again.
    pub(crate) fn forget_in_flight(&self) {
        self.flights().clear();
    }

    /// Applies `desired` unless `live` already says the same; returns what the API server
    /// stored when it wrote.
    pub(crate) async fn apply<K>(
        &self,
        kind: &'static str,
        desired: &K,
        live: Option<&K>,
    ) -> Result<Option<K>, Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + Serialize
            + DeserializeOwned,
    {
        let ns = desired.meta().namespace.clone().unwrap_or_default();
        let name = desired.meta().name.clone().unwrap_or_default();
        let d = to_json(desired);
        let digest = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            d.to_string().hash(&mut h);
            h.finish()
        };
        let id = (kind, ns.clone(), name.clone());
        let live_rv = live.and_then(|l| l.meta().resource_version.clone());
        let flight = self.flights().get(&id).cloned();
        match flight {
            // The store has caught up with the last write: compare with it from now on.
            Some((_, rv)) if live_rv.is_some() && rv == live_rv => {
                self.flights().remove(&id);
            }
            // The same write is on its way to the store.
            Some((written, _)) if written == digest => return Ok(None),
            _ => {}
        }
        if let Some(live) = live
            && !needs_apply(&d, &to_json(live), FIELD_MANAGER)
        {
            return Ok(None);
        }
        if let Some(refused) = self.gate(kind, &ns, &name) {
            return Err(refused);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let (params, patch) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(desired),
        );
        let call = api.patch(&name, &params, &patch);
        let stored = tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .map_err(|_| Error::Timeout {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
            })?
            .map_err(|source| Error::Write {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
                source,
            })?;
        self.count(kind, "apply");
        tracing::debug!(kind, namespace = %ns, %name, "applied");
        self.flights()
            .insert(id, (digest, stored.meta().resource_version.clone()));
        Ok(Some(stored))
    }

    /// Deletes exactly `obj` (a uid precondition: a re-created namesake is someone else's).
    pub(crate) async fn delete<K>(&self, obj: &K, kind: &'static str) -> Result<(), Error>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + DeserializeOwned,
    {
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let name = obj.meta().name.clone().unwrap_or_default();
        self.flights().remove(&(kind, ns.clone(), name.clone()));
        if let Some(refused) = self.gate(kind, &ns, &name) {
            return Err(refused);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: obj.meta().uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let deleted = tokio::time::timeout(CALL_DEADLINE, api.delete(&name, &dp))
            .await
            .map_err(|_| Error::Timeout {
                kind,
                namespace: ns.clone(),
                name: name.clone(),
            })?;
        match deleted {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(source) => {
                return Err(Error::Delete {
                    kind,
                    namespace: ns,
                    name,
                    source,
                });
            }
        }
        self.count(kind, "delete");
        tracing::info!(kind, namespace = %ns, %name, "deleted");
        Ok(())
    }

    /// Creates namespace `ns` for mirrors of `cluster` (`None`: for federated Services), labelled
    /// as Linkerd labels the namespaces it creates.
    pub(crate) async fn create_namespace(
        &self,
        ns: &str,
        cluster: Option<&str>,
    ) -> Result<(), Error> {
        let mut labels = serde_json::json!({ keys::MIRRORED_RESOURCE_LABEL: "true" });
        if let Some(c) = cluster {
            labels[keys::CLUSTER_NAME_LABEL] = c.into();
        }
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns, "labels": labels },
        }))
        .unwrap_or_default();
        if let Some(refused) = self.gate("Namespace", "", ns) {
            return Err(refused);
        }
        let api = Api::<Namespace>::all(self.client.clone());
        let (params, patch) = (PatchParams::apply(FIELD_MANAGER), Patch::Apply(&namespace));
        let call = api.patch(ns, &params, &patch);
        tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .map_err(|_| Error::Timeout {
                kind: "Namespace",
                namespace: String::new(),
                name: ns.to_owned(),
            })?
            .map_err(|source| Error::Write {
                kind: "Namespace",
                namespace: String::new(),
                name: ns.to_owned(),
                source,
            })?;
        self.count("Namespace", "apply");
        tracing::info!(namespace = %ns, "created namespace for mirrored Services");
        Ok(())
    }

    /// Counts one API write.
    pub(crate) fn count(&self, kind: &'static str, verb: &'static str) {
        self.metrics
            .writes
            .get_or_create(&WriteLabels {
                target_cluster_name: self.cluster.clone(),
                kind,
                verb,
            })
            .inc();
    }
}

fn to_json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ME: &str = "meshlink-service-mirror";

    fn live(labels: Value, managed: Value) -> Value {
        json!({
            "metadata": {
                "name": "web-east",
                "uid": "1234",
                "resourceVersion": "7",
                "labels": labels,
                "managedFields": managed,
            },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.12",
                "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
            },
        })
    }

    fn mine(labels: &[&str]) -> Value {
        let fields: Map<String, Value> = labels
            .iter()
            .map(|l| (format!("f:{l}"), json!({})))
            .collect();
        json!([{ "manager": ME, "operation": "Apply", "fieldsV1": { "f:metadata": { "f:labels": fields } } }])
    }

    fn desired(labels: Value) -> Value {
        json!({
            "metadata": { "name": "web-east", "labels": labels },
            "spec": { "type": "ClusterIP", "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
        })
    }

    #[test]
    fn decisions() {
        let cases = [
            (
                "unchanged: server defaults and allocations do not count",
                desired(json!({"app": "web"})),
                live(json!({"app": "web"}), mine(&["app"])),
                false,
            ),
            (
                "another controller's label is left alone",
                desired(json!({"app": "web"})),
                live(json!({"app": "web", "owner": "ops"}), mine(&["app"])),
                false,
            ),
            (
                "a changed label",
                desired(json!({"app": "api"})),
                live(json!({"app": "web"}), mine(&["app"])),
                true,
            ),
            (
                "a new label",
                desired(json!({"app": "web", "tier": "front"})),
                live(json!({"app": "web"}), mine(&["app"])),
                true,
            ),
            (
                "a label this controller applied and no longer wants",
                desired(json!({"app": "web"})),
                live(
                    json!({"app": "web", "tier": "front"}),
                    mine(&["app", "tier"]),
                ),
                true,
            ),
            (
                "someone else's Apply of the same key does not count as ours",
                desired(json!({"app": "web"})),
                live(
                    json!({"app": "web", "tier": "front"}),
                    json!([{ "manager": "kubectl", "operation": "Apply", "fieldsV1": { "f:metadata": { "f:labels": { "f:tier": {} } } } }]),
                ),
                false,
            ),
        ];
        for (what, d, l, want) in cases {
            assert_eq!(needs_apply(&d, &l, ME), want, "{what}");
        }
    }

    #[test]
    fn lists_are_compared_whole() {
        let l = live(json!({}), json!([]));
        let mut d = desired(json!({}));
        d["spec"]["ports"] = json!([
            { "name": "http", "port": 80, "targetPort": 8080 },
            { "name": "grpc", "port": 90 },
        ]);
        assert!(needs_apply(&d, &l, ME), "an added port");
        d["spec"]["ports"] = json!([]);
        assert!(needs_apply(&d, &l, ME), "all ports removed");
        d["spec"]["ports"] = json!([{ "name": "http", "port": 81, "targetPort": 8080 }]);
        assert!(needs_apply(&d, &l, ME), "a changed port");
    }

    #[test]
    fn empty_equals_absent() {
        let d = json!({ "subsets": [] , "metadata": { "annotations": {} } });
        let l = json!({ "metadata": { "name": "x" } });
        assert!(!needs_apply(&d, &l, ME));
        let l = json!({ "subsets": [{ "addresses": [{ "ip": "192.0.2.1" }] }] });
        assert!(needs_apply(&d, &l, ME), "subsets must be emptied");
    }

    #[test]
    fn pruned_managed_fields_still_tell_which_keys_are_ours() {
        let mut svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {
                "name": "web-east",
                "labels": { "a": "1", "b": "2" },
                "managedFields": [
                    { "manager": FIELD_MANAGER, "operation": "Apply", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:metadata": { "f:labels": { "f:a": {} }, "f:name": {} },
                                    "f:spec": { "f:ports": { "k:{\"port\":80}": {} } } } },
                    { "manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:metadata": { "f:labels": { "f:b": {} } } } },
                ],
            },
        }))
        .unwrap();
        keep_own_fields(&mut svc);
        let fields = svc.metadata.managed_fields.clone().unwrap();
        assert_eq!(fields.len(), 1, "other managers' entries are dropped");
        assert_eq!(fields[0].fields_v1.as_ref().unwrap().0, json!(["labels/a"]));
        let live = serde_json::to_value(&svc).unwrap();
        // Label `a` is ours: dropping it needs an apply; `b` is kubectl's: not ours to drop.
        let without_a = json!({ "metadata": { "labels": { "b": "2" } } });
        assert!(needs_apply(&without_a, &live, FIELD_MANAGER));
        let with_a = json!({ "metadata": { "labels": { "a": "1" } } });
        assert!(!needs_apply(&with_a, &live, FIELD_MANAGER));
    }
}

/// The writer's API edge cases against kube's mock service (`tower_test`): what it sends, and
/// what it makes of the API server's answers.
#[cfg(test)]
mod mock {
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::Service;
    use kube::client::Body;

    use super::*;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn writer(claim: crate::leader::Claim) -> (Writer, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let metrics = Arc::new(Metrics::default());
        (Writer::new(client, metrics, "east".into(), claim), handle)
    }

    fn mirror() -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "web-east", "namespace": "shop", "uid": "u-1" },
            "spec": { "ports": [{ "port": 80 }] },
        }))
        .unwrap()
    }

    fn status(code: u16) -> Response<Body> {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "x", "message": "x", "code": code,
        });
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    }

    #[tokio::test]
    async fn without_the_lease_nothing_is_sent() {
        let (w, mut handle) = writer(crate::leader::Claim::default());
        // The mock never answers: a call that went out would hang here.
        let at_once = std::time::Duration::from_secs(5);
        let err = tokio::time::timeout(at_once, w.apply("Service", &mirror(), None))
            .await
            .expect("refused at once, without a call")
            .unwrap_err();
        assert!(matches!(err, Error::NotLeader { .. }), "{err}");
        let err = tokio::time::timeout(at_once, w.delete(&mirror(), "Service"))
            .await
            .expect("refused at once, without a call")
            .unwrap_err();
        assert_eq!(err.metric_label(), "not_leader");
        // The mock saw no request at all.
        drop(w);
        assert!(handle.next_request().await.is_none());
    }

    #[tokio::test]
    async fn deletes_are_exact_and_a_gone_or_replaced_object_is_done() {
        for (code, ok) in [(404, true), (409, true), (500, false)] {
            let (w, mut handle) = writer(crate::leader::Claim::always());
            let server = tokio::spawn(async move {
                let (req, send) = handle.next_request().await.expect("a request");
                assert_eq!(req.method(), http::Method::DELETE);
                assert_eq!(
                    req.uri().path(),
                    "/api/v1/namespaces/shop/services/web-east"
                );
                // The uid precondition: a re-created namesake is never deleted.
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["preconditions"]["uid"], "u-1");
                send.send_response(status(code));
            });
            let result = w.delete(&mirror(), "Service").await;
            server.await.unwrap();
            assert_eq!(result.is_ok(), ok, "{code}: {result:?}");
        }
    }

    #[tokio::test]
    async fn a_conflicting_apply_is_an_error_to_retry() {
        let (w, mut handle) = writer(crate::leader::Claim::always());
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), http::Method::PATCH);
            assert!(
                req.uri()
                    .query()
                    .unwrap_or_default()
                    .contains("fieldManager=")
            );
            assert!(req.uri().query().unwrap_or_default().contains("force=true"));
            send.send_response(status(409));
        });
        let err = w.apply("Service", &mirror(), None).await.unwrap_err();
        server.await.unwrap();
        assert_eq!(err.metric_label(), "write");
    }
}
