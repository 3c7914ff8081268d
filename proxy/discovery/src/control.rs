//! Channels to the control plane (destination, policy), as Linkerd's proxy makes them: gRPC
//! over HTTP/2 to `*_SVC_ADDR`, over mTLS with the proxy's own certificate, checking that the
//! server proves `*_SVC_NAME`. A loopback address without a name is plaintext (local mocks);
//! any other address without a name is a configuration error.
//!
//! One difference from Linkerd: a loopback address *with* a name gets mTLS (Linkerd ignores the
//! name), so that a configured identity is always checked.

use std::{io, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use proxy_identity::{Credentials, Id, tls};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, rustls::ClientConfig};
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint};

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("control-plane address {0:?} is not host:port")]
    Addr(String),
    #[error("control-plane address {0:?} is not loopback, so its identity (name) is required")]
    NameRequired(String),
    #[error("control-plane address {addr:?} makes no URI: {source}")]
    Uri {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Why one connection to the control plane failed (the channel retries).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("resolving {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("no address of {0} accepted a connection")]
    Unreachable(String),
    #[error(transparent)]
    Tls(#[from] tls::ConnectError),
}

/// A connection to the control plane: plaintext (loopback) or mTLS.
pub type Connection = TokioIo<Either<TcpStream, TlsStream<TcpStream>>>;

/// A lazy gRPC channel to the control-plane service at `addr` (`host:port`, the host a DNS name
/// or an IP). Each connection resolves `addr` afresh, dials each of its addresses in turn
/// within `connect_timeout`, and does mTLS presenting `creds`' current certificate and checking
/// that the server is `name`. Nothing is dialled until the first call; a broken connection is
/// replaced on the next call.
pub fn channel(
    addr: &str,
    name: Option<Id>,
    creds: &Arc<Credentials>,
    connect_timeout: Duration,
) -> Result<Channel, ChannelError> {
    let (host, _port) = split(addr).ok_or_else(|| ChannelError::Addr(addr.to_owned()))?;
    let tls = match name {
        Some(name) => Some((tls::client_config(creds, &[b"h2"]), name)),
        None if is_loopback(host) => None,
        None => return Err(ChannelError::NameRequired(addr.to_owned())),
    };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|source| ChannelError::Uri {
            addr: addr.to_owned(),
            source,
        })?
        // Bounds the whole connector: resolution, dialling and the TLS handshake.
        .connect_timeout(connect_timeout);
    let addr = addr.to_owned();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move { connect(&addr, tls, connect_timeout).await }
        })),
    )
}

async fn connect(
    addr: &str,
    tls: Option<(Arc<ClientConfig>, Id)>,
    timeout: Duration,
) -> Result<Connection, ConnectError> {
    let addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| ConnectError::Resolve {
            addr: addr.to_owned(),
            source,
        })?;
    let (tcp, peer) = proxy_transport::tcp::connect_first(addrs, timeout)
        .await
        .ok_or_else(|| ConnectError::Unreachable(addr.to_owned()))?;
    let tls_on = tls.is_some();
    let io = match tls {
        None => Either::Left(tcp),
        Some((config, name)) => Either::Right(tls::connect(config, tcp, &name).await?),
    };
    tracing::debug!(%addr, %peer, tls = tls_on, "connected to the control plane");
    Ok(TokioIo::new(io))
}

/// `host` and `port` of `host:port` (`[v6]:port` too).
fn split(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some((host, port))
}

/// A loopback IP, or `localhost` (Linkerd's `Addr::is_loopback`).
fn is_loopback(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost."),
    }
}

#[cfg(test)]
mod tests;
