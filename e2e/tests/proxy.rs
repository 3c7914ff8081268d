//! `meshlink-proxy` as the sidecar of Pods on two real clusters. Each cluster runs its identity
//! and destination services (as their manifests' ServiceAccounts, on a veth address that Pods
//! reach); `east` runs the gateway and exports `web`; `west` runs the service-mirror controller,
//! linked to `east`. Every Pod is a network namespace with `meshlink-proxy init`'s iptables
//! rules, the proxy as uid 2102 and an unmodified app ([`e2e::pod`]): curl and plain clients call
//! ClusterIPs, and the proxies do the rest.
//!
//! Needs root, iproute2, iptables, curl and setpriv; without them the setup fails and says so.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{ExitCode, Stdio},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use e2e::{
    Cluster,
    app::{LoopRequest, now_ms},
    checks::Check,
    create_namespace,
    destination::{Followed, certified, channel},
    mesh::{self, GatewaySettings, IDENTITY_AUDIENCE, gateway_id, start_gateway, workload_id},
    meshlink::{
        Program, apply_link, free_port, put_credentials, remote_access_kubeconfig,
        service_account_token_for, start_mirror, workspace_binary,
    },
    netns::{Forwarding, Host},
    pod::{
        ControlPlane, DEFAULT_INBOUND_POLICY_ANNOTATION, MeshedPod, Metrics,
        OPAQUE_PORTS_ANNOTATION, PodSpec, curl, exec_in, unmeshed_host, wait_metric,
    },
    wait_for,
};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::{io::AsyncBufReadExt, sync::Mutex};

const NS: &str = "shop";
const MC_NS: &str = "linkerd-multicluster";
const WAIT: Duration = Duration::from_secs(30);
/// The app's server-speaks-first port, annotated opaque on the Pod and the Service.
const BANNER_PORT: u16 = 5432;
/// How long after the test's own destination stream saw an endpoint removed the proxy (which
/// gets the same update from the same server at the same moment) may still send it a request
/// that it had already routed: one scheduling delay of a loaded machine, not a discovery delay.
const REMOVAL_GRACE_MS: u128 = 1_000;

struct Env {
    east: Cluster,
    west: Cluster,
    dir: tempfile::TempDir,
    east_cp: ControlPlane,
    west_cp: ControlPlane,
    gateway: Mutex<Program>,
    _mirror: Program,
    /// east: web-0 (exported `web`, HTTP and the opaque banner port).
    web: MeshedPod,
    /// east: echo-0 and echo-1 (`echo`), for readiness.
    echo: [MeshedPod; 2],
    /// east: locked-0, whose default inbound policy is all-authenticated.
    locked: MeshedPod,
    /// east's and west's client Pods.
    east_client: MeshedPod,
    west_client: MeshedPod,
    /// A host with no proxy.
    unmeshed: Host,
    /// The control plane's veth address (the other end is an empty namespace).
    _cp_net: Host,
    _forwarding: Forwarding,
}

impl Env {
    fn logs(&self) -> String {
        let mut s = String::new();
        for p in self.pods() {
            s.push_str(&format!(
                "--- {} proxy log ({}):\n{}\n",
                p.spec.name,
                p.proxy_log().display(),
                p.proxy_log_tail()
            ));
        }
        s
    }

    fn pods(&self) -> Vec<&MeshedPod> {
        vec![
            &self.web,
            &self.echo[0],
            &self.echo[1],
            &self.locked,
            &self.east_client,
            &self.west_client,
        ]
    }
}

fn main() -> ExitCode {
    let checks: &[(&str, Check<Env>)] = &[
        ("every_pod_is_certified_and_redirected", |e| {
            Box::pin(with_logs(e, started))
        }),
        ("http1_to_a_cluster_ip_is_mutual_tls", |e| {
            Box::pin(with_logs(e, http1))
        }),
        ("http2_prior_knowledge_grpc_style", |e| {
            Box::pin(with_logs(e, http2))
        }),
        ("opaque_server_speaks_first", |e| {
            Box::pin(with_logs(e, opaque))
        }),
        ("default_inbound_policy_for_unmeshed_clients", |e| {
            Box::pin(with_logs(e, policy))
        }),
        ("west_reaches_east_through_the_gateway_http", |e| {
            Box::pin(with_logs(e, multicluster_http))
        }),
        ("west_reaches_east_through_the_gateway_opaque_tcp", |e| {
            Box::pin(with_logs(e, multicluster_opaque))
        }),
        ("an_unready_pod_stops_receiving_without_failures", |e| {
            Box::pin(with_logs(e, readiness))
        }),
    ];
    e2e::checks::run(setup, checks, |env| &env.gateway)
}

/// Runs `check`; a failure carries the proxies' log tails.
async fn with_logs<F, Fut>(env: Arc<Env>, check: F) -> Result<()>
where
    F: FnOnce(Arc<Env>) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    match check(env.clone()).await {
        Ok(()) => Ok(()),
        Err(e) => Err(anyhow!("{e:#}\n{}", env.logs())),
    }
}

async fn setup() -> Result<Env> {
    proxy_identity::tls::install_default_provider();
    let clusters = Cluster::start_many(&["east", "west"]).await?;
    let mut clusters = clusters.into_iter();
    let (Some(east), Some(west)) = (clusters.next(), clusters.next()) else {
        return Err(anyhow!("two clusters expected"));
    };
    let (e, w) = (east.client(), west.client());
    let dir = tempfile::tempdir()?;
    mesh::make_pki(dir.path(), &["east", "west"])?;
    let forwarding = Forwarding::enable()?;
    // The control plane listens on this host's end of a veth: not loopback, reachable from
    // every Pod.
    let cp_net = Host::create()?;
    let cp_ip = cp_net.host_address();
    let (east_cp, west_cp) = tokio::try_join!(
        ControlPlane::start(&east, dir.path(), cp_ip),
        ControlPlane::start(&west, dir.path(), cp_ip),
    )?;

    // east: the gateway, and the Services.
    mesh::apply_manifest(&east, "gateway/gateway.yaml").await?;
    let gateway = start_gateway(
        &east,
        &GatewaySettings {
            addr: SocketAddr::new(IpAddr::V4(cp_ip), 4143),
            // Polled (and its /metrics read) on loopback.
            admin: SocketAddr::from(([0, 0, 0, 0], free_port()?)),
            identity_addr: east_cp.identity_addr,
            anchors_file: dir.path().join("anchor/ca.crt"),
            extra: Vec::new(),
            binary: None,
        },
        dir.path(),
    )
    .await?;
    create_namespace(&e, NS).await?;
    create_namespace(&w, NS).await?;
    let opaque = BANNER_PORT.to_string();
    apply(
        &e,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web",
                "labels": { "mirror.linkerd.io/exported": "true" },
                "annotations": { OPAQUE_PORTS_ANNOTATION: opaque },
            },
            "spec": { "selector": { "app": "web" }, "ports": [
                { "name": "http", "port": 80, "targetPort": 8080 },
                { "name": "banner", "port": BANNER_PORT, "targetPort": BANNER_PORT },
            ] },
        }),
    )
    .await?;
    apply(
        &e,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "echo" },
            "spec": { "selector": { "app": "echo" }, "ports": [
                { "name": "http", "port": 80, "targetPort": 8080 },
            ] },
        }),
    )
    .await?;

    // west: linked to east, with the mirror controller.
    create_namespace(&w, MC_NS).await?;
    let kubeconfig = remote_access_kubeconfig(&east, MC_NS).await?;
    put_credentials(&west, MC_NS, "east", &kubeconfig).await?;
    apply_link(
        &w,
        MC_NS,
        "east",
        &cp_ip.to_string(),
        json!({ "gatewayIdentity": gateway_id("east"), "gatewayPort": "4143" }),
    )
    .await?;
    let mirror = start_mirror(west.kubeconfig_path(), &[format!("--namespace={MC_NS}")]).await?;

    // The Pods.
    let web = PodSpec::new(NS, "web-0", "web", "web")
        .banner(BANNER_PORT)
        .annotation(OPAQUE_PORTS_ANNOTATION, &opaque);
    let locked = PodSpec::new(NS, "locked-0", "locked", "locked")
        .annotation(DEFAULT_INBOUND_POLICY_ANNOTATION, "all-authenticated");
    let (web, echo0, echo1, locked, east_client, west_client) = tokio::try_join!(
        MeshedPod::start(&east, &east_cp, web),
        MeshedPod::start(&east, &east_cp, PodSpec::new(NS, "echo-0", "echo", "echo")),
        MeshedPod::start(&east, &east_cp, PodSpec::new(NS, "echo-1", "echo", "echo")),
        MeshedPod::start(&east, &east_cp, locked),
        MeshedPod::start(
            &east,
            &east_cp,
            PodSpec::new(NS, "client-0", "client", "client")
        ),
        MeshedPod::start(
            &west,
            &west_cp,
            PodSpec::new(NS, "client-0", "client", "client")
        ),
    )?;
    let (unmeshed, unmeshed_forwarding) = unmeshed_host()?;
    drop(unmeshed_forwarding); // `forwarding` is held for the whole run.
    Ok(Env {
        east,
        west,
        dir,
        east_cp,
        west_cp,
        gateway: Mutex::new(gateway),
        _mirror: mirror,
        web,
        echo: [echo0, echo1],
        locked,
        east_client,
        west_client,
        unmeshed,
        _cp_net: cp_net,
        _forwarding: forwarding,
    })
}

async fn apply(client: &kube::Client, value: serde_json::Value) -> Result<()> {
    let name = value["metadata"]["name"]
        .as_str()
        .context("a name")?
        .to_owned();
    Api::<Service>::namespaced(client.clone(), NS)
        .patch(
            &name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}

async fn cluster_ip(client: &kube::Client, name: &str) -> Result<Ipv4Addr> {
    let svc = Api::<Service>::namespaced(client.clone(), NS)
        .get(name)
        .await?;
    svc.spec
        .and_then(|s| s.cluster_ip)
        .with_context(|| format!("Service {name} has no ClusterIP"))?
        .parse()
        .context("ClusterIP")
}

fn label(key: &str, value: &str) -> String {
    format!("{key}=\"{value}\"")
}

/// Waits until the sum of `name` with `filters` in `pod`'s metrics exceeds `before`.
async fn grows(pod: &MeshedPod, name: &str, filters: &[&str], before: f64) -> Result<Metrics> {
    let what = format!(
        "{name}{{{}}} > {before} on {}",
        filters.join(","),
        pod.spec.name
    );
    wait_metric(pod, &what, WAIT, name, |m| m.sum(name, filters) > before).await
}

async fn started(env: Arc<Env>) -> Result<()> {
    for pod in env.pods() {
        // Ready (checked by the start) means certified: the identity service counted it.
        // init picks the first of the legacy and nft back ends it finds; each `-save` shows
        // only its own rules.
        let mut rules = String::new();
        for save in ["iptables-legacy-save", "iptables-nft-save"] {
            let out = exec_in(pod.host(), &[save, "-t", "nat"]).await?;
            rules.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        ensure!(
            rules.contains("--to-ports 4143") && rules.contains("--to-ports 4140"),
            "{}: no redirect to the proxy in its nat table:\n{rules}",
            pod.spec.name
        );
        let m = pod.metrics().await?;
        ensure!(
            m.0.contains("# TYPE"),
            "{}: no metrics from loopback: {:?}",
            pod.spec.name,
            m.0
        );
        // From this host's end of the Pod's veth, a network the Pod lists in
        // MESHLINK_METRICS_NETWORKS: served; from another host: not.
        let admin = SocketAddr::new(IpAddr::V4(pod.ip()), e2e::pod::ADMIN_PORT);
        let (code, body) = e2e::meshlink::http_get(admin, "/metrics").await?;
        ensure!(
            code == 200 && body.contains("# TYPE"),
            "{}: /metrics from a listed network: {code} {body:?}",
            pod.spec.name
        );
        let other = curl(&env.unmeshed, &[&format!("http://{admin}/metrics")]).await?;
        ensure!(
            other.status == 403,
            "{}: /metrics from an unlisted network: {other:?}",
            pod.spec.name
        );
        let probe = curl(&env.unmeshed, &[&format!("http://{admin}/ready")]).await?;
        ensure!(probe.status == 200, "{}: /ready: {probe:?}", pod.spec.name);
    }
    for cp in [&env.east_cp, &env.west_cp] {
        let ok = cp
            .identity
            .metric("identity_certify_requests_total", "result=\"ok\"")
            .await?;
        ensure!(
            ok >= 1.0,
            "{}'s identity service certified nothing",
            cp.cluster
        );
    }
    Ok(())
}

/// The counters both ends of a meshed HTTP call should move: the client's outbound
/// `response_total` to the server's identity, the server's inbound `request_total` from the
/// client's.
struct Meshed<'a> {
    client: &'a MeshedPod,
    server: &'a MeshedPod,
    out_before: f64,
    in_before: f64,
}

impl<'a> Meshed<'a> {
    fn out_filters(&self) -> [String; 4] {
        [
            label("direction", "outbound"),
            label("tls", "true"),
            label("server_id", &self.server.id),
            label("status_code", "200"),
        ]
    }

    fn in_filters(&self) -> [String; 3] {
        [
            label("direction", "inbound"),
            label("tls", "true"),
            label("client_id", &self.client.id),
        ]
    }

    async fn before(client: &'a MeshedPod, server: &'a MeshedPod) -> Result<Self> {
        let mut this = Self {
            client,
            server,
            out_before: 0.0,
            in_before: 0.0,
        };
        let f = this.out_filters();
        this.out_before = client
            .metrics()
            .await?
            .sum("response_total", &f.each_ref().map(String::as_str));
        let f = this.in_filters();
        this.in_before = server
            .metrics()
            .await?
            .sum("request_total", &f.each_ref().map(String::as_str));
        Ok(this)
    }

    async fn counted(&self) -> Result<()> {
        let f = self.out_filters();
        grows(
            self.client,
            "response_total",
            &f.each_ref().map(String::as_str),
            self.out_before,
        )
        .await?;
        let f = self.in_filters();
        grows(
            self.server,
            "request_total",
            &f.each_ref().map(String::as_str),
            self.in_before,
        )
        .await?;
        Ok(())
    }
}

async fn http1(env: Arc<Env>) -> Result<()> {
    let ip = cluster_ip(&env.east.client(), "web").await?;
    let counters = Meshed::before(&env.east_client, &env.web).await?;
    // A client's own l5d-client-id is not believed: the server's proxy says who called.
    let a = curl(
        env.east_client.host(),
        &["-H", "l5d-client-id: mallory", &format!("http://{ip}/")],
    )
    .await?;
    ensure!(a.status == 200, "{a:?}");
    ensure!(a.field("name") == Some("web-0"), "{a:?}");
    ensure!(
        a.field("client-id") == Some(env.east_client.id.as_str()),
        "the app should see the client's identity: {a:?}"
    );
    ensure!(a.field("version") == Some("HTTP/1.1"), "{a:?}");
    counters.counted().await
}

async fn http2(env: Arc<Env>) -> Result<()> {
    let ip = cluster_ip(&env.east.client(), "web").await?;
    let counters = Meshed::before(&env.east_client, &env.web).await?;
    let a = curl(
        env.east_client.host(),
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
            &format!("http://{ip}/test.Echo/Say"),
        ],
    )
    .await?;
    ensure!(a.status == 200, "{a:?}");
    ensure!(a.headers.starts_with("HTTP/2"), "{a:?}");
    ensure!(a.header("grpc-status") == Some("0"), "{a:?}");
    ensure!(a.field("name") == Some("web-0"), "{a:?}");
    ensure!(a.field("version") == Some("HTTP/2.0"), "{a:?}");
    ensure!(
        a.field("client-id") == Some(env.east_client.id.as_str()),
        "{a:?}"
    );
    counters.counted().await
}

/// Opaque TCP counters of both ends (no HTTP in flight meanwhile: checks run one at a time).
async fn tcp_opens(
    client: &MeshedPod,
    server_id: &str,
    server: Option<&MeshedPod>,
) -> Result<(f64, f64)> {
    let out = client.metrics().await?.sum(
        "tcp_open_total",
        &[
            &label("direction", "outbound"),
            &label("tls", "true"),
            &label("server_id", server_id),
        ],
    );
    let inb = match server {
        Some(s) => s.metrics().await?.sum(
            "tcp_open_total",
            &[
                &label("direction", "inbound"),
                &label("tls", "true"),
                &label("client_id", &client.id),
            ],
        ),
        None => 0.0,
    };
    Ok((out, inb))
}

async fn opaque(env: Arc<Env>) -> Result<()> {
    let ip = cluster_ip(&env.east.client(), "web").await?;
    let (out, inb) = tcp_opens(&env.east_client, &env.web.id, Some(&env.web)).await?;
    let accepted = env.web.banner_connections();
    let answer = banner(
        &env.east_client,
        SocketAddr::new(IpAddr::V4(ip), BANNER_PORT),
    )
    .await?;
    ensure!(
        answer == "hello from web-0\nping\n",
        "the server speaks first, then echoes: {answer:?}"
    );
    ensure!(env.web.banner_connections() > accepted);
    grows(
        &env.east_client,
        "tcp_open_total",
        &[
            &label("direction", "outbound"),
            &label("tls", "true"),
            &label("server_id", &env.web.id),
        ],
        out,
    )
    .await?;
    grows(
        &env.web,
        "tcp_open_total",
        &[
            &label("direction", "inbound"),
            &label("tls", "true"),
            &label("client_id", &env.east_client.id),
        ],
        inb,
    )
    .await?;
    Ok(())
}

/// The proxies' default protocol-detection timeout (Linkerd's, 10 s): a proxy that waited to
/// detect the protocol of a connection whose client does not speak first would pass it on only
/// after this.
const DETECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `e2e banner-client` in `pod`; fails if the exchange took half the detect timeout.
async fn banner(pod: &MeshedPod, addr: SocketAddr) -> Result<String> {
    let started = std::time::Instant::now();
    let answer = banner_exchange(pod, addr).await?;
    ensure!(
        started.elapsed() < DETECT_TIMEOUT / 2,
        "the server-speaks-first exchange with {addr} took {:?}: was it held for protocol \
         detection? ({answer:?})",
        started.elapsed()
    );
    Ok(answer)
}

async fn banner_exchange(pod: &MeshedPod, addr: SocketAddr) -> Result<String> {
    let e2e = workspace_binary("e2e")?;
    let out = pod
        .exec(&[
            &e2e.display().to_string(),
            "banner-client",
            &format!("--addr={addr}"),
            "--message=ping",
        ])
        .await?;
    ensure!(
        out.status.success(),
        "banner-client in {} to {addr}: {}",
        pod.spec.name,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn policy(env: Arc<Env>) -> Result<()> {
    // all-unauthenticated (the default): a client with no proxy is served, with no identity.
    let web = format!("http://{}:8080/", env.web.ip());
    let a = curl(&env.unmeshed, &[&web]).await?;
    ensure!(a.status == 200 && a.field("name") == Some("web-0"), "{a:?}");
    ensure!(a.field("client-id") == Some(""), "no identity: {a:?}");

    // all-authenticated: a meshed client is served (the proxy is up and authorizes) ...
    let locked = format!("http://{}:8080/", env.locked.ip());
    let a = curl(env.east_client.host(), &[&locked]).await?;
    ensure!(a.status == 200, "a meshed client of locked-0: {a:?}");
    ensure!(
        a.field("client-id") == Some(env.east_client.id.as_str()),
        "{a:?}"
    );
    let served = env.locked.app_requests().len();
    // ... and the one with no proxy is not.
    let refused = curl(&env.unmeshed, &[&locked]).await;
    ensure!(
        !matches!(&refused, Ok(a) if a.status == 200),
        "an unauthenticated client reached an all-authenticated Pod: {refused:?}"
    );
    ensure!(
        env.locked.app_requests().len() == served,
        "the app of locked-0 saw the refused request: {:?}",
        env.locked.app_requests()
    );
    let m = env.locked.metrics().await?;
    eprintln!(
        "unauthenticated call of locked-0: {}\n{}\n{}",
        match &refused {
            Ok(a) => format!("HTTP {}", a.status),
            Err(e) => format!("{e:#}"),
        },
        m.show("inbound_http_authz_deny_total"),
        m.show("inbound_tcp_authz_deny_total"),
    );
    Ok(())
}

/// The mirror `web-east` in west, once it has endpoints (at east's gateway): its ClusterIP.
async fn web_east(env: &Env) -> Result<Ipv4Addr> {
    let w = env.west.client();
    wait_for("the mirror web-east with endpoints", WAIT, || async {
        let ep = Api::<Endpoints>::namespaced(w.clone(), NS)
            .get_opt("web-east")
            .await
            .ok()??;
        ep.subsets?.first()?.addresses.as_ref()?.first().map(drop)
    })
    .await?;
    cluster_ip(&w, "web-east").await
}

/// The gateway's count of transport-header connections whose labels contain `filter`.
async fn gateway_headers(env: &Env, filter: &str) -> f64 {
    env.gateway
        .lock()
        .await
        .metric("inbound_tcp_transport_header_connections_total", filter)
        .await
        .unwrap_or(0.0)
}

async fn multicluster_http(env: Arc<Env>) -> Result<()> {
    let ip = web_east(&env).await?;
    let gw = gateway_id("east");
    let out = [
        label("direction", "outbound"),
        label("tls", "true"),
        label("server_id", &gw),
        label("status_code", "200"),
    ];
    let out = out.each_ref().map(String::as_str);
    let out_before = env.west_client.metrics().await?.sum("response_total", &out);
    // east's web-0 is meshed: the gateway reaches its proxy over mTLS as the gateway.
    let inbound = [
        label("direction", "inbound"),
        label("tls", "true"),
        label("client_id", &gw),
    ];
    let inbound = inbound.each_ref().map(String::as_str);
    let in_before = env.web.metrics().await?.sum("request_total", &inbound);
    let headers_before = gateway_headers(&env, "").await;

    let a = curl(env.west_client.host(), &[&format!("http://{ip}/")]).await?;
    ensure!(a.status == 200, "{a:?}");
    ensure!(
        a.field("name") == Some("web-0"),
        "east's web-0 answers: {a:?}"
    );
    ensure!(
        a.field("client-id") == Some(gw.as_str()),
        "east's app is told by its proxy that the gateway called: {a:?}"
    );
    grows(&env.west_client, "response_total", &out, out_before).await?;
    grows(&env.web, "request_total", &inbound, in_before).await?;
    wait_for(
        "the gateway to count a transport-header connection",
        WAIT,
        || async { (gateway_headers(&env, "").await > headers_before).then_some(()) },
    )
    .await?;
    Ok(())
}

async fn multicluster_opaque(env: Arc<Env>) -> Result<()> {
    let ip = web_east(&env).await?;
    let gw = gateway_id("east");
    // A transport header without a session protocol: opaque TCP.
    let opaque = "session_protocol=\"\"";
    let opaque_before = gateway_headers(&env, opaque).await;
    let (out_before, _) = tcp_opens(&env.west_client, &gw, None).await?;
    let answer = banner(
        &env.west_client,
        SocketAddr::new(IpAddr::V4(ip), BANNER_PORT),
    )
    .await?;
    ensure!(answer == "hello from web-0\nping\n", "{answer:?}");
    grows(
        &env.west_client,
        "tcp_open_total",
        &[
            &label("direction", "outbound"),
            &label("tls", "true"),
            &label("server_id", &gw),
        ],
        out_before,
    )
    .await?;
    wait_for(
        "the gateway to count an opaque transport-header connection",
        WAIT,
        || async { (gateway_headers(&env, opaque).await > opaque_before).then_some(()) },
    )
    .await?;
    Ok(())
}

/// The test's own view of the destination service's answer for `echo`, as a meshed workload
/// (`default/default`) of east.
async fn follow_echo(env: &Env) -> Result<Followed> {
    let token = env.dir.path().join("east-default.token");
    std::fs::write(
        &token,
        service_account_token_for(&env.east, "default", "default", IDENTITY_AUDIENCE).await?,
    )?;
    let creds = certified(
        &workload_id("default", "default", "east"),
        &env.dir.path().join("anchor/ca.crt"),
        env.east_cp.identity_addr,
        &token,
    )
    .await?;
    Followed::get(
        channel(env.east_cp.destination_addr, &creds).await?,
        &format!("echo.{NS}.svc.cluster.local:80"),
    )
    .await
}

/// A `client-loop` running in a Pod, its lines collected as they come.
struct Loop {
    child: tokio::process::Child,
    lines: Arc<StdMutex<Vec<LoopRequest>>>,
}

impl Loop {
    fn start(pod: &MeshedPod, addr: SocketAddr) -> Result<Self> {
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", pod.host().name()])
            .arg(workspace_binary("e2e")?)
            .args(["client-loop", &format!("--addr={addr}"), "--workers=4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let lines = Arc::new(StdMutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = reader.next_line().await {
                if let (Some(r), Ok(mut v)) = (LoopRequest::parse(&l), sink.lock()) {
                    v.push(r);
                }
            }
        });
        Ok(Self { child, lines })
    }

    fn snapshot(&self) -> Vec<LoopRequest> {
        self.lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    async fn until(&self, what: &str, ok: impl Fn(&[LoopRequest]) -> bool) -> Result<()> {
        wait_for(what, WAIT, || async { ok(&self.snapshot()).then_some(()) })
            .await
            .map_err(|e| {
                let s = self.snapshot();
                anyhow!(
                    "{e}; {} requests so far, the last: {:?}",
                    s.len(),
                    s.iter().rev().take(5).collect::<Vec<_>>()
                )
            })
    }

    /// Closes its stdin (the loop ends after the request in flight) and returns every line.
    async fn stop(mut self) -> Result<Vec<LoopRequest>> {
        drop(self.child.stdin.take());
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .context("client-loop did not stop")??;
        Ok(self.snapshot())
    }
}

async fn readiness(env: Arc<Env>) -> Result<()> {
    let echo1 = &env.echo[1];
    let ip = cluster_ip(&env.east.client(), "echo").await?;
    let removed = SocketAddr::new(IpAddr::V4(echo1.ip()), 8080);
    let mut view = follow_echo(&env).await?;
    view.until("both echo endpoints", WAIT, |f| f.endpoints.len() == 2)
        .await?;

    let lp = Loop::start(&env.east_client, SocketAddr::new(IpAddr::V4(ip), 80))?;
    // A positive sign first: both Pods answer the loop, 20 times each. (Four requests at a
    // time: with one, peak-EWMA keeps choosing whichever endpoint answered fastest lately, and
    // the other's share is too small to show that it is no longer used.)
    lp.until("echo-0 and echo-1 to answer 20 requests each", |s| {
        let answered = |n: &str| s.iter().filter(|r| r.ok() && r.detail == n).count();
        answered("echo-0") >= 20 && answered("echo-1") >= 20
    })
    .await?;

    let patched = now_ms();
    echo1.set_ready(false).await?;
    view.until("the destination service to remove echo-1", WAIT, |f| {
        f.removed.contains(&removed)
    })
    .await?;
    let observed = now_ms();
    let cutoff = observed + REMOVAL_GRACE_MS;
    // Enough requests after the cutoff that echo-1, had it kept its share of the last 200
    // requests before the change, would have been sent about 10 of them (a chance of e^-10 to
    // see none by luck).
    let before: Vec<LoopRequest> = lp
        .snapshot()
        .into_iter()
        .filter(|r| r.start_ms < patched)
        .collect();
    let window = &before[before.len().saturating_sub(200)..];
    let share =
        window.iter().filter(|r| r.detail == "echo-1").count() as f64 / window.len().max(1) as f64;
    ensure!(
        share > 0.0,
        "echo-1 answered none of the last {} requests before it was made unready",
        window.len()
    );
    let needed = ((10.0 / share).ceil() as usize).max(200);
    lp.until(
        &format!("{needed} requests after the removal (echo-1's share was {share:.4})"),
        |s| s.iter().filter(|r| r.start_ms > cutoff).count() >= needed,
    )
    .await?;

    // And back: ready again, it is used again. (The proxy may learn it before this test's own
    // stream does: the removal window ends when the Pod is marked ready.)
    let readying = now_ms();
    echo1.set_ready(true).await?;
    view.until("the destination service to add echo-1 back", WAIT, |f| {
        f.endpoints.contains_key(&removed)
    })
    .await?;
    let readded = now_ms();
    lp.until("echo-1 to answer again after it is ready", |s| {
        s.iter()
            .any(|r| r.start_ms > readded && r.ok() && r.detail == "echo-1")
    })
    .await?;
    let all = lp.stop().await?;

    let failures: Vec<&LoopRequest> = all.iter().filter(|r| !r.ok()).collect();
    let late: Vec<&LoopRequest> = all
        .iter()
        .filter(|r| r.start_ms > cutoff && r.start_ms < readying && r.detail == "echo-1")
        .collect();
    let last_to_removed = all
        .iter()
        .filter(|r| r.start_ms < readying && r.detail == "echo-1")
        .map(|r| r.start_ms)
        .max()
        .unwrap_or_default();
    let app_late: Vec<_> = echo1
        .app_requests()
        .into_iter()
        .filter(|r| r.at_ms > cutoff && r.at_ms < readying)
        .collect();
    let answered: BTreeMap<&str, usize> = all.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.detail.as_str()).or_default() += 1;
        m
    });
    eprintln!(
        "{} requests {answered:?} (echo-1's share before its removal {share:.4}, {needed} \
         requests counted after it); the last one echo-1 answered before being made ready \
         again started {} ms after the removal was observed",
        all.len(),
        last_to_removed as i128 - observed as i128
    );
    ensure!(
        failures.is_empty(),
        "{} of {} requests failed while another endpoint was ready: {:?}",
        failures.len(),
        all.len(),
        failures.iter().take(10).collect::<Vec<_>>()
    );
    ensure!(
        late.is_empty() && app_late.is_empty(),
        "echo-1 was sent requests more than {REMOVAL_GRACE_MS} ms after the destination service \
         removed it: {late:?}; its app logged {app_late:?}"
    );
    ensure!(
        answered.get("echo-0").is_some_and(|n| *n > 30),
        "{answered:?}"
    );
    Ok(())
}
