//! The client for a Link's target cluster, built from the Link's credentials Secret.
//!
//! The Secret is Linkerd's: type `mirror.linkerd.io/remote-kubeconfig`, key `kubeconfig`. Its
//! contents are credentials: they never appear in a log line or an error message.

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use link_crd::keys;

/// Why a Link's credentials cannot give a client. Each says what to fix; none carries the
/// Secret's contents.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The Secret named by `spec.clusterCredentialsSecret` does not exist.
    #[error(
        "Secret {namespace}/{name} does not exist: apply the credentials that `meshlink link` prints for this Link"
    )]
    Missing { namespace: String, name: String },
    /// The Link names no Secret.
    #[error("the Link has no spec.clusterCredentialsSecret: regenerate it with `meshlink link`")]
    Unnamed,
    /// The Secret has no `kubeconfig` key.
    #[error(
        "Secret {namespace}/{name} has no `kubeconfig` key: regenerate it with `meshlink link`"
    )]
    NoKubeconfig { namespace: String, name: String },
    /// The kubeconfig does not parse or does not name a usable context.
    #[error("the kubeconfig in Secret {namespace}/{name} is not usable: {reason}")]
    BadKubeconfig {
        namespace: String,
        name: String,
        reason: String,
    },
}

impl CredentialsError {
    /// The condition reason this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } | Self::Unnamed => "CredentialsMissing",
            Self::NoKubeconfig { .. } | Self::BadKubeconfig { .. } => "CredentialsInvalid",
        }
    }
}

/// Builds a client for the target cluster from the credentials Secret `name` (`None` when it
/// does not exist) of a Link in `namespace`.
pub async fn client_from_secret(
    namespace: &str,
    name: &str,
    secret: Option<&Secret>,
) -> Result<Client, CredentialsError> {
    if name.is_empty() {
        return Err(CredentialsError::Unnamed);
    }
    let owned = || (namespace.to_owned(), name.to_owned());
    let Some(secret) = secret else {
        let (namespace, name) = owned();
        return Err(CredentialsError::Missing { namespace, name });
    };
    let Some(data) = secret
        .data
        .as_ref()
        .and_then(|d| d.get(keys::KUBECONFIG_SECRET_KEY))
    else {
        let (namespace, name) = owned();
        return Err(CredentialsError::NoKubeconfig { namespace, name });
    };
    let bad = |reason: String| {
        let (namespace, name) = owned();
        CredentialsError::BadKubeconfig {
            namespace,
            name,
            reason,
        }
    };
    let text = std::str::from_utf8(&data.0).map_err(|_| bad("it is not UTF-8 text".into()))?;
    let kubeconfig = Kubeconfig::from_yaml(text).map_err(|e| bad(redact(&e.to_string())))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(redact(&e.to_string())))?;
    Client::try_from(config).map_err(|e| bad(redact(&e.to_string())))
}

/// What of a parser's error may be shown: its first line (the YAML parser appends the offending
/// text on later lines) with every quoted value replaced, since a value may be a token.
fn redact(error: &str) -> String {
    let first = error.lines().next().unwrap_or_default();
    let mut out = String::with_capacity(first.len());
    let mut quote: Option<char> = None;
    for c in first.chars() {
        match quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' {
                    quote = Some(c);
                }
            }
        }
    }
    if quote.is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(data: Option<&str>) -> Secret {
        Secret {
            type_: Some(keys::REMOTE_KUBECONFIG_SECRET_TYPE.into()),
            data: data.map(|d| {
                BTreeMap::from([(keys::KUBECONFIG_SECRET_KEY.to_owned(), ByteString(d.into()))])
            }),
            ..Secret::default()
        }
    }

    const TOKEN: &str = "super-secret-token-value";

    #[tokio::test]
    async fn errors_say_what_to_fix_and_never_show_credentials() {
        let cases: Vec<(Option<Secret>, &str, &str)> = vec![
            (None, "CredentialsMissing", "does not exist"),
            (
                Some(secret(None)),
                "CredentialsInvalid",
                "no `kubeconfig` key",
            ),
            (
                Some(secret(Some(&format!(
                    "users: [{{name: a, user: {{token: {TOKEN}}}}}]\nnot yaml: ["
                )))),
                "CredentialsInvalid",
                "not usable",
            ),
            (
                // Parses, but names no context to use.
                Some(secret(Some(&format!(
                    "apiVersion: v1\nkind: Config\nusers: [{{name: a, user: {{token: {TOKEN}}}}}]\n"
                )))),
                "CredentialsInvalid",
                "not usable",
            ),
        ];
        for (s, reason, text) in cases {
            let Err(err) = client_from_secret(
                "linkerd-multicluster",
                "cluster-credentials-east",
                s.as_ref(),
            )
            .await
            else {
                panic!("a client from bad credentials");
            };
            let msg = err.to_string();
            assert_eq!(err.reason(), reason, "{msg}");
            assert!(msg.contains(text), "{msg}");
            assert!(msg.contains("cluster-credentials-east"), "{msg}");
            assert!(!msg.contains(TOKEN), "credentials leaked: {msg}");
            assert!(
                !format!("{err:?}").contains(TOKEN),
                "credentials leaked: {err:?}"
            );
        }
        assert!(matches!(
            client_from_secret("ns", "", None).await,
            Err(CredentialsError::Unnamed)
        ));
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("invalid type: string \"s3cret\", expected a map\n  token: s3cret"),
            "invalid type: string \"…\", expected a map"
        );
        assert_eq!(redact("line 2: unclosed \"abc"), "line 2: unclosed \"…");
    }

    #[tokio::test]
    async fn a_valid_kubeconfig_gives_a_client() {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: east, cluster: {{server: 'https://127.0.0.1:6443'}}}}]\n\
             users: [{{name: sa, user: {{token: {TOKEN}}}}}]\n\
             contexts: [{{name: east, context: {{cluster: east, user: sa}}}}]\ncurrent-context: east\n"
        );
        let client = client_from_secret("ns", "creds", Some(&secret(Some(&kubeconfig))))
            .await
            .unwrap();
        assert_eq!(client.default_namespace(), "default");
    }
}
