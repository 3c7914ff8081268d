//! Linkerd's `config.linkerd.io/*` annotations: read from the pod template, else from its
//! namespace, else the [`InjectConfig`] default, and checked, so that a bad value is refused
//! here, naming the annotation, rather than found by a proxy that does not start.

use std::collections::BTreeMap;

use proxy_init::PortRange;

use crate::{
    AnnotationSource, InjectConfig, InjectError, ProxyResources,
    keys::{
        DEFAULT_INBOUND_POLICY_ANNOTATION, OPAQUE_PORTS_ANNOTATION, OVERRIDE_ANNOTATIONS,
        PROXY_CPU_LIMIT_ANNOTATION, PROXY_CPU_REQUEST_ANNOTATION, PROXY_LOG_LEVEL_ANNOTATION,
        PROXY_MEMORY_LIMIT_ANNOTATION, PROXY_MEMORY_REQUEST_ANNOTATION, PROXY_UID_ANNOTATION,
        SKIP_INBOUND_PORTS_ANNOTATION, SKIP_OUTBOUND_PORTS_ANNOTATION,
    },
};

/// The inbound policies Linkerd's proxy (and meshlink-proxy's `DefaultPolicy`) accept.
pub const INBOUND_POLICIES: [&str; 6] = [
    "all-unauthenticated",
    "all-authenticated",
    "cluster-unauthenticated",
    "cluster-authenticated",
    "deny",
    "audit",
];

/// meshlink-proxy reads opaque ports as a list, so a range is written out port by port; past
/// this many ports the variable would be larger than anyone means it to be.
const MAX_OPAQUE_PORTS: usize = 4096;

/// meshlink-proxy refuses more worker threads than this (`LINKERD2_PROXY_CORES`).
const MAX_CORES: f64 = 256.0;

/// What one pod's proxy runs with, after its annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Ports and ranges as proxy-init reads them (`25,8000-8080`), possibly empty.
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    /// Every opaque port, ranges written out, sorted.
    pub opaque_ports: Vec<u16>,
    pub default_inbound_policy: String,
    pub log_level: String,
    pub proxy_uid: u32,
    pub resources: ProxyResources,
    /// `LINKERD2_PROXY_CORES`: the CPU request rounded up, as Linkerd sets its minimum workers.
    pub cores: Option<u32>,
    /// The namespace's overrides that the template lacks: copied onto the template.
    pub inherited: BTreeMap<String, String>,
}

struct Lookup<'a> {
    pod: &'a BTreeMap<String, String>,
    namespace: &'a BTreeMap<String, String>,
}

impl Lookup<'_> {
    fn get(&self, key: &'static str) -> Option<(&str, AnnotationSource)> {
        if let Some(v) = self.pod.get(key) {
            return Some((v, AnnotationSource::Workload));
        }
        self.namespace
            .get(key)
            .map(|v| (v.as_str(), AnnotationSource::Namespace))
    }

    /// The annotation's value checked by `check`, or `default` when neither sets it.
    fn value<T>(
        &self,
        key: &'static str,
        default: T,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, InjectError> {
        match self.get(key) {
            None => Ok(default),
            Some((value, source)) => check(value).map_err(|reason| InjectError::InvalidOverride {
                annotation: key,
                value: value.to_owned(),
                at: source,
                reason,
            }),
        }
    }
}

/// Reads every override. `named_ports` are the pod's named container ports, which
/// `opaque-ports` may name.
pub fn resolve(
    pod_annotations: &BTreeMap<String, String>,
    namespace_annotations: &BTreeMap<String, String>,
    named_ports: &BTreeMap<String, u16>,
    config: &InjectConfig,
) -> Result<Settings, InjectError> {
    let l = Lookup {
        pod: pod_annotations,
        namespace: namespace_annotations,
    };
    let ports = |v: &str| port_ranges(v).map(|_| normalize_ports(v));
    let skip_inbound_ports = l.value(
        SKIP_INBOUND_PORTS_ANNOTATION,
        normalize_ports(&config.skip_inbound_ports),
        ports,
    )?;
    let skip_outbound_ports = l.value(
        SKIP_OUTBOUND_PORTS_ANNOTATION,
        normalize_ports(&config.skip_outbound_ports),
        ports,
    )?;
    let default_opaque =
        opaque_ports(&config.opaque_ports, named_ports).map_err(|reason| InjectError::Config {
            field: "opaque_ports",
            reason,
        })?;
    let opaque_ports = l.value(OPAQUE_PORTS_ANNOTATION, default_opaque, |v| {
        opaque_ports(v, named_ports)
    })?;
    let default_inbound_policy = l.value(
        DEFAULT_INBOUND_POLICY_ANNOTATION,
        config.default_inbound_policy.clone(),
        |v| check_policy(v).map(|()| v.trim().to_owned()),
    )?;
    let log_level = l.value(PROXY_LOG_LEVEL_ANNOTATION, config.log_level.clone(), |v| {
        check_log_level(v).map(|()| v.trim().to_owned())
    })?;
    let proxy_uid = l.value(PROXY_UID_ANNOTATION, crate::PROXY_UID, uid)?;
    let quantity_of = |key, default: &Option<String>| {
        l.value(key, default.clone(), |v| {
            quantity(v).map(|_| Some(v.trim().to_owned()))
        })
    };
    let resources = ProxyResources {
        cpu_request: quantity_of(PROXY_CPU_REQUEST_ANNOTATION, &config.resources.cpu_request)?,
        cpu_limit: quantity_of(PROXY_CPU_LIMIT_ANNOTATION, &config.resources.cpu_limit)?,
        memory_request: quantity_of(
            PROXY_MEMORY_REQUEST_ANNOTATION,
            &config.resources.memory_request,
        )?,
        memory_limit: quantity_of(PROXY_MEMORY_LIMIT_ANNOTATION, &config.resources.memory_limit)?,
    };
    for (request, limit, request_key) in [
        (
            &resources.cpu_request,
            &resources.cpu_limit,
            PROXY_CPU_REQUEST_ANNOTATION,
        ),
        (
            &resources.memory_request,
            &resources.memory_limit,
            PROXY_MEMORY_REQUEST_ANNOTATION,
        ),
    ] {
        if let (Some(r), Some(lim)) = (request, limit) {
            if quantity(r).unwrap_or(0.0) > quantity(lim).unwrap_or(f64::MAX) {
                let source = l
                    .get(request_key)
                    .map_or(AnnotationSource::Workload, |(_, s)| s);
                return Err(InjectError::InvalidOverride {
                    annotation: request_key,
                    value: r.clone(),
                    at: source,
                    reason: format!("the request is above the limit {lim}"),
                });
            }
        }
    }
    let cores = resources
        .cpu_request
        .as_deref()
        .and_then(|q| quantity(q).ok())
        // At least one worker, at most what the proxy accepts; the value is whole and in range.
        .map(|c| c.ceil().clamp(1.0, MAX_CORES) as u32);
    let inherited = OVERRIDE_ANNOTATIONS
        .iter()
        .filter(|k| !pod_annotations.contains_key(**k))
        .filter_map(|k| {
            namespace_annotations
                .get(*k)
                .map(|v| ((*k).to_owned(), v.clone()))
        })
        .collect();
    Ok(Settings {
        skip_inbound_ports,
        skip_outbound_ports,
        opaque_ports,
        default_inbound_policy,
        log_level,
        proxy_uid,
        resources,
        cores,
        inherited,
    })
}

/// `25, 587 ,8000-8080` as proxy-init's flag takes it: `25,587,8000-8080`.
fn normalize_ports(value: &str) -> String {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-separated list of ports and ranges, as proxy-init reads it; blanks are ignored.
pub fn port_ranges(value: &str) -> Result<Vec<PortRange>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<PortRange>().map_err(|e| e.to_string()))
        .collect()
}

/// Ports, ranges and named container ports (`3306,8000-8002,grpc`), written out and sorted.
pub fn opaque_ports(value: &str, named_ports: &BTreeMap<String, u16>) -> Result<Vec<u16>, String> {
    let mut ports = std::collections::BTreeSet::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let range = if item.starts_with(|c: char| c.is_ascii_digit()) {
            item.parse::<PortRange>().map_err(|e| e.to_string())?
        } else {
            let port = named_ports.get(item).ok_or_else(|| {
                format!("{item:?} is neither a port, a range nor the name of a container port")
            })?;
            PortRange::single(*port)
        };
        if range.first == 0 {
            return Err(format!("{item:?}: port 0 cannot be opaque"));
        }
        ports.extend(range.first..=range.last);
        if ports.len() > MAX_OPAQUE_PORTS {
            return Err(format!(
                "names more than {MAX_OPAQUE_PORTS} ports; meshlink-proxy takes opaque ports one by one"
            ));
        }
    }
    Ok(ports.into_iter().collect())
}

pub fn check_policy(value: &str) -> Result<(), String> {
    if INBOUND_POLICIES.contains(&value.trim()) {
        Ok(())
    } else {
        Err(format!("must be one of {}", INBOUND_POLICIES.join(", ")))
    }
}

/// A tracing filter (`info`, `warn,proxy_sidecar=debug`): one word of printable characters.
/// The proxy parses it fully; this keeps out what could not be one.
pub fn check_log_level(value: &str) -> Result<(), String> {
    let value = value.trim();
    if value.is_empty() {
        return Err("is empty; write a level such as info or a filter such as warn,proxy_sidecar=debug".into());
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain blanks or control characters".into());
    }
    Ok(())
}

/// A user id other than root: the init container's rules exempt the proxy by it, and the
/// proxy runs with runAsNonRoot.
fn uid(value: &str) -> Result<u32, String> {
    match value.trim().parse::<u32>() {
        Ok(0) => Err("the proxy must not run as root (0)".into()),
        Ok(uid) => Ok(uid),
        Err(_) => Err("is not a user id (1-4294967295)".into()),
    }
}

/// A Kubernetes quantity (`100m`, `0.5`, `64Mi`, `1e3`), as its value; negative ones refused.
pub fn quantity(value: &str) -> Result<f64, String> {
    let v = value.trim();
    let invalid = || format!("{v:?} is not a quantity such as 100m, 0.5, 64Mi or 1G");
    let number_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(v.len());
    let (number, suffix) = v.split_at(number_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.is_empty()
        || number.matches('.').count() > 1
        || !number.chars().any(|c| c.is_ascii_digit())
        || number.contains('+')
    {
        return Err(invalid());
    }
    let n: f64 = number.parse().map_err(|_| invalid())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| invalid())?;
            10f64.powi(e)
        }
        _ => return Err(invalid()),
    };
    Ok(n * scale)
}

/// An IPv4 or IPv6 network (`10.0.0.0/8`).
pub fn is_cidr(value: &str) -> bool {
    let Some((ip, prefix)) = value.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), prefix.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(p)) => p <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(p)) => p <= 128,
        _ => false,
    }
}
