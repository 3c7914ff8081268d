use std::time::Duration;

use proxy_identity::testing::TestPki;
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

const CLIENT: &str = "web.ns1.serviceaccount.identity.linkerd.cluster.local";
const DESTINATION: &str =
    "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local";

/// What the test server saw of one connection: the client's identity (`None` for plaintext or
/// no certificate), and a handle that kills the connection abruptly.
struct Accepted {
    client: Option<Id>,
    kill: tokio::task::AbortHandle,
}

/// A control-plane server on a loopback port: with `tls`, TLS 1.3 as `creds` (client
/// certificates optional, reported); without, plaintext.
async fn server(
    tls: Option<Arc<Credentials>>,
) -> (
    std::net::SocketAddr,
    crate::testing::Calls,
    tokio::sync::mpsc::UnboundedReceiver<Accepted>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (service, calls) = crate::testing::service();
    let (accepted, accepted_rx) = tokio::sync::mpsc::unbounded_channel();
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(tls::server_config(&c, &[b"h2"])));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (service, acceptor, accepted) =
                (service.clone(), acceptor.clone(), accepted.clone());
            // Handshakes run in their own tasks so that a failed one does not stop the loop.
            tokio::spawn(async move {
                let (client, conn) = match acceptor {
                    None => (None, tokio::spawn(service.serve(tcp))),
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let client = tls::client_id(tls.get_ref().1);
                        (client, tokio::spawn(service.serve(tls)))
                    }
                };
                let _ = accepted.send(Accepted {
                    client,
                    kill: conn.abort_handle(),
                });
            });
        }
    });
    (addr, calls, accepted_rx)
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn endpoint_set(addr: &str) -> linkerd2_proxy_api::destination::Update {
    use linkerd2_proxy_api::destination::{WeightedAddr, WeightedAddrSet, update};
    linkerd2_proxy_api::destination::Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: vec![WeightedAddr {
                addr: Some(addr.parse::<std::net::SocketAddr>().unwrap().into()),
                weight: 1,
                ..Default::default()
            }],
            metric_labels: Default::default(),
        })),
    }
}

#[tokio::test]
async fn mtls_to_the_named_server_and_reconnects_when_the_connection_dies() {
    let pki = TestPki::new();
    let (addr, mut calls, mut accepted) = server(Some(pki.creds(DESTINATION))).await;
    let client = pki.creds(CLIENT);
    let ch = channel(
        &format!("localhost:{}", addr.port()),
        Some(Id::parse(DESTINATION).unwrap()),
        &client,
        Duration::from_secs(5),
    )
    .unwrap();
    let resolver = crate::Resolver::new(ch, String::new(), crate::resolve::IDLE_TIMEOUT);
    let r = resolver.resolve("web.ns1.svc.cluster.local:80");
    let mut watch = r.watch();

    let conn = within("a connection", accepted.recv()).await.unwrap();
    // The client presented its own certificate.
    assert_eq!(conn.client, Some(Id::parse(CLIENT).unwrap()));
    let call = within("a Get", calls.get.recv()).await.unwrap();
    call.send(endpoint_set("10.0.0.1:80"));
    within("endpoints", watch.changed()).await.unwrap();

    // The connection dies without a goodbye: the channel dials again and the stream resumes.
    conn.kill.abort();
    let again = within("a second connection", accepted.recv())
        .await
        .unwrap();
    assert_eq!(again.client, Some(Id::parse(CLIENT).unwrap()));
    let call = within("a second Get", calls.get.recv()).await.unwrap();
    call.send(endpoint_set("10.0.0.2:80"));
    within("new endpoints", watch.changed()).await.unwrap();
    let crate::Resolution::Endpoints(e) = r.current() else {
        panic!("not endpoints: {:?}", r.current());
    };
    assert_eq!(
        e.keys().map(|a| a.to_string()).collect::<Vec<_>>(),
        ["10.0.0.2:80"]
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused() {
    let pki = TestPki::new();
    // The server proves an identity, but not the one configured for the destination service.
    let (addr, mut calls, _accepted) = server(Some(
        pki.creds("impostor.ns1.serviceaccount.identity.linkerd.cluster.local"),
    ))
    .await;
    let ch = channel(
        &addr.to_string(),
        Some(Id::parse(DESTINATION).unwrap()),
        &pki.creds(CLIENT),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = linkerd2_proxy_api::destination::destination_client::DestinationClient::new(ch)
        .get(linkerd2_proxy_api::destination::GetDestination::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    // Refused for the identity, after a handshake that otherwise succeeded.
    assert!(format!("{err:?}").contains("WrongIdentity"), "{err:?}");
    assert!(calls.get.try_recv().is_err());
}

#[tokio::test]
async fn plaintext_to_loopback_without_a_name() {
    let pki = TestPki::new();
    let (addr, mut calls, mut accepted) = server(None).await;
    let ch = channel(
        &addr.to_string(),
        None,
        &pki.creds(CLIENT),
        Duration::from_secs(5),
    )
    .unwrap();
    let resolver = crate::Resolver::new(ch, String::new(), crate::resolve::IDLE_TIMEOUT);
    let mut r = resolver.resolve("web.ns1.svc.cluster.local:80");
    let conn = within("a connection", accepted.recv()).await.unwrap();
    assert_eq!(conn.client, None);
    within("a Get", calls.get.recv())
        .await
        .unwrap()
        .send(endpoint_set("10.0.0.1:80"));
    assert!(matches!(
        within("endpoints", r.first()).await,
        crate::Resolution::Endpoints(_)
    ));
}
