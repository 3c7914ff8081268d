//! The sidecar proxy's control-plane client, as Linkerd's proxy has it:
//!
//! - [`control::channel`]: a lazy, reconnecting gRPC channel to a control-plane service, over
//!   mTLS checked against the service's identity (plaintext only to a loopback address).
//! - [`Resolver`]: destination `Get` and `GetProfile` streams, one per target shared by every
//!   caller, kept for an idle timeout after the last caller leaves, retried with backoff.
//! - [`InboundPolicies`]: `InboundServerPolicies.WatchPort` per inbound port, starting from the
//!   locally configured default policy, and [`authorize`], the connection-level check.

pub mod backoff;
mod cache;
pub mod control;
pub mod policy;
pub mod resolve;
/// A test double of the control plane's gRPC peer, for this crate's tests and its users'.
#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use self::{
    control::{ChannelError, channel},
    policy::{
        Authentication, Authorization, Authorized, Client, ClientTls, DefaultPolicy, Denied,
        InboundPolicies, InvalidServer, Network, Protocol, ServerPolicy, UnknownPolicy, authorize,
    },
    resolve::{
        Endpoint, Hint, IDLE_TIMEOUT, Malformed, Profile, ProfileResolution, Resolution, Resolve,
        ResolveProfile, Resolver,
    },
};
