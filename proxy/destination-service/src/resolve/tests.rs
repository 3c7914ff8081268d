//! Table tests: API objects in, answers out, for each kind of endpoint.

use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use linkerd2_proxy_api::destination::{protocol_hint, update};
use serde_json::{Value, json};

use super::*;
use crate::{
    index::{Cluster, RemoteSettings},
    model,
};

fn settings() -> Settings {
    Settings {
        cluster_domain: "cluster.local".into(),
        trust_domain: "west.example".into(),
        control_plane_ns: "linkerd".into(),
    }
}

fn obj<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

fn key(ns: &str, name: &str) -> Key {
    (ns.into(), name.into())
}

fn service(
    ns: &str,
    name: &str,
    ip: &str,
    ports: Value,
    annotations: Value,
    labels: Value,
) -> Service {
    obj(json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations, "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": ports},
    }))
}

/// A slice of `svc` whose endpoints are `(ip, pod, ready)`.
fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    ports: Value,
    eps: &[(&str, Option<&str>, bool)],
    annotations: Value,
) -> EndpointSlice {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(ip, pod, ready)| {
            let mut e = json!({"addresses": [ip], "conditions": {"ready": ready}});
            if let Some(pod) = pod {
                e["targetRef"] = json!({"kind": "Pod", "name": pod, "namespace": ns});
            }
            e
        })
        .collect();
    obj(json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations,
                     "labels": {"kubernetes.io/service-name": svc, "mirror.linkerd.io/cluster-name": "east"}},
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": endpoints,
    }))
}

fn pod(ns: &str, name: &str, ip: &str, sa: &str, meshed: bool, annotations: Value) -> Pod {
    let mut labels = json!({"pod-template-hash": "5d9f"});
    if meshed {
        labels["linkerd.io/control-plane-ns"] = json!("linkerd");
    }
    obj(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9f", "uid": "u", "controller": true}]},
        "spec": {"serviceAccountName": sa, "containers": [{"name": "app"}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"},
    }))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `shop/web` with two meshed pods and an un-meshed one, a named target port `http` -> 8080
/// and an opaque port `db` 5432; `shop/plain` with no pods behind its addresses.
fn cluster() -> Index {
    let mut idx = Index::default();
    idx.apply_namespace(
        "shop".into(),
        Some(model::namespace_info(&obj::<Namespace>(
            json!({"metadata": {"name": "shop"}}),
        ))),
    );
    idx.apply_service(
        key("shop", "web"),
        Some(model::service_info(&service(
            "shop",
            "web",
            "10.96.0.10",
            json!([{"name": "http", "port": 80, "targetPort": "http"}, {"name": "db", "port": 5432, "targetPort": 5432}]),
            json!({"config.linkerd.io/opaque-ports": "5432"}),
            json!({}),
        ))),
    );
    idx.apply_slice(
        Cluster::Local,
        key("shop", "web-abc"),
        model::slice_info(&slice(
            "shop",
            "web-abc",
            "web",
            json!([{"name": "http", "port": 8080}, {"name": "db", "port": 5432}]),
            &[
                ("10.0.0.1", Some("web-1"), true),
                ("10.0.0.2", Some("web-2"), true),
                ("10.0.0.3", Some("legacy"), true),
                ("10.0.0.4", Some("web-4"), false),
            ],
            json!({}),
        )),
    );
    for (name, ip, meshed) in [
        ("web-1", "10.0.0.1", true),
        ("web-2", "10.0.0.2", true),
        ("legacy", "10.0.0.3", false),
        ("web-4", "10.0.0.4", true),
    ] {
        idx.apply_pod(
            Cluster::Local,
            key("shop", name),
            Some(model::pod_info(&pod(
                "shop",
                name,
                ip,
                "web",
                meshed,
                json!({}),
            ))),
        );
    }
    idx
}

fn get(idx: &Index, path: &str) -> Resolution {
    let target = parse_target(path, "cluster.local").unwrap();
    resolve(idx, &settings(), &target).unwrap().0
}

const WEB_ID: &str = "web.shop.serviceaccount.identity.linkerd.west.example";

#[test]
fn meshed_unmeshed_and_not_ready_pods() {
    let idx = cluster();
    let res = get(&idx, "web.shop.svc.cluster.local:80");
    assert!(res.exists);
    assert_eq!(res.labels.get("service").map(String::as_str), Some("web"));
    assert_eq!(
        res.labels.get("namespace").map(String::as_str),
        Some("shop")
    );
    // The named target port resolved through the slice; the not-ready pod is absent.
    let addrs: Vec<_> = res.endpoints.keys().copied().collect();
    assert_eq!(
        addrs,
        [
            addr("10.0.0.1:8080"),
            addr("10.0.0.2:8080"),
            addr("10.0.0.3:8080")
        ]
    );

    let meshed = res.endpoints[&addr("10.0.0.1:8080")].to_proto();
    let tls = meshed.tls_identity.expect("a meshed pod has an identity");
    assert_eq!(tls.server_name.map(|n| n.name).as_deref(), Some(WEB_ID));
    assert!(matches!(
        tls.strategy,
        Some(tls_identity::Strategy::DnsLikeIdentity(ref d)) if d.name == WEB_ID
    ));
    assert!(matches!(
        meshed.protocol_hint.and_then(|h| h.protocol),
        Some(protocol_hint::Protocol::H2(_))
    ));
    assert_eq!(meshed.weight, DEFAULT_WEIGHT);
    assert_eq!(
        meshed.metric_labels.get("pod").map(String::as_str),
        Some("web-1")
    );
    assert_eq!(
        meshed
            .metric_labels
            .get("serviceaccount")
            .map(String::as_str),
        Some("web")
    );
    assert_eq!(
        meshed.metric_labels.get("deployment").map(String::as_str),
        Some("web"),
        "a ReplicaSet's Deployment"
    );

    let plain = res.endpoints[&addr("10.0.0.3:8080")].to_proto();
    assert!(
        plain.tls_identity.is_none(),
        "an un-meshed pod gets no identity"
    );
    assert!(plain.protocol_hint.is_none());
}

#[test]
fn opaque_ports_by_pod_service_and_namespace() {
    // (what is annotated, the port asked, whether the hint is opaque)
    let cases: &[(&str, u16, bool)] = &[
        ("service", 5432, true),
        ("service", 80, false),
        ("pod", 80, true),
        ("namespace", 80, true),
        ("none", 80, false),
    ];
    for (by, port, opaque) in cases {
        let mut idx = cluster();
        match *by {
            "pod" => {
                idx.apply_pod(
                    Cluster::Local,
                    key("shop", "web-1"),
                    Some(model::pod_info(&pod(
                        "shop",
                        "web-1",
                        "10.0.0.1",
                        "web",
                        true,
                        json!({"config.linkerd.io/opaque-ports": "8080"}),
                    ))),
                );
            }
            "namespace" => {
                idx.apply_namespace("shop".into(), Some(model::namespace_info(&obj::<Namespace>(json!({"metadata": {"name": "shop", "annotations": {"config.linkerd.io/opaque-ports": "8080"}}})))));
            }
            _ => {}
        }
        let res = get(&idx, &format!("web.shop.svc.cluster.local:{port}"));
        let target = if *port == 80 { 8080 } else { 5432 };
        let ep = res.endpoints[&SocketAddr::new(IpAddr::from([10, 0, 0, 1]), target)].to_proto();
        let hint = ep.protocol_hint.expect("a meshed pod has a hint");
        match hint.protocol {
            Some(protocol_hint::Protocol::Opaque(_)) => {
                assert!(opaque, "{by} {port}: opaque unexpectedly");
                assert_eq!(hint.opaque_transport.map(|t| t.inbound_port), Some(4143));
            }
            Some(protocol_hint::Protocol::H2(_)) => assert!(!opaque, "{by} {port}: not opaque"),
            None => panic!("no protocol"),
        }
    }
}

#[test]
fn addresses_resolve_to_services_and_pods() {
    let idx = cluster();
    // A ClusterIP is the Service.
    let by_ip = get(&idx, "10.96.0.10:80");
    assert_eq!(by_ip.endpoints.len(), 3);
    // A Pod IP is that Pod alone, on the port asked.
    let by_pod = get(&idx, "10.0.0.2:9000");
    assert_eq!(
        by_pod.endpoints.keys().copied().collect::<Vec<_>>(),
        [addr("10.0.0.2:9000")]
    );
    assert!(by_pod.endpoints[&addr("10.0.0.2:9000")].identity.is_some());
    // Anything else is not resolvable.
    let unknown = resolve(&idx, &settings(), &Target::Addr(addr("10.9.9.9:80")));
    assert_eq!(
        unknown.unwrap_err(),
        InvalidTarget::UnknownAddr("10.9.9.9".parse().unwrap())
    );
}

#[test]
fn unknown_services_have_no_endpoints_and_say_so() {
    let idx = cluster();
    let res = get(&idx, "nothing.shop.svc.cluster.local:80");
    assert!(!res.exists && res.endpoints.is_empty());
    let (updates, _) = diff(None, &res);
    assert!(matches!(
        updates.as_slice(),
        [Update {
            update: Some(update::Update::NoEndpoints(NoEndpoints { exists: false }))
        }]
    ));
}

#[test]
fn gateway_mirror_endpoints_are_the_gateway_with_the_remote_authority() {
    let mut idx = Index::default();
    idx.apply_service(
        key("shop", "web-east"),
        Some(model::service_info(&service(
            "shop",
            "web-east",
            "10.96.0.20",
            json!([{"name": "http", "port": 80}]),
            json!({}),
            json!({"mirror.linkerd.io/mirrored-service": "true"}),
        ))),
    );
    let gw_id = "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.example";
    idx.apply_slice(
        Cluster::Local,
        key("shop", "web-east-ipv4"),
        model::slice_info(&slice(
            "shop",
            "web-east-ipv4",
            "web-east",
            json!([{"name": "http", "port": 4143}]),
            &[("192.0.2.7", None, true)],
            json!({"mirror.linkerd.io/remote-gateway-identity": gw_id, "mirror.linkerd.io/remote-svc-fq-name": "web.shop.svc.cluster.local"}),
        )),
    );
    let res = get(&idx, "web-east.shop.svc.cluster.local:80");
    let ep = res.endpoints[&addr("192.0.2.7:4143")].to_proto();
    assert_eq!(
        ep.authority_override
            .map(|a| a.authority_override)
            .as_deref(),
        Some("web.shop.svc.cluster.local:80")
    );
    let tls = ep.tls_identity.unwrap();
    assert!(
        matches!(tls.strategy, Some(tls_identity::Strategy::DnsLikeIdentity(ref d)) if d.name == gw_id)
    );
    assert!(
        tls.server_name.is_none(),
        "Linkerd sends no server_name for a gateway"
    );
    assert!(matches!(
        ep.protocol_hint.and_then(|h| h.protocol),
        Some(protocol_hint::Protocol::H2(_))
    ));
    assert_eq!(
        res.labels.get("target_cluster").map(String::as_str),
        Some("east")
    );
    assert_eq!(
        res.labels.get("target_service").map(String::as_str),
        Some("web")
    );
    assert_eq!(
        res.labels
            .get("target_service_namespace")
            .map(String::as_str),
        Some("shop")
    );
}

fn linked(idx: &mut Index, cluster: &str, ip: &str) {
    idx.apply_remote(
        cluster,
        Some(RemoteSettings {
            trust_domain: format!("{cluster}.example"),
            control_plane_ns: "linkerd".into(),
        }),
    );
    idx.apply_slice(
        Cluster::Linked(cluster),
        key("shop", "web-r"),
        model::slice_info(&slice(
            "shop",
            "web-r",
            "web",
            json!([{"name": "http", "port": 8080}]),
            &[(ip, Some("web-r1"), true)],
            json!({}),
        )),
    );
    idx.apply_pod(
        Cluster::Linked(cluster),
        key("shop", "web-r1"),
        Some(model::pod_info(&pod(
            "shop",
            "web-r1",
            ip,
            "web",
            true,
            json!({}),
        ))),
    );
}

#[test]
fn remote_discovery_resolves_to_the_remote_pods_with_remote_identities() {
    let mut idx = Index::default();
    linked(&mut idx, "east", "10.1.0.5");
    idx.apply_service(
        key("shop", "web-east"),
        Some(model::service_info(&service(
            "shop",
            "web-east",
            "10.96.0.30",
            json!([{"name": "http", "port": 80}]),
            json!({}),
            json!({"multicluster.linkerd.io/remote-discovery": "east", "multicluster.linkerd.io/remote-service": "web"}),
        ))),
    );
    let res = get(&idx, "web-east.shop.svc.cluster.local:80");
    let ep = &res.endpoints[&addr("10.1.0.5:8080")];
    assert_eq!(
        ep.identity.as_deref(),
        Some("web.shop.serviceaccount.identity.linkerd.east.example")
    );
    assert_eq!(ep.hint, Hint::H2);
}

#[test]
fn federated_services_merge_local_and_remote_members() {
    let mut idx = cluster();
    linked(&mut idx, "east", "10.1.0.5");
    linked(&mut idx, "north", "10.2.0.5");
    idx.apply_service(
        key("shop", "web-federated"),
        Some(model::service_info(&service(
            "shop",
            "web-federated",
            "10.96.0.40",
            json!([{"name": "http", "port": 80}]),
            json!({"multicluster.linkerd.io/local-discovery": "web", "multicluster.linkerd.io/remote-discovery": "web@east,web@north"}),
            json!({}),
        ))),
    );
    let (res, topics) = resolve(
        &idx,
        &settings(),
        &parse_target("web-federated.shop.svc.cluster.local:80", "cluster.local").unwrap(),
    )
    .unwrap();
    let addrs: Vec<_> = res.endpoints.keys().map(|a| a.to_string()).collect();
    assert_eq!(
        addrs,
        [
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.0.0.3:8080",
            "10.1.0.5:8080",
            "10.2.0.5:8080"
        ]
    );
    assert_eq!(
        res.endpoints[&addr("10.2.0.5:8080")].identity.as_deref(),
        Some("web.shop.serviceaccount.identity.linkerd.north.example")
    );
    assert_eq!(
        res.endpoints[&addr("10.0.0.1:8080")].identity.as_deref(),
        Some(WEB_ID)
    );
    // It listens to every member.
    for t in [
        Topic::Service(key("shop", "web-federated")),
        Topic::Service(key("shop", "web")),
        Topic::Remote("east".into(), key("shop", "web")),
        Topic::Remote("north".into(), key("shop", "web")),
    ] {
        assert!(topics.contains(&t), "{t:?}");
    }
    // A linked cluster whose Link is gone contributes nothing.
    idx.apply_remote("north", None);
    assert_eq!(
        get(&idx, "web-federated.shop.svc.cluster.local:80")
            .endpoints
            .len(),
        4
    );
}

#[test]
fn diffs_send_the_set_then_changes() {
    let mut idx = cluster();
    let first = get(&idx, "web.shop.svc.cluster.local:80");
    let (updates, sent) = diff(None, &first);
    assert!(
        matches!(updates.as_slice(), [Update { update: Some(update::Update::Add(set)) }] if set.addrs.len() == 3)
    );

    // Nothing changed: nothing sent.
    assert!(diff(Some(&sent), &first).0.is_empty());

    // web-2 becomes not ready, web-4 ready, web-1 changes account (a changed endpoint is re-added).
    idx.apply_slice(
        Cluster::Local,
        key("shop", "web-abc"),
        model::slice_info(&slice(
            "shop",
            "web-abc",
            "web",
            json!([{"name": "http", "port": 8080}]),
            &[
                ("10.0.0.1", Some("web-1"), true),
                ("10.0.0.3", Some("legacy"), true),
                ("10.0.0.4", Some("web-4"), true),
            ],
            json!({}),
        )),
    );
    idx.apply_pod(
        Cluster::Local,
        key("shop", "web-1"),
        Some(model::pod_info(&pod(
            "shop",
            "web-1",
            "10.0.0.1",
            "admin",
            true,
            json!({}),
        ))),
    );
    let next = get(&idx, "web.shop.svc.cluster.local:80");
    let (updates, sent) = diff(Some(&sent), &next);
    let [
        Update {
            update: Some(update::Update::Remove(removed)),
        },
        Update {
            update: Some(update::Update::Add(added)),
        },
    ] = updates.as_slice()
    else {
        panic!("{updates:?}");
    };
    let ips = |addrs: Vec<SocketAddr>| addrs.into_iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ips(removed
            .addrs
            .iter()
            .cloned()
            .map(|a| SocketAddr::try_from(a).unwrap())
            .collect()),
        ["10.0.0.2:8080"]
    );
    assert_eq!(
        ips(added
            .addrs
            .iter()
            .map(|a| SocketAddr::try_from(a.addr.unwrap()).unwrap())
            .collect()),
        ["10.0.0.1:8080", "10.0.0.4:8080"]
    );

    // Every endpoint gone: NoEndpoints{exists: true}; the Service deleted: exists false.
    idx.apply_slice(Cluster::Local, key("shop", "web-abc"), None);
    let empty = get(&idx, "web.shop.svc.cluster.local:80");
    let (updates, sent) = diff(Some(&sent), &empty);
    assert!(matches!(
        updates.as_slice(),
        [Update {
            update: Some(update::Update::NoEndpoints(NoEndpoints { exists: true }))
        }]
    ));
    idx.apply_service(key("shop", "web"), None);
    let gone = get(&idx, "web.shop.svc.cluster.local:80");
    let (updates, _) = diff(Some(&sent), &gone);
    assert!(matches!(
        updates.as_slice(),
        [Update {
            update: Some(update::Update::NoEndpoints(NoEndpoints { exists: false }))
        }]
    ));
}

#[test]
fn paths() {
    let ok: &[(&str, Target)] = &[
        (
            "web.shop.svc.cluster.local:8080",
            Target::Name {
                service: key("shop", "web"),
                hostname: None,
                port: 8080,
            },
        ),
        (
            "web.shop.svc.cluster.local.:80",
            Target::Name {
                service: key("shop", "web"),
                hostname: None,
                port: 80,
            },
        ),
        (
            "web.shop.svc.cluster.local",
            Target::Name {
                service: key("shop", "web"),
                hostname: None,
                port: 80,
            },
        ),
        (
            "db-0.db.shop.svc.cluster.local:5432",
            Target::Name {
                service: key("shop", "db"),
                hostname: Some("db-0".into()),
                port: 5432,
            },
        ),
        ("10.0.0.1:80", Target::Addr(addr("10.0.0.1:80"))),
        ("[fd00::1]:80", Target::Addr(addr("[fd00::1]:80"))),
    ];
    for (path, want) in ok {
        assert_eq!(
            &parse_target(path, "cluster.local").unwrap(),
            want,
            "{path}"
        );
    }
    let bad = [
        "example.com:80",
        "web.shop.svc.other.local:80",
        "shop.svc.cluster.local:80",
        "web.shop.svc.cluster.local:http",
        "a.b.c.d.svc.cluster.local:1",
    ];
    for path in bad {
        assert!(parse_target(path, "cluster.local").is_err(), "{path}");
    }
    assert_eq!(
        parse_target(&"a".repeat(600), "cluster.local"),
        Err(InvalidTarget::TooLong)
    );
}

#[test]
fn profiles() {
    let idx = cluster();
    let s = settings();
    let p = |path: &str| profile(&idx, &s, &parse_target(path, "cluster.local").unwrap());
    let (web, _) = p("web.shop.svc.cluster.local:80").unwrap();
    assert_eq!(web.fully_qualified_name, "web.shop.svc.cluster.local");
    assert!(!web.opaque_protocol);
    assert_eq!(web.retry_budget, Some(default_retry_budget()));
    assert!(
        p("web.shop.svc.cluster.local:5432")
            .unwrap()
            .0
            .opaque_protocol
    );
    // By ClusterIP: the Service's profile.
    assert_eq!(
        p("10.96.0.10:80").unwrap().0.fully_qualified_name,
        "web.shop.svc.cluster.local"
    );
    // By Pod IP: the endpoint.
    let (pod, _) = p("10.0.0.1:8080").unwrap();
    assert!(pod.fully_qualified_name.is_empty());
    assert!(pod.endpoint.and_then(|e| e.tls_identity).is_some());
    // Unknown address: not resolvable.
    assert!(p("10.9.9.9:80").is_err());
}
