//! The upstream control-plane binaries: built from the pinned Go module graph in
//! `e2e/controlplane/` by its `build.sh`, cached outside the repository.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use crate::Error;

/// Where the control-plane binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Finds the binaries, building them first if this machine has none yet.
    ///
    /// `$MESHLINK_KUBE_BIN_DIR` names a directory to use as it is; otherwise
    /// `e2e/controlplane/build.sh` builds what is missing (seconds when nothing is) and says
    /// where. The answer is computed once per process.
    pub fn locate() -> Result<&'static Binaries, Error> {
        static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
        BINARIES
            .get_or_init(|| Self::find().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Binaries(e.clone()))
    }

    fn find() -> Result<Self, Error> {
        if let Some(dir) = std::env::var_os("MESHLINK_KUBE_BIN_DIR") {
            return Self::checked(PathBuf::from(dir));
        }
        Self::checked(build("controlplane/build.sh")?)
    }

    fn checked(dir: PathBuf) -> Result<Self, Error> {
        let this = Self { dir };
        for bin in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kubectl",
        ] {
            let path = this.dir.join(bin);
            if !path.is_file() {
                return Err(Error::Binaries(format!(
                    "{} is missing: run `make kube-binaries` (or e2e/controlplane/build.sh), or \
                     point MESHLINK_KUBE_BIN_DIR at a directory holding etcd, kube-apiserver, \
                     kube-controller-manager and kubectl",
                    path.display()
                )));
            }
        }
        Ok(this)
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `kubectl`, for people and for tests that check what a person would see.
    pub fn kubectl(&self) -> PathBuf {
        self.path("kubectl")
    }
}

/// Runs `e2e/<script>` (a `build.sh` that builds what is missing and prints the directory it
/// built into on its last line) and returns that directory.
pub(crate) fn build(script: &str) -> Result<PathBuf, Error> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| Error::Binaries(format!("could not run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Binaries(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or_default().trim();
    Ok(PathBuf::from(dir))
}
