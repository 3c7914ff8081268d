//! The controller's metrics. Linkerd's names where Linkerd has the metric; the rest are
//! `service_mirror_*`.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LinkLabels {
    pub target_cluster_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WriteLabels {
    pub target_cluster_name: String,
    /// Service, Endpoints, EndpointSlice, Namespace, Link.
    pub kind: &'static str,
    /// apply, delete, status.
    pub verb: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub target_cluster_name: String,
    /// A fixed name per kind of failure (see `worker::Error::metric_label`).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WatchLabels {
    pub target_cluster_name: String,
    /// remote_services, remote_endpointslices, local_services, ...
    pub watch: &'static str,
}

type HistogramFamily = Family<LinkLabels, Histogram, fn() -> Histogram>;

fn lag_histogram() -> Histogram {
    // 1 ms to ~33 s: a healthy mirror writes within milliseconds of the remote change.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

/// Every metric of the controller.
#[derive(Debug)]
pub struct Metrics {
    pub(crate) writes: Family<WriteLabels, Counter>,
    pub(crate) reconciles: Family<LinkLabels, Counter>,
    pub(crate) reconcile_errors: Family<ErrorLabels, Counter>,
    pub(crate) mirrored: Family<LinkLabels, Gauge>,
    pub(crate) watch_restarts: Family<WatchLabels, Counter>,
    pub(crate) sync_lag: HistogramFamily,
    pub(crate) probe: std::sync::Arc<crate::probe::ProbeMetrics>,
    pub(crate) leader: Gauge,
    pub(crate) endpoint_repairs: Family<LinkLabels, Counter>,
    pub(crate) worker_starts: Family<LinkLabels, Counter>,
    pub(crate) link_reconciles: Family<LinkLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            writes: Family::default(),
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            mirrored: Family::default(),
            watch_restarts: Family::default(),
            sync_lag: Family::new_with_constructor(lag_histogram),
            probe: std::sync::Arc::default(),
            leader: Gauge::default(),
            endpoint_repairs: Family::default(),
            worker_starts: Family::default(),
            link_reconciles: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn register(&self, registry: &mut Registry) {
        self.probe.register(registry);
        registry.register(
            "service_mirror_api_writes",
            "Write calls made to the local API server",
            self.writes.clone(),
        );
        registry.register(
            "service_mirror_reconciles",
            "Remote Services reconciled",
            self.reconciles.clone(),
        );
        registry.register(
            "service_mirror_reconcile_errors",
            "Reconciles that failed, by kind of failure",
            self.reconcile_errors.clone(),
        );
        registry.register(
            "service_mirror_mirrored_services",
            "Remote Services mirrored per Link",
            self.mirrored.clone(),
        );
        registry.register(
            "service_mirror_watch_restarts",
            "Watches that failed and were restarted",
            self.watch_restarts.clone(),
        );
        registry.register(
            "service_mirror_endpoint_repairs",
            "Times every mirror's endpoints were recomputed because the gateway changed",
            self.endpoint_repairs.clone(),
        );
        registry.register(
            "service_mirror_link_worker_starts",
            "Times a Link's work started: once, then on each change of its spec or credentials",
            self.worker_starts.clone(),
        );
        registry.register(
            "service_mirror_link_reconciles",
            "Times a Link was looked at: on any change of it (its status too) or of its credentials",
            self.link_reconciles.clone(),
        );
        registry.register(
            "service_mirror_leader",
            "1 while this replica holds the Lease and writes",
            self.leader.clone(),
        );
        registry.register_with_unit(
            "service_mirror_sync_lag",
            "From receiving a remote change to the local write that reflects it",
            Unit::Seconds,
            self.sync_lag.clone(),
        );
    }
}
