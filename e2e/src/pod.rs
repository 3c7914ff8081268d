//! Meshed Pods without a kubelet: the parts of a Pod that Linkerd's injector and a kubelet would
//! make, made by the harness, with `meshlink-proxy` as the sidecar.
//!
//! A [`MeshedPod`] is:
//! - a network namespace ([`Host`]) with a Pod's routes ([`Host::route_as_pod`]); the root
//!   namespace forwards between Pods' veths ([`Forwarding`]);
//! - its Pod object in the API, as the injector leaves it (label
//!   `linkerd.io/control-plane-ns=linkerd`, a `linkerd-proxy` container with its inbound address,
//!   the ServiceAccount), with the namespace's address as its podIP; Ready once the proxy is;
//! - `meshlink-proxy init` run in the namespace with proxy-init's arguments (the iptables rules
//!   that hand the Pod's traffic to the proxy);
//! - `meshlink-proxy` in the namespace as uid 2102 with the injector's environment and a real
//!   ServiceAccount token for the identity service, waited for on `/ready`;
//! - the application ([`crate::app`]) in the namespace as root, so its traffic is redirected.
//!
//! The control plane of each cluster ([`ControlPlane`]) listens on a test host's veth address in
//! the root namespace, which every Pod reaches through its route to
//! [`crate::netns::TEST_NETWORK`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    Cluster,
    app::AppRequest,
    destination::{destination_id, start_destination},
    kubelet,
    mesh::{self, IDENTITY_AUDIENCE, identity_id, start_identity, workload_id},
    meshlink::{Program, free_port, http_get, service_account_token_for, workspace_binary},
    netns::{Forwarding, Host},
    process::Process,
    wait_for,
};

/// The uid the proxy runs as, which the iptables rules exempt (Linkerd's `proxyUID`).
pub const PROXY_UID: u32 = 2102;
/// Linkerd's proxy ports.
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;
pub const CONTROL_PORT: u16 = 4190;
/// proxy-init's defaults in Linkerd's chart (`proxyInit.ignoreInboundPorts` adds the proxy's own
/// admin and control ports; 4567 and 4568 are Linkerd's defaults for `skipPorts`).
pub const INBOUND_PORTS_TO_IGNORE: &str = "4190,4191,4567,4568";
pub const OUTBOUND_PORTS_TO_IGNORE: &str = "4567,4568";
/// The containers the injector adds.
const PROXY_CONTAINER: &str = "linkerd-proxy";
const INIT_CONTAINER: &str = "linkerd-init";
/// Linkerd's default `clusterNetworks`.
pub const CLUSTER_NETWORKS: &str = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16";
/// The label the injector puts on meshed Pods; the destination service gives a Pod's endpoints
/// an identity only with it.
pub const CONTROL_PLANE_NS_LABEL: (&str, &str) = ("linkerd.io/control-plane-ns", "linkerd");
pub const OPAQUE_PORTS_ANNOTATION: &str = "config.linkerd.io/opaque-ports";
pub const DEFAULT_INBOUND_POLICY_ANNOTATION: &str = "config.linkerd.io/default-inbound-policy";
/// How long a Pod may take to be ready (certified, its inbound policy known).
const START: Duration = Duration::from_secs(60);
/// The longest a command run in a Pod may take.
const EXEC: Duration = Duration::from_secs(30);

/// One cluster's control plane as its Pods see it.
#[derive(Debug)]
pub struct ControlPlane {
    pub cluster: String,
    pub node: String,
    pub identity_addr: SocketAddr,
    pub destination_addr: SocketAddr,
    pub anchors_pem: String,
    pub identity: Program,
    pub destination: tokio::sync::Mutex<Program>,
}

impl ControlPlane {
    /// Installs the identity service's manifest with issuer `pki/<cluster>` (see
    /// [`mesh::make_pki`]), the destination service's manifest and the Link CRD, and starts the
    /// identity and destination services of `cluster` at `ip` (a veth address of this host that
    /// Pods reach), each as its manifest's ServiceAccount; returns once both are ready.
    pub async fn start(cluster: &Cluster, pki: &Path, ip: Ipv4Addr) -> Result<Self> {
        let name = cluster.name().to_owned();
        mesh::install_identity(cluster, pki, &name).await?;
        mesh::apply_manifest(cluster, "destination/destination.yaml").await?;
        crate::install_link_crd(&cluster.client()).await?;
        let anchors = pki.join("anchor/ca.crt");
        let identity_addr = SocketAddr::new(IpAddr::V4(ip), free_port()?);
        let identity = start_identity(cluster, identity_addr, &anchors, "24h", pki)
            .await
            .with_context(|| format!("{name}'s identity service"))?;
        let destination_addr = SocketAddr::new(IpAddr::V4(ip), free_port()?);
        let dir = pki.join(format!("{name}-destination"));
        std::fs::create_dir_all(&dir)?;
        let destination = start_destination(
            cluster,
            destination_addr,
            identity_addr,
            &anchors,
            &dir,
            &[],
        )
        .await
        .with_context(|| format!("{name}'s destination service"))?;
        Ok(Self {
            cluster: name,
            node: cluster.node_name(),
            identity_addr,
            destination_addr,
            anchors_pem: std::fs::read_to_string(&anchors)?,
            identity,
            destination: tokio::sync::Mutex::new(destination),
        })
    }
}

/// What a [`MeshedPod`] is.
#[derive(Clone, Debug, Default)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The app's HTTP port (HTTP/1 and HTTP/2).
    pub http_port: u16,
    /// The app's server-speaks-first port, if any.
    pub banner_port: Option<u16>,
    /// More proxy environment (replacing the defaults of the same name).
    pub env: Vec<(String, String)>,
}

impl PodSpec {
    /// Pod `namespace/name` of ServiceAccount `service_account`, labelled `app=<app>`, serving
    /// HTTP on 8080.
    pub fn new(namespace: &str, name: &str, service_account: &str, app: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            service_account: service_account.into(),
            labels: BTreeMap::from([("app".into(), app.into())]),
            annotations: BTreeMap::new(),
            http_port: 8080,
            banner_port: None,
            env: Vec::new(),
        }
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn banner(mut self, port: u16) -> Self {
        self.banner_port = Some(port);
        self
    }

    fn ports(&self) -> Vec<u16> {
        std::iter::once(self.http_port)
            .chain(self.banner_port)
            .collect()
    }
}

/// A meshed Pod (see the module's documentation). Its processes stop and its namespace goes away
/// when it is dropped; the Pod object stays.
pub struct MeshedPod {
    pub spec: PodSpec,
    /// Its identity.
    pub id: String,
    client: kube::Client,
    app: Process,
    proxy: Process,
    host: Host,
    _forwarding: Forwarding,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for MeshedPod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshedPod")
            .field("spec", &self.spec)
            .field("id", &self.id)
            .field("host", &self.host)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl MeshedPod {
    /// Creates and starts the Pod in `cluster`, whose control plane is `cp`; returns once the
    /// proxy is ready, the app listens and the Pod is marked Ready.
    pub async fn start(cluster: &Cluster, cp: &ControlPlane, spec: PodSpec) -> Result<Self> {
        let client = cluster.client();
        let forwarding = Forwarding::enable()?;
        let host = Host::create()?;
        host.route_as_pod()?;
        let dir = tempfile::tempdir()?;
        // The proxy runs as PROXY_UID: it must reach its token and write its identity directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let id = workload_id(&spec.service_account, &spec.namespace, cluster.name());

        ensure_service_account(&client, &spec.namespace, &spec.service_account).await?;
        create_pod(&client, &spec, host.address(), &cp.node).await?;

        let proxy_bin = workspace_binary("meshlink-proxy")?;
        init(&host, &proxy_bin, &dir.path().join("init.log")).await?;

        let token = dir.path().join("token");
        std::fs::write(
            &token,
            service_account_token_for(
                cluster,
                &spec.namespace,
                &spec.service_account,
                IDENTITY_AUDIENCE,
            )
            .await?,
        )?;
        let identity_dir = dir.path().join("identity");
        std::fs::create_dir(&identity_dir)?;
        for path in [&token, &identity_dir] {
            std::os::unix::fs::chown(path, Some(PROXY_UID), Some(PROXY_UID))?;
        }
        let env = proxy_env(&spec, cp, &host, &id, &token, &identity_dir);
        let proxy = spawn_proxy(&host, &proxy_bin, PROXY_UID, env, dir.path())?;
        let app = spawn_app(&host, &spec, dir.path())?;
        let this = Self {
            spec,
            id,
            client,
            app,
            proxy,
            host,
            _forwarding: forwarding,
            dir,
        };
        this.started().await
    }

    /// Runs Pod `namespace/name` as the API server stored it, injected by the webhook or by
    /// `meshlink inject`, as a kubelet would ([`crate::kubelet`]): scheduled to the cluster's
    /// node, given its namespace's address, its init container's command run, its proxy run
    /// with the container's own command, user and environment; then the test app, serving the
    /// app container's first port (the image itself is never run). Returns once the proxy is
    /// ready, the app listens and the Pod is marked Ready.
    pub async fn run_stored(cluster: &Cluster, namespace: &str, name: &str) -> Result<Self> {
        let client = cluster.client();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let stored = pods.get(name).await?;
        let spec = stored.spec.clone().context("a Pod without a spec")?;
        let container =
            |name: &str, list: &[Container]| list.iter().find(|c| c.name == name).cloned();
        let proxy = container(PROXY_CONTAINER, &spec.containers).with_context(|| {
            format!(
                "Pod {namespace}/{name} has no {PROXY_CONTAINER} container: it was not injected"
            )
        })?;
        let init = container(
            INIT_CONTAINER,
            spec.init_containers.as_deref().unwrap_or_default(),
        )
        .with_context(|| {
            format!("Pod {namespace}/{name} has no {INIT_CONTAINER} init container")
        })?;

        let forwarding = Forwarding::enable()?;
        let host = Host::create()?;
        host.route_as_pod()?;
        if spec.node_name.is_none() {
            kubelet::bind(&pods, name, &cluster.node_name()).await?;
        }
        kubelet::mark_running(&pods, name, host.address(), false).await?;
        let stored = pods.get(name).await?;

        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let uid = proxy
            .security_context
            .as_ref()
            .and_then(|c| c.run_as_user)
            .map(u32::try_from)
            .transpose()?
            .unwrap_or(PROXY_UID);
        let volumes = kubelet::make_volumes(cluster, &stored, dir.path(), uid).await?;
        let proxy_bin = workspace_binary("meshlink-proxy")?;

        // The init container: its command and arguments, as root in the Pod's namespace.
        let mut argv: Vec<String> = init.command.clone().unwrap_or_default();
        argv.extend(init.args.clone().unwrap_or_default());
        if argv.first().map(String::as_str) == Some("meshlink-proxy") {
            argv[0] = path(&proxy_bin);
        }
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = exec_in(&host, &argv).await?;
        let text = format!(
            "$ {}\n{}{}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(dir.path().join("init.log"), &text)?;
        ensure!(
            out.status.success(),
            "{INIT_CONTAINER} of {namespace}/{name} failed:\n{text}"
        );

        let mut env = kubelet::resolve(cluster, &stored, &proxy, &volumes).await?;
        if let Ok(log) = std::env::var("MESHLINK_E2E_PROXY_LOG") {
            env.retain(|(k, _)| k != "LINKERD2_PROXY_LOG");
            env.push(("LINKERD2_PROXY_LOG".into(), log));
        }
        // This host's end of the veth may read /metrics, as in [`MeshedPod::start`].
        env.push((
            "MESHLINK_METRICS_NETWORKS".into(),
            format!("{}/32", host.host_address()),
        ));
        let id = env
            .iter()
            .find(|(k, _)| k == "LINKERD2_PROXY_IDENTITY_LOCAL_NAME")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        ensure!(
            proxy.command.as_deref() == Some(&["meshlink-proxy".to_owned()][..]),
            "the proxy container runs {:?}, not meshlink-proxy",
            proxy.command
        );
        let proxy = spawn_proxy(&host, &proxy_bin, uid, env, dir.path())?;

        let app_port = spec
            .containers
            .iter()
            .filter(|c| c.name != PROXY_CONTAINER)
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| p.container_port)
            .next()
            .map(u16::try_from)
            .transpose()?
            .unwrap_or(8080);
        let mut pod_spec = PodSpec::new(
            namespace,
            name,
            spec.service_account_name.as_deref().unwrap_or("default"),
            "",
        );
        pod_spec.labels = stored.metadata.labels.clone().unwrap_or_default();
        pod_spec.annotations = stored.metadata.annotations.clone().unwrap_or_default();
        pod_spec.http_port = app_port;
        let app = spawn_app(&host, &pod_spec, dir.path())?;
        let this = Self {
            spec: pod_spec,
            id,
            client,
            app,
            proxy,
            host,
            _forwarding: forwarding,
            dir,
        };
        this.started().await
    }

    /// Once its proxy and app are up, the Pod is Ready, as a kubelet's probes would say.
    async fn started(mut self) -> Result<Self> {
        self.wait_started().await?;
        self.set_ready(true).await?;
        Ok(self)
    }

    /// Waits for the app's `listening` line and the proxy's `/ready`, failing early with the
    /// log of whichever exited.
    async fn wait_started(&mut self) -> Result<()> {
        let ready = SocketAddr::new(IpAddr::V4(self.host.address()), ADMIN_PORT);
        let name = self.spec.name.clone();
        let (proxy, app) = (&mut self.proxy, &mut self.app);
        let app_log = app.log_path().to_owned();
        let started = wait_for(
            &format!("Pod {name}: its app to listen and its proxy's /ready to answer 200"),
            START,
            || {
                // A process that exited ends the wait at once, with its log.
                let exited = [&mut *proxy, &mut *app].into_iter().find_map(|p| {
                    let status = p.exited()?;
                    Some(anyhow::anyhow!(
                        "{} of Pod {name} exited ({status}); last lines of {}:\n{}",
                        p.name(),
                        p.log_path().display(),
                        p.log_tail()
                    ))
                });
                let app_log = &app_log;
                async move {
                    if let Some(e) = exited {
                        return Some(Err(e));
                    }
                    let listening = std::fs::read_to_string(app_log)
                        .is_ok_and(|l| l.lines().any(|l| l == crate::app::LISTENING));
                    let ready = http_get(ready, "/ready").await.is_ok_and(|r| r.0 == 200);
                    (listening && ready).then_some(Ok(()))
                }
            },
        )
        .await;
        match started {
            Ok(result) => result,
            Err(timeout) => {
                let (code, body) = http_get(ready, "/ready")
                    .await
                    .unwrap_or((0, String::new()));
                bail!(
                    "{timeout}: /ready answers {code} {body:?}; last lines of {}:\n{}",
                    self.proxy.log_path().display(),
                    self.proxy.log_tail()
                )
            }
        }
    }

    /// Marks the Pod Ready or not, as a kubelet would when its readiness probe changes.
    pub async fn set_ready(&self, ready: bool) -> Result<()> {
        set_pod_ready(&self.client, &self.spec.namespace, &self.spec.name, ready).await
    }

    /// The Pod's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.host.address()
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The proxy's log so far (its last lines).
    pub fn proxy_log_tail(&self) -> String {
        self.proxy.log_tail()
    }

    /// Where the proxy's log is.
    pub fn proxy_log(&self) -> &Path {
        self.proxy.log_path()
    }

    /// The HTTP requests the app has logged, in order.
    pub fn app_requests(&self) -> Vec<AppRequest> {
        std::fs::read_to_string(self.app.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(AppRequest::parse)
            .collect()
    }

    /// How many connections the app's banner port accepted.
    pub fn banner_connections(&self) -> usize {
        std::fs::read_to_string(self.app.log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("banner "))
            .count()
    }

    /// Runs `args` in the Pod's namespace as root (as the app would: its connections are
    /// redirected to the proxy).
    pub async fn exec(&self, args: &[&str]) -> Result<Output> {
        exec_in(&self.host, args).await
    }

    /// The proxy's `/metrics`, read inside the Pod from loopback (which the proxy always serves
    /// and the iptables rules never redirect).
    pub async fn metrics(&self) -> Result<Metrics> {
        let out = self
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "10",
                &format!("http://127.0.0.1:{ADMIN_PORT}/metrics"),
            ])
            .await?;
        ensure!(
            out.status.success(),
            "reading {}'s metrics: {}",
            self.spec.name,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Metrics(String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// The directory of the Pod's files (logs, token).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `args` in `host`'s namespace, for at most 30 s.
pub async fn exec_in(host: &Host, args: &[&str]) -> Result<Output> {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", host.name()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(EXEC, cmd.output())
        .await
        .with_context(|| format!("`{}` took longer than {EXEC:?}", args.join(" ")))?
        .with_context(|| format!("running `{}`", args.join(" ")))
}

/// What `curl -i` saw.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    /// The header block, as curl printed it.
    pub headers: String,
    pub body: String,
}

impl Answer {
    /// The value of `key=` in the body (the app answers `key=value` lines).
    pub fn field(&self, key: &str) -> Option<&str> {
        self.body
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `curl -sS -i --max-time 10 <args>` in `host`'s namespace: an unmodified HTTP client.
pub async fn curl(host: &Host, args: &[&str]) -> Result<Answer> {
    let mut all = vec!["curl", "-sS", "-i", "--max-time", "10"];
    all.extend(args);
    let out = exec_in(host, &all).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{stdout}",
            all.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let (headers, body) = stdout
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header block in curl's output: {stdout:?}"))?;
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {headers:?}"))?;
    Ok(Answer {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    })
}

/// A Prometheus text exposition.
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// The samples of metric `name` whose labels contain every one of `filters` (e.g.
    /// `direction="inbound"`).
    pub fn samples<'a>(&'a self, name: &'a str, filters: &'a [&str]) -> Vec<&'a str> {
        self.0
            .lines()
            .filter(move |l| {
                l.starts_with(name)
                    && l[name.len()..].starts_with(['{', ' '])
                    && filters.iter().all(|f| l.contains(f))
            })
            .collect()
    }

    /// The sum of those samples' values.
    pub fn sum(&self, name: &str, filters: &[&str]) -> f64 {
        self.samples(name, filters)
            .iter()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }

    /// Every sample of `name`, for an error message.
    pub fn show(&self, name: &str) -> String {
        let s = self.samples(name, &[]);
        if s.is_empty() {
            format!("(no {name} samples)")
        } else {
            s.join("\n")
        }
    }
}

/// The environment Linkerd's injector gives the proxy container, pointed at `cp`.
fn proxy_env(
    spec: &PodSpec,
    cp: &ControlPlane,
    host: &Host,
    id: &str,
    token: &Path,
    identity_dir: &Path,
) -> Vec<(String, String)> {
    let ports = |ps: &[u16]| {
        ps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let policy = spec
        .annotations
        .get(DEFAULT_INBOUND_POLICY_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| "all-unauthenticated".into());
    let log = std::env::var("MESHLINK_E2E_PROXY_LOG").unwrap_or_else(|_| "info".into());
    let mut env: BTreeMap<String, String> = [
        ("LINKERD2_PROXY_LOG", log),
        (
            "LINKERD2_PROXY_INBOUND_LISTEN_ADDR",
            format!("0.0.0.0:{INBOUND_PORT}"),
        ),
        (
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR",
            format!("127.0.0.1:{OUTBOUND_PORT}"),
        ),
        (
            "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
            format!("0.0.0.0:{ADMIN_PORT}"),
        ),
        (
            "LINKERD2_PROXY_CONTROL_LISTEN_ADDR",
            format!("0.0.0.0:{CONTROL_PORT}"),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
            cp.destination_addr.to_string(),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_SVC_NAME",
            destination_id(&cp.cluster),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_CONTEXT",
            json!({ "ns": spec.namespace, "nodeName": cp.node }).to_string(),
        ),
        (
            "LINKERD2_PROXY_DESTINATION_PROFILE_NETWORKS",
            CLUSTER_NETWORKS.into(),
        ),
        (
            "LINKERD2_PROXY_POLICY_SVC_ADDR",
            cp.destination_addr.to_string(),
        ),
        (
            "LINKERD2_PROXY_POLICY_SVC_NAME",
            destination_id(&cp.cluster),
        ),
        (
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            json!({ "ns": spec.namespace, "pod": spec.name }).to_string(),
        ),
        ("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY", policy),
        (
            "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS",
            CLUSTER_NETWORKS.into(),
        ),
        ("LINKERD2_PROXY_INBOUND_PORTS", ports(&spec.ports())),
        (
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
            spec.annotations
                .get(OPAQUE_PORTS_ANNOTATION)
                .cloned()
                .unwrap_or_default(),
        ),
        ("LINKERD2_PROXY_INBOUND_IPS", host.address().to_string()),
        ("LINKERD2_PROXY_IDENTITY_DIR", path(identity_dir)),
        (
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
            cp.anchors_pem.clone(),
        ),
        ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", path(token)),
        (
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR",
            cp.identity_addr.to_string(),
        ),
        ("LINKERD2_PROXY_IDENTITY_SVC_NAME", identity_id(&cp.cluster)),
        ("LINKERD2_PROXY_IDENTITY_LOCAL_NAME", id.to_owned()),
        ("LINKERD2_PROXY_IDENTITY_MIN_REFRESH", "1s".into()),
        ("LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD", "5s".into()),
        // The admin port of this host's end of the veth may read /metrics (besides loopback).
        (
            "MESHLINK_METRICS_NETWORKS",
            format!("{}/32", host.host_address()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(spec.env.iter().cloned());
    env.into_iter().collect()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// `meshlink-proxy` in `host`'s namespace as `uid`, with `env`.
fn spawn_proxy(
    host: &Host,
    proxy_bin: &Path,
    uid: u32,
    env: Vec<(String, String)>,
    dir: &Path,
) -> Result<Process> {
    let mut proxy = Process::new(
        "meshlink-proxy",
        PathBuf::from("ip"),
        [
            "netns",
            "exec",
            host.name(),
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]
        .into_iter()
        .map(Into::into)
        .chain([proxy_bin.as_os_str().to_owned()])
        .collect(),
        dir,
    );
    proxy.set_env(env);
    proxy.start().context("starting meshlink-proxy")?;
    Ok(proxy)
}

/// The test app ([`crate::app`]) in `host`'s namespace as root, serving `spec`'s ports.
fn spawn_app(host: &Host, spec: &PodSpec, dir: &Path) -> Result<Process> {
    let e2e = workspace_binary("e2e")?;
    let mut args: Vec<std::ffi::OsString> = vec![
        "netns".into(),
        "exec".into(),
        host.name().into(),
        e2e.into_os_string(),
        "pod-app".into(),
        format!("--name={}", spec.name).into(),
        format!("--http=0.0.0.0:{}", spec.http_port).into(),
    ];
    if let Some(p) = spec.banner_port {
        args.push(format!("--banner=0.0.0.0:{p}").into());
    }
    let mut app = Process::new("app", PathBuf::from("ip"), args, dir);
    app.start().context("starting the app")?;
    Ok(app)
}

/// `meshlink-proxy init` in `host`'s namespace with proxy-init's arguments; its output goes to
/// `log`.
async fn init(host: &Host, proxy_bin: &Path, log: &Path) -> Result<()> {
    let proxy = path(proxy_bin);
    let args = [
        proxy.as_str(),
        "init",
        "--incoming-proxy-port",
        &INBOUND_PORT.to_string(),
        "--outgoing-proxy-port",
        &OUTBOUND_PORT.to_string(),
        "--proxy-uid",
        &PROXY_UID.to_string(),
        "--inbound-ports-to-ignore",
        INBOUND_PORTS_TO_IGNORE,
        "--outbound-ports-to-ignore",
        OUTBOUND_PORTS_TO_IGNORE,
    ]
    .map(str::to_owned);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = exec_in(host, &args).await?;
    let text = format!(
        "$ {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(log, &text)?;
    ensure!(
        out.status.success(),
        "meshlink-proxy init failed ({}):\n{text}",
        out.status
    );
    Ok(())
}

async fn ensure_service_account(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    crate::create_namespace(client, ns).await?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    if api.get_opt(name).await?.is_none() {
        let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
        match api.create(&PostParams::default(), &sa).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The Pod as the injector leaves it, Running with `ip` but not Ready (its proxy is not yet).
async fn create_pod(client: &kube::Client, spec: &PodSpec, ip: Ipv4Addr, node: &str) -> Result<()> {
    let mut labels = spec.labels.clone();
    labels.insert(
        CONTROL_PLANE_NS_LABEL.0.into(),
        CONTROL_PLANE_NS_LABEL.1.into(),
    );
    let app_ports: Vec<_> = spec
        .ports()
        .into_iter()
        .map(|p| json!({ "containerPort": p }))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": spec.annotations,
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": spec.service_account,
            "automountServiceAccountToken": false,
            // Never pulled or run: no kubelet. The images must only be well-formed.
            "initContainers": [{
                "name": "linkerd-init",
                "image": "meshlink.invalid/proxy:none",
                "args": ["init", "--incoming-proxy-port", INBOUND_PORT.to_string(),
                         "--outgoing-proxy-port", OUTBOUND_PORT.to_string(),
                         "--proxy-uid", PROXY_UID.to_string(),
                         "--inbound-ports-to-ignore", INBOUND_PORTS_TO_IGNORE,
                         "--outbound-ports-to-ignore", OUTBOUND_PORTS_TO_IGNORE],
            }],
            "containers": [
                { "name": "app", "image": "meshlink.invalid/test:none", "ports": app_ports },
                {
                    "name": "linkerd-proxy",
                    "image": "meshlink.invalid/proxy:none",
                    "env": [{ "name": "LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "value": format!("0.0.0.0:{INBOUND_PORT}") }],
                    "ports": [
                        { "name": "linkerd-proxy", "containerPort": INBOUND_PORT },
                        { "name": "linkerd-admin", "containerPort": ADMIN_PORT },
                    ],
                },
            ],
        },
    }))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &spec.namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {}/{}", spec.namespace, spec.name))?;
    kubelet::mark_running(&pods, &spec.name, ip, false).await?;
    Ok(())
}

/// Marks Pod `ns/name` Ready or not (its Ready and ContainersReady conditions).
pub async fn set_pod_ready(client: &kube::Client, ns: &str, name: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    let patch = json!({ "status": { "conditions": [
        { "type": "Ready", "status": status },
        { "type": "ContainersReady", "status": status },
    ] } });
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

/// A host in a network namespace with a Pod's routes and no proxy: an un-meshed client.
pub fn unmeshed_host() -> Result<(Host, Forwarding)> {
    let forwarding = Forwarding::enable()?;
    let host = Host::create()?;
    host.route_as_pod()?;
    Ok((host, forwarding))
}

/// Waits until `probe` of `pod`'s metrics holds, for at most `timeout`; the error shows
/// `show`'s samples.
pub async fn wait_metric(
    pod: &MeshedPod,
    what: &str,
    timeout: Duration,
    show: &str,
    probe: impl Fn(&Metrics) -> bool,
) -> Result<Metrics> {
    let found = wait_for(what, timeout, || async {
        let m = pod.metrics().await.ok()?;
        probe(&m).then_some(m)
    })
    .await;
    match found {
        Ok(m) => Ok(m),
        Err(e) => {
            let now = pod
                .metrics()
                .await
                .map(|m| m.show(show))
                .unwrap_or_else(|e| format!("{e:#}"));
            bail!("{e} (Pod {}); {show} now:\n{now}", pod.spec.name)
        }
    }
}
