//! The accept loop and the checks every connection passes before it is forwarded.

use std::{net::SocketAddr, sync::Arc};

use proxy_identity::{Credentials, Id, tls};
use proxy_transport::{Pending, Share, direct};
use proxy_transport_header::{self as header, Header, Prefixed};
use rustls::ServerConfig;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

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

/// The bounds every connection is admitted under.
#[derive(Debug)]
struct Admission {
    /// Connections still in their handshake; a newcomer evicts the oldest.
    pending: Pending,
    /// Forwarded connections.
    established: Arc<Semaphore>,
    /// Forwarded connections per client identity.
    identities: Arc<Share<Id>>,
}

/// A forwarded connection's places; dropping them frees them.
type Admitted = (OwnedSemaphorePermit, proxy_transport::Held<Id>);

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
        let clients = forward::Clients::new(&options);
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
    /// single-threaded runtime on a thread of its own).
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
        let opts = &self.inner.options;
        let admission = Arc::new(Admission {
            pending: Pending::new(opts.max_handshakes),
            established: Arc::new(Semaphore::new(opts.max_connections)),
            identities: Arc::new(Share::new(opts.identity_share())),
        });
        let inner = self.inner;
        let serve = proxy_transport::serve_connections(
            listener,
            self.workers,
            cancel.clone(),
            move |tcp: TcpStream, peer| {
                // Where the client reached us (the listener may be bound to 0.0.0.0): an
                // endpoint at this address is the gateway itself.
                let local = tcp.local_addr().unwrap_or(local);
                let conn = Connection {
                    inner: inner.clone(),
                    peer,
                    local,
                    cancel: cancel.clone(),
                };
                conn.run(tcp, admission.clone())
            },
        );
        Ok((local, serve))
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
    async fn run(self, tcp: TcpStream, admission: Arc<Admission>) {
        let inbound = DirectionLabels {
            direction: "inbound",
        };
        let m = &self.inner.metrics;
        m.open_total.get_or_create(&inbound).inc();
        m.open_connections.get_or_create(&inbound).inc();
        match self.accept(tcp, &admission).await {
            // Boxed: a task is allocated at its future's full size from the start, and the
            // forwarding state (HTTP server, copy) is most of it, so connections still in their
            // handshake (the ones a flood holds) stay small.
            Ok((io, target, _admitted)) => {
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
        admission: &Admission,
    ) -> Result<(Prefixed<TlsStream<TcpStream>>, Target, Admitted), Option<Refusal>> {
        let opts = &self.inner.options;
        let slot = admission.pending.enter();
        let own = self.inner.creds.id();
        let handshake = tokio::select! {
            r = direct::handshake(tcp, own, self.inner.tls.clone(), opts.handshake_timeout) => r,
            () = slot.evicted.cancelled() => return Err(Some(Refusal::Overloaded)),
            () = self.cancel.cancelled() => return Err(None),
        };
        drop(slot);
        let (tls, client) = handshake.map_err(|r| Some(Refusal::Direct(r)))?;
        let permit = admission
            .established
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Overloaded)?;
        if !self.inner.authz.allows(&client) {
            tracing::info!(client = %client, "identity not authorized");
            return Err(Some(Refusal::Unauthorized));
        }
        let Some(share) = admission.identities.enter(client.clone()) else {
            tracing::info!(client = %client, share = admission.identities.share(), "identity holds its share of connections");
            return Err(Some(Refusal::IdentityShare));
        };
        let read = tokio::select! {
            r = direct::read_header(tls, &client, opts.header_timeout) => r,
            () = self.cancel.cancelled() => return Err(None),
        };
        let (header, io) = read.map_err(|r| Some(Refusal::Direct(r)))?;
        let target = self.target(header, client)?;
        Ok((io, target, (permit, share)))
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
