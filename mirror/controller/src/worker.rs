//! One Link's work: watches of the target cluster and of this Link's local mirrors (see
//! `watches`), and a reconcile of each remote Service whenever anything it depends on changes.
//!
//! Watches feed stores; every change becomes a *key* (namespace and name of a remote Service) in
//! the worker's [`Queue`]; the reconcile of a key reads only the stores into a [`View`], lets
//! [`plan::plan`] decide, and carries the plan out with the [`Writer`]. Nothing is reconciled
//! until every watch has listed once, so that a mirror is never deleted because its remote
//! Service had not been seen yet. A watch that fails keeps its last listing (mirrors are never
//! deleted because the target is unreachable) and is retried with capped backoff; when it lists
//! again, every key is reconciled against the fresh listing.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::core::v1::ObjectReference,
    api::{
        core::v1::{Endpoints, Namespace, Service},
        discovery::v1::EndpointSlice,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use link_crd::{CONDITION_REMOTE_REACHABLE, ConditionStatus, LinkSpec, keys, naming};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    Options,
    apply::{Error, Writer, keep_own_fields},
    cache::{self, Cache},
    desired::{self, EndpointPortSpec, Gateway, SLICE_MANAGED_BY, Target},
    federation::{self, Federation},
    metrics::{ErrorLabels, LinkLabels, Metrics, WatchLabels},
    plan::{
        self, Headless, Mirror, MirrorEndpoints, Notice, Plan, Published, RemoteEndpoints, View,
    },
    queue::Queue,
    status::{Key, Outcome, StatusHandle},
};

mod watches;

use self::watches::{
    forward, forward_namespaces, recover, remote_services, watch_local, watch_remote_readiness,
};

/// What one Link's worker needs.
pub(crate) struct LinkWorker {
    pub link_name: String,
    pub spec: LinkSpec,
    pub local: Client,
    pub remote: Client,
    pub gateway: watch::Receiver<Option<Gateway>>,
    pub status: StatusHandle,
    pub metrics: Arc<Metrics>,
    pub options: Options,
    /// The Link, for Events.
    pub link_ref: ObjectReference,
    pub recorder: Recorder,
    /// Where this Link's members of federated Services are reported (see [`crate::federation`]).
    pub federation: Option<Federation>,
    /// Told when this Link's first pass is done.
    pub readiness: crate::Readiness,
    /// Whether this replica may write.
    pub claim: crate::leader::Claim,
}

/// Which watches have listed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Source {
    RemoteGateway,
    RemoteDiscovery,
    RemoteSlices,
    LocalServices,
    LocalEndpoints,
    LocalSlices,
    Namespaces,
}

impl Source {
    /// The `watch` label of the restart metric.
    fn name(self) -> &'static str {
        match self {
            Self::RemoteGateway => "remote_services",
            Self::RemoteDiscovery => "remote_discovery_services",
            Self::RemoteSlices => "remote_endpointslices",
            Self::LocalServices => "local_services",
            Self::LocalEndpoints => "local_endpoints",
            Self::LocalSlices => "local_endpointslices",
            Self::Namespaces => "local_namespaces",
        }
    }

    /// Whether it watches the target cluster (and so says whether the target is reachable).
    fn is_remote(self) -> bool {
        matches!(
            self,
            Self::RemoteGateway | Self::RemoteDiscovery | Self::RemoteSlices
        )
    }
}

/// Why a watch failed, as far as the Link's reachability goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// The API server refused the credentials (401) or their rights (403).
    Unauthorized,
    /// Anything else: connection refused, timeouts, server errors.
    Unreachable,
}

impl Failure {
    /// From the API's own status code, not from the text of the error.
    fn of(error: &watcher::Error) -> Self {
        let code = match error {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => match e {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            watcher::Error::WatchError(status) => Some(status.code),
            watcher::Error::NoResourceVersion => None,
        };
        match code {
            Some(401 | 403) => Self::Unauthorized,
            _ => Self::Unreachable,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Unauthorized => "RemoteUnauthorized",
            Self::Unreachable => "RemoteUnreachable",
        }
    }
}

enum Trigger {
    Key(Key, Option<Instant>),
    Namespace(String),
    Synced(Source),
    /// A watch relisted: reconcile everything against the new listing.
    Relisted(Source),
    WatchFailed(Source, Failure, String),
    /// A watch that had failed delivers events again.
    Healthy(Source),
    /// The target's API answers again the calls the failed watches make.
    Recovered,
}

struct Stores {
    gateway: Option<Cache<Service>>,
    discovery: Option<Cache<Service>>,
    /// Tagged with the headless root a pod's mirror belongs to.
    local_services: Cache<Service>,
    local_endpoints: Cache<Endpoints>,
    local_slices: Cache<EndpointSlice>,
    namespaces: Store<Namespace>,
    /// What mirroring needs of each remote Service's endpoints.
    ready: Arc<Mutex<HashMap<Key, RemoteEndpoints>>>,
}

impl LinkWorker {
    fn labels(&self) -> LinkLabels {
        LinkLabels {
            target_cluster_name: self.spec.target_cluster_name.clone(),
        }
    }

    /// Runs until `cancel` fires.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let target = Target::from_spec(&self.spec);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cluster = target.cluster.clone();
        let mine = format!(
            "{}=true,{}={cluster}",
            keys::MIRRORED_RESOURCE_LABEL,
            keys::CLUSTER_NAME_LABEL
        );
        let my_slices = format!(
            "endpointslice.kubernetes.io/managed-by={SLICE_MANAGED_BY},{}={cluster}",
            keys::CLUSTER_NAME_LABEL
        );

        let mut tasks = tokio::task::JoinSet::new();
        let mut expected = HashSet::new();
        let mut remote_store = |selector: Option<&link_crd::LabelSelector>, source| {
            let sel = selector.and_then(|s| s.to_selector_string())?;
            let cache = Cache::new(|_| None);
            let stream = remote_services(&self.remote, &sel).modify(cache::trim_service);
            expected.insert(source);
            tasks.spawn(forward(
                stream,
                cache.clone(),
                (tx.clone(), source),
                |s: &Service| Some((s.namespace()?, s.name_any())),
            ));
            Some(cache)
        };
        let gateway = remote_store(self.spec.selector.as_ref(), Source::RemoteGateway);
        let discovery = remote_store(
            self.spec.remote_discovery_selector.as_ref(),
            Source::RemoteDiscovery,
        );
        if let Some(federation) = &self.federation {
            match self
                .spec
                .federated_service_selector
                .as_ref()
                .and_then(|s| s.to_selector_string())
            {
                Some(sel) => {
                    tasks.spawn(federation::forward_members(
                        remote_services(&self.remote, &sel),
                        federation.clone(),
                        cluster.clone(),
                    ));
                }
                // No selector: this Link has no members.
                None => federation.listed(&cluster, HashMap::new()),
            }
        }

        let local_services = watch_local(
            &mut tasks,
            &self.local,
            &mine,
            &tx,
            Source::LocalServices,
            &cluster,
            (cache::trim_service, |s: &Service| Some(s.name_any())),
        );
        let local_endpoints = watch_local(
            &mut tasks,
            &self.local,
            &mine,
            &tx,
            Source::LocalEndpoints,
            &cluster,
            (cache::trim_endpoints, |e: &Endpoints| Some(e.name_any())),
        );
        let local_slices = watch_local(
            &mut tasks,
            &self.local,
            &my_slices,
            &tx,
            Source::LocalSlices,
            &cluster,
            (cache::trim_slice, |s: &EndpointSlice| {
                s.labels().get("kubernetes.io/service-name").cloned()
            }),
        );
        let (namespaces, w) = reflector::store();
        let stream = watcher(
            Api::<Namespace>::all(self.local.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(keep_own_fields)
        .reflect(w);
        tasks.spawn(forward_namespaces(stream, tx.clone()));
        let ready = Arc::new(Mutex::new(HashMap::new()));
        tasks.spawn(watch_remote_readiness(
            self.remote.clone(),
            ready.clone(),
            tx.clone(),
        ));
        expected.extend([
            Source::RemoteSlices,
            Source::LocalServices,
            Source::LocalEndpoints,
            Source::LocalSlices,
            Source::Namespaces,
        ]);

        let stores = Stores {
            gateway,
            discovery,
            local_services,
            local_endpoints,
            local_slices,
            namespaces,
            ready,
        };
        let mut state = Loop {
            worker: &self,
            target,
            stores,
            tx: tx.clone(),
            queue: Queue::default(),
            received: HashMap::new(),
            synced: HashSet::new(),
            expected,
            failing: HashMap::new(),
            recovery: None,
            writer: Writer::new(
                self.local.clone(),
                self.metrics.clone(),
                self.spec.target_cluster_name.clone(),
                self.claim.clone(),
            ),
        };
        let mut gateway_rx = self.gateway.clone();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Some(trigger) = rx.recv() => {
                    state.on_trigger(trigger);
                    // Take whatever else is queued before reconciling, so bursts coalesce.
                    while let Ok(t) = rx.try_recv() {
                        state.on_trigger(t);
                    }
                }
                Ok(()) = gateway_rx.changed() => {
                    // Linkerd repairs every mirror's endpoints when the gateway changes (and on a
                    // timer, which watches make unnecessary here); this is that repair.
                    self.metrics.endpoint_repairs.get_or_create(&self.labels()).inc();
                    state.enqueue_all();
                }
                // A retry or a recheck is due.
                () = state.queue.due() => {}
                // Keys left from the last batch, once what arrived meanwhile is taken in.
                () = std::future::ready(()), if state.synced() && !state.queue.is_empty() => {}
            }
            if state.synced() {
                // A batch is abandoned, not finished, when the work is cancelled (the Lease
                // lost): no new call starts, and the claim stops any that would.
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = state.process() => {}
                }
                if state.queue.is_empty() {
                    // Every Service has been reconciled once: the status may say so, and the
                    // controller is synced as far as this Link goes.
                    self.status.settle();
                    self.readiness.link_done(&self.link_name);
                }
            }
        }
        tasks.shutdown().await;
    }
}

struct Loop<'a> {
    worker: &'a LinkWorker,
    target: Target,
    stores: Stores,
    tx: mpsc::UnboundedSender<Trigger>,
    /// Keys to reconcile, and failed keys waiting for their retry.
    queue: Queue<Key>,
    /// When the oldest not-yet-reconciled change of each pending key arrived, for the lag metric.
    received: HashMap<Key, Instant>,
    synced: HashSet<Source>,
    expected: HashSet<Source>,
    /// Each failing watch's failure; only that watch (or a recovery check of the target, for
    /// remote ones) clears it.
    failing: HashMap<Source, (Failure, String)>,
    /// The recovery check of the target's API while one runs (see [`recover`]); owned, so that
    /// it stops with the worker.
    recovery: Option<tokio_util::task::AbortOnDropHandle<()>>,
    writer: Writer,
}

/// Remote Services reconciled at once. Each reconcile is a few API calls in a row; running many
/// side by side is what lets thousands of Services be mirrored in seconds.
const CONCURRENCY: usize = 32;

/// How often a mirror whose name another Service holds is looked at again.
const NAME_TAKEN_RECHECK: Duration = Duration::from_secs(10);

/// Keys reconciled before the worker looks at its triggers again. A first listing of 10,000
/// Services is many batches, not one: the watch events of the writes (three per Service) are
/// taken in as they come instead of piling up in the channel, the writes in flight are matched
/// with the store soon after, and a change made meanwhile waits for one batch, not for all.
const BATCH: usize = 8 * CONCURRENCY;

impl Loop<'_> {
    fn synced(&self) -> bool {
        self.expected.is_subset(&self.synced)
    }

    fn on_trigger(&mut self, trigger: Trigger) {
        match trigger {
            Trigger::Key(k, at) => {
                if let Some(at) = at {
                    self.received.entry(k.clone()).or_insert(at);
                }
                self.queue.add(k);
            }
            Trigger::Namespace(ns) => {
                let keys: Vec<Key> = self
                    .remote_keys()
                    .into_iter()
                    .filter(|(n, _)| *n == ns)
                    .collect();
                self.queue.extend(keys);
            }
            Trigger::Synced(source) => {
                self.synced.insert(source);
                self.failing.remove(&source);
                self.update_reachability();
                if self.synced() {
                    self.enqueue_all();
                }
            }
            Trigger::Relisted(source) => {
                // A relist may skip versions; compare with what the stores now say.
                self.writer.forget_in_flight();
                self.failing.remove(&source);
                self.update_reachability();
                self.enqueue_all();
            }
            Trigger::Healthy(source) => {
                if self.failing.remove(&source).is_some() {
                    self.update_reachability();
                }
            }
            Trigger::WatchFailed(source, failure, error) => {
                tracing::warn!(link = %self.worker.link_name, watch = source.name(), %error, "watch failed; retrying with backoff");
                self.worker
                    .metrics
                    .watch_restarts
                    .get_or_create(&WatchLabels {
                        target_cluster_name: self.target.cluster.clone(),
                        watch: source.name(),
                    })
                    .inc();
                self.failing.insert(source, (failure, error));
                if source.is_remote() {
                    // The target cannot be listed: as synced as this Link can be, and said so.
                    self.worker.readiness.link_done(&self.worker.link_name);
                    self.update_reachability();
                    // A watch that resumes where it stopped reports no event until something
                    // changes, so recovery needs a check of its own.
                    if self.recovery.as_ref().is_none_or(|r| r.is_finished()) {
                        let selector = self
                            .worker
                            .spec
                            .selector
                            .as_ref()
                            .and_then(|s| s.to_selector_string());
                        self.recovery =
                            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                                recover(self.worker.remote.clone(), selector, self.tx.clone()),
                            )));
                    }
                }
            }
            Trigger::Recovered => {
                // The target answers the calls its watches make: their failures are over.
                self.recovery = None;
                self.failing.retain(|s, _| !s.is_remote());
                self.update_reachability();
            }
        }
    }

    fn update_reachability(&self) {
        let status = &self.worker.status;
        let failure = self
            .failing
            .iter()
            .filter(|(s, _)| s.is_remote())
            .min_by_key(|(s, _)| s.name())
            .map(|(_, f)| f);
        let (s, reason, message) = match failure {
            Some((failure, error)) => (
                ConditionStatus::False,
                failure.reason(),
                format!(
                    "the target cluster's API server cannot be watched ({error}); existing mirrors are kept"
                ),
            ),
            None if self.synced() => (ConditionStatus::True, "RemoteReachable", String::new()),
            // Until the first listing, a condition from before (a restart) stands as it was.
            None if status.has_link_condition(CONDITION_REMOTE_REACHABLE) => return,
            None => (
                ConditionStatus::Unknown,
                "Syncing",
                "listing the target cluster's Services".to_owned(),
            ),
        };
        status.set_link_condition(CONDITION_REMOTE_REACHABLE, s, reason, &message);
    }

    fn remote_keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        for store in [&self.stores.gateway, &self.stores.discovery]
            .into_iter()
            .flatten()
        {
            keys.extend(store.keys().into_iter().map(|(key, _)| key));
        }
        keys
    }

    fn enqueue_all(&mut self) {
        let mut keys = self.remote_keys();
        let cluster = &self.target.cluster;
        keys.extend(self.stores.local_services.keys().into_iter().filter_map(
            |((ns, name), root)| {
                let mirror = root.unwrap_or(name);
                Some((
                    ns,
                    naming::remote_service_name(&mirror, cluster)?.to_owned(),
                ))
            },
        ));
        keys.extend(self.worker.status.keys());
        self.queue.extend(keys);
    }

    async fn process(&mut self) {
        let labels = self.worker.labels();
        let keys = self.queue.take(BATCH);
        let results: Vec<(Key, Result<Done, Error>)> = {
            let this = &*self;
            futures::stream::iter(keys)
                .map(|key| async move {
                    let result = this.reconcile(&key).await;
                    (key, result)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await
        };
        for (key, result) in results {
            self.worker.metrics.reconciles.get_or_create(&labels).inc();
            match result {
                Ok(done) => {
                    self.queue.done(&key);
                    let at = self.received.remove(&key);
                    if let (true, Some(at)) = (done.wrote, at) {
                        self.worker
                            .metrics
                            .sync_lag
                            .get_or_create(&labels)
                            .observe(at.elapsed().as_secs_f64());
                    }
                    if done.recheck {
                        self.queue.add_after(key, NAME_TAKEN_RECHECK);
                    }
                }
                Err(error) => {
                    self.worker
                        .metrics
                        .reconcile_errors
                        .get_or_create(&ErrorLabels {
                            target_cluster_name: self.target.cluster.clone(),
                            kind: error.metric_label(),
                        })
                        .inc();
                    self.worker
                        .status
                        .set(&key, Outcome::failed("Error", error.to_string()));
                    let delay = self.queue.failed(key.clone(), error.metric_label());
                    tracing::debug!(namespace = %key.0, service = %key.1, %error, retry_in = ?delay, "reconcile failed");
                }
            }
        }
        if let Some(s) = self.queue.summary_due() {
            tracing::warn!(failing = s.failing, by_reason = ?s.by_reason, oldest = ?s.oldest, "reconciles failing; each is retried with backoff");
        }
        self.worker
            .metrics
            .mirrored
            .get_or_create(&labels)
            .set(i64::try_from(self.worker.status.count_mirrored()).unwrap_or(i64::MAX));
    }

    /// The remote Service for `key`, if a watch of the target holds it (the Link's selectors
    /// then say how it is exported: [`desired::export_mode`], in the plan).
    fn remote(&self, (ns, name): &Key) -> Option<Service> {
        [&self.stores.discovery, &self.stores.gateway]
            .into_iter()
            .flatten()
            .find_map(|s| s.get(ns, name))
    }

    /// This Link's per-pod mirrors of headless mirror `root` in `ns`.
    fn pod_mirrors(&self, ns: &str, root: &str) -> Vec<Service> {
        let local = &self.stores.local_services;
        local
            .keys()
            .into_iter()
            .filter(|((n, _), tag)| n == ns && tag.as_deref() == Some(root))
            .filter_map(|((n, name), _)| local.get(&n, &name))
            .collect()
    }

    /// Reconciles one remote Service: gathers what the worker knows, plans, and carries the plan
    /// out.
    async fn reconcile(&self, key: &Key) -> Result<Done, Error> {
        let ns = &key.0;
        let remote = self.remote(key);
        let endpoints = self
            .stores
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default();
        let gateway = self.worker.gateway.borrow().clone();
        let namespace_exists = self.stores.namespaces.get(&ObjectRef::new(ns)).is_some();
        let local = |name: &str| self.stores.local_services.get(ns, name);
        let pod_mirrors = |root: &str| self.pod_mirrors(ns, root);
        // Names the plan would create that the local watch does not know: asked of the API
        // server (they may be another team's Services), then planned again.
        let mut foreign = HashSet::new();
        let mut asked = HashSet::new();
        let plan = loop {
            let view = View {
                target: &self.target,
                spec: &self.worker.spec,
                headless_services: self.worker.options.enable_headless_services,
                create_namespaces: self.worker.options.enable_namespace_creation,
                remote: remote.as_ref(),
                endpoints: &endpoints,
                gateway: gateway.as_ref(),
                namespace_exists,
                local: &local,
                pod_mirrors: &pod_mirrors,
                foreign: &foreign,
            };
            let plan = plan::plan(key, &view);
            let ask: Vec<String> = plan
                .unchecked(&view)
                .into_iter()
                .filter(|n| !asked.contains(n))
                .collect();
            if ask.is_empty() {
                break plan;
            }
            for name in ask {
                if self.foreign(ns, &name).await? {
                    foreign.insert(name.clone());
                }
                asked.insert(name);
            }
        };
        self.execute(key, plan).await
    }

    /// Carries out `plan` for `key`.
    async fn execute(&self, key: &Key, plan: Plan) -> Result<Done, Error> {
        let status = &self.worker.status;
        match plan {
            Plan::Skip { status: to, notice } => {
                let first = to.as_ref().map(|o| o.reason) != status.reason(key).as_deref();
                match to {
                    Some(outcome) => {
                        status.set(key, outcome);
                    }
                    None => status.remove(key),
                }
                let recheck = matches!(notice, Some(Notice::NameTaken { .. }));
                if let (Some(notice), true) = (notice, first) {
                    self.notify(key, notice).await;
                }
                Ok(Done {
                    wrote: false,
                    recheck,
                })
            }
            Plan::Delete {
                mirror,
                pod_mirrors,
            } => {
                status.remove(key);
                self.writer.delete(&*mirror, "Service").await?;
                for p in &pod_mirrors {
                    self.writer.delete(p, "Service").await?;
                }
                Ok(Done {
                    wrote: true,
                    recheck: false,
                })
            }
            Plan::Mirror(m) => self.write(key, *m).await,
        }
    }

    /// Writes a mirror, its endpoints and its per-pod mirrors.
    async fn write(&self, key: &Key, m: Mirror) -> Result<Done, Error> {
        let Mirror {
            create_namespace,
            replace,
            service,
            live,
            endpoints,
            stale_pod_mirrors,
            status,
        } = m;
        let ns = &key.0;
        let mut wrote = false;
        if create_namespace {
            self.writer
                .create_namespace(ns, Some(&self.target.cluster))
                .await?;
            wrote = true;
        }
        if let Some(old) = &replace {
            tracing::info!(namespace = %ns, mirror = %old.name_any(), "mirror changes between headless and ClusterIP; replacing it");
            self.writer.delete(old, "Service").await?;
            wrote = true;
        }
        let service = match self
            .writer
            .apply("Service", &service, live.as_ref())
            .await?
        {
            Some(applied) => {
                wrote = true;
                applied
            }
            None => live.unwrap_or(service),
        };
        match endpoints {
            MirrorEndpoints::Gateway(p) => {
                wrote |= self
                    .publish((*p).owned_by(plan::owner_reference(&service).as_ref()))
                    .await?;
            }
            MirrorEndpoints::None { endpoints, slices } => {
                if let Some(ep) = self.stores.local_endpoints.get(ns, &endpoints) {
                    self.writer.delete(&ep, "Endpoints").await?;
                    wrote = true;
                }
                for s in slices {
                    if let Some(s) = self.stores.local_slices.get(ns, &s) {
                        self.writer.delete(&s, "EndpointSlice").await?;
                        wrote = true;
                    }
                }
            }
            MirrorEndpoints::Wait => {}
            MirrorEndpoints::Headless(h) => wrote |= self.write_pods(&service, *h).await?,
        }
        for p in &stale_pod_mirrors {
            self.writer.delete(p, "Service").await?;
            wrote = true;
        }
        self.worker.status.set(key, status);
        Ok(Done {
            wrote,
            recheck: false,
        })
    }

    /// The per-pod mirrors of headless mirror `root` (as written), their endpoints, and the
    /// root's Endpoints naming each pod at its mirror's ClusterIP.
    async fn write_pods(&self, root: &Service, mut h: Headless) -> Result<bool, Error> {
        let root_name = root.name_any();
        for (hostname, reason) in &h.refused {
            tracing::warn!(namespace = ?root.namespace(), service = %root_name, %hostname, %reason, "pod not mirrored");
        }
        let owner = plan::owner_reference(root);
        let mut wrote = false;
        let mut ips = Vec::new();
        for pod in std::mem::take(&mut h.pods) {
            let mut want = pod.service;
            want.metadata.owner_references = owner.clone().map(|o| vec![o]);
            let svc = match self
                .writer
                .apply("Service", &want, pod.live.as_ref())
                .await?
            {
                Some(applied) => {
                    wrote = true;
                    applied
                }
                None => pod.live.unwrap_or(want),
            };
            if let Some(ip) = plan::cluster_ip(&svc) {
                ips.push((pod.hostname, ip));
            }
            if let Some(p) = pod.endpoints {
                wrote |= self
                    .publish(p.owned_by(plan::owner_reference(&svc).as_ref()))
                    .await?;
            }
        }
        wrote |= self
            .publish(h.root_endpoints(&self.target, root, &ips))
            .await?;
        Ok(wrote)
    }

    /// Applies Endpoints and their slices, and deletes the object's stale slices.
    async fn publish(&self, p: Published) -> Result<bool, Error> {
        let ns = p.endpoints.metadata.namespace.clone().unwrap_or_default();
        let name = p.endpoints.metadata.name.clone().unwrap_or_default();
        let live = self.stores.local_endpoints.get(&ns, &name);
        let mut wrote = self
            .writer
            .apply("Endpoints", &p.endpoints, live.as_ref())
            .await?
            .is_some();
        for slice in &p.slices {
            let live = self.stores.local_slices.get(&ns, &slice.name_any());
            wrote |= self
                .writer
                .apply("EndpointSlice", slice, live.as_ref())
                .await?
                .is_some();
        }
        for stale in &p.stale_slices {
            if let Some(s) = self.stores.local_slices.get(&ns, stale) {
                self.writer.delete(&s, "EndpointSlice").await?;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Tells the user, once per transition, why a Service is not mirrored.
    async fn notify(&self, (ns, name): &Key, notice: Notice) {
        let cluster = &self.target.cluster;
        let (reason, note) = match notice {
            Notice::MissingNamespace => {
                tracing::warn!(namespace = %ns, service = %name, "namespace missing; will mirror when it appears");
                (
                    "MissingNamespace",
                    format!(
                        "Service {ns}/{name} of cluster {cluster} is not mirrored: namespace {ns} does not exist here"
                    ),
                )
            }
            Notice::NameTaken { mirror } => {
                tracing::warn!(namespace = %ns, service = %name, %mirror, "mirror name taken by a Service this Link did not make; leaving it alone");
                (
                    "NameTaken",
                    format!(
                        "Service {ns}/{name} of cluster {cluster} is not mirrored: {ns}/{mirror} exists and is not its mirror"
                    ),
                )
            }
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Mirror".to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .worker
            .recorder
            .publish(&ev, &self.worker.link_ref)
            .await
        {
            tracing::warn!(%error, "recording an Event failed");
        }
    }

    /// Whether a Service `ns/name` exists here that this Link did not make. Asked only before
    /// the first write of a name the local watch does not know (a Service this Link made but
    /// the watch has not delivered yet counts as its own).
    async fn foreign(&self, ns: &str, name: &str) -> Result<bool, Error> {
        let api: Api<Service> = Api::namespaced(self.worker.local.clone(), ns);
        let found = tokio::time::timeout(crate::apply::CALL_DEADLINE, api.get_opt(name))
            .await
            .map_err(|_| Error::Timeout {
                kind: "Service",
                namespace: ns.to_owned(),
                name: name.to_owned(),
            })?
            .map_err(|source| Error::Read {
                kind: "Service",
                namespace: ns.to_owned(),
                name: name.to_owned(),
                source,
            })?;
        Ok(found.is_some_and(|s| !desired::made_by(&s, &self.target.cluster)))
    }
}

/// What one reconcile did.
#[derive(Debug)]
struct Done {
    /// It wrote something (for the sync-lag metric).
    wrote: bool,
    /// Look again later: a name is held by a Service this controller does not watch, which
    /// cannot wake it when it is freed.
    recheck: bool,
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    #[test]
    fn failures_are_judged_by_the_api_status_code_not_by_text() {
        let api = |code: u16, message: &str| {
            kube::Error::Api(Status::failure(message, "Reason").with_code(code).boxed())
        };
        let cases = [
            (
                watcher::Error::InitialListFailed(api(401, "")),
                Failure::Unauthorized,
            ),
            (
                watcher::Error::WatchStartFailed(api(403, "")),
                Failure::Unauthorized,
            ),
            (
                watcher::Error::WatchError(Status::failure("", "").with_code(403).boxed()),
                Failure::Unauthorized,
            ),
            // A message that merely mentions 401 is not a refusal of the credentials.
            (
                watcher::Error::WatchFailed(api(500, "upstream 401 Unauthorized cache")),
                Failure::Unreachable,
            ),
            (
                watcher::Error::InitialListFailed(api(410, "")),
                Failure::Unreachable,
            ),
            (watcher::Error::NoResourceVersion, Failure::Unreachable),
        ];
        for (error, want) in cases {
            assert_eq!(Failure::of(&error), want, "{error}");
        }
    }

    #[test]
    fn only_remote_watches_say_whether_the_target_is_reachable() {
        for s in [
            Source::RemoteGateway,
            Source::RemoteDiscovery,
            Source::RemoteSlices,
        ] {
            assert!(s.is_remote(), "{s:?}");
            assert!(s.name().starts_with("remote_"));
        }
        for s in [
            Source::LocalServices,
            Source::LocalEndpoints,
            Source::LocalSlices,
            Source::Namespaces,
        ] {
            assert!(!s.is_remote(), "{s:?}");
        }
    }
}
