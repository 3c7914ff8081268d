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

fn table() -> Table {
    let mut t = HashMap::new();
    t.insert(
        "web-token".to_owned(),
        Reviewed::ServiceAccount {
            namespace: "shop".into(),
            name: "web".into(),
        },
    );
    t.insert("user-token".to_owned(), Reviewed::Other("alice".into()));
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
    let call = |identity: &str, token: &str, csr: Vec<u8>| {
        Request::new(CertifyRequest {
            identity: identity.into(),
            token: token.as_bytes().to_vec(),
            certificate_signing_request: csr,
        })
    };

    let rsp = svc
        .certify(call(WEB, "web-token", csr.clone()))
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

    let cases: [(&str, &str, Vec<u8>, tonic::Code, &str); 6] = [
        (
            WEB,
            "",
            csr.clone(),
            tonic::Code::InvalidArgument,
            "no ServiceAccount token",
        ),
        (
            WEB,
            "stolen",
            csr.clone(),
            tonic::Code::Unauthenticated,
            "bad token",
        ),
        (
            WEB,
            "user-token",
            csr.clone(),
            tonic::Code::PermissionDenied,
            "not to a ServiceAccount",
        ),
        (
            "db.shop.serviceaccount.identity.linkerd.cluster.local",
            "web-token",
            csr.clone(),
            tonic::Code::PermissionDenied,
            "identity mismatch",
        ),
        (
            "not an id",
            "web-token",
            csr.clone(),
            tonic::Code::InvalidArgument,
            "identity",
        ),
        (
            WEB,
            "web-token",
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
    std::fs::write(&token_file, "web-token").unwrap();
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
    std::fs::write(&token_file, "web-token").unwrap();
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
    // still accepts, and the test would pass without the fix. Wait until the service's verifier
    // refuses the old leaf.
    let old_leaf_refused_from = first + Duration::from_secs(1);
    while let Ok(left) = old_leaf_refused_from.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(10)).await;
    }
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

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshlink-identity-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
