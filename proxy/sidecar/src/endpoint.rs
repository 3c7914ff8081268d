//! Connections to one endpoint, as discovery describes it (linkerd2-proxy
//! `outbound/src/{http,opaq}/concrete.rs`): an identity means mTLS with SNI = that identity and
//! a check of the server's certificate; an `authority_override` means the remote gateway's dial
//! with a transport header naming the Service; an opaque-transport port means the peer proxy's
//! inbound port with a header naming the application's port; no identity means plaintext.

use std::{
    error::Error as StdError,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::TokioIo,
};
use proxy_discovery::{Endpoint, Hint};
use proxy_identity::Id;
use proxy_transport::tcp::ConnectError;
use proxy_transport_header::{Header, SessionProtocol};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::either::Either;

use crate::metrics::Tls;

pub use proxy_transport::dial::{DialError, Dialer, Io};

/// Whether an error (or one of its sources) is a connect timeout: a 504, not a 502.
pub fn is_connect_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut e = Some(error);
    while let Some(err) = e {
        // `DialError` wraps it transparently, so its `source()` skips it: look at both.
        if let Some(ConnectError::Timeout(_)) = err.downcast_ref::<ConnectError>() {
            return true;
        }
        if err
            .downcast_ref::<DialError>()
            .is_some_and(DialError::is_timeout)
        {
            return true;
        }
        // An io::Error's `source()` is its inner error's source, not the inner error.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && is_connect_timeout(inner)
        {
            return true;
        }
        e = err.source();
    }
    false
}

/// How an endpoint is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Plain,
    Mesh(Id),
    /// The transport header, to `addr` (a gateway, or a peer proxy's inbound port).
    Header {
        addr: SocketAddr,
        id: Id,
        header: Header,
    },
}

/// The route to `ep` for traffic of `protocol` (`None`: opaque). Pure.
fn route(ep: &Endpoint, protocol: Option<SessionProtocol>) -> Route {
    let Some(id) = ep.identity.clone() else {
        return Route::Plain;
    };
    if let Some((name, port)) = &ep.authority_override {
        return Route::Header {
            addr: ep.addr,
            id,
            header: Header {
                port: *port,
                name: Some(name.clone()),
                protocol,
            },
        };
    }
    match ep.opaque_transport_port {
        // Opaque traffic to a meshed pod goes to its proxy's inbound port, so that the peer
        // needs no detection; HTTP goes to the application's port as usual.
        Some(inbound) if protocol.is_none() || ep.hint == Hint::Opaque => Route::Header {
            addr: SocketAddr::new(ep.addr.ip(), inbound),
            id,
            header: Header {
                port: ep.addr.port(),
                name: None,
                protocol,
            },
        },
        _ => Route::Mesh(id),
    }
}

/// A target outside the mesh, reached at its original address in plaintext.
pub fn plain_endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint {
        addr,
        weight: 1,
        identity: None,
        server_name: None,
        hint: Hint::Unknown,
        opaque_transport_port: None,
        authority_override: None,
        labels: Default::default(),
    }
}

/// Marks a request whose client sent an absolute URI (for `l5d-orig-proto`).
#[derive(Clone, Copy, Debug)]
pub struct AbsoluteForm;

/// The TLS label of connections to `ep`.
pub fn tls_of(ep: &Endpoint) -> Tls {
    match &ep.identity {
        Some(id) => Tls::Established(Some(id.clone())),
        None => Tls::None("not_provided_by_service_discovery"),
    }
}

/// A connection to `ep` for traffic of `protocol` (`None`: opaque).
pub async fn dial(
    dialer: &Dialer,
    ep: &Endpoint,
    protocol: Option<SessionProtocol>,
) -> Result<Io, DialError> {
    match route(ep, protocol) {
        Route::Plain => dialer.plain(ep.addr).await,
        Route::Mesh(id) => Ok(Either::Right(dialer.mesh(ep.addr, &id).await?)),
        Route::Header { addr, id, header } => {
            Ok(Either::Right(dialer.with_header(addr, &id, &header).await?))
        }
    }
}

/// An endpoint connection as hyper's client wants it.
#[derive(Debug)]
pub struct Conn(Io);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// hyper's connector for one endpoint: every connection goes to it, whatever the URI.
#[derive(Clone, Debug)]
struct Connector {
    dialer: Dialer,
    ep: Arc<Endpoint>,
    protocol: SessionProtocol,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = DialError;
    type Future = BoxFuture<Result<Self::Response, DialError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let io = dial(&this.dialer, &this.ep, Some(this.protocol)).await?;
            Ok(TokioIo::new(Conn(io)))
        })
    }
}

/// HTTP to one endpoint: HTTP/2 (one multiplexed connection) when it has an `H2` hint, HTTP/1
/// requests upgraded to it; otherwise a pool of HTTP/1 connections.
#[derive(Clone, Debug)]
pub struct HttpEndpoint {
    client: Client<Connector, Incoming>,
    /// HTTP/1.1 to the endpoint whatever its hint: what carries an `Upgrade` request.
    http1: Client<Connector, Incoming>,
    pub ep: Arc<Endpoint>,
    upgrade: bool,
}

impl HttpEndpoint {
    pub fn new(dialer: &Dialer, ep: Arc<Endpoint>) -> Self {
        // A meshed peer speaks HTTP/2 whatever the client spoke (Linkerd's orig-proto).
        let h2 = ep.hint == Hint::H2 && ep.identity.is_some();
        let connector = Connector {
            dialer: dialer.clone(),
            ep: ep.clone(),
            protocol: if h2 {
                SessionProtocol::Http2
            } else {
                SessionProtocol::Http1
            },
        };
        let http1 = Connector {
            protocol: SessionProtocol::Http1,
            ..connector.clone()
        };
        Self {
            client: proxy_http::pooled_client(connector, h2),
            http1: proxy_http::pooled_client(http1, false),
            upgrade: h2,
            ep,
        }
    }
}

/// Why a request got no response from an endpoint.
pub type HttpError = hyper_util::client::legacy::Error;

impl tower::Service<Request<Incoming>> for HttpEndpoint {
    type Response = Response<Incoming>;
    type Error = HttpError;
    type Future = BoxFuture<Result<Response<Incoming>, HttpError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HttpError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        if proxy_http::upgrade::is_upgrade(&req) {
            // An upgrade cannot cross HTTP/2: HTTP/1.1 to the peer, the response as it comes.
            return Box::pin(self.http1.request(req));
        }
        let absolute = req.extensions().get::<AbsoluteForm>().is_some();
        let upgraded = self.upgrade && proxy_http::OrigProto::upgrade(&mut req, absolute);
        let fut = self.client.request(req);
        Box::pin(async move {
            let mut rsp = fut.await?;
            if upgraded {
                proxy_http::OrigProto::downgrade_response(&mut rsp);
            }
            Ok(rsp)
        })
    }
}

/// Opaque connections to one endpoint (balanced per connection).
#[derive(Clone, Debug)]
pub struct TcpEndpoint {
    dialer: Dialer,
    pub ep: Arc<Endpoint>,
}

impl TcpEndpoint {
    pub fn new(dialer: &Dialer, ep: Arc<Endpoint>) -> Self {
        Self {
            dialer: dialer.clone(),
            ep,
        }
    }
}

impl tower::Service<()> for TcpEndpoint {
    type Response = (Io, Arc<Endpoint>);
    type Error = DialError;
    type Future = BoxFuture<Result<Self::Response, DialError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let io = dial(&this.dialer, &this.ep, None).await?;
            Ok((io, this.ep))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ep(identity: bool, hint: Hint, opaque: Option<u16>, over: Option<(&str, u16)>) -> Endpoint {
        Endpoint {
            addr: "10.1.0.7:8080".parse().unwrap(),
            weight: 1,
            identity: identity.then(|| {
                Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap()
            }),
            server_name: None,
            hint,
            opaque_transport_port: opaque,
            authority_override: over.map(|(n, p)| (n.to_owned(), p)),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn routes_as_discovery_says() {
        let id = Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let http = Some(SessionProtocol::Http2);
        let cases = [
            (ep(false, Hint::H2, None, None), http, Route::Plain),
            (
                ep(true, Hint::H2, None, None),
                http,
                Route::Mesh(id.clone()),
            ),
            // HTTP to a pod with opaque transport still goes to the application's port.
            (
                ep(true, Hint::H2, Some(4143), None),
                http,
                Route::Mesh(id.clone()),
            ),
            (
                ep(true, Hint::Unknown, Some(4143), None),
                None,
                Route::Header {
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
                ep(
                    true,
                    Hint::H2,
                    None,
                    Some(("web.shop.svc.cluster.local", 80)),
                ),
                http,
                Route::Header {
                    addr: "10.1.0.7:8080".parse().unwrap(),
                    id: id.clone(),
                    header: Header {
                        port: 80,
                        name: Some("web.shop.svc.cluster.local".into()),
                        protocol: http,
                    },
                },
            ),
            // No identity: plaintext even with an override (nothing to authenticate the peer).
            (
                ep(
                    false,
                    Hint::H2,
                    None,
                    Some(("web.shop.svc.cluster.local", 80)),
                ),
                http,
                Route::Plain,
            ),
        ];
        for (ep, protocol, expected) in cases {
            assert_eq!(route(&ep, protocol), expected, "{ep:?} {protocol:?}");
        }
    }
}
