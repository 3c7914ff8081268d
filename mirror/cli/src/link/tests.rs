use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;

use super::*;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    args: LinkArgs,
}

fn args(extra: &[&str]) -> LinkArgs {
    let mut argv = vec!["meshlink-link", "--cluster-name", "east"];
    argv.extend_from_slice(extra);
    Wrapper::try_parse_from(argv).unwrap().args
}

fn gateway(value: serde_json::Value) -> Service {
    let mut base = json!({
        "metadata": {
            "name": "linkerd-gateway", "namespace": "linkerd-multicluster",
            "annotations": {
                "mirror.linkerd.io/gateway-identity": "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local",
                "mirror.linkerd.io/probe-path": "/ready",
                "mirror.linkerd.io/probe-period": "3",
            },
        },
        "spec": {
            "type": "LoadBalancer",
            "ports": [
                { "name": "mc-gateway", "port": 4143, "nodePort": 30143 },
                { "name": "mc-probe", "port": 4191, "nodePort": 30191 },
            ],
        },
        "status": { "loadBalancer": { "ingress": [{ "ip": "203.0.113.7" }, { "hostname": "gw.example.com" }] } },
    });
    merge(&mut base, value);
    serde_json::from_value(base).unwrap()
}

fn merge(base: &mut serde_json::Value, change: serde_json::Value) {
    match (base, change) {
        (serde_json::Value::Object(b), serde_json::Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (b, c) => *b = c,
    }
}

#[test]
fn gateway_facts_like_linkerd() {
    let f = gateway_facts(&gateway(json!({})), None, 0).unwrap();
    assert_eq!(f.addresses, "203.0.113.7,gw.example.com");
    assert_eq!(f.port, 4143);
    assert_eq!(f.probe.port, "4191");
    assert_eq!(f.probe.path, "/ready");
    assert_eq!(
        f.probe.period, "3s",
        "a bare number of seconds becomes a duration"
    );

    // NodePort gateways use node ports; overrides win.
    let f = gateway_facts(
        &gateway(json!({ "spec": { "type": "NodePort" } })),
        Some("10.0.0.1"),
        0,
    )
    .unwrap();
    assert_eq!(
        (f.addresses.as_str(), f.port, f.probe.port.as_str()),
        ("10.0.0.1", 30143, "30191")
    );
    assert_eq!(
        gateway_facts(&gateway(json!({})), None, 8443).unwrap().port,
        8443
    );
    let f = gateway_facts(
        &gateway(
            json!({ "metadata": { "annotations": { "mirror.linkerd.io/probe-period": "1m30s" } } }),
        ),
        None,
        0,
    )
    .unwrap();
    assert_eq!(f.probe.period, "1m30s");
}

#[test]
fn gateway_errors_say_what_to_fix() {
    let cases: Vec<(Service, &str)> = vec![
        (
            gateway(json!({ "status": { "loadBalancer": { "ingress": [] } } })),
            "pass --gateway-addresses",
        ),
        (
            gateway(
                json!({ "metadata": { "annotations": { "mirror.linkerd.io/gateway-identity": "" } } }),
            ),
            "gateway-identity annotation",
        ),
        (
            gateway(
                json!({ "metadata": { "annotations": { "mirror.linkerd.io/probe-path": null } } }),
            ),
            "probe-path annotation",
        ),
        (
            gateway(
                json!({ "metadata": { "annotations": { "mirror.linkerd.io/probe-period": "soon" } } }),
            ),
            "could not parse probe period",
        ),
        (
            gateway(json!({ "spec": { "ports": [{ "name": "mc-probe", "port": 4191 }] } })),
            "no port named mc-gateway",
        ),
        (
            gateway(json!({ "spec": { "ports": [{ "name": "mc-gateway", "port": 4143 }] } })),
            "no port named mc-probe",
        ),
    ];
    for (svc, want) in cases {
        let err = gateway_facts(&svc, None, 0).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn argument_checks() {
    assert!(check_args(&args(&[])).is_ok());
    let err = check_args(
        &Wrapper::try_parse_from(["x", "--cluster-name", "East_1"])
            .unwrap()
            .args,
    )
    .unwrap_err();
    assert!(err.to_string().contains("DNS label"), "{err}");
    for (flags, which) in [
        (
            vec!["--gateway=false", "--gateway-port", "1"],
            "gateway-port",
        ),
        (
            vec!["--gateway=false", "--gateway-addresses", "1.2.3.4"],
            "gateway-addresses",
        ),
        (vec!["--gateway=false", "-l", "a=b"], "selector"),
    ] {
        let err = check_args(&args(&flags)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("--{which} and --gateway=false")),
            "{err}"
        );
    }
}

fn kubeconfig(ca: &str) -> Kubeconfig {
    Kubeconfig::from_yaml(&format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: east\n\
         clusters: [{{name: east-cluster, cluster: {{server: 'https://127.0.0.1:6443', {ca}}}}}]\n\
         users: [{{name: admin, user: {{token: admin-secret}}}}]\n\
         contexts: [{{name: east, context: {{cluster: east-cluster, user: admin}}}}, {{name: other, context: {{cluster: missing, user: admin}}}}]\n"
    ))
    .unwrap()
}

#[test]
fn trimmed_kubeconfig_has_only_the_service_account() {
    let kc = kubeconfig("certificate-authority-data: Q0E=");
    let out = trimmed_kubeconfig(&kc, None, "sa", "sa-token", None).unwrap();
    assert!(
        !out.contains("admin-secret"),
        "the caller's credentials leaked: {out}"
    );
    let parsed = Kubeconfig::from_yaml(&out).unwrap();
    assert_eq!(parsed.auth_infos.len(), 1);
    assert_eq!(parsed.auth_infos[0].name, "sa");
    assert_eq!(
        parsed.clusters[0]
            .cluster
            .as_ref()
            .unwrap()
            .certificate_authority_data
            .as_deref(),
        Some("Q0E=")
    );
    assert_eq!(parsed.current_context.as_deref(), Some("east"));

    let out =
        trimmed_kubeconfig(&kc, None, "sa", "t", Some("https://east.example.com:6443")).unwrap();
    assert!(out.contains("https://east.example.com:6443"));

    // A CA given as a file is embedded, so the Secret works on another machine.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.crt");
    std::fs::write(&path, "PEM").unwrap();
    let kc = kubeconfig(&format!("certificate-authority: '{}'", path.display()));
    let out = trimmed_kubeconfig(&kc, None, "sa", "t", None).unwrap();
    assert!(out.contains("UEVN"), "{out}"); // base64("PEM")

    assert!(matches!(
        trimmed_kubeconfig(&kc, Some("nope"), "sa", "t", None),
        Err(LinkError::NoContext(_))
    ));
    assert!(matches!(
        trimmed_kubeconfig(&kc, Some("other"), "sa", "t", None),
        Err(LinkError::NoCluster { .. })
    ));
}

#[test]
fn renders_a_link_linkerd_would_write() {
    let a = args(&["--excluded-labels", "team.example.com/*,tier"]);
    let facts = TargetFacts {
        token: "t".into(),
        gateway: Some(gateway_facts(&gateway(json!({})), None, 0).unwrap()),
    };
    let docs = render(&a, &facts, "kubeconfig: yes").unwrap();
    assert_eq!(docs[0]["kind"], "Secret");
    assert_eq!(docs[0]["type"], "mirror.linkerd.io/remote-kubeconfig");
    assert_eq!(docs[0]["metadata"]["name"], "cluster-credentials-east");
    let link = &docs[1];
    assert_eq!(link["apiVersion"], "multicluster.linkerd.io/v1alpha3");
    let spec: LinkSpec = serde_json::from_value(link["spec"].clone()).unwrap();
    assert_eq!(spec.target_cluster_name, "east");
    assert_eq!(spec.gateway_port, "4143");
    assert_eq!(spec.selector, Some(link_crd::default_selector()));
    assert_eq!(
        spec.remote_discovery_selector,
        Some(link_crd::default_remote_discovery_selector())
    );
    assert_eq!(spec.excluded_labels, ["team.example.com/*", "tier"]);

    // Without a gateway: no gateway fields, no gateway selector.
    let a = args(&["--gateway=false"]);
    let docs = render(
        &a,
        &TargetFacts {
            token: "t".into(),
            gateway: None,
        },
        "k",
    )
    .unwrap();
    let spec: LinkSpec = serde_json::from_value(docs[1]["spec"].clone()).unwrap();
    assert!(
        spec.selector.is_none()
            && spec.gateway_address.is_empty()
            && spec.probe_spec.path.is_empty()
    );
}

#[test]
fn controller_manifests_follow_the_namespace() {
    let docs = controller_docs("mc");
    // Printed before the Link: the namespace must exist when `kubectl apply` reaches it.
    assert_eq!(
        (&docs[0]["kind"], &docs[0]["metadata"]["name"]),
        (&json!("Namespace"), &json!("mc"))
    );
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "Deployment" && d["metadata"]["namespace"] == "mc")
    );
    assert!(docs.iter().all(|d| {
        d["metadata"]["namespace"]
            .as_str()
            .is_none_or(|n| n == "mc")
    }));
}
