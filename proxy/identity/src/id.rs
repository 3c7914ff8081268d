//! Workload identities as Linkerd writes them: a DNS-like name
//! (`<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>`) or a SPIFFE URI, matched
//! against a certificate's DNS or URI subject alternative names.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    /// A DNS-like name, matched against DNS SANs (lower case, no trailing dot).
    Dns(String),
    /// A `spiffe://` URI, matched against URI SANs.
    Uri(String),
}

/// Why a string is not an identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidId {
    #[error("an identity cannot be empty")]
    Empty,
    #[error(
        "identity {0:?} is not a DNS name: labels of letters, digits and '-', separated by '.', no trailing dot"
    )]
    NotDns(String),
    #[error("identity {0:?} is not a spiffe:// URI with a trust domain and a path")]
    NotSpiffe(String),
}

impl Id {
    /// Parses a DNS-like identity or a `spiffe://` URI.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        if s.is_empty() {
            return Err(InvalidId::Empty);
        }
        if let Some(rest) = s.strip_prefix("spiffe://") {
            let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
            if domain.is_empty() || path.is_empty() || !is_dns_name(domain) {
                return Err(InvalidId::NotSpiffe(s.to_owned()));
            }
            return Ok(Self::Uri(s.to_owned()));
        }
        if !is_dns_name(s) {
            return Err(InvalidId::NotDns(s.to_owned()));
        }
        Ok(Self::Dns(s.to_ascii_lowercase()))
    }

    /// The identity Linkerd's identity service gives a ServiceAccount.
    pub fn service_account(
        sa: &str,
        namespace: &str,
        control_plane_namespace: &str,
        trust_domain: &str,
    ) -> Result<Self, InvalidId> {
        Self::parse(&format!(
            "{sa}.{namespace}.serviceaccount.identity.{control_plane_namespace}.{trust_domain}"
        ))
    }

    /// The control-plane namespace and trust domain of an identity [`Id::service_account`]
    /// made (`<sa>.<ns>.serviceaccount.identity.<control-plane-ns>.<trust-domain>`): where a
    /// workload's identity says the rest of its mesh's identities are issued. `None` for any
    /// other identity.
    pub fn control_plane(&self) -> Option<(&str, &str)> {
        let Self::Dns(s) = self else { return None };
        let (workload, rest) = s.split_once(".serviceaccount.identity.")?;
        // A ServiceAccount's and a namespace's names are one DNS label each.
        if workload.split('.').count() != 2 {
            return None;
        }
        rest.split_once('.')
    }

    /// The identity as text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Dns(s) | Self::Uri(s) => s,
        }
    }

    /// Whether this DNS identity is `domain` or lies under it (`a.b.c` is under `b.c`);
    /// a SPIFFE identity is under its trust domain.
    pub fn is_under(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.');
        match self {
            Self::Dns(s) => {
                s.eq_ignore_ascii_case(domain)
                    || (s.len() > domain.len()
                        && s.as_bytes()[s.len() - domain.len() - 1] == b'.'
                        && s[s.len() - domain.len()..].eq_ignore_ascii_case(domain))
            }
            Self::Uri(s) => s
                .strip_prefix("spiffe://")
                .and_then(|r| r.split('/').next())
                .is_some_and(|td| td.eq_ignore_ascii_case(domain)),
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Id {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The identities a certificate names, in SAN order (DNS and URI SANs; others are skipped).
/// `None` when the bytes are not a certificate.
pub fn cert_ids(der: &[u8]) -> Option<Vec<Id>> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let mut ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let id = match name {
                GeneralName::DNSName(n) => Id::parse(n).ok(),
                GeneralName::URI(u) => Id::parse(u).ok().filter(|i| matches!(i, Id::Uri(_))),
                _ => None,
            };
            ids.extend(id);
        }
    }
    Some(ids)
}

/// A peer's identity as Linkerd reads it: the first DNS or URI SAN of its leaf certificate.
pub fn peer_id(leaf_der: &[u8]) -> Option<Id> {
    cert_ids(leaf_der).and_then(|ids| ids.into_iter().next())
}

/// The DNS names a CA certificate's name constraints permit (empty when it has none): the
/// trust domain a cluster's issuer may certify.
pub fn permitted_dns(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(constraints)) = cert.name_constraints() else {
        return Vec::new();
    };
    constraints
        .value
        .permitted_subtrees
        .iter()
        .flatten()
        .filter_map(|subtree| match subtree.base {
            GeneralName::DNSName(name) => Some(name.to_owned()),
            _ => None,
        })
        .collect()
}

/// When the certificate stops being valid.
pub fn not_after(der: &[u8]) -> Option<std::time::SystemTime> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linkerd_identities() {
        let id = Id::service_account("web", "shop", "linkerd", "cluster.local").unwrap();
        assert_eq!(
            id.as_str(),
            "web.shop.serviceaccount.identity.linkerd.cluster.local"
        );
        assert_eq!(Id::parse("A.B").unwrap(), Id::Dns("a.b".into()));
        assert!(matches!(
            Id::parse("spiffe://example.org/ns/a/sa/b"),
            Ok(Id::Uri(_))
        ));
        for bad in [
            "",
            "a..b",
            "trailing.dot.",
            "-a.b",
            "a_b.c",
            "spiffe://",
            "spiffe://td",
            "spiffe:///p",
        ] {
            assert!(Id::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn control_plane_of_a_service_account_identity() {
        for (id, expected) in [
            (
                "web.shop.serviceaccount.identity.linkerd.cluster.local",
                Some(("linkerd", "cluster.local")),
            ),
            (
                "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.cp.east.example",
                Some(("cp", "east.example")),
            ),
            // No trust domain after the namespace, or not a ServiceAccount's.
            ("web.shop.serviceaccount.identity.linkerd", None),
            (
                "a.web.shop.serviceaccount.identity.linkerd.cluster.local",
                None,
            ),
            ("shop.serviceaccount.identity.linkerd.cluster.local", None),
            ("gateway.test", None),
            ("spiffe://cluster.local/ns/shop/sa/web", None),
        ] {
            let id = Id::parse(id).unwrap();
            assert_eq!(id.control_plane(), expected, "{id}");
        }
        // The inverse of `service_account`.
        let id = Id::service_account("web", "shop", "linkerd", "west.example").unwrap();
        assert_eq!(id.control_plane(), Some(("linkerd", "west.example")));
    }

    #[test]
    fn under_a_domain() {
        let id = Id::parse("web.shop.serviceaccount.identity.linkerd.cluster.local").unwrap();
        assert!(id.is_under("cluster.local"));
        assert!(id.is_under("linkerd.cluster.local."));
        assert!(id.is_under(id.as_str()));
        assert!(!id.is_under("r.local"), "label boundaries count");
        assert!(!id.is_under("other.local"));
        let uri = Id::parse("spiffe://example.org/ns/a/sa/b").unwrap();
        assert!(uri.is_under("example.org"));
        assert!(!uri.is_under("example.com"));
    }
}
