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
