//! Opaque forwarding: bytes both ways until both ends are done, each half-close passed on, and a
//! buffer held only while data waits for the other side.
//!
//! `tokio::io::copy_bidirectional` keeps two buffers for a connection's whole life; most
//! forwarded connections are idle most of the time, and at 32 KiB a direction those buffers
//! were most of a busy connection's memory. Here a direction takes a buffer when it reads and
//! gives it back as soon as the source has nothing more and everything read was written, so an
//! idle connection, however busy it once was, holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

/// The most one direction reads at once: two TLS records' plaintext (measured by the gateway
/// benchmark at 16 bulk connections: 8 KiB 18 %, 16 KiB 27 %, 32 KiB 29-42 %, 64 KiB 31 % of
/// direct TCP).
pub const BUFFER: usize = 32 * 1024;

/// Bytes moved each way by [`copy_bidirectional`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// From `a` to `b`.
    pub a_to_b: u64,
    /// From `b` to `a`.
    pub b_to_a: u64,
}

/// Copies between `a` and `b` until both directions have ended: when one side's reads end,
/// the other side's writes are shut down (a half-close travels through) and the other
/// direction goes on. Ends early with the first error.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut there = Half::default();
    let mut back = Half::default();
    std::future::poll_fn(|cx| {
        let a_to_b = there.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let b_to_a = back.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        ready!(a_to_b);
        ready!(b_to_a);
        Poll::Ready(Ok(Moved {
            a_to_b: there.moved,
            b_to_a: back.moved,
        }))
    })
    .await
}

/// Opaque forwarding between `a` and `b` ([`copy_bidirectional`]) that ends, too, when nothing
/// has moved either way for `idle` (read from `activity`, which tracked streams update): what
/// every proxy does with a stream it cannot parse. `Ok(None)` when it idled out. On shutdown an
/// opaque stream cannot be asked to finish: it runs until it ends or the drain deadline.
pub async fn forward<A, B>(
    a: &mut A,
    b: &mut B,
    activity: &crate::Activity,
    idle: std::time::Duration,
) -> io::Result<Option<Moved>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        moved = copy_bidirectional(a, b) => moved.map(Some),
        () = activity.idle(idle) => Ok(None),
    }
}

/// One direction.
#[derive(Debug, Default)]
struct Half {
    /// Read and not yet written; `None` while nothing waits.
    buf: Option<BytesMut>,
    moved: u64,
    need_flush: bool,
    read_done: bool,
    done: bool,
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut from: Pin<&mut R>,
        mut to: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Some(buf) = self.buf.as_mut().filter(|b| !b.is_empty()) {
                let n = ready!(to.as_mut().poll_write(cx, buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                buf.advance(n);
                self.moved += n as u64;
                self.need_flush = true;
                continue;
            }
            if self.read_done {
                ready!(to.as_mut().poll_flush(cx))?;
                ready!(to.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            let buf = self.buf.get_or_insert_with(BytesMut::new);
            // Empty here: reserving reclaims the allocation it already has, if any.
            buf.reserve(BUFFER);
            match poll_read_buf(from.as_mut(), cx, buf) {
                Poll::Ready(Ok(0)) => {
                    self.buf = None;
                    self.read_done = true;
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read and nothing waiting: the buffer goes back.
                    self.buf = None;
                    if self.need_flush {
                        ready!(to.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    #[tokio::test]
    async fn both_ways_with_half_close() {
        let (mut client, mut a) = duplex(1024);
        let (mut b, mut server) = duplex(1024);
        let copy = tokio::spawn(async move { copy_bidirectional(&mut a, &mut b).await });
        let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let sent = payload.clone();
        let upload = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        });
        // The server sees the whole upload and its end, then answers on the other half.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(upload.await.unwrap(), b"bye");
        let moved = copy.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 200_000,
                b_to_a: 3
            }
        );
    }

    /// A direction holds a buffer exactly while read bytes wait for a slow writer, and none once
    /// everything was written and the source is quiet.
    #[tokio::test]
    async fn a_buffer_only_while_data_waits() {
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut b, mut server) = duplex(1024);
        let mut half = Half::default();
        let poll =
            |half: &mut Half, a: &mut tokio::io::DuplexStream, b: &mut tokio::io::DuplexStream| {
                let waker = futures::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                half.poll(&mut cx, Pin::new(a), Pin::new(b))
            };
        assert!(poll(&mut half, &mut a, &mut b).is_pending());
        assert!(!half.holds_buffer(), "idle from the start: no buffer");
        client.write_all(&[7; 10_000]).await.unwrap();
        assert!(poll(&mut half, &mut a, &mut b).is_pending());
        assert!(
            half.holds_buffer(),
            "the writer takes 1 KiB; the rest waits"
        );
        let mut got = vec![0; 10_000];
        let mut n = 0;
        while n < got.len() {
            let _ = poll(&mut half, &mut a, &mut b);
            n += server.read(&mut got[n..]).await.unwrap();
        }
        assert!(poll(&mut half, &mut a, &mut b).is_pending());
        assert!(
            !half.holds_buffer(),
            "everything written, source quiet: no buffer"
        );
        assert_eq!(half.moved, 10_000);
        assert!(got.iter().all(|&b| b == 7));
    }
}
