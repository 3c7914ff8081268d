//! `meshlink identity`: the trust anchor and per-cluster issuers, made with rcgen, so nobody
//! needs `step` or openssl. ECDSA P-256 throughout (Linkerd's proxies require it).
//!
//! ```text
//! meshlink identity anchor --out anchor/             # ca.crt, ca.key
//! meshlink identity issuer --anchor anchor/ --out east/   # issuer.crt, issuer.key
//! meshlink identity issuer --anchor anchor/ --out east/ --cluster east   # only *.east.cluster.local
//! meshlink identity manifests --issuer east/ --anchors anchor/ca.crt[,new/ca.crt]
//! ```

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, Subcommand};
use proxy_identity::{TrustAnchors, ca};
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum IdentityCommand {
    /// Create a trust anchor (root CA): <out>/ca.crt and <out>/ca.key. Share ca.crt with every
    /// cluster; keep ca.key offline.
    Anchor(AnchorArgs),
    /// Create an issuer (intermediate CA) for one cluster, signed by the anchor:
    /// <out>/issuer.crt and <out>/issuer.key.
    Issuer(IssuerArgs),
    /// Print the issuer Secret and the trust-anchor bundle ConfigMap for one cluster.
    Manifests(ManifestArgs),
}

#[derive(Args, Debug)]
pub struct AnchorArgs {
    /// Directory to write ca.crt and ca.key into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Subject common name.
    #[arg(long, default_value = "root.linkerd.cluster.local")]
    common_name: String,
    /// How long the anchor is valid (e.g. 87600h, 3650d).
    #[arg(long, default_value = "87600h", value_parser = humantime::parse_duration)]
    lifetime: Duration,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct IssuerArgs {
    /// Directory holding the anchor's ca.crt and ca.key.
    #[arg(long)]
    anchor: PathBuf,
    /// Directory to write issuer.crt and issuer.key into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Subject common name (Linkerd's: identity.linkerd.<trust-domain>; with --cluster, that
    /// of the cluster's trust domain).
    #[arg(long)]
    common_name: Option<String>,
    /// The cluster this issuer is for: it may then only certify identities in the cluster's own
    /// trust domain (an X.509 name constraint that TLS verifiers enforce), so a compromised
    /// cluster cannot impersonate another's workloads. Run each cluster's identity service
    /// with that trust domain (--trust-domain).
    #[arg(long)]
    cluster: Option<String>,
    /// The cluster's trust domain (default with --cluster: <cluster>.cluster.local).
    #[arg(long, requires = "cluster")]
    trust_domain: Option<String>,
    /// How long the issuer is valid (e.g. 8760h).
    #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
    lifetime: Duration,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ManifestArgs {
    /// Directory holding the cluster's issuer.crt and issuer.key.
    #[arg(long)]
    issuer: PathBuf,
    /// PEM files of the trust anchors (comma-separated). Give the old and the new anchor
    /// together while rotating.
    #[arg(long, value_delimiter = ',', required = true)]
    anchors: Vec<PathBuf>,
    /// The control-plane namespace (where the identity service and its issuer Secret are).
    #[arg(long, default_value = "linkerd")]
    namespace: String,
    /// Namespaces that get the trust-anchor bundle ConfigMap (a ConfigMap can only be read in
    /// its own namespace; the gateway's reads it from there).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "linkerd,linkerd-multicluster"
    )]
    bundle_namespaces: Vec<String>,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, contents: &str, secret: bool, force: bool) -> Result<()> {
    if path.exists() && !force {
        bail!(
            "{} already exists; pass --force to replace it (a replaced anchor or issuer invalidates every certificate it signed)",
            path.display()
        );
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs a subcommand; returns what to print and the documents (for `manifests`).
pub fn run(command: &IdentityCommand) -> Result<(String, Vec<Value>)> {
    match command {
        IdentityCommand::Anchor(a) => {
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            let anchor = ca::new_anchor(&a.common_name, a.lifetime)?;
            write(&a.out.join("ca.crt"), &anchor.cert_pem, false, a.force)?;
            write(&a.out.join("ca.key"), &anchor.key_pem, true, a.force)?;
            Ok((
                format!(
                    "trust anchor written to {0}/ca.crt (key: {0}/ca.key, keep it offline)\n",
                    a.out.display()
                ),
                Vec::new(),
            ))
        }
        IdentityCommand::Issuer(a) => {
            let anchor = ca::CertKey {
                cert_pem: read(&a.anchor.join("ca.crt"))?,
                key_pem: read(&a.anchor.join("ca.key"))?,
            };
            std::fs::create_dir_all(&a.out)
                .with_context(|| format!("creating {}", a.out.display()))?;
            let domain = a.trust_domain.clone().or_else(|| {
                a.cluster
                    .as_ref()
                    .map(|c| format!("{}.cluster.local", c.to_ascii_lowercase()))
            });
            if let Some(d) = &domain {
                // The trust domain ends every identity: it must be a DNS name.
                proxy_identity::Id::parse(d).with_context(|| format!("trust domain {d:?}"))?;
            }
            let common_name = a.common_name.clone().unwrap_or_else(|| {
                format!(
                    "identity.linkerd.{}",
                    domain.as_deref().unwrap_or("cluster.local")
                )
            });
            let issuer = match &domain {
                Some(d) => ca::new_constrained_issuer(&anchor, &common_name, a.lifetime, d),
                None => ca::new_issuer(&anchor, &common_name, a.lifetime),
            }
            .context("the anchor directory must hold ca.crt and its ECDSA P-256 ca.key")?;
            write(&a.out.join("issuer.crt"), &issuer.cert_pem, false, a.force)?;
            write(&a.out.join("issuer.key"), &issuer.key_pem, true, a.force)?;
            Ok((
                match &domain {
                    Some(d) => format!(
                        "issuer written to {}/issuer.crt and issuer.key; it certifies identities under {d} only (run the identity service with --trust-domain={d})\n",
                        a.out.display()
                    ),
                    None => format!(
                        "issuer written to {}/issuer.crt and issuer.key\n",
                        a.out.display()
                    ),
                },
                Vec::new(),
            ))
        }
        IdentityCommand::Manifests(a) => Ok((String::new(), manifests(a)?)),
    }
}

fn manifests(a: &ManifestArgs) -> Result<Vec<Value>> {
    let cert = read(&a.issuer.join("issuer.crt"))?;
    let key = read(&a.issuer.join("issuer.key"))?;
    let mut bundle = String::new();
    for path in &a.anchors {
        let pem = read(path)?;
        TrustAnchors::from_pem(&pem).with_context(|| format!("{}", path.display()))?;
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    issuer_docs(&cert, &key, &bundle, &a.namespace, &a.bundle_namespaces)
}

/// The Namespaces, the issuer Secret (in `namespace`) and the trust-anchor bundle ConfigMaps
/// (in each of `bundle_namespaces`) for issuer `cert`/`key` and anchors `bundle`, once the
/// issuer is proven to chain to one of the anchors.
pub fn issuer_docs(
    cert: &str,
    key: &str,
    bundle: &str,
    namespace: &str,
    bundle_namespaces: &[String],
) -> Result<Vec<Value>> {
    let anchors = TrustAnchors::from_pem(bundle)?;
    // The issuer must chain to one of the anchors, or every certificate it signs is refused:
    // prove it by issuing a throwaway leaf (inside the issuer's trust domain, when it is
    // constrained to one) and verifying it.
    let signer = ca::Signer::from_pem(cert, key)
        .context("issuer.key must be the PKCS#8 ECDSA P-256 key of issuer.crt")?;
    let probe = match proxy_identity::permitted_dns(signer.cert_der()).first() {
        Some(domain) => format!("probe.meshlink.{}", domain.trim_start_matches('.')),
        None => "probe.meshlink.invalid".to_owned(),
    };
    let probe = proxy_identity::Id::parse(&probe)?;
    let (leaf, _) = signer.issue(&probe, Duration::from_secs(60))?;
    anchors
        .verify(&leaf.into(), &[signer.cert_der().to_vec().into()])
        .map_err(|e| {
            anyhow::anyhow!("the issuer does not chain to the given anchors ({e}): sign it with `meshlink identity issuer --anchor <dir of one of them>`")
        })?;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // The namespaces first, so that the output applies whatever was installed before it.
    let mut namespaces: Vec<&str> = std::iter::once(namespace)
        .chain(bundle_namespaces.iter().map(String::as_str))
        .collect();
    namespaces.dedup();
    let mut docs: Vec<Value> = namespaces
        .into_iter()
        .map(|ns| json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }))
        .collect();
    docs.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": link_crd::keys::ISSUER_SECRET,
                "namespace": namespace,
                "labels": { "linkerd.io/control-plane-component": "identity" },
            },
            "data": { "tls.crt": b64(cert), "tls.key": b64(key), "ca.crt": b64(bundle) },
    }));
    for ns in bundle_namespaces {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": link_crd::keys::TRUST_ROOTS_CONFIGMAP,
                "namespace": ns,
                "labels": { "linkerd.io/control-plane-component": "identity" },
            },
            "data": { link_crd::keys::TRUST_ROOTS_KEY: bundle },
        }));
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: IdentityCommand,
    }

    fn run_args(args: &[&str]) -> Result<(String, Vec<Value>)> {
        run(&Cli::try_parse_from(std::iter::once("identity").chain(args.iter().copied()))?.command)
    }

    /// `--cluster` gives the issuer its cluster's trust domain as a name constraint: a leaf it
    /// signs for another cluster's identity fails verification.
    #[test]
    fn a_cluster_issuer_is_constrained_to_its_trust_domain() {
        proxy_identity::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        run_args(&["anchor", "--out", &d("a")]).unwrap();
        let (out, _) = run_args(&[
            "issuer",
            "--anchor",
            &d("a"),
            "--out",
            &d("west"),
            "--cluster",
            "west",
        ])
        .unwrap();
        assert!(out.contains("--trust-domain=west.cluster.local"), "{out}");
        let err = run_args(&[
            "issuer",
            "--anchor",
            &d("a"),
            "--out",
            &d("bad"),
            "--cluster",
            "x",
            "--trust-domain",
            "not a domain",
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("trust domain"), "{err:#}");
        let anchors = proxy_identity::TrustAnchors::from_pem(
            &std::fs::read_to_string(dir.path().join("a/ca.crt")).unwrap(),
        )
        .unwrap();
        let signer = proxy_identity::ca::Signer::from_pem(
            &std::fs::read_to_string(dir.path().join("west/issuer.crt")).unwrap(),
            &std::fs::read_to_string(dir.path().join("west/issuer.key")).unwrap(),
        )
        .unwrap();
        for (id, accepted) in [
            (
                "web.shop.serviceaccount.identity.linkerd.west.cluster.local",
                true,
            ),
            (
                "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.cluster.local",
                false,
            ),
            (
                "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.cluster.local",
                false,
            ),
        ] {
            let (leaf, _) = signer
                .issue(
                    &proxy_identity::Id::parse(id).unwrap(),
                    Duration::from_secs(600),
                )
                .unwrap();
            let verified = anchors.verify(&leaf.into(), &[signer.cert_der().to_vec().into()]);
            assert_eq!(verified.is_ok(), accepted, "{id}: {verified:?}");
        }
        // And it installs: `manifests` proves the chain with a leaf inside the constraint.
        let (_, docs) = run_args(&[
            "manifests",
            "--issuer",
            &d("west"),
            "--anchors",
            &d("a/ca.crt"),
        ])
        .expect("a constrained issuer's manifests");
        assert!(docs.iter().any(|d| d["kind"] == "Secret"));
    }

    #[test]
    fn anchor_issuer_manifests_and_rotation() {
        proxy_identity::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        run_args(&["anchor", "--out", &d("a")]).unwrap();
        run_args(&["anchor", "--out", &d("b")]).unwrap();
        let err = run_args(&["anchor", "--out", &d("a")]).unwrap_err();
        assert!(format!("{err:#}").contains("--force"), "{err:#}");
        let mode = std::fs::metadata(dir.path().join("a/ca.key")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        run_args(&["issuer", "--anchor", &d("a"), "--out", &d("east")]).unwrap();

        // The bundle may hold the old and the new anchor.
        let (_, docs) = run_args(&[
            "manifests",
            "--issuer",
            &d("east"),
            "--anchors",
            &format!("{},{}", d("a/ca.crt"), d("b/ca.crt")),
        ])
        .unwrap();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["Namespace", "Namespace", "Secret", "ConfigMap", "ConfigMap"]
        );
        assert_eq!(docs[2]["type"], "kubernetes.io/tls");
        let bundle = docs[3]["data"]["ca-bundle.crt"].as_str().unwrap();
        assert_eq!(TrustAnchors::from_pem(bundle).unwrap().len(), 2);

        // An issuer from another anchor is caught before it reaches a cluster.
        let err = run_args(&[
            "manifests",
            "--issuer",
            &d("east"),
            "--anchors",
            &d("b/ca.crt"),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("does not chain"), "{err:#}");
    }
}
