//! Per-target state (a balancer and its discovery) shared by every connection to the target
//! while any uses it, and dropped once none has for the idle timeout (Linkerd's
//! `LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT`), so a pod that talked to many targets once
//! does not keep a discovery stream open for each.

use std::{collections::HashMap, hash::Hash, sync::Arc, time::Duration};

use tokio::time::Instant;

#[derive(Debug)]
pub struct Cache<K, V> {
    idle: Duration,
    entries: std::sync::Mutex<HashMap<K, (Arc<V>, Instant)>>,
}

impl<K: Hash + Eq + Clone, V> Cache<K, V> {
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            entries: std::sync::Mutex::default(),
        }
    }

    /// The value for `key`, made by `make` if there is none. Entries no one has held for the
    /// idle timeout are dropped on the way.
    pub fn get_or_insert_with(&self, key: &K, make: impl FnOnce() -> V) -> Arc<V> {
        let now = Instant::now();
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((v, used)) = entries.get_mut(key) {
            *used = now;
            return v.clone();
        }
        let idle = self.idle;
        // Held elsewhere counts as in use: its idle time starts when the last holder goes,
        // which the next sweep sees as an old `used` and a count of one.
        entries.retain(|_, (v, used)| Arc::strong_count(v) > 1 || now - *used < idle);
        let v = Arc::new(make());
        entries.insert(key.clone(), (v.clone(), now));
        v
    }

    /// The value for `key`, if there is one.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (v, used) = entries.get_mut(key)?;
        *used = Instant::now();
        Some(v.clone())
    }

    /// Marks `key` used now (a connection that holds its value is done with it).
    pub fn touch(&self, key: &K) {
        if let Some((_, used)) = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(key)
        {
            *used = Instant::now();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn shared_while_used_dropped_when_idle() {
        let cache = Cache::new(Duration::from_secs(5));
        let a = cache.get_or_insert_with(&"a", || 1);
        let again = cache.get_or_insert_with(&"a", || 2);
        assert!(Arc::ptr_eq(&a, &again));
        drop(again);
        // Held: kept however long.
        tokio::time::advance(Duration::from_secs(60)).await;
        cache.get_or_insert_with(&"b", || 3);
        assert_eq!(cache.len(), 2);
        cache.touch(&"a");
        drop(a);
        // Not held, but used less than the idle timeout ago: kept.
        tokio::time::advance(Duration::from_secs(4)).await;
        cache.get_or_insert_with(&"c", || 4);
        assert_eq!(cache.len(), 3);
        // Idle past the timeout: a and b dropped; c and d stay.
        tokio::time::advance(Duration::from_secs(2)).await;
        cache.get_or_insert_with(&"d", || 5);
        assert_eq!(cache.len(), 2);
        assert_eq!(*cache.get_or_insert_with(&"a", || 6), 6);
    }
}
