//! The service-mirror controller serving two Links at once: `west` links to `east` and to
//! `north`, three real clusters. Federated Services across both Links and `west`'s own Services,
//! a gateway given as a DNS name whose answer changes, and headless Services mirrored per pod.
//!
//! One controller serves every check; each check uses its own namespaces.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Result, anyhow, ensure};
use e2e::{
    Cluster, Component,
    checks::Check,
    create_namespace, create_ready_pod, create_ready_pod_in,
    dns::DnsServer,
    install_link_crd,
    meshlink::{
        Program, apply_link, endpoint_ips, get, labels, put_credentials, remote_access_kubeconfig,
        service_condition, start_mirror,
    },
    wait_for,
};
use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
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
const EAST_GATEWAY: &str = "192.0.2.10";
/// `north`'s gateway is a name, answered by the test's DNS server.
const NORTH_GATEWAY: &str = "gateway.north.test";
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    east: Client,
    east_node: String,
    north: Client,
    west: Client,
    dns: DnsServer,
    controller: Mutex<Program>,
    /// The remote-access kubeconfig of `north`.
    north_kubeconfig: String,
    /// east, north, west (locked by the check that stops north's API server).
    clusters: Mutex<Vec<Cluster>>,
}

fn main() -> ExitCode {
    let checks: &[(&str, Check<Env>)] = &[
        ("federated_service_is_recomputed_from_every_member", |e| {
            Box::pin(federated(e))
        }),
        ("a_federated_service_linkerd_wrote_is_taken_over", |e| {
            Box::pin(federated_taken_over(e))
        }),
        ("gateway_given_as_a_dns_name_follows_its_answer", |e| {
            Box::pin(dns_gateway(e))
        }),
        ("headless_service_is_mirrored_per_pod", |e| {
            Box::pin(headless(e))
        }),
        ("a_spec_change_restarts_only_that_links_work", |e| {
            Box::pin(spec_change(e))
        }),
        ("one_named_link_served_with_namespace_creation", |e| {
            Box::pin(one_named_link(e))
        }),
        (
            "a_departure_while_the_controller_is_stopped_is_not_lost",
            |e| Box::pin(departure_while_stopped(e)),
        ),
        (
            "restart_keeps_federated_services_and_link_deletion_removes_members",
            |e| Box::pin(restart_and_link_deletion(e)),
        ),
    ];
    e2e::checks::run(setup, checks, |env| &env.controller)
}

async fn setup() -> Result<Env> {
    let clusters = Cluster::start_many(&["east", "north", "west"]).await?;
    let [east, north, west] = &clusters[..] else {
        return Err(anyhow!("three clusters expected"));
    };
    let w = west.client();
    install_link_crd(&w).await?;
    create_namespace(&w, NS).await?;
    let dns = DnsServer::start().await?;
    dns.set(NORTH_GATEWAY, &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20))])?;
    // `east`'s Link is created first: it is the older member of federated Services.
    let mut north_kubeconfig = String::new();
    let mut previous: Option<&str> = None;
    let links: Api<Link> = Api::namespaced(w.clone(), NS);
    for (target, gateway) in [(east, EAST_GATEWAY), (north, NORTH_GATEWAY)] {
        let name = target.name();
        let kubeconfig = remote_access_kubeconfig(target, NS).await?;
        put_credentials(west, NS, name, &kubeconfig).await?;
        north_kubeconfig = kubeconfig;
        let spec = json!({
            "gatewayIdentity": format!("linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.{name}"),
            "remoteDiscoverySelector": { "matchLabels": { "mirror.linkerd.io/exported": "remote-discovery" } },
            "federatedServiceSelector": { "matchLabels": { "mirror.linkerd.io/federated": "member" } },
        });
        apply_link(&w, NS, name, gateway, spec.clone()).await?;
        // Creation times have a resolution of one second: the Link is made again until the
        // API server dates it after the previous one (no controller runs yet to notice).
        if let Some(previous) = previous {
            wait_for("a Link dated after the previous one", WAIT, || async {
                let created = |l: Link| l.metadata.creation_timestamp.map(|t| t.0);
                let before = created(links.get(previous).await.ok()?)?;
                if before < created(links.get(name).await.ok()?)? {
                    return Some(());
                }
                links.delete(name, &DeleteParams::default()).await.ok()?;
                apply_link(&w, NS, name, gateway, spec.clone()).await.ok()?;
                None
            })
            .await?;
        }
        previous = Some(name);
    }
    let controller = start_controller(west, &dns, &[format!("--namespace={NS}")]).await?;
    Ok(Env {
        east: east.client(),
        east_node: east.node_name(),
        north: north.client(),
        west: w,
        dns,
        controller: Mutex::new(controller),
        north_kubeconfig,
        clusters: Mutex::new(clusters),
    })
}

/// A controller of `west`'s Links that resolves gateway names with the test's DNS server.
async fn start_controller(west: &Cluster, dns: &DnsServer, args: &[String]) -> Result<Program> {
    let mut args = args.to_vec();
    args.extend([
        "--log=info,mirror_controller=debug".to_owned(),
        format!("--dns-server={}", dns.addr()),
        // This cluster's members' private keys stay out of federated Services.
        "--local-excluded-labels=private.example.com/*".to_owned(),
    ]);
    Ok(start_mirror(west.kubeconfig_path(), &args).await?)
}

/// Creates (or replaces the labels and ports of) Service `ns/name` in the cluster of `client`.
async fn put_service(
    client: &Client,
    ns: &str,
    name: &str,
    labels: serde_json::Value,
    ports: &[(&str, u16)],
) -> Result<()> {
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p)| json!({ "name": n, "port": p }))
        .collect();
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": ns, "labels": labels },
        "spec": { "ports": ports },
    });
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&svc),
        )
        .await?;
    Ok(())
}

fn ports_of(s: &Service) -> BTreeSet<i32> {
    s.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect()
}

/// The federated-membership entry of `ns/name` in Link `link`'s status: status and reason.
async fn federated_status(
    w: &Client,
    link: &str,
    ns: &str,
    name: &str,
) -> Option<(String, String, String)> {
    let c = service_condition(w, NS, link, true, ns, name).await?;
    Some((format!("{:?}", c.status), c.reason, c.message))
}

/// Waits until `ns/name-federated` in `west` satisfies `ok`.
async fn federated_until(env: &Env, what: &str, ok: impl Fn(&Service) -> bool) -> Result<Service> {
    Ok(wait_for(what, WAIT, || async {
        get::<Service>(&env.west, "fed", "api-federated")
            .await
            .filter(|s| ok(s))
    })
    .await?)
}

fn annotation<'a>(s: &'a Service, key: &str) -> Option<&'a str> {
    s.annotations().get(key).map(String::as_str)
}

async fn federated(env: Arc<Env>) -> Result<()> {
    const REMOTE: &str = "multicluster.linkerd.io/remote-discovery";
    const LOCAL: &str = "multicluster.linkerd.io/local-discovery";
    let member = |from: &str| json!({ "mirror.linkerd.io/federated": "member", "from": from });
    for c in [&env.east, &env.north, &env.west] {
        create_namespace(c, "fed").await?;
    }
    put_service(
        &env.north,
        "fed",
        "api",
        member("north"),
        &[("http", 80), ("grpc", 9090)],
    )
    .await?;
    put_service(&env.east, "fed", "api", member("east"), &[("http", 80)]).await?;

    // Both members, in Link order (east's is older); metadata from east; ports of both.
    let s = federated_until(&env, "api-federated with both remote members", |s| {
        annotation(s, REMOTE) == Some("api@east,api@north")
    })
    .await?;
    ensure!(
        s.labels().get("from").map(String::as_str) == Some("east"),
        "{s:?}"
    );
    ensure!(
        s.labels()
            .get("mirror.linkerd.io/mirrored-service")
            .map(String::as_str)
            == Some("true")
            && !s.labels().contains_key("mirror.linkerd.io/cluster-name")
            && !s.labels().contains_key("mirror.linkerd.io/federated"),
        "labels: {:?}",
        s.labels()
    );
    ensure!(
        ports_of(&s) == BTreeSet::from([80, 9090]),
        "ports: {:?}",
        ports_of(&s)
    );
    ensure!(s.spec.as_ref().and_then(|s| s.selector.as_ref()).is_none());
    for link in ["east", "north"] {
        wait_for("federated status entries", WAIT, || async {
            let (st, reason, _) = federated_status(&env.west, link, "fed", "api").await?;
            (st == "True" && reason == "Mirrored").then_some(())
        })
        .await?;
    }

    // This cluster's own member comes first.
    let mut west_labels = member("west");
    west_labels["private.example.com/team"] = json!("payments");
    put_service(&env.west, "fed", "api", west_labels, &[("admin", 8080)]).await?;
    let s = federated_until(&env, "the local member", |s| {
        annotation(s, LOCAL) == Some("api")
    })
    .await?;
    ensure!(s.labels().get("from").map(String::as_str) == Some("west"));
    ensure!(
        !s.labels().contains_key("private.example.com/team"),
        "an excluded label of the local member was copied: {:?}",
        s.labels()
    );
    ensure!(annotation(&s, REMOTE) == Some("api@east,api@north"));
    ensure!(
        ports_of(&s) == BTreeSet::from([80, 8080, 9090]),
        "{:?}",
        ports_of(&s)
    );

    // A member changes a port: the change is reflected (Linkerd loses it, #13680).
    put_service(
        &env.north,
        "fed",
        "api",
        member("north"),
        &[("http", 80), ("grpc", 9091)],
    )
    .await?;
    federated_until(&env, "north's new port", |s| {
        ports_of(s) == BTreeSet::from([80, 8080, 9091])
    })
    .await?;

    // A member leaves: its entry and its ports go.
    put_service(
        &env.north,
        "fed",
        "api",
        json!({ "from": "north" }),
        &[("http", 80), ("grpc", 9091)],
    )
    .await?;
    federated_until(&env, "north to leave", |s| {
        annotation(s, REMOTE) == Some("api@east") && ports_of(s) == BTreeSet::from([80, 8080])
    })
    .await?;
    wait_for("north's status entry to go", WAIT, || async {
        federated_status(&env.west, "north", "fed", "api")
            .await
            .is_none()
            .then_some(())
    })
    .await?;

    // A headless member is refused, with a status that says why.
    let headless = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "db", "namespace": "fed", "labels": member("east") },
        "spec": { "clusterIP": "None", "ports": [{ "port": 5432 }] },
    });
    Api::<Service>::namespaced(env.east.clone(), "fed")
        .patch("db", &PatchParams::apply("e2e"), &Patch::Apply(&headless))
        .await?;
    let (_, reason, message) = wait_for("db refused", WAIT, || async {
        federated_status(&env.west, "east", "fed", "db")
            .await
            .filter(|s| s.0 == "False")
    })
    .await?;
    ensure!(
        reason == "InvalidService" && message.contains("headless"),
        "{reason}: {message}"
    );
    ensure!(
        get::<Service>(&env.west, "fed", "db-federated")
            .await
            .is_none()
    );

    // Every member gone: the federated Service goes.
    Api::<Service>::namespaced(env.west.clone(), "fed")
        .delete("api", &DeleteParams::default())
        .await?;
    Api::<Service>::namespaced(env.east.clone(), "fed")
        .delete("api", &DeleteParams::default())
        .await?;
    wait_for("api-federated to be deleted", WAIT, || async {
        get::<Service>(&env.west, "fed", "api-federated")
            .await
            .is_none()
            .then_some(())
    })
    .await?;
    Ok(())
}

/// A federated Service Linkerd's service mirror wrote (a plain create as `service-mirror`) with
/// an entry of a cluster no Link serves, a local member this cluster does not have and a port
/// no member has ends up exactly as meshlink writes it, owned by meshlink alone. As when moving
/// from Linkerd: the Service and its member are there when meshlink starts.
async fn federated_taken_over(env: Arc<Env>) -> Result<()> {
    const REMOTE: &str = "multicluster.linkerd.io/remote-discovery";
    let ns = "legacy-fed";
    let mut controller = env.controller.lock().await;
    controller.kill();
    for c in [&env.east, &env.west] {
        create_namespace(c, ns).await?;
    }
    let old: Service = serde_json::from_value(json!({
        "metadata": {
            "name": "db-federated",
            "labels": { "mirror.linkerd.io/mirrored-service": "true", "linkerd-only": "x" },
            "annotations": {
                REMOTE: "db@east,db@ghost",
                "multicluster.linkerd.io/local-discovery": "db",
            },
        },
        "spec": { "ports": [{ "name": "tcp", "port": 5432 }, { "name": "admin", "port": 9999 }] },
    }))?;
    let as_linkerd = PostParams {
        field_manager: Some("service-mirror".to_owned()),
        ..PostParams::default()
    };
    Api::<Service>::namespaced(env.west.clone(), ns)
        .create(&as_linkerd, &old)
        .await?;
    put_service(
        &env.east,
        ns,
        "db",
        json!({ "mirror.linkerd.io/federated": "member" }),
        &[("tcp", 5432)],
    )
    .await?;
    let clusters = env.clusters.lock().await;
    *controller = start_controller(&clusters[2], &env.dns, &[format!("--namespace={NS}")]).await?;
    drop((controller, clusters));
    let managers = |s: &Service| -> Vec<String> {
        s.metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|f| f.manager.clone())
            .collect()
    };
    // Taking over is two writes (ownership, then the apply): wait for the second, whose sign
    // is the recomputed member list, before looking at the rest.
    let svc = wait_for("the federated Service taken over", WAIT, || async {
        get::<Service>(&env.west, ns, "db-federated")
            .await
            .filter(|s| {
                managers(s) == ["meshlink-service-mirror"]
                    && annotation(s, REMOTE) == Some("db@east")
            })
    })
    .await?;
    ensure!(
        annotation(&svc, REMOTE) == Some("db@east"),
        "{:?}",
        svc.annotations()
    );
    ensure!(
        annotation(&svc, "multicluster.linkerd.io/local-discovery").is_none(),
        "{:?}",
        svc.annotations()
    );
    ensure!(
        ports_of(&svc) == BTreeSet::from([5432]),
        "{:?}",
        ports_of(&svc)
    );
    ensure!(
        !svc.labels().contains_key("linkerd-only"),
        "{:?}",
        svc.labels()
    );
    Ok(())
}

async fn dns_gateway(env: Arc<Env>) -> Result<()> {
    create_namespace(&env.north, "dns").await?;
    create_namespace(&env.west, "dns").await?;
    put_service(
        &env.north,
        "dns",
        "web",
        json!({ "mirror.linkerd.io/exported": "true", "app": "web" }),
        &[("http", 80)],
    )
    .await?;
    // A selector, so that a ready pod gives the remote Service a ready endpoint.
    Api::<Service>::namespaced(env.north.clone(), "dns")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "selector": { "app": "web" } } })),
        )
        .await?;
    let node = wait_for("north's node", WAIT, || async {
        Api::<k8s_openapi::api::core::v1::Node>::all(env.north.clone())
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .next()
            .map(|n| n.name_any())
    })
    .await?;
    create_ready_pod(
        &env.north,
        "dns",
        "web-0",
        &labels(&[("app", "web")]),
        IpAddr::V4(Ipv4Addr::new(10, 2, 0, 5)),
        &node,
    )
    .await?;
    let ips = |want: &'static [&'static str]| {
        let west = env.west.clone();
        move || {
            let west = west.clone();
            async move {
                get::<Endpoints>(&west, "dns", "web-north")
                    .await
                    .filter(|e| endpoint_ips(e).0 == want)
            }
        }
    };
    wait_for(
        "web-north at the name's first answer",
        WAIT,
        ips(&["192.0.2.20"]),
    )
    .await?;

    // The name's answer changes (a load balancer's addresses do): the mirror follows within
    // the record's TTL, with no restart and no Link change.
    env.dns.set(
        NORTH_GATEWAY,
        &[
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 22)),
        ],
    )?;
    wait_for(
        "web-north at the name's new answer",
        WAIT,
        ips(&["192.0.2.21", "192.0.2.22"]),
    )
    .await?;
    wait_for("the slice to follow", WAIT, || async {
        get::<EndpointSlice>(&env.west, "dns", "web-north-ipv4")
            .await
            .filter(|s| {
                let mut a: Vec<String> = s
                    .endpoints
                    .iter()
                    .flatten()
                    .flat_map(|e| e.addresses.clone())
                    .collect();
                a.sort();
                a == ["192.0.2.21", "192.0.2.22"]
            })
    })
    .await?;
    // east's mirrors are not touched by north's gateway.
    ensure!(
        get::<Endpoints>(&env.west, "dns", "web-east")
            .await
            .is_none()
    );
    Ok(())
}

async fn headless(env: Arc<Env>) -> Result<()> {
    let (e, w) = (&env.east, &env.west);
    for ns in ["hl"] {
        create_namespace(e, ns).await?;
        create_namespace(w, ns).await?;
    }
    create_namespace(w, "hl-other").await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "db", "labels": { "mirror.linkerd.io/exported": "true" } },
        "spec": { "clusterIP": "None", "selector": { "app": "db" }, "ports": [{ "name": "pg", "port": 5432 }] },
    }))?;
    Api::<Service>::namespaced(e.clone(), "hl")
        .create(&PostParams::default(), &svc)
        .await?;
    for (i, pod) in ["db-0", "db-1"].into_iter().enumerate() {
        let ip = Ipv4Addr::new(10, 3, 0, 10 + u8::try_from(i)?);
        create_ready_pod_in(
            e,
            "hl",
            pod,
            &labels(&[("app", "db")]),
            IpAddr::V4(ip),
            &env.east_node,
            "db",
        )
        .await?;
    }
    // Looks like one of this mirror's pod mirrors, but in another namespace: never touched.
    let decoy = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "db-0-east", "namespace": "hl-other", "labels": {
            "mirror.linkerd.io/mirrored-service": "true",
            "mirror.linkerd.io/cluster-name": "east",
            "mirror.linkerd.io/headless-mirror-svc-name": "db-east",
        } },
        "spec": { "ports": [{ "port": 5432 }] },
    });
    Api::<Service>::namespaced(w.clone(), "hl-other")
        .patch(
            "db-0-east",
            &PatchParams::apply("someone-else"),
            &Patch::Apply(&decoy),
        )
        .await?;

    // Mirrored as a ClusterIP Service until the pods' hostnames are seen in the remote
    // EndpointSlices (which may come after the Service), then replaced by a headless one.
    let headless =
        |s: &Service| s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
    wait_for("headless root mirror db-east", WAIT, || async {
        get::<Service>(w, "hl", "db-east").await.filter(headless)
    })
    .await?;
    // One ClusterIP mirror per pod, whose endpoints are the gateway.
    let mut pod_ips = Vec::new();
    for pod in ["db-0", "db-1"] {
        let name = format!("{pod}-east");
        let s: Service =
            wait_for(&format!("pod mirror {name}"), WAIT, || get(w, "hl", &name)).await?;
        ensure!(
            s.labels()
                .get("mirror.linkerd.io/headless-mirror-svc-name")
                .map(String::as_str)
                == Some("db-east")
        );
        ensure!(
            annotation(&s, "mirror.linkerd.io/remote-svc-fq-name")
                == Some(format!("{pod}.db.hl.svc.cluster.local").as_str())
        );
        ensure!(s.owner_references().iter().any(|o| o.name == "db-east"));
        // It records the version of the remote EndpointSlice it is made from (Linkerd's remote
        // Endpoints version), not the remote Service's.
        let remote_service_version = Api::<Service>::namespaced(e.clone(), "hl")
            .get("db")
            .await?
            .metadata
            .resource_version;
        wait_for(
            &format!("{name} to record the slice's version"),
            WAIT,
            || async {
                let slices = Api::<EndpointSlice>::namespaced(e.clone(), "hl")
                    .list(&ListParams::default().labels("kubernetes.io/service-name=db"))
                    .await
                    .ok()?;
                let versions: Vec<String> = slices
                    .items
                    .into_iter()
                    .filter_map(|s| s.metadata.resource_version)
                    .collect();
                let mirror: Service = get(w, "hl", &name).await?;
                let recorded =
                    annotation(&mirror, "mirror.linkerd.io/remote-resource-version")?.to_owned();
                (versions.contains(&recorded) && Some(&recorded) != remote_service_version.as_ref())
                    .then_some(())
            },
        )
        .await?;
        let ip = s
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| ip != "None")
            .ok_or_else(|| anyhow!("{name} has no ClusterIP"))?;
        pod_ips.push((pod.to_owned(), ip));
        wait_for(
            &format!("{name}'s endpoints at the gateway"),
            WAIT,
            || async {
                get::<Endpoints>(w, "hl", &name)
                    .await
                    .filter(|e| endpoint_ips(e).0 == [EAST_GATEWAY])
            },
        )
        .await?;
    }
    // The root's endpoints name each pod, at its mirror's address, on the pod's port.
    let named = |ep: &Endpoints| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = ep
            .subsets
            .iter()
            .flatten()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| (a.hostname.clone().unwrap_or_default(), a.ip.clone()))
            .collect();
        v.sort();
        v
    };
    let ep: Endpoints = wait_for("the root's named endpoints", WAIT, || async {
        get::<Endpoints>(w, "hl", "db-east")
            .await
            .filter(|ep| named(ep) == pod_ips)
    })
    .await?;
    let port = ep
        .subsets
        .iter()
        .flatten()
        .flat_map(|s| s.ports.iter().flatten())
        .next()
        .map(|p| p.port);
    ensure!(port == Some(5432), "the root's port is the pods': {ep:?}");

    // A pod stops being ready: its mirror goes, and its name leaves the root's endpoints.
    let not_ready = json!({ "status": { "conditions": [{ "type": "Ready", "status": "False" }] } });
    Api::<Pod>::namespaced(e.clone(), "hl")
        .patch_status(
            "db-1",
            &PatchParams::default(),
            &Patch::Strategic(&not_ready),
        )
        .await?;
    wait_for("db-1-east to be deleted", WAIT, || async {
        get::<Service>(w, "hl", "db-1-east")
            .await
            .is_none()
            .then_some(())
    })
    .await?;
    wait_for("the root to name db-0 only", WAIT, || async {
        get::<Endpoints>(w, "hl", "db-east")
            .await
            .filter(|ep| named(ep) == pod_ips[..1])
    })
    .await?;

    // Unexport: the root and every pod mirror go, in this namespace only.
    Api::<Service>::namespaced(e.clone(), "hl")
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "labels": { "mirror.linkerd.io/exported": null } } }),
            ),
        )
        .await?;
    wait_for("db-east and db-0-east to be deleted", WAIT, || async {
        (get::<Service>(w, "hl", "db-east").await.is_none()
            && get::<Service>(w, "hl", "db-0-east").await.is_none())
        .then_some(())
    })
    .await?;
    ensure!(
        get::<Service>(w, "hl-other", "db-0-east").await.is_some(),
        "a Service in another namespace was deleted"
    );
    Ok(())
}

/// Members that leave while the controller is stopped: after the start, `duo-federated` lists
/// only the member left, and `solo-federated`, whose only member left, is deleted.
async fn departure_while_stopped(env: Arc<Env>) -> Result<()> {
    const REMOTE: &str = "multicluster.linkerd.io/remote-discovery";
    let member = json!({ "mirror.linkerd.io/federated": "member" });
    for c in [&env.east, &env.north, &env.west] {
        create_namespace(c, "fed3").await?;
    }
    put_service(&env.east, "fed3", "duo", member.clone(), &[("http", 80)]).await?;
    put_service(&env.north, "fed3", "duo", member.clone(), &[("http", 80)]).await?;
    put_service(&env.north, "fed3", "solo", member, &[("http", 80)]).await?;
    wait_for("duo-federated and solo-federated", WAIT, || async {
        let duo = get::<Service>(&env.west, "fed3", "duo-federated").await?;
        let solo = get::<Service>(&env.west, "fed3", "solo-federated").await?;
        (annotation(&duo, REMOTE) == Some("duo@east,duo@north")
            && annotation(&solo, REMOTE) == Some("solo@north"))
        .then_some(())
    })
    .await?;

    // The controller stops; north's Services stop being members. The controller starts while
    // north's API server is down, so that it lists this cluster's federated Services before
    // north's members (the order in which a departure used to be lost), and north comes back.
    let mut controller = env.controller.lock().await;
    controller.kill();
    for name in ["duo", "solo"] {
        put_service(&env.north, "fed3", name, json!({}), &[("http", 80)]).await?;
    }
    let mut clusters = env.clusters.lock().await;
    clusters[1].kill(Component::ApiServer);
    *controller = start_controller(&clusters[2], &env.dns, &[format!("--namespace={NS}")]).await?;
    drop(controller);
    // A positive sign that the federation works again while north is down: a new member of
    // east gets its federated Service (written only once the local watches are listed).
    put_service(
        &env.east,
        "fed3",
        "tri",
        json!({ "mirror.linkerd.io/federated": "member" }),
        &[("http", 80)],
    )
    .await?;
    wait_for("tri-federated after the start", WAIT, || async {
        get::<Service>(&env.west, "fed3", "tri-federated").await
    })
    .await?;
    let duo = get::<Service>(&env.west, "fed3", "duo-federated").await;
    ensure!(
        duo.as_ref().and_then(|s| annotation(s, REMOTE)) == Some("duo@east,duo@north"),
        "north's entry must stay while north is unknown: {duo:?}"
    );
    clusters[1].start_component(Component::ApiServer).await?;
    drop(clusters);
    wait_for("north to leave duo-federated", WAIT, || async {
        get::<Service>(&env.west, "fed3", "duo-federated")
            .await
            .filter(|s| annotation(s, REMOTE) == Some("duo@east"))
    })
    .await?;
    wait_for("solo-federated to be deleted", WAIT, || async {
        get::<Service>(&env.west, "fed3", "solo-federated")
            .await
            .is_none()
            .then_some(())
    })
    .await?;
    Ok(())
}

async fn restart_and_link_deletion(env: Arc<Env>) -> Result<()> {
    const REMOTE: &str = "multicluster.linkerd.io/remote-discovery";
    let member = json!({ "mirror.linkerd.io/federated": "member" });
    for c in [&env.east, &env.north, &env.west] {
        create_namespace(c, "fed2").await?;
    }
    put_service(&env.east, "fed2", "cart", member.clone(), &[("http", 80)]).await?;
    put_service(
        &env.north,
        "fed2",
        "cart",
        member,
        &[("http", 80), ("admin", 9000)],
    )
    .await?;
    let get_fed = || get::<Service>(&env.west, "fed2", "cart-federated");
    let before: Service = wait_for("cart-federated with both members", WAIT, || async {
        get_fed()
            .await
            .filter(|s| annotation(s, REMOTE) == Some("cart@east,cart@north"))
    })
    .await?;

    // A restarted controller neither deletes nor rewrites it (ready means it has listed
    // everything and reconciled every federated Service once).
    {
        let mut controller = env.controller.lock().await;
        controller.kill();
        *controller = start_controller(
            &env.clusters.lock().await[2],
            &env.dns,
            &[format!("--namespace={NS}")],
        )
        .await?;
    }
    let after = get_fed()
        .await
        .ok_or_else(|| anyhow!("cart-federated is gone after a restart"))?;
    ensure!(
        after.uid() == before.uid() && after.resource_version() == before.resource_version(),
        "the restart replaced or rewrote cart-federated"
    );

    // Deleting north's Link takes north out of every federated Service, and its mirrors away.
    Api::<Link>::namespaced(env.west.clone(), NS)
        .delete("north", &DeleteParams::default())
        .await?;
    let s = wait_for("north to leave cart-federated", WAIT, || async {
        get_fed()
            .await
            .filter(|s| annotation(s, REMOTE) == Some("cart@east"))
    })
    .await?;
    ensure!(ports_of(&s) == BTreeSet::from([80]), "{:?}", ports_of(&s));
    ensure!(s.uid() == before.uid(), "cart-federated was replaced");
    wait_for("north's mirrors to go", WAIT, || async {
        get::<Service>(&env.west, "dns", "web-north")
            .await
            .is_none()
            .then_some(())
    })
    .await?;
    Ok(())
}

/// How many times the controller started the work of the Link of `cluster`.
async fn starts(env: &Env, cluster: &str) -> Result<f64> {
    Ok(env
        .controller
        .lock()
        .await
        .metric(
            "service_mirror_link_worker_starts_total",
            &format!("target_cluster_name=\"{cluster}\""),
        )
        .await?)
}

/// How many times the controller has looked at the Link of `cluster`.
async fn link_reconciles(env: &Env, cluster: &str) -> Result<f64> {
    Ok(env
        .controller
        .lock()
        .await
        .metric(
            "service_mirror_link_reconciles_total",
            &format!("target_cluster_name=\"{cluster}\""),
        )
        .await?)
}

async fn spec_change(env: Arc<Env>) -> Result<()> {
    create_namespace(&env.east, "spec").await?;
    create_namespace(&env.west, "spec").await?;
    put_service(
        &env.east,
        "spec",
        "echo",
        json!({ "mirror.linkerd.io/exported": "true", "tier": "x" }),
        &[("http", 80)],
    )
    .await?;
    wait_for("echo-east with its tier label", WAIT, || async {
        get::<Service>(&env.west, "spec", "echo-east")
            .await
            .filter(|s| s.labels().contains_key("tier"))
    })
    .await?;
    let (east, north) = (starts(&env, "east").await?, starts(&env, "north").await?);
    ensure!(
        east >= 1.0 && north >= 1.0,
        "starts: east {east}, north {north}"
    );

    // A spec change of east's Link: east's work restarts and applies it; north's does not.
    Api::<Link>::namespaced(env.west.clone(), NS)
        .patch(
            "east",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "excludedLabels": ["tier"] } })),
        )
        .await?;
    wait_for("echo-east without the now excluded label", WAIT, || async {
        get::<Service>(&env.west, "spec", "echo-east")
            .await
            .filter(|s| !s.labels().contains_key("tier"))
    })
    .await?;
    ensure!(
        starts(&env, "east").await? == east + 1.0,
        "east's work did not restart once"
    );
    ensure!(
        starts(&env, "north").await? == north,
        "north's work restarted"
    );

    // A status-only change restarts nothing: once the controller has looked at the changed
    // Link, north's work has not restarted.
    let looked = link_reconciles(&env, "north").await?;
    Api::<Link>::namespaced(env.west.clone(), NS)
        .patch_status(
            "north",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "gateway": { "latencyMilliseconds": 12345 } } })),
        )
        .await?;
    wait_for(
        "the controller to look at north's changed Link",
        WAIT,
        || async { (link_reconciles(&env, "north").await.ok()? > looked).then_some(()) },
    )
    .await?;
    ensure!(
        starts(&env, "north").await? == north,
        "a status change restarted north's work"
    );
    ensure!(starts(&env, "east").await? == east + 1.0);
    Ok(())
}

async fn one_named_link(env: Arc<Env>) -> Result<()> {
    const NS2: &str = "mc2";
    let clusters = env.clusters.lock().await;
    let west = &clusters[2];
    create_namespace(&env.west, NS2).await?;
    put_credentials(west, NS2, "north", &env.north_kubeconfig).await?;
    for name in ["north2", "ignored"] {
        let credentials = json!({ "clusterCredentialsSecret": "cluster-credentials-north" });
        apply_link(&env.west, NS2, name, "192.0.2.30", credentials).await?;
    }
    // A second controller, as Linkerd's per-Link deployments: one Link, and it may create
    // the namespaces of what it mirrors.
    let second = start_controller(
        west,
        &env.dns,
        &[
            format!("--namespace={NS2}"),
            "--link=north2".to_owned(),
            "--enable-namespace-creation".to_owned(),
        ],
    )
    .await?;
    // `autons` exists in north only.
    create_namespace(&env.north, "autons").await?;
    put_service(
        &env.north,
        "autons",
        "cache",
        json!({ "mirror.linkerd.io/exported": "true" }),
        &[("redis", 6379)],
    )
    .await?;
    let result = async {
        wait_for(
            "cache-north2 in a namespace the controller created",
            WAIT,
            || get::<Service>(&env.west, "autons", "cache-north2"),
        )
        .await?;
        let ns = Api::<k8s_openapi::api::core::v1::Namespace>::all(env.west.clone())
            .get("autons")
            .await?;
        ensure!(
            ns.labels()
                .get("mirror.linkerd.io/cluster-name")
                .map(String::as_str)
                == Some("north2"),
            "created namespace labels: {:?}",
            ns.labels()
        );
        // The Link it was not asked to serve is not touched.
        let ignored = Api::<Link>::namespaced(env.west.clone(), NS2)
            .get("ignored")
            .await?;
        ensure!(
            ignored.status.is_none() && ignored.finalizers().is_empty(),
            "the other Link was served: {ignored:?}"
        );
        ensure!(
            get::<Service>(&env.west, "autons", "cache-ignored")
                .await
                .is_none()
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\n--- second controller log:\n{}", second.log_tail()))
}
