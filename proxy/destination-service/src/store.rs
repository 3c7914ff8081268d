//! The shared state: the [`Index`] behind a lock, and who listens to which [`Topic`].
//!
//! A stream registers the topics its last answer depended on while it still holds the read
//! lock it answered under; a change notifies after its write. So no change can fall between
//! an answer and its registration. Each stream has one [`Notify`]: notifications while the
//! stream is busy or its client slow collapse into one wake-up, and the stream then answers
//! from the current state, so nothing queues per subscriber.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError, RwLock},
};

use tokio::sync::Notify;

use crate::{
    index::{Index, Topic},
    resolve::{self, InvalidTarget, Resolution, Settings, Target},
};

#[derive(Debug, Default)]
struct Listeners {
    by_topic: HashMap<Topic, HashMap<u64, Arc<Notify>>>,
    next_id: u64,
}

/// The index and its listeners.
#[derive(Debug)]
pub struct Store {
    index: RwLock<Index>,
    listeners: Mutex<Listeners>,
    settings: Settings,
}

/// One stream's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    topics: Vec<Topic>,
    notify: Arc<Notify>,
    store: Arc<Store>,
}

impl Subscription {
    /// Waits until something it depends on changed (at once if something already did).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    fn set_topics(&mut self, mut topics: Vec<Topic>) {
        topics.sort();
        topics.dedup();
        if topics == self.topics {
            return;
        }
        let mut l = self.store.lock_listeners();
        for old in self.topics.iter().filter(|t| !topics.contains(t)) {
            l.remove(old, self.id);
        }
        for new in topics.iter().filter(|t| !self.topics.contains(t)) {
            l.by_topic
                .entry(new.clone())
                .or_default()
                .insert(self.id, self.notify.clone());
        }
        self.topics = topics;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut l = self.store.lock_listeners();
        for t in &self.topics {
            l.remove(t, self.id);
        }
    }
}

impl Listeners {
    fn remove(&mut self, topic: &Topic, id: u64) {
        if let Some(subs) = self.by_topic.get_mut(topic) {
            subs.remove(&id);
            if subs.is_empty() {
                self.by_topic.remove(topic);
            }
        }
    }

    fn notify(&self, topic: &Topic) {
        let wake = |t: &Topic| {
            for n in self.by_topic.get(t).into_iter().flat_map(|s| s.values()) {
                n.notify_one();
            }
        };
        wake(topic);
        // Namespace and cluster changes reach every topic under them (rare events: a scan).
        match topic {
            Topic::Namespace(ns) => {
                for t in self.by_topic.keys() {
                    if matches!(t, Topic::Service((n, _)) | Topic::Remote(_, (n, _)) | Topic::Pod((n, _)) if n == ns)
                    {
                        wake(t);
                    }
                }
            }
            Topic::Cluster(c) => {
                for t in self.by_topic.keys() {
                    if matches!(t, Topic::Remote(rc, _) if rc == c) {
                        wake(t);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Store {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::default(),
            listeners: Mutex::default(),
            settings,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A registration with no topics yet.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let mut l = self.lock_listeners();
        l.next_id += 1;
        Subscription {
            id: l.next_id,
            topics: Vec::new(),
            notify: Arc::new(Notify::new()),
            store: self.clone(),
        }
    }

    /// Changes the index, then wakes the streams of the topics the change touched.
    pub fn update(&self, change: impl FnOnce(&mut Index) -> Vec<Topic>) {
        let topics = {
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            change(&mut index)
        };
        if topics.is_empty() {
            return;
        }
        let l = self.lock_listeners();
        for t in &topics {
            l.notify(t);
        }
    }

    /// Reads the index.
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// `Get`'s answer for `target` now; `sub` then listens to what it depends on.
    pub fn resolve(
        &self,
        sub: &mut Subscription,
        target: &Target,
    ) -> Result<Resolution, InvalidTarget> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let (res, topics) = resolve::resolve(&index, &self.settings, target)?;
        sub.set_topics(topics);
        Ok(res)
    }

    /// `GetProfile`'s answer for `target` now; `sub` then listens to what it depends on.
    pub fn profile(
        &self,
        sub: &mut Subscription,
        target: &Target,
    ) -> Result<linkerd2_proxy_api::destination::DestinationProfile, InvalidTarget> {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let (profile, topics) = resolve::profile(&index, &self.settings, target)?;
        sub.set_topics(topics);
        Ok(profile)
    }

    /// Answers any question under the read lock, registering `sub` for the topics it returns.
    pub fn answer<T>(
        &self,
        sub: &mut Subscription,
        f: impl FnOnce(&Index, &Settings) -> (T, Vec<Topic>),
    ) -> T {
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let (answer, topics) = f(&index, &self.settings);
        sub.set_topics(topics);
        answer
    }

    /// How many topics have listeners (a metric of the index's fan-out).
    pub fn topics(&self) -> usize {
        self.lock_listeners().by_topic.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::ServiceInfo;

    fn settings() -> Settings {
        Settings {
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            control_plane_ns: "linkerd".into(),
        }
    }

    fn svc() -> ServiceInfo {
        ServiceInfo {
            cluster_ips: vec![],
            ports: vec![],
            opaque_ports: None,
            discovery: crate::model::Discovery::Local,
        }
    }

    async fn woken(sub: &Subscription) -> bool {
        tokio::time::timeout(Duration::from_millis(50), sub.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn only_the_streams_of_a_changed_topic_wake_and_wakes_coalesce() {
        let store = Store::new(settings());
        let web = ("shop".to_owned(), "web".to_owned());
        let db = ("shop".to_owned(), "db".to_owned());
        let mut a = store.subscribe();
        let mut b = store.subscribe();
        store.answer(&mut a, |_, _| ((), vec![Topic::Service(web.clone())]));
        store.answer(&mut b, |_, _| ((), vec![Topic::Service(db.clone())]));
        for _ in 0..100 {
            let mut s = svc();
            s.cluster_ips = vec![std::net::IpAddr::from([10, 0, 0, 1])];
            store.update(|i| i.apply_service(web.clone(), Some(s.clone())));
            store.update(|i| i.apply_service(web.clone(), None));
        }
        assert!(woken(&a).await, "a listens to web");
        assert!(!woken(&a).await, "200 changes are one wake-up");
        assert!(!woken(&b).await, "b listens to db only");

        // A namespace change reaches every Service topic of the namespace.
        store.update(|i| i.apply_namespace("shop".into(), Some(Default::default())));
        assert!(woken(&a).await && woken(&b).await);

        // Dropping a stream unregisters it.
        drop(a);
        drop(b);
        assert_eq!(store.topics(), 0);
    }
}
