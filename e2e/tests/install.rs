//! `meshlink install`, `uninstall` and the proxy injector against real API servers.
//!
//! The install output is applied with `kubectl apply --server-side`, as a user applies it. The
//! injector runs as a process under its manifest's ServiceAccount, on a veth address of this
//! host with a ready Pod there, so that the API server calls it through its Service's endpoints
//! (the clusters run `--enable-aggregator-routing`); the Deployment and ReplicaSet controllers
//! make the Pods, which are stored, never run.
//!
//! Needs root and iproute2 (the veth address); without them the setup fails and says so.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, ensure};
use e2e::{
    Cluster, ClusterOptions,
    install::{
        anchors_of, check, check_result, documents, injector_endpoint, install, kubectl, pods_of,
        start_injector, stored_versions, webhook_ca_bundle, write_file,
    },
    netns::Host,
    wait_for,
};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{Namespace, Pod, Secret},
};
use kube::{
    Api,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const TRUST_DOMAIN: &str = "test.cluster.local";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_applied_twice_changes_nothing_and_uninstall_removes_it() -> Result<()> {
    let cluster = Cluster::start("install").await?;
    let manifests = install(&cluster, &["--identity-trust-domain", TRUST_DOMAIN, "--ha"])?;
    let count = documents(&manifests)?.len();

    // What the cluster's own controllers do after an apply settles first: the CRD becomes
    // Established and the remote-access token Secret gets its token.
    let secrets: Api<Secret> = Api::namespaced(cluster.client(), "linkerd-multicluster");
    wait_for("the remote-access token", WAIT, || async {
        secrets
            .get_opt("linkerd-service-mirror-remote-access-default-token")
            .await
            .ok()?
            .and_then(|s| s.data)
            .is_some_and(|d| d.contains_key("token"))
            .then_some(())
    })
    .await?;
    kubectl(
        &cluster,
        &[
            "wait",
            "--for=condition=Established",
            "crd/links.multicluster.linkerd.io",
            "--timeout=30s",
        ],
        None,
    )?;
    let before = stored_versions(&cluster, &manifests)?;
    assert_eq!(before.len(), count, "every object of the output is stored");

    let again = kubectl(
        &cluster,
        &["apply", "--server-side", "-f", "-"],
        Some(&manifests),
    )?;
    assert_eq!(
        again.lines().count(),
        count,
        "the second apply went through every object: {again}"
    );
    let after = stored_versions(&cluster, &manifests)?;
    let changed: Vec<&String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    assert!(changed.is_empty(), "the second apply wrote {changed:?}");

    // uninstall refuses while a Link exists, naming it.
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let link = json!({
        "apiVersion": "multicluster.linkerd.io/v1alpha3",
        "kind": "Link",
        "metadata": { "name": "east", "namespace": "linkerd-multicluster" },
        "spec": { "targetClusterName": "east", "clusterCredentialsSecret": "cluster-credentials-east" },
    });
    kubectl(
        &cluster,
        &["apply", "--server-side", "-f", "-"],
        Some(&link.to_string()),
    )?;
    let refused = e2e::mesh::cli(&["uninstall", "--kubeconfig", &kubeconfig])
        .err()
        .context("uninstall with a Link present succeeded")?
        .to_string();
    assert!(
        refused.contains("Please unlink the following clusters") && refused.contains("* east"),
        "{refused}"
    );
    kubectl(
        &cluster,
        &["delete", "link", "-n", "linkerd-multicluster", "east"],
        None,
    )?;

    // Without Links, it prints what install made (and nothing the cluster lacks), Namespaces
    // last, and kubectl deletes it all.
    let removal = e2e::mesh::cli(&["uninstall", "--kubeconfig", &kubeconfig])?;
    let stubs = documents(&removal)?;
    assert_eq!(stubs.len(), count, "{removal}");
    let kinds: Vec<&str> = stubs.iter().filter_map(|d| d["kind"].as_str()).collect();
    let first_ns = kinds.iter().position(|k| *k == "Namespace").unwrap_or(0);
    assert!(
        kinds[first_ns..].iter().all(|k| *k == "Namespace"),
        "{kinds:?}"
    );
    kubectl(
        &cluster,
        &["delete", "--wait=false", "-f", "-"],
        Some(&removal),
    )?;
    let gone = kubectl(
        &cluster,
        &["get", "--ignore-not-found", "-f", "-", "-o", "name"],
        Some(&removal),
    )?;
    // Namespaces take a moment to finalize; everything else is gone at once.
    assert!(
        gone.lines().all(|l| l.starts_with("namespace/")),
        "left after uninstall: {gone}"
    );
    Ok(())
}

/// A Deployment `name` of one replica in `namespace`, labelled `app=<name>`.
async fn deploy(cluster: &Cluster, namespace: &str, name: &str) -> Result<()> {
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": "meshlink.invalid/app:1", "ports": [{ "containerPort": 8080 }] }] },
            },
        },
    }))?;
    Api::<Deployment>::namespaced(cluster.client(), namespace)
        .create(&PostParams::default(), &deployment)
        .await?;
    Ok(())
}

/// The stored Pod of Deployment `app`, once the ReplicaSet controller made it.
async fn pod_of(cluster: &Cluster, namespace: &str, app: &str) -> Result<Pod> {
    Ok(
        wait_for(&format!("a Pod of {namespace}/{app}"), WAIT, || async {
            pods_of(cluster, namespace, app)
                .await
                .ok()?
                .into_iter()
                .next()
        })
        .await?,
    )
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.clone().unwrap_or_default();
    (
        spec.containers.into_iter().map(|c| c.name).collect(),
        spec.init_containers
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect(),
    )
}

/// Whether the API server reaches the injector now: a dry-run Pod that asks for the proxy comes
/// back with it (what `meshlink check` asks too).
async fn injector_answers(cluster: &Cluster, namespace: &str) -> Result<bool> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "probe", "annotations": { "linkerd.io/inject": "enabled" } },
        "spec": { "containers": [{ "name": "app", "image": "meshlink.invalid/app:1" }] },
    }))?;
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let stored = Api::<Pod>::namespaced(cluster.client(), namespace)
        .create(&params, &pod)
        .await?;
    Ok(container_names(&stored)
        .0
        .iter()
        .any(|c| c == "linkerd-proxy"))
}

async fn annotated_namespace(cluster: &Cluster, name: &str, inject: Option<&str>) -> Result<()> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            annotations: inject
                .map(|v| BTreeMap::from([("linkerd.io/inject".to_owned(), v.to_owned())])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(cluster.client())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// The API server's count of calls to `webhook` that failed and were let through.
async fn fail_open_count(cluster: &Cluster, webhook: &str) -> Result<f64> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = cluster.client().request_text(request).await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_admission_webhook_fail_open_count{") && l.contains(webhook)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_meshes_annotated_namespaces_and_never_blocks() -> Result<()> {
    let mut opts = ClusterOptions::new("inject");
    opts.workload_controllers = true;
    let cluster = Cluster::start_with(opts).await?;
    let dir = tempfile::tempdir()?;
    let manifests = install(&cluster, &["--identity-trust-domain", TRUST_DOMAIN])?;
    let anchors = write_file(dir.path(), "anchors.pem", &anchors_of(&manifests)?)?;
    // The injector listens on this host's end of a veth pair: an address that is not loopback,
    // as an endpoint's must be.
    let net = Host::create()?;
    let ip = net.host_address();
    let extra = [format!("--trust-domain={TRUST_DOMAIN}")];
    let mut injector = start_injector(&cluster, ip, &anchors, &extra, dir.path()).await?;
    injector_endpoint(&cluster, ip).await?;
    let logs = |i: &e2e::install::Injector| {
        format!(
            "injector:\n{}\nkube-apiserver:\n{}",
            i.program.log_tail(),
            cluster.log_tail(e2e::Component::ApiServer)
        )
    };

    // The CA it made is in the webhook configuration, and the API server calls it.
    let bundle = wait_for(
        "the CA bundle in the webhook configuration",
        WAIT,
        || async { Some(webhook_ca_bundle(&cluster).await.ok()?).filter(|b| !b.is_empty()) },
    )
    .await?;
    annotated_namespace(&cluster, "shop", Some("enabled")).await?;
    annotated_namespace(&cluster, "plain", None).await?;
    wait_for("the API server to call the injector", WAIT, || async {
        injector_answers(&cluster, "shop").await.ok()?.then_some(())
    })
    .await
    .with_context(|| logs(&injector))?;

    // A Deployment in the annotated namespace: its Pod is stored with the proxy.
    deploy(&cluster, "shop", "web").await?;
    let web = pod_of(&cluster, "shop", "web").await?;
    let (containers, init) = container_names(&web);
    assert_eq!(containers, ["linkerd-proxy", "app"], "{}", logs(&injector));
    assert_eq!(init, ["linkerd-init"]);
    let labels = web.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("linkerd.io/proxy-deployment")
            .map(String::as_str),
        Some("web")
    );
    let env = web.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let anchors_env = env
        .iter()
        .find(|e| e.name == "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS")
        .and_then(|e| e.value.clone())
        .unwrap_or_default();
    assert_eq!(
        anchors_env.trim(),
        std::fs::read_to_string(&anchors)?.trim(),
        "the anchors it was given"
    );

    // One in a namespace without the annotation: stored as it is, and the injector says why.
    deploy(&cluster, "plain", "api").await?;
    let api = pod_of(&cluster, "plain", "api").await?;
    assert_eq!(container_names(&api).0, ["app"]);
    wait_for("the skip counted", WAIT, || async {
        let skipped = injector
            .program
            .metric("injector_pods_total", "reason=\"injection_not_enabled\"")
            .await
            .ok()?;
        (skipped >= 1.0).then_some(())
    })
    .await?;
    ensure!(
        injector.program.log_tail().contains("not injected"),
        "the skip is logged: {}",
        logs(&injector)
    );

    // The injector stopped: Pods are still created (failurePolicy Ignore), without the proxy,
    // and the API server counts the call it let through.
    let fail_open_before = fail_open_count(&cluster, "linkerd-proxy-injector.linkerd.io").await?;
    injector.program.kill();
    deploy(&cluster, "shop", "late").await?;
    let late = pod_of(&cluster, "shop", "late").await?;
    assert_eq!(container_names(&late).0, ["app"]);
    let fail_open_after = fail_open_count(&cluster, "linkerd-proxy-injector.linkerd.io").await?;
    assert!(
        fail_open_after > fail_open_before,
        "the API server's fail-open count moved: {fail_open_before} -> {fail_open_after}"
    );
    // And `meshlink check` names the Pod that should have the proxy, with what to do.
    let (_, report) = check(&cluster, "0s").await?;
    let pods = check_result(&report, "pods-meshed")?;
    assert_eq!(pods["result"], "warning", "{pods:#}");
    let error = pods["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!(
            "shop/{}",
            late.metadata.name.clone().unwrap_or_default()
        )) && error.contains("asks for the proxy"),
        "{error}"
    );
    assert!(
        pods["hint"]
            .as_str()
            .unwrap_or_default()
            .contains("rollout restart")
    );
    assert_eq!(
        check_result(&report, "injector-reachable")?["result"],
        "error"
    );

    // A new CA (its Secret deleted, the injector restarted): the bundle is replaced and the API
    // server trusts the new certificate without a restart of its own.
    Api::<Secret>::namespaced(cluster.client(), "linkerd")
        .delete("linkerd-proxy-injector-ca", &DeleteParams::default())
        .await?;
    let injector = start_injector(&cluster, ip, &anchors, &extra, dir.path()).await?;
    wait_for("the new CA bundle", WAIT, || async {
        let now = webhook_ca_bundle(&cluster).await.ok()?;
        (!now.is_empty() && now != bundle).then_some(())
    })
    .await?;
    wait_for("the API server to call the new injector", WAIT, || async {
        injector_answers(&cluster, "shop").await.ok()?.then_some(())
    })
    .await
    .with_context(|| logs(&injector))?;
    Ok(())
}
