//! Where a target lives: one watch of Services and one of EndpointSlices per gateway (not per
//! connection), kept as a small index from `(namespace, service)` to its ports and its ready
//! endpoints. A lookup is a read of that index.
//!
//! Only exported Services are reachable by default ([`Export`]): a workload of a linked cluster
//! must not reach what this cluster never offered it (its identity service, its API server).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use link_crd::LabelSelector;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

type Key = (String, String);

#[derive(Clone, Debug, Default)]
struct ServiceInfo {
    /// (port, port name)
    ports: Vec<(u16, Option<String>)>,
    /// Its labels, for the export policy.
    labels: BTreeMap<String, String>,
}

/// Which Services the gateway forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    /// Any Service in any namespace (Linkerd's gateway).
    Any,
    /// Only Services whose labels match the selector.
    Selected(LabelSelector),
}

impl Default for Export {
    /// The Link's default selectors together: `mirror.linkerd.io/exported` is `true` (gateway
    /// mirrors) or `remote-discovery`.
    fn default() -> Self {
        Self::Selected(default_export_selector())
    }
}

/// `mirror.linkerd.io/exported in (true,remote-discovery)`.
pub fn default_export_selector() -> LabelSelector {
    use link_crd::keys;
    LabelSelector {
        match_labels: BTreeMap::new(),
        match_expressions: vec![link_crd::LabelSelectorRequirement {
            key: keys::EXPORTED_LABEL.to_owned(),
            operator: link_crd::operator::IN.to_owned(),
            values: vec![
                keys::EXPORTED_VALUE_GATEWAY.to_owned(),
                keys::EXPORTED_VALUE_REMOTE_DISCOVERY.to_owned(),
            ],
        }],
    }
}

impl Export {
    /// Whether a Service with `labels` may be reached through the gateway.
    pub fn allows(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Any => true,
            Self::Selected(selector) => selector.matches(labels),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct SliceInfo {
    /// (port name, port number)
    ports: Vec<(Option<String>, u16)>,
    ready: Vec<IpAddr>,
}

#[derive(Debug, Default)]
struct Index {
    services: HashMap<Key, ServiceInfo>,
    /// Slices by their Service, then by slice name.
    slices: HashMap<Key, HashMap<String, SliceInfo>>,
    /// Which Service each slice belongs to, so that a deleted or relabelled slice is found.
    slice_owner: HashMap<(String, String), Key>,
}

/// Why a target cannot be reached.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unresolved {
    #[error("no Service {namespace}/{name}")]
    NoService { namespace: String, name: String },
    #[error("Service {namespace}/{name} is not exported")]
    NotExported { namespace: String, name: String },
    #[error("Service {namespace}/{name} has no port {port}")]
    NoPort {
        namespace: String,
        name: String,
        port: u16,
    },
    #[error("Service {namespace}/{name} port {port} has no ready endpoints")]
    NoEndpoints {
        namespace: String,
        name: String,
        port: u16,
    },
}

/// The ready endpoints of a target, and a cursor to spread connections over them.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub addrs: Vec<SocketAddr>,
    cursor: Arc<AtomicUsize>,
}

impl Endpoints {
    /// The endpoints in the order to try them: round-robin across connections and requests.
    pub fn ordered(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let n = self.addrs.len();
        (0..n).map(move |i| self.addrs[(start + i) % n])
    }
}

/// The gateway's view of local Services.
#[derive(Clone, Debug)]
pub struct Discovery {
    index: Arc<RwLock<Index>>,
    cursor: Arc<AtomicUsize>,
    synced: watch::Sender<bool>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            index: Arc::default(),
            cursor: Arc::default(),
            synced: watch::Sender::new(false),
        }
    }
}

impl Discovery {
    /// The ready endpoints of `namespace/name` port `port`, if `export` offers that Service.
    pub fn resolve(
        &self,
        export: &Export,
        namespace: &str,
        name: &str,
        port: u16,
    ) -> Result<Endpoints, Unresolved> {
        let index = self
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (namespace.to_owned(), name.to_owned());
        let svc = index
            .services
            .get(&key)
            .ok_or_else(|| Unresolved::NoService {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        // Before the port, so that a client learns nothing about a Service it may not reach.
        if !export.allows(&svc.labels) {
            return Err(Unresolved::NotExported {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        }
        let (_, port_name) =
            svc.ports
                .iter()
                .find(|(p, _)| *p == port)
                .ok_or_else(|| Unresolved::NoPort {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    port,
                })?;
        let mut addrs = Vec::new();
        for slice in index.slices.get(&key).into_iter().flat_map(HashMap::values) {
            if let Some((_, target)) = slice.ports.iter().find(|(n, _)| n == port_name) {
                addrs.extend(slice.ready.iter().map(|ip| SocketAddr::new(*ip, *target)));
            }
        }
        if addrs.is_empty() {
            return Err(Unresolved::NoEndpoints {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port,
            });
        }
        addrs.sort_unstable();
        addrs.dedup();
        Ok(Endpoints {
            addrs,
            cursor: self.cursor.clone(),
        })
    }

    /// True once both watches have listed everything.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Marks the index complete (tests that fill it by hand).
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a Service (added or changed).
    pub fn apply_service(&self, svc: &Service) {
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        let ports = svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((u16::try_from(p.port).ok()?, p.name.clone())))
            .collect();
        let labels = svc.labels().clone();
        self.write()
            .services
            .insert(key, ServiceInfo { ports, labels });
    }

    pub fn delete_service(&self, svc: &Service) {
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        self.write().services.remove(&key);
    }

    /// Records an EndpointSlice (added or changed): its ports and its ready addresses.
    pub fn apply_slice(&self, slice: &EndpointSlice) {
        let ns = slice.namespace().unwrap_or_default();
        let slice_name = slice.name_any();
        let mut index = self.write();
        remove_slice(&mut index, &ns, &slice_name);
        let Some(svc) = slice.labels().get(SERVICE_NAME_LABEL).cloned() else {
            return;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return;
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.port?).ok()?)))
            .collect();
        // Kubernetes: a nil `ready` means unknown and is to be read as ready.
        let ready = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter())
            .filter_map(|a| a.parse().ok())
            .collect();
        let key = (ns.clone(), svc);
        index
            .slice_owner
            .insert((ns, slice_name.clone()), key.clone());
        index
            .slices
            .entry(key)
            .or_default()
            .insert(slice_name, SliceInfo { ports, ready });
    }

    pub fn delete_slice(&self, slice: &EndpointSlice) {
        let ns = slice.namespace().unwrap_or_default();
        remove_slice(&mut self.write(), &ns, &slice.name_any());
    }

    /// Runs both watches until `cancel`; marks the index synced once both have listed.
    pub async fn run(self, client: kube::Client, cancel: CancellationToken) {
        let services = watcher(
            kube::Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let slices = watcher(
            kube::Api::<EndpointSlice>::all(client),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
        )
        .default_backoff();
        let mut services = std::pin::pin!(services);
        let mut slices = std::pin::pin!(slices);
        let (mut svc_synced, mut slice_synced) = (false, false);
        // Objects seen during a (re)list, so that those gone since are dropped at its end.
        let mut relist_services: Option<Vec<Service>> = None;
        let mut relist_slices: Option<Vec<EndpointSlice>> = None;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                event = services.next() => match event {
                    Some(Ok(watcher::Event::Apply(s))) => self.apply_service(&s),
                    Some(Ok(watcher::Event::Delete(s))) => self.delete_service(&s),
                    Some(Ok(watcher::Event::Init)) => relist_services = Some(Vec::new()),
                    Some(Ok(watcher::Event::InitApply(s))) => {
                        relist_services.get_or_insert_default().push(s);
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let listed = relist_services.take().unwrap_or_default();
                        self.write().services.clear();
                        listed.iter().for_each(|s| self.apply_service(s));
                        svc_synced = true;
                    }
                    Some(Err(error)) => tracing::warn!(%error, "watching Services"),
                    None => return,
                },
                event = slices.next() => match event {
                    Some(Ok(watcher::Event::Apply(s))) => self.apply_slice(&s),
                    Some(Ok(watcher::Event::Delete(s))) => self.delete_slice(&s),
                    Some(Ok(watcher::Event::Init)) => relist_slices = Some(Vec::new()),
                    Some(Ok(watcher::Event::InitApply(s))) => {
                        relist_slices.get_or_insert_default().push(s);
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let listed = relist_slices.take().unwrap_or_default();
                        {
                            let mut index = self.write();
                            index.slices.clear();
                            index.slice_owner.clear();
                        }
                        listed.iter().for_each(|s| self.apply_slice(s));
                        slice_synced = true;
                    }
                    Some(Err(error)) => tracing::warn!(%error, "watching EndpointSlices"),
                    None => return,
                },
            }
            if svc_synced && slice_synced && !*self.synced.borrow() {
                tracing::info!("discovery synced");
                self.synced.send_replace(true);
            }
        }
    }
}

fn remove_slice(index: &mut Index, ns: &str, slice: &str) {
    if let Some(owner) = index.slice_owner.remove(&(ns.to_owned(), slice.to_owned()))
        && let Some(slices) = index.slices.get_mut(&owner)
    {
        slices.remove(slice);
        if slices.is_empty() {
            index.slices.remove(&owner);
        }
    }
}

/// Splits a target name `<service>.<namespace>.<suffix>` for one of the allowed suffixes.
/// `None` means outside every suffix; `Some(Err(()))` inside one but not a Service name.
pub fn split_target<'a>(
    name: &'a str,
    suffixes: &[String],
) -> Option<Result<(&'a str, &'a str), ()>> {
    let name = name.trim_end_matches('.');
    let rest = suffixes.iter().find_map(|suffix| {
        let suffix = suffix.trim_end_matches('.');
        name.strip_suffix(suffix)?.strip_suffix('.')
    })?;
    Some(match rest.split_once('.') {
        Some((svc, ns)) if !svc.is_empty() && !ns.is_empty() && !ns.contains('.') => Ok((svc, ns)),
        _ => Err(()),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::{ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
    };
    use kube::api::ObjectMeta;

    use super::*;

    fn service(ns: &str, name: &str, ports: &[(i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([("mirror.linkerd.io/exported".into(), "true".into())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, n)| ServicePort {
                            port: *p,
                            name: Some((*n).into()),
                            ..ServicePort::default()
                        })
                        .collect(),
                ),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    pub(crate) fn slice(
        ns: &str,
        svc: &str,
        name: &str,
        port: (&str, i32),
        eps: &[(&str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), svc.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(port.0.into()),
                port: Some(port.1),
                ..EndpointPort::default()
            }]),
            endpoints: Some(
                eps.iter()
                    .map(|(ip, ready)| Endpoint {
                        addresses: vec![(*ip).into()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn resolves_ready_endpoints_through_the_port_name() {
        let d = Discovery::default();
        d.apply_service(&service("shop", "web", &[(80, "http"), (9000, "admin")]));
        d.apply_slice(&slice(
            "shop",
            "web",
            "web-a",
            ("http", 8080),
            &[
                ("10.0.0.1", Some(true)),
                ("10.0.0.2", Some(false)),
                ("10.0.0.3", None),
            ],
        ));
        d.apply_slice(&slice(
            "shop",
            "web",
            "web-b",
            ("admin", 9999),
            &[("10.0.0.4", Some(true))],
        ));
        let eps = d.resolve(&Export::default(), "shop", "web", 80).unwrap();
        assert_eq!(
            eps.addrs,
            vec![
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.3:8080".parse().unwrap()
            ]
        );
        // Round-robin: consecutive orders start at different endpoints.
        let a: Vec<_> = eps.ordered().collect();
        let b: Vec<_> = eps.ordered().collect();
        assert_ne!(a[0], b[0]);
        assert_eq!(
            d.resolve(&Export::default(), "shop", "web", 9000)
                .unwrap()
                .addrs,
            vec!["10.0.0.4:9999".parse().unwrap()]
        );
        assert!(matches!(
            d.resolve(&Export::default(), "shop", "web", 81),
            Err(Unresolved::NoPort { .. })
        ));
        assert!(matches!(
            d.resolve(&Export::default(), "shop", "db", 80),
            Err(Unresolved::NoService { .. })
        ));
        d.delete_slice(&slice("shop", "web", "web-a", ("http", 8080), &[]));
        assert!(matches!(
            d.resolve(&Export::default(), "shop", "web", 80),
            Err(Unresolved::NoEndpoints { .. })
        ));
    }

    #[test]
    fn export_policy() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let exported = "mirror.linkerd.io/exported";
        let custom: LabelSelector = "team=shop,tier in (web)".parse().unwrap();
        for (export, pairs, allowed) in [
            (Export::default(), vec![(exported, "true")], true),
            (
                Export::default(),
                vec![(exported, "remote-discovery")],
                true,
            ),
            (Export::default(), vec![(exported, "false")], false),
            (Export::default(), vec![(exported, "TRUE")], false),
            (Export::default(), vec![("app", "web")], false),
            (Export::default(), vec![], false),
            (Export::Any, vec![], true),
            (Export::Any, vec![(exported, "false")], true),
            (
                Export::Selected(custom.clone()),
                vec![("team", "shop"), ("tier", "web")],
                true,
            ),
            (
                Export::Selected(custom.clone()),
                vec![(exported, "true")],
                false,
            ),
            // An empty selector matches nothing (as a Link's does), never everything.
            (Export::Selected(LabelSelector::default()), vec![], false),
        ] {
            assert_eq!(
                export.allows(&labels(&pairs)),
                allowed,
                "{export:?} {pairs:?}"
            );
        }
    }

    #[test]
    fn unexported_services_are_not_resolved() {
        let d = Discovery::default();
        let mut svc = service("kube-system", "secret", &[(80, "http")]);
        svc.metadata.labels = None;
        d.apply_service(&svc);
        d.apply_slice(&slice(
            "kube-system",
            "secret",
            "secret-a",
            ("http", 8080),
            &[("10.0.0.9", Some(true))],
        ));
        // Not even the port is checked: an unknown port says the same.
        for port in [80, 81] {
            assert!(matches!(
                d.resolve(&Export::default(), "kube-system", "secret", port),
                Err(Unresolved::NotExported { .. })
            ));
        }
        assert!(d.resolve(&Export::Any, "kube-system", "secret", 80).is_ok());
        // Labelled later: reachable from then on.
        svc.metadata.labels = Some([("mirror.linkerd.io/exported".into(), "true".into())].into());
        d.apply_service(&svc);
        assert!(
            d.resolve(&Export::default(), "kube-system", "secret", 80)
                .is_ok()
        );
    }

    #[test]
    fn target_names() {
        let suffixes = vec!["svc.cluster.local.".to_owned()];
        assert_eq!(
            split_target("web.shop.svc.cluster.local", &suffixes),
            Some(Ok(("web", "shop")))
        );
        assert_eq!(
            split_target("web.shop.svc.cluster.local.", &suffixes),
            Some(Ok(("web", "shop")))
        );
        assert_eq!(split_target("web.shop.svc.other.local", &suffixes), None);
        assert_eq!(split_target("evilsvc.cluster.local", &suffixes), None);
        assert_eq!(
            split_target("a.b.shop.svc.cluster.local", &suffixes),
            Some(Err(()))
        );
        assert_eq!(
            split_target("shop.svc.cluster.local", &suffixes),
            Some(Err(()))
        );
        assert_eq!(split_target("svc.cluster.local", &suffixes), None);
    }
}
