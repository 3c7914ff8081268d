//! Everything the service knows, as plain data: this cluster's Services, EndpointSlices, Pods and
//! Namespaces, and each linked cluster's EndpointSlices and Pods. Each change returns the
//! [`Topic`]s it touched, so that only the streams that asked about them recompute. No I/O here:
//! the watches feed it, the answers read it, and tests build it from API objects.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use crate::model::{Key, NamespaceInfo, PodInfo, ServiceInfo, SliceInfo};

/// What a stream depends on; a change to it wakes the stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// A Service of this cluster: the object, its slices and their Pods.
    Service(Key),
    /// A Service of a linked cluster: its slices and their Pods.
    Remote(String, Key),
    /// Whatever holds this address (a Service's ClusterIP, a Pod).
    Ip(IpAddr),
    /// A Pod of this cluster (its inbound policy).
    Pod(Key),
    /// A namespace's annotations; a change also wakes every Service topic of the namespace.
    Namespace(String),
    /// A linked cluster as a whole (its settings, its arrival or removal); a change also wakes
    /// every Remote topic of the cluster.
    Cluster(String),
}

/// The slices and Pods of one cluster.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub slices: HashMap<Key, SliceInfo>,
    /// Service -> names of its slices (same namespace).
    pub slices_by_service: HashMap<Key, BTreeSet<String>>,
    pub pods: HashMap<Key, PodInfo>,
    /// Pod -> the Services (same namespace) whose slices list it, with how many slices do.
    pod_services: HashMap<Key, HashMap<String, u32>>,
}

/// How a linked cluster's identities are made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSettings {
    pub trust_domain: String,
    pub control_plane_ns: String,
}

/// A linked cluster.
#[derive(Debug)]
pub struct Remote {
    pub settings: RemoteSettings,
    pub state: ClusterState,
}

/// Which cluster a slice or a Pod belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster<'a> {
    Local,
    Linked(&'a str),
}

#[derive(Debug, Default)]
pub struct Index {
    pub local: ClusterState,
    pub services: HashMap<Key, ServiceInfo>,
    pub svc_by_ip: HashMap<IpAddr, Key>,
    pub pods_by_ip: HashMap<IpAddr, Key>,
    pub namespaces: HashMap<String, NamespaceInfo>,
    pub remotes: HashMap<String, Remote>,
}

/// The kinds of object the index holds, for relists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    Slice,
    Pod,
    Namespace,
}

impl ClusterState {
    /// The slices of a Service.
    pub fn slices_of<'a>(&'a self, svc: &'a Key) -> impl Iterator<Item = &'a SliceInfo> + 'a {
        self.slices_by_service
            .get(svc)
            .into_iter()
            .flatten()
            .filter_map(move |name| self.slices.get(&(svc.0.clone(), name.clone())))
    }

    fn topic(cluster: Cluster<'_>, svc: Key) -> Topic {
        match cluster {
            Cluster::Local => Topic::Service(svc),
            Cluster::Linked(c) => Topic::Remote(c.to_owned(), svc),
        }
    }

    fn apply_slice(
        &mut self,
        cluster: Cluster<'_>,
        key: Key,
        slice: Option<SliceInfo>,
        topics: &mut Vec<Topic>,
    ) {
        let ns = key.0.clone();
        if let Some(old) = self.slices.remove(&key) {
            if slice.as_ref() == Some(&old) {
                self.slices.insert(key, old);
                return;
            }
            let svc = (ns.clone(), old.service.clone());
            if let Some(names) = self.slices_by_service.get_mut(&svc) {
                names.remove(&key.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            for pod in old.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                let pod_key = (ns.clone(), pod.clone());
                if let Some(services) = self.pod_services.get_mut(&pod_key) {
                    if let Some(n) = services.get_mut(&old.service) {
                        *n -= 1;
                        if *n == 0 {
                            services.remove(&old.service);
                        }
                    }
                    if services.is_empty() {
                        self.pod_services.remove(&pod_key);
                    }
                }
            }
            topics.push(Self::topic(cluster, svc));
        }
        if let Some(new) = slice {
            let svc = (ns.clone(), new.service.clone());
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(key.1.clone());
            for pod in new.endpoints.iter().filter_map(|e| e.pod.as_ref()) {
                *self
                    .pod_services
                    .entry((ns.clone(), pod.clone()))
                    .or_default()
                    .entry(new.service.clone())
                    .or_default() += 1;
            }
            self.slices.insert(key, new);
            topics.push(Self::topic(cluster, svc));
        }
    }

    /// Stores a Pod; returns its previous version.
    fn apply_pod(
        &mut self,
        cluster: Cluster<'_>,
        key: &Key,
        pod: Option<PodInfo>,
        topics: &mut Vec<Topic>,
    ) -> Option<Option<PodInfo>> {
        let old = match pod {
            Some(p) => self.pods.insert(key.clone(), p),
            None => self.pods.remove(key),
        };
        if old.as_ref() == self.pods.get(key) {
            return None;
        }
        for svc in self
            .pod_services
            .get(key)
            .into_iter()
            .flat_map(|s| s.keys())
        {
            topics.push(Self::topic(cluster, (key.0.clone(), svc.clone())));
        }
        Some(old)
    }
}

impl Index {
    pub fn apply_service(&mut self, key: Key, svc: Option<ServiceInfo>) -> Vec<Topic> {
        let old = match &svc {
            Some(s) => self.services.insert(key.clone(), s.clone()),
            None => self.services.remove(&key),
        };
        if old == svc {
            return Vec::new();
        }
        let mut topics = vec![Topic::Service(key.clone())];
        for ip in old.iter().flat_map(|s| &s.cluster_ips) {
            if self.svc_by_ip.get(ip) == Some(&key) {
                self.svc_by_ip.remove(ip);
            }
            topics.push(Topic::Ip(*ip));
        }
        for ip in svc.iter().flat_map(|s| &s.cluster_ips) {
            self.svc_by_ip.insert(*ip, key.clone());
            topics.push(Topic::Ip(*ip));
        }
        topics
    }

    pub fn apply_slice(
        &mut self,
        cluster: Cluster<'_>,
        key: Key,
        slice: Option<SliceInfo>,
    ) -> Vec<Topic> {
        let mut topics = Vec::new();
        if let Some(state) = self.state_mut(cluster) {
            state.apply_slice(cluster, key, slice, &mut topics);
        }
        topics
    }

    pub fn apply_pod(
        &mut self,
        cluster: Cluster<'_>,
        key: Key,
        pod: Option<PodInfo>,
    ) -> Vec<Topic> {
        let mut topics = Vec::new();
        let new_ips: Vec<IpAddr> = pod
            .iter()
            .filter(|p| !p.host_network)
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let Some(state) = self.state_mut(cluster) else {
            return topics;
        };
        let Some(old) = state.apply_pod(cluster, &key, pod, &mut topics) else {
            return topics;
        };
        if cluster == Cluster::Local {
            topics.push(Topic::Pod(key.clone()));
            for ip in old.iter().filter(|p| !p.host_network).flat_map(|p| &p.ips) {
                if self.pods_by_ip.get(ip) == Some(&key) {
                    self.pods_by_ip.remove(ip);
                }
                topics.push(Topic::Ip(*ip));
            }
            for ip in new_ips {
                self.pods_by_ip.insert(ip, key.clone());
                topics.push(Topic::Ip(ip));
            }
        }
        topics
    }

    pub fn apply_namespace(&mut self, name: String, ns: Option<NamespaceInfo>) -> Vec<Topic> {
        let old = match &ns {
            Some(n) => self.namespaces.insert(name.clone(), n.clone()),
            None => self.namespaces.remove(&name),
        };
        if old == ns {
            return Vec::new();
        }
        vec![Topic::Namespace(name)]
    }

    /// Adds, changes or (with `None`) removes a linked cluster. A cluster whose settings change
    /// keeps what it knows; a removed one forgets it.
    pub fn apply_remote(&mut self, name: &str, settings: Option<RemoteSettings>) -> Vec<Topic> {
        match settings {
            Some(settings) => {
                if let Some(r) = self.remotes.get_mut(name) {
                    if r.settings == settings {
                        return Vec::new();
                    }
                    r.settings = settings;
                } else {
                    self.remotes.insert(
                        name.to_owned(),
                        Remote {
                            settings,
                            state: ClusterState::default(),
                        },
                    );
                }
            }
            None => {
                if self.remotes.remove(name).is_none() {
                    return Vec::new();
                }
            }
        }
        vec![Topic::Cluster(name.to_owned())]
    }

    /// The keys of every object of `kind` held for `cluster`: after a relist, those it did not
    /// list are deleted.
    pub fn keys(&self, cluster: Cluster<'_>, kind: Kind) -> Vec<Key> {
        match (cluster, kind) {
            (Cluster::Local, Kind::Service) => self.services.keys().cloned().collect(),
            (Cluster::Local, Kind::Namespace) => self
                .namespaces
                .keys()
                .map(|n| (String::new(), n.clone()))
                .collect(),
            (_, Kind::Slice) => self
                .state(cluster)
                .map(|s| s.slices.keys().cloned().collect())
                .unwrap_or_default(),
            (_, Kind::Pod) => self
                .state(cluster)
                .map(|s| s.pods.keys().cloned().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    pub fn state(&self, cluster: Cluster<'_>) -> Option<&ClusterState> {
        match cluster {
            Cluster::Local => Some(&self.local),
            Cluster::Linked(c) => self.remotes.get(c).map(|r| &r.state),
        }
    }

    fn state_mut(&mut self, cluster: Cluster<'_>) -> Option<&mut ClusterState> {
        match cluster {
            Cluster::Local => Some(&mut self.local),
            Cluster::Linked(c) => self.remotes.get_mut(c).map(|r| &mut r.state),
        }
    }
}
