//! The labels and annotations the injector reads and writes: Linkerd's names
//! (`pkg/k8s/labels.go` in linkerd2), so Linkerd's tooling and the destination service read
//! injected pods the same way.

/// `enabled`, `disabled` or `ingress`; on a pod template or its namespace.
pub const INJECT_ANNOTATION: &str = "linkerd.io/inject";
pub const INJECT_ENABLED: &str = "enabled";
pub const INJECT_DISABLED: &str = "disabled";
/// Linkerd's third value: injected, with the proxy in ingress mode. meshlink-proxy has no
/// ingress mode, so it is injected as `enabled` is.
pub const INJECT_INGRESS: &str = "ingress";

/// The keys other components read from what the injector writes: the control plane's namespace
/// label, opaque ports and the default inbound policy. Their home is `link_crd::keys`.
pub use link_crd::keys::{
    CONTROL_PLANE_NS_LABEL, DEFAULT_INBOUND_POLICY_ANNOTATION, OPAQUE_PORTS_ANNOTATION,
};
/// The workload's namespace.
pub const WORKLOAD_NS_LABEL: &str = "linkerd.io/workload-ns";
/// The proxy's version, as Linkerd's injector records it.
pub const PROXY_VERSION_ANNOTATION: &str = "linkerd.io/proxy-version";
/// How the proxy gets its identity: `default` is the identity service with a ServiceAccount
/// token (Linkerd's only mode besides SPIRE, which meshlink does not have).
pub const IDENTITY_MODE_ANNOTATION: &str = "linkerd.io/identity-mode";
pub const IDENTITY_MODE_DEFAULT: &str = "default";

/// The label naming the workload a pod template belongs to, per kind (Linkerd's
/// `linkerd.io/proxy-deployment` and siblings); `None` for kinds Linkerd gives none.
pub fn owner_label(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "linkerd.io/proxy-deployment",
        "ReplicationController" => "linkerd.io/proxy-replicationcontroller",
        "ReplicaSet" => "linkerd.io/proxy-replicaset",
        "Job" => "linkerd.io/proxy-job",
        "DaemonSet" => "linkerd.io/proxy-daemonset",
        "StatefulSet" => "linkerd.io/proxy-statefulset",
        "CronJob" => "linkerd.io/proxy-cronjob",
        _ => return None,
    })
}

/// Inbound ports (and ranges) the init container's rules leave alone.
pub const SKIP_INBOUND_PORTS_ANNOTATION: &str = "config.linkerd.io/skip-inbound-ports";
/// Outbound ports (and ranges) the init container's rules leave alone.
pub const SKIP_OUTBOUND_PORTS_ANNOTATION: &str = "config.linkerd.io/skip-outbound-ports";
pub const PROXY_CPU_REQUEST_ANNOTATION: &str = "config.linkerd.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT_ANNOTATION: &str = "config.linkerd.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST_ANNOTATION: &str = "config.linkerd.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT_ANNOTATION: &str = "config.linkerd.io/proxy-memory-limit";
pub const PROXY_LOG_LEVEL_ANNOTATION: &str = "config.linkerd.io/proxy-log-level";
pub const PROXY_UID_ANNOTATION: &str = "config.linkerd.io/proxy-uid";

/// Every `config.linkerd.io/*` key the injector honours. A namespace's value applies to a
/// template that has none, and is copied onto it, so the destination service (which reads
/// pods, not namespaces) sees what the proxy was given.
pub const OVERRIDE_ANNOTATIONS: [&str; 10] = [
    SKIP_INBOUND_PORTS_ANNOTATION,
    SKIP_OUTBOUND_PORTS_ANNOTATION,
    OPAQUE_PORTS_ANNOTATION,
    DEFAULT_INBOUND_POLICY_ANNOTATION,
    PROXY_CPU_REQUEST_ANNOTATION,
    PROXY_CPU_LIMIT_ANNOTATION,
    PROXY_MEMORY_REQUEST_ANNOTATION,
    PROXY_MEMORY_LIMIT_ANNOTATION,
    PROXY_LOG_LEVEL_ANNOTATION,
    PROXY_UID_ANNOTATION,
];
