//! `meshlink inject`: adds meshlink-proxy to the workloads in manifests, as `linkerd inject
//! --manual` does, with the same function the injector webhook calls (`proxy-inject`).
//!
//! ```text
//! meshlink inject --trust-anchors-file anchor/ca.crt app.yaml | kubectl apply -f -
//! kubectl get deploy -o yaml | meshlink inject --trust-anchors-file ca.crt - | kubectl apply -f -
//! ```
//!
//! Reads only the files it is given (a manifest cannot make it read another, or run anything);
//! writes nothing unless every document is read and injected.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use clap::Args;
use proxy_inject::{ConfigArgs, Format, InjectConfig, Origin, inject_manifests};

#[derive(Args, Debug)]
pub struct InjectArgs {
    /// Manifest files, directories (their .yaml, .yml and .json files, in name order) or `-`
    /// for standard input.
    #[arg(required = true, value_name = "FILE|DIR|-")]
    inputs: Vec<String>,
    /// The trust anchors (PEM), as given to `meshlink identity manifests --anchors`.
    #[arg(long, env = "MESHLINK_TRUST_ANCHORS_FILE", value_name = "PATH")]
    trust_anchors_file: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
}

impl InjectArgs {
    fn config(&self) -> Result<InjectConfig> {
        let anchors = std::fs::read_to_string(&self.trust_anchors_file).with_context(|| {
            format!(
                "reading --trust-anchors-file {}",
                self.trust_anchors_file.display()
            )
        })?;
        // Flags are checked before any manifest is read.
        self.config.config(&anchors).with_context(|| {
            format!(
                "the flags (anchors from {})",
                self.trust_anchors_file.display()
            )
        })
    }
}

/// One input: its name for messages, its text and how it is written.
struct Source {
    name: String,
    text: String,
    format: Format,
}

fn format_of(path: &Path) -> Format {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Format::Json,
        _ => Format::Yaml,
    }
}

fn read_inputs(inputs: &[String]) -> Result<Vec<Source>> {
    let mut sources = Vec::new();
    for input in inputs {
        if input == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading standard input")?;
            // JSON is YAML too, but is given back as JSON.
            let format = if text.trim_start().starts_with(['{', '[']) {
                Format::Json
            } else {
                Format::Yaml
            };
            sources.push(Source {
                name: "<stdin>".into(),
                text,
                format,
            });
            continue;
        }
        let path = Path::new(input);
        let files = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {input}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(
                            p.extension().and_then(|e| e.to_str()),
                            Some("yaml" | "yml" | "json")
                        )
                })
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{input} holds no .yaml, .yml or .json file");
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            sources.push(Source {
                name: file.display().to_string(),
                format: format_of(&file),
                text,
            });
        }
    }
    Ok(sources)
}

/// The injected manifests, all of them or none; a note per object goes to `notes` (stderr).
pub fn run(args: &InjectArgs, notes: &mut impl Write) -> Result<String> {
    let config = args.config()?;
    let sources = read_inputs(&args.inputs)?;
    let mut outputs = Vec::new();
    let mut lines = String::new();
    for source in &sources {
        let injected = inject_manifests(
            &source.text,
            source.format,
            Origin::Cli,
            &BTreeMap::new(),
            &config,
        )
        .with_context(|| source.name.clone())?;
        for report in &injected.reports {
            lines.push_str(&format!("{}: {report}\n", source.name));
        }
        if !injected.text.trim().is_empty() {
            outputs.push(injected.text);
        }
    }
    // Notes only once everything succeeded, so that a failed run shows just its error.
    notes.write_all(lines.as_bytes())?;
    Ok(outputs.join("---\n"))
}
