//! IPv6 and dual stack end to end in network namespaces, with both capture
//! backends: IPv6-only pods tunneled over IPv6, dual-stack pods reached in
//! the family their client dialed, a waypoint reached over IPv6, and pods
//! whose namespace has IPv6 disabled (an IPv4-only node) enrolled normally.
//! Needs root (fails, never skips, without it).
//!
//! Facts from ztunnel (istio/ztunnel@62d82653) these tests hold us to:
//! - the HBONE CONNECT authority is the target's `SocketAddr` text, so an
//!   IPv6 target is `[v6]:port` (src/proxy.rs, `HboneAddress` Display);
//! - the destination address keeps the family of the address the
//!   application dialed where the workload has one (src/state.rs,
//!   `pick_workload_destination_or_resolve`);
//! - in-pod listeners bind `[::]` when IPv6 is enabled (src/config.rs),
//!   taking IPv4 too;
//! - istio-cni skips its IPv6 loopback route when the pod's loopback has
//!   `disable_ipv6` = 1 (cni/pkg/iptables/iptables_linux.go), instead of
//!   failing the pod.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::{http_app, reviews_yaml, start_waypoint};
use ambient_agent::identity::Identity;
use ambient_agent::proxy::record::{ConnectionRecord, Direction};
use ambient_tests::netns::{Pod, Segment, Stack, Topology};
use ambient_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIP4: &str = "10.96.0.1";
const VIP6: &str = "fd96::1";

/// Every log line of this test binary (all its tests share one global
/// subscriber, so the IPv4-only test can read what capture logged).
fn logs() -> &'static CapturedLogs {
    static LOGS: OnceLock<CapturedLogs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    })
}

struct Mesh {
    topo: Topology,
    world: World,
    client: Pod,
    server: Pod,
    /// Not in the mesh, on the server's node.
    outside: Pod,
}

/// `client` on node-a; `server` and `outside` on node-b; all of `stack`.
/// Service `server` has a VIP of each family the pods have.
fn build(tag: &str, stack: Stack) -> Mesh {
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod_with("client", 0, stack).expect("pod");
    let server = topo.add_pod_with("server", 1, stack).expect("pod");
    let outside = topo.add_pod_with("outside", 1, stack).expect("pod");
    let world = World::new(0);
    let vips: Vec<String> = server
        .addresses()
        .iter()
        .map(|a| format!("\"{}\"", if a.is_ipv4() { VIP4 } else { VIP6 }))
        .collect();
    let yaml = format!(
        "workloads:\n{}{}services:\n  - name: server\n    namespace: test\n    vips: [{}]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [server]\n",
        pod_workload(&client, "node-a", "client"),
        pod_workload(&server, "node-b", "server"),
        vips.join(", ")
    );
    world.write_mesh(&yaml);
    Mesh {
        topo,
        world,
        client,
        server,
        outside,
    }
}

async fn agent(world: &World, node: &str, mode: CaptureMode) -> Agent {
    world.capturing_agent(node, mode).await
}

/// `from`'s pod-client process sends `len` bytes to `dst`; the echo must
/// come back intact.
async fn echo_ok(from: &Pod, dst: SocketAddr, len: usize, seed: u8) {
    let (sent, got) = run_pod_client(env!("CARGO_BIN_EXE_pod-client"), from, dst, len, seed).await;
    assert_eq!(sent, got, "echo from {} to {dst} intact", from.name);
}

fn vip(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("vip"), 80)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn inbound_records(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ConnectionRecord>>,
) -> Vec<ConnectionRecord> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        if r.direction == Direction::Inbound {
            out.push((*r).clone());
        }
    }
    out
}

async fn ipv6_only_pods(mode: CaptureMode, tag: &str) {
    logs();
    let m = build(tag, Stack::V6);
    let client6 = IpAddr::V6(m.client.ip6.expect("v6"));
    let _a = agent(&m.world, "node-a", mode).await;
    let b = agent(&m.world, "node-b", mode).await;
    let server_app = PodEcho::start(&m.server, 8080).await;
    let outside_app = PodEcho::start(&m.outside, 8080).await;
    let mut at_b = b.connections();
    let wire = m.topo.sniff_wire(0).expect("sniffer");

    // To the pod's address and to the service's IPv6 VIP, over HBONE.
    echo_ok(&m.client, m.server.addr6(8080), 64 * 1024, 1).await;
    echo_ok(&m.client, vip(VIP6), 64 * 1024, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen: Vec<Segment> = wire.finish();
    assert_eq!(server_app.peer_ips(), vec![client6, client6]);
    let mesh: Vec<&Segment> = seen
        .iter()
        .filter(|s| s.src.ip() == client6 || s.dst.ip() == client6)
        .collect();
    assert!(!mesh.is_empty(), "the sniffer saw IPv6 traffic: {seen:?}");
    for s in &mesh {
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
    let want = Identity::new("cluster.local", "test", "client");
    let tunneled = inbound_records(&mut at_b);
    assert_eq!(tunneled.len(), 2, "{tunneled:?}");
    for r in &tunneled {
        assert_eq!(r.src, client6, "{r:?}");
        assert_eq!(r.dst, m.server.addr6(8080), "{r:?}");
        assert_eq!(r.src_identity.as_ref(), Some(&want), "{r:?}");
        assert!(r.encrypted && r.error.is_none(), "{r:?}");
    }

    // Plaintext from outside the mesh into the pod (inbound capture), and
    // from the pod to a destination outside the mesh (passthrough): both
    // keep the pods' own IPv6 addresses.
    let outside6 = IpAddr::V6(m.outside.ip6.expect("v6"));
    echo_ok(&m.outside, m.server.addr6(8080), 4096, 3).await;
    assert_eq!(server_app.peer_ips().last(), Some(&outside6));
    let r = next_record_where(&mut at_b, |r| r.src == outside6).await;
    assert!(!r.encrypted && r.error.is_none(), "{r:?}");
    echo_ok(&m.client, m.outside.addr6(8080), 4096, 4).await;
    assert_eq!(outside_app.peer_ips(), vec![client6]);
}

#[tokio::test]
async fn ipv6_only_pods_are_tunneled_over_ipv6_nft() {
    ipv6_only_pods(CaptureMode::Nft, "v6n").await;
}

#[tokio::test]
async fn ipv6_only_pods_are_tunneled_over_ipv6_ebpf() {
    ipv6_only_pods(CaptureMode::Ebpf, "v6e").await;
}

async fn dual_stack_pods(mode: CaptureMode, tag: &str) {
    logs();
    let m = build(tag, Stack::Dual);
    let (client4, client6) = (
        IpAddr::V4(m.client.ip),
        IpAddr::V6(m.client.ip6.expect("v6")),
    );
    let _a = agent(&m.world, "node-a", mode).await;
    let b = agent(&m.world, "node-b", mode).await;
    let server_app = PodEcho::start(&m.server, 8080).await;
    let mut at_b = b.connections();

    // Each destination in the family dialed: the pod's two addresses,
    // then the service's two VIPs.
    let cases = [
        (m.server.addr(8080), client4, m.server.addr(8080)),
        (m.server.addr6(8080), client6, m.server.addr6(8080)),
        (vip(VIP4), client4, m.server.addr(8080)),
        (vip(VIP6), client6, m.server.addr6(8080)),
    ];
    for (i, (dialed, seen_from, reached)) in cases.into_iter().enumerate() {
        echo_ok(&m.client, dialed, 16 * 1024, i as u8).await;
        assert_eq!(
            server_app.peer_ips().last(),
            Some(&seen_from),
            "dialing {dialed}"
        );
        let r = next_record_where(&mut at_b, |r| r.direction == Direction::Inbound).await;
        assert_eq!(
            (r.src, r.dst),
            (seen_from, reached),
            "dialing {dialed}: {r:?}"
        );
        assert!(r.encrypted && r.error.is_none(), "{r:?}");
    }
}

#[tokio::test]
async fn dual_stack_pods_keep_the_family_dialed_nft() {
    dual_stack_pods(CaptureMode::Nft, "dsn").await;
}

#[tokio::test]
async fn dual_stack_pods_keep_the_family_dialed_ebpf() {
    dual_stack_pods(CaptureMode::Ebpf, "dse").await;
}

/// An IPv4-only node: IPv6 disabled in the pods' namespaces. Capture skips
/// its IPv6 part with one line per pod and the pods are served.
async fn ipv6_disabled(mode: CaptureMode, tag: &str) {
    let logs = logs();
    let m = build(tag, Stack::V4NoIpv6);
    let _a = agent(&m.world, "node-a", mode).await;
    let _b = agent(&m.world, "node-b", mode).await;
    let server_app = PodEcho::start(&m.server, 8080).await;
    echo_ok(&m.client, m.server.addr(8080), 16 * 1024, 1).await;
    echo_ok(&m.client, vip(VIP4), 16 * 1024, 2).await;
    assert_eq!(server_app.peer_ips(), vec![IpAddr::V4(m.client.ip); 2]);
    let text = logs.text();
    for pod in [&m.client, &m.server] {
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&pod.netns_path()))
            .filter(|l| l.contains("IPv6 is disabled in the namespace"))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {}: {lines:?}", pod.name);
    }
}

#[tokio::test]
async fn pods_without_ipv6_are_enrolled_nft() {
    ipv6_disabled(CaptureMode::Nft, "n6n").await;
}

#[tokio::test]
async fn pods_without_ipv6_are_enrolled_ebpf() {
    ipv6_disabled(CaptureMode::Ebpf, "n6e").await;
}

/// The reviews service behind the reference waypoint, all IPv6: the
/// client's agent tunnels to the waypoint at its IPv6 address asking for
/// `[fd96::1]:80`, the waypoint routes and tunnels on to the chosen
/// workload's agent over IPv6, which sees the original client.
#[tokio::test]
async fn a_waypoint_is_reached_over_ipv6() {
    logs();
    let topo = Topology::new("v6wp").expect("topology");
    let client = topo.add_pod_with("client", 0, Stack::V6).expect("pod");
    let v1 = topo.add_pod_with("v1", 1, Stack::V6).expect("pod");
    let v2 = topo.add_pod_with("v2", 1, Stack::V6).expect("pod");
    let wp = topo.add_pod_with("waypoint", 1, Stack::V6).expect("pod");
    let world = World::new(0);
    let mut yaml = String::from("workloads:\n");
    yaml += &client.workload_yaml("test", "node-a", "client");
    yaml += &reviews_yaml("test", "node-b", &v1, &v2, &wp, VIP6.parse().expect("vip"));
    world.write_mesh(&yaml);
    let _a = agent(&world, "node-a", CaptureMode::Nft).await;
    let b = agent(&world, "node-b", CaptureMode::Nft).await;
    let waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    let _apps = [
        http_app(&v1, "v1").await.expect("app"),
        http_app(&v2, "v2").await.expect("app"),
    ];
    let mut requests = waypoint.requests();
    let mut at_b = b.connections();

    let answer = |path: &'static str, version: &'static str| {
        let client = client.clone();
        async move {
            let req = format!(
                "GET {path} HTTP/1.1\r\nhost: reviews.test\r\nx-version: {version}\r\nconnection: close\r\n\r\n"
            );
            // Not half-closed: the request says `connection: close`.
            let mut s = client
                .sockets()
                .connect(vip(VIP6), Default::default())
                .await
                .expect("connect");
            s.write_all(req.as_bytes()).await.expect("request");
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
                .await
                .expect("answer in time")
                .expect("answer");
            String::from_utf8_lossy(&back).into_owned()
        }
    };
    let ok = answer("/reviews", "v2").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.ends_with("v2"), "{ok}");
    let denied = answer("/admin", "v2").await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");

    let client6 = IpAddr::V6(client.ip6.expect("v6"));
    let r = tokio::time::timeout(Duration::from_secs(5), requests.recv())
        .await
        .expect("a request record")
        .expect("record");
    assert_eq!((r.src, r.target, r.status), (client6, vip(VIP6), 200));
    let r = next_record_where(&mut at_b, |r| r.direction == Direction::Inbound).await;
    assert_eq!(r.src, client6, "the original client is kept: {r:?}");
    assert_eq!(r.dst, v2.addr6(8080), "{r:?}");
    assert_eq!(
        r.src_identity,
        Some(Identity::new("cluster.local", "test", "waypoint"))
    );
}
