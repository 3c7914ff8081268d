//! Gateway liveness: one explicit state machine, fed by a probe of the gateway's health port.
//!
//! The state starts **alive** (or as the Link's `GatewayAlive` condition last said, when the
//! controller restarts). A controller that restarts, or a Link that is re-applied, must not
//! flip mirror endpoints that were ready to not-ready before it has seen a single failure
//! (Linkerd's probe worker starts dead while its watcher starts alive, so a gateway that is down
//! from the start is never reported, and a restart can fail requests fast [quirk, #8590]). It
//! turns dead after `failureThreshold` consecutive failed probes and alive again at the first
//! success; only these transitions change endpoint readiness, the Link's `GatewayAlive`
//! condition and Events.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::sync::watch;

use crate::desired::Gateway;

/// Liveness of a gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Probes succeed (or too few have failed in a row to say otherwise).
    Alive,
    /// `failureThreshold` probes in a row failed.
    Dead,
}

/// The liveness state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    liveness: Liveness,
    failures: u32,
    threshold: u32,
}

impl State {
    /// The initial state: alive, no failures.
    #[cfg(test)]
    pub fn new(threshold: u32) -> Self {
        Self::starting(threshold, Liveness::Alive)
    }

    /// A state that starts as `liveness` (what the Link's status last said); a dead start
    /// counts as `threshold` failures, so one success revives it.
    pub fn starting(threshold: u32, liveness: Liveness) -> Self {
        let threshold = threshold.max(1);
        Self {
            liveness,
            failures: if liveness == Liveness::Dead {
                threshold
            } else {
                0
            },
            threshold,
        }
    }

    /// The current liveness.
    pub fn liveness(&self) -> Liveness {
        self.liveness
    }

    /// Records a probe's result; returns the new liveness when it changed.
    pub fn observe(&mut self, success: bool) -> Option<Liveness> {
        let before = self.liveness;
        if success {
            self.failures = 0;
            self.liveness = Liveness::Alive;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.threshold {
                self.liveness = Liveness::Dead;
            }
        }
        (self.liveness != before).then_some(self.liveness)
    }
}

/// What to probe, from the Link's `probeSpec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub path: String,
    pub port: u16,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
}

/// Why a Link's `probeSpec` cannot be used.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("probeSpec.port {0:?} is not a port number")]
    Port(String),
    #[error("probeSpec.{field} {value:?} is not a duration such as \"3s\"")]
    Duration { field: &'static str, value: String },
    #[error("probeSpec.failureThreshold {0:?} is not a positive whole number")]
    Threshold(String),
}

impl ProbeSpec {
    /// Parses a Link's probe settings; `None` when the Link has no probe path (no gateway).
    pub fn from_link(spec: &link_crd::ProbeSpec) -> Result<Option<Self>, SpecError> {
        if spec.path.is_empty() {
            return Ok(None);
        }
        let port = spec
            .port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| SpecError::Port(spec.port.clone()))?;
        let duration = |field, value: &str| {
            parse_go_duration(value).ok_or_else(|| SpecError::Duration {
                field,
                value: value.to_owned(),
            })
        };
        Ok(Some(Self {
            path: spec.path.clone(),
            port,
            period: duration("period", &spec.period)?,
            timeout: duration("timeout", &spec.timeout)?,
            failure_threshold: spec
                .failure_threshold
                .parse()
                .ok()
                .filter(|t| *t > 0)
                .ok_or_else(|| SpecError::Threshold(spec.failure_threshold.clone()))?,
        }))
    }
}

/// Parses a positive Go duration such as `3s`, `1m30s` or `500ms` (the CRD admits only these).
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let (unit, len) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("μs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .iter()
        .find(|(u, _)| rest.starts_with(u))
        .map(|(u, f)| (*f, u.len()))?;
        total += value * unit;
        rest = &rest[len..];
    }
    (total > 0.0).then(|| Duration::from_secs_f64(total))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ClusterLabels {
    pub target_cluster_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabels {
    pub target_cluster_name: String,
    pub probe_successful: &'static str,
}

/// Linkerd's probe metrics, by name and labels.
#[derive(Debug)]
pub struct ProbeMetrics {
    pub(crate) enabled: Family<ClusterLabels, Gauge>,
    pub(crate) alive: Family<ClusterLabels, Gauge>,
    pub(crate) latency: Family<ClusterLabels, Gauge>,
    pub(crate) latency_ms: Family<ClusterLabels, Histogram, fn() -> Histogram>,
    pub(crate) probes: Family<ProbeLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    // Linkerd's buckets for gateway_probe_latency_ms.
    Histogram::new([
        1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0,
        1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0,
    ])
}

impl Default for ProbeMetrics {
    fn default() -> Self {
        Self {
            enabled: Family::default(),
            alive: Family::default(),
            latency: Family::default(),
            latency_ms: Family::new_with_constructor(latency_histogram),
            probes: Family::default(),
        }
    }
}

impl ProbeMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_enabled",
            "1 once a gateway probe runs for the target cluster",
            self.enabled.clone(),
        );
        registry.register(
            "gateway_alive",
            "1 when the target cluster's gateway is alive",
            self.alive.clone(),
        );
        registry.register(
            "gateway_latency",
            "Latency of the last successful probe, in milliseconds",
            self.latency.clone(),
        );
        registry.register(
            "gateway_probe_latency_ms",
            "Latency of successful probes, in milliseconds",
            self.latency_ms.clone(),
        );
        // Every probe is counted (Linkerd counts failures only past the threshold [quirk]).
        registry.register("gateway_probes", "Gateway probes made", self.probes.clone());
    }
}

/// One probe of `addr`: an HTTP/1 GET of `path` that must answer 200 within `timeout`.
pub(crate) async fn probe_once(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "meshlink-service-mirror")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let rsp = sender.send_request(req).await.map_err(|e| e.to_string());
        conn.abort();
        let status = rsp?.status();
        if status == http::StatusCode::OK {
            Ok(start.elapsed())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// What the probe loop reports on each transition.
#[derive(Clone, Debug)]
pub(crate) struct Transition {
    pub liveness: Liveness,
    pub detail: String,
}

/// Probes the gateway every `period` (plus up to 10 % jitter) at every address it resolves to;
/// a probe succeeds when any address answers. Publishes liveness on `alive` and each transition
/// on `transitions`. Runs until `alive` has no receivers.
pub(crate) async fn run(
    spec: ProbeSpec,
    cluster: String,
    mut gateway: watch::Receiver<Option<Gateway>>,
    alive: watch::Sender<bool>,
    transitions: tokio::sync::mpsc::UnboundedSender<Transition>,
    metrics: std::sync::Arc<ProbeMetrics>,
    on_latency: impl Fn(Duration),
) {
    let labels = ClusterLabels {
        target_cluster_name: cluster.clone(),
    };
    metrics.enabled.get_or_create(&labels).set(1);
    let initial = if *alive.borrow() {
        Liveness::Alive
    } else {
        Liveness::Dead
    };
    metrics
        .alive
        .get_or_create(&labels)
        .set(i64::from(initial == Liveness::Alive));
    let mut state = State::starting(spec.failure_threshold, initial);
    loop {
        let jitter = spec.period.mul_f64(jitter_fraction() / 10.0);
        tokio::select! {
            () = tokio::time::sleep(spec.period + jitter) => {}
            () = alive.closed() => return,
        }
        let addresses: Vec<IpAddr> = gateway
            .borrow_and_update()
            .as_ref()
            .map(|g| g.addresses.clone())
            .unwrap_or_default();
        let mut outcome = Err("the gateway address resolves to nothing".to_owned());
        for ip in addresses {
            match probe_once(SocketAddr::new(ip, spec.port), &spec.path, spec.timeout).await {
                Ok(latency) => {
                    outcome = Ok(latency);
                    break;
                }
                Err(e) => outcome = Err(format!("{ip}:{}{}: {e}", spec.port, spec.path)),
            }
        }
        let success = outcome.is_ok();
        metrics
            .probes
            .get_or_create(&ProbeLabels {
                target_cluster_name: cluster.clone(),
                probe_successful: if success { "true" } else { "false" },
            })
            .inc();
        if let Ok(latency) = outcome {
            on_latency(latency);
            let ms = latency.as_secs_f64() * 1000.0;
            metrics.latency.get_or_create(&labels).set(ms as i64);
            metrics.latency_ms.get_or_create(&labels).observe(ms);
        }
        if let Some(liveness) = state.observe(success) {
            let alive_now = state.liveness() == Liveness::Alive;
            metrics
                .alive
                .get_or_create(&labels)
                .set(i64::from(alive_now));
            let detail = match &outcome {
                Ok(_) => String::new(),
                Err(e) => format!(
                    "{} probes in a row failed; last: {e}",
                    spec.failure_threshold
                ),
            };
            tracing::info!(cluster = %cluster, ?liveness, %detail, "gateway liveness changed");
            let _ = alive.send(alive_now);
            let _ = transitions.send(Transition { liveness, detail });
        }
    }
}

/// A fraction in [0, 1) from the clock's nanoseconds: jitter needs no cryptographic quality.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        // (threshold, probe results, liveness after each, transitions)
        let cases: &[(u32, &[bool], &[Liveness])] = &[
            (3, &[false, false], &[Liveness::Alive, Liveness::Alive]),
            (
                3,
                &[false, false, false],
                &[Liveness::Alive, Liveness::Alive, Liveness::Dead],
            ),
            (
                3,
                &[false, false, true, false, false],
                &[Liveness::Alive; 5],
            ),
            (
                1,
                &[false, true, false],
                &[Liveness::Dead, Liveness::Alive, Liveness::Dead],
            ),
            (
                2,
                &[false, false, false, true],
                &[
                    Liveness::Alive,
                    Liveness::Dead,
                    Liveness::Dead,
                    Liveness::Alive,
                ],
            ),
        ];
        for (threshold, results, want) in cases {
            let mut s = State::new(*threshold);
            assert_eq!(s.liveness(), Liveness::Alive, "the initial state is alive");
            let mut before = Liveness::Alive;
            for (i, (r, w)) in results.iter().zip(*want).enumerate() {
                let t = s.observe(*r);
                assert_eq!(s.liveness(), *w, "threshold {threshold}, probe {i}");
                assert_eq!(t, (before != *w).then_some(*w), "transition at probe {i}");
                before = *w;
            }
        }
        // A threshold of 0 would make the first failure flip; it counts as 1.
        assert_eq!(State::new(0).observe(false), Some(Liveness::Dead));
        // Restarted dead: stays dead on failures, one success revives it.
        let mut s = State::starting(3, Liveness::Dead);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), Some(Liveness::Alive));
    }

    #[test]
    fn durations() {
        let cases = [
            ("3s", Some(3.0)),
            ("1m30s", Some(90.0)),
            ("500ms", Some(0.5)),
            ("1.5h", Some(5400.0)),
            ("3", None),
            ("", None),
            ("0s", None),
            ("3 s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_go_duration(s).map(|d| d.as_secs_f64()), want, "{s}");
        }
    }

    #[test]
    fn spec_from_link() {
        let mut spec = link_crd::ProbeSpec {
            path: "/ready".into(),
            port: "4191".into(),
            period: "3s".into(),
            ..link_crd::ProbeSpec::default()
        };
        let p = ProbeSpec::from_link(&spec).unwrap().unwrap();
        assert_eq!(
            (p.port, p.period, p.timeout, p.failure_threshold),
            (4191, Duration::from_secs(3), Duration::from_secs(30), 3)
        );
        spec.period = "3".into();
        assert!(matches!(
            ProbeSpec::from_link(&spec),
            Err(SpecError::Duration {
                field: "period",
                ..
            })
        ));
        spec.path = String::new();
        assert_eq!(ProbeSpec::from_link(&spec), Ok(None));
    }

    #[tokio::test]
    async fn probes_a_real_http_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                assert!(buf.starts_with(b"GET /ready HTTP/1.1"));
                s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
            }
            // Then accept and say nothing.
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        assert!(
            probe_once(addr, "/ready", Duration::from_secs(5))
                .await
                .is_ok()
        );
        let err = probe_once(addr, "/ready", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        let err = probe_once(addr, "/ready", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
    }
}
