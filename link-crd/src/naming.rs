//! Names of the objects meshlink derives from remote ones.
//!
//! Linkerd builds these names by concatenation and never checks their length, so a name over
//! Kubernetes' limits only fails later, at the API server, as a generic "invalid" error. Here
//! every function checks the result and returns a [`NameError`] that says what is too long and by
//! how much, so the controller can report it on the Link before making any call.

/// Longest DNS-1123 label, the limit for Service and Namespace names (RFC 1123; Kubernetes'
/// `validation.DNS1123LabelMaxLength`).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest DNS name (RFC 1035 section 2.3.4; Kubernetes' `DNS1123SubdomainMaxLength`).
pub const MAX_FQDN_LEN: usize = 253;

/// Suffix of a federated Service's name.
pub const FEDERATED_SUFFIX: &str = "federated";

/// A derived name that Kubernetes would refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The result is longer than a Kubernetes object name may be.
    #[error(
        "{kind} name {name:?} is {len} characters long, over Kubernetes' limit of {max}: \
         shorten the remote Service name ({remote:?}) or the target cluster name ({cluster:?}) \
         by {over}",
        len = name.len(),
        over = name.len() - max
    )]
    TooLong {
        /// What was being named, e.g. "mirror Service".
        kind: &'static str,
        /// The name that would have been used.
        name: String,
        /// The part that came from the remote object.
        remote: String,
        /// The part that came from the cluster name.
        cluster: String,
        /// The limit it exceeds.
        max: usize,
    },
    /// A part of the name is empty, so the result would not name anything.
    #[error("cannot build a {kind} name: the {part} is empty")]
    Empty {
        /// What was being named.
        kind: &'static str,
        /// Which input was empty.
        part: &'static str,
    },
}

fn joined(
    kind: &'static str,
    remote: &str,
    suffix: &str,
    cluster: &str,
    max: usize,
) -> Result<String, NameError> {
    if remote.is_empty() {
        return Err(NameError::Empty {
            kind,
            part: "remote name",
        });
    }
    if suffix.is_empty() {
        return Err(NameError::Empty {
            kind,
            part: "cluster name",
        });
    }
    let name = format!("{remote}-{suffix}");
    if name.len() > max {
        return Err(NameError::TooLong {
            kind,
            name,
            remote: remote.to_owned(),
            cluster: cluster.to_owned(),
            max,
        });
    }
    Ok(name)
}

/// Name of the local mirror of remote Service `service` from `cluster`: `<service>-<cluster>`,
/// in the namespace of the same name as the remote one.
pub fn mirror_service_name(service: &str, cluster: &str) -> Result<String, NameError> {
    joined("mirror Service", service, cluster, cluster, MAX_LABEL_LEN)
}

/// Name of the federated Service that `service` is a member of: `<service>-federated`.
pub fn federated_service_name(service: &str) -> Result<String, NameError> {
    joined(
        "federated Service",
        service,
        FEDERATED_SUFFIX,
        "",
        MAX_LABEL_LEN,
    )
}

/// Name of the per-pod mirror of one endpoint of a headless Service: `<hostname>-<cluster>`.
pub fn endpoint_mirror_name(hostname: &str, cluster: &str) -> Result<String, NameError> {
    joined(
        "endpoint mirror Service",
        hostname,
        cluster,
        cluster,
        MAX_LABEL_LEN,
    )
}

/// The remote Service name a local mirror name stands for: `<name>` without `-<cluster>`, or
/// `None` when `local` does not end in that suffix (so it is not a mirror of `cluster`).
pub fn remote_service_name<'a>(local: &'a str, cluster: &str) -> Option<&'a str> {
    let base = local.strip_suffix(cluster)?.strip_suffix('-')?;
    (!base.is_empty()).then_some(base)
}

/// FQDN of a Service in the target cluster: `<service>.<namespace>.svc.<cluster_domain>`.
pub fn remote_service_fqdn(
    service: &str,
    namespace: &str,
    cluster_domain: &str,
) -> Result<String, NameError> {
    fqdn(&[service, namespace, "svc", cluster_domain], cluster_domain)
}

/// FQDN of one pod of a headless Service in the target cluster:
/// `<hostname>.<service>.<namespace>.svc.<cluster_domain>`.
pub fn remote_endpoint_fqdn(
    hostname: &str,
    service: &str,
    namespace: &str,
    cluster_domain: &str,
) -> Result<String, NameError> {
    fqdn(
        &[hostname, service, namespace, "svc", cluster_domain],
        cluster_domain,
    )
}

fn fqdn(parts: &[&str], cluster_domain: &str) -> Result<String, NameError> {
    const KIND: &str = "remote FQDN";
    if let Some(i) = parts.iter().position(|p| p.is_empty()) {
        let part = match parts.len() - i {
            1 => "cluster domain",
            3 => "namespace",
            4 => "service name",
            _ => "hostname",
        };
        return Err(NameError::Empty { kind: KIND, part });
    }
    let name = parts.join(".");
    if name.len() > MAX_FQDN_LEN {
        return Err(NameError::TooLong {
            kind: KIND,
            remote: parts[..parts.len() - 2].join("."),
            cluster: cluster_domain.to_owned(),
            name,
            max: MAX_FQDN_LEN,
        });
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names() {
        // (remote service, cluster, fits)
        let cases = [
            ("web".to_owned(), "east", true),
            ("web-svc".to_owned(), "us-east-1", true),
            // 58 + 1 + 4 = 63: exactly at the limit is fine.
            ("a".repeat(58), "east", true),
            // 59 + 1 + 4 = 64: one over.
            ("a".repeat(59), "east", false),
        ];
        for (svc, cluster, fits) in cases {
            let want = format!("{svc}-{cluster}");
            let got = mirror_service_name(&svc, cluster);
            if fits {
                assert_eq!(got, Ok(want));
            } else {
                assert_eq!(
                    got,
                    Err(NameError::TooLong {
                        kind: "mirror Service",
                        name: want,
                        remote: svc.clone(),
                        cluster: cluster.to_owned(),
                        max: MAX_LABEL_LEN,
                    })
                );
            }
        }
    }

    #[test]
    fn too_long_message_says_what_to_shorten() {
        let svc = "s".repeat(60);
        let err = mirror_service_name(&svc, "west").unwrap_err().to_string();
        assert!(err.contains("65 characters long"), "{err}");
        assert!(err.contains("limit of 63"), "{err}");
        assert!(err.contains("by 2"), "{err}");
        assert!(err.contains("\"west\""), "{err}");
    }

    #[test]
    fn empty_parts_are_errors() {
        assert_eq!(
            mirror_service_name("", "east"),
            Err(NameError::Empty {
                kind: "mirror Service",
                part: "remote name"
            })
        );
        assert!(matches!(
            mirror_service_name("web", ""),
            Err(NameError::Empty {
                part: "cluster name",
                ..
            })
        ));
        assert!(matches!(
            remote_service_fqdn("web", "", "cluster.local"),
            Err(NameError::Empty {
                part: "namespace",
                ..
            })
        ));
        assert!(matches!(
            remote_service_fqdn("web", "default", ""),
            Err(NameError::Empty {
                part: "cluster domain",
                ..
            })
        ));
        assert!(matches!(
            remote_endpoint_fqdn("", "web", "default", "cluster.local"),
            Err(NameError::Empty {
                part: "hostname",
                ..
            })
        ));
    }

    #[test]
    fn federated_and_endpoint_names() {
        assert_eq!(federated_service_name("web").unwrap(), "web-federated");
        assert!(federated_service_name(&"x".repeat(53)).is_ok()); // 53 + 10 = 63
        assert!(matches!(
            federated_service_name(&"x".repeat(54)),
            Err(NameError::TooLong { .. })
        ));
        assert_eq!(endpoint_mirror_name("web-0", "east").unwrap(), "web-0-east");
        assert!(matches!(
            endpoint_mirror_name(&"p".repeat(60), "east"),
            Err(NameError::TooLong {
                kind: "endpoint mirror Service",
                ..
            })
        ));
    }

    #[test]
    fn reverse_mapping() {
        let cases = [
            ("web-east", "east", Some("web")),
            ("web-svc-us-east-1", "us-east-1", Some("web-svc")),
            ("web-west", "east", None),
            // The suffix must be a whole `-<cluster>`, not just a string suffix.
            ("webeast", "east", None),
            ("-east", "east", None),
            ("east", "east", None),
        ];
        for (local, cluster, want) in cases {
            assert_eq!(remote_service_name(local, cluster), want, "{local}");
        }
        // The mapping inverts mirror_service_name.
        let name = mirror_service_name("api-v2", "eu-1").unwrap();
        assert_eq!(remote_service_name(&name, "eu-1"), Some("api-v2"));
    }

    #[test]
    fn fqdns() {
        assert_eq!(
            remote_service_fqdn("web", "shop", "cluster.local").unwrap(),
            "web.shop.svc.cluster.local"
        );
        assert_eq!(
            remote_endpoint_fqdn("web-0", "web", "shop", "example.org").unwrap(),
            "web-0.web.shop.svc.example.org"
        );
        let long = "d".repeat(250);
        assert!(matches!(
            remote_service_fqdn("web", "shop", &long),
            Err(NameError::TooLong {
                max: MAX_FQDN_LEN,
                ..
            })
        ));
    }
}
