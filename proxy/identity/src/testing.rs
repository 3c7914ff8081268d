//! Certificates made on the spot for the tests of the crates built on this one (the gateway, the
//! sidecar, the control-plane clients), behind the `test-util` feature: one trust anchor, one
//! issuer, and credentials for any identity, the way the identity service would certify them.

use std::{sync::Arc, time::Duration};

use crate::{
    Credentials, Id, TrustAnchors,
    ca::{self, CertKey, Signer},
};

/// A trust anchor and an issuer under it, valid for an hour.
#[derive(Debug)]
pub struct TestPki {
    pub anchor: CertKey,
    pub issuer_pem: CertKey,
    pub issuer: Signer,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Also installs the workspace's crypto provider, which every TLS config needs.
    pub fn new() -> Self {
        crate::tls::install_default_provider();
        let anchor = ca::new_anchor("root", Duration::from_secs(3600)).expect("an anchor");
        let issuer_pem =
            ca::new_issuer(&anchor, "issuer", Duration::from_secs(3600)).expect("an issuer");
        let issuer =
            Signer::from_pem(&issuer_pem.cert_pem, &issuer_pem.key_pem).expect("the issuer's key");
        Self {
            anchor,
            issuer_pem,
            issuer,
        }
    }

    /// The trust anchors, as a workload is configured with them.
    pub fn anchors(&self) -> TrustAnchors {
        TrustAnchors::from_pem(&self.anchor.cert_pem).expect("the anchor's PEM")
    }

    /// Credentials for `id`, certified by the issuer for ten minutes.
    pub fn creds(&self, id: &str) -> Arc<Credentials> {
        let id = Id::parse(id).expect("a valid identity");
        let creds = Credentials::new(id.clone(), self.anchors());
        let (leaf, key) = self
            .issuer
            .issue(&id, Duration::from_secs(600))
            .expect("a leaf");
        creds
            .install(leaf, vec![self.issuer.cert_der().to_vec()], &key)
            .expect("a fresh leaf installs");
        creds
    }
}
