//! Cluster DNS for a test cluster: upstream CoreDNS with its `kubernetes` plugin against the
//! cluster's API server, so that a test Pod resolves `<svc>.<ns>.svc.cluster.local` (and short
//! names through its search path) to Service ClusterIPs as a user's Pod does.
//!
//! # API
//!
//! - [`CoreDns::start`]`(&cluster, addr)` serves DNS on port 53 of `addr` (UDP and TCP; needs
//!   root) and returns once CoreDNS has synced with the API server and answers queries. Give it
//!   an address the Pods reach, e.g. a test host's [`Host::host_address`], and point each Pod at
//!   it with [`Host::set_resolv_conf`]`(addr, namespace)`, which writes the search path a kubelet
//!   would. [`CoreDns::start_on`] takes any socket address (another port, no root).
//! - One CoreDNS per cluster: a second `start` for the same cluster fails while the first runs.
//! - Dropping the [`CoreDns`] stops the process. Its files live in the cluster's directory
//!   ([`Cluster::dir`]): `Corefile`, `coredns.kubeconfig` and the log `coredns.log`
//!   ([`CoreDns::log_path`], [`CoreDns::log_tail`]); a run that dies without dropping it has the
//!   process killed by the next cluster's sweep, as the control plane's are.
//! - [`CoreDns::query`] sends one query itself (UDP or TCP) and returns the whole answer, for
//!   checks of what the resolver library in a Pod does not show, such as the response code.
//!
//! # What it answers
//!
//! - `cluster.local` and the reverse zones (`in-addr.arpa`, `ip6.arpa`) from the `kubernetes`
//!   plugin: Services (ClusterIP, headless from their EndpointSlices, ExternalName), their SRV
//!   records, and PTR records of ClusterIPs. Pod records (`pods disabled`, the plugin's default)
//!   are not served.
//! - Every other name: NXDOMAIN. Nothing is forwarded; the binary has no `forward` plugin at all
//!   (see `e2e/coredns/main.go`), so a test never sends a query off this machine.
//! - No `cache`: answers come from the plugin's watch of the API server, and a cache would only
//!   delay a Service created during a test.
//!
//! CoreDNS reads the API as ServiceAccount `kube-system/coredns`, bound to ClusterRole
//! `system:coredns`: list and watch of Services, EndpointSlices and Namespaces, the least of
//! upstream's role that these answers need (no Pods, no Endpoints). Its token is a
//! `kubernetes.io/service-account-token` Secret filled by the cluster's token controller, so it
//! does not expire while a long demo runs.
//!
//! The binary is built from `e2e/coredns/` by its `build.sh` (pinned, cached by version, like the
//! control plane); `$MESHLINK_COREDNS_BIN_DIR` names a directory holding `coredns` to use instead.
//!
//! ```no_run
//! # async fn f(cluster: &e2e::Cluster) -> Result<(), e2e::Error> {
//! use e2e::{coredns::CoreDns, netns::Host};
//! let pod = Host::create()?;
//! let dns = CoreDns::start(cluster, pod.host_address()).await?;
//! pod.set_resolv_conf(pod.host_address(), "shop")?;
//! // `ip netns exec <pod.name()> getent ahostsv4 web` now resolves Service shop/web.
//! # Ok(()) }
//! ```
//!
//! [`Host::host_address`]: crate::netns::Host::host_address
//! [`Host::set_resolv_conf`]: crate::netns::Host::set_resolv_conf

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use crate::{
    Cluster, Error, binaries,
    meshlink::{free_port, http_get},
    process::Process,
};

/// The cluster domain, as in a kubeadm cluster (and in [`Host::set_resolv_conf`]'s search path).
///
/// [`Host::set_resolv_conf`]: crate::netns::Host::set_resolv_conf
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The namespace and name of CoreDNS's ServiceAccount, as kubeadm installs it.
pub const SERVICE_ACCOUNT: (&str, &str) = ("kube-system", "coredns");
/// The environment variable naming a directory that holds a `coredns` binary to use as it is.
pub const BIN_DIR_ENV: &str = "MESHLINK_COREDNS_BIN_DIR";

/// How long CoreDNS may take to sync with the API server and answer. Its `kubernetes` plugin
/// lists three resources; seconds on a loaded two-core machine, but the control plane's own
/// start-up allowance ([`crate::Cluster`]) shows how slow a cold machine can be.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one query of [`CoreDns::query`] may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times start-up is retried when another process took the `ready` port first.
const PORT_ATTEMPTS: usize = 3;

/// The ServiceAccount, its least-privilege role (upstream's `system:coredns` without Pods and
/// Endpoints, which `pods disabled` and EndpointSlices make unnecessary) and a token Secret for
/// the token controller to fill.
const RBAC: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: { name: coredns, namespace: kube-system }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: "system:coredns" }
rules:
  - apiGroups: [""]
    resources: [services, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: "system:coredns" }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns" }
subjects: [{ kind: ServiceAccount, name: coredns, namespace: kube-system }]
---
apiVersion: v1
kind: Secret
metadata:
  name: coredns-token
  namespace: kube-system
  annotations: { kubernetes.io/service-account.name: coredns }
type: kubernetes.io/service-account-token
"#;

/// How [`CoreDns::query`] reaches CoreDNS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A running CoreDNS serving one test cluster's names (see the module's documentation); stopped
/// when dropped.
#[derive(Debug)]
pub struct CoreDns {
    cluster: String,
    addr: SocketAddr,
    process: Process,
}

impl CoreDns {
    /// Serves DNS for `cluster` on port 53 of `addr`, UDP and TCP (root only); returns once it
    /// answers from a synced view of the API.
    pub async fn start(cluster: &Cluster, addr: Ipv4Addr) -> Result<Self, Error> {
        Self::start_on(cluster, SocketAddr::new(IpAddr::V4(addr), 53)).await
    }

    /// Like [`CoreDns::start`], on any address and port.
    pub async fn start_on(cluster: &Cluster, addr: SocketAddr) -> Result<Self, Error> {
        let binary = binary()?;
        let name = cluster.name().to_owned();
        let io = |source| Error::Io {
            cluster: name.clone(),
            source,
        };
        if cluster.dir().join("coredns.pid").exists() {
            return Err(Error::Invalid(format!(
                "cluster {name} already runs a CoreDNS (one per cluster)"
            )));
        }
        let kubeconfig = cluster.dir().join("coredns.kubeconfig");
        std::fs::write(&kubeconfig, service_account_kubeconfig(cluster).await?).map_err(io)?;
        let corefile = cluster.dir().join("Corefile");
        let mut attempt = 1;
        loop {
            let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
            std::fs::write(&corefile, corefile_text(addr, ready, &kubeconfig)).map_err(io)?;
            let mut process = Process::new(
                "coredns",
                binary.clone(),
                vec!["-conf".into(), corefile.clone().into()],
                cluster.dir(),
            );
            process.start().map_err(|source| Error::Spawn {
                cluster: name.clone(),
                component: "coredns",
                source,
            })?;
            let mut this = Self {
                cluster: name.clone(),
                addr,
                process,
            };
            match this.wait_ready(ready).await {
                Ok(()) => return Ok(this),
                Err(e) if e.is_port_clash() && attempt < PORT_ATTEMPTS => {
                    tracing::warn!(cluster = %name, attempt, "port taken during start-up, retrying");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until `/ready` of the `ready` plugin answers 200 (the `kubernetes` plugin has
    /// synced) and a query for the cluster zone's SOA is answered on the DNS address (which the
    /// listeners may bind a moment after the `ready` server).
    async fn wait_ready(&mut self, ready: SocketAddr) -> Result<(), Error> {
        let (cluster, addr) = (self.cluster.clone(), self.addr);
        let zone = format!("{CLUSTER_DOMAIN}.");
        let zone = &zone;
        let cluster_name = &cluster;
        self.process
            .wait_ready(
                &cluster,
                "/ready to answer 200 and the cluster zone's SOA to be served",
                READY_TIMEOUT,
                || async move {
                    let up = http_get(ready, "/ready").await.ok()?.0 == 200;
                    let soa = query_at(cluster_name, addr, zone, RecordType::SOA, Transport::Udp)
                        .await
                        .ok()?;
                    (up && !soa.answers.is_empty()).then_some(())
                },
            )
            .await
    }

    /// Where it serves DNS (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Its log: start-up, errors and one line per query.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Sends one recursion-desired query for `name` (fully qualified, or taken as such) and
    /// returns the answer, whatever its response code.
    pub async fn query(
        &self,
        name: &str,
        record_type: RecordType,
        transport: Transport,
    ) -> Result<Message, Error> {
        query_at(&self.cluster, self.addr, name, record_type, transport).await
    }
}

/// One query to the CoreDNS of `cluster` at `addr`; its whole answer.
async fn query_at(
    cluster: &str,
    addr: SocketAddr,
    name: &str,
    record_type: RecordType,
    transport: Transport,
) -> Result<Message, Error> {
    let mut fqdn =
        Name::from_ascii(name).map_err(|e| Error::Invalid(format!("DNS name {name:?}: {e}")))?;
    fqdn.set_fqdn(true);
    let mut request = Message::query();
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(fqdn, record_type));
    let bytes = request
        .to_vec()
        .map_err(|e| Error::Invalid(format!("encoding a query for {name}: {e}")))?;
    let exchange = async {
        match transport {
            Transport::Udp => udp_exchange(addr, &bytes).await,
            Transport::Tcp => tcp_exchange(addr, &bytes).await,
        }
    };
    let io = |source| Error::Io {
        cluster: cluster.to_owned(),
        source,
    };
    let reply = tokio::time::timeout(QUERY_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("CoreDNS at {addr} to answer {name} {record_type}"),
            secs: QUERY_TIMEOUT.as_secs(),
        })?
        .map_err(io)?;
    let reply = Message::from_vec(&reply)
        .map_err(|e| Error::Invalid(format!("CoreDNS's answer for {name}: {e}")))?;
    if reply.metadata.id != request.metadata.id {
        return Err(Error::Invalid(format!(
            "CoreDNS answered query {} with id {}",
            request.metadata.id, reply.metadata.id
        )));
    }
    Ok(reply)
}

/// The `coredns` binary: `$MESHLINK_COREDNS_BIN_DIR/coredns`, or what `e2e/coredns/build.sh`
/// built (building it first if this machine has none yet). Found once per process.
fn binary() -> Result<PathBuf, Error> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let dir = match std::env::var_os(BIN_DIR_ENV) {
                Some(dir) => PathBuf::from(dir),
                None => binaries::build("coredns/build.sh").map_err(|e| e.to_string())?,
            };
            let path = dir.join("coredns");
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} is missing: run `make kube-binaries` (or e2e/coredns/build.sh), or point \
                     {BIN_DIR_ENV} at a directory holding coredns",
                    path.display()
                ))
            }
        })
        .clone()
        .map_err(Error::Binaries)
}

/// Applies [`RBAC`] and returns a kubeconfig that authenticates as CoreDNS's ServiceAccount with
/// the token the token controller put in its Secret.
async fn service_account_kubeconfig(cluster: &Cluster) -> Result<String, Error> {
    let client = cluster.client();
    let (namespace, account) = SERVICE_ACCOUNT;
    // The API server makes kube-system itself, but not necessarily before /readyz says ok.
    crate::create_namespace(&client, namespace).await?;
    crate::apply_yaml(&client, RBAC).await?;
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let token = crate::wait_for(
        "the token controller to fill Secret kube-system/coredns-token",
        READY_TIMEOUT,
        || async {
            let secret = secrets.get_opt("coredns-token").await.ok()??;
            let token = secret.data?.remove("token")?;
            String::from_utf8(token.0).ok()
        },
    )
    .await?;
    Ok(cluster.kubeconfig_for_token(account, &token))
}

/// The Corefile: the cluster zone and the reverse zones from the API, NXDOMAIN for the rest, all
/// on `addr` only; the `ready` plugin on `ready` (loopback).
fn corefile_text(addr: SocketAddr, ready: SocketAddr, kubeconfig: &Path) -> String {
    let (ip, port) = (addr.ip(), addr.port());
    let kubeconfig = kubeconfig.display();
    format!(
        "# One test cluster's DNS; written by meshlink's e2e/src/coredns.rs.
{CLUSTER_DOMAIN}:{port} in-addr.arpa:{port} ip6.arpa:{port} {{
    bind {ip}
    errors
    log
    ready {ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods disabled
    }}
}}
# Everything else: no such name. Never forwarded anywhere.
.:{port} {{
    bind {ip}
    errors
    log
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"
    )
}

async fn udp_exchange(addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    socket.send(query).await?;
    // CoreDNS answers plain (no EDNS) queries within 512 bytes.
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

/// One query over TCP: each message is preceded by its length (RFC 1035, section 4.2.2).
async fn tcp_exchange(addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(query).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}
