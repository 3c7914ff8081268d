//! Dialling a peer as a meshed proxy does (linkerd2-proxy `outbound/src/{http,opaq}/concrete.rs`
//! and `tcp/tagged_transport.rs`), for the sidecar and the gateway alike: plaintext to a peer
//! with no identity; mTLS to one with an identity (SNI = that identity, its certificate checked
//! to chain to the trust anchors and to name it, this proxy's own certificate presented); and
//! mTLS with ALPN `transport.l5d.io/v1` and a transport header, to a remote gateway or a peer
//! proxy's inbound port. Which of them an endpoint gets is the caller's routing.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proxy_identity::{Credentials, Id, tls};
use proxy_transport_header::{Header, PROTOCOL};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::{client::TlsStream, rustls::ClientConfig};
use tokio_util::either::Either;

use crate::tcp::{ConnectError, connect};

/// A connection to a peer: plaintext or mTLS.
pub type Io = Either<TcpStream, TlsStream<TcpStream>>;

/// A peer as it is dialled: its address, and the identity it must prove (`None`: plaintext).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Option<Id>,
}

/// Why a peer could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Tls(#[from] tls::ConnectError),
    #[error("TLS handshake with {0}: timed out")]
    HandshakeTimeout(SocketAddr),
    #[error("{0} did not negotiate transport.l5d.io/v1")]
    NoTransportHeader(SocketAddr),
    #[error("writing the transport header to {addr}: {source}")]
    Write {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl DialError {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Connect(ConnectError::Timeout(_)) => "connect timeout",
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::HandshakeTimeout(_) => "tls handshake timeout",
            Self::NoTransportHeader(_) | Self::Write { .. } => "transport header",
        }
    }

    /// Whether the peer did not answer in time (a 504, not a 502).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Self::Connect(ConnectError::Timeout(_)) | Self::HandshakeTimeout(_)
        )
    }
}

/// Dials peers with this proxy's identity.
#[derive(Clone, Debug)]
pub struct Dialer {
    /// No ALPN: mesh traffic between proxies is prior-knowledge HTTP/2, HTTP/1 or opaque.
    mesh: Arc<ClientConfig>,
    /// ALPN `transport.l5d.io/v1`: a transport header follows.
    header: Arc<ClientConfig>,
    /// Bounds the TCP connect, and then the TLS handshake: a peer that accepts and never
    /// completes its handshake must not hold the caller for ever.
    pub connect_timeout: Duration,
}

impl Dialer {
    pub fn new(creds: &Arc<Credentials>, connect_timeout: Duration) -> Self {
        Self {
            mesh: tls::client_config(creds, &[]),
            header: tls::client_config(creds, &[PROTOCOL]),
            connect_timeout,
        }
    }

    /// A plaintext connection to `addr` (targets outside the mesh).
    pub async fn plain(&self, addr: SocketAddr) -> Result<Io, DialError> {
        Ok(Either::Left(connect(addr, self.connect_timeout).await?))
    }

    /// An mTLS connection to `addr`, which must prove `id`.
    pub async fn mesh(&self, addr: SocketAddr, id: &Id) -> Result<TlsStream<TcpStream>, DialError> {
        self.tls(self.mesh.clone(), addr, id).await
    }

    /// `peer` in plaintext or mTLS, as its identity says.
    pub async fn peer(&self, peer: &Peer) -> Result<Io, DialError> {
        match &peer.identity {
            None => self.plain(peer.addr).await,
            Some(id) => Ok(Either::Right(self.mesh(peer.addr, id).await?)),
        }
    }

    /// A connection to `addr`, which must prove `id`, that carries `header` first: a remote
    /// cluster's gateway (the header names the Service) or a peer proxy's inbound port (it
    /// names the port). As Linkerd, the header is written only when the peer agreed, by ALPN
    /// `transport.l5d.io/v1`, to read one.
    pub async fn with_header(
        &self,
        addr: SocketAddr,
        id: &Id,
        header: &Header,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        let mut stream = self.tls(self.header.clone(), addr, id).await?;
        if stream.get_ref().1.alpn_protocol() != Some(PROTOCOL) {
            return Err(DialError::NoTransportHeader(addr));
        }
        stream
            .write_all(&header.encode())
            .await
            .map_err(|source| DialError::Write { addr, source })?;
        Ok(stream)
    }

    async fn tls(
        &self,
        config: Arc<ClientConfig>,
        addr: SocketAddr,
        id: &Id,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        let tcp = connect(addr, self.connect_timeout).await?;
        tokio::time::timeout(self.connect_timeout, tls::connect(config, tcp, id))
            .await
            .map_err(|_| DialError::HandshakeTimeout(addr))?
            .map_err(DialError::from)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proxy_identity::testing::TestPki;
    use tokio::{io::AsyncReadExt, net::TcpListener};

    use super::*;

    const SERVER: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";
    const CLIENT: &str = "gw.mc.serviceaccount.identity.linkerd.cluster.local";

    /// A server with `server`'s certificate that answers each connection with the client's
    /// identity and what it read, and one client dialler with `client`'s.
    async fn pair(server: &str, client: &str) -> (SocketAddr, Dialer) {
        let pki = TestPki::new();
        let acceptor =
            tokio_rustls::TlsAcceptor::from(tls::server_config(&pki.creds(server), &[PROTOCOL]));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls::client_id(tls.get_ref().1);
                    let mut first = [0u8; 4];
                    let _ = tls.read_exact(&mut first).await;
                    let answer = format!("{peer:?} {}", String::from_utf8_lossy(&first));
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        let dialer = Dialer::new(&pki.creds(client), Duration::from_secs(5));
        (addr, dialer)
    }

    #[tokio::test]
    async fn a_meshed_peer_sees_the_dialler_and_must_prove_its_identity() {
        let (addr, dialer) = pair(SERVER, CLIENT).await;
        let peer = Peer {
            addr,
            identity: Some(Id::parse(SERVER).unwrap()),
        };
        let mut io = dialer.peer(&peer).await.unwrap();
        io.write_all(b"ping").await.unwrap();
        let mut answer = String::new();
        io.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, format!("Some(Dns(\"{CLIENT}\")) ping"));

        let other = Peer {
            addr,
            identity: Some(
                Id::parse("db.shop.serviceaccount.identity.linkerd.cluster.local").unwrap(),
            ),
        };
        let refused = dialer.peer(&other).await.unwrap_err();
        assert!(
            matches!(
                refused,
                DialError::Tls(tls::ConnectError::WrongIdentity { .. })
            ),
            "{refused:?}"
        );
        assert_eq!(refused.label(), "tls");
    }

    #[tokio::test]
    async fn a_silent_handshake_times_out() {
        tls::install_default_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepted, never answered.
        let _held = tokio::spawn(async move {
            let (_tcp, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let (_, dialer) = pair(SERVER, CLIENT).await;
        let dialer = Dialer {
            connect_timeout: Duration::from_millis(200),
            ..dialer
        };
        let id = Id::parse(SERVER).unwrap();
        let error = dialer.mesh(addr, &id).await.unwrap_err();
        assert!(
            matches!(error, DialError::HandshakeTimeout(a) if a == addr),
            "{error:?}"
        );
        assert!(error.is_timeout());
    }
}
