//! Test hosts in network namespaces of their own, joined to this host by a veth pair, so that
//! meshlink's programs reach them at non-loopback addresses (which Endpoints require) while every
//! packet stays inside this machine. Needs root and iproute2; without them a test fails with a
//! message that says so (it is never skipped in CI).
//!
//! A host can also be a Pod's network ([`Host::route_as_pod`]): other test hosts are reached
//! through this host, which then forwards between the veths ([`Forwarding`]) as a node with a
//! point-to-point CNI does, and every other address (a Service's ClusterIP, which no real route
//! leads to) has a route only so that the Pod's iptables rules can redirect connections to it to
//! the proxy; what they do not redirect goes to a dead-end device and is dropped, never to this
//! machine's own network.

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use crate::Error;

/// A network namespace with one address, reachable from this host.
#[derive(Debug)]
pub struct Host {
    name: String,
    veth: String,
    address: Ipv4Addr,
    host_address: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Invalid(format!("running `ip` (install iproute2): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "`ip {}` failed: {} (network namespaces need root and iproute2)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Host {
    /// Creates namespace `ml-<pid>-<n>` with address `172.31.<n>.2/30`; this host gets
    /// `172.31.<n>.1` on its end of the veth pair. Namespaces that a dead run left are removed
    /// first.
    pub fn create() -> Result<Self, Error> {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        sweep();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ml-{pid}-{n}");
        // Interface names are limited to 15 bytes.
        let veth = format!("mlv{}{n}", pid % 100_000);
        let peer = format!("mlp{}{n}", pid % 100_000);
        // A /30 per host; the third octet spreads concurrent runs apart.
        let octet = u8::try_from((pid % 200) as u16 + u16::from(n) % 50).unwrap_or(n);
        let host_addr = Ipv4Addr::new(172, 31, octet, 1);
        let address = Ipv4Addr::new(172, 31, octet, 2);
        ip(&["netns", "add", &name])?;
        let this = Self {
            name: name.clone(),
            veth: veth.clone(),
            address,
            host_address: host_addr,
        };
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &veth])?;
        ip(&["link", "set", &veth, "up"])?;
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{address}/30"),
            "dev",
            &peer,
        ])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &peer, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(this)
    }

    /// Gives programs run in the namespace with `ip netns exec` their own `/etc/resolv.conf`
    /// (iproute2 bind-mounts `/etc/netns/<name>/resolv.conf` over it), as a kubelet writes a
    /// Pod's: cluster DNS at `nameserver`, the namespace's search path. Removed with the host.
    pub fn set_resolv_conf(&self, nameserver: Ipv4Addr, namespace: &str) -> Result<(), Error> {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        let io = |source| Error::Io {
            cluster: self.name.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {nameserver}\nsearch {namespace}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
            ),
        )
        .map_err(io)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives the namespace a Pod's routes: [`TEST_NETWORK`] (other Pods, and the control plane
    /// on this host's veth addresses) through this host, and a default route to a dead-end device.
    /// The default route exists so that a connection to a Service's ClusterIP gets past the
    /// route lookup to the iptables `OUTPUT` chain, whose REDIRECT hands it to the proxy (a real
    /// Pod's default route leads to its node, which knows no ClusterIP either without
    /// kube-proxy). A packet that nothing redirects is dropped there: this host
    /// never forwards it to its own network. Pods reach each other only while a [`Forwarding`]
    /// is held.
    pub fn route_as_pod(&self) -> Result<(), Error> {
        let via = self.host_address.to_string();
        // A veth pair inside the namespace: what is sent out of one end arrives at the other,
        // which has no address and forwards nothing (the `dummy` device would do, but its
        // kernel module is not always there).
        let (null, sink) = ("mlnull", "mlnull1");
        for args in [
            vec!["ip", "route", "add", TEST_NETWORK, "via", &via],
            vec![
                "ip", "link", "add", null, "type", "veth", "peer", "name", sink,
            ],
            vec!["ip", "link", "set", null, "up"],
            vec!["ip", "link", "set", sink, "up"],
            vec!["ip", "route", "add", "default", "dev", null],
        ] {
            let mut all = vec!["netns", "exec", &self.name];
            all.extend(args);
            ip(&all)?;
        }
        Ok(())
    }

    /// The host's address.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// This host's address on the link to the namespace: what programs inside it dial to reach
    /// servers of this host.
    pub fn host_address(&self) -> Ipv4Addr {
        self.host_address
    }

    /// Takes the link to the namespace down (a network partition) or back up.
    pub fn set_link(&self, up: bool) -> Result<(), Error> {
        ip(&["link", "set", &self.veth, if up { "up" } else { "down" }])?;
        if up {
            // The address's route comes back with the link.
            let _ = ip(&[
                "addr",
                "add",
                &format!("{}/30", self.host_address),
                "dev",
                &self.veth,
            ]);
        }
        Ok(())
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.name));
    }
}

/// The addresses of every test host (both ends of every veth).
pub const TEST_NETWORK: &str = "172.31.0.0/16";

/// IPv4 forwarding in this (the root) namespace, so that a packet from one test host's veth to
/// another's is routed, as a node routes between its Pods' veths. Enabled while any `Forwarding`
/// of this process lives; set back to 0 when the last one is dropped if it was 0 before. (Another
/// process that needs it at that moment holds its own and sets it again; nothing of this
/// process's is left switched on.)
#[derive(Debug)]
pub struct Forwarding(());

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// (holders in this process, the value before the first).
static FORWARDING: Mutex<(usize, Option<String>)> = Mutex::new((0, None));

impl Forwarding {
    pub fn enable() -> Result<Self, Error> {
        let mut state = FORWARDING
            .lock()
            .map_err(|_| Error::Invalid("forwarding state poisoned".into()))?;
        if state.0 == 0 {
            let before = std::fs::read_to_string(IP_FORWARD)
                .map_err(|e| Error::Invalid(format!("reading {IP_FORWARD}: {e}")))?;
            std::fs::write(IP_FORWARD, "1").map_err(|e| {
                Error::Invalid(format!(
                    "enabling IPv4 forwarding between test hosts ({IP_FORWARD}, needs root): {e}"
                ))
            })?;
            state.1 = Some(before.trim().to_owned());
        }
        state.0 += 1;
        Ok(Self(()))
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Ok(mut state) = FORWARDING.lock() else {
            return;
        };
        state.0 = state.0.saturating_sub(1);
        if state.0 == 0
            && let Some(before) = state.1.take()
            && before == "0"
        {
            let _ = std::fs::write(IP_FORWARD, "0");
        }
    }
}

/// Removes namespaces (and their veths) of runs whose process is gone.
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("ml-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(name));
        }
    }
}
