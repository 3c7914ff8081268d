//! Linkerd's "direct" inbound connection: mutual TLS whose ClientHello names this proxy's
//! identity and ALPN `transport.l5d.io/v1`, a client certificate from the trust anchors, then a
//! transport header within a deadline. The gateway's port 4143 and a sidecar's inbound direct
//! port accept exactly this, under the same bounds ([`Admission`]); each refusal has its own
//! reason, for the log and the metric.

use std::{sync::Arc, time::Duration};

use proxy_identity::{Id, tls};
use proxy_transport_header::{self as header, Header, Prefixed};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::{LazyConfigAcceptor, rustls::ServerConfig, server::TlsStream};
use tokio_util::sync::CancellationToken;

use crate::{Held, Pending, Share};

/// Why a direct connection was closed before it said where it goes. The label is the metric's
/// `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The first bytes were not a TLS ClientHello.
    NotTls,
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The ClientHello named no server.
    NoSni,
    /// The ClientHello named another server than this proxy.
    WrongSni,
    /// The client did not offer ALPN `transport.l5d.io/v1`.
    NoAlpn,
    /// The client presented no certificate.
    NoClientCert,
    /// The client's certificate does not chain to the trust anchors.
    ForeignAnchor,
    /// The client's certificate has expired.
    ExpiredCert,
    /// The client's certificate is otherwise unacceptable (not yet valid, no identity, ...).
    BadCert,
    /// The TLS handshake failed for another reason.
    TlsError,
    /// The transport header was malformed, too long, or cut short.
    BadHeader,
    /// The transport header did not arrive in time.
    HeaderTimeout,
    /// The client's identity is not allowed by the authorization policy.
    Unauthorized,
    /// At the connection limit, or a newer handshake took this one's place.
    Overloaded,
    /// The client's identity held its share of the connections.
    IdentityShare,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::NoSni => "no_sni",
            Self::WrongSni => "wrong_sni",
            Self::NoAlpn => "no_alpn",
            Self::NoClientCert => "no_client_cert",
            Self::ForeignAnchor => "foreign_anchor",
            Self::ExpiredCert => "expired_cert",
            Self::BadCert => "bad_cert",
            Self::TlsError => "tls_error",
            Self::BadHeader => "bad_header",
            Self::HeaderTimeout => "header_timeout",
            Self::Unauthorized => "unauthorized",
            Self::Overloaded => "overloaded",
            Self::IdentityShare => "identity_share",
        }
    }
}

/// The TLS handshake of a direct connection, within `timeout`, with the checks Linkerd's direct
/// stack makes: returns the stream and the client's verified identity.
pub async fn handshake(
    tcp: TcpStream,
    own: &Id,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, Id), Refused> {
    tokio::time::timeout(timeout, handshake_inner(tcp, own, config))
        .await
        .unwrap_or(Err(Refused::HandshakeTimeout))
}

async fn handshake_inner(
    tcp: TcpStream,
    own: &Id,
    config: Arc<ServerConfig>,
) -> Result<(TlsStream<TcpStream>, Id), Refused> {
    let start = LazyConfigAcceptor::new(tokio_rustls::rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|_| Refused::NotTls)?;
    let hello = start.client_hello();
    match hello.server_name() {
        None => return Err(Refused::NoSni),
        Some(sni) if tls::server_name(own).is_none_or(|n| n.to_str() != sni) => {
            tracing::info!(sni, "SNI is not this proxy's identity");
            return Err(Refused::WrongSni);
        }
        Some(_) => {}
    }
    if !hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == header::PROTOCOL))
    {
        return Err(Refused::NoAlpn);
    }
    let stream = start.into_stream(config).await.map_err(|e| {
        let reason = e
            .get_ref()
            .and_then(|e| e.downcast_ref::<tokio_rustls::rustls::Error>())
            .and_then(tls::certificate_reason);
        match reason {
            Some("expired_cert") => Refused::ExpiredCert,
            Some("foreign_anchor") => Refused::ForeignAnchor,
            Some("no_client_cert") => Refused::NoClientCert,
            Some(_) => Refused::BadCert,
            None => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Refused::TlsError
            }
        }
    })?;
    let conn = stream.get_ref().1;
    if conn.peer_certificates().is_none_or(<[_]>::is_empty) {
        return Err(Refused::NoClientCert);
    }
    let id = tls::client_id(conn).ok_or(Refused::BadCert)?;
    Ok((stream, id))
}

/// The transport header, within `timeout`; the stream goes on with what followed it.
pub async fn read_header(
    mut tls: TlsStream<TcpStream>,
    client: &Id,
    timeout: Duration,
) -> Result<(Header, Prefixed<TlsStream<TcpStream>>), Refused> {
    match tokio::time::timeout(timeout, header::read(&mut tls)).await {
        Err(_) => Err(Refused::HeaderTimeout),
        Ok(Err(error)) => {
            tracing::info!(client = %client, %error, "bad transport header");
            Err(Refused::BadHeader)
        }
        Ok(Ok((header, rest))) => Ok((header, Prefixed::new(rest, tls))),
    }
}

/// The bounds of a direct port.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    /// Connections in their handshake at once; a newcomer evicts the oldest.
    pub max_handshakes: usize,
    /// Admitted connections at once.
    pub max_connections: usize,
    /// Admitted connections one client identity may hold.
    pub per_identity: usize,
}

/// Admits direct connections under [`Limits`].
#[derive(Debug)]
pub struct Admission {
    own: Id,
    config: Arc<ServerConfig>,
    limits: Limits,
    pending: Pending,
    established: Arc<Semaphore>,
    identities: Arc<Share<Id>>,
}

/// A connection that passed every check, holding its places until dropped.
#[derive(Debug)]
pub struct Admitted {
    pub client: Id,
    pub header: Header,
    pub io: Prefixed<TlsStream<TcpStream>>,
    pub places: (OwnedSemaphorePermit, Held<Id>),
}

impl Admission {
    pub fn new(own: Id, config: Arc<ServerConfig>, limits: Limits) -> Self {
        Self {
            own,
            config,
            pending: Pending::new(limits.max_handshakes),
            established: Arc::new(Semaphore::new(limits.max_connections)),
            identities: Arc::new(Share::new(limits.per_identity)),
            limits,
        }
    }

    /// Takes `tcp` through the handshake, `authorized`, the connection and identity limits
    /// and the header, in that order. `Ok(None)` when `cancel` fired first.
    pub async fn admit(
        &self,
        tcp: TcpStream,
        authorized: impl Fn(&Id) -> bool,
        cancel: &CancellationToken,
    ) -> Result<Option<Admitted>, Refused> {
        let slot = self.pending.enter();
        let timeout = self.limits.handshake_timeout;
        let (tls, client) = tokio::select! {
            r = handshake(tcp, &self.own, self.config.clone(), timeout) => r?,
            () = slot.evicted.cancelled() => return Err(Refused::Overloaded),
            () = cancel.cancelled() => return Ok(None),
        };
        drop(slot);
        if !authorized(&client) {
            tracing::info!(client = %client, "identity not authorized");
            return Err(Refused::Unauthorized);
        }
        let permit = self
            .established
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Overloaded)?;
        let Some(share) = self.identities.enter(client.clone()) else {
            tracing::info!(client = %client, share = self.identities.share(), "identity holds its share of connections");
            return Err(Refused::IdentityShare);
        };
        let (header, io) = tokio::select! {
            r = read_header(tls, &client, self.limits.header_timeout) => r?,
            () = cancel.cancelled() => return Ok(None),
        };
        Ok(Some(Admitted {
            client,
            header,
            io,
            places: (permit, share),
        }))
    }
}
