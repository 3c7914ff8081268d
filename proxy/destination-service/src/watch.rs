//! The watches that feed the [`Store`]: one per resource for the whole process (Services,
//! EndpointSlices, Pods, Namespaces of this cluster; Links and their credentials Secrets), and,
//! for each linked cluster, one of its EndpointSlices and one of its Pods, built with the Link's
//! credentials through `mirror-credentials` (the service-mirror controller's own code, which
//! accepts inline credentials only).
//!
//! Every watch is the same loop ([`run`]) over a [`Watched`] kind: a relist's objects are applied
//! as they come and, when it completes, whatever it did not list is removed; errors are retried
//! with kube's backoff and never drop what is known. A linked cluster that cannot be reached
//! keeps its last endpoints and is reported (`destination_remote_cluster_reachable`, a log
//! line on each change).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Debug,
    hash::{Hash, Hasher},
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use link_crd::{Link, keys};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    index::{Cluster, Index, Kind, RemoteSettings, Topic},
    model::{self, Key},
    store::Store,
};

/// A kind of object the index holds.
pub trait Watched:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static
{
    const KIND: Kind;
    const NAME: &'static str;
    /// Stores (or, with `None`, removes) the object under `key`.
    fn apply(idx: &mut Index, cluster: Cluster<'_>, key: Key, obj: Option<&Self>) -> Vec<Topic>;
}

impl Watched for Service {
    const KIND: Kind = Kind::Service;
    const NAME: &'static str = "services";
    fn apply(idx: &mut Index, _: Cluster<'_>, key: Key, obj: Option<&Self>) -> Vec<Topic> {
        idx.apply_service(key, obj.map(model::service_info))
    }
}

impl Watched for EndpointSlice {
    const KIND: Kind = Kind::Slice;
    const NAME: &'static str = "endpointslices";
    fn apply(idx: &mut Index, cluster: Cluster<'_>, key: Key, obj: Option<&Self>) -> Vec<Topic> {
        idx.apply_slice(cluster, key, obj.and_then(model::slice_info))
    }
}

impl Watched for Pod {
    const KIND: Kind = Kind::Pod;
    const NAME: &'static str = "pods";
    fn apply(idx: &mut Index, cluster: Cluster<'_>, key: Key, obj: Option<&Self>) -> Vec<Topic> {
        idx.apply_pod(cluster, key, obj.map(model::pod_info))
    }
}

impl Watched for Namespace {
    const KIND: Kind = Kind::Namespace;
    const NAME: &'static str = "namespaces";
    fn apply(idx: &mut Index, _: Cluster<'_>, key: Key, obj: Option<&Self>) -> Vec<Topic> {
        idx.apply_namespace(key.1, obj.map(model::namespace_info))
    }
}

fn key_of<K: Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

/// The watches' metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    remote_reachable: Family<ClusterLabel, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "destination_remote_cluster_reachable",
            "Whether each linked cluster's watches are working (1) or failing (0); a failing cluster keeps its last endpoints",
            self.remote_reachable.clone(),
        );
    }
}

/// Reports a linked cluster's watches: a log line and the gauge on each change between working
/// and failing, not one per retry.
#[derive(Clone, Debug)]
struct Health {
    cluster: String,
    gauge: Gauge,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Health {
    fn ok(&self) {
        self.gauge.set(1);
        if self
            .failing
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(cluster = %self.cluster, "linked cluster reachable again");
        }
    }

    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        self.gauge.set(0);
        if !self
            .failing
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                cluster = %self.cluster,
                watch = what,
                %error,
                "linked cluster unreachable: keeping its last endpoints until it answers again"
            );
        }
    }
}

/// Runs one watch until `cancel`; `synced` is told when its first listing is complete.
async fn run<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    store: Arc<Store>,
    cluster: Option<String>,
    synced: Option<watch::Sender<bool>>,
    health: Option<Health>,
    cancel: CancellationToken,
) {
    let on = || match &cluster {
        Some(c) => Cluster::Linked(c.as_str()),
        None => Cluster::Local,
    };
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut relist: Option<HashSet<Key>> = None;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            e = stream.next() => match e {
                Some(e) => e,
                None => return,
            },
        };
        match event {
            Ok(watcher::Event::Init) => relist = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                let key = key_of(&obj);
                store.update(|idx| K::apply(idx, on(), key.clone(), Some(&obj)));
                if let Some(seen) = &mut relist {
                    seen.insert(key);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = relist.take() {
                    store.update(|idx| {
                        let gone: Vec<Key> = idx
                            .keys(on(), K::KIND)
                            .into_iter()
                            .filter(|k| !seen.contains(k))
                            .collect();
                        gone.into_iter()
                            .flat_map(|k| K::apply(idx, on(), k, None))
                            .collect()
                    });
                }
                if let Some(s) = &synced {
                    s.send_replace(true);
                }
                if let Some(h) = &health {
                    h.ok();
                }
            }
            Ok(watcher::Event::Apply(obj)) => {
                store.update(|idx| K::apply(idx, on(), key_of(&obj), Some(&obj)));
                if let Some(h) = &health {
                    h.ok();
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                store.update(|idx| K::apply(idx, on(), key_of(&obj), None));
            }
            Err(error) => match &health {
                Some(h) => h.failed(K::NAME, &error),
                None => tracing::warn!(watch = K::NAME, %error, "watch failed; retrying"),
            },
        }
    }
}

/// What the process watches in its own cluster.
#[derive(Clone)]
pub struct Watches {
    pub client: Client,
    /// Where the Links and their credentials Secrets are.
    pub multicluster_namespace: String,
    pub store: Arc<Store>,
    pub metrics: Metrics,
}

impl std::fmt::Debug for Watches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watches")
            .field("multicluster_namespace", &self.multicluster_namespace)
            .finish_non_exhaustive()
    }
}

impl Watches {
    fn local<K: Watched>(
        &self,
        synced: Option<watch::Sender<bool>>,
        cancel: &CancellationToken,
    ) -> impl Future<Output = ()> + use<K> {
        run::<K>(
            Api::all(self.client.clone()),
            watcher::Config::default(),
            self.store.clone(),
            None,
            synced,
            None,
            cancel.clone(),
        )
    }

    /// Starts every watch; the receiver turns true once each local watch has listed once.
    pub fn spawn(
        self,
        cancel: CancellationToken,
    ) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let mut synced = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut flag = || {
            let (tx, rx) = watch::channel(false);
            synced.push(rx);
            Some(tx)
        };
        // One watch per kind, each listing everything once before the service is ready.
        tasks.spawn(self.local::<Service>(flag(), &cancel));
        tasks.spawn(self.local::<EndpointSlice>(flag(), &cancel));
        tasks.spawn(self.local::<Pod>(flag(), &cancel));
        tasks.spawn(self.local::<Namespace>(flag(), &cancel));
        let client = &self.client;
        let links = Links {
            client: client.clone(),
            namespace: self.multicluster_namespace.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        };
        tasks.spawn(links.run(flag(), cancel.clone()));
        let (ready_tx, ready_rx) = watch::channel(false);
        let handle = tokio::spawn(async move {
            let all = async {
                for mut rx in synced {
                    let _ = rx.wait_for(|s| *s).await;
                }
                tracing::info!("every watch has listed once");
                ready_tx.send_replace(true);
            };
            tokio::select! {
                () = all => {}
                () = cancel.cancelled() => {}
            }
            while tasks.join_next().await.is_some() {}
        });
        (ready_rx, handle)
    }
}

/// The linked clusters: each Link with its credentials Secret is a cluster whose slices and
/// Pods are watched.
struct Links {
    client: Client,
    namespace: String,
    store: Arc<Store>,
    metrics: Metrics,
}

/// What a linked cluster's watches are started from; a change restarts them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSpec {
    pub cluster: String,
    pub settings: RemoteSettings,
    pub secret: String,
}

/// The trust domain and control-plane namespace of a linked cluster: the Secret's
/// `multicluster.linkerd.io/trust-domain` annotation when set (Linkerd's destination Secrets
/// carry it), else what the Link's gateway identity says
/// (`<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>`), else this cluster's.
pub fn remote_settings(
    link: &link_crd::LinkSpec,
    secret_trust_domain: Option<&str>,
    local_trust_domain: &str,
) -> RemoteSettings {
    let from_gateway = link
        .gateway_identity
        .split_once(".serviceaccount.identity.")
        .and_then(|(_, rest)| rest.split_once('.'));
    let control_plane_ns = if link.target_cluster_linkerd_namespace.is_empty() {
        from_gateway
            .map(|(ns, _)| ns.to_owned())
            .unwrap_or_else(|| keys::DEFAULT_LINKERD_NAMESPACE.to_owned())
    } else {
        link.target_cluster_linkerd_namespace.clone()
    };
    let trust_domain = secret_trust_domain
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .or_else(|| from_gateway.map(|(_, td)| td.to_owned()))
        .unwrap_or_else(|| local_trust_domain.to_owned());
    RemoteSettings {
        trust_domain,
        control_plane_ns,
    }
}

struct Running {
    spec: RemoteSpec,
    /// A digest of the Secret's data: a credentials change restarts the watches.
    secret_digest: Option<u64>,
    cancel: CancellationToken,
}

impl Links {
    async fn run(self, synced: Option<watch::Sender<bool>>, cancel: CancellationToken) {
        let links_api: Api<Link> = Api::namespaced(self.client.clone(), &self.namespace);
        let secrets_api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let links = watcher(links_api, watcher::Config::default()).default_backoff();
        let secrets = watcher(
            secrets_api,
            watcher::Config::default()
                .fields(&format!("type={}", keys::REMOTE_KUBECONFIG_SECRET_TYPE)),
        )
        .default_backoff();
        futures::pin_mut!(links, secrets);
        let mut link_objs: BTreeMap<String, Link> = BTreeMap::new();
        let mut secret_objs: BTreeMap<String, Secret> = BTreeMap::new();
        let (mut links_synced, mut secrets_synced) = (false, false);
        let mut running: HashMap<String, Running> = HashMap::new();
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(e) = links.next() => match e {
                    Ok(watcher::Event::Init) => {}
                    Ok(watcher::Event::InitApply(l)) | Ok(watcher::Event::Apply(l)) => {
                        link_objs.insert(l.name_any(), l);
                    }
                    Ok(watcher::Event::Delete(l)) => { link_objs.remove(&l.name_any()); }
                    Ok(watcher::Event::InitDone) => links_synced = true,
                    Err(error) => tracing::warn!(%error, "watching Links failed; retrying"),
                },
                Some(e) = secrets.next() => match e {
                    Ok(watcher::Event::Init) => {}
                    Ok(watcher::Event::InitApply(s)) | Ok(watcher::Event::Apply(s)) => {
                        secret_objs.insert(s.name_any(), s);
                    }
                    Ok(watcher::Event::Delete(s)) => { secret_objs.remove(&s.name_any()); }
                    Ok(watcher::Event::InitDone) => secrets_synced = true,
                    Err(error) => tracing::warn!(%error, "watching credentials Secrets failed; retrying"),
                },
            }
            if !(links_synced && secrets_synced) {
                continue;
            }
            if let Some(s) = &synced {
                s.send_replace(true);
            }
            self.reconcile(&link_objs, &secret_objs, &mut running, &cancel);
        }
        for r in running.into_values() {
            r.cancel.cancel();
        }
    }

    /// Starts, restarts and stops linked clusters' watches to match the Links.
    fn reconcile(
        &self,
        links: &BTreeMap<String, Link>,
        secrets: &BTreeMap<String, Secret>,
        running: &mut HashMap<String, Running>,
        cancel: &CancellationToken,
    ) {
        let local_td = self.store.settings().trust_domain.clone();
        let mut wanted: HashMap<String, (RemoteSpec, Option<&Secret>)> = HashMap::new();
        for link in links.values() {
            let cluster = link.spec.target_cluster_name.clone();
            if cluster.is_empty() || wanted.contains_key(&cluster) {
                // The mirror controller refuses a second Link of a taken name; so does this.
                continue;
            }
            let secret = secrets.get(&link.spec.cluster_credentials_secret);
            let td = secret
                .and_then(|s| s.annotations().get(keys::TRUST_DOMAIN_ANNOTATION))
                .map(String::as_str);
            let spec = RemoteSpec {
                cluster: cluster.clone(),
                settings: remote_settings(&link.spec, td, &local_td),
                secret: link.spec.cluster_credentials_secret.clone(),
            };
            wanted.insert(cluster, (spec, secret));
        }
        running.retain(|cluster, r| {
            let keep = wanted.get(cluster).is_some_and(|(spec, secret)| {
                *spec == r.spec && digest(*secret) == r.secret_digest
            });
            if !keep {
                r.cancel.cancel();
                if !wanted.contains_key(cluster) {
                    tracing::info!(%cluster, "Link removed: forgetting the cluster's endpoints");
                    self.store.update(|idx| idx.apply_remote(cluster, None));
                    self.metrics.remote_reachable.remove(&ClusterLabel {
                        cluster: cluster.clone(),
                    });
                }
            }
            keep
        });
        for (cluster, (spec, secret)) in wanted {
            if running.contains_key(&cluster) {
                continue;
            }
            let token = cancel.child_token();
            let health = Health {
                cluster: cluster.clone(),
                gauge: self
                    .metrics
                    .remote_reachable
                    .get_or_create(&ClusterLabel {
                        cluster: cluster.clone(),
                    })
                    .clone(),
                failing: Arc::default(),
            };
            self.store
                .update(|idx| idx.apply_remote(&cluster, Some(spec.settings.clone())));
            tokio::spawn(watch_remote(
                self.namespace.clone(),
                spec.clone(),
                secret.cloned(),
                self.store.clone(),
                health,
                token.clone(),
            ));
            running.insert(
                cluster,
                Running {
                    spec,
                    secret_digest: digest(secret),
                    cancel: token,
                },
            );
        }
    }
}

fn digest(secret: Option<&Secret>) -> Option<u64> {
    let data = secret?.data.as_ref()?;
    let mut h = std::hash::DefaultHasher::new();
    for (k, v) in data {
        k.hash(&mut h);
        v.0.hash(&mut h);
    }
    Some(h.finish())
}

/// Watches a linked cluster's EndpointSlices and Pods with the Link's credentials.
async fn watch_remote(
    namespace: String,
    spec: RemoteSpec,
    secret: Option<Secret>,
    store: Arc<Store>,
    health: Health,
    cancel: CancellationToken,
) {
    let client = match mirror_credentials::client_from_secret(
        &namespace,
        &spec.secret,
        secret.as_ref(),
    )
    .await
    {
        Ok(c) => c,
        Err(error) => {
            // The Secret's watch restarts this task when the Secret changes.
            health.gauge.set(0);
            tracing::error!(cluster = %spec.cluster, reason = error.reason(), %error, "cannot watch the linked cluster");
            return;
        }
    };
    tracing::info!(cluster = %spec.cluster, trust_domain = %spec.settings.trust_domain, "watching linked cluster");
    let cluster = Some(spec.cluster.clone());
    tokio::join!(
        run::<EndpointSlice>(
            Api::all(client.clone()),
            watcher::Config::default(),
            store.clone(),
            cluster.clone(),
            None,
            Some(health.clone()),
            cancel.clone(),
        ),
        run::<Pod>(
            Api::all(client),
            watcher::Config::default(),
            store,
            cluster,
            None,
            Some(health),
            cancel,
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_identity_settings() {
        let link = |gateway: &str, cp: &str| link_crd::LinkSpec {
            gateway_identity: gateway.into(),
            target_cluster_linkerd_namespace: cp.into(),
            ..Default::default()
        };
        let gw =
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.example";
        let cases = [
            // From the gateway identity.
            (link(gw, ""), None, ("east.example", "linkerd")),
            // The Link's namespace wins for the control plane, the Secret's annotation for the domain.
            (link(gw, "l5d"), Some("east.corp"), ("east.corp", "l5d")),
            // Nothing says: this cluster's trust domain, Linkerd's namespace.
            (link("", ""), None, ("cluster.local", "linkerd")),
            (
                link("not-an-identity", ""),
                Some(""),
                ("cluster.local", "linkerd"),
            ),
        ];
        for (spec, secret_td, (td, cp)) in cases {
            let s = remote_settings(&spec, secret_td, "cluster.local");
            assert_eq!(
                (s.trust_domain.as_str(), s.control_plane_ns.as_str()),
                (td, cp),
                "{spec:?}"
            );
        }
    }
}
