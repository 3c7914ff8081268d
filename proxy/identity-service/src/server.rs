//! Serves Certify over TLS 1.3 (the service's own certificate from the issuer) and HTTP/2.
//! Bounded like every listener: at most [`MAX_CONNECTIONS`] at once, a handshake deadline, and a
//! lifetime per connection (Linkerd's clients open one connection per call).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
use proxy_identity::{Credentials, tls};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open; it is then drained gracefully.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding the identity service to {addr}: {source}")]
pub struct ServeError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds `addr`; the returned future serves until `cancel` fires, then drains.
pub async fn serve<S: Identity>(
    addr: SocketAddr,
    service: IdentityServer<S>,
    creds: Arc<Credentials>,
    cancel: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError { addr, source })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&creds, &[b"h2"]));
    Ok((local, async move {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let tracker = TaskTracker::new();
        loop {
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                p = permits.clone().acquire_owned() => p,
            };
            let Ok(permit) = permit else { break };
            let (tcp, peer) = tokio::select! {
                () = cancel.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(service.clone());
            let cancel = cancel.clone();
            tracker.spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(16)
                    .keep_alive_interval(Duration::from_secs(20))
                    .serve_connection(TokioIo::new(tls), service);
                let mut conn = std::pin::pin!(conn);
                let deadline = tokio::time::sleep(CONNECTION_LIFETIME);
                tokio::pin!(deadline);
                let mut draining = false;
                loop {
                    tokio::select! {
                        res = conn.as_mut() => {
                            if let Err(error) = res {
                                tracing::debug!(%peer, %error, "connection ended");
                            }
                            return;
                        }
                        () = cancel.cancelled(), if !draining => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        () = &mut deadline, if !draining => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            });
        }
        tracker.close();
        tracker.wait().await;
    }))
}
