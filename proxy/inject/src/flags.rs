//! The injection settings as command-line flags, shared by
//! `meshlink inject` and `meshlink-injector` so that both take the same names and defaults.

use clap::Args;

use crate::{InjectConfig, InjectError, ProxyResources, VERSION};

/// Everything [`InjectConfig`] holds, except the trust anchors, which each caller reads from
/// `--trust-anchors-file` (once for the CLI, at each admission for the webhook, so that a
/// rotated bundle is used without a restart).
#[derive(Args, Clone, Debug)]
pub struct ConfigArgs {
    /// The image holding meshlink-proxy.
    #[arg(long, default_value_t = format!("ghcr.io/meshlink/meshlink:{VERSION}"))]
    pub image: String,
    /// Recorded in the linkerd.io/proxy-version annotation.
    #[arg(long, default_value = VERSION)]
    pub proxy_version: String,
    /// The pull policy of the proxy and init containers (default: Kubernetes').
    #[arg(long)]
    pub image_pull_policy: Option<String>,
    /// The control plane's namespace.
    #[arg(
        long,
        short = 'L',
        alias = "linkerd-namespace",
        default_value = "linkerd"
    )]
    pub control_plane_namespace: String,
    /// The identity trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The cluster's DNS domain, in the control plane's Service addresses.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The identity service (default: linkerd-identity.<ns>.svc.<cluster-domain>.:8080).
    #[arg(long)]
    pub identity_addr: Option<String>,
    /// The destination service (default: linkerd-dst.<ns>.svc.<cluster-domain>.:8086).
    #[arg(long)]
    pub destination_addr: Option<String>,
    /// The policy service (default: linkerd-policy.<ns>.svc.<cluster-domain>.:8090).
    #[arg(long)]
    pub policy_addr: Option<String>,
    /// The cluster's networks, for the cluster-* inbound policies.
    #[arg(long)]
    pub cluster_networks: Option<String>,
    /// The inbound policy of ports no Server selects (pods may override it with
    /// config.linkerd.io/default-inbound-policy).
    #[arg(long)]
    pub default_inbound_policy: Option<String>,
    /// The proxy's log filter.
    #[arg(long)]
    pub proxy_log_level: Option<String>,
    /// Ports served without protocol detection, unless a pod says otherwise.
    #[arg(long)]
    pub opaque_ports: Option<String>,
    /// Inbound ports the proxy does not see, unless a pod says otherwise.
    #[arg(long)]
    pub skip_inbound_ports: Option<String>,
    /// Outbound ports the proxy does not see, unless a pod says otherwise.
    #[arg(long)]
    pub skip_outbound_ports: Option<String>,
    #[arg(long)]
    pub proxy_cpu_request: Option<String>,
    #[arg(long)]
    pub proxy_cpu_limit: Option<String>,
    #[arg(long)]
    pub proxy_memory_request: Option<String>,
    #[arg(long)]
    pub proxy_memory_limit: Option<String>,
}

impl ConfigArgs {
    /// The configuration these flags and the trust anchors `anchors_pem` give, checked.
    pub fn config(&self, anchors_pem: &str) -> Result<InjectConfig, InjectError> {
        let mut c = InjectConfig::new(
            &self.control_plane_namespace,
            &self.trust_domain,
            &self.cluster_domain,
            anchors_pem,
        );
        c.image.clone_from(&self.image);
        c.proxy_version.clone_from(&self.proxy_version);
        c.image_pull_policy.clone_from(&self.image_pull_policy);
        let set = |field: &mut String, value: &Option<String>| {
            if let Some(v) = value {
                field.clone_from(v);
            }
        };
        set(&mut c.identity_addr, &self.identity_addr);
        set(&mut c.destination_addr, &self.destination_addr);
        set(&mut c.policy_addr, &self.policy_addr);
        set(&mut c.cluster_networks, &self.cluster_networks);
        set(&mut c.default_inbound_policy, &self.default_inbound_policy);
        set(&mut c.log_level, &self.proxy_log_level);
        set(&mut c.opaque_ports, &self.opaque_ports);
        set(&mut c.skip_inbound_ports, &self.skip_inbound_ports);
        set(&mut c.skip_outbound_ports, &self.skip_outbound_ports);
        c.resources = ProxyResources {
            cpu_request: self.proxy_cpu_request.clone(),
            cpu_limit: self.proxy_cpu_limit.clone(),
            memory_request: self.proxy_memory_request.clone(),
            memory_limit: self.proxy_memory_limit.clone(),
        };
        c.check()?;
        Ok(c)
    }
}
