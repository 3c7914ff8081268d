//! Leader election with a `coordination.k8s.io` Lease, so that two or more replicas may run and
//! exactly one writes.
//!
//! The leader renews the Lease every `renew` period; a replica takes it over once it has not been
//! renewed for `duration`. A leader that cannot renew stops its work before its Lease could
//! expire, so two replicas never write at once. Losing the lease stops the workers and leaves
//! every mirror in place; the new leader starts from the same stores and the Link's existing
//! status, so nothing is deleted or flaps.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

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

/// Until when this replica may write: its last renewal plus the Lease's duration, less one
/// renewal period of margin (calls in flight, clocks). Every write checks it first, so a replica
/// that lost the Lease, or could not renew it, stops writing before another could start.
#[derive(Clone, Debug, Default)]
pub struct Claim(Arc<Mutex<Option<tokio::time::Instant>>>);

impl Claim {
    /// A claim that always holds (a controller with no election: tests).
    pub fn always() -> Self {
        let c = Self::default();
        c.until(tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        c
    }

    fn until(&self, t: tokio::time::Instant) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(t);
    }

    fn revoke(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Whether a write may go out now.
    pub fn holds(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| tokio::time::Instant::now() < t)
    }
}

/// How long a Lease call may take: well inside the Lease, so that a hung API server cannot keep
/// a replica believing it leads past the time another may take over.
fn lease_call_deadline(options: &LeaseOptions) -> Duration {
    (options.lease_duration / 3).max(Duration::from_millis(500))
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
    F: Fn(CancellationToken, Claim) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Report {
        gauge: leader_gauge,
        readiness,
    } = report;
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let me = options.identity();
    let claim = Claim::default();
    let deadline = lease_call_deadline(options);
    let mut current: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let attempt = tokio::time::Instant::now();
        let tried = tokio::time::timeout(
            deadline,
            try_acquire(&api, name, &me, options.lease_duration),
        )
        .await
        .unwrap_or_else(|_| Err(LeaseError::Timeout(deadline)));
        let role = match tried {
            Ok(role) => {
                if matches!(role, Role::Leader) {
                    // Counted from before the call: the API server may have renewed it at
                    // any moment since.
                    claim.until(
                        attempt + options.lease_duration.saturating_sub(options.lease_renew),
                    );
                }
                role
            }
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
                current = Some((token.clone(), tokio::spawn(work(token, claim.clone()))));
                last_renewed = tokio::time::Instant::now();
            }
            (Role::Leader, true) => last_renewed = tokio::time::Instant::now(),
            (Role::Follower, true) => {
                tracing::warn!(lease = %name, identity = %me, "lost the Lease; stopping (mirrors stay)");
                leader_gauge.set(0);
                // No write goes out from here on, even from a batch still running.
                claim.revoke();
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
        claim.revoke();
        // Every worker has stopped (the work awaits them) before another replica may start.
        let _ = task.await;
        let _ = tokio::time::timeout(deadline, release(&api, name, &me)).await;
    }
    leader_gauge.set(0);
}

/// Why the Lease could not be renewed or taken.
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    duration: Duration,
) -> Result<Role, LeaseError> {
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
            Err(e) => Err(e.into()),
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
        Err(e) => Err(e.into()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_claim_holds_until_its_time_and_not_after_a_revoke() {
        let claim = Claim::default();
        assert!(!claim.holds(), "no claim before the Lease is held");
        claim.until(tokio::time::Instant::now() + Duration::from_secs(10));
        assert!(claim.holds());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !claim.holds(),
            "a claim ends when the Lease could have expired"
        );
        claim.until(tokio::time::Instant::now() + Duration::from_secs(10));
        claim.revoke();
        assert!(!claim.holds());
        assert!(Claim::always().holds());
    }

    #[test]
    fn lease_calls_end_well_inside_the_lease() {
        let o = |d| LeaseOptions {
            identity: None,
            lease_duration: Duration::from_secs(d),
            lease_renew: Duration::from_secs(1),
        };
        assert_eq!(lease_call_deadline(&o(15)), Duration::from_secs(5));
        assert_eq!(lease_call_deadline(&o(1)), Duration::from_millis(500));
    }
}
