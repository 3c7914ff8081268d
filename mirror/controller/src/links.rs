//! Serves the Links of one namespace: one worker per Link, restarted when the Link's spec or its
//! credentials change (never for a status-only change), stopped and cleaned up when it is
//! deleted.
//!
//! Deleting a Link removes the mirrors it created, through a finalizer, and nothing else
//! (Linkerd leaves them behind for `unlink` to find [quirk]).

use std::{
    collections::{HashMap, hash_map::DefaultHasher},
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams},
    runtime::{
        Controller,
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{Event as Finalizer, finalizer},
        reflector::ObjectRef,
        reflector::Store,
        watcher,
    },
};
use link_crd::{
    CONDITION_ACCEPTED, CONDITION_GATEWAY_ALIVE, CONDITION_REMOTE_REACHABLE, ConditionStatus, Link,
    keys,
};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    Options,
    federation::Federation,
    gateway::{self, Entry},
    metrics::{LinkLabels, Metrics, WriteLabels},
    probe,
    status::StatusHandle,
    worker::LinkWorker,
};

/// The finalizer that makes deleting a Link remove its mirrors first.
pub const FINALIZER: &str = "multicluster.meshlink.io/mirror-cleanup";

struct Running {
    fingerprint: u64,
    cancel: CancellationToken,
}

struct Ctx {
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    secrets: Api<Secret>,
    running: Mutex<HashMap<String, Running>>,
    /// Federated Services, when this controller serves every Link.
    federation: Option<Federation>,
    /// Every Link of the namespace, to tell which one serves a target cluster name.
    links: Store<Link>,
    readiness: crate::Readiness,
    /// Whether this replica may write (the Lease).
    claim: crate::leader::Claim,
    /// Every task of every Link: awaited before `run` returns, so that no worker still writes
    /// when the Lease is released.
    tasks: tokio_util::task::TaskTracker,
}

/// The Link that serves target cluster `cluster` among `links`: the oldest, then the first by
/// name. Mirrors, labels and federated entries are keyed by the target's name, so two Links of
/// one name would write over each other; only this one runs.
pub fn claim_holder<'a>(
    links: impl IntoIterator<Item = &'a Link>,
    cluster: &str,
) -> Option<&'a Link> {
    links
        .into_iter()
        .filter(|l| l.spec.target_cluster_name == cluster)
        .min_by(|a, b| {
            let created = |l: &Link| l.metadata.creation_timestamp.clone().map(|t| t.0);
            created(a)
                .cmp(&created(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
}

impl Ctx {
    /// The other Link that serves `link`'s target cluster name, when it is not `link`.
    fn holder_other_than(&self, link: &Link) -> Option<String> {
        let cluster = &link.spec.target_cluster_name;
        if cluster.is_empty() {
            return None;
        }
        let links = self.links.state();
        let holder = claim_holder(links.iter().map(|l| &**l).chain([link]), cluster)?;
        (holder.name_any() != link.name_any()).then(|| holder.name_any())
    }
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<kube::Error>>),
}

/// Serves Links until `cancel` fires, then stops every worker (leaving mirrors in place).
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    readiness: crate::Readiness,
    claim: crate::leader::Claim,
    cancel: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let links: Api<Link> = Api::namespaced(client.clone(), &options.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let mut link_config = watcher::Config::default();
    if let Some(name) = &options.link {
        link_config = link_config.fields(&format!("metadata.name={name}"));
    }
    let secret_config =
        watcher::Config::default().fields(&format!("type={}", keys::REMOTE_KUBECONFIG_SECRET_TYPE));
    let controller = Controller::new(links, link_config);
    let store = controller.store();
    let links_store = store.clone();
    let federation = match &options.link {
        None => Some(Federation::start(
            client.clone(),
            &options,
            metrics.clone(),
            store.clone(),
            readiness.clone(),
            (claim.clone(), &tasks),
            &cancel,
        )),
        Some(link) => {
            tracing::info!(%link, "serving one Link: federated Services are left to a controller of every Link");
            None
        }
    };
    let ctx = Arc::new(Ctx {
        client,
        options,
        metrics,
        secrets: secrets.clone(),
        running: Mutex::new(HashMap::new()),
        federation,
        links: links_store.clone(),
        readiness: readiness.clone(),
        claim,
        tasks: tasks.clone(),
    });
    // Once the Links are listed, readiness waits for each of them to be seen through once.
    let serves_all = ctx.options.link.is_none();
    tokio::spawn(cancel.clone().run_until_cancelled_owned(async move {
        if wait_listed(&links_store).await {
            let names = links_store
                .state()
                .iter()
                .map(|l| l.name_any())
                .collect::<Vec<_>>();
            readiness.links_listed(names, serves_all);
        }
    }));
    controller
        // A credentials Secret's change re-reconciles the Links that name it.
        .watches(secrets, secret_config, move |secret: Secret| {
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|l| l.spec.cluster_credentials_secret == name)
                .map(|l| ObjectRef::from_obj(&*l))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(cancel.clone().cancelled_owned())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {})
        .await;
    for (_, r) in ctx.running.lock().await.drain() {
        r.cancel.cancel();
    }
    tasks.close();
    tasks.wait().await;
}

/// Waits until `store` has listed once; false if it never will. Its readiness wakes only one
/// waiter (a oneshot underneath, and the Controller waits on it too), so it is polled.
pub(crate) async fn wait_listed(store: &Store<Link>) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
}

fn error_policy(_: Arc<Link>, error: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "Link reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(link: Arc<Link>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let api: Api<Link> = Api::namespaced(ctx.client.clone(), &ctx.options.namespace);
    finalizer(&api, FINALIZER, link, |event| async {
        match event {
            Finalizer::Apply(link) => ensure_worker(&link, &ctx).await,
            Finalizer::Cleanup(link) => cleanup(&link, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Starts the Link's worker, or restarts it when the spec or the credentials changed.
async fn ensure_worker(link: &Link, ctx: &Ctx) -> Result<Action, kube::Error> {
    let name = link.name_any();
    ctx.metrics
        .link_reconciles
        .get_or_create(&LinkLabels {
            target_cluster_name: link.spec.target_cluster_name.clone(),
        })
        .inc();
    if let Some(holder) = ctx.holder_other_than(link) {
        return refuse_duplicate(link, &holder, ctx).await;
    }
    let secret = match ctx
        .secrets
        .get_opt(&link.spec.cluster_credentials_secret)
        .await
    {
        Ok(s) => s,
        Err(e) if link.spec.cluster_credentials_secret.is_empty() => {
            tracing::debug!(error = %e, "no credentials Secret named");
            None
        }
        Err(e) => return Err(e),
    };
    let fingerprint = {
        let mut h = DefaultHasher::new();
        serde_json::to_string(&link.spec)
            .unwrap_or_default()
            .hash(&mut h);
        secret
            .as_ref()
            .and_then(|s| s.resource_version())
            .hash(&mut h);
        h.finish()
    };
    let mut running = ctx.running.lock().await;
    if running
        .get(&name)
        .is_some_and(|r| r.fingerprint == fingerprint)
    {
        return Ok(Action::await_change());
    }
    if let Some(old) = running.remove(&name) {
        tracing::info!(link = %name, "Link spec or credentials changed; restarting its worker");
        old.cancel.cancel();
    }
    let cancel = CancellationToken::new();
    running.insert(
        name.clone(),
        Running {
            fingerprint,
            cancel: cancel.clone(),
        },
    );
    drop(running);

    ctx.metrics
        .worker_starts
        .get_or_create(&LinkLabels {
            target_cluster_name: link.spec.target_cluster_name.clone(),
        })
        .inc();
    let status = StatusHandle::new(link.status.as_ref());
    if let Some(f) = &ctx.federation {
        f.join(link, status.clone());
    }
    let metrics = ctx.metrics.clone();
    let cluster = link.spec.target_cluster_name.clone();
    let span = link_span(link);
    ctx.tasks.spawn(
        cancel
            .clone()
            .run_until_cancelled_owned(status.clone().flush_forever(
                ctx.client.clone(),
                ctx.options.namespace.clone(),
                name.clone(),
                ctx.claim.clone(),
                move || {
                    metrics
                        .writes
                        .get_or_create(&WriteLabels {
                            target_cluster_name: cluster.clone(),
                            kind: "Link",
                            verb: "status",
                        })
                        .inc();
                },
            ))
            .instrument(span.clone()),
    );

    let remote = match mirror_credentials::client_from_secret(
        &ctx.options.namespace,
        &link.spec.cluster_credentials_secret,
        secret.as_ref(),
    )
    .await
    {
        Ok(c) => c,
        Err(error) => {
            tracing::warn!(link = %name, %error, "cannot build a client for the target cluster");
            status.set_link_condition(
                CONDITION_REMOTE_REACHABLE,
                ConditionStatus::False,
                error.reason(),
                &error.to_string(),
            );
            // Nothing to sync until the Secret changes; its watch brings the Link back here.
            ctx.readiness.link_done(&name);
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };

    let (gateway_tx, gateway_rx) = watch::channel(None);
    let target = crate::desired::Target::from_spec(&link.spec);
    let entries: Vec<Entry> = gateway::parse_entries(&link.spec.gateway_address);
    // Until the probe says otherwise the gateway is as the Link last said, alive when it never
    // said (see `probe`).
    let was_alive = link
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == CONDITION_GATEWAY_ALIVE)
        })
        .is_none_or(|c| c.status != ConditionStatus::False);
    let (alive_tx, alive_rx) = watch::channel(was_alive);
    if let (Some(port), false) = (target.gateway_port, entries.is_empty()) {
        match ctx.options.resolver() {
            Ok(resolver) => {
                ctx.tasks.spawn(
                    cancel
                        .clone()
                        .run_until_cancelled_owned(gateway::resolve_forever(
                            resolver, entries, port, alive_rx, gateway_tx,
                        ))
                        .instrument(span.clone()),
                );
            }
            Err(error) => {
                tracing::error!(link = %name, %error, "no DNS resolver; gateway names cannot be resolved")
            }
        }
        start_probe(link, ctx, &status, gateway_rx.clone(), alive_tx, &cancel);
    }

    let worker = LinkWorker {
        link_name: name.clone(),
        spec: link.spec.clone(),
        local: ctx.client.clone(),
        remote,
        gateway: gateway_rx,
        status,
        metrics: ctx.metrics.clone(),
        options: ctx.options.clone(),
        link_ref: link.object_ref(&()),
        federation: ctx.federation.clone(),
        recorder: Recorder::new(ctx.client.clone(), "meshlink-service-mirror".into()),
        readiness: ctx.readiness.clone(),
        claim: ctx.claim.clone(),
    };
    tracing::info!(link = %name, target = %link.spec.target_cluster_name, "serving Link");
    ctx.tasks.spawn(worker.run(cancel).instrument(span));
    Ok(Action::await_change())
}

/// The span every task of a Link runs in: its log lines name the Link and its target without
/// repeating them.
fn link_span(link: &Link) -> tracing::Span {
    tracing::info_span!("link", link = %link.name_any(), target = %link.spec.target_cluster_name)
}

/// A Link whose target cluster name another Link already serves: its worker (if it had one)
/// stops, it mirrors nothing, and its status says which Link holds the name. It is looked at
/// again every few seconds, so it takes over once the holder is deleted or renamed.
async fn refuse_duplicate(link: &Link, holder: &str, ctx: &Ctx) -> Result<Action, kube::Error> {
    let name = link.name_any();
    ctx.readiness.link_done(&name);
    let cluster = &link.spec.target_cluster_name;
    let mut running = ctx.running.lock().await;
    let was_running = running.remove(&name).map(|r| r.cancel.cancel()).is_some();
    drop(running);
    let status = StatusHandle::new(link.status.as_ref());
    let message = format!(
        "targetClusterName {cluster:?} is already served by Link {holder}; this Link mirrors nothing until that Link is deleted or this one names another cluster"
    );
    status.set_link_condition(
        CONDITION_ACCEPTED,
        ConditionStatus::False,
        "DuplicateTargetCluster",
        &message,
    );
    let said = link.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == CONDITION_ACCEPTED
                && c.status == ConditionStatus::False
                && c.message == message
        })
    });
    if was_running || !said {
        tracing::warn!(link = %name, target = %cluster, %holder, "refusing a Link whose target cluster name another Link serves");
    }
    if !said {
        let api: Api<Link> = Api::namespaced(ctx.client.clone(), &ctx.options.namespace);
        api.patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status.document_json()),
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// Starts the gateway probe of a Link, reporting transitions as the `GatewayAlive` condition and
/// as Events.
fn start_probe(
    link: &Link,
    ctx: &Ctx,
    status: &StatusHandle,
    gateway: watch::Receiver<Option<crate::desired::Gateway>>,
    alive: watch::Sender<bool>,
    cancel: &CancellationToken,
) {
    let spec = match probe::ProbeSpec::from_link(&link.spec.probe_spec) {
        Ok(Some(spec)) => spec,
        Ok(None) => return,
        Err(error) => {
            status.set_link_condition(
                CONDITION_GATEWAY_ALIVE,
                ConditionStatus::Unknown,
                "InvalidProbeSpec",
                &error.to_string(),
            );
            return;
        }
    };
    if !status.has_link_condition(CONDITION_GATEWAY_ALIVE) {
        status.set_link_condition(
            CONDITION_GATEWAY_ALIVE,
            ConditionStatus::True,
            "ProbePending",
            "alive until failureThreshold probes in a row fail",
        );
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cluster = link.spec.target_cluster_name.clone();
    let latency_status = status.clone();
    ctx.tasks.spawn(
        cancel
            .clone()
            .run_until_cancelled_owned(probe::run(
                spec,
                cluster,
                gateway,
                alive,
                tx,
                ctx.metrics.probe.clone(),
                move |latency| latency_status.set_gateway_latency(latency),
            ))
            .instrument(link_span(link)),
    );
    let status = status.clone();
    let recorder = Recorder::new(ctx.client.clone(), "meshlink-service-mirror".into());
    let reference = link.object_ref(&());
    ctx.tasks.spawn(
        cancel
            .clone()
            .run_until_cancelled_owned(async move {
                while let Some(t) = rx.recv().await {
                    let (s, reason, type_) = match t.liveness {
                        probe::Liveness::Alive => {
                            (ConditionStatus::True, "GatewayAlive", EventType::Normal)
                        }
                        probe::Liveness::Dead => {
                            (ConditionStatus::False, "GatewayDead", EventType::Warning)
                        }
                    };
                    status.set_link_condition(CONDITION_GATEWAY_ALIVE, s, reason, &t.detail);
                    let ev = Event {
                        type_,
                        reason: reason.to_owned(),
                        note: Some(if t.detail.is_empty() {
                            "the gateway answers its probe again".to_owned()
                        } else {
                            t.detail.clone()
                        }),
                        action: "Probe".to_owned(),
                        secondary: None,
                    };
                    if let Err(error) = recorder.publish(&ev, &reference).await {
                        tracing::warn!(%error, "recording an Event failed");
                    }
                }
            })
            .instrument(link_span(link)),
    );
}

/// Stops the Link's worker and deletes every mirror it made, before the Link goes.
async fn cleanup(link: &Link, ctx: &Ctx) -> Result<Action, kube::Error> {
    let name = link.name_any();
    ctx.readiness.link_done(&name);
    if let Some(r) = ctx.running.lock().await.remove(&name) {
        r.cancel.cancel();
    }
    let cluster = &link.spec.target_cluster_name;
    if cluster.is_empty() {
        return Ok(Action::await_change());
    }
    // A refused duplicate owns nothing: the mirrors of its cluster name are the holder's.
    if let Some(holder) = ctx.holder_other_than(link) {
        tracing::info!(link = %name, target = %cluster, %holder, "deleting a refused duplicate Link: the mirrors stay with the Link that serves the name");
        return Ok(Action::await_change());
    }
    if let Some(f) = &ctx.federation {
        f.leave(cluster);
    }
    let services: Api<Service> = Api::all(ctx.client.clone());
    let selector = format!(
        "{}=true,{}={cluster}",
        keys::MIRRORED_RESOURCE_LABEL,
        keys::CLUSTER_NAME_LABEL
    );
    for svc in services
        .list(&ListParams::default().labels(&selector))
        .await?
    {
        let ns = svc.namespace().unwrap_or_default();
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        match api.delete(&svc.name_any(), &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(link = %name, namespace = %ns, service = %svc.name_any(), "deleted mirror of a deleted Link")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, cluster: &str, created: Option<i64>) -> Link {
        let mut l = Link::new(
            name,
            link_crd::LinkSpec {
                target_cluster_name: cluster.into(),
                ..Default::default()
            },
        );
        l.metadata.creation_timestamp = created.map(|s| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            )
        });
        l
    }

    #[test]
    fn the_oldest_link_of_a_target_name_holds_it() {
        let links = [
            link("east-b", "east", Some(200)),
            link("east-a", "east", Some(100)),
            link("north", "north", Some(50)),
            // Same creation second: the first by name.
            link("west-2", "west", Some(300)),
            link("west-1", "west", Some(300)),
        ];
        let holder = |c| claim_holder(&links, c).map(ResourceExt::name_any);
        assert_eq!(holder("east").as_deref(), Some("east-a"));
        assert_eq!(holder("north").as_deref(), Some("north"));
        assert_eq!(holder("west").as_deref(), Some("west-1"));
        assert_eq!(holder("south"), None);
    }
}
