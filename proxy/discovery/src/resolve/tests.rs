use linkerd2_proxy_api::{
    destination::{
        AddrSet, AuthorityOverride, NoEndpoints, ProtocolHint, Update, WeightedAddrSet,
        protocol_hint::{H2, Opaque, OpaqueTransport},
        tls_identity::{DnsLikeIdentity, UriLikeIdentity},
    },
    net::TcpAddress,
};
use tonic::Status;

use super::*;
use crate::{
    backoff,
    testing::{self, settle},
};

const ID: &str = "web.ns1.serviceaccount.identity.linkerd.cluster.local";
const GW: &str =
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> WeightedAddr {
    WeightedAddr {
        addr: Some(sa(s).into()),
        weight: 10_000,
        ..Default::default()
    }
}

fn dns(name: &str) -> TlsIdentity {
    TlsIdentity {
        strategy: Some(tls_identity::Strategy::DnsLikeIdentity(DnsLikeIdentity {
            name: name.into(),
        })),
        server_name: None,
    }
}

fn plain(s: &str) -> Endpoint {
    Endpoint {
        addr: sa(s),
        weight: 10_000,
        identity: None,
        server_name: None,
        hint: Hint::Unknown,
        opaque_transport_port: None,
        authority_override: None,
        labels: BTreeMap::new(),
    }
}

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

#[test]
fn endpoints_from_weighted_addrs() {
    let set_labels = HashMap::from([
        ("namespace".to_owned(), "ns1".to_owned()),
        ("service".to_owned(), "web".to_owned()),
    ]);
    let cases: Vec<(&str, WeightedAddr, Result<Endpoint, Malformed>)> = vec![
        (
            "a plain address",
            addr("10.0.0.1:80"),
            Ok(plain("10.0.0.1:80")),
        ),
        (
            "meshed, with an H2 hint and opaque transport",
            WeightedAddr {
                tls_identity: Some(dns(ID)),
                protocol_hint: Some(ProtocolHint {
                    protocol: Some(protocol_hint::Protocol::H2(H2 {})),
                    opaque_transport: Some(OpaqueTransport { inbound_port: 4143 }),
                }),
                metric_labels: HashMap::from([
                    ("pod".to_owned(), "web-0".to_owned()),
                    ("service".to_owned(), "web-override".to_owned()),
                ]),
                ..addr("10.0.0.2:8080")
            },
            Ok(Endpoint {
                identity: Some(id(ID)),
                server_name: Some(id(ID)),
                hint: Hint::H2,
                opaque_transport_port: Some(4143),
                labels: BTreeMap::from([
                    ("pod".to_owned(), "web-0".to_owned()),
                    ("service".to_owned(), "web-override".to_owned()),
                ]),
                ..plain("10.0.0.2:8080")
            }),
        ),
        (
            "a remote gateway: identity, explicit server name, authority override, opaque hint",
            WeightedAddr {
                tls_identity: Some(TlsIdentity {
                    server_name: Some(DnsLikeIdentity { name: GW.into() }),
                    ..dns(GW)
                }),
                protocol_hint: Some(ProtocolHint {
                    protocol: Some(protocol_hint::Protocol::Opaque(Opaque {})),
                    opaque_transport: None,
                }),
                authority_override: Some(AuthorityOverride {
                    authority_override: "web.ns1.svc.cluster.local:8080".into(),
                }),
                ..addr("192.0.2.7:4143")
            },
            Ok(Endpoint {
                identity: Some(id(GW)),
                server_name: Some(id(GW)),
                hint: Hint::Opaque,
                authority_override: Some(("web.ns1.svc.cluster.local".into(), 8080)),
                ..plain("192.0.2.7:4143")
            }),
        ),
        (
            "an authority override without a port is ignored",
            WeightedAddr {
                authority_override: Some(AuthorityOverride {
                    authority_override: "web.ns1.svc.cluster.local".into(),
                }),
                ..addr("10.0.0.3:80")
            },
            Ok(plain("10.0.0.3:80")),
        ),
        (
            "a SPIFFE identity has no implied server name",
            WeightedAddr {
                tls_identity: Some(TlsIdentity {
                    strategy: Some(tls_identity::Strategy::UriLikeIdentity(UriLikeIdentity {
                        uri: "spiffe://cluster.local/ns/ns1/sa/web".into(),
                    })),
                    server_name: None,
                }),
                ..addr("[fd00::1]:80")
            },
            Ok(Endpoint {
                identity: Some(id("spiffe://cluster.local/ns/ns1/sa/web")),
                ..plain("[fd00::1]:80")
            }),
        ),
        (
            "no addr",
            WeightedAddr {
                addr: None,
                ..addr("10.0.0.1:80")
            },
            Err(Malformed::NoAddr),
        ),
        (
            "a port beyond 16 bits",
            WeightedAddr {
                addr: Some(TcpAddress {
                    port: 70_000,
                    ..sa("10.0.0.1:80").into()
                }),
                ..addr("10.0.0.1:80")
            },
            Err(Malformed::Addr),
        ),
        ("port 0", addr("10.0.0.1:0"), Err(Malformed::PortZero)),
        (
            "an identity that does not parse is not downgraded to plaintext",
            WeightedAddr {
                tls_identity: Some(dns("not a name.")),
                ..addr("10.0.0.1:80")
            },
            Err(Malformed::Identity("not a name.".into())),
        ),
        (
            "a TLS identity without a strategy",
            WeightedAddr {
                tls_identity: Some(TlsIdentity::default()),
                ..addr("10.0.0.1:80")
            },
            Err(Malformed::NoIdentity),
        ),
        (
            "an opaque-transport port beyond 16 bits",
            WeightedAddr {
                protocol_hint: Some(ProtocolHint {
                    protocol: None,
                    opaque_transport: Some(OpaqueTransport {
                        inbound_port: 70_000,
                    }),
                }),
                ..addr("10.0.0.1:80")
            },
            Err(Malformed::OpaqueTransportPort(70_000)),
        ),
    ];
    for (name, pb, want) in cases {
        let got = endpoint(pb, &HashMap::new());
        assert_eq!(got, want, "{name}");
    }
    // The set's labels, overridden by the address's own.
    let e = endpoint(
        WeightedAddr {
            metric_labels: HashMap::from([("service".to_owned(), "mine".to_owned())]),
            ..addr("10.0.0.1:80")
        },
        &set_labels,
    )
    .unwrap();
    assert_eq!(
        e.labels,
        BTreeMap::from([
            ("namespace".to_owned(), "ns1".to_owned()),
            ("service".to_owned(), "mine".to_owned()),
        ])
    );
}

fn add(addrs: &[&str]) -> Update {
    Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: addrs.iter().map(|a| addr(a)).collect(),
            metric_labels: HashMap::new(),
        })),
    }
}

fn remove(addrs: &[&str]) -> Update {
    Update {
        update: Some(update::Update::Remove(AddrSet {
            addrs: addrs.iter().map(|a| sa(a).into()).collect(),
        })),
    }
}

fn no_endpoints() -> Update {
    Update {
        update: Some(update::Update::NoEndpoints(NoEndpoints { exists: true })),
    }
}

fn set(addrs: &[&str]) -> BTreeMap<SocketAddr, Endpoint> {
    addrs.iter().map(|a| (sa(a), plain(a))).collect()
}

#[test]
fn updates_add_remove_and_empty() {
    let heavier = Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: vec![WeightedAddr {
                weight: 1,
                ..addr("10.0.0.1:80")
            }],
            metric_labels: HashMap::new(),
        })),
    };
    let malformed = Update {
        update: Some(update::Update::Add(WeightedAddrSet {
            addrs: vec![
                WeightedAddr {
                    addr: None,
                    ..addr("10.0.0.9:80")
                },
                addr("10.0.0.4:80"),
            ],
            metric_labels: HashMap::new(),
        })),
    };
    let mut reweighted = set(&["10.0.0.1:80", "10.0.0.2:80"]);
    reweighted.get_mut(&sa("10.0.0.1:80")).unwrap().weight = 1;
    let cases: Vec<(&str, BTreeMap<SocketAddr, Endpoint>, Update, BTreeMap<_, _>)> = vec![
        (
            "add to nothing",
            set(&[]),
            add(&["10.0.0.1:80"]),
            set(&["10.0.0.1:80"]),
        ),
        (
            "add merges",
            set(&["10.0.0.1:80"]),
            add(&["10.0.0.2:80"]),
            set(&["10.0.0.1:80", "10.0.0.2:80"]),
        ),
        (
            "add replaces the same address",
            set(&["10.0.0.1:80", "10.0.0.2:80"]),
            heavier,
            reweighted,
        ),
        (
            "remove",
            set(&["10.0.0.1:80", "10.0.0.2:80"]),
            remove(&["10.0.0.1:80", "10.0.0.3:80"]),
            set(&["10.0.0.2:80"]),
        ),
        (
            "no endpoints empties",
            set(&["10.0.0.1:80", "10.0.0.2:80"]),
            no_endpoints(),
            set(&[]),
        ),
        (
            "a malformed address is skipped, the rest applied",
            set(&["10.0.0.1:80"]),
            malformed,
            set(&["10.0.0.1:80", "10.0.0.4:80"]),
        ),
        (
            "a removal with a port beyond 16 bits removes nothing (not port 4464)",
            set(&["10.0.0.1:4464"]),
            Update {
                update: Some(update::Update::Remove(AddrSet {
                    addrs: vec![TcpAddress {
                        port: 70_000,
                        ..sa("10.0.0.1:80").into()
                    }],
                })),
            },
            set(&["10.0.0.1:4464"]),
        ),
        (
            "an empty update changes nothing",
            set(&["10.0.0.1:80"]),
            Update { update: None },
            set(&["10.0.0.1:80"]),
        ),
    ];
    for (name, mut before, up, want) in cases {
        apply("web.ns1.svc.cluster.local:80", &mut before, up);
        assert_eq!(before, want, "{name}");
    }
}

#[test]
fn profiles() {
    let p = profile(
        "10.0.0.1:80",
        DestinationProfile {
            fully_qualified_name: "web.ns1.svc.cluster.local".into(),
            opaque_protocol: true,
            endpoint: Some(addr("10.0.0.1:80")),
            ..Default::default()
        },
    );
    assert_eq!(
        p,
        Profile {
            opaque: true,
            fully_qualified_name: "web.ns1.svc.cluster.local".into(),
            endpoint: Some(plain("10.0.0.1:80")),
        }
    );
    let malformed = profile(
        "10.0.0.1:80",
        DestinationProfile {
            endpoint: Some(WeightedAddr {
                addr: None,
                ..addr("10.0.0.1:80")
            }),
            ..Default::default()
        },
    );
    assert_eq!(malformed.endpoint, None);
}

fn endpoints(r: &Resolution) -> BTreeMap<SocketAddr, Endpoint> {
    match r {
        Resolution::Endpoints(e) => (**e).clone(),
        other => panic!("not endpoints: {other:?}"),
    }
}

const WEB: &str = "web.ns1.svc.cluster.local:80";

#[tokio::test(start_paused = true)]
async fn one_stream_per_target_shared_then_cancelled_when_idle() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, "ctx".into(), IDLE_TIMEOUT);
    let mut a = resolver.resolve(WEB);
    let mut b = resolver.resolve(WEB);
    let call = calls.get.recv().await.unwrap();
    assert_eq!(
        call.request,
        GetDestination {
            scheme: "k8s".into(),
            path: WEB.into(),
            context_token: "ctx".into(),
        }
    );
    call.send(add(&["10.0.0.1:80"]));
    assert_eq!(endpoints(&a.first().await), set(&["10.0.0.1:80"]));
    assert_eq!(endpoints(&b.first().await), set(&["10.0.0.1:80"]));
    settle().await;
    assert!(calls.get.try_recv().is_err(), "a second stream was opened");

    // Within the idle timeout after the last handle went, a new handle reuses the stream.
    drop((a, b));
    tokio::time::advance(IDLE_TIMEOUT - Duration::from_millis(500)).await;
    let mut c = resolver.resolve(WEB);
    assert_eq!(endpoints(&c.first().await), set(&["10.0.0.1:80"]));
    settle().await;
    assert!(calls.get.try_recv().is_err(), "the stream was not reused");
    assert!(!call.answers.is_closed());
    // The timer of the first release must not expire the entry that was taken again.
    tokio::time::advance(Duration::from_secs(1)).await;
    settle().await;
    assert!(!call.answers.is_closed(), "expired while held");
    assert_eq!(resolver.endpoints.len(), 1);

    // Idle for the whole timeout: the stream is cancelled and forgotten.
    let watch = c.watch();
    drop(c);
    tokio::time::advance(IDLE_TIMEOUT).await;
    tokio::time::timeout(Duration::from_secs(60), call.answers.closed())
        .await
        .expect("the idle stream was not cancelled");
    assert_eq!(resolver.endpoints.len(), 0);
    // A receiver kept past its handle still reads the last value.
    assert_eq!(endpoints(&watch.borrow()), set(&["10.0.0.1:80"]));

    // And the next resolution opens a new one.
    let mut d = resolver.resolve(WEB);
    let again = calls.get.recv().await.unwrap();
    assert_eq!(again.request.path, WEB);
    assert!(d.current().is_pending());
    again.send(no_endpoints());
    assert_eq!(endpoints(&d.first().await), set(&[]));
}

#[tokio::test(start_paused = true)]
async fn different_targets_have_their_own_streams() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
    let _a = resolver.resolve(WEB);
    let _b = resolver.resolve("10.0.0.9:80");
    let mut paths = vec![
        calls.get.recv().await.unwrap().request.path,
        calls.get.recv().await.unwrap().request.path,
    ];
    paths.sort();
    assert_eq!(paths, ["10.0.0.9:80", WEB]);
}

#[tokio::test(start_paused = true)]
async fn updates_reach_every_handle() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
    let r = resolver.resolve(WEB);
    let mut watch = r.watch();
    let call = calls.get.recv().await.unwrap();
    for (up, want) in [
        (
            add(&["10.0.0.1:80", "10.0.0.2:80"]),
            set(&["10.0.0.1:80", "10.0.0.2:80"]),
        ),
        (
            add(&["10.0.0.3:80"]),
            set(&["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]),
        ),
        (
            remove(&["10.0.0.1:80"]),
            set(&["10.0.0.2:80", "10.0.0.3:80"]),
        ),
        (no_endpoints(), set(&[])),
    ] {
        call.send(up);
        watch.changed().await.unwrap();
        assert_eq!(endpoints(&watch.borrow_and_update()), want);
    }
}

#[tokio::test(start_paused = true)]
async fn not_resolvable_is_final() {
    for status in [
        Status::invalid_argument("outside the cluster"),
        Status::failed_precondition("not a service"),
    ] {
        let (channel, mut calls) = testing::peer();
        let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
        let mut r = resolver.resolve("example.com:443");
        calls.get.recv().await.unwrap().fail(status.clone());
        assert_eq!(r.first().await, Resolution::NotFound, "{status:?}");
        // Never retried.
        tokio::time::advance(backoff::MAX * 2).await;
        settle().await;
        assert!(calls.get.try_recv().is_err(), "{status:?} was retried");
        assert_eq!(r.current(), Resolution::NotFound);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_stream_keeps_its_endpoints_and_the_next_one_replaces_them() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
    let r = resolver.resolve(WEB);
    let mut watch = r.watch();
    let first = calls.get.recv().await.unwrap();
    first.send(add(&["10.0.0.1:80", "10.0.0.2:80"]));
    watch.changed().await.unwrap();
    watch.borrow_and_update();

    first.fail(Status::unavailable("destination restarting"));
    let before = tokio::time::Instant::now();
    let second = calls.get.recv().await.unwrap();
    // After a backoff, not at once.
    assert!(before.elapsed() >= backoff::MIN, "{:?}", before.elapsed());
    // Until the new stream says otherwise, the old endpoints stand.
    settle().await;
    assert!(!watch.has_changed().unwrap());
    assert_eq!(
        endpoints(&r.current()),
        set(&["10.0.0.1:80", "10.0.0.2:80"])
    );

    // The new stream's first batch replaces the set; later ones merge.
    second.send(add(&["10.0.0.2:80", "10.0.0.3:80"]));
    watch.changed().await.unwrap();
    assert_eq!(
        endpoints(&watch.borrow_and_update()),
        set(&["10.0.0.2:80", "10.0.0.3:80"])
    );
    second.send(add(&["10.0.0.4:80"]));
    watch.changed().await.unwrap();
    assert_eq!(
        endpoints(&watch.borrow_and_update()),
        set(&["10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"])
    );

    // A stream the server ends cleanly is reopened too.
    drop(second);
    let third = calls.get.recv().await.unwrap();
    third.send(no_endpoints());
    watch.changed().await.unwrap();
    assert_eq!(endpoints(&watch.borrow_and_update()), set(&[]));
}

#[tokio::test(start_paused = true)]
async fn failures_before_any_answer_stay_pending_and_back_off() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
    let r = resolver.resolve(WEB);
    let mut at = Vec::new();
    let start = tokio::time::Instant::now();
    for _ in 0..4 {
        let call = calls.get.recv().await.unwrap();
        at.push(start.elapsed());
        call.fail(Status::unavailable("down"));
    }
    assert!(r.current().is_pending());
    // Each wait at least as long as the minimum doubled per attempt (jitter only adds).
    let gaps: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        assert!(*gap >= backoff::MIN * 2u32.pow(i as u32), "{gaps:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn profiles_are_shared_and_not_found_is_immediate() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, "ctx".into(), IDLE_TIMEOUT);
    let mut a = resolver.profile(WEB);
    let mut b = resolver.profile(WEB);
    let call = calls.profile.recv().await.unwrap();
    assert_eq!(call.request.path, WEB);
    assert_eq!(call.request.context_token, "ctx");
    call.send(DestinationProfile {
        fully_qualified_name: "web.ns1.svc.cluster.local".into(),
        ..Default::default()
    });
    let want = ProfileResolution::Profile(Profile {
        opaque: false,
        fully_qualified_name: "web.ns1.svc.cluster.local".into(),
        endpoint: None,
    });
    assert_eq!(a.first().await, want);
    assert_eq!(b.first().await, want);
    settle().await;
    assert!(calls.profile.try_recv().is_err());

    let mut outside = resolver.profile("example.com:443");
    calls
        .profile
        .recv()
        .await
        .unwrap()
        .fail(Status::invalid_argument("not in the cluster"));
    assert_eq!(outside.first().await, ProfileResolution::NotFound);
    assert_eq!(outside.current().profile(), None);
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_counts_from_the_last_release() {
    let (channel, mut calls) = testing::peer();
    let resolver = Resolver::new(channel, String::new(), IDLE_TIMEOUT);
    drop(resolver.resolve(WEB));
    let call = calls.get.recv().await.unwrap();
    // Taken and released again 4 s later: the first release's timer must not end it at 5 s.
    tokio::time::advance(Duration::from_secs(4)).await;
    drop(resolver.resolve(WEB));
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    assert!(!call.answers.is_closed(), "expired by an earlier release");
    assert_eq!(resolver.endpoints.len(), 1);
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::time::timeout(Duration::from_secs(60), call.answers.closed())
        .await
        .expect("the idle stream was not cancelled");
    assert_eq!(resolver.endpoints.len(), 0);
}
