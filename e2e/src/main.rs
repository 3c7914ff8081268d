//! `e2e up` starts local test clusters that outlive the command (for people); `e2e down` stops
//! them; `e2e demo` runs the multicluster flow on them (`make demo`).

mod demo;

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use e2e::{Binaries, Cluster, ClusterOptions, state};

#[derive(Parser, Debug)]
#[command(about = "Local Kubernetes control planes for trying and testing meshlink")]
struct Args {
    /// Where the clusters keep their files (one directory each).
    #[arg(long, env = "MESHLINK_CLUSTERS_DIR", default_value_os_t = default_dir())]
    dir: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start clusters (default: east and west) and print how to use them.
    Up {
        #[arg(default_values = ["east", "west"])]
        names: Vec<String>,
    },
    /// Stop clusters started by `up` and remove their files.
    Down {
        #[arg(default_values = ["east", "west"])]
        names: Vec<String>,
    },
    /// Start fresh clusters east and west and run the multicluster flow on them.
    Demo,
    /// Answer every HTTP request with 200 (a stand-in for a gateway's health port in tests).
    ProbeServer {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// The backend of test Services: TCP echo until half-close, and HTTP/1 + HTTP/2.
    Backend {
        #[arg(long)]
        tcp: std::net::SocketAddr,
        #[arg(long)]
        http: std::net::SocketAddr,
    },
    /// A meshed client: certify, dial a gateway, make one exchange, print what came back.
    MeshClient(Box<e2e::mesh::ClientArgs>),
    /// The app of a meshed test Pod: HTTP that names the Pod and its caller's `l5d-client-id`,
    /// and a server-speaks-first protocol; logs every request.
    PodApp {
        #[arg(long)]
        name: String,
        #[arg(long)]
        http: std::net::SocketAddr,
        #[arg(long)]
        banner: Option<std::net::SocketAddr>,
    },
    /// A plain client of the server-speaks-first protocol: read the greeting, send a line,
    /// print everything the server sent.
    BannerClient {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "ping")]
        message: String,
    },
    /// Plain HTTP/1 GETs, one after another on fresh connections, until stdin closes; one line
    /// per request.
    ClientLoop {
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// How many loops run at once.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
}

fn default_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache/meshlink/clusters")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // kube's client logs every failed request at ERROR; while an API server starts,
                // /readyz fails by design until it is ready.
                .unwrap_or_else(|_| "warn,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut out = std::io::stdout().lock();
    match args.command {
        Command::Up { names } => up(&args.dir, &names, &mut out).await,
        Command::Down { names } => down(&args.dir, &names, &mut out),
        Command::ProbeServer { listen } => probe_server(listen).await,
        Command::Backend { tcp, http } => Ok(e2e::mesh::serve_backend(tcp, http).await?),
        Command::MeshClient(args) => {
            proxy_identity::tls::install_default_provider();
            let answer = e2e::mesh::mesh_client(*args).await?;
            out.write_all(answer.as_bytes())?;
            Ok(())
        }
        Command::Demo => run_demo(&args.dir, &mut out).await,
        Command::PodApp { name, http, banner } => e2e::app::serve(name, http, banner).await,
        Command::BannerClient { addr, message } => {
            let answer =
                e2e::app::banner_client(addr, &message, std::time::Duration::from_secs(15)).await?;
            out.write_all(answer.as_bytes())?;
            Ok(())
        }
        Command::ClientLoop { addr, workers } => {
            drop(out);
            e2e::app::client_loop(addr, workers, std::time::Duration::from_secs(5)).await
        }
    }
}

async fn up(dir: &Path, names: &[String], out: &mut impl Write) -> Result<()> {
    let mut kubeconfigs = Vec::new();
    let mut starting = Vec::new();
    for name in names {
        let cluster_dir = dir.join(name);
        kubeconfigs.push(cluster_dir.join("kubeconfig"));
        if state::any_running(&cluster_dir) {
            writeln!(out, "{name}: already running ({})", cluster_dir.display())?;
            continue;
        }
        let mut opts = ClusterOptions::new(name);
        opts.fixed_dir = Some(cluster_dir);
        starting.push(Cluster::start_with(opts));
    }
    for cluster in futures::future::try_join_all(starting)
        .await
        .context("starting the clusters failed")?
    {
        let name = cluster.name().to_owned();
        let url = cluster.server_url();
        let path = cluster.detach()?;
        writeln!(out, "{name}: {url} (files in {})", path.display())?;
    }
    let kubectl = Binaries::locate()?.kubectl();
    let joined = std::env::join_paths(&kubeconfigs)?;
    writeln!(out)?;
    writeln!(out, "Point kubectl at them (one context per cluster):")?;
    writeln!(out, "  export KUBECONFIG={}", joined.to_string_lossy())?;
    writeln!(
        out,
        "  export PATH={}:$PATH",
        kubectl.parent().unwrap_or(dir).display()
    )?;
    for name in names {
        writeln!(out, "  kubectl --context {name} get namespaces")?;
    }
    writeln!(
        out,
        "Stop them with `make clusters-down` (or `cargo run -p e2e -- down`)."
    )?;
    Ok(())
}

fn down(dir: &Path, names: &[String], out: &mut impl Write) -> Result<()> {
    let mut failed = Vec::new();
    for name in names {
        let cluster_dir = dir.join(name);
        if !cluster_dir.exists() {
            writeln!(out, "{name}: not running")?;
            continue;
        }
        match state::remove(&cluster_dir) {
            Ok(n) => writeln!(out, "{name}: stopped {n} processes")?,
            Err(e) => failed.push(format!("{name}: {e}")),
        }
    }
    if !failed.is_empty() {
        bail!("could not stop every cluster:\n{}", failed.join("\n"));
    }
    Ok(())
}

async fn probe_server(listen: std::net::SocketAddr) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            // Bounded: a request head of at most 16 KiB within 5 s.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\nconnection: close\r\n\r\nready\n",
                )
                .await;
        });
    }
}

async fn run_demo(dir: &Path, out: &mut impl Write) -> Result<()> {
    let names = ["east", "west"];
    for name in names {
        let d = dir.join(name);
        if d.exists() {
            state::remove(&d).with_context(|| format!("stopping the earlier {name}"))?;
        }
    }
    writeln!(
        out,
        "== Starting clusters east and west (real kube-apiserver, controller-manager, etcd)"
    )?;
    let clusters = futures::future::try_join_all(names.iter().map(|name| {
        let mut opts = ClusterOptions::new(name);
        opts.fixed_dir = Some(dir.join(name));
        // Deployments make their Pods, which the injector meshes and the demo then runs.
        opts.workload_controllers = true;
        Cluster::start_with(opts)
    }))
    .await?;
    let kubectl = Binaries::locate()?.kubectl();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let result = demo::run(&repo, &clusters[0], &clusters[1], out).await;
    let mut kubeconfigs = Vec::new();
    for cluster in clusters {
        kubeconfigs.push(cluster.kubeconfig_path().to_owned());
        cluster.detach()?;
    }
    result?;
    let joined = std::env::join_paths(&kubeconfigs)?;
    writeln!(
        out,
        "\nmeshlink's programs have stopped; the clusters and what was applied to them stay. Look around with:"
    )?;
    writeln!(
        out,
        "  export KUBECONFIG={} PATH={}:$PATH",
        joined.to_string_lossy(),
        kubectl.parent().unwrap_or(dir).display()
    )?;
    writeln!(
        out,
        "  kubectl --context west -n shop get svc,endpoints,pods"
    )?;
    writeln!(
        out,
        "  kubectl --context east -n shop get pod -o yaml   # the proxy the injector added"
    )?;
    writeln!(
        out,
        "Tear it all down with `make clusters-down` (or `meshlink uninstall --context <c> | kubectl delete -f -` after `meshlink unlink`)."
    )?;
    Ok(())
}
