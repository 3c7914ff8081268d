//! The client for a Link's target cluster, built from the Link's credentials Secret. The
//! service-mirror controller and the destination service both build their remote clients here.
//!
//! The Secret is Linkerd's: type `mirror.linkerd.io/remote-kubeconfig`, key `kubeconfig`. Its
//! contents are credentials: they never appear in a log line or an error message.
//!
//! Whoever may write such a Secret must not gain what the process reading it can do. A kubeconfig
//! can name a program to run (`exec`, `auth-provider`) or local files to read (`tokenFile`,
//! certificate, key and CA paths): honoured, they would run a program with the controller's
//! rights, or send the controller's own ServiceAccount token (a file on its disk) to a server of
//! the writer's choice. So only inline credentials are accepted ([`check_inline`]): `token`,
//! `client-certificate-data`/`client-key-data` and `certificate-authority-data`.

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
    /// The kubeconfig asks for a program to be run or a local file to be read.
    #[error("the kubeconfig in Secret {namespace}/{name} is refused: {refusal}")]
    NotInline {
        namespace: String,
        name: String,
        refusal: NotInline,
    },
}

/// A kubeconfig field that would run a program or read a file, and what to use instead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotInline {
    #[error(
        "user {user:?} uses `exec` (a program to run): only inline credentials are accepted; put a ServiceAccount token in `token` (`meshlink link` does)"
    )]
    Exec { user: String },
    #[error(
        "user {user:?} uses `auth-provider`: only inline credentials are accepted; put a ServiceAccount token in `token` (`meshlink link` does)"
    )]
    AuthProvider { user: String },
    #[error(
        "user {user:?} uses `tokenFile` (a local file): put the token itself in `token` instead"
    )]
    TokenFile { user: String },
    #[error(
        "user {user:?} uses `client-certificate` or `client-key` (local files): use `client-certificate-data` and `client-key-data` instead"
    )]
    ClientCertFile { user: String },
    #[error(
        "cluster {cluster:?} uses `certificate-authority` (a local file): use `certificate-authority-data` instead"
    )]
    CaFile { cluster: String },
}

/// Refuses a kubeconfig that would run a program or read a local file. Every user and cluster
/// entry is checked, not only the current context's, so that no later context switch can
/// reach a refused one.
pub fn check_inline(kubeconfig: &Kubeconfig) -> Result<(), NotInline> {
    for named in &kubeconfig.auth_infos {
        let user = || named.name.clone();
        let Some(info) = &named.auth_info else {
            continue;
        };
        if info.exec.is_some() {
            return Err(NotInline::Exec { user: user() });
        }
        if info.auth_provider.is_some() {
            return Err(NotInline::AuthProvider { user: user() });
        }
        if info.token_file.is_some() {
            return Err(NotInline::TokenFile { user: user() });
        }
        if info.client_certificate.is_some() || info.client_key.is_some() {
            return Err(NotInline::ClientCertFile { user: user() });
        }
    }
    for named in &kubeconfig.clusters {
        if named
            .cluster
            .as_ref()
            .is_some_and(|c| c.certificate_authority.is_some())
        {
            return Err(NotInline::CaFile {
                cluster: named.name.clone(),
            });
        }
    }
    Ok(())
}

impl CredentialsError {
    /// The condition reason this error is reported with.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing { .. } | Self::Unnamed => "CredentialsMissing",
            Self::NoKubeconfig { .. } | Self::BadKubeconfig { .. } | Self::NotInline { .. } => {
                "CredentialsInvalid"
            }
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
    check_inline(&kubeconfig).map_err(|refusal| {
        let (namespace, name) = owned();
        CredentialsError::NotInline {
            namespace,
            name,
            refusal,
        }
    })?;
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

    /// A hostile kubeconfig for each way of running a program or reading a file. None of them
    /// may act: the `exec` program would create `marker`, and the token file is this crate's
    /// own manifest (readable, so a read would succeed and be used).
    #[tokio::test]
    async fn a_hostile_kubeconfig_runs_nothing_and_reads_no_file() {
        let dir = std::env::temp_dir().join(format!("mirror-credentials-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let marker = dir.join("ran");
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let head = "apiVersion: v1\nkind: Config\ncurrent-context: east\n\
                    contexts: [{name: east, context: {cluster: east, user: sa}}]\n";
        let cluster = "clusters: [{name: east, cluster: {server: 'https://127.0.0.1:6443'}}]\n";
        let cases = [
            (
                format!(
                    "{head}{cluster}users: [{{name: sa, user: {{exec: {{apiVersion: client.authentication.k8s.io/v1, command: /bin/sh, args: ['-c', 'touch {}']}}}}}}]\n",
                    marker.display()
                ),
                "`exec`",
            ),
            (
                format!(
                    "{head}{cluster}users: [{{name: sa, user: {{auth-provider: {{name: oidc, config: {{}}}}}}}}]\n"
                ),
                "`auth-provider`",
            ),
            (
                format!("{head}{cluster}users: [{{name: sa, user: {{tokenFile: {file}}}}}]\n"),
                "`tokenFile`",
            ),
            (
                format!(
                    "{head}{cluster}users: [{{name: sa, user: {{client-certificate: {file}, client-key: {file}}}}}]\n"
                ),
                "`client-certificate`",
            ),
            (
                format!(
                    "{head}clusters: [{{name: east, cluster: {{server: 'https://127.0.0.1:6443', certificate-authority: {file}}}}}]\n\
                     users: [{{name: sa, user: {{token: {TOKEN}}}}}]\n"
                ),
                "`certificate-authority`",
            ),
            (
                // Not the current context's user: still refused.
                format!(
                    "{head}{cluster}users: [{{name: sa, user: {{token: {TOKEN}}}}}, {{name: other, user: {{tokenFile: {file}}}}}]\n"
                ),
                "`tokenFile`",
            ),
        ];
        for (kubeconfig, field) in cases {
            let Err(err) =
                client_from_secret("ns", "creds", Some(&secret(Some(&kubeconfig)))).await
            else {
                panic!("a client from a kubeconfig using {field}");
            };
            assert_eq!(err.reason(), "CredentialsInvalid");
            let msg = err.to_string();
            assert!(msg.contains(field), "{msg}");
            assert!(
                msg.contains("instead") || msg.contains("only inline"),
                "{msg}"
            );
            assert!(!msg.contains(TOKEN), "credentials leaked: {msg}");
        }
        assert!(!marker.exists(), "the exec program ran");
        let _ = std::fs::remove_dir_all(&dir);
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
