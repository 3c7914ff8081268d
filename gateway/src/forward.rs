//! Forwarding an accepted connection: opaque TCP to the first endpoint that accepts, or HTTP/1
//! and HTTP/2 served and proxied request by request, balanced across endpoints. The mechanisms
//! (copying, pools, serving, error responses) are `proxy-transport`'s and `proxy-http`'s; what
//! is here is the gateway's routing: which endpoint, which headers, which loop to refuse.

use std::{convert::Infallible, sync::Arc};

use http::{HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use proxy_http::{
    Http1Conns, Http2Pool, OrigProto, PoolLimits, ProxyBody, ProxyError, ServeSettings, Version,
    forwarded_by, is_grpc, serve_connection, set_client_id, strip_hop_by_hop,
};
use proxy_identity::Id;
use proxy_transport::{Activity, Direction, tcp};
use proxy_transport_header::SessionProtocol;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Refusal,
    metrics::StatusLabels,
    server::{Inner, Target},
};

/// Connections to endpoints for HTTP/2, per endpoint and per client identity: one client's
/// stalled uploads or unread answers fill only its own connections.
pub(crate) fn clients(options: &Options) -> Http2Pool<Id> {
    Http2Pool::new(PoolLimits {
        connect_timeout: options.connect_timeout,
        ..PoolLimits::default()
    })
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
    let connect_timeout = inner.options.connect_timeout;
    let Some((stream, addr)) =
        tcp::connect_first(target.endpoints.ordered(), connect_timeout).await
    else {
        inner.metrics.refuse(Refusal::NoEndpoints);
        tracing::info!(target = %target.name, reason = Refusal::NoEndpoints.as_str(), "connection refused");
        return;
    };
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
    let addr = target
        .endpoints
        .ordered()
        .next()
        .ok_or(ProxyError::NO_ENDPOINTS)?;
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
    let connect_timeout = inner.options.connect_timeout;
    let sent = if http2 {
        inner
            .clients
            .send(addr, &target.client, sent)
            .await
            .map(|r| r.map(BodyExt::boxed))
    } else {
        http1
            .send(addr, connect_timeout, sent, orig.is_none())
            .await
            .map(|r| r.map(BodyExt::boxed))
    };
    let rsp = sent.map_err(|e| {
        tracing::info!(%addr, target = %target.name, error = %e, "endpoint request failed");
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
