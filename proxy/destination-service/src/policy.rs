//! Linkerd's policy API at its defaults (no Server, HTTPRoute or AuthorizationPolicy
//! resources yet), as pure functions of the [`Index`]:
//!
//! - `OutboundPolicies`: a Service (by authority or ClusterIP) is one backend, the Service
//!   itself, balanced with power-of-two-choices over peak EWMA behind a fail-fast queue, with
//!   protocol detection, or opaque when the port is; a ClusterIP port the Service does not
//!   declare is refused (Linkerd's "undefined-port"); anything else is forwarded to the
//!   original destination (a known Pod with its identity, so pod-to-pod calls keep mTLS).
//! - `InboundServerPolicies`: each Pod port gets the default server of the Pod's
//!   `config.linkerd.io/default-inbound-policy` (else its namespace's, else the cluster
//!   default, `all-unauthenticated`), opaque when the port is in the Pod's opaque ports.
//!
//! Values are Linkerd's policy controller's defaults; each constant says which.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ipnet::IpNet;
use linkerd2_proxy_api::{
    destination::WeightedAddr,
    http_route::{HttpRouteMatch, PathMatch, path_match},
    inbound::{self, authn, proxy_protocol as in_proto},
    meta::{Metadata, Resource, metadata},
    net::TcpAddress,
    outbound::{
        self, Backend, OutboundPolicy, ProxyProtocol, Queue, backend, http_route as out_http,
        opaque_route, proxy_protocol,
    },
};

use crate::{
    index::{Index, Topic},
    model::Key,
    resolve::{self, Settings, Target},
};

/// Linkerd's protocol-detection timeout (policy controller `DETECT_TIMEOUT`).
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Linkerd's default balancer queue: 100 requests, failing fast after 3 s without an endpoint.
pub const QUEUE_CAPACITY: u32 = 100;
pub const FAILFAST_TIMEOUT: Duration = Duration::from_secs(3);
/// Linkerd's peak-EWMA defaults.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
pub const EWMA_DECAY: Duration = Duration::from_secs(10);

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn default_meta(name: &str) -> Option<Metadata> {
    Some(Metadata {
        kind: Some(metadata::Kind::Default(name.to_owned())),
    })
}

fn service_meta(key: &Key, port: u16) -> Option<Metadata> {
    Some(Metadata {
        kind: Some(metadata::Kind::Resource(Resource {
            group: "core".into(),
            kind: "Service".into(),
            name: key.1.clone(),
            namespace: key.0.clone(),
            section: String::new(),
            port: u32::from(port),
        })),
    })
}

/// What an outbound policy lookup names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundTarget {
    Authority(String),
    Addr(SocketAddr),
}

/// Why an outbound lookup is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("no target in the request")]
    NoTarget,
    #[error("the target address is not an IP address and port")]
    BadAddr,
    #[error("authority {0:?} must be of the form <name>.<namespace>.svc.{1}")]
    NotAService(String, String),
}

/// Reads a `TrafficSpec`'s target.
pub fn outbound_target(
    target: Option<outbound::traffic_spec::Target>,
) -> Result<OutboundTarget, OutboundError> {
    match target {
        None => Err(OutboundError::NoTarget),
        Some(outbound::traffic_spec::Target::Authority(a)) => Ok(OutboundTarget::Authority(a)),
        Some(outbound::traffic_spec::Target::Addr(a)) => SocketAddr::try_from(a)
            .ok()
            .filter(|a| a.port() != 0)
            .map(OutboundTarget::Addr)
            .ok_or(OutboundError::BadAddr),
    }
}

/// The outbound policy of a target, and the topics it depends on.
pub fn outbound_policy(
    idx: &Index,
    settings: &Settings,
    target: &OutboundTarget,
) -> Result<(OutboundPolicy, Vec<Topic>), OutboundError> {
    match target {
        OutboundTarget::Authority(authority) => {
            match resolve::parse_target(authority, &settings.cluster_domain) {
                Ok(Target::Name {
                    service,
                    hostname: None,
                    port,
                }) => {
                    let opaque = service_port_opaque(idx, &service, port);
                    let topics = vec![Topic::Service(service.clone())];
                    Ok((service_policy(settings, &service, port, opaque), topics))
                }
                _ => Err(OutboundError::NotAService(
                    authority.clone(),
                    settings.cluster_domain.clone(),
                )),
            }
        }
        OutboundTarget::Addr(addr) => {
            let mut topics = vec![Topic::Ip(addr.ip())];
            if let Some(key) = idx.svc_by_ip.get(&addr.ip()) {
                topics.push(Topic::Service(key.clone()));
                let declared = idx
                    .services
                    .get(key)
                    .is_some_and(|s| s.ports.iter().any(|p| p.port == addr.port()));
                let policy = if declared {
                    let opaque = service_port_opaque(idx, key, addr.port());
                    service_policy(settings, key, addr.port(), opaque)
                } else {
                    undefined_port(key, addr.port())
                };
                return Ok((policy, topics));
            }
            // A Pod of this cluster is forwarded to with what discovery knows of it (its
            // identity and protocol); any other address as it is.
            let endpoint = match resolve::resolve(idx, settings, &Target::Addr(*addr)) {
                Ok((res, more)) => {
                    topics.extend(more);
                    res.endpoints.get(addr).map(resolve::Endpoint::to_proto)
                }
                Err(_) => None,
            };
            Ok((forward(*addr, endpoint), topics))
        }
    }
}

fn service_port_opaque(idx: &Index, key: &Key, port: u16) -> bool {
    idx.services
        .get(key)
        .and_then(|s| s.opaque_ports.as_ref())
        .or_else(|| {
            idx.namespaces
                .get(&key.0)
                .and_then(|n| n.opaque_ports.as_ref())
        })
        .is_some_and(|p| p.contains(port))
}

fn first_available_http(backend: Backend, matches: Vec<HttpRouteMatch>) -> out_http::Rule {
    out_http::Rule {
        matches,
        filters: Vec::new(),
        backends: Some(out_http::Distribution {
            kind: Some(out_http::distribution::Kind::FirstAvailable(
                out_http::distribution::FirstAvailable {
                    backends: vec![out_http::RouteBackend {
                        backend: Some(backend),
                        filters: Vec::new(),
                        ..Default::default()
                    }],
                },
            )),
        }),
        timeouts: Some(Default::default()),
        ..Default::default()
    }
}

fn opaque_routes(name: &str, backend: Backend) -> Vec<outbound::OpaqueRoute> {
    vec![outbound::OpaqueRoute {
        metadata: default_meta(name),
        rules: vec![opaque_route::Rule {
            backends: Some(opaque_route::Distribution {
                kind: Some(opaque_route::distribution::Kind::FirstAvailable(
                    opaque_route::distribution::FirstAvailable {
                        backends: vec![opaque_route::RouteBackend {
                            backend: Some(backend),
                            filters: Vec::new(),
                        }],
                    },
                )),
            }),
            filters: Vec::new(),
        }],
    }]
}

/// Detection with one HTTP route (`http_name`) and one opaque route (`opaque_name`) to `backend`.
fn detect(
    (http_name, opaque_name): (&str, &str),
    backend: &Backend,
    matches: Vec<HttpRouteMatch>,
) -> proxy_protocol::Kind {
    let routes = vec![outbound::HttpRoute {
        metadata: default_meta(http_name),
        hosts: Vec::new(),
        rules: vec![first_available_http(backend.clone(), matches)],
    }];
    proxy_protocol::Kind::Detect(proxy_protocol::Detect {
        timeout: Some(duration(DETECT_TIMEOUT)),
        opaque: Some(proxy_protocol::Opaque {
            routes: opaque_routes(opaque_name, backend.clone()),
        }),
        http1: Some(proxy_protocol::Http1 {
            routes: routes.clone(),
            failure_accrual: None,
        }),
        http2: Some(proxy_protocol::Http2 {
            routes,
            failure_accrual: None,
        }),
    })
}

fn queue() -> Option<Queue> {
    Some(Queue {
        capacity: QUEUE_CAPACITY,
        failfast_timeout: Some(duration(FAILFAST_TIMEOUT)),
    })
}

/// One backend, the Service itself, balanced over its endpoints from `Get`.
fn service_policy(settings: &Settings, key: &Key, port: u16, opaque: bool) -> OutboundPolicy {
    let domain = settings.cluster_domain.trim_end_matches('.');
    let backend = Backend {
        metadata: service_meta(key, port),
        queue: queue(),
        kind: Some(backend::Kind::Balancer(backend::BalanceP2c {
            discovery: Some(backend::EndpointDiscovery {
                kind: Some(backend::endpoint_discovery::Kind::Dst(
                    backend::endpoint_discovery::DestinationGet {
                        path: format!("{}.{}.svc.{domain}:{port}", key.1, key.0),
                    },
                )),
            }),
            load: Some(backend::balance_p2c::Load::PeakEwma(
                backend::balance_p2c::PeakEwma {
                    default_rtt: Some(duration(DEFAULT_RTT)),
                    decay: Some(duration(EWMA_DECAY)),
                },
            )),
        })),
    };
    let kind = if opaque {
        proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
            routes: opaque_routes("opaq", backend),
        })
    } else {
        let prefix = HttpRouteMatch {
            path: Some(PathMatch {
                kind: Some(path_match::Kind::Prefix("/".into())),
            }),
            ..Default::default()
        };
        detect(("http", "opaq"), &backend, vec![prefix])
    };
    OutboundPolicy {
        protocol: Some(ProxyProtocol { kind: Some(kind) }),
        metadata: service_meta(key, port),
    }
}

/// A ClusterIP port the Service does not declare: refused (Linkerd's "undefined-port").
fn undefined_port(key: &Key, port: u16) -> OutboundPolicy {
    OutboundPolicy {
        protocol: Some(ProxyProtocol {
            kind: Some(proxy_protocol::Kind::Opaque(proxy_protocol::Opaque {
                routes: vec![outbound::OpaqueRoute {
                    metadata: default_meta("undefined-port"),
                    rules: vec![opaque_route::Rule {
                        backends: Some(opaque_route::Distribution {
                            kind: Some(opaque_route::distribution::Kind::Empty(
                                opaque_route::distribution::Empty {},
                            )),
                        }),
                        filters: vec![opaque_route::Filter {
                            kind: Some(opaque_route::filter::Kind::Forbidden(
                                linkerd2_proxy_api::opaque_route::Forbidden {},
                            )),
                        }],
                    }],
                }],
            })),
        }),
        metadata: service_meta(key, port),
    }
}

/// Forward to the original destination (Linkerd's "egress-fallback" shape).
fn forward(addr: SocketAddr, endpoint: Option<WeightedAddr>) -> OutboundPolicy {
    let endpoint = endpoint.unwrap_or_else(|| WeightedAddr {
        addr: Some(TcpAddress::from(addr)),
        weight: 1,
        ..WeightedAddr::default()
    });
    let backend = Backend {
        metadata: default_meta("forward"),
        queue: queue(),
        kind: Some(backend::Kind::Forward(endpoint)),
    };
    OutboundPolicy {
        protocol: Some(ProxyProtocol {
            kind: Some(detect(
                ("forward", "forward"),
                &backend,
                vec![HttpRouteMatch::default()],
            )),
        }),
        metadata: default_meta("forward"),
    }
}

/// A default inbound policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    AllUnauthenticated,
    AllAuthenticated,
    ClusterUnauthenticated,
    ClusterAuthenticated,
    Deny,
    Audit,
}

impl DefaultPolicy {
    pub const ALL: [Self; 6] = [
        Self::AllUnauthenticated,
        Self::AllAuthenticated,
        Self::ClusterUnauthenticated,
        Self::ClusterAuthenticated,
        Self::Deny,
        Self::Audit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::ClusterUnauthenticated => "cluster-unauthenticated",
            Self::ClusterAuthenticated => "cluster-authenticated",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

impl std::str::FromStr for DefaultPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a default inbound policy; use one of {}",
                    Self::ALL.map(Self::name).join(", ")
                )
            })
    }
}

/// Linkerd's default cluster networks (policy controller `--cluster-networks`).
pub const DEFAULT_CLUSTER_NETWORKS: &str = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16";

/// Why an inbound lookup is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InboundError {
    #[error(
        "workload {0:?} is not {{\"ns\":\"<namespace>\",\"pod\":\"<pod>\"}} or <namespace>:<pod>"
    )]
    BadWorkload(String),
    #[error("port {0} is not a TCP port")]
    BadPort(u32),
    #[error("unknown server: no Pod {0}/{1}")]
    UnknownPod(String, String),
}

/// Reads a workload as Linkerd's proxies send it: `{"ns":"…","pod":"…"}`, or `ns:pod`.
pub fn parse_workload(workload: &str) -> Result<Key, InboundError> {
    let bad = || InboundError::BadWorkload(workload.chars().take(256).collect());
    if workload.trim_start().starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Json {
            ns: String,
            pod: String,
        }
        let j: Json = serde_json::from_str(workload).map_err(|_| bad())?;
        if j.ns.is_empty() || j.pod.is_empty() {
            return Err(bad());
        }
        return Ok((j.ns, j.pod));
    }
    match workload.split_once(':') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() => Ok((ns.into(), pod.into())),
        _ => Err(bad()),
    }
}

/// The inbound server of a Pod's port, and the topics it depends on.
pub fn inbound_server(
    idx: &Index,
    default: DefaultPolicy,
    cluster_networks: &[IpNet],
    pod: &Key,
    port: u32,
) -> Result<(inbound::Server, Vec<Topic>), InboundError> {
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or(InboundError::BadPort(port))?;
    let topics = vec![Topic::Pod(pod.clone()), Topic::Namespace(pod.0.clone())];
    let Some(info) = idx.local.pods.get(pod) else {
        return Err(InboundError::UnknownPod(pod.0.clone(), pod.1.clone()));
    };
    let ns = idx.namespaces.get(&pod.0);
    // An unknown name falls back to the next level, as a missing one does; the watch that
    // stored it logged it.
    let policy = info
        .default_inbound_policy
        .as_deref()
        .and_then(|p| p.parse().ok())
        .or_else(|| {
            ns.and_then(|n| n.default_inbound_policy.as_deref())
                .and_then(|p| p.parse().ok())
        })
        .unwrap_or(default);
    let opaque = info
        .opaque_ports
        .as_ref()
        .or(ns.and_then(|n| n.opaque_ports.as_ref()))
        .is_some_and(|p| p.contains(port));
    Ok((server(policy, cluster_networks, opaque), topics))
}

fn labels(name: &str) -> HashMap<String, String> {
    HashMap::from([
        ("group".to_owned(), String::new()),
        ("kind".to_owned(), "default".to_owned()),
        ("name".to_owned(), name.to_owned()),
    ])
}

/// Linkerd's default server for a policy.
pub fn server(policy: DefaultPolicy, cluster_networks: &[IpNet], opaque: bool) -> inbound::Server {
    let all: Vec<IpNet> = vec![
        IpNet::V4(ipnet::Ipv4Net::default()),
        IpNet::V6(ipnet::Ipv6Net::default()),
    ];
    let unauthenticated = authn::Permit::Unauthenticated(authn::PermitUnauthenticated {});
    let authenticated = authn::Permit::MeshTls(authn::PermitMeshTls {
        clients: Some(authn::permit_mesh_tls::Clients::Identities(
            authn::permit_mesh_tls::PermitClientIdentities {
                identities: Vec::new(),
                // One suffix of no parts: any identity from the trust anchors.
                suffixes: vec![inbound::IdentitySuffix { parts: Vec::new() }],
            },
        )),
    });
    let authz = |networks: &[IpNet], permit: authn::Permit| inbound::Authz {
        networks: networks
            .iter()
            .map(|n| inbound::Network {
                net: Some((*n).into()),
                except: Vec::new(),
            })
            .collect(),
        authentication: Some(inbound::Authn {
            permit: Some(permit),
        }),
        labels: labels(policy.name()),
        metadata: default_meta(policy.name()),
    };
    let authorizations = match policy {
        DefaultPolicy::AllUnauthenticated | DefaultPolicy::Audit => {
            vec![authz(&all, unauthenticated)]
        }
        DefaultPolicy::AllAuthenticated => vec![authz(&all, authenticated)],
        DefaultPolicy::ClusterUnauthenticated => vec![authz(cluster_networks, unauthenticated)],
        DefaultPolicy::ClusterAuthenticated => vec![authz(cluster_networks, authenticated)],
        DefaultPolicy::Deny => Vec::new(),
    };
    let kind = if opaque {
        in_proto::Kind::Opaque(in_proto::Opaque {})
    } else {
        in_proto::Kind::Detect(in_proto::Detect {
            timeout: Some(duration(DETECT_TIMEOUT)),
            http_routes: vec![inbound::HttpRoute {
                metadata: default_meta("default"),
                hosts: Vec::new(),
                authorizations: Vec::new(),
                rules: vec![inbound::http_route::Rule {
                    matches: vec![HttpRouteMatch {
                        path: Some(PathMatch {
                            kind: Some(path_match::Kind::Prefix("/".into())),
                        }),
                        ..Default::default()
                    }],
                    filters: Vec::new(),
                }],
            }],
            http_local_rate_limit: None,
        })
    };
    inbound::Server {
        protocol: Some(inbound::ProxyProtocol { kind: Some(kind) }),
        server_ips: Vec::new(),
        authorizations,
        labels: labels(policy.name()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
    use linkerd2_proxy_api::outbound::traffic_spec;
    use serde_json::json;

    use super::*;
    use crate::{index::Cluster, model};

    fn settings() -> Settings {
        Settings {
            cluster_domain: "cluster.local".into(),
            trust_domain: "cluster.local".into(),
            control_plane_ns: "linkerd".into(),
        }
    }

    fn index(pod_annotations: serde_json::Value, ns_annotations: serde_json::Value) -> Index {
        let mut idx = Index::default();
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {"config.linkerd.io/opaque-ports": "5432"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}, {"name": "db", "port": 5432}]},
        }))
        .unwrap();
        idx.apply_service(
            ("shop".into(), "web".into()),
            Some(model::service_info(&svc)),
        );
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "annotations": pod_annotations,
                         "labels": {"linkerd.io/control-plane-ns": "linkerd"}},
            "spec": {"serviceAccountName": "web", "containers": []},
            "status": {"podIP": "10.0.0.1", "phase": "Running"},
        }))
        .unwrap();
        idx.apply_pod(
            Cluster::Local,
            ("shop".into(), "web-1".into()),
            Some(model::pod_info(&pod)),
        );
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": "shop", "annotations": ns_annotations}}),
        )
        .unwrap();
        idx.apply_namespace("shop".into(), Some(model::namespace_info(&ns)));
        idx
    }

    fn kind(p: &OutboundPolicy) -> &proxy_protocol::Kind {
        p.protocol.as_ref().and_then(|p| p.kind.as_ref()).unwrap()
    }

    fn opaque_backend(routes: &[outbound::OpaqueRoute]) -> &Backend {
        let Some(opaque_route::distribution::Kind::FirstAvailable(f)) = routes[0].rules[0]
            .backends
            .as_ref()
            .and_then(|d| d.kind.as_ref())
        else {
            panic!("not first-available: {routes:?}");
        };
        f.backends[0].backend.as_ref().unwrap()
    }

    #[test]
    fn outbound_services_balance_over_their_endpoints() {
        let idx = index(json!({}), json!({}));
        let s = settings();
        for target in [
            OutboundTarget::Authority("web.shop.svc.cluster.local:80".into()),
            OutboundTarget::Addr("10.96.0.10:80".parse().unwrap()),
        ] {
            let (p, _) = outbound_policy(&idx, &s, &target).unwrap();
            let proxy_protocol::Kind::Detect(detect) = kind(&p) else {
                panic!("{target:?}: not detect: {p:?}");
            };
            assert_eq!(detect.timeout, Some(duration(DETECT_TIMEOUT)));
            let backend = opaque_backend(&detect.opaque.as_ref().unwrap().routes);
            let Some(backend::Kind::Balancer(b)) = &backend.kind else {
                panic!("not a balancer");
            };
            let Some(backend::endpoint_discovery::Kind::Dst(dst)) =
                b.discovery.as_ref().and_then(|d| d.kind.as_ref())
            else {
                panic!("no discovery");
            };
            assert_eq!(dst.path, "web.shop.svc.cluster.local:80");
            assert!(matches!(
                b.load,
                Some(backend::balance_p2c::Load::PeakEwma(_))
            ));
            assert_eq!(backend.queue, queue());
            assert_eq!(detect.http1.as_ref().unwrap().routes.len(), 1);
        }
        // An opaque port is opaque.
        let (p, _) = outbound_policy(
            &idx,
            &s,
            &OutboundTarget::Addr("10.96.0.10:5432".parse().unwrap()),
        )
        .unwrap();
        assert!(matches!(kind(&p), proxy_protocol::Kind::Opaque(_)));
        // An undeclared port of a ClusterIP is refused.
        let (p, _) = outbound_policy(
            &idx,
            &s,
            &OutboundTarget::Addr("10.96.0.10:81".parse().unwrap()),
        )
        .unwrap();
        let proxy_protocol::Kind::Opaque(o) = kind(&p) else {
            panic!()
        };
        assert!(matches!(
            o.routes[0].rules[0].filters[0].kind,
            Some(opaque_route::filter::Kind::Forbidden(_))
        ));
    }

    #[test]
    fn outbound_anything_else_is_forwarded() {
        let idx = index(json!({}), json!({}));
        let s = settings();
        // A Pod: forwarded with its identity.
        let (p, _) = outbound_policy(
            &idx,
            &s,
            &OutboundTarget::Addr("10.0.0.1:8080".parse().unwrap()),
        )
        .unwrap();
        let proxy_protocol::Kind::Detect(d) = kind(&p) else {
            panic!()
        };
        let Some(backend::Kind::Forward(addr)) =
            &opaque_backend(&d.opaque.as_ref().unwrap().routes).kind
        else {
            panic!()
        };
        assert!(addr.tls_identity.is_some());
        // Outside the cluster: as it is.
        let (p, _) = outbound_policy(
            &idx,
            &s,
            &OutboundTarget::Addr("192.0.2.1:443".parse().unwrap()),
        )
        .unwrap();
        let proxy_protocol::Kind::Detect(d) = kind(&p) else {
            panic!()
        };
        let Some(backend::Kind::Forward(addr)) =
            &opaque_backend(&d.opaque.as_ref().unwrap().routes).kind
        else {
            panic!()
        };
        assert_eq!(
            addr.addr,
            Some(TcpAddress::from(
                "192.0.2.1:443".parse::<SocketAddr>().unwrap()
            ))
        );
        assert!(addr.tls_identity.is_none());
        // A name that is not a Service name is not found.
        assert!(
            outbound_policy(
                &idx,
                &s,
                &OutboundTarget::Authority("example.com:443".into())
            )
            .is_err()
        );
        assert_eq!(
            outbound_target(Some(traffic_spec::Target::Authority("a:1".into()))),
            Ok(OutboundTarget::Authority("a:1".into()))
        );
        assert_eq!(outbound_target(None), Err(OutboundError::NoTarget));
    }

    #[test]
    fn inbound_default_policies_with_linkerd_precedence() {
        let nets: Vec<IpNet> = DEFAULT_CLUSTER_NETWORKS
            .split(',')
            .map(|n| n.parse().unwrap())
            .collect();
        // (pod annotation, namespace annotation, cluster default) -> policy
        let cases = [
            (
                json!({}),
                json!({}),
                DefaultPolicy::AllUnauthenticated,
                "all-unauthenticated",
            ),
            (
                json!({}),
                json!({"config.linkerd.io/default-inbound-policy": "deny"}),
                DefaultPolicy::AllUnauthenticated,
                "deny",
            ),
            (
                json!({"config.linkerd.io/default-inbound-policy": "all-authenticated"}),
                json!({"config.linkerd.io/default-inbound-policy": "deny"}),
                DefaultPolicy::AllUnauthenticated,
                "all-authenticated",
            ),
            (
                json!({"config.linkerd.io/default-inbound-policy": "nonsense"}),
                json!({}),
                DefaultPolicy::ClusterAuthenticated,
                "cluster-authenticated",
            ),
        ];
        let pod = ("shop".to_owned(), "web-1".to_owned());
        for (pod_ann, ns_ann, default, want) in cases {
            let idx = index(pod_ann, ns_ann);
            let (server, _) = inbound_server(&idx, default, &nets, &pod, 8080).unwrap();
            assert_eq!(server.labels.get("name").map(String::as_str), Some(want));
            assert_eq!(
                server.labels.get("kind").map(String::as_str),
                Some("default")
            );
            let permits: Vec<_> = server
                .authorizations
                .iter()
                .map(|a| {
                    (
                        a.networks.len(),
                        a.authentication.as_ref().and_then(|a| a.permit.clone()),
                    )
                })
                .collect();
            match want {
                "deny" => assert!(permits.is_empty()),
                "all-unauthenticated" => assert!(matches!(
                    permits.as_slice(),
                    [(2, Some(authn::Permit::Unauthenticated(_)))]
                )),
                "all-authenticated" => assert!(matches!(
                    permits.as_slice(),
                    [(2, Some(authn::Permit::MeshTls(_)))]
                )),
                "cluster-authenticated" => assert!(matches!(
                    permits.as_slice(),
                    [(4, Some(authn::Permit::MeshTls(_)))]
                )),
                _ => unreachable!(),
            }
            assert!(matches!(
                server.protocol.and_then(|p| p.kind),
                Some(in_proto::Kind::Detect(_))
            ));
        }
        // Opaque ports make the server opaque.
        let idx = index(json!({"config.linkerd.io/opaque-ports": "8080"}), json!({}));
        let (server, _) =
            inbound_server(&idx, DefaultPolicy::AllUnauthenticated, &nets, &pod, 8080).unwrap();
        assert!(matches!(
            server.protocol.and_then(|p| p.kind),
            Some(in_proto::Kind::Opaque(_))
        ));
        // Unknown pods and bad ports are errors.
        assert!(matches!(
            inbound_server(
                &idx,
                DefaultPolicy::Deny,
                &nets,
                &("shop".into(), "nope".into()),
                80
            ),
            Err(InboundError::UnknownPod(..))
        ));
        assert!(matches!(
            inbound_server(&idx, DefaultPolicy::Deny, &nets, &pod, 70000),
            Err(InboundError::BadPort(_))
        ));
    }

    #[test]
    fn workloads() {
        assert_eq!(
            parse_workload(r#"{"ns":"shop","pod":"web-1"}"#),
            Ok(("shop".into(), "web-1".into()))
        );
        assert_eq!(
            parse_workload("shop:web-1"),
            Ok(("shop".into(), "web-1".into()))
        );
        for bad in ["", "shop", ":web", r#"{"ns":"shop"}"#, "{nope"] {
            assert!(parse_workload(bad).is_err(), "{bad}");
        }
    }
}
