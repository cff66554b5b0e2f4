//! The agent in Istio mode, end to end in network namespaces: mesh from the
//! test xDS server, certificates from the test Istio CA, pods handed over
//! by the test CNI as real netns fds. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambient_agent::capture::CaptureMode;
use ambient_agent::proxy::record::Direction;
use ambient_tests::istio::*;
use ambient_tests::istio_cni;
use ambient_tests::netns::{in_ns, Pod, Topology};
use ambient_tests::*;

/// The whole Istio-mode path as in a cluster: istio-cni's own in-pod rules
/// redirect the pods' TCP (the agent installs none of its own, its sockets
/// carry the CNI's mark 0x539 and its return path is the CNI's), mesh from
/// xDS, certificates from the Istio CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_from_the_cni_are_captured_with_mesh_and_certificates_from_istiod() {
    init_tracing();
    let topo = Topology::new("istio").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    // The mesh, served over xDS (no netns paths: the CNI provides them).
    let mesh = mesh_of(&[(&client, "node-a"), (&server, "node-b")])
        + "services:\n  - {name: echo, namespace: test, vips: [10.96.1.1], ports: [{port: 80, targetPort: 8080}], endpoints: [server]}\n";
    let world = IstioWorld::start(&mesh, 25020).await;
    let IstioWorld { agents, ca, .. } = &world;

    // The CNI hands each pod to its node's agent, with its netns fd.
    assert_eq!(world.add_pod(0, &client, info("client")).await, Ok(()));
    assert_eq!(world.add_pod(1, &server, info("server")).await, Ok(()));
    wait_for("both pods enrolled", || {
        agents[0].listeners("client").is_some() && agents[1].listeners("server").is_some()
    })
    .await;
    for p in [&client, &server] {
        assert!(istio_cni::has_inpod(&p.netns), "the CNI's rules");
        assert!(
            !has_agent_capture(p),
            "the agent captured on top of the CNI"
        );
    }

    // The pod's DNS, redirected by the CNI's rules to the agent's proxy:
    // a mesh name resolves with the pod's own resolver.
    let _conf = ambient_tests::dns::PodResolvConf::write(&client.netns, "test");
    assert_eq!(
        ambient_tests::dns::getaddrinfo(&client, "echo"),
        Some("10.96.1.1".parse().unwrap())
    );

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

    // A pod the CNI deletes is released: its listeners go.
    assert_eq!(world.del_pod(1, &server).await, Ok(()));
    wait_for("server released", || {
        agents[1].listeners("server").is_none()
    })
    .await;
}

/// The agent introduces itself to istiod as ztunnel does (istio/ztunnel
/// src/xds/client.rs, src/identity/auth.rs, src/config.rs): node id
/// `ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`;
/// metadata `NAME`, `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, plus the
/// `ISTIO_META_*` proxy metadata (Istio's chart always sets
/// `ISTIO_META_CLUSTER_ID`); `authorization: Bearer <token>` and
/// `clusterid: <cluster>` on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_introduces_itself_to_istiod_as_ztunnel_does() {
    init_tracing();
    let world = IstioWorld::start("workloads: []\n", 25023).await;
    let xds = &world.xds;
    wait_for("a node", || xds.last_node().is_some()).await;
    assert_eq!(xds.last_cluster_id().as_deref(), Some(CLUSTER_ID));
    assert_eq!(
        xds.last_authorization().as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    let node = xds.last_node().expect("node");
    let (name, ip) = if node.id.contains("ztunnel-node-a") {
        ("node-a", "10.255.0.1")
    } else {
        ("node-b", "10.255.0.2")
    };
    assert_eq!(
        node.id,
        format!("ztunnel~{ip}~ztunnel-{name}.istio-system~istio-system.svc.cluster.local")
    );
    let metadata = node_metadata(&node);
    let expected: std::collections::BTreeMap<String, String> = [
        ("NAME", format!("ztunnel-{name}")),
        ("NAMESPACE", "istio-system".into()),
        ("INSTANCE_IPS", ip.into()),
        ("NODE_NAME", name.into()),
        ("CLUSTER_ID", CLUSTER_ID.into()),
        ("DNS_CAPTURE", "true".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(metadata, expected);
}

/// Point 4 of the fail-closed issue: a pod istio-cni hands over is the
/// agent's from that moment, whatever istiod says. As ztunnel, its proxies
/// start from the CNI's `WorkloadInfo` (ztunnel requires it on every Add)
/// and its certificate is asked for that identity. Until istiod lists the
/// pod nothing may come in (the policies that select it are unknown);
/// when istiod drops it, it stays captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_handed_over_is_captured_before_istiod_lists_it_and_after_it_drops_it() {
    handed_over_before_istiod(Capture::Cni, "istiocni", 25021).await;
}

/// The same with the agent's own capture (`capture: nft` in Istio mode,
/// for clusters without istio-cni's rules).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_own_capture_a_pod_handed_over_is_captured_before_istiod_lists_it() {
    handed_over_before_istiod(Capture::Agent(CaptureMode::Nft), "istionft", 25024).await;
}

/// Whether `pod` is captured by whoever `world` says captures.
fn captured(world: &IstioWorld, pod: &Pod) -> bool {
    match world.capture {
        Capture::Cni => istio_cni::has_inpod(&pod.netns) && !has_agent_capture(pod),
        Capture::Agent(_) => has_agent_capture(pod),
    }
}

async fn handed_over_before_istiod(capture: Capture, tag: &str, metrics_port: u16) {
    init_tracing();
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let outside = topo.add_pod("outside", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let only_server = mesh_of(&[(&server, "node-b")]);
    let world = IstioWorld::start_with(&only_server, metrics_port, capture).await;
    let IstioWorld { cnis, agents, .. } = &world;
    // Without the pod's identity there is nothing to serve it as (ztunnel
    // refuses such an Add too): the CNI hears why. (`outside` stays
    // outside the mesh, without the CNI's rules.)
    let ack = cnis[0].add_pod("outside", &netns(&outside), None).await;
    let err = ack.unwrap().unwrap_err();
    assert!(err.contains("without workload info"), "{err}");
    for (i, p) in [(1, &server), (0, &client)] {
        assert_eq!(world.add_pod(i, p, info(&p.name)).await, Ok(()));
    }
    assert!(captured(&world, &client), "captured when handed over");
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
        captured(&world, &client),
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
    assert_eq!(world.del_pod(0, &client).await, Ok(()));
    wait_for("client released", || {
        agents[0].listeners("client").is_none()
    })
    .await;
    assert!(!has_agent_capture(&client) && !istio_cni::has_inpod(&client.netns));
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
    // The agent's own capture, whose table must not be made again.
    let world = IstioWorld::start_with(&mesh, 25022, Capture::Agent(CaptureMode::Nft)).await;
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
    assert!(!has_agent_capture(&other));
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

/// Fields istiod sends that the agent declares but does not act on are
/// accepted (never NACKed: istiod is often newer than its proxies) and
/// listed in `/config_dump` under `xds.ignoredFields`, with how many held
/// resources carry each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_the_agent_does_not_act_on_are_accepted_and_shown_in_config_dump() {
    use ambient_proto::discovery::Resource;
    use ambient_proto::prost_types::Any;
    use ambient_proto::workload as pb;
    use ambient_proto::ADDRESS_TYPE_URL;
    init_tracing();
    let world = IstioWorld::start("workloads: []\n", 25027).await;
    // Raw pushes reach the streams open now: wait for both agents' (two
    // types each, ACKed).
    wait_for("both agents subscribed", || world.xds.acks() >= 4).await;
    let resource = |a: pb::Address| Resource {
        resource: Some(Any::from_msg(&a).expect("encode")),
        ..Default::default()
    };
    let w = pb::Workload {
        uid: "remote".into(),
        name: "remote".into(),
        namespace: "test".into(),
        addresses: vec![vec![10, 99, 0, 1]],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        network: "network-2".into(),
        native_tunnel: true,
        locality: Some(pb::Locality {
            region: "eu".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    world.xds.push_raw(
        ADDRESS_TYPE_URL,
        "remote",
        resource(pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        }),
    );
    let s = pb::Service {
        name: "svc".into(),
        namespace: "test".into(),
        hostname: "svc.test.svc.cluster.local".into(),
        ingress_use_waypoint: true,
        ..Default::default()
    };
    world.xds.push_raw(
        ADDRESS_TYPE_URL,
        "test/svc.test.svc.cluster.local",
        resource(pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        }),
    );
    wait_for("both resources held", || {
        let m = world.agents[0].state.snapshot();
        m.workload_by_uid("remote").is_some() && !m.to_mesh().services.is_empty()
    })
    .await;
    assert!(world.xds.nacks().is_empty(), "{:?}", world.xds.nacks());
    let admin = SocketAddr::new(metrics_ip("node-a"), admin_port(25027));
    let dump: serde_json::Value =
        serde_json::from_str(&get(admin, "/config_dump").await).expect("JSON");
    let ignored = &dump["xds"]["ignoredFields"];
    assert_eq!(ignored["Workload.native_tunnel"], 1, "{dump}");
    // Network and locality are decoded now (routing, metric labels): no
    // longer reported, and the network shows on the workload.
    assert!(ignored.get("Workload.network").is_none(), "{dump}");
    assert_eq!(dump["workloads"][0]["network"], "network-2", "{dump}");
    assert!(ignored.get("Workload.locality").is_none(), "{dump}");
    assert_eq!(ignored["Service.ingress_use_waypoint"], 1, "{dump}");
    assert_eq!(dump["xds"]["nacks"], 0);
}
