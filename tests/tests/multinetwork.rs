//! Two networks in network namespaces: node-a's pods are network `net1`,
//! node-b's `net2`, and the wire between them carries nothing but
//! connections to net2's east-west gateway on 15008 (the nodes drop the
//! rest). A client on net1 reaches a service whose endpoints are on net2
//! by double HBONE through the gateway. Needs root (fails, never skips,
//! without it).
//!
//! Facts from ztunnel (istio/ztunnel@62d82653, src/proxy/outbound.rs and
//! src/proxy/inbound.rs) these tests hold us to:
//! - a destination on another network is reached through its network's
//!   gateway, only when addressed by service (`build_request_through_gateway`);
//! - the outer and inner CONNECT both ask for `service-hostname:port`;
//!   the outer tunnel's peer is the gateway, the inner one's the
//!   destination, so the destination's agent sees the client's identity;
//! - the destination's agent takes a hostname authority and sends the
//!   bytes to its own workload on the service's target port
//!   (`find_inbound_upstream`);
//! - the client's workload certificate is presented on both tunnels, so
//!   the gateway's policies see the client's identity too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::gateway::start_gateway;
use ambient_agent::gateway::{Gateway, StreamRecord};
use ambient_agent::proxy::record::{ConnectionRecord, Direction};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;

const VIP: &str = "10.96.0.1:80";
const HOST: &str = "server.test.svc.cluster.local";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/test/sa/client";

struct Networks {
    topo: Topology,
    world: World,
    client: Pod,
    /// An endpoint on the client's network (for failover).
    near: Pod,
    server: Pod,
    /// Where net2's gateway runs: not captured, as Istio's gateways.
    ewgw: Pod,
}

fn build(tag: &str) -> Networks {
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let near = topo.add_pod("near", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let ewgw = topo.add_pod("ewgw", 1).expect("pod");
    topo.only_through(1, &[ewgw.addr(15008)])
        .expect("net2's edge");
    topo.only_through(0, &[]).expect("net1's edge");
    Networks {
        topo,
        world: World::new(0),
        client,
        near,
        server,
        ewgw,
    }
}

impl Networks {
    /// The mesh: `client` and `near` on net1, `server` on net2 behind the
    /// gateway `ewgw` (namespace `gateways`, by address, on a node no
    /// agent serves: a gateway is not captured, as Istio's are not);
    /// service `server`
    /// backed by `endpoints`, with `lb` (a `loadBalancing:` value) and
    /// `policies` (`policies:` list items).
    fn write_mesh(&self, endpoints: &str, lb: &str, policies: &str) {
        let on = |pod: &Pod, node: &str, sa: &str, net: &str, extra: String| {
            format!(
                "{}    network: {net}\n{extra}",
                pod.workload_yaml("test", node, sa)
            )
        };
        let gw = format!(
            "    networkGateway: {{address: \"{}\", hbonePort: 15008}}\n",
            self.ewgw.ip
        );
        let yaml = format!(
            "workloads:\n{}{}{}  - uid: ewgw\n    name: ewgw\n    namespace: gateways\n    serviceAccount: eastwest\n    addresses: [\"{}\"]\n    node: gateways\n    network: net2\n\
             services:\n  - name: server\n    namespace: test\n    vips: [\"10.96.0.1\"]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [{endpoints}]\n{lb}\
             {policies}",
            on(&self.client, "node-a", "client", "net1", String::new()),
            on(&self.near, "node-a", "near", "net1", String::new()),
            on(&self.server, "node-b", "server", "net2", gw),
            self.ewgw.ip,
            policies = if policies.is_empty() {
                "policies: []\n".to_string()
            } else {
                format!("policies:\n{policies}")
            },
        );
        self.world.write_mesh(&yaml);
    }

    async fn gateway(&self) -> Gateway {
        start_gateway(&self.world.mesh_path(), &self.world.ca, &self.ewgw, "ewgw")
            .await
            .expect("gateway")
    }
}

async fn agent(world: &World, node: &str) -> Agent {
    world.capturing_agent(node, CaptureMode::Nft).await
}

fn vip() -> SocketAddr {
    VIP.parse().expect("vip")
}

async fn next_stream(rx: &mut tokio::sync::broadcast::Receiver<Arc<StreamRecord>>) -> StreamRecord {
    let r = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a gateway record in time")
        .expect("gateway records");
    (*r).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_another_network_through_its_gateway() {
    init_tracing();
    let n = build("mn-through");
    n.write_mesh("server", "", "");
    let a = agent(&n.world, "node-a").await;
    let b = agent(&n.world, "node-b").await;
    let gw = n.gateway().await;
    let _app = pod_who(&n.server, "server").await;
    let mut at_a = a.connections();
    let mut at_b = b.connections();
    let mut at_gw = gw.streams();
    let wire = n.topo.sniff_wire(0).expect("sniffer");

    // Nothing crosses but through the gateway: the server's own address
    // is another network's, refused by the client's agent (never dialed).
    assert_eq!(pod_ask(&n.client, n.server.addr(8080)).await, None);
    let r = next_record_where(&mut at_a, |r| r.direction == Direction::Outbound).await;
    assert!(
        r.error
            .as_deref()
            .unwrap_or("")
            .contains("another network is reached by a service"),
        "{r:?}"
    );

    // The service, by its VIP: through the gateway, end to end.
    for _ in 0..3 {
        assert_eq!(pod_ask(&n.client, vip()).await.as_deref(), Some("server"));
    }
    let s = next_stream(&mut at_gw).await;
    assert_eq!(s.status, 200, "{s:?}");
    assert_eq!(s.authority, format!("{HOST}:80"));
    assert_eq!(s.src_identity.to_string(), CLIENT_ID, "the gateway's peer");
    assert_eq!(s.endpoint.as_deref(), Some("server"));
    assert_eq!(s.upstream, Some(n.server.addr(15008)));
    // The destination's agent saw the client's identity, through the
    // gateway's address.
    let r: Arc<ConnectionRecord> =
        next_record_where(&mut at_b, |r| r.direction == Direction::Inbound).await;
    assert_eq!(
        r.src_identity.as_ref().map(|i| i.to_string()).as_deref(),
        Some(CLIENT_ID)
    );
    assert_eq!(r.src, n.ewgw.addr(0).ip());
    // Named by its identity, not by the gateway's address (ztunnel does
    // not look the source up by address when `x-forwarded-network` names
    // another network).
    assert_eq!(r.src_workload.name.as_deref(), Some("client"));
    assert_eq!(r.dst, n.server.addr(8080));
    assert!(r.error.is_none(), "{r:?}");

    // The wire between the networks carried only TLS to the gateway.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = wire.finish();
    let gw_hbone = n.ewgw.addr(15008);
    let with_data: Vec<_> = seen.iter().filter(|s| !s.payload.is_empty()).collect();
    assert!(!with_data.is_empty(), "the sniffer saw the tunnels");
    for seg in &seen {
        assert!(
            seg.dst == gw_hbone || seg.src == gw_hbone,
            "only the gateway's HBONE port crosses: {seg:?}"
        );
    }
    for seg in with_data {
        let p = &seg.payload;
        assert!(
            !p.windows(6).any(|w| w == b"server") && !p.windows(4).any(|w| w == b"who?"),
            "plaintext on the wire: {seg:?}"
        );
    }
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_at_the_destination_and_at_the_gateway() {
    let n = build("mn-policy");
    let deny = |name: &str, namespace: &str, uid: &str| {
        format!(
            "  - name: {name}\n    namespace: {namespace}\n    scope: WORKLOAD_SELECTOR\n    selector: [{uid}]\n    action: DENY\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/test/sa/client\"]\n"
        )
    };
    // At the destination: its agent denies the client's identity, which
    // it learns from the inner mTLS; the gateway let the bytes through.
    n.write_mesh("server", "", &deny("deny-client", "test", "server"));
    let _a = agent(&n.world, "node-a").await;
    let b = agent(&n.world, "node-b").await;
    let gw = n.gateway().await;
    let _app = pod_who(&n.server, "server").await;
    let mut at_b = b.connections();
    let mut at_gw = gw.streams();
    wait_for_policies(&b, &["deny-client"]).await;
    assert_eq!(pod_ask(&n.client, vip()).await, None);
    let r = next_record_where(&mut at_b, |r| r.direction == Direction::Inbound).await;
    assert_eq!(
        r.src_identity.as_ref().map(|i| i.to_string()).as_deref(),
        Some(CLIENT_ID)
    );
    assert!(r.error.as_deref().unwrap_or("").contains("401"), "{r:?}");
    assert_eq!(next_stream(&mut at_gw).await.status, 200);
    drop(gw);

    // At the gateway: its policy sees the outer peer's identity (the
    // client's certificate, as ztunnel presents it); nothing reaches b.
    n.write_mesh("server", "", &deny("deny-client-at-gw", "gateways", "ewgw"));
    let gw = n.gateway().await;
    let mut at_gw = gw.streams();
    assert_eq!(pod_ask(&n.client, vip()).await, None);
    let s = next_stream(&mut at_gw).await;
    assert_eq!(s.status, 401, "{s:?}");
    assert_eq!(s.src_identity.to_string(), CLIENT_ID);
    assert!(s.endpoint.is_none());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !std::iter::from_fn(|| at_b.try_recv().ok()).any(|r| r.direction == Direction::Inbound),
        "nothing reached the destination"
    );
}

/// FAILOVER with NETWORK first: while the client's network has a healthy
/// endpoint every connection stays there; when it has none, the next
/// connections go through the gateway to the other network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locality_failover_moves_traffic_to_the_other_network() {
    let n = build("mn-failover");
    let lb = "    loadBalancing: {routingPreference: [NETWORK], mode: FAILOVER}\n";
    n.write_mesh("near, server", lb, "");
    let a = agent(&n.world, "node-a").await;
    let _b = agent(&n.world, "node-b").await;
    let _gw = n.gateway().await;
    let _near = pod_who(&n.near, "near").await;
    let _far = pod_who(&n.server, "server").await;
    for _ in 0..10 {
        assert_eq!(pod_ask(&n.client, vip()).await.as_deref(), Some("near"));
    }
    // The near endpoint leaves the service (its pods are gone).
    let mut changes = a.state.subscribe();
    let removed = Instant::now();
    n.write_mesh("server", lb, "");
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("the agent sees the change")
        .expect("state");
    let applied = removed.elapsed();
    for _ in 0..5 {
        assert_eq!(pod_ask(&n.client, vip()).await.as_deref(), Some("server"));
    }
    eprintln!("near tier removed: traffic moved {applied:?} after the mesh changed");
    // And back when it returns.
    let mut changes = a.state.subscribe();
    n.write_mesh("near, server", lb, "");
    let _ = tokio::time::timeout(Duration::from_secs(5), changes.changed()).await;
    assert_eq!(pod_ask(&n.client, vip()).await.as_deref(), Some("near"));
}

/// `ambient-agent gateway`, the command, in the gateway's pod: the same
/// wire as the in-process gateway above, from the agent's configuration
/// (local mesh file, the root CA's files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_command_carries_double_hbone() {
    let n = build("mn-cmd");
    n.write_mesh("server", "", "");
    let dir = n.world.dir.path();
    let (root, key) = (dir.join("root.pem"), dir.join("root-key.pem"));
    n.world.ca.write_pem(&root, &key).expect("root CA files");
    let cfg = dir.join("gateway.yaml");
    std::fs::write(
        &cfg,
        format!(
            "meshFile: {}\nca: {{rootCert: {}, rootKey: {}}}\nlog: {{level: info}}\n",
            n.world.mesh_path().display(),
            root.display(),
            key.display()
        ),
    )
    .expect("config");
    let mut gateway = tokio::process::Command::new("ip")
        .args(["netns", "exec", &n.ewgw.netns])
        .arg(agent_binary())
        .args(["gateway", "--workload", "ewgw", "--config"])
        .arg(&cfg)
        .kill_on_drop(true)
        .spawn()
        .expect("ambient-agent gateway");
    let _a = agent(&n.world, "node-a").await;
    let _b = agent(&n.world, "node-b").await;
    let _app = pod_who(&n.server, "server").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(answer) = pod_ask(&n.client, vip()).await {
            assert_eq!(answer, "server");
            break;
        }
        if let Ok(Some(status)) = gateway.try_wait() {
            panic!("the gateway exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "no answer through the gateway command"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = gateway.start_kill();
    let _ = gateway.wait().await;
}
