//! The one work queue of the controller: keys to reconcile, de-duplicated, with delayed retries
//! under jittered exponential backoff.
//!
//! A queue is plain data owned by the task that works it (a Link's worker, the federation task):
//! delayed keys sit in a [`DelayQueue`] polled by that task's own loop, so no task is spawned per
//! key and everything stops when the owner stops. Backoff comes from `backon` (jittered, so keys
//! that fail together do not retry in lockstep). Failures are logged as one summary with counts
//! at most every [`SUMMARY_EVERY`], not as a line per key per retry (a local API outage fails
//! every key at once); each failure still has a `debug!` line.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    hash::Hash,
    task::{Context, Poll},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

/// The first retry of a failing key waits about this long (200 ms to 400 ms with jitter)...
pub(crate) const RETRY_MIN: Duration = Duration::from_millis(200);
/// ...and the delay doubles up to this (60 s to 120 s with jitter): a key failing for good costs
/// one call a minute.
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often failures are summed up in the log while keys keep failing.
pub(crate) const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// Delays from about `min` (up to twice that, with jitter), doubling up to about `max`, for ever:
/// the controller's one backoff (a failing key's; a check of whether the target is back).
pub(crate) fn backoff(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// One key that failed and has not succeeded since.
#[derive(Debug)]
struct Failing {
    backoff: ExponentialBackoff,
    reason: &'static str,
    since: Instant,
}

/// What [`Queue::summary`] reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub failing: usize,
    pub by_reason: BTreeMap<&'static str, usize>,
    /// How long the longest-failing key has been failing.
    pub oldest: Option<Duration>,
}

/// Keys ready to run (ordered, each once) and keys waiting for a delay.
#[derive(Debug)]
pub(crate) struct Queue<K> {
    ready: BTreeSet<K>,
    delayed: DelayQueue<K>,
    timers: HashMap<K, delay_queue::Key>,
    failing: HashMap<K, Failing>,
    last_summary: Option<Instant>,
}

impl<K> Default for Queue<K> {
    fn default() -> Self {
        Self {
            ready: BTreeSet::new(),
            delayed: DelayQueue::new(),
            timers: HashMap::new(),
            failing: HashMap::new(),
            last_summary: None,
        }
    }
}

impl<K: Clone + Ord + Hash + Debug> Queue<K> {
    /// `key` is to run now; if it was waiting for a delay, it runs now instead (once).
    pub(crate) fn add(&mut self, key: K) {
        if let Some(timer) = self.timers.remove(&key) {
            self.delayed.remove(&timer);
        }
        self.ready.insert(key);
    }

    pub(crate) fn extend(&mut self, keys: impl IntoIterator<Item = K>) {
        for k in keys {
            self.add(k);
        }
    }

    /// `key` is to run after `delay`, unless it is added sooner; an earlier timer stands.
    pub(crate) fn add_after(&mut self, key: K, delay: Duration) {
        if self.ready.contains(&key) {
            return;
        }
        match self.timers.get(&key) {
            Some(timer) if self.delayed.deadline(timer) <= Instant::now() + delay => {}
            Some(timer) => self.delayed.reset(timer, delay),
            None => {
                let timer = self.delayed.insert(key.clone(), delay);
                self.timers.insert(key, timer);
            }
        }
    }

    /// `key` ran and failed (for `reason`, a metric label): it runs again after its next backoff
    /// delay, which is returned.
    pub(crate) fn failed(&mut self, key: K, reason: &'static str) -> Duration {
        let failing = self.failing.entry(key.clone()).or_insert_with(|| Failing {
            backoff: backoff(RETRY_MIN, RETRY_MAX),
            reason,
            since: Instant::now(),
        });
        failing.reason = reason;
        // Never `None` (no maximum number of times); the cap stands in for it anyway.
        let delay = failing.backoff.next().unwrap_or(RETRY_MAX);
        self.ready.remove(&key);
        if let Some(timer) = self.timers.remove(&key) {
            self.delayed.remove(&timer);
        }
        let timer = self.delayed.insert(key.clone(), delay);
        self.timers.insert(key, timer);
        delay
    }

    /// `key` ran and succeeded: its backoff starts over.
    pub(crate) fn done(&mut self, key: &K) {
        self.failing.remove(key);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Up to `n` ready keys, in order.
    pub(crate) fn take(&mut self, n: usize) -> Vec<K> {
        std::iter::from_fn(|| self.ready.pop_first())
            .take(n)
            .collect()
    }

    /// Waits until a delayed key is due and makes it ready; pending for ever while none waits
    /// (so that it can sit in a `select!`).
    pub(crate) async fn due(&mut self) {
        std::future::poll_fn(|cx| self.poll_due(cx)).await;
    }

    fn poll_due(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.delayed.poll_next_unpin(cx) {
            Poll::Ready(Some(expired)) => {
                let key = expired.into_inner();
                self.timers.remove(&key);
                self.ready.insert(key);
                Poll::Ready(())
            }
            // An empty DelayQueue says `None`; it wakes this task when a key is inserted.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    /// The keys failing now, by reason, and for how long the oldest has been.
    pub(crate) fn summary(&self) -> Summary {
        let mut s = Summary {
            failing: self.failing.len(),
            ..Summary::default()
        };
        for f in self.failing.values() {
            *s.by_reason.entry(f.reason).or_default() += 1;
        }
        s.oldest = self.failing.values().map(|f| f.since.elapsed()).max();
        s
    }

    /// The summary when one is due (keys fail and none was given for [`SUMMARY_EVERY`]).
    pub(crate) fn summary_due(&mut self) -> Option<Summary> {
        if self.failing.is_empty() {
            return None;
        }
        let now = Instant::now();
        if self
            .last_summary
            .is_some_and(|at| now.duration_since(at) < SUMMARY_EVERY)
        {
            return None;
        }
        self.last_summary = Some(now);
        Some(self.summary())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `due` until nothing more is due by now (paused time: instantaneous).
    async fn drain_due(q: &mut Queue<&'static str>) {
        while tokio::time::timeout(Duration::ZERO, q.due()).await.is_ok() {}
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_deduplicated_and_ordered() {
        let mut q = Queue::default();
        q.extend(["b", "a", "b", "c", "a"]);
        assert_eq!(q.take(2), ["a", "b"]);
        assert_eq!(q.take(10), ["c"]);
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_within_its_jitter_bounds_up_to_the_cap() {
        let mut q = Queue::default();
        let mut base = RETRY_MIN;
        for _ in 0..12 {
            let d = q.failed("k", "write");
            // Jitter adds up to the delay itself: [base, 2 * base).
            assert!(
                d >= base && d < base * 2,
                "{d:?} not in [{base:?}, 2 * {base:?})"
            );
            base = (base * 2).min(RETRY_MAX);
        }
        assert_eq!(base, RETRY_MAX, "the cap is reached");
        // A success starts it over.
        q.done(&"k");
        let d = q.failed("k", "write");
        assert!(d < RETRY_MIN * 2, "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_spreads_keys_that_fail_together() {
        let mut q = Queue::default();
        let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
        let delays: BTreeSet<Duration> =
            keys.iter().map(|k| q.failed(k.clone(), "write")).collect();
        assert!(delays.len() > 40, "{} distinct delays of 50", delays.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_key_runs_again_after_its_delay() {
        let mut q = Queue::default();
        q.add("k");
        assert_eq!(q.take(10), ["k"]);
        let delay = q.failed("k", "write");
        assert!(q.is_empty(), "not ready before its delay");
        tokio::time::advance(delay - Duration::from_millis(1)).await;
        drain_due(&mut q).await;
        assert!(q.is_empty(), "still not ready a moment before");
        tokio::time::advance(Duration::from_millis(2)).await;
        drain_due(&mut q).await;
        assert_eq!(q.take(10), ["k"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_added_while_delayed_runs_once() {
        let mut q = Queue::default();
        let delay = q.failed("k", "write");
        // A watch event brings it back before its retry: it runs now...
        q.add("k");
        assert_eq!(q.take(10), ["k"]);
        // ...and its timer is gone: it does not run again when the delay has passed.
        tokio::time::advance(delay * 3).await;
        drain_due(&mut q).await;
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_recheck_does_not_postpone_an_earlier_one() {
        let mut q = Queue::default();
        q.add_after("k", Duration::from_secs(1));
        q.add_after("k", Duration::from_secs(10));
        tokio::time::advance(Duration::from_millis(1001)).await;
        drain_due(&mut q).await;
        assert_eq!(q.take(10), ["k"]);
        tokio::time::advance(Duration::from_secs(20)).await;
        drain_due(&mut q).await;
        assert!(q.is_empty(), "one timer per key");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_queue_cancels_its_retries() {
        // Nothing outlives the queue: its timers are its own, polled by its owner.
        let mut q = Queue::default();
        q.failed("k", "write");
        let owner = tokio::spawn(async move {
            loop {
                q.due().await;
            }
        });
        owner.abort();
        assert!(owner.await.unwrap_err().is_cancelled());
        // Nothing else was spawned that could still be holding a key.
        let metrics = tokio::runtime::Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_summed_up_at_most_every_period() {
        let mut q = Queue::default();
        assert_eq!(q.summary_due(), None, "nothing failing, nothing to say");
        q.failed("a", "write");
        tokio::time::advance(Duration::from_secs(2)).await;
        q.failed("b", "timeout");
        q.failed("c", "write");
        let s = q.summary_due().expect("a first summary at once");
        assert_eq!(s.failing, 3);
        assert_eq!(s.by_reason, BTreeMap::from([("timeout", 1), ("write", 2)]));
        assert_eq!(s.oldest, Some(Duration::from_secs(2)));
        assert_eq!(q.summary_due(), None, "not again within the period");
        tokio::time::advance(SUMMARY_EVERY).await;
        assert!(q.summary_due().is_some());
        for k in ["a", "b", "c"] {
            q.done(&k);
        }
        tokio::time::advance(SUMMARY_EVERY).await;
        assert_eq!(q.summary_due(), None, "all recovered");
    }
}
