//! The nft capture backend: rules inside a workload's network namespace
//! that send its TCP to the agent's listeners, as Istio's CNI does in-pod.
//! With `redirect` off the return path is installed with a fail-safe (the
//! eBPF backend redirects by itself but shares the return path): new TCP
//! the programs did not hand to the agent is refused.
//!
//! - outbound TCP (not the agent's own, marked sockets; not loopback) is
//!   REDIRECTed to the outbound port; the proxy reads `SO_ORIGINAL_DST`;
//! - inbound TCP to the workload (except HBONE) is REDIRECTed to the inbound
//!   plaintext port;
//! - kubelet probes, which istio-cni's node rules SNAT to
//!   [`KUBELET_PROBE_SOURCE_V4`] / [`KUBELET_PROBE_SOURCE_V6`], reach the
//!   application directly, as istio-cni's in-pod rules let them (a probe
//!   is plaintext, so the agent would refuse it under STRICT);
//! - the agent connects to applications from the client's address
//!   (transparent); the connection is tagged in conntrack and a policy route
//!   delivers the application's replies back to the agent's socket instead
//!   of out of the pod.
//!
//! The ruleset is one nft table written from [`NftCapture`] and applied in a
//! single transaction, so installing twice is the same as once and a pod
//! never sees half a ruleset.

use std::io::Write;
use std::process::{Command, Stdio};

use tracing::info;

use super::netns::Netns;

/// The nft table the agent owns in each captured namespace.
pub const TABLE: &str = "ambient_agent";
/// Connection mark for the agent's connections to local applications.
pub const CONN_MARK: u32 = 0x111;
/// Mask of the mark bits the agent uses.
pub const MARK_MASK: u32 = 0xfff;
/// Routing table that delivers replies to the agent's transparent sockets.
pub const ROUTE_TABLE: u32 = 133;
/// Where istio-cni's node rules SNAT kubelet probes to (its default
/// `HOST_PROBE_SNAT_ADDRESS`, link-local so no other host can send from it).
pub const KUBELET_PROBE_SOURCE_V4: &str = "169.254.7.127";
/// Its IPv6 twin (`HOST_PROBE_V6_SNAT_ADDRESS`).
pub const KUBELET_PROBE_SOURCE_V6: &str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff";
/// Priority of the policy routing rule.
pub const RULE_PRIORITY: u32 = 32764;

/// Capture settings for one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NftCapture {
    /// SO_MARK of the agent's sockets.
    pub socket_mark: u32,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub hbone_port: u16,
    /// Install the REDIRECT chains (nft mode); else only the return path.
    pub redirect: bool,
    /// Where the pod's DNS (UDP and TCP port 53) goes, when the DNS proxy
    /// runs (nft mode only).
    pub dns_port: Option<u16>,
}

/// Why capture could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
}

impl NftCapture {
    /// The complete ruleset, replacing any earlier version of the table.
    pub fn ruleset(&self) -> String {
        let NftCapture {
            socket_mark: agent,
            outbound_port,
            inbound_plaintext_port,
            hbone_port,
            redirect,
            dns_port,
        } = *self;
        let (conn, mask) = (CONN_MARK, MARK_MASK);
        let (probe4, probe6) = (KUBELET_PROBE_SOURCE_V4, KUBELET_PROBE_SOURCE_V6);
        let mut r = format!(
            r#"table inet {TABLE} {{}}
delete table inet {TABLE}
table inet {TABLE} {{
    chain prerouting_mangle {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "lo" meta mark & {mask:#x} == {agent:#x} ct mark set {conn:#x}
    }}
    chain output_route {{
        type route hook output priority mangle; policy accept;
        ct mark & {mask:#x} == {conn:#x} meta mark set ct mark
    }}
"#
        );
        if !redirect {
            // The eBPF programs redirect; these rules catch what they do
            // not (no agent running, a process outside the pod's cgroup,
            // a dual-stack socket): a new connection that leaves the pod
            // unmarked, or that arrives without being handed to the
            // agent's (marked) listener, is refused, never let through.
            r += &format!(
                r#"    chain failsafe_out {{
        type filter hook output priority filter; policy accept;
        oifname "lo" return
        meta l4proto != tcp return
        meta mark & {mask:#x} == {agent:#x} return
        ct state new reject with tcp reset
    }}
    chain failsafe_in {{
        type filter hook prerouting priority filter; policy accept;
        iifname "lo" return
        meta l4proto != tcp return
        tcp dport {hbone_port} return
        ip saddr {probe4} return
        ip6 saddr {probe6} return
        ct state new fib daddr type local socket mark != {agent:#x} drop
    }}
"#
            );
        }
        if redirect {
            // As istio-cni: UDP DNS not via lo, TCP DNS not to localhost.
            let dns = dns_port.map_or(String::new(), |p| {
                format!(
                    "        oifname != \"lo\" udp dport 53 redirect to :{p}\n        ip daddr != 127.0.0.1 tcp dport 53 redirect to :{p}\n"
                )
            });
            r += &format!(
                r#"    chain prerouting_nat {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "lo" return
        meta l4proto != tcp return
        tcp dport {hbone_port} return
        ip saddr {probe4} return
        ip6 saddr {probe6} return
        meta mark & {mask:#x} == {agent:#x} return
        fib daddr type local meta l4proto tcp redirect to :{inbound_plaintext_port}
    }}
    chain output_nat {{
        type nat hook output priority -100; policy accept;
        meta mark & {mask:#x} == {agent:#x} return
{dns}        meta l4proto != tcp return
        ct mark & {mask:#x} == {conn:#x} return
        ip daddr {probe4} return
        ip6 daddr {probe6} return
        oifname "lo" return
        meta l4proto tcp redirect to :{outbound_port}
    }}
"#
            );
        }
        r.push_str("}\n");
        r
    }

    /// Installs (or replaces) capture in `ns`. The IPv6 return path is
    /// skipped, with one log line, where the namespace has no IPv6 (an
    /// IPv4-only node); the ruleset, of the `inet` family, is the same.
    pub fn install(&self, ns: &Netns) -> Result<(), NftError> {
        run(ns.command("nft").args(["-f", "-"]), Some(&self.ruleset()))?;
        let families: &[&str] = if ns.has_ipv6().unwrap_or(true) {
            &["-4", "-6"]
        } else {
            info!(netns = %ns.path().display(), "IPv6 is disabled in the namespace; capturing IPv4 only");
            &["-4"]
        };
        for &family in families {
            // The route first (replace is atomic), then the rule pointing at
            // it. A rule already there (an earlier agent's) stays: deleting
            // and adding it again would leave the return path missing for
            // a moment while the pod is served.
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            let table = ROUTE_TABLE.to_string();
            run(
                ns.command("ip").args([
                    family, "route", "replace", "local", any, "dev", "lo", "table", &table,
                ]),
                None,
            )?;
            match run(ns.command("ip").args(rule_args(family, "add")), None) {
                Err(NftError::Failed { stderr, .. }) if stderr.contains("File exists") => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Removes everything [`NftCapture::install`] added; absent pieces are fine.
    pub fn remove(ns: &Netns) -> Result<(), NftError> {
        let mut first_err = None;
        let delete = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
        if let Err(e) = run(ns.command("nft").args(["-f", "-"]), Some(&delete)) {
            first_err.get_or_insert(e);
        }
        for family in ["-4", "-6"] {
            let _ = run(ns.command("ip").args(rule_args(family, "del")), None);
            let table = ROUTE_TABLE.to_string();
            let _ = run(
                ns.command("ip")
                    .args([family, "route", "flush", "table", &table]),
                None,
            );
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Whether the agent's table is present in `ns`.
    pub fn is_installed(ns: &Netns) -> Result<bool, NftError> {
        let out = output(ns.command("nft").args(["list", "tables"]))?;
        Ok(out
            .lines()
            .any(|l| l.trim() == format!("table inet {TABLE}")))
    }
}

fn rule_args(family: &'static str, verb: &'static str) -> Vec<String> {
    vec![
        family.into(),
        "rule".into(),
        verb.into(),
        "fwmark".into(),
        format!("{CONN_MARK:#x}/{MARK_MASK:#x}"),
        "pref".into(),
        RULE_PRIORITY.to_string(),
        "lookup".into(),
        ROUTE_TABLE.to_string(),
    ]
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<(), NftError> {
    let spawn_err = |cmd: &Command, source| NftError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| spawn_err(cmd, e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| spawn_err(cmd, e))?;
    }
    let out = child.wait_with_output().map_err(|e| spawn_err(cmd, e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed {
            command: describe(cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn output(cmd: &mut Command) -> Result<String, NftError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NftError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(NftError::Failed {
            command: describe(cmd),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_the_ports_and_marks() {
        let r = NftCapture {
            socket_mark: 0x539,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            redirect: true,
            dns_port: Some(15053),
        }
        .ruleset();
        assert!(r.starts_with("table inet ambient_agent {}\ndelete table inet ambient_agent\n"));
        assert!(r.contains("redirect to :15001"));
        assert!(r.contains("fib daddr type local meta l4proto tcp redirect to :15006"));
        assert!(r.contains("tcp dport 15008 return"));
        assert!(r.contains("meta mark & 0xfff == 0x539 return"));
        assert!(r.contains("ct mark set 0x111"));
        assert!(r.contains("ip saddr 169.254.7.127 return"));
        assert!(r.contains("udp dport 53 redirect to :15053"));
        assert!(r.contains("tcp dport 53 redirect to :15053"));
    }

    #[test]
    fn return_path_only_has_no_redirects_and_a_fail_safe() {
        let r = NftCapture {
            socket_mark: 0x539,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            hbone_port: 15008,
            redirect: false,
            dns_port: Some(15053),
        }
        .ruleset();
        assert!(!r.contains("redirect"));
        assert!(r.contains("meta mark set ct mark"));
        assert!(r.contains("ct state new reject with tcp reset"));
        assert!(r.contains("socket mark != 0x539 drop"));
        assert!(r.contains("ip saddr 169.254.7.127 return"));
    }
}
