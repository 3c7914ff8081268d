//! One control-plane process: started with its output in a log file, stopped exactly, and
//! described by the tail of that log when it fails.

use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    future::Future,
    io::{Read, Seek, SeekFrom},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};

/// How often [`Process::wait_ready`] probes.
const POLL: Duration = Duration::from_millis(100);
/// How many lines of a component's log an error shows.
const LOG_TAIL_LINES: usize = 25;

/// A child process of the harness.
#[derive(Debug)]
pub(crate) struct Process {
    name: &'static str,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    pid_file: PathBuf,
    child: Option<Child>,
    detached: bool,
    env: Vec<(String, String)>,
}

impl Process {
    pub(crate) fn new(
        name: &'static str,
        program: PathBuf,
        args: Vec<OsString>,
        dir: &Path,
    ) -> Self {
        Self {
            name,
            program,
            args,
            log: dir.join(format!("{name}.log")),
            pid_file: dir.join(format!("{name}.pid")),
            child: None,
            detached: false,
            env: Vec::new(),
        }
    }

    /// Extra environment variables for the process.
    pub(crate) fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// Starts the process (again, after [`Self::kill`] or [`Self::terminate`]) with the same
    /// arguments. Output is appended to its log, so a restart keeps the earlier lines.
    pub(crate) fn start(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for `e2e up` or for a test run reaches the
            // harness, which then stops exactly its children, rather than the children directly.
            .process_group(0)
            .spawn()?;
        std::fs::write(&self.pid_file, child.id().to_string())?;
        self.child = Some(child);
        Ok(())
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` when the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten()
    }

    /// Stops the process at once (SIGKILL) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// Asks the process to stop (SIGTERM), waits up to `grace`, then kills it.
    pub(crate) fn terminate(&mut self, grace: Duration) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGTERM);
            }
            let deadline = std::time::Instant::now() + grace;
            while std::time::Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// Leaves the process running when this handle is dropped (for `e2e up`).
    pub(crate) fn detach(&mut self) {
        self.detached = true;
    }

    /// The last lines of the process's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// Polls `probe` every [`POLL`] until it says the process is ready (`Some`), for at most
    /// `timeout`. A process that exits meanwhile ends the wait at once, with its log; one that
    /// never gets ready is an error naming `what` it waited for.
    pub(crate) async fn wait_ready<F, Fut>(
        &mut self,
        cluster: &str,
        what: &'static str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<(), crate::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<()>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if probe().await.is_some() {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                let err = crate::Error::Exited {
                    cluster: cluster.to_owned(),
                    component: self.name,
                    status: status.to_string(),
                    log: self.log.clone(),
                    tail: self.log_tail(),
                };
                self.kill();
                return Err(err);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(crate::Error::NotReady {
                    cluster: cluster.to_owned(),
                    component: self.name,
                    what,
                    secs: timeout.as_secs(),
                    log: self.log.clone(),
                    tail: self.log_tail(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.detached {
            self.kill();
        }
    }
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
