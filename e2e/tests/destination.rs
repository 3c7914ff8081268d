//! The destination service on two real clusters. `west` runs the identity service, the
//! service-mirror controller (linking to `east`) and `meshlink-destination` as its manifest's
//! ServiceAccount, so the manifest's RBAC is what is tested; the test is a proxy with a
//! certificate from `west`'s identity service, calling over mTLS.
//!
//! Needs root and iproute2: the service listens on a veth address (not loopback), where only
//! clients with a certificate from the trust anchors are served.

use std::{
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use e2e::{
    Cluster, Component,
    checks::Check,
    create_namespace, create_ready_pod,
    destination::{Followed, certified, channel, start_destination},
    install_link_crd,
    mesh::{self, IDENTITY_AUDIENCE, apply_manifest, start_identity},
    meshlink::{
        Program, apply_link, free_port, labels, put_credentials, remote_access_kubeconfig,
        service_account_token_for, start_mirror,
    },
    netns::Host,
    wait_for,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams},
};
use linkerd2_proxy_api::{
    destination::{GetDestination, destination_client::DestinationClient, tls_identity},
    inbound::{PortSpec, inbound_server_policies_client::InboundServerPoliciesClient},
    outbound::{
        TrafficSpec, outbound_policies_client::OutboundPoliciesClient, proxy_protocol, traffic_spec,
    },
};
use proxy_identity::Credentials;
use serde_json::json;
use tokio::sync::Mutex;

const NS: &str = "linkerd-multicluster";
const EAST_GATEWAY: &str = "192.0.2.10";
const EAST_GATEWAY_ID: &str =
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east";
const WAIT: Duration = Duration::from_secs(30);
/// A meshed Pod's label, as the injector sets it.
const MESHED: (&str, &str) = ("linkerd.io/control-plane-ns", "linkerd");

struct Env {
    /// east, west.
    clusters: Mutex<Vec<Cluster>>,
    east: Client,
    west: Client,
    east_node: String,
    west_node: String,
    _net: Host,
    _dir: tempfile::TempDir,
    _identity: Program,
    _mirror: Program,
    destination: Mutex<Program>,
    addr: SocketAddr,
    /// The test's own certificate (a meshed workload of `west`).
    creds: Arc<Credentials>,
}

fn main() -> ExitCode {
    let checks: &[(&str, Check<Env>)] = &[
        ("only_clients_with_a_certificate_may_call", |e| {
            Box::pin(client_certificates(e))
        }),
        ("get_follows_pods_and_services", |e| Box::pin(follows(e))),
        ("profiles_and_policies_follow_annotations", |e| {
            Box::pin(profiles_and_policies(e))
        }),
        ("a_gateway_mirror_resolves_to_the_gateway", |e| {
            Box::pin(gateway_mirror(e))
        }),
        (
            "a_federated_service_merges_clusters_and_keeps_a_lost_one",
            |e| Box::pin(federated(e)),
        ),
    ];
    e2e::checks::run(setup, checks, |e| &e.destination)
}

async fn setup() -> Result<Env> {
    proxy_identity::tls::install_default_provider();
    let clusters = Cluster::start_many(&["east", "west"]).await?;
    let [east, west] = &clusters[..] else {
        return Err(anyhow!("two clusters expected"));
    };
    let (e, w) = (east.client(), west.client());
    let dir = tempfile::tempdir()?;
    mesh::make_pki(dir.path(), &["west"])?;
    mesh::install_identity(west, dir.path(), "west").await?;
    install_link_crd(&w).await?;
    apply_manifest(west, "destination/destination.yaml").await?;

    // The services listen on the host side of a veth: reachable, and not loopback.
    let net = Host::create()?;
    let host = IpAddr::V4(net.host_address());
    let anchors = dir.path().join("anchor/ca.crt");
    let identity_addr = SocketAddr::new(host, free_port()?);
    let identity = start_identity(west, identity_addr, &anchors, "24h", dir.path()).await?;

    // west links to east; the controller mirrors and federates.
    let kubeconfig = remote_access_kubeconfig(east, NS).await?;
    put_credentials(west, NS, "east", &kubeconfig).await?;
    apply_link(
        &w,
        NS,
        "east",
        EAST_GATEWAY,
        json!({
            "gatewayIdentity": EAST_GATEWAY_ID,
            "federatedServiceSelector": { "matchLabels": { "mirror.linkerd.io/federated": "member" } },
        }),
    )
    .await?;
    let mirror = start_mirror(west.kubeconfig_path(), &[format!("--namespace={NS}")]).await?;

    let addr = SocketAddr::new(host, free_port()?);
    let destination =
        start_destination(west, addr, identity_addr, &anchors, dir.path(), &[]).await?;

    // The test calls as a meshed workload: default/default's identity.
    let token = dir.path().join("client.token");
    std::fs::write(
        &token,
        service_account_token_for(west, "default", "default", IDENTITY_AUDIENCE).await?,
    )?;
    let creds = certified(
        &mesh::workload_id("default", "default", "west"),
        &anchors,
        identity_addr,
        &token,
    )
    .await?;
    let (east_node, west_node) = (east.node_name(), west.node_name());
    Ok(Env {
        clusters: Mutex::new(clusters),
        east: e,
        west: w,
        east_node,
        west_node,
        _net: net,
        _dir: dir,
        _identity: identity,
        _mirror: mirror,
        destination: Mutex::new(destination),
        addr,
        creds,
    })
}

impl Env {
    async fn get(&self, path: &str) -> Result<Followed> {
        Followed::get(channel(self.addr, &self.creds).await?, path).await
    }
}

async fn put(client: &Client, ns: &str, value: serde_json::Value) -> Result<()> {
    let name = value["metadata"]["name"]
        .as_str()
        .context("a name")?
        .to_owned();
    let kind = value["kind"].as_str().context("a kind")?;
    let params = PatchParams::apply("e2e").force();
    match kind {
        "Service" => {
            Api::<Service>::namespaced(client.clone(), ns)
                .patch(&name, &params, &Patch::Apply(&value))
                .await?;
        }
        "Namespace" => {
            Api::<Namespace>::all(client.clone())
                .patch(&name, &params, &Patch::Apply(&value))
                .await?;
        }
        _ => return Err(anyhow!("no put for {kind}")),
    }
    Ok(())
}

fn service(
    name: &str,
    app: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
    ports: serde_json::Value,
) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": { "selector": { "app": app }, "ports": ports },
    })
}

/// Marks a Pod ready or not, as a kubelet would when its probe changes.
async fn set_ready(client: &Client, ns: &str, pod: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({ "status": { "conditions": [
        { "type": "Ready", "status": status },
        { "type": "ContainersReady", "status": status },
    ] } });
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

async fn client_certificates(env: Arc<Env>) -> Result<()> {
    // With a certificate: served (a Get of anything answers).
    let mut ok = env.get("kubernetes.default.svc.cluster.local:443").await?;
    ok.until("an answer for the kubernetes Service", WAIT, |f| {
        f.exists.is_some()
    })
    .await?;
    // Without one, from an address that is not loopback: the connection is closed after the
    // handshake, before any call.
    let anchors = env.creds.anchors().clone();
    let anonymous = Credentials::new(env.creds.id().clone(), anchors);
    let refused = async {
        let mut client = DestinationClient::new(channel(env.addr, &anonymous).await?);
        client
            .get(GetDestination {
                path: "kubernetes.default.svc.cluster.local:443".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .message()
            .await?;
        anyhow::Ok(())
    };
    let result = tokio::time::timeout(WAIT, refused)
        .await
        .context("no answer at all")?;
    ensure!(result.is_err(), "a client without a certificate was served");
    Ok(())
}

async fn follows(env: Arc<Env>) -> Result<()> {
    let ns = "dst-follow";
    create_namespace(&env.west, ns).await?;
    let path = format!("web.{ns}.svc.cluster.local:80");
    // Asked before the Service exists: no endpoints, and it does not exist.
    let mut web = env.get(&path).await?;
    web.until("NoEndpoints{exists: false}", WAIT, |f| {
        f.exists == Some(false)
    })
    .await?;

    put(
        &env.west,
        ns,
        service(
            "web",
            "web",
            json!({}),
            json!({}),
            json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
        ),
    )
    .await?;
    let pod_labels = labels(&[("app", "web"), MESHED]);
    create_ready_pod(
        &env.west,
        ns,
        "web-1",
        &pod_labels,
        "10.10.0.1".parse()?,
        &env.west_node,
    )
    .await?;
    web.until("web-1 added", WAIT, |f| f.addrs() == ["10.10.0.1:8080"])
        .await?;
    let ep = &web.endpoints[&"10.10.0.1:8080".parse()?];
    let id = mesh::workload_id("default", ns, "west");
    ensure!(
        matches!(
            ep.tls_identity.as_ref().and_then(|t| t.strategy.clone()),
            Some(tls_identity::Strategy::DnsLikeIdentity(d)) if d.name == id
        ),
        "identity of a meshed pod: {ep:?}"
    );
    ensure!(
        ep.metric_labels.get("pod").map(String::as_str) == Some("web-1"),
        "{ep:?}"
    );

    // Not ready, ready again.
    set_ready(&env.west, ns, "web-1", false).await?;
    web.until("web-1 removed when not ready", WAIT, |f| {
        f.endpoints.is_empty()
    })
    .await?;
    set_ready(&env.west, ns, "web-1", true).await?;
    web.until("web-1 back when ready", WAIT, |f| {
        f.addrs() == ["10.10.0.1:8080"]
    })
    .await?;

    // The Service's target port changes: the old address goes, the new one comes.
    put(
        &env.west,
        ns,
        service(
            "web",
            "web",
            json!({}),
            json!({}),
            json!([{ "name": "http", "port": 80, "targetPort": 9090 }]),
        ),
    )
    .await?;
    web.until("the new target port", WAIT, |f| {
        f.addrs() == ["10.10.0.1:9090"]
    })
    .await?;
    ensure!(
        web.removed.contains(&"10.10.0.1:8080".parse()?),
        "{:?}",
        web.removed
    );

    // The Pod deleted: no endpoints, the Service still exists.
    Api::<Pod>::namespaced(env.west.clone(), ns)
        .delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    web.until("no endpoints once the pod is gone", WAIT, |f| {
        f.endpoints.is_empty() && f.exists == Some(true)
    })
    .await?;
    Ok(())
}

async fn profiles_and_policies(env: Arc<Env>) -> Result<()> {
    let ns = "dst-policy";
    create_namespace(&env.west, ns).await?;
    put(
        &env.west,
        ns,
        service(
            "db",
            "db",
            json!({}),
            json!({ "config.linkerd.io/opaque-ports": "3306" }),
            json!([{ "name": "mysql", "port": 3306 }, { "name": "http", "port": 80 }]),
        ),
    )
    .await?;
    create_ready_pod(
        &env.west,
        ns,
        "db-0",
        &labels(&[("app", "db"), MESHED]),
        "10.10.1.1".parse()?,
        &env.west_node,
    )
    .await?;
    let channel = channel(env.addr, &env.creds).await?;

    // Profiles: the Service's name, opaque on its opaque port only.
    let mut dst = DestinationClient::new(channel.clone());
    let profile = |path: String| {
        let mut dst = dst.clone();
        async move {
            dst.get_profile(GetDestination {
                path,
                ..Default::default()
            })
            .await?
            .into_inner()
            .message()
            .await?
            .context("no profile")
        }
    };
    let p = profile(format!("db.{ns}.svc.cluster.local:3306")).await?;
    ensure!(
        p.fully_qualified_name == format!("db.{ns}.svc.cluster.local") && p.opaque_protocol,
        "{p:?}"
    );
    ensure!(
        !profile(format!("db.{ns}.svc.cluster.local:80"))
            .await?
            .opaque_protocol
    );
    // A name outside the cluster is not resolvable.
    let err = dst
        .get_profile(GetDestination {
            path: "example.com:443".into(),
            ..Default::default()
        })
        .await
        .err()
        .context("a profile for example.com")?;
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");

    // Outbound: the ClusterIP is the Service, balanced over its endpoints.
    let svc = Api::<Service>::namespaced(env.west.clone(), ns)
        .get("db")
        .await?;
    let ip: IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("a ClusterIP")?
        .parse()?;
    let policy = OutboundPoliciesClient::new(channel.clone())
        .get(TrafficSpec {
            source_workload: format!("{ns}:client"),
            target: Some(traffic_spec::Target::Addr(SocketAddr::new(ip, 80).into())),
        })
        .await?
        .into_inner();
    let Some(proxy_protocol::Kind::Detect(detect)) = policy.protocol.and_then(|p| p.kind) else {
        return Err(anyhow!("not detect"));
    };
    let route = &detect.http1.context("http1")?.routes[0].rules[0];
    let backend = format!("{:?}", route.backends);
    ensure!(
        backend.contains(&format!("db.{ns}.svc.cluster.local:80")),
        "{backend}"
    );
    ensure!(backend.contains("PeakEwma"), "{backend}");

    // Inbound: the default policy follows the namespace's annotation, on a watch.
    let mut inbound = InboundServerPoliciesClient::new(channel)
        .watch_port(PortSpec {
            workload: json!({ "ns": ns, "pod": "db-0" }).to_string(),
            port: 3306,
        })
        .await?
        .into_inner();
    let first = inbound.message().await?.context("a server")?;
    ensure!(
        first.labels.get("name").map(String::as_str) == Some("all-unauthenticated"),
        "{first:?}"
    );
    put(&env.west, "", json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": ns, "annotations": { "config.linkerd.io/default-inbound-policy": "deny" } },
    }))
    .await?;
    let next = tokio::time::timeout(WAIT, inbound.message())
        .await??
        .context("an update")?;
    ensure!(
        next.labels.get("name").map(String::as_str) == Some("deny")
            && next.authorizations.is_empty(),
        "{next:?}"
    );
    Ok(())
}

async fn gateway_mirror(env: Arc<Env>) -> Result<()> {
    let ns = "dst-mirror";
    create_namespace(&env.east, ns).await?;
    create_namespace(&env.west, ns).await?;
    put(
        &env.east,
        ns,
        service(
            "web",
            "web",
            json!({ "mirror.linkerd.io/exported": "true" }),
            json!({}),
            json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
        ),
    )
    .await?;
    create_ready_pod(
        &env.east,
        ns,
        "web-1",
        &labels(&[("app", "web"), MESHED]),
        "10.20.0.1".parse()?,
        &env.east_node,
    )
    .await?;
    let mut web = env
        .get(&format!("web-east.{ns}.svc.cluster.local:80"))
        .await?;
    let gateway: SocketAddr = format!("{EAST_GATEWAY}:4143").parse()?;
    web.until("the east gateway", WAIT, |f| {
        f.endpoints.contains_key(&gateway)
    })
    .await?;
    let ep = &web.endpoints[&gateway];
    let authority = ep
        .authority_override
        .as_ref()
        .map(|a| a.authority_override.as_str());
    ensure!(
        authority == Some(&format!("web.{ns}.svc.cluster.local:80")),
        "{ep:?}"
    );
    ensure!(
        matches!(
            ep.tls_identity.as_ref().and_then(|t| t.strategy.clone()),
            Some(tls_identity::Strategy::DnsLikeIdentity(d)) if d.name == EAST_GATEWAY_ID
        ),
        "{ep:?}"
    );
    Ok(())
}

async fn federated(env: Arc<Env>) -> Result<()> {
    let ns = "dst-fed";
    create_namespace(&env.east, ns).await?;
    create_namespace(&env.west, ns).await?;
    let member = || {
        service(
            "api",
            "api",
            json!({ "mirror.linkerd.io/federated": "member" }),
            json!({}),
            json!([{ "name": "http", "port": 80, "targetPort": 8080 }]),
        )
    };
    put(&env.east, ns, member()).await?;
    put(&env.west, ns, member()).await?;
    let pod = labels(&[("app", "api"), MESHED]);
    create_ready_pod(
        &env.east,
        ns,
        "api-e",
        &pod,
        "10.20.1.1".parse()?,
        &env.east_node,
    )
    .await?;
    create_ready_pod(
        &env.west,
        ns,
        "api-w",
        &pod,
        "10.10.2.1".parse()?,
        &env.west_node,
    )
    .await?;

    let mut api = env
        .get(&format!("api-federated.{ns}.svc.cluster.local:80"))
        .await?;
    api.until("members of both clusters", WAIT, |f| {
        f.addrs() == ["10.10.2.1:8080", "10.20.1.1:8080"]
    })
    .await?;
    // east's endpoint has east's identity (its trust domain, from the Link's gateway identity).
    let remote = &api.endpoints[&"10.20.1.1:8080".parse()?];
    let want = format!("default.{ns}.serviceaccount.identity.linkerd.east");
    ensure!(
        matches!(
            remote.tls_identity.as_ref().and_then(|t| t.strategy.clone()),
            Some(tls_identity::Strategy::DnsLikeIdentity(d)) if d.name == want
        ),
        "{remote:?}"
    );

    // east's API server stops. First a positive sign that the service noticed...
    env.clusters.lock().await[0].kill(Component::ApiServer);
    let dst = env.destination.lock().await;
    wait_for("east reported unreachable", WAIT, || async {
        (dst.metric("destination_remote_cluster_reachable", "cluster=\"east\"")
            .await
            .ok()?
            == 0.0)
            .then_some(())
    })
    .await?;
    drop(dst);
    // ...then a change in west arrives while east's endpoint stays.
    create_ready_pod(
        &env.west,
        ns,
        "api-w2",
        &pod,
        "10.10.2.2".parse()?,
        &env.west_node,
    )
    .await?;
    api.until("a new west member", WAIT, |f| {
        f.endpoints
            .contains_key(&SocketAddr::from(([10, 10, 2, 2], 8080)))
    })
    .await?;
    ensure!(
        api.addrs() == ["10.10.2.1:8080", "10.10.2.2:8080", "10.20.1.1:8080"],
        "{:?}",
        api.addrs()
    );
    ensure!(
        api.removed.is_empty(),
        "removed while east was down: {:?}",
        api.removed
    );

    // east comes back: reported reachable again.
    env.clusters.lock().await[0]
        .start_component(Component::ApiServer)
        .await?;
    let dst = env.destination.lock().await;
    wait_for("east reachable again", Duration::from_secs(60), || async {
        (dst.metric("destination_remote_cluster_reachable", "cluster=\"east\"")
            .await
            .ok()?
            == 1.0)
            .then_some(())
    })
    .await?;
    Ok(())
}
