//! `e2e demo` (behind `make demo`): the whole multicluster flow on two local clusters, the way a
//! user runs it, printing what a user would look at.
//!
//! `meshlink identity` makes one trust anchor and an issuer per cluster; each cluster runs the
//! identity service; `east` runs the gateway and exports a Service whose Pod (a real server) is
//! in a network namespace; `west` is linked to `east` with `meshlink link` output applied as it
//! is; the service-mirror controller runs under its own ServiceAccount and probes the gateway's
//! `/ready`; the mirror appears with endpoints at the gateway. Then a client in `west`'s own
//! network namespace, certified by `west`'s identity service, sends a request to the address and
//! authority the mirror names, through the gateway, and the answer is printed. Nothing leaves this
//! machine. At the end the programs stop; the clusters and the mirror stay for you to look at.

use std::{io::Write, net::IpAddr, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Api, api::PostParams};
use serde_json::json;

use e2e::{
    Cluster, apply_yaml, create_namespace, create_ready_pod,
    mesh::{self, GatewaySettings, IDENTITY_AUDIENCE},
    meshlink::{
        create_gateway_service, free_port, labels, service_account_token,
        service_account_token_for, start_mirror, wait_remote_access_token, workspace_binary,
    },
    netns::Host,
    wait_for,
};

const NS: &str = "linkerd-multicluster";
const WAIT: Duration = Duration::from_secs(60);

fn manifest(repo: &Path, path: &str) -> Result<String> {
    std::fs::read_to_string(repo.join("manifests").join(path)).with_context(|| path.to_owned())
}

/// `meshlink <args> --kubeconfig <kubeconfig>`.
fn run_cli(args: &[&str], kubeconfig: &Path) -> Result<String> {
    let kubeconfig = kubeconfig.display().to_string();
    mesh::cli(&[args, &["--kubeconfig", &kubeconfig]].concat())
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
    let pods = Host::create().context(
        "the demo puts east's Pod and west's client in network namespaces (needs root and iproute2)",
    )?;
    let client_net = Host::create()?;
    // The gateway listens on this host's side of the link to west's client network: its
    // "load balancer" address.
    let gw_ip = client_net.host_address();
    let dir = tempfile::tempdir()?;
    let d = |p: &str| dir.path().join(p).display().to_string();

    writeln!(
        out,
        "== One trust anchor, an issuer per cluster (no step, no openssl)"
    )?;
    for args in [
        vec!["identity", "anchor", "--out", &d("anchor")],
        vec![
            "identity",
            "issuer",
            "--anchor",
            &d("anchor"),
            "--out",
            &d("east"),
        ],
        vec![
            "identity",
            "issuer",
            "--anchor",
            &d("anchor"),
            "--out",
            &d("west"),
        ],
    ] {
        writeln!(out, "$ meshlink {}", args.join(" "))?;
        out.write_all(mesh::cli(&args)?.as_bytes())?;
    }
    for (cluster, issuer) in [(east, "east"), (west, "west")] {
        mesh::install_identity(cluster, dir.path(), issuer).await?;
    }

    writeln!(
        out,
        "\n== east: identity service, gateway, remote access, an exported Service with a real Pod"
    )?;
    apply_yaml(&ec, &manifest(repo, "mirror/remote-access.yaml")?).await?;
    apply_yaml(&ec, &manifest(repo, "gateway/gateway.yaml")?).await?;
    create_gateway_service(east, &gw_ip.to_string(), "3").await?;
    let anchors = dir.path().join("anchor/ca.crt");
    let east_identity_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let east_identity =
        mesh::start_identity(east, east_identity_addr, &anchors, "24h", dir.path()).await?;
    let gateway = mesh::start_gateway(
        east,
        &GatewaySettings {
            addr: (gw_ip, 4143).into(),
            admin: (gw_ip, 4191).into(),
            identity_addr: east_identity_addr,
            anchors_file: anchors.clone(),
            extra: Vec::new(),
        },
        dir.path(),
    )
    .await?;
    let mut backend = pods
        .command(&workspace_binary("e2e")?)
        .args(["backend", "--tcp", "0.0.0.0:7000", "--http", "0.0.0.0:8080"])
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
            IpAddr::V4(pods.address()),
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
    let link = run_cli(&["link", "--cluster-name", "east"], east.kubeconfig_path())?;
    apply_yaml(&wc, &link).await?;
    create_namespace(&wc, "shop").await?;

    let west_identity_addr = std::net::SocketAddr::new(IpAddr::V4(gw_ip), free_port()?);
    let west_identity =
        mesh::start_identity(west, west_identity_addr, &anchors, "24h", dir.path()).await?;
    let sa: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "client" } }))?;
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(wc.clone(), "shop");
    if accounts.get_opt("client").await?.is_none() {
        accounts.create(&PostParams::default(), &sa).await?;
    }
    std::fs::write(
        dir.path().join("client.token"),
        service_account_token_for(west, "shop", "client", IDENTITY_AUDIENCE).await?,
    )?;

    let token = service_account_token(west, NS, "meshlink-service-mirror").await?;
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
            let t = run_cli(&["gateways"], west.kubeconfig_path()).ok()?;
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

        writeln!(
            out,
            "\n== A client in west's network, certified by west's identity service, calls the mirror's \
             gateway address with the mirror's authority, as a Linkerd proxy would"
        )?;
        let ep = Api::<Endpoints>::namespaced(wc.clone(), "shop")
            .get("web-east")
            .await?;
        let subset = ep.subsets.iter().flatten().next().context("web-east has no subset")?;
        let ip = subset
            .addresses
            .iter()
            .flatten()
            .next()
            .context("web-east has no ready address")?
            .ip
            .clone();
        let port = subset.ports.iter().flatten().next().context("no port")?.port;
        let authority = ep
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("mirror.linkerd.io/remote-svc-fq-name"))
            .context("web-east names no remote service")?;
        let args = [
            "mesh-client".to_owned(),
            format!("--identity={}", mesh::workload_id("client", "shop", "west")),
            format!("--trust-anchors-file={}", anchors.display()),
            format!("--identity-addr={west_identity_addr}"),
            format!("--identity-name={}", mesh::identity_id("west")),
            format!("--gateway-identity={}", mesh::gateway_id("east")),
            format!("--token-file={}", dir.path().join("client.token").display()),
            format!("--gateway={ip}:{port}"),
            format!("--target={authority}:80"),
            "--mode=http1".to_owned(),
        ];
        writeln!(out, "$ e2e {}", args.join(" "))?;
        let answer = client_net
            .command(&workspace_binary("e2e")?)
            .args(&args)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            answer.status.success(),
            "the request through the gateway failed: {}",
            String::from_utf8_lossy(&answer.stderr)
        );
        out.write_all(&answer.stdout)?;
        let (code, ready) = gateway.get("/ready").await?;
        writeln!(out, "\nGET http://{gw_ip}:4191/ready (the gateway's health port)\n{code} {ready}")?;
        anyhow::Ok(())
    }
    .await;
    drop(controller);
    drop(gateway);
    drop(east_identity);
    drop(west_identity);
    let _ = backend.kill();
    let _ = backend.wait();
    result.map_err(|e| anyhow::anyhow!("{e:#}"))
}
