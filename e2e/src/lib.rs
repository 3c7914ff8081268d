//! Real Kubernetes control planes on loopback for meshlink's end-to-end tests.
//!
//! Each [`Cluster`] is an etcd, a kube-apiserver and a kube-controller-manager of a pinned,
//! current Kubernetes release, built from Go modules (see `controlplane/`), running as child
//! processes with their own PKI. No kubelet runs: tests make Pods Ready themselves
//! ([`create_ready_pod`]) to get real Endpoints and EndpointSlices, and run meshlink's programs as
//! local processes.
//!
//! ```no_run
//! # async fn f() -> Result<(), e2e::Error> {
//! let clusters = e2e::Cluster::start_many(&["east", "west"]).await?;
//! let east = clusters[0].client();
//! # Ok(()) }
//! ```

pub mod app;
mod binaries;
pub mod checks;
mod cluster;
pub mod coredns;
pub mod destination;
pub mod dns;
pub mod install;
pub mod kubelet;
pub mod measure;
pub mod mesh;
pub mod meshlink;
pub mod netns;
mod objects;
mod pki;
pub mod pod;
mod process;
pub mod state;

use std::path::PathBuf;

pub use self::binaries::Binaries;
pub use self::cluster::{Cluster, ClusterOptions, Component, SERVICE_ACCOUNT_ISSUER};
pub use self::objects::{
    apply_yaml, create_namespace, create_ready_pod, create_ready_pod_in, install_link_crd, wait_for,
};

/// What can go wrong starting or using a test cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control-plane binaries are missing and could not be built.
    #[error("control-plane binaries: {0}")]
    Binaries(String),
    /// A component could not be started at all.
    #[error("cluster {cluster}: could not start {component}: {source}")]
    Spawn {
        cluster: String,
        component: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A component exited while the harness waited for it.
    #[error(
        "cluster {cluster}: {component} exited during start-up ({status}); last lines of {}:\n{tail}",
        log.display()
    )]
    Exited {
        cluster: String,
        component: &'static str,
        status: String,
        log: PathBuf,
        tail: String,
    },
    /// A component kept running but never became ready.
    #[error(
        "cluster {cluster}: {component} was not ready after {secs}s (waited for {what}); last lines of {}:\n{tail}",
        log.display()
    )]
    NotReady {
        cluster: String,
        component: &'static str,
        what: &'static str,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    /// The cluster's files could not be written.
    #[error("cluster {cluster}: {source}")]
    Io {
        cluster: String,
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be made.
    #[error("making certificates: {0}")]
    Pki(#[from] rcgen::Error),
    /// The generated kubeconfig was refused by kube's loader.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// An API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A YAML document could not be read.
    #[error("YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    /// An object given to the harness is not what it should be.
    #[error("{0}")]
    Invalid(String),
    /// Something a test waited for did not happen in time.
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout { what: String, secs: u64 },
}

impl Error {
    /// Whether start-up failed because another process took one of the chosen ports.
    pub(crate) fn is_port_clash(&self) -> bool {
        matches!(self, Self::Exited { tail, .. } if tail.contains("address already in use"))
    }
}
