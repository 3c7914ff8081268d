//! What the service keeps of each watched object: small projections with only the fields its
//! answers need, made by pure functions from the API objects (so a Pod costs a few hundred
//! bytes, not the tens of KiB of its full spec).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use link_crd::keys;

use crate::opaque::{self, PortSet};

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub use keys::{CONTROL_PLANE_NS_LABEL, DEFAULT_INBOUND_POLICY_ANNOTATION};
/// Set by the Deployment controller on every Pod of a ReplicaSet it owns.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// `(namespace, name)`.
pub type Key = (String, String);

/// A Service port: its number and name (the target port, named ones included, is what the
/// Service's EndpointSlices say under that name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    pub name: Option<String>,
}

/// How a Service's endpoints are found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovery {
    /// From this cluster's EndpointSlices (ordinary Services and gateway mirrors).
    Local,
    /// A remote-discovery mirror: Service `service` of the same namespace in cluster `cluster`.
    Remote { cluster: String, service: String },
    /// A federated Service: this cluster's member (if any) and each `(service, cluster)`.
    Federated {
        local: Option<String>,
        remote: Vec<(String, String)>,
    },
}

/// What is kept of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub opaque_ports: Option<PortSet>,
    pub discovery: Discovery,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    /// The Pod this endpoint is, when its targetRef is a Pod of the slice's namespace.
    pub pod: Option<String>,
    pub hostname: Option<String>,
}

/// What is kept of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: String,
    /// `(name, port)`; the name is the Service port's name.
    pub ports: Vec<(Option<String>, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
    /// A gateway mirror's slice: the remote gateway's identity and the remote Service's name.
    pub gateway: Option<GatewayTarget>,
}

/// The remote side of a gateway mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayTarget {
    pub identity: String,
    pub remote_fq_name: String,
    /// The target cluster (`mirror.linkerd.io/cluster-name`), for metric labels.
    pub cluster: Option<String>,
}

/// What is kept of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    /// `linkerd.io/control-plane-ns`, present on meshed Pods.
    pub control_plane_ns: Option<String>,
    pub opaque_ports: Option<PortSet>,
    pub default_inbound_policy: Option<String>,
    /// The owner as metric labels name it: (`deployment`, `web`), (`statefulset`, `db`), ...
    pub owner: Option<(String, String)>,
    /// `pod-template-hash`, a metric label when present (as in Linkerd).
    pub template_hash: Option<String>,
    /// The proxy's inbound port, for opaque transport.
    pub inbound_port: u16,
    /// Pods on the host network share the node's address: never indexed by IP.
    pub host_network: bool,
}

/// What is kept of a Namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub opaque_ports: Option<PortSet>,
    pub default_inbound_policy: Option<String>,
}

/// Linkerd's proxy inbound port, when the Pod does not say otherwise.
pub const DEFAULT_INBOUND_PORT: u16 = 4143;

fn annotation<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a String> {
    map.as_ref().and_then(|m| m.get(key))
}

/// Annotated opaque ports; an unparsable annotation counts as absent (and is reported by the
/// caller once, when the object is seen).
fn opaque_ports(annotations: &Option<BTreeMap<String, String>>) -> Option<PortSet> {
    annotation(annotations, keys::OPAQUE_PORTS_ANNOTATION).and_then(|v| opaque::parse(v).ok())
}

pub fn service_info(svc: &Service) -> ServiceInfo {
    let spec = svc.spec.as_ref();
    let cluster_ips = spec
        .and_then(|s| {
            s.cluster_ips
                .clone()
                .or_else(|| s.cluster_ip.clone().map(|ip| vec![ip]))
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                port: u16::try_from(p.port).ok()?,
                name: p.name.clone(),
            })
        })
        .collect();
    let labels = &svc.metadata.labels;
    let annotations = &svc.metadata.annotations;
    let local = annotation(annotations, keys::LOCAL_DISCOVERY_ANNOTATION);
    let remote = annotation(annotations, keys::REMOTE_DISCOVERY_KEY);
    let discovery = if local.is_some() || remote.is_some() {
        Discovery::Federated {
            local: local.filter(|l| !l.is_empty()).cloned(),
            remote: remote.map(|r| federated_members(r)).unwrap_or_default(),
        }
    } else if let Some(cluster) = annotation(labels, keys::REMOTE_DISCOVERY_KEY) {
        // Without the remote Service's name it can only be looked up here.
        match annotation(labels, keys::REMOTE_SERVICE_LABEL) {
            Some(service) => Discovery::Remote {
                cluster: cluster.clone(),
                service: service.clone(),
            },
            None => Discovery::Local,
        }
    } else {
        Discovery::Local
    };
    ServiceInfo {
        cluster_ips,
        ports,
        opaque_ports: opaque_ports(annotations),
        discovery,
    }
}

/// `svc@cluster[,svc@cluster...]`: the remote members of a federated Service.
pub fn federated_members(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|m| {
            let (svc, cluster) = m.trim().split_once('@')?;
            (!svc.is_empty() && !cluster.is_empty()).then(|| (svc.to_owned(), cluster.to_owned()))
        })
        .collect()
}

/// `None` for a slice that names no Service (it cannot be looked up).
pub fn slice_info(slice: &EndpointSlice) -> Option<SliceInfo> {
    let service = annotation(&slice.metadata.labels, SERVICE_NAME_LABEL)?.clone();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().filter(|n| !n.is_empty()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| SliceEndpoint {
            addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            // Absent means ready (the API's documented default).
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
            hostname: e.hostname.clone(),
        })
        .collect();
    let annotations = &slice.metadata.annotations;
    let gateway = match (
        annotation(annotations, keys::REMOTE_GATEWAY_IDENTITY_ANNOTATION),
        annotation(annotations, keys::REMOTE_SVC_FQ_NAME_ANNOTATION),
    ) {
        (Some(identity), Some(fq)) => Some(GatewayTarget {
            identity: identity.clone(),
            remote_fq_name: fq.clone(),
            cluster: annotation(&slice.metadata.labels, keys::CLUSTER_NAME_LABEL).cloned(),
        }),
        _ => None,
    };
    Some(SliceInfo {
        service,
        ports,
        endpoints,
        gateway,
    })
}

pub fn pod_info(pod: &Pod) -> PodInfo {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    // A finished Pod's address may already belong to another Pod.
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        ips.clear();
    }
    let labels = &pod.metadata.labels;
    let annotations = &pod.metadata.annotations;
    let inbound_port = spec
        .into_iter()
        .flat_map(|s| &s.containers)
        .filter(|c| c.name == "linkerd-proxy")
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "LINKERD2_PROXY_INBOUND_LISTEN_ADDR")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(DEFAULT_INBOUND_PORT);
    PodInfo {
        ips,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        control_plane_ns: annotation(labels, CONTROL_PLANE_NS_LABEL).cloned(),
        opaque_ports: opaque_ports(annotations),
        default_inbound_policy: annotation(annotations, DEFAULT_INBOUND_POLICY_ANNOTATION).cloned(),
        owner: owner(pod),
        template_hash: annotation(labels, POD_TEMPLATE_HASH_LABEL).cloned(),
        inbound_port,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

/// The Pod's controller as Linkerd's metric labels name it; a ReplicaSet made by a Deployment
/// (its name is `<deployment>-<pod-template-hash>`) is named by its Deployment.
fn owner(pod: &Pod) -> Option<(String, String)> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet"
        && let Some(hash) = annotation(&pod.metadata.labels, POD_TEMPLATE_HASH_LABEL)
        && let Some(deployment) = owner.name.strip_suffix(&format!("-{hash}"))
    {
        return Some(("deployment".into(), deployment.to_owned()));
    }
    Some((owner.kind.to_ascii_lowercase(), owner.name.clone()))
}

pub fn namespace_info(ns: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        opaque_ports: opaque_ports(&ns.metadata.annotations),
        default_inbound_policy: annotation(
            &ns.metadata.annotations,
            DEFAULT_INBOUND_POLICY_ANNOTATION,
        )
        .cloned(),
    }
}
