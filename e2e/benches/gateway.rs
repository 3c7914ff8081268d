//! The multicluster gateway benchmark (a measurement, not a timed test: it asserts nothing about
//! time, and prints the issue's goals as met or missed without failing on them).
//!
//! `make bench-gateway` (or `cargo bench -p e2e --bench gateway -- --seconds 10 --rounds 5`)
//! builds one topology and, in one run, measures three routes to the same backend:
//!
//! - **direct**: the client dials the backend in plain TCP. The baseline: what the network, the
//!   client and the backend cost by themselves, so that what remains is the proxy's cost.
//! - **gateway**: the client dials `meshlink-gateway` as it ships (the `dist` profile, which
//!   `make bench-gateway` builds) as a Linkerd proxy would (mTLS, ALPN `transport.l5d.io/v1`, a
//!   transport header naming the Service); the gateway forwards to the endpoint it discovered
//!   through a real API server.
//! - **haproxy**: Debian's HAProxy terminating the same mTLS (the gateway's identity as server
//!   certificate, client certificates verified against the same trust anchor, TLS 1.3 only) in
//!   front of the same backend: what a mature general-purpose proxy does with the same work.
//!
//! Each route at 1 and 16 concurrent connections, for small HTTP/1.1 requests on keep-alive
//! connections (requests/s, p50 and p99 latency; each connection makes one request at a time)
//! and for bulk TCP (MB/s uploaded into a sink). A run is cut into slices, interleaved round by
//! round with the other routes' slices, so that whatever else the machine does (builds, other
//! benchmarks) touches every route alike; the slowest and fastest slice show the spread.
//! Connections are open before a slice starts, so handshakes are not in these figures. Then the
//! gateway's memory under that load (VmHWM, and VmRSS sampled every 50 ms), and a hostile flood:
//! idle TCP connections (10,000 by default) held open on the gateway while a legitimate client
//! makes fresh connections and requests.
//!
//! The topology: one cluster (an API server for discovery and the identity service that
//! certifies the gateway). The backend is this executable re-run in a network namespace
//! (EndpointSlices refuse loopback addresses) with a single-threaded runtime: a 3-byte HTTP/1.1
//! answer, and a sink that discards what it reads and, at end of stream, answers with the byte
//! count it got, so that a bulk run counts what arrived rather than what sat in socket buffers.
//! The gateway and HAProxy listen on loopback; the client is this process, in the root
//! namespace, with the same client code on every route.
//!
//! The machine's cores are shared by the client (two tokio workers), the gateway (`--threads`
//! workers, two by default), HAProxy (`nbthread`, the same number) and the backend: absolute
//! figures say little about production, the ratios within one run are the result. Results are printed and written to `target/bench/gateway.json`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bytes::Bytes;
use clap::Parser;
use e2e::{
    Cluster, create_namespace, create_ready_pod,
    measure::{
        BULK_CHUNK, BulkFigures, BulkSlice, Goal, Guard, HttpFigures, HttpSlice, Results,
        Route as _, RssSampler, Timing, haproxy_binary, haproxy_check, haproxy_version,
        interleaved, mib, micros, percentile, print_bulk, print_requests, print_verdict, sink,
        status_kib, upload, wait_listening, write_json,
    },
    mesh::{self, GatewaySettings, start_gateway, start_identity},
    meshlink::{Program, free_port, labels, shipped_binary},
    netns::Host,
    wait_for,
};
use futures::{StreamExt as _, stream};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, api::PostParams};
use proxy_identity::{Credentials, Id, TrustAnchors, ca::Signer};
use proxy_sidecar::endpoint::Dialer;
use proxy_transport_header::{Header, SessionProtocol};
use serde::Serialize;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

/// The backend's namespace and Service.
const NS: &str = "bench";
const SERVICE: &str = "web";
const HTTP_PORT: u16 = 8080;
const BULK_PORT: u16 = 7001;
/// The client's identity (any identity from the anchor is authorized by default).
/// The benchmark's one cluster; its issuer certifies identities in its trust domain only.
const CLUSTER: &str = "east";
/// Concurrent connections of each run; the goals are stated at these two.
const CONNECTIONS: [usize; 2] = [1, 16];
const CLIENT_THREADS: usize = 2;
/// What the backend answers to every HTTP request.
const BODY: &[u8] = b"ok\n";
/// Time a connection (TCP, TLS, header) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a legitimate request on a fresh connection may take during the flood.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections being opened at once during the flood.
const FLOOD_CONCURRENCY: usize = 256;

#[derive(Parser, Debug)]
#[command(about = "The gateway against direct TCP and HAProxy, in one topology")]
struct Args {
    /// Measured seconds of each run (12 runs: 3 routes, 2 connection counts, HTTP and bulk).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Slices each run is cut into, interleaved with the other routes' slices.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of HTTP requests before each HTTP slice is measured.
    #[arg(long, default_value_t = 0.25)]
    warmup: f64,
    /// Idle TCP connections opened on the gateway in the flood.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Legitimate requests, each on a fresh connection, before and during the flood.
    #[arg(long, default_value_t = 20)]
    probes: usize,
    /// Threads of the gateway (`--cores`) and of HAProxy (`nbthread`): the same budget for both.
    /// Two by default, the cores of the machines this runs on (a gateway is a dedicated edge
    /// proxy; its manifest gives it two).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Forwarded connections held open to measure the gateway's memory per connection (idle
    /// opaque, opaque after 64 KiB each way... see `per_connection`).
    #[arg(long, default_value_t = 1000)]
    per_connection: usize,
    /// Only the memory per forwarded connection (no throughput runs, no flood).
    #[arg(long)]
    memory_only: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(clap::Subcommand, Debug)]
enum Role {
    /// The backend, which the benchmark runs in its network namespace.
    #[command(hide = true)]
    Backend {
        #[arg(long)]
        http: SocketAddr,
        #[arg(long)]
        bulk: SocketAddr,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Role::Backend { http, bulk }) = args.role {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(backend::serve(http, bulk));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(CLIENT_THREADS)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let timing = Timing::new(args.seconds, args.rounds, args.warmup)?;
    let fd_limit = raise_fd_limit()?;
    proxy_identity::tls::install_default_provider();
    let topology = Topology::start(args.threads).await?;
    eprintln!(
        "topology ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let tls = BTreeMap::from([
        (
            Route::Gateway,
            topology.targets.tls_summary(Route::Gateway).await?,
        ),
        (
            Route::Haproxy,
            topology.targets.tls_summary(Route::Haproxy).await?,
        ),
    ]);

    let gateway_pid = topology
        .gateway
        .pid()
        .context("the gateway is not running")?;
    if args.memory_only {
        let per_connection = per_connection(&topology, args.per_connection).await?;
        return per_connection.print(&mut std::io::stdout().lock());
    }
    let gateway_rss = RssSampler::start(gateway_pid);
    let haproxy_rss = RssSampler::start(topology.haproxy.pid);
    let targets = &topology.targets;
    let http = interleaved(&Route::ALL, &CONNECTIONS, timing.rounds, |route, conns| {
        http_slice(targets, route, conns, timing)
    })
    .await?;
    let bulk = interleaved(&Route::ALL, &CONNECTIONS, timing.rounds, |route, conns| {
        bulk_slice(targets, route, conns, timing)
    })
    .await?;
    let memory = Memory {
        gateway_peak_mib: mib(status_kib(gateway_pid, "VmHWM")),
        gateway_max_sampled_mib: mib(Some(gateway_rss.max_kib())),
        haproxy_peak_mib: mib(status_kib(topology.haproxy.pid, "VmHWM")),
        haproxy_max_sampled_mib: mib(Some(haproxy_rss.max_kib())),
    };
    drop((gateway_rss, haproxy_rss));
    let flood = flood(&topology, args.idle_connections, args.probes).await?;
    // Last: memory the allocator keeps after 2,000 connections would count in the peaks above.
    let per_connection = per_connection(&topology, args.per_connection).await?;

    let settings = json!({
        "seconds_per_run": timing.run().as_secs_f64(),
        "rounds": timing.rounds,
        "seconds_per_slice": timing.slice.as_secs_f64(),
        "warmup_seconds_per_http_slice": timing.warmup.as_secs_f64(),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "client_tokio_workers": CLIENT_THREADS,
        "gateway_runtime": if args.threads == 1 { "tokio current_thread".to_owned() } else { format!("tokio multi_thread, {} workers", args.threads) },
        "backend_runtime": "tokio current_thread, in a network namespace",
        "haproxy_version": topology.haproxy.version,
        "haproxy_nbthread": args.threads,
        "haproxy_config": topology.haproxy.config,
        "tls": tls,
        "http_body_bytes": BODY.len(),
        "bulk_write_bytes": BULK_CHUNK,
        "open_files_limit": fd_limit,
    });
    let report = Report::new(settings, http, bulk, memory, flood, per_connection);
    drop(topology);
    let elapsed = started.elapsed();
    report.print(&mut std::io::stdout().lock(), elapsed)?;
    report.write_json(elapsed)
}

/// The flood needs one descriptor per connection: the soft limit goes up to the hard limit.
fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok(hard)
}

// ---------------------------------------------------------------------------------------------
// Routes and the client

/// The three ways to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Route {
    Direct,
    Gateway,
    Haproxy,
}

impl Route {
    const ALL: [Self; 3] = [Self::Direct, Self::Gateway, Self::Haproxy];
}

impl e2e::measure::Route for Route {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Gateway => "gateway",
            Self::Haproxy => "haproxy",
        }
    }
}

/// What a connection carries.
#[derive(Clone, Copy, Debug)]
enum Traffic {
    Http,
    Bulk,
}

/// An HTTP port and a bulk port.
#[derive(Clone, Copy, Debug)]
struct Ports {
    http: SocketAddr,
    bulk: SocketAddr,
}

impl Ports {
    fn of(self, traffic: Traffic) -> SocketAddr {
        match traffic {
            Traffic::Http => self.http,
            Traffic::Bulk => self.bulk,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
/// A connection on any route (the same boxing cost on each).
type Stream = Box<dyn Io>;

/// Where each route starts, and the client's TLS settings.
#[derive(Debug)]
struct Targets {
    backend: Ports,
    gateway: SocketAddr,
    haproxy: Ports,
    /// As a Linkerd proxy dials a gateway: ALPN `transport.l5d.io/v1`, then the header.
    gateway_dialer: Dialer,
    /// The same certificate and verifier, with ALPN `http/1.1`.
    haproxy_tls: Arc<rustls::ClientConfig>,
    /// The identity both proxies present (HAProxy has a leaf for it too).
    gateway_id: Id,
}

/// The `Host` of every request, and the Service the transport header names.
fn service_name() -> String {
    format!("{SERVICE}.{NS}.svc.cluster.local")
}

fn authority() -> String {
    format!("{}:{HTTP_PORT}", service_name())
}

impl Targets {
    fn new(
        creds: &Arc<Credentials>,
        backend: Ports,
        gateway: SocketAddr,
        haproxy: Ports,
    ) -> Result<Self> {
        Ok(Self {
            backend,
            gateway,
            haproxy,
            gateway_dialer: Dialer::new(creds, DIAL_TIMEOUT),
            haproxy_tls: proxy_identity::tls::client_config(creds, &[b"http/1.1"]),
            gateway_id: Id::parse(&mesh::gateway_id(CLUSTER))?,
        })
    }

    /// Opens a connection for `traffic` on `route`, ready for its first byte of payload.
    async fn dial(&self, route: Route, traffic: Traffic) -> Result<Stream> {
        Ok(match route {
            Route::Direct => Box::new(tcp(self.backend.of(traffic)).await?),
            Route::Gateway => Box::new(self.dial_gateway(traffic).await?),
            Route::Haproxy => Box::new(self.dial_haproxy(traffic).await?),
        })
    }

    async fn dial_gateway(
        &self,
        traffic: Traffic,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let header = match traffic {
            Traffic::Http => Header {
                port: HTTP_PORT,
                name: Some(service_name()),
                protocol: Some(SessionProtocol::Http1),
            },
            Traffic::Bulk => Header {
                port: BULK_PORT,
                name: Some(service_name()),
                protocol: None,
            },
        };
        Ok(self
            .gateway_dialer
            .with_header(self.gateway, &self.gateway_id, &header)
            .await?)
    }

    async fn dial_haproxy(
        &self,
        traffic: Traffic,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = tcp(self.haproxy.of(traffic)).await?;
        let tls = proxy_identity::tls::connect(self.haproxy_tls.clone(), tcp, &self.gateway_id);
        Ok(tokio::time::timeout(DIAL_TIMEOUT, tls)
            .await
            .context("TLS handshake with HAProxy timed out")??)
    }

    /// The TLS version, cipher suite and key exchange a route negotiates.
    async fn tls_summary(&self, route: Route) -> Result<String> {
        let stream = match route {
            Route::Direct => return Ok("none".to_owned()),
            Route::Gateway => self.dial_gateway(Traffic::Http).await?,
            Route::Haproxy => self.dial_haproxy(Traffic::Http).await?,
        };
        let conn = stream.get_ref().1;
        Ok(format!(
            "{:?} {:?} {:?} ALPN {}",
            conn.protocol_version(),
            conn.negotiated_cipher_suite().map(|s| s.suite()),
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            conn.alpn_protocol()
                .map(String::from_utf8_lossy)
                .unwrap_or_default(),
        ))
    }
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream> {
    let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr}: timed out"))?
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// An HTTP/1.1 client connection on `route`.
async fn http_connection(targets: &Targets, route: Route) -> Result<SendRequest<Empty<Bytes>>> {
    let io = targets.dial(route, Traffic::Http).await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .context("HTTP/1 handshake")?;
    // Ends when `send` is dropped.
    tokio::spawn(conn);
    Ok(send)
}

/// One GET, its answer read to the end.
async fn get(send: &mut SendRequest<Empty<Bytes>>, authority: &str) -> Result<()> {
    let req = http::Request::get("/")
        .header(http::header::HOST, authority)
        .body(Empty::new())?;
    let rsp = send.send_request(req).await.context("HTTP request")?;
    ensure!(
        rsp.status() == http::StatusCode::OK,
        "HTTP {}",
        rsp.status()
    );
    rsp.into_body().collect().await.context("HTTP body")?;
    Ok(())
}

/// A fresh connection and one request on it: what a new client waits for.
async fn fresh_request(targets: &Targets, route: Route) -> Result<Duration> {
    let start = Instant::now();
    let mut send = http_connection(targets, route).await?;
    get(&mut send, &authority()).await?;
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Runs

/// `connections` keep-alive connections, each making one request after another for the warm-up
/// and then the slice; every request that ends in the slice is counted.
async fn http_slice(
    targets: &Targets,
    route: Route,
    connections: usize,
    timing: Timing,
) -> Result<HttpSlice> {
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(http_connection(targets, route).await?);
    }
    let from = Instant::now() + timing.warmup;
    let until = from + timing.slice;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|send| tokio::spawn(keep_requesting(send, from, until)))
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.context("a client task panicked")??);
    }
    Ok(HttpSlice {
        latencies,
        seconds: timing.slice.as_secs_f64(),
    })
}

async fn keep_requesting(
    mut send: SendRequest<Empty<Bytes>>,
    from: Instant,
    until: Instant,
) -> Result<Vec<Duration>> {
    let authority = authority();
    let mut latencies = Vec::new();
    loop {
        send.ready().await.context("connection closed")?;
        let start = Instant::now();
        get(&mut send, &authority).await?;
        let end = Instant::now();
        if end >= until {
            return Ok(latencies);
        }
        if end >= from {
            latencies.push(end - start);
        }
    }
}

/// `connections` uploads into the sink for the slice; what counts is what the sink got, over the
/// time until the last count came back (no warm-up: TCP's slow start is over in milliseconds).
async fn bulk_slice(
    targets: &Targets,
    route: Route,
    connections: usize,
    timing: Timing,
) -> Result<BulkSlice> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(targets.dial(route, Traffic::Bulk).await?);
    }
    let start = Instant::now();
    let until = start + timing.slice;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|io| tokio::spawn(upload(io, until)))
        .collect();
    let (mut bytes, mut end) = (0, start);
    for task in tasks {
        let (received, at) = task.await.context("an upload task panicked")??;
        bytes += received;
        end = end.max(at);
    }
    Ok(BulkSlice {
        bytes,
        seconds: (end - start).as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// Memory

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[derive(Debug, Serialize)]
struct Memory {
    /// VmHWM after the HTTP and bulk runs (start-up included, the flood not).
    gateway_peak_mib: f64,
    gateway_max_sampled_mib: f64,
    haproxy_peak_mib: f64,
    haproxy_max_sampled_mib: f64,
}

// ---------------------------------------------------------------------------------------------
// The flood

#[derive(Debug, Serialize)]
struct Probes {
    ok: usize,
    failed: usize,
    p50_ms: f64,
    max_ms: f64,
    first_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Flood {
    idle_requested: usize,
    idle_opened: usize,
    idle_failed: usize,
    open_seconds: f64,
    /// Of the idle connections, those not closed once the probes were done, as the client sees
    /// them: besides those the gateway holds, some whose final ACK the gateway's full accept
    /// queue dropped, which look open to a client that never sends (the gateway's open files
    /// are its own view).
    idle_still_open: usize,
    gateway_rss_before_mib: f64,
    gateway_rss_during_mib: f64,
    gateway_rss_after_mib: f64,
    /// VmHWM at the end: the peak of the whole run, flood included.
    gateway_peak_mib: f64,
    gateway_fds_before: usize,
    gateway_fds_during: usize,
    gateway_fds_after: usize,
    /// `gateway_refused_connections_total` increments over the flood, by reason.
    refused: BTreeMap<String, f64>,
    /// Fresh connection + one GET through the gateway, before and while the idle ones are held.
    probes_before: Probes,
    probes_during: Probes,
}

async fn flood(topology: &Topology, n: usize, probes: usize) -> Result<Flood> {
    let gateway = &topology.gateway;
    let pid = gateway.pid().context("the gateway is not running")?;
    let refused_before = refusals(gateway).await?;
    let probes_before = probe(&topology.targets, probes).await;
    let (rss_before, fds_before) = (status_kib(pid, "VmRSS"), open_fds(pid));

    eprintln!("flood: opening {n} idle connections to the gateway");
    let opening = Instant::now();
    let (idle, idle_failed) = open_idle(topology.targets.gateway, n).await;
    let open_seconds = opening.elapsed().as_secs_f64();
    // Let the gateway accept what is still in its backlog.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_during, fds_during) = (status_kib(pid, "VmRSS"), open_fds(pid));
    let probes_during = probe(&topology.targets, probes).await;
    let idle_opened = idle.len();
    let idle_still_open = still_open(&idle);
    drop(idle);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused_after = refusals(gateway).await?;
    let refused = refused_after
        .into_iter()
        .map(|(reason, n)| {
            let before = refused_before.get(&reason).copied().unwrap_or(0.0);
            (reason, n - before)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    Ok(Flood {
        idle_requested: n,
        idle_opened,
        idle_failed,
        open_seconds,
        idle_still_open,
        gateway_rss_before_mib: mib(rss_before),
        gateway_rss_during_mib: mib(rss_during),
        gateway_rss_after_mib: mib(status_kib(pid, "VmRSS")),
        gateway_peak_mib: mib(status_kib(pid, "VmHWM")),
        gateway_fds_before: fds_before,
        gateway_fds_during: fds_during,
        gateway_fds_after: open_fds(pid),
        refused,
        probes_before,
        probes_during,
    })
}

/// Opens `n` TCP connections that never send a byte; returns them and how many failed.
async fn open_idle(addr: SocketAddr, n: usize) -> (Vec<std::net::TcpStream>, usize) {
    let results: Vec<Option<std::net::TcpStream>> = stream::iter(0..n)
        .map(|_| async move {
            let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?;
            // Out of the runtime: 10,000 sockets need no wakeups. Non-blocking stays set.
            tcp.into_std().ok()
        })
        .buffer_unordered(FLOOD_CONCURRENCY)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_none()).count();
    (results.into_iter().flatten().collect(), failed)
}

/// How many of the (non-blocking) connections the peer has not closed.
fn still_open(conns: &[std::net::TcpStream]) -> usize {
    let open = |mut c: &std::net::TcpStream| matches!(c.read(&mut [0; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    conns.iter().filter(|c| open(c)).count()
}

/// `probes` fresh connections through the gateway, one after another.
async fn probe(targets: &Targets, probes: usize) -> Probes {
    let mut times = Vec::with_capacity(probes);
    let mut errors = Vec::new();
    for _ in 0..probes {
        match tokio::time::timeout(PROBE_TIMEOUT, fresh_request(targets, Route::Gateway)).await {
            Ok(Ok(t)) => times.push(t),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }
    times.sort_unstable();
    Probes {
        ok: times.len(),
        failed: errors.len(),
        p50_ms: micros(percentile(&times, 0.5)) / 1000.0,
        max_ms: micros(times.last().copied().unwrap_or_default()) / 1000.0,
        first_error: errors.into_iter().next(),
    }
}

/// The gateway's memory per forwarded connection: `n` opaque connections held idle after their
/// header, then the same after 64 KiB uploaded on each (buffers touched), then `n` HTTP/1
/// connections held after one request each. Each figure is the growth of VmRSS over the phase
/// divided by `n`, read once the gateway's own counters show every connection forwarded.
#[derive(Debug, Serialize)]
struct PerConnection {
    connections: usize,
    idle_opaque_kib: f64,
    busy_opaque_kib: f64,
    idle_http1_kib: f64,
}

impl PerConnection {
    fn print(&self, out: &mut impl std::io::Write) -> Result<()> {
        writeln!(
            out,
            "memory per forwarded connection ({} held): opaque idle {:.1} KiB, opaque after 64 KiB {:.1} KiB, HTTP/1 after one request {:.1} KiB",
            self.connections, self.idle_opaque_kib, self.busy_opaque_kib, self.idle_http1_kib
        )?;
        Ok(())
    }
}

async fn per_connection(topology: &Topology, n: usize) -> Result<PerConnection> {
    let gateway = &topology.gateway;
    let pid = gateway.pid().context("the gateway is not running")?;
    let targets = &topology.targets;
    let rss = || status_kib(pid, "VmRSS").unwrap_or(0) as f64;
    eprintln!("memory per connection: {n} opaque connections");
    let opened = counter(gateway, "tcp_open_total{direction=\"outbound\"}").await?;
    let refused_before: f64 = refusals(gateway).await?.values().sum();
    let before = rss();
    let mut conns: Vec<Stream> = stream::iter(0..n)
        .map(|_| targets.dial(Route::Gateway, Traffic::Bulk))
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    // Forwarded means connected to the endpoint; a few may be refused on a loaded machine
    // (counted, and left out of the division).
    let deadline = Instant::now() + Duration::from_secs(60);
    let forwarded = loop {
        let forwarded = counter(gateway, "tcp_open_total{direction=\"outbound\"}").await? - opened;
        let refused = refusals(gateway).await?.values().sum::<f64>() - refused_before;
        if forwarded + refused >= n as f64 {
            break forwarded;
        }
        ensure!(
            Instant::now() < deadline,
            "only {forwarded} of {n} forwarded, {refused} refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let per = |before: f64, after: f64| (after - before) / forwarded.max(1.0);
    let idle = rss();
    let written = counter(gateway, "tcp_write_bytes_total{direction=\"outbound\"}").await?;
    let chunk = vec![0x5a_u8; BULK_CHUNK];
    for c in &mut conns {
        // A refused connection's write fails: it is not among the forwarded.
        if c.write_all(&chunk).await.is_ok() {
            let _ = c.flush().await;
        }
    }
    wait_counter(
        gateway,
        "tcp_write_bytes_total{direction=\"outbound\"}",
        written + forwarded * BULK_CHUNK as f64,
    )
    .await?;
    let busy = rss();
    let (idle_opaque_kib, busy_opaque_kib) = (per(before, idle), per(before, busy));

    eprintln!("memory per connection: {n} HTTP/1 connections");
    let mut sends = Vec::with_capacity(n);
    let before = rss();
    for _ in 0..n {
        let mut send = http_connection(targets, Route::Gateway).await?;
        get(&mut send, &authority()).await?;
        sends.push(send);
    }
    let idle_http1_kib = per(before, rss());
    // Held until now: memory they give back would be reused by the HTTP connections.
    drop((sends, conns));
    Ok(PerConnection {
        connections: n,
        idle_opaque_kib,
        busy_opaque_kib,
        idle_http1_kib,
    })
}

/// One sample of the gateway's metrics (`name` with its labels, as exposed).
async fn counter(gateway: &Program, name: &str) -> Result<f64> {
    let (code, body) = gateway.get("/metrics").await.context("gateway /metrics")?;
    ensure!(code == 200, "gateway /metrics: HTTP {code}");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Waits (up to a minute) until the metric `name` reaches `at_least`.
async fn wait_counter(gateway: &Program, name: &str, at_least: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = counter(gateway, name).await?;
        if v >= at_least {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} stayed at {v}, below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `gateway_refused_connections_total` by reason.
async fn refusals(gateway: &Program) -> Result<BTreeMap<String, f64>> {
    const NAME: &str = "gateway_refused_connections_total{";
    let (code, body) = gateway.get("/metrics").await.context("gateway /metrics")?;
    ensure!(code == 200, "gateway /metrics: HTTP {code}");
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let Some((labels, value)) = line.strip_prefix(NAME).and_then(|l| l.split_once("} ")) else {
            continue;
        };
        let reason = labels
            .split_once("reason=\"")
            .and_then(|(_, r)| r.split_once('"'))
            .map_or("", |(r, _)| r);
        *out.entry(reason.to_owned()).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The topology

/// Everything a run needs; stopped in field order when dropped.
#[derive(Debug)]
struct Topology {
    targets: Targets,
    gateway: Program,
    haproxy: Haproxy,
    _identity: Program,
    _backend: Guard,
    _host: Host,
    _cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl Topology {
    async fn start(threads: usize) -> Result<Self> {
        let cluster = Cluster::start(CLUSTER).await?;
        let dir = tempfile::tempdir()?;
        mesh::make_pki(dir.path(), &[CLUSTER])?;
        mesh::install_identity(&cluster, dir.path(), CLUSTER).await?;
        mesh::apply_manifest(&cluster, "gateway/gateway.yaml").await?;

        let host = Host::create()?;
        let backend_ip = IpAddr::V4(host.address());
        let backend_ports = Ports {
            http: SocketAddr::new(backend_ip, HTTP_PORT),
            bulk: SocketAddr::new(backend_ip, BULK_PORT),
        };
        create_backend_service(&cluster, backend_ip).await?;
        let backend = start_backend(&host)?;

        let anchors = dir.path().join("anchor/ca.crt");
        let identity_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let identity = start_identity(&cluster, identity_addr, &anchors, "24h", dir.path())
            .await
            .context("the release identity service (cargo build --release --bins)")?;
        let gateway_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let settings = GatewaySettings {
            addr: gateway_addr,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            identity_addr,
            anchors_file: anchors.clone(),
            // Every connection of the benchmark is one client identity's: it may hold them all
            // (the default share, a quarter, would refuse the memory phase's 2,000).
            extra: vec![
                format!("--cores={threads}"),
                "--max-connections-per-identity=3000".to_owned(),
            ],
            binary: Some(shipped_binary("meshlink-gateway")?),
        };
        let gateway = start_gateway(&cluster, &settings, dir.path())
            .await
            .context(
                "the gateway (cargo build --profile dist -p gateway --bin meshlink-gateway)",
            )?;

        let signer = issuer(dir.path())?;
        let creds = client_credentials(&signer, &anchors)?;
        let haproxy = Haproxy::start(dir.path(), &signer, &anchors, backend_ports, threads)?;
        let targets = Targets::new(&creds, backend_ports, gateway_addr, haproxy.ports)?;
        for route in Route::ALL {
            wait_for(
                &format!("HTTP through route {}", route.name()),
                Duration::from_secs(60),
                || async { fresh_request(&targets, route).await.ok() },
            )
            .await?;
        }
        Ok(Self {
            targets,
            gateway,
            haproxy,
            _identity: identity,
            _backend: backend,
            _host: host,
            _cluster: cluster,
            _dir: dir,
        })
    }
}

/// Service `bench/web` (ports 8080 and 7001, exported) and a Ready Pod at the backend's address.
async fn create_backend_service(cluster: &Cluster, ip: IpAddr) -> Result<()> {
    let client = cluster.client();
    create_namespace(&client, NS).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": SERVICE, "labels": { "mirror.linkerd.io/exported": "true" } },
        "spec": {
            "selector": { "app": SERVICE },
            "ports": [
                { "name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT },
                { "name": "bulk", "port": BULK_PORT, "targetPort": BULK_PORT },
            ],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &svc)
        .await?;
    create_ready_pod(
        &client,
        NS,
        "web-0",
        &labels(&[("app", SERVICE)]),
        ip,
        &cluster.node_name(),
    )
    .await?;
    Ok(())
}

/// This executable, as the backend, inside the namespace.
fn start_backend(host: &Host) -> Result<Guard> {
    let exe = std::env::current_exe().context("locating the benchmark executable")?;
    let child = host
        .command(&exe)
        .args(["backend", "--http"])
        .arg(format!("0.0.0.0:{HTTP_PORT}"))
        .arg("--bulk")
        .arg(format!("0.0.0.0:{BULK_PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the backend in its network namespace")?;
    Ok(Guard(child))
}

fn issuer(dir: &Path) -> Result<Signer> {
    let read =
        |p: &str| std::fs::read_to_string(dir.join(p)).with_context(|| format!("reading {p}"));
    Ok(Signer::from_pem(
        &read("east/issuer.crt")?,
        &read("east/issuer.key")?,
    )?)
}

/// The client's certificate, issued here by the cluster's issuer (the gateway cannot tell it
/// from one the identity service signed).
fn client_credentials(signer: &Signer, anchors: &Path) -> Result<Arc<Credentials>> {
    let anchors = std::fs::read_to_string(anchors).context("reading the trust anchor")?;
    let creds = Credentials::new(
        Id::parse(&mesh::workload_id("client", "bench", CLUSTER))?,
        TrustAnchors::from_pem(&anchors)?,
    );
    let (leaf, key) = signer.issue(creds.id(), Duration::from_secs(24 * 3600))?;
    creds.install(leaf, vec![signer.cert_der().to_vec()], &key)?;
    Ok(creds)
}

/// HAProxy in the foreground, terminating the gateway's mTLS in front of the backend.
#[derive(Debug)]
struct Haproxy {
    _child: Guard,
    pid: u32,
    ports: Ports,
    version: String,
    config: String,
}

impl Haproxy {
    fn start(
        dir: &Path,
        signer: &Signer,
        anchors: &Path,
        backend: Ports,
        threads: usize,
    ) -> Result<Self> {
        let binary = haproxy_binary()?;
        let version = haproxy_version(&binary)?;
        // The gateway's identity, issued like the gateway's own leaf: leaf, issuer, key.
        let pem = signer.issue_pem(
            &Id::parse(&mesh::gateway_id(CLUSTER))?,
            Duration::from_secs(24 * 3600),
        )?;
        let crt = dir.join("haproxy.pem");
        std::fs::write(&crt, pem.cert_pem + &pem.key_pem)?;
        let ports = Ports {
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            bulk: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
        };
        let config = haproxy_config(&crt, anchors, ports, backend, threads);
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, &config)?;
        haproxy_check(&binary, &cfg, &config)?;
        let log = std::fs::File::create(dir.join("haproxy.log"))?;
        let child = Command::new(&binary)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy")?;
        let mut child = Guard(child);
        let pid = child.0.id();
        wait_listening(
            &mut child,
            &[ports.http, ports.bulk],
            &dir.join("haproxy.log"),
        )
        .context("haproxy")?;
        Ok(Self {
            _child: child,
            pid,
            ports,
            version,
            config,
        })
    }
}

/// HAProxy's configuration: TLS as the gateway's (TLS 1.3 only, Linkerd's suites in Linkerd's
/// order: HAProxy prefers its own order, which would otherwise pick AES-256 where the gateway
/// follows the client to AES-128), one thread, keep-alive HTTP to the backend.
fn haproxy_config(
    crt: &Path,
    anchors: &Path,
    listen: Ports,
    backend: Ports,
    threads: usize,
) -> String {
    let bind = format!(
        "ssl crt {} ca-file {} verify required alpn http/1.1 ssl-min-ver TLSv1.3 \
         ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256",
        crt.display(),
        anchors.display()
    );
    format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend web
    mode http
    bind {http} {bind}
    default_backend web

backend web
    mode http
    server web {backend_http}

frontend bulk
    mode tcp
    bind {bulk} {bind}
    default_backend bulk

backend bulk
    mode tcp
    server sink {backend_bulk}
",
        http = listen.http,
        bulk = listen.bulk,
        backend_http = backend.http,
        backend_bulk = backend.bulk,
    )
}

// ---------------------------------------------------------------------------------------------
// The backend (run in the network namespace)

mod backend {
    use super::*;

    pub(super) async fn serve(http: SocketAddr, bulk: SocketAddr) -> Result<()> {
        let http = TcpListener::bind(http).await.context("binding HTTP")?;
        let bulk = TcpListener::bind(bulk).await.context("binding bulk")?;
        tokio::join!(accept(http, serve_http), accept(bulk, sink::<TcpStream>));
        Ok(())
    }

    async fn accept<F>(listener: TcpListener, handle: fn(TcpStream) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(handle(s));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// HTTP/1.1 with keep-alive: every request gets `BODY`.
    async fn serve_http(s: TcpStream) {
        let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(BODY))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .await;
    }
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Debug, Serialize)]
struct Ratios {
    /// Gateway p50 minus direct p50 at 1 connection.
    gateway_added_p50_us_1: f64,
    /// The same for HAProxy, for context.
    haproxy_added_p50_us_1: f64,
    gateway_over_direct_http_16: f64,
    gateway_over_direct_bulk_16: f64,
    gateway_over_haproxy_http_16: f64,
    gateway_over_haproxy_bulk_16: f64,
    gateway_peak_rss_mib: f64,
}

#[derive(Debug)]
struct Report {
    settings: serde_json::Value,
    http: Results<Route, HttpFigures>,
    bulk: Results<Route, BulkFigures>,
    memory: Memory,
    flood: Flood,
    per_connection: PerConnection,
    ratios: Ratios,
    goals: Vec<Goal>,
}

/// "Matches" HAProxy: within this fraction of its figure.
const MATCH_TOLERANCE: f64 = 0.05;

impl Report {
    fn new(
        settings: serde_json::Value,
        http: Results<Route, HttpFigures>,
        bulk: Results<Route, BulkFigures>,
        memory: Memory,
        flood: Flood,
        per_connection: PerConnection,
    ) -> Self {
        let h = |c: usize, r: Route| http.get(&c).and_then(|m| m.get(&r)).copied();
        let b = |c: usize, r: Route| bulk.get(&c).and_then(|m| m.get(&r)).copied();
        let p50 = |r| h(1, r).map_or(f64::NAN, |f| f.p50_us);
        let rps = |r| h(16, r).map_or(f64::NAN, |f| f.requests_per_s);
        let mbps = |r| b(16, r).map_or(f64::NAN, |f| f.mb_per_s);
        let ratios = Ratios {
            gateway_added_p50_us_1: p50(Route::Gateway) - p50(Route::Direct),
            haproxy_added_p50_us_1: p50(Route::Haproxy) - p50(Route::Direct),
            gateway_over_direct_http_16: rps(Route::Gateway) / rps(Route::Direct),
            gateway_over_direct_bulk_16: mbps(Route::Gateway) / mbps(Route::Direct),
            gateway_over_haproxy_http_16: rps(Route::Gateway) / rps(Route::Haproxy),
            gateway_over_haproxy_bulk_16: mbps(Route::Gateway) / mbps(Route::Haproxy),
            gateway_peak_rss_mib: memory.gateway_peak_mib,
        };
        let goals = goals(&ratios);
        Self {
            settings,
            http,
            bulk,
            memory,
            flood,
            per_connection,
            ratios,
            goals,
        }
    }

    fn print(&self, out: &mut impl std::io::Write, elapsed: Duration) -> Result<()> {
        let s = &self.settings;
        writeln!(out)?;
        writeln!(
            out,
            "gateway benchmark: {} CPUs shared by the client ({CLIENT_THREADS} tokio workers), the gateway \
             ({} thread(s)), HAProxy (nbthread {}) and the backend (1 thread):",
            s["cpus"], s["haproxy_nbthread"], s["haproxy_nbthread"]
        )?;
        writeln!(
            out,
            "absolute figures mean little here; the ratios of one run are the result."
        )?;
        writeln!(
            out,
            "HAProxy: {}",
            s["haproxy_version"].as_str().unwrap_or("")
        )?;
        for (k, v) in s["tls"].as_object().into_iter().flatten() {
            writeln!(out, "TLS {k}: {}", v.as_str().unwrap_or(""))?;
        }
        writeln!(out)?;
        writeln!(
            out,
            "HTTP/1.1 GET on keep-alive connections, one request at a time each: {} s per run in {} \
             slices, each after {} s of warm-up",
            s["seconds_per_run"], s["rounds"], s["warmup_seconds_per_http_slice"]
        )?;
        print_requests(out, &self.http)?;
        writeln!(out)?;
        writeln!(
            out,
            "bulk TCP upload into a sink (MB = 10^6 bytes the sink counted), {} s per run in {} slices",
            s["seconds_per_run"], s["rounds"]
        )?;
        print_bulk(out, &self.bulk)?;
        let m = &self.memory;
        writeln!(out)?;
        writeln!(
            out,
            "memory under that load: gateway peak (VmHWM) {:.1} MiB, highest sampled VmRSS {:.1} MiB; \
             HAProxy peak {:.1} MiB, highest sampled {:.1} MiB",
            m.gateway_peak_mib,
            m.gateway_max_sampled_mib,
            m.haproxy_peak_mib,
            m.haproxy_max_sampled_mib
        )?;
        self.print_flood(out)?;
        self.per_connection.print(out)?;
        let r = &self.ratios;
        print_verdict(
            out,
            &[
                (
                    "gateway p50 - direct p50, 1 conn",
                    r.gateway_added_p50_us_1,
                    " µs",
                ),
                (
                    "haproxy p50 - direct p50, 1 conn",
                    r.haproxy_added_p50_us_1,
                    " µs",
                ),
                (
                    "gateway / direct, HTTP req/s, 16 conns",
                    r.gateway_over_direct_http_16,
                    "",
                ),
                (
                    "gateway / direct, bulk MB/s, 16 conns",
                    r.gateway_over_direct_bulk_16,
                    "",
                ),
                (
                    "gateway / haproxy, HTTP req/s, 16 conns",
                    r.gateway_over_haproxy_http_16,
                    "",
                ),
                (
                    "gateway / haproxy, bulk MB/s, 16 conns",
                    r.gateway_over_haproxy_bulk_16,
                    "",
                ),
                (
                    "gateway peak RSS under load",
                    r.gateway_peak_rss_mib,
                    " MiB",
                ),
            ],
            &self.goals,
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "took {:.0} s; written to target/bench/gateway.json",
            elapsed.as_secs_f64()
        )?;
        Ok(())
    }

    fn print_flood(&self, out: &mut impl std::io::Write) -> Result<()> {
        let f = &self.flood;
        writeln!(out)?;
        writeln!(
            out,
            "flood: {} idle TCP connections opened on the gateway in {:.1} s ({} failed); {} still open after the probes (client view)",
            f.idle_opened, f.open_seconds, f.idle_failed, f.idle_still_open
        )?;
        writeln!(
            out,
            "  gateway RSS before {:.1} MiB, during {:.1} MiB, after closing {:.1} MiB; peak of the whole run {:.1} MiB",
            f.gateway_rss_before_mib,
            f.gateway_rss_during_mib,
            f.gateway_rss_after_mib,
            f.gateway_peak_mib
        )?;
        writeln!(
            out,
            "  gateway open files before {}, during {}, after {}",
            f.gateway_fds_before, f.gateway_fds_during, f.gateway_fds_after
        )?;
        let refused: Vec<String> = f.refused.iter().map(|(r, n)| format!("{r}={n}")).collect();
        writeln!(
            out,
            "  refused by the gateway over the flood: {}",
            refused.join(", ")
        )?;
        for (when, p) in [("before", &f.probes_before), ("during", &f.probes_during)] {
            writeln!(
                out,
                "  legitimate fresh connection + GET {when}: {}/{} served, p50 {:.2} ms, max {:.2} ms{}",
                p.ok,
                p.ok + p.failed,
                p.p50_ms,
                p.max_ms,
                p.first_error
                    .as_ref()
                    .map(|e| format!(" (first error: {e})"))
                    .unwrap_or_default()
            )?;
        }
        Ok(())
    }

    fn write_json(&self, elapsed: Duration) -> Result<()> {
        let results = json!({
            "settings": self.settings,
            "http": self.http,
            "bulk": self.bulk,
            "memory": self.memory,
            "flood": self.flood,
            "per_connection": self.per_connection,
            "ratios": self.ratios,
            "goals": self.goals,
            "elapsed_seconds": elapsed.as_secs_f64(),
        });
        Ok(write_json("gateway", &results)?)
    }
}

fn goals(r: &Ratios) -> Vec<Goal> {
    let at_least = |x: f64, min: f64| x >= min;
    vec![
        Goal {
            goal: "1 conn: the gateway adds under 50 µs to p50".to_owned(),
            figure: format!("{:.1} µs", r.gateway_added_p50_us_1),
            met: r.gateway_added_p50_us_1 < 50.0,
        },
        Goal {
            goal: "16 conns: at least 35 % of direct HTTP req/s".to_owned(),
            figure: format!("{:.0} %", r.gateway_over_direct_http_16 * 100.0),
            met: at_least(r.gateway_over_direct_http_16, 0.35),
        },
        Goal {
            goal: "16 conns: at least 35 % of direct bulk MB/s".to_owned(),
            figure: format!("{:.0} %", r.gateway_over_direct_bulk_16 * 100.0),
            met: at_least(r.gateway_over_direct_bulk_16, 0.35),
        },
        Goal {
            goal: "16 conns: matches (within 5 %) or beats HAProxy, HTTP req/s".to_owned(),
            figure: format!("{:.2}x", r.gateway_over_haproxy_http_16),
            met: at_least(r.gateway_over_haproxy_http_16, 1.0 - MATCH_TOLERANCE),
        },
        Goal {
            goal: "16 conns: matches (within 5 %) or beats HAProxy, bulk MB/s".to_owned(),
            figure: format!("{:.2}x", r.gateway_over_haproxy_bulk_16),
            met: at_least(r.gateway_over_haproxy_bulk_16, 1.0 - MATCH_TOLERANCE),
        },
        Goal {
            goal: "gateway RSS under 16 MiB under load (VmHWM)".to_owned(),
            figure: format!("{:.1} MiB", r.gateway_peak_rss_mib),
            met: r.gateway_peak_rss_mib < 16.0,
        },
    ]
}
