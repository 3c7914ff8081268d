//! The answers, as pure functions of the [`Index`]: a destination path to its endpoints (for
//! `Get`), to its profile (for `GetProfile`), and the difference between two answers (the
//! updates a stream sends). Each also says which [`Topic`]s the answer depends on.

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
};

use linkerd2_proxy_api::{
    destination::{
        AddrSet, AuthorityOverride, DestinationProfile, NoEndpoints, ProtocolHint, RetryBudget,
        TlsIdentity, Update, WeightedAddr, WeightedAddrSet, protocol_hint, tls_identity, update,
    },
    net::TcpAddress,
};

use crate::{
    index::{ClusterState, Index, RemoteSettings, Topic},
    model::{Discovery, Key, PodInfo, ServiceInfo, SliceInfo},
    opaque::PortSet,
};

/// Linkerd's weight for every endpoint (all equal; the proxy balances by load).
pub const DEFAULT_WEIGHT: u32 = 10_000;
/// The longest path looked up; longer ones are refused before any work.
pub const MAX_PATH_LEN: usize = 512;

/// The identity rules of this cluster.
#[derive(Clone, Debug)]
pub struct Settings {
    pub cluster_domain: String,
    pub trust_domain: String,
    pub control_plane_ns: String,
}

/// What a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `[<hostname>.]<svc>.<ns>.svc.<cluster-domain>:<port>`
    Name {
        service: Key,
        hostname: Option<String>,
        port: u16,
    },
    /// `<ip>:<port>`
    Addr(SocketAddr),
}

/// Why a path cannot be resolved (the proxy's "not resolvable": gRPC `InvalidArgument`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTarget {
    #[error("the path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error("{0:?} is not <name>:<port> or <ip>:<port>")]
    Malformed(String),
    #[error("{0:?} is not a Service name in the cluster domain {1:?}")]
    OutsideCluster(String, String),
    #[error("{0} is neither a Service's ClusterIP nor a Pod's IP")]
    UnknownAddr(IpAddr),
}

/// Parses a `GetDestination` path. A name without a port means port 80, as in Linkerd.
pub fn parse_target(path: &str, cluster_domain: &str) -> Result<Target, InvalidTarget> {
    if path.len() > MAX_PATH_LEN {
        return Err(InvalidTarget::TooLong);
    }
    if let Ok(addr) = path.parse::<SocketAddr>() {
        return Ok(Target::Addr(addr));
    }
    let malformed = || InvalidTarget::Malformed(path.to_owned());
    let (host, port) = match path.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().map_err(|_| malformed())?),
        Some(_) => return Err(malformed()),
        None => (path, 80),
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Target::Addr(SocketAddr::new(ip, port)));
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let domain = cluster_domain.trim_end_matches('.');
    let outside = || InvalidTarget::OutsideCluster(host.clone(), domain.to_owned());
    let Some(rest) = host
        .strip_suffix(domain)
        .and_then(|r| r.strip_suffix(".svc."))
    else {
        return Err(outside());
    };
    let labels: Vec<&str> = rest.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return Err(outside());
    }
    let (hostname, svc, ns) = match labels.as_slice() {
        [svc, ns] => (None, *svc, *ns),
        [host, svc, ns] => (Some((*host).to_owned()), *svc, *ns),
        _ => return Err(outside()),
    };
    Ok(Target::Name {
        service: (ns.to_owned(), svc.to_owned()),
        hostname,
        port,
    })
}

/// How a peer proxy should speak to an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Hint {
    Unknown,
    H2,
    /// Opaque, through the peer proxy's inbound port with a transport header.
    Opaque {
        inbound_port: u16,
    },
}

/// One endpoint, in a form that compares and hashes (the proto's maps do neither stably).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub labels: BTreeMap<&'static str, String>,
    pub identity: Option<String>,
    /// Whether the identity is also sent as the TLS server name (Linkerd sends none for
    /// gateways: the proxy then uses the identity).
    pub server_name: bool,
    pub hint: Hint,
    pub authority_override: Option<String>,
}

impl Endpoint {
    fn plain(addr: SocketAddr) -> Self {
        Self {
            addr,
            labels: BTreeMap::new(),
            identity: None,
            server_name: false,
            hint: Hint::Unknown,
            authority_override: None,
        }
    }

    fn fingerprint(&self) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    pub fn to_proto(&self) -> WeightedAddr {
        WeightedAddr {
            addr: Some(TcpAddress::from(self.addr)),
            weight: DEFAULT_WEIGHT,
            metric_labels: self
                .labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            tls_identity: self.identity.as_ref().map(|id| TlsIdentity {
                strategy: Some(tls_identity::Strategy::DnsLikeIdentity(
                    tls_identity::DnsLikeIdentity { name: id.clone() },
                )),
                server_name: self
                    .server_name
                    .then(|| tls_identity::DnsLikeIdentity { name: id.clone() }),
            }),
            protocol_hint: match self.hint {
                Hint::Unknown => None,
                Hint::H2 => Some(ProtocolHint {
                    protocol: Some(protocol_hint::Protocol::H2(protocol_hint::H2 {})),
                    opaque_transport: None,
                }),
                Hint::Opaque { inbound_port } => Some(ProtocolHint {
                    protocol: Some(protocol_hint::Protocol::Opaque(protocol_hint::Opaque {})),
                    opaque_transport: Some(protocol_hint::OpaqueTransport {
                        inbound_port: u32::from(inbound_port),
                    }),
                }),
            },
            authority_override: self.authority_override.as_ref().map(|a| AuthorityOverride {
                authority_override: a.clone(),
            }),
            http2: None,
            resource_ref: None,
        }
    }
}

/// The endpoints a target has now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Whether the Service exists (`NoEndpoints{exists}`).
    pub exists: bool,
    /// Labels of the whole set (`namespace`, `service`).
    pub labels: BTreeMap<&'static str, String>,
    pub endpoints: BTreeMap<SocketAddr, Endpoint>,
}

/// What a stream remembers of what it sent: addresses and a fingerprint of each endpoint, so
/// that an idle stream costs a few bytes per endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    exists: bool,
    endpoints: Vec<(SocketAddr, u64)>,
}

/// The updates that take a client from `prev` (nothing, for a new stream) to `next`: the first
/// answer is the whole set (or `NoEndpoints`), later ones are removals and additions (an Add of
/// a known address replaces it); a set that becomes empty is a `NoEndpoints`.
pub fn diff(prev: Option<&Sent>, next: &Resolution) -> (Vec<Update>, Sent) {
    let sent = Sent {
        exists: next.exists,
        endpoints: next
            .endpoints
            .values()
            .map(|e| (e.addr, e.fingerprint()))
            .collect(),
    };
    let add = |eps: Vec<&Endpoint>| Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: eps.iter().map(|e| e.to_proto()).collect(),
            metric_labels: next
                .labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        })),
    };
    let none = |exists| Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists })),
    };
    let mut updates = Vec::new();
    match prev {
        None => {
            if next.endpoints.is_empty() {
                updates.push(none(next.exists));
            } else {
                updates.push(add(next.endpoints.values().collect()));
            }
        }
        Some(prev) if next.endpoints.is_empty() => {
            if !prev.endpoints.is_empty() || prev.exists != next.exists {
                updates.push(none(next.exists));
            }
        }
        Some(prev) => {
            let before: BTreeMap<SocketAddr, u64> = prev.endpoints.iter().copied().collect();
            let removed: Vec<TcpAddress> = before
                .keys()
                .filter(|a| !next.endpoints.contains_key(a))
                .map(|a| TcpAddress::from(*a))
                .collect();
            if !removed.is_empty() {
                updates.push(Update {
                    update: Some(update::Update::Remove(AddrSet { addrs: removed })),
                });
            }
            let changed: Vec<&Endpoint> = next
                .endpoints
                .values()
                .zip(&sent.endpoints)
                .filter(|(e, (_, fp))| before.get(&e.addr) != Some(fp))
                .map(|(e, _)| e)
                .collect();
            if !changed.is_empty() {
                updates.push(add(changed));
            }
        }
    }
    (updates, sent)
}

/// A Service port's opaqueness: the Service's annotation, else its namespace's.
fn service_opaque(idx: &Index, ns: &str, svc: Option<&ServiceInfo>, port: u16) -> bool {
    svc.and_then(|s| s.opaque_ports.as_ref())
        .or_else(|| idx.namespaces.get(ns).and_then(|n| n.opaque_ports.as_ref()))
        .is_some_and(|p| p.contains(port))
}

/// A Pod port's opaqueness: the Pod's annotation, else its namespace's (the injector copies the
/// namespace's onto the Pod, so this is the same rule for injected and hand-written Pods).
fn pod_opaque(ns_ports: Option<&PortSet>, pod: &PodInfo, port: u16) -> bool {
    pod.opaque_ports
        .as_ref()
        .or(ns_ports)
        .is_some_and(|p| p.contains(port))
}

/// How a Pod's endpoint is described, given the identity rules of the cluster it lives in.
struct PodRules<'a> {
    trust_domain: &'a str,
    control_plane_ns: &'a str,
    ns_opaque: Option<&'a PortSet>,
}

fn pod_endpoint(
    rules: &PodRules<'_>,
    ns: &str,
    name: &str,
    pod: &PodInfo,
    addr: SocketAddr,
    service_opaque: bool,
) -> Endpoint {
    let mut labels = BTreeMap::from([
        ("pod", name.to_owned()),
        ("serviceaccount", pod.service_account.clone()),
    ]);
    if let Some(cp) = &pod.control_plane_ns {
        labels.insert("control_plane_ns", cp.clone());
    }
    if let Some(hash) = &pod.template_hash {
        labels.insert("pod_template_hash", hash.clone());
    }
    if let Some((kind, owner)) = &pod.owner {
        let key = match kind.as_str() {
            "deployment" => "deployment",
            "replicaset" => "replicaset",
            "statefulset" => "statefulset",
            "daemonset" => "daemonset",
            "job" => "job",
            "cronjob" => "cronjob",
            "replicationcontroller" => "replicationcontroller",
            _ => "owner",
        };
        labels.insert(key, owner.clone());
    }
    let meshed = pod.control_plane_ns.as_deref() == Some(rules.control_plane_ns);
    let identity = meshed
        .then(|| {
            proxy_identity::Id::service_account(
                &pod.service_account,
                ns,
                rules.control_plane_ns,
                rules.trust_domain,
            )
            .ok()
        })
        .flatten()
        .map(|id| id.as_str().to_owned());
    let hint = match identity {
        None => Hint::Unknown,
        Some(_) if service_opaque || pod_opaque(rules.ns_opaque, pod, addr.port()) => {
            Hint::Opaque {
                inbound_port: pod.inbound_port,
            }
        }
        Some(_) => Hint::H2,
    };
    Endpoint {
        addr,
        labels,
        server_name: identity.is_some(),
        identity,
        hint,
        authority_override: None,
    }
}

/// What is asked of one Service's slices.
struct Query<'a> {
    svc: Key,
    port: PortRef<'a>,
    /// The port the client asked for (a gateway's authority names it).
    requested: u16,
    hostname: Option<&'a str>,
    service_opaque: bool,
}

/// The ready endpoints of one Service's slices.
fn slice_endpoints(
    state: &ClusterState,
    rules: &PodRules<'_>,
    q: &Query<'_>,
    out: &mut BTreeMap<SocketAddr, Endpoint>,
) {
    let (svc, hostname, port, service_opaque) = (&q.svc, q.hostname, q.requested, q.service_opaque);
    for slice in state.slices_of(svc) {
        let Some(target) = slice_port(slice, q.port) else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| e.ready) {
            if hostname.is_some() && ep.hostname.as_deref() != hostname {
                continue;
            }
            for ip in &ep.addresses {
                let addr = SocketAddr::new(*ip, target);
                let endpoint = if let Some(gw) = &slice.gateway {
                    gateway_endpoint(gw, addr, port)
                } else if let Some((name, pod)) = ep
                    .pod
                    .as_ref()
                    .and_then(|n| state.pods.get(&(svc.0.clone(), n.clone())).map(|p| (n, p)))
                {
                    pod_endpoint(rules, &svc.0, name, pod, addr, service_opaque)
                } else {
                    Endpoint::plain(addr)
                };
                out.insert(addr, endpoint);
            }
        }
    }
}

/// Which port of a Service's slices an endpoint listens on.
#[derive(Clone, Copy, Debug)]
enum PortRef<'a> {
    /// A port the Service declares, by its name (slices name their ports after the Service's,
    /// with the target port resolved, named target ports included).
    Declared(Option<&'a str>),
    /// A port the Service does not declare: the same number on the endpoints (Linkerd's rule).
    Undeclared(u16),
}

fn slice_port(slice: &SliceInfo, port: PortRef<'_>) -> Option<u16> {
    match port {
        PortRef::Declared(name) => slice
            .ports
            .iter()
            .find(|(n, _)| n.as_deref() == name)
            .map(|(_, p)| *p),
        PortRef::Undeclared(p) => Some(p),
    }
}

/// A gateway mirror's endpoint: the gateway, with its identity, and the remote Service as the
/// authority to ask it for (Linkerd's controller sends exactly this).
fn gateway_endpoint(gw: &crate::model::GatewayTarget, addr: SocketAddr, port: u16) -> Endpoint {
    Endpoint {
        addr,
        labels: BTreeMap::new(),
        identity: Some(gw.identity.clone()),
        server_name: false,
        hint: Hint::H2,
        authority_override: Some(format!("{}:{port}", gw.remote_fq_name)),
    }
}

/// A gateway mirror's set labels: the target cluster and the remote Service.
fn gateway_labels(gw: &crate::model::GatewayTarget, labels: &mut BTreeMap<&'static str, String>) {
    if let Some(cluster) = &gw.cluster {
        labels.insert("target_cluster", cluster.clone());
    }
    let mut parts = gw.remote_fq_name.split('.');
    if let (Some(svc), Some(ns)) = (parts.next(), parts.next()) {
        labels.insert("target_service", svc.to_owned());
        labels.insert("target_service_namespace", ns.to_owned());
    }
}

fn local_rules<'a>(settings: &'a Settings, idx: &'a Index, ns: &str) -> PodRules<'a> {
    PodRules {
        trust_domain: &settings.trust_domain,
        control_plane_ns: &settings.control_plane_ns,
        ns_opaque: idx.namespaces.get(ns).and_then(|n| n.opaque_ports.as_ref()),
    }
}

fn remote_rules(remote: &RemoteSettings) -> PodRules<'_> {
    PodRules {
        trust_domain: &remote.trust_domain,
        control_plane_ns: &remote.control_plane_ns,
        ns_opaque: None,
    }
}

/// How a Service's `port` is found on its endpoints.
fn service_port(svc: &ServiceInfo, port: u16) -> PortRef<'_> {
    match svc.ports.iter().find(|p| p.port == port) {
        Some(p) => PortRef::Declared(p.name.as_deref()),
        None => PortRef::Undeclared(port),
    }
}

/// `Get`: the endpoints of a target, and the topics they depend on.
pub fn resolve(
    idx: &Index,
    settings: &Settings,
    target: &Target,
) -> Result<(Resolution, Vec<Topic>), InvalidTarget> {
    match target {
        Target::Name {
            service,
            hostname,
            port,
        } => Ok(resolve_service(
            idx,
            settings,
            service,
            hostname.as_deref(),
            *port,
        )),
        Target::Addr(addr) => {
            let mut topics = vec![Topic::Ip(addr.ip())];
            if let Some(svc) = idx.svc_by_ip.get(&addr.ip()) {
                let (res, more) = resolve_service(idx, settings, svc, None, addr.port());
                topics.extend(more);
                return Ok((res, topics));
            }
            if let Some((ns, name)) = idx.pods_by_ip.get(&addr.ip())
                && let Some(pod) = idx.local.pods.get(&(ns.clone(), name.clone()))
            {
                topics.push(Topic::Namespace(ns.clone()));
                let ep = pod_endpoint(&local_rules(settings, idx, ns), ns, name, pod, *addr, false);
                let res = Resolution {
                    exists: true,
                    labels: BTreeMap::from([("namespace", ns.clone())]),
                    endpoints: BTreeMap::from([(*addr, ep)]),
                };
                return Ok((res, topics));
            }
            Err(InvalidTarget::UnknownAddr(addr.ip()))
        }
    }
}

fn resolve_service(
    idx: &Index,
    settings: &Settings,
    key: &Key,
    hostname: Option<&str>,
    port: u16,
) -> (Resolution, Vec<Topic>) {
    let mut topics = vec![Topic::Service(key.clone())];
    let mut res = Resolution {
        exists: false,
        labels: BTreeMap::from([("namespace", key.0.clone()), ("service", key.1.clone())]),
        endpoints: BTreeMap::new(),
    };
    let Some(svc) = idx.services.get(key) else {
        return (res, topics);
    };
    res.exists = true;
    let own_port = service_port(svc, port);
    let opaque = service_opaque(idx, &key.0, Some(svc), port);
    // A local member (this Service itself, or a federated Service's local member) is asked
    // by its own port of that number; a remote one by this Service's port name (mirrors and
    // federated Services copy their members' port names).
    let local = |name: &str, out: &mut BTreeMap<SocketAddr, Endpoint>| {
        let member = (key.0.clone(), name.to_owned());
        let (member_port, member_opaque) = match idx.services.get(&member) {
            Some(m) => (
                service_port(m, port),
                service_opaque(idx, &key.0, Some(m), port),
            ),
            None => (own_port, opaque),
        };
        let q = Query {
            svc: member,
            port: member_port,
            requested: port,
            hostname,
            service_opaque: member_opaque,
        };
        slice_endpoints(&idx.local, &local_rules(settings, idx, &key.0), &q, out);
    };
    let remote = |cluster: &str, name: &str, out: &mut BTreeMap<SocketAddr, Endpoint>| {
        if let Some(r) = idx.remotes.get(cluster) {
            let q = Query {
                svc: (key.0.clone(), name.to_owned()),
                port: own_port,
                requested: port,
                hostname,
                service_opaque: opaque,
            };
            slice_endpoints(&r.state, &remote_rules(&r.settings), &q, out);
        }
    };
    match &svc.discovery {
        Discovery::Local => {
            local(&key.1, &mut res.endpoints);
            if let Some(gw) = idx.local.slices_of(key).find_map(|s| s.gateway.as_ref()) {
                gateway_labels(gw, &mut res.labels);
            }
        }
        Discovery::Remote { cluster, service } => {
            topics.push(Topic::Cluster(cluster.clone()));
            topics.push(Topic::Remote(
                cluster.clone(),
                (key.0.clone(), service.clone()),
            ));
            remote(cluster, service, &mut res.endpoints);
        }
        Discovery::Federated {
            local: member,
            remote: members,
        } => {
            if let Some(member) = member {
                topics.push(Topic::Service((key.0.clone(), member.clone())));
                local(member, &mut res.endpoints);
            }
            for (service, cluster) in members {
                topics.push(Topic::Cluster(cluster.clone()));
                topics.push(Topic::Remote(
                    cluster.clone(),
                    (key.0.clone(), service.clone()),
                ));
                remote(cluster, service, &mut res.endpoints);
            }
        }
    }
    (res, topics)
}

/// Linkerd's default retry budget: retries may add 20 % to the requests, at least 10 a second,
/// counted over 10 s.
pub fn default_retry_budget() -> RetryBudget {
    RetryBudget {
        retry_ratio: 0.2,
        min_retries_per_second: 10,
        ttl: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
    }
}

/// `GetProfile`: the profile of a target, and the topics it depends on.
pub fn profile(
    idx: &Index,
    settings: &Settings,
    target: &Target,
) -> Result<(DestinationProfile, Vec<Topic>), InvalidTarget> {
    let domain = settings.cluster_domain.trim_end_matches('.');
    let service_profile = |key: &Key, port: u16| DestinationProfile {
        fully_qualified_name: format!("{}.{}.svc.{domain}", key.1, key.0),
        opaque_protocol: service_opaque(idx, &key.0, idx.services.get(key), port),
        retry_budget: Some(default_retry_budget()),
        ..DestinationProfile::default()
    };
    match target {
        Target::Name { service, port, .. } => Ok((
            service_profile(service, *port),
            vec![Topic::Service(service.clone())],
        )),
        Target::Addr(addr) => {
            let topics = vec![Topic::Ip(addr.ip())];
            if let Some(key) = idx.svc_by_ip.get(&addr.ip()) {
                let mut topics = topics;
                topics.push(Topic::Service(key.clone()));
                return Ok((service_profile(key, addr.port()), topics));
            }
            if let Some((ns, name)) = idx.pods_by_ip.get(&addr.ip())
                && let Some(pod) = idx.local.pods.get(&(ns.clone(), name.clone()))
            {
                let rules = local_rules(settings, idx, ns);
                let mut topics = topics;
                topics.push(Topic::Namespace(ns.clone()));
                return Ok((
                    DestinationProfile {
                        opaque_protocol: pod_opaque(rules.ns_opaque, pod, addr.port()),
                        retry_budget: Some(default_retry_budget()),
                        endpoint: Some(
                            pod_endpoint(&rules, ns, name, pod, *addr, false).to_proto(),
                        ),
                        ..DestinationProfile::default()
                    },
                    topics,
                ));
            }
            Err(InvalidTarget::UnknownAddr(addr.ip()))
        }
    }
}

#[cfg(test)]
mod tests;
