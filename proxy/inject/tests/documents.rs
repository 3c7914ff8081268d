//! Manifests that cannot be injected: the error names the document, the object and the field.

mod common;

use std::collections::BTreeMap;

use proxy_inject::{DocumentError, Format, Origin, inject_manifests};

fn inject(text: &str, format: Format) -> Result<String, DocumentError> {
    inject_manifests(
        text,
        format,
        Origin::Cli,
        &BTreeMap::new(),
        &common::config(),
    )
    .map(|i| i.text)
}

const GOOD: &str =
    "apiVersion: v1\nkind: Pod\nmetadata: {name: ok}\nspec:\n  containers: [{name: a, image: a}]\n";

#[test]
fn errors_name_document_object_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers:\n        - name: web\n          ports: [{containerPort: http}]\n",
            "document 2 (Deployment/web): spec.template.spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32",
        ),
        (
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  replicas: 1\n",
            "document 2 (StatefulSet/db): spec.template: is missing",
        ),
        (
            "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: nightly}\nspec:\n  jobTemplate:\n    spec:\n      template:\n        metadata: {labels: oops}\n        spec: {containers: []}\n",
            "document 2 (CronJob/nightly): spec.jobTemplate.spec.template.metadata.labels: invalid type: string \"oops\", expected a map",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {config.linkerd.io/proxy-memory-limit: lots}\nspec:\n  containers: [{name: a}]\n",
            "document 2 (Pod/p): metadata.annotations[\"config.linkerd.io/proxy-memory-limit\"]: annotation config.linkerd.io/proxy-memory-limit=\"lots\" on the pod template is invalid",
        ),
        (
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: p}\n    spec: {containers: [{name: a, env: {A: b}}]}\n",
            "document 2 (Pod/p): items[0].spec.containers[0].env: invalid type: map, expected a sequence",
        ),
        (
            "apiVersion: v1\nmetadata: {name: nameless}\n",
            "document 2 (nameless): kind: is missing",
        ),
        (
            "- just\n- a list\n",
            "document 2: is not a Kubernetes object",
        ),
        ("kind: Pod\nmetadata: {name: x\n", "document 2: not YAML:"),
    ];
    for (bad, message) in cases {
        // The bad document is the second; the first is fine and still nothing is returned.
        let text = format!("{GOOD}---\n{bad}---\n{GOOD}");
        let err = inject(&text, Format::Yaml).expect_err(bad);
        assert!(
            err.to_string().starts_with(message),
            "{bad}\n got: {err}\nwant: {message}"
        );
    }
}

#[test]
fn yaml_errors_give_the_line_in_the_whole_input() {
    // A tab indents `name`, on line 9 of the input (line 3 of the document).
    let text = format!("{GOOD}---\nkind: Pod\nmetadata:\n\tname: x\n");
    let err = inject(&text, Format::Yaml).expect_err("bad YAML");
    assert!(err.to_string().contains("at line 9"), "{err}");
}

#[test]
fn json_errors() {
    let err = inject("{\"kind\": \"Pod\",", Format::Json).expect_err("bad JSON");
    assert!(
        err.to_string().starts_with("document 1: not JSON:"),
        "{err}"
    );
    let err = inject(
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"},"spec":{"containers":[{"name":"a","ports":[{"containerPort":"x"}]}]}}"#,
        Format::Json,
    )
    .expect_err("bad field");
    assert!(
        err.to_string()
            .starts_with("document 1 (Pod/j): spec.containers[0].ports[0].containerPort:"),
        "{err}"
    );
}

#[test]
fn documents_without_workloads_come_out_as_written() {
    let text = "# a comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: \"1\"}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n";
    assert_eq!(inject(text, Format::Yaml).expect("passes through"), text);
}
