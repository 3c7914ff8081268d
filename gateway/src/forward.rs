//! Forwarding an accepted connection: opaque TCP to the first endpoint that accepts, or HTTP/1
//! and HTTP/2 served and proxied request by request, balanced across endpoints. The mechanisms
//! (dialling, copying, pools, serving, error responses) are `proxy-transport`'s and
//! `proxy-http`'s; what is here is the gateway's routing: which endpoint and how it is dialled,
//! which headers, which loop to refuse.
//!
//! A meshed endpoint is dialled over mTLS as the gateway (its proxy then tells the application
//! `l5d-client-id: <the gateway>`, as it does behind a Linkerd gateway); any other in plaintext.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proxy_http::{
    Http1Conns, Http2Pool, OrigProto, PoolLimits, ProxyBody, ProxyError, ServeSettings, Version,
    forwarded_by, is_grpc, serve_connection, set_client_id, strip_hop_by_hop,
};
use proxy_identity::Id;
use proxy_transport::{
    Activity, Direction,
    dial::{DialError, Dialer, Io},
};
use proxy_transport_header::{Header, SessionProtocol};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::{
    Endpoint, Refusal,
    metrics::StatusLabels,
    server::{Inner, Target},
};

/// Connections to endpoints for HTTP/2, per endpoint and per client identity: one client's
/// stalled uploads or unread answers fill only its own connections.
pub(crate) fn clients(dialer: &Dialer) -> Http2Pool<Id> {
    Http2Pool::new(PoolLimits::default(), dialer.clone())
}

/// How an opaque connection reaches an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Opaque {
    Plain(SocketAddr),
    /// Linkerd's opaque transport: mTLS to the Pod's proxy on its inbound port, with a
    /// transport header naming the application's port. The proxy forwards the stream without
    /// detecting a protocol, whatever it knows of that port (a server-speaks-first protocol on
    /// a port it would otherwise detect on, or a port it takes as opaque and never terminates
    /// TLS on).
    Transport {
        addr: SocketAddr,
        id: Id,
        header: Header,
    },
}

/// The route of an opaque connection to `ep`. Pure.
fn opaque_route(ep: &Endpoint) -> Opaque {
    match &ep.meshed {
        None => Opaque::Plain(ep.addr),
        Some(meshed) => Opaque::Transport {
            addr: SocketAddr::new(ep.addr.ip(), meshed.inbound_port),
            id: meshed.identity.clone(),
            header: Header {
                port: ep.addr.port(),
                name: None,
                protocol: None,
            },
        },
    }
}

async fn dial_opaque(dialer: &Dialer, ep: &Endpoint) -> Result<Io, DialError> {
    match opaque_route(ep) {
        Opaque::Plain(addr) => dialer.plain(addr).await,
        Opaque::Transport { addr, id, header } => Ok(tokio_util::either::Either::Right(
            dialer.with_header(addr, &id, &header).await?,
        )),
    }
}

/// The first of `endpoints` that accepts; every failure (refused, timed out, a certificate
/// that does not prove the Pod's identity) is logged with its endpoint.
async fn dial_first<'a>(
    dialer: &Dialer,
    endpoints: impl Iterator<Item = &'a Endpoint>,
) -> Option<(Io, &'a Endpoint)> {
    for ep in endpoints {
        match dial_opaque(dialer, ep).await {
            Ok(io) => return Some((io, ep)),
            Err(error) => tracing::info!(
                addr = %ep.addr,
                identity = ?ep.meshed.as_ref().map(|m| m.identity.as_str()),
                error = %error,
                reason = error.label(),
                "endpoint not reached"
            ),
        }
    }
    None
}

pub(crate) async fn forward<IO>(
    inner: &Arc<Inner>,
    io: IO,
    target: Target,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let client = inner.metrics.tcp.tracked(io, &activity, Direction::Inbound);
    match target.header.protocol {
        None => opaque(inner, client, &target, &activity).await,
        Some(protocol) => http(inner, client, target, protocol, &activity, cancel).await,
    }
}

async fn opaque<IO>(inner: &Inner, mut client: IO, target: &Target, activity: &Arc<Activity>)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // On shutdown an opaque stream cannot be asked to finish: it runs until it ends or the
    // process's drain deadline.
    let Some((stream, ep)) = dial_first(&inner.dialer, target.endpoints.ordered()).await else {
        inner.metrics.refuse(Refusal::NoEndpoints);
        tracing::info!(target = %target.name, reason = Refusal::NoEndpoints.as_str(), "connection refused");
        return;
    };
    let addr = ep.addr;
    tracing::debug!(%addr, mtls = ep.meshed.is_some(), "opaque connection to an endpoint");
    let _open = inner.metrics.tcp.open(Direction::Outbound);
    let mut server = inner
        .metrics
        .tcp
        .tracked(stream, activity, Direction::Outbound);
    let idle = inner.options.idle_timeout;
    match proxy_transport::forward(&mut client, &mut server, activity, idle).await {
        Ok(Some(moved)) => {
            tracing::debug!(%addr, up = moved.a_to_b, down = moved.b_to_a, "opaque connection closed")
        }
        Ok(None) => tracing::info!(%addr, ?idle, "idle connection closed"),
        Err(error) => tracing::debug!(%addr, %error, "opaque connection failed"),
    }
}

async fn http<IO>(
    inner: &Arc<Inner>,
    client: IO,
    target: Target,
    protocol: SessionProtocol,
    activity: &Activity,
    cancel: &CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let target = Arc::new(target);
    let http1 = Arc::new(Http1Conns::default());
    let service = {
        let inner = inner.clone();
        hyper::service::service_fn(move |req| {
            let (inner, target, http1) = (inner.clone(), target.clone(), http1.clone());
            async move { Ok::<_, Infallible>(proxy(&inner, &target, &http1, req).await) }
        })
    };
    let version = match protocol {
        SessionProtocol::Http1 => Version::Http1,
        SessionProtocol::Http2 => Version::Http2,
    };
    let settings = ServeSettings {
        header_timeout: inner.options.header_timeout,
        idle_timeout: inner.options.idle_timeout,
        max_streams: 1000,
    };
    serve_connection(client, version, service, settings, activity, cancel).await;
}

async fn proxy(
    inner: &Inner,
    target: &Target,
    http1: &Http1Conns,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let grpc = is_grpc(req.headers());
    let rsp = route(inner, target, http1, req)
        .await
        .unwrap_or_else(|e| e.response(grpc));
    inner
        .metrics
        .http_responses
        .get_or_create(&StatusLabels {
            http_status: rsp.status().as_u16(),
        })
        .inc();
    rsp
}

/// The gateway's part of a request: loop refusal, `Forwarded` and `l5d-client-id` from the
/// verified identity, an endpoint round-robin, the URI each HTTP version needs.
async fn route(
    inner: &Inner,
    target: &Target,
    http1: &Http1Conns,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let own = inner.creds.id().as_str();
    if target.client.as_str() == own || forwarded_by(req.headers(), own) {
        tracing::info!(client = %target.client, target = %target.name, "gateway loop refused");
        return Err(ProxyError::LOOP);
    }
    // An HTTP/1 request a Linkerd proxy carried as HTTP/2 goes to the backend as HTTP/1.
    let orig = OrigProto::downgrade(&mut req);
    let authority = format!("{}:{}", target.name, target.header.port);
    let forwarded = format!(
        "by={own};for={};host={authority};proto=https",
        target.client
    );
    strip_hop_by_hop(req.headers_mut());
    // The backend learns who called from the certificate, never from the client's own claim.
    set_client_id(req.headers_mut(), target.client.as_str());
    if let Ok(v) = HeaderValue::try_from(forwarded) {
        req.headers_mut().append(header::FORWARDED, v);
    }
    let http2 = req.version() == http::Version::HTTP_2;
    if !http2 && let Ok(v) = HeaderValue::try_from(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    // One endpoint per request, round-robin. A failed request is not replayed elsewhere: its
    // body may already have been sent.
    let peer = target
        .endpoints
        .ordered()
        .next()
        .ok_or(ProxyError::NO_ENDPOINTS)?
        .peer();
    let addr = peer.addr;
    // HTTP/2 needs the absolute form (it becomes :scheme and :authority); HTTP/1 sends the path.
    let uri = if http2 {
        http::Uri::try_from(format!("http://{addr}{path}"))
    } else if orig.is_some_and(|o| o.absolute_form) {
        http::Uri::try_from(format!("http://{authority}{path}"))
    } else {
        http::Uri::try_from(path)
    };
    *req.uri_mut() = uri.map_err(|_| ProxyError::BAD_PATH)?;
    let sent = req;
    let sent = if http2 {
        inner
            .clients
            .send(&peer, &target.client, sent)
            .await
            .map(|r| r.map(BodyExt::boxed))
    } else {
        http1
            .send(&inner.dialer, &peer, sent, orig.is_none())
            .await
            .map(|r| r.map(BodyExt::boxed))
    };
    let rsp = sent.map_err(|e| {
        tracing::info!(
            %addr,
            identity = ?peer.identity.as_ref().map(Id::as_str),
            target = %target.name,
            error = %e,
            "endpoint request failed"
        );
        if e.is_timeout() {
            ProxyError::CONNECT_TIMEOUT
        } else {
            ProxyError::ENDPOINT
        }
    })?;
    let (mut parts, body) = rsp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let mut rsp = Response::from_parts(parts, body);
    if orig.is_some() {
        OrigProto::upgrade_response(&mut rsp);
    }
    Ok(rsp)
}

#[cfg(test)]
mod tests {
    use proxy_transport::dial::Peer;

    use super::*;
    use crate::Meshed;

    #[test]
    fn meshed_endpoints_are_dialled_as_their_identity() {
        let id = Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let addr: SocketAddr = "10.1.0.7:8080".parse().unwrap();
        let meshed = Endpoint {
            addr,
            meshed: Some(Meshed {
                identity: id.clone(),
                inbound_port: 4143,
            }),
        };
        let plain = Endpoint { addr, meshed: None };
        for (ep, http, opaque) in [
            (
                &meshed,
                Peer {
                    addr,
                    identity: Some(id.clone()),
                },
                // Opaque: the proxy's inbound port, the header naming the application's.
                Opaque::Transport {
                    addr: "10.1.0.7:4143".parse().unwrap(),
                    id: id.clone(),
                    header: Header {
                        port: 8080,
                        name: None,
                        protocol: None,
                    },
                },
            ),
            (
                &plain,
                Peer {
                    addr,
                    identity: None,
                },
                Opaque::Plain(addr),
            ),
        ] {
            assert_eq!(ep.peer(), http, "{ep:?}");
            assert_eq!(opaque_route(ep), opaque, "{ep:?}");
        }
    }
}
