//! The watches of a Link's worker: each feeds a store and turns its events into the worker's
//! triggers; the remote EndpointSlices are kept only as per-Service summaries.

use super::*;

/// How to trim a kind of local object for its cache, and which mirror an object belongs to.
pub(super) type Local<K> = (fn(&mut K), fn(&K) -> Option<String>);

/// Watches this Link's own local objects of kind `K` (those `labels` select), trimmed by `trim`,
/// into a cache tagged with the headless root of pods' mirrors; each change is keyed back to the
/// remote Service whose mirror `mirror_name` names.
pub(super) fn watch_local<K>(
    tasks: &mut tokio::task::JoinSet<()>,
    client: &Client,
    labels: &str,
    tx: &mpsc::UnboundedSender<Trigger>,
    source: Source,
    cluster: &str,
    (trim, mirror_name): Local<K>,
) -> Cache<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned
        + serde::Serialize
        + Send
        + Sync
        + 'static,
{
    let cache = Cache::new(|o: &K| {
        o.labels()
            .get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL)
            .cloned()
    });
    let stream = watcher(
        Api::<K>::all(client.clone()),
        watcher::Config::default().labels(labels),
    )
    .default_backoff()
    .modify(trim);
    let cluster = cluster.to_owned();
    tasks.spawn(forward(
        stream,
        cache.clone(),
        (tx.clone(), source),
        move |o: &K| {
            // A pod's mirror (and its endpoints) belongs to its headless Service's mirror.
            let mirror = match o.labels().get(keys::HEADLESS_MIRROR_SVC_NAME_LABEL) {
                Some(root) => root.clone(),
                None => mirror_name(o)?,
            };
            Some((
                o.namespace()?,
                naming::remote_service_name(&mirror, &cluster)?.to_owned(),
            ))
        },
    ));
    cache
}

/// A watch of the target's Services that `selector` selects, each trimmed to what mirroring
/// reads (they are kept in memory for every exported Service).
pub(super) fn remote_services(
    remote: &Client,
    selector: &str,
) -> impl Stream<Item = Result<watcher::Event<Service>, watcher::Error>> + Send + 'static {
    watcher(
        Api::<Service>::all(remote.clone()),
        watcher::Config::default().labels(selector),
    )
    .default_backoff()
    .modify(|s: &mut Service| {
        s.metadata.managed_fields = None;
        if let Some(a) = s.metadata.annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    })
}

/// Drives a watch into `cache`, turning its events into triggers.
pub(super) async fn forward<K, S>(
    stream: S,
    cache: Cache<K>,
    (tx, source): (mpsc::UnboundedSender<Trigger>, Source),
    key: impl Fn(&K) -> Option<Key>,
) where
    K: Resource + serde::Serialize + DeserializeOwned,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    let mut failed = false;
    while let Some(event) = stream.next().await {
        if let Ok(e) = &event {
            cache.apply(e);
            if std::mem::take(&mut failed) && tx.send(Trigger::Healthy(source)).is_err() {
                return;
            }
        }
        let trigger = match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                key(&o).map(|k| Trigger::Key(k, Some(Instant::now())))
            }
            Ok(watcher::Event::InitDone) if !listed => {
                listed = true;
                Some(Trigger::Synced(source))
            }
            Ok(watcher::Event::InitDone) => Some(Trigger::Relisted(source)),
            Ok(_) => None,
            Err(e) => {
                failed = true;
                Some(Trigger::WatchFailed(source, Failure::of(&e), e.to_string()))
            }
        };
        if let Some(t) = trigger
            && tx.send(t).is_err()
        {
            return;
        }
    }
}

pub(super) async fn forward_namespaces<S>(stream: S, tx: mpsc::UnboundedSender<Trigger>)
where
    S: Stream<Item = Result<watcher::Event<Namespace>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    let mut failed = false;
    while let Some(event) = stream.next().await {
        if event.is_ok()
            && std::mem::take(&mut failed)
            && tx.send(Trigger::Healthy(Source::Namespaces)).is_err()
        {
            return;
        }
        let t = match event {
            Ok(watcher::Event::Apply(ns)) => Trigger::Namespace(ns.name_any()),
            Ok(watcher::Event::InitDone) if !listed => {
                listed = true;
                Trigger::Synced(Source::Namespaces)
            }
            Ok(watcher::Event::InitDone) => Trigger::Relisted(Source::Namespaces),
            Ok(_) => continue,
            Err(e) => {
                failed = true;
                Trigger::WatchFailed(Source::Namespaces, Failure::of(&e), e.to_string())
            }
        };
        if tx.send(t).is_err() {
            return;
        }
    }
}

/// What the controller keeps of one remote EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SliceSummary {
    has_ready: bool,
    /// For slices of headless Services only (boxed: most Services are not).
    headless: Option<Box<HeadlessSlice>>,
}

/// Of a headless Service's slice: the hostnames of ready endpoints (each with the slice's
/// resourceVersion, which its per-pod mirror records), whether any endpoint (ready or not) has
/// one, and the endpoints' ports.
type HeadlessSlice = (BTreeMap<String, String>, bool, Vec<EndpointPortSpec>);

/// A remote slice's Service (namespace and name), its own name and its summary.
fn summarize(s: &EndpointSlice) -> Option<(Key, String, SliceSummary)> {
    let ns = s.namespace()?;
    let service = s.labels().get("kubernetes.io/service-name")?.clone();
    let ready = |e: &k8s_openapi::api::discovery::v1::Endpoint| {
        let c = e.conditions.as_ref();
        // An unset `ready` means ready (EndpointConditions docs).
        c.and_then(|c| c.ready).unwrap_or(true) && !c.and_then(|c| c.terminating).unwrap_or(false)
    };
    let endpoints = s.endpoints.iter().flatten();
    let headless = s
        .labels()
        .contains_key("service.kubernetes.io/headless")
        .then(|| {
            let version = s.resource_version().unwrap_or_default();
            let hostnames = endpoints
                .clone()
                .filter(|e| ready(e))
                .filter_map(|e| Some((e.hostname.clone()?, version.clone())))
                .collect();
            let named = endpoints.clone().any(|e| e.hostname.is_some());
            let ports = s
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone(), p.port, p.protocol.clone()))
                .collect();
            Box::new((hostnames, named, ports))
        });
    Some((
        (ns, service),
        s.name_any(),
        SliceSummary {
            has_ready: endpoints.clone().any(ready),
            headless,
        },
    ))
}

/// The remote EndpointSlices' summaries, grouped by Service, so that a change to one slice
/// recomputes only its Service. A Service has one slice or a few: a list, not a map.
#[derive(Default)]
struct RemoteSlices {
    by_service: HashMap<Key, Vec<(String, SliceSummary)>>,
}

impl RemoteSlices {
    /// Records slice `name` of Service `key`.
    fn insert(&mut self, key: Key, name: String, summary: SliceSummary) {
        let slices = self.by_service.entry(key).or_default();
        match slices.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s = summary,
            None => slices.push((name, summary)),
        }
    }

    /// Forgets slice `name` of Service `key`.
    fn remove(&mut self, key: &Key, name: &str) {
        if let Some(slices) = self.by_service.get_mut(key) {
            slices.retain(|(n, _)| n != name);
            if slices.is_empty() {
                self.by_service.remove(key);
            }
        }
    }

    /// What the slices of `key` say together.
    fn aggregate(&self, key: &Key) -> RemoteEndpoints {
        let mut e = RemoteEndpoints::default();
        for (_, s) in self.by_service.get(key).into_iter().flatten() {
            e.ready |= s.has_ready;
            if let Some(h) = &s.headless {
                let (hostnames, named, ports) = &**h;
                e.hostnames
                    .extend(hostnames.iter().map(|(h, v)| (h.clone(), v.clone())));
                e.named |= named;
                for p in ports {
                    if !e.ports.contains(p) {
                        e.ports.push(p.clone());
                    }
                }
            }
        }
        e.ports.sort();
        e
    }
}

/// Watches every EndpointSlice of the target cluster and keeps, per Service, what mirroring
/// needs of them ([`RemoteEndpoints`]); not the slices.
pub(super) async fn watch_remote_readiness(
    remote: Client,
    ready: Arc<Mutex<HashMap<Key, RemoteEndpoints>>>,
    tx: mpsc::UnboundedSender<Trigger>,
) {
    let api: Api<EndpointSlice> = Api::all(remote);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    let mut slices = RemoteSlices::default();
    let mut relist: Option<RemoteSlices> = None;
    let mut listed = false;
    let mut failed = false;
    while let Some(event) = stream.next().await {
        if event.is_ok()
            && std::mem::take(&mut failed)
            && tx.send(Trigger::Healthy(Source::RemoteSlices)).is_err()
        {
            return;
        }
        let mut changed: HashSet<Key> = HashSet::new();
        match event {
            Ok(watcher::Event::Apply(s)) => {
                if let Some((key, name, summary)) = summarize(&s) {
                    slices.insert(key.clone(), name, summary);
                    changed.insert(key);
                }
            }
            Ok(watcher::Event::Delete(s)) => {
                if let Some((key, name, _)) = summarize(&s) {
                    slices.remove(&key, &name);
                    changed.insert(key);
                }
            }
            Ok(watcher::Event::Init) => relist = Some(RemoteSlices::default()),
            Ok(watcher::Event::InitApply(s)) => {
                if let (Some(buf), Some((key, name, summary))) = (relist.as_mut(), summarize(&s)) {
                    buf.insert(key, name, summary);
                }
            }
            Ok(watcher::Event::InitDone) => {
                if !listed {
                    listed = true;
                    let _ = tx.send(Trigger::Synced(Source::RemoteSlices));
                }
                let new = relist.take().unwrap_or_default();
                changed.extend(slices.by_service.keys().cloned());
                changed.extend(new.by_service.keys().cloned());
                slices = new;
            }
            Err(e) => {
                failed = true;
                let failure = Failure::of(&e);
                let _ = tx.send(Trigger::WatchFailed(
                    Source::RemoteSlices,
                    failure,
                    e.to_string(),
                ));
                continue;
            }
        }
        let mut flips = Vec::new();
        {
            let mut guard = ready.lock().unwrap_or_else(|e| e.into_inner());
            for key in changed {
                let now = slices.aggregate(&key);
                let before = guard.get(&key);
                if before.unwrap_or(&RemoteEndpoints::default()) != &now {
                    if now == RemoteEndpoints::default() {
                        guard.remove(&key);
                    } else {
                        guard.insert(key.clone(), now);
                    }
                    flips.push(key);
                }
            }
        }
        if !flips.is_empty() {
            tracing::debug!(services = ?flips, "remote endpoints changed");
        }
        for key in flips {
            if tx.send(Trigger::Key(key, Some(Instant::now()))).is_err() {
                return;
            }
        }
    }
}

/// Lists what the remote watches watch (one object each) until the target answers, then says so.
pub(super) async fn recover(
    remote: Client,
    selector: Option<String>,
    tx: mpsc::UnboundedSender<Trigger>,
) {
    // From half a second, doubling to ten (jittered): a target that comes back is seen soon,
    // one that stays away costs a call every ten seconds or so.
    let mut delays = crate::queue::backoff(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
        if tx.is_closed() {
            return;
        }
        let mut services = ListParams::default().limit(1);
        if let Some(s) = &selector {
            services = services.labels(s);
        }
        let slices = ListParams::default().limit(1);
        let services_api = Api::<Service>::all(remote.clone());
        let slices_api = Api::<EndpointSlice>::all(remote.clone());
        if answers(services_api.list(&services)).await && answers(slices_api.list(&slices)).await {
            let _ = tx.send(Trigger::Recovered);
            return;
        }
    }
}

/// Whether an API call answered, within the deadline every call has.
async fn answers<T>(call: impl std::future::Future<Output = Result<T, kube::Error>>) -> bool {
    matches!(
        tokio::time::timeout(crate::apply::CALL_DEADLINE, call).await,
        Ok(Ok(_))
    )
}
