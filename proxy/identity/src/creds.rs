//! A workload's current certificate, swapped in place: the rustls configs hold a
//! [`Credentials`] as their certificate resolver, so a renewal reaches every new handshake at
//! once while connections already open keep the keys they negotiated.

use std::{
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use crate::{Id, TrustAnchors, id::cert_ids};

/// Why a certificate was not installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("the certificate does not chain to the trust anchors or is out of date: {0}")]
    Untrusted(rustls::Error),
    #[error("the certificate names {found:?}, not this workload's identity {expected}")]
    WrongIdentity { expected: Id, found: Vec<Id> },
    #[error("the private key is unusable: {0}")]
    Key(rustls::Error),
    #[error("the certificate has no readable expiry")]
    NoExpiry,
}

/// The local identity, its trust anchors and its current certificate.
#[derive(Debug)]
pub struct Credentials {
    id: Id,
    anchors: TrustAnchors,
    current: RwLock<Option<Arc<CertifiedKey>>>,
    expiry: watch::Sender<Option<SystemTime>>,
}

impl Credentials {
    pub fn new(id: Id, anchors: TrustAnchors) -> Arc<Self> {
        Arc::new(Self {
            id,
            anchors,
            current: RwLock::new(None),
            expiry: watch::Sender::new(None),
        })
    }

    pub fn id(&self) -> &Id {
        &self.id
    }

    pub fn anchors(&self) -> &TrustAnchors {
        &self.anchors
    }

    /// Checks a certificate as Linkerd does before using it (chains to the anchors, in date,
    /// names this identity) and makes it the one new handshakes present. Returns its expiry.
    pub fn install(
        &self,
        leaf: Vec<u8>,
        intermediates: Vec<Vec<u8>>,
        key_pkcs8: &[u8],
    ) -> Result<SystemTime, InstallError> {
        let leaf = CertificateDer::from(leaf);
        let intermediates: Vec<CertificateDer<'static>> = intermediates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        self.anchors
            .verify(&leaf, &intermediates)
            .map_err(InstallError::Untrusted)?;
        let found = cert_ids(&leaf).unwrap_or_default();
        if !found.contains(&self.id) {
            return Err(InstallError::WrongIdentity {
                expected: self.id.clone(),
                found,
            });
        }
        let expiry = crate::id::not_after(&leaf).ok_or(InstallError::NoExpiry)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
        let signing = crate::tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(InstallError::Key)?;
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(certified);
        self.expiry.send_replace(Some(expiry));
        Ok(expiry)
    }

    /// The current certificate's expiry; `None` until the first one is installed.
    pub fn expiry(&self) -> Option<SystemTime> {
        *self.expiry.borrow()
    }

    /// Changes whenever a certificate is installed.
    pub fn watch(&self) -> watch::Receiver<Option<SystemTime>> {
        self.expiry.subscribe()
    }

    /// True while a certificate is held and in date: it turns false when the certificate
    /// expires without a renewal, so that readiness follows what the process can prove, not
    /// only whether it was ever certified. Spawns a task (ended when every receiver is gone).
    pub fn valid(&self) -> watch::Receiver<bool> {
        let mut expiry = self.watch();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let left = expiry
                    .borrow_and_update()
                    .and_then(|e| e.duration_since(SystemTime::now()).ok())
                    .filter(|d| !d.is_zero());
                tx.send_if_modified(|v| std::mem::replace(v, left.is_some()) != left.is_some());
                let expired = async {
                    match left {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = expiry.changed() => if r.is_err() { return },
                    () = expired => {}
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }

    pub(crate) fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for Credentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.current().is_some()
    }
}
