//! Kubelet probes under STRICT. istio-cni SNATs the kubelet's probes to
//! 169.254.7.127 on the node (`postrouting`, kubelet's uid, probed pods'
//! addresses) and its in-pod rules accept TCP from that address before any
//! redirect (istio/istio cni/pkg/nftables, `hostprobe.golden` and
//! `default.golden`), so a plaintext probe reaches the application even
//! when STRICT refuses every other plaintext client. The agent's own
//! capture (nft and eBPF) must let it through the same way, and the
//! agent must work under the CNI's rules. Needs root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ambient_agent::capture::CaptureMode;
use ambient_tests::istio::*;
use ambient_tests::istio_cni::{install_host_probe_snat, kubelet_probe, PROBE_SOURCE};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::pods::*;
use ambient_tests::*;

/// STRICT as istiod converts it for ztunnel: DENY sources without a
/// principal.
fn strict() -> String {
    on_server("strict", "DENY", "notPrincipals: [\"*\"]")
}

/// On the server's node: a probe is refused as plaintext until the CNI's
/// SNAT applies to it, then reaches the application as 169.254.7.127,
/// while other plaintext stays refused and the mesh client gets through.
async fn probes_pass_strict(topo: &Topology, server: &Pod, outside: &Pod, client: &Pod) {
    let echo = PodEcho::start(server, 8080).await;
    let app = SocketAddr::new(IpAddr::V4(server.ip), 8080);
    let node = &topo.node_names()[server.node];
    assert!(
        !kubelet_probe(node, app).await,
        "an un-SNATed probe is plaintext from the node: STRICT refuses it"
    );
    assert!(echo.peer_ips().is_empty());
    install_host_probe_snat(node, 0, &[server.ip]).expect("the CNI's node rule");
    assert!(
        kubelet_probe(node, app).await,
        "the kubelet's probe under STRICT"
    );
    let probe: Ipv4Addr = PROBE_SOURCE.parse().unwrap();
    assert_eq!(echo.peer_ips(), vec![IpAddr::V4(probe)]);
    assert!(!allowed(outside, app).await, "plaintext under STRICT");
    // A process of the client pod (its cgroup too, for eBPF capture).
    let exe = env!("CARGO_BIN_EXE_pod-client");
    let (sent, got) = run_pod_client(exe, client, app, 4096, 3).await;
    assert_eq!(sent, got, "mTLS under STRICT");
}

async fn with_the_agents_capture(mode: CaptureMode, tag: &str) {
    init_tracing();
    let m = PodMesh::build(tag);
    let a = m.agent_capturing("node-a", mode).await;
    let b = m.agent_capturing("node-b", mode).await;
    apply(&m, &[&a, &b], &[("strict", strict())]).await;
    probes_pass_strict(&m.topo, &m.server, &m.outside, &m.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_probe_passes_strict_with_nft_capture() {
    with_the_agents_capture(CaptureMode::Nft, "probenft").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_probe_passes_strict_with_ebpf_capture() {
    with_the_agents_capture(CaptureMode::Ebpf, "probebpf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_probe_passes_strict_under_istio_cni_rules() {
    init_tracing();
    let topo = Topology::new("probecni").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let outside = topo.add_pod("outside", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let mut mesh = mesh_of(&[(&client, "node-a"), (&server, "node-b")]);
    mesh += "policies:\n";
    mesh += &strict();
    let world = IstioWorld::start(&mesh, 25025).await;
    assert_eq!(world.add_pod(0, &client, info("client")).await, Ok(()));
    assert_eq!(world.add_pod(1, &server, info("server")).await, Ok(()));
    wait_for("the policy", || {
        !world.agents[1]
            .state
            .snapshot()
            .to_mesh()
            .policies
            .is_empty()
    })
    .await;
    probes_pass_strict(&topo, &server, &outside, &client).await;
}
