use std::net::{IpAddr, Ipv4Addr};

use serde_json::json;

use super::*;
use crate::desired::tests::target;

fn service(v: serde_json::Value) -> Service {
    serde_json::from_value(v).unwrap()
}

/// Remote Service `name` in `shop` with `labels`, ClusterIP or headless.
fn remote(name: &str, labels: serde_json::Value, headless: bool) -> Service {
    let mut s = service(json!({
        "metadata": { "name": name, "namespace": "shop", "resourceVersion": "7", "labels": labels },
        "spec": { "ports": [{ "name": "http", "port": 80 }] },
    }));
    if headless {
        s.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    }
    s
}

fn exported(name: &str) -> Service {
    remote(name, json!({ "mirror.linkerd.io/exported": "true" }), false)
}

/// A local Service this Link made, named `name`, headless or not, optionally a pod's mirror of
/// headless mirror `root`.
fn mine(name: &str, headless: bool, root: Option<&str>) -> Service {
    let mut labels = json!({ "mirror.linkerd.io/mirrored-service": "true", "mirror.linkerd.io/cluster-name": "east" });
    if let Some(root) = root {
        labels["mirror.linkerd.io/headless-mirror-svc-name"] = json!(root);
    }
    service(json!({
        "metadata": { "name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": labels },
        "spec": { "clusterIP": if headless { "None" } else { "10.0.0.9" }, "ports": [{ "port": 80 }] },
    }))
}

fn spec() -> LinkSpec {
    LinkSpec {
        selector: Some(link_crd::default_selector()),
        remote_discovery_selector: Some(link_crd::default_remote_discovery_selector()),
        ..LinkSpec::default()
    }
}

fn gateway() -> Gateway {
    Gateway {
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
        port: 4143,
        alive: true,
    }
}

/// What a case sets up; the defaults are an ordinary exported Service, nothing local yet.
#[derive(Clone)]
struct Case {
    key: &'static str,
    remote: Option<Service>,
    local: Vec<Service>,
    foreign: Vec<&'static str>,
    namespace: bool,
    create_namespaces: bool,
    headless_services: bool,
    endpoints: RemoteEndpoints,
    gateway: Option<Gateway>,
}

fn case() -> Case {
    Case {
        key: "web",
        remote: Some(exported("web")),
        local: Vec::new(),
        foreign: Vec::new(),
        namespace: true,
        create_namespaces: false,
        headless_services: true,
        endpoints: RemoteEndpoints {
            ready: true,
            ..RemoteEndpoints::default()
        },
        gateway: Some(gateway()),
    }
}

/// Pods `web-0` and `web-1` of a headless remote Service.
fn named_pods() -> RemoteEndpoints {
    RemoteEndpoints {
        ready: true,
        hostnames: [("web-0".into(), "11".into()), ("web-1".into(), "12".into())].into(),
        named: true,
        ports: vec![(Some("http".into()), Some(8080), Some("TCP".into()))],
    }
}

fn plan_of(c: &Case) -> Plan {
    let target = target();
    let spec = spec();
    let local = |name: &str| c.local.iter().find(|s| s.name_any() == name).cloned();
    let pod_mirrors = |root: &str| {
        c.local
            .iter()
            .filter(|s| {
                s.labels()
                    .get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL)
                    .map(String::as_str)
                    == Some(root)
            })
            .cloned()
            .collect()
    };
    let foreign: HashSet<String> = c.foreign.iter().map(|s| (*s).to_owned()).collect();
    let view = View {
        target: &target,
        spec: &spec,
        headless_services: c.headless_services,
        create_namespaces: c.create_namespaces,
        remote: c.remote.as_ref(),
        endpoints: &c.endpoints,
        gateway: c.gateway.as_ref(),
        namespace_exists: c.namespace,
        local: &local,
        pod_mirrors: &pod_mirrors,
        foreign: &foreign,
    };
    plan(&("shop".to_owned(), c.key.to_owned()), &view)
}

/// A plan in a word or two, for the tables.
fn shape(p: &Plan) -> String {
    match p {
        Plan::Skip { status: None, .. } => "skip".into(),
        Plan::Skip {
            status: Some(o), ..
        } => format!("skip {}", o.reason),
        Plan::Delete {
            mirror,
            pod_mirrors,
        } => {
            let mut names = vec![mirror.name_any()];
            names.extend(pod_mirrors.iter().map(ResourceExt::name_any));
            format!("delete {}", names.join(","))
        }
        Plan::Mirror(m) => {
            let mut s = String::from("mirror");
            if m.create_namespace {
                s += " +namespace";
            }
            if let Some(r) = &m.replace {
                s += &format!(" replace {}", r.name_any());
            }
            s += match &m.endpoints {
                MirrorEndpoints::Gateway(_) => " gateway",
                MirrorEndpoints::None { .. } => " no-endpoints",
                MirrorEndpoints::Wait => " wait",
                MirrorEndpoints::Headless(_) => " headless",
            };
            for p in &m.stale_pod_mirrors {
                s += &format!(" -{}", p.name_any());
            }
            s
        }
    }
}

#[test]
fn each_rule() {
    let long = "a-name-so-long-that-with-the-cluster-suffix-it-is-over-sixty-three";
    let cases: Vec<(&str, Case, &str)> = vec![
        (
            "an exported Service is mirrored through the gateway",
            case(),
            "mirror gateway",
        ),
        // 1
        (
            "an invalid mirror name",
            Case {
                key: long,
                remote: Some(exported(long)),
                ..case()
            },
            "skip InvalidService",
        ),
        (
            "an invalid name of nothing exported: no entry",
            Case {
                key: long,
                remote: None,
                ..case()
            },
            "skip",
        ),
        // 2
        (
            "the name held by a pod's mirror",
            Case {
                local: vec![mine("web-east", false, Some("db-east"))],
                ..case()
            },
            "skip InvalidService",
        ),
        // 3
        (
            "gone: the mirror is deleted",
            Case {
                remote: None,
                local: vec![mine("web-east", false, None)],
                ..case()
            },
            "delete web-east",
        ),
        (
            "gone, no mirror: nothing",
            Case {
                remote: None,
                ..case()
            },
            "skip",
        ),
        (
            "no longer exported (labels match neither selector): deleted",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "false" }),
                    false,
                )),
                local: vec![mine("web-east", false, None)],
                ..case()
            },
            "delete web-east",
        ),
        (
            "a headless mirror goes with its pods' mirrors",
            Case {
                remote: None,
                local: vec![
                    mine("web-east", true, None),
                    mine("web-0-east", false, Some("web-east")),
                    mine("other-0-east", false, Some("other-east")),
                ],
                ..case()
            },
            "delete web-east,web-0-east",
        ),
        // 4
        (
            "a remote mirror is not mirrored",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true", "mirror.linkerd.io/mirrored-service": "true" }),
                    false,
                )),
                ..case()
            },
            "skip InvalidService",
        ),
        // 5
        (
            "the namespace is missing",
            Case {
                namespace: false,
                ..case()
            },
            "skip MissingNamespace",
        ),
        (
            "the namespace is missing and is created",
            Case {
                namespace: false,
                create_namespaces: true,
                ..case()
            },
            "mirror +namespace gateway",
        ),
        // 6
        (
            "a Service without ports",
            Case {
                remote: Some(service(json!({
                    "metadata": { "name": "web", "namespace": "shop", "labels": { "mirror.linkerd.io/exported": "true" } },
                    "spec": {},
                }))),
                ..case()
            },
            "skip InvalidService",
        ),
        // 7
        (
            "the name is another's Service",
            Case {
                foreign: vec!["web-east"],
                ..case()
            },
            "skip NameTaken",
        ),
        (
            "our own mirror is ours whatever the API says",
            Case {
                foreign: vec!["web-east"],
                local: vec![mine("web-east", false, None)],
                ..case()
            },
            "mirror gateway",
        ),
        // 8: modes
        (
            "remote discovery: no endpoints here",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "remote-discovery" }),
                    false,
                )),
                ..case()
            },
            "mirror no-endpoints",
        ),
        (
            "no gateway resolved yet: the endpoints wait",
            Case {
                gateway: None,
                ..case()
            },
            "mirror wait",
        ),
        (
            "headless with named pods",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true" }),
                    true,
                )),
                endpoints: named_pods(),
                ..case()
            },
            "mirror headless",
        ),
        (
            "headless without named pods: a ClusterIP mirror",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true" }),
                    true,
                )),
                ..case()
            },
            "mirror gateway",
        ),
        (
            "headless mirroring off: a ClusterIP mirror",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true" }),
                    true,
                )),
                endpoints: named_pods(),
                headless_services: false,
                ..case()
            },
            "mirror gateway",
        ),
        (
            "ClusterIP to headless: replaced",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true" }),
                    true,
                )),
                endpoints: named_pods(),
                local: vec![mine("web-east", false, None)],
                ..case()
            },
            "mirror replace web-east headless",
        ),
        (
            "headless to ClusterIP: replaced, the pods' mirrors go",
            Case {
                local: vec![
                    mine("web-east", true, None),
                    mine("web-0-east", false, Some("web-east")),
                ],
                ..case()
            },
            "mirror replace web-east gateway -web-0-east",
        ),
        (
            "a pod gone: its mirror goes",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "true" }),
                    true,
                )),
                endpoints: named_pods(),
                local: vec![
                    mine("web-east", true, None),
                    mine("web-9-east", false, Some("web-east")),
                ],
                ..case()
            },
            "mirror headless -web-9-east",
        ),
    ];
    for (what, c, want) in cases {
        assert_eq!(shape(&plan_of(&c)), want, "{what}");
    }
}

#[test]
fn each_precedence() {
    let long = "a-name-so-long-that-with-the-cluster-suffix-it-is-over-sixty-three";
    let not_a_mirror = |c: Case| Case {
        remote: Some(remote(
            c.key,
            json!({ "mirror.linkerd.io/exported": "true", "mirror.linkerd.io/mirrored-service": "true" }),
            false,
        )),
        ..c
    };
    let cases: Vec<(&str, Case, &str)> = vec![
        (
            "an invalid name before a missing namespace",
            Case {
                key: long,
                remote: Some(exported(long)),
                namespace: false,
                ..case()
            },
            "skip InvalidService",
        ),
        (
            "a pod's mirror holding the name before deleting: a pod's mirror is never deleted as a Service's",
            Case {
                remote: None,
                local: vec![mine("web-east", false, Some("db-east"))],
                ..case()
            },
            "skip",
        ),
        (
            "gone before a missing namespace: a mirror is deleted anyway",
            Case {
                remote: None,
                local: vec![mine("web-east", false, None)],
                namespace: false,
                ..case()
            },
            "delete web-east",
        ),
        (
            "a mirror of a mirror before a missing namespace",
            Case {
                namespace: false,
                ..not_a_mirror(case())
            },
            "skip InvalidService",
        ),
        (
            "a mirror of a mirror before a taken name",
            Case {
                foreign: vec!["web-east"],
                ..not_a_mirror(case())
            },
            "skip InvalidService",
        ),
        (
            "a missing namespace before a taken name",
            Case {
                namespace: false,
                foreign: vec!["web-east"],
                ..case()
            },
            "skip MissingNamespace",
        ),
        (
            "remote discovery before headless: a headless remote-discovery Service is one mirror",
            Case {
                remote: Some(remote(
                    "web",
                    json!({ "mirror.linkerd.io/exported": "remote-discovery" }),
                    true,
                )),
                endpoints: named_pods(),
                ..case()
            },
            "mirror no-endpoints",
        ),
        (
            "a Service with another's name is never deleted when unexported",
            Case {
                remote: None,
                foreign: vec!["web-east"],
                ..case()
            },
            "skip",
        ),
    ];
    for (what, c, want) in cases {
        assert_eq!(shape(&plan_of(&c)), want, "{what}");
    }
}

#[test]
fn only_names_the_plan_would_create_are_looked_up() {
    let c = case();
    let target = target();
    let spec = spec();
    let none = |_: &str| None;
    let no_pods = |_: &str| Vec::new();
    let mut foreign = HashSet::new();
    let view = |foreign: &HashSet<String>| {
        let p = plan(
            &("shop".into(), "web".into()),
            &View {
                target: &target,
                spec: &spec,
                headless_services: true,
                create_namespaces: false,
                remote: c.remote.as_ref(),
                endpoints: &c.endpoints,
                gateway: c.gateway.as_ref(),
                namespace_exists: true,
                local: &none,
                pod_mirrors: &no_pods,
                foreign,
            },
        );
        let names = p.unchecked(&View {
            target: &target,
            spec: &spec,
            headless_services: true,
            create_namespaces: false,
            remote: None,
            endpoints: &c.endpoints,
            gateway: None,
            namespace_exists: true,
            local: &none,
            pod_mirrors: &no_pods,
            foreign,
        });
        (shape(&p), names)
    };
    assert_eq!(
        view(&foreign),
        ("mirror gateway".into(), vec!["web-east".to_owned()])
    );
    foreign.insert("web-east".into());
    assert_eq!(view(&foreign), ("skip NameTaken".into(), vec![]));
    // A mirror the local watch knows is never looked up.
    let known = |n: &str| (n == "web-east").then(|| mine("web-east", false, None));
    let p = plan(
        &("shop".into(), "web".into()),
        &View {
            target: &target,
            spec: &spec,
            headless_services: true,
            create_namespaces: false,
            remote: c.remote.as_ref(),
            endpoints: &c.endpoints,
            gateway: c.gateway.as_ref(),
            namespace_exists: true,
            local: &known,
            pod_mirrors: &no_pods,
            foreign: &HashSet::new(),
        },
    );
    let v = View {
        target: &target,
        spec: &spec,
        headless_services: true,
        create_namespaces: false,
        remote: None,
        endpoints: &c.endpoints,
        gateway: None,
        namespace_exists: true,
        local: &known,
        pod_mirrors: &no_pods,
        foreign: &HashSet::new(),
    };
    assert!(p.unchecked(&v).is_empty());
}

#[test]
fn pods_of_a_headless_mirror() {
    let mut c = Case {
        remote: Some(remote(
            "web",
            json!({ "mirror.linkerd.io/exported": "true" }),
            true,
        )),
        endpoints: named_pods(),
        ..case()
    };
    // web-1's mirror name is held: by another Service of this Link (a remote `web-1`'s mirror),
    // then by someone else's.
    for (local, foreign) in [
        (vec![mine("web-1-east", false, None)], vec![]),
        (vec![], vec!["web-1-east"]),
    ] {
        c.local = local;
        c.foreign = foreign;
        let Plan::Mirror(m) = plan_of(&c) else {
            panic!("a mirror")
        };
        let MirrorEndpoints::Headless(h) = &m.endpoints else {
            panic!("headless")
        };
        let pods: Vec<&str> = h.pods.iter().map(|p| p.hostname.as_str()).collect();
        assert_eq!(pods, ["web-0"]);
        assert_eq!(h.refused.len(), 1);
        assert_eq!(h.refused[0].0, "web-1");
        // Each pod's mirror records the remote slice's version, and has the gateway.
        let p = &h.pods[0];
        assert_eq!(
            p.service
                .annotations()
                .get(keys::REMOTE_RESOURCE_VERSION_ANNOTATION),
            Some(&"11".to_owned())
        );
        assert!(p.endpoints.is_some());
    }
    // The root's endpoints name each pod at its mirror's ClusterIP, owned by the root.
    let Plan::Mirror(m) = plan_of(&Case {
        local: vec![],
        foreign: vec![],
        ..c
    }) else {
        panic!("a mirror")
    };
    let MirrorEndpoints::Headless(h) = &m.endpoints else {
        panic!("headless")
    };
    let mut root = m.service.clone();
    root.metadata.uid = Some("u-root".into());
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let published = h.root_endpoints(&target(), &root, &[("web-0".into(), ip)]);
    let subsets = published.endpoints.subsets.clone().unwrap();
    let address = &subsets[0].addresses.as_ref().unwrap()[0];
    assert_eq!(
        (address.ip.as_str(), address.hostname.as_deref()),
        ("10.0.0.7", Some("web-0"))
    );
    let owners = published.endpoints.metadata.owner_references.unwrap();
    assert_eq!(owners[0].uid, "u-root");
    assert_eq!(published.stale_slices, ["web-east-ipv6"]);
}

#[test]
fn gateway_mode_publishes_the_gateway_and_drops_other_slices() {
    let Plan::Mirror(m) = plan_of(&case()) else {
        panic!("a mirror")
    };
    let MirrorEndpoints::Gateway(p) = m.endpoints else {
        panic!("gateway")
    };
    let names: Vec<String> = p.slices.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["web-east-ipv4"]);
    // The gateway has no IPv6 address: a slice of that family from before goes.
    assert_eq!(p.stale_slices, ["web-east-ipv6"]);
    assert_eq!(m.status, Outcome::mirrored("shop", "web-east"));
    // A remote with no ready endpoint publishes no address (callers fail fast).
    let Plan::Mirror(m) = plan_of(&Case {
        endpoints: RemoteEndpoints::default(),
        ..case()
    }) else {
        panic!("a mirror")
    };
    let MirrorEndpoints::Gateway(p) = m.endpoints else {
        panic!("gateway")
    };
    assert_eq!(p.endpoints.subsets, Some(vec![]));
}
