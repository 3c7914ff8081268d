//! What a kubelet (and kube-proxy, for the Pod's own sidecar) would do with a Pod the API
//! server stored: the harness runs an injected Pod from its spec as it was written, by the
//! webhook or by `meshlink inject`, instead of from settings of its own.
//!
//! From the stored Pod it takes the init container's command and arguments, the proxy
//! container's command, user and environment, and its volumes. What a kubelet resolves, the
//! harness resolves the same way: `fieldRef` values from the Pod, `$(VAR)` references to earlier
//! variables, `configMapKeyRef` values from the API, projected ServiceAccount tokens with the
//! audience the volume asks for (a real TokenRequest), emptyDir volumes. Processes do not get a
//! mount namespace, so each volume is a directory of the Pod's and a variable that names a path
//! under a mount path names the same path under that directory. There is no kube-proxy, and the
//! proxy's own connections are not redirected: a control-plane address that names a Service
//! (`linkerd-dst.linkerd.svc.cluster.local.:8086`) is replaced by one of that Service's ready
//! endpoints, the address kube-proxy would have sent the connection to.
//!
//! Pure functions ([`expand_env`], [`under_mounts`]) decide; [`resolve`] does the I/O.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Container, EnvVar, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, api::ListParams};

use crate::{Cluster, meshlink::service_account_token_for};

/// The value of `fieldRef` path `field` of `pod`, for the paths the downward API serves to
/// environment variables.
fn field(pod: &Pod, field: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    match field {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        "status.hostIP" => pod.status.as_ref().and_then(|s| s.host_ip.clone()),
        _ => {
            let key = field
                .strip_prefix("metadata.labels['")
                .or_else(|| field.strip_prefix("metadata.annotations['"))?
                .strip_suffix("']")?;
            let map = if field.starts_with("metadata.labels") {
                pod.metadata.labels.as_ref()
            } else {
                pod.metadata.annotations.as_ref()
            };
            map?.get(key).cloned()
        }
    }
}

/// Kubernetes' `$(VAR)` expansion: references to variables defined earlier are replaced,
/// `$$` is a literal `$`, anything else is left as written.
fn expand(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some(v) = defined.get(&inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A value the environment takes from outside the Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    /// Key `key` of ConfigMap `name` in the Pod's namespace.
    ConfigMap { name: String, key: String },
}

/// The container's environment in order, with `fieldRef`s and `$(VAR)`s resolved;
/// `external` answers the values held elsewhere. An unresolvable reference is an error naming
/// the variable, as the kubelet refuses to start such a container.
pub fn expand_env(
    env: &[EnvVar],
    pod: &Pod,
    external: &dyn Fn(&External) -> Option<String>,
) -> Result<Vec<(String, String)>> {
    let mut defined = BTreeMap::new();
    let mut out = Vec::new();
    for var in env {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => expand(v, &defined),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    field(pod, &f.field_path).with_context(|| {
                        format!("{}: fieldRef {} has no value", var.name, f.field_path)
                    })?
                } else if let Some(c) = &from.config_map_key_ref {
                    let wanted = External::ConfigMap {
                        name: c.name.clone(),
                        key: c.key.clone(),
                    };
                    external(&wanted)
                        .with_context(|| format!("{}: {wanted:?} not found", var.name))?
                } else {
                    bail!("{}: a valueFrom the harness does not serve", var.name)
                }
            }
            (None, None) => String::new(),
        };
        defined.insert(var.name.clone(), value.clone());
        out.push((var.name.clone(), value));
    }
    Ok(out)
}

/// `value` with a leading mount path replaced by its directory (`mounts`: mount path →
/// directory), when it names a path under one.
pub fn under_mounts(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, dir) in mounts {
        let mount = mount.trim_end_matches('/');
        if value == mount {
            return dir.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(mount)
            && rest.starts_with('/')
        {
            return format!("{}{rest}", dir.display());
        }
    }
    value.to_owned()
}

/// `name.namespace.svc[.<domain>][.]:port` as (namespace, name, port).
fn service_address(value: &str) -> Option<(String, String, u16)> {
    let (host, port) = value.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let mut labels = host.trim_end_matches('.').split('.');
    let (name, namespace, svc) = (labels.next()?, labels.next()?, labels.next()?);
    (svc == "svc").then(|| (namespace.to_owned(), name.to_owned(), port))
}

/// A ready endpoint of the Service `value` names, at the port its `port` targets.
async fn service_endpoint(cluster: &Cluster, value: &str) -> Result<Option<SocketAddr>> {
    let Some((namespace, name, port)) = service_address(value) else {
        return Ok(None);
    };
    let client = cluster.client();
    let svc = Api::<Service>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await
        .with_context(|| format!("Service {namespace}/{name}, named by {value}"))?;
    let svc_port = svc
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == i32::from(port))
        .with_context(|| format!("Service {namespace}/{name} has no port {port}"))?;
    let slices = Api::<EndpointSlice>::namespaced(client, &namespace)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
        .await?;
    for slice in slices.items {
        let Some(target) = slice
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name == svc_port.name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in slice.endpoints.into_iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if let (true, Some(ip)) = (ready, ep.addresses.first()) {
                let ip: std::net::IpAddr = ip.parse()?;
                return Ok(Some(SocketAddr::new(ip, u16::try_from(target)?)));
            }
        }
    }
    bail!("Service {namespace}/{name} (named by {value}) has no ready endpoint")
}

/// A container's environment as the kubelet would give it, with its volumes' paths and its
/// control-plane Services' addresses turned into what this host has (see the module's
/// documentation). `volumes`: volume name → the Pod's directory for it.
pub async fn resolve(
    cluster: &Cluster,
    pod: &Pod,
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<(String, String)>> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    // ConfigMaps are read up front: the expansion is synchronous.
    let mut config_maps = BTreeMap::new();
    for var in container.env.iter().flatten() {
        if let Some(c) = var
            .value_from
            .as_ref()
            .and_then(|f| f.config_map_key_ref.as_ref())
        {
            let cm = Api::<ConfigMap>::namespaced(cluster.client(), &namespace)
                .get(&c.name)
                .await?;
            config_maps.insert(c.name.clone(), cm.data.unwrap_or_default());
        }
    }
    let external = |e: &External| match e {
        External::ConfigMap { name, key } => config_maps.get(name)?.get(key).cloned(),
    };
    let env = expand_env(container.env.as_deref().unwrap_or_default(), pod, &external)?;
    let mounts: Vec<(String, PathBuf)> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| Some((m.mount_path.clone(), volumes.get(&m.name)?.clone())))
        .collect();
    let mut out = Vec::new();
    for (name, value) in env {
        // Any value that is a Service's address, whatever the variable.
        let value = match service_endpoint(cluster, &value).await? {
            Some(addr) => addr.to_string(),
            None => under_mounts(&value, &mounts),
        };
        out.push((name, value));
    }
    Ok(out)
}

/// Makes the Pod's volumes in `dir` (one directory each, owned by `uid`): emptyDir volumes
/// empty, projected ServiceAccount tokens with a real token for their audience, ConfigMaps with
/// their keys. Returns volume name → directory.
pub async fn make_volumes(
    cluster: &Cluster,
    pod: &Pod,
    dir: &Path,
    uid: u32,
) -> Result<BTreeMap<String, PathBuf>> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().context("a Pod without a spec")?;
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    let mut made = BTreeMap::new();
    for volume in spec.volumes.iter().flatten() {
        let path = dir.join("volumes").join(&volume.name);
        std::fs::create_dir_all(&path)?;
        if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let audience = token.audience.as_deref().unwrap_or_default();
                    let value =
                        service_account_token_for(cluster, &namespace, account, audience).await?;
                    std::fs::write(path.join(&token.path), value)?;
                    std::os::unix::fs::chown(path.join(&token.path), Some(uid), Some(uid))?;
                }
            }
        }
        if let Some(cm) = &volume.config_map {
            let data = Api::<ConfigMap>::namespaced(cluster.client(), &namespace)
                .get(&cm.name)
                .await?
                .data
                .unwrap_or_default();
            for (key, value) in data {
                std::fs::write(path.join(key), value)?;
            }
        }
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
        made.insert(volume.name.clone(), path);
    }
    Ok(made)
}

/// What a kubelet reports for a started Pod: Running at `ip`, Ready or not yet.
pub async fn mark_running(
    pods: &Api<Pod>,
    name: &str,
    ip: std::net::Ipv4Addr,
    ready: bool,
) -> Result<()> {
    let ready = if ready { "True" } else { "False" };
    let status = serde_json::json!({ "status": {
        "phase": "Running",
        "podIP": ip.to_string(),
        "podIPs": [{ "ip": ip.to_string() }],
        "hostIP": "127.0.0.1",
        "conditions": [
            { "type": "PodScheduled", "status": "True" },
            { "type": "Initialized", "status": "True" },
            { "type": "ContainersReady", "status": ready },
            { "type": "Ready", "status": ready },
        ],
    } });
    pods.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .with_context(|| format!("marking Pod {name} Running"))?;
    Ok(())
}

/// What the scheduler does: binds Pod `name` of `pods` to `node`.
pub async fn bind(pods: &Api<Pod>, name: &str, node: &str) -> Result<()> {
    let binding = serde_json::json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": { "name": name },
        "target": { "apiVersion": "v1", "kind": "Node", "name": node },
    });
    pods.create_subresource::<_, serde_json::Value>(
        "binding",
        name,
        &kube::api::PostParams::default(),
        &binding,
    )
    .await
    .with_context(|| format!("binding Pod {name} to {node}"))?;
    Ok(())
}

/// What the scheduler and a kubelet do for the Pod of Deployment `namespace/deployment` whose
/// program the harness runs as a process at `ip`: waits for the ReplicaSet controller to make
/// it, binds it to the cluster's node and marks it Running and Ready at `ip`, so that its
/// Services have it as their endpoint. Returns the Pod's name.
pub async fn run_deployment_pod(
    cluster: &Cluster,
    namespace: &str,
    deployment: &str,
    ip: std::net::Ipv4Addr,
) -> Result<String> {
    use k8s_openapi::api::apps::v1::Deployment;

    let client = cluster.client();
    let selector = Api::<Deployment>::namespaced(client.clone(), namespace)
        .get(deployment)
        .await?
        .spec
        .and_then(|s| s.selector.match_labels)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let pod = crate::wait_for(
        &format!("the ReplicaSet controller to make a Pod of {namespace}/{deployment}"),
        std::time::Duration::from_secs(30),
        || async {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.metadata.deletion_timestamp.is_none())
        },
    )
    .await?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_none()
    {
        bind(&pods, &name, &cluster.node_name()).await?;
    }
    mark_running(&pods, &name, ip, true).await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": "web-abc", "namespace": "shop", "labels": { "app": "web" } },
            "spec": { "nodeName": "east-node", "serviceAccountName": "web", "containers": [] },
            "status": { "podIP": "172.31.4.2" },
        }))
        .unwrap()
    }

    fn env(vars: serde_json::Value) -> Vec<EnvVar> {
        serde_json::from_value(vars).unwrap()
    }

    #[test]
    fn environment_as_a_kubelet_resolves_it() {
        let vars = env(json!([
            { "name": "_pod_ns", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
            { "name": "_pod_sa", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } },
            { "name": "_app", "valueFrom": { "fieldRef": { "fieldPath": "metadata.labels['app']" } } },
            { "name": "ID", "value": "$(_pod_sa).$(_pod_ns).serviceaccount" },
            { "name": "LATER", "value": "$(DEFINED_AFTER)" },
            { "name": "DEFINED_AFTER", "value": "x" },
            { "name": "ESCAPED", "value": "$$(_pod_ns) $5 $(" },
            { "name": "ROOTS", "valueFrom": { "configMapKeyRef": { "name": "roots", "key": "ca.crt" } } },
            { "name": "EMPTY" },
        ]));
        let external = |e: &External| {
            (e == &External::ConfigMap {
                name: "roots".into(),
                key: "ca.crt".into(),
            })
                .then(|| "PEM".to_owned())
        };
        let got = expand_env(&vars, &pod(), &external).unwrap();
        let want = [
            ("_pod_ns", "shop"),
            ("_pod_sa", "web"),
            ("_app", "web"),
            ("ID", "web.shop.serviceaccount"),
            // Only variables defined before are expanded, as in Kubernetes.
            ("LATER", "$(DEFINED_AFTER)"),
            ("DEFINED_AFTER", "x"),
            ("ESCAPED", "$(_pod_ns) $5 $("),
            ("ROOTS", "PEM"),
            ("EMPTY", ""),
        ];
        assert_eq!(
            got,
            want.map(|(k, v)| (k.to_owned(), v.to_owned())).to_vec()
        );
    }

    #[test]
    fn unresolvable_references_are_errors_naming_the_variable() {
        let none = |_: &External| None;
        for vars in [
            json!([{ "name": "IP", "valueFrom": { "fieldRef": { "fieldPath": "status.hostIP" } } }]),
            json!([{ "name": "IP", "valueFrom": { "configMapKeyRef": { "name": "x", "key": "y" } } }]),
            json!([{ "name": "IP", "valueFrom": { "secretKeyRef": { "name": "x", "key": "y" } } }]),
        ] {
            let error = expand_env(&env(vars), &pod(), &none).unwrap_err();
            assert!(error.to_string().starts_with("IP:"), "{error}");
        }
    }

    #[test]
    fn paths_under_mounts() {
        let mounts = vec![
            (
                "/var/run/secrets/tokens".to_owned(),
                PathBuf::from("/tmp/p/token"),
            ),
            (
                "/var/run/linkerd/identity/end-entity/".to_owned(),
                PathBuf::from("/tmp/p/id"),
            ),
        ];
        for (value, want) in [
            (
                "/var/run/secrets/tokens/linkerd-identity-token",
                "/tmp/p/token/linkerd-identity-token",
            ),
            ("/var/run/linkerd/identity/end-entity", "/tmp/p/id"),
            // A longer name that only starts like the mount path is not under it.
            (
                "/var/run/secrets/tokens-other/x",
                "/var/run/secrets/tokens-other/x",
            ),
            ("0.0.0.0:4143", "0.0.0.0:4143"),
        ] {
            assert_eq!(under_mounts(value, &mounts), want, "{value}");
        }
    }

    #[test]
    fn service_addresses() {
        let svc = |ns: &str, name: &str, port| Some((ns.to_owned(), name.to_owned(), port));
        assert_eq!(
            service_address("linkerd-dst.linkerd.svc.cluster.local.:8086"),
            svc("linkerd", "linkerd-dst", 8086)
        );
        assert_eq!(
            service_address("linkerd-identity.linkerd.svc:8080"),
            svc("linkerd", "linkerd-identity", 8080)
        );
        assert_eq!(service_address("10.0.0.1:8086"), None);
        assert_eq!(service_address("linkerd-dst.linkerd.example:8086"), None);
        assert_eq!(service_address("linkerd-dst.linkerd.svc"), None);
    }
}
