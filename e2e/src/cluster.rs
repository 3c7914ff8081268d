//! One real Kubernetes control plane on loopback: etcd, kube-apiserver and
//! kube-controller-manager as child processes, with their own PKI and an admin client.

use std::{
    ffi::OsString,
    future::Future,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU8, Ordering},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};

use crate::{
    Binaries, Error,
    pki::ClusterPki,
    process::Process,
    state::{self, StateDir},
};

/// How long a component may take to become ready. Generous: two clusters starting at once on a
/// loaded two-core CI machine take about 10 s; a cold page cache can triple that.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How many times start-up is retried when another process took a port between the harness
/// choosing it and the component binding it.
const PORT_ATTEMPTS: usize = 3;

/// The controllers a test cluster runs. No kubelet runs, so nothing that schedules or runs pods:
/// tests make Pods Ready themselves (see [`Cluster::create_ready_pod`](crate::Cluster)).
const CONTROLLERS: &[&str] = &[
    "serviceaccount-token-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "root-ca-certificate-publisher-controller",
];

/// The issuer and audience of ServiceAccount tokens, as in a kubeadm cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Settings of a cluster to start.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The cluster's name: its kubeconfig context, its Node's prefix, its directory's prefix.
    pub name: String,
    /// Directory under which the cluster makes its own fresh directory.
    pub root: PathBuf,
    /// Use exactly this directory (emptied first) and allow [`Cluster::detach`]; for `e2e up`.
    pub fixed_dir: Option<PathBuf>,
    /// Extra `kube-apiserver` flags, after the harness's own (a later flag wins).
    pub extra_apiserver_args: Vec<String>,
    /// Also run the Deployment and ReplicaSet controllers, so that a Deployment makes Pods
    /// (stored, never run: there is no kubelet), as the injector's tests need.
    pub workload_controllers: bool,
}

impl ClusterOptions {
    /// Defaults for a cluster called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            root: state::default_root(),
            fixed_dir: None,
            extra_apiserver_args: Vec::new(),
            workload_controllers: false,
        }
    }
}

/// A control-plane component of a test cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// etcd
    Etcd,
    /// kube-apiserver
    ApiServer,
    /// kube-controller-manager
    ControllerManager,
}

/// A running test cluster. Dropping it stops exactly its processes and removes its files.
pub struct Cluster {
    name: String,
    api_port: u16,
    etcd_port: u16,
    service_cidr: String,
    admin_token: String,
    ca_pem: String,
    kubeconfig_path: PathBuf,
    client: Client,
    // Stopped in this order on drop (fields drop in declaration order), then the files go.
    controller_manager: Process,
    apiserver: Process,
    etcd: Process,
    dir: StateDir,
}

impl Cluster {
    /// Starts a cluster with default options.
    pub async fn start(name: &str) -> Result<Self, Error> {
        Self::start_with(ClusterOptions::new(name)).await
    }

    /// Starts several clusters side by side.
    pub async fn start_many(names: &[&str]) -> Result<Vec<Self>, Error> {
        futures::future::try_join_all(names.iter().map(|n| Self::start(n))).await
    }

    /// Starts a cluster.
    pub async fn start_with(opts: ClusterOptions) -> Result<Self, Error> {
        let binaries = Binaries::locate()?;
        for dir in state::sweep_stale(&opts.root) {
            tracing::info!(dir = %dir.display(), "removed what a crashed run left behind");
        }
        let mut attempt = 1;
        loop {
            match Self::try_start(&opts, binaries).await {
                Err(e) if e.is_port_clash() && attempt < PORT_ATTEMPTS => {
                    tracing::warn!(cluster = %opts.name, attempt, "port taken during start-up, retrying");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn try_start(opts: &ClusterOptions, bins: &Binaries) -> Result<Self, Error> {
        let name = opts.name.clone();
        let io = |source| Error::Io {
            cluster: name.clone(),
            source,
        };
        let dir = match &opts.fixed_dir {
            Some(path) => StateDir::create_at(path.clone()),
            None => StateDir::create(&opts.root, &opts.name),
        }
        .map_err(io)?;
        let d = dir.path();

        let pki = ClusterPki::generate(&name)?;
        let admin_token = random_token().map_err(io)?;
        for (file, contents) in [
            ("ca.crt", pki.ca_cert.as_str()),
            ("apiserver.crt", &pki.serving_cert),
            ("apiserver.key", &pki.serving_key),
            ("sa.key", &pki.service_account_key),
            ("sa.pub", &pki.service_account_pub),
            (
                "tokens.csv",
                &format!("{admin_token},admin,admin,system:masters\n"),
            ),
        ] {
            std::fs::write(d.join(file), contents).map_err(io)?;
        }

        let [etcd_port, peer_port, api_port] = free_ports().map_err(io)?;
        let service_cidr = next_service_cidr();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Process::new(
            "etcd",
            bins.path("etcd"),
            args([
                format!("--name={name}"),
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={name}={peer_url}"),
                // Test data is thrown away: durability only costs time here.
                "--unsafe-no-fsync".to_owned(),
                "--log-level=warn".to_owned(),
            ]),
            d,
        );

        let path = |f: &str| d.join(f).display().to_string();
        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", path("certs")),
            format!("--tls-cert-file={}", path("apiserver.crt")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--client-ca-file={}", path("ca.crt")),
            format!("--token-auth-file={}", path("tokens.csv")),
            "--authorization-mode=RBAC".to_owned(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            format!("--service-cluster-ip-range={service_cidr}"),
            // No kubelet or kube-proxy: nothing would use the `kubernetes` Service's endpoints.
            "--endpoint-reconciler-type=none".to_owned(),
            // No kube-proxy either: the API server reaches a Service (an admission webhook's)
            // at one of its endpoints rather than at its ClusterIP, as in clusters whose
            // control plane is outside the Pod network.
            "--enable-aggregator-routing=true".to_owned(),
            "--profiling=false".to_owned(),
        ];
        apiserver_args.extend(opts.extra_apiserver_args.iter().cloned());
        let apiserver = Process::new(
            "kube-apiserver",
            bins.path("kube-apiserver"),
            args(apiserver_args),
            d,
        );

        let mut controllers = CONTROLLERS.to_vec();
        if opts.workload_controllers {
            controllers.extend(["deployment-controller", "replicaset-controller"]);
        }
        let kubeconfig_path = d.join("kubeconfig");
        let controller_manager = Process::new(
            "kube-controller-manager",
            bins.path("kube-controller-manager"),
            args([
                format!("--kubeconfig={}", kubeconfig_path.display()),
                format!("--cluster-name={name}"),
                "--leader-elect=false".to_owned(),
                format!("--controllers={}", controllers.join(",")),
                format!("--service-account-private-key-file={}", path("sa.key")),
                format!("--root-ca-file={}", path("ca.crt")),
                // No metrics or health server: nothing scrapes it, and it would need a port.
                "--secure-port=0".to_owned(),
                // The defaults (20 QPS) keep 10,000 Services' Endpoints and EndpointSlices
                // minutes behind; tests and benchmarks need the cluster itself to keep up.
                "--kube-api-qps=500".to_owned(),
                "--kube-api-burst=1000".to_owned(),
                "--concurrent-service-endpoint-syncs=20".to_owned(),
                "--concurrent-endpoint-syncs=20".to_owned(),
            ]),
            d,
        );

        let kubeconfig = kubeconfig_yaml(&name, api_port, &pki.ca_cert, &admin_token);
        std::fs::write(&kubeconfig_path, &kubeconfig).map_err(io)?;
        let client = client_from_yaml(&kubeconfig).await?;

        let mut cluster = Self {
            name,
            api_port,
            etcd_port,
            service_cidr,
            admin_token,
            ca_pem: pki.ca_cert,
            kubeconfig_path,
            client,
            controller_manager,
            apiserver,
            etcd,
            dir,
        };
        for c in [
            Component::Etcd,
            Component::ApiServer,
            Component::ControllerManager,
        ] {
            cluster.start_component(c).await?;
        }
        cluster.create_node().await?;
        Ok(cluster)
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A client with cluster-admin rights.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The API server's URL.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The CA that signed the API server's certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The range from which this cluster allocates Service IPs (distinct per cluster).
    pub fn service_cidr(&self) -> &str {
        &self.service_cidr
    }

    /// The admin kubeconfig file (context named after the cluster).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The cluster's directory (logs, PKI, etcd data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig for this cluster that authenticates with a bearer `token`, as the YAML text
    /// a credentials Secret would carry.
    pub fn kubeconfig_for_token(&self, user: &str, token: &str) -> String {
        kubeconfig_yaml_for(&self.name, user, self.api_port, &self.ca_pem, token)
    }

    /// A client that authenticates with a bearer `token` (e.g. a ServiceAccount's).
    pub async fn client_for_token(&self, token: &str) -> Result<Client, Error> {
        client_from_yaml(&self.kubeconfig_for_token("token-user", token)).await
    }

    /// The pid of a running component, if it runs.
    pub fn pid(&self, component: Component) -> Option<u32> {
        self.process(component).pid()
    }

    /// The last lines of a component's log.
    pub fn log_tail(&self, component: Component) -> String {
        self.process(component).log_tail()
    }

    /// Stops a component at once (SIGKILL), as a crash or a lost machine would.
    pub fn kill(&mut self, component: Component) {
        self.process_mut(component).kill();
    }

    /// Stops a component gracefully (SIGTERM, then SIGKILL after `grace`).
    pub fn terminate(&mut self, component: Component, grace: Duration) {
        self.process_mut(component).terminate(grace);
    }

    /// Starts a stopped component again, on the same ports and data, and waits until it is
    /// ready. Clients made earlier keep working once it is.
    pub async fn start_component(&mut self, component: Component) -> Result<(), Error> {
        let cluster = self.name.clone();
        let proc = self.process_mut(component);
        proc.start().map_err(|source| Error::Spawn {
            cluster: cluster.clone(),
            component: proc.name(),
            source,
        })?;
        match component {
            Component::Etcd => {
                let port = self.etcd_port;
                self.wait_ready(
                    component,
                    "its client port to accept connections",
                    || async move {
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                            .await
                            .ok()
                            .map(drop)
                    },
                )
                .await
            }
            Component::ApiServer => {
                let client = self.client.clone();
                let port = self.api_port;
                self.wait_ready(component, "/readyz to answer ok", || {
                    let client = client.clone();
                    async move {
                        // A closed port first: the client would log every refused connection.
                        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                            .await
                            .ok()?;
                        let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                        (client.request_text(req).await.ok()? == "ok").then_some(())
                    }
                })
                .await
            }
            Component::ControllerManager => {
                // The serviceaccount controller gives every namespace a `default` account: once
                // it exists in `default`, the controllers run.
                let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "default");
                self.wait_ready(component, "the default ServiceAccount to appear", || {
                    let sas = sas.clone();
                    async move { sas.get_opt("default").await.ok().flatten().map(drop) }
                })
                .await
            }
        }
    }

    /// Leaves the cluster running when this handle is dropped, for `e2e up`; `e2e down` (or
    /// [`state::remove`]) stops it. Only for clusters started with a fixed directory.
    pub fn detach(mut self) -> Result<PathBuf, Error> {
        let cluster = self.name.clone();
        self.dir
            .detach()
            .map_err(|source| Error::Io { cluster, source })?;
        self.etcd.detach();
        self.apiserver.detach();
        self.controller_manager.detach();
        Ok(self.dir.path().to_owned())
    }

    async fn wait_ready<F, Fut>(
        &mut self,
        component: Component,
        what: &'static str,
        probe: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<()>>,
    {
        let cluster = self.name.clone();
        self.process_mut(component)
            .wait_ready(&cluster, what, READY_TIMEOUT, probe)
            .await
    }

    /// The Node that test Pods run on. The EndpointSlice controller skips Pods whose Node does
    /// not exist, and no kubelet registers one here.
    async fn create_node(&self) -> Result<(), Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": self.node_name(),
                "labels": { "kubernetes.io/hostname": self.node_name() },
            },
        }))
        .map_err(|e| Error::Io {
            cluster: self.name.clone(),
            source: e.into(),
        })?;
        nodes.create(&PostParams::default(), &node).await?;
        Ok(())
    }

    /// The name of the cluster's one Node.
    pub fn node_name(&self) -> String {
        format!("{}-node", self.name)
    }

    fn process(&self, component: Component) -> &Process {
        match component {
            Component::Etcd => &self.etcd,
            Component::ApiServer => &self.apiserver,
            Component::ControllerManager => &self.controller_manager,
        }
    }

    fn process_mut(&mut self, component: Component) -> &mut Process {
        match component {
            Component::Etcd => &mut self.etcd,
            Component::ApiServer => &mut self.apiserver,
            Component::ControllerManager => &mut self.controller_manager,
        }
    }

    /// The admin bearer token (static, in group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the admin token.
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("server", &self.server_url())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

fn args<I: IntoIterator<Item = String>>(args: I) -> Vec<OsString> {
    args.into_iter().map(OsString::from).collect()
}

/// Three distinct free loopback ports. Another process may take one before the component binds
/// it; start-up then fails with "address already in use" and is retried.
fn free_ports() -> std::io::Result<[u16; 3]> {
    // Held together so the three differ.
    let listeners = [(); 3].map(|()| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)));
    let mut ports = [0; 3];
    for (port, l) in ports.iter_mut().zip(listeners) {
        *port = l?.local_addr()?.port();
    }
    Ok(ports)
}

/// A distinct Service IP range for each cluster this process starts, so that mirrored and local
/// Services never share a ClusterIP by accident.
fn next_service_cidr() -> String {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) % 32;
    format!("10.{}.0.0/16", 96 + n)
}

/// 128 random bits from the kernel, hex-encoded: the admin's bearer token.
fn random_token() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn kubeconfig_yaml(name: &str, port: u16, ca_pem: &str, token: &str) -> String {
    kubeconfig_yaml_for(name, &format!("{name}-admin"), port, ca_pem, token)
}

fn kubeconfig_yaml_for(name: &str, user: &str, port: u16, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": name,
            "cluster": {
                "server": format!("https://127.0.0.1:{port}"),
                "certificate-authority-data": ca,
            },
        }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": name, "context": { "cluster": name, "user": user } }],
        "current-context": name,
    });
    serde_norway::to_string(&doc).expect("a JSON value always serialises to YAML")
}

async fn client_from_yaml(yaml: &str) -> Result<Client, Error> {
    let kubeconfig = Kubeconfig::from_yaml(yaml)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}
