//! Leader election with a `coordination.k8s.io` Lease, so that two or more replicas may run and
//! exactly one writes.
//!
//! The leader renews the Lease every `renew` period; a replica takes it over once it has not been
//! renewed for `duration`. A leader that cannot renew stops its work before its Lease could
//! expire, so two replicas never write at once. Losing the lease stops the workers and leaves
//! every mirror in place; the new leader starts from the same stores and the Link's existing
//! status, so nothing is deleted or flaps.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

/// How the Lease is held.
#[derive(Clone, Debug, clap::Args)]
pub struct LeaseOptions {
    /// This replica's name in the Lease (default: $HOSTNAME, the pod's name).
    #[arg(long, env = "MESHLINK_IDENTITY")]
    pub identity: Option<String>,
    /// How long a Lease stands without renewal before another replica takes it.
    #[arg(long, env = "MESHLINK_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the leader renews, and followers check.
    #[arg(long, env = "MESHLINK_LEASE_RENEW", default_value = "5s", value_parser = parse_duration)]
    pub lease_renew: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::probe::parse_go_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration such as \"5s\""))
}

impl LeaseOptions {
    fn identity(&self) -> String {
        self.identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("meshlink-mirror-{}", std::process::id()))
    }
}

enum Role {
    Leader,
    Follower,
}

/// Where the role is reported: the `leader` gauge and readiness.
#[derive(Debug)]
pub struct Report {
    pub gauge: Gauge,
    pub readiness: crate::Readiness,
}

/// Runs `work` whenever this replica holds Lease `namespace/name`, until `cancel` fires; then
/// releases the Lease so that another replica need not wait for it to expire.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    namespace: &str,
    name: &str,
    options: &LeaseOptions,
    report: Report,
    cancel: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Report {
        gauge: leader_gauge,
        readiness,
    } = report;
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let me = options.identity();
    let mut current: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let role = match try_acquire(&api, name, &me, options.lease_duration).await {
            Ok(role) => role,
            Err(error) => {
                tracing::warn!(lease = %name, %error, "Lease update failed");
                // Keep leading only while the Lease we hold cannot have expired yet.
                if current.is_some()
                    && last_renewed.elapsed() + options.lease_renew < options.lease_duration
                {
                    Role::Leader
                } else {
                    Role::Follower
                }
            }
        };
        match (role, current.is_some()) {
            (Role::Leader, false) => {
                tracing::info!(lease = %name, identity = %me, "became the leader");
                leader_gauge.set(1);
                readiness.leader();
                let token = cancel.child_token();
                current = Some((token.clone(), tokio::spawn(work(token))));
                last_renewed = tokio::time::Instant::now();
            }
            (Role::Leader, true) => last_renewed = tokio::time::Instant::now(),
            (Role::Follower, true) => {
                tracing::warn!(lease = %name, identity = %me, "lost the Lease; stopping (mirrors stay)");
                leader_gauge.set(0);
                if let Some((token, task)) = current.take() {
                    token.cancel();
                    let _ = task.await;
                }
                readiness.follower();
            }
            (Role::Follower, false) => readiness.follower(),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(options.lease_renew) => {}
        }
    }
    if let Some((token, task)) = current.take() {
        token.cancel();
        let _ = task.await;
        release(&api, name, &me).await;
    }
    leader_gauge.set(0);
}

async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
) -> Result<Role, kube::Error> {
    let now = Timestamp::now();
    let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX).max(1);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_owned()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Role::Leader),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let held =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(seconds)));
        t.0 + held < now
    });
    if holder != me && !holder.is_empty() && !expired {
        return Ok(Role::Follower);
    }
    if holder != me {
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    // `replace` carries the resourceVersion read above: of two replicas racing, one gets 409.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Role::Leader),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Role::Follower),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, name: &str, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(error) = api.replace(name, &PostParams::default(), &lease).await {
        tracing::warn!(lease = %name, %error, "releasing the Lease failed; it expires by itself");
    }
}
