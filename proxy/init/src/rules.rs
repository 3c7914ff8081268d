//! The nat rules as data, and the `iptables-restore` transaction that installs them.
//!
//! The layout is Linkerd proxy-init's (`pkg/iptables/iptables.go`), so a pod set up by either
//! looks the same in `iptables-save -t nat`, comments included:
//!
//! ```text
//! -A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j PROXY_INIT_REDIRECT
//! -A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" -j PROXY_INIT_OUTPUT
//! -A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -m comment --comment "proxy-init/ignore-proxy-user-id" -j RETURN
//! -A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN
//! -A PROXY_INIT_OUTPUT -p tcp -m comment --comment "proxy-init/redirect-all-outgoing-to-proxy-port" -j REDIRECT --to-ports 4140
//! -A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190:4191 -m comment --comment "proxy-init/ignore-port-4190:4191" -j RETURN
//! -A PROXY_INIT_REDIRECT -p tcp -m comment --comment "proxy-init/redirect-all-incoming-to-proxy-port" -j REDIRECT --to-ports 4143
//! ```
//!
//! Each rule is written with its options in the order `iptables-save` prints them, so the lines
//! of the transaction are the lines that `iptables-save` shows afterwards.

use std::fmt;

use crate::{Options, ports};

/// The inbound chain: PREROUTING jumps to it.
pub const REDIRECT_CHAIN: &str = "PROXY_INIT_REDIRECT";
/// The outbound chain: OUTPUT jumps to it.
pub const OUTPUT_CHAIN: &str = "PROXY_INIT_OUTPUT";
/// Inbound ports that are never redirected: the proxy's control (tap) port 4190 and admin port
/// 4191 serve themselves. Linkerd's injector always adds both to `--inbound-ports-to-ignore`;
/// here they are part of the plan, so no caller can forget them.
pub const ALWAYS_IGNORED_INBOUND_PORTS: [u16; 2] = [4190, 4191];

/// One `-A <chain> ...` line of the nat table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub chain: &'static str,
    /// Everything after `-A <chain>`, as `iptables-save` prints it.
    pub spec: String,
}

/// A jump from a built-in chain to one of ours: added only when absent, so that a second run
/// does not stack a second jump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jump {
    pub from: &'static str,
    pub to: &'static str,
}

/// Everything [`crate::run`] installs, decided from the options alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The rules of [`REDIRECT_CHAIN`], in order.
    pub inbound: Vec<Rule>,
    /// The rules of [`OUTPUT_CHAIN`], in order.
    pub outbound: Vec<Rule>,
    /// PREROUTING to [`REDIRECT_CHAIN`] and OUTPUT to [`OUTPUT_CHAIN`].
    pub jumps: Vec<Jump>,
}

fn comment(name: &str) -> String {
    format!("-m comment --comment \"proxy-init/{name}\"")
}

impl Rule {
    fn new(chain: &'static str, spec: String) -> Self {
        Self { chain, spec }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-A {} {}", self.chain, self.spec)
    }
}

impl Jump {
    /// The rule itself, with Linkerd's comment (`install-proxy-init-prerouting`).
    pub fn rule(&self) -> Rule {
        let name = format!("install-proxy-init-{}", self.from.to_ascii_lowercase());
        Rule::new(self.from, format!("{} -j {}", comment(&name), self.to))
    }

    /// Whether an `iptables-save` listing already has a rule in `from` that jumps to `to`, with
    /// any matches and any comment (one written by Linkerd's proxy-init counts as well).
    pub fn present_in(&self, save: &str) -> bool {
        let mut table = "";
        save.lines().any(|line| {
            if let Some(name) = line.strip_prefix('*') {
                table = name.trim();
                return false;
            }
            let tokens: Vec<&str> = line.split_whitespace().collect();
            table == "nat"
                && tokens.len() >= 2
                && tokens[..2] == ["-A", self.from]
                && tokens
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "--jump") && w[1] == self.to)
        })
    }
}

/// The rules for `options`. Pure: it reads nothing and runs nothing.
pub fn plan(options: &Options) -> Plan {
    // Inbound: everything that arrives for the pod, except the ignored ports, goes to the
    // proxy's inbound side. Traffic the pod sends itself never passes here: nat is decided once
    // per connection, at its first packet, and for local traffic that is OUTPUT.
    let ignored_inbound = ports::merge(
        ALWAYS_IGNORED_INBOUND_PORTS
            .map(ports::PortRange::single)
            .into_iter()
            .chain(options.inbound_ports_to_ignore.iter().copied()),
    );
    let mut inbound: Vec<Rule> = ignored_ports(REDIRECT_CHAIN, &ignored_inbound);
    inbound.push(Rule::new(
        REDIRECT_CHAIN,
        format!(
            "-p tcp {} -j REDIRECT --to-ports {}",
            comment("redirect-all-incoming-to-proxy-port"),
            options.incoming_proxy_port
        ),
    ));

    // Outbound, in Linkerd's order.
    let mut outbound = vec![
        // The proxy's own connections go where it sends them; redirecting them back to the
        // proxy would loop.
        Rule::new(
            OUTPUT_CHAIN,
            format!(
                "-m owner --uid-owner {} {} -j RETURN",
                options.proxy_uid,
                comment("ignore-proxy-user-id")
            ),
        ),
        // Everything leaving through lo is left alone. That is 127.0.0.0/8 and also the pod's
        // own IP, which the kernel routes over lo too. Linkerd used to send the proxy's lo
        // traffic to a non-loopback address back to the inbound chain
        // ("redirect-non-loopback-local-traffic"), and removed that in linkerd2-proxy-init#45:
        // the inbound proxy now forwards to the original pod-IP destination, and that rule
        // caught those connections and looped them into the inbound port again. So, as in
        // Linkerd, an app calling its own pod IP is not proxied on either side. Calling itself
        // through a Service is: a ClusterIP is not local, so it leaves through eth0 and is
        // redirected below. The outbound proxy also refuses loopback targets
        // (reference: linkerd-data-plane.md, SO_ORIGINAL_DST), so redirecting lo would only
        // break localhost calls.
        Rule::new(
            OUTPUT_CHAIN,
            format!("-o lo {} -j RETURN", comment("ignore-loopback")),
        ),
    ];
    let ignored_outbound = ports::merge(options.outbound_ports_to_ignore.iter().copied());
    outbound.extend(ignored_ports(OUTPUT_CHAIN, &ignored_outbound));
    // Linkerd's `--subnets-to-ignore` matches the *source* of inbound traffic; here it is a list
    // of destinations the app reaches directly (a database network, the node's network), which is
    // what meshlink needs it for. Every protocol returns, as in Linkerd's subnet rule.
    outbound.extend(options.subnets_to_ignore.iter().map(|subnet| {
        Rule::new(
            OUTPUT_CHAIN,
            format!(
                "-d {subnet} {} -j RETURN",
                comment(&format!("ignore-subnet-{subnet}"))
            ),
        )
    }));
    outbound.push(Rule::new(
        OUTPUT_CHAIN,
        format!(
            "-p tcp {} -j REDIRECT --to-ports {}",
            comment("redirect-all-outgoing-to-proxy-port"),
            options.outgoing_proxy_port
        ),
    ));

    Plan {
        inbound,
        outbound,
        jumps: vec![
            Jump {
                from: "PREROUTING",
                to: REDIRECT_CHAIN,
            },
            Jump {
                from: "OUTPUT",
                to: OUTPUT_CHAIN,
            },
        ],
    }
}

/// `RETURN` rules for the ports, at most [`ports::MULTIPORT_LIMIT`] to a rule.
fn ignored_ports(chain: &'static str, ranges: &[ports::PortRange]) -> Vec<Rule> {
    ports::multiport_lists(ranges)
        .into_iter()
        .map(|list| {
            Rule::new(
                chain,
                format!(
                    "-p tcp -m multiport --dports {list} {} -j RETURN",
                    comment(&format!("ignore-port-{list}"))
                ),
            )
        })
        .collect()
}

impl Plan {
    /// The jumps that an `iptables-save -t nat` listing lacks.
    pub fn missing_jumps(&self, save: &str) -> Vec<Jump> {
        self.jumps
            .iter()
            .filter(|jump| !jump.present_in(save))
            .cloned()
            .collect()
    }

    /// The input for `iptables-restore --noflush`: one transaction on the nat table that
    /// declares both chains (which creates them, or empties them if they exist: that is what a
    /// chain line does under `--noflush`), fills them, and appends the `jumps` given. Nothing
    /// outside the two chains is touched, so running it again with no jumps missing leaves the
    /// table as it was.
    pub fn restore_script(&self, jumps: &[Jump]) -> String {
        let mut script = String::from("*nat\n");
        for chain in [REDIRECT_CHAIN, OUTPUT_CHAIN] {
            script.push_str(&format!(":{chain} - [0:0]\n"));
        }
        let jump_rules = jumps.iter().map(Jump::rule);
        for rule in self
            .inbound
            .iter()
            .cloned()
            .chain(self.outbound.iter().cloned())
            .chain(jump_rules)
        {
            script.push_str(&format!("{rule}\n"));
        }
        script.push_str("COMMIT\n");
        script
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ipv4Cidr, PortRange};

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn default_plan() {
        let plan = plan(&Options::default());
        assert_eq!(
            lines(&plan.inbound),
            [
                r#"-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190:4191 -m comment --comment "proxy-init/ignore-port-4190:4191" -j RETURN"#,
                r#"-A PROXY_INIT_REDIRECT -p tcp -m comment --comment "proxy-init/redirect-all-incoming-to-proxy-port" -j REDIRECT --to-ports 4143"#,
            ]
        );
        assert_eq!(
            lines(&plan.outbound),
            [
                r#"-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -m comment --comment "proxy-init/ignore-proxy-user-id" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -p tcp -m comment --comment "proxy-init/redirect-all-outgoing-to-proxy-port" -j REDIRECT --to-ports 4140"#,
            ]
        );
        assert_eq!(
            lines(&plan.jumps.iter().map(Jump::rule).collect::<Vec<_>>()),
            [
                r#"-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j PROXY_INIT_REDIRECT"#,
                r#"-A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" -j PROXY_INIT_OUTPUT"#,
            ]
        );
    }

    #[test]
    fn options_shape_the_plan() {
        let ports =
            |s: &str| -> Vec<PortRange> { s.split(',').map(|p| p.parse().unwrap()).collect() };
        let options = Options {
            incoming_proxy_port: 5143,
            outgoing_proxy_port: 5140,
            proxy_uid: 1000,
            // 4191 again and a range that touches the admin ports: merged, not repeated.
            inbound_ports_to_ignore: ports("4191,25-27,4192"),
            outbound_ports_to_ignore: ports("443,3306"),
            subnets_to_ignore: vec![
                "10.1.2.3/16".parse::<Ipv4Cidr>().unwrap(),
                "192.168.0.0/24".parse().unwrap(),
            ],
            ..Options::default()
        };
        let plan = plan(&options);
        assert_eq!(
            lines(&plan.inbound),
            [
                r#"-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 25:27,4190:4192 -m comment --comment "proxy-init/ignore-port-25:27,4190:4192" -j RETURN"#,
                r#"-A PROXY_INIT_REDIRECT -p tcp -m comment --comment "proxy-init/redirect-all-incoming-to-proxy-port" -j REDIRECT --to-ports 5143"#,
            ]
        );
        assert_eq!(
            lines(&plan.outbound),
            [
                r#"-A PROXY_INIT_OUTPUT -m owner --uid-owner 1000 -m comment --comment "proxy-init/ignore-proxy-user-id" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -p tcp -m multiport --dports 443,3306 -m comment --comment "proxy-init/ignore-port-443,3306" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -d 10.1.0.0/16 -m comment --comment "proxy-init/ignore-subnet-10.1.0.0/16" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -d 192.168.0.0/24 -m comment --comment "proxy-init/ignore-subnet-192.168.0.0/24" -j RETURN"#,
                r#"-A PROXY_INIT_OUTPUT -p tcp -m comment --comment "proxy-init/redirect-all-outgoing-to-proxy-port" -j REDIRECT --to-ports 5140"#,
            ]
        );
    }

    #[test]
    fn many_ignored_ports_take_several_rules() {
        let options = Options {
            outbound_ports_to_ignore: (1..=20).map(|p| PortRange::single(p * 10)).collect(),
            ..Options::default()
        };
        let plan = plan(&options);
        let returns: Vec<&Rule> = plan
            .outbound
            .iter()
            .filter(|r| r.spec.contains("multiport"))
            .collect();
        assert_eq!(returns.len(), 2);
        assert!(
            returns[0]
                .spec
                .contains("--dports 10,20,30,40,50,60,70,80,90,100,110,120,130,140,150 ")
        );
        assert!(returns[1].spec.contains("--dports 160,170,180,190,200 "));
    }

    const EMPTY: &str = "\
# Generated by iptables-save v1.8.9 on Sun Nov 29 19:11:38 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn missing_jumps() {
        let plan = plan(&Options::default());
        let both = plan.jumps.clone();
        let prerouting = vec![plan.jumps[0].clone()];
        let output = vec![plan.jumps[1].clone()];
        let cases: Vec<(&str, String, Vec<Jump>)> = vec![
            ("empty input", String::new(), both.clone()),
            ("empty nat table", EMPTY.to_string(), both.clone()),
            (
                "ours, as installed",
                EMPTY.replace(
                    "COMMIT",
                    &format!("{}\n{}\nCOMMIT", plan.jumps[0].rule(), plan.jumps[1].rule()),
                ),
                vec![],
            ),
            (
                "only OUTPUT's",
                EMPTY.replace("COMMIT", &format!("{}\nCOMMIT", plan.jumps[1].rule())),
                prerouting.clone(),
            ),
            (
                "other matches and no comment still count",
                EMPTY.replace(
                    "COMMIT",
                    "-A PREROUTING -p tcp -j PROXY_INIT_REDIRECT\n-A OUTPUT --jump PROXY_INIT_OUTPUT\nCOMMIT",
                ),
                vec![],
            ),
            (
                "a chain with a longer name is not ours",
                EMPTY.replace("COMMIT", "-A PREROUTING -j PROXY_INIT_REDIRECT_OLD\nCOMMIT"),
                both.clone(),
            ),
            (
                "a jump in another chain is not the jump",
                EMPTY.replace("COMMIT", "-A POSTROUTING -j PROXY_INIT_REDIRECT\nCOMMIT"),
                both.clone(),
            ),
            (
                "the rule inside our chain that mentions OUTPUT is not a jump",
                EMPTY.replace(
                    "COMMIT",
                    "-A PROXY_INIT_OUTPUT -m comment --comment \"-A OUTPUT -j PROXY_INIT_OUTPUT\" -j RETURN\n-A PREROUTING -j PROXY_INIT_REDIRECT\nCOMMIT",
                ),
                output.clone(),
            ),
            (
                "a jump in another table does not count",
                format!(
                    "*filter\n-A OUTPUT -j PROXY_INIT_OUTPUT\nCOMMIT\n{}",
                    EMPTY.replace("COMMIT", "-A PREROUTING -j PROXY_INIT_REDIRECT\nCOMMIT")
                ),
                output,
            ),
        ];
        for (name, save, want) in cases {
            assert_eq!(plan.missing_jumps(&save), want, "{name}");
        }
    }

    #[test]
    fn restore_script() {
        let plan = plan(&Options::default());
        let first = plan.restore_script(&plan.jumps);
        assert_eq!(
            first,
            r#"*nat
:PROXY_INIT_REDIRECT - [0:0]
:PROXY_INIT_OUTPUT - [0:0]
-A PROXY_INIT_REDIRECT -p tcp -m multiport --dports 4190:4191 -m comment --comment "proxy-init/ignore-port-4190:4191" -j RETURN
-A PROXY_INIT_REDIRECT -p tcp -m comment --comment "proxy-init/redirect-all-incoming-to-proxy-port" -j REDIRECT --to-ports 4143
-A PROXY_INIT_OUTPUT -m owner --uid-owner 2102 -m comment --comment "proxy-init/ignore-proxy-user-id" -j RETURN
-A PROXY_INIT_OUTPUT -o lo -m comment --comment "proxy-init/ignore-loopback" -j RETURN
-A PROXY_INIT_OUTPUT -p tcp -m comment --comment "proxy-init/redirect-all-outgoing-to-proxy-port" -j REDIRECT --to-ports 4140
-A PREROUTING -m comment --comment "proxy-init/install-proxy-init-prerouting" -j PROXY_INIT_REDIRECT
-A OUTPUT -m comment --comment "proxy-init/install-proxy-init-output" -j PROXY_INIT_OUTPUT
COMMIT
"#
        );
        // A rerun: the same chains, no jumps.
        let again = plan.restore_script(&[]);
        assert_eq!(
            again,
            first
                .lines()
                .filter(|l| !l.starts_with("-A PREROUTING") && !l.starts_with("-A OUTPUT"))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
    }
}
