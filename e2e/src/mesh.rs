//! The data plane in end-to-end tests and the gateway benchmark: the backend a test Service
//! points at, a meshed client that dials a gateway as a Linkerd proxy would, and starting the
//! identity service and the gateway with the ServiceAccounts and RBAC of `manifests/`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_identity::{Credentials, Id, TrustAnchors, certify};
use proxy_sidecar::endpoint::Dialer;
use proxy_transport_header::{Header, SessionProtocol};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{
    Cluster, Error,
    meshlink::{Program, service_account_token, service_account_token_for, workspace_binary},
};

/// The audience of the tokens workloads send to the identity service (Linkerd's).
pub const IDENTITY_AUDIENCE: &str = "identity.l5d.io";
/// A test cluster's own trust domain, `<cluster>.cluster.local`, as `meshlink identity issuer
/// --cluster` gives it: the cluster's issuer is name-constrained to it, so it cannot certify
/// another cluster's workloads, and a Link's gateway identity is unique per cluster.
pub fn trust_domain(cluster: &str) -> String {
    format!("{cluster}.cluster.local")
}

/// The identity of ServiceAccount `namespace/account` of `cluster` (Linkerd's form, with the
/// control plane in `linkerd`).
pub fn workload_id(account: &str, namespace: &str, cluster: &str) -> String {
    format!(
        "{account}.{namespace}.serviceaccount.identity.linkerd.{}",
        trust_domain(cluster)
    )
}

/// The gateway's identity in `cluster`.
pub fn gateway_id(cluster: &str) -> String {
    workload_id("linkerd-gateway", "linkerd-multicluster", cluster)
}

/// The identity service's own identity in `cluster`.
pub fn identity_id(cluster: &str) -> String {
    workload_id("linkerd-identity", "linkerd", cluster)
}

/// The test backend: `tcp` echoes every byte until the client half-closes, then closes (so an
/// answer that ends proves the half-close went through); `http` answers HTTP/1 and HTTP/2 with
/// the version it saw and the `host` and `forwarded` headers it got.
pub async fn serve_backend(tcp: SocketAddr, http: SocketAddr) -> std::io::Result<()> {
    let tcp = TcpListener::bind(tcp).await?;
    let http = TcpListener::bind(http).await?;
    let echo = async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    };
    let web = async move {
        loop {
            let Ok((s, _)) = http.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                        let h = |k: &str| {
                            req.headers()
                                .get(k)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned()
                        };
                        let body = format!(
                            "version={:?}\nhost={}\nforwarded={}\n",
                            req.version(),
                            h("host"),
                            h("forwarded")
                        );
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    };
    tokio::join!(echo, web);
    Ok(())
}

/// What a meshed client does.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Tcp,
    Http1,
    Http2,
}

/// A meshed client: gets a certificate (from an identity service, or from files), dials a
/// gateway, and makes one exchange with the target behind it.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// This client's identity.
    #[arg(long)]
    pub identity: Id,
    /// PEM file of the trust anchors.
    #[arg(long)]
    pub trust_anchors_file: PathBuf,
    /// The identity service (`host:port`); with --identity-name and --token-file.
    #[arg(long)]
    pub identity_addr: Option<String>,
    #[arg(long)]
    pub identity_name: Id,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Instead of an identity service: a PEM certificate chain (leaf first) and its PKCS#8 key.
    #[arg(long, conflicts_with = "identity_addr", requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The gateway's address and identity.
    #[arg(long)]
    pub gateway: SocketAddr,
    #[arg(long)]
    pub gateway_identity: Id,
    /// The target `name:port`, as a mirror's authority override names it.
    #[arg(long)]
    pub target: String,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// What a TCP exchange sends.
    #[arg(long, default_value = "ping")]
    pub message: String,
}

/// Runs one exchange; returns what came back (TCP: the echo; HTTP: `<status>\n<body>`).
pub async fn mesh_client(args: ClientArgs) -> Result<String> {
    let anchors = std::fs::read_to_string(&args.trust_anchors_file)
        .with_context(|| format!("reading {}", args.trust_anchors_file.display()))?;
    let creds = Credentials::new(args.identity.clone(), TrustAnchors::from_pem(&anchors)?);
    match (&args.identity_addr, &args.cert) {
        (Some(addr), _) => {
            let token_file = args
                .token_file
                .clone()
                .context("--identity-addr needs --token-file")?;
            let config = certify::Config {
                addr: addr.clone(),
                server_id: args.identity_name.clone(),
                token_file,
                min_refresh: certify::MIN_REFRESH,
                max_refresh: certify::MAX_REFRESH,
            };
            let (csr, key) = proxy_identity::ca::new_csr(creds.id())?;
            certify::certify(&config, &creds, &csr, &key)
                .await
                .context("certify")?;
        }
        (None, Some(cert)) => {
            let key = args.key.as_ref().context("--cert needs --key")?;
            install_files(&creds, cert, key)?;
        }
        (None, None) => bail!("give --identity-addr and --token-file, or --cert and --key"),
    }
    exchange(&creds, &args).await
}

fn install_files(creds: &Credentials, cert: &Path, key: &Path) -> Result<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<Vec<u8>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        bail!("{} holds no certificate", cert.display());
    };
    let PrivateKeyDer::Pkcs8(key) = PrivateKeyDer::from_pem_file(key)? else {
        bail!("{} is not a PKCS#8 key", key.display());
    };
    creds.install(leaf.clone(), intermediates.to_vec(), key.secret_pkcs8_der())?;
    Ok(())
}

async fn exchange(creds: &Arc<Credentials>, args: &ClientArgs) -> Result<String> {
    let (name, port) = args
        .target
        .rsplit_once(':')
        .context("--target is name:port")?;
    let protocol = match args.mode {
        Mode::Tcp => None,
        Mode::Http1 => Some(SessionProtocol::Http1),
        Mode::Http2 => Some(SessionProtocol::Http2),
    };
    let header = Header {
        port: port.parse().context("--target port")?,
        name: Some(name.to_owned()),
        protocol,
    };
    let dialer = Dialer::new(creds, Duration::from_secs(3));
    let mut stream = dialer
        .with_header(args.gateway, &args.gateway_identity, &header)
        .await?;
    let exchange = async {
        match protocol {
            None => {
                stream.write_all(args.message.as_bytes()).await?;
                stream.shutdown().await?;
                let mut out = String::new();
                stream.read_to_string(&mut out).await?;
                Ok(out)
            }
            Some(p) => http_get(stream, p, &args.target).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("no answer within 10 s")?
}

/// One GET over an established stream.
pub async fn http_get<IO>(io: IO, protocol: SessionProtocol, authority: &str) -> Result<String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let req = http::Request::builder().uri(format!("http://{authority}/"));
    let rsp = match protocol {
        SessionProtocol::Http1 => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            send.send_request(
                req.header("host", authority)
                    .body(Full::new(Bytes::new()))?,
            )
            .await?
        }
        SessionProtocol::Http2 => {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            send.send_request(
                req.version(http::Version::HTTP_2)
                    .body(Full::new(Bytes::new()))?,
            )
            .await?
        }
    };
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok(format!("{status}\n{}", String::from_utf8_lossy(&body)))
}

/// `meshlink <args>` (the CLI of this workspace); its output, or an error with its stderr.
pub fn cli(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(crate::meshlink::workspace_binary("meshlink")?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running meshlink")?;
    if !out.status.success() {
        bail!(
            "meshlink {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A trust anchor in `dir/anchor` and an issuer signed by it in `dir/<cluster>` for each of
/// `clusters`, made by `meshlink identity` as a user makes them: each issuer constrained to its
/// cluster's own trust domain ([`trust_domain`]).
pub fn make_pki(dir: &Path, clusters: &[&str]) -> Result<()> {
    for args in pki_commands(dir, clusters) {
        cli(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// The `meshlink` commands that make the trust anchor in `<dir>/anchor` and an issuer per
/// cluster in `<dir>/<cluster>`, constrained to the cluster's own trust domain.
pub fn pki_commands(dir: &Path, clusters: &[&str]) -> Vec<Vec<String>> {
    let d = |p: &str| dir.join(p).display().to_string();
    let mut commands = vec![vec![
        "identity".to_owned(),
        "anchor".to_owned(),
        "--out".to_owned(),
        d("anchor"),
    ]];
    for cluster in clusters {
        commands.push(vec![
            "identity".to_owned(),
            "issuer".to_owned(),
            "--anchor".to_owned(),
            d("anchor"),
            "--out".to_owned(),
            d(cluster),
            "--cluster".to_owned(),
            (*cluster).to_owned(),
            "--trust-domain".to_owned(),
            trust_domain(cluster),
        ]);
    }
    commands
}

/// Applies `manifests/<path>` to `cluster`.
pub async fn apply_manifest(cluster: &Cluster, path: &str) -> Result<()> {
    let path = manifests_dir().join(path);
    let yaml =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    crate::apply_yaml(&cluster.client(), &yaml).await?;
    Ok(())
}

/// Applies what `meshlink identity manifests` prints for issuer `dir/<issuer>` and the anchor
/// `dir/anchor` (the issuer Secret, the trust roots): how an issuer is installed or rotated.
pub async fn apply_issuer(cluster: &Cluster, dir: &Path, issuer: &str) -> Result<()> {
    let yaml = cli(&[
        "identity",
        "manifests",
        "--issuer",
        &dir.join(issuer).display().to_string(),
        "--anchors",
        &dir.join("anchor/ca.crt").display().to_string(),
    ])?;
    crate::apply_yaml(&cluster.client(), &yaml).await?;
    Ok(())
}

/// The identity service's manifest and issuer `dir/<issuer>` in `cluster`.
pub async fn install_identity(cluster: &Cluster, dir: &Path, issuer: &str) -> Result<()> {
    apply_manifest(cluster, "identity/identity.yaml").await?;
    apply_issuer(cluster, dir, issuer).await
}

/// The repository's `manifests/` directory.
pub fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Writes a kubeconfig that authenticates as ServiceAccount `namespace/name` of `cluster` (so a
/// program runs with exactly the RBAC the manifests give that account) and returns its path.
pub async fn service_account_kubeconfig(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<PathBuf, Error> {
    let token = service_account_token(cluster, namespace, name).await?;
    let path = dir.join(format!("{}-{namespace}-{name}.kubeconfig", cluster.name()));
    std::fs::write(&path, cluster.kubeconfig_for_token(name, &token))
        .map_err(|e| Error::Invalid(format!("writing {}: {e}", path.display())))?;
    Ok(path)
}

/// Starts `meshlink-identity` for `cluster` as its ServiceAccount `linkerd/linkerd-identity`.
pub async fn start_identity(
    cluster: &Cluster,
    addr: SocketAddr,
    anchors_file: &Path,
    leaf_lifetime: &str,
    dir: &Path,
) -> Result<Program, Error> {
    let kubeconfig =
        service_account_kubeconfig(cluster, "linkerd", "linkerd-identity", dir).await?;
    Program::start(
        "meshlink-identity",
        &[
            format!("--addr={addr}"),
            format!("--trust-anchors={}", anchors_file.display()),
            format!("--leaf-lifetime={leaf_lifetime}"),
            format!("--trust-domain={}", trust_domain(cluster.name())),
            "--log=info".to_owned(),
        ],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    )
    .await
}

/// Where a gateway listens and gets its identity.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub addr: SocketAddr,
    /// The admin server's bind address (it is polled on loopback at the same port).
    pub admin: SocketAddr,
    pub identity_addr: SocketAddr,
    pub anchors_file: PathBuf,
    pub extra: Vec<String>,
    /// The executable to run; the workspace's build of `meshlink-gateway` when `None`.
    pub binary: Option<PathBuf>,
}

/// Starts `meshlink-gateway` for `cluster` as its ServiceAccount
/// `linkerd-multicluster/linkerd-gateway`, with that account's token for the identity service in
/// `dir/gateway.token`; returns once it is ready (certified, synced).
pub async fn start_gateway(
    cluster: &Cluster,
    settings: &GatewaySettings,
    dir: &Path,
) -> Result<Program, Error> {
    let kubeconfig =
        service_account_kubeconfig(cluster, "linkerd-multicluster", "linkerd-gateway", dir).await?;
    let token_file = dir.join("gateway.token");
    let token = service_account_token_for(
        cluster,
        "linkerd-multicluster",
        "linkerd-gateway",
        IDENTITY_AUDIENCE,
    )
    .await?;
    std::fs::write(&token_file, token)
        .map_err(|e| Error::Invalid(format!("writing {}: {e}", token_file.display())))?;
    let mut args = vec![
        format!("--addr={}", settings.addr),
        format!("--identity={}", gateway_id(cluster.name())),
        format!("--trust-anchors-file={}", settings.anchors_file.display()),
        format!("--identity-addr={}", settings.identity_addr),
        format!("--identity-name={}", identity_id(cluster.name())),
        format!("--token-file={}", token_file.display()),
        "--min-refresh=1s".to_owned(),
        "--shutdown-grace-period=5s".to_owned(),
        "--log=info".to_owned(),
    ];
    args.extend(settings.extra.iter().cloned());
    let binary = match &settings.binary {
        Some(path) => path.clone(),
        None => workspace_binary("meshlink-gateway")?,
    };
    Program::start_path_with_admin(
        "meshlink-gateway",
        binary,
        &args,
        &[("KUBECONFIG", kubeconfig.display().to_string())],
        settings.admin,
    )
    .await
}
