//! The accept loop of a data-plane listener (the gateway's 4143, a sidecar's inbound and
//! outbound ports): every socket configured ([`crate::tcp::configure`]), connections spread
//! over worker threads, and on cancellation the loop stops accepting and waits for what it
//! started (each handler drains its own connection; the caller bounds the wait).

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Accepts on `listener` until `cancel` fires, handing each connection to `handle`: round-robin
/// over the runtime this runs on and `workers` (each a single-threaded runtime on a thread of
/// its own), so that a connection and the endpoint connections it opens stay on one thread and
/// a request never wakes another, as with HAProxy's threads.
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    workers: Vec<Handle>,
    cancel: CancellationToken,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let tracker = TaskTracker::new();
    let mut next = 0usize;
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = crate::accept(&listener) => accepted,
        };
        if let Err(error) = crate::tcp::configure(&tcp) {
            tracing::debug!(%peer, %error, "setting socket options");
        }
        next = next.wrapping_add(1);
        match workers.get(next % (workers.len() + 1)) {
            None => {
                tracker.spawn(handle(tcp, peer));
            }
            Some(worker) => {
                // Re-registered with the worker's own reactor, so that its readiness never goes
                // through this thread.
                let std = match tcp.into_std() {
                    Ok(s) => s,
                    Err(error) => {
                        tracing::warn!(%error, %peer, "handing a connection to a worker");
                        continue;
                    }
                };
                let handle = handle.clone();
                worker.spawn(tracker.track_future(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => handle(tcp, peer).await,
                        Err(error) => tracing::warn!(%error, %peer, "registering a connection"),
                    }
                }));
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// `n - 1` single-threaded runtimes, each on a thread of its own named `<name>-<i>`, for
/// [`serve_connections`] (the calling thread's runtime is the n-th). They end with the process.
pub fn worker_runtimes(n: usize, name: &str) -> std::io::Result<Vec<Handle>> {
    (1..n.max(1))
        .map(|i| {
            let worker = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = worker.handle().clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker.block_on(std::future::pending::<()>()))?;
            Ok(handle)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use socket2::SockRef;

    use super::*;

    /// Every accepted socket is configured, on the accepting runtime and on a worker alike.
    #[tokio::test]
    async fn accepted_sockets_are_configured_on_every_thread() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = worker_runtimes(2, "test-worker").unwrap().remove(0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let serve = tokio::spawn(serve_connections(
            listener,
            vec![handle],
            cancel.clone(),
            move |tcp, _| {
                let sock = SockRef::from(&tcp);
                let configured = sock.keepalive().unwrap()
                    && sock.tcp_keepalive_time().unwrap() == crate::tcp::KEEPALIVE_IDLE
                    && tcp.nodelay().unwrap();
                let thread = std::thread::current().id();
                let tx = tx.clone();
                async move {
                    tx.send((configured, thread)).unwrap();
                }
            },
        ));
        let mut threads = std::collections::HashSet::new();
        for _ in 0..4 {
            let _c = TcpStream::connect(addr).await.unwrap();
            let (configured, thread) = rx.recv().await.unwrap();
            assert!(configured);
            threads.insert(thread);
        }
        assert_eq!(threads.len(), 2, "spread over the runtime and the worker");
        cancel.cancel();
        serve.await.unwrap();
    }
}
