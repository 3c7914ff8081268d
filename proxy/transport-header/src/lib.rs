//! Linkerd's transport header (`linkerd/transport-header`): after a TLS handshake that
//! negotiated ALPN [`PROTOCOL`], the client writes
//!
//! 1. the 23-byte preface `transport.l5d.io/v1\r\n\r\n`,
//! 2. the length of the message as a big-endian `u32`,
//! 3. a protobuf `transport.l5d.io.Header { int32 port = 1; string name = 2;
//!    SessionProtocol session_protocol = 3; }`,
//!
//! and then the application's bytes. [`decode`] is the pure, incremental parser (fuzzed in
//! `fuzz/`); [`read`] reads a header from a stream under a size bound and hands back the bytes
//! that followed it; [`Prefixed`] replays those before the rest of the stream.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The ALPN protocol id that announces a transport header.
pub const PROTOCOL: &[u8] = b"transport.l5d.io/v1";
/// What precedes the length and the message.
pub const PREFACE: &[u8] = b"transport.l5d.io/v1\r\n\r\n";
/// The largest message accepted: Linkerd's server reads headers into a 64 KiB buffer.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// The target a connection is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The target port (1..=65535).
    pub port: u16,
    /// The target name for gateway forwarding; `None` means "this pod, `port`".
    pub name: Option<String>,
    /// The HTTP version that follows; `None` means an opaque stream.
    pub protocol: Option<SessionProtocol>,
}

/// The HTTP version a header announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionProtocol {
    Http1,
    Http2,
}

impl SessionProtocol {
    /// As Linkerd labels it in `inbound_tcp_transport_header_connections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1",
            Self::Http2 => "http/2",
        }
    }
}

/// Why bytes are not a transport header.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the connection did not include a transport header")]
    NoPreface,
    #[error("the transport header declares {0} bytes, more than the {MAX_MESSAGE_LEN} allowed")]
    TooLong(u32),
    #[error("the transport header is not a valid protobuf message: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("the transport header's port {0} is not in 1..=65535")]
    InvalidPort(i32),
    #[error("the transport header's name {0:?} is not a DNS name")]
    InvalidName(String),
}

/// Why a header could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("the connection closed before the transport header was complete")]
    Eof,
    #[error("reading the transport header: {0}")]
    Io(#[from] std::io::Error),
}

mod proto {
    //! `proto/header.proto` of linkerd/transport-header, written out with prost's derives.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Header {
        #[prost(int32, tag = "1")]
        pub port: i32,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, optional, tag = "3")]
        pub session_protocol: Option<SessionProtocol>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionProtocol {
        #[prost(oneof = "Kind", tags = "1, 2")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(message, tag = "1")]
        Http1(Empty),
        #[prost(message, tag = "2")]
        Http2(Empty),
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Empty {}
}

impl Header {
    /// The header's bytes on the wire: preface, length, message.
    pub fn encode(&self) -> Vec<u8> {
        let msg = proto::Header {
            port: i32::from(self.port),
            name: self.name.clone().unwrap_or_default(),
            session_protocol: self.protocol.map(|p| proto::SessionProtocol {
                kind: Some(match p {
                    SessionProtocol::Http1 => proto::Kind::Http1(proto::Empty {}),
                    SessionProtocol::Http2 => proto::Kind::Http2(proto::Empty {}),
                }),
            }),
        };
        let len = msg.encoded_len();
        let mut out = Vec::with_capacity(PREFACE.len() + 4 + len);
        out.extend_from_slice(PREFACE);
        // A message is far below 4 GiB: a name is at most 253 bytes.
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        msg.encode(&mut out)
            .expect("a Vec grows to hold any message");
        out
    }
}

/// Parses a header from the start of `buf`. `Ok(None)` means the bytes so far are a valid
/// beginning and more are needed; `Ok(Some((header, n)))` means the header took `n` bytes.
/// Never reads past a declared length, and fails as soon as the bytes cannot be a header.
pub fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, DecodeError> {
    let preface_part = buf.len().min(PREFACE.len());
    if buf[..preface_part] != PREFACE[..preface_part] {
        return Err(DecodeError::NoPreface);
    }
    let Some(len) = buf.get(PREFACE.len()..PREFACE.len() + 4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let Ok(n) = usize::try_from(len) else {
        return Err(DecodeError::TooLong(len));
    };
    if n > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong(len));
    }
    let start = PREFACE.len() + 4;
    let Some(msg) = buf.get(start..start + n) else {
        return Ok(None);
    };
    let msg = proto::Header::decode(msg)?;
    let port = u16::try_from(msg.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(DecodeError::InvalidPort(msg.port))?;
    let name = if msg.name.is_empty() {
        None
    } else if is_dns_name(&msg.name) {
        Some(msg.name.trim_end_matches('.').to_ascii_lowercase())
    } else {
        return Err(DecodeError::InvalidName(msg.name));
    };
    let protocol = msg
        .session_protocol
        .and_then(|sp| sp.kind)
        .map(|k| match k {
            proto::Kind::Http1(_) => SessionProtocol::Http1,
            proto::Kind::Http2(_) => SessionProtocol::Http2,
        });
    Ok(Some((
        Header {
            port,
            name,
            protocol,
        },
        start + n,
    )))
}

fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Reads a header from `io`, coping with fragmented reads. Returns the header and the bytes
/// that arrived after it. At most `PREFACE + 4 + MAX_MESSAGE_LEN` bytes are ever buffered; the
/// caller bounds the time.
pub async fn read<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<(Header, Bytes), ReadError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if let Some((header, n)) = decode(&buf)? {
            buf.advance(n);
            return Ok((header, buf.freeze()));
        }
        // Read no more than the header can still need, so a hostile peer cannot make the
        // buffer grow past the bound, but at least a chunk so reads stay few.
        let room = (PREFACE.len() + 4 + MAX_MESSAGE_LEN).saturating_sub(buf.len());
        buf.reserve(room.min(8 * 1024));
        let mut limited = (&mut *io).take(room.min(8 * 1024) as u64);
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(ReadError::Eof);
        }
    }
}

/// A stream that first yields `prefix` (bytes read past a header), then reads from `inner`.
#[derive(Debug)]
pub struct Prefixed<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, inner: IO) -> Self {
        Self { prefix, inner }
    }

    pub fn get_ref(&self) -> &IO {
        &self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The bytes linkerd2-proxy writes for `{port: 8080, name: "echo.ns1.svc.cluster.local",
    /// session_protocol: Http2}`, worked out field by field from `header.proto`:
    /// tag 1 varint (0x08) 8080 (0x90 0x3f); tag 2 length-delimited (0x12) 26 bytes of name;
    /// tag 3 (0x1a) a 2-byte SessionProtocol whose tag 2 (0x12) is an empty Http2 (0x00).
    #[test]
    fn golden_bytes() {
        let header = Header {
            port: 8080,
            name: Some("echo.ns1.svc.cluster.local".into()),
            protocol: Some(SessionProtocol::Http2),
        };
        let mut expected = b"transport.l5d.io/v1\r\n\r\n".to_vec();
        let mut msg = vec![0x08, 0x90, 0x3f, 0x12, 26];
        msg.extend_from_slice(b"echo.ns1.svc.cluster.local");
        msg.extend_from_slice(&[0x1a, 0x02, 0x12, 0x00]);
        expected.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        expected.extend_from_slice(&msg);
        assert_eq!(header.encode(), expected);
        assert_eq!(decode(&expected).unwrap(), Some((header, expected.len())));

        // Opaque, no name: only the port (proto3 leaves empty fields out).
        let opaque = Header {
            port: 4143,
            name: None,
            protocol: None,
        };
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 3, 0x08, 0xaf, 0x20]);
        assert_eq!(opaque.encode(), bytes);
        // HTTP/1 is tag 1 inside SessionProtocol.
        let h1 = Header {
            port: 80,
            name: None,
            protocol: Some(SessionProtocol::Http1),
        };
        assert!(h1.encode().ends_with(&[0x08, 80, 0x1a, 0x02, 0x0a, 0x00]));
    }

    #[test]
    fn incremental_and_refusals() {
        let bytes = Header {
            port: 80,
            name: Some("web.shop.svc.cluster.local".into()),
            protocol: None,
        }
        .encode();
        for cut in 0..bytes.len() {
            assert!(matches!(decode(&bytes[..cut]), Ok(None)), "prefix {cut}");
        }
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(DecodeError::NoPreface)
        ));
        let mut long = PREFACE.to_vec();
        long.extend_from_slice(&(MAX_MESSAGE_LEN as u32 + 1).to_be_bytes());
        assert!(matches!(decode(&long), Err(DecodeError::TooLong(_))));
        for (port, name) in [
            (0, ""),
            (70000, ""),
            (-1, ""),
            (80, "bad name"),
            (80, "a..b"),
        ] {
            let msg = proto::Header {
                port,
                name: name.into(),
                session_protocol: None,
            }
            .encode_to_vec();
            let mut b = PREFACE.to_vec();
            b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            b.extend_from_slice(&msg);
            assert!(decode(&b).is_err(), "port {port} name {name:?}");
        }
        let mut garbage = PREFACE.to_vec();
        garbage.extend_from_slice(&[0, 0, 0, 2, 0xff, 0xff]);
        assert!(matches!(decode(&garbage), Err(DecodeError::Protobuf(_))));
    }

    #[tokio::test]
    async fn reads_fragments_and_keeps_what_follows() {
        let header = Header {
            port: 9000,
            name: Some("db.data.svc.cluster.local".into()),
            protocol: Some(SessionProtocol::Http1),
        };
        let mut wire = header.encode();
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (mut client, mut server) = tokio::io::duplex(8);
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(3) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let (got, rest) = read(&mut server).await.unwrap();
        assert_eq!(got, header);
        let mut replay = Prefixed::new(rest, server);
        let mut line = vec![0; 16];
        replay.read_exact(&mut line).await.unwrap();
        assert_eq!(line, b"GET / HTTP/1.1\r\n");
        let _client = writer.await.unwrap();

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&PREFACE[..10]).await.unwrap();
        drop(client);
        assert!(matches!(read(&mut server).await, Err(ReadError::Eof)));
    }
}
