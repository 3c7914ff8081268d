//! [`inject_pod_spec`]: the one function both `meshlink inject` and the webhook call.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{
        Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
        HTTPGetAction, ObjectFieldSelector, PodSpec, Probe, ProjectedVolumeSource,
        ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection,
        Volume, VolumeMount, VolumeProjection,
    },
    apimachinery::pkg::{
        api::resource::Quantity, apis::meta::v1::ObjectMeta, util::intstr::IntOrString,
    },
};

use crate::{
    ADMIN_PORT, AnnotationSource, CONTROL_PORT, INBOUND_PORT, InjectConfig, InjectError,
    OUTBOUND_PORT,
    keys::{
        CONTROL_PLANE_NS_LABEL, IDENTITY_MODE_ANNOTATION, IDENTITY_MODE_DEFAULT, INJECT_ANNOTATION,
        INJECT_DISABLED, INJECT_ENABLED, INJECT_INGRESS, PROXY_VERSION_ANNOTATION,
        WORKLOAD_NS_LABEL, owner_label,
    },
    overrides::{self, Settings},
};

pub const PROXY_CONTAINER_NAME: &str = "linkerd-proxy";
pub const INIT_CONTAINER_NAME: &str = "linkerd-init";
/// The audience of the token the proxy sends to the identity service, which checks it with
/// a TokenReview for this audience (Linkerd's `identity.l5d.io`).
pub const IDENTITY_TOKEN_AUDIENCE: &str = "identity.l5d.io";

const END_ENTITY_VOLUME: &str = "linkerd-identity-end-entity";
const END_ENTITY_DIR: &str = "/var/run/linkerd/identity/end-entity";
const TOKEN_VOLUME: &str = "linkerd-identity-token";
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// Linkerd's token lifetime; the kubelet renews it at 80%.
const TOKEN_EXPIRATION_SECONDS: i64 = 86_400;
/// iptables takes its lock under /run, which a read-only root file system would refuse
/// (Linkerd's `proxyInit.xtMountPath`).
const XTABLES_VOLUME: &str = "linkerd-proxy-init-xtables-lock";
const XTABLES_DIR: &str = "/run";

/// Who asks, which decides what `linkerd.io/inject` must say (Linkerd's `Origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `meshlink inject`: the user asked for these manifests, so everything is injected
    /// unless its template (or namespace, when the template does not enable it) disables it.
    Cli,
    /// The webhook: only pods whose namespace or template says `enabled` (or `ingress`).
    Webhook,
}

/// The pod's surroundings.
#[derive(Clone, Copy, Debug)]
pub struct PodContext<'a> {
    pub origin: Origin,
    /// The workload that owns the template, as (`Deployment`, `web`): named in a
    /// `linkerd.io/proxy-<kind>` label as Linkerd does.
    pub owner: Option<(&'a str, &'a str)>,
    /// The pod's namespace, when known (the `linkerd.io/workload-ns` label).
    pub namespace: Option<&'a str>,
    /// The namespace's annotations: `linkerd.io/inject` and `config.linkerd.io/*` defaults.
    pub namespace_annotations: &'a BTreeMap<String, String>,
}

/// What [`inject_pod_spec`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// The pod already has a `linkerd-proxy` container; it was left as it was.
    AlreadyInjected,
    /// Left as it was, for this reason.
    Skipped(SkipReason),
}

/// Why a pod is not injected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `linkerd.io/inject: disabled`.
    Disabled(AnnotationSource),
    /// (Webhook only) neither the namespace nor the template says `linkerd.io/inject: enabled`.
    NotEnabled,
    /// (Webhook only) `linkerd.io/inject` holds something other than enabled, disabled or
    /// ingress.
    InvalidInjectAnnotation(AnnotationSource, String),
    /// The pod shares the node's network: the init container's rules would redirect the node's
    /// traffic.
    HostNetwork,
}

impl SkipReason {
    /// A fixed name for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Disabled(_) => "injection_disabled",
            Self::NotEnabled => "injection_not_enabled",
            Self::InvalidInjectAnnotation(..) => "invalid_inject_annotation",
            Self::HostNetwork => "host_network",
        }
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Disabled(at) => write!(f, "{at} has \"{INJECT_ANNOTATION}: {INJECT_DISABLED}\""),
            Self::NotEnabled => write!(
                f,
                "neither the namespace nor the pod template has \"{INJECT_ANNOTATION}: {INJECT_ENABLED}\""
            ),
            Self::InvalidInjectAnnotation(at, value) => write!(
                f,
                "{at} has \"{INJECT_ANNOTATION}: {value}\"; write enabled or disabled"
            ),
            Self::HostNetwork => f.write_str("hostNetwork is enabled"),
        }
    }
}

/// Adds the proxy, its init container, volumes, labels and annotations to one pod (`meta` and
/// `spec` are a Pod's or a pod template's). Unless it returns [`Outcome::Injected`], `meta`
/// and `spec` are left exactly as they were, errors included; and a pod it injected is
/// [`Outcome::AlreadyInjected`] the next time.
pub fn inject_pod_spec(
    ctx: &PodContext<'_>,
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    config: &InjectConfig,
) -> Result<Outcome, InjectError> {
    if spec
        .containers
        .iter()
        .any(|c| c.name == PROXY_CONTAINER_NAME)
    {
        return Ok(Outcome::AlreadyInjected);
    }
    if let Some(reason) = why_not(ctx, meta, spec) {
        return Ok(Outcome::Skipped(reason));
    }
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    config.check()?;
    let settings = overrides::resolve(
        annotations,
        ctx.namespace_annotations,
        &named_ports(spec),
        config,
    )?;
    check_names(spec)?;

    // Everything is checked: from here on nothing fails.
    let inbound_ports = inbound_ports(spec);
    spec.containers
        .insert(0, proxy_container(config, &settings, &inbound_ports));
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, init_container(config, &settings));
    spec.volumes.get_or_insert_with(Vec::new).extend(volumes());

    let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    annotations.extend(settings.inherited);
    annotations.insert(
        PROXY_VERSION_ANNOTATION.to_owned(),
        config.proxy_version.clone(),
    );
    annotations.insert(
        IDENTITY_MODE_ANNOTATION.to_owned(),
        IDENTITY_MODE_DEFAULT.to_owned(),
    );
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(
        CONTROL_PLANE_NS_LABEL.to_owned(),
        config.control_plane_ns.clone(),
    );
    if let Some(ns) = ctx.namespace.filter(|ns| !ns.is_empty()) {
        labels.insert(WORKLOAD_NS_LABEL.to_owned(), ns.to_owned());
    }
    if let Some((label, name)) = ctx
        .owner
        .and_then(|(kind, name)| Some((owner_label(kind)?, name)))
    {
        labels.insert(label.to_owned(), name.to_owned());
    }
    Ok(Outcome::Injected)
}

/// Why [`inject_pod_spec`] would leave a pod without the proxy, by its annotations, its
/// namespace's and its network alone (`None`: it asks for the proxy); what `meshlink check`
/// uses to find Pods that were created while the webhook was unreachable.
pub fn why_not(ctx: &PodContext<'_>, meta: &ObjectMeta, spec: &PodSpec) -> Option<SkipReason> {
    let empty = BTreeMap::new();
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    if let Some(reason) = skip_reason(ctx.origin, annotations, ctx.namespace_annotations) {
        return Some(reason);
    }
    (spec.host_network == Some(true)).then_some(SkipReason::HostNetwork)
}

/// Linkerd's rules for `linkerd.io/inject` (`disabledByAnnotation` in its `pkg/inject`).
fn skip_reason(
    origin: Origin,
    pod: &BTreeMap<String, String>,
    namespace: &BTreeMap<String, String>,
) -> Option<SkipReason> {
    let pod = pod.get(INJECT_ANNOTATION).map(|v| v.trim());
    let ns = namespace.get(INJECT_ANNOTATION).map(|v| v.trim());
    let enables = |v: Option<&str>| matches!(v, Some(INJECT_ENABLED | INJECT_INGRESS));
    match origin {
        Origin::Cli => {
            if pod == Some(INJECT_DISABLED) {
                Some(SkipReason::Disabled(AnnotationSource::Workload))
            } else if ns == Some(INJECT_DISABLED) && !enables(pod) {
                Some(SkipReason::Disabled(AnnotationSource::Namespace))
            } else {
                None
            }
        }
        Origin::Webhook => {
            let valid = |v: Option<&str>| {
                matches!(
                    v,
                    None | Some(INJECT_ENABLED | INJECT_DISABLED | INJECT_INGRESS)
                )
            };
            if !valid(ns) {
                return Some(SkipReason::InvalidInjectAnnotation(
                    AnnotationSource::Namespace,
                    ns.unwrap_or_default().to_owned(),
                ));
            }
            if !valid(pod) {
                return Some(SkipReason::InvalidInjectAnnotation(
                    AnnotationSource::Workload,
                    pod.unwrap_or_default().to_owned(),
                ));
            }
            if pod == Some(INJECT_DISABLED) {
                Some(SkipReason::Disabled(AnnotationSource::Workload))
            } else if enables(pod) || enables(ns) {
                None
            } else if ns == Some(INJECT_DISABLED) {
                Some(SkipReason::Disabled(AnnotationSource::Namespace))
            } else {
                Some(SkipReason::NotEnabled)
            }
        }
    }
}

/// The init container and volumes the injector adds must not collide with the pod's own.
fn check_names(spec: &PodSpec) -> Result<(), InjectError> {
    let taken = |what, name: &str| {
        Err(InjectError::NameTaken {
            what,
            name: name.to_owned(),
        })
    };
    if let Some(c) = all_containers(spec).find(|c| c.name == INIT_CONTAINER_NAME) {
        return taken("container", &c.name);
    }
    for v in spec.volumes.iter().flatten() {
        if [END_ENTITY_VOLUME, TOKEN_VOLUME, XTABLES_VOLUME].contains(&v.name.as_str()) {
            return taken("volume", &v.name);
        }
    }
    Ok(())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

fn container_ports(c: &Container) -> impl Iterator<Item = (&ContainerPort, u16)> {
    c.ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p, u16::try_from(p.container_port).ok()?)))
}

/// The pod's named container ports, which `opaque-ports` may name.
fn named_ports(spec: &PodSpec) -> BTreeMap<String, u16> {
    all_containers(spec)
        .flat_map(container_ports)
        .filter_map(|(p, port)| Some((p.name.clone()?, port)))
        .collect()
}

/// The application's ports, whose policy the proxy watches from the start: every declared
/// container port and the ports of HTTP probes (Linkerd's `getPodInboundPorts`, sorted as
/// numbers).
fn inbound_ports(spec: &PodSpec) -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for c in all_containers(spec) {
        ports.extend(container_ports(c).map(|(_, port)| port));
        for probe in [&c.readiness_probe, &c.liveness_probe]
            .into_iter()
            .flatten()
        {
            let port = match probe.http_get.as_ref().map(|h| &h.port) {
                Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
                Some(IntOrString::String(name)) => container_ports(c)
                    .find(|(p, _)| p.name.as_deref() == Some(name))
                    .map(|(_, port)| port),
                None => None,
            };
            ports.extend(port);
        }
    }
    ports
}

fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// A variable the kubelet fills from the pod (the downward API).
fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: field.to_owned(),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The proxy's environment: exactly what meshlink-proxy reads (`proxy/sidecar/src/config.rs`).
/// The `_pod_*` variables come first because Kubernetes expands `$(name)` only from variables
/// defined earlier in the list.
fn proxy_env(config: &InjectConfig, s: &Settings, inbound_ports: &BTreeSet<u16>) -> Vec<EnvVar> {
    let cp_ns = &config.control_plane_ns;
    let td = &config.trust_domain;
    let mut env = vec![
        field_env("_pod_name", "metadata.name"),
        field_env("_pod_ns", "metadata.namespace"),
        field_env("_pod_nodeName", "spec.nodeName"),
        field_env("_pod_sa", "spec.serviceAccountName"),
        env("LINKERD2_PROXY_LOG", s.log_level.clone()),
        env(
            "LINKERD2_PROXY_ADMIN_LISTEN_ADDR",
            format!("0.0.0.0:{ADMIN_PORT}"),
        ),
        env(
            "LINKERD2_PROXY_INBOUND_LISTEN_ADDR",
            format!("0.0.0.0:{INBOUND_PORT}"),
        ),
        env(
            "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR",
            format!("127.0.0.1:{OUTBOUND_PORT}"),
        ),
        env(
            "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
            config.destination_addr.clone(),
        ),
        env(
            "LINKERD2_PROXY_DESTINATION_SVC_NAME",
            config.destination_name.clone(),
        ),
        env(
            "LINKERD2_PROXY_DESTINATION_CONTEXT",
            r#"{"ns":"$(_pod_ns)","nodeName":"$(_pod_nodeName)","pod":"$(_pod_name)"}"#,
        ),
        env("LINKERD2_PROXY_POLICY_SVC_ADDR", config.policy_addr.clone()),
        env("LINKERD2_PROXY_POLICY_SVC_NAME", config.policy_name.clone()),
        env(
            "LINKERD2_PROXY_POLICY_WORKLOAD",
            r#"{"ns":"$(_pod_ns)","pod":"$(_pod_name)"}"#,
        ),
        env(
            "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
            s.default_inbound_policy.clone(),
        ),
        env(
            "LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS",
            config.cluster_networks.clone(),
        ),
        env("LINKERD2_PROXY_INBOUND_PORTS", join(inbound_ports)),
        env(
            "LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION",
            join(&s.opaque_ports),
        ),
        env("LINKERD2_PROXY_IDENTITY_DIR", END_ENTITY_DIR),
        env(
            "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
            config.trust_anchors_pem.clone(),
        ),
        env(
            "LINKERD2_PROXY_IDENTITY_TOKEN_FILE",
            format!("{TOKEN_DIR}/{TOKEN_VOLUME}"),
        ),
        env(
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR",
            config.identity_addr.clone(),
        ),
        env(
            "LINKERD2_PROXY_IDENTITY_SVC_NAME",
            config.identity_name.clone(),
        ),
        env(
            "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
            format!("$(_pod_sa).$(_pod_ns).serviceaccount.identity.{cp_ns}.{td}"),
        ),
        env(
            "LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD",
            config.shutdown_grace_period.clone(),
        ),
    ];
    if let Some(cores) = s.cores {
        env.push(self::env("LINKERD2_PROXY_CORES", cores.to_string()));
    }
    env
}

fn resources(r: &crate::ProxyResources) -> Option<ResourceRequirements> {
    let map = |cpu: &Option<String>, memory: &Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), Quantity(v.clone()?))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    let requests = map(&r.cpu_request, &r.memory_request);
    let limits = map(&r.cpu_limit, &r.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..ResourceRequirements::default()
    })
}

fn http_probe(path: &str, initial_delay_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(ADMIN_PORT.into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay_seconds),
        timeout_seconds: Some(1),
        ..Probe::default()
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port.into(),
        ..ContainerPort::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn runtime_default() -> Option<SeccompProfile> {
    Some(SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..SeccompProfile::default()
    })
}

fn proxy_container(
    config: &InjectConfig,
    s: &Settings,
    inbound_ports: &BTreeSet<u16>,
) -> Container {
    Container {
        name: PROXY_CONTAINER_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec!["meshlink-proxy".into()]),
        env: Some(proxy_env(config, s, inbound_ports)),
        ports: Some(vec![
            port("linkerd-proxy", INBOUND_PORT),
            port("linkerd-admin", ADMIN_PORT),
        ]),
        // Linkerd's probe timings (`proxy.{liveness,readiness}Probe` in its chart).
        liveness_probe: Some(http_probe("/live", 10)),
        readiness_probe: Some(http_probe("/ready", 2)),
        resources: resources(&s.resources),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(s.proxy_uid.into()),
            seccomp_profile: runtime_default(),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![
            mount(END_ENTITY_VOLUME, END_ENTITY_DIR, false),
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
        ]),
        ..Container::default()
    }
}

/// `meshlink-proxy init` with proxy-init's flags (Linkerd's `partials.proxy-init`): the
/// proxy's own admin and control ports are never redirected inbound.
fn init_container(config: &InjectConfig, s: &Settings) -> Container {
    let mut inbound_skip = format!("{CONTROL_PORT},{ADMIN_PORT}");
    if !s.skip_inbound_ports.is_empty() {
        inbound_skip = format!("{inbound_skip},{}", s.skip_inbound_ports);
    }
    let mut args = vec![
        "--incoming-proxy-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outgoing-proxy-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--proxy-uid".to_owned(),
        s.proxy_uid.to_string(),
        "--inbound-ports-to-ignore".to_owned(),
        inbound_skip,
    ];
    if !s.skip_outbound_ports.is_empty() {
        args.extend([
            "--outbound-ports-to-ignore".to_owned(),
            s.skip_outbound_ports.clone(),
        ]);
    }
    Container {
        name: INIT_CONTAINER_NAME.into(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec!["meshlink-proxy".into(), "init".into()]),
        args: Some(args),
        resources: resources(&s.resources),
        // Root with NET_ADMIN and NET_RAW, to write the pod's iptables rules; nothing else.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                ..Capabilities::default()
            }),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            seccomp_profile: runtime_default(),
            ..SecurityContext::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![mount(XTABLES_VOLUME, XTABLES_DIR, false)]),
        ..Container::default()
    }
}

fn volumes() -> [Volume; 3] {
    let empty_dir = |medium: Option<&str>| EmptyDirVolumeSource {
        medium: medium.map(str::to_owned),
        ..EmptyDirVolumeSource::default()
    };
    [
        Volume {
            name: XTABLES_VOLUME.into(),
            empty_dir: Some(empty_dir(None)),
            ..Volume::default()
        },
        // The proxy's private key never touches a disk.
        Volume {
            name: END_ENTITY_VOLUME.into(),
            empty_dir: Some(empty_dir(Some("Memory"))),
            ..Volume::default()
        },
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(IDENTITY_TOKEN_AUDIENCE.into()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: TOKEN_VOLUME.into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}
