//! Inbound server policy: `InboundServerPolicies.WatchPort` per inbound port, and the
//! connection-level authorization Linkerd's proxy does with it.
//!
//! A port's policy starts as the locally configured default
//! (`LINKERD2_PROXY_INBOUND_DEFAULT_POLICY`), so that connections are decided before the policy
//! service answers, and then follows the server; a failed stream is retried with backoff,
//! keeping the last answer. Ports are few, so their streams are kept for the process's life.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use ipnet::IpNet;
use linkerd2_proxy_api::{
    inbound::{
        self as api, PortSpec, authn::permit_mesh_tls,
        inbound_server_policies_client::InboundServerPoliciesClient, proxy_protocol,
    },
    meta::metadata,
};
use proxy_identity::Id;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;

use crate::backoff::Backoff;

/// Linkerd's protocol-detection timeout (`LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT`, the policy
/// controller's `DETECT_TIMEOUT`): used by the default policy and when a server's `Detect`
/// gives none.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Linkerd's default cluster networks (the policy controller's `--cluster-networks`), used by
/// the `cluster-*` default policies unless others are given.
pub const DEFAULT_CLUSTER_NETWORKS: [&str; 4] = [
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
];

/// How an inbound port's traffic is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// Detect HTTP within `timeout`, else opaque.
    Detect {
        timeout: Duration,
    },
    Http1,
    Http2,
    Grpc,
    Opaque,
    Tls,
}

/// Who may connect, by client address and authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    pub networks: Vec<Network>,
    pub authentication: Authentication,
    /// The authorization's name (for metrics and logs).
    pub name: String,
}

/// A client network, less its exceptions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub net: IpNet,
    pub except: Vec<IpNet>,
}

impl Network {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

/// What a client must prove.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// Anyone, with TLS or without.
    Unauthenticated,
    /// Any TLS client, with or without a certificate.
    TlsUnauthenticated,
    /// A meshed client: its identity is one of `identities`, or ends with one of `suffixes`
    /// (each a list of DNS labels; an empty one allows any identity from the trust anchors).
    MeshTls {
        identities: BTreeSet<String>,
        suffixes: Vec<Vec<String>>,
    },
}

/// An inbound port's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPolicy {
    pub protocol: Protocol,
    pub authorizations: Vec<Authorization>,
    /// The server's name (its `name` label).
    pub name: String,
    from_server: bool,
}

impl ServerPolicy {
    /// Whether this came from the policy service (rather than the local default).
    pub fn from_server(&self) -> bool {
        self.from_server
    }
}

/// The default inbound policy (`LINKERD2_PROXY_INBOUND_DEFAULT_POLICY`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterUnauthenticated {
        networks: Vec<IpNet>,
    },
    ClusterAuthenticated {
        networks: Vec<IpNet>,
    },
    Deny,
    /// Everything is allowed (what would be denied is only reported).
    Audit,
}

/// A default-policy name that is not one of Linkerd's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a default inbound policy; use one of {names}", names = DefaultPolicy::NAMES.join(", "))]
pub struct UnknownPolicy(pub String);

impl DefaultPolicy {
    /// Linkerd's names, in its order.
    pub const NAMES: [&'static str; 6] = [
        "all-unauthenticated",
        "all-authenticated",
        "cluster-unauthenticated",
        "cluster-authenticated",
        "deny",
        "audit",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::ClusterUnauthenticated { .. } => "cluster-unauthenticated",
            Self::ClusterAuthenticated { .. } => "cluster-authenticated",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }

    /// The same policy with `networks` as the cluster networks
    /// (`LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS`); other policies are unchanged.
    pub fn with_cluster_networks(self, networks: Vec<IpNet>) -> Self {
        match self {
            Self::ClusterUnauthenticated { .. } => Self::ClusterUnauthenticated { networks },
            Self::ClusterAuthenticated { .. } => Self::ClusterAuthenticated { networks },
            other => other,
        }
    }

    /// The policy a port has until the server answers: what the policy controller would send
    /// for this default, read as detected HTTP.
    pub fn server_policy(&self) -> ServerPolicy {
        let all = [
            IpNet::V4(ipnet::Ipv4Net::default()),
            IpNet::V6(ipnet::Ipv6Net::default()),
        ];
        let any_identity = Authentication::MeshTls {
            identities: BTreeSet::new(),
            suffixes: vec![Vec::new()],
        };
        let authz = |networks: &[IpNet], authentication| Authorization {
            networks: networks
                .iter()
                .map(|n| Network {
                    net: *n,
                    except: Vec::new(),
                })
                .collect(),
            authentication,
            name: self.name().to_owned(),
        };
        let authorizations = match self {
            Self::AllUnauthenticated | Self::Audit => {
                vec![authz(&all, Authentication::Unauthenticated)]
            }
            Self::AllAuthenticated => vec![authz(&all, any_identity)],
            Self::ClusterUnauthenticated { networks } => {
                vec![authz(networks, Authentication::Unauthenticated)]
            }
            Self::ClusterAuthenticated { networks } => vec![authz(networks, any_identity)],
            Self::Deny => Vec::new(),
        };
        ServerPolicy {
            protocol: Protocol::Detect {
                timeout: DETECT_TIMEOUT,
            },
            authorizations,
            name: self.name().to_owned(),
            from_server: false,
        }
    }
}

impl std::str::FromStr for DefaultPolicy {
    type Err = UnknownPolicy;

    /// A `cluster-*` policy gets Linkerd's default cluster networks; see
    /// [`DefaultPolicy::with_cluster_networks`].
    fn from_str(s: &str) -> Result<Self, UnknownPolicy> {
        let cluster = || {
            DEFAULT_CLUSTER_NETWORKS
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect()
        };
        Ok(match s {
            "all-unauthenticated" => Self::AllUnauthenticated,
            "all-authenticated" => Self::AllAuthenticated,
            "cluster-unauthenticated" => Self::ClusterUnauthenticated {
                networks: cluster(),
            },
            "cluster-authenticated" => Self::ClusterAuthenticated {
                networks: cluster(),
            },
            "deny" => Self::Deny,
            "audit" => Self::Audit,
            other => return Err(UnknownPolicy(other.to_owned())),
        })
    }
}

/// A connecting client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client<'a> {
    pub ip: IpAddr,
    pub tls: ClientTls<'a>,
}

/// The client's TLS, as the inbound side terminated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTls<'a> {
    /// Plaintext (or TLS not terminated here).
    None,
    /// TLS, with the identity of the client's certificate if it presented one.
    Tls { identity: Option<&'a Id> },
}

/// The authorization that allowed a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorized {
    pub name: String,
}

/// No authorization of the server allowed the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unauthorized connection on server {server}")]
pub struct Denied {
    pub server: String,
}

/// Decides whether `client` may connect to a port with `policy`: loopback clients always may
/// (Linkerd's rule: the pod's own processes); otherwise the first authorization whose networks
/// contain the client and whose authentication it meets.
pub fn authorize(policy: &ServerPolicy, client: &Client<'_>) -> Result<Authorized, Denied> {
    // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
    let ip = client.ip.to_canonical();
    if ip.is_loopback() {
        return Ok(Authorized {
            name: "localhost".to_owned(),
        });
    }
    policy
        .authorizations
        .iter()
        .find(|a| a.networks.iter().any(|n| n.contains(ip)) && a.authentication.permits(client.tls))
        .map(|a| Authorized {
            name: a.name.clone(),
        })
        .ok_or_else(|| Denied {
            server: policy.name.clone(),
        })
}

impl Authentication {
    fn permits(&self, tls: ClientTls<'_>) -> bool {
        match (self, tls) {
            (Self::Unauthenticated, _) => true,
            (Self::TlsUnauthenticated, ClientTls::Tls { .. }) => true,
            (
                Self::MeshTls {
                    identities,
                    suffixes,
                },
                ClientTls::Tls { identity: Some(id) },
            ) => {
                let id = id.as_str();
                identities.contains(id) || suffixes.iter().any(|s| suffix_matches(s, id))
            }
            _ => false,
        }
    }
}

/// Linkerd's identity suffix: no parts match any identity; otherwise the identity must end
/// with `.` followed by the parts joined with dots.
fn suffix_matches(parts: &[String], id: &str) -> bool {
    if parts.is_empty() {
        return true;
    }
    let suffix = parts.join(".");
    id.strip_suffix(suffix.as_str())
        .is_some_and(|rest| rest.ends_with('.'))
}

/// Why a server from the policy service was not used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidServer {
    #[error("a server without a protocol")]
    NoProtocol,
    #[error("a detect timeout that is negative")]
    DetectTimeout,
    #[error("authorization {0:?} has a network without a net")]
    NoNet(String),
    #[error("authorization {0:?} has an invalid network")]
    Net(String),
    #[error("authorization {0:?} has no authentication")]
    NoAuthentication(String),
}

/// Reads a server from the policy service.
pub fn server_policy(pb: api::Server) -> Result<ServerPolicy, InvalidServer> {
    let protocol = match pb
        .protocol
        .and_then(|p| p.kind)
        .ok_or(InvalidServer::NoProtocol)?
    {
        proxy_protocol::Kind::Detect(d) => Protocol::Detect {
            timeout: match d.timeout {
                Some(t) => Duration::try_from(t).map_err(|_| InvalidServer::DetectTimeout)?,
                None => DETECT_TIMEOUT,
            },
        },
        proxy_protocol::Kind::Http1(_) => Protocol::Http1,
        proxy_protocol::Kind::Http2(_) => Protocol::Http2,
        proxy_protocol::Kind::Grpc(_) => Protocol::Grpc,
        proxy_protocol::Kind::Opaque(_) => Protocol::Opaque,
        proxy_protocol::Kind::Tls(_) => Protocol::Tls,
    };
    let authorizations = pb
        .authorizations
        .into_iter()
        .map(authorization)
        .collect::<Result<_, _>>()?;
    Ok(ServerPolicy {
        protocol,
        authorizations,
        name: pb.labels.get("name").cloned().unwrap_or_default(),
        from_server: true,
    })
}

fn authorization(pb: api::Authz) -> Result<Authorization, InvalidServer> {
    // The metadata names it; older servers only label it.
    let name = match pb.metadata.and_then(|m| m.kind) {
        Some(metadata::Kind::Default(name)) => name,
        Some(metadata::Kind::Resource(r)) => r.name,
        None => pb.labels.get("name").cloned().unwrap_or_default(),
    };
    let net = |n: linkerd2_proxy_api::net::IpNetwork| {
        IpNet::try_from(n).map_err(|_| InvalidServer::Net(name.clone()))
    };
    let networks = pb
        .networks
        .into_iter()
        .map(|n| {
            Ok(Network {
                net: net(n.net.ok_or_else(|| InvalidServer::NoNet(name.clone()))?)?,
                except: n.except.into_iter().map(net).collect::<Result<_, _>>()?,
            })
        })
        .collect::<Result<_, InvalidServer>>()?;
    let authentication = match pb
        .authentication
        .and_then(|a| a.permit)
        .ok_or_else(|| InvalidServer::NoAuthentication(name.clone()))?
    {
        api::authn::Permit::Unauthenticated(_) => Authentication::Unauthenticated,
        api::authn::Permit::MeshTls(m) => match m
            .clients
            .ok_or_else(|| InvalidServer::NoAuthentication(name.clone()))?
        {
            permit_mesh_tls::Clients::Unauthenticated(_) => Authentication::TlsUnauthenticated,
            permit_mesh_tls::Clients::Identities(ids) => Authentication::MeshTls {
                identities: ids.identities.into_iter().map(|i| i.name).collect(),
                suffixes: ids.suffixes.into_iter().map(|s| s.parts).collect(),
            },
        },
    };
    Ok(Authorization {
        networks,
        authentication,
        name,
    })
}

/// The policies of this workload's inbound ports. Cheap to clone; clones share streams.
#[derive(Clone, Debug)]
pub struct InboundPolicies {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: InboundServerPoliciesClient<Channel>,
    workload: String,
    default: Arc<ServerPolicy>,
    ports: Mutex<HashMap<u16, watch::Receiver<Arc<ServerPolicy>>>>,
    /// Ends every port's stream once the last clone is dropped.
    stop: CancellationToken,
    _stop: DropGuard,
}

impl InboundPolicies {
    /// `workload` is sent in every `PortSpec` (`LINKERD2_PROXY_POLICY_WORKLOAD`, Linkerd's JSON
    /// `{"ns":…,"pod":…}`); `default` is what a port has until the server answers.
    pub fn new(channel: Channel, workload: String, default: DefaultPolicy) -> Self {
        let stop = CancellationToken::new();
        Self {
            inner: Arc::new(Inner {
                client: InboundServerPoliciesClient::new(channel),
                workload,
                default: Arc::new(default.server_policy()),
                ports: Mutex::new(HashMap::new()),
                stop: stop.clone(),
                _stop: stop.drop_guard(),
            }),
        }
    }

    /// The policy of `port`, as it changes: first the default (not [`ServerPolicy::from_server`]),
    /// then each answer of the server. The first call for a port starts its stream. Must be
    /// called within a Tokio runtime.
    pub fn port(&self, port: u16) -> watch::Receiver<Arc<ServerPolicy>> {
        let mut ports = self
            .inner
            .ports
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        ports
            .entry(port)
            .or_insert_with(|| {
                let (tx, rx) = watch::channel(self.inner.default.clone());
                let spec = PortSpec {
                    workload: self.inner.workload.clone(),
                    port: port.into(),
                };
                let client = self.inner.client.clone();
                let stop = self.inner.stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = follow(client, spec, tx) => {}
                    }
                });
                rx
            })
            .clone()
    }

    /// Returns once the server's first answer for `port` has arrived (for `/ready`).
    pub async fn ready(&self, port: u16) {
        let mut rx = self.port(port);
        // The feeding task only ends when `self` is dropped, which cannot happen here.
        let _ = rx.wait_for(|p| p.from_server).await;
    }
}

/// Feeds `tx` from `WatchPort(spec)` for ever, retrying with backoff and keeping the last
/// policy; a server that cannot be read is skipped (and logged).
async fn follow(
    mut client: InboundServerPoliciesClient<Channel>,
    spec: PortSpec,
    tx: watch::Sender<Arc<ServerPolicy>>,
) {
    let port = spec.port;
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let mut stream = client.watch_port(spec.clone()).await?.into_inner();
            while let Some(server) = stream.message().await? {
                backoff.reset();
                match server_policy(server) {
                    Ok(p) => {
                        tx.send_if_modified(|cur| {
                            let changed = **cur != p;
                            if changed {
                                *cur = Arc::new(p);
                            }
                            changed
                        });
                    }
                    Err(error) => tracing::warn!(port, %error, "skipped an invalid server policy"),
                }
            }
            Ok::<(), tonic::Status>(())
        };
        match attempt.await {
            Ok(()) => tracing::debug!(port, "policy stream ended; reconnecting"),
            Err(s) => {
                tracing::info!(port, code = ?s.code(), message = s.message(), "policy stream failed; retrying")
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests;
