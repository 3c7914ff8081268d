//! One watched value per key, shared by every holder of a [`Lease`] on it: the task that feeds
//! it is started by the first lease and cancelled `idle` after the last lease is dropped (a new
//! lease in between keeps it), as Linkerd's discovery caches drop a target's stack after the
//! discovery idle timeout.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

#[derive(Debug)]
pub(crate) struct Cache<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<T> {
    entries: Mutex<HashMap<String, Entry<T>>>,
    idle: Duration,
    what: &'static str,
}

#[derive(Debug)]
struct Entry<T> {
    rx: watch::Receiver<T>,
    leases: usize,
    /// Counts the times the leases fell to zero: an idle timer expires the entry only if no
    /// lease was taken (and released again) since it was started.
    released: u64,
    /// Cancels the feeding task when the entry is removed.
    _stop: DropGuard,
}

/// A hold on a key's value: while one exists the value is kept up to date.
#[derive(Debug)]
pub(crate) struct Lease<T: Send + Sync + 'static> {
    inner: Arc<Inner<T>>,
    key: String,
    rx: watch::Receiver<T>,
}

impl<T: Send + Sync + 'static> Cache<T> {
    /// `what` names the kind of stream in logs.
    pub(crate) fn new(idle: Duration, what: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Mutex::new(HashMap::new()),
                idle,
                what,
            }),
        }
    }

    /// A lease on `key`'s value. The first one creates it as `initial` and spawns
    /// `feed(sender)`, which runs until the entry expires. Must be called within a Tokio runtime.
    pub(crate) fn lease<F>(
        &self,
        key: &str,
        initial: impl FnOnce() -> T,
        feed: impl FnOnce(watch::Sender<T>) -> F,
    ) -> Lease<T>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut entries = self.inner.lock();
        let entry = entries.entry(key.to_owned()).or_insert_with(|| {
            let (tx, rx) = watch::channel(initial());
            let stop = CancellationToken::new();
            let task = feed(tx);
            let cancelled = stop.clone();
            let (what, target) = (self.inner.what, key.to_owned());
            tokio::spawn(async move {
                tokio::select! {
                    () = cancelled.cancelled() => {
                        tracing::debug!(what, %target, "idle stream cancelled");
                    }
                    () = task => {}
                }
            });
            Entry {
                rx,
                leases: 0,
                released: 0,
                _stop: stop.drop_guard(),
            }
        });
        entry.leases += 1;
        Lease {
            inner: self.inner.clone(),
            key: key.to_owned(),
            rx: entry.rx.clone(),
        }
    }

    /// How many keys are held (leased or idle); for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().len()
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry<T>>> {
        // The map is consistent after every statement that changes it, so a panic elsewhere
        // while it was held leaves nothing half-done.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Send + Sync + 'static> Inner<T> {
    fn release(self: &Arc<Self>, key: &str) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(key) else {
            return;
        };
        entry.leases -= 1;
        if entry.leases > 0 {
            return;
        }
        entry.released += 1;
        let released = entry.released;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let inner = self.clone();
                let key = key.to_owned();
                rt.spawn(async move {
                    tokio::time::sleep(inner.idle).await;
                    inner.expire(&key, released);
                });
            }
            // Dropped outside the runtime (at shutdown): nothing could use it again.
            Err(_) => {
                entries.remove(key);
            }
        }
    }

    fn expire(&self, key: &str, released: u64) {
        let mut entries = self.lock();
        if entries
            .get(key)
            .is_some_and(|e| e.leases == 0 && e.released == released)
        {
            entries.remove(key);
        }
    }
}

impl<T: Send + Sync + 'static> Lease<T> {
    pub(crate) fn receiver(&self) -> &watch::Receiver<T> {
        &self.rx
    }

    pub(crate) fn receiver_mut(&mut self) -> &mut watch::Receiver<T> {
        &mut self.rx
    }
}

impl<T: Send + Sync + 'static> Clone for Lease<T> {
    fn clone(&self) -> Self {
        if let Some(entry) = self.inner.lock().get_mut(&self.key) {
            entry.leases += 1;
        }
        Self {
            inner: self.inner.clone(),
            key: self.key.clone(),
            rx: self.rx.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Drop for Lease<T> {
    fn drop(&mut self) {
        self.inner.release(&self.key);
    }
}
