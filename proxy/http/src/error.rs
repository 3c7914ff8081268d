//! The responses a proxy writes itself, as Linkerd's proxy writes them.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};

/// The body of every response a proxy returns: the endpoint's, or its own.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Why a proxy answered a request itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyError {
    pub status: StatusCode,
    /// The gRPC status for gRPC requests (answered 200 with `grpc-status`).
    pub grpc_code: u8,
    /// `l5d-proxy-error` and, for gRPC, `grpc-message`.
    pub message: &'static str,
    /// Asks the client's proxy to close the connection (`l5d-proxy-connection: close`).
    pub close: bool,
}

impl ProxyError {
    pub const LOOP: Self = Self::new(StatusCode::LOOP_DETECTED, 10, "gateway loop").closing();
    pub const NO_ENDPOINTS: Self = Self::new(StatusCode::SERVICE_UNAVAILABLE, 14, "no endpoints");
    pub const BAD_PATH: Self = Self::new(StatusCode::BAD_REQUEST, 3, "invalid request path");
    pub const CONNECT_TIMEOUT: Self =
        Self::new(StatusCode::GATEWAY_TIMEOUT, 4, "endpoint connect timed out");
    pub const ENDPOINT: Self = Self::new(StatusCode::BAD_GATEWAY, 14, "endpoint connection error");

    pub const fn new(status: StatusCode, grpc_code: u8, message: &'static str) -> Self {
        Self {
            status,
            grpc_code,
            message,
            close: false,
        }
    }

    pub const fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// The response: `l5d-proxy-error`, and for a gRPC request ([`is_grpc`]) a `grpc-status`
    /// in a 200.
    pub fn response(self, grpc: bool) -> Response<ProxyBody> {
        let empty = || {
            Full::new(Bytes::new())
                .map_err(|never: Infallible| match never {})
                .boxed()
        };
        let mut rsp = if grpc {
            let mut rsp = Response::new(empty());
            let h = rsp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(u16::from(self.grpc_code)));
            h.insert("grpc-message", HeaderValue::from_static(self.message));
            rsp
        } else {
            let mut rsp = Response::new(
                Full::new(Bytes::from_static(self.message.as_bytes()))
                    .map_err(|never: Infallible| match never {})
                    .boxed(),
            );
            *rsp.status_mut() = self.status;
            rsp
        };
        let h = rsp.headers_mut();
        h.insert("l5d-proxy-error", HeaderValue::from_static(self.message));
        if self.close {
            h.insert("l5d-proxy-connection", HeaderValue::from_static("close"));
        }
        rsp
    }
}

/// Whether a request is gRPC (its errors are gRPC statuses).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_as_linkerd_writes_them() {
        let grpc = HeaderMap::from_iter([(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        )]);
        let plain = HeaderMap::new();
        // (error, gRPC?) -> status, grpc-status, close
        let cases = [
            (ProxyError::LOOP, false, 508, None, true),
            (ProxyError::LOOP, true, 200, Some("10"), true),
            (ProxyError::NO_ENDPOINTS, false, 503, None, false),
            (ProxyError::CONNECT_TIMEOUT, true, 200, Some("4"), false),
            (ProxyError::ENDPOINT, false, 502, None, false),
        ];
        for (error, is_grpc, status, grpc_status, close) in cases {
            let rsp = error.response(super::is_grpc(if is_grpc { &grpc } else { &plain }));
            assert_eq!(rsp.status().as_u16(), status, "{error:?}");
            assert_eq!(rsp.headers()["l5d-proxy-error"], error.message);
            assert_eq!(
                rsp.headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap()),
                grpc_status
            );
            assert_eq!(rsp.headers().contains_key("l5d-proxy-connection"), close);
        }
    }
}
