//! The path `make demo` shows, as a test: two clusters installed with `meshlink install` and
//! kubectl, linked with `meshlink link`, a Deployment injected by the webhook in `east` and one
//! injected by `meshlink inject` in `west`, their Pods run from the specs the API server
//! stored ([`e2e::kubelet`]), cluster DNS from CoreDNS, and an unmodified curl calling the
//! mirror by name.
//!
//! Needs root, iproute2, iptables, curl and setpriv; without them the setup fails and says so.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use e2e::{
    Cluster, ClusterOptions,
    install::{
        Installed, check, checks_of, kubectl, meshlink_piped, pods_of, start_installed_mirror,
        stored_versions, wait_mirror_endpoints,
    },
    mesh::{self, gateway_id},
    meshlink::wait_remote_access_token,
    pod::{MeshedPod, curl},
    wait_for,
};

const WAIT: Duration = Duration::from_secs(60);
const SHOP: &str = "shop";

fn label(key: &str, value: &str) -> String {
    format!("{key}=\"{value}\"")
}

/// `east`'s shop: the namespace asks for injection; `web` is exported.
const WEB: &str = include_str!("../../manifests/examples/shop-web.yaml");
/// `west`'s client, meshed by `meshlink inject` before it is applied.
const CLIENT: &str = include_str!("../../manifests/examples/shop-client.yaml");

/// The name of the Pod the ReplicaSet controller made for Deployment `shop/<app>`.
async fn pod_name(cluster: &Cluster, app: &str) -> Result<String> {
    Ok(wait_for(&format!("a Pod of shop/{app}"), WAIT, || async {
        pods_of(cluster, SHOP, app)
            .await
            .ok()?
            .into_iter()
            .next()?
            .metadata
            .name
    })
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_linked_injected_and_called_by_name() -> Result<()> {
    let options = |name: &str| {
        let mut o = ClusterOptions::new(name);
        o.workload_controllers = true;
        o
    };
    let (east, west) = tokio::try_join!(
        Cluster::start_with(options("east")),
        Cluster::start_with(options("west"))
    )?;
    let dir = tempfile::tempdir()?;
    mesh::make_pki(dir.path(), &["east", "west"])?;
    let (east_cp, west_cp) = tokio::try_join!(
        Installed::start(&east, dir.path(), true),
        Installed::start(&west, dir.path(), false),
    )?;

    // The install output applied a second time writes nothing (what the cluster's controllers
    // change after an apply has settled by now: every program above is running on it).
    let before = stored_versions(&west, &west_cp.manifests)?;
    kubectl(
        &west,
        &["apply", "--server-side", "-f", "-"],
        Some(&west_cp.manifests),
    )?;
    let after = stored_versions(&west, &west_cp.manifests)?;
    let changed: Vec<_> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect();
    ensure!(changed.is_empty(), "the second apply wrote {changed:?}");

    // The link, as a user makes it: run against east, applied in west.
    wait_remote_access_token(&east).await?;
    let link = mesh::cli(&[
        "link",
        "--cluster-name",
        "east",
        "--kubeconfig",
        &east.kubeconfig_path().display().to_string(),
    ])?;
    kubectl(&west, &["apply", "--server-side", "-f", "-"], Some(&link))?;
    let _mirror = start_installed_mirror(&west, west_cp.ip, dir.path()).await?;

    // east: the webhook injects web's Pod; the harness runs it as the API server stored it.
    kubectl(&east, &["apply", "--server-side", "-f", "-"], Some(WEB))?;
    let web_pod = pod_name(&east, "web").await?;
    let web = MeshedPod::run_stored(&east, SHOP, &web_pod)
        .await
        .with_context(|| east_cp.injector.program.log_tail())?;

    // west: `meshlink inject` meshes the client before it is applied.
    let anchors = west_cp.anchors_file.display().to_string();
    let (injected, _) = meshlink_piped(
        &[
            "inject",
            "--trust-anchors-file",
            &anchors,
            "--trust-domain",
            &mesh::trust_domain("west"),
            "-",
        ],
        Some(CLIENT),
    )?;
    kubectl(
        &west,
        &["apply", "--server-side", "-f", "-"],
        Some(&injected),
    )?;
    let client_pod = pod_name(&west, "client").await?;
    let client = MeshedPod::run_stored(&west, SHOP, &client_pod).await?;
    client.host().set_resolv_conf(west_cp.ip, SHOP)?;

    wait_mirror_endpoints(&west, SHOP, "web-east").await?;

    // An unmodified curl, by name: CoreDNS, west's proxy, east's gateway (mTLS), web's proxy.
    let outbound = [
        label("direction", "outbound"),
        label("tls", "true"),
        label("server_id", &gateway_id("east")),
        label("status_code", "200"),
    ];
    let outbound = outbound.each_ref().map(String::as_str);
    let inbound = [
        label("direction", "inbound"),
        label("tls", "true"),
        label("status_code", "200"),
    ];
    let inbound = inbound.each_ref().map(String::as_str);
    let answer = curl(client.host(), &["http://web-east.shop.svc.cluster.local/"])
        .await
        .with_context(|| client.proxy_log_tail())?;
    ensure!(answer.status == 200, "{answer:?}");
    ensure!(
        answer.field("name") == Some(web_pod.as_str()),
        "east's web answers: {answer:?}"
    );
    wait_for("both proxies to count the call", WAIT, || async {
        let out = client
            .metrics()
            .await
            .ok()?
            .sum("response_total", &outbound);
        let inb = web.metrics().await.ok()?.sum("response_total", &inbound);
        (out >= 1.0 && inb >= 1.0).then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "client's proxy:\n{}\nweb's proxy:\n{}",
            client.proxy_log_tail(),
            web.proxy_log_tail()
        )
    })?;

    // `meshlink check` on both: every check passes or does not apply (east has no Links,
    // west no gateway), and the command says so with exit code 0.
    for cluster in [&east, &west] {
        let (code, report) = check(cluster, "30s").await?;
        let failing: Vec<String> = checks_of(&report)
            .filter(|c| c["result"] != "success" && c["result"] != "skipped")
            .map(|c| format!("{}: {}", c["id"], c["error"]))
            .collect();
        ensure!(
            code == Some(0) && failing.is_empty(),
            "meshlink check on {} exited {code:?}: {failing:#?}",
            cluster.name()
        );
    }
    Ok(())
}
