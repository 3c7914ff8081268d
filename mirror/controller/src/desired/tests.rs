use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use link_crd::LabelSelector;
use serde_json::json;

use super::*;

fn remote(value: serde_json::Value) -> Service {
    serde_json::from_value(value).unwrap()
}

fn web() -> Service {
    remote(json!({
        "metadata": {
            "name": "web", "namespace": "shop", "resourceVersion": "4711",
            "labels": {
                "app": "web",
                "mirror.linkerd.io/exported": "true",
                "mirror.linkerd.io/anything": "x",
                "team.example.com/owner": "alice",
                "team.example.com.au/owner": "bob",
                "tier": "front",
                // The remote's own values of keys the controller sets: never copied.
                "multicluster.linkerd.io/remote-discovery": "north",
                "multicluster.linkerd.io/remote-service": "other",
            },
            "annotations": {
                "mirror.linkerd.io/remote-gateway-identity": "attacker.example",
                "mirror.linkerd.io/remote-svc-fq-name": "other.ns.svc.cluster.local",
                "multicluster.linkerd.io/remote-discovery": "db@north",
                "multicluster.linkerd.io/local-discovery": "db",
                "config.linkerd.io/opaque-ports": "5432",
                "service.kubernetes.io/topology-mode": "Auto",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "secret.example.com/token": "s3cret",
                "docs": "https://example.com/web",
            },
        },
        "spec": {
            "type": "LoadBalancer",
            "selector": { "app": "web" },
            "clusterIP": "10.96.0.10",
            "ports": [
                { "name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080, "appProtocol": "http" },
                { "name": "grpc", "port": 9090, "targetPort": "grpc", "protocol": "TCP" },
            ],
        },
    }))
}

/// A Link's target with exclusions (shared with the cache's tests).
pub(crate) fn target() -> Target {
    Target {
        cluster: "east".into(),
        domain: "cluster.local".into(),
        gateway_identity:
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local"
                .into(),
        gateway_port: Some(4143),
        excluded_labels: vec!["tier".into(), "team.example.com/*".into()],
        excluded_annotations: vec![
            "secret.example.com/*".into(),
            "config.linkerd.io/opaque-ports".into(),
        ],
    }
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

#[test]
fn exclusion_rules() {
    let rules: Vec<String> = vec!["tier".into(), "example.com/*".into(), "odd*".into()];
    let cases = [
        ("tier", true),
        ("tiers", false),
        ("example.com/team", true),
        ("example.com/", true),
        // Linkerd's string-prefix test would exclude these two [quirk].
        ("example.com.au/team", false),
        ("example.comx/team", false),
        // A `*` that does not follow a `/` is part of the key, not a wildcard.
        ("odd*", true),
        ("oddity", false),
    ];
    for (key, want) in cases {
        assert_eq!(is_excluded(key, &rules), want, "{key}");
    }
    assert!(!is_excluded("anything", &[]));
}

#[test]
fn export_modes() {
    let spec = LinkSpec {
        selector: Some(link_crd::default_selector()),
        remote_discovery_selector: Some(link_crd::default_remote_discovery_selector()),
        ..LinkSpec::default()
    };
    let cases = [
        (
            map(&[("mirror.linkerd.io/exported", "true")]),
            Some(Mode::Gateway),
        ),
        (
            map(&[("mirror.linkerd.io/exported", "remote-discovery")]),
            Some(Mode::RemoteDiscovery),
        ),
        (map(&[("mirror.linkerd.io/exported", "false")]), None),
        (map(&[]), None),
    ];
    for (labels, want) in cases {
        assert_eq!(export_mode(&spec, &labels), want, "{labels:?}");
    }
    // No selector at all exports nothing (an empty selector is not "everything").
    assert_eq!(
        export_mode(
            &LinkSpec::default(),
            &map(&[("mirror.linkerd.io/exported", "true")])
        ),
        None
    );
    // Both selectors match: remote discovery wins.
    let both = LinkSpec {
        selector: Some(LabelSelector::label("app", "web")),
        remote_discovery_selector: Some(LabelSelector::label("app", "web")),
        ..LinkSpec::default()
    };
    assert_eq!(
        export_mode(&both, &map(&[("app", "web")])),
        Some(Mode::RemoteDiscovery)
    );
}

#[test]
fn mirror_service_metadata_and_ports() {
    let svc = mirror_service(&target(), &web(), Mode::Gateway).unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("web-east"));
    assert_eq!(svc.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(
        svc.metadata.labels.unwrap(),
        map(&[
            ("app", "web"),
            // kept: `team.example.com/*` does not cover `team.example.com.au/`
            ("team.example.com.au/owner", "bob"),
            ("mirror.linkerd.io/mirrored-service", "true"),
            ("mirror.linkerd.io/cluster-name", "east"),
        ])
    );
    assert_eq!(
        svc.metadata.annotations.unwrap(),
        map(&[
            // kept although excluded: opaque ports decide how the source proxy treats traffic
            ("config.linkerd.io/opaque-ports", "5432"),
            ("docs", "https://example.com/web"),
            (
                "mirror.linkerd.io/remote-svc-fq-name",
                "web.shop.svc.cluster.local"
            ),
            ("mirror.linkerd.io/remote-resource-version", "4711"),
        ])
    );
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.selector, None);
    assert_eq!(spec.cluster_ip, None, "allocated by the local API server");
    let ports = spec.ports.unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0].name.as_deref(), Some("http"));
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].target_port, Some(IntOrString::Int(8080)));
    assert_eq!(ports[0].node_port, None);
    assert_eq!(ports[0].app_protocol, None);
    assert_eq!(
        ports[1].target_port,
        Some(IntOrString::String("grpc".into()))
    );
}

#[test]
fn keys_the_controller_sets_never_come_from_the_remote() {
    for key in [
        "mirror.linkerd.io/remote-gateway-identity",
        "mirror.linkerd.io/cluster-name",
        "multicluster.linkerd.io/remote-discovery",
        "multicluster.linkerd.io/remote-service",
        "multicluster.linkerd.io/local-discovery",
    ] {
        assert!(is_controller_key(key), "{key}");
    }
    for key in [
        "mirror.linkerd.io.example/x",
        "multicluster.linkerd.io/other",
        "app",
    ] {
        assert!(!is_controller_key(key), "{key}");
    }
    // Neither mode's mirror carries the remote's values.
    for mode in [Mode::Gateway, Mode::RemoteDiscovery] {
        let svc = mirror_service(&target(), &web(), mode).unwrap();
        let annotations = svc.metadata.annotations.unwrap();
        assert_eq!(
            annotations
                .get("mirror.linkerd.io/remote-svc-fq-name")
                .map(String::as_str),
            Some("web.shop.svc.cluster.local")
        );
        assert!(!annotations.contains_key("mirror.linkerd.io/remote-gateway-identity"));
        assert!(!annotations.contains_key("multicluster.linkerd.io/remote-discovery"));
        assert!(!annotations.contains_key("multicluster.linkerd.io/local-discovery"));
        let labels = svc.metadata.labels.unwrap();
        let discovery = labels.get("multicluster.linkerd.io/remote-discovery");
        match mode {
            Mode::Gateway => assert_eq!(discovery, None),
            Mode::RemoteDiscovery => assert_eq!(discovery.map(String::as_str), Some("east")),
        }
    }
}

#[test]
fn remote_discovery_mirror_labels() {
    let svc = mirror_service(&target(), &web(), Mode::RemoteDiscovery).unwrap();
    let labels = svc.metadata.labels.unwrap();
    assert_eq!(labels["multicluster.linkerd.io/remote-discovery"], "east");
    assert_eq!(labels["multicluster.linkerd.io/remote-service"], "web");
}

#[test]
fn invalid_services() {
    let long = remote(json!({
        "metadata": { "name": "a".repeat(60), "namespace": "shop" },
        "spec": { "ports": [{ "port": 80 }] },
    }));
    assert!(matches!(
        mirror_service(&target(), &long, Mode::Gateway),
        Err(InvalidService::Name(NameError::TooLong { .. }))
    ));
    let portless = remote(json!({
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "clusterIP": "None" },
    }));
    assert_eq!(
        mirror_service(&target(), &portless, Mode::Gateway),
        Err(InvalidService::NoPorts)
    );
}

fn gateway(alive: bool, addresses: &[IpAddr]) -> Gateway {
    Gateway {
        addresses: addresses.to_vec(),
        port: 4143,
        alive,
    }
}

const V4A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const V4B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

#[test]
fn gateway_endpoints_follow_remote_readiness_and_liveness() {
    let t = target();
    let remote = web();
    let mirror = mirror_service(&t, &remote, Mode::Gateway).unwrap();
    let ips = |addrs: &Option<Vec<EndpointAddress>>| -> Vec<String> {
        addrs.iter().flatten().map(|a| a.ip.clone()).collect()
    };

    // Ready remote, live gateway: every gateway address ready, ports mapped to 4143.
    let ep = gateway_endpoints(&t, &remote, &mirror, true, &gateway(true, &[V4A, V4B]));
    assert_eq!(ep.metadata.name.as_deref(), Some("web-east"));
    let subsets = ep.subsets.unwrap();
    assert_eq!(subsets.len(), 1);
    assert_eq!(ips(&subsets[0].addresses), ["192.0.2.1", "192.0.2.2"]);
    assert_eq!(subsets[0].not_ready_addresses, None);
    let ports: Vec<_> = subsets[0]
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(
        ports,
        [("http".to_owned(), 4143), ("grpc".to_owned(), 4143)]
    );
    let annotations = ep.metadata.annotations.unwrap();
    assert_eq!(
        annotations["mirror.linkerd.io/remote-gateway-identity"],
        t.gateway_identity
    );
    assert_eq!(
        annotations["mirror.linkerd.io/remote-svc-fq-name"],
        "web.shop.svc.cluster.local"
    );
    let labels = ep.metadata.labels.unwrap();
    assert_eq!(labels["mirror.linkerd.io/cluster-name"], "east");
    assert_eq!(labels["endpointslice.kubernetes.io/skip-mirror"], "true");
    assert!(!labels.contains_key("multicluster.linkerd.io/remote-discovery"));

    // Dead gateway: the same addresses, not ready.
    let ep = gateway_endpoints(&t, &remote, &mirror, true, &gateway(false, &[V4A]));
    let subsets = ep.subsets.unwrap();
    assert_eq!(subsets[0].addresses, None);
    assert_eq!(ips(&subsets[0].not_ready_addresses), ["192.0.2.1"]);

    // Remote without ready endpoints: no subsets at all, written as an empty list so that
    // server-side apply removes the ones written before.
    let ep = gateway_endpoints(&t, &remote, &mirror, false, &gateway(true, &[V4A]));
    assert_eq!(ep.subsets, Some(vec![]));
    assert_eq!(
        serde_json::to_value(&ep).unwrap()["subsets"],
        serde_json::json!([])
    );

    // No gateway identity: no identity annotation.
    let anonymous = Target {
        gateway_identity: String::new(),
        ..t.clone()
    };
    let ep = gateway_endpoints(&anonymous, &remote, &mirror, true, &gateway(true, &[V4A]));
    assert!(
        !ep.metadata
            .annotations
            .unwrap()
            .contains_key("mirror.linkerd.io/remote-gateway-identity")
    );
}

#[test]
fn gateway_slices_match_endpoints_per_family() {
    let t = target();
    let remote = web();
    let mirror = mirror_service(&t, &remote, Mode::Gateway).unwrap();

    let slices = gateway_slices(&t, &remote, &mirror, true, &gateway(true, &[V4A, V6]));
    let summary: Vec<_> = slices
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap(),
                s.address_type.clone(),
                s.endpoints
                    .iter()
                    .flatten()
                    .map(|e| (e.addresses[0].clone(), e.conditions.as_ref().unwrap().ready))
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "web-east-ipv4".to_owned(),
                "IPv4".to_owned(),
                vec![("192.0.2.1".to_owned(), Some(true))]
            ),
            (
                "web-east-ipv6".to_owned(),
                "IPv6".to_owned(),
                vec![("2001:db8::1".to_owned(), Some(true))]
            ),
        ]
    );
    let labels = slices[0].metadata.labels.clone().unwrap();
    assert_eq!(labels["kubernetes.io/service-name"], "web-east");
    assert_eq!(
        labels["endpointslice.kubernetes.io/managed-by"],
        SLICE_MANAGED_BY
    );
    assert_eq!(
        slices[0].metadata.annotations.clone().unwrap()["mirror.linkerd.io/remote-gateway-identity"],
        t.gateway_identity
    );
    let ports: Vec<_> = slices[0].ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [Some(4143), Some(4143)]);

    // Dead gateway: not ready and not serving.
    let slices = gateway_slices(&t, &remote, &mirror, true, &gateway(false, &[V4A]));
    assert_eq!(slices.len(), 1);
    let cond = slices[0].endpoints.as_ref().unwrap()[0]
        .conditions
        .clone()
        .unwrap();
    assert_eq!(
        (cond.ready, cond.serving, cond.terminating),
        (Some(false), Some(false), Some(false))
    );

    // Empty remote: the slice exists, with no endpoints.
    let slices = gateway_slices(&t, &remote, &mirror, false, &gateway(true, &[V4A]));
    assert_eq!(slices[0].endpoints.as_deref(), Some(&[][..]));
}

#[test]
fn target_from_spec() {
    let spec = LinkSpec {
        target_cluster_name: "east".into(),
        gateway_port: "4143".into(),
        ..LinkSpec::default()
    };
    assert_eq!(Target::from_spec(&spec).gateway_port, Some(4143));
    for bad in ["", "0", "http"] {
        let spec = LinkSpec {
            gateway_port: bad.into(),
            ..LinkSpec::default()
        };
        assert_eq!(Target::from_spec(&spec).gateway_port, None, "{bad:?}");
    }
}

#[test]
fn headless_root_and_endpoint_mirrors() {
    let t = target();
    let remote = web();
    let root = headless_mirror_service(&t, &remote).unwrap();
    assert!(is_headless(&root));
    assert_eq!(root.metadata.name.as_deref(), Some("web-east"));

    let pod = endpoint_mirror_service(&t, &remote, "web-east", "web-0", "8812").unwrap();
    assert_eq!(pod.metadata.name.as_deref(), Some("web-0-east"));
    assert!(
        !is_headless(&pod),
        "a pod's mirror has a ClusterIP of its own"
    );
    let labels = pod.metadata.labels.as_ref().unwrap();
    assert_eq!(
        labels["mirror.linkerd.io/headless-mirror-svc-name"],
        "web-east"
    );
    assert_eq!(labels["mirror.linkerd.io/cluster-name"], "east");
    let annotations = pod.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations["mirror.linkerd.io/remote-svc-fq-name"],
        "web-0.web.shop.svc.cluster.local"
    );
    // The version of the remote slice the pod's mirror is made from, not the Service's (4711).
    assert_eq!(
        annotations["mirror.linkerd.io/remote-resource-version"],
        "8812"
    );
    assert_eq!(annotations.len(), 2, "{annotations:?}");

    // The pod's mirror reaches the gateway, named and labelled for the pod.
    let (ep, slices) = endpoint_mirror_endpoints(
        &t,
        &remote,
        &pod,
        &gateway(true, &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]),
    );
    assert_eq!(ep.metadata.name.as_deref(), Some("web-0-east"));
    let subset = &ep.subsets.as_ref().unwrap()[0];
    assert_eq!(subset.addresses.as_ref().unwrap()[0].ip, "192.0.2.1");
    assert!(
        subset
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .all(|p| p.port == 4143)
    );
    for meta in std::iter::once(&ep.metadata).chain(slices.iter().map(|s| &s.metadata)) {
        assert_eq!(
            meta.labels.as_ref().unwrap()["mirror.linkerd.io/headless-mirror-svc-name"],
            "web-east"
        );
        assert_eq!(
            meta.annotations.as_ref().unwrap()["mirror.linkerd.io/remote-svc-fq-name"],
            "web-0.web.shop.svc.cluster.local"
        );
    }

    // The root names each pod at its mirror's ClusterIP, on the pods' own ports.
    let pods = vec![("web-0".to_owned(), IpAddr::V4(Ipv4Addr::new(10, 96, 0, 7)))];
    let ports = vec![(Some("http".to_owned()), Some(8080), Some("TCP".to_owned()))];
    let (ep, slices) = headless_endpoints(&t, &remote, &root, &pods, &ports, true);
    let subset = &ep.subsets.as_ref().unwrap()[0];
    let a = &subset.addresses.as_ref().unwrap()[0];
    assert_eq!(
        (a.hostname.as_deref(), a.ip.as_str()),
        (Some("web-0"), "10.96.0.7")
    );
    assert_eq!(subset.ports.as_ref().unwrap()[0].port, 8080);
    assert_eq!(slices.len(), 1);
    let e = &slices[0].endpoints.as_ref().unwrap()[0];
    assert_eq!(e.hostname.as_deref(), Some("web-0"));
    assert_eq!(
        slices[0].metadata.labels.as_ref().unwrap()["kubernetes.io/service-name"],
        "web-east"
    );

    // A dead gateway: the pods are published, not ready.
    let (ep, slices) = headless_endpoints(&t, &remote, &root, &pods, &ports, false);
    let subset = &ep.subsets.as_ref().unwrap()[0];
    assert!(subset.addresses.is_none());
    assert_eq!(subset.not_ready_addresses.as_ref().unwrap().len(), 1);
    let c = slices[0].endpoints.as_ref().unwrap()[0]
        .conditions
        .as_ref()
        .unwrap();
    assert_eq!(c.ready, Some(false));

    // No ready pod: no subsets (clients fail fast).
    let (ep, _) = headless_endpoints(&t, &remote, &root, &[], &ports, true);
    assert!(ep.subsets.as_ref().unwrap().is_empty());
}
