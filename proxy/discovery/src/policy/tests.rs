use std::collections::HashMap;

use linkerd2_proxy_api::{
    inbound::{Authn, Authz, IdentitySuffix, ProxyProtocol, authn},
    meta::Metadata,
};
use tonic::Status;

use super::*;
use crate::testing::{self, settle};

const WEB: &str = "web.ns1.serviceaccount.identity.linkerd.cluster.local";
const OTHER_NS: &str = "web.ns2.serviceaccount.identity.linkerd.cluster.local";

fn id(s: &str) -> Id {
    Id::parse(s).unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn default_policy_names() {
    for name in DefaultPolicy::NAMES {
        let p: DefaultPolicy = name.parse().unwrap();
        assert_eq!(p.name(), name);
    }
    let err = "allow".parse::<DefaultPolicy>().unwrap_err().to_string();
    assert_eq!(
        err,
        "\"allow\" is not a default inbound policy; use one of all-unauthenticated, \
         all-authenticated, cluster-unauthenticated, cluster-authenticated, deny, audit"
    );
    assert_eq!(
        "cluster-authenticated".parse::<DefaultPolicy>().unwrap(),
        DefaultPolicy::ClusterAuthenticated {
            networks: DEFAULT_CLUSTER_NETWORKS.map(net).to_vec()
        }
    );
    assert_eq!(
        "cluster-unauthenticated"
            .parse::<DefaultPolicy>()
            .unwrap()
            .with_cluster_networks(vec![net("10.42.0.0/16")]),
        DefaultPolicy::ClusterUnauthenticated {
            networks: vec![net("10.42.0.0/16")]
        }
    );
    assert_eq!(
        DefaultPolicy::Deny.with_cluster_networks(vec![net("10.42.0.0/16")]),
        DefaultPolicy::Deny
    );
}

#[test]
fn authorize_with_each_default_policy() {
    let web = id(WEB);
    let unmeshed = |ip: &str| Client {
        ip: ip.parse().unwrap(),
        tls: ClientTls::None,
    };
    let meshed = |ip: &str| Client {
        ip: ip.parse().unwrap(),
        tls: ClientTls::Tls {
            identity: Some(&web),
        },
    };
    let tls_no_id = |ip: &str| Client {
        ip: ip.parse().unwrap(),
        tls: ClientTls::Tls { identity: None },
    };
    let cluster = |p: &str| {
        p.parse::<DefaultPolicy>()
            .unwrap()
            .with_cluster_networks(vec![net("10.0.0.0/8")])
    };
    let all_unauth = DefaultPolicy::AllUnauthenticated;
    let all_auth = DefaultPolicy::AllAuthenticated;
    let cluster_unauth = cluster("cluster-unauthenticated");
    let cluster_auth = cluster("cluster-authenticated");
    let deny = DefaultPolicy::Deny;
    let audit = DefaultPolicy::Audit;
    // (policy, client, allowed by)
    let cases: Vec<(&DefaultPolicy, Client<'_>, Option<&str>)> = vec![
        (
            &all_unauth,
            unmeshed("192.0.2.1"),
            Some("all-unauthenticated"),
        ),
        (&all_unauth, meshed("10.1.2.3"), Some("all-unauthenticated")),
        (
            &all_unauth,
            unmeshed("2001:db8::1"),
            Some("all-unauthenticated"),
        ),
        (&all_auth, unmeshed("10.1.2.3"), None),
        (&all_auth, tls_no_id("10.1.2.3"), None),
        (&all_auth, meshed("192.0.2.1"), Some("all-authenticated")),
        (
            &cluster_unauth,
            unmeshed("10.1.2.3"),
            Some("cluster-unauthenticated"),
        ),
        (&cluster_unauth, unmeshed("192.0.2.1"), None),
        (&cluster_unauth, meshed("192.0.2.1"), None),
        // An IPv4 client seen on a dual-stack socket is still in the cluster network.
        (
            &cluster_unauth,
            unmeshed("::ffff:10.1.2.3"),
            Some("cluster-unauthenticated"),
        ),
        (
            &cluster_auth,
            meshed("10.1.2.3"),
            Some("cluster-authenticated"),
        ),
        (&cluster_auth, unmeshed("10.1.2.3"), None),
        (&cluster_auth, meshed("192.0.2.1"), None),
        (&deny, unmeshed("10.1.2.3"), None),
        (&deny, meshed("10.1.2.3"), None),
        (&audit, unmeshed("192.0.2.1"), Some("audit")),
    ];
    for (policy, client, want) in cases {
        let server = policy.server_policy();
        assert!(!server.from_server());
        let got = authorize(&server, &client);
        let want = match want {
            Some(name) => Ok(Authorized { name: name.into() }),
            None => Err(Denied {
                server: policy.name().into(),
            }),
        };
        assert_eq!(got, want, "{} {client:?}", policy.name());
    }
    // Localhost always, even under deny.
    for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        for client in [unmeshed(ip), meshed(ip)] {
            assert_eq!(
                authorize(&deny.server_policy(), &client),
                Ok(Authorized {
                    name: "localhost".into()
                }),
                "{client:?}"
            );
        }
    }
}

#[test]
fn authorize_by_network_and_identity() {
    let authz = |name: &str, networks: Vec<Network>, authentication| Authorization {
        networks,
        authentication,
        name: name.into(),
    };
    let everywhere = || {
        vec![Network {
            net: net("0.0.0.0/0"),
            except: vec![],
        }]
    };
    let policy = ServerPolicy {
        protocol: Protocol::Http2,
        authorizations: vec![
            authz(
                "pods-but-not-the-nodes",
                vec![Network {
                    net: net("10.0.0.0/8"),
                    except: vec![net("10.0.0.0/24")],
                }],
                Authentication::TlsUnauthenticated,
            ),
            authz(
                "web-exactly",
                everywhere(),
                Authentication::MeshTls {
                    identities: BTreeSet::from([WEB.to_owned()]),
                    suffixes: vec![],
                },
            ),
            authz(
                "ns2-suffix",
                everywhere(),
                Authentication::MeshTls {
                    identities: BTreeSet::new(),
                    suffixes: vec![vec![
                        "ns2".into(),
                        "serviceaccount".into(),
                        "identity".into(),
                        "linkerd".into(),
                        "cluster".into(),
                        "local".into(),
                    ]],
                },
            ),
        ],
        name: "web-http".into(),
        from_server: true,
    };
    let (web, other) = (id(WEB), id(OTHER_NS));
    let foreign = id("web.ns3.serviceaccount.identity.linkerd.cluster.local");
    // A name ending with the suffix's text but not at a label boundary.
    let glued = id("webns2.serviceaccount.identity.linkerd.cluster.local");
    let client = |ip: &str, tls| Client {
        ip: ip.parse().unwrap(),
        tls,
    };
    let tls = |id| ClientTls::Tls { identity: id };
    let cases = [
        (
            client("10.1.0.1", tls(None)),
            Some("pods-but-not-the-nodes"),
        ),
        (client("10.1.0.1", ClientTls::None), None),
        (client("10.0.0.7", tls(None)), None),
        (client("10.0.0.7", tls(Some(&web))), Some("web-exactly")),
        (client("192.0.2.1", tls(Some(&web))), Some("web-exactly")),
        (client("192.0.2.1", tls(Some(&other))), Some("ns2-suffix")),
        (client("192.0.2.1", tls(Some(&foreign))), None),
        (client("192.0.2.1", tls(Some(&glued))), None),
        // The networks are IPv4 only.
        (client("2001:db8::1", tls(Some(&web))), None),
    ];
    for (c, want) in cases {
        let want = match want {
            Some(name) => Ok(Authorized { name: name.into() }),
            None => Err(Denied {
                server: "web-http".into(),
            }),
        };
        assert_eq!(authorize(&policy, &c), want, "{c:?}");
    }
}

fn labels(name: &str) -> HashMap<String, String> {
    HashMap::from([("name".to_owned(), name.to_owned())])
}

fn pb_authz(name: &str, permit: authn::Permit) -> Authz {
    Authz {
        networks: vec![api::Network {
            net: Some(net("10.0.0.0/8").into()),
            except: vec![net("10.0.0.0/24").into()],
        }],
        authentication: Some(Authn {
            permit: Some(permit),
        }),
        labels: HashMap::new(),
        metadata: Some(Metadata {
            kind: Some(metadata::Kind::Default(name.into())),
        }),
    }
}

fn pb_server(kind: proxy_protocol::Kind, authorizations: Vec<Authz>) -> api::Server {
    api::Server {
        protocol: Some(ProxyProtocol { kind: Some(kind) }),
        server_ips: vec![],
        authorizations,
        labels: labels("web-http"),
    }
}

fn opaque() -> proxy_protocol::Kind {
    proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {})
}

#[test]
fn servers_from_the_policy_service() {
    let tls_unauth = authn::Permit::MeshTls(authn::PermitMeshTls {
        clients: Some(permit_mesh_tls::Clients::Unauthenticated(
            authn::PermitUnauthenticated {},
        )),
    });
    let ids = authn::Permit::MeshTls(authn::PermitMeshTls {
        clients: Some(permit_mesh_tls::Clients::Identities(
            permit_mesh_tls::PermitClientIdentities {
                identities: vec![api::Identity { name: WEB.into() }],
                suffixes: vec![IdentitySuffix {
                    parts: vec!["ns2".into(), "serviceaccount".into()],
                }],
            },
        )),
    });
    let got = server_policy(pb_server(
        proxy_protocol::Kind::Detect(proxy_protocol::Detect {
            timeout: Some(Duration::from_secs(3).try_into().unwrap()),
            http_routes: vec![],
            http_local_rate_limit: None,
        }),
        vec![
            pb_authz(
                "all",
                authn::Permit::Unauthenticated(authn::PermitUnauthenticated {}),
            ),
            pb_authz("tls", tls_unauth),
            pb_authz("ids", ids),
        ],
    ))
    .unwrap();
    let networks = vec![Network {
        net: net("10.0.0.0/8"),
        except: vec![net("10.0.0.0/24")],
    }];
    assert_eq!(
        got,
        ServerPolicy {
            protocol: Protocol::Detect {
                timeout: Duration::from_secs(3)
            },
            authorizations: vec![
                Authorization {
                    networks: networks.clone(),
                    authentication: Authentication::Unauthenticated,
                    name: "all".into(),
                },
                Authorization {
                    networks: networks.clone(),
                    authentication: Authentication::TlsUnauthenticated,
                    name: "tls".into(),
                },
                Authorization {
                    networks,
                    authentication: Authentication::MeshTls {
                        identities: BTreeSet::from([WEB.to_owned()]),
                        suffixes: vec![vec!["ns2".into(), "serviceaccount".into()]],
                    },
                    name: "ids".into(),
                },
            ],
            name: "web-http".into(),
            from_server: true,
        }
    );

    let kinds = [
        (opaque(), Protocol::Opaque),
        (
            proxy_protocol::Kind::Http1(proxy_protocol::Http1::default()),
            Protocol::Http1,
        ),
        (
            proxy_protocol::Kind::Http2(proxy_protocol::Http2::default()),
            Protocol::Http2,
        ),
        (
            proxy_protocol::Kind::Grpc(proxy_protocol::Grpc::default()),
            Protocol::Grpc,
        ),
        (
            proxy_protocol::Kind::Tls(proxy_protocol::Tls {}),
            Protocol::Tls,
        ),
        (
            proxy_protocol::Kind::Detect(proxy_protocol::Detect::default()),
            Protocol::Detect {
                timeout: DETECT_TIMEOUT,
            },
        ),
    ];
    for (kind, want) in kinds {
        assert_eq!(
            server_policy(pb_server(kind, vec![])).unwrap().protocol,
            want
        );
    }

    // An authorization named only by its labels (older servers).
    let mut labelled = pb_authz(
        "",
        authn::Permit::Unauthenticated(authn::PermitUnauthenticated {}),
    );
    labelled.metadata = None;
    labelled.labels = labels("legacy");
    let got = server_policy(pb_server(opaque(), vec![labelled])).unwrap();
    assert_eq!(got.authorizations[0].name, "legacy");

    let mut no_net = pb_authz(
        "a",
        authn::Permit::Unauthenticated(authn::PermitUnauthenticated {}),
    );
    no_net.networks[0].net = None;
    let mut no_authn = pb_authz(
        "b",
        authn::Permit::Unauthenticated(authn::PermitUnauthenticated {}),
    );
    no_authn.authentication = None;
    let invalid = [
        (
            api::Server {
                protocol: None,
                ..pb_server(opaque(), vec![])
            },
            InvalidServer::NoProtocol,
        ),
        (
            pb_server(opaque(), vec![no_net]),
            InvalidServer::NoNet("a".into()),
        ),
        (
            pb_server(opaque(), vec![no_authn]),
            InvalidServer::NoAuthentication("b".into()),
        ),
    ];
    for (pb, want) in invalid {
        assert_eq!(server_policy(pb), Err(want));
    }
}

#[tokio::test(start_paused = true)]
async fn a_port_starts_from_the_default_then_follows_the_server() {
    let (channel, mut calls) = testing::peer();
    let policies = InboundPolicies::new(
        channel,
        r#"{"ns":"ns1","pod":"web-0"}"#.into(),
        DefaultPolicy::Deny,
    );
    let mut rx = policies.port(8080);
    assert_eq!(
        *rx.borrow_and_update(),
        Arc::new(DefaultPolicy::Deny.server_policy())
    );
    let call = calls.port.recv().await.unwrap();
    assert_eq!(
        call.request,
        PortSpec {
            workload: r#"{"ns":"ns1","pod":"web-0"}"#.into(),
            port: 8080,
        }
    );
    // Ready only once the server answered.
    let ready = policies.clone();
    let mut ready = tokio::spawn(async move { ready.ready(8080).await });
    settle().await;
    assert!(!ready.is_finished());

    call.send(pb_server(opaque(), vec![]));
    rx.changed().await.unwrap();
    let p = rx.borrow_and_update().clone();
    assert!(p.from_server());
    assert_eq!(p.protocol, Protocol::Opaque);
    assert_eq!(p.name, "web-http");
    (&mut ready).await.unwrap();

    // The same port again shares the stream.
    let again = policies.port(8080);
    assert!(again.borrow().from_server());
    settle().await;
    assert!(calls.port.try_recv().is_err());

    // An invalid server is skipped; the last good one stands.
    call.send(api::Server {
        protocol: None,
        ..pb_server(opaque(), vec![])
    });
    settle().await;
    assert!(!rx.has_changed().unwrap());

    // A failed stream keeps the last policy and is retried after a backoff.
    call.fail(Status::unavailable("policy controller restarting"));
    let second = calls.port.recv().await.unwrap();
    assert_eq!(rx.borrow().protocol, Protocol::Opaque);
    second.send(pb_server(
        proxy_protocol::Kind::Http2(proxy_protocol::Http2::default()),
        vec![],
    ));
    rx.changed().await.unwrap();
    assert_eq!(rx.borrow().protocol, Protocol::Http2);

    // Dropping every clone ends the streams.
    drop((policies, rx, again));
    tokio::time::timeout(Duration::from_secs(60), second.answers.closed())
        .await
        .expect("the stream outlived its policies");
}

#[tokio::test(start_paused = true)]
async fn errors_before_the_first_answer_keep_the_default() {
    let (channel, mut calls) = testing::peer();
    let policies =
        InboundPolicies::new(channel, "ns1:web-0".into(), DefaultPolicy::AllAuthenticated);
    let rx = policies.port(4191);
    for _ in 0..3 {
        calls
            .port
            .recv()
            .await
            .unwrap()
            .fail(Status::not_found("unknown server: no Pod ns1/web-0"));
    }
    assert!(!rx.borrow().from_server());
    assert_eq!(rx.borrow().name, "all-authenticated");
}
