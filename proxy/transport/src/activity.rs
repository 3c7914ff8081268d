//! Byte and idle accounting of a forwarded connection.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// When a connection last moved a byte, either way (shared by its two sides).
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// How long nothing has moved.
    fn idle_for(&self) -> Duration {
        self.last().elapsed()
    }

    /// When the connection will have been idle for `idle`, if nothing moves before.
    fn deadline(&self, idle: Duration) -> Instant {
        self.last() + idle
    }

    /// Resolves once nothing has moved for `idle` (re-arming while bytes move).
    pub async fn idle(&self, idle: Duration) {
        loop {
            tokio::time::sleep_until(self.deadline(idle)).await;
            if self.idle_for() >= idle {
                return;
            }
        }
    }
}

/// A stream that records activity and counts the bytes read and written.
#[derive(Debug)]
pub struct Tracked<IO> {
    io: IO,
    activity: Arc<Activity>,
    read: Counter,
    write: Counter,
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, activity: Arc<Activity>, read: Counter, write: Counter) -> Self {
        Self {
            io,
            activity,
            read,
            write,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.activity.touch();
            self.read.inc_by(n as u64);
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res
            && n > 0
        {
            self.activity.touch();
            self.write.inc_by(n as u64);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_rearms_while_bytes_move() {
        let activity = Arc::new(Activity::default());
        let start = Instant::now();
        let toucher = {
            let activity = activity.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    activity.touch();
                }
            })
        };
        activity.idle(Duration::from_secs(10)).await;
        // Touched at 6, 12, 18, 24, 30 s: idle for 10 s at 40 s.
        assert_eq!(start.elapsed().as_secs(), 40);
        toucher.await.unwrap();
    }
}
