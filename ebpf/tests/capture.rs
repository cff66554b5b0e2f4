//! End-to-end capture in network namespaces: a "pod" netns wired by a veth
//! pair to a "peer" netns, a cgroup v2 directory for the pod's processes,
//! the agent's listeners opened inside the pod netns by this process (which
//! plays the agent: it is outside the pod cgroup). Needs root, `ip`
//! (iproute2), `tc` and `bpftool`; fails loudly when any is missing.
//! Everything created is removed by guards, on success, failure or panic.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use ambient_ebpf::{
    EbpfCapture, EbpfError, LoadOptions, PodSpec, TcMode, AGENT_MARK, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
};
use common::*;

// ---------------------------------------------------------------- tests --

/// The agent's listeners in the pod netns.
struct AgentListeners {
    in4: TcpListener,
    in6: TcpListener,
    out4: TcpListener,
    out6: TcpListener,
    hbone: TcpListener,
}

fn agent_listeners(w: &World) -> AgentListeners {
    in_ns(&w.pod_ns(), || AgentListeners {
        in4: listener((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(), true),
        in6: listener((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(), true),
        out4: listener((Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT).into(), false),
        out6: listener((Ipv6Addr::UNSPECIFIED, OUTBOUND_PORT).into(), false),
        hbone: listener((Ipv4Addr::UNSPECIFIED, HBONE_PORT).into(), false),
    })
}

/// Inbound from the peer to `dst` is accepted by `l` with the original
/// destination as local address; returns the client's answer.
fn inbound_captured(w: &World, l: &TcpListener, dst: SocketAddr, who: &str) {
    std::thread::scope(|s| {
        let client = s.spawn(|| in_ns(&w.peer_ns(), || talk(dst, None)));
        let (conn, peer) =
            accept_within(l).unwrap_or_else(|e| panic!("inbound to {dst} not captured: {e}"));
        assert_eq!(
            conn.local_addr().expect("local addr"),
            dst,
            "getsockname is the original destination"
        );
        let expect_peer: IpAddr = if dst.is_ipv4() {
            w.peer4.into()
        } else {
            w.peer6.into()
        };
        assert_eq!(peer.ip(), expect_peer, "the client address is preserved");
        serve(conn, who);
        assert_eq!(
            client.join().expect("client thread").expect("client talk"),
            who
        );
    });
}

/// A pod process (in the pod cgroup) connecting to `dst` is accepted by
/// `l`, and SO_ORIGINAL_DST on the accepted socket is `dst`.
fn outbound_captured(w: &World, capture: &EbpfCapture, l: &TcpListener, dst: SocketAddr) {
    let client = PodClient::spawn(&w.pod_ns(), Some(&w.cgroup), None, dst, "agent-out");
    let accepted = accept_within(l);
    let (conn, peer) = match accepted {
        Ok(c) => c,
        Err(e) => {
            let code = client.wait();
            panic!(
                "outbound to {dst} not captured: {e} (client: {})",
                client_failure(code)
            );
        }
    };
    let pod_ip: IpAddr = if dst.is_ipv4() {
        w.pod4.into()
    } else {
        w.pod6.into()
    };
    assert_eq!(peer.ip(), pod_ip, "the agent sees the pod IP as the source");
    assert_eq!(
        original_dst(conn.as_raw_fd()),
        Some(dst),
        "SO_ORIGINAL_DST; {:?}",
        capture.stats()
    );
    serve(conn, "agent-out");
    let code = client.wait();
    assert_eq!(code, 0, "pod client: {}", client_failure(code));
}

/// A connection to the real peer server answered by the peer.
fn reaches_peer(peer: &TcpListener, client: impl FnOnce() -> i32 + Send, what: &str) {
    std::thread::scope(|s| {
        let c = s.spawn(client);
        let (conn, _) =
            accept_within(peer).unwrap_or_else(|e| panic!("{what}: never reached the peer: {e}"));
        serve(conn, "peer");
        let code = c.join().expect("client thread");
        assert_eq!(code, 0, "{what}: client: {}", client_failure(code));
    });
}

#[test]
fn captures_inbound_and_outbound_until_detached() {
    let w = World::new("full");
    let ips = w.pod_ips();
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load().expect("load capture");
    assert_eq!(capture.tc_mode(), TcMode::Tcx, "this kernel has TCX");
    let prog_ids = capture.program_ids().expect("program ids");
    let agent = agent_listeners(&w);
    let (peer4, peer6) = in_ns(&w.peer_ns(), || {
        (
            listener((w.peer4, PEER_PORT).into(), false),
            listener((w.peer6, PEER_PORT).into(), false),
        )
    });

    let att = capture.attach(&w.spec(&pod_ns, &ips)).expect("attach");
    assert!(
        tcx_ids(&w).contains(&prog_ids[0]),
        "classifier attached with TCX"
    );
    let cg = bpftool_cgroup(&w.cgroup);
    for hook in ["connect4", "connect6", "sock_ops"] {
        assert!(cg.contains(hook), "cgroup has {hook}: {cg}");
    }

    // (a) inbound: peer -> pod:8080 lands on the transparent 15006 listener.
    inbound_captured(&w, &agent.in4, (w.pod4, APP_PORT).into(), "agent-in");
    inbound_captured(&w, &agent.in6, (w.pod6, APP_PORT).into(), "agent-in6");
    // ... but HBONE goes to its own listener.
    std::thread::scope(|s| {
        let dst: SocketAddr = (w.pod4, HBONE_PORT).into();
        let peer_ns = w.peer_ns();
        let client = s.spawn(move || in_ns(&peer_ns, || talk(dst, None)));
        let (conn, _) = accept_within(&agent.hbone).expect("HBONE reaches 15008");
        assert_eq!(conn.local_addr().expect("local"), dst);
        serve(conn, "hbone");
        assert_eq!(client.join().expect("client").expect("talk"), "hbone");
    });
    assert_nothing_queued(&agent.in4, "15006 after HBONE");

    // (b) outbound: a pod process -> peer:9090 lands on 15001, original dst kept.
    outbound_captured(&w, &capture, &agent.out4, (w.peer4, PEER_PORT).into());
    outbound_captured(&w, &capture, &agent.out6, (w.peer6, PEER_PORT).into());

    // (c) not captured: the agent's mark inside the pod cgroup, a process
    // outside the pod cgroup (the agent itself), loopback.
    let peer_dst: SocketAddr = (w.peer4, PEER_PORT).into();
    reaches_peer(
        &peer4,
        || PodClient::spawn(&pod_ns, Some(&w.cgroup), Some(AGENT_MARK), peer_dst, "peer").wait(),
        "marked socket",
    );
    reaches_peer(
        &peer4,
        || in_ns(&pod_ns, || talk(peer_dst, None)).map_or(14, |a| if a == "peer" { 0 } else { 16 }),
        "process outside the pod cgroup",
    );
    let local = in_ns(&pod_ns, || {
        listener((Ipv4Addr::LOCALHOST, PEER_PORT).into(), false)
    });
    reaches_peer(
        &local,
        || {
            PodClient::spawn(
                &pod_ns,
                Some(&w.cgroup),
                None,
                (Ipv4Addr::LOCALHOST, PEER_PORT).into(),
                "peer",
            )
            .wait()
        },
        "loopback",
    );
    assert_nothing_queued(&agent.out4, "15001 after uncaptured connections");
    let stats = capture.stats().expect("stats");
    assert!(stats.inbound_assigned >= 2, "{stats:?}");
    assert!(stats.outbound_answered >= 2, "{stats:?}");
    assert!(stats.outbound_skipped >= 2, "{stats:?}");

    // (d) detach: nothing left, nothing captured.
    att.detach().expect("detach");
    assert!(!tcx_ids(&w).contains(&prog_ids[0]), "classifier detached");
    assert_eq!(
        in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]).trim(),
        ""
    );
    assert!(!in_netns_cmd(&w.pod, &["tc", "qdisc", "show", "dev", "eth0"]).contains("clsact"));
    let cg = bpftool_cgroup(&w.cgroup);
    assert!(
        !cg.contains("connect4") && !cg.contains("sock_ops"),
        "cgroup programs left: {cg}"
    );

    let refused = in_ns(&w.peer_ns(), || talk((w.pod4, APP_PORT).into(), None));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused),
        "no app on 8080 any more"
    );
    reaches_peer(
        &peer4,
        || PodClient::spawn(&pod_ns, Some(&w.cgroup), None, peer_dst, "peer").wait(),
        "pod process after detach",
    );
    reaches_peer(
        &peer6,
        || {
            PodClient::spawn(
                &pod_ns,
                Some(&w.cgroup),
                None,
                (w.peer6, PEER_PORT).into(),
                "peer",
            )
            .wait()
        },
        "pod process after detach (IPv6)",
    );
    assert_nothing_queued(&agent.in4, "15006 after detach");
    assert_nothing_queued(&agent.out4, "15001 after detach");

    // Dropping the capture unloads every program and the getsockopt hook.
    let getsockopt_id = prog_ids[4].to_string();
    assert!(
        bpftool_cgroup(&agent_cgroup()).contains(&getsockopt_id),
        "getsockopt on the agent cgroup"
    );
    drop(capture);
    wait_gone(&prog_ids);
    let agent_cg = bpftool_cgroup(&agent_cgroup());
    assert!(
        !agent_cg
            .lines()
            .any(|l| l.split_whitespace().next() == Some(getsockopt_id.as_str())),
        "getsockopt left on the agent cgroup: {agent_cg}"
    );
}

#[test]
fn legacy_tc_attach_removes_its_filter_and_qdisc() {
    let w = World::new("nl");
    let ips = [IpAddr::from(w.pod4)];
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load_with(&LoadOptions {
        tc: TcMode::Netlink,
        ..Default::default()
    })
    .expect("load");
    let prog_ids = capture.program_ids().expect("ids");
    let agent = agent_listeners(&w);
    let spec = PodSpec {
        netns: &pod_ns,
        cgroup: None,
        pod_ips: &ips,
        interface: "eth0",
        dns_port: None,
    };

    let att = capture.attach(&spec).expect("attach");
    let filters = in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("amb_inbound"),
        "filter installed: {filters}"
    );
    inbound_captured(&w, &agent.in4, (w.pod4, APP_PORT).into(), "agent-in");

    // Dropping (not detach) must clean up too, from whatever thread.
    drop(att);
    assert_eq!(
        in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]).trim(),
        ""
    );
    assert!(!in_netns_cmd(&w.pod, &["tc", "qdisc", "show", "dev", "eth0"]).contains("clsact"));
    let refused = in_ns(&w.peer_ns(), || talk((w.pod4, APP_PORT).into(), None));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused)
    );
    drop(capture);
    wait_gone(&prog_ids);
}

#[test]
fn failed_attach_leaves_nothing_and_duplicates_are_refused() {
    let w = World::new("err");
    let ips = w.pod_ips();
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load().expect("load");
    let prog_ids = capture.program_ids().expect("ids");

    let bad = PodSpec {
        interface: "nosuchif0",
        ..w.spec(&pod_ns, &ips)
    };
    assert!(
        matches!(capture.attach(&bad), Err(EbpfError::Program { .. })),
        "unknown interface"
    );
    let missing = PathBuf::from("/var/run/netns/amb-does-not-exist");
    let bad = PodSpec {
        netns: &missing,
        ..w.spec(&pod_ns, &ips)
    };
    assert!(matches!(capture.attach(&bad), Err(EbpfError::Netns { .. })));
    assert!(matches!(
        capture.attach(&PodSpec {
            pod_ips: &[],
            ..w.spec(&pod_ns, &ips)
        }),
        Err(EbpfError::NoPodAddress)
    ));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect"))
            .count(),
        0
    );
    assert!(!tcx_ids(&w).contains(&prog_ids[0]));

    // The failures above registered nothing: the real attach works, once.
    let att = capture
        .attach(&w.spec(&pod_ns, &ips))
        .expect("attach after failures");
    assert!(matches!(
        capture.attach(&w.spec(&pod_ns, &ips)),
        Err(EbpfError::AlreadyAttached(_))
    ));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect4"))
            .count(),
        1
    );
    att.detach().expect("detach");
    let again = capture
        .attach(&w.spec(&pod_ns, &ips))
        .expect("attach after detach");
    drop(again);
    assert!(!tcx_ids(&w).contains(&prog_ids[0]));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect"))
            .count(),
        0
    );
}
