//! Golden tests: every `golden/<name>.in.yaml` (or `.in.json`) is injected and compared with
//! `<name>.out.yaml` and the per-object notes with `<name>.notes`. `UPDATE_GOLDEN=1 cargo test
//! -p proxy-inject --test golden` rewrites them (review the diff).

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use proxy_inject::{Format, ObjectOutcome, Origin, Outcome, inject_manifests};

fn inputs() -> Vec<(PathBuf, Format)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/golden")
        .map(|e| e.expect("entry").path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            if name.ends_with(".in.yaml") {
                Some((p, Format::Yaml))
            } else if name.ends_with(".in.json") {
                Some((p, Format::Json))
            } else {
                None
            }
        })
        .collect();
    inputs.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(inputs.len() >= 8, "golden inputs missing: {inputs:?}");
    inputs
}

fn sibling(input: &Path, suffix: &str) -> PathBuf {
    let name = input.file_name().and_then(|n| n.to_str()).expect("name");
    let stem = name.split(".in.").next().expect("stem");
    input.with_file_name(format!("{stem}{suffix}"))
}

fn check(path: &Path, actual: &str, update: bool) {
    if update {
        std::fs::write(path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 rewrites it):\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[test]
fn golden_outputs_and_notes() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let config = common::config();
    for (input, format) in inputs() {
        let text = std::fs::read_to_string(&input).expect("read input");
        let out = inject_manifests(&text, format, Origin::Cli, &BTreeMap::new(), &config)
            .unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let ext = if format == Format::Json {
            ".out.json"
        } else {
            ".out.yaml"
        };
        check(&sibling(&input, ext), &out.text, update);
        let notes: String = out.reports.iter().map(|r| format!("{r}\n")).collect();
        check(&sibling(&input, ".notes"), &notes, update);
        assert!(
            out.reports
                .iter()
                .any(|r| r.outcome == ObjectOutcome::Pod(Outcome::Injected)),
            "{}: nothing injected",
            input.display()
        );
    }
}

/// Running inject on its own output changes nothing, and says so.
#[test]
fn injecting_twice_changes_nothing() {
    let config = common::config();
    for (input, format) in inputs() {
        let text = std::fs::read_to_string(&input).expect("read input");
        let once = inject_manifests(&text, format, Origin::Cli, &BTreeMap::new(), &config)
            .expect("first injection");
        let twice = inject_manifests(&once.text, format, Origin::Cli, &BTreeMap::new(), &config)
            .expect("second injection");
        assert_eq!(once.text, twice.text, "{}", input.display());
        for (first, second) in once.reports.iter().zip(&twice.reports) {
            let expected = match &first.outcome {
                ObjectOutcome::Pod(Outcome::Injected) => {
                    ObjectOutcome::Pod(Outcome::AlreadyInjected)
                }
                other => other.clone(),
            };
            assert_eq!(second.outcome, expected, "{}: {first}", input.display());
        }
    }
}
