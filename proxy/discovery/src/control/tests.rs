use std::time::Duration;

use proxy_identity::{TrustAnchors, ca};

use super::*;

#[test]
fn addresses() {
    let cases = [
        ("127.0.0.1:8086", Some(("127.0.0.1", 8086)), true),
        ("[::1]:8086", Some(("::1", 8086)), true),
        ("localhost:8086", Some(("localhost", 8086)), true),
        ("localhost.:8086", Some(("localhost.", 8086)), true),
        (
            "linkerd-dst-headless.linkerd.svc.cluster.local.:8086",
            Some(("linkerd-dst-headless.linkerd.svc.cluster.local.", 8086)),
            false,
        ),
        ("10.96.0.10:8086", Some(("10.96.0.10", 8086)), false),
        ("[fd00::1]:8090", Some(("fd00::1", 8090)), false),
        ("localhost", None, true),
        (":8086", None, true),
        ("host:99999", None, true),
    ];
    for (addr, want, loopback) in cases {
        let got = split(addr);
        assert_eq!(got, want, "{addr}");
        if let Some((host, _)) = got {
            assert_eq!(is_loopback(host), loopback, "{addr}");
        }
    }
}

fn uncertified() -> Arc<Credentials> {
    tls::install_default_provider();
    let anchor = ca::new_anchor("root", Duration::from_secs(3600)).unwrap();
    Credentials::new(
        Id::parse("web.ns1.serviceaccount.identity.linkerd.cluster.local").unwrap(),
        TrustAnchors::from_pem(&anchor.cert_pem).unwrap(),
    )
}

#[tokio::test]
async fn a_name_is_required_off_loopback() {
    let creds = uncertified();
    let t = Duration::from_secs(1);
    let err = channel("linkerd-dst.linkerd.svc:8086", None, &creds, t).unwrap_err();
    assert!(matches!(err, ChannelError::NameRequired(_)), "{err}");
    let err = channel("10.96.0.10:8086", None, &creds, t).unwrap_err();
    assert!(matches!(err, ChannelError::NameRequired(_)), "{err}");
    let err = channel("no-port", None, &creds, t).unwrap_err();
    assert!(matches!(err, ChannelError::Addr(_)), "{err}");
    // Lazy: nothing is dialled, so these succeed with nothing listening.
    channel("127.0.0.1:1", None, &creds, t).unwrap();
    channel("localhost:1", None, &creds, t).unwrap();
    let name =
        Id::parse("linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local")
            .unwrap();
    channel("linkerd-dst.linkerd.svc:8086", Some(name), &creds, t).unwrap();
}
