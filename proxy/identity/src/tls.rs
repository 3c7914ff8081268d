//! TLS 1.3 configurations for meshlink's identities, with Linkerd's parameters
//! (`linkerd/rustls/src/crypto.rs`): TLS 1.3 only, AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 in
//! that order, ECDSA P-256 own keys, no client-side session resumption. Servers and clients verify
//! peers against the trust anchors and match identities against SANs, so SPIFFE URIs work.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
    client::{
        Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
    server::{ParsedCertificate, WebPkiClientVerifier},
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::{Credentials, Id, id::peer_id};

/// The one crypto provider meshlink uses: ring, restricted to Linkerd's TLS 1.3 suites and
/// key-exchange groups (less the post-quantum hybrid, which ring lacks).
pub fn provider() -> Arc<CryptoProvider> {
    let base = ring::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            ring::kx_group::X25519,
            ring::kx_group::SECP256R1,
            ring::kx_group::SECP384R1,
        ],
        ..base
    })
}

/// Installs [`provider`] as the process default; call it first in every `main`.
pub fn install_default_provider() {
    // Err means one was installed already (tests call this many times).
    let _ = Arc::unwrap_or_clone(provider()).install_default();
}

/// The roots a workload trusts: one or more anchors, so an anchor can be rotated by shipping a
/// bundle with old and new before the issuers change.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
}

/// Why a trust-anchor bundle was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "the trust anchors hold no usable certificate ({skipped} skipped): give PEM CERTIFICATE blocks of the shared root CA"
)]
pub struct NoAnchors {
    skipped: usize,
}

impl TrustAnchors {
    /// Reads PEM certificates; invalid ones are skipped with a warning (as Linkerd does), and at
    /// least one must be usable.
    pub fn from_pem(pem: &str) -> Result<Self, NoAnchors> {
        let mut roots = RootCertStore::empty();
        let mut skipped = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            match cert
                .map_err(|e| e.to_string())
                .and_then(|c| roots.add(c).map_err(|e| e.to_string()))
            {
                Ok(()) => {}
                Err(error) => {
                    skipped += 1;
                    tracing::warn!(%error, "skipping an invalid trust anchor");
                }
            }
        }
        if roots.is_empty() {
            return Err(NoAnchors { skipped });
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    /// How many anchors the bundle holds.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// Whether the bundle is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    pub(crate) fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// Checks that `leaf` (with `intermediates`) chains to an anchor and is in date now.
    pub fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        let parsed = ParsedCertificate::try_from(leaf)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            UnixTime::now(),
            algorithms().all,
        )
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    ring::default_provider().signature_verification_algorithms
}

/// A TLS 1.3 server config presenting `creds`' current certificate. Client certificates are
/// verified against the anchors but optional at the TLS layer, so that the caller can tell "no
/// client certificate" apart from other failures and refuse it with that reason.
pub fn server_config(creds: &Arc<Credentials>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(creds.anchors().roots().clone(), provider())
            .allow_unauthenticated()
            .build()
            .expect("a non-empty root store always builds a verifier");
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(creds.clone());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Session tickets would let a resumed client skip presenting its certificate to a config
    // whose anchors have since changed; every connection does a full handshake, as in Linkerd.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// A TLS 1.3 client config that presents `creds`' certificate (when it has one) and verifies
/// the server's chain against the anchors; [`connect`] then checks the server's identity.
pub fn client_config(creds: &Arc<Credentials>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_with(creds, creds.clone(), alpn)
}

/// The client config of a Certify call: it presents the current certificate only while it is
/// in date. The ServiceAccount token is Certify's credential; a certificate that expired during
/// an identity-service outage would only make the service's verifier refuse the handshake, and
/// every renewal with it, for ever.
pub fn certify_client_config(creds: &Arc<Credentials>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    client_config_with(creds, Arc::new(InDate(creds.clone())), alpn)
}

/// Presents the certificate of the credentials only while it is in date.
#[derive(Debug)]
struct InDate(Arc<Credentials>);

/// Whether a certificate that expires at `expiry` may still be presented at `now` (with a
/// second's margin for the time the handshake takes to reach the verifier).
fn presentable(expiry: Option<std::time::SystemTime>, now: std::time::SystemTime) -> bool {
    expiry.is_some_and(|e| e > now + std::time::Duration::from_secs(1))
}

impl rustls::client::ResolvesClientCert for InDate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        if presentable(self.0.expiry(), std::time::SystemTime::now()) {
            self.0.current()
        } else {
            None
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn client_config_with(
    creds: &Arc<Credentials>,
    resolver: Arc<dyn rustls::client::ResolvesClientCert>,
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnchorVerifier {
            roots: creds.anchors().roots().clone(),
        }))
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

/// Verifies a server's chain against the anchors without rustls's DNS-name check: the identity
/// (DNS or URI SAN) is checked by [`connect`] after the handshake, as Linkerd does.
#[derive(Debug)]
struct AnchorVerifier {
    roots: Arc<RootCertStore>,
}

impl ServerCertVerifier for AnchorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs are TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Why a TLS connection to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS handshake with {expected}: {source}")]
    Handshake {
        expected: Id,
        #[source]
        source: std::io::Error,
    },
    #[error("the server presented {found:?}, not the expected identity {expected}")]
    WrongIdentity { expected: Id, found: Vec<Id> },
    #[error("no SNI can be made for identity {0}")]
    ServerName(Id),
}

/// The SNI a client sends to reach `id`: the DNS identity itself, or a SPIFFE id's trust domain.
pub fn server_name(id: &Id) -> Option<ServerName<'static>> {
    let name = match id {
        Id::Dns(n) => n.as_str(),
        Id::Uri(u) => u
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())?,
    };
    ServerName::try_from(name.to_owned()).ok()
}

/// Opens TLS over `io` to the peer `expected` and checks that the certificate it presented
/// names that identity among its SANs.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    io: IO,
    expected: &Id,
) -> Result<TlsStream<IO>, ConnectError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let sni = server_name(expected).ok_or_else(|| ConnectError::ServerName(expected.clone()))?;
    let tls = TlsConnector::from(config)
        .connect(sni, io)
        .await
        .map_err(|source| ConnectError::Handshake {
            expected: expected.clone(),
            source,
        })?;
    let found = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| crate::id::cert_ids(leaf))
        .unwrap_or_default();
    if !found.contains(expected) {
        return Err(ConnectError::WrongIdentity {
            expected: expected.clone(),
            found,
        });
    }
    Ok(tls)
}

/// The client identity of an accepted TLS connection (first SAN of the leaf), if it presented a
/// certificate (which the verifier chained to the anchors).
pub fn client_id(conn: &rustls::ServerConnection) -> Option<Id> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| peer_id(leaf))
}

/// What went wrong with a peer's certificate, as a short stable reason (for metric labels).
pub fn certificate_reason(error: &rustls::Error) -> Option<&'static str> {
    match error {
        rustls::Error::InvalidCertificate(e) => Some(match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired_cert",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "cert_not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "foreign_anchor",
            _ => "bad_cert",
        }),
        rustls::Error::NoCertificatesPresented => Some("no_client_cert"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn only_an_in_date_certificate_is_presented_to_certify() {
        use std::time::{Duration, SystemTime};
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (expiry, presented) in [
            (None, false),
            (Some(now + Duration::from_secs(3600)), true),
            (Some(now + Duration::from_secs(2)), true),
            (Some(now + Duration::from_millis(500)), false),
            (Some(now), false),
            (Some(now - Duration::from_secs(60)), false),
        ] {
            assert_eq!(presentable(expiry, now), presented, "{expiry:?}");
        }
    }
    use crate::ca;

    fn creds(signer: &ca::Signer, anchor: &ca::CertKey, id: &str) -> Arc<Credentials> {
        let id = Id::parse(id).unwrap();
        let creds = Credentials::new(
            id.clone(),
            TrustAnchors::from_pem(&anchor.cert_pem).unwrap(),
        );
        let (leaf, key) = signer.issue(&id, Duration::from_secs(600)).unwrap();
        creds
            .install(leaf, vec![signer.cert_der().to_vec()], &key)
            .unwrap();
        creds
    }

    /// A TLS 1.3 exchange between two identities; `expected` is what the client insists on.
    async fn exchange(
        server_id: &str,
        client_id: &str,
        expected: &str,
    ) -> Result<Option<Id>, ConnectError> {
        install_default_provider();
        let anchor = ca::new_anchor("root", Duration::from_secs(600)).unwrap();
        let issuer = ca::new_issuer(&anchor, "issuer", Duration::from_secs(600)).unwrap();
        let signer = ca::Signer::from_pem(&issuer.cert_pem, &issuer.key_pem).unwrap();
        let server = creds(&signer, &anchor, server_id);
        let client = creds(&signer, &anchor, client_id);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&server, &[b"x"]));
        let served = tokio::spawn(async move {
            let mut tls = acceptor.accept(b).await.ok()?;
            let peer = client_id_of(&tls);
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(&buf).await.ok()?;
            tls.shutdown().await.ok()?;
            peer
        });
        let mut tls = connect(
            client_config(&client, &[b"x"]),
            a,
            &Id::parse(expected).unwrap(),
        )
        .await?;
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        tls.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        Ok(served.await.unwrap())
    }

    fn client_id_of(tls: &tokio_rustls::server::TlsStream<tokio::io::DuplexStream>) -> Option<Id> {
        client_id(tls.get_ref().1)
    }

    #[tokio::test]
    async fn mutual_tls_names_both_sides() {
        let gw = "gw.mc.serviceaccount.identity.linkerd.cluster.local";
        let web = "web.shop.serviceaccount.identity.linkerd.cluster.local";
        assert_eq!(
            exchange(gw, web, gw).await.unwrap(),
            Some(Id::parse(web).unwrap())
        );
        // SPIFFE identities work on both sides too.
        let spiffe_server = "spiffe://cluster.local/ns/mc/sa/gw";
        let spiffe_client = "spiffe://cluster.local/ns/shop/sa/web";
        assert_eq!(
            exchange(spiffe_server, spiffe_client, spiffe_server)
                .await
                .unwrap(),
            Some(Id::parse(spiffe_client).unwrap())
        );
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let err = exchange(
            "db.shop.serviceaccount.identity.linkerd.cluster.local",
            "web.shop.serviceaccount.identity.linkerd.cluster.local",
            "gw.mc.serviceaccount.identity.linkerd.cluster.local",
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ConnectError::WrongIdentity { .. }), "{err}");
    }
}
