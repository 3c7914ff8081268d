//! The TCP metrics of a proxy, with Linkerd's names: `tcp_open_total`,
//! `tcp_open_connections`, `tcp_read_bytes_total`, `tcp_write_bytes_total`, by `direction`.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{Activity, Tracked};

/// Which side of a proxy a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Accepted from a client.
    Inbound,
    /// Dialled to an endpoint.
    Outbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

impl From<Direction> for DirectionLabels {
    fn from(d: Direction) -> Self {
        Self {
            direction: match d {
                Direction::Inbound => "inbound",
                Direction::Outbound => "outbound",
            },
        }
    }
}

/// Connections opened and open, and bytes moved, by direction.
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    open_total: Family<DirectionLabels, Counter>,
    open_connections: Family<DirectionLabels, Gauge>,
    read_bytes: Family<DirectionLabels, Counter>,
    write_bytes: Family<DirectionLabels, Counter>,
}

/// An open connection, counted in `tcp_open_connections` until dropped.
#[derive(Debug)]
pub struct Open(Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl TcpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tcp_open",
            "TCP connections opened (inbound: accepted; outbound: to endpoints)",
            self.open_total.clone(),
        );
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            self.open_connections.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from clients (inbound) or endpoints (outbound)",
            self.read_bytes.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to clients (inbound) or endpoints (outbound)",
            self.write_bytes.clone(),
        );
    }

    /// Counts a connection opened, and open while the result lives.
    pub fn open(&self, direction: Direction) -> Open {
        let labels = direction.into();
        self.open_total.get_or_create(&labels).inc();
        let gauge = self.open_connections.get_or_create(&labels).clone();
        gauge.inc();
        Open(gauge)
    }

    /// `io`, its bytes counted and its activity recorded.
    pub fn tracked<IO>(
        &self,
        io: IO,
        activity: &Arc<Activity>,
        direction: Direction,
    ) -> Tracked<IO> {
        let labels = direction.into();
        let read = self.read_bytes.get_or_create(&labels).clone();
        let write = self.write_bytes.get_or_create(&labels).clone();
        Tracked::new(io, activity.clone(), read, write)
    }
}
