//! What `/ready` means: the controller is synced. A follower is ready once it knows it follows
//! (it has nothing to sync). The leader is ready once the Links are listed, every Link listed
//! then has been seen through once (its worker's first full pass, or its target reported
//! unreachable, or it cannot run: refused credentials, a duplicate target name), and, when it
//! serves every Link, the federated Services have been reconciled once. Tests and kubelet can
//! wait on it instead of sleeping.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::watch;

/// Whether this replica leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Leader,
    Follower,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    role: Option<Role>,
    links_listed: bool,
    /// Links listed at the start whose first pass is not done.
    waiting: BTreeSet<String>,
    /// Links whose first pass is done (a worker may finish before the listing is reported).
    done: BTreeSet<String>,
    /// Whether this replica writes federated Services...
    federation_expected: bool,
    /// ...and whether it has reconciled them once.
    federation_done: bool,
}

/// The decision, as a pure function of the state.
fn is_ready(s: &State) -> bool {
    match s.role {
        None => false,
        Some(Role::Follower) => true,
        Some(Role::Leader) => {
            s.links_listed && s.waiting.is_empty() && (!s.federation_expected || s.federation_done)
        }
    }
}

/// The controller's readiness, fed by the leader election, the Link controller, the workers and
/// the federation task.
#[derive(Clone, Debug)]
pub struct Readiness {
    state: Arc<Mutex<State>>,
    tx: Arc<watch::Sender<bool>>,
}

impl Readiness {
    pub fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            Self {
                state: Arc::default(),
                tx: Arc::new(tx),
            },
            rx,
        )
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let ready = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut s);
            is_ready(&s)
        };
        if self
            .tx
            .send_if_modified(|r| std::mem::replace(r, ready) != ready)
        {
            tracing::info!(ready, "readiness changed");
        }
    }

    /// This replica follows: nothing to sync.
    pub fn follower(&self) {
        self.update(|s| {
            *s = State {
                role: Some(Role::Follower),
                ..State::default()
            }
        });
    }

    /// This replica leads: not ready until what it serves is synced.
    pub fn leader(&self) {
        self.update(|s| {
            *s = State {
                role: Some(Role::Leader),
                ..State::default()
            }
        });
    }

    /// The Links are listed; each of `links` must be seen through once. `federation`: this
    /// replica writes federated Services.
    pub fn links_listed(&self, links: impl IntoIterator<Item = String>, federation: bool) {
        self.update(|s| {
            s.links_listed = true;
            s.waiting = links.into_iter().filter(|l| !s.done.contains(l)).collect();
            s.federation_expected = federation;
        });
    }

    /// Link `name` has been seen through once (or is gone).
    pub fn link_done(&self, name: &str) {
        self.update(|s| {
            s.waiting.remove(name);
            s.done.insert(name.to_owned());
        });
    }

    /// The federated Services have been reconciled once.
    pub fn federation_done(&self) {
        self.update(|s| s.federation_done = true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_means_synced() {
        let leader = |listed, waiting: &[&str], federation: Option<bool>| State {
            role: Some(Role::Leader),
            links_listed: listed,
            waiting: waiting.iter().map(|s| (*s).to_owned()).collect(),
            federation_expected: federation.is_some(),
            federation_done: federation == Some(true),
            done: BTreeSet::new(),
        };
        let cases = [
            (State::default(), false, "no role yet"),
            (
                State {
                    role: Some(Role::Follower),
                    ..State::default()
                },
                true,
                "a follower",
            ),
            (leader(false, &[], None), false, "Links not listed"),
            (
                leader(true, &["east"], None),
                false,
                "a Link's first pass pending",
            ),
            (
                leader(true, &[], Some(false)),
                false,
                "federated Services not reconciled",
            ),
            (leader(true, &[], Some(true)), true, "synced"),
            (
                leader(true, &[], None),
                true,
                "synced, one Link served (no federation)",
            ),
        ];
        for (state, want, what) in cases {
            assert_eq!(is_ready(&state), want, "{what}");
        }
    }

    #[tokio::test]
    async fn the_receiver_follows_the_state() {
        let (r, rx) = Readiness::new();
        r.leader();
        r.links_listed(["east".to_owned(), "north".to_owned()], true);
        r.link_done("east");
        r.federation_done();
        assert!(!*rx.borrow(), "north pending");
        r.link_done("north");
        assert!(*rx.borrow());
        // A Link seen through before the listing is reported counts.
        r.leader();
        r.link_done("east");
        r.federation_done();
        r.links_listed(["east".to_owned()], true);
        assert!(*rx.borrow(), "east was done before the listing");
        // Leading again (after losing the Lease) starts over.
        r.leader();
        assert!(!*rx.borrow());
        r.follower();
        assert!(*rx.borrow());
    }
}
