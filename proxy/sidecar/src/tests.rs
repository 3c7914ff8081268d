//! The proxy in process, over real sockets on loopback, with rcgen certificates: a client-side
//! proxy's outbound and a server-side proxy's inbound, discovery answered by the in-memory
//! control-plane peer. Original destinations are given, as iptables would have.

use proxy_identity::testing::TestPki;
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use linkerd2_proxy_api::destination::{
    DestinationProfile, ProtocolHint, TlsIdentity, Update, WeightedAddr, WeightedAddrSet,
    protocol_hint::{self, H2},
    tls_identity::{DnsLikeIdentity, Strategy},
    update,
};
use proxy_discovery::{DefaultPolicy, InboundPolicies, Resolver, testing};
use proxy_identity::tls;
use proxy_transport::direct::{Admission, Limits};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{Inbound, Metrics, Outbound, config::Timeouts, endpoint::Dialer};

const CLIENT: &str = "client.shop.serviceaccount.identity.linkerd.cluster.local";
const SERVER: &str = "web.shop.serviceaccount.identity.linkerd.cluster.local";
/// The Service the application calls (never dialled: discovery answers for it).
const SERVICE: &str = "10.96.0.10:80";
/// An address outside the pod, as a client of the server pod appears.
const REMOTE_IP: [u8; 4] = [10, 1, 0, 9];

fn timeouts(failfast: Duration) -> Timeouts {
    Timeouts {
        detect: Duration::from_secs(60),
        connect: Duration::from_secs(1),
        failfast,
        idle: Duration::from_secs(60),
    }
}

/// What the application saw of a request.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    version: http::Version,
    client_id: Option<String>,
    orig_proto: bool,
}

/// An HTTP application on loopback (HTTP/1 or, with `h2`, HTTP/2) that records each request
/// and answers `ok`.
async fn app(h2: bool) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let (addr, seen, _) = app_counting(h2).await;
    (addr, seen)
}

/// [`app`], and how many connections it accepted.
async fn app_counting(
    h2: bool,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<Seen>>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = seen.clone();
    let counted = conns.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let record = record.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                record.lock().unwrap().push(Seen {
                    version: req.version(),
                    client_id: req
                        .headers()
                        .get("l5d-client-id")
                        .map(|v| v.to_str().unwrap().to_owned()),
                    orig_proto: req.headers().contains_key("l5d-orig-proto"),
                });
                async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(tcp);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, seen, conns)
}

/// The server pod's proxy: its inbound port, for connections sent to `app`'s port, clients
/// appearing at `client_ip` (not loopback, which policy always allows).
async fn server_proxy(
    pki: &TestPki,
    app: SocketAddr,
    policy: DefaultPolicy,
    client_ip: std::net::IpAddr,
) -> (SocketAddr, Metrics) {
    server_proxy_with(pki, app, policy, client_ip, Vec::new()).await
}

/// [`server_proxy`] with ports configured opaque.
async fn server_proxy_with(
    pki: &TestPki,
    app: SocketAddr,
    policy: DefaultPolicy,
    client_ip: std::net::IpAddr,
    opaque_ports: Vec<u16>,
) -> (SocketAddr, Metrics) {
    let creds = pki.creds(SERVER);
    let (channel, calls) = testing::peer();
    // The policy service never answers: the port keeps the default policy.
    std::mem::forget(calls);
    let policies = InboundPolicies::new(channel, r#"{"ns":"shop","pod":"web-0"}"#.into(), policy);
    let metrics = Metrics::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let direct = Admission::new(
        creds.id().clone(),
        tls::server_config(&creds, &[proxy_transport_header::PROTOCOL]),
        Limits {
            handshake_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(5),
            max_handshakes: 16,
            max_connections: 100,
            per_identity: 100,
        },
    );
    let inbound = Inbound::new(
        &creds,
        direct,
        policies,
        opaque_ports,
        addr.port(),
        timeouts(Duration::from_secs(1)),
        metrics.clone(),
    );
    let orig = SocketAddr::new([10, 1, 0, 7].into(), app.port());
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let peer = SocketAddr::new(client_ip, peer.port());
            tokio::spawn(
                inbound
                    .clone()
                    .handle_to(tcp, peer, orig, CancellationToken::new()),
            );
        }
    });
    (addr, metrics)
}

/// Discovery's answers: the endpoints of every target, and whether ports are opaque.
#[derive(Clone, Default)]
struct Answers {
    endpoints: Arc<Mutex<Vec<WeightedAddr>>>,
    opaque: bool,
    /// Names are not discovery's (only addresses are).
    unknown_names: bool,
    calls: Arc<Mutex<Vec<testing::GetCall>>>,
}

fn meshed(addr: SocketAddr, id: &str) -> WeightedAddr {
    WeightedAddr {
        addr: Some(addr.into()),
        weight: 10_000,
        tls_identity: Some(TlsIdentity {
            strategy: Some(Strategy::DnsLikeIdentity(DnsLikeIdentity {
                name: id.into(),
            })),
            server_name: None,
        }),
        protocol_hint: Some(ProtocolHint {
            protocol: Some(protocol_hint::Protocol::H2(H2 {})),
            opaque_transport: None,
        }),
        metric_labels: HashMap::from([("service".to_owned(), "web".to_owned())]),
        ..Default::default()
    }
}

fn add(addrs: Vec<WeightedAddr>) -> Update {
    Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs,
            metric_labels: HashMap::new(),
        })),
    }
}

/// The client pod's proxy: an outbound listener whose connections all went to [`SERVICE`].
async fn client_proxy(
    pki: &TestPki,
    answers: Answers,
    failfast: Duration,
) -> (SocketAddr, Metrics) {
    let creds = pki.creds(CLIENT);
    let (channel, mut calls) = testing::peer();
    let a = answers.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(call) = calls.get.recv() => {
                    let by_name = call.request.path.parse::<SocketAddr>().is_err();
                    if a.unknown_names && by_name {
                        call.fail(tonic::Status::invalid_argument("not a cluster name"));
                        continue;
                    }
                    call.send(add(a.endpoints.lock().unwrap().clone()));
                    a.calls.lock().unwrap().push(call);
                }
                Some(call) = calls.profile.recv() => {
                    call.send(DestinationProfile { opaque_protocol: a.opaque, ..Default::default() });
                    std::mem::forget(call);
                }
                else => break,
            }
        }
    });
    let metrics = Metrics::default();
    let outbound = Outbound::new(
        timeouts(failfast),
        Dialer::new(&creds, Duration::from_secs(1)),
        Resolver::new(channel, String::new(), Duration::from_secs(5)),
        metrics.clone(),
        Duration::from_secs(5),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let orig: SocketAddr = SERVICE.parse().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(
                outbound
                    .clone()
                    .handle_to(tcp, orig, CancellationToken::new()),
            );
        }
    });
    (addr, metrics)
}

/// A client proxy and a server proxy (`all-authenticated`, in front of `app`), the client's
/// discovery answering with the server proxy as a meshed endpoint besides what `answers` says:
/// both proxies' addresses and metrics.
async fn meshed_pair(pki: &TestPki, app: SocketAddr, answers: Answers) -> Pair {
    let (inbound, server_metrics) =
        server_proxy(pki, app, DefaultPolicy::AllAuthenticated, REMOTE_IP.into()).await;
    answers
        .endpoints
        .lock()
        .unwrap()
        .push(meshed(inbound, SERVER));
    let (outbound, client_metrics) = client_proxy(pki, answers, Duration::from_secs(3)).await;
    Pair {
        outbound,
        inbound,
        client_metrics,
        server_metrics,
    }
}

/// What [`meshed_pair`] started.
struct Pair {
    /// The client proxy's outbound listener (connections to it went to [`SERVICE`]).
    outbound: SocketAddr,
    /// The server proxy's inbound listener.
    inbound: SocketAddr,
    client_metrics: Metrics,
    server_metrics: Metrics,
}

fn text(metrics: &Metrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    out
}

/// An unmodified HTTP/1.1 client's request: status, body and headers.
async fn get(proxy: SocketAddr, headers: &[(&str, &str)]) -> (u16, String, http::HeaderMap) {
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .uri("/hello")
        .header("host", "web.shop.svc.cluster.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = send
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), headers)
}

/// HTTP/1.1 from an unmodified client crosses the proxies as HTTP/2 over mTLS and reaches the
/// application as HTTP/1.1 again, with the client's verified identity and no forged one;
/// both proxies' metrics say who talked to whom.
#[tokio::test]
async fn http1_round_trip_over_mtls() {
    let pki = TestPki::new();
    let (app, seen) = app(false).await;
    let Pair {
        outbound,
        inbound,
        client_metrics,
        server_metrics,
    } = meshed_pair(&pki, app, Answers::default()).await;

    let (status, body, headers) = get(outbound, &[("l5d-client-id", "admin.kube-system")]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(!headers.contains_key("l5d-orig-proto"), "{headers:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [Seen {
            version: http::Version::HTTP_11,
            client_id: Some(CLIENT.into()),
            orig_proto: false,
        }]
    );
    let out = text(&client_metrics);
    assert!(
        out.contains(&format!(r#"response_total{{direction="outbound",authority="web.shop.svc.cluster.local:80",target_addr="{inbound}""#))
            && out.contains(&format!(r#"tls="true",server_id="{SERVER}",dst_service="web",status_code="200",classification="success"}} 1"#)),
        "{out}"
    );
    let inb = text(&server_metrics);
    assert!(
        inb.contains(&format!(
            r#"tls="true",client_id="{CLIENT}",status_code="200""#
        )),
        "{inb}"
    );
}

/// gRPC (HTTP/2 prior knowledge) stays HTTP/2 end to end.
#[tokio::test]
async fn http2_stays_http2() {
    let pki = TestPki::new();
    let (app, seen) = app(true).await;
    let Pair { outbound, .. } = meshed_pair(&pki, app, Answers::default()).await;

    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("http://web.shop.svc.cluster.local/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert_eq!(seen[0].client_id.as_deref(), Some(CLIENT));
}

/// The proxy's own answers: no endpoint within the fail-fast timeout is a 503, an endpoint
/// that refuses the connection a 502, each with `l5d-proxy-error`.
#[tokio::test]
async fn errors_as_linkerd_answers_them() {
    let pki = TestPki::new();
    // No endpoints at all.
    let (outbound, metrics) =
        client_proxy(&pki, Answers::default(), Duration::from_millis(200)).await;
    let (status, _, headers) = get(outbound, &[]).await;
    assert_eq!(status, 503);
    assert!(headers.contains_key("l5d-proxy-error"), "{headers:?}");
    assert!(text(&metrics).contains(r#"status_code="503""#));

    // An endpoint whose port is closed.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let answers = Answers::default();
    answers
        .endpoints
        .lock()
        .unwrap()
        .push(meshed(closed, SERVER));
    let (outbound, _) = client_proxy(&pki, answers, Duration::from_secs(3)).await;
    let (status, _, headers) = get(outbound, &[]).await;
    assert_eq!(status, 502);
    assert!(headers.contains_key("l5d-proxy-error"), "{headers:?}");
}

/// A connect timeout is told apart from other connect errors (504, not 502), through the
/// error chains hyper wraps it in.
#[test]
fn connect_timeouts_are_504s() {
    let timeout = crate::endpoint::DialError::Connect(proxy_transport::tcp::ConnectError::Timeout(
        "10.1.0.7:80".parse().unwrap(),
    ));
    assert!(crate::endpoint::is_connect_timeout(&timeout));
    let wrapped = std::io::Error::other(timeout);
    assert!(crate::endpoint::is_connect_timeout(&wrapped));
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert!(!crate::endpoint::is_connect_timeout(&refused));
}

/// Each default inbound policy, for a plaintext client from another pod and for a meshed one.
#[tokio::test]
async fn inbound_policies() {
    let pki = TestPki::new();
    let (app, _) = app(false).await;
    for (policy, plain_allowed) in [
        (DefaultPolicy::AllUnauthenticated, true),
        (DefaultPolicy::AllAuthenticated, false),
        ("cluster-unauthenticated".parse().unwrap(), true),
        (DefaultPolicy::Deny, false),
    ] {
        let name = policy.name();
        let (inbound, metrics) = server_proxy(&pki, app, policy.clone(), REMOTE_IP.into()).await;
        // Plaintext HTTP: 403 when refused.
        let (status, _, _) = get(inbound, &[]).await;
        assert_eq!(
            status == 200,
            plain_allowed,
            "{name}: plaintext got {status}"
        );
        if !plain_allowed {
            assert_eq!(status, 403, "{name}");
            assert!(
                text(&metrics).contains("inbound_http_authz_deny_total"),
                "{name}"
            );
        }
        // Meshed (mTLS with SNI = the server's identity), through a client proxy.
        let answers = Answers::default();
        answers
            .endpoints
            .lock()
            .unwrap()
            .push(meshed(inbound, SERVER));
        let (outbound, _) = client_proxy(&pki, answers, Duration::from_secs(3)).await;
        let (status, _, _) = get(outbound, &[]).await;
        let meshed_allowed = policy != DefaultPolicy::Deny;
        assert_eq!(status == 200, meshed_allowed, "{name}: meshed got {status}");
    }
}

/// Opaque TCP refused by policy is closed without a byte.
#[tokio::test]
async fn refused_tcp_is_closed() {
    let pki = TestPki::new();
    let (app, _) = app(false).await;
    let (inbound, metrics) = server_proxy(&pki, app, DefaultPolicy::Deny, REMOTE_IP.into()).await;
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(b"\x00\x01binary protocol\r\n").await.unwrap();
    let mut buf = Vec::new();
    let n = tcp.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert!(text(&metrics).contains("inbound_tcp_authz_deny_total"));
}

/// A server-speaks-first application (SMTP, a database): it greets each client at once.
async fn banner_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(GREETING).await.unwrap();
        let _ = tcp.read(&mut [0u8; 16]).await;
    });
    addr
}

const GREETING: &[u8] = b"220 ready\r\n";

/// A client of `proxy` that sends nothing gets the banner server's greeting, well before the
/// detect timeout (60 s in these tests) would have let it through.
async fn greeted(proxy: SocketAddr) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let mut buf = [0u8; GREETING.len()];
    tokio::time::timeout(Duration::from_secs(30), tcp.read_exact(&mut buf))
        .await
        .expect("the greeting came before the detect timeout")
        .unwrap();
    assert_eq!(&buf, GREETING);
}

/// A server-speaks-first protocol on a port discovery marks opaque: the client's proxy does not
/// wait for the client's first bytes, so the server's greeting arrives (detection would hold the
/// connection for the detect timeout, 60 s here, first).
#[tokio::test]
async fn opaque_ports_skip_detection() {
    let pki = TestPki::new();
    let banner = banner_server().await;
    let answers = Answers {
        opaque: true,
        ..Answers::default()
    };
    // A plaintext endpoint (not meshed): forwarded as bytes.
    answers.endpoints.lock().unwrap().push(WeightedAddr {
        addr: Some(banner.into()),
        weight: 1,
        ..Default::default()
    });
    let (outbound, metrics) = client_proxy(&pki, answers, Duration::from_secs(3)).await;
    greeted(outbound).await;
    let out = text(&metrics);
    assert!(
        out.contains(r#"tcp_open_total{direction="outbound""#)
            && out.contains(r#"tls="no_identity""#),
        "{out}"
    );
}

/// The balancer: a slow endpoint gets fewer requests; an endpoint discovery removed gets none
/// once the update is in.
#[tokio::test(start_paused = true)]
async fn balancer_prefers_fast_endpoints_and_forgets_removed_ones() {
    use proxy_discovery::{Endpoint, Resolution};

    use crate::{balance::Balancer, endpoint::plain_endpoint};

    let fast: SocketAddr = "10.1.0.1:80".parse().unwrap();
    let slow: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let set = |addrs: &[SocketAddr]| {
        Resolution::Endpoints(Arc::new(
            addrs
                .iter()
                .map(|a| (*a, plain_endpoint(*a)))
                .collect::<BTreeMap<_, Endpoint>>(),
        ))
    };
    let (tx, rx) = tokio::sync::watch::channel(set(&[fast, slow]));
    let balancer = Balancer::new(
        rx,
        |ep: Arc<Endpoint>| {
            tower::service_fn(move |()| {
                let addr = ep.addr;
                async move {
                    if addr.ip().to_string().ends_with(".2") {
                        // The slow endpoint's own latency, which peak-EWMA measures: the paused
                        // clock moves on by 50 ms while it answers (nothing waits for real).
                        tokio::time::advance(Duration::from_millis(50)).await;
                    }
                    Ok::<_, Infallible>(addr)
                }
            })
        },
        Duration::from_secs(1),
    );
    let mut counts: BTreeMap<SocketAddr, u32> = BTreeMap::new();
    for _ in 0..200 {
        *counts.entry(balancer.call(()).await.unwrap()).or_default() += 1;
    }
    let slow_share = counts.get(&slow).copied().unwrap_or(0);
    assert!(slow_share < 20, "{counts:?}");

    tx.send(set(&[slow])).unwrap();
    counts.clear();
    for _ in 0..20 {
        *counts.entry(balancer.call(()).await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.get(&fast), None, "{counts:?}");
    assert_eq!(counts.get(&slow), Some(&20));
}

/// An endpoint whose connections fail is not picked again while it backs off: with another
/// endpoint ready, the requests after the first failure all succeed.
#[tokio::test(start_paused = true)]
async fn failing_endpoints_back_off() {
    use proxy_discovery::{Endpoint, Resolution};

    use crate::{
        balance::{AnyError, Backoff, Balancer},
        endpoint::plain_endpoint,
    };

    let good: SocketAddr = "10.1.0.1:80".parse().unwrap();
    let down: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let set = Resolution::Endpoints(Arc::new(
        [good, down]
            .iter()
            .map(|a| (*a, plain_endpoint(*a)))
            .collect::<BTreeMap<_, Endpoint>>(),
    ));
    let (_tx, rx) = tokio::sync::watch::channel(set);
    let balancer = Balancer::new(
        rx,
        |ep: Arc<Endpoint>| {
            let svc = tower::service_fn(move |()| {
                let addr = ep.addr;
                async move {
                    if addr.ip().to_string().ends_with(".2") {
                        Err("connection refused")
                    } else {
                        Ok(addr)
                    }
                }
            });
            Backoff::<_, AnyError>::new(svc)
        },
        Duration::from_secs(1),
    );
    let mut failures = 0;
    for _ in 0..100 {
        if balancer.call(()).await.is_err() {
            failures += 1;
        }
    }
    // The down endpoint is picked at most once before its first backoff (100 ms or more,
    // longer than these 100 requests take on paused time), so at most one request fails.
    assert!(failures <= 1, "{failures} requests failed");
}

/// A balancer keeps hearing discovery for as long as it lives, past the resolver's idle
/// timeout (which closes streams no one holds): an endpoint removed a minute later gets no
/// more requests.
#[tokio::test(start_paused = true)]
async fn balancers_hold_their_discovery_open() {
    use linkerd2_proxy_api::destination::AddrSet;
    use proxy_discovery::{Endpoint, Resolution};

    use crate::balance::Balancer;

    let a: SocketAddr = "10.1.0.1:80".parse().unwrap();
    let b: SocketAddr = "10.1.0.2:80".parse().unwrap();
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), Duration::from_secs(5));
    let mut resolve = resolver.resolve("web.shop.svc.cluster.local:80");
    let call = calls.get.recv().await.unwrap();
    let plain = |addr: SocketAddr| WeightedAddr {
        addr: Some(addr.into()),
        weight: 1,
        ..Default::default()
    };
    call.send(add(vec![plain(a), plain(b)]));
    resolve.first().await;
    let mut endpoints = resolve.watch();
    let balancer = Balancer::discovered(
        resolve,
        |ep: Arc<Endpoint>| {
            tower::service_fn(move |()| std::future::ready(Ok::<_, Infallible>(ep.addr)))
        },
        Duration::from_secs(1),
    );
    assert!(balancer.call(()).await.is_ok());
    // The stream stays open past twelve idle timeouts (paused time) while the balancer lives.
    let closed = tokio::time::timeout(Duration::from_secs(60), call.answers.closed()).await;
    assert!(
        closed.is_err(),
        "the Get stream was closed under a live balancer"
    );
    call.send(Update {
        update: Some(update::Update::Remove(AddrSet {
            addrs: vec![b.into()],
        })),
    });
    endpoints
        .wait_for(|r| matches!(r, Resolution::Endpoints(e) if !e.contains_key(&b)))
        .await
        .unwrap();
    for _ in 0..20 {
        assert_eq!(balancer.call(()).await.unwrap(), a);
    }
}

/// Requests of many HTTP/1 clients, multiplexed between the proxies, reach an HTTP/1
/// application on pooled connections: as many as were in flight at once, not one per request.
#[tokio::test]
async fn the_application_gets_pooled_connections() {
    let pki = TestPki::new();
    let (app, seen, conns) = app_counting(false).await;
    let Pair { outbound, .. } = meshed_pair(&pki, app, Answers::default()).await;
    let clients = (0..8).map(|_| {
        tokio::spawn(async move {
            let tcp = TcpStream::connect(outbound).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            for _ in 0..25 {
                let req = Request::builder()
                    .uri("/")
                    .header("host", "web.shop.svc.cluster.local")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let rsp = send.send_request(req).await.unwrap();
                assert_eq!(rsp.status(), 200);
                rsp.into_body().collect().await.unwrap();
            }
        })
    });
    for c in clients.collect::<Vec<_>>() {
        c.await.unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), 200);
    let opened = conns.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        opened <= 8,
        "{opened} connections for 200 requests of 8 clients"
    );
}

/// A plaintext client of an opaque port whose server speaks first (a database, SMTP) gets the
/// greeting at once: the inbound side does not wait for the client's first bytes (it would for
/// the detect timeout, 60 s here).
#[tokio::test]
async fn inbound_opaque_ports_let_the_server_speak_first() {
    let pki = TestPki::new();
    let banner = banner_server().await;
    let (inbound, _) = server_proxy_with(
        &pki,
        banner,
        DefaultPolicy::AllUnauthenticated,
        REMOTE_IP.into(),
        vec![banner.port()],
    )
    .await;
    greeted(inbound).await;
}

/// An endpoint that does not answer the connection attempt within the connect timeout is a
/// 504, not a 502: here a listener whose accept queue is full, so that the kernel drops the
/// proxy's SYNs (all on loopback).
#[tokio::test]
async fn a_connect_timeout_is_a_504() {
    let pki = TestPki::new();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let silent: SocketAddr = socket.local_addr().unwrap().as_socket().unwrap();
    // Connections the listener never accepts, until one is not even answered: the queue is full.
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(silent)).await {
            Ok(Ok(tcp)) => held.push(tcp),
            Ok(Err(e)) => panic!("connecting to fill the queue: {e}"),
            Err(_) => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    let answers = Answers::default();
    answers
        .endpoints
        .lock()
        .unwrap()
        .push(meshed(silent, SERVER));
    let (outbound, metrics) = client_proxy(&pki, answers, Duration::from_secs(3)).await;
    let (status, _, headers) = get(outbound, &[]).await;
    assert_eq!(status, 504, "{headers:?}");
    assert_eq!(headers["l5d-proxy-error"], "endpoint connect timed out");
    assert!(text(&metrics).contains(r#"status_code="504""#));
    drop((socket, held));
}

/// Which discovery target a request has, and its authority.
#[test]
fn requests_are_routed_by_name_else_by_address() {
    let orig: SocketAddr = "10.96.0.10:8080".parse().unwrap();
    let req = |uri: &str, host: Option<&str>| {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    };
    let cases = [
        // (uri, Host, target, authority)
        (
            "/",
            Some("web.shop.svc.cluster.local"),
            "web.shop.svc.cluster.local:8080",
            "web.shop.svc.cluster.local",
        ),
        (
            "/",
            Some("Web.Shop.svc.cluster.local.:80"),
            "web.shop.svc.cluster.local:80",
            "Web.Shop.svc.cluster.local.:80",
        ),
        (
            "http://api.example.com/x",
            Some("ignored"),
            "api.example.com:8080",
            "api.example.com",
        ),
        (
            "/",
            Some("10.96.0.10:8080"),
            "10.96.0.10:8080",
            "10.96.0.10:8080",
        ),
        ("/", Some("[fd00::1]:80"), "10.96.0.10:8080", "[fd00::1]:80"),
        ("/", None, "10.96.0.10:8080", "10.96.0.10:8080"),
        ("/", Some("bad host!"), "10.96.0.10:8080", "10.96.0.10:8080"),
    ];
    for (uri, host, target, authority) in cases {
        assert_eq!(
            crate::outbound::target_of(&req(uri, host), orig),
            (target.to_owned(), authority.to_owned()),
            "{uri} {host:?}"
        );
    }
}

/// A name discovery does not know (a short name the application's resolver completed) is routed
/// by its original destination, the Service's address, and stays in the mesh.
#[tokio::test]
async fn unknown_names_fall_back_to_the_original_destination() {
    let pki = TestPki::new();
    let (app, seen) = app(false).await;
    let Pair { outbound, .. } = meshed_pair(
        &pki,
        app,
        Answers {
            unknown_names: true,
            ..Answers::default()
        },
    )
    .await;
    let (status, body, _) = get(outbound, &[]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(seen.lock().unwrap()[0].client_id.as_deref(), Some(CLIENT));
}

/// An application that accepts `Upgrade: echo` and then echoes what it reads.
async fn upgrading_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|mut req: Request<Incoming>| async move {
                let upgraded = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = upgraded.await {
                        let mut io = TokioIo::new(up);
                        let mut buf = [0u8; 64];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                let rsp = Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                Ok::<_, Infallible>(rsp)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades(),
            );
        }
    });
    addr
}

/// An HTTP/1.1 upgrade (as WebSocket does) crosses both proxies: the application answers 101,
/// and bytes then flow both ways on the upgraded connection, over the proxies' mTLS.
#[tokio::test]
async fn upgrades_cross_both_proxies() {
    let pki = TestPki::new();
    let app = upgrading_app().await;
    let Pair { outbound, .. } = meshed_pair(&pki, app, Answers::default()).await;
    let mut tcp = TcpStream::connect(outbound).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: web.shop.svc.cluster.local\r\nconnection: Upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    tcp.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echo))
        .await
        .expect("the echo came back")
        .unwrap();
    assert_eq!(&echo, b"ping");
}
