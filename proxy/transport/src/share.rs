//! A share of a server's connections per client: per address for the control-plane services,
//! per verified identity for the gateway, so that one client, however many connections it
//! opens, cannot take every slot.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// How many connections each client holds, and the most one may.
#[derive(Debug)]
pub struct Share<K> {
    share: usize,
    held: Mutex<HashMap<K, usize>>,
}

/// One connection of a client; dropping it gives the place back.
#[derive(Debug)]
pub struct Held<K: Hash + Eq> {
    peers: Arc<Share<K>>,
    key: K,
}

/// The share per client address.
pub type PeerShare = Share<IpAddr>;
/// A connection's place in its address's share.
pub type PeerSlot = Held<IpAddr>;

impl PeerShare {
    /// A place for a connection from `ip`, or `None` when it holds its share. IPv4-mapped IPv6
    /// addresses count as the IPv4 address they are.
    pub fn enter_ip(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        self.enter(ip.to_canonical())
    }
}

impl<K: Hash + Eq + Clone> Share<K> {
    /// At most `share` (at least one) connections per address.
    pub fn new(share: usize) -> Self {
        Self {
            share: share.max(1),
            held: Mutex::default(),
        }
    }

    /// The most one address may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// A place for a connection of `key`, or `None` when it holds its share.
    pub fn enter(self: &Arc<Self>, key: K) -> Option<Held<K>> {
        let mut held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(key.clone()).or_default();
        if *n >= self.share {
            return None;
        }
        *n += 1;
        Some(Held {
            peers: self.clone(),
            key,
        })
    }
}

impl<K: Hash + Eq> Drop for Held<K> {
    fn drop(&mut self) {
        let mut held = self
            .peers
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share() {
        let peers = Arc::new(PeerShare::new(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = peers.enter_ip(a).unwrap();
        let a2 = peers.enter_ip(mapped).unwrap();
        assert!(peers.enter_ip(a).is_none(), "a holds its share");
        assert!(peers.enter_ip(mapped).is_none(), "the same address, mapped");
        let b1 = peers.enter_ip(b).expect("another address is not affected");
        drop(a1);
        let a3 = peers.enter_ip(a).expect("a closed one, so has room again");
        drop((a2, a3, b1));
        assert!(peers.held.lock().unwrap().is_empty(), "nothing leaks");
    }

    #[test]
    fn the_share_of_a_server() {
        let limits = |max_connections| crate::ServerLimits {
            max_connections,
            handshake_timeout: std::time::Duration::from_secs(1),
            max_streams_per_connection: 1,
            connection_lifetime: None,
            keep_alive_interval: std::time::Duration::from_secs(1),
            client_auth: crate::ClientAuth::Optional,
        };
        for (max, share) in [(1024, 128), (10_000, 1250), (64, 16), (8, 8)] {
            assert_eq!(limits(max).per_peer_connections(), share, "{max}");
        }
    }
}
