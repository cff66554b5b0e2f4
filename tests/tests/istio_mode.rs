//! The agent in Istio mode, end to end in network namespaces: mesh from the
//! test xDS server, certificates from the test Istio CA, pods handed over
//! by the test CNI as real netns fds. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::zds::WorkloadInfo;
use ambient_agent::config::{Config, ControlPlaneConfig, Mode};
use ambient_agent::identity::LocalCa;
use ambient_agent::proxy::record::Direction;
use ambient_agent::xds::local::parse_mesh;
use ambient_tests::control_plane::{ca::TestCa, xds::TestXds, zds::TestCni};
use ambient_tests::netns::{in_ns, Pod, Topology};
use ambient_tests::*;

const TOKEN: &str = "test-token";

fn info(name: &str) -> Option<WorkloadInfo> {
    Some(WorkloadInfo {
        name: name.into(),
        namespace: "test".into(),
        service_account: name.into(),
    })
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn has_capture(pod: &Pod) -> bool {
    in_ns(&pod.netns, "nft", &["list", "tables"]).is_ok_and(|t| t.contains("ambient_agent"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_the_cni_are_captured_with_mesh_and_certificates_from_istiod() {
    init_tracing();
    let topo = Topology::new("istio").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let dir = tempfile::tempdir().unwrap();

    // The mesh, served over xDS (no netns paths: the CNI provides them).
    let yaml = format!(
        "workloads:\n  - {{uid: client, name: client, namespace: test, serviceAccount: client, addresses: [{}], node: node-a}}\n  - {{uid: server, name: server, namespace: test, serviceAccount: server, addresses: [{}], node: node-b}}\n",
        client.ip, server.ip
    );
    let mesh = parse_mesh("mesh", &yaml).expect("mesh");
    let xds = TestXds::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    xds.set_mesh(&mesh);

    // The Istio CA; one file holds the mesh root and the CA's serving root.
    let root = Arc::new(LocalCa::generate("cluster.local").unwrap());
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), root.clone(), TOKEN)
        .await
        .unwrap();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, format!("{}{}", root.root_pem(), ca.root_pem())).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();

    let mut cnis = Vec::new();
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let socket = dir.path().join(format!("{node}.sock"));
        cnis.push(TestCni::start(&socket).await.unwrap());
        let cfg = Config {
            node: node.into(),
            mode: Mode::Istio,
            socket_mark: 0x539,
            control_plane: ControlPlaneConfig {
                xds_address: xds.url(),
                ca_address: Some(ca.url()),
                root_cert: roots.clone(),
                server_name: Some(ca.server_name().to_string()),
                token_path: token.clone(),
                cni_socket: socket,
                ..ControlPlaneConfig::default()
            },
            admin_port: 0,
            // Metrics on an address of each agent's own, to read the xDS state.
            metrics_address: metrics_ip(node),
            metrics_port: 25020,
            readiness_port: 0,
            ..Config::default()
        };
        agents.push(Agent::start(cfg).await.expect("agent starts in Istio mode"));
    }
    for cni in &cnis {
        cni.wait_connected(Duration::from_secs(5)).await.unwrap();
    }
    // The CNI hands each pod to its node's agent, with its netns fd.
    let netns = |p: &Pod| std::path::PathBuf::from(p.netns_path());
    assert_eq!(
        cnis[0]
            .add_pod("client", &netns(&client), info("client"))
            .await
            .unwrap(),
        Ok(())
    );
    assert_eq!(
        cnis[1]
            .add_pod("server", &netns(&server), info("server"))
            .await
            .unwrap(),
        Ok(())
    );
    wait_for("both pods enrolled", || {
        agents[0].listeners("client").is_some() && agents[1].listeners("server").is_some()
    })
    .await;
    assert!(has_capture(&client) && has_capture(&server));

    // Ordinary sockets in the pods, tunneled with certificates from the CA.
    let echo = PodEcho::start(&server, 8080).await;
    let mut inbound = agents[1].connections();
    let exe = env!("CARGO_BIN_EXE_pod-client");
    let (sent, got) = run_pod_client(
        exe,
        &client,
        SocketAddr::new(IpAddr::V4(server.ip), 8080),
        64 * 1024,
        7,
    )
    .await;
    assert_eq!(sent, got);
    assert_eq!(echo.peer_ips(), vec![IpAddr::V4(client.ip)]);
    let record = inbound.recv().await.unwrap();
    assert_eq!(record.direction, Direction::Inbound);
    assert_eq!(
        record
            .src_identity
            .as_ref()
            .map(|i| i.to_string())
            .as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );
    assert!(ca.requests() >= 2, "certificates came from the Istio CA");

    // The xDS state shows in the metrics: connected, synced, no NACK.
    let metrics = scrape(SocketAddr::new(metrics_ip("node-a"), 25020)).await;
    for line in [
        "ambient_xds_connected 1",
        "ambient_xds_synced 1",
        "ambient_xds_nacks_total 0",
        "ambient_xds_connections_total 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let acks = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ambient_xds_acks_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .expect("an ACK counter");
    assert!(acks >= 2, "both types were ACKed: {acks}");

    // A pod the CNI deletes is released: capture and listeners go.
    assert_eq!(cnis[1].del_pod("server").await.unwrap(), Ok(()));
    wait_for("server released", || {
        agents[1].listeners("server").is_none()
    })
    .await;
    assert!(
        !has_capture(&server),
        "capture removed from the released pod"
    );
    drop(agents);
}

fn metrics_ip(node: &str) -> IpAddr {
    if node == "node-a" {
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 91, 1))
    } else {
        IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 91, 2))
    }
}

/// The body of `GET /metrics` at `addr`.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .expect("HTTP response")
}
