//! Destination resolution: Linkerd's `Destination.Get` (the endpoints of a target) and
//! `Destination.GetProfile` (its service profile), one stream per target shared by every
//! caller.
//!
//! A stream lives while a [`Resolve`] (or [`ResolveProfile`]) handle on it exists, and for the
//! idle timeout after the last one is dropped (Linkerd's outbound discovery idle timeout,
//! [`IDLE_TIMEOUT`]), so that a target dialled again soon finds its endpoints at once. A stream
//! that fails is retried with backoff, keeping what it last said; InvalidArgument and
//! FailedPrecondition mean the target cannot be resolved (outside the cluster, say) and end it.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use linkerd2_proxy_api::destination::{
    self as api, DestinationProfile, GetDestination, TlsIdentity, WeightedAddr,
    destination_client::DestinationClient, protocol_hint, tls_identity, update,
};
use linkerd2_proxy_api::net::TcpAddress;
use proxy_identity::Id;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{
    backoff::Backoff,
    cache::{Cache, Lease},
};

/// Linkerd's outbound discovery idle timeout (`LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The scheme Linkerd's proxy names targets with.
const SCHEME: &str = "k8s";

/// What the peer proxy speaks, as discovery hints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Hint {
    #[default]
    Unknown,
    /// A meshed peer that accepts HTTP/2: HTTP/1 requests may be upgraded to it.
    H2,
    /// The port is opaque: no protocol detection, no upgrade.
    Opaque,
}

/// One endpoint of a target, as discovery described it.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// The identity the peer must prove (meshed endpoints); `None` means plaintext.
    pub identity: Option<Id>,
    /// The name to send as SNI: the server name discovery gave, or else the DNS identity
    /// itself (Linkerd's rule). `None` when there is no identity, or when a URI identity came
    /// without a server name.
    pub server_name: Option<Id>,
    pub hint: Hint,
    /// The peer proxy's inbound port, for opaque transport (a transport header carries the
    /// application port).
    pub opaque_transport_port: Option<u16>,
    /// A remote gateway's target `(host, port)`, written into the transport header.
    pub authority_override: Option<(String, u16)>,
    /// Metric labels: the set's, overridden by the address's own.
    pub labels: BTreeMap<String, String>,
}

/// What is known of a target's endpoints.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// The first answer has not come yet.
    Pending,
    /// The current endpoints; empty when the target has none (`no_endpoints`).
    Endpoints(Arc<BTreeMap<SocketAddr, Endpoint>>),
    /// The target cannot be resolved (InvalidArgument or FailedPrecondition), for example a
    /// name outside the cluster: the caller forwards to the original destination.
    NotFound,
}

impl Resolution {
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Pending)
    }
}

/// A target's service profile: the parts the proxy uses.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    /// The port is opaque (`opaque_protocol`).
    pub opaque: bool,
    /// The target's fully-qualified service name; empty when it is not a service.
    pub fully_qualified_name: String,
    /// The single endpoint to forward to when the target is an address (a pod or an address
    /// outside any service), as Linkerd's fallback uses it.
    pub endpoint: Option<Endpoint>,
}

/// What is known of a target's profile.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileResolution {
    Pending,
    Profile(Profile),
    /// The target has no profile (InvalidArgument or FailedPrecondition).
    NotFound,
}

impl ProfileResolution {
    pub fn is_pending(&self) -> bool {
        matches!(self, Self::Pending)
    }

    /// The profile, if there is one (`None` while pending too).
    pub fn profile(&self) -> Option<&Profile> {
        match self {
            Self::Profile(p) => Some(p),
            _ => None,
        }
    }
}

/// A shared, cached client of the destination service. Cheap to clone; clones share streams.
#[derive(Clone, Debug)]
pub struct Resolver {
    client: DestinationClient<Channel>,
    context_token: String,
    endpoints: Cache<Resolution>,
    profiles: Cache<ProfileResolution>,
}

/// A hold on a target's endpoints: the stream is kept while a handle exists.
#[derive(Clone, Debug)]
pub struct Resolve {
    lease: Lease<Resolution>,
}

/// A hold on a target's profile: the stream is kept while a handle exists.
#[derive(Clone, Debug)]
pub struct ResolveProfile {
    lease: Lease<ProfileResolution>,
}

impl Resolver {
    /// `context_token` is sent with every lookup (`LINKERD2_PROXY_DESTINATION_CONTEXT`);
    /// `idle_timeout` is how long a stream outlives its last handle ([`IDLE_TIMEOUT`]).
    pub fn new(channel: Channel, context_token: String, idle_timeout: Duration) -> Self {
        Self {
            client: DestinationClient::new(channel),
            context_token,
            endpoints: Cache::new(idle_timeout, "destination"),
            profiles: Cache::new(idle_timeout, "profile"),
        }
    }

    fn request(&self, target: &str) -> GetDestination {
        GetDestination {
            scheme: SCHEME.to_owned(),
            path: target.to_owned(),
            context_token: self.context_token.clone(),
        }
    }

    /// The endpoints of `target` (`name:port` or `ip:port`). Must be called within a Tokio
    /// runtime.
    pub fn resolve(&self, target: &str) -> Resolve {
        let req = self.request(target);
        let client = self.client.clone();
        Resolve {
            lease: self.endpoints.lease(
                target,
                || Resolution::Pending,
                |tx| follow_endpoints(client, req, tx),
            ),
        }
    }

    /// The profile of `target` (`name:port` or `ip:port`). Must be called within a Tokio
    /// runtime. How long to wait for the first answer is the caller's choice (Linkerd's
    /// `LINKERD2_PROXY_DESTINATION_PROFILE_INITIAL_TIMEOUT`, 500 ms, on the inbound side).
    pub fn profile(&self, target: &str) -> ResolveProfile {
        let req = self.request(target);
        let client = self.client.clone();
        ResolveProfile {
            lease: self.profiles.lease(
                target,
                || ProfileResolution::Pending,
                |tx| follow_profile(client, req, tx),
            ),
        }
    }
}

impl Resolve {
    /// The endpoints as they change. The receiver alone does not keep the stream: hold this
    /// handle as long as updates are wanted.
    pub fn watch(&self) -> watch::Receiver<Resolution> {
        self.lease.receiver().clone()
    }

    /// The current resolution.
    pub fn current(&self) -> Resolution {
        self.lease.receiver().borrow().clone()
    }

    /// The first resolution that is not [`Resolution::Pending`] (at once if there is one).
    pub async fn first(&mut self) -> Resolution {
        first(self.lease.receiver_mut(), Resolution::is_pending).await
    }
}

impl ResolveProfile {
    /// The profile as it changes; see [`Resolve::watch`].
    pub fn watch(&self) -> watch::Receiver<ProfileResolution> {
        self.lease.receiver().clone()
    }

    pub fn current(&self) -> ProfileResolution {
        self.lease.receiver().borrow().clone()
    }

    /// The first answer that is not [`ProfileResolution::Pending`].
    pub async fn first(&mut self) -> ProfileResolution {
        first(self.lease.receiver_mut(), ProfileResolution::is_pending).await
    }
}

async fn first<T: Clone>(rx: &mut watch::Receiver<T>, pending: fn(&T) -> bool) -> T {
    if let Ok(v) = rx.wait_for(|v| !pending(v)).await {
        return v.clone();
    }
    // The feeding task ended (it only does after a final answer): that answer stands.
    rx.borrow().clone()
}

/// Whether a stream's status means "not resolvable" rather than a failure to retry.
fn not_resolvable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
    )
}

/// Why a stream attempt ended.
enum Ended {
    /// The server closed the stream, or it failed: retried.
    Retry(Option<tonic::Status>),
    /// The target cannot be resolved: final.
    NotFound(tonic::Status),
}

fn ended(result: Result<(), tonic::Status>) -> Ended {
    match result {
        Ok(()) => Ended::Retry(None),
        Err(s) if not_resolvable(s.code()) => Ended::NotFound(s),
        Err(s) => Ended::Retry(Some(s)),
    }
}

/// Feeds `tx` from `Get(req)` for ever (until cancelled), retrying with backoff.
async fn follow_endpoints(
    mut client: DestinationClient<Channel>,
    req: GetDestination,
    tx: watch::Sender<Resolution>,
) {
    let target = req.path.clone();
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let mut stream = client.get(req.clone()).await?.into_inner();
            // What this stream said: a new stream starts again from nothing, as the server
            // resends every endpoint, so its first update replaces what an older one said.
            let mut endpoints: Option<BTreeMap<SocketAddr, Endpoint>> = None;
            while let Some(up) = stream.message().await? {
                backoff.reset();
                let endpoints = endpoints.get_or_insert_with(BTreeMap::new);
                apply(&target, endpoints, up);
                let new = Resolution::Endpoints(Arc::new(endpoints.clone()));
                tx.send_if_modified(|cur| replace_if_changed(cur, new));
            }
            Ok::<(), tonic::Status>(())
        };
        match ended(attempt.await) {
            Ended::NotFound(status) => {
                tracing::debug!(%target, code = ?status.code(), message = status.message(), "not resolvable");
                tx.send_replace(Resolution::NotFound);
                return;
            }
            Ended::Retry(status) => retry_log("destination", &target, status),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Feeds `tx` from `GetProfile(req)` for ever (until cancelled), retrying with backoff.
async fn follow_profile(
    mut client: DestinationClient<Channel>,
    req: GetDestination,
    tx: watch::Sender<ProfileResolution>,
) {
    let target = req.path.clone();
    let mut backoff = Backoff::new();
    loop {
        let attempt = async {
            let mut stream = client.get_profile(req.clone()).await?.into_inner();
            while let Some(p) = stream.message().await? {
                backoff.reset();
                let new = ProfileResolution::Profile(profile(&target, p));
                tx.send_if_modified(|cur| replace_if_changed(cur, new));
            }
            Ok::<(), tonic::Status>(())
        };
        match ended(attempt.await) {
            Ended::NotFound(status) => {
                tracing::debug!(%target, code = ?status.code(), message = status.message(), "no profile");
                tx.send_replace(ProfileResolution::NotFound);
                return;
            }
            Ended::Retry(status) => retry_log("profile", &target, status),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

fn retry_log(what: &'static str, target: &str, status: Option<tonic::Status>) {
    match status {
        Some(s) => {
            tracing::info!(what, %target, code = ?s.code(), message = s.message(), "stream failed; retrying")
        }
        None => tracing::debug!(what, %target, "stream ended; reconnecting"),
    }
}

/// Replaces `cur` by `new` unless they are equal (so that watchers wake only on a change).
fn replace_if_changed<T: PartialEq>(cur: &mut T, new: T) -> bool {
    if *cur == new {
        return false;
    }
    *cur = new;
    true
}

/// Why an address from discovery was skipped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("an address without addr")]
    NoAddr,
    #[error("an invalid address")]
    Addr,
    #[error("an address with port 0")]
    PortZero,
    #[error("a TLS identity without a strategy")]
    NoIdentity,
    #[error("an invalid TLS identity {0:?}")]
    Identity(String),
    #[error("an invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("an invalid opaque-transport inbound port {0}")]
    OpaqueTransportPort(u32),
}

/// Applies one update of a `Get` stream: `add` adds or replaces, `remove` removes,
/// `no_endpoints` empties. Malformed addresses are skipped and logged.
pub fn apply(target: &str, endpoints: &mut BTreeMap<SocketAddr, Endpoint>, up: api::Update) {
    match up.update {
        Some(update::Update::Add(set)) => {
            for addr in set.addrs {
                match endpoint(addr, &set.metric_labels) {
                    Ok(e) => {
                        endpoints.insert(e.addr, e);
                    }
                    Err(error) => {
                        tracing::warn!(%target, %error, "skipped a malformed endpoint");
                    }
                }
            }
        }
        Some(update::Update::Remove(set)) => {
            for addr in set.addrs {
                match socket_addr(addr) {
                    Ok(addr) => {
                        endpoints.remove(&addr);
                    }
                    Err(error) => {
                        tracing::warn!(%target, %error, "skipped a malformed removal");
                    }
                }
            }
        }
        Some(update::Update::NoEndpoints(_)) => endpoints.clear(),
        None => tracing::warn!(%target, "skipped an empty update"),
    }
}

/// Reads one address of an `add`. `set_labels` are the set's metric labels.
pub fn endpoint(
    pb: WeightedAddr,
    set_labels: &HashMap<String, String>,
) -> Result<Endpoint, Malformed> {
    let addr = socket_addr(pb.addr.ok_or(Malformed::NoAddr)?)?;
    // An identity that does not parse skips the endpoint rather than dropping to plaintext
    // (where Linkerd's proxy falls back to no TLS): the server meant it to be meshed.
    let (identity, server_name) = match pb.tls_identity {
        Some(tls) => {
            let (id, name) = identity(tls)?;
            (Some(id), name)
        }
        None => (None, None),
    };
    let hint = pb.protocol_hint.unwrap_or_default();
    let opaque_transport_port = hint
        .opaque_transport
        .map(|o| {
            u16::try_from(o.inbound_port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(Malformed::OpaqueTransportPort(o.inbound_port))
        })
        .transpose()?;
    let hint = match hint.protocol {
        Some(protocol_hint::Protocol::H2(_)) => Hint::H2,
        Some(protocol_hint::Protocol::Opaque(_)) => Hint::Opaque,
        None => Hint::Unknown,
    };
    let mut labels: BTreeMap<String, String> = set_labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(pb.metric_labels);
    Ok(Endpoint {
        addr,
        weight: pb.weight,
        identity,
        server_name,
        hint,
        opaque_transport_port,
        authority_override: pb
            .authority_override
            .and_then(|a| authority(&a.authority_override)),
        labels,
    })
}

/// An address of the API. The crate's own conversion truncates a port beyond 16 bits to its
/// low bits, which would dial an unrelated port.
fn socket_addr(pb: TcpAddress) -> Result<SocketAddr, Malformed> {
    let port = u16::try_from(pb.port).map_err(|_| Malformed::Addr)?;
    if port == 0 {
        return Err(Malformed::PortZero);
    }
    SocketAddr::try_from(pb).map_err(|_| Malformed::Addr)
}

/// The identity and SNI of a `TlsIdentity`.
fn identity(tls: TlsIdentity) -> Result<(Id, Option<Id>), Malformed> {
    let id = match tls.strategy.ok_or(Malformed::NoIdentity)? {
        tls_identity::Strategy::DnsLikeIdentity(d) => {
            Id::parse(&d.name).map_err(|_| Malformed::Identity(d.name))?
        }
        tls_identity::Strategy::UriLikeIdentity(u) => {
            Id::parse(&u.uri).map_err(|_| Malformed::Identity(u.uri))?
        }
    };
    let name = match tls.server_name {
        Some(n) => Some(Id::parse(&n.name).map_err(|_| Malformed::ServerName(n.name))?),
        None => matches!(id, Id::Dns(_)).then(|| id.clone()),
    };
    Ok((id, name))
}

/// `host:port` of an authority override; one without a port (or with a bad one) is ignored,
/// as Linkerd's proxy ignores it.
fn authority(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Reads a profile; a malformed endpoint is dropped (and logged), the rest kept.
pub fn profile(target: &str, pb: DestinationProfile) -> Profile {
    let endpoint = pb
        .endpoint
        .and_then(|e| match endpoint(e, &HashMap::new()) {
            Ok(e) => Some(e),
            Err(error) => {
                tracing::warn!(%target, %error, "skipped a profile's malformed endpoint");
                None
            }
        });
    Profile {
        opaque: pb.opaque_protocol,
        fully_qualified_name: pb.fully_qualified_name,
        endpoint,
    }
}

#[cfg(test)]
mod tests;
