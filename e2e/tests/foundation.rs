//! The foundation, proven on two real clusters at once: the generated Link CRD applies, Links
//! round-trip in every served version, Links written by Linkerd are accepted unchanged, every
//! CEL rule refuses its bad input with its message, Services get Endpoints and EndpointSlices
//! from Ready Pods, and ServiceAccount tokens authenticate and are limited by RBAC.
//!
//! Starting clusters is the slow part, so one pair (`east`, `west`) serves every check here;
//! each check runs on both at once and uses its own namespace or object names. A cluster that
//! fails to start fails every check with the component's log (never a skip).

use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    pin::Pin,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use e2e::{Cluster, apply_yaml, create_namespace, create_ready_pod, wait_for};
use k8s_openapi::api::{
    authentication::v1::{SelfSubjectReview, TokenRequest},
    core::v1::{Endpoints, Secret, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, ResourceExt,
    api::{DynamicObject, ListParams, Patch, PatchParams, PostParams},
    core::ObjectMeta,
};
use libtest_mimic::{Arguments, Failed, Trial};
use link_crd::{Link, LinkVersion, api_resource, rules};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

type Check = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// What every check gets: the clusters (or why they did not start) and the CRD, installed once.
struct Env {
    clusters: Result<Vec<Cluster>, String>,
    crd: OnceCell<Result<(), String>>,
}

impl Env {
    fn clusters(&self) -> Result<&[Cluster]> {
        self.clusters
            .as_deref()
            .map_err(|e| anyhow!("the test clusters did not start: {e}"))
    }

    /// The committed CRD, applied to every cluster once (the first check to need it does it).
    async fn with_crd(&self) -> Result<&[Cluster]> {
        let clusters = self.clusters()?;
        self.crd
            .get_or_init(|| async {
                let yaml = std::fs::read_to_string(crd_path()).map_err(|e| e.to_string())?;
                on_each(clusters, |c| {
                    let yaml = yaml.clone();
                    async move { Ok(apply_yaml(&c.client(), &yaml).await.map(drop)?) }
                })
                .await
                .map_err(|e| format!("{e:#}"))
            })
            .await
            .clone()
            .map_err(|e| anyhow!("applying the CRD failed: {e}"))?;
        Ok(clusters)
    }
}

fn crd_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds/link.yaml")
}

/// Runs `check` against every cluster concurrently; the error names the cluster that failed.
async fn on_each<'a, F, Fut>(clusters: &'a [Cluster], check: F) -> Result<()>
where
    F: Fn(&'a Cluster) -> Fut,
    Fut: Future<Output = Result<()>> + 'a,
{
    let results = futures::future::join_all(clusters.iter().map(|c| {
        let fut = check(c);
        async move {
            fut.await
                .with_context(|| format!("on cluster {}", c.name()))
        }
    }))
    .await;
    results.into_iter().collect()
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let clusters = runtime
        .block_on(Cluster::start_many(&["east", "west"]))
        .map_err(|e| e.to_string());
    let env = Arc::new(Env {
        clusters,
        crd: OnceCell::new(),
    });

    let checks: &[(&str, Check)] = &[
        ("crd_applies_cleanly", |e| Box::pin(crd_applies_cleanly(e))),
        ("link_round_trips_in_every_served_version", |e| {
            Box::pin(link_round_trips_in_every_served_version(e))
        }),
        ("links_written_by_linkerd_are_accepted_unchanged", |e| {
            Box::pin(links_written_by_linkerd_are_accepted_unchanged(e))
        }),
        ("cel_rules_reject_bad_input_with_their_message", |e| {
            Box::pin(cel_rules_reject_bad_input_with_their_message(e))
        }),
        ("status_and_printer_columns", |e| {
            Box::pin(status_and_printer_columns(e))
        }),
        ("ready_pod_yields_endpoints_and_endpointslice", |e| {
            Box::pin(ready_pod_yields_endpoints_and_endpointslice(e))
        }),
        (
            "service_account_tokens_authenticate_and_are_limited_by_rbac",
            |e| {
                Box::pin(service_account_tokens_authenticate_and_are_limited_by_rbac(
                    e,
                ))
            },
        ),
    ];
    let trials = checks
        .iter()
        .map(|&(name, check)| {
            let env = env.clone();
            let handle = runtime.handle().clone();
            Trial::test(name, move || {
                handle
                    .block_on(check(env))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Stop the clusters before exiting: `exit` skips destructors.
    drop(env);
    drop(runtime);
    conclusion.exit_code()
}

// ---------------------------------------------------------------------------------------------

async fn crd_applies_cleanly(env: Arc<Env>) -> Result<()> {
    let clusters = env.with_crd().await?;
    let yaml = std::fs::read_to_string(crd_path())?;
    on_each(clusters, |c| {
        let yaml = yaml.clone();
        async move {
            let client = c.client();
            // Every version is served, v1alpha3 preferred.
            let group = kube::discovery::group(&client, link_crd::GROUP).await?;
            let versions: Vec<_> = group.versions().collect();
            ensure!(
                versions == ["v1alpha3", "v1alpha2", "v1alpha1"],
                "served versions: {versions:?}"
            );
            // Applying the same document again changes nothing.
            let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
                Api::all(client.clone());
            let before = crds.get("links.multicluster.linkerd.io").await?;
            apply_yaml(&client, &yaml).await?;
            let after = crds.get("links.multicluster.linkerd.io").await?;
            ensure!(
                before.resource_version() == after.resource_version(),
                "re-applying the committed CRD changed it"
            );
            ensure!(
                after.labels().get("linkerd.io/extension").map(String::as_str)
                    == Some("multicluster")
            );
            Ok(())
        }
    })
    .await
}

/// A spec that uses every field `version` has.
fn full_spec(version: LinkVersion, cluster: &str) -> Value {
    let mut spec = json!({
        "targetClusterName": cluster,
        "targetClusterDomain": "cluster.local",
        "targetClusterLinkerdNamespace": "linkerd",
        "clusterCredentialsSecret": format!("cluster-credentials-{cluster}"),
        "gatewayAddress": "192.0.2.10,gw.example.com",
        "gatewayPort": "4143",
        "gatewayIdentity": "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local",
        "probeSpec": { "path": "/ready", "port": "4191", "period": "3s" },
        "selector": { "matchLabels": { "mirror.linkerd.io/exported": "true" } },
        "remoteDiscoverySelector": {
            "matchExpressions": [{ "key": "mirror.linkerd.io/exported", "operator": "In", "values": ["remote-discovery"] }]
        },
    });
    if version != LinkVersion::V1alpha1 {
        spec["federatedServiceSelector"] =
            json!({ "matchLabels": { "mirror.linkerd.io/federated": "member" } });
    }
    if version == LinkVersion::V1alpha3 {
        spec["excludedAnnotations"] = json!(["example.com/secret", "internal.example.com/*"]);
        spec["excludedLabels"] = json!(["team"]);
    }
    spec
}

fn link_object(version: LinkVersion, name: &str, spec: Value) -> Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", link_crd::GROUP, version.name()),
        "kind": "Link",
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

async fn link_round_trips_in_every_served_version(env: Arc<Env>) -> Result<()> {
    let clusters = env.with_crd().await?;
    on_each(clusters, |c| async move {
        let client = c.client();
        create_namespace(&client, "roundtrip").await?;
        for version in LinkVersion::ALL {
            let ar = api_resource(version);
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "roundtrip", &ar);
            let name = format!("rt-{}", version.name());
            let spec = full_spec(version, &name);
            api.create(
                &PostParams::default(),
                &link_object(version, &name, spec.clone())?,
            )
            .await
            .with_context(|| format!("creating a {} Link", version.name()))?;

            // Read back in the same version: exactly what was written plus the CRD defaults.
            let mut want = spec.clone();
            want["probeSpec"]["failureThreshold"] = json!("3");
            want["probeSpec"]["timeout"] = json!("30s");
            let got = api.get(&name).await?;
            ensure!(
                got.data["spec"] == want,
                "{}: read back {:#} want {want:#}",
                version.name(),
                got.data["spec"]
            );

            // Read as v1alpha3 through the Rust types.
            let typed: Api<Link> = Api::namespaced(client.clone(), "roundtrip");
            let link = typed.get(&name).await?;
            ensure!(link.spec.target_cluster_name == name);
            ensure!(link.spec.probe_spec.failure_threshold == "3");
            ensure!(link.spec.probe_spec.timeout == "30s");
            ensure!(
                link.spec.gateway_addresses().collect::<Vec<_>>()
                    == ["192.0.2.10", "gw.example.com"]
            );
            let typed_json = serde_json::to_value(&link.spec)?;
            ensure!(typed_json == want, "typed v1alpha3 view: {typed_json:#}");

            // And every other version shows the fields it has, and only those.
            for other in LinkVersion::ALL {
                let view: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), "roundtrip", &api_resource(other));
                let seen = view.get(&name).await?.data["spec"].clone();
                for field in [
                    "federatedServiceSelector",
                    "excludedAnnotations",
                    "excludedLabels",
                ] {
                    let has_field = other != LinkVersion::V1alpha1
                        && (field == "federatedServiceSelector" || other == LinkVersion::V1alpha3);
                    let written = want.get(field).is_some();
                    ensure!(
                        seen.get(field).is_some() == (has_field && written),
                        "{field} as seen through {} of a {} Link: {seen:#}",
                        other.name(),
                        version.name()
                    );
                }
            }
        }

        // Fields a version does not have are pruned when written through it, as Linkerd's CRD
        // does (there is no conversion webhook to carry them).
        let v1: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            "roundtrip",
            &api_resource(LinkVersion::V1alpha1),
        );
        let mut spec = full_spec(LinkVersion::V1alpha1, "pruned");
        spec["excludedLabels"] = json!(["team"]);
        v1.create(
            &PostParams::default(),
            &link_object(LinkVersion::V1alpha1, "pruned", spec)?,
        )
        .await?;
        let typed: Api<Link> = Api::namespaced(client.clone(), "roundtrip");
        ensure!(typed.get("pruned").await?.spec.excluded_labels.is_empty());

        // The Rust types round-trip too: what they write is what they read.
        let mut link = Link::new(
            "typed",
            serde_json::from_value(full_spec(LinkVersion::V1alpha3, "typed"))?,
        );
        link.metadata.namespace = Some("roundtrip".into());
        let created = typed.create(&PostParams::default(), &link).await?;
        ensure!(
            created.spec == link.spec,
            "typed create: {:#?}",
            created.spec
        );
        Ok(())
    })
    .await
}

async fn links_written_by_linkerd_are_accepted_unchanged(env: Arc<Env>) -> Result<()> {
    let clusters = env.with_crd().await?;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut docs = Vec::new();
    for file in [
        "linkerd-link-gen-v1alpha3.yaml",
        "linkerd-link-gen-no-gateway.yaml",
        "linkerd-link-v1alpha1.yaml",
    ] {
        let text = std::fs::read_to_string(fixtures.join(file))?;
        let value: Value = serde_norway::from_str(&text).with_context(|| file.to_owned())?;
        docs.push((file, value));
    }
    on_each(clusters, |c| {
        let docs = docs.clone();
        async move {
            let client = c.client();
            create_namespace(&client, "linkerd-multicluster").await?;
            for (file, doc) in docs {
                // Created exactly as the file says (a plain POST, as `kubectl create` does).
                let obj: DynamicObject = serde_json::from_value(doc.clone())?;
                let version = doc["apiVersion"].as_str().unwrap_or_default();
                let ar = api_resource(match version.rsplit('/').next() {
                    Some("v1alpha1") => LinkVersion::V1alpha1,
                    Some("v1alpha2") => LinkVersion::V1alpha2,
                    _ => LinkVersion::V1alpha3,
                });
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), "linkerd-multicluster", &ar);
                let stored = api
                    .create(&PostParams::default(), &obj)
                    .await
                    .with_context(|| format!("{file} was refused"))?;
                // Nothing the file said was changed or dropped.
                for (k, v) in doc["spec"].as_object().into_iter().flatten() {
                    if k == "probeSpec" {
                        for (pk, pv) in v.as_object().into_iter().flatten() {
                            ensure!(stored.data["spec"][k][pk] == *pv, "{file}: probeSpec.{pk}");
                        }
                    } else {
                        ensure!(
                            stored.data["spec"][k] == *v,
                            "{file}: spec.{k} became {}",
                            stored.data["spec"][k]
                        );
                    }
                }
                // meshlink's types read it.
                let typed: Api<Link> = Api::namespaced(client.clone(), "linkerd-multicluster");
                let link = typed.get(&obj.name_any()).await?;
                ensure!(link.spec.target_cluster_name == obj.name_any());
                ensure!(
                    link.spec.probe_spec.failure_threshold == "3",
                    "{file}: CRD default"
                );
            }
            let typed: Api<Link> = Api::namespaced(client.clone(), "linkerd-multicluster");
            let west = typed.get("west").await?;
            ensure!(west.spec.selector.is_none() && west.spec.gateway_port.is_empty());
            ensure!(west.spec.excluded_labels == ["team.example.com/*"]);
            let north = typed.get("north").await?;
            let labels =
                BTreeMap::from([("mirror.linkerd.io/exported".to_owned(), "true".to_owned())]);
            ensure!(
                north
                    .spec
                    .selector
                    .as_ref()
                    .is_some_and(|s| s.matches(&labels))
            );
            Ok(())
        }
    })
    .await
}

async fn cel_rules_reject_bad_input_with_their_message(env: Arc<Env>) -> Result<()> {
    let clusters = env.with_crd().await?;
    // (what is wrong, a change to a valid spec, the field path, the message)
    let bad: &[(&str, Value, &str, &str)] = &[
        (
            "gateway port is a name",
            json!({"gatewayPort": "http"}),
            "spec.gatewayPort",
            rules::PORT_MESSAGE,
        ),
        (
            "gateway port 0",
            json!({"gatewayPort": "0"}),
            "spec.gatewayPort",
            rules::PORT_MESSAGE,
        ),
        (
            "gateway port too big",
            json!({"gatewayPort": "65536"}),
            "spec.gatewayPort",
            rules::PORT_MESSAGE,
        ),
        (
            "probe port",
            json!({"probeSpec": {"port": "41 91"}}),
            "spec.probeSpec.port",
            rules::PORT_MESSAGE,
        ),
        (
            "period without unit",
            json!({"probeSpec": {"period": "3"}}),
            "spec.probeSpec.period",
            rules::DURATION_MESSAGE,
        ),
        (
            "period in words",
            json!({"probeSpec": {"period": "3 seconds"}}),
            "spec.probeSpec.period",
            rules::DURATION_MESSAGE,
        ),
        (
            "negative timeout",
            json!({"probeSpec": {"timeout": "-1s"}}),
            "spec.probeSpec.timeout",
            rules::DURATION_MESSAGE,
        ),
        (
            "zero timeout",
            json!({"probeSpec": {"timeout": "0s"}}),
            "spec.probeSpec.timeout",
            rules::DURATION_MESSAGE,
        ),
        (
            "threshold 0",
            json!({"probeSpec": {"failureThreshold": "0"}}),
            "spec.probeSpec.failureThreshold",
            rules::FAILURE_THRESHOLD_MESSAGE,
        ),
        (
            "threshold in words",
            json!({"probeSpec": {"failureThreshold": "three"}}),
            "spec.probeSpec.failureThreshold",
            rules::FAILURE_THRESHOLD_MESSAGE,
        ),
        (
            "cluster name not a DNS label",
            json!({"targetClusterName": "East_1"}),
            "spec.targetClusterName",
            rules::CLUSTER_NAME_MESSAGE,
        ),
        (
            "unknown operator",
            json!({"selector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}}),
            "spec.selector.matchExpressions[0]",
            rules::OPERATOR_MESSAGE,
        ),
        (
            "In without values",
            json!({"remoteDiscoverySelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
            "spec.remoteDiscoverySelector.matchExpressions[0]",
            rules::VALUES_REQUIRED_MESSAGE,
        ),
        (
            "Exists with values",
            json!({"federatedServiceSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
            "spec.federatedServiceSelector.matchExpressions[0]",
            rules::VALUES_FORBIDDEN_MESSAGE,
        ),
    ];
    // Values at the edges of each rule, all accepted.
    let good: &[Value] = &[
        json!({"gatewayPort": "1", "probeSpec": {"port": "65535"}}),
        json!({"probeSpec": {"period": "1m30s", "timeout": "500ms", "failureThreshold": "1"}}),
        json!({"probeSpec": {"period": "1.5h", "timeout": "2s"}}),
        json!({"targetClusterName": "us-east-1"}),
        json!({"selector": {"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}, {"key": "b", "operator": "NotIn", "values": ["x"]}]}}),
    ];
    on_each(clusters, |c| async move {
        let client = c.client();
        create_namespace(&client, "cel").await?;
        let api: Api<Link> = Api::namespaced(client.clone(), "cel");
        for (i, (what, change, field, message)) in bad.iter().enumerate() {
            let mut spec = full_spec(LinkVersion::V1alpha3, "valid");
            merge(&mut spec, change);
            let link = Link::new(&format!("bad-{i}"), serde_json::from_value(spec)?);
            match api.create(&PostParams::default(), &link).await {
                Ok(_) => bail!("{what}: accepted"),
                Err(kube::Error::Api(e)) => {
                    ensure!(e.code == 422, "{what}: HTTP {} {}", e.code, e.message);
                    ensure!(
                        e.message.contains(&format!("{field}: Invalid value"))
                            && e.message.contains(message),
                        "{what}: the API server said {:?}, not {field}: {message:?}",
                        e.message
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        for (i, change) in good.iter().enumerate() {
            let mut spec = full_spec(LinkVersion::V1alpha3, "valid");
            merge(&mut spec, change);
            let link = Link::new(&format!("good-{i}"), serde_json::from_value(spec)?);
            api.create(&PostParams::default(), &link)
                .await
                .with_context(|| format!("valid change {change} was refused"))?;
        }
        // The rules hold in the old versions too.
        let v1: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "cel", &api_resource(LinkVersion::V1alpha1));
        let mut spec = full_spec(LinkVersion::V1alpha1, "old");
        spec["probeSpec"]["period"] = json!("3");
        let err = v1
            .create(
                &PostParams::default(),
                &link_object(LinkVersion::V1alpha1, "old", spec)?,
            )
            .await
            .err()
            .ok_or_else(|| anyhow!("v1alpha1 accepted period \"3\""))?;
        ensure!(err.to_string().contains(rules::DURATION_MESSAGE), "{err}");
        Ok(())
    })
    .await
}

/// Merges `change` into `base`, object by object.
fn merge(base: &mut Value, change: &Value) {
    match (base, change) {
        (Value::Object(b), Value::Object(c)) => {
            for (k, v) in c {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, c) => *b = c.clone(),
    }
}

async fn status_and_printer_columns(env: Arc<Env>) -> Result<()> {
    let clusters = env.with_crd().await?;
    on_each(clusters, |c| async move {
        let client = c.client();
        create_namespace(&client, "status").await?;
        let api: Api<Link> = Api::namespaced(client.clone(), "status");
        let link = Link::new("east", serde_json::from_value(full_spec(LinkVersion::V1alpha3, "east"))?);
        api.create(&PostParams::default(), &link).await?;

        // Linkerd's status format, as its controller writes it (a merge patch of `status`), plus
        // meshlink's Link-level Ready condition.
        let now = "2026-01-02T03:04:05Z";
        let status = json!({ "status": {
            "mirrorServices": [{
                "controllerName": "linkerd.io/service-mirror",
                "remoteRef": { "name": "web", "namespace": "shop", "kind": "Service" },
                "conditions": [{
                    "type": "Mirrored", "status": "True", "reason": "Mirrored", "message": "",
                    "lastTransitionTime": now, "lastProbeTime": null,
                    "localRef": { "name": "web-east", "namespace": "shop", "kind": "Service" },
                }],
            }],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Ready", "message": "", "lastTransitionTime": now,
            }],
        }});
        api.patch_status("east", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .context("Linkerd-format status was refused")?;
        let got = api.get_status("east").await?;
        let st = got.status.ok_or_else(|| anyhow!("no status"))?;
        let entry = &st.mirror_services[0];
        ensure!(entry.remote_ref.group == "core", "group defaulted: {:?}", entry.remote_ref);
        ensure!(entry.conditions[0].local_ref.as_ref().is_some_and(|r| r.name == "web-east"));

        // A malformed status (Linkerd's v1alpha2 wrote an empty localRef) is refused.
        let bad = json!({ "status": { "mirrorServices": [{
            "controllerName": "linkerd.io/service-mirror",
            "remoteRef": { "name": "web", "namespace": "shop" },
            "conditions": [{ "type": "Mirrored", "status": "True", "reason": "Mirrored", "message": "",
                "lastTransitionTime": now, "localRef": {} }],
        }]}});
        ensure!(
            api.patch_status("east", &PatchParams::default(), &Patch::Merge(&bad)).await.is_err(),
            "an empty localRef was accepted"
        );

        // What `kubectl get links` shows: the Table the API server renders from the columns.
        let req = http::Request::get(format!(
            "/apis/{}/v1alpha3/namespaces/status/links",
            link_crd::GROUP
        ))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
        let table: Value = client.request(req).await?;
        let columns: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        ensure!(columns == ["Name", "Target", "Gateway", "Ready", "Age"], "{columns:?}");
        let cells = &table["rows"][0]["cells"];
        ensure!(cells[1] == "east" && cells[2] == "192.0.2.10,gw.example.com" && cells[3] == "True", "{cells}");
        Ok(())
    })
    .await
}

async fn ready_pod_yields_endpoints_and_endpointslice(env: Arc<Env>) -> Result<()> {
    let clusters = env.clusters()?;
    on_each(clusters, |c| async move {
        let client = c.client();
        let ns = "shop";
        create_namespace(&client, ns).await?;
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": "web" },
            "spec": {
                "selector": { "app": "web" },
                "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }],
            },
        }))?;
        services.create(&PostParams::default(), &svc).await?;
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        // Addresses from the documentation range: API data only, never dialled.
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5));
        create_ready_pod(&client, ns, "web-0", &labels, ip, &c.node_name()).await?;

        let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), ns);
        wait_for(
            "Endpoints shop/web with the Pod's address",
            Duration::from_secs(30),
            || async {
                let ep = endpoints.get_opt("web").await.ok().flatten()?;
                let subset = ep.subsets?.into_iter().next()?;
                let addr = subset.addresses?.into_iter().next()?;
                let port = subset.ports?.into_iter().next()?;
                (addr.ip == "192.0.2.5" && port.port == 8080).then_some(())
            },
        )
        .await?;

        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
        wait_for(
            "an EndpointSlice for shop/web, Ready",
            Duration::from_secs(30),
            || async {
                let lp = ListParams::default().labels("kubernetes.io/service-name=web");
                let list = slices.list(&lp).await.ok()?;
                list.items.iter().find_map(|s| {
                    let ep = s
                        .endpoints
                        .iter()
                        .flatten()
                        .find(|e| e.addresses == ["192.0.2.5"])?;
                    let ready = ep.conditions.as_ref()?.ready?;
                    let port = s.ports.as_ref()?.first()?.port?;
                    (ready && port == 8080).then_some(())
                })
            },
        )
        .await?;
        Ok(())
    })
    .await
}

async fn service_account_tokens_authenticate_and_are_limited_by_rbac(env: Arc<Env>) -> Result<()> {
    let clusters = env.clusters()?;
    on_each(clusters, |c| async move {
        let client = c.client();
        let ns = "rbac";
        create_namespace(&client, ns).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta { name: Some("reader".into()), ..Default::default() },
            ..Default::default()
        };
        sas.create(&PostParams::default(), &sa).await?;

        // A short-lived token from TokenRequest...
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": { "audiences": [e2e::SERVICE_ACCOUNT_ISSUER], "expirationSeconds": 600 }
        }))?;
        let requested = sas
            .create_token_request("reader", &PostParams::default(), &request)
            .await?
            .status
            .and_then(|s| s.token)
            .ok_or_else(|| anyhow!("TokenRequest returned no token"))?;

        // ...and a long-lived one that the token controller fills into a Secret.
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let secret: Secret = serde_json::from_value(json!({
            "metadata": { "name": "reader-token", "annotations": { "kubernetes.io/service-account.name": "reader" } },
            "type": "kubernetes.io/service-account-token",
        }))?;
        secrets.create(&PostParams::default(), &secret).await?;
        let from_secret = wait_for("the token controller to fill the Secret", Duration::from_secs(30), || async {
            let s = secrets.get_opt("reader-token").await.ok().flatten()?;
            let token = s.data?.remove("token")?;
            String::from_utf8(token.0).ok()
        })
        .await?;

        let sa_clients = [
            ("TokenRequest", c.client_for_token(&requested).await?),
            ("Secret", c.client_for_token(&from_secret).await?),
        ];
        for (how, sa_client) in &sa_clients {
            let review: SelfSubjectReview = Api::all(sa_client.clone())
                .create(&PostParams::default(), &SelfSubjectReview::default())
                .await
                .with_context(|| format!("{how} token did not authenticate"))?;
            let user = review.status.and_then(|s| s.user_info).and_then(|u| u.username);
            ensure!(
                user.as_deref() == Some("system:serviceaccount:rbac:reader"),
                "{how} token is {user:?}"
            );
            ensure!(forbidden(Api::<Service>::namespaced(sa_client.clone(), ns).list(&ListParams::default()).await), "{how}: listed Services before any grant");
        }

        // Grant reading Services in `rbac`, and nothing else.
        let role: Role = serde_json::from_value(json!({
            "metadata": { "name": "service-reader" },
            "rules": [{ "apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"] }],
        }))?;
        Api::<Role>::namespaced(client.clone(), ns).create(&PostParams::default(), &role).await?;
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": { "name": "service-reader" },
            "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "service-reader" },
            "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": ns }],
        }))?;
        Api::<RoleBinding>::namespaced(client.clone(), ns).create(&PostParams::default(), &binding).await?;

        for (how, sa_client) in &sa_clients {
            let svcs: Api<Service> = Api::namespaced(sa_client.clone(), ns);
            wait_for(&format!("{how} token to list Services once granted"), Duration::from_secs(10), || async {
                svcs.list(&ListParams::default()).await.ok().map(drop)
            })
            .await?;
            ensure!(forbidden(Api::<Secret>::namespaced(sa_client.clone(), ns).list(&ListParams::default()).await), "{how}: listed Secrets");
            ensure!(forbidden(Api::<Service>::namespaced(sa_client.clone(), "default").list(&ListParams::default()).await), "{how}: listed Services in another namespace");
            ensure!(forbidden(Api::<Service>::namespaced(sa_client.clone(), ns).delete("web", &Default::default()).await), "{how}: deleted a Service");
        }

        // A token the cluster did not issue is refused outright.
        let stranger = c.client_for_token("not-a-token").await?;
        match Api::<Service>::namespaced(stranger, ns).list(&ListParams::default()).await {
            Err(kube::Error::Api(e)) if e.code == 401 => Ok(()),
            other => bail!("a bogus token got {other:?}"),
        }
    })
    .await
}

fn forbidden<T>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}
