//! A cluster installed as a user installs it: `meshlink install` output applied with `kubectl
//! apply --server-side`, and the control-plane programs it declares run as processes under
//! their manifests' ServiceAccounts (there is no kubelet), each with a ready Pod at the address
//! it listens on so that its Service has the endpoints a kubelet would give it.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Output, Stdio},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use serde::Deserialize;
use serde_json::Value;

use crate::{
    Binaries, Cluster,
    coredns::CoreDns,
    destination::start_destination,
    kubelet::run_deployment_pod,
    mesh::{self, GatewaySettings, cli, service_account_kubeconfig, start_identity, trust_domain},
    meshlink::{Program, start_mirror, workspace_binary},
    netns::Host,
};

/// The proxy injector's names, as `manifests/injector/injector.yaml` declares them.
pub const INJECTOR_SERVICE_ACCOUNT: &str = "linkerd-proxy-injector";
pub const WEBHOOK_CONFIGURATION: &str = "linkerd-proxy-injector-webhook-config";
/// The port the injector's Service sends to (its `targetPort`).
pub const INJECTOR_PORT: u16 = 8443;

/// Runs `program` with `args` and `stdin` as its standard input (none: /dev/null), and
/// returns what it printed.
pub fn run_piped(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", program.display()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// `kubectl --kubeconfig <cluster's> <args>`, with `stdin` as its standard input; its output,
/// or an error with its stderr.
pub fn kubectl(cluster: &Cluster, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let kubeconfig = format!("--kubeconfig={}", cluster.kubeconfig_path().display());
    let all: Vec<&str> = std::iter::once(kubeconfig.as_str())
        .chain(args.iter().copied())
        .collect();
    let out = run_piped(&Binaries::locate()?.kubectl(), &all, stdin)?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `meshlink <args>` with `stdin`; what it printed on stdout and stderr, or an error with its
/// stderr.
pub fn meshlink_piped(args: &[&str], stdin: Option<&str>) -> Result<(String, String)> {
    let out = run_piped(&workspace_binary("meshlink")?, args, stdin)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("meshlink {}: {stderr}", args.join(" "));
    }
    Ok((String::from_utf8(out.stdout)?, stderr))
}

/// Waits until mirror `namespace/name` has an endpoint (at the gateway of its cluster).
pub async fn wait_mirror_endpoints(cluster: &Cluster, namespace: &str, name: &str) -> Result<()> {
    crate::wait_for(
        &format!("the mirror {namespace}/{name} with endpoints"),
        std::time::Duration::from_secs(60),
        || async {
            let ep = Api::<k8s_openapi::api::core::v1::Endpoints>::namespaced(
                cluster.client(),
                namespace,
            )
            .get_opt(name)
            .await
            .ok()??;
            ep.subsets?.first()?.addresses.as_ref()?.first().map(drop)
        },
    )
    .await?;
    Ok(())
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

/// (kind, namespace, name) → resourceVersion of every object in `manifests`, as stored.
pub fn stored_versions(
    cluster: &Cluster,
    manifests: &str,
) -> Result<std::collections::BTreeMap<String, String>> {
    let list: Value = serde_json::from_str(&kubectl(
        cluster,
        &["get", "-f", "-", "-o", "json"],
        Some(manifests),
    )?)?;
    let mut versions = std::collections::BTreeMap::new();
    for item in list["items"]
        .as_array()
        .context("kubectl get -o json gives a List")?
    {
        let m = &item["metadata"];
        versions.insert(
            format!("{} {}/{}", item["kind"], m["namespace"], m["name"]),
            m["resourceVersion"].as_str().unwrap_or_default().to_owned(),
        );
    }
    Ok(versions)
}

/// `meshlink check -o json --wait <wait>` against `cluster`: its exit code and report.
pub async fn check(cluster: &Cluster, wait: &str) -> Result<(Option<i32>, Value)> {
    let out = tokio::process::Command::new(crate::meshlink::workspace_binary("meshlink")?)
        .args(["check", "-o", "json", "--wait", wait, "--kubeconfig"])
        .arg(cluster.kubeconfig_path())
        .stdin(Stdio::null())
        .output()
        .await?;
    let report = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "meshlink check printed {:?}; stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code(), report))
}

/// Check `id` of a `meshlink check -o json` report.
pub fn check_result<'a>(report: &'a Value, id: &str) -> Result<&'a Value> {
    checks_of(report)
        .find(|c| c["id"] == id)
        .with_context(|| format!("no check {id} in {report:#}"))
}

/// Every check of a `meshlink check -o json` report.
pub fn checks_of(report: &Value) -> impl Iterator<Item = &Value> {
    report["categories"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["checks"].as_array().into_iter().flatten())
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

/// The injector's own Pod (made by the ReplicaSet controller), Running and Ready at `ip`, so
/// that the API server finds it as the endpoint of the injector's Service.
pub async fn injector_endpoint(cluster: &Cluster, ip: Ipv4Addr) -> Result<()> {
    run_deployment_pod(cluster, "linkerd", INJECTOR_SERVICE_ACCOUNT, ip).await?;
    Ok(())
}

/// A ready Pod `linkerd/<name>` at `ip` with the injector's labels, for a cluster that runs no
/// workload controllers (so no Deployment makes the injector's own Pod).
pub async fn injector_pod(cluster: &Cluster, name: &str, ip: Ipv4Addr) -> Result<()> {
    let labels = std::collections::BTreeMap::from([(
        "linkerd.io/control-plane-component".to_owned(),
        "proxy-injector".to_owned(),
    )]);
    crate::create_ready_pod(
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

/// One cluster as a user installs it: `meshlink install` (with the issuer `pki/<cluster>` and
/// anchor `pki/anchor` that `mesh::make_pki` makes, and the cluster's own trust domain)
/// applied with kubectl, then its control plane run as processes on a veth address of this
/// host (each as its manifest's ServiceAccount, its Deployment's Pod Running and Ready there):
/// identity, destination, the injector, the gateway (when installed) and cluster DNS. The
/// cluster must run the workload controllers ([`crate::ClusterOptions::workload_controllers`]).
#[derive(Debug)]
pub struct Installed {
    pub manifests: String,
    pub anchors_file: PathBuf,
    /// Where its programs listen (the gateway's "load balancer" address too).
    pub ip: Ipv4Addr,
    pub identity: Program,
    pub destination: Program,
    pub injector: Injector,
    pub gateway: Option<Program>,
    pub dns: CoreDns,
    _net: Host,
}

impl Installed {
    /// The `meshlink install` arguments for `cluster` with the PKI in `pki`.
    pub fn install_args(cluster: &str, pki: &Path, gateway: bool) -> Vec<String> {
        vec![
            "--identity-trust-anchors-file".into(),
            pki.join("anchor/ca.crt").display().to_string(),
            "--identity-issuer-certificate-file".into(),
            pki.join(cluster).join("issuer.crt").display().to_string(),
            "--identity-issuer-key-file".into(),
            pki.join(cluster).join("issuer.key").display().to_string(),
            "--identity-trust-domain".into(),
            trust_domain(cluster),
            format!("--gateway={gateway}"),
        ]
    }

    pub async fn start(cluster: &Cluster, pki: &Path, gateway: bool) -> Result<Self> {
        let args = Self::install_args(cluster.name(), pki, gateway);
        let manifests = install(
            cluster,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )?;
        Self::run(cluster, manifests, pki, gateway).await
    }

    /// Runs the control plane of a cluster `manifests` (install output) were applied to.
    pub async fn run(
        cluster: &Cluster,
        manifests: String,
        pki: &Path,
        gateway: bool,
    ) -> Result<Self> {
        let name = cluster.name();
        let dir = pki.join(format!("{name}-installed"));
        std::fs::create_dir_all(&dir)?;
        let anchors_file = write_file(&dir, "anchors.pem", &anchors_of(&manifests)?)?;
        let net = Host::create()?;
        let ip = net.host_address();
        let identity_addr = SocketAddr::new(IpAddr::V4(ip), 8080);
        let identity = start_identity(cluster, identity_addr, &anchors_file, "24h", &dir)
            .await
            .with_context(|| format!("{name}'s identity service"))?;
        run_deployment_pod(cluster, "linkerd", "linkerd-identity", ip).await?;
        let destination = start_destination(
            cluster,
            SocketAddr::new(IpAddr::V4(ip), 8086),
            identity_addr,
            &anchors_file,
            &dir,
            &[],
        )
        .await
        .with_context(|| format!("{name}'s destination service"))?;
        run_deployment_pod(cluster, "linkerd", "linkerd-destination", ip).await?;
        let injector = start_injector(
            cluster,
            ip,
            &anchors_file,
            &[format!("--trust-domain={}", trust_domain(name))],
            &dir,
        )
        .await
        .with_context(|| format!("{name}'s proxy injector"))?;
        injector_endpoint(cluster, ip).await?;
        let gateway = if gateway {
            // What a cloud's load-balancer controller does: the Service gets an address.
            let status = serde_json::json!({ "status": { "loadBalancer": { "ingress": [{ "ip": ip.to_string() }] } } });
            Api::<k8s_openapi::api::core::v1::Service>::namespaced(
                cluster.client(),
                "linkerd-multicluster",
            )
            .patch_status(
                "linkerd-gateway",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await?;
            let program = mesh::start_gateway(
                cluster,
                &GatewaySettings {
                    addr: (ip, 4143).into(),
                    admin: (ip, 4191).into(),
                    identity_addr,
                    anchors_file: anchors_file.clone(),
                    extra: Vec::new(),
                    binary: None,
                },
                &dir,
            )
            .await
            .with_context(|| format!("{name}'s gateway"))?;
            run_deployment_pod(cluster, "linkerd-multicluster", "linkerd-gateway", ip).await?;
            Some(program)
        } else {
            None
        };
        let dns = CoreDns::start(cluster, ip).await?;
        Ok(Self {
            manifests,
            anchors_file,
            ip,
            identity,
            destination,
            injector,
            gateway,
            dns,
            _net: net,
        })
    }
}

/// Starts the service-mirror controller install declared, as its ServiceAccount, and marks its
/// Pod Running at `ip`.
pub async fn start_installed_mirror(
    cluster: &Cluster,
    ip: Ipv4Addr,
    dir: &Path,
) -> Result<Program> {
    let kubeconfig = service_account_kubeconfig(
        cluster,
        "linkerd-multicluster",
        "meshlink-service-mirror",
        dir,
    )
    .await?;
    let program = start_mirror(
        &kubeconfig,
        &["--namespace=linkerd-multicluster".to_owned()],
    )
    .await?;
    run_deployment_pod(
        cluster,
        "linkerd-multicluster",
        "meshlink-service-mirror",
        ip,
    )
    .await?;
    Ok(program)
}
