//! Where clusters keep their files, and the clean-up of what a crashed run left behind.
//!
//! Every cluster lives in its own directory, which records its owner (the harness process, by
//! pid and start time) and each component's pid. A test that panics is cleaned up by `Drop`; a
//! run that was killed outright (SIGKILL, a CI time-out) cannot clean up after itself, so each new
//! cluster first sweeps directories whose owner is gone: it kills the processes they record (only
//! when their command line still names that directory, so a reused pid is never hit) and removes
//! the directory. Nothing of an earlier run is ever reused: ports are fresh, files are fresh.

use std::{
    io,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use nix::{sys::signal, unistd::Pid};

const OWNER_FILE: &str = "owner";
/// What `owner` says for clusters started by `e2e up`, which outlive the process that made them
/// and are stopped by `e2e down`.
const DETACHED: &str = "detached";

/// The default root of cluster directories: `$MESHLINK_E2E_DIR`, or `meshlink-e2e` in the
/// system's temporary directory.
pub fn default_root() -> PathBuf {
    std::env::var_os("MESHLINK_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("meshlink-e2e"))
}

/// A cluster's directory; removed on drop unless detached.
#[derive(Debug)]
pub(crate) struct StateDir {
    path: PathBuf,
    detached: bool,
}

impl StateDir {
    /// A new, empty directory `<root>/<name>-<pid>-<nanos>` owned by this process.
    pub(crate) fn create(root: &Path, name: &str) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = root.join(format!("{name}-{}-{nanos}", std::process::id()));
        Self::create_at(path)
    }

    /// A fresh directory at exactly `path` (for `e2e up`, whose clusters have stable paths).
    /// Whatever an earlier, stopped run left there is removed first.
    pub(crate) fn create_at(path: PathBuf) -> io::Result<Self> {
        if path.exists() {
            kill_recorded(&path);
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        std::fs::write(
            path.join(OWNER_FILE),
            owner_id(std::process::id()).unwrap_or_default(),
        )?;
        Ok(Self {
            path,
            detached: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory, and marks it as owned by no process.
    pub(crate) fn detach(&mut self) -> io::Result<()> {
        self.detached = true;
        std::fs::write(self.path.join(OWNER_FILE), DETACHED)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.detached {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Cleans up after runs that died without cleaning up: see the module docs. Returns the
/// directories it removed. Directories of live owners and of `e2e up` are left alone.
pub fn sweep_stale(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if owner == DETACHED || owner_alive(&owner) {
            continue;
        }
        kill_recorded(&dir);
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

/// Stops the processes of a cluster directory (`e2e down`, or a stale one) and removes it.
pub fn remove(dir: &Path) -> io::Result<usize> {
    let killed = kill_recorded(dir);
    std::fs::remove_dir_all(dir)?;
    Ok(killed)
}

/// Whether any process recorded in `dir` still runs.
pub fn any_running(dir: &Path) -> bool {
    recorded_pids(dir).into_iter().any(|pid| runs_in(pid, dir))
}

/// Kills the processes recorded in `dir` whose command line names `dir`; returns how many.
fn kill_recorded(dir: &Path) -> usize {
    let mut killed = 0;
    for pid in recorded_pids(dir) {
        if runs_in(pid, dir) && signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    killed
}

fn recorded_pids(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Whether process `pid` is running with `dir` on its command line.
fn runs_in(pid: i32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// `<pid> <start time in clock ticks since boot>`: a pid alone could be reused.
fn owner_id(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after it do not.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); the start time is field 22.
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn owner_alive(owner: &str) -> bool {
    let Some(pid) = owner.split_whitespace().next().and_then(|p| p.parse().ok()) else {
        return false;
    };
    owner_id(pid).as_deref() == Some(owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_of_this_process_is_alive() {
        let me = owner_id(std::process::id()).unwrap();
        assert!(owner_alive(&me));
        // Same pid, different start time: a reused pid is not the owner.
        let pid = std::process::id();
        assert!(!owner_alive(&format!("{pid} 1")));
        assert!(!owner_alive("garbage"));
    }

    fn wait_for_cmdline(pid: u32, dir: &Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !runs_in(i32::try_from(pid).unwrap(), dir) {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never showed its command line"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn sweep_removes_dead_owners_and_their_processes_only() {
        let root = tempfile::tempdir().unwrap();
        // A directory whose owner is dead, with a live process that names the directory.
        let stale = root.path().join("east-1-1");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join(OWNER_FILE), "999999999 1").unwrap();
        std::fs::write(stale.join("marker"), "").unwrap();
        // `tail -f` runs until killed, with the directory on its command line.
        let mut child = std::process::Command::new("tail")
            .args(["-f", "/dev/null"])
            .arg(stale.join("marker"))
            .spawn()
            .unwrap();
        std::fs::write(stale.join("etcd.pid"), child.id().to_string()).unwrap();
        // Right after spawn the kernel may not show the new command line yet (the exec is still
        // setting it up); a real leftover is long past that point.
        wait_for_cmdline(child.id(), &stale);
        // A process recorded in the stale directory that does not name it: never killed.
        let mut bystander = std::process::Command::new("tail")
            .args(["-f", "/dev/null"])
            .spawn()
            .unwrap();
        std::fs::write(stale.join("other.pid"), bystander.id().to_string()).unwrap();

        // A live directory (this process) and a detached one: both left alone.
        let live = StateDir::create(root.path(), "west").unwrap();
        let detached = root.path().join("up-east");
        std::fs::create_dir_all(&detached).unwrap();
        std::fs::write(detached.join(OWNER_FILE), DETACHED).unwrap();

        let removed = sweep_stale(root.path());
        assert_eq!(removed, vec![stale.clone()]);
        assert!(!stale.exists());
        assert!(live.path().exists());
        assert!(detached.exists());
        let status = child.wait().unwrap();
        assert!(!status.success(), "the stale process was killed");
        assert_eq!(
            bystander.try_wait().unwrap(),
            None,
            "the bystander still runs"
        );
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }
}
