//! What the tests share: a fixed configuration, so that the golden files do not change with the
//! crate's version.

use proxy_inject::InjectConfig;

/// A stand-in for the trust anchors: the injector checks only that it is PEM.
pub const ANCHORS: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBfakeTrustAnchorForTests\n-----END CERTIFICATE-----\n";

pub fn config() -> InjectConfig {
    InjectConfig {
        image: "ghcr.io/meshlink/meshlink:test".into(),
        proxy_version: "test".into(),
        ..InjectConfig::new("linkerd", "cluster.local", "cluster.local", ANCHORS)
    }
}
