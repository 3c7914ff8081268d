//! The report: Linkerd's layout (a heading per category, `√`, `‼` or `×` per check, the
//! failure and its hint indented under it) or, with `-o json`, Linkerd's JSON shape (a
//! `success` flag and `categories[].checks[]`) with meshlink's `id`, `severity` and details.

use serde_json::{Value, json};

use super::{CheckResult, Severity, decide::Outcome};

fn result_name(r: &CheckResult) -> &'static str {
    match (&r.outcome, r.check.severity) {
        (Outcome::Pass(_), _) => "success",
        (Outcome::Skip(_), _) => "skipped",
        (Outcome::Fail(_), Severity::Warning) => "warning",
        (Outcome::Fail(_), _) => "error",
    }
}

/// The human report.
pub(crate) fn table(results: &[CheckResult]) -> String {
    let mut out = String::new();
    let mut category = None;
    for r in results {
        if category != Some(r.check.category) {
            if category.is_some() {
                out.push('\n');
            }
            let name = r.check.category.name();
            out.push_str(&format!("{name}\n{}\n", "-".repeat(name.chars().count())));
            category = Some(r.check.category);
        }
        let description = r.check.description;
        match &r.outcome {
            Outcome::Pass(_) => out.push_str(&format!("√ {description}\n")),
            Outcome::Skip(why) => out.push_str(&format!("- {description} (skipped: {why})\n")),
            Outcome::Fail(lines) => {
                let mark = if r.check.severity == Severity::Warning {
                    '‼'
                } else {
                    '×'
                };
                out.push_str(&format!("{mark} {description}\n"));
                for line in lines {
                    out.push_str(&format!("    {line}\n"));
                }
                out.push_str(&format!("    hint: {}\n", r.check.hint));
            }
        }
    }
    let ok = !results.iter().any(CheckResult::fails);
    out.push_str(&format!(
        "\nStatus check results are {}\n",
        if ok { '√' } else { '×' }
    ));
    out
}

/// The JSON report.
pub(crate) fn json(results: &[CheckResult]) -> String {
    let mut categories: Vec<(&str, Vec<Value>)> = Vec::new();
    for r in results {
        let name = r.check.category.name();
        if categories.last().is_none_or(|(n, _)| *n != name) {
            categories.push((name, Vec::new()));
        }
        let mut check = json!({
            "id": r.check.id,
            "description": r.check.description,
            "severity": r.check.severity.name(),
            "result": result_name(r),
        });
        match &r.outcome {
            Outcome::Pass(lines) => check["details"] = json!(lines),
            Outcome::Skip(why) => check["details"] = json!([why]),
            Outcome::Fail(lines) => {
                check["error"] = json!(lines.join("\n"));
                check["hint"] = json!(r.check.hint);
            }
        }
        if let Some((_, checks)) = categories.last_mut() {
            checks.push(check);
        }
    }
    let doc = json!({
        "success": !results.iter().any(CheckResult::fails),
        "categories": categories
            .into_iter()
            .map(|(name, checks)| json!({ "categoryName": name, "checks": checks }))
            .collect::<Vec<_>>(),
    });
    format!("{doc:#}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{Category, Check};

    fn check(id: &'static str, category: Category, severity: Severity) -> &'static Check {
        Box::leak(Box::new(Check {
            id,
            category,
            description: id,
            severity,
            hint: "do this",
            retry: false,
            decide: |_| Outcome::Skip(String::new()),
        }))
    }

    fn results() -> Vec<CheckResult> {
        vec![
            CheckResult {
                check: check("ok", Category::Identity, Severity::Error),
                outcome: Outcome::Pass(vec!["fine".into()]),
            },
            CheckResult {
                check: check("warn", Category::Identity, Severity::Warning),
                outcome: Outcome::Fail(vec!["soon".into()]),
            },
            CheckResult {
                check: check("bad", Category::Multicluster, Severity::Error),
                outcome: Outcome::Fail(vec!["* east: broken".into(), "* west: broken".into()]),
            },
            CheckResult {
                check: check("none", Category::Multicluster, Severity::Error),
                outcome: Outcome::Skip("no Links".into()),
            },
        ]
    }

    #[test]
    fn table_layout() {
        assert_eq!(
            table(&results()),
            "meshlink-identity\n\
             -----------------\n\
             √ ok\n\
             ‼ warn\n    soon\n    hint: do this\n\
             \n\
             linkerd-multicluster\n\
             --------------------\n\
             × bad\n    * east: broken\n    * west: broken\n    hint: do this\n\
             - none (skipped: no Links)\n\
             \n\
             Status check results are ×\n"
        );
        // Only a warning failed: success.
        assert!(table(&results()[..2]).ends_with("Status check results are √\n"));
    }

    #[test]
    fn json_shape() {
        let v: Value = serde_json::from_str(&json(&results())).unwrap();
        assert_eq!(v["success"], false);
        assert_eq!(v["categories"][0]["categoryName"], "meshlink-identity");
        assert_eq!(
            v["categories"][0]["checks"][1],
            json!({ "id": "warn", "description": "warn", "severity": "warning", "result": "warning", "error": "soon", "hint": "do this" })
        );
        let bad = &v["categories"][1]["checks"][0];
        assert_eq!(bad["result"], "error");
        assert_eq!(bad["error"], "* east: broken\n* west: broken");
        assert_eq!(v["categories"][1]["checks"][1]["result"], "skipped");
        assert_eq!(v["categories"][0]["checks"][0]["details"], json!(["fine"]));
    }
}
