//! The HTTP server side of a proxied connection: the settings every meshlink proxy listener
//! uses, and one connection served until it ends, idles out or is drained.

use std::{error::Error as StdError, time::Duration};

use hyper::{
    body::{Body, Incoming},
    server::conn::{http1, http2},
    service::HttpService,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use proxy_transport::Activity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// The largest HTTP/1 request head a meshlink proxy serves: 64 KiB, as the transport header's
/// own bound and the HTTP/2 header-list limit.
pub const MAX_HTTP1_HEAD: usize = 64 * 1024;

/// An HTTP/1 server whose request-head limit is exact: a head of [`MAX_HTTP1_HEAD`] bytes is
/// served and one byte more is answered 431, however the bytes arrive.
///
/// hyper's read-buffer bound (`max_buf_size`) alone is approximate: it is checked only between
/// reads, and one read may fill the buffer's whole spare capacity, past the bound, so whether a
/// head a little over it is refused depends on how the bytes were split. `max_header_size`
/// counts the parsed head itself; the buffer bound is set above it so that it never decides.
pub fn http1_server() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_header_size(MAX_HTTP1_HEAD)
        .max_buf_size(2 * MAX_HTTP1_HEAD);
    builder
}

/// The HTTP version a connection speaks (known from the transport header or detection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// The bounds of one served connection.
#[derive(Clone, Copy, Debug)]
pub struct ServeSettings {
    /// Time for an HTTP/1 request head.
    pub header_timeout: Duration,
    /// No byte either way for this long: the connection is drained.
    pub idle_timeout: Duration,
    /// Concurrent HTTP/2 streams.
    pub max_streams: u32,
}

/// Serves `io` with `service` until the connection ends. When `cancel` fires or nothing has
/// moved for the idle timeout (read from `activity`, which the caller's stream updates), the
/// connection is drained: requests in flight finish, no new ones are taken.
pub async fn serve_connection<IO, S>(
    io: IO,
    version: Version,
    service: S,
    settings: ServeSettings,
    activity: &Activity,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Body + Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<Box<dyn StdError + Send + Sync>>,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let io = TokioIo::new(io);
    macro_rules! drive {
        ($conn:expr) => {{
            let mut conn = std::pin::pin!($conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(error) = res {
                            tracing::debug!(%error, "HTTP connection ended");
                        }
                        break;
                    }
                    () = cancel.cancelled(), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    () = activity.idle(settings.idle_timeout), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }};
    }
    match version {
        Version::Http1 => drive!(
            http1_server()
                .header_read_timeout(settings.header_timeout)
                .serve_connection(io, service)
                // A proxy that answers 101 hands the connection to `upgrade::splice`.
                .with_upgrades()
        ),
        Version::Http2 => drive!(
            http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(settings.max_streams)
                .max_header_list_size(u32::try_from(MAX_HTTP1_HEAD).unwrap_or(u32::MAX))
                .keep_alive_interval(Duration::from_secs(30))
                .serve_connection(io, service)
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves one connection whose client writes a head of `len` bytes at once, through an
    /// in-memory pipe (reads as large as the reader asks for, as on a fast network); returns
    /// the answer's status.
    async fn status_for_head_of(len: usize) -> u16 {
        let (client, server) = tokio::io::duplex(1 << 20);
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, Infallible>(hyper::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        });
        tokio::spawn(http1_server().serve_connection(hyper_util::rt::TokioIo::new(server), svc));
        let start = "GET / HTTP/1.1\r\nhost: x\r\nx-pad: ";
        let end = "\r\n\r\n";
        let head = format!("{start}{}{end}", "p".repeat(len - start.len() - end.len()));
        let mut client = client;
        client.write_all(head.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        client.read_exact(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[9..12]).parse().unwrap()
    }

    #[tokio::test]
    async fn the_head_limit_is_exact() {
        assert_eq!(status_for_head_of(MAX_HTTP1_HEAD).await, 200);
        for len in [
            MAX_HTTP1_HEAD + 1,
            MAX_HTTP1_HEAD + 6 * 1024,
            MAX_HTTP1_HEAD + 60 * 1024,
        ] {
            assert_eq!(status_for_head_of(len).await, 431, "{len}");
        }
    }
}
