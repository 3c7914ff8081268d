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

/// The inbound policies Linkerd's proxy (and meshlink-proxy's `DefaultPolicy`) accept; a test
/// holds them to the proxy's list, which this crate cannot depend on (it is the control-plane
/// client, with gRPC).
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
        memory_limit: quantity_of(
            PROXY_MEMORY_LIMIT_ANNOTATION,
            &config.resources.memory_limit,
        )?,
    };
    for (request, limit, request_key, limit_key) in [
        (
            &resources.cpu_request,
            &resources.cpu_limit,
            PROXY_CPU_REQUEST_ANNOTATION,
            PROXY_CPU_LIMIT_ANNOTATION,
        ),
        (
            &resources.memory_request,
            &resources.memory_limit,
            PROXY_MEMORY_REQUEST_ANNOTATION,
            PROXY_MEMORY_LIMIT_ANNOTATION,
        ),
    ] {
        // Kubernetes refuses such a pod; say which setting to change.
        if let (Some(r), Some(lim)) = (request, limit)
            && quantity(r).unwrap_or(0.0) > quantity(lim).unwrap_or(f64::MAX)
        {
            let invalid = |annotation, value: &str, at, reason| InjectError::InvalidOverride {
                annotation,
                value: value.to_owned(),
                at,
                reason,
            };
            return Err(match (l.get(request_key), l.get(limit_key)) {
                (Some((_, at)), _) => invalid(
                    request_key,
                    r,
                    at,
                    format!("the request is above the limit {lim}"),
                ),
                (None, Some((_, at))) => invalid(
                    limit_key,
                    lim,
                    at,
                    format!("the limit is below the request {r}"),
                ),
                (None, None) => InjectError::Config {
                    field: "resources",
                    reason: format!("a request ({r}) above its limit ({lim})"),
                },
            });
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
        return Err(
            "is empty; write a level such as info or a filter such as warn,proxy_sidecar=debug"
                .into(),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The policies the injector accepts are exactly those the proxy reads, in its order.
    #[test]
    fn inbound_policies_are_the_proxys() {
        assert_eq!(INBOUND_POLICIES, proxy_discovery::DefaultPolicy::NAMES);
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn config() -> InjectConfig {
        InjectConfig::new(
            "linkerd",
            "cluster.local",
            "cluster.local",
            "-----BEGIN CERTIFICATE-----\n",
        )
    }

    #[test]
    fn quantities() {
        let cases: &[(&str, Option<f64>)] = &[
            ("100m", Some(0.1)),
            ("1", Some(1.0)),
            ("1.5", Some(1.5)),
            ("+2", Some(2.0)),
            (".5", Some(0.5)),
            ("64Mi", Some(64.0 * 1024.0 * 1024.0)),
            ("1G", Some(1e9)),
            ("1e3", Some(1000.0)),
            ("2E-1", Some(0.2)),
            ("500u", Some(0.0005)),
            ("", None),
            ("m", None),
            ("-1", None),
            ("1.2.3", None),
            ("10mb", None),
            ("1 Gi", None),
            ("lots", None),
        ];
        for (input, want) in cases {
            let got = quantity(input).ok();
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9 * w.max(1.0), "{input}: {g}"),
                (None, None) => {}
                _ => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn opaque_port_lists() {
        let mut named_ports = BTreeMap::new();
        named_ports.insert("mysql".to_owned(), 3306u16);
        let cases: &[(&str, Result<&[u16], &str>)] = &[
            ("3306", Ok(&[3306])),
            ("25, 587 ,", Ok(&[25, 587])),
            ("8000-8002,8001", Ok(&[8000, 8001, 8002])),
            ("mysql,11211", Ok(&[3306, 11211])),
            ("", Ok(&[])),
            ("grpc", Err("neither a port")),
            ("0", Err("port 0")),
            ("70000", Err("not a port")),
            ("9-3", Err("below its first")),
            ("1-65535", Err("more than 4096")),
        ];
        for (input, want) in cases {
            match (opaque_ports(input, &named_ports), want) {
                (Ok(got), Ok(w)) => assert_eq!(&got, w, "{input}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{input}: {e}"),
                (got, _) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn each_override_and_its_refusal() {
        // (annotation, good value, what it changes, bad value, what the error says)
        type Check = fn(&Settings) -> bool;
        let cases: &[(&str, &str, Check, &str, &str)] = &[
            (
                SKIP_INBOUND_PORTS_ANNOTATION,
                " 25, 8000-8080",
                |s| s.skip_inbound_ports == "25,8000-8080",
                "http",
                "not a port",
            ),
            (
                SKIP_OUTBOUND_PORTS_ANNOTATION,
                "443",
                |s| s.skip_outbound_ports == "443",
                "443-80",
                "below its first",
            ),
            (
                OPAQUE_PORTS_ANNOTATION,
                "5432",
                |s| s.opaque_ports == [5432],
                "postgres",
                "neither a port",
            ),
            (
                DEFAULT_INBOUND_POLICY_ANNOTATION,
                "deny",
                |s| s.default_inbound_policy == "deny",
                "allow",
                "must be one of",
            ),
            (
                PROXY_CPU_REQUEST_ANNOTATION,
                "2500m",
                |s| s.resources.cpu_request.as_deref() == Some("2500m") && s.cores == Some(3),
                "2 cores",
                "not a quantity",
            ),
            (
                PROXY_CPU_LIMIT_ANNOTATION,
                "1",
                |s| s.resources.cpu_limit.as_deref() == Some("1"),
                "one",
                "not a quantity",
            ),
            (
                PROXY_MEMORY_REQUEST_ANNOTATION,
                "32Mi",
                |s| s.resources.memory_request.as_deref() == Some("32Mi"),
                "32MB",
                "not a quantity",
            ),
            (
                PROXY_MEMORY_LIMIT_ANNOTATION,
                "1Gi",
                |s| s.resources.memory_limit.as_deref() == Some("1Gi"),
                "-1Gi",
                "not a quantity",
            ),
            (
                PROXY_LOG_LEVEL_ANNOTATION,
                "debug",
                |s| s.log_level == "debug",
                "warn, debug",
                "blanks",
            ),
            (
                PROXY_UID_ANNOTATION,
                "3000",
                |s| s.proxy_uid == 3000,
                "0",
                "root",
            ),
        ];
        let none = BTreeMap::new();
        let defaults = resolve(&none, &none, &BTreeMap::new(), &config()).expect("defaults");
        for (key, good, changed, bad, reason) in cases {
            assert!(
                !changed(&defaults),
                "{key}: the default already passes the check"
            );
            let on_pod = resolve(&ann(&[(key, good)]), &none, &BTreeMap::new(), &config())
                .unwrap_or_else(|e| panic!("{key}={good}: {e}"));
            assert!(changed(&on_pod), "{key}={good}: {on_pod:?}");
            // From the namespace, and copied onto the template.
            let from_ns = resolve(&none, &ann(&[(key, good)]), &BTreeMap::new(), &config())
                .unwrap_or_else(|e| panic!("{key}={good} on the namespace: {e}"));
            assert!(changed(&from_ns), "{key}={good} on the namespace");
            assert_eq!(from_ns.inherited.get(*key).map(String::as_str), Some(*good));
            // The template's value wins over the namespace's, even when the namespace's is bad.
            let both = resolve(
                &ann(&[(key, good)]),
                &ann(&[(key, bad)]),
                &BTreeMap::new(),
                &config(),
            )
            .expect("the template's value wins");
            assert!(changed(&both) && both.inherited.is_empty(), "{key}");
            match resolve(&ann(&[(key, bad)]), &none, &BTreeMap::new(), &config()) {
                Err(InjectError::InvalidOverride {
                    annotation,
                    value,
                    at: AnnotationSource::Workload,
                    reason: r,
                }) => {
                    assert_eq!((annotation, value.as_str()), (*key, *bad));
                    assert!(r.contains(reason), "{key}={bad}: {r}");
                }
                other => panic!("{key}={bad}: {other:?}"),
            }
            let err = resolve(&none, &ann(&[(key, bad)]), &BTreeMap::new(), &config())
                .expect_err("bad on ns");
            assert!(err.to_string().contains("on the namespace"), "{err}");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn a_request_above_its_limit_is_refused() {
        let none = BTreeMap::new();
        let err = resolve(
            &ann(&[
                (PROXY_MEMORY_REQUEST_ANNOTATION, "1Gi"),
                (PROXY_MEMORY_LIMIT_ANNOTATION, "512Mi"),
            ]),
            &none,
            &BTreeMap::new(),
            &config(),
        )
        .expect_err("request above limit");
        assert!(
            err.to_string().contains(PROXY_MEMORY_REQUEST_ANNOTATION)
                && err.to_string().contains("above the limit 512Mi"),
            "{err}"
        );
    }

    #[test]
    fn cores_follow_the_cpu_request() {
        let none = BTreeMap::new();
        for (request, cores) in [("100m", 1), ("1", 1), ("1001m", 2), ("4", 4), ("1000", 256)] {
            let s = resolve(
                &ann(&[(PROXY_CPU_REQUEST_ANNOTATION, request)]),
                &none,
                &BTreeMap::new(),
                &config(),
            )
            .expect(request);
            assert_eq!(s.cores, Some(cores), "{request}");
        }
        assert_eq!(
            resolve(&none, &none, &BTreeMap::new(), &config())
                .expect("defaults")
                .cores,
            None
        );
    }

    #[test]
    fn networks() {
        for good in ["10.0.0.0/8", "0.0.0.0/0", "fd00::/8"] {
            assert!(is_cidr(good), "{good}");
        }
        for bad in ["10.0.0.0", "10.0.0.0/33", "fd00::/129", "ten/8", ""] {
            assert!(!is_cidr(bad), "{bad}");
        }
    }
}
