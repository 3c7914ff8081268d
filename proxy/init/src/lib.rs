//! The pod network set-up of Linkerd's proxy-init (`linkerd/linkerd2-proxy-init`): nat rules
//! that send a pod's TCP through its proxy, so that the proxy's listeners can read each
//! connection's original destination with `SO_ORIGINAL_DST`.
//!
//! * Inbound: PREROUTING jumps to `PROXY_INIT_REDIRECT`, which returns for the ignored inbound
//!   ports (always 4190 and 4191, the proxy's own) and redirects all other TCP to the incoming
//!   proxy port (4143).
//! * Outbound: OUTPUT jumps to `PROXY_INIT_OUTPUT`, which returns for the proxy's uid (2102),
//!   for traffic leaving through `lo`, for the ignored outbound ports and subnets, and
//!   redirects all other TCP to the outgoing proxy port (4140).
//!
//! [`plan`] decides the rules from the [`Options`] alone; [`run`] reads `iptables-save -t nat`
//! to see which of the two jumps already exist and applies everything with one
//! `iptables-restore --noflush` transaction, so a second run changes nothing. The sidecar binary
//! calls it as its `init` subcommand (the [`Options`] are its flags).

mod cidr;
mod iptables;
mod ports;
mod rules;

use std::{fmt, io, path::PathBuf, process::ExitStatus};

pub use crate::{
    cidr::{CidrError, Ipv4Cidr},
    iptables::{Backend, IptablesMode},
    ports::{MULTIPORT_LIMIT, PortRange, PortRangeError},
    rules::{ALWAYS_IGNORED_INBOUND_PORTS, Jump, OUTPUT_CHAIN, Plan, REDIRECT_CHAIN, Rule, plan},
};

/// The flags of the `init` subcommand, named as Linkerd's proxy-init names them.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Port of the proxy's inbound listener: incoming TCP is redirected to it.
    #[arg(long, value_name = "PORT", default_value_t = 4143)]
    pub incoming_proxy_port: u16,

    /// Port of the proxy's outbound listener: the pod's outgoing TCP is redirected to it.
    #[arg(long, value_name = "PORT", default_value_t = 4140)]
    pub outgoing_proxy_port: u16,

    /// User id the proxy runs as; its own connections are never redirected.
    #[arg(long, value_name = "UID", default_value_t = 2102)]
    pub proxy_uid: u32,

    /// Inbound ports and ranges (`25,8000-8080`) that bypass the proxy. 4190 and 4191, the
    /// proxy's control and admin ports, are always skipped.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub inbound_ports_to_ignore: Vec<PortRange>,

    /// Outbound ports and ranges (`25,8000-8080`) that bypass the proxy.
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    pub outbound_ports_to_ignore: Vec<PortRange>,

    /// IPv4 subnets (`10.0.0.0/8,192.168.1.0/24`) the pod reaches directly, bypassing the proxy.
    #[arg(long, value_name = "CIDRS", value_delimiter = ',')]
    pub subnets_to_ignore: Vec<Ipv4Cidr>,

    /// iptables front end. Without it, the first installed of legacy, nft and plain is used.
    #[arg(long, value_enum)]
    pub iptables_mode: Option<IptablesMode>,

    /// Change nothing: run no command and log the rules a fresh pod would get (`--simulate` is
    /// Linkerd's name). The caller prints the returned [`Report`].
    #[arg(long, alias = "simulate")]
    pub dry_run: bool,

    /// Network namespace to configure (a path such as `/run/netns/<name>`), entered with
    /// `nsenter`; by default the caller's own.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,

    /// The `iptables-save` to use, instead of the one `--iptables-mode` names.
    #[arg(long, value_name = "PATH")]
    pub firewall_save_bin_path: Option<PathBuf>,

    /// The `iptables-restore` to use, instead of the one `--iptables-mode` names.
    #[arg(long, value_name = "PATH")]
    pub firewall_restore_bin_path: Option<PathBuf>,
}

impl Default for Options {
    /// The flags' defaults (a test checks that they agree with clap's).
    fn default() -> Self {
        Self {
            incoming_proxy_port: 4143,
            outgoing_proxy_port: 4140,
            proxy_uid: 2102,
            inbound_ports_to_ignore: Vec::new(),
            outbound_ports_to_ignore: Vec::new(),
            subnets_to_ignore: Vec::new(),
            iptables_mode: None,
            dry_run: false,
            netns: None,
            firewall_save_bin_path: None,
            firewall_restore_bin_path: None,
        }
    }
}

/// Why [`run`] failed. Every message names the command and carries what it printed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "no iptables found on PATH (looked for {looked_for}): install iptables (apt-get install iptables)"
    )]
    NoIptables { looked_for: String },

    #[error("{program} not found: install iptables (apt-get install iptables)")]
    IptablesNotFound { program: String },

    #[error(
        "nsenter not found (--netns needs it): install util-linux (apt-get install util-linux)"
    )]
    NsenterNotFound,

    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "`{command}` was refused: changing iptables needs root or the NET_ADMIN capability \
         (add NET_ADMIN to the container's securityContext): {stderr}"
    )]
    PermissionDenied { command: String, stderr: String },

    #[error("reading the nat table with `{command}` failed ({status}): {stderr}")]
    Save {
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    #[error("applying the rules with `{command}` failed ({status}): {stderr}")]
    Restore {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
}

impl InitError {
    /// A fixed name for the variant, for a metric label or a log field.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoIptables { .. } => "no_iptables",
            Self::IptablesNotFound { .. } => "iptables_not_found",
            Self::NsenterNotFound => "nsenter_not_found",
            Self::Spawn { .. } => "spawn",
            Self::PermissionDenied { .. } => "permission_denied",
            Self::Save { .. } => "save",
            Self::Restore { .. } => "restore",
        }
    }
}

/// What [`run`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The programs used; `None` in a dry run, which runs nothing.
    pub backend: Option<Backend>,
    /// The jumps the transaction added: both on a fresh pod (and in a dry run), none on a rerun.
    pub jumps_added: Vec<Jump>,
    /// The `iptables-restore --noflush` input: what was applied, or in a dry run what would be.
    pub script: String,
    pub dry_run: bool,
}

impl fmt::Display for Report {
    /// The rules, as `iptables-restore` reads them: what `--dry-run` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.script)
    }
}

/// Installs the [`plan`] for `options`, or with `--dry-run` only works it out. Blocking: it runs
/// `iptables-save` and `iptables-restore` as child processes and waits for them.
pub fn run(options: &Options) -> Result<Report, InitError> {
    let plan = plan(options);
    if options.dry_run {
        let script = plan.restore_script(&plan.jumps);
        tracing::info!(rules = %script, "dry run: no iptables command is run");
        return Ok(Report {
            backend: None,
            jumps_added: plan.jumps,
            script,
            dry_run: true,
        });
    }

    let backend = Backend::resolve(options, iptables::find_program)?;
    let runner = iptables::Runner::new(options.netns.as_deref())?;
    tracing::debug!(%backend, netns = ?options.netns, "iptables found");

    let save = runner.run(&backend.save, &["-t", "nat"], "")?;
    if !save.status.success() {
        return Err(failure(save, |command, status, stderr| InitError::Save {
            command,
            status,
            stderr,
        }));
    }
    let jumps_added = plan.missing_jumps(&save.stdout);
    let script = plan.restore_script(&jumps_added);

    let restore = runner.run(&backend.restore, &["--noflush"], &script)?;
    if !restore.status.success() {
        return Err(failure(restore, |command, status, stderr| {
            InitError::Restore {
                command,
                status,
                stderr,
            }
        }));
    }
    tracing::info!(
        %backend,
        jumps_added = jumps_added.len(),
        rules = plan.inbound.len() + plan.outbound.len(),
        "iptables nat rules installed"
    );
    Ok(Report {
        backend: Some(backend),
        jumps_added,
        script,
        dry_run: false,
    })
}

/// A failed command's error: lack of privilege gets its own, the rest `otherwise`.
fn failure(
    ran: iptables::Ran,
    otherwise: impl FnOnce(String, ExitStatus, String) -> InitError,
) -> InitError {
    if iptables::permission_denied(&ran.stderr) {
        InitError::PermissionDenied {
            command: ran.command,
            stderr: ran.stderr,
        }
    } else {
        otherwise(ran.command, ran.status, ran.stderr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
            .map(|cli| cli.options)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn default_matches_the_flags() {
        assert_eq!(parse(&[]).unwrap(), Options::default());
    }

    #[test]
    fn flags() {
        let got = parse(&[
            "--incoming-proxy-port=5143",
            "--outgoing-proxy-port",
            "5140",
            "--proxy-uid=0",
            "--inbound-ports-to-ignore=25,8000-8080",
            "--inbound-ports-to-ignore=9000",
            "--outbound-ports-to-ignore=443",
            "--subnets-to-ignore=10.0.0.0/8,192.168.1.0/24",
            "--iptables-mode=nft",
            "--simulate",
            "--netns=/run/netns/pod",
        ])
        .unwrap();
        let want = Options {
            incoming_proxy_port: 5143,
            outgoing_proxy_port: 5140,
            proxy_uid: 0,
            inbound_ports_to_ignore: vec![
                PortRange::single(25),
                PortRange {
                    first: 8000,
                    last: 8080,
                },
                PortRange::single(9000),
            ],
            outbound_ports_to_ignore: vec![PortRange::single(443)],
            subnets_to_ignore: vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.1.0/24".parse().unwrap(),
            ],
            iptables_mode: Some(IptablesMode::Nft),
            dry_run: true,
            netns: Some("/run/netns/pod".into()),
            ..Options::default()
        };
        assert_eq!(got, want);
    }

    #[test]
    fn bad_flags_are_refused_before_anything_runs() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--inbound-ports-to-ignore=25,http"],
                "\"http\" is not a port",
            ),
            (
                &["--outbound-ports-to-ignore=27-25"],
                "last port is below its first",
            ),
            (&["--subnets-to-ignore=10.0.0.0/33"], "not an IPv4 CIDR"),
            (&["--incoming-proxy-port=70000"], "70000"),
            (&["--iptables-mode=ebtables"], "ebtables"),
        ];
        for (args, want) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn dry_run_runs_nothing() {
        // Binaries that do not exist: a dry run must not look for them.
        let options = Options {
            dry_run: true,
            firewall_save_bin_path: Some("/nonexistent/iptables-save".into()),
            firewall_restore_bin_path: Some("/nonexistent/iptables-restore".into()),
            netns: Some("/nonexistent/netns".into()),
            ..Options::default()
        };
        let report = run(&options).unwrap();
        let plan = plan(&options);
        assert_eq!(report.backend, None);
        assert_eq!(report.jumps_added, plan.jumps);
        assert_eq!(report.to_string(), plan.restore_script(&plan.jumps));
    }

    #[test]
    fn labels_are_distinct() {
        let status = ExitStatus::default();
        let errors = [
            InitError::NoIptables {
                looked_for: String::new(),
            },
            InitError::IptablesNotFound {
                program: String::new(),
            },
            InitError::NsenterNotFound,
            InitError::Spawn {
                command: String::new(),
                source: io::Error::other("x"),
            },
            InitError::PermissionDenied {
                command: String::new(),
                stderr: String::new(),
            },
            InitError::Save {
                command: String::new(),
                status,
                stderr: String::new(),
            },
            InitError::Restore {
                command: String::new(),
                status,
                stderr: String::new(),
            },
        ];
        let mut labels: Vec<&str> = errors.iter().map(InitError::label).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), errors.len());
    }
}
