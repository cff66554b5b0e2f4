//! End to end in network namespaces: pods' ordinary sockets captured by the
//! agents of two nodes and carried over HBONE. Needs root (fails, never
//! skips, without it). Every test runs for each capture backend.

use std::net::IpAddr;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::proxy::record::{ConnectionRecord, Direction};
use ambient_tests::netns::{in_ns, Pod, Segment, Topology};
use ambient_tests::*;

struct Mesh {
    topo: Topology,
    world: World,
    client: Pod,
    server: Pod,
    neighbour: Pod,
    outside: Pod,
    loner: Pod,
}

/// node 0: client, neighbour (same node as client), loner (not in the mesh)
/// node 1: server, outside (not in the mesh)
fn build(tag: &str) -> Mesh {
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let neighbour = topo.add_pod("neighbour", 0).expect("pod");
    let loner = topo.add_pod("loner", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let outside = topo.add_pod("outside", 1).expect("pod");
    let world = World::new(0);
    let mut yaml = String::from("workloads:\n");
    yaml += &pod_workload(&client, "node-a", "client");
    yaml += &pod_workload(&neighbour, "node-a", "neighbour");
    yaml += &pod_workload(&server, "node-b", "server");
    world.write_mesh(&yaml);
    Mesh {
        topo,
        world,
        client,
        server,
        neighbour,
        outside,
        loner,
    }
}

async fn agent(m: &Mesh, node: &str, mode: CaptureMode) -> Agent {
    m.world.capturing_agent(node, mode).await
}

/// Runs the `pod-client` application inside `from`: see [`run_pod_client`].
async fn echo_through(
    from: &Pod,
    dst: std::net::SocketAddr,
    len: usize,
    seed: u8,
) -> (String, String) {
    run_pod_client(env!("CARGO_BIN_EXE_pod-client"), from, dst, len, seed).await
}

fn records(
    rx: &mut tokio::sync::broadcast::Receiver<std::sync::Arc<ConnectionRecord>>,
) -> Vec<ConnectionRecord> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push((*r).clone());
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn mesh_traffic_is_tunneled(mode: CaptureMode, tag: &str) {
    init_tracing();
    let m = build(tag);
    let a = agent(&m, "node-a", mode).await;
    let b = agent(&m, "node-b", mode).await;
    let server_app = PodEcho::start(&m.server, 8080).await;
    let neighbour_app = PodEcho::start(&m.neighbour, 8080).await;
    let mut inbound_b = b.connections();
    let mut inbound_a = a.connections();
    let wire = m.topo.sniff_wire(0).expect("sniffer");

    // Cross-node, many at once.
    let mut tasks = Vec::new();
    for i in 0..20u8 {
        let client = m.client.clone();
        let dst = m.server.addr(8080);
        tasks.push(tokio::spawn(async move {
            let (sent, got) = echo_through(&client, dst, 64 * 1024 + usize::from(i) * 100, i).await;
            assert_eq!(sent, got, "connection {i} intact");
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    // Same node.
    let (sent, got) = echo_through(&m.client, m.neighbour.addr(8080), 256 * 1024, 99).await;
    assert_eq!(sent, got);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<Segment> = wire.finish();

    // The applications saw the client pod's own address.
    let client_ip = IpAddr::V4(m.client.ip);
    assert_eq!(server_app.peer_ips().len(), 20);
    assert!(
        server_app.peer_ips().iter().all(|ip| *ip == client_ip),
        "{:?}",
        server_app.peer_ips()
    );
    assert_eq!(neighbour_app.peer_ips(), vec![client_ip]);

    // Between the nodes only HBONE (port 15008), and never the plaintext.
    let tcp: Vec<&Segment> = seen.iter().collect();
    assert!(!tcp.is_empty(), "the sniffer saw the tunneled traffic");
    for s in &tcp {
        assert!(
            s.src.port() == 15008 || s.dst.port() == 15008,
            "non-HBONE segment on the wire: {} -> {}",
            s.src,
            s.dst
        );
        assert!(
            !contains(&s.payload, MARKER),
            "plaintext on the wire: {} -> {}",
            s.src,
            s.dst
        );
    }

    // The destination agents report the client's identity.
    let want = "spiffe://cluster.local/ns/test/sa/client";
    let b_in: Vec<_> = records(&mut inbound_b)
        .into_iter()
        .filter(|r| r.direction == Direction::Inbound)
        .collect();
    assert_eq!(b_in.len(), 20, "{b_in:?}");
    for r in &b_in {
        assert_eq!(r.src, client_ip);
        assert_eq!(
            r.src_identity.as_ref().map(|i| i.to_string()).as_deref(),
            Some(want)
        );
        assert!(r.encrypted && r.error.is_none());
    }
    let a_in: Vec<_> = records(&mut inbound_a)
        .into_iter()
        .filter(|r| r.direction == Direction::Inbound)
        .collect();
    assert_eq!(
        a_in.len(),
        1,
        "same-node connection arrives over HBONE too: {a_in:?}"
    );
    assert_eq!(a_in[0].dst, m.neighbour.addr(8080));
    drop((a, b));
}

async fn outside_and_unenrolled_are_not_tunneled(mode: CaptureMode, tag: &str) {
    init_tracing();
    let m = build(tag);
    let a = agent(&m, "node-a", mode).await;
    let _b = agent(&m, "node-b", mode).await;
    let outside_app = PodEcho::start(&m.outside, 9090).await;
    let server_app = PodEcho::start(&m.server, 8080).await;
    let mut out_a = a.connections();
    let wire = m.topo.sniff_wire(0).expect("sniffer");

    // A destination outside the mesh passes through, from the pod's address.
    let (sent, got) = echo_through(&m.client, m.outside.addr(9090), 32 * 1024, 1).await;
    assert_eq!(sent, got);
    assert_eq!(outside_app.peer_ips(), vec![IpAddr::V4(m.client.ip)]);

    // A pod that is not enrolled is not captured: it reaches the server in
    // plaintext (the server's own capture hands it over as plaintext).
    let (sent, got) = echo_through(&m.loner, m.server.addr(8080), 32 * 1024, 2).await;
    assert_eq!(sent, got);
    assert_eq!(server_app.peer_ips(), vec![IpAddr::V4(m.loner.ip)]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = wire.finish();

    let records = records(&mut out_a);
    let outbound: Vec<_> = records
        .iter()
        .filter(|r| r.direction == Direction::Outbound)
        .collect();
    assert_eq!(
        outbound.len(),
        1,
        "only the client's connection was captured: {records:?}"
    );
    assert!(!outbound[0].encrypted, "outside the mesh: passthrough");
    assert!(
        seen.iter()
            .any(|s| s.dst == m.outside.addr(9090) && contains(&s.payload, MARKER)),
        "passthrough traffic crosses the wire untouched"
    );
    assert!(
        seen.iter()
            .any(|s| s.src.ip() == IpAddr::V4(m.loner.ip) && s.dst == m.server.addr(8080)),
        "the unenrolled pod's traffic went straight to the server"
    );
}

/// Capture comes off a pod when its workload leaves the mesh (here: gone
/// from the mesh file), and then nothing of it is left. (Stopping the
/// agent is another matter: see `stop_fails_closed.rs`.)
async fn leaving_the_mesh_leaves_nothing_behind(mode: CaptureMode, tag: &str) {
    init_tracing();
    let m = build(tag);
    let a = agent(&m, "node-a", mode).await;
    let _outside_app = PodEcho::start(&m.outside, 9090).await;
    let mut outbound = a.connections();
    let (sent, got) = echo_through(&m.client, m.outside.addr(9090), 1024, 3).await;
    assert_eq!(sent, got);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        records(&mut outbound).len(),
        1,
        "captured while the agent runs"
    );
    let rules = in_ns(&m.client.netns, "nft", &["list", "tables"]).expect("nft list");
    assert!(
        rules.contains("ambient_agent"),
        "capture installed: {rules}"
    );
    let mut yaml = String::from("workloads:\n");
    yaml += &pod_workload(&m.server, "node-b", "server");
    m.world.write_mesh(&yaml);
    for uid in ["client", "neighbour"] {
        for _ in 0..100 {
            if a.listeners(uid).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(a.listeners(uid).is_none(), "{uid} still served");
    }
    for pod in [&m.client, &m.neighbour] {
        let rules = in_ns(&pod.netns, "nft", &["list", "tables"]).expect("nft list");
        assert!(
            !rules.contains("ambient_agent"),
            "{}: rules left: {rules}",
            pod.name
        );
        let ip_rules = in_ns(&pod.netns, "ip", &["rule", "show"]).expect("ip rule");
        assert!(
            !ip_rules.contains("lookup 133"),
            "{}: policy rule left: {ip_rules}",
            pod.name
        );
        let routes =
            in_ns(&pod.netns, "ip", &["route", "show", "table", "133"]).unwrap_or_default();
        assert!(
            routes.trim().is_empty(),
            "{}: routes left: {routes}",
            pod.name
        );
        let listening = in_ns(&pod.netns, "ss", &["-Htln"]).expect("ss");
        assert!(
            listening.trim().is_empty(),
            "{}: listeners left: {listening}",
            pod.name
        );
        // eBPF: no tc filter on the pod's interface, nothing on its cgroup.
        let tc = in_ns(
            &pod.netns,
            "tc",
            &["filter", "show", "dev", "eth0", "ingress"],
        )
        .unwrap_or_default();
        assert!(tc.trim().is_empty(), "{}: tc filters left: {tc}", pod.name);
        let cgroup = pod.cgroup.display().to_string();
        let progs =
            ambient_tests::netns::run("bpftool", &["cgroup", "show", &cgroup]).expect("bpftool");
        assert!(
            progs.trim().is_empty(),
            "{}: cgroup programs left: {progs}",
            pod.name
        );
    }
    // Traffic now flows directly, uncaptured.
    let (sent, got) = echo_through(&m.client, m.outside.addr(9090), 1024, 3).await;
    assert_eq!(sent, got);
    assert!(records(&mut outbound).is_empty(), "still captured");
    drop(a);
    let names = m.topo.remaining_namespaces();
    drop(m);
    assert!(!names.is_empty());
    let leftover: Vec<String> = ambient_tests::netns::ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter(|l| names.iter().any(|n| l.starts_with(n.as_str())))
        .map(str::to_string)
        .collect();
    assert!(leftover.is_empty(), "namespaces left: {leftover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_mesh_traffic_is_tunneled() {
    mesh_traffic_is_tunneled(CaptureMode::Nft, "nft-mesh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_outside_and_unenrolled_are_not_tunneled() {
    outside_and_unenrolled_are_not_tunneled(CaptureMode::Nft, "nft-out").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nft_leaving_the_mesh_leaves_nothing_behind() {
    leaving_the_mesh_leaves_nothing_behind(CaptureMode::Nft, "nft-stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_mesh_traffic_is_tunneled() {
    mesh_traffic_is_tunneled(CaptureMode::Ebpf, "bpf-mesh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_outside_and_unenrolled_are_not_tunneled() {
    outside_and_unenrolled_are_not_tunneled(CaptureMode::Ebpf, "bpf-out").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_leaving_the_mesh_leaves_nothing_behind() {
    leaving_the_mesh_leaves_nothing_behind(CaptureMode::Ebpf, "bpf-stop").await;
}
