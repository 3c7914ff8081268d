//! Finding iptables and running it.
//!
//! Only `iptables-save` (to see which jumps exist) and `iptables-restore --noflush` (to apply
//! the whole plan as one transaction) are run; never one `iptables` call per rule.

use std::{
    env,
    ffi::OsStr,
    fmt,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
};

use crate::{InitError, Options};

/// Which iptables front end to use: `--iptables-mode` (Linkerd's flag and values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesMode {
    /// `iptables-legacy-save` / `iptables-legacy-restore` (the kernel's x_tables).
    Legacy,
    /// `iptables-nft-save` / `iptables-nft-restore` (nf_tables underneath).
    Nft,
    /// `iptables-save` / `iptables-restore`: whichever of the two the image links them to.
    Plain,
}

impl IptablesMode {
    /// The order auto-detection tries. Legacy first because it is Linkerd's default mode, so a
    /// pod set up by either lands in the same backend; then nft for images that carry only
    /// that; then the plain names. The order is fixed, so a rerun picks what the first run
    /// picked: rules split over both backends would all apply (the kernel evaluates both), and
    /// the jump check would not see the other backend's jumps.
    const AUTO_ORDER: [Self; 3] = [Self::Legacy, Self::Nft, Self::Plain];

    fn programs(self) -> (&'static str, &'static str) {
        match self {
            Self::Legacy => ("iptables-legacy-save", "iptables-legacy-restore"),
            Self::Nft => ("iptables-nft-save", "iptables-nft-restore"),
            Self::Plain => ("iptables-save", "iptables-restore"),
        }
    }
}

/// The two programs used, as absolute paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub save: PathBuf,
    pub restore: PathBuf,
}

impl Backend {
    /// Picks the programs from `--iptables-mode` (auto-detected when absent) and the
    /// `--firewall-*-bin-path` overrides, and finds them with `lookup` (a `PATH` search).
    pub(crate) fn resolve(
        options: &Options,
        lookup: impl Fn(&OsStr) -> Option<PathBuf>,
    ) -> Result<Self, InitError> {
        let overrides = (
            options.firewall_save_bin_path.as_deref(),
            options.firewall_restore_bin_path.as_deref(),
        );
        let mode = match (options.iptables_mode, overrides) {
            (Some(mode), _) => mode,
            // Both given: nothing to detect (and nothing to fail on).
            (None, (Some(_), Some(_))) => IptablesMode::Plain,
            (None, _) => IptablesMode::AUTO_ORDER
                .into_iter()
                .find(|mode| {
                    let (save, restore) = mode.programs();
                    lookup(save.as_ref()).is_some() && lookup(restore.as_ref()).is_some()
                })
                .ok_or_else(|| InitError::NoIptables {
                    looked_for: IptablesMode::AUTO_ORDER
                        .iter()
                        .flat_map(|mode| <[&str; 2]>::from(mode.programs()))
                        .collect::<Vec<_>>()
                        .join(", "),
                })?,
        };
        let (save, restore) = mode.programs();
        let find = |chosen: Option<&Path>, default: &str| {
            let program = chosen.map_or(OsStr::new(default), Path::as_os_str);
            lookup(program).ok_or_else(|| InitError::IptablesNotFound {
                program: program.to_string_lossy().into_owned(),
            })
        };
        Ok(Self {
            save: find(overrides.0, save)?,
            restore: find(overrides.1, restore)?,
        })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} + {}", self.save.display(), self.restore.display())
    }
}

/// Finds a program as a shell would: a name with a `/` is taken as a path, any other is looked
/// up in `PATH`. Only executable regular files count.
pub(crate) fn find_program(program: &OsStr) -> Option<PathBuf> {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.as_encoded_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| executable(path))
}

/// Runs programs, inside `--netns` when given (`nsenter --net=<path> --`, as Linkerd's
/// proxy-init does). Programs are found before entering: nsenter changes only the network
/// namespace, so the paths stay valid.
#[derive(Debug)]
pub(crate) struct Runner {
    nsenter: Option<(PathBuf, PathBuf)>,
}

/// What a finished command left behind.
pub(crate) struct Ran {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Runner {
    pub fn new(netns: Option<&Path>) -> Result<Self, InitError> {
        let nsenter = match netns {
            None => None,
            Some(ns) => Some((
                find_program(OsStr::new("nsenter")).ok_or(InitError::NsenterNotFound)?,
                ns.to_path_buf(),
            )),
        };
        Ok(Self { nsenter })
    }

    fn command(&self, program: &Path, args: &[&str]) -> (Command, String) {
        let mut argv: Vec<String> = Vec::new();
        let mut cmd = match &self.nsenter {
            None => Command::new(program),
            Some((nsenter, ns)) => {
                let mut cmd = Command::new(nsenter);
                let net = format!("--net={}", ns.display());
                argv.extend([nsenter.display().to_string(), net.clone(), "--".into()]);
                cmd.args([net.as_str(), "--"]).arg(program);
                cmd
            }
        };
        argv.push(program.display().to_string());
        argv.extend(args.iter().map(ToString::to_string));
        cmd.args(args);
        (cmd, argv.join(" "))
    }

    /// Runs `program args`, feeding `stdin`, and waits for it. Only a failure to start it is an
    /// error here; its exit status is the caller's to judge.
    pub fn run(&self, program: &Path, args: &[&str], stdin: &str) -> Result<Ran, InitError> {
        let (mut cmd, command) = self.command(program, args);
        tracing::debug!(%command, "running");
        let spawn_error = |source| InitError::Spawn {
            command: command.clone(),
            source,
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        // A program that fails early (no permission) closes its stdin: the write then fails
        // with a broken pipe, and the exit status and stderr below say more than that does.
        let written = child
            .stdin
            .take()
            .map(|mut pipe| pipe.write_all(stdin.as_bytes()));
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().map_err(spawn_error)?;
        if let Some(Err(source)) = written
            && status.success()
        {
            return Err(spawn_error(source));
        }
        Ok(Ran {
            command,
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
        })
    }
}

/// Whether iptables (or nsenter) failed for lack of privilege. iptables says so in words:
/// "Permission denied (you must be root)" from both back ends, "can't open lock file
/// /run/xtables.lock: Permission denied" from legacy restore, and nsenter "Operation not
/// permitted". The exit code does not tell: iptables' 4 (RESOURCE_PROBLEM) also means "another
/// app is holding the xtables lock".
pub(crate) fn permission_denied(stderr: &str) -> bool {
    [
        "Permission denied",
        "Operation not permitted",
        "you must be root",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
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

    fn options(args: &[&str]) -> Options {
        Cli::parse_from(std::iter::once("init").chain(args.iter().copied())).options
    }

    /// A `PATH` holding `present`, under `/bin`.
    fn lookup(present: &'static [&'static str]) -> impl Fn(&OsStr) -> Option<PathBuf> {
        move |program| {
            let name = program.to_str()?;
            if name.contains('/') {
                return present.contains(&name).then(|| PathBuf::from(name));
            }
            present
                .contains(&name)
                .then(|| PathBuf::from(format!("/bin/{name}")))
        }
    }

    #[test]
    fn backend_resolution() {
        const ALL: &[&str] = &[
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-nft-save",
            "iptables-nft-restore",
            "iptables-save",
            "iptables-restore",
        ];
        const NFT_ONLY: &[&str] = &["iptables-nft-save", "iptables-nft-restore"];
        const PLAIN_ONLY: &[&str] = &["iptables-save", "iptables-restore"];
        // Half a legacy install does not count.
        const HALF_LEGACY: &[&str] = &["iptables-legacy-save", "iptables-save", "iptables-restore"];
        let ok = |save: &str, restore: &str| Ok((PathBuf::from(save), PathBuf::from(restore)));
        type Case = (
            &'static [&'static str],
            &'static [&'static str],
            Result<(PathBuf, PathBuf), String>,
        );
        let cases: Vec<Case> = vec![
            (&[], ALL, ok("/bin/iptables-legacy-save", "/bin/iptables-legacy-restore")),
            (&[], NFT_ONLY, ok("/bin/iptables-nft-save", "/bin/iptables-nft-restore")),
            (&[], PLAIN_ONLY, ok("/bin/iptables-save", "/bin/iptables-restore")),
            (&[], HALF_LEGACY, ok("/bin/iptables-save", "/bin/iptables-restore")),
            (&["--iptables-mode", "nft"], ALL, ok("/bin/iptables-nft-save", "/bin/iptables-nft-restore")),
            (&["--iptables-mode", "plain"], ALL, ok("/bin/iptables-save", "/bin/iptables-restore")),
            (
                &["--iptables-mode", "legacy"],
                NFT_ONLY,
                Err("iptables-legacy-save not found: install iptables (apt-get install iptables)".into()),
            ),
            (
                &[],
                &[],
                Err("no iptables found on PATH (looked for iptables-legacy-save, iptables-legacy-restore, \
                     iptables-nft-save, iptables-nft-restore, iptables-save, iptables-restore): \
                     install iptables (apt-get install iptables)"
                    .into()),
            ),
            (
                &["--firewall-save-bin-path", "/opt/save", "--firewall-restore-bin-path", "/opt/restore"],
                &["/opt/save", "/opt/restore"],
                ok("/opt/save", "/opt/restore"),
            ),
            (
                &["--firewall-save-bin-path", "/opt/save"],
                &["/opt/save", "iptables-nft-save", "iptables-nft-restore"],
                ok("/opt/save", "/bin/iptables-nft-restore"),
            ),
            (
                &["--firewall-save-bin-path", "/nonexistent/iptables-save", "--firewall-restore-bin-path", "/opt/restore"],
                &["/opt/restore"],
                Err("/nonexistent/iptables-save not found: install iptables (apt-get install iptables)".into()),
            ),
        ];
        for (args, present, want) in cases {
            let got = Backend::resolve(&options(args), lookup(present))
                .map(|b| (b.save, b.restore))
                .map_err(|e| e.to_string());
            assert_eq!(got, want, "{args:?} with {present:?}");
        }
    }

    #[test]
    fn permission_failures() {
        let cases = [
            (
                "iptables-save v1.8.9 (legacy): Cannot initialize: Permission denied (you must be root)",
                true,
            ),
            (
                "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)",
                true,
            ),
            (
                "Fatal: can't open lock file /run/xtables.lock: Permission denied",
                true,
            ),
            (
                "nsenter: reassociate to namespace 'ns/net' failed: Operation not permitted",
                true,
            ),
            (
                "Another app is currently holding the xtables lock. Perhaps you want to use the -w option?",
                false,
            ),
            (
                "iptables-restore v1.8.9 (legacy): Couldn't load target `REDIRECT':No such file or directory",
                false,
            ),
            ("", false),
        ];
        for (stderr, want) in cases {
            assert_eq!(permission_denied(stderr), want, "{stderr}");
        }
    }

    #[test]
    fn finds_programs() {
        assert_eq!(find_program(OsStr::new("/nonexistent/iptables")), None);
        assert_eq!(find_program(OsStr::new("meshlink-no-such-program")), None);
        // A directory is not a program.
        assert_eq!(find_program(OsStr::new("/")), None);
        // `sh` is on every PATH this runs on.
        let sh = find_program(OsStr::new("sh")).expect("sh on PATH");
        assert!(sh.is_absolute(), "{sh:?}");
        assert_eq!(find_program(sh.as_os_str()), Some(sh));
    }
}
