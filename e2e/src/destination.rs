//! The destination service in end-to-end tests: starting it as its manifest's ServiceAccount, a
//! gRPC channel to it over mTLS, and a client-side view of a `Get` stream.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use linkerd2_proxy_api::destination::{Update, WeightedAddr, update};
use proxy_identity::{Credentials, Id, TrustAnchors, certify, tls};

use crate::{
    Cluster, Error,
    mesh::{IDENTITY_AUDIENCE, identity_id, workload_id},
    meshlink::{Program, service_account_token_for},
};

/// The destination service's identity in `cluster`.
pub fn destination_id(cluster: &str) -> String {
    workload_id("linkerd-destination", "linkerd", cluster)
}

/// Starts `meshlink-destination` for `cluster` at `addr` as its ServiceAccount
/// `linkerd/linkerd-destination` (so the manifest's RBAC is what is exercised), certified by the
/// identity service at `identity_addr`; returns once it is ready (certified, every watch listed).
pub async fn start_destination(
    cluster: &Cluster,
    addr: SocketAddr,
    identity_addr: SocketAddr,
    anchors_file: &Path,
    dir: &Path,
    extra: &[String],
) -> Result<Program, Error> {
    let kubeconfig =
        crate::mesh::service_account_kubeconfig(cluster, "linkerd", "linkerd-destination", dir)
            .await?;
    let token_file = dir.join("destination.token");
    let token =
        service_account_token_for(cluster, "linkerd", "linkerd-destination", IDENTITY_AUDIENCE)
            .await?;
    std::fs::write(&token_file, token)
        .map_err(|e| Error::Invalid(format!("writing {}: {e}", token_file.display())))?;
    let mut args = vec![
        format!("--addr={addr}"),
        format!("--identity={}", destination_id(cluster.name())),
        format!("--trust-anchors-file={}", anchors_file.display()),
        format!("--identity-addr={identity_addr}"),
        format!("--identity-name={}", identity_id(cluster.name())),
        format!(
            "--trust-domain={}",
            crate::mesh::trust_domain(cluster.name())
        ),
        format!("--token-file={}", token_file.display()),
        "--min-refresh=1s".to_owned(),
    ];
    if !extra.iter().any(|a| a.starts_with("--log")) {
        args.push("--log=info,proxy_destination_service=debug".to_owned());
    }
    args.extend(extra.iter().cloned());
    Program::start(
        "meshlink-destination",
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
}

/// The identity of ServiceAccount `namespace/account` in the same cluster (trust domain) as
/// `id`.
fn beside(id: &str, account: &str, namespace: &str) -> String {
    const MARK: &str = ".serviceaccount.identity.";
    let domain = id.find(MARK).map_or(id, |i| &id[i + MARK.len()..]);
    format!("{account}.{namespace}{MARK}{domain}")
}

/// Credentials for `id`, certified by the identity service at `identity_addr` with the token in
/// `token_file`, as a workload gets them (used by the gateway and destination tests).
pub async fn certified(
    id: &str,
    anchors_file: &Path,
    identity_addr: SocketAddr,
    token_file: &Path,
) -> Result<Arc<Credentials>> {
    let anchors = std::fs::read_to_string(anchors_file)?;
    let creds = Credentials::new(Id::parse(id)?, TrustAnchors::from_pem(&anchors)?);
    let (csr, key) = proxy_identity::ca::new_csr(creds.id())?;
    certify::certify(
        &certify::Config {
            addr: identity_addr.to_string(),
            server_id: Id::parse(&beside(id, "linkerd-identity", "linkerd"))?,
            token_file: token_file.to_owned(),
            min_refresh: certify::MIN_REFRESH,
            max_refresh: certify::MAX_REFRESH,
        },
        &creds,
        &csr,
        &key,
    )
    .await?;
    Ok(creds)
}

/// A gRPC channel to the destination service at `addr` over TLS 1.3, checking its identity and
/// presenting `creds`' certificate (if it has one).
pub async fn channel(
    addr: SocketAddr,
    creds: &Arc<Credentials>,
) -> Result<tonic::transport::Channel> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls::connect(
        tls::client_config(creds, &[b"h2"]),
        tcp,
        &Id::parse(&beside(
            creds.id().as_str(),
            "linkerd-destination",
            "linkerd",
        ))?,
    )
    .await?;
    let mut io = Some(TokioIo::new(stream));
    Ok(
        tonic::transport::Endpoint::from_static("http://destination.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = io.take();
                async move { io.ok_or_else(|| std::io::Error::other("connection already used")) }
            }))
            .await?,
    )
}

/// What a client of a `Get` stream knows: the endpoints, and whether the Service exists.
#[derive(Debug)]
pub struct Followed {
    stream: tonic::Streaming<Update>,
    pub endpoints: BTreeMap<SocketAddr, WeightedAddr>,
    pub exists: Option<bool>,
    /// Every address ever removed, in order.
    pub removed: Vec<SocketAddr>,
}

impl Followed {
    /// Opens `Get(path)`.
    pub async fn get(channel: tonic::transport::Channel, path: &str) -> Result<Self> {
        let stream =
            linkerd2_proxy_api::destination::destination_client::DestinationClient::new(channel)
                .get(linkerd2_proxy_api::destination::GetDestination {
                    scheme: "k8s".into(),
                    path: path.into(),
                    context_token: String::new(),
                })
                .await?
                .into_inner();
        Ok(Self {
            stream,
            endpoints: BTreeMap::new(),
            exists: None,
            removed: Vec::new(),
        })
    }

    fn apply(&mut self, u: Update) -> Result<()> {
        match u.update.context("an empty update")? {
            update::Update::Add(set) => {
                for a in set.addrs {
                    let addr = SocketAddr::try_from(a.addr.context("an address without addr")?)?;
                    self.endpoints.insert(addr, a);
                }
                self.exists = Some(true);
            }
            update::Update::Remove(set) => {
                for a in set.addrs {
                    let addr = SocketAddr::try_from(a)?;
                    self.endpoints.remove(&addr);
                    self.removed.push(addr);
                }
            }
            update::Update::NoEndpoints(n) => {
                self.removed.extend(self.endpoints.keys().copied());
                self.endpoints.clear();
                self.exists = Some(n.exists);
            }
        }
        Ok(())
    }

    /// Reads updates until `ok` holds of what the client knows, for at most `timeout`.
    pub async fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&Self) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !ok(self) {
            let next = tokio::time::timeout_at(deadline, self.stream.message())
                .await
                .with_context(|| {
                    format!(
                        "timed out waiting for {what}; endpoints now: {:?}",
                        self.endpoints.keys().collect::<Vec<_>>()
                    )
                })??;
            match next {
                Some(u) => self.apply(u)?,
                None => bail!("the stream ended while waiting for {what}"),
            }
        }
        Ok(())
    }

    /// The next update as it comes, without applying it.
    pub async fn next_update(&mut self) -> Result<Option<Update>, tonic::Status> {
        self.stream.message().await
    }

    /// The addresses known.
    pub fn addrs(&self) -> Vec<String> {
        self.endpoints.keys().map(ToString::to_string).collect()
    }
}
