//! The gateway's metrics. Where Linkerd's proxy has the same metric, the name and labels are
//! Linkerd's (`inbound_tcp_transport_header_connections_total`, `tcp_open_total`, ...).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::Refusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HeaderLabels {
    pub session_protocol: &'static str,
    pub target_port: u16,
    pub target_name: String,
    pub client_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabels {
    pub http_status: u16,
}

/// Everything the gateway counts.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub(crate) header_connections: Family<HeaderLabels, Counter>,
    pub(crate) refused: Family<ReasonLabels, Counter>,
    pub(crate) tcp: proxy_transport::TcpMetrics,
    pub(crate) http_responses: Family<StatusLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "inbound_tcp_transport_header_connections",
            "Connections with a transport header, by target and client",
            self.header_connections.clone(),
        );
        registry.register(
            "gateway_refused_connections",
            "Connections closed before forwarding, by reason",
            self.refused.clone(),
        );
        self.tcp.register(registry);
        registry.register(
            "inbound_http_statuses",
            "HTTP responses the gateway returned, by status",
            self.http_responses.clone(),
        );
    }

    pub(crate) fn refuse(&self, reason: Refusal) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}
