//! What the local cluster should hold for a remote Service: pure functions of the remote objects,
//! the Link and the gateway's state. Nothing here talks to an API server, so every rule is
//! table-tested.
//!
//! Where Linkerd's behaviour is a [quirk] (see `linkerd-multicluster.md`), the function says what
//! meshlink does instead.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort,
            ServiceSpec,
        },
        discovery::v1::{self as discovery, EndpointConditions, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::ResourceExt;
use link_crd::{LinkSpec, NameError, keys, naming};

pub mod federated;

/// Field manager of every write the controller makes (server-side apply).
pub const FIELD_MANAGER: &str = "meshlink-service-mirror";

/// `endpointslice.kubernetes.io/managed-by` of the slices the controller writes, so that
/// Kubernetes' own EndpointSlice controllers leave them alone.
pub const SLICE_MANAGED_BY: &str = "service-mirror.meshlink.io";

/// Label that stops Kubernetes' EndpointSlice mirroring controller from also making slices out of
/// the mirror's core Endpoints (the controller writes its own, with the annotations).
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Annotations of a remote Service that are never copied: they describe how the *remote*
/// cluster routes to its own pods. Linkerd drops the first two; meshlink also drops kubectl's
/// record of the remote object, which would make `kubectl apply` misread the mirror.
const DROPPED_ANNOTATIONS: &[&str] = &[
    "service.kubernetes.io/topology-aware-hints",
    "service.kubernetes.io/topology-mode",
    "kubectl.kubernetes.io/last-applied-configuration",
];

/// How a remote Service is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Through the target's gateway (`spec.selector`): Endpoints point at the gateway.
    Gateway,
    /// Pod-to-pod (`spec.remoteDiscoverySelector`): a Service with no Endpoints; the destination
    /// controller resolves it in the remote cluster.
    RemoteDiscovery,
}

/// Which mode, if any, a remote Service with `labels` is mirrored in.
///
/// Remote discovery wins when both selectors match, as in Linkerd (it then writes no Endpoints).
pub fn export_mode(spec: &LinkSpec, labels: &BTreeMap<String, String>) -> Option<Mode> {
    let matches =
        |s: &Option<link_crd::LabelSelector>| s.as_ref().is_some_and(|s| s.matches(labels));
    if matches(&spec.remote_discovery_selector) {
        Some(Mode::RemoteDiscovery)
    } else if matches(&spec.selector) {
        Some(Mode::Gateway)
    } else {
        None
    }
}

/// Why a remote Service cannot be mirrored. Each becomes an `InvalidService` status entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidService {
    /// The mirror's name would be refused by Kubernetes.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A Service without ports cannot be reached through the gateway.
    #[error("the Service exposes no ports: add at least one port to mirror it")]
    NoPorts,
}

/// What the controller knows about the Link's target, parsed once per Link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `spec.targetClusterName`: suffix of mirror names, `cluster-name` label.
    pub cluster: String,
    /// `spec.targetClusterDomain`.
    pub domain: String,
    /// `spec.gatewayIdentity`; may be empty.
    pub gateway_identity: String,
    /// `spec.gatewayPort`, when the Link has a gateway.
    pub gateway_port: Option<u16>,
    /// `spec.excludedLabels`.
    pub excluded_labels: Vec<String>,
    /// `spec.excludedAnnotations`.
    pub excluded_annotations: Vec<String>,
}

impl Target {
    /// Reads what mirroring needs from a Link's spec. The CRD's rules guarantee the port's form;
    /// a Link stored before they existed may still hold anything, hence the `Option`.
    pub fn from_spec(spec: &LinkSpec) -> Self {
        Self {
            cluster: spec.target_cluster_name.clone(),
            domain: spec.target_cluster_domain.clone(),
            gateway_identity: spec.gateway_identity.clone(),
            gateway_port: spec.gateway_port.parse().ok().filter(|p| *p != 0),
            excluded_labels: spec.excluded_labels.clone(),
            excluded_annotations: spec.excluded_annotations.clone(),
        }
    }
}

/// The state of the target's gateway that mirror endpoints reflect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// Every address the Link's `gatewayAddress` resolves to, sorted and without duplicates.
    pub addresses: Vec<IpAddr>,
    /// The gateway's port.
    pub port: u16,
    /// Whether the liveness probe says the gateway is alive; dead gateways' addresses are
    /// published as not ready.
    pub alive: bool,
}

/// Whether label or annotation `key` is excluded by `rules`.
///
/// A rule ending in `/*` excludes every key in that prefix: `example.com/*` excludes
/// `example.com/team` but not `example.com.au/team` (Linkerd's plain string-prefix test
/// excludes both [quirk]). Any other rule excludes exactly that key.
pub fn is_excluded(key: &str, rules: &[String]) -> bool {
    rules.iter().any(|rule| match rule.strip_suffix('*') {
        Some(prefix) if prefix.ends_with('/') => key.starts_with(prefix),
        _ => key == rule,
    })
}

/// Whether `key` is one the controller itself sets on what it writes (every
/// `mirror.linkerd.io` key, and the `multicluster.linkerd.io` discovery keys). A remote
/// Service's own value of such a key must never reach a local object: a remote Service
/// annotated `multicluster.linkerd.io/remote-discovery` would otherwise turn its mirror into a
/// federated Service that a destination service resolves to other clusters' endpoints, and a
/// `remote-gateway-identity` of its choosing would name the identity callers expect.
pub fn is_controller_key(key: &str) -> bool {
    key.strip_prefix(keys::SERVICE_MIRROR_PREFIX)
        .is_some_and(|rest| rest.starts_with('/'))
        || [
            keys::REMOTE_DISCOVERY_KEY,
            keys::REMOTE_SERVICE_LABEL,
            keys::LOCAL_DISCOVERY_ANNOTATION,
        ]
        .contains(&key)
}

/// Whether local Service `svc` is a mirror this controller made for target `cluster` (it carries
/// the mirror labels of that cluster). Anything else, whoever made it, is never written or
/// deleted.
pub fn made_by(svc: &Service, cluster: &str) -> bool {
    let labels = svc.labels();
    labels
        .get(keys::MIRRORED_RESOURCE_LABEL)
        .map(String::as_str)
        == Some("true")
        && labels.get(keys::CLUSTER_NAME_LABEL).map(String::as_str) == Some(cluster)
}

/// The labels of `s` a mirror or federated Service copies: all but the controller's own keys
/// and the `excluded` ones.
fn copied_labels(s: &Service, excluded: &[String]) -> BTreeMap<String, String> {
    s.metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !is_controller_key(k) && !is_excluded(k, excluded))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The annotations of `s` a mirror or federated Service copies: all but the dropped and the
/// `excluded` ones; opaque ports decide how the source proxy treats traffic, so they are always
/// kept.
fn copied_annotations(s: &Service, excluded: &[String]) -> BTreeMap<String, String> {
    s.metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| {
            !DROPPED_ANNOTATIONS.contains(&k.as_str())
                && !is_controller_key(k)
                && (k.as_str() == keys::OPAQUE_PORTS_ANNOTATION || !is_excluded(k, excluded))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A remote port as a mirror or federated Service has it: nodePort and appProtocol dropped.
fn copied_port(p: &ServicePort) -> ServicePort {
    ServicePort {
        name: p.name.clone(),
        protocol: p.protocol.clone(),
        port: p.port,
        target_port: p.target_port.clone(),
        ..ServicePort::default()
    }
}

/// The labels a mirror Service and its Endpoints carry: the remote Service's labels without the
/// `mirror.linkerd.io` keys and the excluded ones, plus the mirror's own.
pub fn mirror_labels(target: &Target, remote: &Service) -> BTreeMap<String, String> {
    let mut labels = copied_labels(remote, &target.excluded_labels);
    labels.insert(keys::MIRRORED_RESOURCE_LABEL.into(), "true".into());
    labels.insert(keys::CLUSTER_NAME_LABEL.into(), target.cluster.clone());
    labels
}

/// The local mirror of remote Service `remote` from the Link's target, for server-side apply.
pub fn mirror_service(
    target: &Target,
    remote: &Service,
    mode: Mode,
) -> Result<Service, InvalidService> {
    let remote_name = remote.metadata.name.as_deref().unwrap_or_default();
    let namespace = remote.metadata.namespace.clone().unwrap_or_default();
    let name = naming::mirror_service_name(remote_name, &target.cluster)?;
    let fqdn = naming::remote_service_fqdn(remote_name, &namespace, &target.domain)?;
    let ports: Vec<ServicePort> = remote
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(copied_port)
        .collect();
    if ports.is_empty() {
        return Err(InvalidService::NoPorts);
    }

    let mut labels = mirror_labels(target, remote);
    if mode == Mode::RemoteDiscovery {
        labels.insert(keys::REMOTE_DISCOVERY_KEY.into(), target.cluster.clone());
        labels.insert(keys::REMOTE_SERVICE_LABEL.into(), remote_name.to_owned());
    }

    let mut annotations = copied_annotations(remote, &target.excluded_annotations);
    annotations.insert(keys::REMOTE_SVC_FQ_NAME_ANNOTATION.into(), fqdn);
    if let Some(rv) = &remote.metadata.resource_version {
        annotations.insert(keys::REMOTE_RESOURCE_VERSION_ANNOTATION.into(), rv.clone());
    }

    Ok(Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

fn endpoint_metadata(target: &Target, remote: &Service, mirror: &Service) -> ObjectMeta {
    let remote_name = remote.metadata.name.as_deref().unwrap_or_default();
    let namespace = remote.metadata.namespace.as_deref().unwrap_or_default();
    let mut annotations = BTreeMap::new();
    if let Ok(fqdn) = naming::remote_service_fqdn(remote_name, namespace, &target.domain) {
        annotations.insert(keys::REMOTE_SVC_FQ_NAME_ANNOTATION.to_owned(), fqdn);
    }
    if !target.gateway_identity.is_empty() {
        annotations.insert(
            keys::REMOTE_GATEWAY_IDENTITY_ANNOTATION.to_owned(),
            target.gateway_identity.clone(),
        );
    }
    ObjectMeta {
        name: mirror.metadata.name.clone(),
        namespace: mirror.metadata.namespace.clone(),
        labels: Some(mirror_labels(target, remote)),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    }
}

/// The ports of the remote Service, each mapped to the gateway's single port.
fn gateway_ports(
    remote: &Service,
    port: u16,
) -> impl Iterator<Item = (Option<String>, Option<String>, i32)> + '_ {
    remote
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(move |p| (p.name.clone(), p.protocol.clone(), i32::from(port)))
}

/// What a mirror's Endpoints and its EndpointSlices both say.
struct Published<'a> {
    /// Each address, with its pod's hostname for a headless mirror.
    addresses: Vec<(IpAddr, Option<&'a str>)>,
    /// Each port: name, protocol, port.
    ports: Vec<(Option<String>, Option<String>, i32)>,
    /// Whether the addresses are ready (the gateway is alive).
    ready: bool,
}

impl Published<'_> {
    /// The core Endpoints (Linkerd's consumers read these): one subset, its addresses
    /// `notReadyAddresses` when not ready; no subsets at all without addresses, as an empty list
    /// rather than an absent one, so that server-side apply removes subsets written before.
    fn endpoints(&self, mut metadata: ObjectMeta) -> Endpoints {
        metadata
            .labels
            .get_or_insert_default()
            .insert(SKIP_MIRROR_LABEL.into(), "true".into());
        let subsets = if self.addresses.is_empty() {
            Vec::new()
        } else {
            let addresses: Vec<EndpointAddress> = self
                .addresses
                .iter()
                .map(|(ip, hostname)| EndpointAddress {
                    ip: ip.to_string(),
                    hostname: hostname.map(str::to_owned),
                    ..EndpointAddress::default()
                })
                .collect();
            let (ready, not_ready) = if self.ready {
                (Some(addresses), None)
            } else {
                (None, Some(addresses))
            };
            let ports = self
                .ports
                .iter()
                .map(|(name, protocol, port)| EndpointPort {
                    name: name.clone(),
                    protocol: protocol.clone(),
                    port: *port,
                    ..EndpointPort::default()
                });
            vec![EndpointSubset {
                addresses: ready,
                not_ready_addresses: not_ready,
                ports: Some(ports.collect()),
            }]
        };
        Endpoints {
            metadata,
            subsets: Some(subsets),
        }
    }

    /// The EndpointSlices `<mirror>-ipv4` and `<mirror>-ipv6`, for the families `(v4, v6)` says;
    /// a family's slice is empty when it has no address.
    fn slices(&self, base: ObjectMeta, (v4, v6): (bool, bool)) -> Vec<EndpointSlice> {
        let mirror = base.name.clone().unwrap_or_default();
        let ports: Vec<discovery::EndpointPort> = self
            .ports
            .iter()
            .map(|(name, protocol, port)| discovery::EndpointPort {
                name: name.clone(),
                protocol: protocol.clone(),
                port: Some(*port),
                ..discovery::EndpointPort::default()
            })
            .collect();
        [("IPv4", "ipv4", v4, true), ("IPv6", "ipv6", v6, false)]
            .into_iter()
            .filter(|family| family.2)
            .map(|(family, suffix, _, is_v4)| {
                let endpoints = self
                    .addresses
                    .iter()
                    .filter(|(ip, _)| ip.is_ipv4() == is_v4)
                    .map(|(ip, hostname)| discovery::Endpoint {
                        addresses: vec![ip.to_string()],
                        hostname: hostname.map(str::to_owned),
                        conditions: Some(EndpointConditions {
                            ready: Some(self.ready),
                            serving: Some(self.ready),
                            terminating: Some(false),
                        }),
                        ..discovery::Endpoint::default()
                    })
                    .collect();
                let mut metadata = base.clone();
                metadata.name = Some(format!("{mirror}-{suffix}"));
                let labels = metadata.labels.get_or_insert_default();
                labels.insert(SERVICE_NAME_LABEL.into(), mirror.clone());
                labels.insert(MANAGED_BY_LABEL.into(), SLICE_MANAGED_BY.into());
                EndpointSlice {
                    metadata,
                    address_type: family.to_owned(),
                    endpoints: Some(endpoints),
                    ports: Some(ports.clone()),
                }
            })
            .collect()
    }
}

/// A gateway-mode mirror's addresses: the gateway's, with every remote port mapped to the gateway
/// port, not ready while the gateway is dead, none while the remote Service has no ready
/// endpoints (so clients fail fast instead of crossing clusters for nothing).
fn gateway_published<'a>(
    remote: &Service,
    remote_ready: bool,
    gateway: &'a Gateway,
) -> Published<'a> {
    Published {
        addresses: if remote_ready {
            gateway.addresses.iter().map(|ip| (*ip, None)).collect()
        } else {
            Vec::new()
        },
        ports: gateway_ports(remote, gateway.port).collect(),
        ready: gateway.alive,
    }
}

/// The core Endpoints of a gateway-mode mirror (see [`gateway_published`]).
pub fn gateway_endpoints(
    target: &Target,
    remote: &Service,
    mirror: &Service,
    remote_ready: bool,
    gateway: &Gateway,
) -> Endpoints {
    gateway_published(remote, remote_ready, gateway)
        .endpoints(endpoint_metadata(target, remote, mirror))
}

/// The EndpointSlices of a gateway-mode mirror: the same addresses, readiness and annotations as
/// [`gateway_endpoints`], one slice per address family (`<mirror>-ipv4`, `<mirror>-ipv6`). A
/// family the gateway has no address in gets no slice; an empty remote gives empty slices.
pub fn gateway_slices(
    target: &Target,
    remote: &Service,
    mirror: &Service,
    remote_ready: bool,
    gateway: &Gateway,
) -> Vec<EndpointSlice> {
    let has = |v4: bool| gateway.addresses.iter().any(|ip| ip.is_ipv4() == v4);
    gateway_published(remote, remote_ready, gateway).slices(
        endpoint_metadata(target, remote, mirror),
        (has(true), has(false)),
    )
}

/// Whether a Service is headless (`clusterIP: None`).
pub fn is_headless(s: &Service) -> bool {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .is_some_and(|ip| ip == "None")
}

/// One port of a remote headless Service's endpoints (pods are reached on their own ports, not
/// the gateway's): name, port, protocol.
pub type EndpointPortSpec = (Option<String>, Option<i32>, Option<String>);

/// The root mirror of a headless remote Service: the mirror Service, headless too, so that
/// `<hostname>.<mirror>.<namespace>.svc` names each remote pod here.
pub fn headless_mirror_service(
    target: &Target,
    remote: &Service,
) -> Result<Service, InvalidService> {
    let mut s = mirror_service(target, remote, Mode::Gateway)?;
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
    }
    Ok(s)
}

/// The mirror of one remote pod `hostname` of headless Service `remote`: a ClusterIP Service
/// `<hostname>-<cluster>` whose endpoints are the gateway, owned by the root mirror (so that it
/// goes with it, in its namespace only).
/// `version` is the resourceVersion of the remote EndpointSlice that lists the pod: the object
/// a per-pod mirror is made from (Linkerd records its remote Endpoints' version here, not the
/// Service's).
pub fn endpoint_mirror_service(
    target: &Target,
    remote: &Service,
    root: &str,
    hostname: &str,
    version: &str,
) -> Result<Service, InvalidService> {
    let remote_name = remote.metadata.name.as_deref().unwrap_or_default();
    let namespace = remote.metadata.namespace.clone().unwrap_or_default();
    let mut service = mirror_service(target, remote, Mode::Gateway)?;
    service.metadata.name = Some(naming::endpoint_mirror_name(hostname, &target.cluster)?);
    service
        .metadata
        .labels
        .get_or_insert_default()
        .insert(keys::HEADLESS_MIRROR_SVC_NAME_LABEL.into(), root.to_owned());
    // Linkerd's endpoint mirrors carry only these two annotations.
    let mut annotations = BTreeMap::new();
    annotations.insert(
        keys::REMOTE_SVC_FQ_NAME_ANNOTATION.to_owned(),
        naming::remote_endpoint_fqdn(hostname, remote_name, &namespace, &target.domain)?,
    );
    if !version.is_empty() {
        annotations.insert(
            keys::REMOTE_RESOURCE_VERSION_ANNOTATION.into(),
            version.to_owned(),
        );
    }
    service.metadata.annotations = Some(annotations);
    Ok(service)
}

/// The Endpoints and EndpointSlices of an endpoint mirror: the gateway, as for any gateway-mode
/// mirror, named for the one pod they stand for.
pub fn endpoint_mirror_endpoints(
    target: &Target,
    remote: &Service,
    endpoint_mirror: &Service,
    gateway: &Gateway,
) -> (Endpoints, Vec<EndpointSlice>) {
    let fq = endpoint_mirror
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(keys::REMOTE_SVC_FQ_NAME_ANNOTATION))
        .cloned();
    let root = endpoint_mirror
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL))
        .cloned();
    let fix = |meta: &mut ObjectMeta| {
        if let Some(root) = &root {
            meta.labels
                .get_or_insert_default()
                .insert(keys::HEADLESS_MIRROR_SVC_NAME_LABEL.into(), root.clone());
        }
        if let Some(fq) = &fq {
            meta.annotations
                .get_or_insert_default()
                .insert(keys::REMOTE_SVC_FQ_NAME_ANNOTATION.into(), fq.clone());
        }
    };
    let mut endpoints = gateway_endpoints(target, remote, endpoint_mirror, true, gateway);
    fix(&mut endpoints.metadata);
    let mut slices = gateway_slices(target, remote, endpoint_mirror, true, gateway);
    for s in &mut slices {
        fix(&mut s.metadata);
    }
    (endpoints, slices)
}

/// The Endpoints and EndpointSlices of a headless root mirror: one address per ready remote pod,
/// named by its hostname, at the ClusterIP of that pod's endpoint mirror, on the pods' own ports.
/// Like every mirror's, they are not ready while the gateway is dead (Linkerd applies that on
/// update but not on create [quirk]). The IPv4 slice is always there, empty without pods.
pub fn headless_endpoints(
    target: &Target,
    remote: &Service,
    mirror: &Service,
    pods: &[(String, IpAddr)],
    ports: &[EndpointPortSpec],
    alive: bool,
) -> (Endpoints, Vec<EndpointSlice>) {
    let published = Published {
        addresses: pods.iter().map(|(h, ip)| (*ip, Some(h.as_str()))).collect(),
        ports: ports
            .iter()
            .filter_map(|(name, port, protocol)| Some((name.clone(), protocol.clone(), (*port)?)))
            .collect(),
        ready: alive,
    };
    let metadata = endpoint_metadata(target, remote, mirror);
    let v6 = pods.iter().any(|(_, ip)| ip.is_ipv6());
    (
        published.endpoints(metadata.clone()),
        published.slices(metadata, (true, v6)),
    )
}

#[cfg(test)]
pub(crate) mod tests;
