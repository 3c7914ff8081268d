//! `e2e demo` (behind `make demo`): the whole multicluster flow on two local clusters, the way a
//! user runs it, printing what a user would look at.
//!
//! `meshlink identity` makes one trust anchor and an issuer per cluster; each cluster runs the
//! identity and destination services as their manifests' ServiceAccounts; `east` runs the gateway
//! and exports a Service `web` whose Pod `web-0` is a network namespace with `meshlink-proxy` as
//! its sidecar; `west` is linked to `east` with `meshlink link` output applied as it is, and the
//! service-mirror controller makes the mirror `web-east`. Then a client Pod in `west`, its
//! network set up by `meshlink-proxy init` and `meshlink-proxy` beside it, runs an unmodified
//! `curl http://web-east.shop.svc.cluster.local/`: the name resolves (a DNS server for the
//! clusters' names, in the Pod's resolv.conf) to the mirror's ClusterIP, the client's proxy
//! takes the connection, finds the mirror's endpoint at `east`'s gateway through the destination
//! service, and dials the gateway over mTLS; the gateway forwards to `web-0`, whose proxy hands
//! the request to the application. Nothing leaves this machine. At the end the programs stop;
//! the clusters and the mirror stay for you to look at.

use std::{io::Write, net::IpAddr, path::Path, process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{Api, api::PostParams};
use serde_json::json;

use e2e::{
    Cluster, apply_yaml, create_namespace,
    dns::DnsServer,
    mesh::{self, GatewaySettings},
    meshlink::{
        create_gateway_service, service_account_token, start_mirror, wait_remote_access_token,
    },
    netns::{Forwarding, Host},
    pod::{ControlPlane, MeshedPod, PodSpec, exec_in},
    wait_for,
};

const NS: &str = "linkerd-multicluster";
const SHOP: &str = "shop";
const WEB_EAST: &str = "web-east.shop.svc.cluster.local";
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
    let forwarding = Forwarding::enable().context(
        "the demo's Pods are network namespaces routed through this host (needs root and iproute2)",
    )?;
    // The clusters' services (identity, destination, the gateway's "load balancer" address, DNS)
    // listen on this host's end of a veth, which every Pod reaches.
    let services_net = Host::create()?;
    let cp_ip = services_net.host_address();
    let dir = tempfile::tempdir()?;

    writeln!(
        out,
        "== One trust anchor, an issuer per cluster for its own trust domain (no step, no openssl)"
    )?;
    let steps = mesh::pki_commands(dir.path(), &["east", "west"]);
    for args in &steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        writeln!(out, "$ meshlink {}", args.join(" "))?;
        out.write_all(mesh::cli(&args)?.as_bytes())?;
    }

    writeln!(
        out,
        "\n== Each cluster: the identity and destination services, as their manifests' ServiceAccounts"
    )?;
    let (east_cp, west_cp) = tokio::try_join!(
        ControlPlane::start(east, dir.path(), cp_ip),
        ControlPlane::start(west, dir.path(), cp_ip),
    )?;
    writeln!(
        out,
        "east: identity {} destination {}\nwest: identity {} destination {}",
        east_cp.identity_addr,
        east_cp.destination_addr,
        west_cp.identity_addr,
        west_cp.destination_addr
    )?;

    writeln!(
        out,
        "\n== east: the gateway, remote access, and an exported Service `web` whose Pod has meshlink-proxy beside it"
    )?;
    apply_yaml(&ec, &manifest(repo, "mirror/remote-access.yaml")?).await?;
    apply_yaml(&ec, &manifest(repo, "gateway/gateway.yaml")?).await?;
    create_gateway_service(east, &cp_ip.to_string(), "3").await?;
    let gateway = mesh::start_gateway(
        east,
        &GatewaySettings {
            addr: (cp_ip, 4143).into(),
            admin: (cp_ip, 4191).into(),
            identity_addr: east_cp.identity_addr,
            anchors_file: dir.path().join("anchor/ca.crt"),
            extra: Vec::new(),
        },
        dir.path(),
    )
    .await?;
    create_namespace(&ec, SHOP).await?;
    let web: Service = serde_json::from_value(json!({
        "metadata": { "name": "web", "labels": { "mirror.linkerd.io/exported": "true" } },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
    }))?;
    let services: Api<Service> = Api::namespaced(ec.clone(), SHOP);
    if services.get_opt("web").await?.is_none() {
        services.create(&PostParams::default(), &web).await?;
    }
    let web0 = MeshedPod::start(east, &east_cp, PodSpec::new(SHOP, "web-0", "web", "web")).await?;
    writeln!(
        out,
        "Pod shop/web-0 at {}, its proxy ready as {}",
        web0.ip(),
        web0.id
    )?;
    wait_remote_access_token(east).await?;

    writeln!(
        out,
        "\n== west: the controller's manifests, then `meshlink link` run against east, applied as it is"
    )?;
    apply_yaml(&wc, &manifest(repo, "mirror/controller.yaml")?).await?;
    let link = run_cli(&["link", "--cluster-name", "east"], east.kubeconfig_path())?;
    apply_yaml(&wc, &link).await?;
    create_namespace(&wc, SHOP).await?;
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
                let ep = Api::<Endpoints>::namespaced(wc.clone(), SHOP)
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
        writeln!(out, "\n== The mirror in west")?;
        let both = std::env::join_paths([east.kubeconfig_path(), west.kubeconfig_path()])?;
        let both = Path::new(&both);
        kubectl(kubectl_bin, both, &["west", "get", "links", "-A"], out)?;
        kubectl(
            kubectl_bin,
            both,
            &[
                "west",
                "-n",
                SHOP,
                "get",
                "service,endpoints",
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
            "\n== west: a client Pod; `meshlink-proxy init` sets up its network, meshlink-proxy runs beside it"
        )?;
        let client =
            MeshedPod::start(west, &west_cp, PodSpec::new(SHOP, "client-0", "client", "client"))
                .await?;
        // init prefers the legacy back end, as Linkerd's proxy-init does.
        let save = if Path::new("/usr/sbin/iptables-legacy-save").exists() {
            "iptables-legacy-save"
        } else {
            "iptables-save"
        };
        let rules = exec_in(client.host(), &[save, "-t", "nat"]).await?;
        writeln!(out, "$ {save} -t nat   (in the client Pod)")?;
        for line in String::from_utf8_lossy(&rules.stdout).lines() {
            if line.starts_with("-A PROXY_INIT") || line.starts_with("-A PREROUTING") || line.starts_with("-A OUTPUT") {
                writeln!(out, "{line}")?;
            }
        }
        // Cluster DNS for the Pod, as a kubelet would point its resolv.conf at it.
        let mirror_ip = cluster_ip(&wc, "web-east").await?;
        let dns = DnsServer::start_on((cp_ip, 53).into()).await?;
        dns.set(WEB_EAST, &[IpAddr::V4(mirror_ip)])?;
        client.host().set_resolv_conf(cp_ip, SHOP)?;
        writeln!(
            out,
            "cluster DNS at {cp_ip}: {WEB_EAST} -> {mirror_ip} (web-east's ClusterIP)"
        )?;

        writeln!(
            out,
            "\n== An unmodified curl in the client Pod calls web-east by name: west's proxy, east's gateway, web-0's proxy"
        )?;
        let url = format!("http://{WEB_EAST}/");
        writeln!(out, "$ curl -s {url}")?;
        let answer = exec_in(client.host(), &["curl", "-sS", "--max-time", "10", &url]).await?;
        ensure!(
            answer.status.success(),
            "curl failed: {}{}",
            String::from_utf8_lossy(&answer.stderr),
            client.proxy_log_tail()
        );
        out.write_all(&answer.stdout)?;
        writeln!(
            out,
            "\nThe client's proxy (mTLS to east's gateway, as discovery said):"
        )?;
        let m = client.metrics().await?;
        for line in m.samples("response_total", &["direction=\"outbound\""]) {
            writeln!(out, "  {line}")?;
        }
        writeln!(out, "web-0's proxy:")?;
        let m = web0.metrics().await?;
        for line in m.samples("response_total", &["direction=\"inbound\""]) {
            writeln!(out, "  {line}")?;
        }
        let (code, ready) = gateway.get("/ready").await?;
        writeln!(out, "\nGET http://{cp_ip}:4191/ready (the gateway's health port)\n{code} {ready}")?;
        drop(client);
        anyhow::Ok(())
    }
    .await;
    drop(controller);
    drop(gateway);
    drop(web0);
    drop((east_cp, west_cp));
    drop(forwarding);
    result.map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// The ClusterIP of Service `shop/<name>`.
async fn cluster_ip(client: &kube::Client, name: &str) -> Result<std::net::Ipv4Addr> {
    let svc = Api::<Service>::namespaced(client.clone(), SHOP)
        .get(name)
        .await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .with_context(|| format!("Service {name} has no ClusterIP"))
}
