//! What the benchmarks measure of a process and of samples, in one place.

use std::time::Duration;

/// The `p` quantile (0.0 to 1.0) of sorted samples; zero for none.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The CPU time process `pid` has used (user and system, every thread), in seconds.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    // Fields 14 and 15 of /proc/<pid>/stat, in clock ticks of 1/100 s (USER_HZ on Linux),
    // counted after the command name, which is in parentheses and may hold spaces.
    let Some(stat) = pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
    else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints `results` as a table and writes them to `target/bench/<name>.json`.
pub fn report(name: &str, results: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write as _;
    let table: std::collections::BTreeMap<&str, String> = results
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.to_string()))
        .collect();
    let mut stdout = std::io::stdout().lock();
    for (k, v) in &table {
        writeln!(stdout, "{k:>26}  {v}")?;
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(results).map_err(std::io::Error::other)?,
    )
}

// ---------------------------------------------------------------------------------------------
// What the proxy benchmarks (gateway, sidecar) share: runs cut into interleaved slices, their
// figures, memory sampling, the bulk sink and HAProxy as the baseline.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Each write of a bulk upload.
pub const BULK_CHUNK: usize = 64 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// How long each run lasts, in how many slices.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub slice: Duration,
    /// Requests made before each request slice is measured.
    pub warmup: Duration,
    pub rounds: usize,
}

impl Timing {
    /// `seconds` per run in `rounds` slices, each request slice after `warmup` seconds.
    pub fn new(seconds: f64, rounds: usize, warmup: f64) -> Result<Self> {
        ensure!(rounds > 0, "--rounds must be at least 1");
        let slice = Duration::try_from_secs_f64(seconds / rounds as f64).context("--seconds")?;
        ensure!(!slice.is_zero(), "--seconds must be positive");
        Ok(Self {
            slice,
            warmup: Duration::try_from_secs_f64(warmup).context("--warmup")?,
            rounds,
        })
    }

    /// The measured time of a whole run.
    pub fn run(self) -> Duration {
        self.slice * u32::try_from(self.rounds).unwrap_or(u32::MAX)
    }
}

/// What one slice of a run measured. A run is `--rounds` slices, interleaved with the other
/// routes' slices so that whatever else the machine does touches every route alike; the slices
/// of a run add up to its figures.
pub trait Slice: Default {
    type Figures: Copy + std::fmt::Debug;
    /// Requests/s or MB/s.
    fn rate(&self) -> f64;
    fn add(&mut self, other: Self);
    /// The run's figures, with the rates of its slices for their spread.
    fn figures(self, slice_rates: &[f64]) -> Self::Figures;
}

/// The latency of every request of a slice that ended in it.
#[derive(Debug, Default)]
pub struct HttpSlice {
    pub latencies: Vec<Duration>,
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct HttpFigures {
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub slowest_slice_per_s: f64,
    pub fastest_slice_per_s: f64,
}

impl Slice for HttpSlice {
    type Figures = HttpFigures;

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.seconds
    }

    fn add(&mut self, other: Self) {
        self.latencies.extend(other.latencies);
        self.seconds += other.seconds;
    }

    fn figures(mut self, slice_rates: &[f64]) -> HttpFigures {
        self.latencies.sort_unstable();
        let (slowest, fastest) = spread(slice_rates);
        HttpFigures {
            requests: self.latencies.len(),
            seconds: self.seconds,
            requests_per_s: self.rate(),
            p50_us: micros(percentile(&self.latencies, 0.50)),
            p99_us: micros(percentile(&self.latencies, 0.99)),
            slowest_slice_per_s: slowest,
            fastest_slice_per_s: fastest,
        }
    }
}

/// The bytes a sink counted over a slice.
#[derive(Debug, Default)]
pub struct BulkSlice {
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct BulkFigures {
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: f64,
    pub slowest_slice_mb_per_s: f64,
    pub fastest_slice_mb_per_s: f64,
}

impl Slice for BulkSlice {
    type Figures = BulkFigures;

    fn rate(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }

    fn add(&mut self, other: Self) {
        self.bytes += other.bytes;
        self.seconds += other.seconds;
    }

    fn figures(self, slice_rates: &[f64]) -> BulkFigures {
        let (slowest, fastest) = spread(slice_rates);
        BulkFigures {
            bytes: self.bytes,
            seconds: self.seconds,
            mb_per_s: self.rate(),
            slowest_slice_mb_per_s: slowest,
            fastest_slice_mb_per_s: fastest,
        }
    }
}

/// The slowest and the fastest of the slices' rates.
pub fn spread(rates: &[f64]) -> (f64, f64) {
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rates.iter().copied().fold(0.0, f64::max);
    (min, max)
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// KiB (as `/proc` counts) in MiB; zero for none.
pub fn mib(kib: Option<u64>) -> f64 {
    kib.unwrap_or(0) as f64 * 1024.0 / MIB
}

/// A way through to the backend, as results are keyed and printed.
pub trait Route: Copy + Ord {
    fn name(self) -> &'static str;
}

/// Figures by connection count, then route.
pub type Results<R, T> = BTreeMap<usize, BTreeMap<R, T>>;

/// Every route at every connection count, in rounds: each round runs one slice of every route.
pub async fn interleaved<R, S, F>(
    routes: &[R],
    connections: &[usize],
    rounds: usize,
    mut slice: impl FnMut(R, usize) -> F,
) -> Result<Results<R, S::Figures>>
where
    R: Route,
    S: Slice,
    F: Future<Output = Result<S>>,
{
    let mut results = Results::new();
    for &connections in connections {
        let mut runs: BTreeMap<R, (S, Vec<f64>)> = BTreeMap::new();
        for _ in 0..rounds {
            for &route in routes {
                let one = slice(route, connections)
                    .await
                    .with_context(|| format!("{} with {connections} connections", route.name()))?;
                let (run, rates) = runs.entry(route).or_default();
                rates.push(one.rate());
                run.add(one);
            }
        }
        for (route, (run, rates)) in runs {
            let figures = run.figures(&rates);
            eprintln!("{:>8} x{connections:<3} {figures:?}", route.name());
            results
                .entry(connections)
                .or_default()
                .insert(route, figures);
        }
    }
    Ok(results)
}

/// Writes `BULK_CHUNK`s until `until`, half-closes, and returns the sink's count and when it
/// arrived (see [`sink`]).
pub async fn upload<S>(mut io: S, until: Instant) -> Result<(u64, Instant)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let chunk = vec![0x5a_u8; BULK_CHUNK];
    let mut sent = 0_u64;
    while Instant::now() < until {
        io.write_all(&chunk).await.context("uploading")?;
        sent += BULK_CHUNK as u64;
    }
    io.shutdown().await.context("half-closing")?;
    let mut count = [0; 8];
    io.read_exact(&mut count)
        .await
        .context("reading the sink's byte count")?;
    let received = u64::from_be_bytes(count);
    ensure!(received == sent, "the sink got {received} of {sent} bytes");
    Ok((received, Instant::now()))
}

/// The backend's sink: reads to the end, then answers the byte count (u64, big-endian) and
/// closes, so that a bulk run counts what arrived rather than what sat in socket buffers.
pub async fn sink<S>(mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0; 256 * 1024];
    let mut count = 0_u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => count += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&count.to_be_bytes()).await;
    let _ = s.shutdown().await;
}

/// The highest VmRSS of a process, sampled every 50 ms until dropped.
#[derive(Debug)]
pub struct RssSampler {
    max_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let max_kib = max_kib.clone();
            async move {
                loop {
                    if let Some(kib) = status_kib(pid, "VmRSS") {
                        max_kib.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { max_kib, task }
    }

    pub fn max_kib(&self) -> u64 {
        self.max_kib.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `haproxy` on PATH, or Debian's `/usr/sbin/haproxy` (not on a user's PATH).
pub fn haproxy_binary() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .context(
            "haproxy is not installed: apt-get install haproxy (make bench-gateway and \
             make bench-proxy do, as root)",
        )
}

/// The first line of `haproxy -v`.
pub fn haproxy_version(binary: &Path) -> Result<String> {
    let out = Command::new(binary).arg("-v").output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// Checks `config` with `haproxy -c` (from this network namespace).
pub fn haproxy_check(binary: &Path, cfg: &Path, config: &str) -> Result<()> {
    let check = Command::new(binary).arg("-c").arg("-f").arg(cfg).output()?;
    ensure!(
        check.status.success(),
        "haproxy -c refused the configuration:\n{}{}\n{config}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

/// Waits until every address accepts, failing with `log` if the child exits first.
pub fn wait_listening(child: &mut Guard, addrs: &[std::net::SocketAddr], log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if addrs
            .iter()
            .all(|a| std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
        {
            return Ok(());
        }
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "did not listen on {addrs:?} within 10 s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmarks' reports

/// One of an issue's goals, as measured (reported, never enforced).
#[derive(Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub figure: String,
    pub met: bool,
}

/// Request figures as a table: a row per connection count and route.
pub fn print_requests<R: Route>(
    out: &mut impl std::io::Write,
    results: &Results<R, HttpFigures>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5}  {:<8} {:>10} {:>10} {:>10}   slices: slowest-fastest req/s",
        "conns", "route", "req/s", "p50 µs", "p99 µs"
    )?;
    for (conns, routes) in results {
        for (route, f) in routes {
            writeln!(
                out,
                "{conns:>5}  {:<8} {:>10.0} {:>10.1} {:>10.1}   {:.0}-{:.0}",
                route.name(),
                f.requests_per_s,
                f.p50_us,
                f.p99_us,
                f.slowest_slice_per_s,
                f.fastest_slice_per_s
            )?;
        }
    }
    Ok(())
}

/// Bulk figures as a table: a row per connection count and route.
pub fn print_bulk<R: Route>(
    out: &mut impl std::io::Write,
    results: &Results<R, BulkFigures>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5}  {:<8} {:>10}   slices: slowest-fastest MB/s",
        "conns", "route", "MB/s"
    )?;
    for (conns, routes) in results {
        for (route, f) in routes {
            writeln!(
                out,
                "{conns:>5}  {:<8} {:>10.1}   {:.0}-{:.0}",
                route.name(),
                f.mb_per_s,
                f.slowest_slice_mb_per_s,
                f.fastest_slice_mb_per_s
            )?;
        }
    }
    Ok(())
}

/// The ratios (what, value, unit) and the goals, as the end of a report.
pub fn print_verdict(
    out: &mut impl std::io::Write,
    ratios: &[(&str, f64, &str)],
    goals: &[Goal],
) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "ratios")?;
    for (what, value, unit) in ratios {
        writeln!(out, "  {what:<40} {value:>8.2}{unit}")?;
    }
    writeln!(out)?;
    writeln!(out, "goals (reported, never enforced)")?;
    for g in goals {
        let mark = if g.met { "met   " } else { "MISSED" };
        writeln!(out, "  [{mark}] {:<62} {}", g.goal, g.figure)?;
    }
    Ok(())
}

/// Writes `results` to `target/bench/<name>.json`.
pub fn write_json(name: &str, results: &serde_json::Value) -> std::io::Result<()> {
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(results).map_err(std::io::Error::other)?,
    )
}
