//! The destination service benchmark (a measurement, not a timed test: it asserts nothing about
//! time).
//!
//! `cargo bench -p e2e --bench destination -- --services 1000 --endpoints 10 --streams 1000
//! --churn 100 --seconds 20` starts one real cluster with N Services of E endpoints each (their
//! EndpointSlices name ten meshed Pods, so every answer carries identities), starts the release
//! build of `meshlink-destination` as its manifest's ServiceAccount, opens M `Get` streams (one
//! per Service, over ten connections, as ten proxies would) and reports:
//!
//! - the time from an EndpointSlice write until the update reaches a subscriber, p50 and p99,
//!   beside the baseline of the same run: the time until the same write reaches a plain watch of
//!   EndpointSlices held by the benchmark itself (the API server's own delivery);
//! - memory: RSS with everything listed and no stream, with M idle streams, and with 4M more
//!   (the marginal bytes per idle stream),
//!   and the peak while `--churn` Services change once a second for `--seconds`;
//! - the CPU time the service used during that churn.
//!
//! Results are printed and written to `target/bench/destination.json`.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use e2e::{
    Cluster, create_namespace, create_ready_pod,
    destination::{Followed, channel, start_destination},
    install_link_crd,
    measure::{arg, cpu_seconds, percentile, status_kib},
    mesh::{self, apply_manifest, start_identity},
    meshlink::{free_port, labels},
};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use linkerd2_proxy_api::destination::update;
use proxy_identity::{Credentials, Id, TrustAnchors};
use serde_json::json;

const NS: &str = "bench";
const CONCURRENCY: usize = 32;
const CONNECTIONS: usize = 10;
const PODS: usize = 10;

/// The address of endpoint `e` of Service `s`.
fn endpoint_ip(s: usize, e: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        40 + (s / 250) as u8,
        (s % 250) as u8,
        e as u8 + 1,
    ))
}

/// A unique marker address for change `n`: 10.100.0.0/14, never used otherwise.
fn marker(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        100 + (n >> 16) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

fn is_marker(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if (100..104).contains(&v4.octets()[1]) && v4.octets()[0] == 10)
}

fn slice(s: usize, endpoints: usize, last: Option<IpAddr>) -> serde_json::Value {
    let eps: Vec<_> = (0..endpoints)
        .map(|e| {
            let ip = match last {
                Some(m) if e + 1 == endpoints => m,
                _ => endpoint_ip(s, e),
            };
            json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": true },
                "targetRef": { "kind": "Pod", "name": format!("pod-{}", e % PODS), "namespace": NS },
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("svc-{s}-x"), "namespace": NS,
                      "labels": { "kubernetes.io/service-name": format!("svc-{s}") } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": eps,
    })
}

type Arrivals = Arc<Mutex<HashMap<IpAddr, Instant>>>;

fn arrived(arrivals: &Arrivals, ip: IpAddr) {
    arrivals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(ip)
        .or_insert_with(Instant::now);
}

#[tokio::main]
async fn main() -> Result<()> {
    let n = arg("--services", 1000);
    let e = arg("--endpoints", 10).clamp(1, 200);
    let m = arg("--streams", n);
    let churn = arg("--churn", 100).min(n);
    let seconds = arg("--seconds", 20);
    proxy_identity::tls::install_default_provider();

    let cluster = Cluster::start("west").await?;
    let client = cluster.client();
    let dir = tempfile::tempdir()?;
    mesh::make_pki(dir.path(), &["west"])?;
    mesh::install_identity(&cluster, dir.path(), "west").await?;
    install_link_crd(&client).await?;
    apply_manifest(&cluster, "destination/destination.yaml").await?;
    create_namespace(&client, NS).await?;
    let meshed = labels(&[("linkerd.io/control-plane-ns", "linkerd")]);
    for p in 0..PODS {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 30, 0, p as u8 + 1));
        create_ready_pod(
            &client,
            NS,
            &format!("pod-{p}"),
            &meshed,
            ip,
            &cluster.node_name(),
        )
        .await?;
    }

    // N Services, each with one slice of E endpoints (written as a controller writes them).
    let started = Instant::now();
    let (services, slices): (Api<Service>, Api<EndpointSlice>) = (
        Api::namespaced(client.clone(), NS),
        Api::namespaced(client.clone(), NS),
    );
    stream::iter(0..n)
        .map(|s| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": { "name": format!("svc-{s}") },
                    "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let sl: EndpointSlice = serde_json::from_value(slice(s, e, None))?;
                slices.create(&PostParams::default(), &sl).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let create_time = started.elapsed();

    let anchors = dir.path().join("anchor/ca.crt");
    let identity_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let _identity = start_identity(&cluster, identity_addr, &anchors, "24h", dir.path()).await?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let started = Instant::now();
    let dst = start_destination(
        &cluster,
        addr,
        identity_addr,
        &anchors,
        dir.path(),
        &["--log=warn".into()],
    )
    .await?;
    let ready_time = started.elapsed();
    let pid = dst.pid().context("the destination service's pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_listed = status_kib(pid, "VmRSS").unwrap_or(0);

    // M streams over ten connections (loopback: served without a client certificate).
    let creds = Credentials::new(
        Id::parse(&mesh::workload_id("bench", "bench", "west"))?,
        TrustAnchors::from_pem(&std::fs::read_to_string(&anchors)?)?,
    );
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(channel(addr, &creds).await?);
    }
    let arrivals: Arrivals = Arc::default();
    let started = Instant::now();
    let mut streams = Vec::new();
    for i in 0..m {
        let path = format!("svc-{}.{NS}.svc.cluster.local:80", i % n);
        let mut f = Followed::get(channels[i % CONNECTIONS].clone(), &path).await?;
        f.until("the first answer", Duration::from_secs(60), |f| {
            f.endpoints.len() == e
        })
        .await?;
        streams.push(f);
    }
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = status_kib(pid, "VmRSS").unwrap_or(0);
    // The first streams reuse heap the listing freed, so their RSS says little; four times as
    // many more, on the same Services, give the marginal cost of a stream.
    let extra = 4 * m;
    let mut idle = Vec::new();
    for i in 0..extra {
        let path = format!("svc-{}.{NS}.svc.cluster.local:80", i % n);
        let mut f = Followed::get(channels[i % CONNECTIONS].clone(), &path).await?;
        f.until("the first answer", Duration::from_secs(60), |f| {
            f.endpoints.len() == e
        })
        .await?;
        idle.push(f);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_more = status_kib(pid, "VmRSS").unwrap_or(0);
    let per_stream = (rss_more.saturating_sub(rss_idle) * 1024) as f64 / extra.max(1) as f64;
    drop(idle);

    // Subscribers record when each marker arrives.
    let mut readers = Vec::new();
    for mut f in streams {
        let arrivals = arrivals.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(u)) = f.next_update().await {
                if let Some(update::Update::Add(set)) = u.update {
                    for a in set.addrs {
                        if let Some(ip) = a
                            .addr
                            .and_then(|a| SocketAddr::try_from(a).ok())
                            .map(|a| a.ip())
                            && is_marker(ip)
                        {
                            arrived(&arrivals, ip);
                        }
                    }
                }
            }
        }));
    }
    // The baseline: a plain watch of the same slices, in this process.
    let baseline: Arrivals = Arc::default();
    let watch = {
        let baseline = baseline.clone();
        let slices = slices.clone();
        tokio::spawn(async move {
            let mut events =
                std::pin::pin!(watcher(slices, watcher::Config::default()).applied_objects());
            while let Some(Ok(s)) = events.next().await {
                for ep in s.endpoints.iter().flatten() {
                    for ip in ep.addresses.iter().filter_map(|a| a.parse().ok()) {
                        if is_marker(ip) {
                            arrived(&baseline, ip);
                        }
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Churn: `churn` Services change once a second.
    let cpu_before = cpu_seconds(Some(pid));
    let mut written: Vec<(IpAddr, Instant)> = Vec::new();
    let churn_started = Instant::now();
    for round in 0..seconds {
        let tick = Instant::now();
        let batch: Vec<(IpAddr, Instant)> = stream::iter(0..churn)
            .map(|s| {
                let slices = slices.clone();
                async move {
                    let ip = marker(round * churn + s);
                    let at = Instant::now();
                    slices
                        .patch(
                            &format!("svc-{s}-x"),
                            &PatchParams::default(),
                            &Patch::Merge(slice(s, e, Some(ip))),
                        )
                        .await?;
                    anyhow::Ok((ip, at))
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect()
            .await?;
        written.extend(batch);
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
    }
    let churn_time = churn_started.elapsed();
    // Let the last updates arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_seconds(Some(pid)) - cpu_before;
    let peak = status_kib(pid, "VmHWM").unwrap_or(0);

    let lags = |arrivals: &Arrivals| {
        let got = arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut lags: Vec<Duration> = written
            .iter()
            .filter_map(|(ip, at)| got.get(ip).map(|t| t.saturating_duration_since(*at)))
            .collect();
        lags.sort();
        lags
    };
    let (dst_lags, base_lags) = (lags(&arrivals), lags(&baseline));
    ensure!(
        dst_lags.len() == written.len(),
        "{} of {} changes reached a subscriber",
        dst_lags.len(),
        written.len()
    );
    watch.abort();
    for r in readers {
        r.abort();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (d50, d99) = (percentile(&dst_lags, 0.5), percentile(&dst_lags, 0.99));
    let (b50, b99) = (percentile(&base_lags, 0.5), percentile(&base_lags, 0.99));
    let results = json!({
        "services": n,
        "endpoints_per_service": e,
        "streams": m,
        "churning_services": churn,
        "changes": written.len(),
        "create_seconds": create_time.as_secs_f64(),
        "ready_seconds": ready_time.as_secs_f64(),
        "open_streams_seconds": open_time.as_secs_f64(),
        "update_p50_ms": ms(d50),
        "update_p99_ms": ms(d99),
        "baseline_watch_p50_ms": ms(b50),
        "baseline_watch_p99_ms": ms(b99),
        "p50_over_baseline": ms(d50) / ms(b50).max(0.001),
        "p99_over_baseline": ms(d99) / ms(b99).max(0.001),
        "rss_listed_mib": rss_listed as f64 / 1024.0,
        "rss_idle_streams_mib": rss_idle as f64 / 1024.0,
        "rss_5x_idle_streams_mib": rss_more as f64 / 1024.0,
        "bytes_per_idle_stream": per_stream,
        "peak_rss_mib": peak as f64 / 1024.0,
        "cpu_seconds_during_churn": cpu,
        "churn_seconds": churn_time.as_secs_f64(),
    });
    e2e::measure::report("destination", &results)?;
    Ok(())
}
