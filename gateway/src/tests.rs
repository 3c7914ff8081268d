//! The gateway in-process, with rcgen certificates and real sockets on loopback: every forwarding
//! mode and every refusal, each checked on the wire and in the metric.

use proxy_identity::testing::TestPki;
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    core::v1::{
        Container, EnvVar, ObjectReference, Pod, PodSpec, Service, ServicePort, ServiceSpec,
    },
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::api::ObjectMeta;
use prometheus_client::registry::Registry;
use proxy_identity::{Credentials, Id, TrustAnchors, tls};
use proxy_transport_header::{Header, PROTOCOL, SessionProtocol};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{CONTROL_PLANE_NS_LABEL, Discovery, Gateway, Mesh, Metrics, Options};

const GW: &str =
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local";
const WEB: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

/// A client config presenting a certificate valid from `from` to `to` (an expired one cannot
/// be made through the library, which refuses to install it).
fn client_with_validity(
    pki: &TestPki,
    from: SystemTime,
    to: SystemTime,
) -> Arc<rustls::ClientConfig> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![WEB.to_owned()]).unwrap();
    params.not_before = from.into();
    params.not_after = to.into();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &pki.issuer_pem.cert_pem,
        rcgen::KeyPair::from_pem(&pki.issuer_pem.key_pem).unwrap(),
    )
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let chain = vec![cert.der().clone(), pki.issuer.cert_der().to_vec().into()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![PROTOCOL.to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TCP server that reads until the client half-closes, then answers with what it read
/// reversed and closes: only a half-close passed through gets an answer.
async fn reverse_server() -> SocketAddr {
    counted_reverse_server().await.0
}

/// [`reverse_server`], and how many connections it has accepted (a connection the gateway
/// forwarded).
async fn counted_reverse_server() -> (SocketAddr, tokio::sync::watch::Receiver<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, count) = tokio::sync::watch::channel(0);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            accepted.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                s.write_all(&buf).await.unwrap();
            });
        }
    });
    (addr, count)
}

/// An HTTP server (HTTP/1 and HTTP/2) that answers with its name, the request's version and
/// the headers the gateway sets.
async fn http_server(name: &'static str, seen: Arc<Mutex<Vec<&'static str>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        seen.lock().unwrap().push(name);
                        let h = |k| {
                            req.headers()
                                .get(k)
                                .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
                                .unwrap_or_default()
                        };
                        let forwarded: Vec<_> = req
                            .headers()
                            .get_all("forwarded")
                            .iter()
                            .map(|v| v.to_str().unwrap())
                            .collect();
                        let client_ids: Vec<_> = req
                            .headers()
                            .get_all("l5d-client-id")
                            .iter()
                            .map(|v| v.to_str().unwrap())
                            .collect();
                        let body = format!(
                            "server={name} version={:?} host={} forwarded={} client-id={} orig-proto={} uri={}",
                            req.version(),
                            h("host"),
                            forwarded.join(" | "),
                            client_ids.join(" | "),
                            h("l5d-orig-proto"),
                            req.uri(),
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// An exported Service (`mirror.linkerd.io/exported=true`), as every target of these tests but
/// the unexported ones.
fn service(name: &str, port: i32) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            labels: Some([("mirror.linkerd.io/exported".to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port,
                name: Some("main".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(svc: &str, addrs: &[SocketAddr]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(format!("{svc}-abc")),
            labels: Some([("kubernetes.io/service-name".to_owned(), svc.to_owned())].into()),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        // Every backend of a test listens on its own port; the slice's port is the first one,
        // so tests with several backends run them on one port each (see `two_backends`).
        ports: Some(vec![EndpointPort {
            name: Some("main".into()),
            port: Some(i32::from(addrs[0].port())),
            ..EndpointPort::default()
        }]),
        endpoints: Some(
            addrs
                .iter()
                .map(|a| Endpoint {
                    addresses: vec![a.ip().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    }
}

struct Running {
    addr: SocketAddr,
    discovery: Discovery,
    metrics: Metrics,
    pki: TestPki,
    cancel: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start(extra: &[&str], discovery: Discovery) -> Running {
    start_with_workers(extra, discovery, Vec::new()).await
}

async fn start_with_workers(
    extra: &[&str],
    discovery: Discovery,
    workers: Vec<tokio::runtime::Handle>,
) -> Running {
    let pki = TestPki::new();
    let mut args = vec!["gw", "--addr", "127.0.0.1:0"];
    for (flag, value) in [
        ("--header-timeout", "300ms"),
        ("--handshake-timeout", "300ms"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let options = Cli::try_parse_from(args).unwrap().options;
    let metrics = Metrics::default();
    let cancel = CancellationToken::new();
    let (addr, serve) = Gateway::new(options, pki.creds(GW), discovery.clone(), metrics.clone())
        .workers(workers)
        .bind(cancel.clone())
        .await
        .unwrap();
    tokio::spawn(serve);
    Running {
        addr,
        discovery,
        metrics,
        pki,
        cancel,
    }
}

impl Running {
    fn client_config(&self, id: &str) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.pki.creds(id), &[PROTOCOL])
    }

    async fn tls(
        &self,
        config: Arc<rustls::ClientConfig>,
        sni: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
            .await
    }

    /// A connection as a Linkerd proxy opens it: mTLS, checked gateway identity, header.
    async fn dial(&self, header: &Header) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut tls = tls::connect(self.client_config(WEB), tcp, &Id::parse(GW).unwrap())
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(PROTOCOL));
        tls.write_all(&header.encode()).await.unwrap();
        tls
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metric(&format!(
            "gateway_refused_connections_total{{reason=\"{reason}\"}}"
        ))
    }

    /// A metric's value, by its name and labels as exposed (0 when absent).
    fn metric(&self, name: &str) -> u64 {
        let mut registry = Registry::default();
        self.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let needle = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |n| n.parse().unwrap())
    }

    /// Waits until the refusal `reason` has been counted `n` times.
    async fn expect_refused(&self, reason: &str, n: u64) {
        let name = format!("gateway_refused_connections_total{{reason=\"{reason}\"}}");
        self.wait_metric(&name, |v| v >= n).await;
    }

    /// Waits (up to 5 s) until the metric `name` satisfies `done`. The gateway's counters are
    /// the signal; they have no notification, so they are read every 10 ms.
    async fn wait_metric(&self, name: &str, done: impl Fn(u64) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(self.metric(name)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} stayed at {}",
                self.metric(name)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Whether the peer closed the stream (EOF or a reset) within 5 s; a TLS alert it may send
/// first is read past.
async fn closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends `message` through an opaque connection to [`reverse_server`] and half-closes; returns
/// what came back before the end of the stream (within 5 s).
async fn reversed(s: &mut tokio_rustls::client::TlsStream<TcpStream>, message: &[u8]) -> Vec<u8> {
    s.write_all(message).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("the answer ends within 5 s")
        .unwrap();
    back
}

fn header(name: &str, port: u16, protocol: Option<SessionProtocol>) -> Header {
    Header {
        port,
        name: Some(name.into()),
        protocol,
    }
}

/// The header of an HTTP session to `web.shop` on port 80, the HTTP tests' target.
fn web(protocol: SessionProtocol) -> Header {
    header("web.shop.svc.cluster.local", 80, Some(protocol))
}

async fn with_backend(port_of: SocketAddr, name: &str) -> Discovery {
    let d = Discovery::default();
    d.apply_service(&service(name, 80));
    d.apply_slice(&slice(name, &[port_of]));
    d.mark_synced();
    d
}

#[tokio::test]
async fn opaque_tcp_with_half_close() {
    let backend = reverse_server().await;
    let gw = start(&[], with_backend(backend, "rev").await).await;
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    // Half-close: the server answers only after it sees the end of our stream.
    assert_eq!(reversed(&mut s, b"hello gateway").await, b"yawetag olleh");
}

async fn http_request(
    s: tokio_rustls::client::TlsStream<TcpStream>,
    version: SessionProtocol,
    extra: Option<(&'static str, &'static str)>,
) -> http::Response<Bytes> {
    let io = TokioIo::new(s);
    let mut req = http::Request::builder().uri("/hello");
    if let Some((k, v)) = extra {
        req = req.header(k, v);
    }
    let rsp = match version {
        SessionProtocol::Http1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(
                req.header("host", "ignored")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap()
        }
        SessionProtocol::Http2 => {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(
                req.uri("http://web.shop.svc.cluster.local/hello")
                    .version(http::Version::HTTP_2)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let (parts, body) = rsp.into_parts();
    http::Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn http1_and_http2_with_forwarded_and_host() {
    let seen = Arc::default();
    let backend = http_server("a", seen).await;
    let gw = start(&[], with_backend(backend, "web").await).await;
    for version in [SessionProtocol::Http1, SessionProtocol::Http2] {
        let s = gw.dial(&web(version)).await;
        let rsp = http_request(s, version, None).await;
        assert_eq!(rsp.status(), 200);
        let body = String::from_utf8_lossy(rsp.body()).into_owned();
        let expected_version = match version {
            SessionProtocol::Http1 => "HTTP/1.1",
            SessionProtocol::Http2 => "HTTP/2.0",
        };
        assert!(
            body.contains(&format!("version={expected_version}")),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "forwarded=by={GW};for={WEB};host=web.shop.svc.cluster.local:80;proto=https"
            )),
            "{body}"
        );
        if version == SessionProtocol::Http1 {
            assert!(
                body.contains("host=web.shop.svc.cluster.local:80"),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn requests_are_balanced_across_endpoints() {
    let seen: Arc<Mutex<Vec<&str>>> = Arc::default();
    // Two endpoints on the same port, on two loopback addresses.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let mut addrs = Vec::new();
    for (ip, name) in [("127.0.0.1", "a"), ("127.0.0.2", "b")] {
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let l = TcpListener::bind(addr).await.unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        seen.lock().unwrap().push(name);
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addrs.push(addr);
    }
    let d = Discovery::default();
    d.apply_service(&service("web", 80));
    d.apply_slice(&slice("web", &addrs));
    let gw = start(&[], d).await;
    let s = gw.dial(&web(SessionProtocol::Http2)).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..4 {
        let rsp = send
            .send_request(
                http::Request::builder()
                    .uri("http://web/")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.contains(&"a") && seen.contains(&"b"),
        "one HTTP/2 connection, both endpoints: {seen:?}"
    );
}

#[tokio::test]
async fn loops_are_refused_with_508() {
    let backend = http_server("a", Arc::default()).await;
    let gw = start(&[], with_backend(backend, "web").await).await;
    let s = gw.dial(&web(SessionProtocol::Http1)).await;
    let forwarded: &'static str = Box::leak(format!("by={GW};for=x").into_boxed_str());
    let rsp = http_request(s, SessionProtocol::Http1, Some(("forwarded", forwarded))).await;
    assert_eq!(rsp.status(), 508);
    assert_eq!(rsp.headers()["l5d-proxy-error"], "gateway loop");

    // A client whose identity is the gateway's own is a loop too.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut s = tls::connect(gw.client_config(GW), tcp, &Id::parse(GW).unwrap())
        .await
        .unwrap();
    s.write_all(&web(SessionProtocol::Http1).encode())
        .await
        .unwrap();
    assert_eq!(
        http_request(s, SessionProtocol::Http1, None).await.status(),
        508
    );
}

#[tokio::test]
async fn every_refusal_closes_with_its_reason() {
    let backend = reverse_server().await;
    let gw = start(&[], with_backend(backend, "rev").await).await;
    let gw_name = GW;

    // Plaintext.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed(&mut s).await);
    gw.expect_refused("not_tls", 1).await;

    // Silence: the handshake deadline (300 ms here).
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    assert!(closed(&mut s).await);
    gw.expect_refused("handshake_timeout", 1).await;

    // Wrong SNI.
    let r = gw.tls(gw.client_config(WEB), "someone-else.example").await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("wrong_sni", 1).await;

    // No SNI (rustls sends none when dialing an IP address).
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(gw.client_config(WEB))
        .connect(ServerName::IpAddress(gw.addr.ip().into()), tcp)
        .await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("no_sni", 1).await;

    // No ALPN.
    let c = gw.pki.creds(WEB);
    let r = gw.tls(tls::client_config(&c, &[]), gw_name).await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("no_alpn", 1).await;

    // No client certificate: credentials with none installed yet.
    let uncertified = Credentials::new(
        Id::parse(WEB).unwrap(),
        TrustAnchors::from_pem(&gw.pki.anchor.cert_pem).unwrap(),
    );
    let r = gw
        .tls(tls::client_config(&uncertified, &[PROTOCOL]), gw_name)
        .await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("no_client_cert", 1).await;

    // A certificate from another anchor (the client trusts any server, so that the refusal is
    // the gateway's).
    let foreign = TestPki::new();
    let now = SystemTime::now();
    let r = gw
        .tls(
            client_with_validity(
                &foreign,
                now - Duration::from_secs(60),
                now + Duration::from_secs(3600),
            ),
            gw_name,
        )
        .await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("foreign_anchor", 1).await;

    // An expired certificate from the right anchor.
    let expired = client_with_validity(
        &gw.pki,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let r = gw.tls(expired, gw_name).await;
    assert!(r.is_err() || closed(&mut r.unwrap()).await);
    gw.expect_refused("expired_cert", 1).await;

    // A header that is not one.
    let mut s = gw.tls(gw.client_config(WEB), gw_name).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(closed(&mut s).await);
    gw.expect_refused("bad_header", 1).await;

    // A header too slow (300 ms here).
    let mut s = gw.tls(gw.client_config(WEB), gw_name).await.unwrap();
    s.write_all(&proxy_transport_header::PREFACE[..5])
        .await
        .unwrap();
    assert!(closed(&mut s).await);
    gw.expect_refused("header_timeout", 1).await;

    // Targets: unknown Service, unknown port, outside the suffix, no name at all.
    for (h, reason, n) in [
        (
            header("nope.shop.svc.cluster.local", 80, None),
            "unknown_target",
            1,
        ),
        (
            header("rev.shop.svc.cluster.local", 81, None),
            "unknown_target",
            2,
        ),
        (
            Header {
                port: 80,
                name: None,
                protocol: None,
            },
            "unknown_target",
            3,
        ),
        (
            header("rev.shop.svc.elsewhere.local", 80, None),
            "outside_suffix",
            1,
        ),
        (
            header("kubernetes.default.svc.cluster.local.evil.com", 443, None),
            "outside_suffix",
            2,
        ),
    ] {
        let mut s = gw.dial(&h).await;
        assert!(closed(&mut s).await, "{h:?}");
        gw.expect_refused(reason, n).await;
    }
}

#[tokio::test]
async fn authorization_narrows_identities() {
    let backend = reverse_server().await;
    let gw = start(
        &[
            "--allow-identities",
            "api.shop.serviceaccount.identity.linkerd.cluster.local",
        ],
        with_backend(backend, "rev").await,
    )
    .await;
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert!(closed(&mut s).await);
    gw.expect_refused("unauthorized", 1).await;

    let gw = start(
        &["--allow-trust-domains", "cluster.local"],
        with_backend(backend, "rev").await,
    )
    .await;
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert_eq!(reversed(&mut s, b"ab").await, b"ba");
}

#[tokio::test]
async fn silent_connections_cannot_lock_others_out() {
    let backend = reverse_server().await;
    let gw = start(
        &["--max-handshakes", "8", "--handshake-timeout", "60s"],
        with_backend(backend, "rev").await,
    )
    .await;
    // Far more silent connections than handshake slots, held open.
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    gw.expect_refused("overloaded", 56).await;
    // A real client still gets through at once.
    let mut s = tokio::time::timeout(
        Duration::from_secs(5),
        gw.dial(&header("rev.shop.svc.cluster.local", 80, None)),
    )
    .await
    .expect("a client is served while silent connections are held");
    assert_eq!(reversed(&mut s, b"xy").await, b"yx");
}

#[tokio::test]
async fn no_ready_endpoints_is_refused() {
    let d = Discovery::default();
    d.apply_service(&service("empty", 80));
    let gw = start(&[], d).await;
    let mut s = gw
        .dial(&header("empty.shop.svc.cluster.local", 80, None))
        .await;
    assert!(closed(&mut s).await);
    gw.expect_refused("no_endpoints", 1).await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let backend = reverse_server().await;
    let gw = start(
        &["--idle-timeout", "300ms"],
        with_backend(backend, "rev").await,
    )
    .await;
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    // Nothing moves either way: the gateway closes it after the idle timeout.
    let started = tokio::time::Instant::now();
    assert!(closed(&mut s).await);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_connection_limit_refuses_the_next_client() {
    let backend = reverse_server().await;
    let gw = start(
        &["--max-connections", "1"],
        with_backend(backend, "rev").await,
    )
    .await;
    let mut first = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    let mut second = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert!(closed(&mut second).await);
    gw.expect_refused("overloaded", 1).await;
    // The first is still served.
    assert_eq!(reversed(&mut first, b"ok").await, b"ko");
}

/// An endpoint that closes every connection after one response: the gateway's kept HTTP/1
/// connection goes stale between requests, and the next request must still be served.
#[tokio::test]
async fn a_stale_endpoint_connection_is_replaced() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                // Closed without a `connection: close`: the gateway learns only by trying.
            });
        }
    });
    let gw = start(&[], with_backend(addr, "web").await).await;
    let s = gw.dial(&web(SessionProtocol::Http1)).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let rsp = send
            .send_request(
                http::Request::builder()
                    .uri("/")
                    .header("host", "web")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200, "request {i}");
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        // Give the endpoint's close time to arrive, as between real requests.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With a second worker thread, connections alternate between the two runtimes: while two are
/// held open, one of them is a task of the worker's runtime, and both are served.
#[tokio::test]
async fn connections_are_spread_over_worker_threads() {
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = worker.handle().clone();
    std::thread::spawn(move || worker.block_on(std::future::pending::<()>()));
    let backend = reverse_server().await;
    let gw = start_with_workers(
        &[],
        with_backend(backend, "rev").await,
        vec![handle.clone()],
    )
    .await;
    assert_eq!(handle.metrics().num_alive_tasks(), 0);
    let target = header("rev.shop.svc.cluster.local", 80, None);
    let mut held = [gw.dial(&target).await, gw.dial(&target).await];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handle.metrics().num_alive_tasks() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection was handed to the worker"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, s) in held.iter_mut().enumerate() {
        let m = [b'a', b'0' + i as u8];
        assert_eq!(reversed(s, &m).await, [m[1], m[0]], "connection {i}");
    }
}

/// Only exported Services are reachable unless `--forward-any-service`; the refusal has its own
/// reason, also for a Service that exists with no such port.
#[tokio::test]
async fn only_exported_services_are_reachable() {
    let backend = reverse_server().await;
    let discovery = || {
        let d = Discovery::default();
        let mut svc = service("private", 80);
        svc.metadata.labels = Some([("app".to_owned(), "private".to_owned())].into());
        d.apply_service(&svc);
        d.apply_slice(&slice("private", &[backend]));
        d.apply_service(&service("rev", 80));
        d.apply_slice(&slice("rev", &[backend]));
        d.mark_synced();
        d
    };
    let gw = start(&[], discovery()).await;
    for port in [80, 81] {
        let mut s = gw
            .dial(&header("private.shop.svc.cluster.local", port, None))
            .await;
        assert!(closed(&mut s).await);
    }
    gw.expect_refused("not_exported", 2).await;
    assert_eq!(gw.refused("unknown_target"), 0);
    // The exported one beside it is served.
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert_eq!(reversed(&mut s, b"ab").await, b"ba");

    // Linkerd's behaviour, on request.
    let gw = start(&["--forward-any-service"], discovery()).await;
    let mut s = gw
        .dial(&header("private.shop.svc.cluster.local", 80, None))
        .await;
    assert_eq!(reversed(&mut s, b"cd").await, b"dc");
    assert_eq!(gw.refused("not_exported"), 0);

    // A selector of one's own.
    let gw = start(&["--export-selector", "app=private"], discovery()).await;
    let mut s = gw
        .dial(&header("private.shop.svc.cluster.local", 80, None))
        .await;
    assert_eq!(reversed(&mut s, b"ef").await, b"fe");
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert!(closed(&mut s).await);
    gw.expect_refused("not_exported", 1).await;
}

/// An opaque connection from the gateway's own identity, or to a Service whose endpoint is the
/// gateway itself, is refused as a loop.
#[tokio::test]
async fn opaque_loops_are_refused() {
    let backend = reverse_server().await;
    let gw = start(&[], with_backend(backend, "rev").await).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut s = tls::connect(gw.client_config(GW), tcp, &Id::parse(GW).unwrap())
        .await
        .unwrap();
    s.write_all(&header("rev.shop.svc.cluster.local", 80, None).encode())
        .await
        .unwrap();
    assert!(closed(&mut s).await);
    gw.expect_refused("loop", 1).await;

    // A Service whose endpoint is the gateway's own listener.
    let d = Discovery::default();
    d.apply_service(&service("rev", 80));
    d.apply_service(&service("gw", 4143));
    d.apply_slice(&slice("rev", &[backend]));
    d.mark_synced();
    let gw = start(&[], d).await;
    gw_discovery_points_at_itself(&gw);
    let mut s = gw
        .dial(&header("gw.shop.svc.cluster.local", 4143, None))
        .await;
    assert!(closed(&mut s).await);
    gw.expect_refused("loop", 1).await;
    // Another client to another target is unaffected.
    let mut s = gw
        .dial(&header("rev.shop.svc.cluster.local", 80, None))
        .await;
    assert_eq!(reversed(&mut s, b"gh").await, b"hg");
}

/// Points the Service `gw` at the running gateway's own address.
fn gw_discovery_points_at_itself(gw: &Running) {
    gw.discovery.apply_slice(&slice("gw", &[gw.addr]));
}

/// The backend learns the caller from the gateway only: a client's own `l5d-client-id` is
/// replaced by its verified identity, its own `Forwarded` elements come first and the
/// gateway's last, and one that claims to be the gateway's is refused (a loop).
#[tokio::test]
async fn identity_headers_come_from_the_certificate() {
    let backend = http_server("a", Arc::default()).await;
    let gw = start(&[], with_backend(backend, "web").await).await;
    for version in [SessionProtocol::Http1, SessionProtocol::Http2] {
        let s = gw.dial(&web(version)).await;
        let io = TokioIo::new(s);
        let req = http::Request::builder()
            .uri("http://web.shop.svc.cluster.local/hello")
            .header(
                "l5d-client-id",
                "admin.kube-system.serviceaccount.identity.linkerd.cluster.local",
            )
            .header("L5D-Client-Id", "root")
            .header("forwarded", "for=10.0.0.1;by=some-proxy");
        let rsp = match version {
            SessionProtocol::Http1 => {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                send.send_request(
                    req.uri("/hello")
                        .header("host", "x")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap()
            }
            SessionProtocol::Http2 => {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                send.send_request(req.body(Full::new(Bytes::new())).unwrap())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(rsp.status(), 200);
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(&format!("client-id={WEB} ")),
            "{version:?}: {body}"
        );
        assert!(
            body.contains(&format!(
                "forwarded=for=10.0.0.1;by=some-proxy | by={GW};for={WEB};"
            )),
            "{version:?}: {body}"
        );
    }
    // A `Forwarded` element naming the gateway as `by`, in any case, never reaches the backend.
    let s = gw.dial(&web(SessionProtocol::Http1)).await;
    let forged: &'static str =
        Box::leak(format!("for=evil;by={}", GW.to_ascii_uppercase()).into_boxed_str());
    let rsp = http_request(s, SessionProtocol::Http1, Some(("forwarded", forged))).await;
    assert_eq!(rsp.status(), 508);
}

/// An HTTP/1-only backend (as many applications are). Its first `together` requests are
/// answered only once all of them are in at once: requests sent one after the other would
/// never be answered.
async fn http1_only_server(together: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(together));
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let (barrier, seen) = (barrier.clone(), seen.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                        let body = format!(
                            "version={:?} host={} uri={} orig-proto={}",
                            req.version(),
                            req.headers()
                                .get("host")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default(),
                            req.uri(),
                            req.headers().contains_key("l5d-orig-proto"),
                        );
                        let (barrier, seen) = (barrier.clone(), seen.clone());
                        async move {
                            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < together {
                                barrier.wait().await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A Linkerd proxy carries HTTP/1 requests to the gateway as HTTP/2 with `l5d-orig-proto`: they
/// reach an HTTP/1-only backend as HTTP/1 (header removed, `Host` the target), many at once over
/// the one HTTP/2 connection, and the answers come back over HTTP/2 marked with the version.
#[tokio::test]
async fn upgraded_http1_is_downgraded_for_the_backend() {
    let backend = http1_only_server(8).await;
    let gw = start(&[], with_backend(backend, "web").await).await;
    let s = gw.dial(&web(SessionProtocol::Http2)).await;
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = |orig: &'static str| {
        let mut send = send.clone();
        async move {
            let rsp = send
                .send_request(
                    http::Request::builder()
                        .uri("http://web.shop.svc.cluster.local/hello?x=1")
                        .header("l5d-orig-proto", orig)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            let (parts, body) = rsp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts, String::from_utf8_lossy(&body).into_owned())
        }
    };
    // The backend answers these only once all eight are in at once: concurrent, not one after
    // the other on one backend connection (which would never finish).
    let answers = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join_all((0..8).map(|_| request("HTTP/1.1"))),
    )
    .await
    .expect("eight downgraded requests reach the backend at once");
    for (parts, body) in &answers {
        assert_eq!(parts.status, 200, "{body}");
        assert_eq!(parts.version, http::Version::HTTP_2);
        assert_eq!(parts.headers["l5d-orig-proto"], "HTTP/1.1", "{body}");
        assert_eq!(
            body,
            "version=HTTP/1.1 host=web.shop.svc.cluster.local:80 uri=/hello?x=1 orig-proto=false"
        );
    }
    let (parts, body) = request("HTTP/1.1; absolute-form").await;
    assert_eq!(parts.status, 200);
    assert!(
        body.contains("uri=http://web.shop.svc.cluster.local:80/hello?x=1"),
        "{body}"
    );
    let (_, body) = request("HTTP/1.0").await;
    assert!(body.starts_with("version=HTTP/1.0"), "{body}");
}

/// How a test writes a request head.
#[derive(Clone, Copy, Debug)]
enum Arrival {
    /// In one write.
    Whole,
    /// In 1 KiB writes.
    Pieces,
    /// All but the last 10 KiB in 1 KiB writes, then the rest in one: the shape that slipped a
    /// head over the limit through hyper's own check (which looks at its buffer only between
    /// reads); `proxy_http`'s test controls the reads exactly.
    Tail,
}

/// Sends one HTTP/1 request head of exactly `len` bytes; returns the status of the answer (0
/// for none: the connection was closed, or reset while the head was being written).
async fn head_of(gw: &Running, len: usize, arrival: Arrival) -> u16 {
    let mut s = gw.dial(&web(SessionProtocol::Http1)).await;
    let start = "GET /hello HTTP/1.1\r\nhost: x\r\nx-pad: ";
    let end = "\r\n\r\n";
    let head = format!("{start}{}{end}", "p".repeat(len - start.len() - end.len()));
    assert_eq!(head.len(), len);
    let head = head.as_bytes();
    let (pieces, tail) = match arrival {
        Arrival::Whole => (&head[..0], head),
        Arrival::Pieces => (head, &head[..0]),
        Arrival::Tail => head.split_at(len - 10 * 1024),
    };
    let written = async {
        for chunk in pieces.chunks(1024) {
            s.write_all(chunk).await?;
            s.flush().await?;
        }
        s.write_all(tail).await?;
        s.flush().await
    };
    // The gateway may answer and close before the whole head is written.
    let _ = written.await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("an answer or a close within 5 s");
    let line = String::from_utf8_lossy(&got);
    line.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The HTTP/1 head limit is exact: 64 KiB is served, a byte more is 431, however the bytes
/// arrive.
#[tokio::test]
async fn the_http1_head_limit_is_exact() {
    let backend = http_server("a", Arc::default()).await;
    let gw = start(&[], with_backend(backend, "web").await).await;
    let limit = proxy_http::MAX_HTTP1_HEAD;
    for arrival in [Arrival::Whole, Arrival::Pieces, Arrival::Tail] {
        assert_eq!(head_of(&gw, limit, arrival).await, 200, "{arrival:?}");
        for len in [limit + 1, limit + 6 * 1024, limit + 60 * 1024] {
            assert_eq!(head_of(&gw, len, arrival).await, 431, "{len} {arrival:?}");
        }
    }
}

const ATTACKER: &str = "attacker.shop.serviceaccount.identity.linkerd.cluster.local";

/// What the hostile-client backend has seen: uploads begun, bytes of large answers produced.
#[derive(Default)]
struct Seen {
    uploads: tokio::sync::watch::Sender<usize>,
    produced: tokio::sync::watch::Sender<usize>,
}

/// An HTTP/2 backend allowing 100 streams per connection (as a typical server): `/upload` reads
/// its request body to the end before answering, `/big` answers 8 MiB, anything else "hi".
async fn h2_backend(seen: Arc<Seen>) -> SocketAddr {
    use futures::StreamExt as _;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = match req.uri().path() {
                            "/upload" => {
                                seen.uploads.send_modify(|n| *n += 1);
                                let _ = req.into_body().collect().await;
                                http_body_util::Either::Left(Full::new(Bytes::from_static(
                                    b"uploaded",
                                )))
                            }
                            "/big" => {
                                let chunks = futures::stream::iter(0..128).map(move |_| {
                                    seen.produced.send_modify(|n| *n += 64 * 1024);
                                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                        Bytes::from(vec![0u8; 64 * 1024]),
                                    ))
                                });
                                http_body_util::Either::Right(http_body_util::StreamBody::new(
                                    chunks,
                                ))
                            }
                            _ => http_body_util::Either::Left(Full::new(Bytes::from_static(b"hi"))),
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(100)
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

impl Running {
    /// An HTTP/2 session through the gateway to `web.shop` as `id`.
    async fn h2_as<B>(&self, id: &str) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut tls = tls::connect(self.client_config(id), tcp, &Id::parse(GW).unwrap())
            .await
            .unwrap();
        tls.write_all(&web(SessionProtocol::Http2).encode())
            .await
            .unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }
}

fn h2_get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("http://web.shop.svc.cluster.local{path}"))
        .version(http::Version::HTTP_2)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Another client's requests, each answered in full within 5 s.
async fn others_are_served(gw: &Running) {
    let mut victim = gw.h2_as::<Full<Bytes>>(WEB).await;
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let sent = tokio::time::Instant::now();
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            let rsp = victim.send_request(h2_get("/hello")).await.unwrap();
            rsp.into_body().collect().await.unwrap().to_bytes()
        })
        .await;
        assert_eq!(
            answered.as_deref().ok(),
            Some(&b"hi"[..]),
            "request {i} of another client was not answered within 5 s"
        );
        slowest = slowest.max(sent.elapsed());
    }
    // A figure for the record (`--nocapture`), not an assertion: these machines are noisy.
    eprintln!("another client's 20 requests during the attack: slowest {slowest:?}");
}

/// A gateway in front of [`h2_backend`].
async fn attacked() -> (Arc<Seen>, Running) {
    let seen = Arc::new(Seen::default());
    let backend = h2_backend(seen.clone()).await;
    (
        seen.clone(),
        start(&[], with_backend(backend, "web").await).await,
    )
}

/// Waits until `what` of the backend reaches `n`.
async fn backend_reaches(what: &tokio::sync::watch::Sender<usize>, n: usize) {
    tokio::time::timeout(
        Duration::from_secs(10),
        what.subscribe().wait_for(|v| *v >= n),
    )
    .await
    .expect("the attack reached the backend within 10 s")
    .unwrap();
}

/// 200 uploads that never end fill a backend connection's 100 streams; they are one client's,
/// so they fill that client's connections only, and another client's requests go on.
#[tokio::test]
async fn stalled_uploads_stall_only_their_client() {
    let (seen, gw) = attacked().await;
    type Never = http_body_util::StreamBody<
        futures::stream::Pending<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>,
    >;
    let mut attacker = gw.h2_as::<Never>(ATTACKER).await;
    let mut uploads = Vec::new();
    for _ in 0..200 {
        let req = http::Request::post("http://web.shop.svc.cluster.local/upload")
            .version(http::Version::HTTP_2)
            .body(http_body_util::StreamBody::new(futures::stream::pending()))
            .unwrap();
        uploads.push(tokio::spawn(attacker.send_request(req)));
    }
    // The backend holds as many as one connection allows.
    backend_reaches(&seen.uploads, 100).await;
    others_are_served(&gw).await;
    assert!(
        uploads.iter().all(|u| !u.is_finished()),
        "the uploads still stall"
    );
}

/// Large answers a client never reads fill the flow-control windows of the connections they
/// come on; those are the client's own, so another client's answers still flow.
#[tokio::test]
async fn unread_answers_stall_only_their_client() {
    let (seen, gw) = attacked().await;
    let mut attacker = gw.h2_as::<Full<Bytes>>(ATTACKER).await;
    let mut unread = Vec::new();
    for _ in 0..6 {
        // Answered (headers), and the bodies never read.
        unread.push(attacker.send_request(h2_get("/big")).await.unwrap());
    }
    // More than an HTTP/2 connection's default window (5 MiB) is on its way or stuck.
    backend_reaches(&seen.produced, 4 << 20).await;
    others_are_served(&gw).await;
    drop(unread);
}

/// One identity holds at most its share of the forwarded connections; another identity is
/// not affected, and a closed connection gives its place back.
#[tokio::test]
async fn one_identity_holds_only_its_share() {
    let (backend, mut accepted) = counted_reverse_server().await;
    let gw = start(
        &["--max-connections-per-identity", "2"],
        with_backend(backend, "rev").await,
    )
    .await;
    let rev = header("rev.shop.svc.cluster.local", 80, None);
    let dial_as = |id: &'static str| {
        let gw = &gw;
        let rev = &rev;
        async move {
            let tcp = TcpStream::connect(gw.addr).await.unwrap();
            let mut tls = tls::connect(gw.client_config(id), tcp, &Id::parse(GW).unwrap())
                .await
                .unwrap();
            tls.write_all(&rev.encode()).await.unwrap();
            tls
        }
    };
    let first = dial_as(WEB).await;
    let mut second = dial_as(WEB).await;
    // Both forwarded (the backend has them) before the third comes.
    tokio::time::timeout(Duration::from_secs(5), accepted.wait_for(|n| *n >= 2))
        .await
        .expect("both forwarded within 5 s")
        .unwrap();
    let mut third = dial_as(WEB).await;
    gw.expect_refused("identity_share", 1).await;
    assert!(closed(&mut third).await);
    let mut other = dial_as(ATTACKER).await;
    assert_eq!(reversed(&mut other, b"abc").await, b"cba");
    assert_eq!(reversed(&mut second, b"xyz").await, b"zyx");
    drop((first, second, other));
    // The places come back once the gateway has seen the connections end.
    gw.wait_metric("tcp_open_connections{direction=\"inbound\"}", |open| {
        open == 0
    })
    .await;
    let mut again = dial_as(WEB).await;
    assert_eq!(reversed(&mut again, b"ok").await, b"ko");
}

/// The identity of the meshed Pods of these tests (ServiceAccount `api` of `shop`), issued by
/// the gateway's own control plane.
const API: &str = "api.shop.serviceaccount.identity.linkerd.cluster.local";

/// A meshed Pod's proxy as the gateway meets it, with a certificate for the identity it is
/// given. On `app` (the application's port, as redirected to the proxy) it terminates TLS and
/// serves HTTP/1 or HTTP/2 (as meshlink-proxy's inbound side detects it), answering with the
/// client identity its certificate proved; on `inbound` (the proxy's inbound port) it takes
/// mTLS with ALPN `transport.l5d.io/v1` and a transport header, then answers an opaque stream,
/// once the client half-closes, with the client identity, the header's port and the bytes
/// reversed. `served` counts requests and opaque streams.
struct PodProxy {
    app: SocketAddr,
    inbound: SocketAddr,
    served: Arc<std::sync::atomic::AtomicUsize>,
}

async fn pod_proxy(pki: &TestPki, id: &str) -> PodProxy {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let creds = pki.creds(id);
    let served = Arc::new(AtomicUsize::new(0));
    let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (app_addr, inbound_addr) = (app.local_addr().unwrap(), inbound.local_addr().unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&creds, &[]));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = app.accept().await.unwrap();
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls::client_id(tls.get_ref().1).map(|id| id.to_string());
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    count.fetch_add(1, Ordering::Relaxed);
                    let body = format!(
                        "tls-client={} version={:?}",
                        client.as_deref().unwrap_or("none"),
                        req.version()
                    );
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&creds, &[PROTOCOL]));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = inbound.accept().await.unwrap();
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls::client_id(tls.get_ref().1).map(|id| id.to_string());
                let Ok((header, rest)) = proxy_transport_header::read(&mut tls).await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let mut stream = proxy_transport_header::Prefixed::new(rest, tls);
                let mut buf = Vec::new();
                stream.read_to_end(&mut buf).await.unwrap();
                buf.reverse();
                let answer = format!(
                    "tls-client={} port={} name={:?} protocol={:?} {}",
                    client.as_deref().unwrap_or("none"),
                    header.port,
                    header.name,
                    header.protocol,
                    String::from_utf8_lossy(&buf)
                );
                stream.write_all(answer.as_bytes()).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    PodProxy {
        app: app_addr,
        inbound: inbound_addr,
        served,
    }
}

/// A Pod of `shop` running as ServiceAccount `sa`, with `label` on
/// `linkerd.io/control-plane-ns` and, when it has one, its proxy on `inbound_port`.
fn pod(name: &str, sa: &str, label: Option<&str>, inbound_port: Option<u16>) -> Pod {
    let mut containers = vec![Container {
        name: "app".into(),
        ..Container::default()
    }];
    if let Some(port) = inbound_port {
        containers.push(Container {
            name: "linkerd-proxy".into(),
            env: Some(vec![EnvVar {
                name: "LINKERD2_PROXY_INBOUND_LISTEN_ADDR".into(),
                value: Some(format!("0.0.0.0:{port}")),
                ..EnvVar::default()
            }]),
            ..Container::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            labels: label.map(|l| [(CONTROL_PLANE_NS_LABEL.to_owned(), l.to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.into()),
            containers,
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A gateway of the mesh its identity names (control plane `linkerd`, `cluster.local`), with
/// Service `api` (port 80) whose one endpoint, at `app`, is the Pod `pod`.
async fn meshed_gateway() -> Running {
    let mesh = Mesh::of(&Id::parse(GW).unwrap());
    assert!(mesh.is_some(), "the gateway's identity names its mesh");
    let d = Discovery::new(mesh);
    d.apply_service(&service("api", 80));
    d.mark_synced();
    start(&[], d).await
}

/// Points Service `api` at `app`, an endpoint whose `targetRef` is `pod`.
fn api_endpoint(gw: &Running, app: SocketAddr, pod: &Pod) {
    let mut slice = slice("api", &[app]);
    for e in slice.endpoints.iter_mut().flatten() {
        e.target_ref = Some(ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("shop".into()),
            name: pod.metadata.name.clone(),
            ..ObjectReference::default()
        });
    }
    gw.discovery.apply_pod(pod);
    gw.discovery.apply_slice(&slice);
}

fn api(protocol: Option<SessionProtocol>) -> Header {
    header("api.shop.svc.cluster.local", 80, protocol)
}

const BOTH: [SessionProtocol; 2] = [SessionProtocol::Http1, SessionProtocol::Http2];

/// A meshed endpoint is dialled over mTLS: its proxy sees the gateway's certificate. HTTP goes
/// to the application's port in the version the client spoke; opaque TCP to the proxy's
/// inbound port with a transport header naming the application's port.
#[tokio::test]
async fn meshed_endpoints_are_dialled_with_mtls_as_the_gateway() {
    let gw = meshed_gateway().await;
    let proxy = pod_proxy(&gw.pki, API).await;
    let api_0 = pod("api-0", "api", Some("linkerd"), Some(proxy.inbound.port()));
    api_endpoint(&gw, proxy.app, &api_0);
    for version in BOTH {
        let rsp = http_request(gw.dial(&api(Some(version))).await, version, None).await;
        assert_eq!(rsp.status(), 200, "{version:?}");
        let body = String::from_utf8_lossy(rsp.body()).into_owned();
        let expected = match version {
            SessionProtocol::Http1 => "HTTP/1.1",
            SessionProtocol::Http2 => "HTTP/2.0",
        };
        assert_eq!(body, format!("tls-client={GW} version={expected}"));
    }
    let mut s = gw.dial(&api(None)).await;
    assert_eq!(
        String::from_utf8(reversed(&mut s, b"hello pod").await).unwrap(),
        format!(
            "tls-client={GW} port={} name=None protocol=None dop olleh",
            proxy.app.port()
        )
    );
    assert_eq!(proxy.served.load(std::sync::atomic::Ordering::Relaxed), 3);
}

/// Endpoints that are not this mesh's (no Pod, a Pod without the label, a Pod of another
/// control plane) are dialled in plaintext, as before.
#[tokio::test]
async fn unmeshed_endpoints_are_dialled_in_plaintext() {
    for unmeshed in [
        None,
        Some(pod("api-0", "api", None, None)),
        Some(pod("api-0", "api", Some("other-linkerd"), Some(4143))),
    ] {
        let gw = meshed_gateway().await;
        let seen = Arc::default();
        let http = http_server("plain", seen).await;
        let tcp = reverse_server().await;
        for (backend, protocols) in [(http, &BOTH[..]), (tcp, &[][..])] {
            match &unmeshed {
                Some(p) => api_endpoint(&gw, backend, p),
                None => gw.discovery.apply_slice(&slice("api", &[backend])),
            }
            for &version in protocols {
                let rsp = http_request(gw.dial(&api(Some(version))).await, version, None).await;
                assert_eq!(rsp.status(), 200, "{unmeshed:?} {version:?}");
                let body = String::from_utf8_lossy(rsp.body()).into_owned();
                assert!(body.starts_with("server=plain"), "{body}");
            }
        }
        let mut s = gw.dial(&api(None)).await;
        assert_eq!(reversed(&mut s, b"abc").await, b"cba", "{unmeshed:?}");
    }
}

/// A meshed endpoint whose certificate names another identity than its Pod's is not used: the
/// dial fails as a refused connection does (HTTP answers 502, opaque TCP is refused with
/// `no_endpoints`), and nothing reaches it.
#[tokio::test]
async fn a_meshed_endpoint_proving_another_identity_is_refused() {
    let gw = meshed_gateway().await;
    let impostor = pod_proxy(
        &gw.pki,
        "db.shop.serviceaccount.identity.linkerd.cluster.local",
    )
    .await;
    let api_0 = pod(
        "api-0",
        "api",
        Some("linkerd"),
        Some(impostor.inbound.port()),
    );
    api_endpoint(&gw, impostor.app, &api_0);
    for version in BOTH {
        let rsp = http_request(gw.dial(&api(Some(version))).await, version, None).await;
        assert_eq!(rsp.status(), 502, "{version:?}");
    }
    assert_eq!(
        gw.metric("inbound_http_statuses_total{http_status=\"502\"}"),
        2
    );
    let mut s = gw.dial(&api(None)).await;
    assert!(closed(&mut s).await);
    gw.expect_refused("no_endpoints", 1).await;
    assert_eq!(
        impostor.served.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
