//! One table per decision: each row a situation, and what the check must say about it.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::jiff::ToSpan;
use proxy_identity::ca::{self, CertKey};
use serde_json::json;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn now() -> Timestamp {
    Timestamp::now()
}

fn later(days: i64) -> Timestamp {
    now() + SignedDuration::from_hours(24 * days)
}

/// What an outcome is and the text of its lines, for assertions.
fn shape(o: &Outcome) -> (&'static str, String) {
    match o {
        Outcome::Pass(l) => ("pass", l.join("\n")),
        Outcome::Fail(l) => ("fail", l.join("\n")),
        Outcome::Skip(s) => ("skip", s.clone()),
    }
}

/// Asserts each row: `(name, outcome, kind, text the lines contain)`.
fn assert_table(rows: Vec<(&str, Outcome, &str, &str)>) {
    for (name, outcome, kind, text) in rows {
        let (got, lines) = shape(&outcome);
        assert_eq!(got, kind, "{name}: {lines}");
        assert!(lines.contains(text), "{name}: {lines:?} lacks {text:?}");
    }
}

fn forbidden() -> ApiFailure {
    ApiFailure {
        code: Some(403),
        message: "forbidden".into(),
    }
}

fn anchor() -> CertKey {
    ca::new_anchor("root.linkerd.cluster.local", 3650 * DAY).unwrap()
}

fn issuer_of(anchor: &CertKey, lifetime: Duration) -> CertKey {
    ca::new_issuer(anchor, "identity.linkerd.cluster.local", lifetime).unwrap()
}

/// A workload (non-CA) certificate signed by `by`.
fn leaf_of(by: &CertKey) -> String {
    let signer = ca::Signer::from_pem(&by.cert_pem, &by.key_pem).unwrap();
    let id = proxy_identity::Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local")
        .unwrap();
    let (der, _) = signer.issue(&id, 30 * DAY).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
}

fn roots(pems: &[&str]) -> Fetched<Option<TrustRoots>> {
    Ok(Some(TrustRoots {
        bundle: Some(pems.concat()),
    }))
}

fn issuer(pem: &str) -> Fetched<Option<Issuer>> {
    Ok(Some(Issuer {
        cert_pem: Some(pem.to_owned()),
    }))
}

#[test]
fn trust_anchors() {
    let (a, b) = (anchor(), anchor());
    let leaf = leaf_of(&a);
    let t = now();
    assert_table(vec![
        (
            "unreadable",
            trust_anchors_valid(&Err(forbidden()), t),
            "fail",
            "cannot read ConfigMap linkerd/linkerd-identity-trust-roots: forbidden (HTTP 403)",
        ),
        (
            "absent",
            trust_anchors_valid(&Ok(None), t),
            "fail",
            "does not exist",
        ),
        (
            "no key",
            trust_anchors_valid(&Ok(Some(TrustRoots::default())), t),
            "fail",
            "has no ca-bundle.crt key",
        ),
        (
            "not PEM",
            trust_anchors_valid(&roots(&["hello"]), t),
            "fail",
            "no PEM CERTIFICATE block",
        ),
        (
            "a leaf",
            trust_anchors_valid(&roots(&[&leaf]), t),
            "fail",
            "is not a CA certificate",
        ),
        (
            "valid",
            trust_anchors_valid(&roots(&[&a.cert_pem]), t),
            "pass",
            "1 anchor(s)",
        ),
        (
            "two",
            trust_anchors_valid(&roots(&[&a.cert_pem, &b.cert_pem]), t),
            "pass",
            "2 anchor(s)",
        ),
        (
            "expired",
            trust_anchors_valid(&roots(&[&a.cert_pem]), later(3651)),
            "fail",
            "expired at",
        ),
        (
            "not yet",
            trust_anchors_valid(&roots(&[&a.cert_pem]), later(-1)),
            "fail",
            "is not valid before",
        ),
    ]);
}

#[test]
fn issuer_validity() {
    let (a, b) = (anchor(), anchor());
    let issuer_a = issuer_of(&a, 365 * DAY);
    let leaf = leaf_of(&a);
    let t = now();
    let ra = roots(&[&a.cert_pem]);
    assert_table(vec![
        (
            "absent",
            issuer_valid(&Ok(None), &ra, t),
            "fail",
            "Secret linkerd/linkerd-identity-issuer does not exist",
        ),
        (
            "unreadable",
            issuer_valid(&Err(forbidden()), &ra, t),
            "fail",
            "cannot read Secret",
        ),
        (
            "no tls.crt",
            issuer_valid(&Ok(Some(Issuer::default())), &ra, t),
            "fail",
            "has no tls.crt",
        ),
        (
            "signed by the anchor",
            issuer_valid(&issuer(&issuer_a.cert_pem), &ra, t),
            "pass",
            "issued by CN=root.linkerd.cluster.local",
        ),
        (
            "signed by one of two",
            issuer_valid(
                &issuer(&issuer_a.cert_pem),
                &roots(&[&b.cert_pem, &a.cert_pem]),
                t,
            ),
            "pass",
            "valid until",
        ),
        (
            "signed by another anchor",
            issuer_valid(&issuer(&issuer_a.cert_pem), &roots(&[&b.cert_pem]), t),
            "fail",
            "is not signed by any of the 1 trust anchor(s)",
        ),
        (
            "expired",
            issuer_valid(&issuer(&issuer_a.cert_pem), &ra, later(366)),
            "fail",
            "expired at",
        ),
        (
            "a leaf",
            issuer_valid(&issuer(&leaf), &ra, t),
            "fail",
            "is not a CA certificate",
        ),
        (
            "no anchors",
            issuer_valid(&issuer(&issuer_a.cert_pem), &Ok(None), t),
            "fail",
            "cannot tell whether the issuer chains",
        ),
    ]);
}

#[test]
fn issuer_expiry() {
    let a = anchor();
    let year = issuer(&issuer_of(&a, 365 * DAY).cert_pem);
    assert_table(vec![
        (
            "a year left",
            issuer_not_expiring(&year, now()),
            "pass",
            "more days",
        ),
        (
            "45 days left",
            issuer_not_expiring(&year, later(320)),
            "fail",
            "in 44 day(s)",
        ),
        (
            "expired",
            issuer_not_expiring(&year, later(400)),
            "fail",
            "expired at",
        ),
        (
            "unreadable",
            issuer_not_expiring(&Ok(None), now()),
            "skip",
            "identity issuer is valid",
        ),
    ]);
}

#[test]
fn services_ready() {
    let r = |ready, not_ready| Ok(Some(Readiness { ready, not_ready }));
    assert_table(vec![
        (
            "dst unreadable",
            destination_ready(&Err(forbidden())),
            "fail",
            "cannot read Service linkerd/linkerd-dst",
        ),
        (
            "dst absent",
            destination_ready(&Ok(None)),
            "fail",
            "Service linkerd/linkerd-dst does not exist",
        ),
        (
            "dst not ready",
            destination_ready(&r(0, 2)),
            "fail",
            "no ready endpoints (2 not ready)",
        ),
        (
            "dst ready",
            destination_ready(&r(1, 1)),
            "pass",
            "1 ready endpoint(s)",
        ),
        (
            "no gateway",
            gateway_ready(&Ok(None)),
            "skip",
            "no gateway installed",
        ),
        (
            "gateway not ready",
            gateway_ready(&r(0, 1)),
            "fail",
            "Service linkerd-multicluster/linkerd-gateway has no ready endpoints",
        ),
        ("gateway ready", gateway_ready(&r(2, 0)), "pass", "2 ready"),
        (
            "gateway unreadable",
            gateway_ready(&Err(forbidden())),
            "fail",
            "cannot read",
        ),
    ]);
}

#[test]
fn injector() {
    let hooks = |h: &[(&str, bool)]| -> Fetched<Option<Webhook>> {
        Ok(Some(Webhook {
            webhooks: h.iter().map(|(n, c)| ((*n).to_owned(), *c)).collect(),
        }))
    };
    let good = hooks(&[("linkerd-proxy-injector.linkerd.io", true)]);
    let containers = |c: &[&str]| Some(Ok(c.iter().map(|s| (*s).to_owned()).collect()));
    assert_table(vec![
        (
            "absent",
            injector_registered(&Ok(None)),
            "fail",
            "MutatingWebhookConfiguration linkerd-proxy-injector-webhook-config does not exist",
        ),
        (
            "unreadable",
            injector_registered(&Err(forbidden())),
            "fail",
            "cannot read",
        ),
        (
            "no webhooks",
            injector_registered(&hooks(&[])),
            "fail",
            "has no webhooks",
        ),
        (
            "no CA",
            injector_registered(&hooks(&[("a", true), ("b", false)])),
            "fail",
            "webhook b has no caBundle",
        ),
        (
            "registered",
            injector_registered(&good),
            "pass",
            "1 webhook(s)",
        ),
        (
            "not registered",
            injector_reachable(&Ok(None), &None),
            "skip",
            "not registered",
        ),
        (
            "not tried",
            injector_reachable(&good, &None),
            "skip",
            "no dry-run",
        ),
        (
            "refused",
            injector_reachable(&good, &Some(Err(forbidden()))),
            "fail",
            "dry-run Pod create in namespace default failed: forbidden",
        ),
        (
            "injected",
            injector_reachable(&good, &containers(&["check", "linkerd-proxy"])),
            "pass",
            "came back with linkerd-proxy",
        ),
        (
            "not injected",
            injector_reachable(&good, &containers(&["check"])),
            "fail",
            "without a linkerd-proxy container (containers: check)",
        ),
    ]);
}

fn raw(name: &str, spec: serde_json::Value, status: serde_json::Value) -> RawLink {
    let link = serde_json::from_value::<Link>(json!({
        "apiVersion": "multicluster.linkerd.io/v1alpha3", "kind": "Link",
        "metadata": { "name": name, "namespace": "linkerd-multicluster" },
        "spec": spec, "status": status,
    }))
    .map_err(|e| e.to_string());
    RawLink {
        namespace: "linkerd-multicluster".into(),
        name: name.into(),
        created_by: Some(CLI_CREATED_BY.into()),
        link,
    }
}

fn east_spec() -> serde_json::Value {
    json!({
        "targetClusterName": "east",
        "clusterCredentialsSecret": "cluster-credentials-east",
        "gatewayAddress": "192.0.2.1", "gatewayPort": "4143",
        "probeSpec": { "path": "/ready", "port": "4191", "period": "3s" },
    })
}

fn east() -> RawLink {
    raw("east", east_spec(), json!({}))
}

fn k(name: &str) -> LinkKey {
    ("linkerd-multicluster".into(), name.into())
}

#[test]
fn links() {
    let not_found = ApiFailure {
        code: Some(404),
        message: "the server could not find the requested resource".into(),
    };
    let broken = RawLink {
        link: Err("it does not read as a Link: invalid type".into()),
        ..east()
    };
    let no_target = raw(
        "north",
        json!({ "clusterCredentialsSecret": "c" }),
        json!({}),
    );
    let no_secret = raw("west", json!({ "targetClusterName": "west" }), json!({}));
    let by = |v: Option<&str>| RawLink {
        created_by: v.map(str::to_owned),
        ..east()
    };
    assert_table(vec![
        (
            "crd missing",
            link_crd_exists(&Err(not_found.clone())),
            "fail",
            "links.multicluster.linkerd.io (version v1alpha3) is not installed",
        ),
        (
            "forbidden",
            link_crd_exists(&Err(forbidden())),
            "fail",
            "cannot list Links: forbidden",
        ),
        (
            "crd there",
            link_crd_exists(&Ok(vec![])),
            "pass",
            "0 Link(s)",
        ),
        ("no links", links_valid(&Ok(vec![])), "skip", "no Links"),
        (
            "valid",
            links_valid(&Ok(vec![east()])),
            "pass",
            "* linkerd-multicluster/east (target east)",
        ),
        (
            "unreadable",
            links_valid(&Ok(vec![east(), broken])),
            "fail",
            "* linkerd-multicluster/east: it does not read as a Link",
        ),
        (
            "no target",
            links_valid(&Ok(vec![no_target])),
            "fail",
            "spec.targetClusterName is empty",
        ),
        (
            "no secret",
            links_valid(&Ok(vec![no_secret])),
            "fail",
            "spec.clusterCredentialsSecret is empty",
        ),
        (
            "same version",
            links_version(&Ok(vec![by(Some(CLI_CREATED_BY))]), CLI_CREATED_BY),
            "pass",
            CLI_CREATED_BY,
        ),
        (
            "linkerd's",
            links_version(
                &Ok(vec![by(Some("linkerd/cli stable-2.14.1"))]),
                CLI_CREATED_BY,
            ),
            "fail",
            "was created by \"linkerd/cli stable-2.14.1\"",
        ),
        (
            "unknown",
            links_version(&Ok(vec![by(None)]), CLI_CREATED_BY),
            "fail",
            "unable to determine the version",
        ),
        (
            "no links to version",
            links_version(&Ok(vec![]), CLI_CREATED_BY),
            "skip",
            "no Links",
        ),
    ]);
}

fn reachable_remote(anchors: Option<Fetched<Option<TrustRoots>>>) -> Remote {
    Remote {
        client: Ok(()),
        version: Some(Ok("v1.36.3".into())),
        services: vec![("get", Ok(true)), ("list", Ok(true)), ("watch", Ok(true))],
        anchors,
        anchors_namespace: "linkerd".into(),
    }
}

#[test]
fn credentials() {
    let links = Ok(vec![east()]);
    let with = |r: Remote| BTreeMap::from([(k("east"), r)]);
    let ok = reachable_remote(None);
    let cases = vec![
        ("valid", with(ok.clone()), "pass", "* east: Kubernetes v1.36.3"),
        ("no Secret", with(Remote { client: Err("Secret linkerd-multicluster/cluster-credentials-east does not exist: apply the credentials that `meshlink link` prints for this Link".into()), version: None, services: vec![], ..ok.clone() }), "fail", "* east: Secret linkerd-multicluster/cluster-credentials-east does not exist"),
        ("unreachable", with(Remote { version: Some(Err(ApiFailure { code: None, message: "connection refused".into() })), services: vec![], ..ok.clone() }), "fail", "cannot reach the API server of east with the Link's credentials: connection refused"),
        ("may not watch", with(Remote { services: vec![("get", Ok(true)), ("list", Ok(false)), ("watch", Ok(false))], ..ok.clone() }), "fail", "may not list, watch Services in every namespace of east"),
        ("review refused", with(Remote { services: vec![("get", Err(forbidden()))], ..ok.clone() }), "fail", "cannot review"),
        ("appeared later", BTreeMap::new(), "skip", "not checked"),
    ];
    assert_table(
        cases
            .into_iter()
            .map(|(n, remotes, kind, text)| (n, credentials_valid(&links, &remotes), kind, text))
            .collect(),
    );
    assert_eq!(
        shape(&credentials_valid(&Ok(vec![]), &BTreeMap::new())).0,
        "skip"
    );
}

#[test]
fn anchors() {
    let (a, b) = (anchor(), anchor());
    let links = Ok(vec![east()]);
    let with = |r: Remote| BTreeMap::from([(k("east"), r)]);
    let remote_roots = |p: &[&str]| reachable_remote(Some(roots(p)));
    let local = roots(&[&a.cert_pem]);
    let cases = vec![
        (
            "same",
            local.clone(),
            with(remote_roots(&[&a.cert_pem])),
            "pass",
            "* east: 1 shared anchor(s)",
        ),
        (
            "other anchor",
            local.clone(),
            with(remote_roots(&[&b.cert_pem])),
            "fail",
            "* east: the trust anchors differ; only here: CN=root.linkerd.cluster.local (serial",
        ),
        (
            "a superset",
            local.clone(),
            with(remote_roots(&[&a.cert_pem, &b.cert_pem])),
            "fail",
            "only here: none; only in east: CN=root",
        ),
        (
            "forbidden",
            local.clone(),
            with(reachable_remote(Some(Err(forbidden())))),
            "fail",
            "may not read ConfigMap linkerd/linkerd-identity-trust-roots in east: grant its ServiceAccount `get` on it there",
        ),
        (
            "absent remotely",
            local.clone(),
            with(reachable_remote(Some(Ok(None)))),
            "fail",
            "east's ConfigMap linkerd/linkerd-identity-trust-roots does not exist",
        ),
        (
            "no client",
            local.clone(),
            with(Remote {
                client: Err("no".into()),
                anchors: None,
                ..reachable_remote(None)
            }),
            "skip",
            "not compared",
        ),
        (
            "local unreadable",
            Ok(None),
            with(remote_roots(&[&a.cert_pem])),
            "skip",
            "this cluster's anchors cannot be read",
        ),
    ];
    assert_table(
        cases
            .into_iter()
            .map(|(n, local, remotes, kind, text)| {
                (n, anchors_shared(&local, &links, &remotes), kind, text)
            })
            .collect(),
    );
}

#[test]
fn rbac() {
    let links = Ok(vec![east()]);
    let access = |answers: Vec<(&str, Fetched<bool>)>| AccountAccess {
        account: "linkerd-multicluster/meshlink-service-mirror".into(),
        answers: answers
            .into_iter()
            .map(|(p, a)| (p.to_owned(), a))
            .collect(),
    };
    let with = |a: Fetched<Vec<AccountAccess>>| BTreeMap::from([(k("east"), a)]);
    let cases = vec![
        (
            "allowed",
            with(Ok(vec![access(vec![("list services", Ok(true))])])),
            "pass",
            "* east: ServiceAccount linkerd-multicluster/meshlink-service-mirror",
        ),
        (
            "denied",
            with(Ok(vec![access(vec![
                ("list services", Ok(true)),
                (
                    "patch links.multicluster.linkerd.io/status in linkerd-multicluster",
                    Ok(false),
                ),
                (
                    "update leases.coordination.k8s.io in linkerd-multicluster",
                    Ok(false),
                ),
            ])])),
            "fail",
            "may not patch links.multicluster.linkerd.io/status in linkerd-multicluster, update leases",
        ),
        (
            "no controller",
            with(Ok(vec![])),
            "fail",
            "no service-mirror controller Deployment in namespace linkerd-multicluster",
        ),
        (
            "unlistable",
            with(Err(forbidden())),
            "fail",
            "cannot find its controller",
        ),
        (
            "review refused",
            with(Ok(vec![access(vec![("list services", Err(forbidden()))])])),
            "fail",
            "cannot review ServiceAccount",
        ),
    ];
    assert_table(
        cases
            .into_iter()
            .map(|(n, rbac, kind, text)| (n, controller_rbac(&links, &rbac), kind, text))
            .collect(),
    );
}

fn lease(name: &str, holder: Option<&str>, renewed_ago: i64, duration: i32) -> LeaseFact {
    LeaseFact {
        name: name.into(),
        holder: holder.map(str::to_owned),
        renewed: Some(now() - renewed_ago.seconds()),
        duration_seconds: Some(duration),
    }
}

fn leases(l: Vec<LeaseFact>) -> BTreeMap<String, Fetched<Vec<LeaseFact>>> {
    BTreeMap::from([("linkerd-multicluster".to_owned(), Ok(l))])
}

#[test]
fn controllers() {
    let links = Ok(vec![east()]);
    let cases = vec![
        (
            "shared lease held",
            leases(vec![lease(SHARED_LEASE, Some("mirror-0"), 2, 15)]),
            "pass",
            "* east: held by mirror-0 (Lease meshlink-service-mirror-write, renewed 2s ago)",
        ),
        (
            "own lease held",
            leases(vec![lease(
                "service-mirror-write-east",
                Some("mirror-1"),
                1,
                30,
            )]),
            "pass",
            "held by mirror-1",
        ),
        (
            "expired",
            leases(vec![lease(SHARED_LEASE, Some("mirror-0"), 25, 15)]),
            "fail",
            "Lease linkerd-multicluster/meshlink-service-mirror-write of mirror-0 expired 10s ago",
        ),
        (
            "released",
            leases(vec![LeaseFact {
                holder: None,
                renewed: None,
                ..lease(SHARED_LEASE, None, 0, 15)
            }]),
            "fail",
            "was released: the controller stopped",
        ),
        (
            "another Link's lease",
            leases(vec![lease(
                "service-mirror-write-west",
                Some("mirror-2"),
                1,
                15,
            )]),
            "fail",
            "no controller has ever held Lease service-mirror-write-east or meshlink-service-mirror-write",
        ),
        (
            "one of two held",
            leases(vec![
                lease(SHARED_LEASE, Some("old"), 100, 15),
                lease("service-mirror-write-east", Some("new"), 1, 15),
            ]),
            "pass",
            "held by new",
        ),
        (
            "unreadable",
            BTreeMap::from([("linkerd-multicluster".to_owned(), Err(forbidden()))]),
            "fail",
            "cannot read the Leases in linkerd-multicluster",
        ),
    ];
    let t = now();
    assert_table(
        cases
            .into_iter()
            .map(|(n, l, kind, text)| (n, controllers_running(&links, &l, t), kind, text))
            .collect(),
    );
}

fn cond(t: &str, s: &str, reason: &str, message: &str) -> serde_json::Value {
    json!({ "type": t, "status": s, "reason": reason, "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z" })
}

#[test]
fn status_conditions() {
    let running = leases(vec![lease(SHARED_LEASE, Some("mirror-0"), 1, 15)]);
    let stopped = leases(vec![]);
    let with = |conditions: Vec<serde_json::Value>, latency: Option<u64>| {
        let mut status = json!({ "conditions": conditions });
        if let Some(ms) = latency {
            status["gateway"] = json!({ "latencyMilliseconds": ms });
        }
        Ok(vec![raw("east", east_spec(), status)])
    };
    let no_gateway = Ok(vec![raw(
        "east",
        json!({ "targetClusterName": "east", "clusterCredentialsSecret": "c" }),
        json!({}),
    )]);
    let t = now();
    let reachable = with(
        vec![cond("RemoteReachable", "True", "RemoteReachable", "")],
        None,
    );
    let unreachable = with(
        vec![cond(
            "RemoteReachable",
            "False",
            "CredentialsMissing",
            "Secret linkerd-multicluster/cluster-credentials-east does not exist",
        )],
        None,
    );
    let alive = with(
        vec![cond("GatewayAlive", "True", "GatewayAlive", "")],
        Some(3),
    );
    let dead = with(
        vec![cond(
            "GatewayAlive",
            "False",
            "GatewayDead",
            "3 probes failed: connection refused",
        )],
        None,
    );
    assert_table(vec![
        (
            "reachable",
            remotes_reachable(&reachable, &running, t),
            "pass",
            "* east: east reachable",
        ),
        (
            "unreachable",
            remotes_reachable(&unreachable, &running, t),
            "fail",
            "* east: RemoteReachable is False since 2026-01-01T00:00:00Z: CredentialsMissing: Secret",
        ),
        (
            "not reported",
            remotes_reachable(&with(vec![], None), &running, t),
            "fail",
            "has not reported RemoteReachable yet",
        ),
        (
            "stale",
            remotes_reachable(&unreachable, &stopped, t),
            "skip",
            "no controller is running",
        ),
        (
            "alive",
            gateways_alive(&alive, &running, t),
            "pass",
            "* east: gateway 192.0.2.1 alive, latency 3ms",
        ),
        (
            "dead",
            gateways_alive(&dead, &running, t),
            "fail",
            "the gateway at 192.0.2.1:4143 (probe port 4191) is not alive since 2026-01-01T00:00:00Z: GatewayDead: 3 probes failed",
        ),
        (
            "no probe",
            gateways_alive(&no_gateway, &running, t),
            "skip",
            "no gateway probe",
        ),
        (
            "nobody probes",
            gateways_alive(&dead, &stopped, t),
            "skip",
            "nothing probes its gateway",
        ),
        (
            "not probed yet",
            gateways_alive(&with(vec![], None), &running, t),
            "fail",
            "has not reported GatewayAlive yet",
        ),
    ]);
}

fn mirror(
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    endpoints: Fetched<Readiness>,
) -> Mirror {
    let map = |p: &[(&str, &str)]| {
        p.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    Mirror {
        namespace: "shop".into(),
        name: name.into(),
        labels: map(labels),
        annotations: map(annotations),
        endpoints,
    }
}

#[test]
fn mirrors() {
    let of_east = [
        (keys::MIRRORED_RESOURCE_LABEL, "true"),
        (keys::CLUSTER_NAME_LABEL, "east"),
    ];
    let ready = |n| {
        Ok(Readiness {
            ready: n,
            not_ready: 0,
        })
    };
    let none = Ok(Readiness {
        ready: 0,
        not_ready: 1,
    });
    let web = mirror("web-east", &of_east, &[], ready(1));
    let db = mirror("db-east", &of_east, &[], none.clone());
    let probe = mirror(
        "probe-gateway-east",
        &[
            (keys::MIRRORED_GATEWAY_LABEL, "true"),
            (keys::CLUSTER_NAME_LABEL, "east"),
        ],
        &[],
        none.clone(),
    );
    let remote = mirror(
        "api-east",
        &[
            (keys::REMOTE_DISCOVERY_KEY, "east"),
            (keys::CLUSTER_NAME_LABEL, "east"),
        ],
        &[],
        none.clone(),
    );
    let federated = mirror(
        "web-federated",
        &[(keys::MIRRORED_RESOURCE_LABEL, "true")],
        &[(keys::REMOTE_DISCOVERY_KEY, "web@east")],
        none.clone(),
    );
    let orphan = mirror(
        "web-gone",
        &[(keys::CLUSTER_NAME_LABEL, "gone")],
        &[],
        ready(1),
    );
    let links = Ok(vec![east()]);
    assert_table(vec![
        (
            "ready",
            mirrors_have_endpoints(&Ok(vec![web.clone()])),
            "pass",
            "* shop/web-east (from east): 1 ready",
        ),
        (
            "one without",
            mirrors_have_endpoints(&Ok(vec![web.clone(), db.clone()])),
            "fail",
            "* shop/db-east (from east) has no ready endpoints (1 not ready)",
        ),
        (
            "not mirrors of their own",
            mirrors_have_endpoints(&Ok(vec![probe.clone(), remote.clone(), federated.clone()])),
            "skip",
            "no mirror Services",
        ),
        (
            "unreadable endpoints",
            mirrors_have_endpoints(&Ok(vec![mirror("x", &of_east, &[], Err(forbidden()))])),
            "fail",
            "cannot read its endpoints",
        ),
        (
            "unlistable",
            mirrors_have_endpoints(&Err(forbidden())),
            "fail",
            "cannot list mirror Services",
        ),
        (
            "all linked",
            mirrors_part_of_link(&Ok(vec![web.clone(), probe.clone(), federated]), &links),
            "pass",
            "* shop/web-east (east)",
        ),
        (
            "orphan",
            mirrors_part_of_link(&Ok(vec![web, orphan]), &links),
            "fail",
            "* mirror Service shop/web-gone is not part of any Link (cluster gone)",
        ),
        (
            "probe of an unlinked cluster",
            mirrors_part_of_link(&Ok(vec![probe]), &Ok(vec![])),
            "skip",
            "no mirror Services",
        ),
    ]);
}

fn pod_fact(
    namespace: &str,
    name: &str,
    pod: serde_json::Value,
    ns_labels: &[(&str, &str)],
    ns_annotations: &[(&str, &str)],
) -> PodFact {
    let mut pod = pod;
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["namespace"] = json!(namespace);
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    PodFact {
        pod: serde_json::from_value(pod).unwrap(),
        namespace_labels: map(ns_labels),
        namespace_annotations: map(ns_annotations),
    }
}

#[test]
fn pods_asking_for_the_proxy() {
    let enabled = [("linkerd.io/inject", "enabled")];
    let app = json!({ "spec": { "containers": [{ "name": "app" }] } });
    let meshed =
        json!({ "spec": { "containers": [{ "name": "linkerd-proxy" }, { "name": "app" }] } });
    let asks = json!({
        "metadata": {
            "annotations": { "linkerd.io/inject": "enabled" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "api-7f", "uid": "1", "controller": true }],
        },
        "spec": { "containers": [{ "name": "app" }] },
    });
    let done = json!({ "spec": { "containers": [{ "name": "app" }] }, "status": { "phase": "Succeeded" } });
    let host = json!({ "spec": { "hostNetwork": true, "containers": [{ "name": "app" }] } });
    let disabled = json!({
        "metadata": { "annotations": { "linkerd.io/inject": "disabled" } },
        "spec": { "containers": [{ "name": "app" }] },
    });
    let webhooks_off = [("config.linkerd.io/admission-webhooks", "disabled")];
    assert_table(vec![
        (
            "nothing asks",
            pods_meshed(&Ok(vec![pod_fact("a", "x", app.clone(), &[], &[])])),
            "skip",
            "no Pod asks",
        ),
        (
            "meshed in an enabled namespace",
            pods_meshed(&Ok(vec![pod_fact(
                "shop",
                "web",
                meshed.clone(),
                &[],
                &enabled,
            )])),
            "pass",
            "1 meshed Pods",
        ),
        (
            "created while the webhook was down (namespace enabled)",
            pods_meshed(&Ok(vec![
                pod_fact("shop", "web", meshed.clone(), &[], &enabled),
                pod_fact("shop", "late", app.clone(), &[], &enabled),
            ])),
            "fail",
            "* shop/late asks for the proxy but runs without it",
        ),
        (
            "created while the webhook was down (template enabled), with its owner",
            pods_meshed(&Ok(vec![pod_fact("plain", "api-7f-x", asks, &[], &[])])),
            "fail",
            "* plain/api-7f-x (of ReplicaSet api-7f) asks for the proxy",
        ),
        (
            "finished, host network, disabled, or outside the webhook's namespaces",
            pods_meshed(&Ok(vec![
                pod_fact("shop", "job", done, &[], &enabled),
                pod_fact("shop", "node-agent", host, &[], &enabled),
                pod_fact("shop", "opted-out", disabled, &[], &enabled),
                pod_fact("linkerd", "identity", app.clone(), &webhooks_off, &enabled),
                pod_fact("kube-system", "dns", app, &[], &enabled),
                pod_fact("shop", "web", meshed, &[], &enabled),
            ])),
            "pass",
            "1 meshed Pods",
        ),
        (
            "cannot list",
            pods_meshed(&Err(forbidden())),
            "fail",
            "cannot list Pods",
        ),
    ]);
}
