//! Dialling a remote cluster's gateway the way a Linkerd proxy does for a mirrored Service's
//! endpoint (`authority_override` set): mTLS with SNI = the gateway identity and ALPN
//! `transport.l5d.io/v1`, a check that the gateway is who discovery said, then the transport
//! header naming the remote Service. Test clients use it on its own.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use proxy_identity::{Credentials, Id, tls};
use proxy_transport_header::{Header, PROTOCOL};
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tokio_rustls::client::TlsStream;

/// Why a gateway could not be dialed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("the gateway: {0}")]
    Connect(#[from] proxy_transport::tcp::ConnectError),
    #[error(transparent)]
    Tls(#[from] tls::ConnectError),
    #[error("the gateway at {0} did not negotiate transport.l5d.io/v1")]
    NoTransportHeader(SocketAddr),
    #[error("writing the transport header: {0}")]
    Write(#[source] std::io::Error),
}

/// Dials gateways with one TLS config (the certificate in it is swapped in place on renewal).
#[derive(Clone, Debug)]
pub struct GatewayDialer {
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl GatewayDialer {
    pub fn new(creds: &Arc<Credentials>, connect_timeout: Duration) -> Self {
        Self {
            config: tls::client_config(creds, &[PROTOCOL]),
            connect_timeout,
        }
    }

    /// Opens a connection to the header's target through the gateway `gateway` at `addr`.
    pub async fn dial(
        &self,
        addr: SocketAddr,
        gateway: &Id,
        header: &Header,
    ) -> Result<TlsStream<TcpStream>, DialError> {
        // Keepalive and no delay, as every socket a proxy dials.
        let tcp = proxy_transport::tcp::connect(addr, self.connect_timeout).await?;
        let mut stream = tls::connect(self.config.clone(), tcp, gateway).await?;
        // As Linkerd: the header is written only when the gateway agreed to read one.
        if stream.get_ref().1.alpn_protocol() != Some(PROTOCOL) {
            return Err(DialError::NoTransportHeader(addr));
        }
        stream
            .write_all(&header.encode())
            .await
            .map_err(DialError::Write)?;
        Ok(stream)
    }
}
