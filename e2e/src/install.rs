//! A cluster installed as a user installs it: `meshlink install` output applied with `kubectl
//! apply --server-side`, and the control-plane programs it declares run as processes under
//! their manifests' ServiceAccounts (there is no kubelet), each with a ready Pod at the address
//! it listens on so that its Service has the endpoints a kubelet would give it.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    Binaries, Cluster, create_ready_pod,
    mesh::{cli, service_account_kubeconfig},
    meshlink::{Program, free_port},
};

/// The proxy injector's names, as `manifests/injector/injector.yaml` declares them.
pub const INJECTOR_SERVICE_ACCOUNT: &str = "linkerd-proxy-injector";
pub const INJECTOR_LABEL: (&str, &str) = ("linkerd.io/control-plane-component", "proxy-injector");
pub const WEBHOOK_CONFIGURATION: &str = "linkerd-proxy-injector-webhook-config";
/// The port the injector's Service sends to (its `targetPort`).
pub const INJECTOR_PORT: u16 = 8443;

/// `kubectl --kubeconfig <cluster's> <args>`, with `stdin` as its standard input; its output,
/// or an error with its stderr.
pub fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = std::process::Command::new(Binaries::locate()?.kubectl())
        .arg(format!(
            "--kubeconfig={}",
            cluster.kubeconfig_path().display()
        ))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `meshlink install <args>` for `cluster`, applied with `kubectl apply --server-side`;
/// returns the manifests.
pub fn install(cluster: &Cluster, args: &[&str]) -> Result<String> {
    let manifests = cli(&[&["install"], args].concat())?;
    kubectl(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        Some(&manifests),
    )
    .context("applying meshlink install output")?;
    Ok(manifests)
}

/// The documents of a YAML stream.
pub fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The trust-anchor bundle of install output `manifests` (its trust-roots ConfigMap).
pub fn anchors_of(manifests: &str) -> Result<String> {
    documents(manifests)?
        .into_iter()
        .find(|d| {
            d["kind"] == "ConfigMap" && d["metadata"]["name"] == "linkerd-identity-trust-roots"
        })
        .and_then(|d| d["data"]["ca-bundle.crt"].as_str().map(str::to_owned))
        .context("install output without the trust-roots ConfigMap")
}

/// A running `meshlink-injector` and the Pod that gives its Service an endpoint.
#[derive(Debug)]
pub struct Injector {
    pub program: Program,
    pub addr: SocketAddr,
}

/// Starts `meshlink-injector` for `cluster` as its ServiceAccount, listening on `ip` (an
/// address of this host that is not loopback: the API server reaches it through the Service's
/// endpoints), with the trust anchors in `anchors_file` and `extra` flags; makes the ready Pod
/// `pod` at `ip` (once), and returns once the injector is ready.
pub async fn start_injector(
    cluster: &Cluster,
    ip: Ipv4Addr,
    anchors_file: &Path,
    extra: &[String],
    dir: &Path,
) -> Result<Injector> {
    let kubeconfig =
        service_account_kubeconfig(cluster, "linkerd", INJECTOR_SERVICE_ACCOUNT, dir).await?;
    let addr = SocketAddr::new(IpAddr::V4(ip), INJECTOR_PORT);
    let mut args = vec![
        format!("--addr={addr}"),
        format!("--trust-anchors-file={}", anchors_file.display()),
        "--log=info,proxy_injector=debug".to_owned(),
    ];
    args.extend(extra.iter().cloned());
    let program = Program::start(
        "meshlink-injector",
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await?;
    Ok(Injector { program, addr })
}

/// The ready Pod `linkerd/<name>` at `ip` that the injector's Service selects.
pub async fn injector_endpoint(cluster: &Cluster, name: &str, ip: Ipv4Addr) -> Result<()> {
    let labels = BTreeMap::from([(INJECTOR_LABEL.0.to_owned(), INJECTOR_LABEL.1.to_owned())]);
    create_ready_pod(
        &cluster.client(),
        "linkerd",
        name,
        &labels,
        IpAddr::V4(ip),
        &cluster.node_name(),
    )
    .await?;
    Ok(())
}

/// The CA bundle in the injector's MutatingWebhookConfiguration (empty when none).
pub async fn webhook_ca_bundle(cluster: &Cluster) -> Result<Vec<u8>> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
    let config = api.get(WEBHOOK_CONFIGURATION).await?;
    Ok(config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .next()
        .and_then(|w| w.client_config.ca_bundle)
        .map(|b| b.0)
        .unwrap_or_default())
}

/// Writes `text` to `dir/<name>` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Pods of `namespace` whose labels include `app=<app>`.
pub async fn pods_of(
    cluster: &Cluster,
    namespace: &str,
    app: &str,
) -> Result<Vec<k8s_openapi::api::core::v1::Pod>> {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client(), namespace);
    Ok(api
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await?
        .items)
}

/// Free port on loopback, re-exported for tests that need one next to the injector.
pub fn port() -> Result<u16> {
    Ok(free_port()?)
}
