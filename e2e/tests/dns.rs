//! Cluster DNS as a Pod sees it: one real cluster, CoreDNS built from its Go modules serving it
//! ([`e2e::coredns`]), and a Pod's network namespace whose `/etc/resolv.conf` names CoreDNS with
//! the Pod namespace's search path, as a kubelet writes it. Names are resolved inside the
//! namespace by glibc (`getent`, run with `ip netns exec`), exactly as an unmodified application
//! resolves them; response codes, which glibc does not show, are checked with direct queries.
//!
//! Needs root (network namespaces, port 53) and iproute2; without them the setup fails and says
//! so.

use std::{net::Ipv4Addr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail, ensure};
use e2e::{
    Cluster,
    coredns::{CoreDns, Transport},
    create_namespace, create_ready_pod,
    netns::Host,
    pod::exec_in,
    wait_for,
};
use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, RecordType},
};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;
use tokio::sync::Mutex;

/// The test Pod's namespace.
const NS: &str = "shop";
/// Another namespace, reached by `<svc>.<ns>`.
const OTHER_NS: &str = "other";
/// How long a change may take to show in DNS: the plugin's watch delivers it in milliseconds,
/// and this is what the harness allows every watch on a loaded machine.
const WAIT: Duration = Duration::from_secs(30);

struct Env {
    /// Taken and replaced by the last check. Before `cluster`: fields drop in order.
    dns: Mutex<Option<CoreDns>>,
    /// The Pod's network namespace; CoreDNS listens on this host's end of its veth.
    pod: Host,
    /// ClusterIPs of `shop/web` and `other/api`.
    web_ip: Ipv4Addr,
    api_ip: Ipv4Addr,
    cluster: Cluster,
}

fn main() -> ExitCode {
    let checks: &[(&str, e2e::checks::Check<Env>)] = &[
        ("a_service_name_resolves_to_its_cluster_ip", |e| {
            Box::pin(full_names(e))
        }),
        (
            "short_names_resolve_through_the_namespace_search_path",
            |e| Box::pin(short_names(e)),
        ),
        (
            "udp_and_tcp_queries_get_the_same_authoritative_answer",
            |e| Box::pin(udp_and_tcp(e)),
        ),
        (
            "a_service_created_after_start_resolves_and_stops_when_deleted",
            |e| Box::pin(followed(e)),
        ),
        ("a_headless_service_resolves_to_its_ready_pods", |e| {
            Box::pin(headless(e))
        }),
        ("a_cluster_ip_resolves_back_to_its_service_name", |e| {
            Box::pin(reverse(e))
        }),
        ("unknown_names_are_nxdomain_and_nothing_is_forwarded", |e| {
            Box::pin(unknown(e))
        }),
        ("one_coredns_per_cluster_and_a_dropped_one_stops", |e| {
            Box::pin(restart(e))
        }),
    ];
    e2e::checks::run_with(setup, checks, |env: &Env| match env.dns.try_lock() {
        Ok(dns) => match dns.as_ref() {
            Some(dns) => format!(
                "--- CoreDNS log ({}):\n{}",
                dns.log_path().display(),
                dns.log_tail()
            ),
            None => "--- CoreDNS was stopped".to_owned(),
        },
        Err(_) => "--- CoreDNS log: (in use)".to_owned(),
    })
}

async fn setup() -> Result<Env> {
    let cluster = Cluster::start("dns").await?;
    let client = cluster.client();
    create_namespace(&client, NS).await?;
    create_namespace(&client, OTHER_NS).await?;
    let web_ip = create_service(&cluster, NS, "web").await?;
    let api_ip = create_service(&cluster, OTHER_NS, "api").await?;
    let pod = Host::create()?;
    let dns = CoreDns::start(&cluster, pod.host_address()).await?;
    pod.set_resolv_conf(pod.host_address(), NS)?;
    Ok(Env {
        dns: Mutex::new(Some(dns)),
        pod,
        web_ip,
        api_ip,
        cluster,
    })
}

/// Creates ClusterIP Service `ns/name` (port 80) and returns its ClusterIP.
async fn create_service(cluster: &Cluster, ns: &str, name: &str) -> Result<Ipv4Addr> {
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": { "selector": { "app": name }, "ports": [{ "name": "http", "port": 80 }] },
    }))?;
    let created = Api::<Service>::namespaced(cluster.client(), ns)
        .create(&PostParams::default(), &service)
        .await?;
    let ip = created
        .spec
        .and_then(|s| s.cluster_ip)
        .with_context(|| format!("Service {ns}/{name} got no ClusterIP"))?;
    Ok(ip.parse()?)
}

/// The IPv4 addresses glibc resolves `name` to inside the Pod (`getent ahostsv4`, with the Pod's
/// resolv.conf), sorted; empty when the name is not found.
async fn resolve(env: &Env, name: &str) -> Result<Vec<Ipv4Addr>> {
    let out = exec_in(&env.pod, &["getent", "ahostsv4", name]).await?;
    match out.status.code() {
        Some(0) => {}
        // getent's "key not found".
        Some(2) => return Ok(Vec::new()),
        _ => bail!(
            "getent ahostsv4 {name}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let mut ips = String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect::<Vec<Ipv4Addr>>();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

/// Asks the running CoreDNS directly.
async fn query(env: &Env, name: &str, rtype: RecordType, transport: Transport) -> Result<Message> {
    let dns = env.dns.lock().await;
    let dns = dns.as_ref().ok_or_else(|| anyhow!("CoreDNS was stopped"))?;
    Ok(dns.query(name, rtype, transport).await?)
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

async fn full_names(env: Arc<Env>) -> Result<()> {
    for (name, want) in [
        ("web.shop.svc.cluster.local", env.web_ip),
        // Absolute: no search domain is tried first.
        ("web.shop.svc.cluster.local.", env.web_ip),
        ("api.other.svc.cluster.local", env.api_ip),
    ] {
        let got = resolve(&env, name).await?;
        ensure!(got == [want], "{name} resolved to {got:?}, not {want}");
    }
    Ok(())
}

async fn short_names(env: Arc<Env>) -> Result<()> {
    for (name, want) in [
        // `shop.svc.cluster.local` from the search path.
        ("web", Some(env.web_ip)),
        // `svc.cluster.local`.
        ("web.shop", Some(env.web_ip)),
        ("api.other", Some(env.api_ip)),
        ("web.shop.svc", Some(env.web_ip)),
        // Only the Pod's own namespace is searched for a bare name.
        ("api", None),
    ] {
        let got = resolve(&env, name).await?;
        ensure!(
            got == Vec::from_iter(want),
            "{name} resolved to {got:?}, expected {want:?}"
        );
    }
    Ok(())
}

async fn udp_and_tcp(env: Arc<Env>) -> Result<()> {
    for transport in [Transport::Udp, Transport::Tcp] {
        let m = query(&env, "web.shop.svc.cluster.local", RecordType::A, transport).await?;
        ensure!(
            m.metadata.response_code == ResponseCode::NoError && m.metadata.authoritative,
            "{transport:?}: {m:?}"
        );
        ensure!(a_records(&m) == [env.web_ip], "{transport:?}: {m:?}");
    }
    Ok(())
}

async fn followed(env: Arc<Env>) -> Result<()> {
    let name = "late.shop.svc.cluster.local";
    let m = query(&env, name, RecordType::A, Transport::Udp).await?;
    ensure!(
        m.metadata.response_code == ResponseCode::NXDomain,
        "{name} existed before its Service: {m:?}"
    );
    let ip = create_service(&env.cluster, NS, "late").await?;
    wait_for(&format!("{name} to resolve to {ip}"), WAIT, || async {
        (resolve(&env, "late").await.ok()? == [ip]).then_some(())
    })
    .await?;

    Api::<Service>::namespaced(env.cluster.client(), NS)
        .delete("late", &DeleteParams::default())
        .await?;
    wait_for(&format!("{name} to be NXDOMAIN again"), WAIT, || async {
        let m = query(&env, name, RecordType::A, Transport::Udp)
            .await
            .ok()?;
        (m.metadata.response_code == ResponseCode::NXDomain).then_some(())
    })
    .await?;
    let got = resolve(&env, "late").await?;
    ensure!(got.is_empty(), "a deleted Service still resolves: {got:?}");
    Ok(())
}

async fn headless(env: Arc<Env>) -> Result<()> {
    let client = env.cluster.client();
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "db" },
        "spec": {
            "clusterIP": "None",
            "selector": { "app": "db" },
            "ports": [{ "name": "pg", "port": 5432 }],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &service)
        .await?;
    // Pod IPs are only data here: nothing is sent to them.
    let mut want: Vec<Ipv4Addr> = vec![
        Ipv4Addr::new(172, 31, 250, 10),
        Ipv4Addr::new(172, 31, 250, 11),
    ];
    want.sort();
    let labels = e2e::meshlink::labels(&[("app", "db")]);
    for (i, ip) in want.iter().enumerate() {
        create_ready_pod(
            &client,
            NS,
            &format!("db-{i}"),
            &labels,
            (*ip).into(),
            &env.cluster.node_name(),
        )
        .await?;
    }
    wait_for("db to resolve to both ready Pods", WAIT, || async {
        (resolve(&env, "db").await.ok()? == want).then_some(())
    })
    .await?;
    Ok(())
}

async fn reverse(env: Arc<Env>) -> Result<()> {
    let ip = env.web_ip.to_string();
    let out = exec_in(&env.pod, &["getent", "hosts", &ip]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && stdout
                .split_whitespace()
                .any(|n| n == "web.shop.svc.cluster.local"),
        "getent hosts {ip}: {}: {stdout}",
        out.status
    );
    Ok(())
}

async fn unknown(env: Arc<Env>) -> Result<()> {
    for name in [
        // In the cluster zone, in a namespace that exists and in one that does not.
        "nothing.shop.svc.cluster.local",
        "web.nowhere.svc.cluster.local",
        // Outside it: answered here, never forwarded.
        "example.com",
        "web.shop.svc.cluster.local.example.com",
    ] {
        for rtype in [RecordType::A, RecordType::AAAA] {
            let m = query(&env, name, rtype, Transport::Udp).await?;
            ensure!(
                m.metadata.response_code == ResponseCode::NXDomain && m.answers.is_empty(),
                "{name} {rtype}: {m:?}"
            );
        }
    }
    for name in ["nothing", "nothing.shop.svc.cluster.local", "example.com"] {
        let got = resolve(&env, name).await?;
        ensure!(got.is_empty(), "{name} resolved to {got:?}");
    }
    // The binary cannot forward at all: its plugins are exactly those main.go imports (bind,
    // errors, kubernetes, log, ready, template, and what they pull in themselves).
    let pid = env
        .dns
        .lock()
        .await
        .as_ref()
        .and_then(CoreDns::pid)
        .ok_or_else(|| anyhow!("CoreDNS is not running"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let out = std::process::Command::new(&exe).arg("-plugins").output()?;
    let plugins = String::from_utf8(out.stdout)?;
    for absent in ["forward", "grpc", "etcd", "route53", "azure", "clouddns"] {
        ensure!(
            !plugins.lines().any(|l| l.trim() == absent),
            "{} has plugin {absent}:\n{plugins}",
            exe.display()
        );
    }
    ensure!(
        plugins.lines().any(|l| l.trim() == "kubernetes"),
        "{plugins}"
    );
    Ok(())
}

async fn restart(env: Arc<Env>) -> Result<()> {
    let mut slot = env.dns.lock().await;
    let addr = env.pod.host_address();
    match CoreDns::start(&env.cluster, addr).await {
        Err(e) if e.to_string().contains("already runs a CoreDNS") => {}
        Err(e) => bail!("a second CoreDNS failed for another reason: {e}"),
        Ok(_) => bail!("a second CoreDNS started for the same cluster"),
    }
    let old = slot.take().ok_or_else(|| anyhow!("CoreDNS was stopped"))?;
    let pid = old.pid().ok_or_else(|| anyhow!("CoreDNS is not running"))?;
    drop(old);
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "CoreDNS ({pid}) still runs after it was dropped"
    );
    // Its port is free again (the process holding it is gone), so a new one can take its place.
    let new = CoreDns::start(&env.cluster, addr).await?;
    ensure!(new.pid() != Some(pid));
    *slot = Some(new);
    drop(slot);
    let got = resolve(&env, "web").await?;
    ensure!(
        got == [env.web_ip],
        "after the restart web resolved to {got:?}"
    );
    Ok(())
}
