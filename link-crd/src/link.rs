//! The `Link` resource, `links.multicluster.linkerd.io`.
//!
//! The Rust types are those of the storage version, `v1alpha3`, which every part of meshlink uses
//! (as every part of Linkerd does). `v1alpha1` and `v1alpha2` are still served, with no conversion
//! webhook: all versions share field names and differ only in which fields their schemas keep, so
//! their schemas are derived from this one by [`crate::crd`] instead of being written out again.
//!
//! Field for field the spec is Linkerd's: every scalar is a string (ports and thresholds too) and
//! empty strings are omitted, so a Link written by `linkerd multicluster link-gen` deserialises,
//! applies and round-trips unchanged. What meshlink adds costs such a Link nothing: printer
//! columns, a Link-level `status.conditions`, and CEL rules that refuse at admission what
//! Linkerd accepts and only fails on later (see [`rules`]).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::keys;

/// API group of the Link resource.
pub const GROUP: &str = "multicluster.linkerd.io";
/// Storage version; the version of the Rust types.
pub const STORAGE_VERSION: &str = "v1alpha3";

/// Default `probeSpec.failureThreshold` (Linkerd's CRD default).
pub const DEFAULT_PROBE_FAILURE_THRESHOLD: &str = "3";
/// Default `probeSpec.timeout` (Linkerd's CRD default).
pub const DEFAULT_PROBE_TIMEOUT: &str = "30s";

/// Link-level condition type: the remote API server is reachable with the Link's credentials.
pub const CONDITION_REMOTE_REACHABLE: &str = "RemoteReachable";
/// Link-level condition type: the remote gateway answers its probe.
pub const CONDITION_GATEWAY_ALIVE: &str = "GatewayAlive";
/// Link-level condition type: the Link is the one serving its `targetClusterName` (a second
/// Link of a name already served is refused and mirrors nothing).
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Link-level condition type: the Link is fully working; shown in the READY printer column.
pub const CONDITION_READY: &str = "Ready";
/// Condition type of each `mirrorServices` / `federatedServices` entry (Linkerd's).
pub const CONDITION_MIRRORED: &str = "Mirrored";

/// CEL validation rules, each with the message the API server returns when it fails.
///
/// Each rule refuses a value that Linkerd's CRD accepts but that its controller can only fail on
/// later (a port that is not a port, a period that does not parse, a selector the label parser
/// rejects). Empty strings stay valid wherever Linkerd omits the field (gateway-less Links).
pub mod rules {
    /// A port number from 1 to 65535, written as a string.
    pub const PORT: &str =
        "self == '' || (self.matches('^[0-9]{1,5}$') && int(self) >= 1 && int(self) <= 65535)";
    /// What [`PORT`] says when it fails.
    pub const PORT_MESSAGE: &str =
        "must be a port number from 1 to 65535, written as a string, for example \"4143\"";

    /// A positive Go duration (what Linkerd's controller parses with `time.ParseDuration`).
    /// The regular expression admits exactly Go's syntax; `duration()` then bounds the value.
    ///
    /// Linkerd's schema marks these fields `format: duration` instead. That format is OpenAPI's,
    /// not Go's (it admits "3 days" and refuses nothing Linkerd's controller then fails on), and
    /// a field with it reaches CEL as a duration, not a string, so meshlink declares plain
    /// strings and checks them with this rule in every version.
    pub const DURATION: &str = "self == '' || (self.matches('^(([0-9]+([.][0-9]*)?|[.][0-9]+)(ns|us|µs|μs|ms|s|m|h))+$') && duration(self) > duration('0s'))";
    /// What [`DURATION`] says when it fails.
    pub const DURATION_MESSAGE: &str = "must be a positive duration with a unit, for example \"3s\", \"500ms\" or \"1m30s\"; a bare number such as \"3\" is not a duration";

    /// A whole number of consecutive failures, at least 1.
    pub const FAILURE_THRESHOLD: &str =
        "self == '' || (self.matches('^[0-9]{1,9}$') && int(self) >= 1)";
    /// What [`FAILURE_THRESHOLD`] says when it fails.
    pub const FAILURE_THRESHOLD_MESSAGE: &str = "must be a whole number of consecutive failed probes, 1 or more, written as a string, for example \"3\"";

    /// The target cluster name becomes the suffix of every mirror's name, so it must be a DNS
    /// label.
    pub const CLUSTER_NAME: &str = "self == '' || self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
    /// What [`CLUSTER_NAME`] says when it fails.
    pub const CLUSTER_NAME_MESSAGE: &str = "must be a DNS label (lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters): it becomes the suffix of every mirrored Service's name";

    /// The operators `metav1.LabelSelectorAsSelector` accepts.
    pub const OPERATOR: &str = "self.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist']";
    /// What [`OPERATOR`] says when it fails.
    pub const OPERATOR_MESSAGE: &str =
        "operator must be one of In, NotIn, Exists or DoesNotExist (spelled exactly so)";

    /// `In` and `NotIn` need values (the label parser's rule).
    pub const VALUES_REQUIRED: &str =
        "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)";
    /// What [`VALUES_REQUIRED`] says when it fails.
    pub const VALUES_REQUIRED_MESSAGE: &str =
        "operators In and NotIn need at least one entry in values";

    /// `Exists` and `DoesNotExist` take no values (the label parser's rule).
    pub const VALUES_FORBIDDEN: &str = "!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0";
    /// What [`VALUES_FORBIDDEN`] says when it fails.
    pub const VALUES_FORBIDDEN_MESSAGE: &str =
        "operators Exists and DoesNotExist take no values: remove values";
}

/// Links a target cluster: which of its Services to mirror, how to reach its API server and its
/// multicluster gateway.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "multicluster.linkerd.io",
    version = "v1alpha3",
    kind = "Link",
    namespaced,
    doc = "Links this cluster to a target cluster whose exported Services it mirrors",
    status = "LinkStatus",
    printcolumn = r#"{"name":"Target","type":"string","description":"Name of the target cluster","jsonPath":".spec.targetClusterName"}"#,
    printcolumn = r#"{"name":"Gateway","type":"string","description":"Addresses of the target cluster's gateway","jsonPath":".spec.gatewayAddress"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"Whether the Link is fully working (see status.conditions)","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LinkSpec {
    /// Name of target cluster to link to
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new(rules::CLUSTER_NAME).message(rules::CLUSTER_NAME_MESSAGE))]
    #[schemars(length(max = 63))]
    pub target_cluster_name: String,

    /// Domain name of target cluster to link to
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_cluster_domain: String,

    /// Name of namespace Linkerd control plane is installed in on target cluster
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target_cluster_linkerd_namespace: String,

    /// Kubernetes secret of target cluster
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_credentials_secret: String,

    /// Gateway address of target cluster: comma-separated IP addresses or DNS names
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway_address: String,

    /// Gateway Port
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new(rules::PORT).message(rules::PORT_MESSAGE))]
    #[schemars(length(max = 16))]
    pub gateway_port: String,

    /// Gateway Identity FQDN
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway_identity: String,

    /// Spec for gateway health probe
    #[serde(default)]
    pub probe_spec: ProbeSpec,

    /// Kubernetes Label Selector
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// Selector for Services to mirror in remote discovery mode
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_discovery_selector: Option<LabelSelector>,

    /// Selector for federated service members
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated_service_selector: Option<LabelSelector>,

    /// Annotations to exclude when mirroring services; an entry ending in `/*` excludes every
    /// key with that prefix
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_annotations: Vec<String>,

    /// Labels to exclude when mirroring services; an entry ending in `/*` excludes every key with
    /// that prefix
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_labels: Vec<String>,
}

/// Spec for gateway health probe
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSpec {
    /// Minimum consecutive failures for the probe to be considered failed
    #[serde(
        default = "default_failure_threshold",
        skip_serializing_if = "String::is_empty"
    )]
    #[x_kube(validation = Rule::new(rules::FAILURE_THRESHOLD).message(rules::FAILURE_THRESHOLD_MESSAGE))]
    #[schemars(length(max = 16))]
    pub failure_threshold: String,

    /// Path of remote gateway health endpoint
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,

    /// Interval in between probe requests
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new(rules::DURATION).message(rules::DURATION_MESSAGE))]
    #[schemars(length(max = 64))]
    pub period: String,

    /// Port of remote gateway health endpoint
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new(rules::PORT).message(rules::PORT_MESSAGE))]
    #[schemars(length(max = 16))]
    pub port: String,

    /// Probe request timeout
    #[serde(default = "default_timeout", skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new(rules::DURATION).message(rules::DURATION_MESSAGE))]
    #[schemars(length(max = 64))]
    pub timeout: String,
}

fn default_failure_threshold() -> String {
    DEFAULT_PROBE_FAILURE_THRESHOLD.to_owned()
}

fn default_timeout() -> String {
    DEFAULT_PROBE_TIMEOUT.to_owned()
}

impl Default for ProbeSpec {
    /// What the API server fills in for an empty `probeSpec`.
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            path: String::new(),
            period: String::new(),
            port: String::new(),
            timeout: default_timeout(),
        }
    }
}

/// A label selector, as `metav1.LabelSelector`.
///
/// Unlike Kubernetes' selectors, and like Linkerd's controller, a selector with no terms matches
/// nothing (see [`LabelSelector::matches`]).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must all be present with exactly these values
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,

    /// List of selector requirements
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    // Bounded so that the API server can bound the cost of the CEL rules on each item.
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// A selector item requires a key and an operator
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(rules::OPERATOR).message(rules::OPERATOR_MESSAGE))]
#[x_kube(validation = Rule::new(rules::VALUES_REQUIRED).message(rules::VALUES_REQUIRED_MESSAGE))]
#[x_kube(validation = Rule::new(rules::VALUES_FORBIDDEN).message(rules::VALUES_FORBIDDEN_MESSAGE))]
pub struct LabelSelectorRequirement {
    /// Label key that selector should apply to
    pub key: String,

    /// Evaluation of a label in relation to set: In, NotIn, Exists or DoesNotExist
    // Bounded for the same reason as matchExpressions; the longest operator has 12 characters.
    #[schemars(length(max = 32))]
    pub operator: String,

    /// Values for In and NotIn
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Label selector operators.
pub mod operator {
    /// The label's value is one of `values`.
    pub const IN: &str = "In";
    /// The label is absent or its value is none of `values`.
    pub const NOT_IN: &str = "NotIn";
    /// The label is present.
    pub const EXISTS: &str = "Exists";
    /// The label is absent.
    pub const DOES_NOT_EXIST: &str = "DoesNotExist";
}

impl LabelSelector {
    /// A selector of `key=value`.
    pub fn label(key: &str, value: &str) -> Self {
        Self {
            match_labels: [(key.to_owned(), value.to_owned())].into(),
            match_expressions: Vec::new(),
        }
    }

    /// Whether an object with `labels` is selected.
    ///
    /// A selector with no terms matches nothing, as in Linkerd's controller (a Link without a
    /// `selector` mirrors nothing in gateway mode, rather than everything). A requirement with an
    /// operator the API server would have refused matches nothing either.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.match_labels.is_empty() && self.match_expressions.is_empty() {
            return false;
        }
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelSelector {
    /// The selector in Kubernetes' string syntax (`k=v,k in (a,b),!k`), for a server-side
    /// `labelSelector`; `None` for a selector with no terms, which matches nothing here but
    /// everything there.
    pub fn to_selector_string(&self) -> Option<String> {
        if self.match_labels.is_empty() && self.match_expressions.is_empty() {
            return None;
        }
        let labels = self.match_labels.iter().map(|(k, v)| format!("{k}={v}"));
        let exprs = self.match_expressions.iter().map(|r| {
            let values = r.values.join(",");
            match r.operator.as_str() {
                operator::IN => format!("{} in ({values})", r.key),
                operator::NOT_IN => format!("{} notin ({values})", r.key),
                operator::EXISTS => r.key.clone(),
                operator::DOES_NOT_EXIST => format!("!{}", r.key),
                // Refused by the CRD; a selector that can match nothing keeps the meaning of
                // `matches` (an impossible pair of terms on one key).
                _ => format!("{k},!{k}", k = r.key),
            }
        });
        Some(labels.chain(exprs).collect::<Vec<_>>().join(","))
    }
}

/// Why a selector string (`kubectl -l` syntax) does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "selector {selector:?}: {reason}; write terms like `key=value`, `key in (a,b)`, `!key`, separated by commas"
)]
pub struct SelectorParseError {
    selector: String,
    reason: String,
}

impl std::str::FromStr for LabelSelector {
    type Err = SelectorParseError;

    /// Parses Kubernetes' selector syntax (`kubectl -l`): `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    /// `k notin (a,b)`, `k`, `!k`, joined by commas.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| SelectorParseError {
            selector: s.to_owned(),
            reason,
        };
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| err("unbalanced ')'".into()))?
                }
                ',' if depth == 0 => {
                    terms.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if depth != 0 {
            return Err(err("unbalanced '('".into()));
        }
        terms.push(&s[start..]);
        let mut selector = Self::default();
        for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
            let req = |key: &str, op: &str, values: Vec<String>| LabelSelectorRequirement {
                key: key.trim().to_owned(),
                operator: op.to_owned(),
                values,
            };
            let set = |rest: &str| -> Result<Vec<String>, SelectorParseError> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{term:?} needs a list in parentheses")))?;
                let values: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    return Err(err(format!("{term:?} has an empty list")));
                }
                Ok(values)
            };
            if let Some(key) = term.strip_prefix('!') {
                selector
                    .match_expressions
                    .push(req(key, operator::DOES_NOT_EXIST, Vec::new()));
            } else if let Some((key, value)) = term.split_once("!=") {
                selector.match_expressions.push(req(
                    key,
                    operator::NOT_IN,
                    vec![value.trim().to_owned()],
                ));
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                selector
                    .match_labels
                    .insert(key.trim().to_owned(), value.trim().to_owned());
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                selector
                    .match_expressions
                    .push(req(key, operator::NOT_IN, set(rest)?));
            } else if let Some((key, rest)) = term.split_once(" in ") {
                selector
                    .match_expressions
                    .push(req(key, operator::IN, set(rest)?));
            } else if term.contains(char::is_whitespace) || term.contains(['(', ')']) {
                return Err(err(format!("cannot read term {term:?}")));
            } else {
                selector
                    .match_expressions
                    .push(req(term, operator::EXISTS, Vec::new()));
            }
        }
        Ok(selector)
    }
}

impl LabelSelectorRequirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator.as_str() {
            operator::IN => value.is_some_and(|v| self.values.contains(v)),
            operator::NOT_IN => value.is_none_or(|v| !self.values.contains(v)),
            operator::EXISTS => value.is_some(),
            operator::DOES_NOT_EXIST => value.is_none(),
            _ => false,
        }
    }
}

impl LinkSpec {
    /// The gateway-mode selector in force: `spec.selector` as it is (absent matches nothing).
    pub fn gateway_selector(&self) -> Option<&LabelSelector> {
        self.selector.as_ref()
    }

    /// The entries of `gatewayAddress`, trimmed, without empty ones.
    pub fn gateway_addresses(&self) -> impl Iterator<Item = &str> {
        self.gateway_address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
    }
}

/// The default gateway-mode selector, `mirror.linkerd.io/exported=true`.
pub fn default_selector() -> LabelSelector {
    LabelSelector::label(keys::EXPORTED_LABEL, keys::EXPORTED_VALUE_GATEWAY)
}

/// The default remote-discovery selector, `mirror.linkerd.io/exported=remote-discovery`.
pub fn default_remote_discovery_selector() -> LabelSelector {
    LabelSelector::label(keys::EXPORTED_LABEL, keys::EXPORTED_VALUE_REMOTE_DISCOVERY)
}

/// The default federated-member selector, `mirror.linkerd.io/federated=member`.
pub fn default_federated_service_selector() -> LabelSelector {
    LabelSelector::label(keys::FEDERATED_LABEL, keys::FEDERATED_VALUE_MEMBER)
}

/// Status defines the state of resources managed by this Link
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// List of services mirrored by this Link
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirror_services: Vec<ServiceStatus>,

    /// List of federated services that services of this Link are members of
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federated_services: Vec<ServiceStatus>,

    /// Conditions of the Link as a whole (RemoteReachable, GatewayAlive, Ready); written by
    /// meshlink, absent in Linkerd
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<LinkCondition>,

    /// What the gateway probe measures; written by meshlink, absent in Linkerd
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,

    /// How many remote Services are mirrored and how many are not; written by meshlink. With
    /// thousands of Services, `mirrorServices` lists every one that is not mirrored but only
    /// some that are, to keep the Link under the API server's size limit
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ServiceSummary>,
}

/// Counts of the remote Services a Link selects
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSummary {
    /// Remote Services mirrored
    pub mirrored: u64,
    /// Remote Services selected but not mirrored (see their entries for why)
    pub not_mirrored: u64,
    /// Entries in mirrorServices (all of those not mirrored come first)
    pub listed: u64,
}

/// What the gateway probe measures
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// Latency of a recent successful probe, in milliseconds (refreshed at most once a minute
    /// unless it changes by more than half, so that probes do not mean status writes)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_milliseconds: Option<u64>,
}

/// The status of a mirrored service
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Conditions of the mirrored service
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<LinkCondition>,

    /// ControllerName is a domain/path string that indicates the name of the controller that
    /// wrote this status
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$")
    )]
    pub controller_name: String,

    /// RemoteRef is a reference to the remote Service that this status entry describes
    pub remote_ref: ObjectRef,
}

/// The status of a condition
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LinkCondition {
    /// type of condition in CamelCase or in foo.example.com/CamelCase
    #[serde(rename = "type")]
    #[schemars(
        length(max = 316),
        pattern(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$")
    )]
    pub type_: String,

    /// status of the condition, one of True, False, Unknown
    pub status: ConditionStatus,

    /// Last time the condition was probed
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,

    /// lastTransitionTime is the last time the condition transitioned from one status to another
    pub last_transition_time: Time,

    /// reason contains a programmatic identifier indicating the reason for the condition's last
    /// transition, in CamelCase
    #[schemars(
        length(min = 1, max = 1024),
        pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,

    /// message is a human readable message indicating details about the transition; it may be
    /// empty
    pub message: String,

    /// LocalRef corresponds with the Service in the local cluster that this Link is managing
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ref: Option<ObjectRef>,
}

/// Status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    #[default]
    Unknown,
}

/// A reference to a Kubernetes object
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// Group is the group of the referent
    #[serde(default = "default_group")]
    #[schemars(
        length(max = 253),
        pattern(r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub group: String,

    /// Kind is kind of the referent
    #[serde(default = "default_kind")]
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
    )]
    pub kind: String,

    /// Name is the name of the referent
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Namespace is the namespace of the referent
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: String,
}

fn default_group() -> String {
    "core".to_owned()
}

fn default_kind() -> String {
    "Service".to_owned()
}

impl ObjectRef {
    /// A reference to Service `namespace/name`.
    pub fn service(namespace: &str, name: &str) -> Self {
        Self {
            group: default_group(),
            kind: default_kind(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: op.to_owned(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    #[test]
    fn selector_matching() {
        let exported = labels(&[("mirror.linkerd.io/exported", "true"), ("app", "web")]);
        let remote = labels(&[("mirror.linkerd.io/exported", "remote-discovery")]);
        let none = labels(&[]);
        let by_expr = |r| LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![r],
        };
        let cases: Vec<(&str, LabelSelector, &BTreeMap<_, _>, bool)> = vec![
            (
                "default matches exported",
                default_selector(),
                &exported,
                true,
            ),
            (
                "default skips remote-discovery",
                default_selector(),
                &remote,
                false,
            ),
            (
                "remote-discovery default",
                default_remote_discovery_selector(),
                &remote,
                true,
            ),
            (
                "empty selector matches nothing",
                LabelSelector::default(),
                &exported,
                false,
            ),
            (
                "empty selector, no labels",
                LabelSelector::default(),
                &none,
                false,
            ),
            (
                "In",
                by_expr(req("app", "In", &["web", "api"])),
                &exported,
                true,
            ),
            (
                "In, other value",
                by_expr(req("app", "In", &["api"])),
                &exported,
                false,
            ),
            (
                "In, absent",
                by_expr(req("app", "In", &["web"])),
                &none,
                false,
            ),
            (
                "NotIn",
                by_expr(req("app", "NotIn", &["api"])),
                &exported,
                true,
            ),
            (
                "NotIn, absent",
                by_expr(req("app", "NotIn", &["api"])),
                &none,
                true,
            ),
            (
                "NotIn, listed",
                by_expr(req("app", "NotIn", &["web"])),
                &exported,
                false,
            ),
            (
                "Exists",
                by_expr(req("app", "Exists", &[])),
                &exported,
                true,
            ),
            (
                "Exists, absent",
                by_expr(req("app", "Exists", &[])),
                &none,
                false,
            ),
            (
                "DoesNotExist",
                by_expr(req("app", "DoesNotExist", &[])),
                &none,
                true,
            ),
            (
                "DoesNotExist, present",
                by_expr(req("app", "DoesNotExist", &[])),
                &exported,
                false,
            ),
            (
                "unknown operator",
                by_expr(req("app", "Equals", &["web"])),
                &exported,
                false,
            ),
            (
                "labels and expressions are ANDed",
                LabelSelector {
                    match_expressions: vec![req("app", "In", &["api"])],
                    ..default_selector()
                },
                &exported,
                false,
            ),
        ];
        for (name, selector, labels, want) in cases {
            assert_eq!(selector.matches(labels), want, "{name}");
        }
    }

    #[test]
    fn selector_strings() {
        assert_eq!(LabelSelector::default().to_selector_string(), None);
        assert_eq!(
            default_selector().to_selector_string().as_deref(),
            Some("mirror.linkerd.io/exported=true")
        );
        let s = LabelSelector {
            match_labels: labels(&[("a", "1"), ("b", "2")]),
            match_expressions: vec![
                req("c", "In", &["x", "y"]),
                req("d", "NotIn", &["z"]),
                req("e", "Exists", &[]),
                req("f", "DoesNotExist", &[]),
            ],
        };
        assert_eq!(
            s.to_selector_string().as_deref(),
            Some("a=1,b=2,c in (x,y),d notin (z),e,!f")
        );
    }

    #[test]
    fn selector_parsing_round_trips() {
        let cases = [
            "mirror.linkerd.io/exported=true",
            "a=1,b=2,c in (x,y),d notin (z),e,!f",
        ];
        for case in cases {
            let parsed: LabelSelector = case.parse().unwrap();
            assert_eq!(parsed.to_selector_string().as_deref(), Some(case));
        }
        let s: LabelSelector = "app==web, tier != db".parse().unwrap();
        assert_eq!(
            s.to_selector_string().as_deref(),
            Some("app=web,tier notin (db)")
        );
        assert_eq!(
            "".parse::<LabelSelector>().unwrap(),
            LabelSelector::default()
        );
        for bad in ["a in (x", "a in ()", "a in x", "a b"] {
            let err = bad.parse::<LabelSelector>().unwrap_err().to_string();
            assert!(err.contains("write terms like"), "{bad}: {err}");
        }
    }

    #[test]
    fn gateway_addresses_split_and_trim() {
        let spec = LinkSpec {
            gateway_address: " 10.0.0.1, gw.example.com,,2001:db8::1 ".to_owned(),
            ..LinkSpec::default()
        };
        assert_eq!(
            spec.gateway_addresses().collect::<Vec<_>>(),
            ["10.0.0.1", "gw.example.com", "2001:db8::1"]
        );
    }

    #[test]
    fn empty_probe_spec_gets_linkerd_defaults() {
        let spec: LinkSpec = serde_json::from_value(serde_json::json!({
            "targetClusterName": "east",
            "probeSpec": {}
        }))
        .unwrap();
        assert_eq!(spec.probe_spec.failure_threshold, "3");
        assert_eq!(spec.probe_spec.timeout, "30s");
        let spec: LinkSpec = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(spec.probe_spec, ProbeSpec::default());
    }
}
