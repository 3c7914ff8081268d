//! Making trust anchors and issuers, and signing workload certificates with an issuer: what
//! `meshlink identity` and the identity service do, with rcgen (Linkerd's docs need `step`).
//!
//! Every key is ECDSA P-256: Linkerd's proxy offers its certificate only with that scheme.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::CertificateSigningRequestDer;

use crate::Id;

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key.
        f.debug_struct("CertKey").finish_non_exhaustive()
    }
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating or signing a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the issuer key is not an ECDSA P-256 PKCS#8 key: {0}")]
    Key(rcgen::Error),
    #[error("the issuer certificate cannot be read: {0}")]
    Cert(rcgen::Error),
}

/// Why a certificate signing request was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a DER PKCS#10 request with a valid signature: {0}")]
    Malformed(rcgen::Error),
    #[error("the CSR's key must be ECDSA P-256")]
    KeyAlgorithm,
    #[error("the CSR names {named:?}, but the identity requested is {requested}")]
    NameMismatch {
        named: Vec<String>,
        requested: String,
    },
    #[error("signing: {0}")]
    Sign(rcgen::Error),
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    // A minute of back-dating absorbs clock skew between the issuer and its clients.
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(SerialNumber::from_slice(
        &rand::random::<[u8; 16]>().map(|b| b & 0x7f),
    ));
}

fn ca_params(common_name: &str, lifetime: Duration, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    params
}

/// A new trust anchor (self-signed root CA) named `common_name`.
pub fn new_anchor(common_name: &str, lifetime: Duration) -> Result<CertKey, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(common_name, lifetime, Some(1)).self_signed(&key)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new issuer (intermediate CA) signed by `anchor`; it may sign leaves only.
pub fn new_issuer(
    anchor: &CertKey,
    common_name: &str,
    lifetime: Duration,
) -> Result<CertKey, CaError> {
    let signer = Signer::from_pem(&anchor.cert_pem, &anchor.key_pem)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(common_name, lifetime, Some(0)).signed_by(&key, &signer.issuer)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new issuer signed by `anchor` that may only certify DNS identities under `domain` (an
/// X.509 name constraint, which rustls/webpki enforce on every chain through it): with one
/// issuer per cluster, each with its own trust domain, a cluster whose issuer is compromised
/// cannot mint another cluster's identities.
pub fn new_constrained_issuer(
    anchor: &CertKey,
    common_name: &str,
    lifetime: Duration,
    domain: &str,
) -> Result<CertKey, CaError> {
    let signer = Signer::from_pem(&anchor.cert_pem, &anchor.key_pem)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(common_name, lifetime, Some(0));
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(domain.to_owned())],
        excluded_subtrees: vec![],
    });
    let cert = params.signed_by(&key, &signer.issuer)?;
    Ok(CertKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A CA that signs certificates: an issuer, or an anchor in tests.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    cert_pem: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// A signed leaf.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub der: Vec<u8>,
    pub not_after: SystemTime,
}

impl Signer {
    /// Reads a CA certificate and its PKCS#8 key from PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Key)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::Cert)?;
        let cert_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
            .map_err(|e| CaError::Cert(rcgen::Error::PemError(e.to_string())))?;
        Ok(Self {
            issuer,
            cert_der,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// This CA's own certificate (DER): the intermediate a leaf's chain carries.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Signs a CSR (DER) for `id`. The certificate carries `id` as its only SAN whatever the
    /// request asked; a request that names anything else is refused rather than trimmed, so a
    /// confused client learns of it.
    pub fn sign_csr(&self, csr: &[u8], id: &Id, lifetime: Duration) -> Result<Leaf, CsrError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .map_err(CsrError::Malformed)?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CsrError::KeyAlgorithm);
        }
        let named: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::DnsName(n) => n.as_str().to_owned(),
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if named.iter().any(|n| n != id.as_str()) {
            return Err(CsrError::NameMismatch {
                named,
                requested: id.to_string(),
            });
        }
        let params = leaf_params(id, lifetime).map_err(CsrError::Sign)?;
        let not_after = SystemTime::now() + lifetime;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(CsrError::Sign)?;
        Ok(Leaf {
            der: signed.der().to_vec(),
            not_after,
        })
    }

    /// Issues a key and leaf for `id` directly (the identity service's own serving certificate,
    /// and tests). Returns (leaf DER, PKCS#8 key DER).
    pub fn issue(&self, id: &Id, lifetime: Duration) -> Result<(Vec<u8>, Vec<u8>), CaError> {
        let (cert, key) = self.issue_certificate(id, lifetime)?;
        Ok((cert.der().to_vec(), key.serialize_der()))
    }

    /// Like [`Signer::issue`], as PEM files: the chain (leaf, then this CA) and the PKCS#8 key,
    /// what a proxy configured from files (HAProxy, a client with `--cert`) reads.
    pub fn issue_pem(&self, id: &Id, lifetime: Duration) -> Result<CertKey, CaError> {
        let (cert, key) = self.issue_certificate(id, lifetime)?;
        Ok(CertKey {
            cert_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    fn issue_certificate(
        &self,
        id: &Id,
        lifetime: Duration,
    ) -> Result<(rcgen::Certificate, KeyPair), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(id, lifetime)?.signed_by(&key, &self.issuer)?;
        Ok((cert, key))
    }
}

fn leaf_params(id: &Id, lifetime: Duration) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![match id {
        Id::Dns(n) => SanType::DnsName(n.as_str().try_into()?),
        Id::Uri(u) => SanType::URI(u.as_str().try_into()?),
    }];
    params
        .distinguished_name
        .push(DnType::CommonName, id.as_str());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every workload is both a TLS server (inbound) and a client (outbound).
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, lifetime);
    Ok(params)
}

/// A new ECDSA P-256 key and a CSR for `id` (DER): what a workload sends to Certify.
/// Returns (CSR DER, PKCS#8 key DER).
pub fn new_csr(id: &Id) -> Result<(Vec<u8>, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![match id {
        Id::Dns(n) => SanType::DnsName(n.as_str().try_into()?),
        Id::Uri(u) => SanType::URI(u.as_str().try_into()?),
    }];
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_der()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{cert_ids, not_after};

    #[test]
    fn signs_exactly_the_requested_identity() {
        let anchor = new_anchor("root", Duration::from_secs(3600)).unwrap();
        let issuer = new_issuer(&anchor, "issuer.east", Duration::from_secs(3600)).unwrap();
        let signer = Signer::from_pem(&issuer.cert_pem, &issuer.key_pem).unwrap();
        let id = Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let (csr, _key) = new_csr(&id).unwrap();
        let leaf = signer
            .sign_csr(&csr, &id, Duration::from_secs(600))
            .unwrap();
        assert_eq!(cert_ids(&leaf.der).unwrap(), vec![id.clone()]);
        let left = not_after(&leaf.der)
            .unwrap()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(left <= Duration::from_secs(600) && left > Duration::from_secs(590));

        let other =
            Id::parse("admin.kube-system.serviceaccount.identity.linkerd.cluster.local").unwrap();
        assert!(matches!(
            signer.sign_csr(&csr, &other, Duration::from_secs(600)),
            Err(CsrError::NameMismatch { .. })
        ));
        assert!(matches!(
            signer.sign_csr(b"not a csr", &id, Duration::from_secs(600)),
            Err(CsrError::Malformed(_))
        ));
        let mut tampered = csr.clone();
        let last = tampered.len() - 3;
        tampered[last] ^= 0xff;
        assert!(
            signer
                .sign_csr(&tampered, &id, Duration::from_secs(600))
                .is_err()
        );
    }

    /// An issuer constrained to its cluster's trust domain signs whatever it is asked (as a
    /// compromised one would), but webpki refuses its certificates for another cluster's
    /// identities, while an unconstrained issuer's impostor passes.
    #[test]
    fn a_constrained_issuer_cannot_certify_another_clusters_identities() {
        crate::tls::install_default_provider();
        let anchor = new_anchor("root", Duration::from_secs(3600)).unwrap();
        let anchors = crate::TrustAnchors::from_pem(&anchor.cert_pem).unwrap();
        let constrained = new_constrained_issuer(
            &anchor,
            "identity.linkerd.west.example",
            Duration::from_secs(3600),
            "west.example",
        )
        .unwrap();
        let plain = new_issuer(
            &anchor,
            "identity.linkerd.cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap();
        let own =
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.west.example";
        let impostor =
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.example";
        // A suffix match on labels, not on characters.
        let lookalike =
            "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.evilwest.example";
        let cases = [
            (&constrained, own, true),
            (&constrained, impostor, false),
            (&constrained, lookalike, false),
            (&plain, impostor, true),
        ];
        for (issuer, id, accepted) in cases {
            let signer = Signer::from_pem(&issuer.cert_pem, &issuer.key_pem).unwrap();
            let (leaf, _key) = signer
                .issue(&Id::parse(id).unwrap(), Duration::from_secs(600))
                .unwrap();
            let result = anchors.verify(
                &rustls::pki_types::CertificateDer::from(leaf),
                &[rustls::pki_types::CertificateDer::from(
                    signer.cert_der().to_vec(),
                )],
            );
            assert_eq!(result.is_ok(), accepted, "{id}: {result:?}");
            if !accepted {
                assert!(
                    matches!(
                        result,
                        Err(rustls::Error::InvalidCertificate(
                            rustls::CertificateError::Other(_)
                        )) | Err(rustls::Error::InvalidCertificate(
                            rustls::CertificateError::NotValidForName
                                | rustls::CertificateError::NotValidForNameContext { .. }
                        ))
                    ),
                    "{id}: refused for its name: {result:?}"
                );
            }
        }
    }
}
