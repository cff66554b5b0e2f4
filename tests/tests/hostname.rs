//! Workloads known by DNS name only (a ServiceEntry with DNS resolution):
//! a connection to their service's VIP is sent to the address the name
//! resolves to, looked up at the upstream resolvers the agent is
//! configured with. Needs root (fails, never skips, without it).
//!
//! Facts from ztunnel (istio/ztunnel@62d82653, src/state.rs
//! `pick_workload_destination_or_resolve`, `load_balance`): a workload
//! with a hostname and no address is still a service endpoint; its
//! address is resolved on demand when a connection picks it, an address
//! of the family dialed preferred; the connection then goes as to that
//! address (its tunnel protocol: plain TCP for an external name, HBONE
//! for a mesh one).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ambient_agent::capture::CaptureMode;
use ambient_agent::proxy::record::Direction;
use ambient_agent::socket::Sockets;
use ambient_tests::dns::Upstream;
use ambient_tests::netns::Topology;
use ambient_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_known_by_name_are_looked_up() {
    init_tracing();
    let topo = Topology::new("hostname").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let external = topo.add_pod("external", 1).expect("pod");
    let world = World::new(0);
    // ext.example: outside the mesh (plain TCP); mesh.example: the
    // server pod, whose agent takes HBONE.
    let dns = Upstream::start_with(
        &Sockets::Host,
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 53, 7)), 5353),
        vec![
            ("ext.example.".into(), IpAddr::V4(external.ip)),
            ("mesh.example.".into(), IpAddr::V4(server.ip)),
        ],
    )
    .await;
    let by_name = |uid: &str, sa: &str, host: &str, protocol: &str| {
        format!(
            "  - uid: {uid}\n    name: {uid}\n    namespace: test\n    serviceAccount: {sa}\n    addresses: []\n    hostname: {host}\n    node: elsewhere\n    protocol: {protocol}\n"
        )
    };
    let service = |name: &str, vip: &str, endpoint: &str| {
        format!(
            "  - name: {name}\n    namespace: test\n    vips: [\"{vip}\"]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [{endpoint}]\n"
        )
    };
    world.write_mesh(&format!(
        "workloads:\n{}{}{}{}{}services:\n{}{}{}",
        pod_workload(&client, "node-a", "client"),
        pod_workload(&server, "node-b", "server"),
        by_name("ext-dns", "ext", "ext.example", "NONE"),
        by_name("mesh-dns", "server", "mesh.example", "HBONE"),
        by_name("nowhere-dns", "nowhere", "nowhere.example", "NONE"),
        service("ext", "10.96.0.5", "ext-dns"),
        service("meshname", "10.96.0.6", "mesh-dns"),
        service("nowhere", "10.96.0.7", "nowhere-dns"),
    ));
    let agent = |node: &str| {
        let mut cfg = world.capturing_config(node, CaptureMode::Nft);
        cfg.dns.upstreams = vec![dns.addr.to_string()];
        world.agent_with(cfg)
    };
    let a = agent("node-a").await;
    let b = agent("node-b").await;
    let _ext = pod_who(&external, "external").await;
    let _srv = pod_who(&server, "server").await;
    let mut at_a = a.connections();
    let mut at_b = b.connections();

    // An external name: plain TCP to the address it resolves to.
    let vip = |ip: &str| SocketAddr::new(ip.parse().expect("vip"), 80);
    assert_eq!(
        pod_ask(&client, vip("10.96.0.5")).await.as_deref(),
        Some("external")
    );
    let r = next_record_where(&mut at_a, |r| r.direction == Direction::Outbound).await;
    assert!(!r.encrypted, "{r:?}");
    assert_eq!(r.error, None);
    assert!(dns.queries() >= 1, "the configured resolver was asked");

    // A mesh name: HBONE to the address it resolves to, whose agent must
    // prove the workload's identity (the server's service account: a
    // resolver cannot send the tunnel to someone else); it sees the
    // client's.
    assert_eq!(
        pod_ask(&client, vip("10.96.0.6")).await.as_deref(),
        Some("server")
    );
    let r = next_record_where(&mut at_b, |r| r.direction == Direction::Inbound).await;
    assert_eq!(
        r.src_identity.as_ref().map(|i| i.to_string()).as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );

    // A name that does not resolve: refused, nothing sent anywhere.
    assert_eq!(pod_ask(&client, vip("10.96.0.7")).await, None);
    let r = next_record_where(&mut at_a, |r| {
        r.direction == Direction::Outbound && r.error.is_some()
    })
    .await;
    assert!(
        r.error.as_deref().unwrap_or("").contains("nowhere.example"),
        "{r:?}"
    );
    dns.stop().await;
}
