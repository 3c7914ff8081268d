//! Helpers that tests use to put objects into a test cluster.

use std::{collections::BTreeMap, future::Future, net::IpAddr, time::Duration};

use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    core::GroupVersionKind,
    discovery,
};
use serde::Deserialize;

use crate::Error;

/// Field manager of everything the harness applies.
const FIELD_MANAGER: &str = "meshlink-e2e";

/// Polls `probe` every 100 ms until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a namespace (a no-op when it exists) and waits until its `default` ServiceAccount
/// exists, without which the API server refuses Pods.
pub async fn create_namespace(client: &Client, name: &str) -> Result<(), Error> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({ "metadata": { "name": name } }))
        .map_err(|e| Error::Invalid(e.to_string()))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for(
        &format!("ServiceAccount {name}/default"),
        Duration::from_secs(60),
        || async { sas.get_opt("default").await.ok().flatten() },
    )
    .await
    .map(drop)
}

/// Creates Pod `namespace/name` with `labels` on `node`, then marks it Running and Ready with
/// address `ip`, as a kubelet would: Services that select it get real Endpoints and
/// EndpointSlices from the cluster's controllers.
pub async fn create_ready_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    ip: IpAddr,
    node: &str,
) -> Result<Pod, Error> {
    create_pod(client, namespace, name, labels, ip, node, None).await
}

/// Like [`create_ready_pod`], for a pod of headless Service `subdomain` (as a StatefulSet's
/// pods are): its hostname is its name, so its endpoint is named `<name>.<subdomain>`.
pub async fn create_ready_pod_in(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    ip: IpAddr,
    node: &str,
    subdomain: &str,
) -> Result<Pod, Error> {
    create_pod(client, namespace, name, labels, ip, node, Some(subdomain)).await
}

async fn create_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    ip: IpAddr,
    node: &str,
    subdomain: Option<&str>,
) -> Result<Pod, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut pod = serde_json::json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            // Never pulled or run: no kubelet. The image must only be well-formed.
            "containers": [{ "name": "app", "image": "meshlink.invalid/test:none" }],
        },
    });
    if let Some(sub) = subdomain {
        pod["spec"]["hostname"] = name.into();
        pod["spec"]["subdomain"] = sub.into();
    }
    let pod: Pod = serde_json::from_value(pod).map_err(|e| Error::Invalid(e.to_string()))?;
    pods.create(&PostParams::default(), &pod).await?;
    let now = jiff_now();
    let status = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{ "ip": ip.to_string() }],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": [
                { "type": "PodScheduled", "status": "True", "lastTransitionTime": now },
                { "type": "Initialized", "status": "True", "lastTransitionTime": now },
                { "type": "ContainersReady", "status": "True", "lastTransitionTime": now },
                { "type": "Ready", "status": "True", "lastTransitionTime": now },
            ],
        }
    });
    Ok(pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?)
}

fn jiff_now() -> String {
    // RFC 3339 in UTC with second precision, as Kubernetes writes times.
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Installs `link_crd::crd()` with server-side apply and waits until it is Established.
pub async fn install_link_crd(client: &Client) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = link_crd::crd();
    let name = crd.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await?;
    wait_established(client, &name).await
}

/// Waits until CRD `name` is Established (its API is served).
pub(crate) async fn wait_established(client: &Client, name: &str) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(
        &format!("CRD {name} to be Established"),
        Duration::from_secs(30),
        || async {
            let crd = crds.get_opt(name).await.ok().flatten()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await
}

/// Applies every document of a multi-document YAML text with server-side apply (as
/// `kubectl apply --server-side --force-conflicts` would), in order, and returns what the API
/// server stored. CRDs are waited for until Established, so later documents may use them.
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<Vec<DynamicObject>, Error> {
    // Parsed up front: the YAML parser cannot be held across an await of a Send future.
    let docs = serde_norway::Deserializer::from_str(yaml)
        .map(serde_json::Value::deserialize)
        .collect::<Result<Vec<_>, _>>()?;
    let mut applied = Vec::new();
    for value in docs.into_iter().filter(|v| !v.is_null()) {
        let obj: DynamicObject = serde_json::from_value(value)
            .map_err(|e| Error::Invalid(format!("a Kubernetes object in the YAML ({e})")))?;
        let types = obj.types.clone().unwrap_or_default();
        let gvk = GroupVersionKind::try_from(&types).map_err(|e| {
            Error::Invalid(format!("apiVersion/kind of an object in the YAML ({e})"))
        })?;
        let (ar, caps) = discovery::pinned_kind(client, &gvk).await?;
        let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(client.clone(), ns, &ar)
            }
            (discovery::Scope::Namespaced, None) => {
                Api::default_namespaced_with(client.clone(), &ar)
            }
            (discovery::Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
        };
        let name = obj.name_any();
        let stored = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await?;
        if gvk.kind == "CustomResourceDefinition" {
            wait_established(client, &name).await?;
        }
        applied.push(stored);
    }
    Ok(applied)
}
