//! `meshlink`: the command-line tool. `link` prints what links a cluster to the one it runs
//! against; `unlink` prints what removes such a link; `gateways` shows linked gateways.

mod gateways;
mod link;
mod unlink;

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

#[derive(Parser, Debug)]
#[command(
    name = "meshlink",
    about = "Connect Kubernetes clusters (Linkerd multicluster compatible)",
    version
)]
struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Yaml)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How documents are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run against the TARGET cluster; prints the credentials Secret and Link to apply in the
    /// source cluster (and, with --with-controller, the controller that serves it).
    Link(Box<link::LinkArgs>),
    /// Run against the SOURCE cluster; prints what removes a Link, for `kubectl delete -f -`
    /// (the controller then removes the Link's mirrors).
    Unlink(unlink::UnlinkArgs),
    /// Run against the SOURCE cluster; shows each linked cluster's gateway: alive, mirrored
    /// Services, probe latency.
    Gateways(gateways::GatewaysArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(out.as_bytes()).is_err() {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let kubeconfig = match &cli.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)?,
        None => Kubeconfig::read()?,
    };
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &options).await?;
    let client = Client::try_from(config)?;
    let docs = match &cli.command {
        Command::Link(args) => link::run(args, client, &kubeconfig, cli.context.as_deref()).await?,
        Command::Unlink(args) => unlink::run(args, client).await?,
        Command::Gateways(args) => return Ok(gateways::run(args, client, cli.output).await?),
    };
    Ok(link::print(&docs, cli.output))
}
