//! What to do about one remote Service: a pure function of what a Link's worker knows
//! ([`View`]) to a [`Plan`], which the worker then carries out. Every rule of mirroring lives
//! here, in the order it applies, so that each rule and each precedence between rules is
//! table-tested (see the tests below) without an API server; the worker only gathers the view,
//! asks the API server what the view cannot say (whether a name is held by a Service the Link did
//! not make), and writes.
//!
//! The objects themselves come from [`crate::desired`]. What depends on a write's answer (an
//! owner reference needs the mirror's uid, a headless root's Endpoints the ClusterIPs of its
//! per-pod mirrors) is filled in by the worker from the written objects, through the pure helpers
//! here ([`owner_reference`], [`Headless::root_endpoints`]).

use std::{collections::BTreeMap, collections::HashSet, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::ResourceExt;
use link_crd::{LinkSpec, keys, naming};

use crate::{
    desired::{self, EndpointPortSpec, Gateway, Mode, Target},
    status::{Key, Outcome},
};

/// What the controller knows of a remote Service's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RemoteEndpoints {
    /// At least one endpoint is ready.
    pub ready: bool,
    /// Headless Services: hostnames of the ready endpoints, each with the resourceVersion of the
    /// remote EndpointSlice that lists it (the object its per-pod mirror is made from).
    pub hostnames: BTreeMap<String, String>,
    /// Headless Services: some endpoint, ready or not, has a hostname (Linkerd's test for
    /// mirroring a headless Service as headless).
    pub named: bool,
    /// Headless Services: the endpoints' ports.
    pub ports: Vec<EndpointPortSpec>,
}

/// Everything [`plan`] reads about one key: the Link, the remote Service, and this Link's own
/// local objects in the key's namespace.
pub(crate) struct View<'a> {
    pub target: &'a Target,
    /// The Link's selectors decide the mode ([`desired::export_mode`]).
    pub spec: &'a LinkSpec,
    /// `--enable-headless-services`.
    pub headless_services: bool,
    /// `--enable-namespace-creation`.
    pub create_namespaces: bool,
    /// The remote Service of the key, if a watch of the target holds it.
    pub remote: Option<&'a Service>,
    pub endpoints: &'a RemoteEndpoints,
    /// The target's gateway, once resolved.
    pub gateway: Option<&'a Gateway>,
    pub namespace_exists: bool,
    /// A Service this Link made, by name, in the key's namespace (the local watch selects on
    /// the mirror labels, so nothing else is there).
    pub local: &'a (dyn Fn(&str) -> Option<Service> + Sync),
    /// The per-pod mirrors of the headless mirror of that name.
    pub pod_mirrors: &'a (dyn Fn(&str) -> Vec<Service> + Sync),
    /// Names in the key's namespace known to be held by Services this Link did not make. A name
    /// the plan would create ([`Plan::unchecked`]) is looked up by the worker, which plans again
    /// with what it found.
    pub foreign: &'a HashSet<String>,
}

/// Something to tell the user (a warning and an Event on the Link) when a key first gets into
/// this state, not on every reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Notice {
    /// The namespace is missing.
    MissingNamespace,
    /// The mirror's name is held by a Service this Link did not make. The worker looks again
    /// from time to time: a Service it does not watch cannot wake it when the name is freed.
    NameTaken { mirror: String },
}

/// What to do about a key.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Write nothing; the status entry becomes `status` (`None`: the entry goes).
    Skip {
        status: Option<Outcome>,
        notice: Option<Notice>,
    },
    /// The remote Service is gone or no longer exported: delete its mirror (and with it, by
    /// owner reference, its endpoints) and its per-pod mirrors; the status entry goes.
    Delete {
        mirror: Box<Service>,
        pod_mirrors: Vec<Service>,
    },
    Mirror(Box<Mirror>),
}

/// A mirror to write.
#[derive(Debug)]
pub(crate) struct Mirror {
    /// Create the namespace first.
    pub create_namespace: bool,
    /// Delete this mirror first: it switches between headless and ClusterIP, and a Service's
    /// clusterIP cannot change.
    pub replace: Option<Service>,
    /// The mirror Service, and the live one.
    pub service: Service,
    pub live: Option<Service>,
    pub endpoints: MirrorEndpoints,
    /// Per-pod mirrors of this mirror to delete (no longer headless, or pods gone).
    pub stale_pod_mirrors: Vec<Service>,
    /// The status entry once written.
    pub status: Outcome,
}

/// What a mirror's endpoints become.
#[derive(Debug)]
pub(crate) enum MirrorEndpoints {
    /// Through the gateway: these Endpoints and slices (owned by the mirror once written), and
    /// the mirror's slices to delete.
    Gateway(Box<Published>),
    /// Remote discovery: no endpoints here; any from a gateway past go.
    None {
        endpoints: String,
        slices: Vec<String>,
    },
    /// The gateway is not resolved yet: the mirror exists, its endpoints wait.
    Wait,
    /// A headless mirror: a mirror per named pod, and the root's Endpoints naming each.
    Headless(Box<Headless>),
}

/// Endpoints and EndpointSlices to apply, and slices of the same object to delete.
#[derive(Debug)]
pub(crate) struct Published {
    pub endpoints: Endpoints,
    pub slices: Vec<EndpointSlice>,
    pub stale_slices: Vec<String>,
}

/// A headless mirror's pods.
#[derive(Debug)]
pub(crate) struct Headless {
    pub pods: Vec<PodMirror>,
    /// Pods that are not mirrored, and why (logged).
    pub refused: Vec<(String, String)>,
    remote: Service,
    ports: Vec<EndpointPortSpec>,
    alive: bool,
}

/// The mirror of one pod of a headless Service.
#[derive(Debug)]
pub(crate) struct PodMirror {
    pub hostname: String,
    pub service: Service,
    pub live: Option<Service>,
    /// Its endpoints (the gateway), once the gateway is resolved.
    pub endpoints: Option<Published>,
}

impl Plan {
    fn skip(status: Option<Outcome>) -> Self {
        Self::Skip {
            status,
            notice: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::skip(Some(Outcome::failed("InvalidService", message)))
    }

    /// Names of Services the plan would create that the view has not said are free or taken:
    /// the worker asks the API server about these, and plans again.
    pub(crate) fn unchecked<'p>(&'p self, view: &'p View<'_>) -> Vec<String> {
        let Self::Mirror(m) = self else {
            return Vec::new();
        };
        let mut names = Vec::new();
        if m.live.is_none() && m.replace.is_none() {
            names.extend(m.service.metadata.name.clone());
        }
        if let MirrorEndpoints::Headless(h) = &m.endpoints {
            names.extend(
                h.pods
                    .iter()
                    .filter(|p| p.live.is_none())
                    .filter_map(|p| p.service.metadata.name.clone()),
            );
        }
        names.retain(|n| !view.foreign.contains(n));
        names
    }
}

/// The owner reference that makes `service` own its endpoints (and per-pod mirrors), so that
/// they go with it; `None` until the API server gave it a uid.
pub(crate) fn owner_reference(service: &Service) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: service.metadata.name.clone()?,
        uid: service.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// The two slices a mirror can have (one per address family; see `desired::gateway_slices`).
fn slice_names(mirror: &str) -> [String; 2] {
    [format!("{mirror}-ipv4"), format!("{mirror}-ipv6")]
}

impl Published {
    fn new(endpoints: Endpoints, slices: Vec<EndpointSlice>) -> Self {
        let mirror = endpoints.metadata.name.clone().unwrap_or_default();
        let stale_slices = slice_names(&mirror)
            .into_iter()
            .filter(|n| !slices.iter().any(|s| s.metadata.name.as_ref() == Some(n)))
            .collect();
        Self {
            endpoints,
            slices,
            stale_slices,
        }
    }

    /// Owned by `owner` (the written mirror Service).
    pub(crate) fn owned_by(mut self, owner: Option<&OwnerReference>) -> Self {
        let owners = owner.map(|o| vec![o.clone()]);
        self.endpoints.metadata.owner_references.clone_from(&owners);
        for s in &mut self.slices {
            s.metadata.owner_references.clone_from(&owners);
        }
        self
    }
}

impl Headless {
    /// The root mirror's Endpoints and slices, given the written per-pod mirrors' ClusterIPs
    /// (a pod whose mirror has none yet is left out until it has).
    pub(crate) fn root_endpoints(
        &self,
        target: &Target,
        root: &Service,
        pods: &[(String, IpAddr)],
    ) -> Published {
        let (ep, slices) =
            desired::headless_endpoints(target, &self.remote, root, pods, &self.ports, self.alive);
        Published::new(ep, slices).owned_by(owner_reference(root).as_ref())
    }
}

/// The ClusterIP a written per-pod mirror got.
pub(crate) fn cluster_ip(s: &Service) -> Option<IpAddr> {
    s.spec.as_ref()?.cluster_ip.as_deref()?.parse().ok()
}

/// What to do about remote Service `key`, given `view`. The rules, in order (each one decides
/// when it applies; the tests name each and each precedence):
///
/// 1. A mirror name Kubernetes would refuse: `InvalidService` (no mirror can exist).
/// 2. The mirror's name held by a per-pod mirror of a headless mirror: `InvalidService`.
/// 3. The remote Service gone or not exported: delete the mirror, if any.
/// 4. The remote Service is itself a mirror: `InvalidService` (mirrors are not mirrored).
/// 5. Its namespace missing here: `MissingNamespace`, unless namespaces are created.
/// 6. A Service `desired` refuses (no ports): `InvalidService`.
/// 7. The name held by a Service this Link did not make: `NameTaken`, left alone.
/// 8. Otherwise mirror it: headless (a mirror per named pod) when the remote is headless, its
///    endpoints have hostnames, headless mirroring is on and it is exported through the gateway;
///    a mirror switching between headless and ClusterIP is replaced; gateway mode publishes the
///    gateway, remote discovery publishes nothing here.
pub(crate) fn plan((ns, name): &Key, view: &View<'_>) -> Plan {
    let target = view.target;
    let exported = view.remote.and_then(|r| {
        desired::export_mode(
            view.spec,
            r.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        )
        .map(|mode| (r, mode))
    });

    // 1.
    let mirror_name = match naming::mirror_service_name(name, &target.cluster) {
        Ok(n) => n,
        Err(err) if exported.is_some() => return Plan::invalid(err.to_string()),
        Err(_) => return Plan::skip(None),
    };
    let local = (view.local)(&mirror_name);
    // 2.
    if let Some(root) = local
        .as_ref()
        .and_then(|l| l.labels().get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL))
    {
        return if exported.is_some() {
            Plan::invalid(format!(
                "its mirror's name {mirror_name} is taken by the mirror of pod {name} of headless Service {root}; rename the Service or the pod"
            ))
        } else {
            Plan::skip(None)
        };
    }
    // 3.
    let Some((remote, mode)) = exported else {
        return match local {
            Some(l) if desired::made_by(&l, &target.cluster) => Plan::Delete {
                pod_mirrors: if desired::is_headless(&l) {
                    (view.pod_mirrors)(&mirror_name)
                } else {
                    Vec::new()
                },
                mirror: Box::new(l),
            },
            _ => Plan::skip(None),
        };
    };
    // 4.
    if remote
        .labels()
        .get(keys::MIRRORED_RESOURCE_LABEL)
        .map(String::as_str)
        == Some("true")
    {
        return Plan::invalid(
            "this Service is itself a mirror of another cluster's Service; meshlink does not mirror mirrors",
        );
    }
    // 5.
    let create_namespace = !view.namespace_exists;
    if create_namespace && !view.create_namespaces {
        return Plan::Skip {
            status: Some(Outcome::failed(
                "MissingNamespace",
                format!(
                    "Namespace {ns} does not exist in this cluster: create it and the Service is mirrored at once"
                ),
            )),
            notice: Some(Notice::MissingNamespace),
        };
    }
    // 6. Linkerd's rule: headless when some endpoint has a hostname; otherwise the pods cannot
    // be named, and a ClusterIP mirror through the gateway serves them.
    let headless = mode == Mode::Gateway
        && view.headless_services
        && desired::is_headless(remote)
        && view.endpoints.named;
    let service = match if headless {
        desired::headless_mirror_service(target, remote)
    } else {
        desired::mirror_service(target, remote, mode)
    } {
        Ok(s) => s,
        Err(e) => return Plan::invalid(e.to_string()),
    };
    // 7. The local watch sees only this Link's mirrors: a name it does not know may be another
    // team's Service, which is never written over (nor, later, deleted).
    if local.is_none() && view.foreign.contains(&mirror_name) {
        return Plan::Skip {
            status: Some(Outcome::failed(
                "NameTaken",
                format!(
                    "Service {ns}/{mirror_name} exists and was not made by this Link: it is left alone, and the Service is mirrored once that name is free"
                ),
            )),
            notice: Some(Notice::NameTaken {
                mirror: mirror_name,
            }),
        };
    }
    // 8.
    let was_headless = local.as_ref().is_some_and(desired::is_headless);
    let (replace, live) = match local {
        Some(l) if was_headless != headless => (Some(l), None),
        l => (None, l),
    };
    let existing_pods = if was_headless || headless || desired::is_headless(remote) {
        (view.pod_mirrors)(&mirror_name)
    } else {
        Vec::new()
    };
    let endpoints = match (mode, view.gateway) {
        (Mode::Gateway, gateway) if headless => {
            MirrorEndpoints::Headless(Box::new(pods(view, remote, &service, gateway)))
        }
        (Mode::Gateway, Some(gateway)) => MirrorEndpoints::Gateway(Box::new(Published::new(
            desired::gateway_endpoints(target, remote, &service, view.endpoints.ready, gateway),
            desired::gateway_slices(target, remote, &service, view.endpoints.ready, gateway),
        ))),
        (Mode::Gateway, None) => MirrorEndpoints::Wait,
        (Mode::RemoteDiscovery, _) => MirrorEndpoints::None {
            endpoints: mirror_name.clone(),
            slices: slice_names(&mirror_name).into(),
        },
    };
    let keep: HashSet<&str> = match &endpoints {
        MirrorEndpoints::Headless(h) => h
            .pods
            .iter()
            .filter_map(|p| p.service.metadata.name.as_deref())
            .collect(),
        _ => HashSet::new(),
    };
    let stale_pod_mirrors = existing_pods
        .into_iter()
        .filter(|p| !keep.contains(p.name_any().as_str()))
        .collect();
    Plan::Mirror(Box::new(Mirror {
        create_namespace,
        replace,
        live,
        status: Outcome::mirrored(ns, &mirror_name),
        service,
        endpoints,
        stale_pod_mirrors,
    }))
}

/// The per-pod mirrors of headless mirror `root`, one per ready named pod, except those whose
/// name is invalid or held by something else.
fn pods(view: &View<'_>, remote: &Service, root: &Service, gateway: Option<&Gateway>) -> Headless {
    let target = view.target;
    let root_name = root.name_any();
    let mut pods = Vec::new();
    let mut refused = Vec::new();
    for (hostname, version) in &view.endpoints.hostnames {
        let service =
            match desired::endpoint_mirror_service(target, remote, &root_name, hostname, version) {
                Ok(s) => s,
                Err(e) => {
                    refused.push((hostname.clone(), e.to_string()));
                    continue;
                }
            };
        let name = service.name_any();
        let live = (view.local)(&name);
        // Never take over a Service that is not this root's: a mirror of a remote Service named
        // like the pod is left alone, and reports the collision itself.
        if let Some(l) = &live
            && l.labels().get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL) != Some(&root_name)
        {
            refused.push((
                hostname.clone(),
                format!("its mirror's name {name} is taken"),
            ));
            continue;
        }
        if live.is_none() && view.foreign.contains(&name) {
            refused.push((
                hostname.clone(),
                format!("a Service this Link did not make holds its mirror's name {name}"),
            ));
            continue;
        }
        let endpoints = gateway.map(|g| {
            let (ep, slices) = desired::endpoint_mirror_endpoints(target, remote, &service, g);
            Published::new(ep, slices)
        });
        pods.push(PodMirror {
            hostname: hostname.clone(),
            service,
            live,
            endpoints,
        });
    }
    Headless {
        pods,
        refused,
        remote: remote.clone(),
        ports: view.endpoints.ports.clone(),
        alive: gateway.is_none_or(|g| g.alive),
    }
}

#[cfg(test)]
mod tests;
