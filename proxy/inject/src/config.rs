//! What every injected proxy is given, whatever the pod: the image, the control plane's
//! addresses and identities, the trust anchors and the defaults a pod's annotations may override.

use crate::InjectError;

/// The version of this crate, which is the version of the meshlink-proxy it injects.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Linkerd's ports (`proxy.ports` in its chart), which meshlink-proxy listens on.
pub const INBOUND_PORT: u16 = 4143;
pub const OUTBOUND_PORT: u16 = 4140;
pub const ADMIN_PORT: u16 = 4191;
/// Linkerd's tap port: nothing listens on it, but proxy-init keeps skipping it, as Linkerd's
/// chart always does, so that a Linkerd tap client gets "connection refused", not a loop.
pub const CONTROL_PORT: u16 = 4190;
/// The proxy's user id (`proxy.uid`), which the init container's rules exempt.
pub const PROXY_UID: u32 = 2102;

/// The proxy's resources, as Kubernetes quantities; `None` leaves one unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

/// Everything the injector needs besides the pod. [`InjectConfig::new`] fills in the control
/// plane's addresses and identities the way `manifests/` deploys it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The image holding `meshlink-proxy`, for both the proxy and its init container.
    pub image: String,
    /// Recorded in the `linkerd.io/proxy-version` annotation.
    pub proxy_version: String,
    /// Linkerd's namespace (`linkerd`): part of every control-plane identity and the value of
    /// the `linkerd.io/control-plane-ns` label.
    pub control_plane_ns: String,
    /// The identity trust domain (`cluster.local`).
    pub trust_domain: String,
    /// The trust anchors' PEM text, given to every proxy (required).
    pub trust_anchors_pem: String,
    pub identity_addr: String,
    pub identity_name: String,
    pub destination_addr: String,
    pub destination_name: String,
    pub policy_addr: String,
    pub policy_name: String,
    /// Comma-separated networks of the cluster, for the `cluster-*` inbound policies.
    pub cluster_networks: String,
    /// `all-unauthenticated`, `all-authenticated`, `cluster-unauthenticated`,
    /// `cluster-authenticated`, `deny` or `audit`.
    pub default_inbound_policy: String,
    /// Ports whose inbound protocol is not detected unless a pod says otherwise (Linkerd's
    /// `proxy.opaquePorts`: SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch, memcached).
    pub opaque_ports: String,
    /// Inbound and outbound ports the init container's rules skip unless a pod says otherwise
    /// (Linkerd's `proxyInit.ignore{In,Out}boundPorts`: Galera's replication ports).
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    /// `LINKERD2_PROXY_LOG`, a tracing filter.
    pub log_level: String,
    /// `LINKERD2_PROXY_SHUTDOWN_GRACE_PERIOD`.
    pub shutdown_grace_period: String,
    pub resources: ProxyResources,
    /// `imagePullPolicy` of both containers; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
}

impl InjectConfig {
    /// The configuration for a control plane in `control_plane_ns` whose Services are named as
    /// in `manifests/` (`linkerd-identity:8080`, `linkerd-dst:8086`, `linkerd-policy:8090`),
    /// in a cluster whose DNS domain is `cluster_domain`.
    pub fn new(
        control_plane_ns: &str,
        trust_domain: &str,
        cluster_domain: &str,
        trust_anchors_pem: &str,
    ) -> Self {
        let svc = |name: &str, port: u16| {
            format!("{name}.{control_plane_ns}.svc.{cluster_domain}.:{port}")
        };
        // The identity a control-plane Deployment's ServiceAccount gets.
        let id = |sa: &str| {
            format!(
                "{sa}.{control_plane_ns}.serviceaccount.identity.{control_plane_ns}.{trust_domain}"
            )
        };
        Self {
            image: format!("ghcr.io/meshlink/meshlink:{VERSION}"),
            proxy_version: VERSION.to_owned(),
            control_plane_ns: control_plane_ns.to_owned(),
            trust_domain: trust_domain.to_owned(),
            trust_anchors_pem: trust_anchors_pem.to_owned(),
            identity_addr: svc("linkerd-identity", 8080),
            identity_name: id("linkerd-identity"),
            destination_addr: svc("linkerd-dst", 8086),
            destination_name: id("linkerd-destination"),
            policy_addr: svc("linkerd-policy", 8090),
            policy_name: id("linkerd-destination"),
            // Linkerd's `clusterNetworks` without fd00::/8: meshlink-proxy's inbound side
            // serves IPv4.
            cluster_networks: "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16".into(),
            default_inbound_policy: "all-unauthenticated".into(),
            opaque_ports: "25,587,3306,4444,5432,6379,9300,11211".into(),
            skip_inbound_ports: "4567,4568".into(),
            skip_outbound_ports: "4567,4568".into(),
            // meshlink-proxy's own default.
            log_level: "warn,proxy_sidecar=info,meshlink_proxy=info".into(),
            // meshlink-proxy's and Linkerd's default.
            shutdown_grace_period: "120s".into(),
            resources: ProxyResources::default(),
            image_pull_policy: None,
        }
    }

    /// Refuses a configuration that would give every proxy something it cannot start with.
    pub fn check(&self) -> Result<(), InjectError> {
        let err = |field: &'static str, reason: &str| InjectError::Config {
            field,
            reason: reason.to_owned(),
        };
        let bad = |field, reason: &str| Err(err(field, reason));
        if !self
            .trust_anchors_pem
            .contains("-----BEGIN CERTIFICATE-----")
        {
            return bad(
                "trust_anchors_pem",
                "holds no PEM certificate; give the trust anchors (ca.crt)",
            );
        }
        for (field, value) in [
            ("image", &self.image),
            ("control_plane_ns", &self.control_plane_ns),
            ("trust_domain", &self.trust_domain),
            ("identity_addr", &self.identity_addr),
            ("identity_name", &self.identity_name),
            ("destination_addr", &self.destination_addr),
            ("destination_name", &self.destination_name),
            ("policy_addr", &self.policy_addr),
            ("policy_name", &self.policy_name),
            ("log_level", &self.log_level),
            ("shutdown_grace_period", &self.shutdown_grace_period),
        ] {
            if value.trim().is_empty() || value.chars().any(char::is_whitespace) {
                return bad(field, "must be a single word");
            }
        }
        for net in self.cluster_networks.split(',').map(str::trim) {
            if !crate::overrides::is_cidr(net) {
                return bad(
                    "cluster_networks",
                    &format!("{net:?} is not a network such as 10.0.0.0/8"),
                );
            }
        }
        crate::overrides::check_policy(&self.default_inbound_policy)
            .map_err(|reason| err("default_inbound_policy", &reason))?;
        crate::overrides::check_log_level(&self.log_level)
            .map_err(|reason| err("log_level", &reason))?;
        for (field, ports) in [
            ("skip_inbound_ports", &self.skip_inbound_ports),
            ("skip_outbound_ports", &self.skip_outbound_ports),
        ] {
            crate::overrides::port_ranges(ports).map_err(|reason| err(field, &reason))?;
        }
        crate::overrides::port_ranges(&self.opaque_ports)
            .map_err(|reason| err("opaque_ports", &reason))?;
        for (field, q) in [
            ("resources.cpu_request", &self.resources.cpu_request),
            ("resources.cpu_limit", &self.resources.cpu_limit),
            ("resources.memory_request", &self.resources.memory_request),
            ("resources.memory_limit", &self.resources.memory_limit),
        ] {
            if let Some(q) = q {
                crate::overrides::quantity(q).map_err(|reason| err(field, &reason))?;
            }
        }
        Ok(())
    }
}

impl Default for InjectConfig {
    /// Linkerd's defaults (`linkerd` namespace, `cluster.local`), without trust anchors.
    fn default() -> Self {
        Self::new("linkerd", "cluster.local", "cluster.local", "")
    }
}
