//! Writes with server-side apply, only when they would change something.
//!
//! A resync in which nothing changed must make no write at all. Comparing the desired object
//! with the live one is not enough on its own: other controllers add fields (the API server
//! defaults `protocol`, allocates `clusterIP`), and a key this controller stopped wanting must
//! still be removed. So an apply is needed exactly when the desired object is not contained in
//! the live one, or when the live object has a label or annotation this controller owns (per
//! `metadata.managedFields`) that the desired object no longer has.

use serde_json::{Map, Value};

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
    let owned = entries.iter().filter(|e| {
        e.get("manager").and_then(Value::as_str) == Some(manager)
            && e.get("operation").and_then(Value::as_str) == Some("Apply")
    });
    for entry in owned {
        for map in ["labels", "annotations"] {
            let Some(keys) = entry
                .pointer(&format!("/fieldsV1/f:metadata/f:{map}"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            let wanted = desired
                .pointer(&format!("/metadata/{map}"))
                .and_then(Value::as_object);
            if keys
                .keys()
                .filter_map(|k| k.strip_prefix("f:"))
                .any(|k| !wanted.is_some_and(|w: &Map<String, Value>| w.contains_key(k)))
            {
                return true;
            }
        }
    }
    false
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
}
