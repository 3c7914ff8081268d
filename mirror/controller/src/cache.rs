//! What a Link's worker keeps of the objects it watches: each object as its JSON, trimmed of
//! what mirroring never reads, decoded again when it is read.
//!
//! A worker keeps four objects for every exported Service: the remote Service, its mirror, and
//! the mirror's Endpoints and EndpointSlice. As k8s-openapi structs in kube's reflector stores
//! they took about 3 KB each (every label and annotation map is a B-tree node of half a
//! kilobyte, every absent optional field still takes its inline space), some 12 KB per Service,
//! most of the controller's memory at 10,000 Services. As trimmed JSON they take about a
//! quarter of that (heaptrack of a restarted controller with 3,000 Services: 36 MB in reflector
//! stores before, 8.3 MB here). A
//! read decodes one object (microseconds; a reconcile reads a handful), and reads are what
//! reconciles do between API calls that take milliseconds.
//!
//! Trimming removes only fields that the API server fills in and that no desired object sets:
//! [`crate::apply::needs_apply`] compares the desired object with the fields it sets, so it
//! decides the same on a trimmed object (a test holds this for every kind of mirror object).

use std::{
    collections::HashMap,
    marker::PhantomData,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{Resource, ResourceExt, runtime::watcher};
use serde::{Serialize, de::DeserializeOwned};

use crate::{apply::keep_own_fields, status::Key};

/// One kept object: its JSON, and its tag (see [`Cache::new`]).
struct Entry {
    json: Box<[u8]>,
    tag: Option<Box<str>>,
}

#[derive(Default)]
struct Objects {
    by_key: HashMap<Key, Entry>,
    /// A relist under way: what it has listed so far. The last complete listing stays readable
    /// until it finishes (as kube's reflector does).
    relist: Option<HashMap<Key, Entry>>,
}

/// The objects of one watch, by namespace and name.
pub(crate) struct Cache<K> {
    objects: Arc<RwLock<Objects>>,
    tag: fn(&K) -> Option<String>,
    _kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self {
            objects: self.objects.clone(),
            tag: self.tag,
            _kind: PhantomData,
        }
    }
}

impl<K> Cache<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    /// An empty cache. `tag` picks the one thing [`Cache::keys`] lists beside each object's
    /// name, so that callers can select objects without decoding them all.
    pub(crate) fn new(tag: fn(&K) -> Option<String>) -> Self {
        Self {
            objects: Arc::default(),
            tag,
            _kind: PhantomData,
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Objects> {
        self.objects.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Objects> {
        self.objects.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Object `namespace/name`, if the watch has it.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<K> {
        let objects = self.read();
        let entry = objects
            .by_key
            .get(&(namespace.to_owned(), name.to_owned()))?;
        match serde_json::from_slice(&entry.json) {
            Ok(obj) => Some(obj),
            // Encoded from a decoded object a moment ago: cannot fail, but never panic.
            Err(error) => {
                tracing::error!(%namespace, %name, %error, "a cached object does not decode");
                None
            }
        }
    }

    /// Every object's namespace and name, with its tag.
    pub(crate) fn keys(&self) -> Vec<(Key, Option<String>)> {
        self.read()
            .by_key
            .iter()
            .map(|(k, e)| (k.clone(), e.tag.as_deref().map(str::to_owned)))
            .collect()
    }

    /// Records one event of the watch.
    pub(crate) fn apply(&self, event: &watcher::Event<K>) {
        let entry = |o: &K| -> Option<(Key, Entry)> {
            let key = (o.namespace()?, o.name_any());
            let json = serde_json::to_vec(o).ok()?.into_boxed_slice();
            let tag = (self.tag)(o).map(String::into_boxed_str);
            Some((key, Entry { json, tag }))
        };
        let mut objects = self.write();
        match event {
            watcher::Event::Apply(o) => {
                if let Some((k, e)) = entry(o) {
                    objects.by_key.insert(k, e);
                }
            }
            watcher::Event::Delete(o) => {
                if let Some(ns) = o.namespace() {
                    objects.by_key.remove(&(ns, o.name_any()));
                }
            }
            watcher::Event::Init => objects.relist = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                if let (Some((k, e)), Some(relist)) = (entry(o), objects.relist.as_mut()) {
                    relist.insert(k, e);
                }
            }
            watcher::Event::InitDone => {
                let mut fresh = objects.relist.take().unwrap_or_default();
                fresh.shrink_to_fit();
                objects.by_key = fresh;
            }
        }
    }
}

/// Drops what every kept object carries and nothing reads: when it was created, its generation,
/// kubectl's copy of the last applied object; of `managedFields`, all but what
/// [`crate::apply::needs_apply`] reads ([`keep_own_fields`]).
fn trim_meta(meta: &mut ObjectMeta) {
    meta.creation_timestamp = None;
    meta.generation = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Trims a Service (remote or mirror): of its spec only the type, the ports and the cluster IP
/// are read (the IP for headless Services and per-pod mirrors); the status is not.
pub(crate) fn trim_service(s: &mut Service) {
    keep_own_fields(s);
    trim_meta(&mut s.metadata);
    s.status = None;
    if let Some(spec) = s.spec.as_mut() {
        spec.cluster_ips = None;
        spec.ip_families = None;
        spec.ip_family_policy = None;
        spec.internal_traffic_policy = None;
        spec.session_affinity = None;
        spec.session_affinity_config = None;
        spec.selector = None;
    }
}

/// Trims a mirror's Endpoints.
pub(crate) fn trim_endpoints(e: &mut Endpoints) {
    keep_own_fields(e);
    trim_meta(&mut e.metadata);
}

/// Trims a mirror's EndpointSlice.
pub(crate) fn trim_slice(s: &mut EndpointSlice) {
    keep_own_fields(s);
    trim_meta(&mut s.metadata);
}

#[cfg(test)]
mod tests;
