//! `inject_pod_spec` as the webhook will call it, and what it refuses.

mod common;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, EnvVar, PodSpec, Volume},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proxy_inject::{
    AnnotationSource, InjectError, Origin, Outcome, PROXY_CONTAINER_NAME, PodContext, SkipReason,
    inject_pod_spec, keys,
};

fn pod(annotations: &[(&str, &str)]) -> (ObjectMeta, PodSpec) {
    let meta = ObjectMeta {
        name: Some("web-1".into()),
        annotations: (!annotations.is_empty()).then(|| map(annotations)),
        ..ObjectMeta::default()
    };
    let spec = PodSpec {
        service_account_name: Some("web".into()),
        containers: vec![Container {
            name: "app".into(),
            image: Some("example/web:1".into()),
            ports: Some(vec![ContainerPort {
                container_port: 8080,
                name: Some("http".into()),
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }],
        ..PodSpec::default()
    };
    (meta, spec)
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn inject(
    origin: Origin,
    ns: &[(&str, &str)],
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
) -> Result<Outcome, InjectError> {
    let ns = map(ns);
    let ctx = PodContext {
        origin,
        owner: None,
        namespace: Some("shop"),
        namespace_annotations: &ns,
    };
    inject_pod_spec(&ctx, meta, spec, &common::config())
}

fn snapshot(meta: &ObjectMeta, spec: &PodSpec) -> String {
    serde_json::to_string(&(meta, spec)).expect("serialize")
}

/// Linkerd's truth table for `linkerd.io/inject` (`disabledByAnnotation`), for both callers.
#[test]
fn who_is_injected() {
    use Origin::{Cli, Webhook};
    let disabled_pod = Some(SkipReason::Disabled(AnnotationSource::Workload));
    let disabled_ns = Some(SkipReason::Disabled(AnnotationSource::Namespace));
    let cases: &[(Origin, &str, &str, Option<SkipReason>)] = &[
        // origin, namespace, template, skipped because
        (Webhook, "enabled", "enabled", None),
        (Webhook, "enabled", "", None),
        (Webhook, "enabled", "disabled", disabled_pod.clone()),
        (Webhook, "disabled", "enabled", None),
        (Webhook, "", "enabled", None),
        (Webhook, "", "ingress", None),
        (Webhook, "disabled", "disabled", disabled_pod.clone()),
        (Webhook, "", "disabled", disabled_pod.clone()),
        (Webhook, "disabled", "", disabled_ns.clone()),
        (Webhook, "", "", Some(SkipReason::NotEnabled)),
        (
            Webhook,
            "yes",
            "",
            Some(SkipReason::InvalidInjectAnnotation(
                AnnotationSource::Namespace,
                "yes".into(),
            )),
        ),
        (
            Webhook,
            "enabled",
            "true",
            Some(SkipReason::InvalidInjectAnnotation(
                AnnotationSource::Workload,
                "true".into(),
            )),
        ),
        (Cli, "", "", None),
        (Cli, "", "enabled", None),
        (Cli, "", "disabled", disabled_pod.clone()),
        (Cli, "disabled", "", disabled_ns.clone()),
        (Cli, "disabled", "enabled", None),
        (Cli, "enabled", "disabled", disabled_pod),
    ];
    for (origin, ns, template, skipped) in cases {
        let ns_ann: Vec<(&str, &str)> = if ns.is_empty() {
            vec![]
        } else {
            vec![(keys::INJECT_ANNOTATION, ns)]
        };
        let pod_ann: Vec<(&str, &str)> = if template.is_empty() {
            vec![]
        } else {
            vec![(keys::INJECT_ANNOTATION, template)]
        };
        let (mut meta, mut spec) = pod(&pod_ann);
        let before = snapshot(&meta, &spec);
        let outcome = inject(*origin, &ns_ann, &mut meta, &mut spec).expect("no error");
        let case = format!("{origin:?} namespace={ns:?} template={template:?}");
        match skipped {
            None => assert_eq!(outcome, Outcome::Injected, "{case}"),
            Some(reason) => {
                assert_eq!(outcome, Outcome::Skipped(reason.clone()), "{case}");
                assert_eq!(
                    snapshot(&meta, &spec),
                    before,
                    "{case}: changed while skipped"
                );
            }
        }
    }
}

#[test]
fn host_network_pods_are_skipped_unchanged() {
    let (mut meta, mut spec) = pod(&[]);
    spec.host_network = Some(true);
    let before = snapshot(&meta, &spec);
    let outcome = inject(Origin::Cli, &[], &mut meta, &mut spec).expect("no error");
    assert_eq!(outcome, Outcome::Skipped(SkipReason::HostNetwork));
    assert_eq!(outcome_label(&outcome), "host_network");
    assert_eq!(snapshot(&meta, &spec), before);
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Skipped(r) => r.label(),
        _ => "",
    }
}

#[test]
fn an_injected_pod_is_left_byte_for_byte() {
    let (mut meta, mut spec) = pod(&[]);
    assert_eq!(
        inject(
            Origin::Webhook,
            &[(keys::INJECT_ANNOTATION, "enabled")],
            &mut meta,
            &mut spec
        ),
        Ok(Outcome::Injected)
    );
    // Even with a configuration that would now add something else.
    let once = snapshot(&meta, &spec);
    let ns = map(&[(keys::OPAQUE_PORTS_ANNOTATION, "9999")]);
    let ctx = PodContext {
        origin: Origin::Cli,
        owner: Some(("Deployment", "other")),
        namespace: Some("elsewhere"),
        namespace_annotations: &ns,
    };
    let outcome = inject_pod_spec(&ctx, &mut meta, &mut spec, &common::config());
    assert_eq!(outcome, Ok(Outcome::AlreadyInjected));
    assert_eq!(snapshot(&meta, &spec), once);
}

#[test]
fn refusals_name_the_annotation_and_change_nothing() {
    type Annotations = &'static [(&'static str, &'static str)];
    // (on the template, on the namespace, what the error says)
    let cases: &[(Annotations, Annotations, &str)] = &[
        (
            &[(keys::PROXY_UID_ANNOTATION, "root")],
            &[],
            "config.linkerd.io/proxy-uid=\"root\" on the pod template",
        ),
        (
            &[],
            &[(keys::SKIP_INBOUND_PORTS_ANNOTATION, "ssh")],
            "config.linkerd.io/skip-inbound-ports=\"ssh\" on the namespace",
        ),
        (
            &[(keys::OPAQUE_PORTS_ANNOTATION, "grpc")],
            &[],
            "\"grpc\" is neither a port",
        ),
        (
            &[(keys::DEFAULT_INBOUND_POLICY_ANNOTATION, "all")],
            &[],
            "must be one of",
        ),
    ];
    for (pod_ann, ns_ann, message) in cases {
        let (mut meta, mut spec) = pod(pod_ann);
        let before = snapshot(&meta, &spec);
        let err = inject(Origin::Cli, ns_ann, &mut meta, &mut spec).expect_err("refused");
        assert_eq!(err.label(), "invalid_override");
        assert!(err.to_string().contains(message), "{err}");
        assert_eq!(snapshot(&meta, &spec), before, "{err}");
    }
}

#[test]
fn names_the_injector_adds_must_be_free() {
    let (mut meta, mut spec) = pod(&[]);
    spec.volumes = Some(vec![Volume {
        name: "linkerd-identity-token".into(),
        ..Volume::default()
    }]);
    let before = snapshot(&meta, &spec);
    let err = inject(Origin::Cli, &[], &mut meta, &mut spec).expect_err("volume taken");
    assert!(
        err.to_string()
            .contains("volume named \"linkerd-identity-token\""),
        "{err}"
    );
    assert_eq!(snapshot(&meta, &spec), before);
}

#[test]
fn no_trust_anchors_no_injection() {
    let (mut meta, mut spec) = pod(&[]);
    let none = BTreeMap::new();
    let ctx = PodContext {
        origin: Origin::Cli,
        owner: None,
        namespace: None,
        namespace_annotations: &none,
    };
    let config = proxy_inject::InjectConfig::default();
    let err = inject_pod_spec(&ctx, &mut meta, &mut spec, &config).expect_err("no anchors");
    assert!(err.to_string().contains("trust_anchors_pem"), "{err}");
    assert!(spec.containers.len() == 1 && spec.init_containers.is_none());
}

/// The namespace's overrides reach the proxy and are copied onto the pod, where the destination
/// service reads them.
#[test]
fn namespace_overrides_are_copied_onto_the_pod() {
    let (mut meta, mut spec) = pod(&[]);
    let ns = [
        (keys::OPAQUE_PORTS_ANNOTATION, "http"),
        (keys::DEFAULT_INBOUND_POLICY_ANNOTATION, "all-authenticated"),
    ];
    assert_eq!(
        inject(Origin::Cli, &ns, &mut meta, &mut spec),
        Ok(Outcome::Injected)
    );
    let ann = meta.annotations.as_ref().expect("annotations");
    assert_eq!(
        ann.get(keys::OPAQUE_PORTS_ANNOTATION).map(String::as_str),
        Some("http")
    );
    let env = proxy_env(&spec);
    assert_eq!(
        env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"],
        "8080"
    );
    assert_eq!(
        env["LINKERD2_PROXY_INBOUND_DEFAULT_POLICY"],
        "all-authenticated"
    );
}

/// The proxy's environment as the kubelet would give it to this pod: downward-API variables
/// filled in and `$(name)` references expanded.
fn proxy_env(spec: &PodSpec) -> BTreeMap<String, String> {
    let proxy = &spec.containers[0];
    assert_eq!(proxy.name, PROXY_CONTAINER_NAME);
    let mut env = BTreeMap::new();
    for EnvVar {
        name,
        value,
        value_from,
    } in proxy.env.iter().flatten()
    {
        let value = match (value, value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = &from.field_ref.as_ref().expect("fieldRef").field_path;
                match field.as_str() {
                    "metadata.name" => "web-1".into(),
                    "metadata.namespace" => "shop".into(),
                    "spec.nodeName" => "node-1".into(),
                    "spec.serviceAccountName" => "web".into(),
                    other => panic!("unexpected field {other}"),
                }
            }
            other => panic!("{name}: {other:?}"),
        };
        // Kubernetes expands references to variables defined earlier in the list only.
        let expanded = env
            .iter()
            .fold(value, |v: String, (k, val): (&String, &String)| {
                v.replace(&format!("$({k})"), val)
            });
        assert!(
            !expanded.contains("$("),
            "{name}={expanded}: unresolved reference"
        );
        env.insert(name.clone(), expanded);
    }
    env
}

/// meshlink-proxy's own configuration reader accepts what the injector gives it.
#[test]
fn meshlink_proxy_starts_with_the_injected_environment() {
    let (mut meta, mut spec) = pod(&[(keys::OPAQUE_PORTS_ANNOTATION, "3306,8000-8001")]);
    assert_eq!(
        inject(Origin::Cli, &[], &mut meta, &mut spec),
        Ok(Outcome::Injected)
    );
    let env = proxy_env(&spec);
    let config = proxy_sidecar::config::Config::from_env(&env)
        .unwrap_or_else(|e| panic!("meshlink-proxy refuses the injected environment: {e}"));
    assert_eq!(
        config.identity.local_name.to_string(),
        "web.shop.serviceaccount.identity.linkerd.cluster.local"
    );
    assert_eq!(config.inbound_ports, vec![8080]);
    assert_eq!(config.inbound_opaque_ports, vec![3306, 8000, 8001]);
    assert_eq!(config.workload, r#"{"ns":"shop","pod":"web-1"}"#);
    assert_eq!(config.inbound_addr.port(), 4143);
    assert_eq!(config.admin_addr.to_string(), "0.0.0.0:4191");
    assert_eq!(
        config.identity.token_file.display().to_string(),
        "/var/run/secrets/tokens/linkerd-identity-token"
    );
    // The token file is where the projected volume is mounted, with the audience the identity
    // service checks.
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "linkerd-identity-token")
        .expect("token volume");
    let projection = token
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.as_ref())
        .expect("projection");
    assert_eq!(projection.audience.as_deref(), Some("identity.l5d.io"));
    assert_eq!(projection.path, "linkerd-identity-token");
    let labels = meta.labels.as_ref().expect("labels");
    assert_eq!(labels[keys::CONTROL_PLANE_NS_LABEL], "linkerd");
    assert_eq!(labels[keys::WORKLOAD_NS_LABEL], "shop");
    // The init container runs the same binary's `init` with flags proxy-init's parser takes.
    let init = &spec.init_containers.as_ref().expect("init")[0];
    assert_eq!(
        init.command.as_deref(),
        Some(&["meshlink-proxy".to_owned(), "init".to_owned()][..])
    );
    let args = init.args.clone().expect("args");
    let parsed =
        <InitArgs as clap::Parser>::try_parse_from(std::iter::once("init".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("proxy-init refuses the injected flags: {e}"));
    assert_eq!(parsed.options.proxy_uid, 2102);
    assert_eq!(parsed.options.inbound_ports_to_ignore.len(), 4);
}

#[derive(clap::Parser, Debug)]
struct InitArgs {
    #[command(flatten)]
    options: proxy_init::Options,
}
