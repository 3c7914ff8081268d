//! HTTP/1.1 upgrades through a proxy (WebSocket and other `Upgrade:` protocols): the request
//! keeps its `Connection: upgrade` and `Upgrade` headers (every other hop-by-hop header goes),
//! travels as HTTP/1.1 (never upgraded to HTTP/2 between proxies, which cannot carry it), and
//! once the far side answers `101 Switching Protocols` the two upgraded connections are joined
//! byte for byte.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Whether `req` asks to switch protocols: HTTP/1.1 with `Upgrade` named in `Connection`.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Hop-by-hop hygiene for an upgrade request or its `101` answer: every hop-by-hop header goes
/// but `Upgrade`, and `Connection` says `upgrade` only.
pub fn strip_keeping_upgrade(headers: &mut HeaderMap) {
    let upgrade: Vec<HeaderValue> = headers.get_all(header::UPGRADE).iter().cloned().collect();
    crate::headers::strip_hop_by_hop(headers);
    for v in upgrade {
        headers.append(header::UPGRADE, v);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Hop-by-hop hygiene for a request a proxy passes on: an upgrade keeps `Upgrade` and its
/// client's side is taken now, before the request goes on, to be [`splice`]d when the answer is
/// `101`; any other request loses every hop-by-hop header.
pub fn take<B>(req: &mut Request<B>) -> Option<OnUpgrade> {
    if is_upgrade(req) {
        strip_keeping_upgrade(req.headers_mut());
        Some(hyper::upgrade::on(req))
    } else {
        crate::headers::strip_hop_by_hop(req.headers_mut());
        None
    }
}

/// Joins the client's upgraded connection (`downstream`, taken from its request before it was
/// sent on) with the far side's, once `rsp` says `101`: in a task of its own, until either side
/// closes. Any other answer leaves both as they are.
pub fn splice<B>(downstream: OnUpgrade, rsp: &mut Response<B>) {
    if rsp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    strip_keeping_upgrade(rsp.headers_mut());
    let upstream = hyper::upgrade::on(rsp);
    tokio::spawn(async move {
        let (down, up) = match tokio::try_join!(downstream, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "an upgrade did not complete");
                return;
            }
        };
        let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
        if let Err(error) = proxy_transport::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(%error, "an upgraded connection ended");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests() {
        let req = |version, conn: Option<&str>, upgrade: Option<&str>| {
            let mut b = Request::builder().version(version);
            if let Some(c) = conn {
                b = b.header(header::CONNECTION, c);
            }
            if let Some(u) = upgrade {
                b = b.header(header::UPGRADE, u);
            }
            b.body(()).unwrap()
        };
        let cases = [
            (Version::HTTP_11, Some("Upgrade"), Some("websocket"), true),
            (
                Version::HTTP_11,
                Some("keep-alive, upgrade"),
                Some("websocket"),
                true,
            ),
            (
                Version::HTTP_11,
                Some("keep-alive"),
                Some("websocket"),
                false,
            ),
            (Version::HTTP_11, Some("upgrade"), None, false),
            (Version::HTTP_10, Some("upgrade"), Some("websocket"), false),
            (Version::HTTP_2, Some("upgrade"), Some("websocket"), false),
        ];
        for (version, conn, upgrade, expected) in cases {
            assert_eq!(
                is_upgrade(&req(version, conn, upgrade)),
                expected,
                "{version:?} {conn:?} {upgrade:?}"
            );
        }
    }

    #[test]
    fn only_the_upgrade_survives_hygiene() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, x-secret"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        strip_keeping_upgrade(&mut h);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
    }
}
