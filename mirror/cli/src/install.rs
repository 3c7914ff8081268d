//! `meshlink install` prints everything one cluster runs, in apply order; `meshlink uninstall`
//! prints what removes it, refusing while a Link exists (Linkerd's `install`/`uninstall`).
//!
//! ```text
//! meshlink install --identity-trust-anchors-file anchor/ca.crt \
//!     --identity-issuer-certificate-file east/issuer.crt --identity-issuer-key-file east/issuer.key \
//!     --identity-trust-domain east.cluster.local | kubectl apply --server-side -f -
//! meshlink uninstall | kubectl delete -f -
//! ```
//!
//! The output is the repository's `manifests/` (compiled in), adjusted by the flags on parsed
//! objects, never by editing text: applying it twice changes nothing, and every object it
//! names is one `uninstall` may remove.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{ArgAction, Args, ValueEnum};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind},
    discovery,
};
use link_crd::{Link, keys};
use proxy_identity::ca;
use serde_json::{Value, json};

use crate::identity::issuer_docs;

const CRD_YAML: &str = include_str!("../../../manifests/crds/link.yaml");
const IDENTITY_YAML: &str = include_str!("../../../manifests/identity/identity.yaml");
const DESTINATION_YAML: &str = include_str!("../../../manifests/destination/destination.yaml");
const INJECTOR_YAML: &str = include_str!("../../../manifests/injector/injector.yaml");
const GATEWAY_YAML: &str = include_str!("../../../manifests/gateway/gateway.yaml");
const CONTROLLER_YAML: &str = include_str!("../../../manifests/mirror/controller.yaml");
const REMOTE_ACCESS_YAML: &str = include_str!("../../../manifests/mirror/remote-access.yaml");

/// The control plane's namespace, as in every manifest.
const CONTROL_PLANE_NS: &str = "linkerd";
/// The trust domain the manifests are written for.
const MANIFEST_TRUST_DOMAIN: &str = "cluster.local";
/// Replicas of each Deployment with `--ha` (Linkerd's HA values).
const HA_REPLICAS: u32 = 3;
/// The Secret the injector keeps its CA in (it makes it; `uninstall` removes it).
const INJECTOR_CA_SECRET: &str = "linkerd-proxy-injector-ca";
/// Lifetimes of an anchor and issuer made on the spot (those of `meshlink identity`).
const ANCHOR_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const ISSUER_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The gateway Service's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ServiceType {
    #[value(name = "LoadBalancer")]
    LoadBalancer,
    #[value(name = "NodePort")]
    NodePort,
    #[value(name = "ClusterIP")]
    ClusterIp,
}

impl ServiceType {
    fn as_str(self) -> &'static str {
        match self {
            Self::LoadBalancer => "LoadBalancer",
            Self::NodePort => "NodePort",
            Self::ClusterIp => "ClusterIP",
        }
    }
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    /// The trust anchors (PEM) every linked cluster shares, from `meshlink identity anchor`.
    /// Without it (and the issuer), an anchor and issuer are made for this cluster alone.
    #[arg(long, value_name = "PATH", requires_all = ["identity_issuer_certificate_file", "identity_issuer_key_file"])]
    identity_trust_anchors_file: Option<PathBuf>,
    /// This cluster's issuer certificate, from `meshlink identity issuer`.
    #[arg(long, value_name = "PATH", requires = "identity_trust_anchors_file")]
    identity_issuer_certificate_file: Option<PathBuf>,
    /// This cluster's issuer key.
    #[arg(long, value_name = "PATH", requires = "identity_trust_anchors_file")]
    identity_issuer_key_file: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

/// What the flags ask for, apart from identity material.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The trust domain of this cluster's identities (with a per-cluster issuer from
    /// `meshlink identity issuer --cluster <name>`: <name>.cluster.local).
    #[arg(long = "identity-trust-domain", default_value = MANIFEST_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Install the multicluster gateway (a cluster others link to needs it).
    #[arg(long, default_value_t = true, action = ArgAction::Set, value_name = "BOOL")]
    pub gateway: bool,
    /// The gateway Service's port for cross-cluster traffic.
    #[arg(long, default_value_t = 4143)]
    pub gateway_port: u16,
    /// How often linked clusters probe the gateway, in seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub gateway_probe_seconds: u32,
    /// The gateway Service's port for probes.
    #[arg(long, default_value_t = 4191)]
    pub gateway_probe_port: u16,
    /// The gateway Service's type.
    #[arg(long, value_enum, default_value_t = ServiceType::LoadBalancer)]
    pub gateway_service_type: ServiceType,
    /// High availability: three replicas of each Deployment, spread over nodes, with a
    /// PodDisruptionBudget.
    #[arg(long)]
    pub ha: bool,
}

impl Default for Settings {
    /// What `meshlink install` does without flags.
    fn default() -> Self {
        <Self as clap::FromArgMatches>::from_arg_matches(
            &<Self as Args>::augment_args(clap::Command::new("install"))
                .get_matches_from(["install"]),
        )
        .expect("every setting has a default")
    }
}

fn read(path: &std::path::Path, flag: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {flag} {}", path.display()))
}

/// The manifests for this cluster; notes for the user go to `notes` (stderr).
pub fn run(args: &InstallArgs, notes: &mut impl Write) -> Result<Vec<Value>> {
    let settings = &args.settings;
    proxy_identity::Id::parse(&settings.trust_domain).with_context(|| {
        format!(
            "--identity-trust-domain {:?} must be a DNS name",
            settings.trust_domain
        )
    })?;
    let bundle_namespaces = [
        CONTROL_PLANE_NS.to_owned(),
        link_crd::keys::DEFAULT_MULTICLUSTER_NAMESPACE.to_owned(),
    ];
    let identity = match (
        &args.identity_trust_anchors_file,
        &args.identity_issuer_certificate_file,
        &args.identity_issuer_key_file,
    ) {
        (Some(anchors), Some(cert), Some(key)) => issuer_docs(
            &read(cert, "--identity-issuer-certificate-file")?,
            &read(key, "--identity-issuer-key-file")?,
            &read(anchors, "--identity-trust-anchors-file")?,
            CONTROL_PLANE_NS,
            &bundle_namespaces,
        )
        .context("the identity flags")?,
        _ => {
            let anchor = ca::new_anchor("root.linkerd.cluster.local", ANCHOR_LIFETIME)?;
            let issuer = ca::new_constrained_issuer(
                &anchor,
                &format!("identity.linkerd.{}", settings.trust_domain),
                ISSUER_LIFETIME,
                &settings.trust_domain,
            )?;
            writeln!(
                notes,
                "note: no --identity-trust-anchors-file: made a trust anchor for this cluster alone, and its key is not kept.\n\
                 Clusters can be linked only if they share one anchor: make it with `meshlink identity anchor --out anchor/`,\n\
                 an issuer per cluster with `meshlink identity issuer --anchor anchor/ --cluster <name> --out <name>/`, and pass them to\n\
                 each `meshlink install` (--identity-trust-anchors-file, --identity-issuer-certificate-file, --identity-issuer-key-file)."
            )?;
            issuer_docs(
                &issuer.cert_pem,
                &issuer.key_pem,
                &anchor.cert_pem,
                CONTROL_PLANE_NS,
                &bundle_namespaces,
            )?
        }
    };
    render(settings, identity)
}

/// Parses one embedded manifest file.
fn parse(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(yaml) {
        let value: Value =
            serde::Deserialize::deserialize(doc).context("an embedded manifest is not YAML")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// An object's identity in a cluster.
fn key(doc: &Value) -> (String, String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        s(&doc["apiVersion"]),
        s(&doc["kind"]),
        s(&doc["metadata"]["namespace"]),
        s(&doc["metadata"]["name"]),
    )
}

/// Every object one cluster needs, in apply order: Namespaces, the Link CRD, the identity
/// material, then each component's objects (identity, destination, injector, gateway, mirror
/// controller, remote access). An object several manifests declare (the Namespaces) appears
/// once, with the union of their labels and annotations.
pub fn render(settings: &Settings, identity: Vec<Value>) -> Result<Vec<Value>> {
    let mut components = vec![IDENTITY_YAML, DESTINATION_YAML, INJECTOR_YAML];
    if settings.gateway {
        components.push(GATEWAY_YAML);
    }
    components.extend([CONTROLLER_YAML, REMOTE_ACCESS_YAML]);
    let mut all = identity;
    for yaml in components {
        all.extend(parse(yaml)?);
    }
    let crd = parse(CRD_YAML)?;

    let mut namespaces: Vec<Value> = Vec::new();
    let mut rest: Vec<Value> = Vec::new();
    for mut doc in all {
        adjust(&mut doc, settings);
        let bucket = if doc["kind"] == "Namespace" {
            &mut namespaces
        } else {
            &mut rest
        };
        match bucket.iter_mut().find(|d| key(d) == key(&doc)) {
            Some(first) => merge_metadata(first, &doc),
            None => bucket.push(doc),
        }
    }
    let mut docs = namespaces;
    docs.extend(crd);
    if settings.ha {
        let budgets: Vec<Value> = rest
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .map(disruption_budget)
            .collect();
        rest.extend(budgets);
    }
    docs.extend(rest);
    Ok(docs)
}

/// Adds `other`'s labels and annotations to `first`'s.
fn merge_metadata(first: &mut Value, other: &Value) {
    for field in ["labels", "annotations"] {
        if let Some(extra) = other["metadata"][field].as_object() {
            let target = &mut first["metadata"][field];
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(target) = target.as_object_mut() {
                for (k, v) in extra {
                    target.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
}

/// The flags' changes to one object.
fn adjust(doc: &mut Value, settings: &Settings) {
    if settings.trust_domain != MANIFEST_TRUST_DOMAIN {
        retrust(doc, &settings.trust_domain);
    }
    let is = |kind: &str, name: &str| doc["kind"] == kind && doc["metadata"]["name"] == name;
    if is("Service", "linkerd-gateway") {
        doc["spec"]["type"] = json!(settings.gateway_service_type.as_str());
        doc["metadata"]["annotations"][link_crd::keys::GATEWAY_PROBE_PERIOD_ANNOTATION] =
            json!(settings.gateway_probe_seconds.to_string());
        if let Some(ports) = doc["spec"]["ports"].as_array_mut() {
            for port in ports {
                match port["name"].as_str() {
                    Some("mc-gateway") => port["port"] = json!(settings.gateway_port),
                    Some("mc-probe") => port["port"] = json!(settings.gateway_probe_port),
                    _ => {}
                }
            }
        }
    }
    if settings.ha && doc["kind"] == "Deployment" {
        doc["spec"]["replicas"] = json!(HA_REPLICAS);
        let labels = doc["spec"]["selector"]["matchLabels"].clone();
        doc["spec"]["template"]["spec"]["affinity"] = json!({
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": { "matchLabels": labels },
                    },
                }],
            },
        });
    }
}

/// Rewrites every identity and trust-domain setting of `doc` for `domain`: strings that end
/// with the manifests' identity suffix, and the trust-domain variables and flags.
fn retrust(doc: &mut Value, domain: &str) {
    let suffix = format!(".identity.{CONTROL_PLANE_NS}.{MANIFEST_TRUST_DOMAIN}");
    let flag = format!("--trust-domain={MANIFEST_TRUST_DOMAIN}");
    match doc {
        Value::Array(items) => items.iter_mut().for_each(|i| retrust(i, domain)),
        Value::Object(map) => {
            if map.get("name").and_then(Value::as_str) == Some("MESHLINK_TRUST_DOMAIN")
                && map.contains_key("value")
            {
                map.insert("value".into(), json!(domain));
            }
            map.values_mut().for_each(|i| retrust(i, domain));
        }
        Value::String(s) if s.ends_with(&suffix) => {
            let head = &s[..s.len() - suffix.len()];
            *s = format!("{head}.identity.{CONTROL_PLANE_NS}.{domain}");
        }
        Value::String(s) if *s == flag => *s = format!("--trust-domain={domain}"),
        _ => {}
    }
}

/// A PodDisruptionBudget that keeps all but one of `deployment`'s Pods through a drain.
fn disruption_budget(deployment: &Value) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": deployment["metadata"]["name"],
            "namespace": deployment["metadata"]["namespace"],
            "labels": deployment["metadata"]["labels"],
        },
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": deployment["spec"]["selector"]["matchLabels"] },
        },
    })
}

#[derive(Args, Debug)]
pub struct UninstallArgs {}

/// What removes meshlink from the cluster `client` reaches: every object `install` makes that
/// exists there (and the injector's CA Secret), Namespaces last; refused while any Link
/// exists, since removing the CRD would delete it without its controller cleaning up.
pub async fn uninstall(_args: &UninstallArgs, client: Client) -> Result<Vec<Value>> {
    let links: Api<Link> = Api::all(client.clone());
    match links.list(&Default::default()).await {
        Ok(list) if !list.items.is_empty() => {
            let mut message =
                "Please unlink the following clusters before uninstalling meshlink:\n".to_owned();
            for link in &list.items {
                message.push_str(&format!(
                    "  * {} (Link {}/{})\n",
                    link.spec.target_cluster_name,
                    link.namespace().unwrap_or_default(),
                    link.name_any()
                ));
            }
            message.push_str(
                "with `meshlink unlink --cluster-name <name> | kubectl delete -f -` in this cluster",
            );
            bail!(message);
        }
        Ok(_) => {}
        // No Link CRD: nothing can be linked.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => return Err(error).context("listing Links"),
    }
    // The identity material's objects by name (their contents do not matter here).
    let identity = vec![
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": keys::ISSUER_SECRET, "namespace": CONTROL_PLANE_NS } }),
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": INJECTOR_CA_SECRET, "namespace": CONTROL_PLANE_NS } }),
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": keys::TRUST_ROOTS_CONFIGMAP, "namespace": CONTROL_PLANE_NS } }),
        json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": keys::TRUST_ROOTS_CONFIGMAP, "namespace": keys::DEFAULT_MULTICLUSTER_NAMESPACE } }),
    ];
    let settings = Settings {
        ha: true,
        ..Settings::default()
    };
    let docs = render(&settings, identity)?;
    // The reverse of apply order: what is in a Namespace before it, the Namespaces last.
    let mut present = Vec::new();
    for doc in docs.iter().rev() {
        if exists(&client, doc).await? {
            present.push(stub(doc));
        }
    }
    Ok(present)
}

/// The object's identity only, for `kubectl delete -f -`.
fn stub(doc: &Value) -> Value {
    let mut metadata = json!({ "name": doc["metadata"]["name"] });
    if let Some(ns) = doc["metadata"]["namespace"].as_str() {
        metadata["namespace"] = json!(ns);
    }
    json!({ "apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": metadata })
}

async fn exists(client: &Client, doc: &Value) -> Result<bool> {
    let (api_version, kind, namespace, name) = key(doc);
    let (group, version) = api_version
        .split_once('/')
        .unwrap_or(("", api_version.as_str()));
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let (resource, caps) = match discovery::pinned_kind(client, &gvk).await {
        Ok(found) => found,
        // A kind the cluster does not serve has no objects.
        Err(kube::Error::Discovery(_)) => return Ok(false),
        Err(error) => {
            return Err(error).with_context(|| format!("looking up {api_version} {kind}"));
        }
    };
    let api: Api<DynamicObject> = match caps.scope {
        discovery::Scope::Namespaced => Api::namespaced_with(client.clone(), &namespace, &resource),
        discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    Ok(api
        .get_opt(&name)
        .await
        .with_context(|| format!("reading {kind} {namespace}/{name}"))?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn rendered(settings: &Settings) -> Vec<Value> {
        render(settings, Vec::new()).unwrap()
    }

    #[test]
    fn order_and_uniqueness() {
        let docs = rendered(&Settings::default());
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        // Namespaces, then the CRD, before anything that lives in them or uses it.
        let first_other = kinds.iter().position(|k| *k != "Namespace").unwrap();
        assert!(kinds[..first_other].len() >= 2, "{kinds:?}");
        assert_eq!(kinds[first_other], "CustomResourceDefinition");
        assert!(!kinds[first_other + 1..].contains(&"Namespace"));
        let mut keys: Vec<_> = docs.iter().map(key).collect();
        let total = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), total, "every object once");
        // The linkerd Namespace carries every manifest's labels.
        let ns = find(&docs, "Namespace", "linkerd").unwrap();
        assert_eq!(
            ns["metadata"]["labels"]["config.linkerd.io/admission-webhooks"],
            "disabled"
        );
        assert_eq!(
            ns["metadata"]["labels"]["linkerd.io/control-plane-ns"],
            "linkerd"
        );
        for (kind, name) in [
            ("Deployment", "linkerd-identity"),
            ("Deployment", "linkerd-destination"),
            ("Deployment", "linkerd-proxy-injector"),
            (
                "MutatingWebhookConfiguration",
                "linkerd-proxy-injector-webhook-config",
            ),
            ("Deployment", "linkerd-gateway"),
            ("Deployment", "meshlink-service-mirror"),
            (
                "ServiceAccount",
                "linkerd-service-mirror-remote-access-default",
            ),
        ] {
            assert!(find(&docs, kind, name).is_some(), "{kind} {name}");
        }
    }

    #[test]
    fn flags() {
        let default = rendered(&Settings::default());
        let settings = Settings {
            trust_domain: "east.cluster.local".into(),
            gateway_port: 4000,
            gateway_probe_seconds: 10,
            gateway_probe_port: 4000 + 191,
            gateway_service_type: ServiceType::NodePort,
            ..Settings::default()
        };
        let docs = rendered(&settings);
        let svc = find(&docs, "Service", "linkerd-gateway").unwrap();
        assert_eq!(svc["spec"]["type"], "NodePort");
        assert_eq!(
            svc["metadata"]["annotations"]["mirror.linkerd.io/probe-period"],
            "10"
        );
        let ports = svc["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports[0]["port"], 4000);
        assert_eq!(ports[1]["port"], 4191);
        // The container still listens where it always does.
        assert_eq!(ports[0]["targetPort"], 4143);
        assert_eq!(
            svc["metadata"]["annotations"]["mirror.linkerd.io/gateway-identity"],
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.cluster.local"
        );
        // Every identity and trust-domain setting moved; nothing else did.
        let text = serde_json::to_string(&docs).unwrap();
        assert!(
            !text.contains("identity.linkerd.cluster.local"),
            "an identity kept the default domain"
        );
        assert!(!text.contains("--trust-domain=cluster.local"));
        for (doc, before) in docs.iter().zip(&default) {
            let trust: Vec<_> = containers_env(doc, "MESHLINK_TRUST_DOMAIN");
            assert!(trust.iter().all(|v| v == "east.cluster.local"), "{trust:?}");
            if doc["kind"] != "Service"
                && !serde_json::to_string(before)
                    .unwrap()
                    .contains("cluster.local")
            {
                assert_eq!(doc, before, "an object without identities is unchanged");
            }
        }
        // Without the gateway, nothing of it is printed.
        let docs = rendered(&Settings {
            gateway: false,
            ..Settings::default()
        });
        assert!(find(&docs, "Deployment", "linkerd-gateway").is_none());
        assert!(find(&docs, "Service", "linkerd-gateway").is_none());
        assert!(find(&docs, "Namespace", "linkerd-multicluster").is_some());
    }

    fn containers_env(doc: &Value, name: &str) -> Vec<String> {
        doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|c| c["env"].as_array().into_iter().flatten())
            .filter(|e| e["name"] == name)
            .map(|e| e["value"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn every_program_is_this_version() {
        let want = format!("ghcr.io/meshlink/meshlink:{}", env!("CARGO_PKG_VERSION"));
        for d in rendered(&Settings::default()) {
            for c in d["spec"]["template"]["spec"]["containers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                assert_eq!(
                    c["image"],
                    want.as_str(),
                    "{} {}",
                    d["kind"],
                    d["metadata"]["name"]
                );
                assert!(
                    c["command"][0]
                        .as_str()
                        .is_some_and(|p| p.starts_with("meshlink-"))
                );
            }
        }
    }

    #[test]
    fn high_availability() {
        let docs = rendered(&Settings {
            ha: true,
            ..Settings::default()
        });
        let deployments: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Deployment").collect();
        assert!(deployments.len() >= 5);
        for d in deployments {
            let name = d["metadata"]["name"].as_str().unwrap();
            assert_eq!(d["spec"]["replicas"], 3, "{name}");
            let affinity = &d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
            assert_eq!(
                affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["labelSelector"]
                    ["matchLabels"],
                d["spec"]["selector"]["matchLabels"],
                "{name}"
            );
            let pdb = find(&docs, "PodDisruptionBudget", name).unwrap();
            assert_eq!(pdb["metadata"]["namespace"], d["metadata"]["namespace"]);
            assert_eq!(
                pdb["spec"]["selector"]["matchLabels"],
                d["spec"]["selector"]["matchLabels"]
            );
        }
        assert!(
            rendered(&Settings::default())
                .iter()
                .all(|d| d["kind"] != "PodDisruptionBudget")
        );
    }

    #[test]
    fn made_on_the_spot_identity_says_it_must_be_shared() {
        let args = InstallArgs {
            identity_trust_anchors_file: None,
            identity_issuer_certificate_file: None,
            identity_issuer_key_file: None,
            settings: Settings {
                trust_domain: "west.cluster.local".into(),
                ..Settings::default()
            },
        };
        let mut notes = Vec::new();
        let docs = run(&args, &mut notes).unwrap();
        let notes = String::from_utf8(notes).unwrap();
        assert!(notes.contains("meshlink identity anchor"), "{notes}");
        let issuer = find(&docs, "Secret", "linkerd-identity-issuer").unwrap();
        assert!(
            issuer["data"]["tls.key"]
                .as_str()
                .is_some_and(|k| !k.is_empty())
        );
        let roots = find(&docs, "ConfigMap", "linkerd-identity-trust-roots").unwrap();
        assert!(
            roots["data"]["ca-bundle.crt"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
    }

    #[test]
    fn identity_flags_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let anchor = ca::new_anchor("a", ANCHOR_LIFETIME).unwrap();
        let other = ca::new_anchor("b", ANCHOR_LIFETIME).unwrap();
        let issuer =
            ca::new_issuer(&other, "identity.linkerd.cluster.local", ISSUER_LIFETIME).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let args = InstallArgs {
            identity_trust_anchors_file: Some(write("ca.crt", &anchor.cert_pem)),
            identity_issuer_certificate_file: Some(write("issuer.crt", &issuer.cert_pem)),
            identity_issuer_key_file: Some(write("issuer.key", &issuer.key_pem)),
            settings: Settings {
                trust_domain: MANIFEST_TRUST_DOMAIN.into(),
                ..Settings::default()
            },
        };
        let error = format!("{:#}", run(&args, &mut Vec::new()).unwrap_err());
        assert!(
            error.contains("does not chain to the given anchors"),
            "{error}"
        );
    }
}
