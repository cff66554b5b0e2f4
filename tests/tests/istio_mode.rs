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

/// Two Istio-mode agents (node-a, node-b) with the test xDS server, Istio
/// CA and one test CNI each.
struct IstioWorld {
    xds: TestXds,
    ca: TestCa,
    cnis: Vec<TestCni>,
    agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

impl IstioWorld {
    /// Serves `mesh_yaml` over xDS and starts the agents, with metrics on
    /// `metrics_port` (tests running side by side pick their own).
    async fn start(mesh_yaml: &str, metrics_port: u16) -> IstioWorld {
        let dir = tempfile::tempdir().unwrap();
        let mesh = parse_mesh("mesh", mesh_yaml).expect("mesh");
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
                metrics_port,
                readiness_port: 0,
                ..Config::default()
            };
            agents.push(Agent::start(cfg).await.expect("agent starts in Istio mode"));
        }
        for cni in &cnis {
            cni.wait_connected(Duration::from_secs(5)).await.unwrap();
        }
        IstioWorld {
            xds,
            ca,
            cnis,
            agents,
            _dir: dir,
        }
    }

    /// Serves `yaml` over xDS from now on.
    fn set_mesh(&self, yaml: &str) {
        self.xds.set_mesh(&parse_mesh("mesh", yaml).expect("mesh"));
    }
}

fn netns(p: &Pod) -> std::path::PathBuf {
    std::path::PathBuf::from(p.netns_path())
}

/// `pods` as xDS workloads of namespace `test` (service account = name),
/// on the given nodes.
fn mesh_of(pods: &[(&Pod, &str)]) -> String {
    let mut yaml = String::from("workloads:\n");
    for (p, node) in pods {
        yaml += &format!(
            "  - {{uid: {n}, name: {n}, namespace: test, serviceAccount: {n}, addresses: [{ip}], node: {node}}}\n",
            n = p.name,
            ip = p.ip
        );
    }
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_the_cni_are_captured_with_mesh_and_certificates_from_istiod() {
    init_tracing();
    let topo = Topology::new("istio").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    // The mesh, served over xDS (no netns paths: the CNI provides them).
    let world =
        IstioWorld::start(&mesh_of(&[(&client, "node-a"), (&server, "node-b")]), 25020).await;
    let IstioWorld {
        cnis, agents, ca, ..
    } = &world;

    // The CNI hands each pod to its node's agent, with its netns fd.
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

/// Point 4 of the fail-closed issue: a pod istio-cni hands over is the
/// agent's from that moment, whatever istiod says. As ztunnel, its proxies
/// start from the CNI's `WorkloadInfo` (ztunnel requires it on every Add)
/// and its certificate is asked for that identity. Until istiod lists the
/// pod nothing may come in (the policies that select it are unknown);
/// when istiod drops it, it stays captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_handed_over_is_captured_before_istiod_lists_it_and_after_it_drops_it() {
    init_tracing();
    let topo = Topology::new("istiocni").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let outside = topo.add_pod("outside", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let only_server = mesh_of(&[(&server, "node-b")]);
    let world = IstioWorld::start(&only_server, 25021).await;
    let IstioWorld { cnis, agents, .. } = &world;
    // Without the pod's identity there is nothing to serve it as (ztunnel
    // refuses such an Add too): the CNI hears why.
    let ack = cnis[0].add_pod("outside", &netns(&outside), None).await;
    let err = ack.unwrap().unwrap_err();
    assert!(err.contains("without workload info"), "{err}");
    for (i, p) in [(1, &server), (0, &client)] {
        let ack = cnis[i].add_pod(&p.name, &netns(p), info(&p.name)).await;
        assert_eq!(ack.unwrap(), Ok(()));
    }
    assert!(has_capture(&client), "captured when handed over");
    wait_for("client served", || agents[0].listeners("client").is_some()).await;
    wait_for("server served", || agents[1].listeners("server").is_some()).await;

    // Its outbound is tunneled, as the identity the CNI gave.
    let _server_echo = PodEcho::start(&server, 8080).await;
    let mut at_server = agents[1].connections();
    let to_server = SocketAddr::new(IpAddr::V4(server.ip), 8080);
    let msg = b"before istiod knows".as_slice();
    assert_eq!(pod_exchange(&client, to_server, msg).await.unwrap(), msg);
    let r = next_record_where(&mut at_server, |r| r.src == IpAddr::V4(client.ip)).await;
    assert_eq!(r.direction, Direction::Inbound, "{r:?}");
    let id = r.src_identity.as_ref().map(|i| i.to_string());
    assert_eq!(
        id.as_deref(),
        Some("spiffe://cluster.local/ns/test/sa/client")
    );

    // Nothing comes in yet: plaintext from outside the mesh is refused.
    let client_echo = PodEcho::start(&client, 8080).await;
    let to_client = SocketAddr::new(IpAddr::V4(client.ip), 8080);
    let back = pod_exchange(&outside, to_client, msg)
        .await
        .unwrap_or_default();
    assert!(back.is_empty(), "got {back:?}");
    assert!(client_echo.peer_ips().is_empty());

    // istiod lists it: policies (none) decide, so it comes in.
    world.set_mesh(&mesh_of(&[(&server, "node-b"), (&client, "node-a")]));
    let mut in_time = false;
    for _ in 0..50 {
        if pod_exchange(&outside, to_client, msg).await.ok().as_deref() == Some(msg) {
            in_time = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(in_time, "never admitted once istiod listed the pod");
    assert_eq!(client_echo.peer_ips(), vec![IpAddr::V4(outside.ip)]);

    // istiod drops it again: still the agent's, still captured, tunneled.
    world.set_mesh(&only_server);
    wait_for("the mesh without the client", || {
        agents[0]
            .state
            .snapshot()
            .workload_by_uid("client")
            .is_none()
    })
    .await;
    assert!(
        has_capture(&client),
        "capture removed when istiod dropped the pod"
    );
    assert_eq!(pod_exchange(&client, to_server, msg).await.unwrap(), msg);
    let r = next_record_where(&mut at_server, |r| r.src == IpAddr::V4(client.ip)).await;
    assert_eq!(
        r.direction,
        Direction::Inbound,
        "sent around the mesh: {r:?}"
    );

    // Only the CNI's delete releases it.
    assert_eq!(cnis[0].del_pod("client").await.unwrap(), Ok(()));
    wait_for("client released", || {
        agents[0].listeners("client").is_none()
    })
    .await;
    assert!(!has_capture(&client));
}

/// The handle nft gave the agent's table in `pod` (a table made again
/// gets a new one).
fn table_handle(pod: &Pod) -> Option<String> {
    let args = ["-a", "list", "table", "inet", "ambient_agent"];
    let out = in_ns(&pod.netns, "nft", &args).ok()?;
    out.lines()
        .next()?
        .split("# handle")
        .nth(1)
        .map(|h| h.trim().to_string())
}

/// Writes `msg` on `conn` and expects it echoed.
async fn echoes(conn: &mut tokio::net::TcpStream, msg: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if conn.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == msg
}

/// The CNI's pod lifecycle as ztunnel handles it (istio/ztunnel
/// src/inpod/statemanager.rs): a pod is its network namespace (the fd's
/// device and inode), so an Add re-sent for the same one is a no-op that
/// cuts nothing; a pod that cannot be started is answered with an error
/// and retried (ztunnel every 5 s, this agent every second); after a
/// reconnect, a pod the snapshot keeps (`keep`) is untouched and one it
/// leaves out is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cni_pod_lifecycle_as_ztunnel_handles_it() {
    init_tracing();
    let topo = Topology::new("istiolife").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let other = topo.add_pod("other", 0).expect("pod");
    let blocked = topo.add_pod("blocked", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let mesh = mesh_of(&[
        (&client, "node-a"),
        (&other, "node-a"),
        (&blocked, "node-a"),
        (&server, "node-b"),
    ]);
    let world = IstioWorld::start(&mesh, 25022).await;
    let IstioWorld { cnis, agents, .. } = &world;
    for (i, p) in [(1, &server), (0, &client), (0, &other)] {
        let ack = cnis[i].add_pod(&p.name, &netns(p), info(&p.name)).await;
        assert_eq!(ack.unwrap(), Ok(()), "{}", p.name);
    }
    let _echo = PodEcho::start(&server, 8080).await;
    let mut conn = client
        .sockets()
        .connect(
            SocketAddr::new(IpAddr::V4(server.ip), 8080),
            Default::default(),
        )
        .await
        .expect("connect");
    assert!(echoes(&mut conn, b"before").await);
    let handle = table_handle(&client).expect("captured");

    // (a) The same namespace again, by a new fd: nothing changes.
    let ack = cnis[0]
        .add_pod("client", &netns(&client), info("client"))
        .await;
    assert_eq!(ack.unwrap(), Ok(()));
    assert_eq!(
        table_handle(&client).as_ref(),
        Some(&handle),
        "capture redone"
    );
    assert!(
        echoes(&mut conn, b"after a re-sent add").await,
        "connection cut"
    );

    // (b) A pod whose HBONE port is taken cannot start: the CNI hears it,
    // the agent is not ready, and it is served once the port is free.
    let ambient_agent::socket::Sockets::Netns(ns) = blocked.sockets() else {
        panic!("a pod has its own namespace");
    };
    // A plain listener (no SO_REUSEPORT): the agent cannot share the port.
    let taken = ns
        .run_blocking(|| std::net::TcpListener::bind("0.0.0.0:15008"))
        .expect("port taken in the pod");
    let ack = cnis[0]
        .add_pod("blocked", &netns(&blocked), info("blocked"))
        .await;
    let err = ack.unwrap().unwrap_err();
    assert!(err.contains("cannot be served yet"), "{err}");
    assert!(agents[0].listeners("blocked").is_none());
    drop(taken);
    wait_for("the blocked pod served on retry", || {
        agents[0].listeners("blocked").is_some()
    })
    .await;

    // (c) The CNI reconnects having lost the client's netns (it sends
    // `keep`) and the other pod was deleted while no agent listened.
    cnis[0].forget_netns("client");
    assert!(cnis[0].drop_pod("other"));
    cnis[0].disconnect_agent().await;
    cnis[0]
        .wait_connected(Duration::from_secs(5))
        .await
        .unwrap();
    wait_for("the other pod released", || {
        agents[0].listeners("other").is_none()
    })
    .await;
    assert!(!has_capture(&other));
    assert_eq!(
        table_handle(&client).as_ref(),
        Some(&handle),
        "kept pod touched"
    );
    assert!(agents[0].listeners("client").is_some());
    assert!(
        echoes(&mut conn, b"after a reconnect").await,
        "connection cut"
    );
}
