//! `meshlink unlink`: what removes a Link, as stubs for `kubectl delete -f -`.

use kube::{Api, Client};
use link_crd::{Link, keys};
use serde_json::{Value, json};

/// Flags of `meshlink unlink`.
#[derive(clap::Args, Debug)]
pub struct UnlinkArgs {
    /// Name of the linked (target) cluster.
    #[arg(long)]
    pub cluster_name: String,
    /// Namespace of the Link.
    #[arg(long, default_value = keys::DEFAULT_MULTICLUSTER_NAMESPACE)]
    pub namespace: String,
}

/// Why `unlink` cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum UnlinkError {
    #[error(
        "no Link {namespace}/{name} in this cluster: run unlink against the source cluster, and check --cluster-name and --namespace"
    )]
    NoLink { namespace: String, name: String },
    #[error("the cluster's API: {0}")]
    Kube(#[from] kube::Error),
}

/// The Link and its credentials Secret. Deleting the Link makes the controller remove every
/// mirror it made before the Link goes (its finalizer).
pub async fn run(args: &UnlinkArgs, client: Client) -> Result<Vec<Value>, UnlinkError> {
    let links: Api<Link> = Api::namespaced(client, &args.namespace);
    let link = links
        .get_opt(&args.cluster_name)
        .await?
        .ok_or_else(|| UnlinkError::NoLink {
            namespace: args.namespace.clone(),
            name: args.cluster_name.clone(),
        })?;
    let mut docs = vec![json!({
        "apiVersion": format!("{}/{}", link_crd::GROUP, link_crd::STORAGE_VERSION),
        "kind": "Link",
        "metadata": { "name": args.cluster_name, "namespace": args.namespace },
    })];
    if !link.spec.cluster_credentials_secret.is_empty() {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": { "name": link.spec.cluster_credentials_secret, "namespace": args.namespace },
        }));
    }
    Ok(docs)
}
