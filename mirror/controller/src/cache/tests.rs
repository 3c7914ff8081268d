use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::*;
use crate::{
    apply::needs_apply,
    desired::{self, FIELD_MANAGER, Gateway, Mode, tests::target},
};

fn remote() -> Service {
    serde_json::from_value(json!({
        "metadata": {
            "name": "web", "namespace": "shop", "resourceVersion": "4711", "uid": "r-1",
            "labels": { "app": "web", "mirror.linkerd.io/exported": "true" },
            "annotations": {
                "config.linkerd.io/opaque-ports": "5432",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"a\":\"big copy\"}",
            },
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": "None", "selector": { "app": "web" },
            "ports": [
                { "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP" },
                { "name": "grpc", "port": 9090, "targetPort": "grpc", "protocol": "TCP" },
            ],
        },
    }))
    .unwrap()
}

/// The `fieldsV1` tree of a label/annotation-only owner of `obj`'s metadata, and of its spec
/// as a whole (enough for `needs_apply` and for trimming to have work to do).
fn fields_of(obj: &Value) -> Value {
    let keys = |map: &str| -> Value {
        obj["metadata"][map]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| (format!("f:{k}"), json!({})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    json!({
        "f:metadata": { "f:labels": keys("labels"), "f:annotations": keys("annotations") },
        "f:spec": { ".": {}, "f:ports": { ".": {} } },
    })
}

/// `desired` as the API server stores it after an apply by this controller: with what the
/// server fills in (identity, times, defaults, allocations, status) and the managed fields of
/// this controller and of another manager.
fn as_stored(desired: &Value, kind: &str) -> Value {
    let mut live = desired.clone();
    let meta = &mut live["metadata"];
    meta["uid"] = json!("6a1c7e02-0d6c-4bb6-9c4f-2f7d9c1e7b10");
    meta["resourceVersion"] = json!("81234");
    meta["creationTimestamp"] = json!("2026-11-21T10:00:00Z");
    meta["managedFields"] = json!([
        {
            "manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": "v1",
            "time": "2026-11-21T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields_of(desired),
        },
        {
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
            "time": "2026-11-21T10:00:01Z", "fieldsType": "FieldsV1",
            "fieldsV1": { "f:metadata": { "f:labels": { "f:other": {} } } },
        },
    ]);
    match kind {
        "Service" => {
            let spec = &mut live["spec"];
            if spec.get("clusterIP").is_none() {
                spec["clusterIP"] = json!("10.96.3.4");
            }
            spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
            spec["ipFamilies"] = json!(["IPv4"]);
            spec["ipFamilyPolicy"] = json!("SingleStack");
            spec["internalTrafficPolicy"] = json!("Cluster");
            spec["sessionAffinity"] = json!("None");
            live["status"] = json!({ "loadBalancer": {} });
        }
        "EndpointSlice" => live["metadata"]["generation"] = json!(3),
        _ => {}
    }
    live
}

/// Every kind of object a mirror is made of, as the desired builders make them.
fn desired_objects() -> Vec<(&'static str, Value)> {
    let (t, r) = (target(), remote());
    let gateway = Gateway {
        addresses: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10)),
        ],
        port: 4143,
        alive: true,
    };
    let mirror = desired::mirror_service(&t, &r, Mode::Gateway).unwrap();
    let root = desired::headless_mirror_service(&t, &r).unwrap();
    let pod = desired::endpoint_mirror_service(&t, &r, "web-east", "web-0", "17").unwrap();
    let (pod_ep, pod_slices) = desired::endpoint_mirror_endpoints(&t, &r, &pod, &gateway);
    let pods = [("web-0".to_owned(), IpAddr::V4(Ipv4Addr::new(10, 96, 7, 7)))];
    let ports = [(Some("http".to_owned()), Some(8080), Some("TCP".to_owned()))];
    let (root_ep, root_slices) = desired::headless_endpoints(&t, &r, &root, &pods, &ports, true);

    let mut all = vec![
        ("Service", v(&mirror)),
        ("Service", v(&root)),
        ("Service", v(&pod)),
        (
            "Endpoints",
            v(&desired::gateway_endpoints(&t, &r, &mirror, true, &gateway)),
        ),
        ("Endpoints", v(&pod_ep)),
        ("Endpoints", v(&root_ep)),
    ];
    let slices = desired::gateway_slices(&t, &r, &mirror, true, &gateway);
    assert_eq!(slices.len(), 2, "both families");
    for s in slices.iter().chain(&pod_slices).chain(&root_slices) {
        all.push(("EndpointSlice", v(s)));
    }
    all
}

fn v<T: Serialize>(obj: &T) -> Value {
    serde_json::to_value(obj).unwrap()
}

/// `live` decoded as `K`, trimmed, kept in a cache and read back, as JSON.
fn kept<K>(live: &Value, trim: fn(&mut K)) -> Value
where
    K: Resource + Serialize + DeserializeOwned,
{
    let mut obj: K = serde_json::from_value(live.clone()).unwrap();
    trim(&mut obj);
    let cache = Cache::<K>::new(|_| None);
    cache.apply(&watcher::Event::Apply(obj));
    let ns = live["metadata"]["namespace"].as_str().unwrap();
    let name = live["metadata"]["name"].as_str().unwrap();
    serde_json::to_value(cache.get(ns, name).expect("kept")).unwrap()
}

fn kept_as(kind: &str, live: &Value) -> Value {
    match kind {
        "Service" => kept(live, trim_service),
        "Endpoints" => kept(live, trim_endpoints),
        "EndpointSlice" => kept(live, trim_slice),
        other => panic!("no trim for {other}"),
    }
}

#[test]
fn trimmed_objects_decide_writes_as_whole_ones_do() {
    for (kind, desired) in desired_objects() {
        let name = desired["metadata"]["name"].clone();
        let live = as_stored(&desired, kind);
        let kept = kept_as(kind, &live);
        assert!(
            !needs_apply(&desired, &live, FIELD_MANAGER),
            "{kind} {name}: the stored object already says what is desired"
        );
        assert!(
            !needs_apply(&desired, &kept, FIELD_MANAGER),
            "{kind} {name}: trimming removed something the desired object sets:\n{kept:#}"
        );
        assert!(
            kept.to_string().len() < live.to_string().len(),
            "{kind} {name}: trimming removed nothing"
        );
        // What is read of kept objects survives.
        for path in [
            "/metadata/uid",
            "/metadata/resourceVersion",
            "/metadata/name",
        ] {
            assert_eq!(
                kept.pointer(path),
                live.pointer(path),
                "{kind} {name} {path}"
            );
        }
        if kind == "Service" {
            assert_eq!(kept["spec"]["clusterIP"], live["spec"]["clusterIP"]);
        }

        // A change to what is desired is still seen...
        let mut changed = desired.clone();
        changed["metadata"]["labels"]["app"] = json!("api");
        assert!(needs_apply(&changed, &kept, FIELD_MANAGER), "{kind} {name}");
        // ...and so is a key this controller stopped wanting, through the kept managed fields.
        let mut dropped = desired.clone();
        dropped["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("app");
        assert!(needs_apply(&dropped, &kept, FIELD_MANAGER), "{kind} {name}");
    }
}

#[test]
fn remote_services_keep_what_mirrors_copy() {
    let mut r = remote();
    trim_service(&mut r);
    let kept = serde_json::to_value(&r).unwrap();
    assert_eq!(kept["spec"]["selector"], Value::Null);
    assert_eq!(
        kept["metadata"]["annotations"],
        json!({ "config.linkerd.io/opaque-ports": "5432" }),
        "kubectl's copy is dropped, the rest kept"
    );
    let (t, whole) = (target(), remote());
    for mode in [Mode::Gateway, Mode::RemoteDiscovery] {
        assert_eq!(
            desired::mirror_service(&t, &r, mode).unwrap(),
            desired::mirror_service(&t, &whole, mode).unwrap()
        );
    }
    assert_eq!(
        desired::headless_mirror_service(&t, &r).unwrap(),
        desired::headless_mirror_service(&t, &whole).unwrap()
    );
}

fn service(name: &str, root: Option<&str>) -> Service {
    let mut labels = serde_json::Map::new();
    if let Some(root) = root {
        labels.insert(
            link_crd::keys::HEADLESS_MIRROR_SVC_NAME_LABEL.into(),
            root.into(),
        );
    }
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "shop", "labels": labels },
    }))
    .unwrap()
}

#[test]
fn a_relist_replaces_the_listing_only_when_complete() {
    let cache = Cache::<Service>::new(|s| {
        s.labels()
            .get(link_crd::keys::HEADLESS_MIRROR_SVC_NAME_LABEL)
            .cloned()
    });
    let names = |c: &Cache<Service>| {
        let mut k = c.keys();
        k.sort();
        k
    };
    let key =
        |n: &str, tag: Option<&str>| (("shop".to_owned(), n.to_owned()), tag.map(str::to_owned));
    cache.apply(&watcher::Event::Init);
    cache.apply(&watcher::Event::InitApply(service("a", None)));
    cache.apply(&watcher::Event::InitApply(service("b-0", Some("b"))));
    assert!(
        cache.keys().is_empty(),
        "nothing before the first listing ends"
    );
    cache.apply(&watcher::Event::InitDone);
    assert_eq!(names(&cache), [key("a", None), key("b-0", Some("b"))]);

    // A relist: the old listing stands until the new one is complete.
    cache.apply(&watcher::Event::Init);
    cache.apply(&watcher::Event::InitApply(service("c", None)));
    assert!(cache.get("shop", "a").is_some());
    assert!(cache.get("shop", "c").is_none());
    cache.apply(&watcher::Event::InitDone);
    assert_eq!(names(&cache), [key("c", None)]);

    cache.apply(&watcher::Event::Apply(service("d", None)));
    cache.apply(&watcher::Event::Delete(service("c", None)));
    assert_eq!(names(&cache), [key("d", None)]);
    assert_eq!(cache.get("shop", "d"), Some(service("d", None)));
    assert_eq!(cache.get("other", "d"), None);
}
