//! A bounded set of connections in which a newcomer evicts the oldest.

use std::{collections::BTreeMap, sync::Mutex};

use tokio_util::sync::CancellationToken;

/// Connections that have not proven themselves yet (in their TLS handshake, or idle on an
/// admin port). When full, the oldest is evicted: a legitimate client is through in
/// milliseconds, so the connections that linger are the idle or hostile ones, and a flood of
/// them cannot lock others out (nor queue ahead of them in the kernel's backlog).
#[derive(Debug)]
pub struct Pending {
    cap: usize,
    slots: Mutex<(u64, BTreeMap<u64, CancellationToken>)>,
}

/// One connection's place; leaving it (drop) frees the place.
#[derive(Debug)]
pub struct Slot<'a> {
    pending: &'a Pending,
    id: u64,
    /// Cancelled when a newer connection took this place: the connection should close.
    pub evicted: CancellationToken,
}

impl Pending {
    /// At most `cap` (at least one) connections at once.
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            slots: Mutex::default(),
        }
    }

    /// Takes a place, evicting the oldest holder when all are taken.
    pub fn enter(&self) -> Slot<'_> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if slots.1.len() >= self.cap
            && let Some((_, oldest)) = slots.1.pop_first()
        {
            oldest.cancel();
        }
        slots.0 += 1;
        let id = slots.0;
        let evicted = CancellationToken::new();
        slots.1.insert(id, evicted.clone());
        Slot {
            pending: self,
            id,
            evicted,
        }
    }

    /// How many places are taken.
    pub fn len(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .len()
    }

    /// Whether no place is taken.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pending
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_is_evicted_when_full() {
        let pending = Pending::new(2);
        let a = pending.enter();
        let b = pending.enter();
        assert!(!a.evicted.is_cancelled() && !b.evicted.is_cancelled());
        let c = pending.enter();
        assert!(a.evicted.is_cancelled(), "the oldest makes room");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(pending.len(), 2);
        drop(b);
        let d = pending.enter();
        assert!(
            !c.evicted.is_cancelled() && !d.evicted.is_cancelled(),
            "room was free"
        );
        drop((a, c, d));
        assert!(pending.is_empty());
    }
}
