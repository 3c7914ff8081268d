//! HTTP/1 server settings every meshlink proxy listener uses.

use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;

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
