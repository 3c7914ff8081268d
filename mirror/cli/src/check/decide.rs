//! What each check decides, as pure functions over the facts `gather` read: no client, no
//! clock (the time is a fact too), so that every outcome is a table test.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use link_crd::{
    CONDITION_GATEWAY_ALIVE, CONDITION_REMOTE_REACHABLE, ConditionStatus, Link, LinkCondition, keys,
};
use x509_parser::{certificate::X509Certificate, pem::Pem, prelude::FromDer};

/// The `linkerd.io/created-by` value `meshlink link` writes, for this version.
pub(crate) const CLI_CREATED_BY: &str = keys::CLI_CREATED_BY;

/// The control-plane namespace and the identity objects `meshlink identity manifests` prints.
pub(crate) const LINKERD_NAMESPACE: &str = keys::DEFAULT_LINKERD_NAMESPACE;
pub(crate) const ISSUER_SECRET: &str = keys::ISSUER_SECRET;
pub(crate) const ISSUER_CERT_KEY: &str = "tls.crt";
pub(crate) const TRUST_ROOTS_CONFIGMAP: &str = keys::TRUST_ROOTS_CONFIGMAP;
pub(crate) const TRUST_ROOTS_KEY: &str = keys::TRUST_ROOTS_KEY;
/// Linkerd's names for the destination and proxy-injector Services and the webhook.
pub(crate) const DESTINATION_SERVICE: &str = "linkerd-dst";
pub(crate) const INJECTOR_WEBHOOK: &str = "linkerd-proxy-injector-webhook-config";
/// The container the injector adds (Linkerd's name).
pub(crate) const PROXY_CONTAINER: &str = "linkerd-proxy";
/// The controller's Leases (mirror/controller `run`): one per Link for a controller started
/// with `--link` (Linkerd's name), one for a controller of every Link in its namespace.
pub(crate) const LINK_LEASE_PREFIX: &str = keys::CONTROLLER_LEASE_PREFIX;
pub(crate) const SHARED_LEASE: &str = keys::SHARED_CONTROLLER_LEASE;

/// How long before its expiry an issuer is reported (Linkerd's "valid for at least 60 days").
pub(crate) const ISSUER_EXPIRY_WARNING: SignedDuration = SignedDuration::from_hours(60 * 24);

/// An API call that failed: its HTTP status when there was one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ApiFailure {
    pub code: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} (HTTP {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// What one or more API calls returned.
pub(crate) type Fetched<T> = Result<T, ApiFailure>;

/// `namespace`, `name` of a Link.
pub(crate) type LinkKey = (String, String);

/// ConfigMap linkerd/linkerd-identity-trust-roots (it exists; its bundle may not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TrustRoots {
    pub bundle: Option<String>,
}

/// Secret linkerd/linkerd-identity-issuer (it exists; its certificate may not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Issuer {
    pub cert_pem: Option<String>,
}

/// The endpoints of a Service, from its EndpointSlices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Readiness {
    pub ready: usize,
    pub not_ready: usize,
}

/// The injector's MutatingWebhookConfiguration: each webhook's name and whether its
/// `clientConfig.caBundle` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Webhook {
    pub webhooks: Vec<(String, bool)>,
}

/// A Link as listed, and whether it reads as one.
#[derive(Clone, Debug)]
pub(crate) struct RawLink {
    pub namespace: String,
    pub name: String,
    pub created_by: Option<String>,
    pub link: Result<Link, String>,
}

/// What a Link's credentials give, read with them from the target cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Remote {
    /// Building a client from the credentials Secret (`mirror-credentials`' refusals included).
    pub client: Result<(), String>,
    /// `/version` of the target; `None` when there was no client.
    pub version: Option<Fetched<String>>,
    /// SelfSubjectAccessReviews for each verb on Services, cluster-wide.
    pub services: Vec<(&'static str, Fetched<bool>)>,
    /// The target's trust roots, from `targetClusterLinkerdNamespace`; `None` without a client.
    pub anchors: Option<Fetched<Option<TrustRoots>>>,
    pub anchors_namespace: String,
}

/// What a controller's ServiceAccount may do: each required permission and the answer of its
/// SubjectAccessReview.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AccountAccess {
    /// `namespace/name`.
    pub account: String,
    pub answers: Vec<(String, Fetched<bool>)>,
}

/// A Lease of the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeaseFact {
    pub name: String,
    pub holder: Option<String>,
    pub renewed: Option<Timestamp>,
    pub duration_seconds: Option<i32>,
}

/// A Service labelled `mirror.linkerd.io/mirrored-service=true`, and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mirror {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub endpoints: Fetched<Readiness>,
}

/// Everything the checks decide over.
#[derive(Debug)]
pub(crate) struct Facts {
    pub now: Timestamp,
    pub trust_roots: Fetched<Option<TrustRoots>>,
    pub issuer: Fetched<Option<Issuer>>,
    /// Service linkerd/linkerd-dst (`None`: it does not exist).
    pub destination: Fetched<Option<Readiness>>,
    /// Service linkerd-multicluster/linkerd-gateway.
    pub gateway: Fetched<Option<Readiness>>,
    pub injector_webhook: Fetched<Option<Webhook>>,
    /// The containers of a server-side dry-run Pod annotated for injection; `None` when not
    /// tried (no webhook).
    pub injector_dry_run: Option<Fetched<Vec<String>>>,
    pub links: Fetched<Vec<RawLink>>,
    pub remotes: BTreeMap<LinkKey, Remote>,
    /// Per Link: its controllers' ServiceAccounts (none found: empty).
    pub rbac: BTreeMap<LinkKey, Fetched<Vec<AccountAccess>>>,
    /// Per namespace of Links: the controller's Leases there.
    pub leases: BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    pub mirrors: Fetched<Vec<Mirror>>,
    /// Every Pod, with its namespace's labels and annotations.
    pub pods: Fetched<Vec<PodFact>>,
}

/// A Pod and its namespace's metadata, for the check that Pods asking for the proxy have it.
#[derive(Clone, Debug, Default)]
pub(crate) struct PodFact {
    pub pod: k8s_openapi::api::core::v1::Pod,
    pub namespace_labels: BTreeMap<String, String>,
    pub namespace_annotations: BTreeMap<String, String>,
}

impl Facts {
    /// Nothing installed, nothing linked: what `gather` starts from.
    pub(crate) fn empty() -> Self {
        Self {
            now: Timestamp::UNIX_EPOCH,
            trust_roots: Ok(None),
            issuer: Ok(None),
            destination: Ok(None),
            gateway: Ok(None),
            injector_webhook: Ok(None),
            injector_dry_run: None,
            links: Ok(Vec::new()),
            remotes: BTreeMap::new(),
            rbac: BTreeMap::new(),
            leases: BTreeMap::new(),
            mirrors: Ok(Vec::new()),
            pods: Ok(Vec::new()),
        }
    }
}

/// What a check found: details to show on success, what is wrong on failure, why it did not
/// apply when skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Pass(Vec<String>),
    Fail(Vec<String>),
    Skip(String),
}

fn fail(line: impl Into<String>) -> Outcome {
    Outcome::Fail(vec![line.into()])
}

fn pass(line: impl Into<String>) -> Outcome {
    Outcome::Pass(vec![line.into()])
}

/// The finding about one object of a check over many (each Link, each mirror).
enum Item {
    Ok(String),
    Bad(String),
    Skipped(String),
}

/// A check over many objects fails when one is bad, passes when one is fine, and is skipped
/// when none applies (`none`: there was nothing at all).
fn combine(items: Vec<Item>, none: &str) -> Outcome {
    if items.is_empty() {
        return Outcome::Skip(none.to_owned());
    }
    let (mut ok, mut bad, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for item in items {
        match item {
            Item::Ok(s) => ok.push(s),
            Item::Bad(s) => bad.push(s),
            Item::Skipped(s) => skipped.push(s),
        }
    }
    if !bad.is_empty() {
        return Outcome::Fail(bad);
    }
    if ok.is_empty() {
        return Outcome::Skip(skipped.join("; "));
    }
    ok.extend(skipped);
    Outcome::Pass(ok)
}

// ---- certificates ----

/// The DER certificates of a PEM bundle.
fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| format!("it is not PEM ({e})"))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    if out.is_empty() {
        return Err("it holds no PEM CERTIFICATE block".to_owned());
    }
    Ok(out)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| format!("a certificate does not parse ({e})"))
}

fn when(asn1: x509_parser::time::ASN1Time) -> Timestamp {
    Timestamp::from_second(asn1.timestamp()).unwrap_or(Timestamp::MAX)
}

/// `CN=...` and the serial, to tell two certificates apart in a message.
fn describe(cert: &X509Certificate<'_>) -> String {
    format!(
        "{} (serial {})",
        cert.subject(),
        cert.raw_serial_as_string()
    )
}

/// What is wrong with a certificate's dates now, if anything.
fn out_of_date(cert: &X509Certificate<'_>, now: Timestamp) -> Option<String> {
    let (from, until) = (
        when(cert.validity().not_before),
        when(cert.validity().not_after),
    );
    if now < from {
        return Some(format!("{} is not valid before {from}", describe(cert)));
    }
    if now >= until {
        return Some(format!("{} expired at {until}", describe(cert)));
    }
    None
}

fn days(d: SignedDuration) -> i64 {
    d.as_secs() / 86_400
}

/// The anchors of a trust-roots fact, or why there are none.
fn anchors(roots: &Fetched<Option<TrustRoots>>, whose: &str) -> Result<Vec<Vec<u8>>, String> {
    let place = format!("ConfigMap {LINKERD_NAMESPACE}/{TRUST_ROOTS_CONFIGMAP}");
    match roots {
        Err(e) => Err(format!("cannot read {whose}{place}: {e}")),
        Ok(None) => Err(format!("{whose}{place} does not exist")),
        Ok(Some(TrustRoots { bundle: None })) => {
            Err(format!("{whose}{place} has no {TRUST_ROOTS_KEY} key"))
        }
        Ok(Some(TrustRoots { bundle: Some(pem) })) => pem_certificates(pem)
            .map_err(|e| format!("{whose}{place} key {TRUST_ROOTS_KEY} is not usable: {e}")),
    }
}

/// The trust-anchor bundle exists, parses, holds CAs, and each is in date.
pub(crate) fn trust_anchors_valid(roots: &Fetched<Option<TrustRoots>>, now: Timestamp) -> Outcome {
    let ders = match anchors(roots, "") {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let mut problems = Vec::new();
    let mut earliest: Option<Timestamp> = None;
    for der in &ders {
        let cert = match parse(der) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if !cert.is_ca() {
            problems.push(format!(
                "{} is not a CA certificate: an anchor must be one",
                describe(&cert)
            ));
        }
        if let Some(p) = out_of_date(&cert, now) {
            problems.push(p);
        }
        let until = when(cert.validity().not_after);
        earliest = Some(earliest.map_or(until, |e| e.min(until)));
    }
    if !problems.is_empty() {
        return Outcome::Fail(problems);
    }
    let until = earliest.map(|t| t.to_string()).unwrap_or_default();
    pass(format!("{} anchor(s), valid until {until}", ders.len()))
}

/// The issuer's certificate chain, issuer first, or why it cannot be read.
fn issuer_chain(issuer: &Fetched<Option<Issuer>>) -> Result<Vec<Vec<u8>>, String> {
    let place = format!("Secret {LINKERD_NAMESPACE}/{ISSUER_SECRET}");
    match issuer {
        Err(e) => Err(format!("cannot read {place}: {e}")),
        Ok(None) => Err(format!("{place} does not exist")),
        Ok(Some(Issuer { cert_pem: None })) => Err(format!("{place} has no {ISSUER_CERT_KEY}")),
        Ok(Some(Issuer {
            cert_pem: Some(pem),
        })) => pem_certificates(pem)
            .map_err(|e| format!("{ISSUER_CERT_KEY} of {place} is not usable: {e}")),
    }
}

/// Whether `child` is signed by `parent`.
fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer() == parent.subject() && child.verify_signature(Some(parent.public_key())).is_ok()
}

/// The issuer exists, is a CA in date, and chains to one of this cluster's trust anchors
/// (directly, or through the intermediates after it in `tls.crt`).
pub(crate) fn issuer_valid(
    issuer: &Fetched<Option<Issuer>>,
    roots: &Fetched<Option<TrustRoots>>,
    now: Timestamp,
) -> Outcome {
    let chain = match issuer_chain(issuer) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let parsed: Result<Vec<X509Certificate<'_>>, String> = chain.iter().map(|d| parse(d)).collect();
    let chain = match parsed {
        Ok(c) => c,
        Err(e) => return fail(format!("the issuer certificate is not usable: {e}")),
    };
    let Some(leaf) = chain.first() else {
        return fail("the issuer Secret holds no certificate");
    };
    let mut problems = Vec::new();
    if !leaf.is_ca() {
        problems.push(format!(
            "the issuer {} is not a CA certificate: it cannot sign workload certificates",
            describe(leaf)
        ));
    }
    problems.extend(chain.iter().filter_map(|c| out_of_date(c, now)));
    if !problems.is_empty() {
        return Outcome::Fail(problems);
    }
    let roots = match anchors(roots, "") {
        Ok(r) => r,
        Err(e) => {
            return fail(format!(
                "cannot tell whether the issuer chains to the trust anchors: {e}"
            ));
        }
    };
    let roots: Vec<X509Certificate<'_>> = roots.iter().filter_map(|d| parse(d).ok()).collect();
    // Walk up the chain: each certificate signed by the next, the last by an anchor.
    let chained = chain.windows(2).all(|w| signed_by(&w[0], &w[1]));
    let top = chain.last().unwrap_or(leaf);
    match roots.iter().find(|r| signed_by(top, r)) {
        Some(root) if chained => pass(format!(
            "{} issued by {}, valid until {}",
            describe(leaf),
            describe(root),
            when(leaf.validity().not_after)
        )),
        _ => fail(format!(
            "the issuer {} is not signed by any of the {} trust anchor(s) in ConfigMap {LINKERD_NAMESPACE}/{TRUST_ROOTS_CONFIGMAP}: proxies would refuse every certificate it issues",
            describe(leaf),
            roots.len()
        )),
    }
}

/// The issuer has more than [`ISSUER_EXPIRY_WARNING`] left.
pub(crate) fn issuer_not_expiring(issuer: &Fetched<Option<Issuer>>, now: Timestamp) -> Outcome {
    let Ok(chain) = issuer_chain(issuer) else {
        return Outcome::Skip(
            "the issuer cannot be read (see \"identity issuer is valid\")".into(),
        );
    };
    let Some(Ok(leaf)) = chain.first().map(|d| parse(d)) else {
        return Outcome::Skip(
            "the issuer cannot be read (see \"identity issuer is valid\")".into(),
        );
    };
    let until = when(leaf.validity().not_after);
    let left = until.duration_since(now);
    if left.is_negative() {
        return fail(format!("the issuer {} expired at {until}", describe(&leaf)));
    }
    if left < ISSUER_EXPIRY_WARNING {
        return fail(format!(
            "the issuer {} expires at {until}, in {} day(s)",
            describe(&leaf),
            days(left)
        ));
    }
    pass(format!("valid for {} more days", days(left)))
}

// ---- control plane ----

fn service_ready(svc: &Fetched<Option<Readiness>>, namespace: &str, name: &str) -> Outcome {
    match svc {
        Err(e) => fail(format!("cannot read Service {namespace}/{name}: {e}")),
        Ok(None) => fail(format!("Service {namespace}/{name} does not exist")),
        Ok(Some(r)) if r.ready == 0 => fail(format!(
            "Service {namespace}/{name} has no ready endpoints ({} not ready)",
            r.not_ready
        )),
        Ok(Some(r)) => pass(format!("{} ready endpoint(s)", r.ready)),
    }
}

/// Service linkerd/linkerd-dst has a ready endpoint.
pub(crate) fn destination_ready(svc: &Fetched<Option<Readiness>>) -> Outcome {
    service_ready(svc, LINKERD_NAMESPACE, DESTINATION_SERVICE)
}

/// This cluster's gateway has a ready endpoint; skipped when it has none installed.
pub(crate) fn gateway_ready(svc: &Fetched<Option<Readiness>>) -> Outcome {
    if let Ok(None) = svc {
        return Outcome::Skip(format!(
            "no gateway installed (Service {}/{} does not exist)",
            keys::DEFAULT_MULTICLUSTER_NAMESPACE,
            keys::DEFAULT_GATEWAY_NAME
        ));
    }
    service_ready(
        svc,
        keys::DEFAULT_MULTICLUSTER_NAMESPACE,
        keys::DEFAULT_GATEWAY_NAME,
    )
}

/// The injector's MutatingWebhookConfiguration exists and every webhook has a CA bundle.
pub(crate) fn injector_registered(webhook: &Fetched<Option<Webhook>>) -> Outcome {
    let w = match webhook {
        Err(e) => {
            return fail(format!(
                "cannot read MutatingWebhookConfiguration {INJECTOR_WEBHOOK}: {e}"
            ));
        }
        Ok(None) => {
            return fail(format!(
                "MutatingWebhookConfiguration {INJECTOR_WEBHOOK} does not exist: no proxy injector is installed"
            ));
        }
        Ok(Some(w)) => w,
    };
    if w.webhooks.is_empty() {
        return fail(format!(
            "MutatingWebhookConfiguration {INJECTOR_WEBHOOK} has no webhooks"
        ));
    }
    let missing: Vec<String> = w
        .webhooks
        .iter()
        .filter(|(_, ca)| !ca)
        .map(|(name, _)| {
            format!(
                "webhook {name} has no caBundle: the API server cannot verify the injector (meshlink-injector writes it when it starts)"
            )
        })
        .collect();
    if !missing.is_empty() {
        return Outcome::Fail(missing);
    }
    pass(format!("{} webhook(s) with a CA bundle", w.webhooks.len()))
}

/// A Pod created with `dryRun=All` and `linkerd.io/inject: enabled` comes back with the proxy:
/// the API server called the injector and it answered.
pub(crate) fn injector_reachable(
    webhook: &Fetched<Option<Webhook>>,
    dry_run: &Option<Fetched<Vec<String>>>,
) -> Outcome {
    if !matches!(webhook, Ok(Some(_))) {
        return Outcome::Skip("the injector's webhook is not registered".into());
    }
    match dry_run {
        None => Outcome::Skip("no dry-run Pod was created".into()),
        Some(Err(e)) => fail(format!(
            "a dry-run Pod create in namespace default failed: {e}"
        )),
        Some(Ok(containers)) if containers.iter().any(|c| c == PROXY_CONTAINER) => pass(format!(
            "a dry-run Pod annotated linkerd.io/inject: enabled came back with {PROXY_CONTAINER}"
        )),
        Some(Ok(containers)) => fail(format!(
            "a dry-run Pod annotated linkerd.io/inject: enabled came back without a {PROXY_CONTAINER} container (containers: {}): the API server did not reach the injector, or the injector skipped the Pod",
            containers.join(", ")
        )),
    }
}

// ---- Links ----

/// The Links that are valid, with their spec.
pub(crate) fn valid_links(links: &Fetched<Vec<RawLink>>) -> Vec<(&RawLink, &Link)> {
    links
        .iter()
        .flatten()
        .filter_map(|raw| Some((raw, raw.link.as_ref().ok()?)))
        .filter(|(_, link)| link_problem(link).is_none())
        .collect()
}

fn link_problem(link: &Link) -> Option<&'static str> {
    if link.spec.target_cluster_name.is_empty() {
        return Some("spec.targetClusterName is empty");
    }
    if link.spec.cluster_credentials_secret.is_empty() {
        return Some("spec.clusterCredentialsSecret is empty");
    }
    None
}

fn key(raw: &RawLink) -> LinkKey {
    (raw.namespace.clone(), raw.name.clone())
}

const NO_LINKS: &str = "no Links in this cluster";

/// Links can be listed at the storage version.
pub(crate) fn link_crd_exists(links: &Fetched<Vec<RawLink>>) -> Outcome {
    match links {
        Ok(l) => pass(format!("{} Link(s)", l.len())),
        Err(e) if e.code == Some(404) => fail(format!(
            "the Link CRD links.{} (version {}) is not installed",
            link_crd::GROUP,
            link_crd::STORAGE_VERSION
        )),
        Err(e) => fail(format!("cannot list Links: {e}")),
    }
}

/// Every Link reads as one and names its target and credentials.
pub(crate) fn links_valid(links: &Fetched<Vec<RawLink>>) -> Outcome {
    let list = match links {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot list Links: {e}")),
    };
    let items = list
        .iter()
        .map(|raw| {
            let name = format!("{}/{}", raw.namespace, raw.name);
            match &raw.link {
                Err(e) => Item::Bad(format!("* {name}: {e}")),
                Ok(link) => match link_problem(link) {
                    Some(p) => Item::Bad(format!("* {name}: {p}")),
                    None => Item::Ok(format!(
                        "* {name} (target {})",
                        link.spec.target_cluster_name
                    )),
                },
            }
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Every Link was written by this version of `meshlink link`.
pub(crate) fn links_version(links: &Fetched<Vec<RawLink>>, ours: &str) -> Outcome {
    let items = valid_links(links)
        .into_iter()
        .map(|(raw, _)| match &raw.created_by {
            Some(v) if v == ours => Item::Ok(format!("* {}: {v}", raw.name)),
            Some(v) => Item::Bad(format!(
                "* {}: the CLI is {ours:?} but the Link was created by {v:?}",
                raw.name
            )),
            None => Item::Bad(format!(
                "* {}: unable to determine the version (no {} annotation)",
                raw.name,
                keys::CREATED_BY_ANNOTATION
            )),
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Each Link's credentials give a client that reaches the target and may watch its Services.
pub(crate) fn credentials_valid(
    links: &Fetched<Vec<RawLink>>,
    remotes: &BTreeMap<LinkKey, Remote>,
) -> Outcome {
    let items = valid_links(links)
        .into_iter()
        .map(|(raw, link)| {
            let name = &raw.name;
            let Some(remote) = remotes.get(&key(raw)) else {
                return Item::Skipped(format!("* {name}: not checked (it appeared during the check)"));
            };
            if let Err(e) = &remote.client {
                return Item::Bad(format!("* {name}: {e}"));
            }
            match &remote.version {
                Some(Err(e)) => {
                    return Item::Bad(format!(
                        "* {name}: cannot reach the API server of {} with the Link's credentials: {e}",
                        link.spec.target_cluster_name
                    ));
                }
                None => return Item::Bad(format!("* {name}: no client")),
                Some(Ok(_)) => {}
            }
            let mut denied = Vec::new();
            for (verb, answer) in &remote.services {
                match answer {
                    Ok(true) => {}
                    Ok(false) => denied.push(*verb),
                    Err(e) => {
                        return Item::Bad(format!(
                            "* {name}: cannot review the credentials' access to Services: {e}"
                        ));
                    }
                }
            }
            if !denied.is_empty() {
                return Item::Bad(format!(
                    "* {name}: the credentials may not {} Services in every namespace of {}",
                    denied.join(", "),
                    link.spec.target_cluster_name
                ));
            }
            let version = remote.version.clone().and_then(Result::ok).unwrap_or_default();
            Item::Ok(format!(
                "* {name}: Kubernetes {version}, may get, list and watch Services"
            ))
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Each linked cluster has exactly this cluster's trust anchors (Linkerd's rule: the same
/// number, every remote one equal to a local one).
pub(crate) fn anchors_shared(
    local: &Fetched<Option<TrustRoots>>,
    links: &Fetched<Vec<RawLink>>,
    remotes: &BTreeMap<LinkKey, Remote>,
) -> Outcome {
    let links = valid_links(links);
    if links.is_empty() {
        return Outcome::Skip(NO_LINKS.into());
    }
    let Ok(ours) = anchors(local, "") else {
        return Outcome::Skip(
            "this cluster's anchors cannot be read (see \"trust anchors are valid\")".into(),
        );
    };
    let ours: BTreeSet<Vec<u8>> = ours.into_iter().collect();
    let items = links
        .into_iter()
        .map(|(raw, link)| {
            let (name, target) = (&raw.name, &link.spec.target_cluster_name);
            let Some(Remote {
                client: Ok(()),
                anchors: Some(fetched),
                anchors_namespace,
                ..
            }) = remotes.get(&key(raw))
            else {
                return Item::Skipped(format!(
                    "* {name}: not compared: its credentials give no client (see \"remote cluster access credentials are valid\")"
                ));
            };
            if let Err(e) = fetched
                && e.code == Some(403)
            {
                return Item::Bad(format!(
                    "* {name}: the Link's credentials may not read ConfigMap {anchors_namespace}/{TRUST_ROOTS_CONFIGMAP} in {target}: grant its ServiceAccount `get` on it there"
                ));
            }
            let theirs = match anchors(fetched, &format!("{target}'s ")) {
                Ok(t) => t.into_iter().collect::<BTreeSet<_>>(),
                Err(e) => return Item::Bad(format!("* {name}: {e}")),
            };
            if theirs == ours {
                return Item::Ok(format!("* {name}: {} shared anchor(s)", ours.len()));
            }
            let show = |set: &BTreeSet<Vec<u8>>, other: &BTreeSet<Vec<u8>>| -> String {
                let only: Vec<String> = set
                    .difference(other)
                    .map(|d| parse(d).map(|c| describe(&c)).unwrap_or_else(|e| e))
                    .collect();
                if only.is_empty() {
                    "none".to_owned()
                } else {
                    only.join(", ")
                }
            };
            Item::Bad(format!(
                "* {name}: the trust anchors differ; only here: {}; only in {target}: {}",
                show(&ours, &theirs),
                show(&theirs, &ours)
            ))
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Each Link has a controller whose ServiceAccount may do what the controller does.
pub(crate) fn controller_rbac(
    links: &Fetched<Vec<RawLink>>,
    rbac: &BTreeMap<LinkKey, Fetched<Vec<AccountAccess>>>,
) -> Outcome {
    let items = valid_links(links)
        .into_iter()
        .map(|(raw, _)| {
            let name = &raw.name;
            let accounts = match rbac.get(&key(raw)) {
                None => {
                    return Item::Skipped(format!(
                        "* {name}: not checked (it appeared during the check)"
                    ));
                }
                Some(Err(e)) => {
                    return Item::Bad(format!("* {name}: cannot find its controller: {e}"));
                }
                Some(Ok(a)) if a.is_empty() => {
                    return Item::Bad(format!(
                        "* {name}: no service-mirror controller Deployment in namespace {} (label component=controller or component=service-mirror)",
                        raw.namespace
                    ));
                }
                Some(Ok(a)) => a,
            };
            let mut problems = Vec::new();
            for a in accounts {
                let mut denied = Vec::new();
                for (permission, answer) in &a.answers {
                    match answer {
                        Ok(true) => {}
                        Ok(false) => denied.push(permission.as_str()),
                        Err(e) => problems.push(format!(
                            "cannot review ServiceAccount {}: {e}",
                            a.account
                        )),
                    }
                }
                if !denied.is_empty() {
                    problems.push(format!(
                        "ServiceAccount {} may not {}",
                        a.account,
                        denied.join(", ")
                    ));
                }
            }
            if problems.is_empty() {
                let names: Vec<&str> = accounts.iter().map(|a| a.account.as_str()).collect();
                Item::Ok(format!("* {name}: ServiceAccount {}", names.join(", ")))
            } else {
                Item::Bad(format!("* {name}: {}", problems.join("; ")))
            }
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Seconds from `then` to `now`, for messages.
fn ago(now: Timestamp, then: Timestamp) -> String {
    format!("{}s ago", now.duration_since(then).as_secs().max(0))
}

/// The Lease under which a controller serves Link `raw` now, or why there is none.
fn serving<'a>(
    raw: &RawLink,
    leases: &'a BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    now: Timestamp,
) -> Result<&'a LeaseFact, String> {
    let own = format!("{LINK_LEASE_PREFIX}{}", raw.name);
    let all = match leases.get(&raw.namespace) {
        None => return Err("its Leases were not read".into()),
        Some(Err(e)) => return Err(format!("cannot read the Leases in {}: {e}", raw.namespace)),
        Some(Ok(all)) => all,
    };
    let candidates: Vec<&LeaseFact> = all
        .iter()
        .filter(|l| l.name == own || l.name == SHARED_LEASE)
        .collect();
    let held = |l: &LeaseFact| -> Option<Timestamp> {
        l.holder.as_ref().filter(|h| !h.is_empty())?;
        let expires = l.renewed? + SignedDuration::from_secs(i64::from(l.duration_seconds?));
        Some(expires)
    };
    if let Some(l) = candidates
        .iter()
        .find(|l| held(l).is_some_and(|expires| expires > now))
    {
        return Ok(l);
    }
    let Some(last) = candidates.iter().max_by_key(|l| l.renewed) else {
        return Err(format!(
            "no controller has ever held Lease {own} or {SHARED_LEASE} in namespace {}",
            raw.namespace
        ));
    };
    Err(match (held(last), &last.holder) {
        (Some(expires), Some(holder)) => format!(
            "Lease {}/{} of {holder} expired {} (no renewal: the controller stopped or cannot reach the API server)",
            raw.namespace,
            last.name,
            ago(now, expires)
        ),
        _ => format!(
            "Lease {}/{} was released: the controller stopped",
            raw.namespace, last.name
        ),
    })
}

/// Each Link is served by a controller that holds its Lease now (renewed within its duration).
/// Deployments are not enough: a Deployment can be available while its controller cannot
/// renew, and a controller can run outside one.
pub(crate) fn controllers_running(
    links: &Fetched<Vec<RawLink>>,
    leases: &BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    now: Timestamp,
) -> Outcome {
    let items = valid_links(links)
        .into_iter()
        .map(|(raw, _)| match serving(raw, leases, now) {
            Ok(l) => Item::Ok(format!(
                "* {}: held by {} (Lease {}, renewed {})",
                raw.name,
                l.holder.as_deref().unwrap_or_default(),
                l.name,
                l.renewed.map(|t| ago(now, t)).unwrap_or_default()
            )),
            Err(e) => Item::Bad(format!("* {}: {e}", raw.name)),
        })
        .collect();
    combine(items, NO_LINKS)
}

fn condition<'a>(link: &'a Link, type_: &str) -> Option<&'a LinkCondition> {
    link.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

fn explain(c: &LinkCondition) -> String {
    if c.message.is_empty() {
        c.reason.clone()
    } else {
        format!("{}: {}", c.reason, c.message)
    }
}

/// What a check of one Link status condition says about a Link.
struct ConditionCheck<'a> {
    type_: &'a str,
    /// Why the condition does not apply to a Link (`None`: it does).
    not_applicable: fn(&Link) -> Option<String>,
    /// What a Link whose controller is not running means for this condition.
    not_served: &'a str,
    ok: fn(&Link) -> String,
    bad: fn(&Link, &LinkCondition) -> String,
}

/// Each valid Link's condition as its running controller reports it: a Link whose controller
/// is not running has no current status and is skipped.
fn link_conditions(
    links: &Fetched<Vec<RawLink>>,
    leases: &BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    now: Timestamp,
    check: &ConditionCheck<'_>,
) -> Outcome {
    let items = valid_links(links)
        .into_iter()
        .map(|(raw, link)| {
            let name = &raw.name;
            if let Some(why) = (check.not_applicable)(link) {
                return Item::Skipped(format!("* {name}: {why}"));
            }
            if serving(raw, leases, now).is_err() {
                return Item::Skipped(format!("* {name}: {}", check.not_served));
            }
            match condition(link, check.type_) {
                Some(c) if c.status == ConditionStatus::True => {
                    Item::Ok(format!("* {name}: {}", (check.ok)(link)))
                }
                Some(c) => Item::Bad(format!("* {name}: {}", (check.bad)(link, c))),
                None => Item::Bad(format!(
                    "* {name}: its controller has not reported {} yet",
                    check.type_
                )),
            }
        })
        .collect();
    combine(items, NO_LINKS)
}

/// Each Link's controller reports its target's API server reachable (status condition
/// RemoteReachable).
pub(crate) fn remotes_reachable(
    links: &Fetched<Vec<RawLink>>,
    leases: &BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    now: Timestamp,
) -> Outcome {
    link_conditions(
        links,
        leases,
        now,
        &ConditionCheck {
            type_: CONDITION_REMOTE_REACHABLE,
            not_applicable: |_| None,
            not_served: "no controller is running, so its status is not current",
            ok: |link| format!("{} reachable", link.spec.target_cluster_name),
            bad: |_, c| {
                format!(
                    "RemoteReachable is {:?} since {}: {}",
                    c.status,
                    c.last_transition_time.0,
                    explain(c)
                )
            },
        },
    )
}

/// Each Link with a probed gateway reports it alive (status condition GatewayAlive).
pub(crate) fn gateways_alive(
    links: &Fetched<Vec<RawLink>>,
    leases: &BTreeMap<String, Fetched<Vec<LeaseFact>>>,
    now: Timestamp,
) -> Outcome {
    link_conditions(
        links,
        leases,
        now,
        &ConditionCheck {
            type_: CONDITION_GATEWAY_ALIVE,
            not_applicable: |link| {
                (link.spec.gateway_address.is_empty() || link.spec.probe_spec.path.is_empty())
                    .then(|| "no gateway probe (remote discovery only)".to_owned())
            },
            not_served: "no controller is running, so nothing probes its gateway",
            ok: |link| {
                let latency = link
                    .status
                    .as_ref()
                    .and_then(|s| s.gateway.as_ref()?.latency_milliseconds)
                    .map(|ms| format!(", latency {ms}ms"))
                    .unwrap_or_default();
                format!("gateway {} alive{latency}", link.spec.gateway_address)
            },
            bad: |link, c| {
                format!(
                    "the gateway at {}:{} (probe port {}) is not alive since {}: {}",
                    link.spec.gateway_address,
                    link.spec.gateway_port,
                    link.spec.probe_spec.port,
                    c.last_transition_time.0,
                    explain(c)
                )
            },
        },
    )
}

fn has(map: &BTreeMap<String, String>, key: &str) -> bool {
    map.contains_key(key)
}

/// Every mirror that should have endpoints has a ready one. Probe Services, remote-discovery
/// mirrors (served by the destination service, no endpoints of their own) and federated
/// Services are not such mirrors.
pub(crate) fn mirrors_have_endpoints(mirrors: &Fetched<Vec<Mirror>>) -> Outcome {
    let list = match mirrors {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot list mirror Services: {e}")),
    };
    let items = list
        .iter()
        .filter(|m| {
            !has(&m.labels, keys::MIRRORED_GATEWAY_LABEL)
                && !has(&m.labels, keys::REMOTE_DISCOVERY_KEY)
                && !has(&m.annotations, keys::REMOTE_DISCOVERY_KEY)
                && !has(&m.annotations, keys::LOCAL_DISCOVERY_ANNOTATION)
        })
        .map(|m| {
            let name = format!("{}/{}", m.namespace, m.name);
            let from = m
                .labels
                .get(keys::CLUSTER_NAME_LABEL)
                .map(|c| format!(" (from {c})"))
                .unwrap_or_default();
            match &m.endpoints {
                Err(e) => Item::Bad(format!("* {name}{from}: cannot read its endpoints: {e}")),
                Ok(r) if r.ready == 0 => Item::Bad(format!(
                    "* {name}{from} has no ready endpoints ({} not ready)",
                    r.not_ready
                )),
                Ok(r) => Item::Ok(format!("* {name}{from}: {} ready", r.ready)),
            }
        })
        .collect();
    combine(items, "no mirror Services")
}

/// Every mirror names a cluster some Link targets.
pub(crate) fn mirrors_part_of_link(
    mirrors: &Fetched<Vec<Mirror>>,
    links: &Fetched<Vec<RawLink>>,
) -> Outcome {
    let list = match mirrors {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot list mirror Services: {e}")),
    };
    if links.is_err() {
        return Outcome::Skip("the Links cannot be listed".into());
    }
    let targets: BTreeSet<&str> = links
        .iter()
        .flatten()
        .filter_map(|raw| raw.link.as_ref().ok())
        .map(|l| l.spec.target_cluster_name.as_str())
        .collect();
    let items = list
        .iter()
        .filter(|m| !has(&m.labels, keys::MIRRORED_GATEWAY_LABEL))
        .filter_map(|m| {
            let cluster = m.labels.get(keys::CLUSTER_NAME_LABEL)?;
            let name = format!("{}/{}", m.namespace, m.name);
            Some(if targets.contains(cluster.as_str()) {
                Item::Ok(format!("* {name} ({cluster})"))
            } else {
                Item::Bad(format!(
                    "* mirror Service {name} is not part of any Link (cluster {cluster})"
                ))
            })
        })
        .collect();
    combine(items, "no mirror Services")
}

/// Namespaces the injector's webhook is never called for (its `namespaceSelector`, in
/// manifests/injector/injector.yaml).
fn outside_webhook(labels: &BTreeMap<String, String>, namespace: &str) -> bool {
    labels
        .get("config.linkerd.io/admission-webhooks")
        .map(String::as_str)
        == Some("disabled")
        || matches!(namespace, "kube-system" | "cert-manager")
}

/// Every running Pod that asks for the proxy (by `proxy_inject`'s own rules, as the webhook
/// applies them) has it. One without was created while the webhook was unreachable: its
/// `failurePolicy: Ignore` let it start unmeshed, and only a restart meshes it.
pub(crate) fn pods_meshed(pods: &Fetched<Vec<PodFact>>) -> Outcome {
    let list = match pods {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot list Pods: {e}")),
    };
    let mut meshed = 0;
    let mut bad = Vec::new();
    for fact in list {
        let (meta, Some(spec)) = (&fact.pod.metadata, fact.pod.spec.as_ref()) else {
            continue;
        };
        let namespace = meta.namespace.clone().unwrap_or_default();
        let finished = matches!(
            fact.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if finished || outside_webhook(&fact.namespace_labels, &namespace) {
            continue;
        }
        if spec.containers.iter().any(|c| c.name == PROXY_CONTAINER) {
            meshed += 1;
            continue;
        }
        let ctx = proxy_inject::PodContext {
            origin: proxy_inject::Origin::Webhook,
            owner: None,
            namespace: Some(&namespace),
            namespace_annotations: &fact.namespace_annotations,
        };
        if proxy_inject::why_not(&ctx, meta, spec).is_none() {
            let name = meta.name.clone().unwrap_or_default();
            let owner = meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| format!(" (of {} {})", o.kind, o.name))
                .unwrap_or_default();
            bad.push(format!(
                "* {namespace}/{name}{owner} asks for the proxy but runs without it"
            ));
        }
    }
    if !bad.is_empty() {
        return Outcome::Fail(bad);
    }
    if meshed == 0 {
        return Outcome::Skip("no Pod asks for the proxy".to_owned());
    }
    pass(format!("* {meshed} meshed Pods"))
}

#[cfg(test)]
mod tests;
