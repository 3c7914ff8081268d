//! The accept loop and the checks every connection passes before it is forwarded.

use std::{net::SocketAddr, sync::Arc};

use proxy_identity::{Credentials, Id, tls};
use proxy_transport::{
    Direction,
    dial::Dialer,
    direct::{self, Admission},
};
use proxy_transport_header::{self as header, Header};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::{
    Authorization, Discovery, Endpoint, Endpoints, Export, Metrics, Options, Refusal, Unresolved,
    discover::split_target, forward, metrics::HeaderLabels,
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
    pub discovery: Discovery,
    pub metrics: Metrics,
    pub authz: Authorization,
    pub export: Export,
    /// Dials endpoints as this gateway: mTLS with its certificate to meshed ones.
    pub dialer: Dialer,
    pub clients: proxy_http::Http2Pool<Id>,
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
        let authz = options.authorization();
        let export = options.export();
        let dialer = Dialer::new(&creds, options.connect_timeout);
        let clients = forward::clients(&dialer);
        Self {
            inner: Arc::new(Inner {
                options,
                creds,
                discovery,
                metrics,
                authz,
                export,
                dialer,
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
        let creds = &self.inner.creds;
        let admission = Arc::new(Admission::new(
            creds.id().clone(),
            tls::server_config(creds, &[header::PROTOCOL]),
            direct::Limits {
                handshake_timeout: opts.handshake_timeout,
                header_timeout: opts.header_timeout,
                max_handshakes: opts.max_handshakes,
                max_connections: opts.max_connections,
                per_identity: opts.identity_share(),
            },
        ));
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
        let inner = &self.inner;
        let _open = inner.metrics.tcp.open(Direction::Inbound);
        let admitted = admission.admit(tcp, |id| inner.authz.allows(id), &self.cancel);
        let refusal = match admitted.await {
            Ok(Some(admitted)) => match self.target(admitted.header, admitted.client) {
                // Boxed: a task is allocated at its future's full size from the start, and the
                // forwarding state (HTTP server, copy) is most of it, so connections still in
                // their handshake (the ones a flood holds) stay small.
                Ok(target) => {
                    let forwarding = forward::forward(inner, admitted.io, target, &self.cancel);
                    return Box::pin(forwarding).await;
                }
                Err(refusal) => refusal,
            },
            Err(refused) => Refusal::Direct(refused),
            // Shutting down.
            Ok(None) => return,
        };
        tracing::info!(reason = refusal.as_str(), "connection refused");
        inner.metrics.refuse(refusal);
    }

    fn target(&self, header: Header, client: Id) -> Result<Target, Refusal> {
        let Some(name) = header.name.clone() else {
            tracing::info!(client = %client, port = header.port, "transport header names no target");
            return Err(Refusal::UnknownTarget);
        };
        let (svc, ns) = match split_target(&name, &self.inner.options.suffixes) {
            None => {
                tracing::info!(client = %client, target = %name, "target outside the gateway's suffixes");
                return Err(Refusal::OutsideSuffix);
            }
            Some(Err(())) => {
                tracing::info!(client = %client, target = %name, "target is not <service>.<namespace>.<suffix>");
                return Err(Refusal::UnknownTarget);
            }
            Some(Ok(split)) => split,
        };
        let endpoints = self
            .inner
            .discovery
            .resolve(&self.inner.export, ns, svc, header.port)
            .map_err(|e| {
                tracing::info!(client = %client, target = %name, port = header.port, error = %e, "target not found");
                match e {
                    Unresolved::NoEndpoints { .. } => Refusal::NoEndpoints,
                    Unresolved::NotExported { .. } => Refusal::NotExported,
                    Unresolved::NoService { .. } | Unresolved::NoPort { .. } => {
                        Refusal::UnknownTarget
                    }
                }
            })?;
        if let Some(reason) = loop_reason(
            header.protocol.is_none(),
            &client,
            self.inner.creds.id(),
            &endpoints.all,
            self.local,
        ) {
            tracing::info!(client = %client, target = %name, reason, "gateway loop refused");
            return Err(Refusal::Loop);
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
    endpoints: &[Endpoint],
    local: SocketAddr,
) -> Option<&'static str> {
    if opaque && client == own {
        return Some("client is this gateway");
    }
    let local = (local.ip().to_canonical(), local.port());
    endpoints
        .iter()
        .any(|e| (e.addr.ip().to_canonical(), e.addr.port()) == local)
        .then_some("target is this gateway")
}
