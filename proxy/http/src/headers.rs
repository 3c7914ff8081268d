//! Header hygiene at a proxy hop.

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The header in which Linkerd's inbound proxy tells an application who called it: the
/// caller's verified identity. A client's own value is never passed on.
pub const L5D_CLIENT_ID: HeaderName = HeaderName::from_static("l5d-client-id");

/// Headers that belong to one hop and are never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those `Connection` names, keeping `te: trailers`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    // `te: trailers` is the one TE value that may cross hops, and gRPC needs it.
    let trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    headers.remove("proxy-connection");
}

/// Whether a `Forwarded` element names `own` as `by`: the request has been through this proxy
/// (or claims to have been). Identities are DNS names, so the comparison ignores ASCII case, as
/// a backend reading the header might.
pub fn forwarded_by(headers: &HeaderMap, own: &str) -> bool {
    headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|pair| pair.trim().split_once('='))
        .any(|(k, v)| {
            k.trim().eq_ignore_ascii_case("by")
                && v.trim().trim_matches('"').eq_ignore_ascii_case(own)
        })
}

/// Replaces every `l5d-client-id` the client sent with the identity its certificate proved.
pub fn set_client_id(headers: &mut HeaderMap, verified: &str) {
    headers.remove(&L5D_CLIENT_ID);
    match HeaderValue::try_from(verified) {
        Ok(v) => {
            headers.insert(L5D_CLIENT_ID, v);
        }
        // An identity is a DNS name or a URI, always a valid header value; if one were not, the
        // backend gets no claim rather than a wrong one.
        Err(_) => tracing::warn!("client identity is not a header value; l5d-client-id not set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_loop_detection() {
        for (values, own, found) in [
            (vec!["for=a;by=gw.east"], "gw.east", true),
            (vec!["for=a;by=gw.east"], "gw.west", false),
            (
                vec!["by=\"other\", By=\"gw.east\";proto=https"],
                "gw.east",
                true,
            ),
            (vec!["for=x", "by=GW.East"], "gw.east", true),
            (vec!["for=gw.east;host=gw.east"], "gw.east", false),
            (vec!["by=gw.east.evil"], "gw.east", false),
            (vec![], "gw.east", false),
        ] {
            let mut h = HeaderMap::new();
            for v in &values {
                h.append(header::FORWARDED, HeaderValue::from_str(v).unwrap());
            }
            assert_eq!(forwarded_by(&h, own), found, "{values:?} by {own}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // gRPC's `te: trailers` is the exception.
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn client_id_is_the_verified_one_only() {
        let mut h = HeaderMap::new();
        h.append(
            "L5D-Client-Id",
            HeaderValue::from_static("admin.kube-system"),
        );
        h.append("l5d-client-id", HeaderValue::from_static("root"));
        set_client_id(
            &mut h,
            "web.shop.serviceaccount.identity.linkerd.cluster.local",
        );
        let all: Vec<_> = h.get_all(&L5D_CLIENT_ID).iter().collect();
        assert_eq!(
            all,
            ["web.shop.serviceaccount.identity.linkerd.cluster.local"]
        );
    }
}
