//! The proxy's configuration: Linkerd's `LINKERD2_PROXY_*` environment, read through [`Env`] so
//! that tests feed it a map, and checked whole before any socket is bound. Every error names
//! the variable and says what it should hold.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use ipnet::IpNet;
use proxy_discovery::DefaultPolicy;
use proxy_identity::{Id, IdentityOptions};

/// Where configuration comes from.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// A variable that is missing or unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is required: {1}")]
    Missing(&'static str, &'static str),
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// A control-plane service: its address and, unless it is on loopback, the identity its
/// certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlAddr {
    pub addr: String,
    pub name: Option<Id>,
}

/// Timeouts of one side (inbound or outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Time for a client's first bytes to tell the protocol.
    pub detect: Duration,
    pub connect: Duration,
    /// How long a request waits for a ready endpoint before it fails (503).
    pub failfast: Duration,
    /// A connection with no byte either way for this long is closed.
    pub idle: Duration,
}

/// Everything the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub identity: IdentityOptions,
    pub destination: ControlAddr,
    /// Sent with every lookup (`LINKERD2_PROXY_DESTINATION_CONTEXT`).
    pub destination_context: String,
    pub policy: ControlAddr,
    /// This pod, as the policy service knows it (`{"ns":…,"pod":…}`).
    pub workload: String,
    pub default_policy: DefaultPolicy,
    /// The application's ports, whose policy is watched from the start.
    pub inbound_ports: Vec<u16>,
    /// Ports that are opaque without detection, whatever the policy says.
    pub inbound_opaque_ports: Vec<u16>,
    pub inbound: Timeouts,
    pub outbound: Timeouts,
    /// How long a target's discovery and balancer outlive their last connection.
    pub discovery_idle_timeout: Duration,
    /// Connections each side holds at once; past it, new ones wait in the backlog.
    pub max_connections: usize,
    pub shutdown_grace_period: Duration,
    pub cores: usize,
    pub log: String,
    /// Networks that may read /metrics over plain HTTP, besides loopback.
    pub metrics_networks: Vec<IpNet>,
    /// Identities that may read /metrics over mTLS (default: Linkerd viz's Prometheus).
    pub metrics_identities: Vec<Id>,
}

struct Reader<'a, E: Env>(&'a E);

impl<E: Env> Reader<'_, E> {
    fn raw(&self, var: &'static str) -> Option<String> {
        self.0.get(var).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, var: &'static str, what: &'static str) -> Result<String, ConfigError> {
        self.raw(var).ok_or(ConfigError::Missing(var, what))
    }

    fn parse<T>(&self, var: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => parse_as(var, &v),
        }
    }

    fn duration(&self, var: &'static str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(var) {
            None => Ok(default),
            Some(value) => {
                humantime::parse_duration(value.trim()).map_err(|e| ConfigError::Invalid {
                    var,
                    value,
                    reason: format!("{e}; write a duration such as 500ms, 10s or 2m"),
                })
            }
        }
    }

    fn list<T>(&self, var: &'static str) -> Result<Vec<T>, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        self.raw(var)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| parse_as(var, s))
                    .collect()
            })
            .unwrap_or(Ok(Vec::new()))
    }

    /// `<var>_ADDR` and `<var>_NAME`; the name is required unless the address is loopback (where
    /// Linkerd's proxy speaks plaintext).
    fn control(
        &self,
        addr_var: &'static str,
        name_var: &'static str,
    ) -> Result<ControlAddr, ConfigError> {
        let addr = self.required(addr_var, "the service's host:port")?;
        let name = match self.raw(name_var) {
            Some(n) => Some(parse_as::<Id>(name_var, &n)?),
            None if is_loopback(&addr) => None,
            None => {
                return Err(ConfigError::Missing(
                    name_var,
                    "the identity of the service at a non-loopback address",
                ));
            }
        };
        Ok(ControlAddr { addr, name })
    }
}

fn parse_as<T>(var: &'static str, value: &str) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e: T::Err| ConfigError::Invalid {
            var,
            value: value.to_owned(),
            reason: e.to_string(),
        })
}

fn is_loopback(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Reads and checks the whole configuration.
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let r = Reader(env);
        if r.raw("LINKERD2_PROXY_IDENTITY_DISABLED").is_some() {
            return Err(ConfigError::Invalid {
                var: "LINKERD2_PROXY_IDENTITY_DISABLED",
                value: r
                    .raw("LINKERD2_PROXY_IDENTITY_DISABLED")
                    .unwrap_or_default(),
                reason: "identity cannot be disabled; remove the variable".into(),
            });
        }
        let identity_svc = r.control(
            "LINKERD2_PROXY_IDENTITY_SVC_ADDR",
            "LINKERD2_PROXY_IDENTITY_SVC_NAME",
        )?;
        let identity = IdentityOptions {
            local_name: parse_as(
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
                &r.required(
                    "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
                    "this workload's identity",
                )?,
            )?,
            trust_anchors: Some(r.required(
                "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS",
                "the trust anchors' PEM text",
            )?),
            trust_anchors_file: None,
            identity_addr: identity_svc.addr,
            identity_name: identity_svc.name.ok_or(ConfigError::Missing(
                "LINKERD2_PROXY_IDENTITY_SVC_NAME",
                "the identity service's identity",
            ))?,
            token_file: PathBuf::from(r.required(
                "LINKERD2_PROXY_IDENTITY_TOKEN_FILE",
                "the path of the ServiceAccount token sent to the identity service",
            )?),
            min_refresh: r.duration("LINKERD2_PROXY_IDENTITY_MIN_REFRESH", secs(10))?,
            max_refresh: r.duration("LINKERD2_PROXY_IDENTITY_MAX_REFRESH", secs(24 * 3600))?,
        };
        let cluster_networks: Vec<IpNet> = match r.raw("LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS") {
            Some(_) => r.list("LINKERD2_PROXY_POLICY_CLUSTER_NETWORKS")?,
            None => Vec::new(),
        };
        let default_policy = match r.raw("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY") {
            None => DefaultPolicy::AllUnauthenticated,
            Some(v) => {
                let policy =
                    v.trim()
                        .parse::<DefaultPolicy>()
                        .map_err(|reason| ConfigError::Invalid {
                            var: "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                            value: v.clone(),
                            reason: reason.to_string(),
                        })?;
                // Linkerd's cluster networks unless the variable names others.
                if cluster_networks.is_empty() {
                    policy
                } else {
                    policy.with_cluster_networks(cluster_networks)
                }
            }
        };
        let cores = r.parse("LINKERD2_PROXY_CORES", 1usize)?;
        if !(1..=256).contains(&cores) {
            return Err(ConfigError::Invalid {
                var: "LINKERD2_PROXY_CORES",
                value: cores.to_string(),
                reason: "must be between 1 and 256".into(),
            });
        }
        let max_connections = r.parse("MESHLINK_PROXY_MAX_CONNECTIONS", 10_000usize)?;
        if max_connections == 0 {
            return Err(ConfigError::Invalid {
                var: "MESHLINK_PROXY_MAX_CONNECTIONS",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        Ok(Self {
            inbound_addr: r.parse("LINKERD2_PROXY_INBOUND_LISTEN_ADDR", addr("0.0.0.0:4143"))?,
            outbound_addr: r.parse(
                "LINKERD2_PROXY_OUTBOUND_LISTEN_ADDR",
                addr("127.0.0.1:4140"),
            )?,
            admin_addr: r.parse("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", addr("127.0.0.1:4191"))?,
            identity,
            destination: r.control(
                "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
                "LINKERD2_PROXY_DESTINATION_SVC_NAME",
            )?,
            destination_context: r
                .raw("LINKERD2_PROXY_DESTINATION_CONTEXT")
                .unwrap_or_default(),
            policy: r.control(
                "LINKERD2_PROXY_POLICY_SVC_ADDR",
                "LINKERD2_PROXY_POLICY_SVC_NAME",
            )?,
            workload: r.required(
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                "this pod for the policy service, as {\"ns\":\"<namespace>\",\"pod\":\"<name>\"}",
            )?,
            default_policy,
            inbound_ports: r.list("LINKERD2_PROXY_INBOUND_PORTS")?,
            inbound_opaque_ports: r
                .list("LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION")?,
            // Linkerd's defaults (linkerd/app/src/env.rs).
            inbound: Timeouts {
                detect: r.duration("LINKERD2_PROXY_INBOUND_DETECT_TIMEOUT", secs(10))?,
                connect: r.duration("LINKERD2_PROXY_INBOUND_CONNECT_TIMEOUT", ms(300))?,
                failfast: r.duration("LINKERD2_PROXY_INBOUND_HTTP_FAILFAST_TIMEOUT", secs(1))?,
                idle: r.duration("MESHLINK_PROXY_INBOUND_IDLE_TIMEOUT", secs(3600))?,
            },
            outbound: Timeouts {
                detect: r.duration("LINKERD2_PROXY_OUTBOUND_DETECT_TIMEOUT", secs(10))?,
                connect: r.duration("LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT", secs(1))?,
                failfast: r.duration("LINKERD2_PROXY_OUTBOUND_HTTP_FAILFAST_TIMEOUT", secs(3))?,
                idle: r.duration("MESHLINK_PROXY_OUTBOUND_IDLE_TIMEOUT", secs(3600))?,
            },
            discovery_idle_timeout: r
                .duration("LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT", secs(5))?,
            max_connections,
            shutdown_grace_period: r.duration("LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD", secs(120))?,
            cores,
            log: r
                .raw("LINKERD2_PROXY_LOG")
                .unwrap_or_else(|| "warn,proxy_sidecar=info,meshlink_proxy=info".into()),
            metrics_networks: r.list("MESHLINK_METRICS_NETWORKS")?,
            metrics_identities: r.list("MESHLINK_METRICS_IDENTITIES")?,
        })
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn ms(s: u64) -> Duration {
    Duration::from_millis(s)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BTreeMap<String, String> {
        [
            (
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
                "web.shop.serviceaccount.identity.linkerd.cluster.local",
            ),
            ("LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS", "-----BEGIN…"),
            ("LINKERD2_PROXY_IDENTITY_SVC_ADDR", "10.0.0.5:8080"),
            (
                "LINKERD2_PROXY_IDENTITY_SVC_NAME",
                "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
            ),
            ("LINKERD2_PROXY_IDENTITY_TOKEN_FILE", "/var/run/token"),
            ("LINKERD2_PROXY_DESTINATION_SVC_ADDR", "127.0.0.1:8086"),
            ("LINKERD2_PROXY_POLICY_SVC_ADDR", "127.0.0.1:8090"),
            (
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                r#"{"ns":"shop","pod":"web-0"}"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn defaults_are_linkerds() {
        let c = Config::from_env(&base()).unwrap();
        assert_eq!(c.inbound_addr, addr("0.0.0.0:4143"));
        assert_eq!(c.outbound_addr, addr("127.0.0.1:4140"));
        assert_eq!(c.admin_addr, addr("127.0.0.1:4191"));
        assert_eq!(c.outbound.connect, ms(1000));
        assert_eq!(c.inbound.connect, ms(300));
        assert_eq!(c.outbound.failfast, secs(3));
        assert_eq!(c.discovery_idle_timeout, secs(5));
        assert_eq!(c.default_policy, DefaultPolicy::AllUnauthenticated);
        assert_eq!(c.cores, 1);
        // A loopback control plane needs no name (plaintext, as Linkerd).
        assert_eq!(c.destination.name, None);
    }

    #[test]
    fn each_error_names_its_variable() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
                None,
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME is required",
            ),
            (
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME",
                Some("Not An Id!"),
                "LINKERD2_PROXY_IDENTITY_LOCAL_NAME=\"Not An Id!\" is invalid",
            ),
            (
                "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
                None,
                "LINKERD2_PROXY_DESTINATION_SVC_ADDR is required",
            ),
            (
                "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
                Some("10.0.0.9:8086"),
                "LINKERD2_PROXY_DESTINATION_SVC_NAME is required",
            ),
            (
                "LINKERD2_PROXY_POLICY_WORKLOAD",
                None,
                "LINKERD2_PROXY_POLICY_WORKLOAD is required",
            ),
            (
                "LINKERD2_PROXY_INBOUND_LISTEN_ADDR",
                Some("4143"),
                "LINKERD2_PROXY_INBOUND_LISTEN_ADDR=\"4143\" is invalid",
            ),
            (
                "LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT",
                Some("fast"),
                "LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT=\"fast\" is invalid",
            ),
            (
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY",
                Some("allow"),
                "LINKERD2_PROXY_INBOUND_DEFAULT_POLICY=\"allow\" is invalid",
            ),
            (
                "LINKERD2_PROXY_INBOUND_PORTS",
                Some("8080,http"),
                "LINKERD2_PROXY_INBOUND_PORTS=\"http\" is invalid",
            ),
            (
                "LINKERD2_PROXY_CORES",
                Some("0"),
                "LINKERD2_PROXY_CORES=\"0\" is invalid",
            ),
            (
                "LINKERD2_PROXY_IDENTITY_DISABLED",
                Some("true"),
                "identity cannot be disabled",
            ),
        ];
        for (var, value, expected) in cases {
            let mut env = base();
            match value {
                Some(v) => env.insert((*var).to_owned(), (*v).to_owned()),
                None => env.remove(*var),
            };
            let error = Config::from_env(&env).unwrap_err().to_string();
            assert!(error.contains(expected), "{var}={value:?}: {error}");
        }
    }

    #[test]
    fn reads_what_linkerd_injects() {
        let mut env = base();
        for (k, v) in [
            ("LINKERD2_PROXY_INBOUND_PORTS", "8080, 9090"),
            ("LINKERD2_PROXY_INBOUND_DEFAULT_POLICY", "all-authenticated"),
            ("LINKERD2_PROXY_OUTBOUND_CONNECT_TIMEOUT", "250ms"),
            ("LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD", "30s"),
            ("LINKERD2_PROXY_CORES", "2"),
            ("LINKERD2_PROXY_ADMIN_LISTEN_ADDR", "0.0.0.0:4191"),
            (
                "LINKERD2_PROXY_DESTINATION_SVC_ADDR",
                "linkerd-dst-headless.linkerd.svc.cluster.local.:8086",
            ),
            (
                "LINKERD2_PROXY_DESTINATION_SVC_NAME",
                "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local",
            ),
        ] {
            env.insert(k.into(), v.into());
        }
        let c = Config::from_env(&env).unwrap();
        assert_eq!(c.inbound_ports, [8080, 9090]);
        assert_eq!(c.default_policy, DefaultPolicy::AllAuthenticated);
        assert_eq!(c.outbound.connect, ms(250));
        assert_eq!(c.shutdown_grace_period, secs(30));
        assert_eq!(c.cores, 2);
        assert!(c.destination.name.is_some());
    }
}
