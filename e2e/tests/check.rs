//! `meshlink check` against two real clusters linked as users link them: each runs its identity
//! service, destination service and proxy injector; `east` runs the gateway; `west` runs the
//! service-mirror controller (as its manifest's ServiceAccount), linked to `east` with `meshlink
//! link` output applied unchanged. The harness plays the kubelet: the control-plane Pods are
//! marked Ready, and the gateway's Pod is marked not ready when its process is stopped.
//!
//! The healthy pair passes every check (exit code 0); then each fault is injected in turn, and
//! the matching check must fail with its hint and exit code 1: the credentials Secret deleted,
//! the gateway stopped, the anchors differing, a mirror without endpoints, the controller
//! stopped, the injector stopped. After each, the pair is repaired and must pass again.
//!
//! Needs root and iproute2 (the gateway listens on a veth address: Endpoints refuse loopback).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use e2e::{
    Cluster, apply_yaml, create_namespace, create_ready_pod,
    install::{Injector, injector_pod, start_injector},
    mesh::{self, GatewaySettings, service_account_kubeconfig, start_gateway, trust_domain},
    meshlink::{
        Program, create_gateway_service, free_port, labels, link_condition, start_mirror,
        wait_remote_access_token, workspace_binary,
    },
    netns::Host,
    pod::{ControlPlane, set_pod_ready},
    wait_for,
};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Secret, Service},
    },
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const NS: &str = "linkerd-multicluster";
const WAIT: Duration = Duration::from_secs(60);
/// The controller's Lease: short, so that a stopped controller shows within seconds.
const LEASE_ARGS: [&str; 2] = ["--lease-duration=4s", "--lease-renew=1s"];

/// What every check says about a healthy `west` (the source cluster, linked to east; it has no
/// gateway of its own).
const WEST_HEALTHY: &[(&str, &str)] = &[
    ("trust-anchors-valid", "success"),
    ("issuer-valid", "success"),
    ("issuer-not-expiring", "success"),
    ("destination-ready", "success"),
    ("injector-registered", "success"),
    ("injector-reachable", "success"),
    ("gateway-ready", "skipped"),
    ("pods-meshed", "skipped"),
    ("link-crd-exists", "success"),
    ("links-valid", "success"),
    ("links-version", "success"),
    ("remote-credentials-valid", "success"),
    ("anchors-shared", "success"),
    ("controller-rbac", "success"),
    ("controllers-running", "success"),
    ("remotes-reachable", "success"),
    ("gateways-alive", "success"),
    ("mirrors-have-endpoints", "success"),
    ("mirrors-part-of-link", "success"),
];

/// And about a healthy `east` (the target: a gateway, no Links).
const EAST_HEALTHY: &[(&str, &str)] = &[
    ("trust-anchors-valid", "success"),
    ("issuer-valid", "success"),
    ("issuer-not-expiring", "success"),
    ("destination-ready", "success"),
    ("injector-registered", "success"),
    ("injector-reachable", "success"),
    ("gateway-ready", "success"),
    ("pods-meshed", "skipped"),
    ("link-crd-exists", "success"),
    ("links-valid", "skipped"),
    ("links-version", "skipped"),
    ("remote-credentials-valid", "skipped"),
    ("anchors-shared", "skipped"),
    ("controller-rbac", "skipped"),
    ("controllers-running", "skipped"),
    ("remotes-reachable", "skipped"),
    ("gateways-alive", "skipped"),
    ("mirrors-have-endpoints", "skipped"),
    ("mirrors-part-of-link", "skipped"),
];

/// One run of `meshlink check -o json`.
struct Report {
    code: Option<i32>,
    json: Value,
    stderr: String,
    took: Duration,
}

impl Report {
    fn checks(&self) -> impl Iterator<Item = &Value> {
        self.json["categories"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["checks"].as_array().into_iter().flatten())
    }

    fn get(&self, id: &str) -> Result<&Value> {
        self.checks()
            .find(|c| c["id"] == id)
            .with_context(|| format!("no check {id} in {:#}", self.json))
    }

    fn results(&self) -> BTreeMap<String, String> {
        self.checks()
            .map(|c| {
                (
                    c["id"].as_str().unwrap_or_default().to_owned(),
                    c["result"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The checks that fail the command.
    fn failing(&self) -> Vec<String> {
        self.checks()
            .filter(|c| c["result"] == "error")
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Asserts that check `id` failed at error level, its error contains `error` and its hint
    /// contains `hint`, and that the command exited with 1.
    fn assert_fails(&self, id: &str, error: &str, hint: &str) -> Result<()> {
        let c = self.get(id)?;
        ensure!(
            c["result"] == "error",
            "{id} did not fail: {c:#}\n{:#}",
            self.json
        );
        let text = c["error"].as_str().unwrap_or_default();
        ensure!(text.contains(error), "{id}: {text:?} lacks {error:?}");
        let h = c["hint"].as_str().unwrap_or_default();
        ensure!(h.contains(hint), "{id}: hint {h:?} lacks {hint:?}");
        ensure!(
            self.code == Some(1) && self.json["success"] == false,
            "exit code {:?}, success {} with {id} failing",
            self.code,
            self.json["success"]
        );
        Ok(())
    }
}

/// `meshlink check -o <output> --wait <wait>` against `cluster`: exit code, stdout, stderr.
async fn run_check(
    cluster: &Cluster,
    output: &str,
    wait: &str,
) -> Result<(Option<i32>, String, String)> {
    let out = tokio::process::Command::new(workspace_binary("meshlink")?)
        .args(["check", "-o", output, "--wait", wait, "--kubeconfig"])
        .arg(cluster.kubeconfig_path())
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    Ok((
        out.status.code(),
        String::from_utf8(out.stdout)?,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn check(cluster: &Cluster, wait: &str) -> Result<Report> {
    let started = Instant::now();
    let (code, stdout, stderr) = run_check(cluster, "json", wait).await?;
    let json = serde_json::from_str(&stdout)
        .with_context(|| format!("`meshlink check -o json` printed {stdout:?}; stderr {stderr}"))?;
    Ok(Report {
        code,
        json,
        stderr,
        took: started.elapsed(),
    })
}

/// Waits until every check of `cluster` passes.
async fn healthy(cluster: &Cluster) -> Result<Report> {
    until(cluster, "to pass its checks", |r| r.failing().is_empty()).await
}

/// Runs `meshlink check --wait 0s` until its report satisfies `done`; on timeout the error
/// shows the last report.
async fn until(cluster: &Cluster, what: &str, done: impl Fn(&Report) -> bool) -> Result<Report> {
    let what = format!("{} {what}", cluster.name());
    let found = wait_for(&what, WAIT, || async {
        let r = check(cluster, "0s").await.ok()?;
        done(&r).then_some(r)
    })
    .await;
    match found {
        Ok(r) => Ok(r),
        Err(e) => {
            let last = check(cluster, "0s")
                .await
                .map(|r| r.json)
                .unwrap_or_default();
            Err(anyhow!("{e}; last report: {last:#}"))
        }
    }
}

fn failed(r: &Report, id: &str) -> bool {
    r.get(id).is_ok_and(|c| c["result"] == "error")
}

fn assert_results(report: &Report, want: &[(&str, &str)]) -> Result<()> {
    let want: BTreeMap<String, String> = want
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ensure!(
        report.results() == want,
        "unexpected results:\n{:#}",
        report.json
    );
    Ok(())
}

/// The two clusters and the programs that make them a linked pair.
struct Pair {
    east: Cluster,
    west: Cluster,
    dir: tempfile::TempDir,
    net: Host,
    _east_cp: ControlPlane,
    _west_cp: ControlPlane,
    gateway: GatewaySettings,
    gateway_program: Option<Program>,
    controller_kubeconfig: std::path::PathBuf,
    controller: Option<Program>,
    /// west's injector, on its own veth address (the injector's port is fixed), and east's.
    west_net: Host,
    injector: Option<Injector>,
    _east_injector: Injector,
    /// What `meshlink link` printed: the credentials Secret, the Link, the controller.
    link_yaml: String,
}

fn pod_ip(cluster: u8, n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, cluster, n))
}

/// Marks the destination service's Pod Ready in `cluster`, as a kubelet would once it runs.
async fn destination_pod(cluster: &Cluster, octet: u8) -> Result<()> {
    let c = cluster.client();
    create_namespace(&c, "linkerd").await?;
    create_ready_pod(
        &c,
        "linkerd",
        "linkerd-destination-0",
        &labels(&[("linkerd.io/control-plane-component", "destination")]),
        pod_ip(octet, 2),
        &cluster.node_name(),
    )
    .await?;
    Ok(())
}

/// Starts `meshlink-injector` for `cluster` at `ip`, as its manifest's ServiceAccount.
async fn injector(cluster: &Cluster, ip: Ipv4Addr, dir: &std::path::Path) -> Result<Injector> {
    let extra = [format!("--trust-domain={}", trust_domain(cluster.name()))];
    start_injector(cluster, ip, &dir.join("anchor/ca.crt"), &extra, dir).await
}

/// Applies the injector's manifest to `cluster`, starts it at `ip` and gives its Service the
/// ready Pod there.
async fn install_injector(
    cluster: &Cluster,
    ip: Ipv4Addr,
    dir: &std::path::Path,
) -> Result<Injector> {
    mesh::apply_manifest(cluster, "injector/injector.yaml").await?;
    let running = injector(cluster, ip, dir).await?;
    injector_pod(cluster, "linkerd-proxy-injector-0", ip).await?;
    Ok(running)
}

impl Pair {
    async fn start() -> Result<Self> {
        proxy_identity::tls::install_default_provider();
        let net = Host::create().context("a veth address for the control planes and gateway")?;
        let ip = net.host_address();
        let mut clusters = Cluster::start_many(&["east", "west"]).await?.into_iter();
        let (Some(east), Some(west)) = (clusters.next(), clusters.next()) else {
            return Err(anyhow!("two clusters expected"));
        };
        let dir = tempfile::tempdir()?;
        mesh::make_pki(dir.path(), &["east", "west"])?;
        let (east_cp, west_cp) = tokio::try_join!(
            ControlPlane::start(&east, dir.path(), ip),
            ControlPlane::start(&west, dir.path(), ip),
        )?;
        destination_pod(&east, 1).await?;
        destination_pod(&west, 2).await?;

        // east: the gateway, probed on its admin port.
        mesh::apply_manifest(&east, "gateway/gateway.yaml").await?;
        let gateway = GatewaySettings {
            addr: SocketAddr::new(IpAddr::V4(ip), free_port()?),
            admin: SocketAddr::new(IpAddr::V4(ip), free_port()?),
            identity_addr: east_cp.identity_addr,
            anchors_file: dir.path().join("anchor/ca.crt"),
            extra: Vec::new(),
            binary: None,
        };
        create_gateway_service(&east, &ip.to_string(), "1").await?;
        let ports = json!({ "spec": { "ports": [
            { "name": "mc-gateway", "port": gateway.addr.port(), "targetPort": gateway.addr.port(), "protocol": "TCP" },
            { "name": "mc-probe", "port": gateway.admin.port(), "targetPort": gateway.admin.port(), "protocol": "TCP" },
        ] } });
        Api::<Service>::namespaced(east.client(), NS)
            .patch(
                "linkerd-gateway",
                &PatchParams::default(),
                &Patch::Merge(&ports),
            )
            .await?;
        let gateway_program = start_gateway(&east, &gateway, dir.path()).await?;
        create_ready_pod(
            &east.client(),
            NS,
            "linkerd-gateway-0",
            &labels(&[("app", "linkerd-gateway")]),
            pod_ip(1, 3),
            &east.node_name(),
        )
        .await?;

        // east: remote access for west.
        mesh::apply_manifest(&east, "mirror/remote-access.yaml").await?;
        wait_remote_access_token(&east).await?;

        // west: `meshlink link` against east, applied unchanged, and the controller.
        let link_yaml = mesh::cli(&[
            "link",
            "--cluster-name",
            "east",
            "--gateway-addresses",
            &ip.to_string(),
            "--with-controller",
            "--kubeconfig",
            &east.kubeconfig_path().display().to_string(),
        ])?;
        apply_yaml(&west.client(), &link_yaml)
            .await
            .context("applying `meshlink link` output")?;
        let controller_kubeconfig =
            service_account_kubeconfig(&west, NS, "meshlink-service-mirror", dir.path()).await?;

        // Both: the proxy injector, last, so that no Pod above waited for a webhook.
        let west_net = Host::create().context("a veth address for west's injector")?;
        let east_injector = install_injector(&east, ip, dir.path()).await?;
        let west_injector = install_injector(&west, west_net.host_address(), dir.path()).await?;
        let mut pair = Self {
            east,
            west,
            dir,
            net,
            _east_cp: east_cp,
            _west_cp: west_cp,
            gateway,
            gateway_program: Some(gateway_program),
            controller_kubeconfig,
            controller: None,
            west_net,
            injector: Some(west_injector),
            _east_injector: east_injector,
            link_yaml,
        };
        pair.start_controller().await?;

        // An exported Service in east, mirrored in west through the gateway.
        let (e, w) = (pair.east.client(), pair.west.client());
        create_namespace(&e, "shop").await?;
        create_namespace(&w, "shop").await?;
        let web: Service = serde_json::from_value(json!({
            "metadata": { "name": "web", "labels": { "mirror.linkerd.io/exported": "true" } },
            "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80 }] },
        }))?;
        Api::<Service>::namespaced(e.clone(), "shop")
            .create(&PostParams::default(), &web)
            .await?;
        create_ready_pod(
            &e,
            "shop",
            "web-0",
            &labels(&[("app", "web")]),
            pod_ip(1, 10),
            &pair.east.node_name(),
        )
        .await?;
        wait_for("Link east Ready", WAIT, || async {
            (link_condition(&w, NS, "east", "Ready").await?.0 == "True").then_some(())
        })
        .await?;
        Ok(pair)
    }

    async fn start_injector(&mut self) -> Result<()> {
        let ip = self.west_net.host_address();
        self.injector = Some(injector(&self.west, ip, self.dir.path()).await?);
        Ok(())
    }

    async fn start_controller(&mut self) -> Result<()> {
        let mut args = vec![format!("--namespace={NS}")];
        args.extend(LEASE_ARGS.iter().map(|a| (*a).to_owned()));
        self.controller = Some(start_mirror(&self.controller_kubeconfig, &args).await?);
        Ok(())
    }

    fn logs(&self) -> String {
        let tail = |p: &Option<Program>| p.as_ref().map(Program::log_tail).unwrap_or_default();
        format!(
            "--- controller log:\n{}\n--- gateway log:\n{}\n--- west's injector log:\n{}",
            tail(&self.controller),
            tail(&self.gateway_program),
            self.injector
                .as_ref()
                .map(|i| i.program.log_tail())
                .unwrap_or_default()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_healthy_pair_and_names_each_fault() -> Result<()> {
    let mut pair = Pair::start().await?;
    let result = faults(&mut pair).await;
    result.map_err(|e| anyhow!("{e:#}\n{}", pair.logs()))
}

async fn faults(pair: &mut Pair) -> Result<()> {
    let w = pair.west.client();

    // Healthy: both clusters pass every check, and say so with exit code 0.
    let west = healthy(&pair.west).await?;
    assert_results(&west, WEST_HEALTHY)?;
    let east = healthy(&pair.east).await?;
    assert_results(&east, EAST_HEALTHY)?;
    ensure!(
        west.code == Some(0) && east.code == Some(0) && west.json["success"] == true,
        "exit codes {:?} {:?}",
        west.code,
        east.code
    );
    let (code, table, _) = run_check(&pair.west, "table", "0s").await?;
    ensure!(
        code == Some(0)
            && table.contains("√ API server reaches the proxy injector\n")
            && table.ends_with("Status check results are √\n"),
        "{table}"
    );

    credentials_deleted(pair, &w).await?;
    gateway_stopped(pair, &w).await?;
    anchors_differ(pair, &w).await?;
    mirror_without_endpoints(pair, &w).await?;
    controller_stopped(pair, &w).await?;
    injector_stopped(pair).await?;
    Ok(())
}

async fn credentials_deleted(pair: &mut Pair, w: &Client) -> Result<()> {
    Api::<Secret>::namespaced(w.clone(), NS)
        .delete("cluster-credentials-east", &DeleteParams::default())
        .await?;
    let r = check(&pair.west, "0s").await?;
    r.assert_fails(
        "remote-credentials-valid",
        "* east: Secret linkerd-multicluster/cluster-credentials-east does not exist",
        "meshlink link --cluster-name",
    )?;
    // The table says the same, with the hint under the failure.
    let (code, table, _) = run_check(&pair.west, "table", "0s").await?;
    ensure!(code == Some(1), "exit code {code:?}");
    ensure!(
        table.contains("× remote cluster access credentials are valid\n    * east: Secret")
            && table.contains("    hint: run `meshlink link --cluster-name <target>`")
            && table.ends_with("Status check results are ×\n"),
        "{table}"
    );

    apply_yaml(w, &pair.link_yaml).await?;
    healthy(&pair.west).await?;
    Ok(())
}

async fn gateway_stopped(pair: &mut Pair, w: &Client) -> Result<()> {
    drop(pair.gateway_program.take());
    // The kubelet would see its readiness probe fail.
    set_pod_ready(&pair.east.client(), NS, "linkerd-gateway-0", false).await?;
    wait_for("GatewayAlive=False", WAIT, || async {
        (link_condition(w, NS, "east", "GatewayAlive").await?.0 == "False").then_some(())
    })
    .await?;
    // The controller turns the mirrors' endpoints not ready right after.
    let r = until(&pair.west, "to see the gateway dead", |r| {
        failed(r, "gateways-alive") && failed(r, "mirrors-have-endpoints")
    })
    .await?;
    r.assert_fails(
        "gateways-alive",
        &format!(
            "* east: the gateway at {}:{} (probe port {}) is not alive",
            pair.net.host_address(),
            pair.gateway.addr.port(),
            pair.gateway.admin.port()
        ),
        "check that the target's gateway is running",
    )?;
    // Its mirrors' endpoints are not ready either.
    r.assert_fails(
        "mirrors-have-endpoints",
        "* shop/web-east (from east) has no ready endpoints (1 not ready)",
        "gateway is alive",
    )?;
    until(&pair.east, "to see its gateway not ready", |r| {
        failed(r, "gateway-ready")
    })
    .await?
    .assert_fails(
        "gateway-ready",
        "Service linkerd-multicluster/linkerd-gateway has no ready endpoints (1 not ready)",
        "gateway pods",
    )?;

    // Back, and this time `--wait` does the waiting: the gateway's liveness is retried until
    // the controller probes it alive again.
    pair.gateway_program = Some(start_gateway(&pair.east, &pair.gateway, pair.dir.path()).await?);
    set_pod_ready(&pair.east.client(), NS, "linkerd-gateway-0", true).await?;
    let r = check(&pair.west, "60s").await?;
    ensure!(
        r.code == Some(0) && r.failing().is_empty(),
        "--wait did not wait for the gateway: {:#}",
        r.json
    );
    healthy(&pair.east).await?;
    Ok(())
}

async fn anchors_differ(pair: &mut Pair, w: &Client) -> Result<()> {
    // west starts trusting a second anchor that east does not have (a rotation done in one
    // cluster only): its issuer still chains, the clusters no longer share their anchors.
    let other = pair.dir.path().join("other");
    mesh::cli(&["identity", "anchor", "--out", &other.display().to_string()])?;
    let roots: Api<ConfigMap> = Api::namespaced(w.clone(), "linkerd");
    let before = roots.get("linkerd-identity-trust-roots").await?;
    let bundle = before
        .data
        .as_ref()
        .and_then(|d| d.get("ca-bundle.crt"))
        .context("no bundle")?
        .clone();
    let both = format!("{bundle}{}", std::fs::read_to_string(other.join("ca.crt"))?);
    set_bundle(&roots, &both).await?;
    let r = check(&pair.west, "0s").await?;
    r.assert_fails(
        "anchors-shared",
        "* east: the trust anchors differ; only here: CN=root.linkerd.cluster.local",
        "same anchor bundle",
    )?;
    ensure!(
        r.get("issuer-valid")?["result"] == "success",
        "the issuer still chains: {:#}",
        r.json
    );
    set_bundle(&roots, &bundle).await?;
    healthy(&pair.west).await?;
    Ok(())
}

async fn set_bundle(roots: &Api<ConfigMap>, bundle: &str) -> Result<()> {
    let patch = json!({ "data": { "ca-bundle.crt": bundle } });
    roots
        .patch(
            "linkerd-identity-trust-roots",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn mirror_without_endpoints(pair: &mut Pair, w: &Client) -> Result<()> {
    // An exported headless Service with no pods: its mirror has nothing to point at.
    let e = pair.east.client();
    let db: Service = serde_json::from_value(json!({
        "metadata": { "name": "db", "labels": { "mirror.linkerd.io/exported": "true" } },
        "spec": { "clusterIP": "None", "selector": { "app": "db" }, "ports": [{ "name": "pg", "port": 5432 }] },
    }))?;
    let services = Api::<Service>::namespaced(e, "shop");
    services.create(&PostParams::default(), &db).await?;
    let mirrors = Api::<Service>::namespaced(w.clone(), "shop");
    wait_for("the mirror shop/db-east", WAIT, || async {
        mirrors.get_opt("db-east").await.ok()?.map(drop)
    })
    .await?;
    let r = check(&pair.west, "0s").await?;
    r.assert_fails(
        "mirrors-have-endpoints",
        "* shop/db-east (from east) has no ready endpoints (0 not ready)",
        "has ready pods",
    )?;
    ensure!(
        r.failing() == ["mirrors-have-endpoints"],
        "only the mirror's check fails: {:#}",
        r.json
    );
    services.delete("db", &DeleteParams::default()).await?;
    wait_for("the mirror shop/db-east to go", WAIT, || async {
        mirrors
            .get_opt("db-east")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    healthy(&pair.west).await?;
    Ok(())
}

/// Whether Lease `name` in `client`'s `NS` is held now.
async fn lease_held(client: &Client, name: &str) -> Option<bool> {
    let lease = Api::<Lease>::namespaced(client.clone(), NS)
        .get(name)
        .await
        .ok()?;
    let spec = lease.spec?;
    let held = spec.holder_identity.is_some_and(|h| !h.is_empty())
        && spec.renew_time.is_some_and(|t| {
            t.0 + SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)))
                > Timestamp::now()
        });
    Some(held)
}

async fn controller_stopped(pair: &mut Pair, w: &Client) -> Result<()> {
    // A crash: the Lease is not released, it expires.
    if let Some(mut c) = pair.controller.take() {
        c.kill();
    }
    wait_for("the controller's Lease to expire", WAIT, || async {
        (!lease_held(w, "meshlink-service-mirror-write").await?).then_some(())
    })
    .await?;
    // Retried under --wait (and still failing at its end), then reported.
    let r = check(&pair.west, "3s").await?;
    r.assert_fails(
        "controllers-running",
        "* east: Lease linkerd-multicluster/meshlink-service-mirror-write of ",
        "start the service-mirror controller",
    )?;
    ensure!(
        r.took >= Duration::from_secs(2)
            && r.stderr
                .contains("waiting for: service mirror controllers are running"),
        "not retried: took {:?}, stderr {}",
        r.took,
        r.stderr
    );
    // Without a controller the Link's status is not current: not judged.
    for id in ["remotes-reachable", "gateways-alive"] {
        ensure!(r.get(id)?["result"] == "skipped", "{id}: {:#}", r.json);
    }
    ensure!(r.failing() == ["controllers-running"], "{:#}", r.json);
    pair.start_controller().await?;
    healthy(&pair.west).await?;
    Ok(())
}

/// The injector stopped: with failurePolicy Ignore the API server creates Pods un-injected and
/// says nothing, so only the dry run shows it.
async fn injector_stopped(pair: &mut Pair) -> Result<()> {
    drop(pair.injector.take());
    let r = until(&pair.west, "to see the injector gone", |r| {
        failed(r, "injector-reachable")
    })
    .await?;
    ensure!(
        r.get("injector-registered")?["result"] == "success"
            && r.failing() == ["injector-reachable"],
        "{:#}",
        r.json
    );
    r.assert_fails(
        "injector-reachable",
        "a dry-run Pod annotated linkerd.io/inject: enabled came back without a linkerd-proxy container (containers: check)",
        "linkerd-proxy-injector has ready endpoints",
    )?;
    pair.start_injector().await?;
    healthy(&pair.west).await?;
    Ok(())
}
