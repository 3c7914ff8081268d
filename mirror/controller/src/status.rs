//! A Link's status: one entry per mirrored Service in Linkerd's format, plus meshlink's
//! Link-level conditions.
//!
//! Workers record outcomes as they reconcile; a flusher writes the whole status at most once per
//! [`COALESCE`] and only when it differs from what it last wrote, so thousands of Services do not
//! mean thousands of writes. `lastTransitionTime` moves only when a condition's status, reason,
//! message or local reference changes (Linkerd sets it on every write [quirk]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use link_crd::{
    CONDITION_MIRRORED, CONDITION_READY, ConditionStatus, Link, LinkCondition, LinkStatus,
    ObjectRef, ServiceStatus, ServiceSummary, keys,
};
use serde::Serialize;
use tokio::sync::Notify;

/// How long the flusher waits after a change before writing, to gather further changes.
pub const COALESCE: Duration = Duration::from_millis(250);

/// Most entries `mirrorServices` lists. At about 300 bytes each, a Link with every entry of
/// 10,000 Services would exceed what the API server stores in one object (etcd's request limit);
/// Services that are not mirrored are listed first, so that every problem stays visible, and
/// `status.summary` gives the full counts.
pub const MAX_ENTRIES: usize = 1000;

/// The namespace and name of a remote Service.
pub type Key = (String, String);

/// The outcome of mirroring one remote Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// `True` when mirrored.
    pub status: ConditionStatus,
    /// `Mirrored`, `InvalidService`, `Error` or `MissingNamespace`.
    pub reason: &'static str,
    /// Empty on success; what is wrong otherwise.
    pub message: String,
    /// The local mirror, on success.
    pub local: Option<ObjectRef>,
}

impl Outcome {
    /// Mirrored as `local`.
    pub fn mirrored(namespace: &str, name: &str) -> Self {
        Self {
            status: ConditionStatus::True,
            reason: "Mirrored",
            message: String::new(),
            local: Some(ObjectRef::service(namespace, name)),
        }
    }

    /// Not mirrored, for `reason`.
    pub fn failed(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: ConditionStatus::False,
            reason,
            message: message.into(),
            local: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Cond {
    status: ConditionStatus,
    reason: String,
    message: String,
    local: Option<ObjectRef>,
    since: Time,
}

#[derive(Debug, Default)]
struct State {
    services: BTreeMap<Key, Cond>,
    /// This Link's members of federated Services.
    federated: BTreeMap<Key, Cond>,
    link: BTreeMap<&'static str, Cond>,
    /// The gateway latency in the status, and when it was recorded.
    latency: Option<(u64, std::time::Instant)>,
    /// The counts the Link said when this handle was made. Its entries list at most
    /// [`MAX_ENTRIES`] Services, so until every Service has been reconciled once, counts
    /// rendered from the entries known so far would be wrong: these stand until then.
    loaded_summary: Option<ServiceSummary>,
    /// Every Service has been reconciled once since this handle was made (see
    /// [`StatusHandle::settle`]).
    settled: bool,
}

/// The status a Link's status writes carry.
#[derive(Debug, Serialize)]
struct Document {
    status: StatusDocument,
}

/// A status write: the document as a server-side apply of the Link's status, under the
/// controller's field manager. Every field it lists is the controller's; one it stops listing
/// (an entry gone) is removed, and fields other writers own (a user's `kubectl patch`) are left
/// alone.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Applied<'a> {
    api_version: String,
    kind: String,
    metadata: AppliedMeta<'a>,
    #[serde(flatten)]
    document: &'a Document,
}

#[derive(Debug, Serialize)]
struct AppliedMeta<'a> {
    name: &'a str,
}

impl<'a> Applied<'a> {
    fn new(name: &'a str, document: &'a Document) -> Self {
        use kube::Resource as _;
        Self {
            api_version: Link::api_version(&()).into_owned(),
            kind: Link::kind(&()).into_owned(),
            metadata: AppliedMeta { name },
            document,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusDocument {
    mirror_services: Vec<ServiceStatus>,
    federated_services: Vec<ServiceStatus>,
    conditions: Vec<LinkCondition>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<GatewayLatency>,
    summary: ServiceSummary,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayLatency {
    latency_milliseconds: u64,
}

/// The texts of a status document and of its Link-level conditions.
fn texts(doc: &Document) -> (String, String) {
    (
        serde_json::to_string(doc).unwrap_or_default(),
        serde_json::to_string(&doc.status.conditions).unwrap_or_default(),
    )
}

/// How long a recorded gateway latency stands before a new measurement replaces it...
pub const LATENCY_REFRESH: Duration = Duration::from_secs(60);

/// ...unless the new one differs by more than half: probes every few seconds must not mean a
/// status write every few seconds.
fn latency_changed(old: u64, new: u64) -> bool {
    let (lo, hi) = (old.min(new), old.max(new));
    hi > lo.saturating_mul(3) / 2 + 1
}

/// A status list: entries that are not `True` first, so that every problem stays visible, at
/// most [`MAX_ENTRIES`]; and how many are not `True`.
fn entries(
    map: &BTreeMap<Key, Cond>,
    condition: impl Fn(&str, &Cond) -> LinkCondition,
) -> (Vec<ServiceStatus>, usize) {
    let failing = map
        .iter()
        .filter(|(_, c)| c.status != ConditionStatus::True);
    let ok = map
        .iter()
        .filter(|(_, c)| c.status == ConditionStatus::True);
    let not_ok = failing.clone().count();
    let list = failing
        .chain(ok)
        .take(MAX_ENTRIES)
        .map(|((ns, name), c)| ServiceStatus {
            conditions: vec![condition(CONDITION_MIRRORED, c)],
            controller_name: keys::STATUS_CONTROLLER_NAME.to_owned(),
            remote_ref: ObjectRef::service(ns, name),
        })
        .collect();
    (list, not_ok)
}

/// Shared handle to one Link's status.
#[derive(Clone, Debug)]
pub struct StatusHandle {
    state: Arc<std::sync::Mutex<State>>,
    changed: Arc<Notify>,
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Records a condition under `key`; the transition time moves only when something changed.
/// Returns whether it did.
fn upsert<K: Ord>(
    map: &mut BTreeMap<K, Cond>,
    key: K,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    local: Option<ObjectRef>,
) -> bool {
    if let Some(c) = map.get(&key)
        && c.status == status
        && c.reason == reason
        && c.message == message
        && c.local == local
    {
        return false;
    }
    let cond = Cond {
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        local,
        since: now(),
    };
    map.insert(key, cond);
    true
}

impl StatusHandle {
    /// A handle that starts from the status the Link already has, so that a restarted
    /// controller keeps the transition times of conditions that did not change.
    pub fn new(existing: Option<&LinkStatus>) -> Self {
        let mut state = State::default();
        if let Some(st) = existing {
            state.loaded_summary.clone_from(&st.summary);
            // The latency written before stands: a status apply without it would remove it.
            state.latency = st
                .gateway
                .as_ref()
                .and_then(|g| g.latency_milliseconds)
                .map(|ms| (ms, std::time::Instant::now()));
            for c in &st.conditions {
                let Some(type_) = [
                    CONDITION_READY,
                    link_crd::CONDITION_REMOTE_REACHABLE,
                    link_crd::CONDITION_GATEWAY_ALIVE,
                ]
                .into_iter()
                .find(|t| *t == c.type_) else {
                    continue;
                };
                state.link.insert(
                    type_,
                    Cond {
                        status: c.status,
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        local: None,
                        since: c.last_transition_time.clone(),
                    },
                );
            }
            for (list, entries) in [
                (&mut state.services, &st.mirror_services),
                (&mut state.federated, &st.federated_services),
            ] {
                for entry in entries {
                    let Some(c) = entry
                        .conditions
                        .iter()
                        .find(|c| c.type_ == CONDITION_MIRRORED)
                    else {
                        continue;
                    };
                    list.insert(
                        (
                            entry.remote_ref.namespace.clone(),
                            entry.remote_ref.name.clone(),
                        ),
                        Cond {
                            status: c.status,
                            reason: c.reason.clone(),
                            message: c.message.clone(),
                            local: c.local_ref.clone(),
                            since: c.last_transition_time.clone(),
                        },
                    );
                }
            }
        }
        Self {
            state: Arc::new(std::sync::Mutex::new(state)),
            changed: Arc::new(Notify::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A poisoned lock only means a panic elsewhere mid-update of plain data.
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Records `outcome` for `key` in a list; returns whether it is a transition.
    fn set_in(
        &self,
        list: fn(&mut State) -> &mut BTreeMap<Key, Cond>,
        key: &Key,
        outcome: Outcome,
    ) -> bool {
        let changed = self.with(|s| {
            upsert(
                list(s),
                key.clone(),
                outcome.status,
                outcome.reason,
                &outcome.message,
                outcome.local,
            )
        });
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    fn remove_in(&self, list: fn(&mut State) -> &mut BTreeMap<Key, Cond>, key: &Key) {
        if self.with(|s| list(s).remove(key).is_some()) {
            self.changed.notify_one();
        }
    }

    /// Records the outcome for mirrored Service `key`; returns whether it is a transition.
    pub fn set(&self, key: &Key, outcome: Outcome) -> bool {
        self.set_in(|s| &mut s.services, key, outcome)
    }

    /// Forgets `key` (unexported or deleted).
    pub fn remove(&self, key: &Key) {
        self.remove_in(|s| &mut s.services, key);
    }

    /// Records the outcome of this Link's member `key` of a federated Service.
    pub fn set_federated(&self, key: &Key, outcome: Outcome) {
        self.set_in(|s| &mut s.federated, key, outcome);
    }

    /// Forgets the federated member `key` (it left its federated Service).
    pub fn remove_federated(&self, key: &Key) {
        self.remove_in(|s| &mut s.federated, key);
    }

    /// The keys that have an entry.
    pub fn keys(&self) -> Vec<Key> {
        self.with(|s| s.services.keys().cloned().collect())
    }

    /// The current outcome reason for `key`.
    pub fn reason(&self, key: &Key) -> Option<String> {
        self.with(|s| s.services.get(key).map(|c| c.reason.clone()))
    }

    /// Sets a Link-level condition and recomputes `Ready` (every other Link-level condition
    /// True); returns whether it is a transition.
    pub fn set_link_condition(
        &self,
        type_: &'static str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
    ) -> bool {
        let changed = self.put_link_condition(type_, status, reason, message);
        let ready = self.with(|s| {
            s.link
                .iter()
                .find(|(t, c)| **t != CONDITION_READY && c.status != ConditionStatus::True)
                .map(|(t, c)| (c.status, c.reason.clone(), format!("{t}: {}", c.message)))
        });
        match ready {
            None => self.put_link_condition(CONDITION_READY, ConditionStatus::True, "Ready", ""),
            Some((status, reason, message)) => {
                let status = if status == ConditionStatus::Unknown {
                    status
                } else {
                    ConditionStatus::False
                };
                self.put_link_condition(CONDITION_READY, status, &reason, &message)
            }
        };
        changed
    }

    fn put_link_condition(
        &self,
        type_: &'static str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
    ) -> bool {
        let changed = self.with(|s| upsert(&mut s.link, type_, status, reason, message, None));
        if changed {
            self.changed.notify_one();
        }
        changed
    }

    /// Records a measured gateway latency (see [`LATENCY_REFRESH`]).
    pub fn set_gateway_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let changed = self.with(|s| {
            let update = match s.latency {
                None => true,
                Some((old, at)) => at.elapsed() >= LATENCY_REFRESH || latency_changed(old, ms),
            };
            if update {
                s.latency = Some((ms, std::time::Instant::now()));
            }
            update
        });
        if changed {
            self.changed.notify_one();
        }
    }

    /// Whether a Link-level condition of this type is recorded.
    pub fn has_link_condition(&self, type_: &str) -> bool {
        self.with(|s| s.link.contains_key(type_))
    }

    /// Counts of entries by reason, for metrics.
    pub fn count_mirrored(&self) -> usize {
        self.with(|s| {
            s.services
                .values()
                .filter(|c| c.status == ConditionStatus::True)
                .count()
        })
    }

    /// The status document as it would be written now.
    fn document(&self) -> Document {
        self.with(|s| {
            let condition = |type_: &str, c: &Cond| LinkCondition {
                type_: type_.to_owned(),
                status: c.status,
                last_probe_time: None,
                last_transition_time: c.since.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                local_ref: c.local.clone(),
            };
            let (mirror_services, not_mirrored) = entries(&s.services, condition);
            let (federated_services, _) = entries(&s.federated, condition);
            let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
            let summary = match (&s.loaded_summary, s.settled) {
                (Some(loaded), false) => loaded.clone(),
                _ => ServiceSummary {
                    mirrored: count(s.services.len() - not_mirrored),
                    not_mirrored: count(not_mirrored),
                    listed: count(mirror_services.len()),
                },
            };
            Document {
                status: StatusDocument {
                    mirror_services,
                    federated_services,
                    conditions: s.link.iter().map(|(t, c)| condition(t, c)).collect(),
                    gateway: s.latency.map(|(ms, _)| GatewayLatency {
                        latency_milliseconds: ms,
                    }),
                    summary,
                },
            }
        })
    }

    /// Says that every Service has been reconciled once since this handle was made. Until
    /// then, for a Link that has a status already (a restart), only a change of a Link-level
    /// condition is written, with the counts the Link said: a restart in which nothing changed
    /// writes nothing, and an unreachable target is still reported at once. After it, every
    /// change is.
    pub fn settle(&self) {
        if !self.with(|s| std::mem::replace(&mut s.settled, true)) {
            self.changed.notify_one();
        }
    }

    /// The status document as it would be written now, as JSON (for a one-off write).
    pub fn document_json(&self) -> serde_json::Value {
        serde_json::to_value(self.document()).unwrap_or_default()
    }

    /// What is due to be written, given what was: the document and its text, and the text of
    /// its Link-level conditions.
    fn due(&self, written: &(String, String)) -> Option<(Document, (String, String))> {
        let doc = self.document();
        let texts = texts(&doc);
        // A Link met for the first time has nothing to keep: its entries are written as they come.
        let settled = self.with(|s| s.settled || s.loaded_summary.is_none());
        let changed = if settled {
            texts.0 != written.0
        } else {
            texts.1 != written.1
        };
        changed.then_some((doc, texts))
    }

    /// The status document as it would be written now, as JSON.
    #[cfg(test)]
    pub fn render(&self) -> serde_json::Value {
        serde_json::to_value(self.document()).unwrap_or_default()
    }

    /// Writes the status whenever it changes, at most once per [`COALESCE`], until cancelled.
    /// Failed writes are retried on the next change or after a second.
    pub async fn flush_forever(
        self,
        client: Client,
        namespace: String,
        name: String,
        claim: crate::leader::Claim,
        writes: impl Fn(),
    ) {
        let api: Api<Link> = Api::namespaced(client, &namespace);
        // What the Link already says (this handle starts from it): a restart with nothing
        // changed writes nothing. Kept as text: as a JSON tree, a thousand entries took 5 MB
        // (and the document is serialized from its types, never built as a tree).
        let mut written = texts(&self.document());
        loop {
            if let Some((body, texts)) = self.due(&written) {
                if !claim.holds() {
                    // Not the Lease holder (any more): the next leader writes the status.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                let applied = Applied::new(&name, &body);
                let (params, patch) = (
                    PatchParams::apply(crate::desired::FIELD_MANAGER).force(),
                    Patch::Apply(&applied),
                );
                let call = api.patch_status(&name, &params, &patch);
                match tokio::time::timeout(crate::apply::CALL_DEADLINE, call)
                    .await
                    .unwrap_or_else(|_| {
                        Err(kube::Error::Service(
                            format!("no answer within {:?}", crate::apply::CALL_DEADLINE).into(),
                        ))
                    }) {
                    Ok(_) => {
                        writes();
                        written = texts;
                    }
                    Err(error) => {
                        tracing::warn!(link = %name, %error, "writing Link status failed; will retry");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            self.changed.notified().await;
            // Larger documents are written less often: a second per 100 KB. Each write costs
            // the API server a decode, a schema pass and a patch of the whole document; at
            // 1,000 entries (300 KB) written every 300 ms, that was a fifth of its CPU while
            // thousands of Services were being mirrored (perf). Links of a few Services keep
            // COALESCE.
            let size = u64::try_from(written.0.len()).unwrap_or(u64::MAX);
            tokio::time::sleep(COALESCE.max(Duration::from_millis(size / 100))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        ("shop".to_owned(), n.to_owned())
    }

    #[test]
    fn transition_times_move_only_on_transitions() {
        let h = StatusHandle::new(None);
        assert!(h.set(&key("web"), Outcome::mirrored("shop", "web-east")));
        let first = h.render();
        // Condition times have a resolution of one second.
        std::thread::sleep(Duration::from_millis(1100));
        // The same outcome again: no transition, nothing to write.
        assert!(!h.set(&key("web"), Outcome::mirrored("shop", "web-east")));
        assert_eq!(h.render(), first);
        // A different outcome is a transition with a new time.
        assert!(h.set(
            &key("web"),
            Outcome::failed("MissingNamespace", "Namespace does not exist")
        ));
        let second = h.render();
        let t = |v: &serde_json::Value| {
            v["status"]["mirrorServices"][0]["conditions"][0]["lastTransitionTime"].clone()
        };
        assert_ne!(t(&first), t(&second));
        assert_eq!(
            second["status"]["mirrorServices"][0]["conditions"][0]["reason"],
            "MissingNamespace"
        );
        assert!(
            second["status"]["mirrorServices"][0]["conditions"][0]
                .get("localRef")
                .is_none()
        );
    }

    #[test]
    fn renders_linkerds_format_sorted() {
        let h = StatusHandle::new(None);
        h.set(&key("web"), Outcome::mirrored("shop", "web-east"));
        h.set(
            &("alpha".into(), "db".into()),
            Outcome::failed("InvalidService", "no ports"),
        );
        h.set_link_condition("Ready", ConditionStatus::True, "Ready", "");
        let v = h.render();
        let entries = v["status"]["mirrorServices"].as_array().unwrap();
        assert_eq!(entries[0]["remoteRef"]["namespace"], "alpha");
        assert_eq!(entries[1]["controllerName"], "linkerd.io/service-mirror");
        let c = &entries[1]["conditions"][0];
        assert_eq!(
            (
                c["type"].as_str(),
                c["status"].as_str(),
                c["reason"].as_str()
            ),
            (Some("Mirrored"), Some("True"), Some("Mirrored"))
        );
        assert_eq!(c["localRef"]["name"], "web-east");
        assert_eq!(v["status"]["conditions"][0]["type"], "Ready");
        h.remove(&key("web"));
        assert_eq!(
            h.render()["status"]["mirrorServices"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn gateway_latency_is_rate_limited() {
        let h = StatusHandle::new(None);
        let lat =
            |h: &StatusHandle| h.render()["status"]["gateway"]["latencyMilliseconds"].as_u64();
        assert_eq!(lat(&h), None);
        h.set_gateway_latency(Duration::from_millis(10));
        assert_eq!(lat(&h), Some(10));
        // Small changes within the refresh period are not recorded...
        h.set_gateway_latency(Duration::from_millis(12));
        assert_eq!(lat(&h), Some(10));
        // ...large ones are.
        h.set_gateway_latency(Duration::from_millis(40));
        assert_eq!(lat(&h), Some(40));
        assert!(!latency_changed(0, 1) && latency_changed(1, 3) && !latency_changed(100, 140));
    }

    #[test]
    fn large_status_is_bounded_and_keeps_every_problem() {
        let h = StatusHandle::new(None);
        for i in 0..MAX_ENTRIES + 500 {
            h.set(
                &("shop".into(), format!("ok-{i:05}")),
                Outcome::mirrored("shop", "x"),
            );
        }
        for i in 0..3 {
            h.set(
                &("shop".into(), format!("zz-bad-{i}")),
                Outcome::failed("InvalidService", "no ports"),
            );
        }
        let v = h.render();
        let entries = v["status"]["mirrorServices"].as_array().unwrap();
        assert_eq!(entries.len(), MAX_ENTRIES);
        // The problems come first, although they sort last by name.
        assert_eq!(entries[0]["remoteRef"]["name"], "zz-bad-0");
        assert_eq!(entries[2]["conditions"][0]["reason"], "InvalidService");
        assert_eq!(
            v["status"]["summary"],
            serde_json::json!({ "mirrored": MAX_ENTRIES + 500, "notMirrored": 3, "listed": MAX_ENTRIES })
        );
        assert!(
            v.to_string().len() < 512 * 1024,
            "a bounded status stays small"
        );
    }

    #[test]
    fn a_restart_keeps_transition_times() {
        let h = StatusHandle::new(None);
        h.set(&key("web"), Outcome::mirrored("shop", "web-east"));
        let before = h.render();
        let status: LinkStatus = serde_json::from_value(before["status"].clone()).unwrap();
        let again = StatusHandle::new(Some(&status));
        assert!(!again.set(&key("web"), Outcome::mirrored("shop", "web-east")));
        assert_eq!(
            again.render()["status"]["mirrorServices"],
            before["status"]["mirrorServices"]
        );
    }

    #[test]
    fn a_restart_over_more_services_than_listed_writes_nothing_new() {
        let all: Vec<Key> = (0..MAX_ENTRIES + 500)
            .map(|i| ("shop".into(), format!("svc-{i:05}")))
            .collect();
        let mirrored = |k: &Key| Outcome::mirrored("shop", &format!("{}-east", k.1));
        let first = StatusHandle::new(None);
        for k in &all {
            first.set(k, mirrored(k));
        }
        first.settle();
        let written = first.render();
        let status: LinkStatus = serde_json::from_value(written["status"].clone()).unwrap();
        assert_eq!(status.mirror_services.len(), MAX_ENTRIES);

        // A restarted controller starts from the Link, which lists only some of them, with the
        // Link's own counts...
        let again = StatusHandle::new(Some(&status));
        let at_start = texts(&again.document());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&at_start.0).unwrap(),
            written
        );
        // ...and writes nothing while it finds the others, whose entries change its counts...
        for k in &all[..700] {
            again.set(k, mirrored(k));
        }
        for k in &all[MAX_ENTRIES..] {
            again.set(k, mirrored(k));
            assert!(again.due(&at_start).is_none(), "{k:?}");
        }
        // ...nor once it has found every one as it was.
        again.settle();
        assert!(again.due(&at_start).is_none());
        assert_eq!(again.render(), written);
        // A change is written.
        again.set(&all[3], Outcome::failed("Error", "forbidden"));
        assert!(again.due(&at_start).is_some());
    }

    #[test]
    fn before_settling_only_link_conditions_are_written() {
        // A new Link's entries are written as they come.
        let new = StatusHandle::new(None);
        let start = texts(&new.document());
        new.set(&key("web"), Outcome::mirrored("shop", "web-east"));
        assert!(new.due(&start).is_some());

        // A restart waits for the first full pass.
        let status: LinkStatus = serde_json::from_value(new.render()["status"].clone()).unwrap();
        let h = StatusHandle::new(Some(&status));
        let start = texts(&h.document());
        h.set(&key("api"), Outcome::mirrored("shop", "api-east"));
        assert!(
            h.due(&start).is_none(),
            "an entry waits for the first full pass"
        );
        h.set_link_condition(
            link_crd::CONDITION_REMOTE_REACHABLE,
            ConditionStatus::False,
            "RemoteUnreachable",
            "connection refused",
        );
        let (doc, _) = h
            .due(&start)
            .expect("an unreachable target is reported at once");
        assert_eq!(doc.status.mirror_services.len(), 2);
        assert_eq!(
            doc.status.summary.mirrored, 1,
            "the Link's own counts until settled"
        );
    }
}

/// The status write against kube's mock service (`tower_test`): what goes out, and that
/// nothing does when nothing changed.
#[cfg(test)]
mod mock {
    use http::{Request, Response};
    use kube::client::Body;

    use super::*;

    #[tokio::test]
    async fn the_status_is_a_server_side_apply_under_the_field_manager() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let h = StatusHandle::new(None);
        let flush = tokio::spawn(h.clone().flush_forever(
            client,
            "linkerd-multicluster".into(),
            "east".into(),
            crate::leader::Claim::always(),
            || {},
        ));
        // The flusher takes what the Link says (nothing) as written, then waits for a change.
        tokio::task::yield_now().await;
        h.set_link_condition(
            link_crd::CONDITION_REMOTE_REACHABLE,
            ConditionStatus::True,
            "RemoteReachable",
            "",
        );
        let (req, send) = handle.next_request().await.expect("a status write");
        assert_eq!(req.method(), http::Method::PATCH);
        assert_eq!(
            req.uri().path(),
            "/apis/multicluster.linkerd.io/v1alpha3/namespaces/linkerd-multicluster/links/east/status"
        );
        let query = req.uri().query().unwrap_or_default().to_owned();
        assert!(
            query.contains("fieldManager=meshlink-service-mirror") && query.contains("force=true"),
            "{query}"
        );
        assert_eq!(
            req.headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/apply-patch+yaml")
        );
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["apiVersion"], "multicluster.linkerd.io/v1alpha3");
        assert_eq!(body["kind"], "Link");
        assert_eq!(body["metadata"]["name"], "east");
        let reasons = |body: &serde_json::Value| -> Vec<String> {
            body["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{}={}",
                        c["type"].as_str().unwrap_or_default(),
                        c["reason"].as_str().unwrap_or_default()
                    )
                })
                .collect()
        };
        assert_eq!(
            reasons(&body),
            ["Ready=Ready", "RemoteReachable=RemoteReachable"]
        );
        let link = serde_json::json!({
            "apiVersion": "multicluster.linkerd.io/v1alpha3", "kind": "Link",
            "metadata": { "name": "east", "namespace": "linkerd-multicluster" },
            "spec": {},
        });
        send.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&link).unwrap()))
                .unwrap(),
        );
        // A change is written the same way (that nothing is written without one: `due`'s tests).
        h.set_link_condition(
            link_crd::CONDITION_REMOTE_REACHABLE,
            ConditionStatus::False,
            "RemoteUnreachable",
            "x",
        );
        let (req, _send) = handle.next_request().await.expect("a second write");
        let body = http_body_util::BodyExt::collect(req.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            reasons(&body),
            [
                "Ready=RemoteUnreachable",
                "RemoteReachable=RemoteUnreachable"
            ]
        );
        flush.abort();
    }
}
