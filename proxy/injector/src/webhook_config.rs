//! Keeps the CA bundle of the injector's MutatingWebhookConfiguration equal to the CA that
//! signs its serving certificates: patched at start-up, again whenever the configuration is
//! re-applied or recreated without it, and when the CA is replaced. The API server reloads
//! webhook configurations as they change, so nothing restarts.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use base64::Engine;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{
    Api,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The field manager of the injector's writes: it owns the `caBundle` fields only, so that
/// `meshlink install` output applied again leaves them alone.
pub const FIELD_MANAGER: &str = "meshlink-injector";

/// The Service the webhooks call, and the configuration that names them.
#[derive(Clone, Debug)]
pub struct Target {
    pub configuration: String,
    pub service_namespace: String,
    pub service_name: String,
}

/// The server-side apply patch that gives every webhook of `config` that calls the target
/// Service the CA bundle `bundle_pem`; `None` when each already has it (or none calls it).
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    target: &Target,
    bundle_pem: &str,
) -> Option<Value> {
    let bundle = base64::engine::general_purpose::STANDARD.encode(bundle_pem);
    let ours: Vec<_> = config
        .webhooks
        .iter()
        .flatten()
        .filter(|w| {
            w.client_config.service.as_ref().is_some_and(|s| {
                s.namespace == target.service_namespace && s.name == target.service_name
            })
        })
        .collect();
    let stale = ours.iter().any(|w| {
        w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle_pem.as_bytes())
    });
    if !stale {
        return None;
    }
    // `webhooks` is a list keyed by name: each entry of the patch merges into the one of that
    // name, and this manager owns only the fields it sends.
    let webhooks: Vec<Value> = ours
        .iter()
        .map(|w| json!({ "name": w.name, "clientConfig": { "caBundle": bundle } }))
        .collect();
    Some(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": target.configuration },
        "webhooks": webhooks,
    }))
}

/// Watches the configuration and patches its CA bundle to the latest of `bundle` until
/// `cancel` fires.
pub async fn keep_ca_bundle(
    api: Api<MutatingWebhookConfiguration>,
    target: Target,
    mut bundle: watch::Receiver<String>,
    cancel: CancellationToken,
) {
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", target.configuration));
    let mut events = std::pin::pin!(watcher(api.clone(), config).default_backoff());
    let mut backoff = retry_backoff();
    let mut last: Option<MutatingWebhookConfiguration> = None;
    let mut retry_in: Option<Duration> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c))) => last = Some(c),
                Some(Ok(watcher::Event::Delete(_))) => {
                    tracing::warn!(configuration = %target.configuration, "the MutatingWebhookConfiguration was deleted: no Pod is injected until it is applied again (meshlink install)");
                    last = None;
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => continue,
                Some(Ok(watcher::Event::InitDone)) => {
                    if last.is_none() {
                        tracing::warn!(configuration = %target.configuration, "no MutatingWebhookConfiguration: no Pod is injected until it is applied (meshlink install)");
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(configuration = %target.configuration, %error, "watching the MutatingWebhookConfiguration");
                    continue;
                }
                None => return,
            },
            changed = bundle.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(retry_in.unwrap_or(Duration::MAX / 4)), if retry_in.is_some() => {}
        }
        retry_in = None;
        let Some(current) = &last else { continue };
        let pem = bundle.borrow().clone();
        let Some(patch) = ca_bundle_patch(current, &target, &pem) else {
            backoff = retry_backoff();
            continue;
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch(&target.configuration, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(patched) => {
                tracing::info!(configuration = %target.configuration, "CA bundle patched into the MutatingWebhookConfiguration");
                last = Some(patched);
                backoff = retry_backoff();
            }
            Err(error) => {
                let delay = backoff.next().unwrap_or(RETRY_MAX);
                tracing::warn!(configuration = %target.configuration, %error, retry_in = ?delay, "patching the CA bundle");
                retry_in = Some(delay);
            }
        }
    }
}

const RETRY_MAX: Duration = Duration::from_secs(30);

fn retry_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(RETRY_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            configuration: "linkerd-proxy-injector-webhook-config".into(),
            service_namespace: "linkerd".into(),
            service_name: "linkerd-proxy-injector".into(),
        }
    }

    fn config(webhooks: Value) -> MutatingWebhookConfiguration {
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": "linkerd-proxy-injector-webhook-config" },
            "webhooks": webhooks,
        }))
        .unwrap()
    }

    fn webhook(name: &str, service: &str, bundle: Option<&str>) -> Value {
        let mut client =
            json!({ "service": { "namespace": "linkerd", "name": service, "path": "/" } });
        if let Some(b) = bundle {
            client["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(b));
        }
        json!({
            "name": name, "clientConfig": client, "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
        })
    }

    #[test]
    fn patches() {
        let pem = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n";
        let ours = "linkerd-proxy-injector";
        let cases = [
            (
                "no bundle yet",
                vec![webhook("a", ours, None)],
                Some(vec!["a"]),
            ),
            (
                "another bundle",
                vec![webhook("a", ours, Some("old"))],
                Some(vec!["a"]),
            ),
            (
                "already in place",
                vec![webhook("a", ours, Some(pem))],
                None,
            ),
            (
                "only the entries that call the injector",
                vec![
                    webhook("a", ours, Some(pem)),
                    webhook("b", ours, None),
                    webhook("c", "someone-else", None),
                ],
                Some(vec!["a", "b"]),
            ),
            (
                "none calls it",
                vec![webhook("c", "someone-else", None)],
                None,
            ),
        ];
        for (case, webhooks, want) in cases {
            let patch = ca_bundle_patch(&config(Value::Array(webhooks)), &target(), pem);
            let names = patch.as_ref().map(|p| {
                p["webhooks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|w| {
                        assert_eq!(
                            w["clientConfig"]["caBundle"],
                            base64::engine::general_purpose::STANDARD.encode(pem),
                            "{case}"
                        );
                        w["name"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<_>>()
            });
            assert_eq!(
                names,
                want.map(|w| w.into_iter().map(String::from).collect()),
                "{case}"
            );
        }
    }
}
