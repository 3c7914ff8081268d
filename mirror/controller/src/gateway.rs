//! The addresses of a Link's gateway, kept current.
//!
//! `spec.gatewayAddress` is a comma-separated list of IP addresses and DNS names. Every name is
//! resolved for A and AAAA records and re-resolved when its answer's TTL runs out, so a
//! load balancer whose addresses change is followed without a restart (Linkerd resolves only when
//! it repairs endpoints, once a minute, and keeps one address per name in places [quirk]). A name
//! that fails to resolve keeps its last answer and is retried with capped backoff.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::TokioResolver;
use tokio::sync::watch;

use crate::desired::Gateway;

/// Shortest time between two resolutions of a name, whatever its TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest time an answer is trusted, whatever its TTL.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// First retry after a failed resolution; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// One entry of `gatewayAddress`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Ip(IpAddr),
    Name(String),
}

/// Parses `gatewayAddress`: IP literals (IPv6 with or without brackets) and DNS names.
pub(crate) fn parse_entries(address: &str) -> Vec<Entry> {
    address
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| {
            let bare = a.trim_start_matches('[').trim_end_matches(']');
            bare.parse()
                .map_or_else(|_| Entry::Name(a.to_owned()), Entry::Ip)
        })
        .collect()
}

struct Name {
    host: String,
    addresses: Vec<IpAddr>,
    next: Instant,
    failures: u32,
}

/// Resolves `entries` for as long as `tx` has receivers, publishing the gateway whenever its
/// addresses change. `alive` is the liveness the published gateway carries.
pub(crate) async fn resolve_forever(
    resolver: TokioResolver,
    entries: Vec<Entry>,
    port: u16,
    mut alive: watch::Receiver<bool>,
    tx: watch::Sender<Option<Gateway>>,
) {
    let fixed: Vec<IpAddr> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Ip(ip) => Some(*ip),
            Entry::Name(_) => None,
        })
        .collect();
    let mut names: Vec<Name> = entries
        .into_iter()
        .filter_map(|e| match e {
            Entry::Name(host) => Some(Name {
                host,
                addresses: Vec::new(),
                next: Instant::now(),
                failures: 0,
            }),
            Entry::Ip(_) => None,
        })
        .collect();
    let mut alive_open = true;
    loop {
        let now = Instant::now();
        for name in names.iter_mut().filter(|n| n.next <= now) {
            match resolver.lookup_ip(name.host.as_str()).await {
                Ok(lookup) => {
                    name.addresses = lookup.iter().collect();
                    name.failures = 0;
                    let ttl = lookup
                        .valid_until()
                        .saturating_duration_since(Instant::now());
                    name.next = Instant::now() + ttl.clamp(MIN_REFRESH, MAX_REFRESH);
                }
                Err(error) => {
                    name.failures += 1;
                    let delay = FIRST_RETRY
                        .saturating_mul(1 << name.failures.min(8))
                        .min(MAX_RETRY);
                    tracing::warn!(host = %name.host, %error, retry_in = ?delay, kept = name.addresses.len(), "resolving the gateway failed");
                    name.next = Instant::now() + delay;
                }
            }
        }
        let addresses: Vec<IpAddr> = fixed
            .iter()
            .copied()
            .chain(names.iter().flat_map(|n| n.addresses.iter().copied()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let gateway = (!addresses.is_empty()).then(|| Gateway {
            addresses,
            port,
            alive: *alive.borrow(),
        });
        tx.send_if_modified(|g| {
            let changed = *g != gateway;
            *g = gateway;
            changed
        });
        if tx.is_closed() {
            return;
        }
        let next = names.iter().map(|n| n.next).min();
        tokio::select! {
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
            changed = alive.changed(), if alive_open => {
                // A closed liveness channel fixes liveness from now on; keep resolving.
                alive_open = changed.is_ok();
            }
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert_eq!(
            parse_entries(" 192.0.2.1, gw.example.com ,[2001:db8::1],,2001:db8::2"),
            [
                Entry::Ip("192.0.2.1".parse().unwrap()),
                Entry::Name("gw.example.com".into()),
                Entry::Ip("2001:db8::1".parse().unwrap()),
                Entry::Ip("2001:db8::2".parse().unwrap()),
            ]
        );
        assert!(parse_entries("").is_empty());
    }

    #[tokio::test]
    async fn literal_addresses_are_published_sorted_with_liveness() {
        let resolver = TokioResolver::builder_tokio().unwrap().build().unwrap();
        let (alive_tx, alive_rx) = watch::channel(true);
        let (tx, mut rx) = watch::channel(None);
        let task = tokio::spawn(resolve_forever(
            resolver,
            parse_entries("192.0.2.2,192.0.2.1,192.0.2.2"),
            4143,
            alive_rx,
            tx,
        ));
        rx.changed().await.unwrap();
        let g = rx.borrow_and_update().clone().unwrap();
        assert_eq!(
            g.addresses,
            [
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "192.0.2.2".parse().unwrap()
            ]
        );
        assert!(g.alive);
        alive_tx.send(false).unwrap();
        rx.changed().await.unwrap();
        assert!(!rx.borrow().as_ref().unwrap().alive);
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
