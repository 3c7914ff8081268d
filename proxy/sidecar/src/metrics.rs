//! The proxy's metrics under Linkerd's proxy names and labels, so that dashboards built for
//! Linkerd's proxy (Linkerd viz, Grafana boards) read them: `request_total`, `response_total`,
//! `response_latency_ms`, `tcp_open_total`, `tcp_close_total`, `tcp_open_connections`,
//! `tcp_read_bytes_total`, `tcp_write_bytes_total`, labelled with `direction`, `authority`,
//! `target_addr`, `tls`, `server_id` (outbound) or `client_id` (inbound), and the `dst_*`
//! labels discovery gave the endpoint; responses add `status_code` and `classification`.
//!
//! A connection's labels are built once ([`Labels`]); requests and bytes only look up counters.

use std::{borrow::Cow, fmt, sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use proxy_identity::Id;
use proxy_transport::{Activity, Tracked};

/// Linkerd's `response_latency_ms` buckets (linkerd2-proxy `linkerd/app/core/src/metrics.rs`).
const LATENCY_MS: [f64; 25] = [
    1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
    1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
];

/// Which side of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// The TLS state of a connection, as Linkerd labels it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tls {
    /// mTLS; the peer's identity (the client's inbound, the server's outbound), if it had one.
    Established(Option<Id>),
    /// No TLS, and why (`no_tls_reason`).
    None(&'static str),
    /// TLS for another name, passed through undecrypted.
    Passthru(Option<String>),
}

/// The labels of one connection or target, shared by its requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Labels(Arc<Vec<(Cow<'static, str>, String)>>);

impl EncodeLabelSet for Labels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), fmt::Error> {
        self.0.as_slice().encode(encoder)
    }
}

impl Labels {
    /// `direction`, `authority` (when known), `target_addr`, the TLS labels and `dst_*`.
    pub fn new<'a>(
        direction: Direction,
        authority: Option<&str>,
        target: std::net::SocketAddr,
        tls: &Tls,
        dst: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        let mut l: Vec<(Cow<'static, str>, String)> =
            vec![("direction".into(), direction.as_str().into())];
        if let Some(a) = authority {
            l.push(("authority".into(), a.into()));
        }
        l.push(("target_addr".into(), target.to_string()));
        l.push(("target_ip".into(), target.ip().to_string()));
        l.push(("target_port".into(), target.port().to_string()));
        let id_label = match direction {
            Direction::Inbound => "client_id",
            Direction::Outbound => "server_id",
        };
        match tls {
            Tls::Established(id) => {
                l.push(("tls".into(), "true".into()));
                if let Some(id) = id {
                    l.push((id_label.into(), id.to_string()));
                }
            }
            Tls::None(reason) => {
                l.push(("tls".into(), "no_identity".into()));
                l.push(("no_tls_reason".into(), (*reason).into()));
            }
            Tls::Passthru(sni) => {
                l.push(("tls".into(), "opaque".into()));
                if let Some(sni) = sni {
                    l.push(("sni".into(), sni.clone()));
                }
            }
        }
        for (k, v) in dst {
            l.push((format!("dst_{k}").into(), v.clone()));
        }
        Self(Arc::new(l))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status_code: u16,
    classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Error {
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Authz {
    srv_name: String,
    authz_name: String,
}

type Histo = Family<(Labels, Status), Histogram, fn() -> Histogram>;

/// Every metric of the data plane.
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    responses: Family<(Labels, Status), Counter>,
    latency: Histo,
    tcp_open: Family<(Labels, Peer), Counter>,
    tcp_close: Family<(Labels, Peer), Counter>,
    tcp_open_connections: Family<(Labels, Peer), Gauge>,
    tcp_read: Family<(Labels, Peer), Counter>,
    tcp_write: Family<(Labels, Peer), Counter>,
    inbound_errors: Family<Error, Counter>,
    outbound_errors: Family<Error, Counter>,
    tcp_authz_allow: Family<Authz, Counter>,
    tcp_authz_deny: Family<Authz, Counter>,
    http_authz_deny: Family<Authz, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_MS)),
            tcp_open: Family::default(),
            tcp_close: Family::default(),
            tcp_open_connections: Family::default(),
            tcp_read: Family::default(),
            tcp_write: Family::default(),
            inbound_errors: Family::default(),
            outbound_errors: Family::default(),
            tcp_authz_allow: Family::default(),
            tcp_authz_deny: Family::default(),
            http_authz_deny: Family::default(),
        }
    }
}

/// A TCP connection, counted open until dropped (then in `tcp_close_total`).
#[derive(Debug)]
pub struct Conn {
    open: Gauge,
    close: Counter,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.open.dec();
        self.close.inc();
    }
}

/// Which end of a proxied connection a TCP metric is about: Linkerd's `peer` label (`src` for
/// the accepted connection, `dst` for the one dialled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("request", "HTTP requests", self.requests.clone());
        registry.register("response", "HTTP responses", self.responses.clone());
        registry.register(
            "response_latency_ms",
            "Time to the response's headers, in milliseconds",
            self.latency.clone(),
        );
        registry.register("tcp_open", "TCP connections opened", self.tcp_open.clone());
        registry.register(
            "tcp_close",
            "TCP connections closed",
            self.tcp_close.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            self.tcp_open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from the peer",
            self.tcp_read.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to the peer",
            self.tcp_write.clone(),
        );
        registry.register(
            "inbound_tcp_errors",
            "Inbound connections closed on an error, by error",
            self.inbound_errors.clone(),
        );
        registry.register(
            "outbound_tcp_errors",
            "Outbound connections closed on an error, by error",
            self.outbound_errors.clone(),
        );
        registry.register(
            "inbound_tcp_authz_allow",
            "Inbound connections the policy allowed",
            self.tcp_authz_allow.clone(),
        );
        registry.register(
            "inbound_tcp_authz_deny",
            "Inbound connections the policy refused",
            self.tcp_authz_deny.clone(),
        );
        registry.register(
            "inbound_http_authz_deny",
            "Inbound HTTP requests the policy refused (403)",
            self.http_authz_deny.clone(),
        );
    }

    /// Counts a TCP connection opened; its bytes are counted on the returned stream.
    pub fn tcp<IO>(
        &self,
        labels: &Labels,
        end: End,
        io: IO,
        activity: &Arc<Activity>,
    ) -> (Tracked<IO>, Conn) {
        let key = (
            labels.clone(),
            Peer {
                peer: match end {
                    End::Src => "src",
                    End::Dst => "dst",
                },
            },
        );
        self.tcp_open.get_or_create(&key).inc();
        let open = self.tcp_open_connections.get_or_create(&key).clone();
        open.inc();
        let close = self.tcp_close.get_or_create(&key).clone();
        let read = self.tcp_read.get_or_create(&key).clone();
        let write = self.tcp_write.get_or_create(&key).clone();
        (
            Tracked::new(io, activity.clone(), read, write),
            Conn { open, close },
        )
    }

    /// Counts a request.
    pub fn request(&self, labels: &Labels) {
        self.requests.get_or_create(labels).inc();
    }

    /// Counts a response (or the proxy's own error response) and its latency. 5xx is a
    /// failure, as Linkerd classifies HTTP responses.
    pub fn response(&self, labels: &Labels, status: u16, latency: Duration) {
        let key = (
            labels.clone(),
            Status {
                status_code: status,
                classification: if status >= 500 { "failure" } else { "success" },
            },
        );
        self.responses.get_or_create(&key).inc();
        self.latency
            .get_or_create(&key)
            .observe(latency.as_secs_f64() * 1000.0);
    }

    /// Counts a connection closed on an error, by its label.
    pub fn error(&self, direction: Direction, error: &'static str) {
        let family = match direction {
            Direction::Inbound => &self.inbound_errors,
            Direction::Outbound => &self.outbound_errors,
        };
        family.get_or_create(&Error { error }).inc();
    }

    /// Counts an authorization decision.
    pub fn authz(&self, http: bool, allowed: bool, server: &str, authz: &str) {
        let key = Authz {
            srv_name: server.to_owned(),
            authz_name: authz.to_owned(),
        };
        match (http, allowed) {
            (_, true) => self.tcp_authz_allow.get_or_create(&key).inc(),
            (false, false) => self.tcp_authz_deny.get_or_create(&key).inc(),
            (true, false) => self.http_authz_deny.get_or_create(&key).inc(),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn labels_as_linkerd_names_them() {
        let dst = BTreeMap::from([("service".to_owned(), "web".to_owned())]);
        let id = Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let m = Metrics::default();
        let mut registry = Registry::default();
        m.register(&mut registry);
        let out = Labels::new(
            Direction::Outbound,
            Some("web.shop.svc.cluster.local:80"),
            "10.1.0.7:8080".parse().unwrap(),
            &Tls::Established(Some(id.clone())),
            &dst,
        );
        let inb = Labels::new(
            Direction::Inbound,
            None,
            "10.1.0.7:8080".parse().unwrap(),
            &Tls::None("not_provided_by_remote"),
            [],
        );
        m.request(&out);
        m.response(&out, 503, Duration::from_millis(7));
        m.response(&inb, 200, Duration::from_millis(1));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for expected in [
            r#"request_total{direction="outbound",authority="web.shop.svc.cluster.local:80",target_addr="10.1.0.7:8080",target_ip="10.1.0.7",target_port="8080",tls="true",server_id="web.shop.serviceaccount.identity.linkerd.cluster.local",dst_service="web"} 1"#,
            r#"status_code="503",classification="failure"} 1"#,
            r#"response_latency_ms_bucket{le="10.0",direction="outbound""#,
            r#"response_total{direction="inbound",target_addr="10.1.0.7:8080",target_ip="10.1.0.7",target_port="8080",tls="no_identity",no_tls_reason="not_provided_by_remote",status_code="200",classification="success"} 1"#,
        ] {
            assert!(text.contains(expected), "{expected}\nnot in\n{text}");
        }
    }
}
