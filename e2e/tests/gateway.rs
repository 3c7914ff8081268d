//! Identity and the gateway on two real clusters. One trust anchor, an issuer per cluster (made
//! with `meshlink identity`), the identity service on each cluster running as its manifest's
//! ServiceAccount, and the gateway on `east` running as its own. A backend Pod of `east` lives
//! in a network namespace; a client in `west`'s namespace reaches it through the gateway. The
//! client's link can be cut.
//!
//! Needs root and iproute2 (network namespaces); without them the setup fails and says so.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use e2e::{
    Cluster,
    checks::Check,
    create_namespace, create_ready_pod,
    mesh::{self, GatewaySettings, IDENTITY_AUDIENCE, start_gateway, start_identity},
    meshlink::{Program, free_port, labels, service_account_token_for, workspace_binary},
    netns::Host,
    wait_for,
};
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use kube::{Api, api::PostParams};
use proxy_identity::{Credentials, Id};
use proxy_transport_header::{Header, SessionProtocol};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Mutex,
};

/// The client, `west`'s shop/web, in west's own trust domain ([`mesh::trust_domain`]).
const WEB: &str = "web.shop.serviceaccount.identity.linkerd.west.cluster.local";
/// `east`'s gateway, in east's trust domain.
const GATEWAY_ID: &str =
    "linkerd-gateway.linkerd-multicluster.serviceaccount.identity.linkerd.east.cluster.local";
const TARGET_TCP: &str = "echo.shop.svc.cluster.local:7000";
const TARGET_HTTP: &str = "echo.shop.svc.cluster.local:8080";
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    east: Cluster,
    _west: Cluster,
    dir: tempfile::TempDir,
    /// The backend Pod's network.
    _pods: Host,
    /// The client's network, linked to this host (where the gateway listens).
    client_net: Host,
    backend: std::sync::Mutex<Child>,
    /// Stopped and started again by the outage check.
    east_identity: Mutex<Program>,
    east_identity_addr: SocketAddr,
    west_identity: Program,
    west_identity_addr: SocketAddr,
    gateway: Mutex<Program>,
    gateway_addr: SocketAddr,
    admin_port: u16,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(mut b) = self.backend.lock() {
            let _ = b.kill();
            let _ = b.wait();
        }
    }
}

impl Env {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs the meshed client in `west`'s network namespace.
    fn client(&self, mode: &str, target: &str, extra: &[String]) -> Result<String> {
        let e2e = workspace_binary("e2e")?;
        let mut cmd = self.client_net.command(&e2e);
        cmd.args([
            "mesh-client",
            &format!("--identity={WEB}"),
            &format!("--identity-name={}", mesh::identity_id("west")),
            &format!("--gateway={}", self.gateway_addr),
            &format!("--gateway-identity={GATEWAY_ID}"),
            &format!("--target={target}"),
            &format!("--mode={mode}"),
        ]);
        if extra.is_empty() {
            cmd.args([
                format!(
                    "--trust-anchors-file={}",
                    self.path("anchor/ca.crt").display()
                ),
                format!("--identity-addr={}", self.west_identity_addr),
                format!("--token-file={}", self.path("web.token").display()),
            ]);
        } else {
            cmd.args(extra);
        }
        let out = cmd.stdin(Stdio::null()).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(anyhow!(
                "mesh-client {mode} failed: {}{stdout}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
}

fn main() -> ExitCode {
    let checks: &[(&str, Check<Env>)] = &[
        (
            "identities_are_certified_with_service_account_tokens",
            |e| Box::pin(certified(e)),
        ),
        (
            "opaque_http1_and_http2_from_west_through_the_east_gateway",
            |e| Box::pin(forwarding(e)),
        ),
        ("a_client_of_a_foreign_anchor_is_refused", |e| {
            Box::pin(foreign_anchor(e))
        }),
        ("west_s_issuer_cannot_speak_for_east", |e| {
            Box::pin(impersonation(e))
        }),
        ("an_unexported_service_is_refused", |e| {
            Box::pin(not_exported(e))
        }),
        (
            "admin_serves_probes_to_all_and_metrics_to_loopback_only",
            |e| Box::pin(admin(e)),
        ),
        ("a_cut_link_fails_clearly_and_recovers", |e| {
            Box::pin(partition(e))
        }),
        (
            "renewal_and_issuer_rotation_keep_the_gateway_working",
            |e| Box::pin(rotation(e)),
        ),
        (
            "a_leaf_that_expires_during_an_identity_outage_is_renewed_after_it",
            |e| Box::pin(identity_outage(e)),
        ),
        ("shutdown_drains_open_connections", |e| {
            Box::pin(shutdown(e))
        }),
    ];
    e2e::checks::run(setup, checks, |env| &env.gateway)
}

async fn setup() -> Result<Env> {
    let clusters = Cluster::start_many(&["east", "west"]).await?;
    let mut clusters = clusters.into_iter();
    let (Some(east), Some(west)) = (clusters.next(), clusters.next()) else {
        return Err(anyhow!("two clusters expected"));
    };
    let dir = tempfile::tempdir()?;
    // One anchor, an issuer per cluster, and a foreign anchor; the identity service's manifest
    // and issuer in both clusters, the gateway's manifest in east.
    mesh::make_pki(dir.path(), &["east", "west"])?;
    mesh::cli(&[
        "identity",
        "anchor",
        "--out",
        &dir.path().join("foreign-anchor").display().to_string(),
    ])?;
    for (cluster, issuer) in [(&east, "east"), (&west, "west")] {
        mesh::install_identity(cluster, dir.path(), issuer).await?;
    }
    mesh::apply_manifest(&east, "gateway/gateway.yaml").await?;

    // east: the backend Service and its Pod, whose address is in a network namespace.
    let pods = Host::create()?;
    let client_net = Host::create()?;
    let e = east.client();
    create_namespace(&e, "shop").await?;
    // `echo` is exported; `private` selects the same Pod but is not, so the gateway must refuse
    // it although it could reach it.
    for (name, labels) in [
        ("echo", json!({ "mirror.linkerd.io/exported": "true" })),
        ("private", json!({ "app": "private" })),
    ] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "selector": { "app": "echo" },
                "ports": [
                    { "name": "tcp", "port": 7000, "targetPort": 7000 },
                    { "name": "http", "port": 8080, "targetPort": 8080 },
                ],
            },
        }))?;
        Api::<Service>::namespaced(e.clone(), "shop")
            .create(&PostParams::default(), &svc)
            .await?;
    }
    create_ready_pod(
        &e,
        "shop",
        "echo-0",
        &labels(&[("app", "echo")]),
        IpAddr::V4(pods.address()),
        &east.node_name(),
    )
    .await?;
    let backend = pods
        .command(&workspace_binary("e2e")?)
        .args(["backend", "--tcp", "0.0.0.0:7000", "--http", "0.0.0.0:8080"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting the backend in its network namespace")?;

    // west: the client's ServiceAccount and its token for the identity service.
    let w = west.client();
    create_namespace(&w, "shop").await?;
    let sa: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": "web" } }))?;
    Api::<ServiceAccount>::namespaced(w.clone(), "shop")
        .create(&PostParams::default(), &sa)
        .await?;
    std::fs::write(
        dir.path().join("web.token"),
        service_account_token_for(&west, "shop", "web", IDENTITY_AUDIENCE).await?,
    )?;

    // Identity services: east's issues 10-second leaves, so the gateway renews often; west's
    // listens where the client's namespace reaches it.
    let anchors = dir.path().join("anchor/ca.crt");
    let east_identity_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let east_identity =
        start_identity(&east, east_identity_addr, &anchors, "10s", dir.path()).await?;
    let west_identity_addr = SocketAddr::new(IpAddr::V4(client_net.host_address()), free_port()?);
    let west_identity =
        start_identity(&west, west_identity_addr, &anchors, "24h", dir.path()).await?;

    let gateway_addr = SocketAddr::new(IpAddr::V4(client_net.host_address()), free_port()?);
    let admin_port = free_port()?;
    let gateway = start_gateway(
        &east,
        &GatewaySettings {
            addr: gateway_addr,
            admin: SocketAddr::from(([0, 0, 0, 0], admin_port)),
            identity_addr: east_identity_addr,
            anchors_file: anchors,
            // As its manifest runs it: two threads, connections spread over both.
            extra: vec!["--cores=2".to_owned()],
            binary: None,
        },
        dir.path(),
    )
    .await?;
    Ok(Env {
        east,
        _west: west,
        dir,
        _pods: pods,
        client_net,
        backend: std::sync::Mutex::new(backend),
        east_identity: Mutex::new(east_identity),
        east_identity_addr,
        west_identity,
        west_identity_addr,
        gateway: Mutex::new(gateway),
        gateway_addr,
        admin_port,
    })
}

/// A client of `west` certified in this process (for checks that hold a connection open).
async fn certified_client(env: &Env, id: &str, token: &Path) -> Result<Arc<Credentials>> {
    e2e::destination::certified(
        id,
        &env.path("anchor/ca.crt"),
        env.west_identity_addr,
        token,
    )
    .await
}

async fn certified(env: Arc<Env>) -> Result<()> {
    proxy_identity::tls::install_default_provider();
    // The gateway is ready only with a certificate from east's identity service.
    let gw = env.gateway.lock().await;
    ensure!(gw.get("/ready").await?.0 == 200);
    ensure!(
        gw.metric("control_identity_cert_refreshes_total", "result=\"ok\"")
            .await?
            >= 1.0
    );
    drop(gw);
    ensure!(
        env.east_identity
            .lock()
            .await
            .metric("identity_certify_requests_total", "result=\"ok\"")
            .await?
            >= 1.0
    );
    // The web ServiceAccount's token gets its own identity, and nothing else.
    certified_client(&env, WEB, &env.path("web.token")).await?;
    let err = certified_client(
        &env,
        &mesh::workload_id("db", "shop", "west"),
        &env.path("web.token"),
    )
    .await
    .err()
    .context("a token for web must not certify db")?;
    ensure!(format!("{err:#}").contains("identity mismatch"), "{err:#}");
    // A token for another audience (the API server's own) is refused.
    std::fs::write(
        env.path("wrong-audience.token"),
        e2e::meshlink::service_account_token(&env._west, "shop", "web").await?,
    )?;
    let err = certified_client(&env, WEB, &env.path("wrong-audience.token"))
        .await
        .err()
        .context("a token for another audience must be refused")?;
    ensure!(
        format!("{err:#}").contains("not issued for audience identity.l5d.io"),
        "{err:#}"
    );
    // ... before any TokenReview, by the token's own claims (counted apart from bad_token).
    for reason in ["identity_mismatch", "malformed_token"] {
        ensure!(
            env.west_identity
                .metric(
                    "identity_certify_requests_total",
                    &format!("result=\"{reason}\"")
                )
                .await?
                >= 1.0,
            "{reason} not counted"
        );
    }
    Ok(())
}

async fn forwarding(env: Arc<Env>) -> Result<()> {
    let echo = env.client("tcp", TARGET_TCP, &[])?;
    ensure!(echo == "ping", "opaque TCP echo: {echo:?}");
    for (mode, version) in [("http1", "HTTP/1.1"), ("http2", "HTTP/2.0")] {
        let out = env.client(mode, TARGET_HTTP, &[])?;
        ensure!(out.starts_with("200\n"), "{mode}: {out}");
        ensure!(out.contains(&format!("version={version}")), "{mode}: {out}");
        ensure!(
            out.contains(&format!(
                "forwarded=by={GATEWAY_ID};for={WEB};host={TARGET_HTTP};proto=https"
            )),
            "{mode}: {out}"
        );
    }
    let gw = env.gateway.lock().await;
    for protocol in ["", "http/1", "http/2"] {
        let filter = format!("session_protocol=\"{protocol}\"");
        ensure!(
            gw.metric("inbound_tcp_transport_header_connections_total", &filter)
                .await?
                >= 1.0,
            "no header connection counted with {filter}"
        );
    }
    Ok(())
}

/// Each cluster has its own trust domain and its issuer is name-constrained to it: a leaf that
/// west's issuer signs for an east workload (what a compromised west could mint) is refused by
/// east's gateway though it chains to the shared anchor, while the same issuer's leaf for a
/// west identity passes. (meshlink's own client refuses to even present the impostor, so the
/// attacker here is a bare rustls client.)
async fn impersonation(env: Arc<Env>) -> Result<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    proxy_identity::tls::install_default_provider();
    let west = proxy_identity::ca::Signer::from_pem(
        &std::fs::read_to_string(env.path("west/issuer.crt"))?,
        &std::fs::read_to_string(env.path("west/issuer.key"))?,
    )?;
    let mut roots = rustls::RootCertStore::empty();
    for anchor in CertificateDer::pem_file_iter(env.path("anchor/ca.crt"))? {
        roots.add(anchor?)?;
    }
    let header = Header {
        port: 7000,
        name: Some("echo.shop.svc.cluster.local".into()),
        protocol: None,
    };
    // Presents a leaf `west` signed for `id`; returns the echo of "ping", or why there was none.
    let present = |id: String| {
        let (west, roots, header) = (&west, roots.clone(), &header);
        let gateway = env.gateway_addr;
        async move {
            let leaf = west.issue_pem(&Id::parse(&id)?, Duration::from_secs(3600))?;
            let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
            let mut config =
                rustls::ClientConfig::builder_with_provider(proxy_identity::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, key)?;
            config.alpn_protocols = vec![proxy_transport_header::PROTOCOL.to_vec()];
            let tcp = tokio::net::TcpStream::connect(gateway).await?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from(GATEWAY_ID.to_owned())?, tcp)
                .await?;
            tls.write_all(&header.encode()).await?;
            tls.write_all(b"ping").await?;
            tls.shutdown().await?;
            let mut echo = Vec::new();
            tokio::time::timeout(WAIT, tls.read_to_end(&mut echo)).await??;
            anyhow::Ok(String::from_utf8_lossy(&echo).into_owned())
        }
    };
    let gw = env.gateway.lock().await;
    let before = gw
        .metric("gateway_refused_connections_total", "reason=\"bad_cert\"")
        .await?;
    let impostor = present(mesh::workload_id("web", "shop", "east")).await;
    ensure!(
        !matches!(&impostor, Ok(echo) if !echo.is_empty()),
        "west's issuer spoke for east: {impostor:?}"
    );
    wait_for("the impostor's refusal to be counted", WAIT, || async {
        gw.metric("gateway_refused_connections_total", "reason=\"bad_cert\"")
            .await
            .ok()
            .filter(|n| *n > before)
    })
    .await?;
    drop(gw);
    let own = present(WEB.to_owned())
        .await
        .context("west's own identity")?;
    ensure!(
        own == "ping",
        "west's own identity through east's gateway: {own:?}"
    );
    Ok(())
}

async fn foreign_anchor(env: Arc<Env>) -> Result<()> {
    // A client certificate from the foreign anchor, whose trust bundle also holds the real anchor
    // (so that it accepts the gateway and the refusal is the gateway's).
    let foreign = proxy_identity::ca::CertKey {
        cert_pem: std::fs::read_to_string(env.path("foreign-anchor/ca.crt"))?,
        key_pem: std::fs::read_to_string(env.path("foreign-anchor/ca.key"))?,
    };
    let signer = proxy_identity::ca::Signer::from_pem(&foreign.cert_pem, &foreign.key_pem)?;
    let client = signer.issue_pem(&Id::parse(WEB)?, Duration::from_secs(3600))?;
    std::fs::write(env.path("foreign.crt"), client.cert_pem)?;
    std::fs::write(env.path("foreign.key"), client.key_pem)?;
    std::fs::write(
        env.path("both-anchors.crt"),
        format!(
            "{}{}",
            foreign.cert_pem,
            std::fs::read_to_string(env.path("anchor/ca.crt"))?
        ),
    )?;
    let gw = env.gateway.lock().await;
    let before = gw
        .metric(
            "gateway_refused_connections_total",
            "reason=\"foreign_anchor\"",
        )
        .await?;
    drop(gw);
    let result = env.client(
        "tcp",
        TARGET_TCP,
        &[
            format!(
                "--trust-anchors-file={}",
                env.path("both-anchors.crt").display()
            ),
            format!("--cert={}", env.path("foreign.crt").display()),
            format!("--key={}", env.path("foreign.key").display()),
        ],
    );
    ensure!(result.is_err(), "a foreign client got through: {result:?}");
    let gw = env.gateway.lock().await;
    wait_for("the foreign_anchor refusal to be counted", WAIT, || async {
        gw.metric(
            "gateway_refused_connections_total",
            "reason=\"foreign_anchor\"",
        )
        .await
        .ok()
        .filter(|n| *n > before)
    })
    .await?;
    Ok(())
}

async fn not_exported(env: Arc<Env>) -> Result<()> {
    let refused = async || {
        env.gateway
            .lock()
            .await
            .metric(
                "gateway_refused_connections_total",
                "reason=\"not_exported\"",
            )
            .await
            .unwrap_or(0.0)
    };
    let before = refused().await;
    // The exported Service answers (the gateway reaches the Pod) ...
    let echo = env.client("tcp", TARGET_TCP, &[])?;
    ensure!(echo == "ping", "opaque TCP echo: {echo:?}");
    // ... and the unexported one in front of the same Pod does not, with its reason counted.
    for mode in ["tcp", "http1"] {
        let target = if mode == "tcp" {
            "private.shop.svc.cluster.local:7000"
        } else {
            "private.shop.svc.cluster.local:8080"
        };
        let result = env.client(mode, target, &[]);
        ensure!(
            !result.as_ref().is_ok_and(|out| out.starts_with("200")),
            "an unexported Service was reached ({mode}): {result:?}"
        );
    }
    wait_for("the not_exported refusals to be counted", WAIT, || async {
        Some(refused().await).filter(|n| *n >= before + 2.0)
    })
    .await?;
    Ok(())
}

async fn admin(env: Arc<Env>) -> Result<()> {
    // Dialled at the link address, the connection's source is not loopback: a remote client.
    let remote = SocketAddr::new(IpAddr::V4(env.client_net.host_address()), env.admin_port);
    ensure!(e2e::meshlink::http_get(remote, "/live").await?.0 == 200);
    ensure!(e2e::meshlink::http_get(remote, "/ready").await?.0 == 200);
    let (code, body) = e2e::meshlink::http_get(remote, "/metrics").await?;
    ensure!(code == 403, "remote plain /metrics: {body}");
    let local = SocketAddr::from(([127, 0, 0, 1], env.admin_port));
    let (code, body) = e2e::meshlink::http_get(local, "/metrics").await?;
    ensure!(
        code == 200 && body.contains("gateway_refused_connections"),
        "{body}"
    );
    Ok(())
}

async fn partition(env: Arc<Env>) -> Result<()> {
    env.client_net.set_link(false)?;
    let cut = env.client("tcp", TARGET_TCP, &[]);
    env.client_net.set_link(true)?;
    let err = cut.err().context("the client got through a cut link")?;
    let text = format!("{err:#}");
    ensure!(
        text.contains("connect") || text.contains("timed out") || text.contains("unreachable"),
        "the error should say the connection failed: {text}"
    );
    // Back: the same client works again.
    let echo = wait_for(
        "the client to work again after the link is restored",
        WAIT,
        || async {
            env.client("tcp", TARGET_TCP, &[])
                .ok()
                .filter(|e| e == "ping")
        },
    )
    .await?;
    ensure!(echo == "ping");
    Ok(())
}

async fn rotation(env: Arc<Env>) -> Result<()> {
    proxy_identity::tls::install_default_provider();
    // A connection held open across renewals and the rotation.
    let creds = certified_client(&env, WEB, &env.path("web.token")).await?;
    let dialer = proxy_sidecar::endpoint::Dialer::new(&creds, Duration::from_secs(3));
    let gateway_id = Id::parse(GATEWAY_ID)?;
    let header = |protocol| {
        Ok::<_, anyhow::Error>(Header {
            port: 7000,
            name: Some("echo.shop.svc.cluster.local".into()),
            protocol,
        })
    };
    let mut held = dialer
        .with_header(env.gateway_addr, &gateway_id, &header(None)?)
        .await?;
    let echo = async |s: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
                      m: &[u8]|
           -> Result<()> {
        s.write_all(m).await?;
        let mut buf = vec![0; m.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
        ensure!(buf == m, "echo {buf:?}");
        Ok(())
    };
    echo(&mut held, b"before").await?;

    let refreshes = async || {
        env.gateway
            .lock()
            .await
            .metric("control_identity_cert_refreshes_total", "result=\"ok\"")
            .await
            .unwrap_or(0.0)
    };
    // Leaves live 10 s: two renewals within 30 s.
    let start = refreshes().await;
    wait_for("two leaf renewals", WAIT, || async {
        Some(refreshes().await).filter(|n| *n >= start + 2.0)
    })
    .await?;
    echo(&mut held, b"renewed").await?;

    // Rotate east's issuer (same anchor): the Secret changes, the identity service reloads it,
    // and the gateway's next leaf comes from the new issuer.
    mesh::cli(&[
        "identity",
        "issuer",
        "--anchor",
        &env.path("anchor").display().to_string(),
        "--out",
        &env.path("east2").display().to_string(),
        "--cluster",
        "east",
    ])?;
    mesh::apply_issuer(&env.east, env.dir.path(), "east2").await?;
    wait_for(
        "east's identity service to load the new issuer",
        WAIT,
        || async {
            env.east_identity
                .lock()
                .await
                .metric("identity_issuer_reloads_total", "result=\"ok\"")
                .await
                .ok()
                .filter(|n| *n >= 2.0)
        },
    )
    .await?;
    let new_issuer = {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_file(env.path("east2/issuer.crt"))?.to_vec()
    };
    wait_for(
        "the gateway to present a leaf of the new issuer",
        WAIT,
        || async {
            let s = dialer
                .with_header(env.gateway_addr, &gateway_id, &header(None).ok()?)
                .await
                .ok()?;
            let chain = s.get_ref().1.peer_certificates()?;
            (chain.get(1).map(|c| c.to_vec()) == Some(new_issuer.clone())).then_some(())
        },
    )
    .await?;
    echo(&mut held, b"rotated").await?;
    // New connections work too, from the client's network.
    let out = env.client("http2", TARGET_HTTP, &[])?;
    ensure!(out.starts_with("200\n"), "{out}");
    Ok(())
}

/// East's identity service stops for longer than the gateway's 10 s leaf lives: the gateway
/// stops being ready when the leaf expires (readiness follows the certificate, so kubelet would
/// act), and once the service is back the gateway renews (presenting no expired certificate,
/// the token is its credential), is ready again and forwards.
async fn identity_outage(env: Arc<Env>) -> Result<()> {
    proxy_identity::tls::install_default_provider();
    let gw = env.gateway.lock().await;
    let ready = async || gw.get("/ready").await.map(|r| r.0).unwrap_or(0);
    wait_for("the gateway to be ready", WAIT, || async {
        (ready().await == 200).then_some(())
    })
    .await?;
    let mut identity = env.east_identity.lock().await;
    identity.kill();
    wait_for(
        "the gateway to stop being ready when its leaf expires",
        WAIT,
        || async { (ready().await == 503).then_some(()) },
    )
    .await?;
    // Clients refuse the expired certificate (once the clock is past its notAfter), as the
    // gateway's readiness said; from then on the identity service's verifier would refuse it
    // too, so the renewal below proves the Certify client does not present it.
    wait_for(
        "clients to refuse the gateway's expired certificate",
        WAIT,
        || async { env.client("tcp", TARGET_TCP, &[]).err() },
    )
    .await?;
    let renewed_before = gw
        .metric("control_identity_cert_refreshes_total", "result=\"ok\"")
        .await?;
    *identity = start_identity(
        &env.east,
        env.east_identity_addr,
        &env.path("anchor/ca.crt"),
        "10s",
        env.dir.path(),
    )
    .await?;
    drop(identity);
    wait_for(
        "the gateway to renew its expired leaf and be ready again",
        WAIT,
        || async { (ready().await == 200).then_some(()) },
    )
    .await?;
    let renewed_after = gw
        .metric("control_identity_cert_refreshes_total", "result=\"ok\"")
        .await?;
    ensure!(
        renewed_after > renewed_before,
        "ready again without a renewal? {renewed_before} -> {renewed_after}"
    );
    drop(gw);
    let echo = env.client("tcp", TARGET_TCP, &[])?;
    ensure!(echo == "ping", "opaque TCP echo after the outage: {echo:?}");
    Ok(())
}

async fn shutdown(env: Arc<Env>) -> Result<()> {
    proxy_identity::tls::install_default_provider();
    let creds = certified_client(&env, WEB, &env.path("web.token")).await?;
    let dialer = proxy_sidecar::endpoint::Dialer::new(&creds, Duration::from_secs(3));
    let header = Header {
        port: 8080,
        name: Some("echo.shop.svc.cluster.local".into()),
        protocol: Some(SessionProtocol::Http1),
    };
    let stream = dialer
        .with_header(env.gateway_addr, &Id::parse(GATEWAY_ID)?, &header)
        .await?;
    // An HTTP/1 connection with a request done: on SIGTERM the gateway lets it finish and
    // closes it, and exits well within its grace period (5 s here).
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let rsp = send
        .send_request(
            http::Request::builder()
                .uri("/")
                .header("host", TARGET_HTTP)
                .body(http_body_util::Empty::<bytes::Bytes>::new())?,
        )
        .await?;
    ensure!(rsp.status() == 200);
    let mut gw = env.gateway.lock().await;
    let pid = gw.pid().context("gateway not running")?;
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .context("the gateway did not close the idle HTTP/1 connection on shutdown")???;
    wait_for("the gateway to exit", Duration::from_secs(10), || async {
        gw.get("/live").await.is_err().then_some(())
    })
    .await?;
    ensure!(
        started.elapsed() < Duration::from_secs(7),
        "exit took {:?}",
        started.elapsed()
    );
    gw.kill();
    Ok(())
}
