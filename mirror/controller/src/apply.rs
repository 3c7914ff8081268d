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

use k8s_openapi::{
    api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry,
};
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
///
/// Of the entries of managers that wrote with an update (Linkerd's service mirror does), only
/// the name and operation are kept: that such an entry exists is what starts a take-over (see
/// [`take_over_patch`]).
pub(crate) fn keep_own_fields<K: Resource>(obj: &mut K) {
    if let Some(fields) = obj.meta_mut().managed_fields.as_mut() {
        fields.retain(|f| f.manager.as_deref() == Some(FIELD_MANAGER) || is_taken_over(f));
        for f in fields.iter_mut() {
            f.time = None;
            f.api_version = None;
            f.fields_type = None;
            if f.manager.as_deref() != Some(FIELD_MANAGER) {
                f.fields_v1 = None;
            } else if let Some(v1) = f.fields_v1.as_mut() {
                v1.0 = Value::Array(owned_keys(&v1.0).into_iter().map(Value::String).collect());
            }
        }
    }
}

/// Whether a `managedFields` entry is one a take-over removes: another manager's update of the
/// object itself (not of a subresource such as `status`). Another manager's *apply* declares
/// what it wants to co-own, and is left alone.
fn is_taken_over(f: &ManagedFieldsEntry) -> bool {
    f.manager.as_deref() != Some(FIELD_MANAGER)
        && f.operation.as_deref() == Some("Update")
        && f.subresource.as_deref().unwrap_or_default().is_empty()
}

/// Whether `obj` has fields another manager wrote with an update.
fn has_taken_over_entries<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .any(is_taken_over)
}

/// Fields of a Service the API server sets itself (allocations and defaults). A take-over leaves
/// them without an owner rather than making them this controller's: an apply without them must
/// not try to remove them.
const SERVER_SET: &[&str] = &[
    "f:clusterIP",
    "f:clusterIPs",
    "f:ipFamilies",
    "f:ipFamilyPolicy",
    "f:internalTrafficPolicy",
    "f:sessionAffinity",
];

/// The merge patch that makes `manager` the owner (as an apply) of every field that other
/// managers wrote with an update (see [`is_taken_over`]) on `obj`, and removes their entries;
/// `None` when there are none.
///
/// Why this and not a replacement: a mirror first written by another manager (Linkerd's service
/// mirror writes with updates, as `service-mirror`) must end up exactly as this controller's
/// apply says. Server-side apply removes a field only when the applier owned it and no longer
/// applies it; fields only another manager owns stay (an extra port, a label, a
/// `local-discovery` annotation), and clearing that manager's entry alone would leave them
/// ownerless, which keeps them too. So their ownership moves to this controller's apply entry
/// (as `kubectl`'s client-side-to-server-side upgrade does), and the apply that follows removes
/// what it does not want. A PUT of the desired object would make the content right once, but
/// leave the other manager co-owning the fields it had, so a port later dropped from the remote
/// would stay. The object's resourceVersion in the patch makes it fail, rather than lose a
/// write, if the object changed since it was read.
pub(crate) fn take_over_patch(obj: &Value, manager: &str) -> Option<Value> {
    let entries = obj.pointer("/metadata/managedFields")?.as_array()?;
    let taken: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            serde_json::from_value::<ManagedFieldsEntry>((*e).clone())
                .is_ok_and(|f| is_taken_over(&f))
        })
        .collect();
    if taken.is_empty() {
        return None;
    }
    let is_my_apply = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
            && e.get("subresource")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
    };
    let mut mine = entries
        .iter()
        .find(|e| is_my_apply(e))
        .cloned()
        .unwrap_or_else(|| {
            serde_json::json!({
                "manager": manager,
                "operation": "Apply",
                "apiVersion": obj.get("apiVersion").cloned().unwrap_or(Value::from("v1")),
                "fieldsType": "FieldsV1",
                "fieldsV1": {},
            })
        });
    let mut owned = mine
        .get("fieldsV1")
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    for t in &taken {
        let mut fields = t.get("fieldsV1").cloned().unwrap_or_default();
        if let Some(f) = fields.as_object_mut() {
            f.remove("f:status");
            if let Some(spec) = f.get_mut("f:spec").and_then(Value::as_object_mut) {
                for k in SERVER_SET {
                    spec.remove(*k);
                }
            }
        }
        merge_fields(&mut owned, &fields);
    }
    mine["fieldsV1"] = owned;
    let mut managed: Vec<Value> = entries
        .iter()
        .filter(|e| !is_my_apply(e) && !taken.contains(e))
        .cloned()
        .collect();
    managed.push(mine);
    Some(serde_json::json!({
        "metadata": {
            "resourceVersion": obj.pointer("/metadata/resourceVersion").cloned().unwrap_or_default(),
            "managedFields": managed,
        }
    }))
}

/// The union of two `fieldsV1` sets (trees of maps whose leaves are `{}`).
fn merge_fields(into: &mut Value, from: &Value) {
    let (Value::Object(into), Value::Object(from)) = (into, from) else {
        return;
    };
    for (k, v) in from {
        match into.get_mut(k) {
            Some(existing) => merge_fields(existing, v),
            None => {
                into.insert(k.clone(), v.clone());
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
        // Fields another manager wrote are taken over even when the content looks right: the
        // object must be this controller's alone, or a later apply could not remove them.
        let take_over = live.is_some_and(has_taken_over_entries);
        if let Some(live) = live
            && !take_over
            && !needs_apply(&d, &to_json(live), FIELD_MANAGER)
        {
            return Ok(None);
        }
        if let Some(refused) = self.gate(kind, &ns, &name) {
            return Err(refused);
        }
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        if take_over {
            self.take_over(&api, kind, &ns, &name).await?;
        }
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

    /// Moves what other managers wrote on `ns/name` to this controller (see
    /// [`take_over_patch`]), from the object as it is now.
    async fn take_over<K>(
        &self,
        api: &Api<K>,
        kind: &'static str,
        ns: &str,
        name: &str,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Serialize + DeserializeOwned,
    {
        let timeout = || Error::Timeout {
            kind,
            namespace: ns.to_owned(),
            name: name.to_owned(),
        };
        let current = tokio::time::timeout(CALL_DEADLINE, api.get(name))
            .await
            .map_err(|_| timeout())?
            .map_err(|source| Error::Read {
                kind,
                namespace: ns.to_owned(),
                name: name.to_owned(),
                source,
            })?;
        let Some(patch) = take_over_patch(&to_json(&current), FIELD_MANAGER) else {
            return Ok(());
        };
        if let Some(refused) = self.gate(kind, ns, name) {
            return Err(refused);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        tokio::time::timeout(
            CALL_DEADLINE,
            api.patch(name, &params, &Patch::Merge(&patch)),
        )
        .await
        .map_err(|_| timeout())?
        .map_err(|source| Error::Write {
            kind,
            namespace: ns.to_owned(),
            name: name.to_owned(),
            source,
        })?;
        self.count(kind, "take_over");
        tracing::info!(kind, namespace = %ns, %name, "took over the fields another manager wrote");
        Ok(())
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
                    { "manager": "other-controller", "operation": "Apply", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:metadata": { "f:labels": { "f:b": {} } } } },
                ],
            },
        }))
        .unwrap();
        keep_own_fields(&mut svc);
        let fields = svc.metadata.managed_fields.clone().unwrap();
        assert_eq!(fields.len(), 1, "other managers' applies are dropped");
        assert_eq!(fields[0].fields_v1.as_ref().unwrap().0, json!(["labels/a"]));
        assert!(!has_taken_over_entries(&svc));
        let live = serde_json::to_value(&svc).unwrap();
        // Label `a` is ours: dropping it needs an apply; `b` is kubectl's: not ours to drop.
        let without_a = json!({ "metadata": { "labels": { "b": "2" } } });
        assert!(needs_apply(&without_a, &live, FIELD_MANAGER));
        let with_a = json!({ "metadata": { "labels": { "a": "1" } } });
        assert!(!needs_apply(&with_a, &live, FIELD_MANAGER));
    }
}

#[cfg(test)]
mod take_over {
    use serde_json::json;

    use super::*;

    /// A mirror Linkerd's service mirror created (an update, with defaults the server set), to
    /// which meshlink's apply has since added a label.
    fn linkerd_made() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "web-east",
                "resourceVersion": "42",
                "managedFields": [
                    { "manager": "service-mirror", "operation": "Update", "apiVersion": "v1", "fieldsType": "FieldsV1",
                      "fieldsV1": {
                        "f:metadata": { "f:labels": { "f:app": {}, "f:linkerd-only": {} } },
                        "f:spec": {
                            "f:clusterIP": {}, "f:sessionAffinity": {}, "f:type": {},
                            "f:ports": { ".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {}, "k:{\"port\":9999,\"protocol\":\"TCP\"}": {} },
                        },
                      } },
                    { "manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:metadata": { "f:labels": { "f:mine": {} } } } },
                    { "manager": "lb-controller", "operation": "Update", "subresource": "status", "apiVersion": "v1", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:status": { "f:loadBalancer": {} } } },
                    { "manager": "other-controller", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
                      "fieldsV1": { "f:metadata": { "f:labels": { "f:theirs": {} } } } },
                ],
            },
        })
    }

    #[test]
    fn updates_by_other_managers_become_this_controllers_apply() {
        let patch = take_over_patch(&linkerd_made(), FIELD_MANAGER).expect("a take-over");
        assert_eq!(
            patch["metadata"]["resourceVersion"], "42",
            "fails if the object changed"
        );
        let managed = patch["metadata"]["managedFields"].as_array().unwrap();
        let managers: Vec<&str> = managed
            .iter()
            .map(|e| e["manager"].as_str().unwrap())
            .collect();
        // The update's entry is gone; a status writer and another applier are left alone.
        assert_eq!(
            managers,
            ["lb-controller", "other-controller", FIELD_MANAGER]
        );
        let mine = &managed[2];
        assert_eq!(mine["operation"], "Apply");
        let labels = mine["fieldsV1"]["f:metadata"]["f:labels"]
            .as_object()
            .unwrap();
        let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
        assert_eq!(keys, ["f:app", "f:linkerd-only", "f:mine"]);
        let spec = mine["fieldsV1"]["f:spec"].as_object().unwrap();
        assert!(
            spec["f:ports"]
                .as_object()
                .unwrap()
                .contains_key("k:{\"port\":9999,\"protocol\":\"TCP\"}")
        );
        // What the API server allocated or defaulted is nobody's: an apply leaves it be.
        assert!(!spec.contains_key("f:clusterIP") && !spec.contains_key("f:sessionAffinity"));
        assert!(spec.contains_key("f:type"));
    }

    #[test]
    fn a_first_take_over_makes_the_apply_entry() {
        let mut obj = linkerd_made();
        let entries = obj["metadata"]["managedFields"].as_array_mut().unwrap();
        entries.retain(|e| e["manager"] != FIELD_MANAGER);
        let patch = take_over_patch(&obj, FIELD_MANAGER).expect("a take-over");
        let managed = patch["metadata"]["managedFields"].as_array().unwrap();
        let mine = managed.last().unwrap();
        assert_eq!(
            (mine["manager"].as_str(), mine["operation"].as_str()),
            (Some(FIELD_MANAGER), Some("Apply"))
        );
        assert_eq!(mine["apiVersion"], "v1");
        assert!(mine["fieldsV1"]["f:metadata"]["f:labels"]["f:linkerd-only"].is_object());
    }

    #[test]
    fn nothing_to_take_over() {
        let mut obj = linkerd_made();
        let entries = obj["metadata"]["managedFields"].as_array_mut().unwrap();
        entries.retain(|e| e["manager"] != "service-mirror");
        assert_eq!(take_over_patch(&obj, FIELD_MANAGER), None);
        assert_eq!(
            take_over_patch(&json!({ "metadata": {} }), FIELD_MANAGER),
            None
        );
    }

    #[test]
    fn a_stored_object_remembers_that_another_manager_updated_it() {
        let mut svc: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(linkerd_made()).unwrap();
        keep_own_fields(&mut svc);
        assert!(has_taken_over_entries(&svc));
        let kept: Vec<(&str, bool)> = svc
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .map(|f| {
                (
                    f.manager.as_deref().unwrap_or_default(),
                    f.fields_v1.is_some(),
                )
            })
            .collect();
        // Of the update, its name only; of the status writer and the other applier, nothing.
        assert_eq!(kept, [("service-mirror", false), (FIELD_MANAGER, true)]);
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
