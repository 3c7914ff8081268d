//! The service-mirror benchmark (a measurement, not a timed test: it asserts nothing about time).
//!
//! `cargo bench -p e2e --bench mirror -- --services N` (N = 1,000 in CI; 10,000 by hand) starts
//! two real clusters, exports N Services from `east`, starts the release build of the controller
//! in `west` and reports:
//!
//! - the time until every mirror and its Endpoints exist, beside the baseline of the same run:
//!   the time the harness took to create the N remote Services through the same kind of API
//!   server (the ratio says how close mirroring comes to the API server's own write rate);
//! - the steady-state sync lag (a remote change until the local mirror shows it), p50 and p99;
//! - the write calls of a full resync in which nothing changed (a restarted controller);
//! - the controller's peak RSS, and the CPU time it used while mirroring beside that of the API
//!   server and etcd it wrote to.
//!
//! Results are printed and written to `target/bench/mirror.json`.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use e2e::{
    Cluster, Component, create_namespace, create_ready_pod, install_link_crd,
    measure::{arg, cpu_seconds, percentile, status_kib},
    meshlink::{Program, apply_link, labels, put_credentials, remote_access_kubeconfig},
};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

const NS: &str = "linkerd-multicluster";
const BENCH_NS: &str = "bench";
/// Concurrent API calls when creating Services (kubectl-like clients use a handful).
const CONCURRENCY: usize = 32;
/// Changes sampled for the steady-state lag.
const LAG_SAMPLES: usize = 100;

/// How many mirrors have Endpoints with addresses, kept up to date from one watch: listing
/// every mirror's Endpoints again and again would itself load the API server the controller
/// writes to, more with every mirror (at 3,000 mirrors, four lists a second halved the rate at
/// which mirrors appeared).
fn count_mirrored(
    client: kube::Client,
) -> (
    tokio::sync::watch::Receiver<usize>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0);
    let api = Api::<Endpoints>::namespaced(client, BENCH_NS);
    let config = watcher::Config::default().labels("mirror.linkerd.io/cluster-name=east");
    let task = tokio::spawn(async move {
        let mut done = HashSet::new();
        let mut events = std::pin::pin!(watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(ep) | watcher::Event::InitApply(ep)) => {
                    if ep.subsets.as_ref().is_some_and(|s| !s.is_empty()) {
                        done.insert(ep.name_any());
                    } else {
                        done.remove(&ep.name_any());
                    }
                }
                Ok(watcher::Event::Delete(ep)) => {
                    done.remove(&ep.name_any());
                }
                Ok(_) => continue,
                Err(error) => {
                    eprintln!("watching the mirrors' Endpoints: {error}; retrying");
                    continue;
                }
            }
            tx.send_replace(done.len());
        }
    });
    (rx, task)
}

async fn writes(p: &Program) -> Result<f64> {
    Ok(p.metric("service_mirror_api_writes_total", "").await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; only our own flag matters.
    let n = arg("--services", 1000);
    let clusters = Cluster::start_many(&["east", "west"]).await?;
    let (east, west) = (&clusters[0], &clusters[1]);
    let (ec, wc) = (east.client(), west.client());

    install_link_crd(&wc).await?;
    create_namespace(&wc, NS).await?;
    create_namespace(&wc, BENCH_NS).await?;
    create_namespace(&ec, BENCH_NS).await?;
    let kubeconfig = remote_access_kubeconfig(east, NS).await?;
    put_credentials(west, NS, "east", &kubeconfig).await?;
    // Data only: no probe path, so nothing is dialled.
    apply_link(&wc, NS, "east", "192.0.2.10", json!({})).await?;

    // One Ready Pod that every exported Service selects: each gets real Endpoints.
    create_ready_pod(
        &ec,
        BENCH_NS,
        "backend-0",
        &labels(&[("app", "backend")]),
        IpAddr::V4(Ipv4Addr::new(10, 7, 0, 1)),
        &east.node_name(),
    )
    .await?;
    let services: Api<Service> = Api::namespaced(ec.clone(), BENCH_NS);
    let created = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let services = services.clone();
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": { "name": format!("svc-{i:05}"), "labels": { "mirror.linkerd.io/exported": "true" } },
                    "spec": { "selector": { "app": "backend" }, "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    let baseline = created.elapsed();
    eprintln!("created {n} remote Services in {baseline:?}; waiting for their EndpointSlices");
    // Let the target's controllers publish every EndpointSlice, so the controller starts from a
    // settled target.
    let slices =
        Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(ec.clone(), BENCH_NS);
    e2e::wait_for(
        "every remote EndpointSlice",
        Duration::from_secs(600),
        || async {
            (slices
                .list_metadata(&ListParams::default())
                .await
                .ok()?
                .items
                .len()
                >= n)
                .then_some(())
        },
    )
    .await?;

    // One identity for both runs below, as a restarted replica keeps its Lease.
    let flags = [
        format!("--namespace={NS}"),
        "--log=warn".to_owned(),
        "--identity=bench".to_owned(),
    ];
    let (mut mirrored, counting) = count_mirrored(wc.clone());
    let west_api = || cpu_seconds(west.pid(Component::ApiServer));
    let west_etcd = || cpu_seconds(west.pid(Component::Etcd));
    let (api_before, etcd_before) = (west_api(), west_etcd());
    let start = Instant::now();
    // Started once live: /ready means synced, which is what is being timed.
    let controller = Program::start_live(
        "meshlink-mirror",
        &flags,
        &[("KUBECONFIG", west.kubeconfig_path().display().to_string())],
    )
    .await
    .context("the release controller (cargo build --release --bins)")?;
    loop {
        let waited =
            tokio::time::timeout(Duration::from_secs(5), mirrored.wait_for(|done| *done >= n))
                .await
                .map(|r| r.map(|_| ()));
        match waited {
            Ok(result) => {
                result.context("the watch of the mirrors ended")?;
                break;
            }
            Err(_) => eprintln!(
                "{}/{n} mirrored after {:?}",
                *mirrored.borrow(),
                start.elapsed()
            ),
        }
        ensure!(
            start.elapsed() < Duration::from_secs(900),
            "not every Service was mirrored in 15 minutes"
        );
    }
    let mirror_time = start.elapsed();
    counting.abort();
    // Where the mirroring time went: the controller's CPU beside that of the API server and
    // etcd it writes to (on this machine's two cores).
    let cpu = json!({
        "controller": cpu_seconds(controller.pid()),
        "west_apiserver": west_api() - api_before,
        "west_etcd": west_etcd() - etcd_before,
    });
    eprintln!("all {n} mirrored in {mirror_time:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Steady-state lag: change one remote Service at a time, time until the mirror shows it.
    let local: Api<Service> = Api::namespaced(wc.clone(), BENCH_NS);
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch = tokio::spawn({
        let local = local.clone();
        async move {
            let mut s = std::pin::pin!(
                watcher(
                    local,
                    watcher::Config::default().labels("mirror.linkerd.io/cluster-name=east")
                )
                .applied_objects()
            );
            while let Some(Ok(svc)) = s.next().await {
                if let Some(v) = svc
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("bench.meshlink.io/seq"))
                {
                    let _ = seen_tx.send((v.clone(), Instant::now()));
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut lags = Vec::with_capacity(LAG_SAMPLES);
    for i in 0..LAG_SAMPLES {
        let name = format!("svc-{:05}", (i * 7919) % n);
        let seq = format!("{i}");
        let sent = Instant::now();
        services
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({ "metadata": { "annotations": { "bench.meshlink.io/seq": seq } } }),
                ),
            )
            .await?;
        let arrived = loop {
            let (v, at) = tokio::time::timeout(Duration::from_secs(30), seen_rx.recv())
                .await
                .context("a change was not mirrored within 30 s")?
                .context("the local watch ended")?;
            if v == seq {
                break at;
            }
        };
        lags.push(arrived - sent);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    lags.sort();

    // Idle: nothing changes for 10 s.
    let before = writes(&controller).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_writes = writes(&controller).await? - before;
    let rss_mirroring = controller
        .pid()
        .and_then(|p| status_kib(p, "VmHWM"))
        .unwrap_or(0);
    // A full resync with nothing changed: a new controller lists and reconciles all N.
    drop(controller);
    let resync_start = Instant::now();
    let second = Program::start_live(
        "meshlink-mirror",
        &flags,
        &[("KUBECONFIG", west.kubeconfig_path().display().to_string())],
    )
    .await?;
    e2e::wait_for(
        "the new controller to reconcile every Service",
        Duration::from_secs(600),
        || async {
            let r = second
                .metric("service_mirror_reconciles_total", "")
                .await
                .ok()?;
            (r >= n as f64).then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resync_time = resync_start.elapsed();
    let resync_writes = writes(&second).await?;
    if resync_writes > 0.0 {
        // Which kinds: the goal is none.
        let (_, metrics) = second.get("/metrics").await?;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("service_mirror_api_writes_total"))
        {
            eprintln!("resync wrote: {line}");
        }
    }
    let rss_resync = second
        .pid()
        .and_then(|p| status_kib(p, "VmHWM"))
        .unwrap_or(0);
    let peak_rss = rss_mirroring.max(rss_resync);

    let results = json!({
        "services": n,
        "baseline_create_seconds": baseline.as_secs_f64(),
        "mirror_all_seconds": mirror_time.as_secs_f64(),
        "mirror_over_baseline": mirror_time.as_secs_f64() / baseline.as_secs_f64(),
        "lag_p50_ms": percentile(&lags, 0.5).as_secs_f64() * 1000.0,
        "lag_p99_ms": percentile(&lags, 0.99).as_secs_f64() * 1000.0,
        "idle_writes_10s": idle_writes,
        "resync_seconds": resync_time.as_secs_f64(),
        "resync_writes": resync_writes,
        "peak_rss_mib": peak_rss as f64 / 1024.0,
        "cpu_seconds_while_mirroring": cpu,
        // Which phase the peak is in: mirroring N Services as they appear, or a restarted
        // controller listing everything at once.
        "peak_rss_mirroring_mib": rss_mirroring as f64 / 1024.0,
        "peak_rss_resync_mib": rss_resync as f64 / 1024.0,
    });
    e2e::measure::report("mirror", &results)?;
    Ok(())
}
