//! Where a target lives: one watch of Services, one of EndpointSlices and one of this mesh's
//! Pods per gateway (not per connection), kept as a small index from `(namespace, service)` to
//! its ports and its ready endpoints, and from a meshed Pod to its proxy's identity. A lookup is
//! a read of that index, joining each endpoint to its Pod (the slice's `targetRef`), so that a
//! meshed endpoint is dialled over mTLS as the identity its proxy proves.
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
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use link_crd::LabelSelector;
pub use link_crd::keys::CONTROL_PLANE_NS_LABEL;
use proxy_identity::Id;
use proxy_transport::dial::Peer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The injected proxy's container, and the variable that says where it accepts connections
/// (the injector's `LINKERD2_PROXY_INBOUND_LISTEN_ADDR=0.0.0.0:4143`).
const PROXY_CONTAINER: &str = "linkerd-proxy";
const INBOUND_LISTEN_ADDR_ENV: &str = "LINKERD2_PROXY_INBOUND_LISTEN_ADDR";
/// Linkerd's proxy inbound port, when the Pod does not say otherwise.
const DEFAULT_INBOUND_PORT: u16 = 4143;

/// `(namespace, name)`.
type Key = (String, String);

/// The mesh this gateway belongs to, as its identities name it: Linkerd's identity service
/// certifies a Pod's proxy as `<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust
/// domain>` and the injector labels the Pod `linkerd.io/control-plane-ns=<control-plane-ns>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub control_plane_ns: String,
    pub trust_domain: String,
}

/// How a meshed Pod's proxy is reached: the identity it proves and its inbound port (where
/// opaque connections go with a transport header).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Meshed {
    pub identity: Id,
    pub inbound_port: u16,
}

impl Mesh {
    /// The mesh that issued `own`, this gateway's identity (itself a ServiceAccount's).
    pub fn of(own: &Id) -> Option<Self> {
        let (control_plane_ns, trust_domain) = own.control_plane()?;
        Some(Self {
            control_plane_ns: control_plane_ns.to_owned(),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// The Pods worth watching: this control plane's.
    fn pod_selector(&self) -> String {
        format!("{CONTROL_PLANE_NS_LABEL}={}", self.control_plane_ns)
    }

    /// The identity of a Pod of `namespace` running as `service_account` (Kubernetes' `default`
    /// when unset) whose `linkerd.io/control-plane-ns` label is `control_plane_label`: `None`
    /// unless this mesh's injector meshed it, as the destination service decides.
    pub fn identity(
        &self,
        namespace: &str,
        service_account: Option<&str>,
        control_plane_label: Option<&str>,
    ) -> Option<Id> {
        if control_plane_label != Some(self.control_plane_ns.as_str()) {
            return None;
        }
        Id::service_account(
            service_account.unwrap_or("default"),
            namespace,
            &self.control_plane_ns,
            &self.trust_domain,
        )
        .ok()
    }

    /// What the gateway keeps of a Pod: its proxy, if this mesh meshed it.
    pub fn meshed(&self, pod: &Pod) -> Option<Meshed> {
        let spec = pod.spec.as_ref();
        let identity = self.identity(
            pod.namespace().as_deref().unwrap_or_default(),
            spec.and_then(|s| s.service_account_name.as_deref()),
            pod.labels().get(CONTROL_PLANE_NS_LABEL).map(String::as_str),
        )?;
        let inbound_port = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .filter(|c| c.name == PROXY_CONTAINER)
            .flat_map(|c| c.env.iter().flatten())
            .find(|e| e.name == INBOUND_LISTEN_ADDR_ENV)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(DEFAULT_INBOUND_PORT);
        Some(Meshed {
            identity,
            inbound_port,
        })
    }
}

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
    /// Ready addresses, each with its Pod's name when its `targetRef` is a Pod.
    ready: Vec<(IpAddr, Option<String>)>,
}

#[derive(Debug, Default)]
struct Index {
    services: HashMap<Key, ServiceInfo>,
    /// Slices by their Service, then by slice name.
    slices: HashMap<Key, HashMap<String, SliceInfo>>,
    /// Which Service each slice belongs to, so that a deleted or relabelled slice is found.
    slice_owner: HashMap<(String, String), Key>,
    /// This mesh's Pods, by `(namespace, name)`: all that is kept of them.
    pods: HashMap<Key, Meshed>,
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

/// A ready endpoint: its address and, when its Pod is meshed, its proxy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub meshed: Option<Meshed>,
}

impl Endpoint {
    /// The endpoint as HTTP dials it: its own address, in mTLS when it is meshed (its proxy
    /// terminates TLS for its identity and detects the HTTP version inside).
    pub fn peer(&self) -> Peer {
        Peer {
            addr: self.addr,
            identity: self.meshed.as_ref().map(|m| m.identity.clone()),
        }
    }
}

/// The ready endpoints of a target, and a cursor to spread connections over them.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub all: Vec<Endpoint>,
    cursor: Arc<AtomicUsize>,
}

impl Endpoints {
    /// The endpoints in the order to try them: round-robin across connections and requests.
    pub fn ordered(&self) -> impl Iterator<Item = &Endpoint> + '_ {
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let n = self.all.len();
        (0..n).map(move |i| &self.all[(start + i) % n])
    }
}

/// The gateway's view of local Services.
#[derive(Clone, Debug)]
pub struct Discovery {
    index: Arc<RwLock<Index>>,
    cursor: Arc<AtomicUsize>,
    synced: watch::Sender<bool>,
    /// `None`: no Pod is known to be meshed, and every endpoint is dialled in plaintext.
    mesh: Option<Arc<Mesh>>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Discovery {
    /// Discovery whose endpoints are dialled over mTLS when `mesh` meshed their Pod.
    pub fn new(mesh: Option<Mesh>) -> Self {
        Self {
            index: Arc::default(),
            cursor: Arc::default(),
            synced: watch::Sender::new(false),
            mesh: mesh.map(Arc::new),
        }
    }

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
        let mut all = Vec::new();
        for slice in index.slices.get(&key).into_iter().flat_map(HashMap::values) {
            if let Some((_, target)) = slice.ports.iter().find(|(n, _)| n == port_name) {
                all.extend(slice.ready.iter().map(|(ip, pod)| {
                    Endpoint {
                        addr: SocketAddr::new(*ip, *target),
                        meshed: pod
                            .as_ref()
                            .and_then(|pod| index.pods.get(&(namespace.to_owned(), pod.clone())))
                            .cloned(),
                    }
                }));
            }
        }
        if all.is_empty() {
            return Err(Unresolved::NoEndpoints {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                port,
            });
        }
        all.sort_unstable();
        all.dedup_by_key(|e| e.addr);
        Ok(Endpoints {
            all,
            cursor: self.cursor.clone(),
        })
    }

    /// True once every watch has listed everything.
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

    /// Records an object (added or changed).
    fn apply<K: Watched>(&self, obj: &K) {
        let info = obj.project(self);
        K::put(&mut self.write(), key(obj), info);
    }

    fn delete<K: Watched>(&self, obj: &K) {
        K::remove(&mut self.write(), &key(obj));
    }

    /// Records a Service (added or changed).
    pub fn apply_service(&self, svc: &Service) {
        self.apply(svc);
    }

    pub fn delete_service(&self, svc: &Service) {
        self.delete(svc);
    }

    /// Records an EndpointSlice (added or changed): its ports and its ready addresses.
    pub fn apply_slice(&self, slice: &EndpointSlice) {
        self.apply(slice);
    }

    pub fn delete_slice(&self, slice: &EndpointSlice) {
        self.delete(slice);
    }

    /// Records a Pod (added or changed): its proxy if it is meshed, else nothing.
    pub fn apply_pod(&self, pod: &Pod) {
        self.apply(pod);
    }

    pub fn delete_pod(&self, pod: &Pod) {
        self.delete(pod);
    }

    /// Runs the watches until `cancel`; marks the index synced once each has listed. Pods are
    /// watched only with a mesh, and then only its own (a label selector), each kept as its
    /// identity and inbound port.
    pub async fn run(self, client: kube::Client, cancel: CancellationToken) {
        let watches = if self.mesh.is_some() { 3 } else { 2 };
        let listed = watch::Sender::new(0usize);
        let services = self.follow(
            kube::Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            &listed,
        );
        let slices = self.follow(
            kube::Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            &listed,
        );
        let pods = async {
            match &self.mesh {
                Some(mesh) => {
                    let config = watcher::Config::default().labels(&mesh.pod_selector());
                    self.follow(kube::Api::<Pod>::all(client), config, &listed)
                        .await;
                }
                None => std::future::pending().await,
            }
        };
        let synced = async {
            let _ = listed.subscribe().wait_for(|n| *n == watches).await;
            tracing::info!("discovery synced");
            self.synced.send_replace(true);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = cancel.cancelled() => {}
            () = services => {}
            () = slices => {}
            () = pods => {}
            () = synced => {}
        }
    }

    /// Keeps the index's part for `K` up to date until its watch ends; counts in `listed` its
    /// first complete list. A relist replaces that part at its end, so that objects gone since
    /// are dropped; it holds only the projections meanwhile, not the objects.
    async fn follow<K: Watched>(
        &self,
        api: kube::Api<K>,
        config: watcher::Config,
        listed: &watch::Sender<usize>,
    ) {
        let events = watcher(api, config).default_backoff();
        let mut events = std::pin::pin!(events);
        let mut relist: Option<Vec<(Key, K::Info)>> = None;
        let mut counted = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(o)) => self.apply(&o),
                Ok(watcher::Event::Delete(o)) => self.delete(&o),
                Ok(watcher::Event::Init) => relist = Some(Vec::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    let info = o.project(self);
                    relist.get_or_insert_default().push((key(&o), info));
                }
                Ok(watcher::Event::InitDone) => {
                    let listed_now = relist.take().unwrap_or_default();
                    {
                        let mut index = self.write();
                        K::clear(&mut index);
                        for (k, info) in listed_now {
                            K::put(&mut index, k, info);
                        }
                    }
                    if !counted {
                        counted = true;
                        listed.send_modify(|n| *n += 1);
                    }
                }
                Err(error) => tracing::warn!(%error, kind = K::KIND, "watch failed; retrying"),
            }
        }
    }
}

fn key<K: kube::Resource>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// A watched kind: what the index keeps of one of its objects, and where.
trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + k8s_openapi::serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + 'static
{
    const KIND: &'static str;
    /// What is kept of an object.
    type Info: Send;
    fn project(&self, discovery: &Discovery) -> Self::Info;
    /// Records `info` for the object `key`, replacing what was kept of it.
    fn put(index: &mut Index, key: Key, info: Self::Info);
    fn remove(index: &mut Index, key: &Key);
    /// Forgets every object of the kind (before a relist is put).
    fn clear(index: &mut Index);
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    type Info = ServiceInfo;

    fn project(&self, _: &Discovery) -> ServiceInfo {
        let ports = self
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((u16::try_from(p.port).ok()?, p.name.clone())))
            .collect();
        let labels = self.labels().clone();
        ServiceInfo { ports, labels }
    }

    fn put(index: &mut Index, key: Key, info: ServiceInfo) {
        index.services.insert(key, info);
    }

    fn remove(index: &mut Index, key: &Key) {
        index.services.remove(key);
    }

    fn clear(index: &mut Index) {
        index.services.clear();
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    /// Its Service and what is kept of it; `None` for a slice of no Service or of addresses
    /// other than IP.
    type Info = Option<(String, SliceInfo)>;

    fn project(&self, _: &Discovery) -> Self::Info {
        let svc = self.labels().get(SERVICE_NAME_LABEL).cloned()?;
        if !matches!(self.address_type.as_str(), "IPv4" | "IPv6") {
            return None;
        }
        let ports = self
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p.name.clone(), u16::try_from(p.port?).ok()?)))
            .collect();
        // Kubernetes: a nil `ready` means unknown and is to be read as ready.
        let ready = self
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| {
                // A Pod of the slice's own namespace (the only kind a Service selects).
                let pod = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .filter(|r| r.namespace.is_none() || r.namespace == self.namespace())
                    .and_then(|r| r.name.clone());
                e.addresses
                    .iter()
                    .filter_map(move |a| Some((a.parse().ok()?, pod.clone())))
            })
            .collect();
        Some((svc, SliceInfo { ports, ready }))
    }

    fn put(index: &mut Index, (ns, slice): Key, info: Self::Info) {
        remove_slice(index, &ns, &slice);
        let Some((svc, info)) = info else { return };
        let owner = (ns.clone(), svc);
        index.slice_owner.insert((ns, slice.clone()), owner.clone());
        index.slices.entry(owner).or_default().insert(slice, info);
    }

    fn remove(index: &mut Index, (ns, slice): &Key) {
        remove_slice(index, ns, slice);
    }

    fn clear(index: &mut Index) {
        index.slices.clear();
        index.slice_owner.clear();
    }
}

impl Watched for Pod {
    const KIND: &'static str = "Pod";
    /// Its proxy, if this gateway's mesh meshed it.
    type Info = Option<Meshed>;

    fn project(&self, discovery: &Discovery) -> Option<Meshed> {
        discovery.mesh.as_ref()?.meshed(self)
    }

    fn put(index: &mut Index, key: Key, info: Option<Meshed>) {
        match info {
            Some(meshed) => index.pods.insert(key, meshed),
            None => index.pods.remove(&key),
        };
    }

    fn remove(index: &mut Index, key: &Key) {
        index.pods.remove(key);
    }

    fn clear(index: &mut Index) {
        index.pods.clear();
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
    use k8s_openapi::serde_json;
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

    fn addrs(eps: &Endpoints) -> Vec<SocketAddr> {
        eps.all.iter().map(|e| e.addr).collect()
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
            addrs(&eps),
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
            addrs(&d.resolve(&Export::default(), "shop", "web", 9000).unwrap()),
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

    const CP: &str = "linkerd";
    const TD: &str = "east.example";

    fn mesh() -> Mesh {
        Mesh {
            control_plane_ns: CP.into(),
            trust_domain: TD.into(),
        }
    }

    /// A Pod of `shop` as the injector leaves it: `label` on `linkerd.io/control-plane-ns`,
    /// and a proxy container listening on `inbound` when given.
    fn pod(name: &str, sa: Option<&str>, label: Option<&str>, inbound: Option<&str>) -> Pod {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": "shop", "name": name },
            "spec": { "containers": [{ "name": "app" }] },
        }))
        .unwrap();
        if let Some(label) = label {
            pod.metadata.labels = Some([(CONTROL_PLANE_NS_LABEL.into(), label.into())].into());
        }
        let spec = pod.spec.as_mut().unwrap();
        spec.service_account_name = sa.map(str::to_owned);
        if let Some(addr) = inbound {
            spec.containers.push(
                serde_json::from_value(serde_json::json!({
                    "name": "linkerd-proxy",
                    "env": [{ "name": "LINKERD2_PROXY_INBOUND_LISTEN_ADDR", "value": addr }],
                }))
                .unwrap(),
            );
        }
        pod
    }

    #[test]
    fn the_mesh_is_the_gateways_own() {
        let gw = Id::parse(
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.example",
        )
        .unwrap();
        assert_eq!(Mesh::of(&gw), Some(mesh()));
        assert_eq!(Mesh::of(&Id::parse("gateway.test").unwrap()), None);
        assert_eq!(mesh().pod_selector(), "linkerd.io/control-plane-ns=linkerd");
    }

    #[test]
    fn pod_identities() {
        let web = "web.shop.serviceaccount.identity.linkerd.east.example";
        let default = "default.shop.serviceaccount.identity.linkerd.east.example";
        for (sa, label, expected) in [
            (Some("web"), Some(CP), Some(web)),
            // No ServiceAccount named: Kubernetes runs it as `default`.
            (None, Some(CP), Some(default)),
            // Unmeshed, or meshed by another control plane: no identity this mesh vouches for.
            (Some("web"), None, None),
            (Some("web"), Some("other"), None),
            (Some("web"), Some(""), None),
            // Not a name an identity can be made of.
            (Some("Web_1"), Some(CP), None),
        ] {
            assert_eq!(
                mesh().identity("shop", sa, label),
                expected.map(|e| Id::parse(e).unwrap()),
                "{sa:?} {label:?}"
            );
        }
    }

    #[test]
    fn a_meshed_pods_proxy() {
        let web = Id::parse("web.shop.serviceaccount.identity.linkerd.east.example").unwrap();
        for (inbound, port) in [
            (None, 4143),
            (Some("0.0.0.0:4143"), 4143),
            (Some("[::]:5143"), 5143),
            (Some("nonsense"), 4143),
        ] {
            assert_eq!(
                mesh().meshed(&pod("web-0", Some("web"), Some(CP), inbound)),
                Some(Meshed {
                    identity: web.clone(),
                    inbound_port: port
                }),
                "{inbound:?}"
            );
        }
        assert_eq!(mesh().meshed(&pod("web-0", Some("web"), None, None)), None);
    }

    /// `slice` with each endpoint's `targetRef` naming the Pod `pods[i]` (when `Some`).
    fn with_pods(mut slice: EndpointSlice, pods: &[Option<&str>]) -> EndpointSlice {
        for (e, pod) in slice.endpoints.iter_mut().flatten().zip(pods) {
            e.target_ref = pod.map(|p| k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                namespace: Some("shop".into()),
                name: Some(p.into()),
                ..Default::default()
            });
        }
        slice
    }

    #[test]
    fn endpoints_carry_their_pods_identity() {
        let d = Discovery::new(Some(mesh()));
        d.apply_service(&service("shop", "web", &[(80, "http")]));
        d.apply_slice(&with_pods(
            slice(
                "shop",
                "web",
                "web-a",
                ("http", 8080),
                &[
                    ("10.0.0.1", Some(true)),
                    ("10.0.0.2", Some(true)),
                    ("10.0.0.3", Some(true)),
                ],
            ),
            &[Some("web-0"), Some("plain-0"), None],
        ));
        d.apply_pod(&pod("web-0", Some("web"), Some(CP), Some("0.0.0.0:4143")));
        d.apply_pod(&pod("plain-0", Some("web"), None, None));
        let web = Meshed {
            identity: Id::parse("web.shop.serviceaccount.identity.linkerd.east.example").unwrap(),
            inbound_port: 4143,
        };
        let resolved = |d: &Discovery| -> Vec<(SocketAddr, Option<Meshed>)> {
            d.resolve(&Export::default(), "shop", "web", 80)
                .unwrap()
                .all
                .into_iter()
                .map(|e| (e.addr, e.meshed))
                .collect()
        };
        let a = "10.0.0.1:8080".parse().unwrap();
        let b = "10.0.0.2:8080".parse().unwrap();
        let c = "10.0.0.3:8080".parse().unwrap();
        assert_eq!(
            resolved(&d),
            vec![(a, Some(web.clone())), (b, None), (c, None)]
        );
        // The Pod leaves the mesh (its label is gone): plaintext from then on; and back.
        d.apply_pod(&pod("web-0", Some("web"), None, None));
        assert_eq!(resolved(&d), vec![(a, None), (b, None), (c, None)]);
        d.apply_pod(&pod("web-0", Some("web"), Some(CP), None));
        assert_eq!(resolved(&d)[0], (a, Some(web.clone())));
        d.delete_pod(&pod("web-0", Some("web"), Some(CP), None));
        assert_eq!(resolved(&d)[0], (a, None));
        // Without a mesh, nothing is meshed.
        let plain = Discovery::default();
        plain.apply_service(&service("shop", "web", &[(80, "http")]));
        plain.apply_slice(&with_pods(
            slice(
                "shop",
                "web",
                "web-a",
                ("http", 8080),
                &[("10.0.0.1", None)],
            ),
            &[Some("web-0")],
        ));
        plain.apply_pod(&pod("web-0", Some("web"), Some(CP), None));
        assert_eq!(resolved(&plain), vec![(a, None)]);
    }
}
