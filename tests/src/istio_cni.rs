//! istio-cni's capture, reproduced for the test topology: the in-pod rule
//! set its node agent installs in an ambient pod before handing the pod to
//! the node proxy, and the node rule that SNATs kubelet probes.
//!
//! Facts from istio/istio `cni/pkg/nftables` (its golden files
//! `default.golden`, `hostprobe.golden`) and `cni/pkg/config`:
//! - marks: the proxy's sockets carry 0x539 (`InpodMark`, mask 0xfff);
//!   connections the proxy opens to the pod's applications get conntrack
//!   mark 0x111 (`InpodTProxyMark`), restored on the replies, which
//!   `ip rule fwmark 0x111/0xfff pref 32764` sends to table 100 (a
//!   `local` default route on lo), back to the proxy's transparent socket;
//! - nat PREROUTING: TCP from 169.254.7.127 (the kubelet-probe SNAT
//!   address) is accepted untouched; other TCP not to 127.0.0.1, not to
//!   15008 and not marked 0x539 is REDIRECTed to 15006;
//! - nat OUTPUT: to 169.254.7.127 accepted; DNS (UDP 53 not via lo, TCP 53
//!   not to 127.0.0.1) from unmarked sockets REDIRECTed to 15053 when DNS
//!   capture is on; mark 0x111 accepted; via lo to anything but 127.0.0.1
//!   accepted; other TCP not to 127.0.0.1 and unmarked REDIRECTed to 15001;
//! - raw: the proxy's DNS (UDP 53, marked) and answers to unmarked sockets
//!   go to conntrack zone 1;
//! - node: `postrouting` SNATs TCP from the kubelet's uid to the probed
//!   pods' addresses (set `istio-inpod-probes-v4`) to 169.254.7.127.
//!
//! The rules are written here from those facts (IPv4, the test topology's
//! family), not copied.

use crate::netns::in_ns;

/// The kubelet-probe SNAT address (`HOST_PROBE_SNAT_ADDRESS`'s default).
pub const PROBE_SOURCE: &str = "169.254.7.127";

/// The in-pod rules for a pod, with or without DNS capture (istio-cni's
/// `AMBIENT_DNS_CAPTURE`, on by default).
pub fn inpod_ruleset(dns_capture: bool) -> String {
    let dns = if dns_capture {
        "        oifname != \"lo\" meta mark & 0xfff != 0x539 udp dport 53 counter redirect to :15053\n\
         \x20       ip daddr != 127.0.0.1/32 tcp dport 53 meta mark & 0xfff != 0x539 counter redirect to :15053\n"
    } else {
        ""
    };
    let raw = if dns_capture {
        "table inet istio-ambient-raw {\n\
         \x20   chain prerouting { type filter hook prerouting priority -300; jump istio-prerouting; }\n\
         \x20   chain output { type filter hook output priority -300; jump istio-output; }\n\
         \x20   chain istio-prerouting {\n\
         \x20       udp sport 53 meta mark & 0xfff != 0x539 counter ct zone set 1\n\
         \x20   }\n\
         \x20   chain istio-output {\n\
         \x20       udp dport 53 meta mark & 0xfff == 0x539 counter ct zone set 1\n\
         \x20   }\n\
         }\n"
    } else {
        ""
    };
    format!(
        r#"table inet istio-ambient-nat {{
    chain prerouting {{ type nat hook prerouting priority -100; jump istio-prerouting; }}
    chain output {{ type nat hook output priority -100; jump istio-output; }}
    chain istio-prerouting {{
        meta l4proto tcp ip saddr {PROBE_SOURCE} counter accept
        ip daddr != 127.0.0.1/32 tcp dport != 15008 meta mark & 0xfff != 0x539 counter redirect to :15006
    }}
    chain istio-output {{
        meta l4proto tcp ip daddr {PROBE_SOURCE} counter accept
{dns}        meta l4proto tcp meta mark & 0xfff == 0x111 counter accept
        oifname "lo" ip daddr != 127.0.0.1/32 counter accept
        meta l4proto tcp ip daddr != 127.0.0.1/32 meta mark & 0xfff != 0x539 counter redirect to :15001
    }}
}}
table inet istio-ambient-mangle {{
    chain prerouting {{ type filter hook prerouting priority -150; jump istio-prerouting; }}
    chain output {{ type route hook output priority -150; jump istio-output; }}
    chain istio-prerouting {{
        meta mark & 0xfff == 0x539 counter ct mark set ct mark & 0xfffff000 | 0x111
    }}
    chain istio-output {{
        ct mark & 0xfff == 0x111 counter meta mark set ct mark
    }}
}}
{raw}"#
    )
}

/// Installs istio-cni's in-pod rules (tables, mark rule, loopback route)
/// in the network namespace `netns`, as its node agent does before it
/// hands the pod over.
pub fn install_inpod(netns: &str, dns_capture: bool) -> Result<(), String> {
    nft(netns, &inpod_ruleset(dns_capture))?;
    in_ns(
        netns,
        "ip",
        &[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    )?;
    in_ns(netns, "ip", &mark_rule("add"))?;
    Ok(())
}

/// Removes what [`install_inpod`] added, as istio-cni does after telling
/// the node proxy the pod is gone.
pub fn remove_inpod(netns: &str) -> Result<(), String> {
    for table in [
        "istio-ambient-nat",
        "istio-ambient-mangle",
        "istio-ambient-raw",
    ] {
        let _ = in_ns(netns, "nft", &["delete", "table", "inet", table]);
    }
    let _ = in_ns(netns, "ip", &mark_rule("del"));
    let _ = in_ns(netns, "ip", &["route", "flush", "table", "100"]);
    Ok(())
}

/// `ip rule <verb>` for istio-cni's mark rule (InpodTProxyMark 0x111,
/// mask 0xfff, priority 32764, RouteTableInbound 100).
fn mark_rule(verb: &str) -> [&str; 8] {
    [
        "rule",
        verb,
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]
}

/// Whether istio-cni's in-pod nat table is in `netns`.
pub fn has_inpod(netns: &str) -> bool {
    in_ns(netns, "nft", &["list", "tables"]).is_ok_and(|t| t.contains("istio-ambient-nat"))
}

/// The node rule SNATing the kubelet's probes (TCP from `kubelet_uid`) to
/// `pods` to [`PROBE_SOURCE`], in the node namespace `node_netns`.
pub fn install_host_probe_snat(
    node_netns: &str,
    kubelet_uid: u32,
    pods: &[std::net::Ipv4Addr],
) -> Result<(), String> {
    let elements = pods
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    nft(
        node_netns,
        &format!(
            r#"table inet istio-ambient-nat {{
    set istio-inpod-probes-v4 {{ type ipv4_addr; elements = {{ {elements} }} }}
    chain postrouting {{
        type nat hook postrouting priority 100;
        meta l4proto tcp meta skuid {kubelet_uid} ip daddr @istio-inpod-probes-v4 counter snat ip to {PROBE_SOURCE}
    }}
}}
"#
        ),
    )
}

/// A kubelet-style probe: from the node namespace `node_netns` (as root,
/// the kubelet's usual uid), a TCP connection to `dst` that sends a line
/// and expects it echoed. True if it was.
pub async fn kubelet_probe(node_netns: &str, dst: std::net::SocketAddr) -> bool {
    use ambient_agent::capture::netns::Netns;
    use ambient_agent::socket::Sockets;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = std::path::PathBuf::from(format!("/var/run/netns/{node_netns}"));
    let ns = Netns::open(&path).expect("node netns");
    let sockets = Sockets::Netns(std::sync::Arc::new(ns));
    let attempt = async {
        let mut s = sockets.connect(dst, Default::default()).await?;
        let msg = b"GET /healthz HTTP/1.1\r\n";
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(back == msg)
    };
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
}

fn nft(netns: &str, ruleset: &str) -> Result<(), String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(ruleset.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft -f in {netns}: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_capture_adds_the_15053_redirects_and_the_raw_table() {
        let with = inpod_ruleset(true);
        let without = inpod_ruleset(false);
        assert_eq!(with.matches("redirect to :15053").count(), 2);
        assert!(with.contains("table inet istio-ambient-raw"));
        assert!(!without.contains("15053") && !without.contains("istio-ambient-raw"));
        for r in [&with, &without] {
            assert!(r.contains("ip saddr 169.254.7.127 counter accept"));
            assert!(r.contains("redirect to :15006") && r.contains("redirect to :15001"));
        }
    }
}
