//! The webhook's serving certificate, issued at start-up and renewed while it runs.
//!
//! The API server verifies the webhook against the `caBundle` of its
//! MutatingWebhookConfiguration, so every replica must serve a certificate from a CA in that
//! bundle. The CA lives in a Secret of the injector's namespace: the first replica to start
//! makes it (a create that loses the race reads the winner's), each replica signs its own
//! short-lived leaf with it, and a CA close to expiry is replaced, the old one staying in the
//! bundle until it expires so that replicas still serving its leaves are trusted meanwhile.
//! Nothing is read from or written to the local file system.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use proxy_identity::ca::{self, CertKey};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// How long a CA made by the injector is valid.
pub const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// A CA with less than this left is replaced (a month: well over any renewal interval).
pub const CA_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long each serving certificate is valid; renewed every [`LEAF_RENEW_EVERY`].
pub const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
pub const LEAF_RENEW_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The Secret's keys: the CA certificate and key as a `kubernetes.io/tls` Secret holds them,
/// and the replaced CA's certificate while it is still valid.
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const PREVIOUS_KEY: &str = "ca-previous.crt";

/// Why the CA or a certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Secret {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("making a certificate: {0}")]
    Make(#[from] ca::CaError),
    #[error("the serving key cannot be used: {0}")]
    Key(rustls::Error),
    #[error("Secret {namespace}/{name} kept changing under this replica; giving up for now")]
    Contended { namespace: String, name: String },
}

/// What to do with the CA Secret as found.
#[derive(Debug)]
pub enum CaPlan {
    /// It holds a CA valid for long enough.
    Keep {
        ca: CertKey,
        previous: Option<String>,
    },
    /// There is none: make one.
    Create,
    /// Its CA is unreadable or about to expire: replace it, keeping `previous` (the old
    /// certificate, when still valid) in the bundle.
    Replace { previous: Option<String> },
}

/// The decision for the Secret's data `data` (`None`: no Secret) at `now`.
pub fn plan(data: Option<&BTreeMap<String, ByteString>>, now: SystemTime) -> CaPlan {
    let Some(data) = data else {
        return CaPlan::Create;
    };
    let text = |key: &str| {
        data.get(key)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let cert = text(CERT_KEY);
    let valid_until = |pem: &str| expiry(pem).filter(|&end| end > now);
    let end = cert.as_deref().and_then(valid_until);
    match (cert, text(KEY_KEY), end) {
        (Some(cert_pem), Some(key_pem), Some(end))
            if end > now + CA_RENEW_BEFORE && usable(&cert_pem, &key_pem) =>
        {
            let previous = text(PREVIOUS_KEY).filter(|p| valid_until(p).is_some());
            CaPlan::Keep {
                ca: CertKey { cert_pem, key_pem },
                previous,
            }
        }
        (cert, ..) => CaPlan::Replace {
            previous: cert.filter(|p| valid_until(p).is_some()),
        },
    }
}

/// Whether `key_pem` is the key of `cert_pem` and both can sign.
fn usable(cert_pem: &str, key_pem: &str) -> bool {
    let Some(Ok(cert)) = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).next() else {
        return false;
    };
    let Ok(key) = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) else {
        return false;
    };
    // `from_der` refuses a key whose public half is not the certificate's.
    CertifiedKey::from_der(vec![cert], key, &proxy_identity::tls::provider()).is_ok()
        && ca::Signer::from_pem(cert_pem, key_pem).is_ok()
}

/// When the first certificate of `pem` expires.
fn expiry(pem: &str) -> Option<SystemTime> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    proxy_identity::not_after(&der)
}

/// The CA and the bundle of CA certificates the API server must trust.
#[derive(Clone, Debug)]
pub struct Ca {
    pub ca: CertKey,
    pub bundle: String,
}

impl Ca {
    fn new(ca: CertKey, previous: Option<String>) -> Self {
        let mut bundle = ca.cert_pem.trim_end().to_owned();
        bundle.push('\n');
        if let Some(previous) = previous {
            bundle.push_str(previous.trim_end());
            bundle.push('\n');
        }
        Self { ca, bundle }
    }
}

/// Reads the CA from Secret `name` of `api`'s namespace, making or replacing it as [`plan`]
/// says; when another replica writes it first, uses that replica's.
pub async fn ensure_ca(api: &Api<Secret>, namespace: &str, name: &str) -> Result<Ca, CertError> {
    let read_err = |source| CertError::Read {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let write_err = |source| CertError::Write {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    // A few rounds: each lost race means another replica just wrote a fresh CA, which the
    // next read keeps.
    for _ in 0..4 {
        let found = api.get_opt(name).await.map_err(read_err)?;
        let previous = match plan(
            found.as_ref().and_then(|s| s.data.as_ref()),
            SystemTime::now(),
        ) {
            CaPlan::Keep { ca, previous } => return Ok(Ca::new(ca, previous)),
            CaPlan::Create => None,
            CaPlan::Replace { previous } => previous,
        };
        let ca = ca::new_anchor(&format!("{name}.{namespace}"), CA_LIFETIME)?;
        let mut data = BTreeMap::from([
            (CERT_KEY.to_owned(), ByteString(ca.cert_pem.clone().into())),
            (KEY_KEY.to_owned(), ByteString(ca.key_pem.clone().into())),
        ]);
        if let Some(p) = &previous {
            data.insert(PREVIOUS_KEY.to_owned(), ByteString(p.clone().into()));
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    "linkerd.io/control-plane-component".to_owned(),
                    "proxy-injector".to_owned(),
                )])),
                // Optimistic concurrency: a replace fails if another replica wrote first.
                resource_version: found.and_then(|s| s.metadata.resource_version),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(data),
            ..Secret::default()
        };
        let written = if secret.metadata.resource_version.is_some() {
            api.replace(name, &PostParams::default(), &secret).await
        } else {
            api.create(&PostParams::default(), &secret).await
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %name, %namespace, replaced = previous.is_some(), "made the webhook CA");
                return Ok(Ca::new(ca, previous));
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(error) => return Err(write_err(error)),
        }
    }
    Err(CertError::Contended {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// The certificate the webhook presents; replaced in place when renewed, so that the server
/// keeps its configuration.
#[derive(Debug, Default)]
pub struct ServingCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ServingCert {
    /// Signs a new certificate for `dns_name` with `ca` and serves it from now on.
    pub fn renew(&self, ca: &CertKey, dns_name: &proxy_identity::Id) -> Result<(), CertError> {
        let signer = ca::Signer::from_pem(&ca.cert_pem, &ca.key_pem)?;
        let (leaf, key) = signer.issue(dns_name, LEAF_LIFETIME)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let signing = proxy_identity::tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(CertError::Key)?;
        let certified = Arc::new(CertifiedKey::new(vec![leaf.into()], signing));
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(certified);
        Ok(())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// TLS 1.3 with the renewing certificate; no client certificate (the API server presents
/// none unless configured to); HTTP/1.1, which the API server's webhook client speaks, or
/// HTTP/2.
pub fn server_config(cert: Arc<ServingCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(proxy_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn plans() {
        let now = SystemTime::now();
        let fresh = ca::new_anchor("fresh", CA_LIFETIME).unwrap();
        let expiring = ca::new_anchor("expiring", Duration::from_secs(24 * 3600)).unwrap();
        let other = ca::new_anchor("other", CA_LIFETIME).unwrap();
        let name = |p: &CaPlan| match p {
            CaPlan::Keep { .. } => "keep",
            CaPlan::Create => "create",
            CaPlan::Replace { .. } => "replace",
        };
        let previous = |p: &CaPlan| match p {
            CaPlan::Keep { previous, .. } | CaPlan::Replace { previous } => previous.clone(),
            CaPlan::Create => None,
        };
        // (case, the Secret's data, the plan, the previous CA it keeps)
        type Case<'a> = (
            &'a str,
            Option<BTreeMap<String, ByteString>>,
            &'a str,
            Option<&'a str>,
        );
        let cases: Vec<Case<'_>> = vec![
            ("no Secret", None, "create", None),
            (
                "a valid CA",
                Some(data(&[
                    (CERT_KEY, &fresh.cert_pem),
                    (KEY_KEY, &fresh.key_pem),
                ])),
                "keep",
                None,
            ),
            (
                "a valid CA and the one it replaced",
                Some(data(&[
                    (CERT_KEY, &fresh.cert_pem),
                    (KEY_KEY, &fresh.key_pem),
                    (PREVIOUS_KEY, &expiring.cert_pem),
                ])),
                "keep",
                Some(&expiring.cert_pem),
            ),
            (
                "a CA about to expire: replaced, still trusted meanwhile",
                Some(data(&[
                    (CERT_KEY, &expiring.cert_pem),
                    (KEY_KEY, &expiring.key_pem),
                ])),
                "replace",
                Some(&expiring.cert_pem),
            ),
            (
                "a key that is not the certificate's",
                Some(data(&[
                    (CERT_KEY, &fresh.cert_pem),
                    (KEY_KEY, &other.key_pem),
                ])),
                "replace",
                Some(&fresh.cert_pem),
            ),
            (
                "no key",
                Some(data(&[(CERT_KEY, &fresh.cert_pem)])),
                "replace",
                Some(&fresh.cert_pem),
            ),
            (
                "garbage",
                Some(data(&[(CERT_KEY, "nope"), (KEY_KEY, "nope")])),
                "replace",
                None,
            ),
            ("an empty Secret", Some(BTreeMap::new()), "replace", None),
        ];
        for (case, data, want, want_previous) in cases {
            let got = plan(data.as_ref(), now);
            assert_eq!(name(&got), want, "{case}");
            assert_eq!(previous(&got).as_deref(), want_previous, "{case}");
        }
    }

    #[test]
    fn bundle_holds_the_ca_then_the_previous_one() {
        let a = ca::new_anchor("a", CA_LIFETIME).unwrap();
        let b = ca::new_anchor("b", CA_LIFETIME).unwrap();
        let ca = Ca::new(a.clone(), Some(b.cert_pem.clone()));
        let anchors = proxy_identity::TrustAnchors::from_pem(&ca.bundle).unwrap();
        assert_eq!(anchors.len(), 2);
        assert!(ca.bundle.starts_with(a.cert_pem.trim_end()));
    }

    #[test]
    fn serving_certificate_chains_to_the_ca_and_names_the_service() {
        let ca = ca::new_anchor("webhook", CA_LIFETIME).unwrap();
        let name = proxy_identity::Id::parse("linkerd-proxy-injector.linkerd.svc").unwrap();
        let cert = ServingCert::default();
        assert!(cert.current.read().unwrap().is_none());
        cert.renew(&ca, &name).unwrap();
        let served = cert.current.read().unwrap().clone().unwrap();
        let leaf = served.cert[0].clone();
        let anchors = proxy_identity::TrustAnchors::from_pem(&ca.cert_pem).unwrap();
        anchors.verify(&leaf, &[]).unwrap();
        assert_eq!(proxy_identity::cert_ids(&leaf).unwrap(), vec![name]);
    }
}
