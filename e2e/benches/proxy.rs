//! The sidecar proxy benchmark (a measurement, not a timed test: it asserts nothing about time,
//! and prints the issue's goals as met or missed without failing on them).
//!
//! `make bench-proxy` (or `cargo bench -p e2e --bench proxy -- --seconds 10 --rounds 5`) builds
//! one topology of two pods and, in one run, measures three routes from a client in one pod to
//! a backend in the other:
//!
//! - **direct**: the client dials the backend's pod address, on ports the pods' redirect rules
//!   ignore. The baseline: what the network, the client and the backend cost by themselves.
//! - **meshed**: the client dials the Service's ClusterIP; the client pod's iptables rules
//!   (`meshlink-proxy init`) redirect it to the client's `meshlink-proxy`, which discovers the
//!   endpoint and dials it over mTLS (HTTP/1.1 upgraded to HTTP/2, as the destination service
//!   hints for meshed pods); the server pod's rules redirect that to the server's
//!   `meshlink-proxy`, which terminates the mTLS and forwards to the backend.
//! - **haproxy**: a pair of Debian's HAProxy doing the same: one in the client pod (a plain
//!   listener for the client), mTLS 1.3 with certificates from the same trust anchor (HTTP/2
//!   between them for HTTP, as the proxies), and one in the server pod in front of the backend,
//!   verifying the client's certificate.
//!
//! Each route at 1 and 16 concurrent connections, for small HTTP/1.1 requests on keep-alive
//! connections, small unary gRPC calls (prior-knowledge HTTP/2, a 5-byte-framed message,
//! `grpc-status: 0` in trailers), each connection making one request at a time (requests/s,
//! p50 and p99 latency), and bulk TCP (MB/s uploaded into a sink; its port is opaque to the
//! proxies, so it is forwarded without detection). A run is cut into slices, interleaved round
//! by round with the other routes' slices, so that whatever else the machine does touches every
//! route alike; connections are open before a slice starts. Then each proxy's memory under that
//! load (VmHWM, and VmRSS sampled every 50 ms), for both meshlink proxies and both HAProxies.
//!
//! The topology: one cluster (an API server) with the identity service and the destination
//! service in the root network namespace, as a node's control plane; two network namespaces as
//! the pods, each with a Pod object (Ready, meshed, at the namespace's address; the server's
//! behind Service `bench/web`), the init rules, and `meshlink-proxy` running as uid 2102 with
//! Linkerd's environment and a real ServiceAccount token. The pods reach each other through the
//! root namespace, as on a node with a point-to-point CNI (a default route over each veth, IP
//! forwarding on). The backend and the load client are this executable, re-run in the pods:
//! the client runs one slice per process, inside the client pod (its connections must go through
//! the pod's OUTPUT rules), and prints what it measured as JSON.
//!
//! The machine's cores are shared by the client (two tokio workers), the two proxies of a route
//! (`--cores` each, one by default: Linkerd's default), and the backend (one thread): absolute
//! figures say little about production, the ratios within one run are the result. Results are
//! printed and written to `target/bench/proxy.json`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use e2e::{
    Cluster, create_namespace, create_ready_pod,
    destination::{destination_id, start_destination},
    install_link_crd,
    measure::{
        BULK_CHUNK, BulkFigures, BulkSlice, Goal, Guard, HttpFigures, HttpSlice, Results,
        Route as _, RssSampler, Timing, haproxy_binary, haproxy_check, haproxy_version,
        interleaved, mib, print_bulk, print_requests, print_verdict, sink, status_kib, upload,
        wait_listening, write_json,
    },
    mesh::{self, IDENTITY_AUDIENCE, identity_id, start_identity, workload_id},
    meshlink::{Program, free_port, http_get, labels, service_account_token_for, shipped_binary},
    netns::Host,
};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use proxy_identity::{Id, ca::Signer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

/// The server pod's namespace, Service and Pod; the client pod's namespace and Pod. Each pod
/// runs as its namespace's `default` ServiceAccount, so the two have distinct identities.
const SERVER_NS: &str = "bench";
const SERVICE: &str = "web";
const SERVER_POD: &str = "web-0";
const CLIENT_NS: &str = "bench-client";
const CLIENT_POD: &str = "client-0";
const ACCOUNT: &str = "default";
/// The benchmark's one cluster; its issuer certifies identities in its trust domain only.
const CLUSTER: &str = "east";
/// Concurrent connections of each run; the goals are stated at these two.
const CONNECTIONS: [usize; 2] = [1, 16];
const CLIENT_THREADS: usize = 2;
/// Linkerd's proxy user (proxy-init's `--proxy-uid` default): its connections are not redirected.
const PROXY_UID: u32 = 2102;
/// Linkerd's admin port, which init's rules always leave alone.
const ADMIN_PORT: u16 = 4191;
/// What the backend answers to every HTTP/1.1 request.
const BODY: &[u8] = b"ok\n";
/// The gRPC message of every call and answer: protobuf field 1, the string "ok".
const GRPC_MESSAGE: &[u8] = b"\x0a\x02ok";
const GRPC_PATH: &str = "/bench.Bench/Unary";
/// Time a connection may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a pod's proxy may take to be ready (certified, inbound policies known).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A port per kind of traffic.
#[derive(Clone, Copy, Debug)]
struct Ports {
    http: u16,
    grpc: u16,
    bulk: u16,
}

impl Ports {
    fn of(self, traffic: Traffic) -> u16 {
        match traffic {
            Traffic::Http => self.http,
            Traffic::Grpc => self.grpc,
            Traffic::Bulk => self.bulk,
        }
    }

    fn list(self) -> String {
        format!("{},{},{}", self.http, self.grpc, self.bulk)
    }
}

/// The client pod's declared (unused) application port.
/// The backend's ports behind the Service: the server proxy's inbound ports.
const MESHED: Ports = Ports {
    http: 8080,
    grpc: 8081,
    bulk: 7001,
};
/// The same backend on ports both pods' rules ignore: the direct route.
const DIRECT: Ports = Ports {
    http: 9080,
    grpc: 9081,
    bulk: 8001,
};
/// HAProxy in the server pod (mTLS), on ports the rules ignore.
const HAPROXY_SERVER: Ports = Ports {
    http: 10080,
    grpc: 10081,
    bulk: 9001,
};
/// HAProxy in the client pod (plaintext, for the client), on ports the rules ignore.
const HAPROXY_CLIENT: Ports = Ports {
    http: 11080,
    grpc: 11081,
    bulk: 10001,
};

#[derive(Parser, Debug)]
#[command(about = "The sidecar proxy pair against direct TCP and an HAProxy pair, in one topology")]
struct Args {
    /// Measured seconds of each run (18 runs: 3 routes, 2 connection counts, HTTP, gRPC, bulk).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Slices each run is cut into, interleaved with the other routes' slices.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of requests before each HTTP and gRPC slice is measured.
    #[arg(long, default_value_t = 0.25)]
    warmup: f64,
    /// Cores of each proxy (`LINKERD2_PROXY_CORES`) and of each HAProxy (`nbthread`): the same
    /// budget for both. One by default, Linkerd's default for its proxy.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(subcommand)]
    role: Option<Role>,
}

#[derive(clap::Subcommand, Debug)]
enum Role {
    /// The backend, which the benchmark runs in the server pod.
    #[command(hide = true)]
    Backend,
    /// One slice of load, which the benchmark runs in the client pod; prints a JSON report.
    #[command(hide = true)]
    Client(client::Args),
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.role {
        Some(Role::Backend) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(backend::serve()),
        Some(Role::Client(a)) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CLIENT_THREADS)
            .enable_all()
            .build()?
            .block_on(client::run(a)),
        // The benchmark itself mostly waits for its children.
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?
            .block_on(run(args)),
    }
}

async fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let timing = Timing::new(args.seconds, args.rounds, args.warmup)?;
    let topology = Topology::start(args.cores).await?;
    eprintln!(
        "topology ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let processes = topology.processes();
    let samplers: Vec<RssSampler> = processes
        .iter()
        .map(|(_, pid)| RssSampler::start(*pid))
        .collect();
    let t = &topology;
    let measured = async {
        let http = interleaved(&Route::ALL, &CONNECTIONS, timing.rounds, |route, conns| {
            t.requests(route, Traffic::Http, conns, timing)
        })
        .await?;
        let grpc = interleaved(&Route::ALL, &CONNECTIONS, timing.rounds, |route, conns| {
            t.requests(route, Traffic::Grpc, conns, timing)
        })
        .await?;
        let bulk = interleaved(&Route::ALL, &CONNECTIONS, timing.rounds, |route, conns| {
            t.bulk(route, conns, timing)
        })
        .await?;
        anyhow::Ok((http, grpc, bulk))
    }
    .await;
    let (http, grpc, bulk) = match measured {
        Ok(m) => m,
        Err(e) => bail!("{e:#}\n{}", topology.proxy_logs()),
    };
    let memory: BTreeMap<&str, Memory> = processes
        .iter()
        .zip(&samplers)
        .map(|((name, pid), sampler)| {
            let m = Memory {
                peak_mib: mib(status_kib(*pid, "VmHWM")),
                max_sampled_mib: mib(Some(sampler.max_kib())),
            };
            (*name, m)
        })
        .collect();
    drop(samplers);
    let proxy_metrics = topology.proxy_metrics().await;

    let settings = json!({
        "seconds_per_run": timing.run().as_secs_f64(),
        "rounds": timing.rounds,
        "seconds_per_slice": timing.slice.as_secs_f64(),
        "warmup_seconds_per_request_slice": timing.warmup.as_secs_f64(),
        "cpus": std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        "client_tokio_workers": CLIENT_THREADS,
        "proxy_cores": args.cores,
        "backend_runtime": "tokio current_thread, in the server pod",
        "haproxy_version": topology.haproxy_version,
        "haproxy_nbthread": args.cores,
        "haproxy_client_config": topology.haproxy_client.config,
        "haproxy_server_config": topology.haproxy_server.config,
        "http_body_bytes": BODY.len(),
        "grpc_message_bytes": GRPC_MESSAGE.len(),
        "bulk_write_bytes": BULK_CHUNK,
        "service": format!("{}:{}", topology.cluster_ip, MESHED.list()),
    });
    let report = Report::new(settings, http, grpc, bulk, memory, proxy_metrics);
    drop(topology);
    let elapsed = started.elapsed();
    report.print(&mut std::io::stdout().lock(), elapsed)?;
    report.write_json(elapsed)
}

// ---------------------------------------------------------------------------------------------
// Routes

/// The three ways from the client to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
enum Route {
    Direct,
    Meshed,
    Haproxy,
}

impl Route {
    const ALL: [Self; 3] = [Self::Direct, Self::Meshed, Self::Haproxy];
}

impl e2e::measure::Route for Route {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Meshed => "meshed",
            Self::Haproxy => "haproxy",
        }
    }
}

/// What a connection carries.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Traffic {
    Http,
    Grpc,
    Bulk,
}

impl Traffic {
    const ALL: [Self; 3] = [Self::Http, Self::Grpc, Self::Bulk];

    fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Grpc => "grpc",
            Self::Bulk => "bulk",
        }
    }
}

/// The Service's name, as the client addresses it (`Host`, `:authority`).
fn authority(traffic: Traffic) -> String {
    format!(
        "{SERVICE}.{SERVER_NS}.svc.cluster.local:{}",
        MESHED.of(traffic)
    )
}

// ---------------------------------------------------------------------------------------------
// The load client (run in the client pod, one slice per process)

mod client {
    use super::*;

    #[derive(clap::Args, Debug)]
    pub(super) struct Args {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, value_enum)]
        traffic: Traffic,
        #[arg(long)]
        connections: usize,
        /// Measured seconds.
        #[arg(long)]
        seconds: f64,
        /// Seconds of requests before the measured ones.
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
    }

    /// What one slice measured, as the client prints it.
    #[derive(Debug, Default, Serialize, Deserialize)]
    pub(super) struct Report {
        /// Of every request that ended in the measured time.
        pub latencies_ns: Vec<u64>,
        pub seconds: f64,
        /// What the sinks counted (bulk).
        pub bytes: u64,
    }

    pub(super) async fn run(args: Args) -> Result<()> {
        let slice = Duration::try_from_secs_f64(args.seconds).context("--seconds")?;
        let warmup = Duration::try_from_secs_f64(args.warmup).context("--warmup")?;
        let report = match args.traffic {
            Traffic::Bulk => bulk(args.addr, args.connections, slice).await?,
            t => requests(args.addr, t, args.connections, warmup, slice).await?,
        };
        let mut stdout = std::io::stdout().lock();
        serde_json::to_writer(&mut stdout, &report)?;
        std::io::Write::flush(&mut stdout)?;
        Ok(())
    }

    async fn tcp(addr: SocketAddr) -> Result<TcpStream> {
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// A client connection: HTTP/1.1, or HTTP/2 with prior knowledge for gRPC.
    enum Conn {
        Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
        Grpc(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    }

    impl Conn {
        async fn open(addr: SocketAddr, traffic: Traffic) -> Result<Self> {
            let io = TokioIo::new(tcp(addr).await?);
            Ok(if traffic == Traffic::Grpc {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .context("HTTP/2 handshake")?;
                tokio::spawn(conn);
                Self::Grpc(send)
            } else {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .context("HTTP/1 handshake")?;
                // Ends when `send` is dropped.
                tokio::spawn(conn);
                Self::Http1(send)
            })
        }

        /// One request, its answer read to the end and checked.
        async fn call(&mut self) -> Result<()> {
            match self {
                Self::Http1(send) => {
                    send.ready().await.context("connection closed")?;
                    let req = http::Request::get("/")
                        .header(http::header::HOST, authority(Traffic::Http))
                        .body(Empty::new())?;
                    let rsp = send.send_request(req).await.context("HTTP request")?;
                    ensure!(
                        rsp.status() == http::StatusCode::OK,
                        "HTTP {}",
                        rsp.status()
                    );
                    let body = rsp.into_body().collect().await.context("HTTP body")?;
                    ensure!(body.to_bytes() == BODY, "an unexpected body");
                }
                Self::Grpc(send) => {
                    send.ready().await.context("connection closed")?;
                    let req = http::Request::post(format!(
                        "http://{}{GRPC_PATH}",
                        authority(Traffic::Grpc)
                    ))
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(Full::new(grpc_frame()))?;
                    let rsp = send.send_request(req).await.context("gRPC request")?;
                    ensure!(
                        rsp.status() == http::StatusCode::OK,
                        "HTTP {}",
                        rsp.status()
                    );
                    let headers = rsp.headers().clone();
                    let body = rsp.into_body().collect().await.context("gRPC body")?;
                    let status = body
                        .trailers()
                        .and_then(|t| t.get("grpc-status"))
                        .or_else(|| headers.get("grpc-status"))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    ensure!(
                        status.as_deref() == Some("0"),
                        "grpc-status {status:?}, message {:?}",
                        headers.get("grpc-message")
                    );
                    ensure!(body.to_bytes() == grpc_frame(), "an unexpected message");
                }
            }
            Ok(())
        }
    }

    /// `connections` connections, each making one request after another for the warm-up and
    /// then the slice; every request that ends in the slice is counted.
    async fn requests(
        addr: SocketAddr,
        traffic: Traffic,
        connections: usize,
        warmup: Duration,
        slice: Duration,
    ) -> Result<Report> {
        let mut conns = Vec::with_capacity(connections);
        for _ in 0..connections {
            conns.push(Conn::open(addr, traffic).await?);
        }
        let from = Instant::now() + warmup;
        let until = from + slice;
        let tasks: Vec<_> = conns
            .into_iter()
            .map(|conn| tokio::spawn(keep_requesting(conn, from, until)))
            .collect();
        let mut latencies_ns = Vec::new();
        for task in tasks {
            latencies_ns.extend(task.await.context("a client task panicked")??);
        }
        Ok(Report {
            latencies_ns,
            seconds: slice.as_secs_f64(),
            bytes: 0,
        })
    }

    async fn keep_requesting(mut conn: Conn, from: Instant, until: Instant) -> Result<Vec<u64>> {
        let mut latencies = Vec::new();
        loop {
            let start = Instant::now();
            conn.call().await?;
            let end = Instant::now();
            if end >= until {
                return Ok(latencies);
            }
            if end >= from {
                latencies.push(u64::try_from((end - start).as_nanos()).unwrap_or(u64::MAX));
            }
        }
    }

    /// `connections` uploads into the sink for the slice; what counts is what the sink got,
    /// over the time until the last count came back.
    async fn bulk(addr: SocketAddr, connections: usize, slice: Duration) -> Result<Report> {
        let mut streams = Vec::with_capacity(connections);
        for _ in 0..connections {
            streams.push(tcp(addr).await?);
        }
        let start = Instant::now();
        let until = start + slice;
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
        Ok(Report {
            latencies_ns: Vec::new(),
            seconds: (end - start).as_secs_f64(),
            bytes,
        })
    }
}

/// A gRPC length-prefixed message: not compressed, the length (big-endian), the message.
fn grpc_frame() -> Bytes {
    let mut frame = vec![0];
    frame.extend_from_slice(&(GRPC_MESSAGE.len() as u32).to_be_bytes());
    frame.extend_from_slice(GRPC_MESSAGE);
    Bytes::from(frame)
}

// ---------------------------------------------------------------------------------------------
// The backend (run in the server pod)

mod backend {
    use http_body_util::{Either, StreamBody};
    use hyper::body::Frame;

    use super::*;

    pub(super) async fn serve() -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        for ports in [MESHED, DIRECT] {
            for port in [ports.http, ports.grpc] {
                let l = bind(port).await?;
                tasks.spawn(accept(l, serve_http));
            }
            let l = bind(ports.bulk).await?;
            tasks.spawn(accept(l, sink::<TcpStream>));
        }
        tasks.join_next().await;
        Ok(())
    }

    async fn bind(port: u16) -> Result<TcpListener> {
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .with_context(|| format!("binding port {port}"))
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

    type Frames = futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
    type Body = Either<Full<Bytes>, StreamBody<Frames>>;

    /// HTTP/1.1 and HTTP/2: `BODY` to every request, and to gRPC calls their message back
    /// with `grpc-status: 0`.
    async fn serve_http(s: TcpStream) {
        let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(answer(req).await)
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    }

    async fn answer(req: http::Request<hyper::body::Incoming>) -> http::Response<Body> {
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !grpc {
            return http::Response::new(Either::Left(Full::new(Bytes::from_static(BODY))));
        }
        let _ = req.into_body().collect().await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![Ok(Frame::data(grpc_frame())), Ok(Frame::trailers(trailers))];
        let mut rsp = http::Response::new(Either::Right(StreamBody::new(futures::stream::iter(
            frames,
        ))));
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        rsp
    }
}

// ---------------------------------------------------------------------------------------------
// The topology

/// IP forwarding in the root namespace, as a node routing between its pods; restored when
/// dropped.
#[derive(Debug)]
struct Forwarding {
    before: String,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Forwarding {
    fn enable() -> Result<Self> {
        let before = std::fs::read_to_string(IP_FORWARD).context("reading ip_forward")?;
        std::fs::write(IP_FORWARD, "1").context("enabling IP forwarding (needs root)")?;
        Ok(Self {
            before: before.trim().to_owned(),
        })
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if self.before != "1" {
            let _ = std::fs::write(IP_FORWARD, &self.before);
        }
    }
}

/// A network namespace as a meshed pod: its address and its `meshlink-proxy`.
#[derive(Debug)]
struct PodNet {
    name: &'static str,
    /// Stopped before the namespace is deleted.
    _proxy: Guard,
    pid: u32,
    log: PathBuf,
    host: Host,
}

impl PodNet {
    fn address(&self) -> IpAddr {
        IpAddr::V4(self.host.address())
    }

    fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.address(), ADMIN_PORT)
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// What a pod's proxy is told (Linkerd's injected environment).
struct PodSpec {
    name: &'static str,
    namespace: &'static str,
    pod: &'static str,
    /// The application's ports (`LINKERD2_PROXY_INBOUND_PORTS`).
    inbound_ports: Vec<u16>,
    /// Those of them that are opaque (the pod's `config.linkerd.io/opaque-ports`).
    opaque_ports: Vec<u16>,
    inbound_ports_to_ignore: Vec<Ports>,
    outbound_ports_to_ignore: Vec<Ports>,
}

/// The control plane as the proxies reach it.
struct ControlPlane<'a> {
    identity_port: u16,
    destination_port: u16,
    anchors_pem: String,
    proxy_binary: &'a Path,
    cores: usize,
    /// World-readable: the proxies run as uid 2102.
    dir: &'a Path,
}

/// Everything a run needs; stopped in field order when dropped.
#[derive(Debug)]
struct Topology {
    haproxy_client: Haproxy,
    haproxy_server: Haproxy,
    haproxy_version: String,
    cluster_ip: IpAddr,
    client: PodNet,
    server: PodNet,
    _backend: Guard,
    _destination: Program,
    _identity: Program,
    _forwarding: Forwarding,
    _cluster: Cluster,
    _proxy_dir: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Topology {
    async fn start(cores: usize) -> Result<Self> {
        let cluster = Cluster::start(CLUSTER).await?;
        let dir = tempfile::tempdir()?;
        mesh::make_pki(dir.path(), &[CLUSTER])?;
        mesh::install_identity(&cluster, dir.path(), CLUSTER).await?;
        // The destination service also watches Links (gateway mirrors): their CRD must exist.
        install_link_crd(&cluster.client()).await?;
        mesh::apply_manifest(&cluster, "destination/destination.yaml").await?;
        let forwarding = Forwarding::enable()?;

        // The control plane listens on every address: the pods reach it at their host side.
        let anchors = dir.path().join("anchor/ca.crt");
        let identity_port = free_port()?;
        let identity = start_identity(
            &cluster,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, identity_port)),
            &anchors,
            "24h",
            dir.path(),
        )
        .await
        .context("the release identity service (cargo build --release --bins)")?;
        let destination_port = free_port()?;
        let destination = start_destination(
            &cluster,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, destination_port)),
            SocketAddr::from((Ipv4Addr::LOCALHOST, identity_port)),
            &anchors,
            dir.path(),
            &["--log=warn".to_owned()],
        )
        .await
        .context("the release destination service (cargo build --release --bins)")?;

        let server_host = pod_host()?;
        let client_host = pod_host()?;
        let cluster_ip = create_objects(&cluster, &server_host, &client_host).await?;
        let backend = start_backend(&server_host)?;

        let proxy_dir = tempfile::tempdir()?;
        set_mode(proxy_dir.path(), 0o755)?;
        let proxy_binary = shipped_binary("meshlink-proxy")?;
        let control = ControlPlane {
            identity_port,
            destination_port,
            anchors_pem: std::fs::read_to_string(&anchors)?,
            proxy_binary: &proxy_binary,
            cores,
            dir: proxy_dir.path(),
        };
        let server_spec = PodSpec {
            name: "server",
            namespace: SERVER_NS,
            pod: SERVER_POD,
            inbound_ports: vec![MESHED.http, MESHED.grpc, MESHED.bulk],
            opaque_ports: vec![MESHED.bulk],
            inbound_ports_to_ignore: vec![DIRECT, HAPROXY_SERVER],
            outbound_ports_to_ignore: Vec::new(),
        };
        let client_spec = PodSpec {
            name: "client",
            namespace: CLIENT_NS,
            pod: CLIENT_POD,
            // A client serves nothing: ready on its certificate alone.
            inbound_ports: Vec::new(),
            opaque_ports: Vec::new(),
            inbound_ports_to_ignore: vec![HAPROXY_CLIENT],
            outbound_ports_to_ignore: vec![DIRECT, HAPROXY_SERVER],
        };
        let server = start_pod(&cluster, &control, &server_spec, server_host).await?;
        let client = start_pod(&cluster, &control, &client_spec, client_host).await?;
        for pod in [&server, &client] {
            wait_ready(pod).await?;
        }

        let haproxy = haproxy_binary()?;
        let haproxy_version = haproxy_version(&haproxy)?;
        let signer = issuer(dir.path())?;
        let haproxy_server = Haproxy::start(
            &haproxy,
            dir.path(),
            &server.host,
            &haproxy_server_config(dir.path(), &signer, &anchors, &server, cores)?,
            SocketAddr::new(server.address(), HAPROXY_SERVER.bulk),
        )
        .context("haproxy in the server pod")?;
        let haproxy_client = Haproxy::start(
            &haproxy,
            dir.path(),
            &client.host,
            &haproxy_client_config(dir.path(), &signer, &anchors, &client, &server, cores)?,
            SocketAddr::new(client.address(), HAPROXY_CLIENT.bulk),
        )
        .context("haproxy in the client pod")?;

        let this = Self {
            haproxy_client,
            haproxy_server,
            haproxy_version,
            cluster_ip,
            client,
            server,
            _backend: backend,
            _destination: destination,
            _identity: identity,
            _forwarding: forwarding,
            _cluster: cluster,
            _proxy_dir: proxy_dir,
            _dir: dir,
        };
        this.check_routes().await?;
        Ok(this)
    }

    /// Where the client dials for `traffic` on `route`.
    fn target(&self, route: Route, traffic: Traffic) -> SocketAddr {
        match route {
            Route::Direct => SocketAddr::new(self.server.address(), DIRECT.of(traffic)),
            Route::Meshed => SocketAddr::new(self.cluster_ip, MESHED.of(traffic)),
            Route::Haproxy => SocketAddr::new(self.client.address(), HAPROXY_CLIENT.of(traffic)),
        }
    }

    /// Runs the client in the client pod for one slice.
    async fn client_slice(
        &self,
        route: Route,
        traffic: Traffic,
        connections: usize,
        slice: Duration,
        warmup: Duration,
    ) -> Result<client::Report> {
        let exe = std::env::current_exe().context("locating the benchmark executable")?;
        let mut cmd = self.client.host.command(&exe);
        cmd.arg("client")
            .arg(format!("--addr={}", self.target(route, traffic)))
            .arg(format!("--traffic={}", traffic.name()))
            .arg(format!("--connections={connections}"))
            .arg(format!("--seconds={}", slice.as_secs_f64()))
            .arg(format!("--warmup={}", warmup.as_secs_f64()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let limit = slice + warmup + Duration::from_secs(30);
        let out = tokio::time::timeout(limit, cmd.output())
            .await
            .with_context(|| {
                format!(
                    "the client ({} {}) did not finish within {limit:?}",
                    route.name(),
                    traffic.name()
                )
            })?
            .context("running the client in the client pod")?;
        ensure!(
            out.status.success(),
            "the client ({} {}, {connections} connections) failed: {}",
            route.name(),
            traffic.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).context("the client's report")
    }

    async fn requests(
        &self,
        route: Route,
        traffic: Traffic,
        connections: usize,
        timing: Timing,
    ) -> Result<HttpSlice> {
        let r = self
            .client_slice(route, traffic, connections, timing.slice, timing.warmup)
            .await?;
        Ok(HttpSlice {
            latencies: r
                .latencies_ns
                .into_iter()
                .map(Duration::from_nanos)
                .collect(),
            seconds: r.seconds,
        })
    }

    async fn bulk(&self, route: Route, connections: usize, timing: Timing) -> Result<BulkSlice> {
        let r = self
            .client_slice(
                route,
                Traffic::Bulk,
                connections,
                timing.slice,
                Duration::ZERO,
            )
            .await?;
        Ok(BulkSlice {
            bytes: r.bytes,
            seconds: r.seconds,
        })
    }

    /// Every route carries every kind of traffic (discovery and policy may take a moment after
    /// the proxies are ready).
    async fn check_routes(&self) -> Result<()> {
        for route in Route::ALL {
            for traffic in Traffic::ALL {
                let deadline = Instant::now() + READY_TIMEOUT;
                loop {
                    let tried = self
                        .client_slice(
                            route,
                            traffic,
                            1,
                            Duration::from_millis(100),
                            Duration::ZERO,
                        )
                        .await;
                    match tried {
                        Ok(_) => break,
                        Err(e) if Instant::now() > deadline => bail!(
                            "{} {} never worked: {e:#}\n{}",
                            route.name(),
                            traffic.name(),
                            self.proxy_logs()
                        ),
                        Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
            }
        }
        Ok(())
    }

    /// The processes whose memory is reported.
    fn processes(&self) -> Vec<(&'static str, u32)> {
        vec![
            ("meshlink_client_proxy", self.client.pid),
            ("meshlink_server_proxy", self.server.pid),
            ("haproxy_client", self.haproxy_client.pid),
            ("haproxy_server", self.haproxy_server.pid),
        ]
    }

    fn proxy_logs(&self) -> String {
        [&self.client, &self.server]
            .iter()
            .map(|p| {
                format!(
                    "--- {} proxy ({}), last lines:\n{}",
                    p.name,
                    p.log.display(),
                    p.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Each proxy's counters of errors and connections after the runs: what a reader checks
    /// when a figure looks wrong.
    async fn proxy_metrics(&self) -> BTreeMap<&'static str, BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for pod in [&self.client, &self.server] {
            let Ok((200, body)) = http_get(pod.admin(), "/metrics").await else {
                continue;
            };
            let kept = body
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    ["error", "tcp_open_total", "request_total", "response_total"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .filter_map(|l| {
                    let (name, value) = l.rsplit_once(' ')?;
                    Some((name.to_owned(), value.parse().ok()?))
                })
                .collect();
            out.insert(pod.name, kept);
        }
        out
    }
}

/// A network namespace routed through this host (its default route over its veth).
fn pod_host() -> Result<Host> {
    let host = Host::create()?;
    let via = host.host_address().to_string();
    run_command(
        host.command(Path::new("ip"))
            .args(["route", "add", "default", "via", &via]),
    )?;
    Ok(host)
}

/// Runs `cmd` to completion; an error with its output if it fails.
fn run_command(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Service `bench/web` (opaque bulk port) and the two meshed, Ready Pods at their namespaces'
/// addresses; returns the Service's ClusterIP.
async fn create_objects(cluster: &Cluster, server: &Host, client: &Host) -> Result<IpAddr> {
    let kube = cluster.client();
    let node = cluster.node_name();
    let opaque = link_crd::keys::OPAQUE_PORTS_ANNOTATION;
    for ns in [SERVER_NS, CLIENT_NS] {
        create_namespace(&kube, ns).await?;
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": { "name": SERVICE, "annotations": { opaque: MESHED.bulk.to_string() } },
        "spec": {
            "selector": { "app": SERVICE },
            "ports": [
                { "name": "http", "port": MESHED.http, "targetPort": MESHED.http },
                { "name": "grpc", "port": MESHED.grpc, "targetPort": MESHED.grpc },
                { "name": "bulk", "port": MESHED.bulk, "targetPort": MESHED.bulk },
            ],
        },
    }))?;
    let svc = Api::<Service>::namespaced(kube.clone(), SERVER_NS)
        .create(&PostParams::default(), &svc)
        .await?;
    let cluster_ip: IpAddr = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service got no ClusterIP")?
        .parse()?;
    let meshed = ("linkerd.io/control-plane-ns", "linkerd");
    for (ns, pod, app, host) in [
        (SERVER_NS, SERVER_POD, SERVICE, server),
        (CLIENT_NS, CLIENT_POD, "client", client),
    ] {
        let ip = IpAddr::V4(host.address());
        create_ready_pod(&kube, ns, pod, &labels(&[("app", app), meshed]), ip, &node).await?;
    }
    // As the injector copies it from the workload: the server's inbound side is opaque too.
    Api::<Pod>::namespaced(kube.clone(), SERVER_NS)
        .patch(
            SERVER_POD,
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "annotations": { opaque: MESHED.bulk.to_string() } } }),
            ),
        )
        .await?;
    Ok(cluster_ip)
}

/// This executable, as the backend, in the server pod.
fn start_backend(host: &Host) -> Result<Guard> {
    let exe = std::env::current_exe().context("locating the benchmark executable")?;
    let child = host
        .command(&exe)
        .arg("backend")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the backend in the server pod")?;
    Ok(Guard(child))
}

/// The init rules, then `meshlink-proxy` as uid 2102 with Linkerd's environment.
async fn start_pod(
    cluster: &Cluster,
    control: &ControlPlane<'_>,
    spec: &PodSpec,
    host: Host,
) -> Result<PodNet> {
    let join = |ports: &[Ports]| ports.iter().map(|p| p.list()).collect::<Vec<_>>().join(",");
    let mut init = host.command(control.proxy_binary);
    init.arg("init");
    if !spec.inbound_ports_to_ignore.is_empty() {
        init.arg(format!(
            "--inbound-ports-to-ignore={}",
            join(&spec.inbound_ports_to_ignore)
        ));
    }
    if !spec.outbound_ports_to_ignore.is_empty() {
        init.arg(format!(
            "--outbound-ports-to-ignore={}",
            join(&spec.outbound_ports_to_ignore)
        ));
    }
    run_command(&mut init)
        .with_context(|| format!("meshlink-proxy init in the {} pod", spec.name))?;

    let token = control.dir.join(format!("{}.token", spec.name));
    std::fs::write(
        &token,
        service_account_token_for(cluster, spec.namespace, ACCOUNT, IDENTITY_AUDIENCE).await?,
    )?;
    set_mode(&token, 0o644)?;
    let root_side = host.host_address();
    let destination = format!("{root_side}:{}", control.destination_port);
    let mut env = vec![
        (
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
            workload_id(ACCOUNT, spec.namespace, CLUSTER),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
            control.anchors_pem.clone(),
        ),
        (
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR",
            format!("{root_side}:{}", control.identity_port),
        ),
        ("LINKERD2_PROXY_IDENTITY_SVC_NAME", identity_id(CLUSTER)),
        (
            "LINKERD2_PROXY_IDENTITY_TOKEN_FILE",
            token.display().to_string(),
        ),
        ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", destination.clone()),
        (
            "LINKERD2_PROXY_DESTINATION_SVC_NAME",
            destination_id(CLUSTER),
        ),
        ("LINKERD2_PROXY_POLICY_SVC_ADDR", destination),
        ("LINKERD2_PROXY_POLICY_SVC_NAME", destination_id(CLUSTER)),
        (
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            json!({ "ns": spec.namespace, "pod": spec.pod }).to_string(),
        ),
        (
            "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
            format!("0.0.0.0:{ADMIN_PORT}"),
        ),
        // The benchmark reads /metrics from the root namespace.
        ("MESHLINK_METRICS_NETWORKS", format!("{root_side}/32")),
        ("LINKERD2_PROXY_CORES", control.cores.to_string()),
        (
            "LINKERD2_PROXY_LOG",
            "warn,meshlink_proxy=info,proxy_identity=info".to_owned(),
        ),
    ];
    let list = |ports: &[u16]| {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        ports.join(",")
    };
    env.push(("LINKERD2_PROXY_INBOUND_PORTS", list(&spec.inbound_ports)));
    if !spec.opaque_ports.is_empty() {
        // What the injector derives from the opaque-ports annotation.
        env.push((
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
            list(&spec.opaque_ports),
        ));
    }
    let log = control.dir.join(format!("{}-proxy.log", spec.name));
    let file = std::fs::File::create(&log)?;
    // `ip netns exec` and `setpriv` both exec: the child's pid is the proxy's.
    let child = host
        .command(Path::new("setpriv"))
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .arg("--clear-groups")
        .arg(control.proxy_binary)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting meshlink-proxy in the {} pod", spec.name))?;
    let pid = child.id();
    Ok(PodNet {
        name: spec.name,
        _proxy: Guard(child),
        pid,
        log,
        host,
    })
}

/// Waits until the pod's proxy answers `/ready` (certified, inbound policies known).
async fn wait_ready(pod: &PodNet) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok((200, _)) = http_get(pod.admin(), "/ready").await {
            return Ok(());
        }
        let exited = std::fs::read_to_string(format!("/proc/{}/stat", pod.pid)).is_err();
        if exited || Instant::now() > deadline {
            let what = if exited {
                "exited"
            } else {
                "was not ready within 60 s"
            };
            bail!(
                "meshlink-proxy in the {} pod {what}; last lines of {}:\n{}",
                pod.name,
                pod.log.display(),
                pod.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn issuer(dir: &Path) -> Result<Signer> {
    let read =
        |p: &str| std::fs::read_to_string(dir.join(p)).with_context(|| format!("reading {p}"));
    Ok(Signer::from_pem(
        &read("east/issuer.crt")?,
        &read("east/issuer.key")?,
    )?)
}

/// A PEM file of `id`'s leaf, the issuer and the key (what HAProxy's `crt` reads).
fn certificate(dir: &Path, signer: &Signer, id: &str, file: &str) -> Result<PathBuf> {
    let pem = signer.issue_pem(&Id::parse(id)?, Duration::from_secs(24 * 3600))?;
    let path = dir.join(file);
    std::fs::write(&path, pem.cert_pem + &pem.key_pem)?;
    Ok(path)
}

/// HAProxy, running in the foreground in a pod.
#[derive(Debug)]
struct Haproxy {
    _child: Guard,
    pid: u32,
    config: String,
}

impl Haproxy {
    fn start(
        binary: &Path,
        dir: &Path,
        host: &Host,
        (name, config): &(String, String),
        listening: SocketAddr,
    ) -> Result<Self> {
        let cfg = dir.join(format!("{name}.cfg"));
        std::fs::write(&cfg, config)?;
        haproxy_check(binary, &cfg, config)?;
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = host
            .command(binary)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy")?;
        // `ip netns exec` execs: the child's pid is HAProxy's.
        let mut child = Guard(child);
        let pid = child.0.id();
        wait_listening(&mut child, &[listening], &log_path)?;
        Ok(Self {
            _child: child,
            pid,
            config: config.clone(),
        })
    }
}

/// TLS as the proxies': TLS 1.3 only, Linkerd's suites in Linkerd's order.
const TLS13: &str = "ssl-min-ver TLSv1.3 \
    ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

fn haproxy_global(threads: usize) -> String {
    format!(
        "global
    nbthread {threads}
    maxconn 4096

defaults
    timeout connect 2s
    timeout client 60s
    timeout server 60s
"
    )
}

/// The server pod's HAProxy: terminates mTLS (the server's identity, client certificates
/// verified against the anchor) in front of the backend, as the server proxy does; HTTP/2 or
/// HTTP/1.1 from the peer, HTTP/1.1 and gRPC's HTTP/2 to the backend.
fn haproxy_server_config(
    dir: &Path,
    signer: &Signer,
    anchors: &Path,
    server: &PodNet,
    threads: usize,
) -> Result<(String, String)> {
    let crt = certificate(
        dir,
        signer,
        &workload_id(ACCOUNT, SERVER_NS, CLUSTER),
        "haproxy-server.pem",
    )?;
    let ip = server.address();
    let bind = |alpn: &str| {
        format!(
            "ssl crt {} ca-file {} verify required {alpn} {TLS13}",
            crt.display(),
            anchors.display()
        )
    };
    let config = format!(
        "{global}
frontend http
    mode http
    bind {ip}:{http} {bind_h2}
    default_backend http

backend http
    mode http
    server app 127.0.0.1:{direct_http}

frontend grpc
    mode http
    bind {ip}:{grpc} {bind_h2}
    default_backend grpc

backend grpc
    mode http
    server app 127.0.0.1:{direct_grpc} proto h2

frontend bulk
    mode tcp
    bind {ip}:{bulk} {bind_tcp}
    default_backend bulk

backend bulk
    mode tcp
    server sink 127.0.0.1:{direct_bulk}
",
        global = haproxy_global(threads),
        http = HAPROXY_SERVER.http,
        grpc = HAPROXY_SERVER.grpc,
        bulk = HAPROXY_SERVER.bulk,
        bind_h2 = bind("alpn h2,http/1.1"),
        bind_tcp = bind(""),
        direct_http = DIRECT.http,
        direct_grpc = DIRECT.grpc,
        direct_bulk = DIRECT.bulk,
    );
    Ok(("haproxy-server".to_owned(), config))
}

/// The client pod's HAProxy: plaintext for the client, mTLS to the server pod's HAProxy (the
/// client's identity, the server's verified against the anchor), HTTP/2 between the two as
/// between the proxies.
fn haproxy_client_config(
    dir: &Path,
    signer: &Signer,
    anchors: &Path,
    client: &PodNet,
    server: &PodNet,
    threads: usize,
) -> Result<(String, String)> {
    let crt = certificate(
        dir,
        signer,
        &workload_id(ACCOUNT, CLIENT_NS, CLUSTER),
        "haproxy-client.pem",
    )?;
    let server_id = workload_id(ACCOUNT, SERVER_NS, CLUSTER);
    let tls = |alpn: &str| {
        format!(
            "ssl crt {} ca-file {} verify required verifyhost {server_id} sni str({server_id}) \
             {alpn} {TLS13}",
            crt.display(),
            anchors.display()
        )
    };
    let (ip, peer) = (client.address(), server.address());
    let config = format!(
        "{global}
frontend http
    mode http
    bind {ip}:{http}
    default_backend http

backend http
    mode http
    server peer {peer}:{peer_http} {tls_h2}

frontend grpc
    mode http
    bind {ip}:{grpc} proto h2
    default_backend grpc

backend grpc
    mode http
    server peer {peer}:{peer_grpc} {tls_h2}

frontend bulk
    mode tcp
    bind {ip}:{bulk}
    default_backend bulk

backend bulk
    mode tcp
    server peer {peer}:{peer_bulk} {tls_tcp}
",
        global = haproxy_global(threads),
        http = HAPROXY_CLIENT.http,
        grpc = HAPROXY_CLIENT.grpc,
        bulk = HAPROXY_CLIENT.bulk,
        peer_http = HAPROXY_SERVER.http,
        peer_grpc = HAPROXY_SERVER.grpc,
        peer_bulk = HAPROXY_SERVER.bulk,
        tls_h2 = tls("alpn h2"),
        tls_tcp = tls(""),
    );
    Ok(("haproxy-client".to_owned(), config))
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Clone, Copy, Debug, Serialize)]
struct Memory {
    /// VmHWM after the runs (start-up included).
    peak_mib: f64,
    /// The highest VmRSS sampled every 50 ms during the runs.
    max_sampled_mib: f64,
}

#[derive(Debug, Serialize)]
struct Ratios {
    /// Meshed p50 minus direct p50 at 1 connection.
    meshed_added_p50_us_http_1: f64,
    meshed_added_p50_us_grpc_1: f64,
    /// The same for the HAProxy pair, for context.
    haproxy_added_p50_us_http_1: f64,
    haproxy_added_p50_us_grpc_1: f64,
    meshed_over_direct_http_16: f64,
    meshed_over_direct_grpc_16: f64,
    meshed_over_direct_bulk_16: f64,
    meshed_over_haproxy_http_16: f64,
    meshed_over_haproxy_grpc_16: f64,
    meshed_over_haproxy_bulk_16: f64,
    client_proxy_peak_rss_mib: f64,
    server_proxy_peak_rss_mib: f64,
}

#[derive(Debug)]
struct Report {
    settings: serde_json::Value,
    http: Results<Route, HttpFigures>,
    grpc: Results<Route, HttpFigures>,
    bulk: Results<Route, BulkFigures>,
    memory: BTreeMap<&'static str, Memory>,
    proxy_metrics: BTreeMap<&'static str, BTreeMap<String, f64>>,
    ratios: Ratios,
    goals: Vec<Goal>,
}

impl Report {
    fn new(
        settings: serde_json::Value,
        http: Results<Route, HttpFigures>,
        grpc: Results<Route, HttpFigures>,
        bulk: Results<Route, BulkFigures>,
        memory: BTreeMap<&'static str, Memory>,
        proxy_metrics: BTreeMap<&'static str, BTreeMap<String, f64>>,
    ) -> Self {
        let get = |r: &Results<Route, HttpFigures>, c: usize, route: Route| {
            r.get(&c).and_then(|m| m.get(&route)).copied()
        };
        let p50 = |r, route| get(r, 1, route).map_or(f64::NAN, |f| f.p50_us);
        let rps = |r, route| get(r, 16, route).map_or(f64::NAN, |f| f.requests_per_s);
        let mbps = |route| {
            bulk.get(&16)
                .and_then(|m| m.get(&route))
                .map_or(f64::NAN, |f| f.mb_per_s)
        };
        let peak = |name| memory.get(name).map_or(f64::NAN, |m: &Memory| m.peak_mib);
        let ratios = Ratios {
            meshed_added_p50_us_http_1: p50(&http, Route::Meshed) - p50(&http, Route::Direct),
            meshed_added_p50_us_grpc_1: p50(&grpc, Route::Meshed) - p50(&grpc, Route::Direct),
            haproxy_added_p50_us_http_1: p50(&http, Route::Haproxy) - p50(&http, Route::Direct),
            haproxy_added_p50_us_grpc_1: p50(&grpc, Route::Haproxy) - p50(&grpc, Route::Direct),
            meshed_over_direct_http_16: rps(&http, Route::Meshed) / rps(&http, Route::Direct),
            meshed_over_direct_grpc_16: rps(&grpc, Route::Meshed) / rps(&grpc, Route::Direct),
            meshed_over_direct_bulk_16: mbps(Route::Meshed) / mbps(Route::Direct),
            meshed_over_haproxy_http_16: rps(&http, Route::Meshed) / rps(&http, Route::Haproxy),
            meshed_over_haproxy_grpc_16: rps(&grpc, Route::Meshed) / rps(&grpc, Route::Haproxy),
            meshed_over_haproxy_bulk_16: mbps(Route::Meshed) / mbps(Route::Haproxy),
            client_proxy_peak_rss_mib: peak("meshlink_client_proxy"),
            server_proxy_peak_rss_mib: peak("meshlink_server_proxy"),
        };
        let goals = goals(&ratios);
        Self {
            settings,
            http,
            grpc,
            bulk,
            memory,
            proxy_metrics,
            ratios,
            goals,
        }
    }

    fn print_titled_requests(
        out: &mut impl std::io::Write,
        title: &str,
        results: &Results<Route, HttpFigures>,
    ) -> Result<()> {
        writeln!(out)?;
        writeln!(out, "{title}")?;
        print_requests(out, results)?;
        Ok(())
    }

    fn print(&self, out: &mut impl std::io::Write, elapsed: Duration) -> Result<()> {
        let s = &self.settings;
        writeln!(out)?;
        writeln!(
            out,
            "sidecar proxy benchmark: {} CPUs shared by the client ({CLIENT_THREADS} tokio workers), \
             two meshlink-proxy ({} core(s) each), two HAProxy (nbthread {} each) and the backend \
             (1 thread):",
            s["cpus"], s["proxy_cores"], s["haproxy_nbthread"]
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
        let each = format!(
            "{} s per run in {} slices, each after {} s of warm-up",
            s["seconds_per_run"], s["rounds"], s["warmup_seconds_per_request_slice"]
        );
        Self::print_titled_requests(
            out,
            &format!("HTTP/1.1 GET on keep-alive connections, one request at a time each: {each}"),
            &self.http,
        )?;
        Self::print_titled_requests(
            out,
            &format!("gRPC unary calls (HTTP/2), one at a time per connection: {each}"),
            &self.grpc,
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "bulk TCP upload into a sink (MB = 10^6 bytes the sink counted), {} s per run in {} slices",
            s["seconds_per_run"], s["rounds"]
        )?;
        print_bulk(out, &self.bulk)?;
        writeln!(out)?;
        writeln!(
            out,
            "memory over the runs: peak (VmHWM) and highest VmRSS sampled every 50 ms"
        )?;
        for (name, m) in &self.memory {
            writeln!(
                out,
                "  {name:<24} {:>6.1} MiB  {:>6.1} MiB",
                m.peak_mib, m.max_sampled_mib
            )?;
        }
        let r = &self.ratios;
        print_verdict(
            out,
            &[
                (
                    "meshed p50 - direct p50, HTTP, 1 conn",
                    r.meshed_added_p50_us_http_1,
                    " µs",
                ),
                (
                    "meshed p50 - direct p50, gRPC, 1 conn",
                    r.meshed_added_p50_us_grpc_1,
                    " µs",
                ),
                (
                    "haproxy p50 - direct p50, HTTP, 1 conn",
                    r.haproxy_added_p50_us_http_1,
                    " µs",
                ),
                (
                    "haproxy p50 - direct p50, gRPC, 1 conn",
                    r.haproxy_added_p50_us_grpc_1,
                    " µs",
                ),
                (
                    "meshed / direct, HTTP req/s, 16 conns",
                    r.meshed_over_direct_http_16,
                    "",
                ),
                (
                    "meshed / direct, gRPC req/s, 16 conns",
                    r.meshed_over_direct_grpc_16,
                    "",
                ),
                (
                    "meshed / direct, bulk MB/s, 16 conns",
                    r.meshed_over_direct_bulk_16,
                    "",
                ),
                (
                    "meshed / haproxy, HTTP req/s, 16 conns",
                    r.meshed_over_haproxy_http_16,
                    "",
                ),
                (
                    "meshed / haproxy, gRPC req/s, 16 conns",
                    r.meshed_over_haproxy_grpc_16,
                    "",
                ),
                (
                    "meshed / haproxy, bulk MB/s, 16 conns",
                    r.meshed_over_haproxy_bulk_16,
                    "",
                ),
                ("client proxy peak RSS", r.client_proxy_peak_rss_mib, " MiB"),
                ("server proxy peak RSS", r.server_proxy_peak_rss_mib, " MiB"),
            ],
            &self.goals,
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "took {:.0} s; written to target/bench/proxy.json",
            elapsed.as_secs_f64()
        )?;
        Ok(())
    }

    fn write_json(&self, elapsed: Duration) -> Result<()> {
        let results = json!({
            "settings": self.settings,
            "http": self.http,
            "grpc": self.grpc,
            "bulk": self.bulk,
            "memory": self.memory,
            "proxy_metrics": self.proxy_metrics,
            "ratios": self.ratios,
            "goals": self.goals,
            "elapsed_seconds": elapsed.as_secs_f64(),
        });
        Ok(write_json("proxy", &results)?)
    }
}

fn goals(r: &Ratios) -> Vec<Goal> {
    let goal = |goal: &str, figure: String, met: bool| Goal {
        goal: goal.to_owned(),
        figure,
        met,
    };
    let us = |v: f64| format!("{v:.1} µs");
    let pct = |v: f64| format!("{:.0} %", v * 100.0);
    let times = |v: f64| format!("{v:.2}x");
    let mib = |v: f64| format!("{v:.1} MiB");
    vec![
        goal(
            "1 conn: the proxy pair adds under 80 µs to p50, HTTP",
            us(r.meshed_added_p50_us_http_1),
            r.meshed_added_p50_us_http_1 < 80.0,
        ),
        goal(
            "1 conn: the proxy pair adds under 80 µs to p50, gRPC",
            us(r.meshed_added_p50_us_grpc_1),
            r.meshed_added_p50_us_grpc_1 < 80.0,
        ),
        goal(
            "16 conns: at least 30 % of direct req/s, HTTP",
            pct(r.meshed_over_direct_http_16),
            r.meshed_over_direct_http_16 >= 0.30,
        ),
        goal(
            "16 conns: at least 30 % of direct req/s, gRPC",
            pct(r.meshed_over_direct_grpc_16),
            r.meshed_over_direct_grpc_16 >= 0.30,
        ),
        goal(
            "16 conns: beats the HAProxy pair, HTTP req/s",
            times(r.meshed_over_haproxy_http_16),
            r.meshed_over_haproxy_http_16 > 1.0,
        ),
        goal(
            "16 conns: beats the HAProxy pair, gRPC req/s",
            times(r.meshed_over_haproxy_grpc_16),
            r.meshed_over_haproxy_grpc_16 > 1.0,
        ),
        goal(
            "16 conns: beats the HAProxy pair, bulk MB/s",
            times(r.meshed_over_haproxy_bulk_16),
            r.meshed_over_haproxy_bulk_16 > 1.0,
        ),
        goal(
            "client proxy RSS under 12 MB (11.44 MiB) under load (VmHWM)",
            mib(r.client_proxy_peak_rss_mib),
            r.client_proxy_peak_rss_mib < RSS_GOAL_MIB,
        ),
        goal(
            "server proxy RSS under 12 MB (11.44 MiB) under load (VmHWM)",
            mib(r.server_proxy_peak_rss_mib),
            r.server_proxy_peak_rss_mib < RSS_GOAL_MIB,
        ),
    ]
}

/// The issue's memory goal, 12 MB (10^6 bytes), in the MiB the figures are in.
const RSS_GOAL_MIB: f64 = 12e6 / (1024.0 * 1024.0);
