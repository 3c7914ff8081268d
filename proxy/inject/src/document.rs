//! Manifests: finds the pod template of every workload kind in YAML or JSON text and injects
//! it with [`inject_pod_spec`], leaving every other document as it was written.
//!
//! Only what the injector adds is written into a document (containers, volumes, labels,
//! annotations, like Linkerd's JSON patch); the rest keeps the user's key order and fields.
//! Documents that are not injected come out as the exact text that went in.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{api::core::v1::PodSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde_norway::{Mapping, Value};

use crate::{InjectConfig, InjectError, Origin, Outcome, PodContext, inject_pod_spec};

/// How manifests are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One or more documents separated by `---`.
    Yaml,
    /// One JSON document (an object or a `List`).
    Json,
}

/// What happened to one object (a document, or one item of a `List`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectReport {
    /// The document's position in its text, from 1.
    pub document: usize,
    /// Where the object is in the document: empty, or `items[3]` in a `List`.
    pub path: String,
    pub kind: String,
    pub name: String,
    pub outcome: ObjectOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectOutcome {
    /// A workload: what happened to its pod template.
    Pod(Outcome),
    /// Not a kind with a pod template: passed through.
    NotAWorkload,
}

impl fmt::Display for ObjectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if !self.path.is_empty() {
            write!(f, " {}", self.path)?;
        }
        write!(f, " ({}", self.kind)?;
        if !self.name.is_empty() {
            write!(f, "/{}", self.name)?;
        }
        f.write_str("): ")?;
        match &self.outcome {
            ObjectOutcome::Pod(Outcome::Injected) => f.write_str("injected"),
            ObjectOutcome::Pod(Outcome::AlreadyInjected) => {
                f.write_str("already injected, left as it was")
            }
            ObjectOutcome::Pod(Outcome::Skipped(reason)) => write!(f, "skipped: {reason}"),
            ObjectOutcome::NotAWorkload => f.write_str("not a workload, left as it was"),
        }
    }
}

/// A document that could not be read or injected: nothing of the text should be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("document {document}{}: {path}{}{reason}", object(kind, name), if path.is_empty() { "" } else { ": " })]
pub struct DocumentError {
    /// From 1.
    pub document: usize,
    pub kind: Option<String>,
    pub name: Option<String>,
    /// The JSON path of the bad field (`spec.template.spec.containers[0].ports`), or empty.
    pub path: String,
    pub reason: Box<DocumentErrorReason>,
}

fn object(kind: &Option<String>, name: &Option<String>) -> String {
    match (kind, name) {
        (Some(k), Some(n)) => format!(" ({k}/{n})"),
        (Some(k), None) => format!(" ({k})"),
        (None, Some(n)) => format!(" ({n})"),
        (None, None) => String::new(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocumentErrorReason {
    #[error("not YAML: {0}")]
    Syntax(String),
    #[error("not JSON: {0}")]
    JsonSyntax(String),
    #[error("{0}")]
    Field(String),
    #[error("is not a Kubernetes object (a mapping with apiVersion and kind)")]
    NotAnObject,
    #[error("is missing")]
    Missing,
    #[error(transparent)]
    Inject(#[from] InjectError),
}

/// The injected text and what happened to each object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    pub text: String,
    pub reports: Vec<ObjectReport>,
}

/// Injects every workload in `text` (`origin` and `namespace_annotations` as in
/// [`PodContext`]). On error nothing is returned but the error, which names the document and
/// the field.
pub fn inject_manifests(
    text: &str,
    format: Format,
    origin: Origin,
    namespace_annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Injected, DocumentError> {
    let pieces = match format {
        Format::Json => vec![Piece {
            text: text.to_owned(),
            first_line: 1,
        }],
        Format::Yaml => split_documents(text),
    };
    let mut out = Vec::new();
    let mut reports = Vec::new();
    let mut document = 0;
    for piece in pieces {
        let parsed: Result<Value, DocumentErrorReason> = match format {
            Format::Json => serde_json::from_str::<serde_json::Value>(&piece.text)
                .map_err(|e| DocumentErrorReason::JsonSyntax(e.to_string()))
                .and_then(|v| {
                    serde_norway::to_value(v)
                        .map_err(|e| DocumentErrorReason::JsonSyntax(e.to_string()))
                }),
            Format::Yaml => serde_norway::from_str::<Value>(&piece.text)
                .map_err(|e| DocumentErrorReason::Syntax(yaml_error(&e, piece.first_line))),
        };
        let is_empty = matches!(parsed, Ok(Value::Null));
        if is_empty {
            // Comments or nothing between two `---`: not a document.
            continue;
        }
        document += 1;
        let doc = parsed.map_err(|reason| DocumentError {
            document,
            kind: None,
            name: None,
            path: String::new(),
            reason: Box::new(reason),
        })?;
        let (doc, doc_reports) =
            inject_document(doc, document, origin, namespace_annotations, config)?;
        let changed = doc_reports
            .iter()
            .any(|r| r.outcome == ObjectOutcome::Pod(Outcome::Injected));
        reports.extend(doc_reports);
        out.push(if !changed {
            piece.text
        } else {
            match format {
                Format::Yaml => {
                    serde_norway::to_string(&doc).map(|t| leading_comments(&piece.text) + &t)
                }
                Format::Json => serde_json::to_string_pretty(&doc)
                    .map(|mut s| {
                        s.push('\n');
                        s
                    })
                    .map_err(serde::ser::Error::custom),
            }
            .map_err(|e: serde_norway::Error| DocumentError {
                document,
                kind: None,
                name: None,
                path: String::new(),
                reason: Box::new(DocumentErrorReason::Field(e.to_string())),
            })?
        });
    }
    let text = out
        .iter()
        .map(|t| {
            let t = t.trim_matches('\n');
            format!("{t}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n");
    Ok(Injected { text, reports })
}

/// Injects one parsed document (number `document`, for reports and errors), which may be a
/// `List`.
pub fn inject_document(
    mut doc: Value,
    document: usize,
    origin: Origin,
    namespace_annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<(Value, Vec<ObjectReport>), DocumentError> {
    let mut reports = Vec::new();
    let mut job = Job {
        document,
        origin,
        namespace_annotations,
        config,
        reports: &mut reports,
    };
    job.object(&mut doc, "")?;
    Ok((doc, reports))
}

struct Job<'a> {
    document: usize,
    origin: Origin,
    namespace_annotations: &'a BTreeMap<String, String>,
    config: &'a InjectConfig,
    reports: &'a mut Vec<ObjectReport>,
}

fn str_at<'v>(v: &'v Value, keys: &[&str]) -> Option<&'v str> {
    keys.iter()
        .try_fold(v, |v, k| v.get(*k))
        .and_then(Value::as_str)
}

impl Job<'_> {
    fn object(&mut self, v: &mut Value, prefix: &str) -> Result<(), DocumentError> {
        let kind = str_at(v, &["kind"]).map(str::to_owned);
        let name = str_at(v, &["metadata", "name"])
            .or_else(|| str_at(v, &["metadata", "generateName"]))
            .map(str::to_owned);
        let err = |path: &str, reason: DocumentErrorReason| DocumentError {
            document: self.document,
            kind: kind.clone(),
            name: name.clone(),
            path: format!("{prefix}{path}"),
            reason: Box::new(reason),
        };
        if !v.is_mapping() {
            return Err(err("", DocumentErrorReason::NotAnObject));
        }
        let Some(kind_str) = kind.as_deref() else {
            return Err(err("kind", DocumentErrorReason::Missing));
        };
        let template_path: &[&str] = match kind_str {
            "List" => {
                let Some(items) = v.get_mut("items") else {
                    return Ok(());
                };
                let Some(items) = items.as_sequence_mut() else {
                    return Err(err(
                        "items",
                        DocumentErrorReason::Field("must be a list of objects".into()),
                    ));
                };
                for (i, item) in items.iter_mut().enumerate() {
                    self.object(item, &format!("{prefix}items[{i}]."))?;
                }
                return Ok(());
            }
            "Pod" => &[],
            "Deployment"
            | "StatefulSet"
            | "DaemonSet"
            | "ReplicaSet"
            | "ReplicationController"
            | "Job" => &["spec", "template"],
            "CronJob" => &["spec", "jobTemplate", "spec", "template"],
            _ => {
                self.report(prefix, kind_str, &name, ObjectOutcome::NotAWorkload);
                return Ok(());
            }
        };
        let namespace = str_at(v, &["metadata", "namespace"]).map(str::to_owned);
        let template_json_path = template_path.join(".");
        let sep = if template_path.is_empty() { "" } else { "." };
        let mut template = &mut *v;
        for key in template_path {
            template = match template.get_mut(*key) {
                Some(t) if t.is_mapping() => t,
                _ => {
                    let at = template_path
                        .iter()
                        .take_while(|k| *k != key)
                        .chain(std::iter::once(key))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(".");
                    return Err(err(&at, DocumentErrorReason::Missing));
                }
            };
        }
        let field = |path: &str| format!("{template_json_path}{sep}{path}");
        let meta: ObjectMeta = match template.get("metadata") {
            None | Some(Value::Null) => ObjectMeta::default(),
            Some(m) => typed(m).map_err(|(p, e)| err(&field(&join_path("metadata", &p)), e))?,
        };
        let mut spec: PodSpec = match template.get("spec") {
            None | Some(Value::Null) => {
                return Err(err(&field("spec"), DocumentErrorReason::Missing));
            }
            Some(s) => typed(s).map_err(|(p, e)| err(&field(&join_path("spec", &p)), e))?,
        };
        let ctx = PodContext {
            origin: self.origin,
            owner: (kind_str != "Pod")
                .then_some(name.as_deref().map(|n| (kind_str, n)))
                .flatten(),
            namespace: namespace.as_deref(),
            namespace_annotations: self.namespace_annotations,
        };
        let mut new_meta = meta.clone();
        let outcome =
            inject_pod_spec(&ctx, &mut new_meta, &mut spec, self.config).map_err(|e| {
                let path = match &e {
                    InjectError::InvalidOverride {
                        annotation,
                        at: crate::AnnotationSource::Workload,
                        ..
                    } => field(&format!("metadata.annotations[\"{annotation}\"]")),
                    InjectError::NameTaken { what: "volume", .. } => field("spec.volumes"),
                    InjectError::NameTaken { .. } => field("spec"),
                    _ => String::new(),
                };
                err(&path, e.into())
            })?;
        if outcome == Outcome::Injected {
            apply(template, &meta, &new_meta, &spec)
                .map_err(|e| err(&template_json_path, DocumentErrorReason::Field(e)))?;
        }
        self.report(prefix, kind_str, &name, ObjectOutcome::Pod(outcome));
        Ok(())
    }

    fn report(&mut self, prefix: &str, kind: &str, name: &Option<String>, outcome: ObjectOutcome) {
        self.reports.push(ObjectReport {
            document: self.document,
            path: prefix.trim_end_matches('.').to_owned(),
            kind: kind.to_owned(),
            name: name.clone().unwrap_or_default(),
            outcome,
        });
    }
}

fn join_path(head: &str, tail: &str) -> String {
    match tail {
        "" | "." => head.to_owned(),
        t if t.starts_with('[') => format!("{head}{t}"),
        t => format!("{head}.{t}"),
    }
}

/// Reads `v` as `T`; an error carries the path of the field inside `v`.
fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, (String, DocumentErrorReason)> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        (path, DocumentErrorReason::Field(e.into_inner().to_string()))
    })
}

/// Writes what [`inject_pod_spec`] added into the template as the user wrote it: the proxy
/// first among the containers, the init container first among the init containers, the
/// volumes last, and the labels and annotations it set.
fn apply(
    template: &mut Value,
    before: &ObjectMeta,
    after: &ObjectMeta,
    spec: &PodSpec,
) -> Result<(), String> {
    let map = template
        .as_mapping_mut()
        .ok_or("the pod template is not a mapping")?;
    if !map.contains_key("metadata") {
        // Where people write it: before the spec.
        let rest = std::mem::take(map);
        map.insert(Value::String("metadata".into()), Value::Null);
        map.extend(rest);
    }
    let meta = entry_mapping(map, "metadata")?;
    for (key, new, old) in [
        ("annotations", &after.annotations, &before.annotations),
        ("labels", &after.labels, &before.labels),
    ] {
        let changed: Vec<_> = new
            .iter()
            .flatten()
            .filter(|(k, v)| old.as_ref().and_then(|o| o.get(*k)) != Some(*v))
            .collect();
        if changed.is_empty() {
            continue;
        }
        let m = entry_mapping(meta, key)?;
        for (k, v) in changed {
            m.insert(Value::String(k.clone()), Value::String(v.clone()));
        }
    }
    let spec_map = entry_mapping(map, "spec")?;
    let proxy = spec.containers.first().ok_or("no proxy container")?;
    seq(spec_map, "containers")?.insert(0, to_value(proxy)?);
    let init = spec
        .init_containers
        .as_ref()
        .and_then(|c| c.first())
        .ok_or("no init container")?;
    seq(spec_map, "initContainers")?.insert(0, to_value(init)?);
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    let added = &volumes[volumes.len().saturating_sub(3)..];
    let vs = seq(spec_map, "volumes")?;
    for v in added {
        vs.push(to_value(v)?);
    }
    Ok(())
}

/// `v` as a YAML value, its `name` first as people write containers and volumes.
fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, String> {
    let value = serde_norway::to_value(v).map_err(|e| e.to_string())?;
    let Value::Mapping(map) = value else {
        return Ok(value);
    };
    let name = Value::String("name".into());
    let mut ordered = Mapping::new();
    if let Some(n) = map.get(&name) {
        ordered.insert(name.clone(), n.clone());
    }
    for (k, v) in map {
        if k != name {
            ordered.insert(k, v);
        }
    }
    Ok(Value::Mapping(ordered))
}

/// `map[key]` as a mapping, created when absent or null.
fn entry_mapping<'m>(map: &'m mut Mapping, key: &str) -> Result<&'m mut Mapping, String> {
    let k = Value::String(key.to_owned());
    if matches!(map.get(&k), None | Some(Value::Null)) {
        map.insert(k.clone(), Value::Mapping(Mapping::new()));
    }
    map.get_mut(&k)
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{key} is not a mapping"))
}

/// `map[key]` as a sequence, created when absent or null.
fn seq<'m>(map: &'m mut Mapping, key: &str) -> Result<&'m mut Vec<Value>, String> {
    let k = Value::String(key.to_owned());
    if matches!(map.get(&k), None | Some(Value::Null)) {
        map.insert(k.clone(), Value::Sequence(Vec::new()));
    }
    map.get_mut(&k)
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| format!("{key} is not a list"))
}

/// One document's text and the line of the input it starts on.
struct Piece {
    text: String,
    first_line: usize,
}

/// Splits a YAML stream at its document markers (`---` and `...` at the start of a line, which
/// YAML forbids anywhere else at column 0), keeping each document's text as written.
fn split_documents(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = |m: &str| {
            bare == m
                || bare
                    .strip_prefix(m)
                    .is_some_and(|rest| rest.starts_with([' ', '\t']))
        };
        if marker("---") {
            pieces.push(Piece {
                text: std::mem::take(&mut current),
                first_line,
            });
            first_line = i + 1;
            // Content after the marker (`--- !tag` or `--- {a: 1}`) belongs to the document.
            current.push_str(&line[3..]);
        } else if marker("...") {
            pieces.push(Piece {
                text: std::mem::take(&mut current),
                first_line,
            });
            first_line = i + 2;
        } else {
            current.push_str(line);
        }
    }
    pieces.push(Piece {
        text: current,
        first_line,
    });
    pieces
}

/// The comment lines a YAML document starts with, which re-serializing would lose.
fn leading_comments(text: &str) -> String {
    text.lines()
        .take_while(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        .filter(|l| !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A YAML error with its line counted in the whole input.
fn yaml_error(e: &serde_norway::Error, first_line: usize) -> String {
    let message = e.to_string();
    match e.location() {
        Some(loc) => {
            let line = first_line + loc.line() - 1;
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_owned();
            format!("{message} at line {line} column {}", loc.column())
        }
        None => message,
    }
}
