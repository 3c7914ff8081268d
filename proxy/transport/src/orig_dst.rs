//! The address a redirected connection was sent to, before iptables' `REDIRECT` sent it to the
//! proxy (`SO_ORIGINAL_DST`, or `IP6T_SO_ORIGINAL_DST` for IPv6 peers), as Linkerd's proxy reads
//! it on every accepted socket of its inbound and outbound listeners.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// The original destination of `tcp`. Fails (ENOENT) when no redirect rule applied: a client
/// that dialled the proxy's port itself.
pub fn orig_dst(tcp: &TcpStream) -> io::Result<SocketAddr> {
    // The family of the connection decides which option the kernel answers.
    if tcp.local_addr()?.is_ipv4() {
        let sin = getsockopt(tcp, sockopt::OriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
            u16::from_be(sin.sin_port),
        )))
    } else {
        let sin6 = getsockopt(tcp, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sin6.sin6_addr.s6_addr),
            u16::from_be(sin6.sin6_port),
            sin6.sin6_flowinfo,
            sin6.sin6_scope_id,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a redirect the kernel has no original destination: the call fails rather than
    /// inventing one (the proxy then drops the connection).
    #[tokio::test]
    async fn fails_without_a_redirect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(orig_dst(&server).is_err());
    }
}
