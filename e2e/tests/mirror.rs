//! The service-mirror controller as its own process against two real clusters: `west` links to
//! `east` and mirrors what `east` exports.
//!
//! One controller serves every check; each check uses its own namespaces, and the checks run one
//! after another because the last ones restart API servers and count writes.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use e2e::{
    Cluster, Component,
    checks::Check,
    create_namespace, create_ready_pod, install_link_crd,
    meshlink::{
        Program, apply_link, endpoint_ips, get, labels, put_credentials, remote_access_kubeconfig,
        service_condition, start_mirror,
    },
    wait_for,
};
use k8s_openapi::api::{
    core::v1::{Endpoints, Event, Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use link_crd::Link;
use serde_json::json;
use tokio::sync::Mutex;

const NS: &str = "linkerd-multicluster";
const GATEWAY_IP: &str = "192.0.2.10";
const IDENTITY: &str =
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local";
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    /// Locked only by the check that restarts its API server.
    east: Mutex<Cluster>,
    east_client: Client,
    east_node: String,
    west: Cluster,
    west_client: Client,
    /// Replaced by the check that restarts the controller.
    controller: Mutex<Program>,
}

fn main() -> ExitCode {
    let checks: &[(&str, Check<Env>)] = &[
        ("exported_service_is_mirrored_with_gateway_endpoints", |e| {
            Box::pin(exported_service_is_mirrored(e))
        }),
        ("a_second_link_of_a_served_target_name_is_refused", |e| {
            Box::pin(duplicate_target_name(e))
        }),
        ("a_local_service_holding_a_mirror_name_is_left_alone", |e| {
            Box::pin(name_taken(e))
        }),
        ("unexport_and_remote_delete_remove_only_that_mirror", |e| {
            Box::pin(unexport_and_delete(e))
        }),
        ("missing_namespace_is_reported_then_mirrored", |e| {
            Box::pin(missing_namespace(e))
        }),
        ("relabel_to_remote_discovery_drops_endpoints", |e| {
            Box::pin(relabel_to_remote_discovery(e))
        }),
        (
            "a_mirror_linkerd_wrote_ends_up_as_meshlink_writes_it",
            |e| Box::pin(linkerd_mirror_taken_over(e)),
        ),
        (
            "controller_restart_keeps_mirrors_ready_and_writes_nothing",
            |e| Box::pin(controller_restart(e)),
        ),
        ("rotated_credentials_take_effect_without_a_restart", |e| {
            Box::pin(credentials_rotation(e))
        }),
        ("two_replicas_hand_over_without_deleting_or_flapping", |e| {
            Box::pin(two_replicas(e))
        }),
        (
            "remote_api_restart_keeps_mirrors_and_idle_resync_writes_nothing",
            |e| Box::pin(remote_restart_and_idle(e)),
        ),
    ];
    // The checks share one controller and the last ones restart API servers.
    e2e::checks::run(setup, checks, |env| &env.controller)
}

async fn setup() -> Result<Env> {
    let mut clusters = Cluster::start_many(&["east", "west"]).await?;
    let west = clusters.pop().ok_or_else(|| anyhow!("no west"))?;
    let east = clusters.pop().ok_or_else(|| anyhow!("no east"))?;
    let wc = west.client();

    install_link_crd(&wc).await?;
    create_namespace(&wc, NS).await?;
    let kubeconfig = remote_access_kubeconfig(&east, NS).await?;
    put_credentials(&west, NS, "east", &kubeconfig).await?;
    apply_link(
        &wc,
        NS,
        "east",
        GATEWAY_IP,
        json!({
            "targetClusterLinkerdNamespace": "linkerd",
            "gatewayIdentity": IDENTITY,
            "remoteDiscoverySelector": { "matchLabels": { "mirror.linkerd.io/exported": "remote-discovery" } },
            "excludedLabels": ["team.example.com/*"],
        }),
    )
    .await?;

    let controller = start_controller(&west).await?;
    Ok(Env {
        east_client: east.client(),
        east_node: east.node_name(),
        east: Mutex::new(east),
        west,
        west_client: wc,
        controller: Mutex::new(controller),
    })
}

async fn start_controller(west: &Cluster) -> Result<Program> {
    start_replica(west, "a").await
}

/// A controller replica; short Lease times so that hand-overs take seconds.
async fn start_replica(west: &Cluster, identity: &str) -> Result<Program> {
    Ok(start_mirror(
        west.kubeconfig_path(),
        &[
            format!("--namespace={NS}"),
            "--log=info,mirror_controller=debug".to_owned(),
            format!("--identity={identity}"),
            "--lease-duration=3s".to_owned(),
            "--lease-renew=500ms".to_owned(),
        ],
    )
    .await?)
}

/// Creates an exported Service `name` in `ns` of `east` with one Ready Pod at `ip`.
async fn export(env: &Env, ns: &str, name: &str, value: &str, ip: Ipv4Addr) -> Result<()> {
    let c = env.east_client.clone();
    create_namespace(&c, ns).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": { "mirror.linkerd.io/exported": value, "app": name, "team.example.com/owner": "alice" },
            "annotations": { "config.linkerd.io/opaque-ports": "5432" },
        },
        "spec": { "selector": { "app": name }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))?;
    Api::<Service>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    create_ready_pod(
        &c,
        ns,
        &format!("{name}-0"),
        &labels(&[("app", name)]),
        IpAddr::V4(ip),
        &env.east_node,
    )
    .await?;
    Ok(())
}

/// The Link's RemoteReachable condition: status and reason.
async fn remote_reachable(w: &Client) -> Option<(String, String)> {
    e2e::meshlink::link_condition(w, NS, "east", "RemoteReachable").await
}

async fn mirror_status(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let c = service_condition(client, NS, "east", false, ns, name).await?;
    Some((format!("{:?}", c.status), c.reason))
}

/// A second Link naming `east` is refused with a condition that names the first, mirrors
/// nothing, and deleting it leaves the first Link's mirrors alone.
async fn duplicate_target_name(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    // Created after "east", so "east" holds the name.
    apply_link(
        w,
        NS,
        "east-again",
        GATEWAY_IP,
        json!({ "targetClusterName": "east", "clusterCredentialsSecret": "cluster-credentials-east" }),
    )
    .await?;
    let (status, reason) = wait_for("the duplicate Link refused", WAIT, || async {
        e2e::meshlink::link_condition(w, NS, "east-again", "Accepted")
            .await
            .filter(|(s, _)| s == "False")
    })
    .await?;
    ensure!(reason == "DuplicateTargetCluster", "{status} {reason}");
    let links: Api<Link> = Api::namespaced(w.clone(), NS);
    let refused = links.get("east-again").await?;
    let message = refused
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "Accepted")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(message.contains("Link east"), "{message}");
    ensure!(
        refused
            .status
            .as_ref()
            .is_none_or(|s| s.mirror_services.is_empty()),
        "a refused Link lists mirrors"
    );
    // Deleting it (its finalizer runs: a positive sign) deletes none of east's mirrors: the
    // same object is there after, not one the holder's worker made again.
    let uid = |s: Option<Service>| s.and_then(|s| s.metadata.uid);
    let before = uid(get::<Service>(w, "shop", "web-east").await).context("shop/web-east")?;
    links.delete("east-again", &DeleteParams::default()).await?;
    wait_for("the refused Link gone", WAIT, || async {
        links
            .get_opt("east-again")
            .await
            .ok()
            .and_then(|l| l.is_none().then_some(()))
    })
    .await?;
    ensure!(
        uid(get::<Service>(w, "shop", "web-east").await) == Some(before),
        "deleting a refused duplicate deleted the holder's mirror"
    );
    ensure!(
        e2e::meshlink::link_condition(w, NS, "east", "Ready")
            .await
            .map(|(s, _)| s)
            .as_deref()
            == Some("True"),
        "the holder is still Ready"
    );
    Ok(())
}

/// `west`'s own `safe/victim-east` (a selector, a Ready pod) is neither written nor deleted
/// when `east` exports and then deletes `safe/victim`; the mirror appears once the name is free.
async fn name_taken(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    let ns = "safe";
    create_namespace(w, ns).await?;
    let own: Service = serde_json::from_value(json!({
        "metadata": { "name": "victim-east", "labels": { "team": "payments" } },
        "spec": { "selector": { "app": "victim" }, "ports": [{ "name": "http", "port": 80 }] },
    }))?;
    let local: Api<Service> = Api::namespaced(w.clone(), ns);
    local.create(&PostParams::default(), &own).await?;
    create_ready_pod(
        w,
        ns,
        "victim-0",
        &labels(&[("app", "victim")]),
        IpAddr::V4(Ipv4Addr::new(10, 2, 0, 9)),
        &env.west.node_name(),
    )
    .await?;
    let ready_ip = || async {
        get::<Endpoints>(w, ns, "victim-east")
            .await
            .map(|e| endpoint_ips(&e).0)
            .filter(|ips| ips == &["10.2.0.9".to_owned()])
    };
    wait_for("west's own Endpoints", WAIT, ready_ip).await?;
    let uid = local.get("victim-east").await?.metadata.uid;

    export(&env, ns, "victim", "true", Ipv4Addr::new(10, 1, 9, 9)).await?;
    let (status, reason) = wait_for("the NameTaken entry", WAIT, || async {
        mirror_status(w, ns, "victim")
            .await
            .filter(|(_, r)| r == "NameTaken")
    })
    .await?;
    ensure!(status == "False", "{status} {reason}");
    let events: Api<Event> = Api::namespaced(w.clone(), NS);
    wait_for("a NameTaken Event", WAIT, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NameTaken"))
    })
    .await?;
    let after = local.get("victim-east").await?;
    ensure!(after.metadata.uid == uid, "west's Service was replaced");
    ensure!(
        !after
            .labels()
            .contains_key("mirror.linkerd.io/cluster-name"),
        "west's Service was taken over: {:?}",
        after.labels()
    );
    ensure!(ready_ip().await.is_some(), "west's Endpoints were changed");

    // east deletes its Service: the entry goes (the controller acted), west's stays as it was.
    let remote: Api<Service> = Api::namespaced(env.east_client.clone(), ns);
    remote.delete("victim", &DeleteParams::default()).await?;
    wait_for("the entry to go", WAIT, || async {
        mirror_status(w, ns, "victim").await.is_none().then_some(())
    })
    .await?;
    ensure!(
        local.get("victim-east").await?.metadata.uid == uid,
        "west's Service was deleted"
    );
    ensure!(ready_ip().await.is_some(), "west's Endpoints were changed");

    // While a Service of west holds a mirror's name, nothing is mirrored; once it is freed, the
    // mirror appears.
    let spare: Service = serde_json::from_value(json!({
        "metadata": { "name": "spare-east" },
        "spec": { "ports": [{ "port": 80 }] },
    }))?;
    let spare_uid = local
        .create(&PostParams::default(), &spare)
        .await?
        .metadata
        .uid;
    export(&env, ns, "spare", "true", Ipv4Addr::new(10, 1, 9, 10)).await?;
    wait_for("NameTaken for spare", WAIT, || async {
        mirror_status(w, ns, "spare")
            .await
            .filter(|(_, r)| r == "NameTaken")
    })
    .await?;
    local.delete("spare-east", &DeleteParams::default()).await?;
    let mirror = wait_for("the mirror once the name is free", WAIT, || async {
        get::<Service>(w, ns, "spare-east").await.filter(|s| {
            s.labels()
                .get("mirror.linkerd.io/cluster-name")
                .map(String::as_str)
                == Some("east")
        })
    })
    .await?;
    ensure!(mirror.metadata.uid != spare_uid);
    Ok(())
}

async fn exported_service_is_mirrored(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    create_namespace(w, "shop").await?;
    export(&env, "shop", "web", "true", Ipv4Addr::new(10, 1, 0, 5)).await?;

    let svc: Service =
        wait_for("mirror shop/web-east", WAIT, || get(w, "shop", "web-east")).await?;
    let l = svc.labels();
    ensure!(
        l.get("mirror.linkerd.io/mirrored-service")
            .map(String::as_str)
            == Some("true")
    );
    ensure!(l.get("mirror.linkerd.io/cluster-name").map(String::as_str) == Some("east"));
    ensure!(l.get("app").map(String::as_str) == Some("web"));
    ensure!(
        !l.contains_key("mirror.linkerd.io/exported"),
        "export label copied: {l:?}"
    );
    ensure!(
        !l.contains_key("team.example.com/owner"),
        "excluded label copied: {l:?}"
    );
    let a = svc.annotations();
    ensure!(a.get("config.linkerd.io/opaque-ports").map(String::as_str) == Some("5432"));
    ensure!(
        a.get("mirror.linkerd.io/remote-svc-fq-name")
            .map(String::as_str)
            == Some("web.shop.svc.cluster.local")
    );
    let spec = svc.spec.clone().unwrap_or_default();
    ensure!(spec.selector.is_none() && spec.cluster_ip.as_deref().is_some_and(|ip| ip != "None"));

    let ep: Endpoints = wait_for(
        "mirror Endpoints with the gateway address",
        WAIT,
        || async {
            get::<Endpoints>(w, "shop", "web-east")
                .await
                .filter(|e| endpoint_ips(e).0 == [GATEWAY_IP])
        },
    )
    .await?;
    let port = ep
        .subsets
        .iter()
        .flatten()
        .flat_map(|s| s.ports.iter().flatten())
        .next()
        .map(|p| p.port);
    ensure!(
        port == Some(4143),
        "ports not mapped to the gateway port: {ep:?}"
    );
    ensure!(
        ep.annotations()
            .get("mirror.linkerd.io/remote-gateway-identity")
            .map(String::as_str)
            == Some(IDENTITY)
    );

    // The slice says what the Endpoints say (written right after them).
    let slice: EndpointSlice = wait_for("a ready mirror EndpointSlice", WAIT, || async {
        get::<EndpointSlice>(w, "shop", "web-east-ipv4")
            .await
            .filter(|s| {
                let e = s.endpoints.clone().unwrap_or_default();
                e.len() == 1
                    && e[0].addresses == [GATEWAY_IP]
                    && e[0].conditions.as_ref().and_then(|c| c.ready) == Some(true)
            })
    })
    .await?;
    ensure!(
        slice
            .annotations()
            .get("mirror.linkerd.io/remote-gateway-identity")
            .map(String::as_str)
            == Some(IDENTITY)
    );
    ensure!(slice.ports.iter().flatten().all(|p| p.port == Some(4143)));
    // Owned by the mirror, so that deleting it removes them.
    ensure!(
        slice
            .owner_references()
            .iter()
            .any(|o| o.kind == "Service" && o.name == "web-east")
    );

    wait_for("status Mirrored", WAIT, || async {
        (mirror_status(w, "shop", "web").await? == ("True".to_owned(), "Mirrored".to_owned()))
            .then_some(())
    })
    .await?;

    // The remote Service loses its last ready endpoint: the mirror's endpoints empty out.
    let pods: Api<Pod> = Api::namespaced(env.east_client.clone(), "shop");
    let not_ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "False" }] } });
    pods.patch_status(
        "web-0",
        &PatchParams::default(),
        &Patch::Strategic(&not_ready),
    )
    .await?;
    wait_for("mirror Endpoints to empty", WAIT, || async {
        get::<Endpoints>(w, "shop", "web-east")
            .await
            .filter(|e| e.subsets.as_ref().is_none_or(Vec::is_empty))
    })
    .await?;
    wait_for("the mirror EndpointSlice to empty", WAIT, || async {
        get::<EndpointSlice>(w, "shop", "web-east-ipv4")
            .await
            .filter(|s| s.endpoints.as_ref().is_none_or(Vec::is_empty))
    })
    .await?;
    Ok(())
}

async fn unexport_and_delete(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    create_namespace(w, "cart").await?;
    // Objects the controller did not make, some of them labelled confusingly.
    for (name, labels) in [
        ("keep", json!({ "mirror.linkerd.io/cluster-name": "east" })),
        (
            "c-east",
            json!({ "mirror.linkerd.io/mirrored-service": "true", "mirror.linkerd.io/cluster-name": "north" }),
        ),
    ] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "spec": { "ports": [{ "port": 80 }] },
        }))?;
        Api::<Service>::namespaced(w.clone(), "cart")
            .create(&PostParams::default(), &svc)
            .await?;
    }
    export(&env, "cart", "a", "true", Ipv4Addr::new(10, 1, 1, 1)).await?;
    export(&env, "cart", "b", "true", Ipv4Addr::new(10, 1, 1, 2)).await?;
    wait_for("both mirrors", WAIT, || async {
        get::<Service>(w, "cart", "a-east").await?;
        get::<Endpoints>(w, "cart", "b-east").await
    })
    .await?;

    // Unexport a by removing its label; delete b.
    let remote: Api<Service> = Api::namespaced(env.east_client.clone(), "cart");
    remote
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { "mirror.linkerd.io/exported": null } } }),
            ),
        )
        .await?;
    remote.delete("b", &DeleteParams::default()).await?;
    wait_for("both mirrors to go", WAIT, || async {
        (get::<Service>(w, "cart", "a-east").await.is_none()
            && get::<Service>(w, "cart", "b-east").await.is_none())
        .then_some(())
    })
    .await?;
    wait_for("the status entries to go", WAIT, || async {
        (mirror_status(w, "cart", "a").await.is_none()
            && mirror_status(w, "cart", "b").await.is_none())
        .then_some(())
    })
    .await?;
    // Their slices follow through owner references (the garbage collector).
    wait_for("the mirrors' EndpointSlices to go", WAIT, || async {
        get::<EndpointSlice>(w, "cart", "a-east-ipv4")
            .await
            .is_none()
            .then_some(())
    })
    .await?;
    for name in ["keep", "c-east"] {
        ensure!(
            get::<Service>(w, "cart", name).await.is_some(),
            "{name} was deleted"
        );
    }
    Ok(())
}

async fn missing_namespace(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    export(
        &env,
        "billing",
        "invoices",
        "true",
        Ipv4Addr::new(10, 1, 2, 1),
    )
    .await?;
    wait_for("status MissingNamespace", WAIT, || async {
        (mirror_status(w, "billing", "invoices").await?.1 == "MissingNamespace").then_some(())
    })
    .await?;
    let events: Api<Event> = Api::namespaced(w.clone(), NS);
    wait_for("a MissingNamespace Event on the Link", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("MissingNamespace")
                    && e.involved_object.name.as_deref() == Some("east")
            })
            .then_some(())
    })
    .await?;
    ensure!(
        get::<Service>(w, "billing", "invoices-east")
            .await
            .is_none()
    );

    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": "billing" } }))?;
    Api::<Namespace>::all(w.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    wait_for("the mirror once the namespace exists", WAIT, || {
        get::<Endpoints>(w, "billing", "invoices-east")
    })
    .await?;
    wait_for("status Mirrored", WAIT, || async {
        (mirror_status(w, "billing", "invoices").await?.1 == "Mirrored").then_some(())
    })
    .await?;
    Ok(())
}

async fn relabel_to_remote_discovery(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    create_namespace(w, "labs").await?;
    export(&env, "labs", "db", "true", Ipv4Addr::new(10, 1, 3, 1)).await?;
    wait_for("gateway-mode mirror", WAIT, || {
        get::<Endpoints>(w, "labs", "db-east")
    })
    .await?;
    Api::<Service>::namespaced(env.east_client.clone(), "labs")
        .patch("db", &PatchParams::default(), &Patch::Merge(json!({ "metadata": { "labels": { "mirror.linkerd.io/exported": "remote-discovery" } } })))
        .await?;
    let svc: Service = wait_for("remote-discovery labels", WAIT, || async {
        get::<Service>(w, "labs", "db-east").await.filter(|s| {
            s.labels()
                .get("multicluster.linkerd.io/remote-discovery")
                .map(String::as_str)
                == Some("east")
        })
    })
    .await?;
    ensure!(
        svc.labels()
            .get("multicluster.linkerd.io/remote-service")
            .map(String::as_str)
            == Some("db")
    );
    wait_for("gateway endpoints to go", WAIT, || async {
        (get::<Endpoints>(w, "labs", "db-east").await.is_none()
            && get::<EndpointSlice>(w, "labs", "db-east-ipv4")
                .await
                .is_none())
        .then_some(())
    })
    .await?;
    Ok(())
}

/// The controller's field manager.
const MESHLINK: &str = "meshlink-service-mirror";

/// The managers that own fields of `obj` (its `managedFields`).
fn managers<K: kube::Resource>(obj: &K) -> Vec<String> {
    obj.meta()
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect()
}

/// A mirror Linkerd's service mirror wrote (plain creates as `service-mirror`, as it does), with
/// a port, a label and an annotation the remote Service does not have, ends up exactly as
/// meshlink writes a mirror: those are gone, and meshlink alone owns it. As when moving from
/// Linkerd: the mirror is there, and the remote Service exported, when meshlink starts.
async fn linkerd_mirror_taken_over(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    let ns = "legacy";
    let mut controller = env.controller.lock().await;
    controller.kill();
    create_namespace(w, ns).await?;
    let as_linkerd = PostParams {
        field_manager: Some("service-mirror".to_owned()),
        ..PostParams::default()
    };
    let mirror_labels = json!({
        "mirror.linkerd.io/mirrored-service": "true",
        "mirror.linkerd.io/cluster-name": "east",
        "linkerd-only": "x",
    });
    let old: Service = serde_json::from_value(json!({
        "metadata": {
            "name": "api-east",
            "labels": mirror_labels,
            "annotations": { "mirror.linkerd.io/remote-svc-fq-name": "api.legacy.svc.cluster.local", "linkerd.example/note": "y" },
        },
        "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }, { "name": "admin", "port": 9999 }] },
    }))?;
    Api::<Service>::namespaced(w.clone(), ns)
        .create(&as_linkerd, &old)
        .await?;
    let old: Endpoints = serde_json::from_value(json!({
        "metadata": { "name": "api-east", "labels": mirror_labels },
        "subsets": [{
            "addresses": [{ "ip": "192.0.2.99" }],
            "ports": [{ "name": "http", "port": 4143 }, { "name": "admin", "port": 4143 }],
        }],
    }))?;
    Api::<Endpoints>::namespaced(w.clone(), ns)
        .create(&as_linkerd, &old)
        .await?;

    export(&env, ns, "api", "true", Ipv4Addr::new(10, 1, 4, 1)).await?;
    *controller = start_controller(&env.west).await?;
    drop(controller);
    let svc = wait_for("the mirror taken over", WAIT, || async {
        get::<Service>(w, ns, "api-east")
            .await
            .filter(|s| managers(s) == [MESHLINK])
    })
    .await?;
    // Exactly what meshlink writes for east's `api`: its one port, its labels (the Link
    // excludes `team.example.com/*`), its annotations.
    let ports: Vec<(Option<String>, i32)> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| (p.name.clone(), p.port))
        .collect();
    ensure!(ports == [(Some("http".to_owned()), 80)], "{ports:?}");
    let mut label_keys: Vec<&str> = svc.labels().keys().map(String::as_str).collect();
    label_keys.sort_unstable();
    ensure!(
        label_keys
            == [
                "app",
                "mirror.linkerd.io/cluster-name",
                "mirror.linkerd.io/mirrored-service"
            ],
        "{label_keys:?}"
    );
    let mut annotation_keys: Vec<&str> = svc.annotations().keys().map(String::as_str).collect();
    annotation_keys.sort_unstable();
    ensure!(
        annotation_keys
            == [
                "config.linkerd.io/opaque-ports",
                "mirror.linkerd.io/remote-resource-version",
                "mirror.linkerd.io/remote-svc-fq-name",
            ],
        "{annotation_keys:?}"
    );
    // The remote pod's readiness may still be on its way: then the gateway follows.
    let ep = wait_for("its Endpoints taken over", WAIT, || async {
        get::<Endpoints>(w, ns, "api-east")
            .await
            .filter(|e| managers(e) == [MESHLINK] && endpoint_ips(e).0 == [GATEWAY_IP])
    })
    .await?;
    let ports: Vec<Option<String>> = ep
        .subsets
        .iter()
        .flatten()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.name.clone())
        .collect();
    ensure!(ports == [Some("http".to_owned())], "{ports:?}");
    ensure!(
        !ep.labels().contains_key("linkerd-only"),
        "{:?}",
        ep.labels()
    );
    wait_for("status Mirrored", WAIT, || async {
        (mirror_status(w, ns, "api").await?.1 == "Mirrored").then_some(())
    })
    .await?;
    Ok(())
}

async fn remote_restart_and_idle(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    // A change the controller has certainly acted on, before counting its writes.
    let before = mark(&env, 1).await?;
    let restarts = env
        .controller
        .lock()
        .await
        .metric("service_mirror_watch_restarts_total", "")
        .await?;

    // The target's API server goes away: mirrors stay, however long it is gone.
    let mut east = env.east.lock().await;
    east.kill(Component::ApiServer);
    // The controller has seen the outage (and retried its watches) before the mirrors are
    // checked.
    wait_for("RemoteReachable=False on the Link", WAIT, || async {
        (remote_reachable(w).await?.0 == "False").then_some(())
    })
    .await?;
    wait_for("the watches retried", WAIT, || async {
        let now = env
            .controller
            .lock()
            .await
            .metric("service_mirror_watch_restarts_total", "")
            .await
            .ok()?;
        (now >= restarts + 2.0).then_some(())
    })
    .await?;
    for (ns, name) in [("shop", "web-east"), ("billing", "invoices-east")] {
        ensure!(
            get::<Service>(w, ns, name).await.is_some(),
            "{ns}/{name} deleted while the target was down"
        );
    }

    east.start_component(Component::ApiServer)
        .await
        .context("restarting east's API server")?;
    drop(east);
    wait_for(
        "the controller's watches to list again",
        Duration::from_secs(60),
        || async { (remote_reachable(w).await?.0 == "True").then_some(()) },
    )
    .await?;
    ensure!(
        env.controller
            .lock()
            .await
            .metric("service_mirror_watch_restarts_total", "")
            .await?
            > restarts
    );
    // Whether the watches resumed or listed again, nothing had changed: nothing is written but
    // the mirror of a second mark, which the controller sees only once its watch of the target
    // delivers again (after any relisting).
    let after = mark(&env, 2).await?;
    ensure!(
        after == before + 1.0,
        "a resync with nothing changed wrote {} times",
        after - before - 1.0
    );
    for (ns, name) in [
        ("shop", "web-east"),
        ("billing", "invoices-east"),
        ("labs", "db-east"),
    ] {
        ensure!(
            get::<Service>(w, ns, name).await.is_some(),
            "{ns}/{name} missing after the restart"
        );
    }
    Ok(())
}

/// Annotates east's `shop/web` with mark `n` and waits until its mirror has it and the
/// controller has counted that write: a change the controller has acted on (one write, of the
/// mirror Service: remote annotations reach only it). Returns the controller's writes then.
async fn mark(env: &Env, n: u32) -> Result<f64> {
    const MARK: &str = "e2e.example.com/mark";
    let writes = mirror_writes(&*env.controller.lock().await).await?;
    Api::<Service>::namespaced(env.east_client.clone(), "shop")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": { MARK: n.to_string() } } })),
        )
        .await?;
    wait_for("the mark mirrored", WAIT, || async {
        get::<Service>(&env.west_client, "shop", "web-east")
            .await
            .filter(|s| s.annotations().get(MARK) == Some(&n.to_string()))
    })
    .await?;
    Ok(wait_for("the mark's write counted", WAIT, || async {
        let now = mirror_writes(&*env.controller.lock().await).await.ok()?;
        (now > writes).then_some(now)
    })
    .await?)
}

async fn mirror_writes(p: &Program) -> Result<f64> {
    let mut total = 0.0;
    for kind in ["Service", "Endpoints", "EndpointSlice", "Namespace"] {
        total += p
            .metric(
                "service_mirror_api_writes_total",
                &format!("kind=\"{kind}\""),
            )
            .await?;
    }
    Ok(total)
}

async fn controller_restart(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    let endpoints: Api<Endpoints> = Api::namespaced(w.clone(), "billing");
    let before = endpoints.get("invoices-east").await?;
    let transition = |l: Link| {
        l.status.and_then(|s| {
            s.mirror_services
                .into_iter()
                .find(|e| e.remote_ref.name == "invoices")
                .map(|e| e.conditions[0].last_transition_time.clone())
        })
    };
    let t0 = transition(Api::<Link>::namespaced(w.clone(), NS).get("east").await?);

    // Killed outright, mid-flight as far as it knows: the mirrors stay.
    let mut controller = env.controller.lock().await;
    controller.kill();
    ensure!(endpoints.get_opt("invoices-east").await?.is_some());
    // Ready means synced: the Links listed and every Service reconciled once.
    *controller = start_controller(&env.west).await?;
    // Let it list everything and reconcile every key.
    wait_for("the new controller to reconcile", WAIT, || async {
        let n = controller
            .metric("service_mirror_reconciles_total", "")
            .await
            .ok()?;
        (n >= 3.0).then_some(())
    })
    .await?;
    ensure!(
        mirror_writes(&controller).await? == 0.0,
        "a restart rewrote mirrors"
    );
    let after = endpoints.get("invoices-east").await?;
    ensure!(
        after.resource_version() == before.resource_version(),
        "the mirror's Endpoints changed across a restart (ready endpoints must never flip)"
    );
    ensure!(
        transition(Api::<Link>::namespaced(w.clone(), NS).get("east").await?) == t0,
        "lastTransitionTime moved"
    );
    // Having seen everything again, the restarted controller reports what changes since: a
    // Service exported now gets its entry in the status (which a restart holds back until the
    // first full pass).
    export(
        &env,
        "billing",
        "receipts",
        "true",
        Ipv4Addr::new(10, 1, 5, 1),
    )
    .await?;
    wait_for("the new export's status entry", WAIT, || async {
        (mirror_status(w, "billing", "receipts").await?
            == ("True".to_owned(), "Mirrored".to_owned()))
            .then_some(())
    })
    .await?;
    Ok(())
}

async fn credentials_rotation(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    let pid = env.controller.lock().await.pid();
    // Credentials that the target refuses: the Link says so, the mirrors stay.
    let east = env.east.lock().await;
    let bad = east.kubeconfig_for_token("remote", "not-a-valid-token");
    put_credentials(&env.west, NS, "east", &bad).await?;
    wait_for(
        "RemoteReachable=False with RemoteUnauthorized",
        WAIT,
        || async { (remote_reachable(w).await?.1 == "RemoteUnauthorized").then_some(()) },
    )
    .await?;
    ensure!(
        get::<Service>(w, "shop", "web-east").await.is_some(),
        "mirrors removed over bad credentials"
    );

    // Rotated to a fresh, valid token: picked up without a restart.
    let good = remote_access_kubeconfig(&east, NS).await?;
    drop(east);
    put_credentials(&env.west, NS, "east", &good).await?;
    export(&env, "shop", "rotated", "true", Ipv4Addr::new(10, 1, 4, 1)).await?;
    wait_for(
        "a Service exported after the rotation to be mirrored",
        WAIT,
        || get::<Endpoints>(w, "shop", "rotated-east"),
    )
    .await?;
    ensure!(
        env.controller.lock().await.pid() == pid,
        "the controller restarted"
    );
    Ok(())
}

async fn two_replicas(env: Arc<Env>) -> Result<()> {
    let w = &env.west_client;
    let mut leader = env.controller.lock().await;
    ensure!(
        leader.metric("service_mirror_leader", "").await? == 1.0,
        "replica a does not lead"
    );
    // Ready: it has tried the Lease and knows it follows.
    let follower = start_replica(&env.west, "b").await?;
    ensure!(
        follower.metric("service_mirror_leader", "").await? == 0.0,
        "two leaders"
    );
    ensure!(
        follower
            .metric("service_mirror_api_writes_total", "")
            .await?
            == 0.0,
        "the follower wrote"
    );

    let endpoints: Api<Endpoints> = Api::namespaced(w.clone(), "billing");
    let before = endpoints.get("invoices-east").await?;
    let mirror_uid = get::<Service>(w, "billing", "invoices-east")
        .await
        .and_then(|s| s.metadata.uid);
    // The leader dies without releasing its Lease: the follower takes over once it expires.
    leader.kill();
    wait_for("the follower to lead", WAIT, || async {
        (follower.metric("service_mirror_leader", "").await.ok()? == 1.0).then_some(())
    })
    .await?;
    export(
        &env,
        "billing",
        "refunds",
        "true",
        Ipv4Addr::new(10, 1, 5, 1),
    )
    .await?;
    wait_for("the new leader to mirror a new export", WAIT, || {
        get::<Endpoints>(w, "billing", "refunds-east")
    })
    .await?;
    let after = endpoints.get("invoices-east").await?;
    ensure!(
        after.resource_version() == before.resource_version(),
        "existing Endpoints flapped over the hand-over"
    );
    ensure!(
        get::<Service>(w, "billing", "invoices-east")
            .await
            .and_then(|s| s.metadata.uid)
            == mirror_uid,
        "an existing mirror was re-created"
    );
    *leader = follower;
    Ok(())
}
