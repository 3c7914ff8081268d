//! Federated Services `<svc>-federated`, across every Link this controller serves.
//!
//! A federated Service stands for every member Service of one name and namespace: this cluster's
//! own (selected by `--local-federated-selector`) and each linked cluster's (selected by its
//! Link's `federatedServiceSelector`). Linkerd's per-Link controllers each edit it in turn, and
//! never recompute it when a member changes or leaves (#13680) [quirk]. Here one task owns every
//! federated Service: workers report their members, and each change recomputes the Service from
//! the full member set with [`desired::federated::federated_service`] (its documentation gives
//! the precedence).
//!
//! A cluster whose members are not known yet (its worker has not listed the target since this
//! controller started) is *pending*: its federated Services keep its entries and are never
//! deleted because of it. Once listed, a cluster's members stay known across restarts of its
//! worker and while its API server is unreachable, as mirrors do.
//!
//! Only one writer can own a federated Service, so a controller started with `--link` (serving
//! one Link, as Linkerd's per-Link deployments) leaves them alone.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::core::v1::{Namespace, Service},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use link_crd::{Link, keys, naming};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Options,
    apply::{Error, Writer, keep_own_fields},
    desired::{
        self,
        federated::{Federated, Member},
    },
    metrics::{ErrorLabels, Metrics},
    queue::Queue,
    status::{Key, Outcome, StatusHandle},
};

/// What a worker reports of its Link.
struct Cluster {
    link_created: Option<Time>,
    excluded_labels: Vec<String>,
    excluded_annotations: Vec<String>,
    status: StatusHandle,
    /// The members as last listed; `None` until the first listing.
    services: Option<HashMap<Key, Arc<Service>>>,
}

enum Msg {
    Key(Key),
    /// A local watch listed for the first time.
    Synced(&'static str),
    /// A namespace appeared (or changed): its federated Services may wait for it.
    Namespace(String),
    /// A cluster's members were (re)listed: every federated Service is looked at again, since
    /// one may still name a member that left while nobody watched (a stopped controller).
    Listed,
}

/// The handle workers report their members through.
#[derive(Clone)]
pub(crate) struct Federation {
    clusters: Arc<Mutex<HashMap<String, Cluster>>>,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Federation {
    /// Starts the task that writes federated Services; it stops with `cancel`.
    pub(crate) fn start(
        client: Client,
        options: &Options,
        metrics: Arc<Metrics>,
        links: Store<Link>,
        readiness: crate::Readiness,
        (claim, tasks): (crate::leader::Claim, &tokio_util::task::TaskTracker),
        cancel: &CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let this = Self {
            clusters: Arc::new(Mutex::new(HashMap::new())),
            tx,
        };
        let task = Task {
            federation: this.clone(),
            writer: Writer::new(client.clone(), metrics.clone(), String::new(), claim),
            client,
            metrics,
            links,
            local_selector: Some(options.local_federated_selector.clone())
                .filter(|s| !s.is_empty()),
            readiness,
            local_excluded_labels: options.local_excluded_labels.clone(),
            local_excluded_annotations: options.local_excluded_annotations.clone(),
            enable_namespace_creation: options.enable_namespace_creation,
        };
        tasks.spawn(cancel.clone().run_until_cancelled_owned(task.run(rx)));
        this
    }

    fn clusters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cluster>> {
        self.clusters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker for `link` starts. Members already listed for its cluster stay as they are
    /// until the worker lists them again.
    pub(crate) fn join(&self, link: &Link, status: StatusHandle) {
        let cluster = link.spec.target_cluster_name.clone();
        let mut clusters = self.clusters();
        let services = clusters.remove(&cluster).and_then(|c| c.services);
        clusters.insert(
            cluster,
            Cluster {
                link_created: link.metadata.creation_timestamp.clone(),
                excluded_labels: link.spec.excluded_labels.clone(),
                excluded_annotations: link.spec.excluded_annotations.clone(),
                status,
                services,
            },
        );
    }

    /// `cluster`'s members, as a (re)listing found them.
    pub(crate) fn listed(&self, cluster: &str, services: HashMap<Key, Arc<Service>>) {
        tracing::debug!(%cluster, members = services.len(), "federated members listed");
        let keys: HashSet<Key> = {
            let mut clusters = self.clusters();
            let Some(c) = clusters.get_mut(cluster) else {
                return;
            };
            let mut keys: HashSet<Key> = services.keys().cloned().collect();
            keys.extend(c.services.iter().flat_map(|s| s.keys().cloned()));
            c.services = Some(services);
            keys
        };
        for k in keys {
            let _ = self.tx.send(Msg::Key(k));
        }
        let _ = self.tx.send(Msg::Listed);
    }

    /// One of `cluster`'s members changed (`None`: it left).
    pub(crate) fn changed(&self, cluster: &str, key: Key, service: Option<Arc<Service>>) {
        {
            let mut clusters = self.clusters();
            let Some(services) = clusters.get_mut(cluster).and_then(|c| c.services.as_mut()) else {
                // Not listed yet: the listing brings it.
                return;
            };
            match service {
                Some(s) => services.insert(key.clone(), s),
                None => services.remove(&key),
            };
        }
        let _ = self.tx.send(Msg::Key(key));
    }

    /// `cluster`'s Link is gone: its members leave every federated Service.
    pub(crate) fn leave(&self, cluster: &str) {
        let removed = self.clusters().remove(cluster);
        for k in removed
            .into_iter()
            .flat_map(|c| c.services)
            .flat_map(|s| s.into_keys())
        {
            let _ = self.tx.send(Msg::Key(k));
        }
    }
}

/// Reports `cluster`'s members of federated Services from a watch of the target cluster.
pub(crate) async fn forward_members<S>(stream: S, federation: Federation, cluster: String)
where
    S: Stream<Item = Result<watcher::Event<Service>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listing: Option<HashMap<Key, Arc<Service>>> = None;
    let key = |s: &Service| Some((s.namespace()?, s.name_any()));
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(s)) => {
                if let (Some(l), Some(k)) = (listing.as_mut(), key(&s)) {
                    l.insert(k, Arc::new(s));
                }
            }
            Ok(watcher::Event::InitDone) => {
                federation.listed(&cluster, listing.take().unwrap_or_default());
            }
            Ok(watcher::Event::Apply(s)) => {
                if let Some(k) = key(&s) {
                    federation.changed(&cluster, k, Some(Arc::new(s)));
                }
            }
            Ok(watcher::Event::Delete(s)) => {
                if let Some(k) = key(&s) {
                    federation.changed(&cluster, k, None);
                }
            }
            // The Link's other watches report the target's reachability; members stay as
            // they were listed.
            Err(error) => {
                tracing::debug!(%cluster, %error, "federated members watch failed; retrying");
            }
        }
    }
}

/// The local watches the task needs listed before it writes.
const LOCAL_WATCHES: [&str; 3] = ["local_members", "federated_services", "namespaces"];

struct Task {
    federation: Federation,
    client: Client,
    writer: Writer,
    metrics: Arc<Metrics>,
    links: Store<Link>,
    local_selector: Option<String>,
    readiness: crate::Readiness,
    /// Keys of the local member that are not copied.
    local_excluded_labels: Vec<String>,
    local_excluded_annotations: Vec<String>,
    enable_namespace_creation: bool,
}

/// One cluster's part in a federated Service, as its worker reported it.
struct Said {
    cluster: String,
    link_created: Option<Time>,
    excluded_labels: Vec<String>,
    excluded_annotations: Vec<String>,
    status: StatusHandle,
    /// `None`: not listed yet; `Some(None)`: not a member.
    member: Option<Option<Arc<Service>>>,
}

struct Stores {
    local: Option<Store<Service>>,
    federated: Store<Service>,
    namespaces: Store<Namespace>,
}

/// Federated Services written at once.
const CONCURRENCY: usize = 8;

impl Task {
    /// Runs until cancelled (the task holds a sender, so `rx` never ends); dropping it drops
    /// `tasks`, which stops the watches.
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let tx = self.federation.tx.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let mut synced: HashSet<&'static str> = HashSet::new();
        let local = match &self.local_selector {
            Some(sel) => Some(self.watch(&mut tasks, &tx, sel, "local_members", |s| {
                Some((s.namespace()?, s.name_any()))
            })),
            None => {
                synced.insert("local_members");
                None
            }
        };
        let ours = format!(
            "{}=true,!{}",
            keys::MIRRORED_RESOURCE_LABEL,
            keys::CLUSTER_NAME_LABEL
        );
        let federated = self.watch(&mut tasks, &tx, &ours, "federated_services", |s| {
            let name = s.name_any();
            Some((s.namespace()?, name.strip_suffix("-federated")?.to_owned()))
        });
        let (namespaces, w) = reflector::store();
        let stream = watcher(
            Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|ns: &mut Namespace| ns.metadata.managed_fields = None)
        .reflect(w);
        let ns_tx = tx.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let msg = match event {
                    Ok(watcher::Event::Apply(ns)) => Msg::Namespace(ns.name_any()),
                    Ok(watcher::Event::InitDone) => Msg::Synced("namespaces"),
                    _ => continue,
                };
                if ns_tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let stores = Stores {
            local,
            federated,
            namespaces,
        };
        // Until the Links are listed, a Link not reported yet cannot be told from one that does
        // not exist. The store's readiness wakes only one waiter (a oneshot channel underneath,
        // and the Controller waits on it too), so it is polled rather than awaited.
        if !crate::links::wait_listed(&self.links).await {
            return;
        }

        let mut queue: Queue<Key> = Queue::default();
        loop {
            let msgs = tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    let mut msgs = vec![msg];
                    while let Ok(m) = rx.try_recv() {
                        msgs.push(m);
                    }
                    msgs
                }
                // A retry is due.
                () = queue.due() => Vec::new(),
            };
            for m in msgs {
                match m {
                    Msg::Key(k) => queue.add(k),
                    Msg::Namespace(ns) => {
                        queue.extend(self.all_keys(&stores).into_iter().filter(|k| k.0 == ns));
                    }
                    Msg::Listed => queue.extend(self.all_keys(&stores)),
                    Msg::Synced(w) => {
                        synced.insert(w);
                        if LOCAL_WATCHES.iter().all(|w| synced.contains(w)) {
                            queue.extend(self.all_keys(&stores));
                        }
                    }
                }
            }
            if !LOCAL_WATCHES.iter().all(|w| synced.contains(w)) {
                tracing::debug!(?synced, "federation waits for its local watches");
                continue;
            }
            let keys = queue.take(usize::MAX);
            let this = &self;
            let stores = &stores;
            let results: Vec<(Key, Result<(), Error>)> = futures::stream::iter(keys)
                .map(|key| async move {
                    let r = this.reconcile(stores, &key).await;
                    (key, r)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            // Every federated Service known at the start has been looked at once.
            self.readiness.federation_done();
            for (key, result) in results {
                match result {
                    Ok(()) => queue.done(&key),
                    Err(error) => {
                        self.metrics
                            .reconcile_errors
                            .get_or_create(&ErrorLabels {
                                target_cluster_name: String::new(),
                                kind: error.metric_label(),
                            })
                            .inc();
                        let delay = queue.failed(key.clone(), error.metric_label());
                        tracing::debug!(namespace = %key.0, service = %key.1, %error, retry_in = ?delay, "federated Service not written");
                    }
                }
            }
            if let Some(s) = queue.summary_due() {
                tracing::warn!(failing = s.failing, by_reason = ?s.by_reason, oldest = ?s.oldest, "federated Services not written; each is retried with backoff");
            }
        }
    }

    /// Watches local Services that `labels` select, each change keyed by `key`.
    fn watch(
        &self,
        tasks: &mut tokio::task::JoinSet<()>,
        tx: &mpsc::UnboundedSender<Msg>,
        labels: &str,
        name: &'static str,
        key: fn(&Service) -> Option<Key>,
    ) -> Store<Service> {
        let (store, writer) = reflector::store();
        let stream = watcher(
            Api::<Service>::all(self.client.clone()),
            watcher::Config::default().labels(labels),
        )
        .default_backoff()
        .modify(|s: &mut Service| {
            keep_own_fields(s);
            if let Some(a) = s.metadata.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .reflect(writer);
        let tx = tx.clone();
        tasks.spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let msg = match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => {
                        key(&s).map(Msg::Key)
                    }
                    Ok(watcher::Event::InitDone) => Some(Msg::Synced(name)),
                    Ok(_) => None,
                    Err(error) => {
                        tracing::warn!(watch = name, %error, "watch failed; retrying with backoff");
                        None
                    }
                };
                if let Some(m) = msg
                    && tx.send(m).is_err()
                {
                    return;
                }
            }
        });
        store
    }

    /// Every key anything knows of.
    fn all_keys(&self, stores: &Stores) -> BTreeSet<Key> {
        let mut keys: BTreeSet<Key> = self
            .federation
            .clusters()
            .values()
            .flat_map(|c| c.services.iter().flat_map(|s| s.keys().cloned()))
            .collect();
        for store in stores.local.iter().chain([&stores.federated]) {
            keys.extend(store.state().iter().filter_map(|s| {
                let name = s.name_any();
                let name = name.strip_suffix("-federated").unwrap_or(&name).to_owned();
                Some((s.namespace()?, name))
            }));
        }
        keys
    }

    async fn reconcile(&self, stores: &Stores, key: &Key) -> Result<(), Error> {
        let (ns, name) = key;
        tracing::debug!(namespace = %ns, service = %name, "reconciling federated Service");
        // The Links being served, by cluster: a Link not reported yet is pending.
        let served: Vec<(String, Option<Time>)> = self
            .links
            .state()
            .iter()
            .filter(|l| {
                l.metadata.deletion_timestamp.is_none() && !l.spec.target_cluster_name.is_empty()
            })
            .map(|l| {
                (
                    l.spec.target_cluster_name.clone(),
                    l.metadata.creation_timestamp.clone(),
                )
            })
            .collect();
        let federated_name = naming::federated_service_name(name).ok();
        let live = federated_name
            .as_ref()
            .and_then(|n| stores.federated.get(&ObjectRef::new(n).within(ns)));
        let listed_before: Vec<String> = live
            .as_ref()
            .and_then(|l| l.annotations().get(keys::REMOTE_DISCOVERY_KEY).cloned())
            .map(|a| {
                a.split(',')
                    .filter_map(|e| e.strip_prefix(&format!("{name}@")).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();

        let local = stores
            .local
            .as_ref()
            .and_then(|s| s.get(&ObjectRef::new(name).within(ns)));
        // What each cluster says (copied out of the lock: the writes below await).
        let clusters: Vec<Said> = self
            .federation
            .clusters()
            .iter()
            .map(|(c, m)| Said {
                cluster: c.clone(),
                link_created: m.link_created.clone(),
                excluded_labels: m.excluded_labels.clone(),
                excluded_annotations: m.excluded_annotations.clone(),
                status: m.status.clone(),
                member: m.services.as_ref().map(|s| s.get(key).cloned()),
            })
            .collect();
        let mut members: Vec<Member<'_>> = Vec::new();
        if let Some(local) = local.as_deref() {
            members.push(Member {
                cluster: None,
                link_created: None,
                service: Some(local),
                excluded_labels: &self.local_excluded_labels,
                excluded_annotations: &self.local_excluded_annotations,
            });
        }
        for c in &clusters {
            let service = match &c.member {
                Some(Some(s)) => Some(&**s),
                Some(None) => continue,
                // Reported but not listed yet.
                None if listed_before.contains(&c.cluster) => None,
                None => continue,
            };
            members.push(Member {
                cluster: Some(&c.cluster),
                link_created: c.link_created.as_ref(),
                service,
                excluded_labels: &c.excluded_labels,
                excluded_annotations: &c.excluded_annotations,
            });
        }
        // Served but not reported at all yet (its worker is starting).
        for (cluster, created) in &served {
            if !clusters.iter().any(|c| &c.cluster == cluster) && listed_before.contains(cluster) {
                members.push(Member {
                    cluster: Some(cluster),
                    link_created: created.as_ref(),
                    service: None,
                    excluded_labels: &[],
                    excluded_annotations: &[],
                });
            }
        }

        // A listed cluster without this member has no entry for it.
        for c in clusters.iter().filter(|c| matches!(c.member, Some(None))) {
            c.status.remove_federated(key);
        }
        let members_here: Vec<&Said> = clusters
            .iter()
            .filter(|c| matches!(c.member, Some(Some(_))))
            .collect();
        let Federated {
            service,
            keep,
            rejected,
        } = match desired::federated::federated_service(&members) {
            Ok(r) => r,
            Err(e) => {
                for c in &members_here {
                    c.status
                        .set_federated(key, Outcome::failed("InvalidService", e.to_string()));
                }
                return Ok(());
            }
        };
        // Each member's entry: why it was refused, or how the federated Service fared.
        let report = |outcome: &dyn Fn() -> Outcome| {
            for c in &members_here {
                let refused = rejected
                    .iter()
                    .find(|r| r.cluster.as_deref() == Some(c.cluster.as_str()));
                c.status.set_federated(
                    key,
                    match refused {
                        Some(r) => Outcome::failed("InvalidService", r.reason.clone()),
                        None => outcome(),
                    },
                );
            }
        };
        for r in rejected.iter().filter(|r| r.cluster.is_none()) {
            tracing::warn!(namespace = %ns, service = %name, reason = %r.reason, "local Service does not join its federated Service");
        }
        let Some(desired) = service else {
            // Every listed member here was refused (any other would make a Service).
            report(&|| Outcome::failed("InvalidService", "no member can join"));
            if !keep
                && let Some(live) = live
                && is_ours(&live)
            {
                self.writer.delete(&*live, "Service").await?;
            }
            return Ok(());
        };
        let federated_name = desired.metadata.name.clone().unwrap_or_default();

        if stores.namespaces.get(&ObjectRef::new(ns)).is_none() {
            if self.enable_namespace_creation {
                self.writer.create_namespace(ns, None).await?;
            } else {
                tracing::warn!(namespace = %ns, service = %name, "namespace missing; the federated Service is written when it appears");
                report(&|| {
                    Outcome::failed(
                        "MissingNamespace",
                        format!(
                            "Namespace {ns} does not exist in this cluster: create it and {federated_name} is written at once"
                        ),
                    )
                });
                return Ok(());
            }
        }
        match self
            .writer
            .apply("Service", &desired, live.as_deref())
            .await
        {
            Ok(_) => {
                report(&|| Outcome::mirrored(ns, &federated_name));
                Ok(())
            }
            Err(e) => {
                let msg = format!("Failed to write federated service: {e}");
                report(&|| Outcome::failed("Error", msg.clone()));
                Err(e)
            }
        }
    }
}

/// A federated Service this controller (or Linkerd's, which meshlink takes over) wrote: the watch
/// selects `mirrored-service=true` without a cluster, and it names its members.
fn is_ours(s: &Service) -> bool {
    let a = s.annotations();
    a.contains_key(keys::REMOTE_DISCOVERY_KEY) || a.contains_key(keys::LOCAL_DISCOVERY_ANNOTATION)
}
