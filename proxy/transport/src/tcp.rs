//! What every TCP connection a meshlink proxy accepts or dials gets, in one place.
//!
//! - No Nagle delay: proxied requests are small and latency-bound.
//! - TCP keepalive: a peer that vanished without a FIN or RST (a node powered off, a partition)
//!   is found dead after [`KEEPALIVE_IDLE`] + [`KEEPALIVE_RETRIES`] × [`KEEPALIVE_INTERVAL`]
//!   (40 s) and its connection freed, instead of holding its slot for the idle timeout (an hour
//!   on the gateway). Linkerd's proxy sets 10 s of idle time on both sides too.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel closes the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;

/// Sets the options every proxied connection gets (see the module). Failing to set one is not
/// a reason to drop the connection; the caller may log it.
pub fn configure(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// Why a connection to an endpoint could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr}: {source}")]
    Refused {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {0}: timed out")]
    Timeout(SocketAddr),
}

/// Dials `addr` within `timeout`, with the options of [`configure`].
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::Timeout(addr))?
        .map_err(|source| ConnectError::Refused { addr, source })?;
    if let Err(error) = configure(&tcp) {
        tracing::debug!(%addr, %error, "setting socket options");
    }
    Ok(tcp)
}

/// Dials each of `addrs` in turn until one accepts (each within `timeout`); every failure is
/// logged with the endpoint.
pub async fn connect_first(
    addrs: impl IntoIterator<Item = SocketAddr>,
    timeout: Duration,
) -> Option<(TcpStream, SocketAddr)> {
    for addr in addrs {
        match connect(addr, timeout).await {
            Ok(tcp) => return Some((tcp, addr)),
            Err(error) => tracing::info!(%addr, %error, "endpoint not reached"),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_and_dialled_sockets_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialled, accepted) =
            tokio::join!(connect(addr, Duration::from_secs(5)), listener.accept());
        let (dialled, (accepted, _)) = (dialled.unwrap(), accepted.unwrap());
        configure(&accepted).unwrap();
        for tcp in [&dialled, &accepted] {
            let sock = SockRef::from(tcp);
            assert!(sock.keepalive().unwrap());
            assert_eq!(sock.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(sock.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_RETRIES);
            assert!(tcp.nodelay().unwrap());
        }
    }

    #[tokio::test]
    async fn the_first_endpoint_that_accepts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        // A port nothing listens on: bound, then closed.
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (_, addr) = connect_first([down, up], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(addr, up);
        assert!(
            connect_first([down], Duration::from_secs(5))
                .await
                .is_none()
        );
    }
}
