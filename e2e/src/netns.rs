//! Test hosts in network namespaces of their own, joined to this host by a veth pair, so that
//! meshlink's programs reach them at non-loopback addresses (which Endpoints require) while every
//! packet stays inside this machine. Needs root and iproute2; without them a test fails with a
//! message that says so (it is never skipped in CI).

use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::atomic::{AtomicU8, Ordering},
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
        }
    }
}
