//! Protocol detection as Linkerd's proxy does it (`linkerd/http/detect`): the first bytes a client
//! sends say HTTP/2 (the prior-knowledge preface), HTTP/1 (a request line) or neither (opaque
//! TCP). A client that sends nothing within the timeout, as the client of a server-speaks-first
//! protocol does, is opaque.
//!
//! Linkerd decides on a single read; here the bytes are read until they decide, so a preface
//! split over two TCP segments is still HTTP/2. The decision itself ([`classify`]) is a pure
//! function of the bytes, fuzzed (`proxy/http/fuzz`).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes read before deciding: Linkerd's 1 KiB. A longer request line is opaque.
pub const DETECT_BUFFER: usize = 1024;

/// The HTTP/2 connection preface's first line, which is what Linkerd matches.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Not HTTP: forwarded as bytes.
    Opaque,
}

impl Protocol {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::Http2 => "http/2",
            Self::Opaque => "opaque",
        }
    }
}

/// The protocol of a connection whose first bytes are `buf`, or `None` while more bytes could
/// still change the answer.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    // A request line is complete at its first line feed; before that, httparse says whether
    // the bytes so far can still begin one.
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = match line_end {
        Some(end) => &buf[..=end],
        None if buf.len() >= DETECT_BUFFER => return Some(Protocol::Opaque),
        None => buf,
    };
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(line) {
        Err(_) => Some(Protocol::Opaque),
        // The request line parsed whole: httparse stops at the (absent) headers.
        Ok(_) if line_end.is_some() => Some(if req.version.is_some() {
            Protocol::Http1
        } else {
            Protocol::Opaque
        }),
        Ok(_) => None,
    }
}

/// Reads from `io` into `buf` until [`classify`] decides, the client closes, the buffer is full
/// or `timeout` passes (opaque: a server-speaks-first protocol's client waits). The bytes read
/// stay in `buf` for the caller to replay.
pub async fn detect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    timeout: Duration,
) -> std::io::Result<Protocol> {
    let read = async {
        loop {
            if let Some(p) = classify(buf) {
                return Ok(p);
            }
            if buf.len() >= DETECT_BUFFER {
                return Ok(Protocol::Opaque);
            }
            buf.reserve(DETECT_BUFFER - buf.len());
            let mut limited = (&mut *io).take((DETECT_BUFFER - buf.len()) as u64);
            if limited.read_buf(buf).await? == 0 {
                return Ok(Protocol::Opaque);
            }
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Ok(Protocol::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[test]
    fn classifies_first_bytes() {
        use Protocol::*;
        let cases: &[(&[u8], Option<Protocol>)] = &[
            (b"", None),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Http2)),
            (b"PRI * HTTP/2.0", Some(Http2)),
            (b"PRI * HT", None),
            (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", Some(Http1)),
            (b"GET / HTTP/1.1\r\n", Some(Http1)),
            (b"GET / HTTP/1.1\n", Some(Http1)),
            (b"POST /upload?x=1 HTTP/1.0\r\n", Some(Http1)),
            (b"GET http://web.shop:80/ HTTP/1.1\r\n", Some(Http1)),
            (b"OPTIONS * HTTP/1.1\r\n", Some(Http1)),
            (b"GET / HTT", None),
            (b"GET", None),
            // Not HTTP: TLS, a database's startup message, SSH, SMTP-style text.
            (b"\x16\x03\x01\x02\x00\x01", Some(Opaque)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Some(Opaque)),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Some(Opaque)),
            (b"HELO example\r\n", Some(Opaque)),
            (b"GET / HTTP/3.0\r\n", Some(Opaque)),
            (b"GET /\r\n", Some(Opaque)),
            (b"PRX * HTTP/2.0\r\n", Some(Opaque)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                classify(bytes),
                *expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        // A request line longer than the buffer is not detected as HTTP.
        let long = [b"GET /".as_slice(), &[b'a'; DETECT_BUFFER]].concat();
        assert_eq!(classify(&long), Some(Opaque));
    }

    /// Bytes that arrive in pieces are read until they decide, and kept.
    #[tokio::test]
    async fn reads_until_decided() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            let mut buf = BytesMut::new();
            let p = detect(&mut server, &mut buf, Duration::from_secs(10)).await;
            (p.unwrap(), buf)
        });
        client.write_all(b"PRI * HT").await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"TP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let (p, buf) = task.await.unwrap();
        assert_eq!(p, Protocol::Http2);
        assert!(buf.starts_with(b"PRI * HT"));
    }

    /// A client that waits for the server to speak first is opaque once the timeout passes.
    #[tokio::test(start_paused = true)]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let start = tokio::time::Instant::now();
        let p = detect(&mut server, &mut buf, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert!(start.elapsed() >= Duration::from_secs(10));
        assert!(buf.is_empty());
    }

    /// A client that closes at once is opaque (nothing to parse), not an error.
    #[tokio::test]
    async fn eof_is_opaque() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let mut buf = BytesMut::new();
        let p = detect(&mut server, &mut buf, Duration::from_secs(10)).await;
        assert_eq!(p.unwrap(), Protocol::Opaque);
    }
}
