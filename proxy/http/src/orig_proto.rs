//! Linkerd's HTTP/1-over-HTTP/2 upgrade, undone.
//!
//! A Linkerd proxy whose endpoint has an `H2` hint (every meshed Pod, and every gateway mirror)
//! carries its application's HTTP/1 requests as HTTP/2, with the original version in
//! `l5d-orig-proto` (`HTTP/1.1`, `HTTP/1.0`, with `; absolute-form` when the request target
//! was absolute). The receiving proxy's inbound side sends each such request to the application
//! in that version, without the header, and marks the response with the version the application
//! answered in, so that the caller's proxy can restore it (linkerd2-proxy
//! `linkerd/proxy/http/src/orig_proto.rs`, `Downgrade`).

use http::{HeaderValue, Request, Response, Version, header};

/// The header that carries an upgraded request's original version.
pub const L5D_ORIG_PROTO: &str = "l5d-orig-proto";

/// What an upgraded request was before the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigProto {
    pub version: Version,
    /// The request target was in absolute form (`GET http://host/path`).
    pub absolute_form: bool,
}

impl OrigProto {
    /// Reads a header value; `None` for a version other than HTTP/1.0 or HTTP/1.1.
    pub fn parse(value: &[u8]) -> Option<Self> {
        let version = if value.starts_with(b"HTTP/1.1") {
            Version::HTTP_11
        } else if value.starts_with(b"HTTP/1.0") {
            Version::HTTP_10
        } else {
            return None;
        };
        let absolute_form = value
            .get(8..)
            .and_then(|rest| std::str::from_utf8(rest).ok())
            .is_some_and(|rest| {
                rest.split(';')
                    .any(|p| p.trim().eq_ignore_ascii_case("absolute-form"))
            });
        Some(Self {
            version,
            absolute_form,
        })
    }

    /// Undoes the upgrade of an HTTP/2 request that carries `l5d-orig-proto`: the header is
    /// removed and the request takes its original version. `None` (the request untouched but for
    /// the header) when it was not upgraded or names a version this cannot restore; a request
    /// that is not HTTP/2 keeps its header, as Linkerd's proxy does.
    pub fn downgrade<B>(req: &mut Request<B>) -> Option<Self> {
        if req.version() != Version::HTTP_2 {
            return None;
        }
        let value = req.headers_mut().remove(L5D_ORIG_PROTO)?;
        let Some(orig) = Self::parse(value.as_bytes()) else {
            tracing::info!(value = ?value, "unknown l5d-orig-proto; the request stays HTTP/2");
            return None;
        };
        *req.version_mut() = orig.version;
        // `te` other than trailers and `connection` cannot be in an HTTP/2 request, so nothing
        // else needs undoing; the caller sets `Host` from the authority it routes by.
        Some(orig)
    }

    /// The calling side's upgrade: an HTTP/1 request to a meshed peer travels as HTTP/2 with
    /// its version in `l5d-orig-proto` (`; absolute-form` when the client sent an absolute URI,
    /// `absolute_form`). Its URI must already carry the authority. `false` for a request that
    /// is not HTTP/1 (nothing to do).
    pub fn upgrade<B>(req: &mut Request<B>, absolute_form: bool) -> bool {
        let orig = match req.version() {
            Version::HTTP_11 => "HTTP/1.1",
            Version::HTTP_10 => "HTTP/1.0",
            _ => return false,
        };
        let value = if absolute_form {
            HeaderValue::from_str(&format!("{orig}; absolute-form"))
        } else {
            HeaderValue::from_str(orig)
        };
        if let Ok(v) = value {
            req.headers_mut().insert(L5D_ORIG_PROTO, v);
        }
        // Connection-specific headers cannot be in an HTTP/2 request.
        crate::headers::strip_hop_by_hop(req.headers_mut());
        *req.version_mut() = Version::HTTP_2;
        true
    }

    /// The calling side's half of the round trip: the peer marked the response with the
    /// version its application answered in; the client gets that version, without the header.
    pub fn downgrade_response<B>(rsp: &mut Response<B>) {
        if let Some(v) = rsp.headers_mut().remove(L5D_ORIG_PROTO)
            && let Some(orig) = Self::parse(v.as_bytes())
        {
            *rsp.version_mut() = orig.version;
        }
    }

    /// Marks the response to a downgraded request with the HTTP/1 version the backend
    /// answered in; it goes back to the caller's proxy over HTTP/2.
    pub fn upgrade_response<B>(rsp: &mut Response<B>) {
        let orig = match rsp.version() {
            Version::HTTP_11 => "HTTP/1.1",
            Version::HTTP_10 => "HTTP/1.0",
            _ => return,
        };
        rsp.headers_mut()
            .insert(L5D_ORIG_PROTO, HeaderValue::from_static(orig));
        // Illegal in HTTP/2.
        rsp.headers_mut().remove(header::TRANSFER_ENCODING);
        *rsp.version_mut() = Version::HTTP_2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linkerd_values() {
        for (value, expected) in [
            ("HTTP/1.1", Some((Version::HTTP_11, false))),
            ("HTTP/1.0", Some((Version::HTTP_10, false))),
            ("HTTP/1.1; absolute-form", Some((Version::HTTP_11, true))),
            ("HTTP/2.0", None),
            ("h2c", None),
            ("", None),
        ] {
            assert_eq!(
                OrigProto::parse(value.as_bytes()).map(|o| (o.version, o.absolute_form)),
                expected,
                "{value:?}"
            );
        }
    }

    #[test]
    fn downgrades_only_upgraded_http2_requests() {
        let req = |version, value: Option<&'static str>| {
            let mut b = Request::builder().version(version).uri("http://web/x");
            if let Some(v) = value {
                b = b.header(L5D_ORIG_PROTO, v);
            }
            b.body(()).unwrap()
        };
        let mut r = req(Version::HTTP_2, Some("HTTP/1.1"));
        assert_eq!(
            OrigProto::downgrade(&mut r),
            Some(OrigProto {
                version: Version::HTTP_11,
                absolute_form: false
            })
        );
        assert_eq!(r.version(), Version::HTTP_11);
        assert!(!r.headers().contains_key(L5D_ORIG_PROTO));

        let mut r = req(Version::HTTP_2, None);
        assert_eq!(OrigProto::downgrade(&mut r), None);
        assert_eq!(r.version(), Version::HTTP_2);

        // Only HTTP/2 requests are upgraded ones.
        let mut r = req(Version::HTTP_11, Some("HTTP/1.0"));
        assert_eq!(OrigProto::downgrade(&mut r), None);
        assert_eq!(r.version(), Version::HTTP_11);

        let mut r = req(Version::HTTP_2, Some("SPDY/3"));
        assert_eq!(OrigProto::downgrade(&mut r), None);
        assert_eq!(r.version(), Version::HTTP_2);
    }

    #[test]
    fn the_response_carries_the_backend_version() {
        let mut rsp = Response::builder()
            .version(Version::HTTP_10)
            .header(header::TRANSFER_ENCODING, "chunked")
            .body(())
            .unwrap();
        OrigProto::upgrade_response(&mut rsp);
        assert_eq!(rsp.version(), Version::HTTP_2);
        assert_eq!(rsp.headers()[L5D_ORIG_PROTO], "HTTP/1.0");
        assert!(!rsp.headers().contains_key(header::TRANSFER_ENCODING));
    }

    /// Upgrade on the client's side, downgrade on the server's, and back: the application and
    /// its client each see the version they spoke, and no `l5d-orig-proto`.
    #[test]
    fn round_trip() {
        let mut req = Request::builder()
            .version(Version::HTTP_10)
            .uri("http://web.shop:8080/x")
            .header(header::CONNECTION, "keep-alive")
            .body(())
            .unwrap();
        assert!(OrigProto::upgrade(&mut req, true));
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(!req.headers().contains_key(header::CONNECTION));
        assert_eq!(req.headers()[L5D_ORIG_PROTO], "HTTP/1.0; absolute-form");
        let orig = OrigProto::downgrade(&mut req).unwrap();
        assert_eq!((orig.version, orig.absolute_form), (Version::HTTP_10, true));
        assert_eq!(req.version(), Version::HTTP_10);

        let mut rsp = Response::builder()
            .version(Version::HTTP_11)
            .body(())
            .unwrap();
        OrigProto::upgrade_response(&mut rsp);
        OrigProto::downgrade_response(&mut rsp);
        assert_eq!(rsp.version(), Version::HTTP_11);
        assert!(!rsp.headers().contains_key(L5D_ORIG_PROTO));

        // HTTP/2 requests are not upgraded.
        let mut req = Request::builder()
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(!OrigProto::upgrade(&mut req, false));
        assert!(!req.headers().contains_key(L5D_ORIG_PROTO));
    }
}
