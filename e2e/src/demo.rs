//! `e2e demo` (behind `make demo`): the whole multicluster flow on two local clusters, the way a
//! user runs it, printing what a user would look at.
//!
//! `east` exports a Service; `west` is linked to `east` with `meshlink link` output applied as
//! it is; the service-mirror controller runs under its own ServiceAccount; the mirror appears
//! with endpoints at `east`'s gateway, whose health port (a stand-in until the gateway exists) is
//! served from a network namespace of the demo's own, so nothing leaves this machine. At the end
//! the controller stops; the clusters and the mirror stay for you to look at.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Api, api::PostParams};
use serde_json::json;

use e2e::{
    Cluster, apply_yaml, create_namespace, create_ready_pod,
    meshlink::{
        create_gateway_service, labels, service_account_token, start_mirror,
        wait_remote_access_token, workspace_binary,
    },
    netns::Host,
    wait_for,
};

const NS: &str = "linkerd-multicluster";
const WAIT: Duration = Duration::from_secs(60);

fn manifest(repo: &Path, path: &str) -> Result<String> {
    std::fs::read_to_string(repo.join("manifests").join(path)).with_context(|| path.to_owned())
}

async fn run_cli(args: &[&str], kubeconfig: &Path) -> Result<String> {
    let out = tokio::process::Command::new(workspace_binary("meshlink")?)
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "meshlink {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn kubectl(kubectl: &Path, kubeconfig: &Path, args: &[&str], out: &mut impl Write) -> Result<()> {
    writeln!(out, "$ kubectl --context {}", args.join(" "))?;
    let output = std::process::Command::new(kubectl)
        .env("KUBECONFIG", kubeconfig)
        .args(["--context"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    out.write_all(&output.stdout)?;
    out.write_all(&output.stderr)?;
    Ok(())
}

/// Runs the demo on `east` and `west` (already started) and prints as it goes.
pub async fn run(
    repo: &Path,
    east: &Cluster,
    west: &Cluster,
    kubectl_bin: &Path,
    out: &mut impl Write,
) -> Result<()> {
    let (ec, wc) = (east.client(), west.client());
    let host = Host::create().context(
        "the demo puts the gateway's health port in a network namespace (needs root and iproute2)",
    )?;
    let gw_ip = host.address().to_string();

    writeln!(
        out,
        "== east: remote access for linked clusters, a gateway Service, an exported Service"
    )?;
    apply_yaml(&ec, &manifest(repo, "mirror/remote-access.yaml")?).await?;
    create_gateway_service(east, &gw_ip, "3").await?;
    let mut probe = host
        .command(&workspace_binary("e2e")?)
        .args(["probe-server", "--listen", &format!("{gw_ip}:4191")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    create_namespace(&ec, "shop").await?;
    let web: Service = serde_json::from_value(json!({
        "metadata": { "name": "web", "labels": { "mirror.linkerd.io/exported": "true", "app": "web" } },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))?;
    let services: Api<Service> = Api::namespaced(ec.clone(), "shop");
    if services.get_opt("web").await?.is_none() {
        services.create(&PostParams::default(), &web).await?;
        create_ready_pod(
            &ec,
            "shop",
            "web-0",
            &labels(&[("app", "web")]),
            IpAddr::V4(Ipv4Addr::new(10, 8, 0, 5)),
            &east.node_name(),
        )
        .await?;
    }
    wait_remote_access_token(east).await?;

    writeln!(
        out,
        "\n== west: the controller's manifests, then `meshlink link` run against east, applied as it is"
    )?;
    apply_yaml(&wc, &manifest(repo, "crds/link.yaml")?).await?;
    apply_yaml(&wc, &manifest(repo, "mirror/controller.yaml")?).await?;
    let link = run_cli(&["link", "--cluster-name", "east"], east.kubeconfig_path()).await?;
    apply_yaml(&wc, &link).await?;
    create_namespace(&wc, "shop").await?;

    let token = service_account_token(west, NS, "meshlink-service-mirror").await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("controller.kubeconfig");
    std::fs::write(
        &kubeconfig,
        west.kubeconfig_for_token("meshlink-service-mirror", &token),
    )?;
    let controller = start_mirror(&kubeconfig, &[format!("--namespace={NS}")]).await?;
    let result = async {
        wait_for(
            "the mirror web-east with endpoints at the gateway",
            WAIT,
            || async {
                let ep = Api::<Endpoints>::namespaced(wc.clone(), "shop")
                    .get_opt("web-east")
                    .await
                    .ok()??;
                ep.subsets?.first()?.addresses.as_ref()?.first().map(drop)
            },
        )
        .await?;
        let gw = wait_for("a probe of the gateway", WAIT, || async {
            let t = run_cli(&["gateways"], west.kubeconfig_path()).await.ok()?;
            t.lines()
                .any(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .is_some_and(|c| c.ends_with("ms"))
                })
                .then_some(t)
        })
        .await?;
        writeln!(out, "\n== the mirror in west")?;
        let both = std::env::join_paths([east.kubeconfig_path(), west.kubeconfig_path()])?;
        let both = Path::new(&both);
        kubectl(kubectl_bin, both, &["west", "get", "links", "-A"], out)?;
        kubectl(
            kubectl_bin,
            both,
            &[
                "west",
                "-n",
                "shop",
                "get",
                "service,endpoints,endpointslices",
                "-l",
                "mirror.linkerd.io/cluster-name=east",
            ],
            out,
        )?;
        writeln!(out, "\n$ meshlink gateways")?;
        out.write_all(gw.as_bytes())?;

        writeln!(
            out,
            "\n== A Link that Linkerd would accept and then fail on is refused, with how to fix it"
        )?;
        let example = manifest(repo, "examples/link-east.yaml")?;
        // The Link document only (the file also creates its namespace).
        let link_doc = example
            .split("\n---\n")
            .find(|d| d.contains("kind: Link"))
            .unwrap_or_default();
        let bad = link_doc
            .replace("gatewayPort: \"4143\"", "gatewayPort: \"mc-gateway\"")
            .replace("period: 3s", "period: \"3\"")
            .replace("name: east\n  namespace", "name: broken\n  namespace");
        let file = dir.path().join("broken-link.yaml");
        std::fs::write(&file, bad)?;
        kubectl(
            kubectl_bin,
            both,
            &["west", "apply", "-f", &file.display().to_string()],
            out,
        )?;
        anyhow::Ok(())
    }
    .await;
    drop(controller);
    let _ = probe.kill();
    let _ = probe.wait();
    result.map_err(|e| anyhow::anyhow!("{e:#}"))
}
