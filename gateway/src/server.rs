//! The accept loop and the checks every connection passes before it is forwarded.

use std::{net::SocketAddr, sync::Arc};

use proxy_identity::{Credentials, Id, tls};
use proxy_transport::Pending;
use proxy_transport_header::{self as header, Header, Prefixed};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::{LazyConfigAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    Authorization, Discovery, Endpoints, Export, Metrics, Options, Refusal, Unresolved,
    discover::split_target,
    forward,
    metrics::{DirectionLabels, HeaderLabels},
};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
#[error("binding the gateway to {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// A gateway, ready to bind.
#[derive(Debug)]
pub struct Gateway {
    inner: Arc<Inner>,
    workers: Vec<tokio::runtime::Handle>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub options: Options,
    pub creds: Arc<Credentials>,
    pub tls: Arc<ServerConfig>,
    pub discovery: Discovery,
    pub metrics: Metrics,
    pub authz: Authorization,
    pub export: Export,
    pub clients: forward::Clients,
}

/// What a connection that passed every check is for.
#[derive(Debug)]
pub(crate) struct Target {
    pub header: Header,
    pub name: String,
    pub endpoints: Endpoints,
    pub client: Id,
}

impl Gateway {
    pub fn new(
        options: Options,
        creds: Arc<Credentials>,
        discovery: Discovery,
        metrics: Metrics,
    ) -> Self {
        let tls = tls::server_config(&creds, &[header::PROTOCOL]);
        let authz = options.authorization();
        let export = options.export();
        let clients = forward::Clients::new(options.connect_timeout);
        Self {
            inner: Arc::new(Inner {
                options,
                creds,
                tls,
                discovery,
                metrics,
                authz,
                export,
                clients,
            }),
            workers: Vec::new(),
        }
    }

    /// Spreads connections round-robin over the runtime this runs on and `workers` (each a
    /// single-threaded runtime on a thread of its own). A connection and the endpoint
    /// connections it opens stay on one thread, so a request never wakes another thread, as
    /// with HAProxy's threads.
    pub fn workers(mut self, workers: Vec<tokio::runtime::Handle>) -> Self {
        self.workers = workers;
        self
    }

    /// Binds the gateway's address; the future accepts until `cancel` fires, then waits for
    /// open connections (HTTP ones are asked to finish; the caller bounds the wait).
    pub async fn bind(
        self,
        cancel: CancellationToken,
    ) -> Result<(SocketAddr, impl Future<Output = ()>), BindError> {
        let addr = self.inner.options.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| BindError { addr, source })?;
        Ok((local, self.serve(listener, cancel)))
    }

    async fn serve(self, listener: TcpListener, cancel: CancellationToken) {
        let inner = self.inner;
        let workers = self.workers;
        let mut next = 0usize;
        let tracker = TaskTracker::new();
        let pending = Arc::new(Pending::new(inner.options.max_handshakes));
        let established = Arc::new(Semaphore::new(inner.options.max_connections));
        let listener_addr = listener.local_addr().unwrap_or(inner.options.addr);
        loop {
            let (tcp, peer) = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = proxy_transport::accept(&listener) => accepted,
            };
            let _ = tcp.set_nodelay(true);
            // Where the client reached us (the listener may be bound to 0.0.0.0): an endpoint
            // at this address is the gateway itself.
            let local = tcp.local_addr().unwrap_or(listener_addr);
            let conn = Connection {
                inner: inner.clone(),
                peer,
                local,
                cancel: cancel.clone(),
            };
            let (pending, established) = (pending.clone(), established.clone());
            next = next.wrapping_add(1);
            match workers.get(next % (workers.len() + 1)) {
                None => {
                    tracker.spawn(conn.run(tcp, pending, established));
                }
                Some(worker) => {
                    // Re-registered with the worker's own reactor, so that its readiness never
                    // goes through this thread.
                    let std = match tcp.into_std() {
                        Ok(s) => s,
                        Err(error) => {
                            tracing::warn!(%error, %peer, "handing a connection to a worker");
                            continue;
                        }
                    };
                    worker.spawn(tracker.track_future(async move {
                        match TcpStream::from_std(std) {
                            Ok(tcp) => conn.run(tcp, pending, established).await,
                            Err(error) => tracing::warn!(%error, "registering a connection"),
                        }
                    }));
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }
}

struct Connection {
    inner: Arc<Inner>,
    peer: SocketAddr,
    local: SocketAddr,
    cancel: CancellationToken,
}

impl Connection {
    #[tracing::instrument(name = "conn", skip_all, fields(peer = %self.peer))]
    async fn run(self, tcp: TcpStream, pending: Arc<Pending>, established: Arc<Semaphore>) {
        let inbound = DirectionLabels {
            direction: "inbound",
        };
        let m = &self.inner.metrics;
        m.open_total.get_or_create(&inbound).inc();
        m.open_connections.get_or_create(&inbound).inc();
        let result = self.accept(tcp, &pending, &established).await;
        match result {
            // Boxed: a task is allocated at its future's full size from the start, and the
            // forwarding state (HTTP server, copy) is most of it, so connections still in their
            // handshake (the ones a flood holds) stay small.
            Ok((io, target, _permit)) => {
                Box::pin(forward::forward(&self.inner, io, target, &self.cancel)).await;
            }
            Err(Some(refusal)) => {
                tracing::info!(reason = refusal.as_str(), "connection refused");
                m.refuse(refusal);
            }
            // Shutting down.
            Err(None) => {}
        }
        m.open_connections.get_or_create(&inbound).dec();
    }

    async fn accept(
        &self,
        tcp: TcpStream,
        pending: &Pending,
        established: &Arc<Semaphore>,
    ) -> Result<(Prefixed<TlsStream<TcpStream>>, Target, OwnedSemaphorePermit), Option<Refusal>>
    {
        let opts = &self.inner.options;
        let slot = pending.enter();
        let handshake = tokio::select! {
            r = tokio::time::timeout(opts.handshake_timeout, self.handshake(tcp)) => {
                r.unwrap_or(Err(Refusal::HandshakeTimeout))
            }
            () = slot.evicted.cancelled() => Err(Refusal::Overloaded),
            () = self.cancel.cancelled() => return Err(None),
        };
        drop(slot);
        let (mut tls, client) = handshake?;
        let permit = established
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Overloaded)?;
        if !self.inner.authz.allows(&client) {
            tracing::info!(client = %client, "identity not authorized");
            return Err(Some(Refusal::Unauthorized));
        }
        let read = tokio::select! {
            r = tokio::time::timeout(opts.header_timeout, header::read(&mut tls)) => r,
            () = self.cancel.cancelled() => return Err(None),
        };
        let (header, rest) = match read {
            Err(_) => return Err(Some(Refusal::HeaderTimeout)),
            Ok(Err(error)) => {
                tracing::info!(client = %client, %error, "bad transport header");
                return Err(Some(Refusal::BadHeader));
            }
            Ok(Ok(h)) => h,
        };
        let target = self.target(header, client)?;
        Ok((Prefixed::new(rest, tls), target, permit))
    }

    /// TLS with the checks Linkerd's direct stack makes, each with its own reason.
    async fn handshake(&self, tcp: TcpStream) -> Result<(TlsStream<TcpStream>, Id), Refusal> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|_| Refusal::NotTls)?;
        let hello = start.client_hello();
        let own = self.inner.creds.id();
        match hello.server_name() {
            None => return Err(Refusal::NoSni),
            Some(sni) if tls::server_name(own).is_none_or(|n| n.to_str() != sni) => {
                tracing::info!(sni, "SNI is not this gateway's identity");
                return Err(Refusal::WrongSni);
            }
            Some(_) => {}
        }
        if !hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == header::PROTOCOL))
        {
            return Err(Refusal::NoAlpn);
        }
        let stream = start
            .into_stream(self.inner.tls.clone())
            .await
            .map_err(|e| {
                let reason = e
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<rustls::Error>())
                    .and_then(tls::certificate_reason);
                match reason {
                    Some("expired_cert") => Refusal::ExpiredCert,
                    Some("foreign_anchor") => Refusal::ForeignAnchor,
                    Some("no_client_cert") => Refusal::NoClientCert,
                    Some(_) => Refusal::BadCert,
                    None => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        Refusal::TlsError
                    }
                }
            })?;
        let conn = stream.get_ref().1;
        if conn.peer_certificates().is_none_or(<[_]>::is_empty) {
            return Err(Refusal::NoClientCert);
        }
        let id = tls::client_id(conn).ok_or(Refusal::BadCert)?;
        Ok((stream, id))
    }

    fn target(&self, header: Header, client: Id) -> Result<Target, Option<Refusal>> {
        let Some(name) = header.name.clone() else {
            tracing::info!(client = %client, port = header.port, "transport header names no target");
            return Err(Some(Refusal::UnknownTarget));
        };
        let (svc, ns) = match split_target(&name, &self.inner.options.suffixes) {
            None => {
                tracing::info!(client = %client, target = %name, "target outside the gateway's suffixes");
                return Err(Some(Refusal::OutsideSuffix));
            }
            Some(Err(())) => {
                tracing::info!(client = %client, target = %name, "target is not <service>.<namespace>.<suffix>");
                return Err(Some(Refusal::UnknownTarget));
            }
            Some(Ok(split)) => split,
        };
        let endpoints = self
            .inner
            .discovery
            .resolve(&self.inner.export, ns, svc, header.port)
            .map_err(|e| {
                tracing::info!(client = %client, target = %name, port = header.port, error = %e, "target not found");
                Some(match e {
                    Unresolved::NoEndpoints { .. } => Refusal::NoEndpoints,
                    Unresolved::NotExported { .. } => Refusal::NotExported,
                    Unresolved::NoService { .. } | Unresolved::NoPort { .. } => {
                        Refusal::UnknownTarget
                    }
                })
            })?;
        if let Some(reason) = loop_reason(
            header.protocol.is_none(),
            &client,
            self.inner.creds.id(),
            &endpoints.addrs,
            self.local,
        ) {
            tracing::info!(client = %client, target = %name, reason, "gateway loop refused");
            return Err(Some(Refusal::Loop));
        }
        self.inner
            .metrics
            .header_connections
            .get_or_create(&HeaderLabels {
                session_protocol: header.protocol.map_or("", |p| p.as_str()),
                target_port: header.port,
                target_name: name.clone(),
                client_id: client.to_string(),
            })
            .inc();
        tracing::debug!(client = %client, target = %name, port = header.port, protocol = ?header.protocol, "forwarding");
        Ok(Target {
            header,
            name,
            endpoints,
            client,
        })
    }
}

/// Why a connection that would come back into this gateway is refused, if it would: an opaque
/// one from the gateway's own identity (HTTP ones get a 508 per request instead, as Linkerd's
/// gateway answers), or any whose target has an endpoint at the address the client reached.
fn loop_reason(
    opaque: bool,
    client: &Id,
    own: &Id,
    endpoints: &[SocketAddr],
    local: SocketAddr,
) -> Option<&'static str> {
    if opaque && client == own {
        return Some("client is this gateway");
    }
    let local = (local.ip().to_canonical(), local.port());
    endpoints
        .iter()
        .any(|e| (e.ip().to_canonical(), e.port()) == local)
        .then_some("target is this gateway")
}
