//! Reads the facts the checks decide over: objects and status from this cluster's API server,
//! and, with each Link's own credentials, from its target's. Every call has a deadline, and a
//! failed call is a fact (the check it feeds says what failed), never an early return.
//!
//! Facts about configuration (identity, credentials, permissions, the webhook) are read once;
//! [`refresh`] re-reads what a retried check waits for (Links and their status, Leases,
//! endpoints, the injector's answer).

use std::{collections::BTreeMap, future::Future, time::Duration};

use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        authorization::v1::{SelfSubjectAccessReview, SubjectAccessReview},
        coordination::v1::Lease,
        core::v1::{ConfigMap, Namespace, Pod, Secret, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, ListParams, PostParams},
};
use link_crd::{Link, LinkVersion, keys};
use serde_json::json;

use super::decide::{
    self, AccountAccess, ApiFailure, Facts, Fetched, INJECTOR_WEBHOOK, ISSUER_CERT_KEY,
    ISSUER_SECRET, Issuer, LINK_LEASE_PREFIX, LINKERD_NAMESPACE, LeaseFact, LinkKey, Mirror,
    PodFact, RawLink, Readiness, Remote, SHARED_LEASE, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY,
    TrustRoots, Webhook,
};

/// How long one API call may take (Linkerd's check `--timeout` default).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Verbs a Link's credentials need on the target's Services (Linkerd's check asks the same).
const REMOTE_SERVICE_VERBS: [&str; 3] = ["get", "list", "watch"];

const ALL_VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];

/// What the service-mirror controller's ServiceAccount must be allowed, as
/// manifests/mirror/controller.yaml grants it: (group, resource, subresource, verbs), cluster-wide
/// then in the Link's namespace.
const CLUSTER_PERMISSIONS: &[(&str, &str, &str, &[&str])] = &[
    ("", "services", "", ALL_VERBS),
    ("", "endpoints", "", ALL_VERBS),
    ("discovery.k8s.io", "endpointslices", "", ALL_VERBS),
    ("", "namespaces", "", &["get", "list", "watch"]),
];
const NAMESPACE_PERMISSIONS: &[(&str, &str, &str, &[&str])] = &[
    (
        link_crd::GROUP,
        "links",
        "",
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        link_crd::GROUP,
        "links",
        "status",
        &["get", "patch", "update"],
    ),
    ("", "secrets", "", &["get", "list", "watch"]),
    ("events.k8s.io", "events", "", &["create", "patch"]),
    (
        "coordination.k8s.io",
        "leases",
        "",
        &["get", "create", "update", "patch"],
    ),
];

/// Runs `call` under [`CALL_TIMEOUT`].
async fn call<T>(call: impl Future<Output = Result<T, kube::Error>>) -> Fetched<T> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(kube::Error::Api(status))) => Err(ApiFailure {
            code: Some(status.code),
            message: status.message,
        }),
        Ok(Err(e)) => Err(ApiFailure {
            code: None,
            message: e.to_string(),
        }),
        Err(_) => Err(ApiFailure {
            code: None,
            message: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
        }),
    }
}

/// Reads every fact.
pub(crate) async fn facts(client: &Client) -> Facts {
    // The time, Links, readiness, Leases and mirrors are read by `refresh`.
    let mut facts = Facts {
        trust_roots: trust_roots(client, LINKERD_NAMESPACE).await,
        issuer: issuer(client).await,
        injector_webhook: webhook(client).await,
        pods: pods(client).await,
        ..Facts::empty()
    };
    refresh(client, &mut facts).await;
    let mut reviewed: BTreeMap<String, AccountAccess> = BTreeMap::new();
    for (raw, link) in decide::valid_links(&facts.links) {
        let key: LinkKey = (raw.namespace.clone(), raw.name.clone());
        facts
            .remotes
            .insert(key.clone(), remote(client, raw, link).await);
        facts
            .rbac
            .insert(key, rbac(client, raw, link, &mut reviewed).await);
    }
    facts
}

/// Re-reads what the retried checks wait for.
pub(crate) async fn refresh(client: &Client, facts: &mut Facts) {
    facts.now = Timestamp::now();
    facts.destination = readiness(client, LINKERD_NAMESPACE, decide::DESTINATION_SERVICE).await;
    facts.gateway = readiness(
        client,
        keys::DEFAULT_MULTICLUSTER_NAMESPACE,
        keys::DEFAULT_GATEWAY_NAME,
    )
    .await;
    facts.injector_dry_run = match facts.injector_webhook {
        Ok(Some(_)) => Some(dry_run_pod(client).await),
        _ => None,
    };
    facts.links = links(client).await;
    let mut namespaces: Vec<String> = decide::valid_links(&facts.links)
        .into_iter()
        .map(|(raw, _)| raw.namespace.clone())
        .collect();
    namespaces.sort();
    namespaces.dedup();
    facts.leases.clear();
    for ns in namespaces {
        let leases = leases(client, &ns).await;
        facts.leases.insert(ns, leases);
    }
    facts.mirrors = mirrors(client).await;
}

async fn trust_roots(client: &Client, namespace: &str) -> Fetched<Option<TrustRoots>> {
    let cm = call(
        Api::<ConfigMap>::namespaced(client.clone(), namespace).get_opt(TRUST_ROOTS_CONFIGMAP),
    )
    .await?;
    Ok(cm.map(|cm| TrustRoots {
        bundle: cm.data.and_then(|mut d| d.remove(TRUST_ROOTS_KEY)),
    }))
}

async fn issuer(client: &Client) -> Fetched<Option<Issuer>> {
    let secret =
        call(Api::<Secret>::namespaced(client.clone(), LINKERD_NAMESPACE).get_opt(ISSUER_SECRET))
            .await?;
    // Only the certificate is kept; the key is never read into a fact.
    Ok(secret.map(|s| Issuer {
        cert_pem: s
            .data
            .and_then(|mut d| d.remove(ISSUER_CERT_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned()),
    }))
}

/// A Service's endpoints, from its EndpointSlices; `None` when the Service does not exist.
async fn readiness(client: &Client, namespace: &str, name: &str) -> Fetched<Option<Readiness>> {
    if call(Api::<Service>::namespaced(client.clone(), namespace).get_opt(name))
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let slices = call(
        Api::<EndpointSlice>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={name}"))),
    )
    .await?;
    Ok(Some(count(slices.items.iter())))
}

/// Ready and not-ready endpoints; an endpoint with no `ready` condition counts as ready, as
/// the API documents.
fn count<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> Readiness {
    let mut r = Readiness::default();
    for e in slices.flat_map(|s| s.endpoints.iter().flatten()) {
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            r.not_ready += 1;
        } else {
            r.ready += 1;
        }
    }
    r
}

async fn webhook(client: &Client) -> Fetched<Option<Webhook>> {
    let w =
        call(Api::<MutatingWebhookConfiguration>::all(client.clone()).get_opt(INJECTOR_WEBHOOK))
            .await?;
    Ok(w.map(|w| Webhook {
        webhooks: w
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|h| {
                let ca = h.client_config.ca_bundle.is_some_and(|b| !b.0.is_empty());
                (h.name, ca)
            })
            .collect(),
    }))
}

/// Creates, with `dryRun=All` (nothing is stored), a Pod annotated for injection in namespace
/// `default`, and returns the containers the API server answered with: admission webhooks run
/// on dry-run requests, so a `linkerd-proxy` container proves the API server reached the
/// injector.
async fn dry_run_pod(client: &Client) -> Fetched<Vec<String>> {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "meshlink-check-",
            "annotations": { "linkerd.io/inject": "enabled" },
            "labels": { "app.kubernetes.io/name": "meshlink-check" },
        },
        "spec": {
            "automountServiceAccountToken": false,
            // Never pulled: nothing is stored, so nothing runs.
            "containers": [{ "name": "check", "image": "meshlink.invalid/check:dry-run" }],
        },
    }))
    .map_err(|e| ApiFailure {
        code: None,
        message: e.to_string(),
    })?;
    let params = PostParams {
        dry_run: true,
        field_manager: Some("meshlink-check".to_owned()),
    };
    let pod = call(Api::<Pod>::namespaced(client.clone(), "default").create(&params, &pod)).await?;
    Ok(pod
        .spec
        .map(|s| s.containers.into_iter().map(|c| c.name).collect())
        .unwrap_or_default())
}

async fn links(client: &Client) -> Fetched<Vec<RawLink>> {
    let resource = link_crd::api_resource(LinkVersion::V1alpha3);
    let list = call(
        Api::<DynamicObject>::all_with(client.clone(), &resource).list(&ListParams::default()),
    )
    .await?;
    Ok(list
        .items
        .into_iter()
        .map(|obj| RawLink {
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
            created_by: obj.annotations().get(keys::CREATED_BY_ANNOTATION).cloned(),
            link: serde_json::to_value(&obj)
                .and_then(serde_json::from_value::<Link>)
                .map_err(|e| format!("it does not read as a Link: {e}")),
        })
        .collect())
}

/// What the Link's credentials give, read with them. The kubeconfig is untrusted: the client
/// is built by `mirror-credentials`, which refuses programs to run and local files to read.
async fn remote(client: &Client, raw: &RawLink, link: &Link) -> Remote {
    let anchors_namespace = if link.spec.target_cluster_linkerd_namespace.is_empty() {
        LINKERD_NAMESPACE.to_owned()
    } else {
        link.spec.target_cluster_linkerd_namespace.clone()
    };
    let mut out = Remote {
        client: Ok(()),
        version: None,
        services: Vec::new(),
        anchors: None,
        anchors_namespace,
    };
    let name = &link.spec.cluster_credentials_secret;
    let secret =
        match call(Api::<Secret>::namespaced(client.clone(), &raw.namespace).get_opt(name)).await {
            Ok(s) => s,
            Err(e) => {
                out.client = Err(format!("cannot read Secret {}/{name}: {e}", raw.namespace));
                return out;
            }
        };
    let remote =
        match mirror_credentials::client_from_secret(&raw.namespace, name, secret.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                out.client = Err(e.to_string());
                return out;
            }
        };
    let version = call(remote.apiserver_version())
        .await
        .map(|v| v.git_version);
    let reachable = version.is_ok();
    out.version = Some(version);
    if !reachable {
        // Every other call would wait for the same unreachable server.
        return out;
    }
    for verb in REMOTE_SERVICE_VERBS {
        let review =
            json!({ "spec": { "resourceAttributes": { "verb": verb, "resource": "services" } } });
        let answer = match serde_json::from_value::<SelfSubjectAccessReview>(review) {
            Ok(r) => call(
                Api::<SelfSubjectAccessReview>::all(remote.clone())
                    .create(&PostParams::default(), &r),
            )
            .await
            .map(|r| r.status.is_some_and(|s| s.allowed)),
            Err(e) => Err(ApiFailure {
                code: None,
                message: e.to_string(),
            }),
        };
        out.services.push((verb, answer));
    }
    out.anchors = Some(trust_roots(&remote, &out.anchors_namespace).await);
    out
}

/// The ServiceAccounts of the controllers that may serve the Link (Deployments labelled
/// `component=controller` or `component=service-mirror` in its namespace, for its cluster or
/// for every cluster), each with what it may do. `reviewed` keeps the answers for an account
/// already reviewed for another Link.
async fn rbac(
    client: &Client,
    raw: &RawLink,
    link: &Link,
    reviewed: &mut BTreeMap<String, AccountAccess>,
) -> Fetched<Vec<AccountAccess>> {
    let deployments = call(
        Api::<Deployment>::namespaced(client.clone(), &raw.namespace)
            .list(&ListParams::default().labels("component in (controller,service-mirror)")),
    )
    .await?;
    let mut accounts: Vec<String> = deployments
        .items
        .iter()
        .filter(|d| {
            d.labels()
                .get(keys::CLUSTER_NAME_LABEL)
                .is_none_or(|c| *c == link.spec.target_cluster_name)
        })
        .map(|d| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref()?.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned())
        })
        .collect();
    accounts.sort();
    accounts.dedup();
    let mut out = Vec::new();
    for account in accounts {
        let id = format!("{}/{account}", raw.namespace);
        if let Some(done) = reviewed.get(&id) {
            out.push(done.clone());
            continue;
        }
        let access = review_account(client, &raw.namespace, &account).await;
        reviewed.insert(id, access.clone());
        out.push(access);
    }
    Ok(out)
}

async fn review_account(client: &Client, namespace: &str, account: &str) -> AccountAccess {
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    let scoped = CLUSTER_PERMISSIONS
        .iter()
        .map(|p| (None, p))
        .chain(NAMESPACE_PERMISSIONS.iter().map(|p| (Some(namespace), p)));
    let mut answers = Vec::new();
    for (ns, (group, resource, subresource, verbs)) in scoped {
        for verb in *verbs {
            let mut what = if group.is_empty() {
                (*resource).to_owned()
            } else {
                format!("{resource}.{group}")
            };
            if !subresource.is_empty() {
                what = format!("{what}/{subresource}");
            }
            let description = match ns {
                Some(ns) => format!("{verb} {what} in {ns}"),
                None => format!("{verb} {what}"),
            };
            let review = json!({ "spec": {
                "user": format!("system:serviceaccount:{namespace}:{account}"),
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                "resourceAttributes": {
                    "namespace": ns.unwrap_or_default(),
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                },
            } });
            let answer = match serde_json::from_value::<SubjectAccessReview>(review) {
                Ok(r) => call(reviews.create(&PostParams::default(), &r))
                    .await
                    .map(|r| r.status.is_some_and(|s| s.allowed)),
                Err(e) => Err(ApiFailure {
                    code: None,
                    message: e.to_string(),
                }),
            };
            answers.push((description, answer));
        }
    }
    AccountAccess {
        account: format!("{namespace}/{account}"),
        answers,
    }
}

/// The controller's Leases in `namespace`.
async fn leases(client: &Client, namespace: &str) -> Fetched<Vec<LeaseFact>> {
    let list =
        call(Api::<Lease>::namespaced(client.clone(), namespace).list(&ListParams::default()))
            .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|l| {
            let n = l.name_any();
            n == SHARED_LEASE || n.starts_with(LINK_LEASE_PREFIX)
        })
        .map(|l| {
            let spec = l.spec.clone().unwrap_or_default();
            LeaseFact {
                name: l.name_any(),
                holder: spec.holder_identity,
                renewed: spec.renew_time.map(|t| t.0),
                duration_seconds: spec.lease_duration_seconds,
            }
        })
        .collect())
}

/// Every mirror Service, with its endpoints.
async fn mirrors(client: &Client) -> Fetched<Vec<Mirror>> {
    let services =
        call(Api::<Service>::all(client.clone()).list(
            &ListParams::default().labels(&format!("{}=true", keys::MIRRORED_RESOURCE_LABEL)),
        ))
        .await?;
    let mut slices: BTreeMap<String, Fetched<Vec<EndpointSlice>>> = BTreeMap::new();
    let mut out = Vec::new();
    for svc in services.items {
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        if !slices.contains_key(&namespace) {
            let list = call(
                Api::<EndpointSlice>::namespaced(client.clone(), &namespace)
                    .list(&ListParams::default().labels(SERVICE_NAME_LABEL)),
            )
            .await
            .map(|l| l.items);
            slices.insert(namespace.clone(), list);
        }
        let endpoints = match slices.get(&namespace) {
            Some(Ok(all)) => {
                Ok(count(all.iter().filter(|s| {
                    s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                })))
            }
            Some(Err(e)) => Err(e.clone()),
            None => Ok(Readiness::default()),
        };
        out.push(Mirror {
            namespace,
            name,
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            annotations: svc.metadata.annotations.clone().unwrap_or_default(),
            endpoints,
        });
    }
    Ok(out)
}

/// Every Pod, with its namespace's labels and annotations.
async fn pods(client: &Client) -> Fetched<Vec<PodFact>> {
    let namespaces: BTreeMap<String, Namespace> =
        call(Api::<Namespace>::all(client.clone()).list(&ListParams::default()))
            .await?
            .items
            .into_iter()
            .map(|ns| (ns.name_any(), ns))
            .collect();
    let pods = call(Api::<Pod>::all(client.clone()).list(&ListParams::default())).await?;
    Ok(pods
        .items
        .into_iter()
        .map(|pod| {
            let ns = pod
                .metadata
                .namespace
                .as_ref()
                .and_then(|n| namespaces.get(n));
            PodFact {
                namespace_labels: ns
                    .and_then(|n| n.metadata.labels.clone())
                    .unwrap_or_default(),
                namespace_annotations: ns
                    .and_then(|n| n.metadata.annotations.clone())
                    .unwrap_or_default(),
                pod,
            }
        })
        .collect())
}
