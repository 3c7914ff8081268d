//! The init against real iptables, in fresh network namespaces that each test makes and deletes.
//!
//! Topology, per test: namespace `app` (the pod: veth0 10.255.0.2/24, and a route to
//! 10.255.1.0/24 through the peer) and namespace `peer` (the rest of the network: veth1
//! 10.255.0.1/24 and 10.255.1.1/24). The init runs for `app` through `--netns`; the sockets are
//! made on threads that entered a namespace with setns(2), and a socket stays in the namespace
//! it was made in, whichever thread uses it later.
//!
//! Needs root, iproute2 and iptables (`make prerequisites` installs them); without them the
//! tests fail and say so.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use clap::Parser;
use nix::{
    sched::CloneFlags,
    sys::{
        socket::{getsockopt, setsockopt, sockopt},
        time::{TimeVal, TimeValLike},
    },
};
use proxy_init::{InitError, Options, Report};

/// How long a connect or an accept may take before the test gives up: a bound against hanging
/// when a rule is wrong, not a wait for anything (each wait ends on the connection itself).
const DEADLINE_SECS: i64 = 10;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    options: Options,
}

fn options(args: &[&str]) -> Options {
    Cli::parse_from(std::iter::once("init").chain(args.iter().copied())).options
}

/// Fails the test (never skips it) when this machine cannot run it.
fn require_root_and_tools() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root: it makes network namespaces and changes iptables in them \
         (run the tests as root, as CI does)"
    );
    for (program, package) in [
        ("ip", "iproute2"),
        ("iptables-legacy-save", "iptables"),
        ("iptables-nft-save", "iptables"),
        ("bash", "bash"),
        ("setpriv", "util-linux"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "this test needs {program}: install {package} (apt-get install {package}, or `make prerequisites`)"
        );
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop, also when the test fails.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "meshlink-init-{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args);
        ip(&all);
    }

    /// Runs `f` on a new thread that has entered this namespace; the test's own threads stay
    /// where they are.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open the namespace");
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }

    fn listen(&self, addr: &str) -> TcpListener {
        let listener = self
            .enter(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        // accept(2) honours SO_RCVTIMEO: the deadline for `accepted`.
        setsockopt(
            &listener,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(DEADLINE_SECS),
        )
        .expect("SO_RCVTIMEO");
        listener
    }

    /// Connects from inside this namespace as root.
    fn connect(&self, to: &str) -> TcpStream {
        let addr: SocketAddr = to.parse().expect("address");
        self.enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(DEADLINE_SECS as u64)))
            .unwrap_or_else(|e| panic!("connect to {to} from {}: {e}", self.name))
    }

    /// Connects from inside this namespace in a child process running as `uid`: the owner match
    /// looks at the credentials of the process that made the socket.
    fn connect_as(&self, uid: u32, to: SocketAddrV4) {
        let script = format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port());
        let status = self
            .enter(|| {
                Command::new("bash")
                    .args(["-c", &script])
                    .uid(uid)
                    .gid(uid)
                    .status()
            })
            .expect("run bash");
        assert!(
            status.success(),
            "uid {uid} could not connect to {to}: {status}"
        );
    }

    fn nat_table(&self, report: &Report) -> String {
        let save = &report.backend.as_ref().expect("a backend").save;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(save)
            .args(["-t", "nat"])
            .output()
            .expect("run iptables-save");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let deleted = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        if !matches!(deleted, Ok(s) if s.success()) {
            eprintln!(
                "could not delete network namespace {}: {deleted:?}",
                self.name
            );
        }
    }
}

/// The pod and the network beyond it, joined by a veth pair.
fn topology() -> (Netns, Netns) {
    let app = Netns::new("app");
    let peer = Netns::new("peer");
    app.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &peer.name,
    ]);
    app.ip(&["addr", "add", "10.255.0.2/24", "dev", "veth0"]);
    app.ip(&["link", "set", "veth0", "up"]);
    app.ip(&["route", "add", "10.255.1.0/24", "via", "10.255.0.1"]);
    peer.ip(&["addr", "add", "10.255.0.1/24", "dev", "veth1"]);
    peer.ip(&["addr", "add", "10.255.1.1/24", "dev", "veth1"]);
    peer.ip(&["link", "set", "veth1", "up"]);
    (app, peer)
}

/// The next connection on `listener`, or a failure naming `what` after the deadline.
fn accepted(listener: &TcpListener, what: &str) -> TcpStream {
    listener
        .accept()
        .unwrap_or_else(|e| panic!("no connection reached {what}: {e}"))
        .0
}

/// Asserts that no connection is waiting on `listener`. Called once the connection has been
/// accepted elsewhere, so there is nothing in flight that could still arrive.
fn nothing_at(listener: &TcpListener, what: &str) {
    listener.set_nonblocking(true).expect("non-blocking");
    match listener.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => panic!("accept on {what}: {e}"),
        Ok((_, from)) => panic!("a connection from {from} reached {what}"),
    }
    listener.set_nonblocking(false).expect("blocking");
}

fn v4(addr: &str) -> SocketAddrV4 {
    addr.parse().expect("an IPv4 socket address")
}

fn original_dst(stream: &TcpStream) -> SocketAddrV4 {
    let sin = getsockopt(stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

/// `iptables-save` output without what changes on its own: the comment lines (they carry the
/// time) and the packet and byte counters of the built-in chains.
fn without_counters(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(at)) => format!("{} [0:0]\n", &line[..at]),
            _ => format!("{line}\n"),
        })
        .collect()
}

fn redirects_and_is_idempotent(mode: &str) {
    require_root_and_tools();
    let (app, peer) = topology();

    // The proxy's listeners, as Linkerd binds them, and the app's own server.
    let outbound = app.listen("127.0.0.1:4140");
    let inbound = app.listen("0.0.0.0:4143");
    let admin = app.listen("0.0.0.0:4191");
    let app_server = app.listen("0.0.0.0:8080");
    // What lies beyond the pod.
    let remote = peer.listen("0.0.0.0:80");
    let remote_ignored_port = peer.listen("0.0.0.0:81");

    let netns = app.path();
    let options = options(&[
        "--iptables-mode",
        mode,
        "--netns",
        netns.to_str().expect("utf-8 path"),
        "--outbound-ports-to-ignore",
        "81",
        "--subnets-to-ignore",
        "10.255.1.0/24",
    ]);

    // First run: both chains and both jumps appear, each line as the plan wrote it.
    let first = proxy_init::run(&options).expect("first run");
    assert!(
        first
            .backend
            .as_ref()
            .expect("a backend")
            .save
            .ends_with(format!("iptables-{mode}-save")),
        "{:?}",
        first.backend
    );
    assert_eq!(first.jumps_added.len(), 2);
    let after_first = app.nat_table(&first);
    for line in first.script.lines().filter(|l| l.starts_with("-A ")) {
        assert_eq!(
            after_first.lines().filter(|l| *l == line).count(),
            1,
            "{line:?} once in:\n{after_first}"
        );
    }

    // Second run: no jump added, the table unchanged.
    let second = proxy_init::run(&options).expect("second run");
    assert_eq!(second.jumps_added, vec![]);
    let after_second = app.nat_table(&second);
    assert_eq!(
        without_counters(&after_first),
        without_counters(&after_second)
    );

    // The app's outbound TCP lands on the outgoing proxy port, which can read where it was
    // going.
    let _app_conn = app.connect("10.255.0.1:80");
    let redirected = accepted(&outbound, "the outgoing proxy port");
    assert_eq!(original_dst(&redirected), v4("10.255.0.1:80"));
    nothing_at(&remote, "the remote server (the app's connection)");

    // The proxy's own connections go where they are sent.
    app.connect_as(2102, v4("10.255.0.1:80"));
    accepted(&remote, "the remote server (the proxy's connection)");
    nothing_at(
        &outbound,
        "the outgoing proxy port (the proxy's connection)",
    );

    // Ignored outbound ports and subnets go straight out.
    let _ignored_port = app.connect("10.255.0.1:81");
    accepted(&remote_ignored_port, "the remote server on an ignored port");
    let _ignored_subnet = app.connect("10.255.1.1:80");
    accepted(&remote, "the remote server in an ignored subnet");
    nothing_at(
        &outbound,
        "the outgoing proxy port (ignored port and subnet)",
    );

    // The app calling its own pod IP travels over lo: not proxied on either side (Linkerd's
    // behaviour; see the "ignore-loopback" rule).
    let _own_ip = app.connect("10.255.0.2:8080");
    accepted(&app_server, "the app's own server, called on the pod IP");
    nothing_at(
        &outbound,
        "the outgoing proxy port (the pod calling itself)",
    );
    nothing_at(&inbound, "the incoming proxy port (the pod calling itself)");

    // Inbound TCP lands on the incoming proxy port, except the proxy's admin port.
    let _from_peer = peer.connect("10.255.0.2:8080");
    let incoming = accepted(&inbound, "the incoming proxy port");
    assert_eq!(original_dst(&incoming), v4("10.255.0.2:8080"));
    nothing_at(
        &app_server,
        "the app's server (a redirected inbound connection)",
    );
    let _admin_conn = peer.connect("10.255.0.2:4191");
    accepted(&admin, "the admin port");
    nothing_at(
        &inbound,
        "the incoming proxy port (the admin port is skipped)",
    );
}

#[test]
fn legacy_redirects_and_is_idempotent() {
    redirects_and_is_idempotent("legacy");
}

#[test]
fn nft_redirects_and_is_idempotent() {
    redirects_and_is_idempotent("nft");
}

/// iptables run without privilege: the real message from iptables-save, as a container
/// without NET_ADMIN would see it (`setpriv` drops root for it alone).
#[test]
fn permission_denied_is_named() {
    require_root_and_tools();
    let ns = Netns::new("unprivileged");
    let dir = std::env::temp_dir().join(&ns.name);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let save = dir.join("iptables-save");
    std::fs::write(
        &save,
        "#!/bin/sh\nexec setpriv --reuid=2102 --regid=2102 --clear-groups iptables-legacy-save \"$@\"\n",
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&save, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let netns = ns.path();
    let result = proxy_init::run(&options(&[
        "--netns",
        netns.to_str().expect("utf-8 path"),
        "--firewall-save-bin-path",
        save.to_str().expect("utf-8 path"),
        "--iptables-mode",
        "legacy",
    ]));
    std::fs::remove_dir_all(&dir).expect("remove the wrapper");
    let err = result.expect_err("iptables-save without privilege");
    assert!(matches!(err, InitError::PermissionDenied { .. }), "{err:?}");
    let message = err.to_string();
    for part in [
        "needs root or the NET_ADMIN capability",
        "Permission denied (you must be root)",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
}

/// Needs neither root nor iptables: the programs are looked for before anything runs.
#[test]
fn missing_iptables_is_named() {
    let options = options(&[
        "--firewall-save-bin-path",
        "/nonexistent/iptables-save",
        "--firewall-restore-bin-path",
        "/nonexistent/iptables-restore",
    ]);
    let err = proxy_init::run(&options).expect_err("no iptables");
    assert!(matches!(err, InitError::IptablesNotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/nonexistent/iptables-save not found: install iptables (apt-get install iptables)"
    );
}
