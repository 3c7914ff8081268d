//! The `Link` resource (`links.multicluster.linkerd.io`), the label and annotation keys meshlink
//! shares with Linkerd's multicluster extension, and the rules that name mirrored objects.
//!
//! Types and pure functions only: nothing here talks to an API server.

pub mod keys;
mod link;
pub mod naming;
mod versions;

pub use self::link::{
    CONDITION_ACCEPTED, CONDITION_GATEWAY_ALIVE, CONDITION_MIRRORED, CONDITION_READY,
    CONDITION_REMOTE_REACHABLE, ConditionStatus, DEFAULT_PROBE_FAILURE_THRESHOLD,
    DEFAULT_PROBE_TIMEOUT, GROUP, GatewayStatus, LabelSelector, LabelSelectorRequirement, Link,
    LinkCondition, LinkSpec, LinkStatus, ObjectRef, ProbeSpec, STORAGE_VERSION, SelectorParseError,
    ServiceStatus, ServiceSummary, default_federated_service_selector,
    default_remote_discovery_selector, default_selector, operator, rules,
};
pub use self::naming::NameError;
pub use self::versions::{LinkVersion, api_resource, crd, crd_yaml};
