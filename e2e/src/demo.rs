//! `e2e demo` (behind `make demo`): two clusters meshed and linked the way a user does it, with
//! the meshlink CLI and kubectl, printing each step and what a user would look at.
//!
//! `meshlink identity` makes one trust anchor and an issuer per cluster; `meshlink install` is
//! applied to each with `kubectl apply --server-side`; the programs it declares run as
//! processes, each as its manifest's ServiceAccount, with its Deployment's Pod marked Running
//! where it listens (the clusters have no kubelet: [`e2e::install::Installed`]); CoreDNS serves
//! each cluster's DNS. `meshlink link` run against `east` is applied to `west`. In `east`, the
//! Deployment `web` is created in a namespace annotated `linkerd.io/inject: enabled`, so the
//! proxy injector adds the proxy to its Pod; in `west`, the client's Deployment goes through
//! `meshlink inject` before it is applied. Both Pods are then run from the specs the API server
//! stored ([`e2e::kubelet`]): the init container's iptables rules, the proxy with the injected
//! environment, the app. `meshlink check` runs on both, and an unmodified `curl
//! http://web-east.shop.svc.cluster.local/` in the client Pod gets the answer from `east`.
//! Nothing leaves this machine. At the end the programs stop; the clusters stay for you to look
//! at.

use std::{io::Write, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;

use e2e::{
    Cluster,
    install::{
        Installed, check, checks_of, kubectl, meshlink_piped, pods_of, start_installed_mirror,
        stored_versions, wait_mirror_endpoints,
    },
    mesh,
    meshlink::wait_remote_access_token,
    netns::Forwarding,
    pod::{MeshedPod, exec_in},
    wait_for,
};

const SHOP: &str = "shop";
const WEB_EAST: &str = "web-east.shop.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(60);

fn manifest(repo: &Path, path: &str) -> Result<String> {
    std::fs::read_to_string(repo.join("manifests").join(path)).with_context(|| path.to_owned())
}

/// `kubectl --context <cluster> <args>` with `stdin`, printed with its output.
fn kubectl_shown(
    cluster: &Cluster,
    args: &[&str],
    stdin: Option<&str>,
    shown_input: &str,
    out: &mut impl Write,
) -> Result<String> {
    writeln!(
        out,
        "$ {shown_input}kubectl --context {} {}",
        cluster.name(),
        args.join(" ")
    )?;
    let output = kubectl(cluster, args, stdin)?;
    out.write_all(output.as_bytes())?;
    Ok(output)
}

/// `meshlink <args>`, with `stdin`: its standard output (its notes go to `out`).
fn meshlink(args: &[&str], stdin: Option<&str>, out: &mut impl Write) -> Result<String> {
    let (stdout, notes) = meshlink_piped(args, stdin)?;
    out.write_all(notes.as_bytes())?;
    Ok(stdout)
}

/// The one Pod of Deployment `shop/<app>`, once the ReplicaSet controller made it.
async fn pod_of(cluster: &Cluster, app: &str) -> Result<Pod> {
    Ok(wait_for(&format!("a Pod of {SHOP}/{app}"), WAIT, || async {
        pods_of(cluster, SHOP, app).await.ok()?.into_iter().next()
    })
    .await?)
}

fn containers(pod: &Pod) -> String {
    let spec = pod.spec.clone().unwrap_or_default();
    let names = |c: Vec<k8s_openapi::api::core::v1::Container>| {
        c.into_iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
    };
    format!(
        "init containers [{}], containers [{}]",
        names(spec.init_containers.unwrap_or_default()),
        names(spec.containers)
    )
}

/// Runs the demo on `east` and `west` (already started, with the workload controllers) and
/// prints as it goes.
pub async fn run(repo: &Path, east: &Cluster, west: &Cluster, out: &mut impl Write) -> Result<()> {
    let _forwarding = Forwarding::enable().context(
        "the demo's Pods are network namespaces routed through this host (needs root and iproute2)",
    )?;
    let dir = tempfile::tempdir()?;
    let pki = dir.path();

    writeln!(
        out,
        "\n== One trust anchor, an issuer per cluster for its own trust domain (no step, no openssl)"
    )?;
    for args in mesh::pki_commands(pki, &["east", "west"]) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        writeln!(out, "$ meshlink {}", args.join(" "))?;
        let printed = meshlink(&args, None, out)?;
        out.write_all(printed.as_bytes())?;
    }

    writeln!(
        out,
        "\n== meshlink install, applied to each cluster (east with the gateway others reach, west without)"
    )?;
    let mut installed = Vec::new();
    for (cluster, gateway) in [(east, true), (west, false)] {
        let args = Installed::install_args(cluster.name(), pki, gateway);
        let args: Vec<&str> = std::iter::once("install")
            .chain(args.iter().map(String::as_str))
            .collect();
        let manifests = meshlink(&args, None, out)?;
        let applied = kubectl(
            cluster,
            &["apply", "--server-side", "-f", "-"],
            Some(&manifests),
        )?;
        writeln!(
            out,
            "$ meshlink {} | kubectl --context {} apply --server-side -f -\n({} objects applied)",
            args.join(" "),
            cluster.name(),
            applied.lines().count()
        )?;
        installed.push(manifests);
    }
    let mut manifests = installed.into_iter();
    let (east_manifests, west_manifests) = (
        manifests.next().unwrap_or_default(),
        manifests.next().unwrap_or_default(),
    );

    writeln!(
        out,
        "\n== What a kubelet would run: each install's identity, destination, proxy injector (and east's gateway), and CoreDNS"
    )?;
    let (east_cp, west_cp) = tokio::try_join!(
        Installed::run(east, east_manifests, pki, true),
        Installed::run(west, west_manifests, pki, false),
    )?;
    for (name, cp) in [("east", &east_cp), ("west", &west_cp)] {
        writeln!(
            out,
            "{name}: control plane and DNS at {} (identity :8080, destination :8086, injector :8443{})",
            cp.ip,
            if cp.gateway.is_some() {
                ", gateway :4143 and :4191"
            } else {
                ""
            }
        )?;
    }
    let before = stored_versions(west, &west_cp.manifests)?;
    kubectl(
        west,
        &["apply", "--server-side", "-f", "-"],
        Some(&west_cp.manifests),
    )?;
    let after = stored_versions(west, &west_cp.manifests)?;
    let changed = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .count();
    writeln!(
        out,
        "the same install output applied to west again: {changed} of {} objects changed (their resourceVersions)",
        before.len()
    )?;
    ensure!(
        changed == 0,
        "applying install output twice changed {changed} objects"
    );

    writeln!(
        out,
        "\n== meshlink link, run against east, applied to west; west's service-mirror controller"
    )?;
    wait_remote_access_token(east).await?;
    let east_kubeconfig = east.kubeconfig_path().display().to_string();
    let link = meshlink(
        &[
            "link",
            "--cluster-name",
            "east",
            "--kubeconfig",
            &east_kubeconfig,
        ],
        None,
        out,
    )?;
    kubectl_shown(
        west,
        &["apply", "--server-side", "-f", "-"],
        Some(&link),
        "meshlink link --cluster-name east --kubeconfig <east> | ",
        out,
    )?;
    let _controller = start_installed_mirror(west, west_cp.ip, pki).await?;

    writeln!(
        out,
        "\n== east: namespace shop asks for the proxy (linkerd.io/inject: enabled); Deployment web, exported"
    )?;
    kubectl_shown(
        east,
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest(repo, "examples/shop-web.yaml")?),
        "cat manifests/examples/shop-web.yaml | ",
        out,
    )?;
    let web_pod = pod_of(east, "web").await?;
    let web_name = web_pod.metadata.name.clone().unwrap_or_default();
    writeln!(
        out,
        "the injector added the proxy to Pod shop/{web_name}: {}",
        containers(&web_pod)
    )?;
    let web = MeshedPod::run_stored(east, SHOP, &web_name).await?;
    writeln!(
        out,
        "Pod shop/{web_name} runs at {}, its proxy ready as {}",
        web.ip(),
        web.id
    )?;

    writeln!(
        out,
        "\n== west: the client's Deployment, meshed by meshlink inject before it is applied"
    )?;
    let anchors = west_cp.anchors_file.display().to_string();
    let domain = mesh::trust_domain("west");
    let injected = meshlink(
        &[
            "inject",
            "--trust-anchors-file",
            &anchors,
            "--trust-domain",
            &domain,
            "-",
        ],
        Some(&manifest(repo, "examples/shop-client.yaml")?),
        out,
    )?;
    kubectl_shown(
        west,
        &["apply", "--server-side", "-f", "-"],
        Some(&injected),
        &format!(
            "meshlink inject --trust-anchors-file <anchor> --trust-domain {domain} manifests/examples/shop-client.yaml | "
        ),
        out,
    )?;
    let client_pod = pod_of(west, "client").await?;
    let client_name = client_pod.metadata.name.clone().unwrap_or_default();
    writeln!(out, "Pod shop/{client_name}: {}", containers(&client_pod))?;
    let client = MeshedPod::run_stored(west, SHOP, &client_name).await?;
    client.host().set_resolv_conf(west_cp.ip, SHOP)?;
    // init prefers the legacy back end, as Linkerd's proxy-init does.
    let save = if Path::new("/usr/sbin/iptables-legacy-save").exists() {
        "iptables-legacy-save"
    } else {
        "iptables-save"
    };
    let rules = exec_in(client.host(), &[save, "-t", "nat"]).await?;
    writeln!(
        out,
        "$ {save} -t nat   (in the client Pod, set up by its linkerd-init container's command)"
    )?;
    for line in String::from_utf8_lossy(&rules.stdout).lines() {
        if line.starts_with("-A PROXY_INIT")
            || line.starts_with("-A PREROUTING")
            || line.starts_with("-A OUTPUT")
        {
            writeln!(out, "{line}")?;
        }
    }

    wait_mirror_endpoints(west, SHOP, "web-east").await?;
    kubectl_shown(west, &["get", "links", "-A"], None, "", out)?;
    kubectl_shown(
        west,
        &[
            "-n",
            SHOP,
            "get",
            "service,endpoints",
            "-l",
            "mirror.linkerd.io/cluster-name=east",
        ],
        None,
        "",
        out,
    )?;

    writeln!(out, "\n== meshlink check, on both clusters")?;
    for cluster in [east, west] {
        let (code, report) = check(cluster, "60s").await?;
        writeln!(out, "$ meshlink check --context {}", cluster.name())?;
        for c in checks_of(&report) {
            let mark = match c["result"].as_str() {
                Some("success") => "√",
                Some("skipped") => "-",
                Some("warning") => "‼",
                _ => "×",
            };
            writeln!(
                out,
                "{mark} {}",
                c["description"].as_str().unwrap_or_default()
            )?;
            if let Some(e) = c["error"].as_str().filter(|e| !e.is_empty()) {
                writeln!(out, "    {e}")?;
            }
        }
        writeln!(out, "(exit code {})", code.unwrap_or(-1))?;
        ensure!(
            code == Some(0),
            "meshlink check failed on {}",
            cluster.name()
        );
    }

    writeln!(
        out,
        "\n== An unmodified curl in the client Pod calls web-east by name: CoreDNS, west's proxy, east's gateway, web's proxy"
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
    for line in client
        .metrics()
        .await?
        .samples("response_total", &["direction=\"outbound\""])
    {
        writeln!(out, "  {line}")?;
    }
    writeln!(out, "web's proxy:")?;
    for line in web
        .metrics()
        .await?
        .samples("response_total", &["direction=\"inbound\""])
    {
        writeln!(out, "  {line}")?;
    }
    if let Some(gateway) = &east_cp.gateway {
        let (code, ready) = gateway.get("/ready").await?;
        writeln!(
            out,
            "\nGET http://{}:4191/ready (east's gateway health port)\n{code} {ready}",
            east_cp.ip
        )?;
    }

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
    writeln!(
        out,
        "$ kubectl --context west apply -f broken-link.yaml   (gatewayPort: mc-gateway, probeSpec.period: \"3\")"
    )?;
    match kubectl(west, &["apply", "-f", "-"], Some(&bad)) {
        Ok(text) => out.write_all(text.as_bytes())?,
        Err(e) => writeln!(out, "{e:#}")?,
    }
    Ok(())
}
