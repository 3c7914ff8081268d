//! Linking the way users do it: `manifests/mirror/remote-access.yaml` in the target,
//! `meshlink link` run against the target and its output applied unchanged to the source,
//! `manifests/mirror/controller.yaml` in the source, and the controller binary running with that
//! ServiceAccount's token (so its RBAC is proven sufficient, and checked to be no broader than
//! it should be). The target's gateway health port is a real HTTP server in a network namespace
//! of the test's own, which the controller probes; stopping it turns the gateway dead and the
//! mirror's endpoints not ready, starting it again brings them back.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use e2e::{
    Cluster, apply_yaml, create_ready_pod,
    meshlink::{
        create_gateway_service, endpoint_ips, labels, service_account_token, start_mirror,
        wait_remote_access_token, workspace_binary,
    },
    netns::Host,
    wait_for,
};
use k8s_openapi::api::{
    authorization::v1::SelfSubjectAccessReview,
    core::v1::{Endpoints, Event, Service},
};
use kube::{
    Api,
    api::{ListParams, PostParams},
};
use link_crd::Link;
use serde_json::json;

const NS: &str = "linkerd-multicluster";
const WAIT: Duration = Duration::from_secs(30);

fn manifest(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(format!(
        "{}/../manifests/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))?)
}

/// The stand-in for the gateway's health port, inside the namespace.
struct ProbeServer(Child);

impl ProbeServer {
    async fn start(host: &Host) -> Result<Self> {
        let bin = workspace_binary("e2e")?;
        let child = host
            .command(&bin)
            .args([
                "probe-server",
                "--listen",
                &format!("{}:4191", host.address()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let addr = SocketAddr::new(IpAddr::V4(host.address()), 4191);
        wait_for("the probe server to listen", WAIT, || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(drop)
        })
        .await?;
        Ok(Self(child))
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn link_condition(w: &kube::Client, type_: &str) -> Option<String> {
    e2e::meshlink::link_condition(w, NS, "east", type_)
        .await
        .map(|(status, _)| status)
}

/// The ready and not-ready addresses of the mirror `shop/web-east`.
async fn mirror_ips(w: &kube::Client) -> Option<(Vec<String>, Vec<String>)> {
    let ep = Api::<Endpoints>::namespaced(w.clone(), "shop")
        .get_opt("web-east")
        .await
        .ok()??;
    Some(endpoint_ips(&ep))
}

async fn meshlink_gateways(kubeconfig: &std::path::Path) -> Result<String> {
    let out = tokio::process::Command::new(workspace_binary("meshlink")?)
        .args(["gateways", "--kubeconfig"])
        .arg(kubeconfig)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "meshlink gateways failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[tokio::test]
async fn link_output_and_manifests_mirror_and_probe_a_gateway() -> Result<()> {
    let gateway_host = Host::create().context("a network namespace for the gateway")?;
    let gw_ip = gateway_host.address().to_string();
    let clusters = Cluster::start_many(&["east", "west"]).await?;
    let (east, west) = (&clusters[0], &clusters[1]);
    let (ec, wc) = (east.client(), west.client());

    // Target side: remote access, and a gateway Service as the gateway's install would make it.
    apply_yaml(&ec, &manifest("mirror/remote-access.yaml")?).await?;
    create_gateway_service(east, &gw_ip, "1").await?;
    wait_remote_access_token(east).await?;

    // `meshlink link` against east; its output (with the controller) applied unchanged to west.
    let out = tokio::process::Command::new(workspace_binary("meshlink")?)
        .args([
            "link",
            "--cluster-name",
            "east",
            "--with-controller",
            "--kubeconfig",
        ])
        .arg(east.kubeconfig_path())
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "meshlink link failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link_yaml = String::from_utf8(out.stdout)?;
    apply_yaml(&wc, &manifest("crds/link.yaml")?).await?;
    apply_yaml(&wc, &link_yaml)
        .await
        .context("applying `meshlink link` output")?;
    ensure!(
        Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(wc.clone(), NS)
            .get_opt("meshlink-service-mirror")
            .await?
            .is_some(),
        "`meshlink link --with-controller` printed no controller Deployment"
    );

    // The controller runs as its own ServiceAccount.
    let token = service_account_token(west, NS, "meshlink-service-mirror").await?;
    let kubeconfig = tempfile::NamedTempFile::new()?;
    std::fs::write(
        kubeconfig.path(),
        west.kubeconfig_for_token("meshlink-service-mirror", &token),
    )?;
    let sa_client = west.client_for_token(&token).await?;
    // Least privilege: what it must not do.
    for (verb, resource, namespace) in [
        ("list", "secrets", "default"),
        ("delete", "namespaces", ""),
        ("list", "pods", NS),
        ("create", "links", NS),
    ] {
        let review: SelfSubjectAccessReview = serde_json::from_value(json!({
            "spec": { "resourceAttributes": { "verb": verb, "resource": resource, "namespace": namespace,
                "group": if resource == "links" { "multicluster.linkerd.io" } else { "" } } }
        }))?;
        let answer = Api::<SelfSubjectAccessReview>::all(sa_client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        ensure!(
            !answer.status.is_some_and(|s| s.allowed),
            "the controller's ServiceAccount may {verb} {resource} in {namespace:?}"
        );
    }
    let probe = ProbeServer::start(&gateway_host).await?;
    let controller = start_mirror(kubeconfig.path(), &[format!("--namespace={NS}")]).await?;

    // Export a Service in east: west mirrors it, pointing at the gateway.
    e2e::create_namespace(&ec, "shop").await?;
    e2e::create_namespace(&wc, "shop").await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": "web", "labels": { "mirror.linkerd.io/exported": "true" } },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80 }] },
    }))?;
    Api::<Service>::namespaced(ec.clone(), "shop")
        .create(&PostParams::default(), &svc)
        .await?;
    create_ready_pod(
        &ec,
        "shop",
        "web-0",
        &labels(&[("app", "web")]),
        IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1)),
        &east.node_name(),
    )
    .await?;
    let result = async {
        wait_for("ready mirror endpoints at the gateway", WAIT, || async {
            (mirror_ips(&wc).await?.0 == [gw_ip.clone()]).then_some(())
        })
        .await?;
        wait_for("Link Ready", WAIT, || async {
            (link_condition(&wc, "Ready").await? == "True").then_some(())
        })
        .await?;
        ensure!(
            controller
                .metric("gateway_alive", "target_cluster_name=\"east\"")
                .await?
                == 1.0
        );
        let table = wait_for(
            "`meshlink gateways` to show a live gateway with its latency",
            WAIT,
            || async {
                let t = meshlink_gateways(west.kubeconfig_path()).await.ok()?;
                let cols: Vec<String> = t
                    .lines()
                    .find(|l| l.starts_with("east"))?
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                (cols.len() == 4 && cols[1] == "True" && cols[2] == "1" && cols[3].ends_with("ms"))
                    .then_some(t)
            },
        )
        .await?;
        ensure!(table.starts_with("CLUSTER"), "{table}");

        ensure!(
            controller
                .metric(
                    "service_mirror_endpoint_repairs_total",
                    "target_cluster_name=\"east\""
                )
                .await?
                >= 1.0,
            "resolving the gateway is a repair of every mirror's endpoints"
        );
        let repairs = controller
            .metric("service_mirror_endpoint_repairs_total", "")
            .await?;

        // The gateway's health port goes away: after 3 failed probes (1 s apart) it is dead.
        drop(probe);
        wait_for("GatewayAlive=False", WAIT, || async {
            (link_condition(&wc, "GatewayAlive").await? == "False").then_some(())
        })
        .await?;
        wait_for("mirror endpoints not ready", WAIT, || async {
            (mirror_ips(&wc).await? == (vec![], vec![gw_ip.clone()])).then_some(())
        })
        .await?;
        ensure!(link_condition(&wc, "Ready").await.as_deref() == Some("False"));
        let events = Api::<Event>::namespaced(wc.clone(), NS)
            .list(&ListParams::default())
            .await?;
        ensure!(
            events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("GatewayDead")),
            "no GatewayDead Event"
        );
        ensure!(
            controller
                .metric("gateway_alive", "target_cluster_name=\"east\"")
                .await?
                == 0.0
        );
        let table = meshlink_gateways(west.kubeconfig_path()).await?;
        ensure!(
            table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["east", "False", "1", "-"]),
            "{table}"
        );

        ensure!(
            controller
                .metric("service_mirror_endpoint_repairs_total", "")
                .await?
                > repairs,
            "a dead gateway repaired no endpoints"
        );

        // And back.
        let _probe = ProbeServer::start(&gateway_host).await?;
        wait_for("mirror endpoints ready again", WAIT, || async {
            (mirror_ips(&wc).await?.0 == [gw_ip.clone()]).then_some(())
        })
        .await?;
        wait_for("GatewayAlive=True", WAIT, || async {
            (link_condition(&wc, "GatewayAlive").await? == "True").then_some(())
        })
        .await?;

        // Deleting the Link removes its mirrors before the Link goes.
        Api::<Link>::namespaced(wc.clone(), NS)
            .delete("east", &Default::default())
            .await?;
        wait_for("the mirror to go with its Link", WAIT, || async {
            let gone = Api::<Service>::namespaced(wc.clone(), "shop")
                .get_opt("web-east")
                .await
                .ok()?
                .is_none();
            let link_gone = Api::<Link>::namespaced(wc.clone(), NS)
                .get_opt("east")
                .await
                .ok()?
                .is_none();
            (gone && link_gone).then_some(())
        })
        .await?;
        // Nothing of the credentials reached the log.
        ensure!(
            !controller.log_tail().contains(&token),
            "a token in the controller's log"
        );
        anyhow::Ok(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\n--- controller log:\n{}", controller.log_tail()))?;
    Ok(())
}
