//! `meshlink check`: is this cluster's mesh healthy, and are its Links? Linkerd's
//! `multicluster check` list plus the core checks that matter for meshlink (identity issuer,
//! destination service, proxy injector, gateway).
//!
//! Every check is a row of [`CHECKS`]: a category, a description, a severity, a hint that says
//! what to do when it fails, whether it is retried under `--wait`, and its decision: a pure
//! function over [`Facts`] (`decide`, table-tested there). `gather` is the only part that talks
//! to API servers; it reads objects and status and never scrapes a process (Linkerd's check
//! port-forwards to the controller for its metrics [quirk]; meshlink's controller writes what
//! the check needs into the Link's status and its Lease).
//!
//! Exit code: 1 when a fatal or error check fails; warnings are reported and do not count.

mod decide;
mod gather;
mod report;

use std::{io::Write, time::Duration};

use kube::Client;

use self::decide::{Facts, Outcome};
use crate::Output;

/// Flags of `meshlink check`. The report's format is the global `-o`: `table` (also what the
/// default, `yaml`, gives here) or `json`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// How long to retry the checks that wait for something to happen (a controller starting,
    /// endpoints becoming ready) before reporting them failed (Linkerd's default).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
}

/// The three groups of checks, printed in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Category {
    Identity,
    ControlPlane,
    Multicluster,
}

impl Category {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Identity => "meshlink-identity",
            Self::ControlPlane => "meshlink-control-plane",
            // Linkerd's category name, so that tools reading `-o json` find the same checks.
            Self::Multicluster => "linkerd-multicluster",
        }
    }
}

/// What a failed check means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Severity {
    /// The checks after it in its category cannot run (they would only repeat its failure).
    Fatal,
    /// The mesh does not work as it should: exit code 1.
    Error,
    /// Worth knowing; exit code 0.
    Warning,
}

impl Severity {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Error => "error",
            Self::Warning => "warning",
        }
    }
}

/// One check: what it says and how it decides.
#[derive(Debug)]
pub(crate) struct Check {
    /// A stable name, for `-o json` readers and tests.
    pub id: &'static str,
    pub category: Category,
    pub description: &'static str,
    pub severity: Severity,
    /// What to do when it fails.
    pub hint: &'static str,
    /// Whether `--wait` retries it: it depends on something that may still be starting, not on
    /// configuration that only a person can change.
    pub retry: bool,
    pub decide: fn(&Facts) -> Outcome,
}

/// How the proxy-injector checks fail when no injector is installed. The injector is part of
/// `meshlink install`; a cluster meshed only with `meshlink inject` may lower this to
/// [`Severity::Warning`].
const INJECTOR_SEVERITY: Severity = Severity::Error;

/// Every check, in the order they run and print.
pub(crate) const CHECKS: &[Check] = &[
    Check {
        id: "trust-anchors-valid",
        category: Category::Identity,
        description: "trust anchors are valid",
        severity: Severity::Error,
        hint: "apply the anchor bundle that `meshlink identity manifests --anchors <ca.crt>` prints (ConfigMap linkerd/linkerd-identity-trust-roots, key ca-bundle.crt); replace an expired anchor with `meshlink identity anchor`",
        retry: false,
        decide: |f| decide::trust_anchors_valid(&f.trust_roots, f.now),
    },
    Check {
        id: "issuer-valid",
        category: Category::Identity,
        description: "identity issuer is valid",
        severity: Severity::Error,
        hint: "make an issuer signed by the trust anchor with `meshlink identity issuer --anchor <dir>` and apply what `meshlink identity manifests` prints (Secret linkerd/linkerd-identity-issuer)",
        retry: false,
        decide: |f| decide::issuer_valid(&f.issuer, &f.trust_roots, f.now),
    },
    Check {
        id: "issuer-not-expiring",
        category: Category::Identity,
        description: "identity issuer is not close to expiry",
        severity: Severity::Warning,
        hint: "rotate the issuer before it expires: `meshlink identity issuer --anchor <dir> --force`, then apply `meshlink identity manifests` (the identity service picks it up without a restart)",
        retry: false,
        decide: |f| decide::issuer_not_expiring(&f.issuer, f.now),
    },
    Check {
        id: "destination-ready",
        category: Category::ControlPlane,
        description: "destination service is ready",
        severity: Severity::Error,
        hint: "install the destination service (manifests/destination/destination.yaml, or `meshlink install`) and check that its pods in namespace linkerd are running and ready",
        retry: true,
        decide: |f| decide::destination_ready(&f.destination),
    },
    Check {
        id: "injector-registered",
        category: Category::ControlPlane,
        description: "proxy injector webhook is registered",
        severity: INJECTOR_SEVERITY,
        hint: "install the proxy injector: `meshlink install | kubectl apply -f -`; meshlink-injector patches its CA bundle into the MutatingWebhookConfiguration when it starts",
        retry: false,
        decide: |f| decide::injector_registered(&f.injector_webhook),
    },
    Check {
        id: "injector-reachable",
        category: Category::ControlPlane,
        description: "API server reaches the proxy injector",
        severity: INJECTOR_SEVERITY,
        hint: "check that Service linkerd/linkerd-proxy-injector has ready endpoints and read meshlink-injector's log; with failurePolicy Ignore, Pods are created un-injected while the API server cannot reach it",
        retry: true,
        decide: |f| decide::injector_reachable(&f.injector_webhook, &f.injector_dry_run),
    },
    Check {
        id: "gateway-ready",
        category: Category::ControlPlane,
        description: "gateway is ready",
        severity: Severity::Error,
        hint: "check that the gateway pods in namespace linkerd-multicluster are running and ready, and read their logs (a gateway is ready once the identity service certified it)",
        retry: true,
        decide: |f| decide::gateway_ready(&f.gateway),
    },
    Check {
        id: "pods-meshed",
        category: Category::ControlPlane,
        description: "pods that ask for the proxy have it",
        severity: Severity::Warning,
        hint: "these Pods were created while the API server could not reach the proxy injector (failurePolicy Ignore let them start without the proxy); once `API server reaches the proxy injector` passes, restart them, e.g. `kubectl rollout restart deployment -n <namespace> <name>`",
        retry: false,
        decide: |f| decide::pods_meshed(&f.pods),
    },
    Check {
        id: "link-crd-exists",
        category: Category::Multicluster,
        description: "Link CRD exists",
        severity: Severity::Fatal,
        hint: "install the Link CRD: `kubectl apply -f manifests/crds/link.yaml` (or `meshlink install`)",
        retry: false,
        decide: |f| decide::link_crd_exists(&f.links),
    },
    Check {
        id: "links-valid",
        category: Category::Multicluster,
        description: "Link resources are valid",
        severity: Severity::Fatal,
        hint: "regenerate the Link with `meshlink link --cluster-name <target>` run against the target cluster, and apply its output here",
        retry: false,
        decide: |f| decide::links_valid(&f.links),
    },
    Check {
        id: "links-version",
        category: Category::Multicluster,
        description: "Link and CLI versions match",
        severity: Severity::Warning,
        hint: "regenerate the Link with this version of `meshlink link` and apply it",
        retry: false,
        decide: |f| decide::links_version(&f.links, decide::CLI_CREATED_BY),
    },
    Check {
        id: "remote-credentials-valid",
        category: Category::Multicluster,
        description: "remote cluster access credentials are valid",
        severity: Severity::Error,
        hint: "run `meshlink link --cluster-name <target>` against the target cluster and apply its output here (it writes the credentials Secret); the target needs manifests/mirror/remote-access.yaml",
        retry: false,
        decide: |f| decide::credentials_valid(&f.links, &f.remotes),
    },
    Check {
        id: "anchors-shared",
        category: Category::Multicluster,
        description: "clusters share trust anchors",
        severity: Severity::Error,
        hint: "give every cluster the same anchor bundle (`meshlink identity manifests --anchors <ca.crt>[,<new.crt>]` applied in each); while rotating, put the old and the new anchor in every cluster's bundle",
        retry: false,
        decide: |f| decide::anchors_shared(&f.trust_roots, &f.links, &f.remotes),
    },
    Check {
        id: "controller-rbac",
        category: Category::Multicluster,
        description: "service mirror controller has required permissions",
        severity: Severity::Error,
        hint: "apply the controller's ServiceAccount and RBAC: `meshlink link --with-controller` prints them (manifests/mirror/controller.yaml)",
        retry: false,
        decide: |f| decide::controller_rbac(&f.links, &f.rbac),
    },
    Check {
        id: "controllers-running",
        category: Category::Multicluster,
        description: "service mirror controllers are running",
        severity: Severity::Error,
        hint: "start the service-mirror controller in the Link's namespace (`meshlink link --with-controller` prints its Deployment) and read its log; it holds Lease meshlink-service-mirror-write (or service-mirror-write-<link> with --link) while it runs",
        retry: true,
        decide: |f| decide::controllers_running(&f.links, &f.leases, f.now),
    },
    Check {
        id: "remotes-reachable",
        category: Category::Multicluster,
        description: "remote clusters are reachable from their controllers",
        severity: Severity::Error,
        hint: "the controller cannot watch the target's API server: check the credentials (above), that the target's API server address in the Secret's kubeconfig is reachable from this cluster, and the controller's log",
        retry: true,
        decide: |f| decide::remotes_reachable(&f.links, &f.leases, f.now),
    },
    Check {
        id: "gateways-alive",
        category: Category::Multicluster,
        description: "gateways of linked clusters are alive",
        severity: Severity::Error,
        hint: "check that the target's gateway is running and that its probe port (the Link's probeSpec.port, 4191 by default) is reachable from this cluster at the Link's gatewayAddress",
        retry: true,
        decide: |f| decide::gateways_alive(&f.links, &f.leases, f.now),
    },
    Check {
        id: "mirrors-have-endpoints",
        category: Category::Multicluster,
        description: "all mirror services have endpoints",
        severity: Severity::Error,
        hint: "a mirror without ready endpoints cannot be called: check that the gateway is alive (above) and, for a headless mirror, that the target Service has ready pods",
        retry: true,
        decide: |f| decide::mirrors_have_endpoints(&f.mirrors),
    },
    Check {
        id: "mirrors-part-of-link",
        category: Category::Multicluster,
        description: "all mirror services are part of a Link",
        severity: Severity::Warning,
        hint: "delete the mirror Services of clusters that are no longer linked (`meshlink unlink` prints them), or link the cluster again",
        retry: false,
        decide: |f| decide::mirrors_part_of_link(&f.mirrors, &f.links),
    },
];

/// The outcome of one check.
#[derive(Debug)]
pub(crate) struct CheckResult {
    pub check: &'static Check,
    pub outcome: Outcome,
}

impl CheckResult {
    /// Whether this result makes the command fail.
    pub(crate) fn fails(&self) -> bool {
        matches!(self.outcome, Outcome::Fail(_)) && self.check.severity != Severity::Warning
    }
}

/// Decides every check over `facts`. After a fatal failure the rest of its category is
/// skipped.
pub(crate) fn evaluate(checks: &'static [Check], facts: &Facts) -> Vec<CheckResult> {
    let mut blocked: Option<(Category, &str)> = None;
    checks
        .iter()
        .map(|check| {
            let outcome = match blocked {
                Some((category, by)) if category == check.category => {
                    Outcome::Skip(format!("not run: \"{by}\" failed"))
                }
                _ => (check.decide)(facts),
            };
            if check.severity == Severity::Fatal && matches!(outcome, Outcome::Fail(_)) {
                blocked = Some((check.category, check.description));
            }
            CheckResult { check, outcome }
        })
        .collect()
}

/// How long between two rounds of a retried check: each round re-reads Links, Leases and
/// endpoints, so rounds are spaced, but closely enough that a short `--wait` still retries.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Runs the checks, retrying the failing retryable ones until `--wait` runs out. Returns the
/// report for `main` to print; when a fatal or error check failed, prints the report itself
/// (stdout stays the report, `-o json` included) and returns an error, so that `main` exits
/// with 1.
pub async fn run(args: &CheckArgs, client: Client, output: Output) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + args.wait;
    let mut facts = gather::facts(&client).await;
    let mut waiting: Vec<String> = Vec::new();
    let results = loop {
        let results = evaluate(CHECKS, &facts);
        let pending: Vec<String> = results
            .iter()
            .filter(|r| r.fails() && r.check.retry)
            .map(|r| r.check.description.to_owned())
            .collect();
        if pending.is_empty() || tokio::time::Instant::now() + RETRY_INTERVAL > deadline {
            break results;
        }
        if pending != waiting {
            // Progress goes to stderr, so that stdout is only the report (`-o json`).
            let _ = writeln!(
                std::io::stderr(),
                "waiting for: {} (up to {}s; --wait)",
                pending.join(", "),
                deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_secs()
            );
            waiting = pending;
        }
        tokio::time::sleep(RETRY_INTERVAL).await;
        gather::refresh(&client, &mut facts).await;
    };
    let text = match output {
        Output::Json => report::json(&results),
        Output::Yaml | Output::Table => report::table(&results),
    };
    let failed = results.iter().filter(|r| r.fails()).count();
    if failed == 0 {
        return Ok(text);
    }
    std::io::stdout().lock().write_all(text.as_bytes())?;
    anyhow::bail!(
        "{failed} check{} failed",
        if failed == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_check_is_named_once_and_says_what_to_do() {
        let mut ids: Vec<&str> = CHECKS.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CHECKS.len(), "duplicate ids");
        for c in CHECKS {
            assert!(!c.hint.is_empty(), "{}: no hint", c.id);
            assert!(!c.description.is_empty(), "{}", c.id);
        }
        // Categories are contiguous, in print order.
        let mut seen = Vec::new();
        for c in CHECKS {
            if seen.last() != Some(&c.category) {
                assert!(!seen.contains(&c.category), "{} out of order", c.id);
                seen.push(c.category);
            }
        }
    }

    #[derive(clap::Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        args: CheckArgs,
    }

    #[test]
    fn wait_takes_go_and_human_durations() {
        use clap::Parser as _;
        let wait = |a: &[&str]| {
            Flags::try_parse_from(std::iter::once("check").chain(a.iter().copied()))
                .map(|f| f.args.wait)
        };
        assert_eq!(wait(&[]).unwrap(), Duration::from_secs(300));
        assert_eq!(wait(&["--wait", "5m0s"]).unwrap(), Duration::from_secs(300));
        assert_eq!(wait(&["--wait", "1m30s"]).unwrap(), Duration::from_secs(90));
        assert_eq!(wait(&["--wait", "0s"]).unwrap(), Duration::ZERO);
        assert!(wait(&["--wait", "soon"]).is_err());
    }

    fn pass(_: &Facts) -> Outcome {
        Outcome::Pass(Vec::new())
    }
    fn fail(_: &Facts) -> Outcome {
        Outcome::Fail(vec!["broken".into()])
    }

    const fn check(
        id: &'static str,
        category: Category,
        severity: Severity,
        decide: fn(&Facts) -> Outcome,
    ) -> Check {
        Check {
            id,
            category,
            description: id,
            severity,
            hint: "fix it",
            retry: false,
            decide,
        }
    }

    static LIST: [Check; 5] = [
        check("a", Category::Identity, Severity::Fatal, fail),
        check("b", Category::Identity, Severity::Error, pass),
        check("c", Category::Multicluster, Severity::Warning, fail),
        check("d", Category::Multicluster, Severity::Fatal, pass),
        check("e", Category::Multicluster, Severity::Error, pass),
    ];

    #[test]
    fn a_fatal_failure_skips_the_rest_of_its_category_only() {
        let results = evaluate(&LIST, &Facts::empty());
        let got: Vec<(&str, &str, bool)> = results
            .iter()
            .map(|r| {
                let kind = match r.outcome {
                    Outcome::Pass(_) => "pass",
                    Outcome::Fail(_) => "fail",
                    Outcome::Skip(_) => "skip",
                };
                (r.check.id, kind, r.fails())
            })
            .collect();
        assert_eq!(
            got,
            [
                ("a", "fail", true),
                ("b", "skip", false),
                // A failed warning does not fail the command.
                ("c", "fail", false),
                ("d", "pass", false),
                ("e", "pass", false),
            ]
        );
        let Outcome::Skip(why) = &results[1].outcome else {
            unreachable!()
        };
        assert_eq!(why, "not run: \"a\" failed");
    }
}
