//! Meshing a pod: adds `meshlink-proxy` and its init container to a pod spec, as Linkerd's
//! proxy injector does (`pkg/inject` and `charts/partials` in linkerd2), so that
//! `meshlink inject` (on manifests) and the injector webhook (on Pods) share one function,
//! [`inject_pod_spec`]. Pure: no I/O, no clock, no cluster.
//!
//! What a pod gets: the `linkerd-proxy` container first, with the `LINKERD2_PROXY_*`
//! environment meshlink-proxy reads, ports 4143 and 4191, probes on 4191 and a non-root user;
//! the `linkerd-init` init container running `meshlink-proxy init` with proxy-init's flags; a
//! projected ServiceAccount token for the identity service; the labels and annotations that
//! the destination service and Linkerd's tools read.

mod config;
mod document;
mod flags;
pub mod keys;
mod overrides;
mod pod;

pub use crate::{
    config::{
        ADMIN_PORT, CONTROL_PORT, INBOUND_PORT, InjectConfig, OUTBOUND_PORT, PROXY_UID,
        ProxyResources, VERSION,
    },
    document::{
        DocumentError, DocumentErrorReason, Format, Injected, ObjectOutcome, ObjectReport,
        inject_document, inject_manifests,
    },
    flags::ConfigArgs,
    overrides::{INBOUND_POLICIES, quantity},
    pod::{
        IDENTITY_TOKEN_AUDIENCE, INIT_CONTAINER_NAME, Origin, Outcome, PROXY_CONTAINER_NAME,
        PodContext, SkipReason, inject_pod_spec, why_not,
    },
};

/// Where an annotation was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnotationSource {
    /// The pod template (or the Pod).
    Workload,
    /// The pod's namespace.
    Namespace,
}

impl std::fmt::Display for AnnotationSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Workload => "the pod template",
            Self::Namespace => "the namespace",
        })
    }
}

/// Why a pod could not be injected. Nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {annotation}={value:?} on {at} is invalid: {reason}")]
    InvalidOverride {
        annotation: &'static str,
        value: String,
        at: AnnotationSource,
        reason: String,
    },
    #[error("the pod already has a {what} named {name:?}, which the injector adds")]
    NameTaken { what: &'static str, name: String },
    #[error("injector configuration {field}: {reason}")]
    Config { field: &'static str, reason: String },
}

impl InjectError {
    /// A fixed name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::InvalidOverride { .. } => "invalid_override",
            Self::NameTaken { .. } => "name_taken",
            Self::Config { .. } => "config",
        }
    }
}
