//! meshlink's own programs as processes of a test, and the objects that link two test clusters.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, Error, process::Process};

/// A program of this workspace, built by cargo next to the test executables.
pub fn workspace_binary(name: &str) -> Result<PathBuf, Error> {
    // Test executables live in target/<profile>/deps, binaries (the `e2e` command too) in
    // target/<profile>.
    let exe = std::env::current_exe().map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = exe
        .parent()
        .ok_or_else(|| Error::Invalid(format!("no directory above {}", exe.display())))?;
    let candidates = [Some(dir), dir.parent()];
    let found = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if let Some(path) = found {
        Ok(path)
    } else {
        let path = dir.join(name);
        Err(Error::Binaries(format!(
            "{} is missing: build it with `cargo build --workspace --bins` (`make test` does)",
            path.display()
        )))
    }
}

/// `name` as it ships: built with the `dist` profile (whole-program optimised; `make
/// bench-proxy` and `make bench-gateway` build it) beside the running build's target directory.
/// The running build's own when there is none, said so on stderr: a benchmark then measures a
/// program that is larger than the one users run.
pub fn shipped_binary(name: &str) -> Result<PathBuf, Error> {
    let built = workspace_binary(name)?;
    let shipped = built
        .parent()
        .and_then(std::path::Path::parent)
        .map(|target| target.join("dist").join(name))
        .filter(|p| p.is_file());
    if let Some(path) = shipped {
        eprintln!("measuring {} (the dist profile)", path.display());
        Ok(path)
    } else {
        eprintln!(
            "note: measuring {}; build {name} as it ships with `cargo build --profile dist --bin \
             {name}` (the Makefile's bench targets do)",
            built.display()
        );
        Ok(built)
    }
}

/// A free loopback port (another process may take it before it is used; tests that race for
/// ports retry).
pub fn free_port() -> Result<u16, Error> {
    let l =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(l.local_addr()
        .map_err(|e| Error::Invalid(e.to_string()))?
        .port())
}

/// A meshlink program running as a child process with its output in a log file; stopped when
/// dropped.
#[derive(Debug)]
pub struct Program {
    process: Process,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Program {
    /// Starts `binary` with `args` and `env`, its admin server on a free port passed as
    /// `--admin-addr`, and waits until `/ready` answers 200.
    pub async fn start(
        binary: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self, Error> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        Self::start_with_admin(binary, args, env, admin).await
    }

    /// Like [`Program::start`], with the admin server bound to `admin` (polled on loopback when
    /// that is a wildcard address).
    pub async fn start_with_admin(
        binary: &str,
        args: &[String],
        env: &[(&str, String)],
        bind: SocketAddr,
    ) -> Result<Self, Error> {
        Self::start_until(binary, workspace_binary(binary)?, args, env, bind, "/ready").await
    }

    /// Like [`Program::start_with_admin`], running the executable at `path` (another build of
    /// `binary`, such as [`shipped_binary`]'s).
    pub async fn start_path_with_admin(
        binary: &str,
        path: PathBuf,
        args: &[String],
        env: &[(&str, String)],
        bind: SocketAddr,
    ) -> Result<Self, Error> {
        Self::start_until(binary, path, args, env, bind, "/ready").await
    }

    /// Like [`Program::start`], returning once `/live` answers: for a benchmark that measures
    /// how long the program takes to become ready (synced) itself.
    pub async fn start_live(
        binary: &str,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self, Error> {
        let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        Self::start_until(binary, workspace_binary(binary)?, args, env, admin, "/live").await
    }

    async fn start_until(
        binary: &str,
        path: PathBuf,
        args: &[String],
        env: &[(&str, String)],
        bind: SocketAddr,
        until: &'static str,
    ) -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let admin = if bind.ip().is_unspecified() {
            SocketAddr::from((Ipv4Addr::LOCALHOST, bind.port()))
        } else {
            bind
        };
        let mut all: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        all.push(format!("--admin-addr={bind}").into());
        let mut process = Process::new(binary_name(binary), path, all, dir.path());
        process.set_env(
            env.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        );
        process.start().map_err(|source| Error::Spawn {
            cluster: String::new(),
            component: binary_name(binary),
            source,
        })?;
        let mut this = Self {
            process,
            admin,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if this.get(until).await.is_ok_and(|(code, _)| code == 200) {
                return Ok(this);
            }
            if let Some(status) = this.process.exited() {
                return Err(Error::Exited {
                    cluster: String::new(),
                    component: this.process.name(),
                    status: status.to_string(),
                    log: this.process.log_path().to_owned(),
                    tail: this.process.log_tail(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::NotReady {
                    cluster: String::new(),
                    component: this.process.name(),
                    what: if until == "/ready" {
                        "/ready to answer 200"
                    } else {
                        "/live to answer 200"
                    },
                    secs: 30,
                    log: this.process.log_path().to_owned(),
                    tail: this.process.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The program's pid.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// A GET on the admin server: status code and body.
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// The sum of every sample of metric `name` (all label sets) whose labels contain `filter`.
    pub async fn metric(&self, name: &str, filter: &str) -> Result<f64, Error> {
        let (_, body) = self
            .get("/metrics")
            .await
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(body
            .lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0) // an empty sum is -0.0
    }

    /// Stops the program at once, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// One plain HTTP/1.1 GET with `connection: close`: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

fn binary_name(binary: &str) -> &'static str {
    match binary {
        "meshlink-mirror" => "meshlink-mirror",
        "meshlink-gateway" => "meshlink-gateway",
        "meshlink-identity" => "meshlink-identity",
        "meshlink-destination" => "meshlink-destination",
        _ => "meshlink-program",
    }
}

/// Name of the ServiceAccount in a target cluster whose token a Link uses.
pub const REMOTE_ACCESS_ACCOUNT: &str = link_crd::keys::DEFAULT_REMOTE_ACCESS_SERVICE_ACCOUNT;

/// Gives `target` a read-only remote-access ServiceAccount (Services, EndpointSlices) and
/// returns a kubeconfig that authenticates as it with a TokenRequest token.
pub async fn remote_access_kubeconfig(target: &Cluster, namespace: &str) -> Result<String, Error> {
    let client = target.client();
    crate::create_namespace(&client, namespace).await?;
    let ssa = PatchParams::apply("meshlink-e2e").force();
    let sa: ServiceAccount = from_json(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": { "name": REMOTE_ACCESS_ACCOUNT, "namespace": namespace },
    }))?;
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .patch(REMOTE_ACCESS_ACCOUNT, &ssa, &Patch::Apply(&sa))
        .await?;
    let role: ClusterRole = from_json(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": { "name": REMOTE_ACCESS_ACCOUNT },
        "rules": [
            { "apiGroups": [""], "resources": ["services", "pods"], "verbs": ["get", "list", "watch"] },
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"] },
        ],
    }))?;
    Api::<ClusterRole>::all(client.clone())
        .patch(REMOTE_ACCESS_ACCOUNT, &ssa, &Patch::Apply(&role))
        .await?;
    let binding: ClusterRoleBinding = from_json(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": { "name": REMOTE_ACCESS_ACCOUNT },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": REMOTE_ACCESS_ACCOUNT },
        "subjects": [{ "kind": "ServiceAccount", "name": REMOTE_ACCESS_ACCOUNT, "namespace": namespace }],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(REMOTE_ACCESS_ACCOUNT, &ssa, &Patch::Apply(&binding))
        .await?;
    let token = service_account_token(target, namespace, REMOTE_ACCESS_ACCOUNT).await?;
    Ok(target.kubeconfig_for_token(REMOTE_ACCESS_ACCOUNT, &token))
}

/// A TokenRequest token (one hour) for ServiceAccount `namespace/name` of `cluster`, for the API
/// server itself.
pub async fn service_account_token(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
) -> Result<String, Error> {
    service_account_token_for(cluster, namespace, name, crate::SERVICE_ACCOUNT_ISSUER).await
}

/// A TokenRequest token (one hour) for ServiceAccount `namespace/name` of `cluster`, issued for
/// `audience` (e.g. the identity service's).
pub async fn service_account_token_for(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    audience: &str,
) -> Result<String, Error> {
    let request: TokenRequest = from_json(serde_json::json!({
        "spec": { "audiences": [audience], "expirationSeconds": 3600 }
    }))?;
    Api::<ServiceAccount>::namespaced(cluster.client(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| Error::Invalid("TokenRequest returned no token".into()))
}

/// Writes the credentials Secret `cluster-credentials-<target>` holding `kubeconfig` into
/// `namespace` of `source`.
pub async fn put_credentials(
    source: &Cluster,
    namespace: &str,
    target: &str,
    kubeconfig: &str,
) -> Result<(), Error> {
    let name = format!("cluster-credentials-{target}");
    let secret: Secret = from_json(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": name, "namespace": namespace },
        "type": link_crd::keys::REMOTE_KUBECONFIG_SECRET_TYPE,
        "stringData": { link_crd::keys::KUBECONFIG_SECRET_KEY: kubeconfig },
    }))?;
    Api::<Secret>::namespaced(source.client(), namespace)
        .patch(
            &name,
            &PatchParams::apply("meshlink-e2e").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(())
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Invalid(e.to_string()))
}

/// Labels as a map, for tests.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The ready and not-ready addresses of an Endpoints object.
pub fn endpoint_ips(ep: &k8s_openapi::api::core::v1::Endpoints) -> (Vec<String>, Vec<String>) {
    let subsets = ep.subsets.iter().flatten();
    (
        subsets
            .clone()
            .flat_map(|s| s.addresses.iter().flatten().map(|a| a.ip.clone()))
            .collect(),
        subsets
            .flat_map(|s| s.not_ready_addresses.iter().flatten().map(|a| a.ip.clone()))
            .collect(),
    )
}

/// Creates the target's gateway Service `linkerd-multicluster/linkerd-gateway` as the gateway's
/// installation would (Linkerd's annotations, ports `mc-gateway` 4143 and `mc-probe` 4191) and
/// plays the load-balancer controller: its ingress address is `ip`.
pub async fn create_gateway_service(
    target: &Cluster,
    ip: &str,
    probe_period: &str,
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::Service;
    let namespace = link_crd::keys::DEFAULT_MULTICLUSTER_NAMESPACE;
    let name = link_crd::keys::DEFAULT_GATEWAY_NAME;
    let gateway: Service = from_json(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": {
                link_crd::keys::GATEWAY_IDENTITY_ANNOTATION: crate::mesh::gateway_id(target.name()),
                link_crd::keys::GATEWAY_PROBE_PATH_ANNOTATION: "/ready",
                link_crd::keys::GATEWAY_PROBE_PERIOD_ANNOTATION: probe_period,
            },
        },
        "spec": {
            "type": "LoadBalancer",
            "selector": { "app": name },
            "ports": [{ "name": "mc-gateway", "port": 4143 }, { "name": "mc-probe", "port": 4191 }],
        },
    }))?;
    let services: Api<Service> = Api::namespaced(target.client(), namespace);
    if services.get_opt(name).await?.is_none() {
        services.create(&PostParams::default(), &gateway).await?;
    } else {
        // The manifest's Service names the default trust domain's gateway; this cluster's is in
        // its own.
        let annotations =
            serde_json::json!({ "metadata": { "annotations": gateway.metadata.annotations } });
        services
            .patch(name, &PatchParams::default(), &Patch::Merge(&annotations))
            .await?;
    }
    let status = serde_json::json!({ "status": { "loadBalancer": { "ingress": [{ "ip": ip }] } } });
    services
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Waits until the token controller has filled the remote-access token Secret of
/// `manifests/mirror/remote-access.yaml`.
pub async fn wait_remote_access_token(target: &Cluster) -> Result<(), Error> {
    let secrets: Api<Secret> = Api::namespaced(
        target.client(),
        link_crd::keys::DEFAULT_MULTICLUSTER_NAMESPACE,
    );
    crate::wait_for(
        "the remote-access token",
        Duration::from_secs(60),
        || async {
            let s = secrets
                .get_opt(&format!("{REMOTE_ACCESS_ACCOUNT}-token"))
                .await
                .ok()??;
            s.data?.get("token").map(drop)
        },
    )
    .await
}

/// The status and reason of the Link-level condition `type_` of Link `namespace/name`.
pub async fn link_condition(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let link = Api::<link_crd::Link>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .ok()?;
    link.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (format!("{:?}", c.status), c.reason))
}

/// Object `ns/name` of kind `K`, if it exists (and the API answers).
pub async fn get<K>(client: &kube::Client, ns: &str, name: &str) -> Option<K>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    kube::Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// Starts the service-mirror controller with `args` against the cluster `kubeconfig` names.
pub async fn start_mirror(kubeconfig: &std::path::Path, args: &[String]) -> Result<Program, Error> {
    Program::start(
        "meshlink-mirror",
        args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
}

/// Applies Link `namespace/name` to the cluster of `client`: target cluster `name`, credentials
/// in `cluster-credentials-<name>`, gateway `gateway`:4143 with no probe path (so a gateway
/// address that is only data is never dialled), gateway mode for
/// `mirror.linkerd.io/exported=true`. The fields of `spec` replace or add to those.
pub async fn apply_link(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    gateway: &str,
    spec: serde_json::Value,
) -> Result<(), Error> {
    let mut link = serde_json::json!({
        "apiVersion": "multicluster.linkerd.io/v1alpha3", "kind": "Link",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "targetClusterName": name,
            "targetClusterDomain": "cluster.local",
            "clusterCredentialsSecret": format!("cluster-credentials-{name}"),
            "gatewayAddress": gateway,
            "gatewayPort": "4143",
            "probeSpec": {},
            "selector": { "matchLabels": { "mirror.linkerd.io/exported": "true" } },
        },
    });
    for (k, v) in spec.as_object().into_iter().flatten() {
        link["spec"][k] = v.clone();
    }
    crate::apply_yaml(client, &serde_norway::to_string(&link)?).await?;
    Ok(())
}

/// The `Mirrored` condition of the entry for Service `ns/name` in Link `link_namespace/link`'s
/// status: in `federatedServices` if `federated`, in `mirrorServices` otherwise.
pub async fn service_condition(
    client: &kube::Client,
    link_namespace: &str,
    link: &str,
    federated: bool,
    ns: &str,
    name: &str,
) -> Option<link_crd::LinkCondition> {
    let status = Api::<link_crd::Link>::namespaced(client.clone(), link_namespace)
        .get(link)
        .await
        .ok()?
        .status?;
    let list = if federated {
        status.federated_services
    } else {
        status.mirror_services
    };
    list.into_iter()
        .find(|e| e.remote_ref.namespace == ns && e.remote_ref.name == name)?
        .conditions
        .into_iter()
        .next()
}
