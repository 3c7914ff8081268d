//! `meshlink link`: run against the target cluster, prints what links another cluster to it.
//!
//! Linkerd's flags and defaults (`linkerd multicluster link-gen`). It differs where Linkerd is
//! fragile: the kubeconfig it writes embeds the CA instead of pointing at files on the machine
//! that ran the command, and every error says what to change.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use kube::{
    Api, Client,
    api::ListParams,
    config::{Kubeconfig, NamedCluster, NamedContext},
};
use link_crd::{LabelSelector, LinkSpec, ProbeSpec, keys};
use serde_json::{Value, json};

use crate::Output;

/// The controller's manifests, printed with `--with-controller`.
const CONTROLLER_YAML: &str = include_str!("../../../manifests/mirror/controller.yaml");

/// Flags of `meshlink link`.
#[derive(clap::Args, Debug)]
pub struct LinkArgs {
    /// Name of the target cluster (the suffix of every mirror's name).
    #[arg(long)]
    pub cluster_name: String,
    /// Namespace of the Link and its credentials in the source cluster, and of the remote-access
    /// ServiceAccount in the target.
    #[arg(long, default_value = keys::DEFAULT_MULTICLUSTER_NAMESPACE)]
    pub namespace: String,
    /// API server address that the source cluster uses to reach the target (default: the one in
    /// your kubeconfig).
    #[arg(long)]
    pub api_server_address: Option<String>,
    /// The target's ServiceAccount whose token the source cluster uses.
    #[arg(long, default_value = keys::DEFAULT_REMOTE_ACCESS_SERVICE_ACCOUNT)]
    pub service_account_name: String,
    /// Name of the target's gateway Service.
    #[arg(long, default_value = keys::DEFAULT_GATEWAY_NAME)]
    pub gateway_name: String,
    /// Namespace of the target's gateway Service.
    #[arg(long, default_value = keys::DEFAULT_MULTICLUSTER_NAMESPACE)]
    pub gateway_namespace: String,
    /// Selector of the target's Services to mirror through the gateway.
    #[arg(short = 'l', long, default_value = "mirror.linkerd.io/exported=true")]
    pub selector: String,
    /// Selector of the target's Services to mirror for pod-to-pod discovery.
    #[arg(long, default_value = "mirror.linkerd.io/exported=remote-discovery")]
    pub remote_discovery_selector: String,
    /// Selector of the target's members of federated Services.
    #[arg(long, default_value = "mirror.linkerd.io/federated=member")]
    pub federated_service_selector: String,
    /// Gateway addresses to use instead of the gateway Service's load-balancer addresses
    /// (comma-separated IPs or DNS names).
    #[arg(long)]
    pub gateway_addresses: Option<String>,
    /// Gateway port to use instead of the gateway Service's `mc-gateway` port (0: that port).
    #[arg(long, default_value_t = 0)]
    pub gateway_port: u16,
    /// Annotations not copied to mirrors (`prefix/*` excludes a prefix).
    #[arg(long, value_delimiter = ',')]
    pub excluded_annotations: Vec<String>,
    /// Labels not copied to mirrors (`prefix/*` excludes a prefix).
    #[arg(long, value_delimiter = ',')]
    pub excluded_labels: Vec<String>,
    /// Whether the target has a gateway; `--gateway=false` links for remote discovery only.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub gateway: bool,
    /// The target cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Also print the service-mirror controller's Deployment and RBAC for the source cluster.
    #[arg(long)]
    pub with_controller: bool,
}

/// What can stop `meshlink link`; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "--cluster-name {0:?} must be a DNS label (lower-case letters, digits and '-'): it becomes the suffix of every mirror's name"
    )]
    ClusterName(String),
    #[error(transparent)]
    Selector(#[from] link_crd::SelectorParseError),
    #[error(
        "--{0} and --gateway=false are mutually exclusive: a Link without a gateway has no gateway selector, address or port"
    )]
    Exclusive(&'static str),
    #[error(
        "ServiceAccount {namespace}/{name} does not exist in the target cluster: apply manifests/mirror/remote-access.yaml there, or name another with --service-account-name"
    )]
    NoServiceAccount { namespace: String, name: String },
    #[error(
        "no token Secret for ServiceAccount {namespace}/{name}: apply manifests/mirror/remote-access.yaml in the target cluster (it includes one)"
    )]
    NoTokenSecret { namespace: String, name: String },
    #[error(
        "the token Secret {namespace}/{name} has no token yet: is the target's kube-controller-manager running? Try again in a few seconds"
    )]
    NoTokenData { namespace: String, name: String },
    #[error(
        "gateway Service {namespace}/{name} does not exist in the target cluster: install the gateway there, name it with --gateway-name/--gateway-namespace, or link without one with --gateway=false"
    )]
    NoGateway { namespace: String, name: String },
    #[error(
        "gateway {name}.{namespace} has no ingress addresses (its load balancer has none yet, or it is not a LoadBalancer): pass --gateway-addresses"
    )]
    NoIngress { namespace: String, name: String },
    #[error(
        "gateway {name}.{namespace} has no {annotation} annotation: add it (the gateway's TLS identity)"
    )]
    NoIdentity {
        namespace: String,
        name: String,
        annotation: &'static str,
    },
    #[error(
        "gateway {name}.{namespace} has no {annotation} annotation: add it (the path of its health endpoint, e.g. /ready)"
    )]
    NoProbePath {
        namespace: String,
        name: String,
        annotation: &'static str,
    },
    #[error("gateway service {name} has no port named {port}: add one")]
    NoPort { name: String, port: &'static str },
    #[error(
        "could not parse probe period {value:?} of gateway {name}: write a number of seconds or a duration such as \"3s\""
    )]
    ProbePeriod { name: String, value: String },
    #[error(
        "your kubeconfig has no context {0:?}: pick one of `kubectl config get-contexts` with --context"
    )]
    NoContext(String),
    #[error("your kubeconfig has no current context: pass --context")]
    NoCurrentContext,
    #[error(
        "your kubeconfig's context {context:?} names cluster {cluster:?}, which it does not define"
    )]
    NoCluster { context: String, cluster: String },
    #[error("reading the CA file {path} named by your kubeconfig: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the target cluster's API: {0}")]
    Kube(#[from] kube::Error),
}

/// Everything read from the target cluster.
#[derive(Debug)]
pub(crate) struct TargetFacts {
    pub token: String,
    pub gateway: Option<GatewayFacts>,
}

/// What the gateway Service says.
#[derive(Debug, PartialEq)]
pub(crate) struct GatewayFacts {
    pub addresses: String,
    pub port: u16,
    pub identity: String,
    pub probe: ProbeSpec,
}

/// Runs `meshlink link`: reads the target and returns the documents to print.
pub async fn run(
    args: &LinkArgs,
    client: Client,
    kubeconfig: &Kubeconfig,
    context: Option<&str>,
) -> Result<Vec<Value>, LinkError> {
    check_args(args)?;
    let facts = read_target(args, client).await?;
    let kubeconfig = trimmed_kubeconfig(
        kubeconfig,
        context,
        &args.service_account_name,
        &facts.token,
        args.api_server_address.as_deref(),
    )?;
    let docs = render(args, &facts, &kubeconfig)?;
    if !args.with_controller {
        return Ok(docs);
    }
    // The controller's manifests first: they create the namespace the Link and its Secret go in,
    // and `kubectl apply` takes documents in order.
    let mut all = controller_docs(&args.namespace);
    all.extend(docs);
    Ok(all)
}

fn check_args(args: &LinkArgs) -> Result<(), LinkError> {
    let name = &args.cluster_name;
    let label = name.len() <= 63
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Err(LinkError::ClusterName(name.clone()));
    }
    if !args.gateway {
        if args.selector != "mirror.linkerd.io/exported=true" {
            return Err(LinkError::Exclusive("selector"));
        }
        if args.gateway_addresses.is_some() {
            return Err(LinkError::Exclusive("gateway-addresses"));
        }
        if args.gateway_port != 0 {
            return Err(LinkError::Exclusive("gateway-port"));
        }
    }
    Ok(())
}

async fn read_target(args: &LinkArgs, client: Client) -> Result<TargetFacts, LinkError> {
    let ns = &args.namespace;
    let sa_name = &args.service_account_name;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    if sas.get_opt(sa_name).await?.is_none() {
        return Err(LinkError::NoServiceAccount {
            namespace: ns.clone(),
            name: sa_name.clone(),
        });
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let list = secrets
        .list(&ListParams::default().fields("type=kubernetes.io/service-account-token"))
        .await?;
    let secret = list
        .items
        .into_iter()
        .find(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubernetes.io/service-account.name"))
                == Some(sa_name)
        })
        .ok_or_else(|| LinkError::NoTokenSecret {
            namespace: ns.clone(),
            name: sa_name.clone(),
        })?;
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .and_then(|t| String::from_utf8(t.0.clone()).ok())
        .ok_or_else(|| LinkError::NoTokenData {
            namespace: ns.clone(),
            name: secret.metadata.name.clone().unwrap_or_default(),
        })?;

    let gateway =
        if args.gateway {
            let services: Api<Service> = Api::namespaced(client, &args.gateway_namespace);
            let svc = services.get_opt(&args.gateway_name).await?.ok_or_else(|| {
                LinkError::NoGateway {
                    namespace: args.gateway_namespace.clone(),
                    name: args.gateway_name.clone(),
                }
            })?;
            Some(gateway_facts(
                &svc,
                args.gateway_addresses.as_deref(),
                args.gateway_port,
            )?)
        } else {
            None
        };
    Ok(TargetFacts { token, gateway })
}

/// Reads the gateway's address, port, identity and probe from its Service, as Linkerd does.
pub(crate) fn gateway_facts(
    svc: &Service,
    addresses: Option<&str>,
    port_override: u16,
) -> Result<GatewayFacts, LinkError> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let namespace = svc.metadata.namespace.clone().unwrap_or_default();
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let spec = svc.spec.clone().unwrap_or_default();
    let node_port = spec.type_.as_deref() == Some("NodePort");
    let port_named = |port: &'static str| -> Result<u16, LinkError> {
        spec.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port))
            .and_then(|p| {
                u16::try_from(if node_port {
                    p.node_port.unwrap_or(0)
                } else {
                    p.port
                })
                .ok()
            })
            .ok_or_else(|| LinkError::NoPort {
                name: name.clone(),
                port,
            })
    };

    let addresses = match addresses {
        Some(a) => a.to_owned(),
        None => {
            let ingress: Vec<String> = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .filter(|a| !a.is_empty())
                .collect();
            if ingress.is_empty() {
                return Err(LinkError::NoIngress { namespace, name });
            }
            ingress.join(",")
        }
    };
    let identity = annotations
        .get(keys::GATEWAY_IDENTITY_ANNOTATION)
        .filter(|i| !i.is_empty())
        .cloned()
        .ok_or_else(|| LinkError::NoIdentity {
            namespace: namespace.clone(),
            name: name.clone(),
            annotation: keys::GATEWAY_IDENTITY_ANNOTATION,
        })?;
    let path = annotations
        .get(keys::GATEWAY_PROBE_PATH_ANNOTATION)
        .filter(|p| !p.is_empty())
        .cloned()
        .ok_or_else(|| LinkError::NoProbePath {
            namespace: namespace.clone(),
            name: name.clone(),
            annotation: keys::GATEWAY_PROBE_PATH_ANNOTATION,
        })?;
    let probe_port = port_named(keys::PROBE_PORT_NAME)?;
    // Linkerd's gateway annotates a bare number of seconds ("3"); the Link needs a duration.
    let raw = annotations
        .get(keys::GATEWAY_PROBE_PERIOD_ANNOTATION)
        .cloned()
        .unwrap_or_else(|| "3".to_owned());
    let period = if let Ok(secs) = raw.parse::<u64>() {
        format!("{secs}s")
    } else if valid_duration(&raw) {
        raw
    } else {
        return Err(LinkError::ProbePeriod { name, value: raw });
    };
    let port = if port_override != 0 {
        port_override
    } else {
        port_named(keys::GATEWAY_PORT_NAME)?
    };
    Ok(GatewayFacts {
        addresses,
        port,
        identity,
        probe: ProbeSpec {
            path,
            port: probe_port.to_string(),
            period,
            ..ProbeSpec::default()
        },
    })
}

fn valid_duration(s: &str) -> bool {
    let mut rest = s;
    let mut any = false;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return false;
        }
        rest = &rest[n..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .iter()
            .find(|u| rest.starts_with(**u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
        any = true;
    }
    any
}

/// The kubeconfig the source cluster uses: only the chosen context, its cluster (CA embedded,
/// server overridden when asked) and the ServiceAccount's token.
pub(crate) fn trimmed_kubeconfig(
    kubeconfig: &Kubeconfig,
    context: Option<&str>,
    user: &str,
    token: &str,
    server: Option<&str>,
) -> Result<String, LinkError> {
    let context_name = match context.or(kubeconfig.current_context.as_deref()) {
        Some(c) => c.to_owned(),
        None => return Err(LinkError::NoCurrentContext),
    };
    let NamedContext { context: ctx, .. } = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context_name)
        .cloned()
        .ok_or_else(|| LinkError::NoContext(context_name.clone()))?;
    let cluster_name = ctx.map(|c| c.cluster).unwrap_or_default();
    let NamedCluster { cluster, .. } = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .cloned()
        .ok_or_else(|| LinkError::NoCluster {
            context: context_name.clone(),
            cluster: cluster_name.clone(),
        })?;
    let cluster = cluster.unwrap_or_default();
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => Some(data.clone()),
        (None, Some(path)) => {
            let pem = std::fs::read(path).map_err(|source| LinkError::CaFile {
                path: path.clone(),
                source,
            })?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        }
        (None, None) => None,
    };
    let mut cluster_doc =
        json!({ "server": server.map(str::to_owned).or(cluster.server).unwrap_or_default() });
    if let Some(ca) = ca {
        cluster_doc["certificate-authority-data"] = json!(ca);
    }
    if cluster.insecure_skip_tls_verify == Some(true) {
        cluster_doc["insecure-skip-tls-verify"] = json!(true);
    }
    if let Some(tls_server_name) = &cluster.tls_server_name {
        cluster_doc["tls-server-name"] = json!(tls_server_name);
    }
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": cluster_name, "cluster": cluster_doc }],
        "users": [{ "name": user, "user": { "token": token } }],
        "contexts": [{ "name": context_name, "context": { "cluster": cluster_name, "user": user } }],
        "current-context": context_name,
    });
    Ok(serde_norway::to_string(&doc).unwrap_or_default())
}

/// The credentials Secret and the Link.
pub(crate) fn render(
    args: &LinkArgs,
    facts: &TargetFacts,
    kubeconfig: &str,
) -> Result<Vec<Value>, LinkError> {
    let cluster = &args.cluster_name;
    let secret_name = format!("cluster-credentials-{cluster}");
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": keys::REMOTE_KUBECONFIG_SECRET_TYPE,
        "metadata": { "name": secret_name, "namespace": args.namespace },
        "data": { keys::KUBECONFIG_SECRET_KEY: base64::engine::general_purpose::STANDARD.encode(kubeconfig) },
    });
    let mut spec = LinkSpec {
        target_cluster_name: cluster.clone(),
        target_cluster_domain: args.cluster_domain.clone(),
        target_cluster_linkerd_namespace: keys::DEFAULT_LINKERD_NAMESPACE.to_owned(),
        cluster_credentials_secret: secret_name,
        remote_discovery_selector: Some(args.remote_discovery_selector.parse::<LabelSelector>()?),
        federated_service_selector: Some(args.federated_service_selector.parse::<LabelSelector>()?),
        excluded_annotations: args.excluded_annotations.clone(),
        excluded_labels: args.excluded_labels.clone(),
        ..LinkSpec::default()
    };
    if let Some(g) = &facts.gateway {
        spec.gateway_address = g.addresses.clone();
        spec.gateway_port = g.port.to_string();
        spec.gateway_identity = g.identity.clone();
        spec.probe_spec = g.probe.clone();
        spec.selector = Some(args.selector.parse::<LabelSelector>()?);
    }
    let link = json!({
        "apiVersion": format!("{}/{}", link_crd::GROUP, link_crd::STORAGE_VERSION),
        "kind": "Link",
        "metadata": {
            "name": cluster,
            "namespace": args.namespace,
            "annotations": BTreeMap::from([(keys::CREATED_BY_ANNOTATION, keys::CLI_CREATED_BY)]),
        },
        "spec": spec,
    });
    Ok(vec![secret, link])
}

fn controller_docs(namespace: &str) -> Vec<Value> {
    let yaml = CONTROLLER_YAML.replace(keys::DEFAULT_MULTICLUSTER_NAMESPACE, namespace);
    serde_norway::Deserializer::from_str(&yaml)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Prints documents as YAML (`---` separated) or JSON (one per line).
pub fn print(docs: &[Value], output: Output) -> String {
    match output {
        Output::Yaml | Output::Table => docs
            .iter()
            .map(|d| format!("---\n{}", serde_norway::to_string(d).unwrap_or_default()))
            .collect(),
        Output::Json => docs.iter().map(|d| format!("{d}\n")).collect(),
    }
}

#[cfg(test)]
mod tests;
