//! The multicluster gateway: Linkerd's "direct" inbound stack in gateway mode, as plain tokio
//! and hyper over the `proxy/` libraries.
//!
//! A connection on 4143 must, in order: speak TLS with SNI = the gateway's identity and ALPN
//! `transport.l5d.io/v1`; present a client certificate chaining to the trust anchors; be
//! authorized; send a transport header naming `<svc>.<ns>.<suffix>:<port>` within the header
//! timeout. It is then forwarded to a ready endpoint of that Service, as opaque TCP or, when the
//! header names a session protocol, as HTTP/1 or HTTP/2 (with `Forwarded` and loop refusal).
//! An endpoint whose Pod this mesh meshed is dialled over mTLS as the gateway, its proxy's
//! identity checked (opaque TCP with a transport header to its inbound port, as Linkerd's
//! opaque transport); any other in plaintext.
//! Anything else closes the connection with a [`Refusal`], logged with fields and counted.

mod discover;
mod forward;
mod metrics;
mod server;

use std::{net::SocketAddr, time::Duration};

use proxy_identity::Id;
use proxy_transport::direct;

pub use self::discover::{
    CONTROL_PLANE_NS_LABEL, Discovery, Endpoint, Endpoints, Export, Mesh, Meshed, Unresolved,
    default_export_selector, split_target,
};
pub use self::metrics::Metrics;
pub use self::server::{BindError, Gateway};

/// Why a connection was closed before it was forwarded. The label is the metric's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The handshake, authorization, a limit or the transport header refused it.
    Direct(direct::Refused),
    /// The header named no target, or a Service that does not exist or lacks that port.
    UnknownTarget,
    /// The target Service exists but the export policy does not offer it to linked clusters.
    NotExported,
    /// An opaque connection from the gateway's own identity, or to the gateway's own address.
    Loop,
    /// The target is outside the gateway's suffixes.
    OutsideSuffix,
    /// The target has no ready endpoints, or none accepted a connection.
    NoEndpoints,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct(r) => r.as_str(),
            Self::UnknownTarget => "unknown_target",
            Self::NotExported => "not_exported",
            Self::Loop => "loop",
            Self::OutsideSuffix => "outside_suffix",
            Self::NoEndpoints => "no_endpoints",
        }
    }
}

/// Which client identities may use the gateway. Empty lists mean any identity that the shared
/// trust anchors vouch for (Linkerd's default for a gateway).
#[derive(Clone, Debug, Default)]
pub struct Authorization {
    /// Exactly these identities.
    pub identities: Vec<Id>,
    /// Any identity in these trust domains (DNS suffix or SPIFFE trust domain).
    pub trust_domains: Vec<String>,
}

impl Authorization {
    pub fn allows(&self, id: &Id) -> bool {
        (self.identities.is_empty() && self.trust_domains.is_empty())
            || self.identities.contains(id)
            || self.trust_domains.iter().any(|d| id.is_under(d))
    }
}

/// The gateway's settings.
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Where cross-cluster connections arrive.
    #[arg(long, env = "MESHLINK_GATEWAY_ADDR", default_value = "0.0.0.0:4143")]
    pub addr: SocketAddr,
    /// The DNS suffixes targets must be under (Linkerd's gateway suffixes).
    #[arg(
        long = "suffix",
        env = "LINKERD2_PROXY_INBOUND_GATEWAY_SUFFIXES",
        value_delimiter = ',',
        default_value = "svc.cluster.local."
    )]
    pub suffixes: Vec<String>,
    /// Allow only these client identities (comma-separated). Default: any from the anchors.
    #[arg(long, env = "MESHLINK_GATEWAY_ALLOW_IDENTITIES", value_delimiter = ',')]
    pub allow_identities: Vec<Id>,
    /// Allow only identities in these trust domains (comma-separated).
    #[arg(
        long,
        env = "MESHLINK_GATEWAY_ALLOW_TRUST_DOMAINS",
        value_delimiter = ','
    )]
    pub allow_trust_domains: Vec<String>,
    /// Time for the TLS handshake.
    #[arg(long, env = "MESHLINK_GATEWAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Time for the transport header after the handshake (Linkerd's inbound detect timeout).
    #[arg(long, env = "LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// A forwarded connection with no bytes either way for this long is closed.
    #[arg(long, env = "MESHLINK_GATEWAY_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Time to connect to an endpoint.
    #[arg(long, env = "LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Forwarded connections at once; more are refused as overloaded. The default keeps the
    /// manifest's 250 MiB memory limit at the limit: `make bench-gateway` measures about 27 KiB
    /// per idle opaque connection, 31 KiB after traffic and 52 KiB per HTTP/1 connection held
    /// after a request, so 3,000 connections are about 150 MiB, with room for 1,024 handshakes
    /// and the process itself. Raise it with the memory limit (and the open-file limit: it is
    /// lowered at start to fit two files per connection).
    #[arg(
        long,
        env = "MESHLINK_GATEWAY_MAX_CONNECTIONS",
        default_value_t = 3_000
    )]
    pub max_connections: usize,
    /// Only Services whose labels match this selector are reachable (`kubectl -l` syntax). The
    /// default is what a Link selects by default, for gateway mirrors or remote discovery.
    #[arg(
        long,
        env = "MESHLINK_GATEWAY_EXPORT_SELECTOR",
        default_value = "mirror.linkerd.io/exported in (true,remote-discovery)"
    )]
    pub export_selector: link_crd::LabelSelector,
    /// Forward to any Service in any namespace, exported or not, as Linkerd's gateway does.
    #[arg(long, env = "MESHLINK_GATEWAY_FORWARD_ANY_SERVICE")]
    pub forward_any_service: bool,
    /// Connections still in their TLS handshake at once; when full, the oldest is dropped.
    #[arg(long, env = "MESHLINK_GATEWAY_MAX_HANDSHAKES", default_value_t = 1024)]
    pub max_handshakes: usize,
    /// Forwarded connections one client identity may hold at once; more are refused
    /// (`identity_share`). Default: a quarter of --max-connections (at least 16), so that one
    /// workload of a linked cluster, however many connections it opens, leaves three quarters
    /// of the gateway to the others.
    #[arg(long, env = "MESHLINK_GATEWAY_MAX_CONNECTIONS_PER_IDENTITY")]
    pub max_connections_per_identity: Option<usize>,
}

impl Options {
    /// Forwarded connections one identity may hold.
    pub fn identity_share(&self) -> usize {
        self.max_connections_per_identity
            .unwrap_or((self.max_connections / 4).max(16))
            .min(self.max_connections)
    }

    /// File descriptors the gateway needs besides two per forwarded connection: one per
    /// connection in its handshake, and room for the admin server's connections, certificate
    /// renewal, the API watch and the process itself.
    pub fn reserved_files(&self) -> u64 {
        self.max_handshakes as u64 + 256
    }

    /// Which Services may be reached.
    pub fn export(&self) -> Export {
        if self.forward_any_service {
            Export::Any
        } else {
            Export::Selected(self.export_selector.clone())
        }
    }

    pub fn authorization(&self) -> Authorization {
        Authorization {
            identities: self.allow_identities.clone(),
            trust_domains: self.allow_trust_domains.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
