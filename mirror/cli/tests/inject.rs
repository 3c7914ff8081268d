//! `meshlink inject` as a user runs it: the built binary on a file, a directory and standard
//! input, and nothing on standard output when any document fails.

use std::{
    io::Write,
    path::Path,
    process::{Command, Output, Stdio},
};

const ANCHORS: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBfakeTrustAnchorForTests\n-----END CERTIFICATE-----\n";

const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: example/web:1, ports: [{containerPort: 8080}]}]\n";
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n";
const BAD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: broken}\nspec:\n  containers: [{name: a, ports: [{containerPort: http}]}]\n";

fn meshlink(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let anchors = dir.join("ca.crt");
    std::fs::write(&anchors, ANCHORS).expect("write anchors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshlink"))
        .arg("inject")
        .arg("--trust-anchors-file")
        .arg(&anchors)
        .args(args)
        .current_dir(dir)
        .env_remove("MESHLINK_TRUST_ANCHORS_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meshlink");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("meshlink output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn injected_proxies(stdout: &str) -> usize {
    stdout.matches("- name: linkerd-proxy\n").count()
}

#[test]
fn a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("app.yaml"),
        format!("{DEPLOYMENT}---\n{SERVICE}"),
    )
    .expect("write");
    let out = meshlink(dir.path(), &["app.yaml"], None);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(injected_proxies(&stdout), 1, "{stdout}");
    assert!(
        stdout.ends_with(&format!("---\n{SERVICE}")),
        "the Service passes through:\n{stdout}"
    );
    assert!(
        stderr.contains("app.yaml: document 1 (Deployment/web): injected"),
        "{stderr}"
    );
    assert!(
        stderr.contains("app.yaml: document 2 (Service/web): not a workload"),
        "{stderr}"
    );
    // Its own output goes through unchanged.
    std::fs::write(dir.path().join("out.yaml"), &stdout).expect("write");
    let again = meshlink(dir.path(), &["out.yaml"], None);
    assert_eq!(text(&again.stdout), stdout);
    assert!(
        text(&again.stderr).contains("already injected"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn a_directory_in_name_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).expect("mkdir");
    std::fs::write(manifests.join("b-service.yml"), SERVICE).expect("write");
    std::fs::write(manifests.join("a-web.yaml"), DEPLOYMENT).expect("write");
    std::fs::write(manifests.join("README.md"), "not a manifest").expect("write");
    std::fs::write(
        manifests.join("c-pod.json"),
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"j"},"spec":{"containers":[{"name":"a","image":"a"}]}}"#,
    )
    .expect("write");
    let out = meshlink(dir.path(), &["manifests"], None);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let web = stdout.find("kind: Deployment").expect("deployment");
    let svc = stdout.find("kind: Service").expect("service");
    let pod = stdout
        .find("\"kind\": \"Pod\"")
        .expect("the JSON pod, as JSON");
    assert!(web < svc && svc < pod, "{stdout}");
    assert!(stdout.contains("\"name\": \"linkerd-proxy\""), "{stdout}");
    assert!(!stderr.contains("README"), "{stderr}");
}

#[test]
fn standard_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = meshlink(dir.path(), &["-"], Some(DEPLOYMENT));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(injected_proxies(&text(&out.stdout)), 1);
    assert!(text(&out.stderr).contains("<stdin>: document 1 (Deployment/web): injected"));
}

#[test]
fn nothing_is_written_when_any_document_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.yaml"), DEPLOYMENT).expect("write");
    std::fs::write(
        dir.path().join("mixed.yaml"),
        format!("{SERVICE}---\n{BAD}"),
    )
    .expect("write");
    let out = meshlink(dir.path(), &["good.yaml", "mixed.yaml"], None);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("mixed.yaml")
            && stderr
                .contains("document 2 (Pod/broken): spec.containers[0].ports[0].containerPort"),
        "{stderr}"
    );
    // A bad override is named too.
    let annotated = DEPLOYMENT.replace(
        "metadata: {labels: {app: web}}",
        "metadata: {labels: {app: web}, annotations: {config.linkerd.io/proxy-uid: \"0\"}}",
    );
    let out = meshlink(dir.path(), &["-"], Some(&annotated));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr)
            .contains("spec.template.metadata.annotations[\"config.linkerd.io/proxy-uid\"]"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_flags_are_refused_before_reading_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = meshlink(
        dir.path(),
        &["--default-inbound-policy", "open", "missing.yaml"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("default_inbound_policy"),
        "{}",
        text(&out.stderr)
    );
}
