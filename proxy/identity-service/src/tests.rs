//! The Certify handler against a table of tokens, and a whole call through the real server and
//! the real client over TLS.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use linkerd2_proxy_api::identity::identity_server::Identity as _;
use proxy_identity::{Credentials, Id, TrustAnchors, ca, certify};
use tokio_util::sync::CancellationToken;

use super::*;

#[derive(Clone, Default)]
struct Table(HashMap<String, Reviewed>);

impl Authenticator for Table {
    async fn review(&self, token: String) -> Result<Reviewed, ReviewError> {
        Ok(self
            .0
            .get(&token)
            .cloned()
            .unwrap_or_else(|| Reviewed::Refused("unknown token".into())))
    }
}

struct Fixture {
    anchor: ca::CertKey,
    issuer: IssuerStore,
    creds: Arc<Credentials>,
    own: Id,
    settings: Settings,
}

fn fixture() -> Fixture {
    proxy_identity::tls::install_default_provider();
    let anchor = ca::new_anchor("root", Duration::from_secs(3600)).unwrap();
    let issuer_pem = ca::new_issuer(&anchor, "issuer", Duration::from_secs(3600)).unwrap();
    let settings = Settings {
        trust_domain: "cluster.local".into(),
        control_plane_namespace: "linkerd".into(),
        leaf_lifetime: Duration::from_secs(600),
        token_audience: Some(AUDIENCE.into()),
    };
    let own = service_id("linkerd-identity", &settings).unwrap();
    let anchors = TrustAnchors::from_pem(&anchor.cert_pem).unwrap();
    let creds = Credentials::new(own.clone(), anchors);
    let issuer = IssuerStore::default();
    issuer
        .load(&issuer_pem.cert_pem, &issuer_pem.key_pem, &creds, &own)
        .unwrap();
    Fixture {
        anchor,
        issuer,
        creds,
        own,
        settings,
    }
}

const AUDIENCE: &str = "identity.l5d.io";

/// A token shaped like a projected ServiceAccount token for `who` (the table reviews it).
fn token(who: &str) -> String {
    // Far in the future, and the same on every call: the table is keyed by the token.
    const EXP: u64 = 4_000_000_000;
    token::fake_jwt(&serde_json::json!({"aud": [AUDIENCE], "exp": EXP, "sub": who}))
}

fn table() -> Table {
    let mut t = HashMap::new();
    t.insert(
        token("web"),
        Reviewed::ServiceAccount {
            namespace: "shop".into(),
            name: "web".into(),
        },
    );
    t.insert(token("alice"), Reviewed::Other("alice".into()));
    Table(t)
}

const WEB: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";

#[tokio::test]
async fn certifies_and_refuses_with_reasons() {
    let f = fixture();
    let metrics = Metrics::default();
    let svc = Identity::new(
        f.settings.clone(),
        f.issuer.clone(),
        table(),
        metrics.clone(),
    );
    let id = Id::parse(WEB).unwrap();
    let (csr, key) = ca::new_csr(&id).unwrap();
    let (web, alice, stolen) = (token("web"), token("alice"), token("stolen"));
    let call = |identity: &str, token: &str, csr: Vec<u8>| {
        Request::new(CertifyRequest {
            identity: identity.into(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
    };

    let rsp = svc
        .certify(call(WEB, &web, csr.clone()))
        .await
        .unwrap()
        .into_inner();
    // The answer installs: it chains to the anchor and names the identity.
    let client = Credentials::new(
        id.clone(),
        TrustAnchors::from_pem(&f.anchor.cert_pem).unwrap(),
    );
    let expiry = client
        .install(rsp.leaf_certificate, rsp.intermediate_certificates, &key)
        .unwrap();
    let left = expiry.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(600) && left > Duration::from_secs(590));
    assert!(rsp.valid_until.is_some());

    let cases: [(&str, &str, Vec<u8>, tonic::Code, &str); 7] = [
        (
            WEB,
            "",
            csr.clone(),
            tonic::Code::InvalidArgument,
            "no ServiceAccount token",
        ),
        (
            WEB,
            "web-token",
            csr.clone(),
            tonic::Code::Unauthenticated,
            "bad token: a JWT has three dot-separated parts",
        ),
        (
            WEB,
            &stolen,
            csr.clone(),
            tonic::Code::Unauthenticated,
            "bad token: unknown token",
        ),
        (
            WEB,
            &alice,
            csr.clone(),
            tonic::Code::PermissionDenied,
            "not to a ServiceAccount",
        ),
        (
            "db.shop.serviceaccount.identity.linkerd.cluster.local",
            &web,
            csr.clone(),
            tonic::Code::PermissionDenied,
            "identity mismatch",
        ),
        (
            "not an id",
            &web,
            csr.clone(),
            tonic::Code::InvalidArgument,
            "identity",
        ),
        (
            WEB,
            &web,
            b"garbage".to_vec(),
            tonic::Code::InvalidArgument,
            "malformed CSR",
        ),
    ];
    for (identity, token, csr, code, message) in cases {
        let status = svc.certify(call(identity, token, csr)).await.unwrap_err();
        assert_eq!(status.code(), code, "{identity} {token}: {status:?}");
        assert!(status.message().contains(message), "{status:?}");
    }
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for reason in [
        "ok",
        "no_token",
        "malformed_token",
        "bad_token",
        "not_service_account",
        "identity_mismatch",
        "invalid_identity",
        "malformed_csr",
    ] {
        assert!(
            text.contains(&format!(
                "identity_certify_requests_total{{result=\"{reason}\"}} 1"
            )),
            "{reason}: {text}"
        );
    }
}

#[tokio::test]
async fn a_foreign_issuer_is_refused_and_the_old_one_kept() {
    let f = fixture();
    let foreign = ca::new_anchor("other root", Duration::from_secs(3600)).unwrap();
    let foreign_issuer = ca::new_issuer(&foreign, "issuer", Duration::from_secs(3600)).unwrap();
    let before = f.issuer.current().unwrap();
    assert!(
        f.issuer
            .load(
                &foreign_issuer.cert_pem,
                &foreign_issuer.key_pem,
                &f.creds,
                &f.own
            )
            .is_err()
    );
    assert!(Arc::ptr_eq(&before, &f.issuer.current().unwrap()));
}

/// The real client (proxy-identity's certify loop) against the real server over TLS, with a
/// token file: the certificate arrives and is renewed.
#[tokio::test]
async fn client_and_server_over_tls() {
    let f = fixture();
    let svc = Identity::new(
        f.settings.clone(),
        f.issuer.clone(),
        table(),
        Metrics::default(),
    );
    let cancel = CancellationToken::new();
    let (addr, serve) = serve(
        "127.0.0.1:0".parse().unwrap(),
        svc.into_service(),
        f.creds.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(serve);

    let dir = tempfile_dir();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token("web")).unwrap();
    let id = Id::parse(WEB).unwrap();
    let client = Credentials::new(id, TrustAnchors::from_pem(&f.anchor.cert_pem).unwrap());
    let mut watch = client.watch();
    let config = certify::Config {
        addr: addr.to_string(),
        server_id: f.own.clone(),
        token_file,
        min_refresh: Duration::from_millis(200),
        max_refresh: Duration::from_secs(1),
    };
    tokio::spawn(certify::run(
        config,
        client.clone(),
        certify::Metrics::default(),
        cancel.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(10), watch.wait_for(Option::is_some))
        .await
        .expect("certified within 10 s")
        .unwrap();
    let first = client.expiry().unwrap();
    // max_refresh is 1 s: a renewal follows.
    tokio::time::timeout(Duration::from_secs(10), watch.changed())
        .await
        .expect("renewed within 10 s")
        .unwrap();
    assert!(client.expiry().unwrap() >= first);
    cancel.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

/// A leaf that expires while the identity service cannot be reached is renewed once it can:
/// the Certify client presents no expired certificate (the service's verifier would refuse the
/// handshake), the token is the credential.
#[tokio::test]
async fn an_expired_leaf_is_renewed() {
    let mut f = fixture();
    f.settings.leaf_lifetime = Duration::from_secs(3);
    let svc = Identity::new(
        f.settings.clone(),
        f.issuer.clone(),
        table(),
        Metrics::default(),
    );
    let cancel = CancellationToken::new();
    let (addr, serve) = serve(
        "127.0.0.1:0".parse().unwrap(),
        svc.into_service(),
        f.creds.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(serve);
    // Not under tempfile_dir(): another test removes that one when it ends.
    let dir = std::env::temp_dir().join(format!(
        "meshlink-identity-expired-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token("web")).unwrap();
    let client = Credentials::new(
        Id::parse(WEB).unwrap(),
        TrustAnchors::from_pem(&f.anchor.cert_pem).unwrap(),
    );
    let config = certify::Config {
        addr: addr.to_string(),
        server_id: f.own.clone(),
        token_file,
        min_refresh: certify::MIN_REFRESH,
        max_refresh: certify::MAX_REFRESH,
    };
    let (csr, key) = ca::new_csr(client.id()).unwrap();
    let first = certify::certify(&config, &client, &csr, &key)
        .await
        .unwrap();
    // No renewal (the outage): the leaf runs out, and readiness says so.
    let mut valid = client.valid();
    tokio::time::timeout(Duration::from_secs(10), valid.wait_for(|v| *v))
        .await
        .expect("valid once certified")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), valid.wait_for(|v| !*v))
        .await
        .expect("the 3 s leaf expires")
        .unwrap();
    // `valid` turns false at the leaf's notAfter, but webpki refuses a certificate only once the
    // clock is past notAfter (whole seconds): renewing at once would present a leaf the service
    // still accepts, and the test would pass without the fix. Wait until the service itself
    // refuses a handshake that presents the old leaf.
    let refuses_old_leaf = || async {
        use tokio::io::AsyncReadExt as _;
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            return false;
        };
        let presenting = proxy_identity::tls::client_config(&client, &[b"h2"]);
        let Ok(mut tls) = proxy_identity::tls::connect(presenting, tcp, &f.own).await else {
            return true;
        };
        // TLS 1.3: the verdict on the client's certificate follows its Finished; an accepted
        // client gets the server's HTTP/2 SETTINGS, a refused one an alert.
        let mut byte = [0u8; 1];
        !matches!(tls.read(&mut byte).await, Ok(n) if n > 0)
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut poll = tokio::time::interval(Duration::from_millis(100));
        loop {
            poll.tick().await;
            if refuses_old_leaf().await {
                return;
            }
        }
    })
    .await
    .expect("the service refuses the expired leaf");
    // The service is back: the next call is served and a fresh leaf installed.
    let second = certify::certify(&config, &client, &csr, &key)
        .await
        .expect("an expired leaf is renewed");
    assert!(second > first);
    tokio::time::timeout(Duration::from_secs(10), valid.wait_for(|v| *v))
        .await
        .expect("ready again with the new leaf")
        .unwrap();
    cancel.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

/// A Certify call whose body never comes, from `from`: TLS, HTTP/2, the request head and
/// nothing more. Resolves when the connection is refused or the call is in; the returned task
/// ends when the server answers the call.
async fn stalled_certify(
    server: std::net::SocketAddr,
    from: std::net::IpAddr,
    f: &Fixture,
) -> Option<(
    futures::channel::mpsc::UnboundedSender<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >,
    tokio::task::JoinHandle<Option<http::Response<hyper::body::Incoming>>>,
)> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    sock.bind((from, 0).into()).ok()?;
    let tcp = sock.connect(server).await.ok()?;
    let nobody = Credentials::new(
        Id::parse(WEB).unwrap(),
        TrustAnchors::from_pem(&f.anchor.cert_pem).unwrap(),
    );
    let tls = proxy_identity::tls::connect(
        proxy_identity::tls::certify_client_config(&nobody, &[b"h2"]),
        tcp,
        &f.own,
    )
    .await
    .ok()?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let req = http::Request::post("http://identity/io.linkerd.proxy.identity.Identity/Certify")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(rx))
        .unwrap();
    send.ready().await.ok()?;
    let rsp = send.send_request(req);
    Some((tx, tokio::spawn(async move { rsp.await.ok() })))
}

/// One pod floods the service with stalled Certify calls (a body that never comes) while
/// another keeps certifying: the flood gets its address's share of the connections and no
/// more, each stalled call ends at its deadline, and the legitimate calls succeed.
#[tokio::test]
async fn stalled_calls_from_one_address_leave_room_for_others() {
    let f = fixture();
    let svc = Identity::new(
        f.settings.clone(),
        f.issuer.clone(),
        table(),
        Metrics::default(),
    );
    let cancel = CancellationToken::new();
    // 64 connections (the share of an address is 16) and short deadlines keep the test small.
    let limits = proxy_transport::ServerLimits {
        max_connections: 64,
        ..server::limits()
    };
    let deadlines = proxy_transport::CallDeadlines {
        body: Duration::from_secs(1),
        call: Duration::from_secs(2),
    };
    let (addr, serve) = serve_with(
        "127.0.0.1:0".parse().unwrap(),
        svc.into_service(),
        f.creds.clone(),
        limits,
        deadlines,
        cancel.clone(),
    )
    .await
    .unwrap();
    tokio::spawn(serve);

    // The flood, from 127.0.0.2: more stalled calls than the whole server has connections.
    // Without a share per address they would take every connection for its whole lifetime.
    let attacker: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..80 {
        // A refused connection fails at once; one left in the backlog (the server full) is
        // given up after a while.
        let attempt = stalled_certify(addr, attacker, &f);
        if let Ok(Some(call)) = tokio::time::timeout(Duration::from_millis(300), attempt).await {
            stalled.push(call);
        }
    }
    assert!(!stalled.is_empty(), "some stalled calls got in");
    assert!(
        stalled.len() <= 16,
        "{} stalled calls got in, more than the address's share",
        stalled.len()
    );

    // Legitimate calls from 127.0.0.1 succeed meanwhile.
    let dir = std::env::temp_dir().join(format!(
        "meshlink-identity-flood-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token("web")).unwrap();
    let client = Credentials::new(
        Id::parse(WEB).unwrap(),
        TrustAnchors::from_pem(&f.anchor.cert_pem).unwrap(),
    );
    let config = certify::Config {
        addr: addr.to_string(),
        server_id: f.own.clone(),
        token_file,
        min_refresh: certify::MIN_REFRESH,
        max_refresh: certify::MAX_REFRESH,
    };
    let (csr, key) = ca::new_csr(client.id()).unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let start = std::time::Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            certify::certify(&config, &client, &csr, &key),
        )
        .await
        .expect("a legitimate Certify is served during the flood")
        .expect("certified");
        slowest = slowest.max(start.elapsed());
    }
    eprintln!("slowest legitimate Certify during the flood: {slowest:?}");

    // Every stalled call that got in is ended by the server at its body deadline (an error
    // status), not held until its connection's lifetime.
    let start = std::time::Instant::now();
    for (_body, answered) in stalled {
        let rsp = tokio::time::timeout(Duration::from_secs(5), answered)
            .await
            .expect("a stalled call is answered at its deadline")
            .unwrap()
            .expect("an answer, not a reset");
        let status = rsp
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        assert!(status.as_deref().is_some_and(|s| s != "0"), "{rsp:?}");
    }
    eprintln!(
        "stalled calls all answered {:?} after the legitimate ones",
        start.elapsed()
    );
    cancel.cancel();
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshlink-identity-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
