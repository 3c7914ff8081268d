//! `meshlink`: the command-line tool. `link` prints what links a cluster to the one it runs
//! against; `unlink` prints what removes such a link; `gateways` shows linked gateways;
//! `identity` makes the trust anchor and issuers; `inject` adds the proxy to manifests;
//! `install` and `uninstall` print what installs meshlink in a cluster and what removes it.

mod check;
mod gateways;
mod identity;
mod inject;
mod install;
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
    /// For reports (`check`, `gateways`; the default there); documents print as YAML.
    Table,
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
    /// Make the trust anchor and per-cluster issuers (no cluster needed), and print them as
    /// manifests.
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Add meshlink-proxy and its init container to the workloads in manifests (no cluster
    /// needed) and print them; nothing is printed unless every document can be injected.
    Inject(Box<inject::InjectArgs>),
    /// Print every manifest one cluster runs (namespaces, the Link CRD, identity, destination,
    /// proxy injector, gateway, mirror controller, remote access), for `kubectl apply
    /// --server-side -f -`.
    Install(Box<install::InstallArgs>),
    /// Run against a cluster; prints what removes meshlink from it, for `kubectl delete -f -`
    /// (refused while any Link exists).
    Uninstall(install::UninstallArgs),
    /// Run against any cluster; checks its identity, control plane, Links, controllers,
    /// gateways and mirrors (`-o table` or `-o json`), exit code 1 when one fails.
    Check(check::CheckArgs),
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
    proxy_identity::tls::install_default_provider();
    let docs = match &cli.command {
        Command::Link(args) => {
            let (client, kubeconfig) = connect(&cli).await?;
            link::run(args, client, &kubeconfig, cli.context.as_deref()).await?
        }
        Command::Unlink(args) => unlink::run(args, connect(&cli).await?.0).await?,
        Command::Gateways(args) => {
            return Ok(gateways::run(args, connect(&cli).await?.0, cli.output).await?);
        }
        Command::Identity(command) => {
            let (message, docs) = identity::run(command)?;
            if docs.is_empty() {
                return Ok(message);
            }
            docs
        }
        // Its notes go to stderr; stdout gets the manifests exactly as injected.
        Command::Inject(args) => return inject::run(args, &mut std::io::stderr().lock()),
        Command::Install(args) => install::run(args, &mut std::io::stderr().lock())?,
        Command::Uninstall(args) => install::uninstall(args, connect(&cli).await?.0).await?,
        Command::Check(args) => return check::run(args, connect(&cli).await?.0, cli.output).await,
    };
    Ok(link::print(&docs, cli.output))
}

/// A client for the cluster the kubeconfig (and context) names.
async fn connect(cli: &Cli) -> anyhow::Result<(Client, Kubeconfig)> {
    let kubeconfig = match &cli.kubeconfig {
        Some(path) => Kubeconfig::read_from(path)?,
        None => Kubeconfig::read()?,
    };
    let options = KubeConfigOptions {
        context: cli.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &options).await?;
    Ok((Client::try_from(config)?, kubeconfig))
}
