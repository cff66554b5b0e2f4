//! Delta xDS over real gRPC on loopback: the test control plane serves the
//! YAML model, `XdsClient`s feed agents' state, traffic follows.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::state::{Mesh, Route, State};
use ambient_agent::xds::delta::canonical;
use ambient_agent::xds::local::parse_mesh;
use ambient_proto::discovery::Resource;
use ambient_proto::prost_types::Any;
use ambient_proto::{workload as pb, ADDRESS_TYPE_URL};
use ambient_tests::control_plane::xds::{eventually, feed, xds_agent, TestXds};
use ambient_tests::*;

const HBONE: u16 = 15008;

/// The standard world plus a second server workload (`server2`, 127.n.2.2)
/// and a policy; the service's endpoints are `endpoints`.
fn mesh_yaml(w: &World, endpoints: &str, with_server2: bool) -> String {
    let n = w.net;
    let server2 = if with_server2 {
        format!(
            "  - uid: server2\n    name: server2\n    namespace: test\n    serviceAccount: server\n    addresses: [127.{n}.2.2]\n    node: node-b\n"
        )
    } else {
        String::new()
    };
    w.mesh_with("server", &server2, endpoints)
        + r#"policies:
  - name: allow-client
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [server]
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/test/sa/client"]
                destinationPorts: [8080]
"#
}

/// Writes the mesh into the world's file (as local mode would read it)
/// and parses it back: the model both sides are compared against.
fn model(w: &World, yaml: &str) -> Mesh {
    w.write_mesh(yaml);
    let text = std::fs::read_to_string(w.mesh_path()).expect("mesh file");
    parse_mesh("mesh", &text).expect("valid mesh")
}

fn xds_addr(w: &World) -> SocketAddr {
    format!("127.{}.0.1:0", w.net).parse().expect("addr")
}

/// Sends a few bytes through `agent` as `client` and expects them back.
async fn echo_through(agent: &Agent, dst: SocketAddr) {
    let data = payload(1000, 7);
    let mut s = agent.connect_as("client", dst).await.expect("connect");
    let back = tokio::time::timeout(Duration::from_secs(10), send_and_read_back(&mut s, &data))
        .await
        .expect("no hang")
        .expect("echo");
    assert_eq!(back, data);
}

fn routed_to(state: &State, dst: SocketAddr) -> Option<String> {
    match state.snapshot().route(dst, HBONE) {
        Route::Hbone { workload, .. } => Some(workload.uid.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn workloads_services_and_policies_arrive() {
    init_tracing();
    let w = World::new(51);
    let m = model(&w, &mesh_yaml(&w, "server, server2", true));
    let xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);

    let state = Arc::new(State::default());
    let feed = feed(xds.client_config("node-a"), state.clone());
    eventually("the mesh", || state.snapshot().to_mesh() == canonical(&m)).await;

    let s = feed.status.borrow().clone();
    assert!(s.connected && s.synced, "{s:?}");
    assert_eq!((s.installs, s.nacks, s.resources), (1, 0, 5));
    eventually("both ACKs", || xds.acks() == 2).await;
    assert_eq!(xds.connected_clients(), 1);
    assert!(xds.nacks().is_empty());
    let snap = state.snapshot();
    assert_eq!(snap.to_mesh().workloads.len(), 3);
    assert_eq!(snap.to_mesh().services[0].endpoints.len(), 2);
    assert_eq!(snap.policies()[0].key(), "test/allow-client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_reroutes_traffic_within_a_second() {
    init_tracing();
    let w = World::new(52);
    let m = model(&w, &mesh_yaml(&w, "server", true));
    let xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);
    let (a, a_feed) = xds_agent(&w, &xds, "node-a").await;
    let (b, _b_feed) = xds_agent(&w, &xds, "node-b").await;
    let server2_app = SocketAddr::new("127.52.2.2".parse().unwrap(), 8080);
    let echo1 = Echo::start(w.server_app()).await;
    let echo2 = Echo::start(server2_app).await;
    eventually("node-b serving both servers", || {
        b.listeners("server").is_some() && b.listeners("server2").is_some()
    })
    .await;
    eventually("node-a synced", || a_feed.status.borrow().synced).await;

    echo_through(&a, w.service_vip()).await;
    assert_eq!(echo1.accepted.load(Ordering::SeqCst), 1);

    let edited = model(&w, &mesh_yaml(&w, "server2", true));
    let start = Instant::now();
    xds.set_mesh(&edited);
    eventually("the new endpoint", || {
        routed_to(&a.state, w.service_vip()).as_deref() == Some("server2")
    })
    .await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(a.state.snapshot().to_mesh(), canonical(&edited));

    echo_through(&a, w.service_vip()).await;
    assert_eq!(echo2.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(echo1.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_workload_leaves_state_and_traffic() {
    init_tracing();
    let w = World::new(53);
    let m = model(&w, &mesh_yaml(&w, "server, server2", true));
    let xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);
    let (a, _a_feed) = xds_agent(&w, &xds, "node-a").await;
    let (b, _b_feed) = xds_agent(&w, &xds, "node-b").await;
    let server2_app = SocketAddr::new("127.53.2.2".parse().unwrap(), 8080);
    let echo1 = Echo::start(w.server_app()).await;
    let echo2 = Echo::start(server2_app).await;
    eventually("node-b serving server2", || {
        b.listeners("server2").is_some()
    })
    .await;
    eventually("node-a knows server2", || {
        a.state.snapshot().workload_by_uid("server2").is_some()
    })
    .await;

    let smaller = model(&w, &mesh_yaml(&w, "server", false));
    xds.set_mesh(&smaller);
    eventually("server2 gone from both agents", || {
        a.state.snapshot().workload_by_uid("server2").is_none()
            && b.state.snapshot().workload_by_uid("server2").is_none()
    })
    .await;
    assert_eq!(a.state.snapshot().to_mesh(), canonical(&smaller));
    eventually("node-b no longer serving server2", || {
        b.listeners("server2").is_none()
    })
    .await;
    assert!(b.listeners("server").is_some());

    for _ in 0..5 {
        echo_through(&a, w.service_vip()).await;
    }
    assert_eq!(echo1.accepted.load(Ordering::SeqCst), 5);
    assert_eq!(echo2.accepted.load(Ordering::SeqCst), 0);
}

fn workload_resource(uid: &str, addresses: Vec<Vec<u8>>) -> Resource {
    let w = pb::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "test".into(),
        addresses,
        node: "node-b".into(),
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let any = Any::from_msg(&pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    })
    .expect("encode");
    Resource {
        resource: Some(any),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_resource_is_nacked_and_the_last_good_mesh_keeps_serving() {
    init_tracing();
    let w = World::new(54);
    let m = model(&w, &mesh_yaml(&w, "server", false));
    let xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);
    let (a, a_feed) = xds_agent(&w, &xds, "node-a").await;
    let (b, _b_feed) = xds_agent(&w, &xds, "node-b").await;
    let echo = Echo::start(w.server_app()).await;
    eventually("node-b serving", || b.listeners("server").is_some()).await;
    eventually("node-a synced", || a_feed.status.borrow().synced).await;
    echo_through(&a, w.service_vip()).await;
    let version = a.state.subscribe();

    // Five address bytes: the resource itself is bad.
    xds.push_raw(
        ADDRESS_TYPE_URL,
        "bad-wl",
        workload_resource("bad-wl", vec![vec![10, 0, 0, 0, 1]]),
    );
    eventually("two NACKs", || xds.nacks().len() == 2).await;
    for nack in xds.nacks() {
        assert!(
            nack.contains("bad-wl: addresses[0]: an IP address must be 4 or 16 bytes, not 5"),
            "{nack}"
        );
    }
    // A good resource with the server's address: bad only with the rest.
    let taken = w
        .server_ip()
        .to_string()
        .parse::<std::net::Ipv4Addr>()
        .unwrap();
    xds.push_raw(
        ADDRESS_TYPE_URL,
        "impostor",
        workload_resource("impostor", vec![taken.octets().to_vec()]),
    );
    eventually("four NACKs", || xds.nacks().len() == 4).await;
    let last = xds.nacks().pop().unwrap();
    assert!(
        last.contains(
            "impostor: addresses[0]: address 127.54.2.1 is already used by workload \"server\""
        ),
        "{last}"
    );

    let s = a_feed.status.borrow().clone();
    assert_eq!(s.nacks, 2);
    assert!(s.last_nack.unwrap().contains("impostor"));
    assert!(!version.has_changed().unwrap(), "no new mesh was installed");
    assert_eq!(a.state.snapshot().to_mesh(), canonical(&m));
    echo_through(&a, w.service_vip()).await;
    echo_through(&a, w.server_app()).await;
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_client_reconnects_with_backoff_and_resumes_from_what_it_holds() {
    init_tracing();
    let w = World::new(55);
    let m = model(&w, &mesh_yaml(&w, "server, server2", true));
    let mut xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);
    let token = w.dir.path().join("token");
    std::fs::write(&token, "first-token\n").unwrap();
    let state = Arc::new(State::default());
    let mut cfg = xds.client_config("node-a");
    cfg.token_path = Some(token.clone());
    let mut feed = feed(cfg, state.clone());
    eventually("the mesh", || state.snapshot().to_mesh() == canonical(&m)).await;
    assert_eq!(
        xds.last_authorization().as_deref(),
        Some("Bearer first-token")
    );
    assert!(
        xds.last_initial_versions().is_empty(),
        "held nothing at first"
    );
    let held = xds.versions();

    xds.stop().await;
    eventually("the client to notice", || !feed.status.borrow().connected).await;
    // While the control plane is away: retries, backing off, and the last
    // mesh keeps serving. The mesh and the token change meanwhile.
    let before = feed.status.borrow().failures;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retries = feed.status.borrow().failures - before;
    assert!((2..=8).contains(&retries), "{retries} attempts in 600ms");
    assert_eq!(state.snapshot().to_mesh(), canonical(&m));
    let edited = model(&w, &mesh_yaml(&w, "server", false));
    xds.set_mesh(&edited);
    std::fs::write(&token, "second-token").unwrap();

    xds.restart().await.unwrap();
    feed.status
        .wait_for(|s| s.connected)
        .await
        .expect("reconnects");
    eventually("the edited mesh", || {
        state.snapshot().to_mesh() == canonical(&edited)
    })
    .await;
    assert_eq!(
        xds.last_initial_versions(),
        held,
        "resumed from what it held"
    );
    assert_eq!(
        xds.last_authorization().as_deref(),
        Some("Bearer second-token")
    );
    let s = feed.status.borrow().clone();
    assert_eq!((s.connections, s.installs, s.nacks), (2, 2, 0));
    assert_eq!(s.resources, 4);
}

/// A CA and a control plane certificate for `istiod.istio-system.svc`
/// signed by it: (root PEM, certificate PEM, key PEM).
fn control_plane_certs() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["istiod.istio-system.svc".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_to_the_control_plane_checks_its_name_against_the_root() {
    init_tracing();
    let w = World::new(56);
    let m = model(&w, &mesh_yaml(&w, "server", false));
    let (root, cert, key) = control_plane_certs();
    let xds = TestXds::start_tls(xds_addr(&w), &cert, &key).await.unwrap();
    xds.set_mesh(&m);
    let root_path = w.dir.path().join("root.pem");
    std::fs::write(&root_path, root).unwrap();

    let mut cfg = xds.client_config("node-a");
    assert!(cfg.address.starts_with("https://127.56."));
    cfg.root_cert = Some(root_path);
    cfg.server_name = Some("istiod.istio-system.svc".into());
    let mut wrong = cfg.clone();
    wrong.server_name = Some("other.istio-system.svc".into());

    let state = Arc::new(State::default());
    let _feed = feed(cfg, state.clone());
    eventually("the mesh over TLS", || {
        state.snapshot().to_mesh() == canonical(&m)
    })
    .await;

    let elsewhere = Arc::new(State::default());
    let mut refused = feed(wrong, elsewhere.clone());
    refused
        .status
        .wait_for(|s| s.failures >= 1)
        .await
        .expect("status");
    let s = refused.status.borrow().clone();
    assert!(!s.connected && s.connections == 0, "{s:?}");
    let error = s.last_error.unwrap_or_default();
    assert!(error.contains("not valid for name"), "{error}");
    assert!(elsewhere.snapshot().to_mesh().workloads.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pushed_over_xds_is_enforced() {
    init_tracing();
    let w = World::new(57);
    let yaml = mesh_yaml(&w, "server", false);
    let m = model(&w, &yaml);
    let xds = TestXds::start(xds_addr(&w)).await.unwrap();
    xds.set_mesh(&m);
    let (a, a_feed) = xds_agent(&w, &xds, "node-a").await;
    let (b, _b_feed) = xds_agent(&w, &xds, "node-b").await;
    let echo = Echo::start(w.server_app()).await;
    eventually("node-b serving", || b.listeners("server").is_some()).await;
    eventually("node-a synced", || a_feed.status.borrow().synced).await;
    echo_through(&a, w.service_vip()).await;

    let deny = format!(
        "{yaml}  - name: deny-client\n    namespace: test\n    action: DENY\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/test/sa/client\"]\n"
    );
    xds.set_mesh(&model(&w, &deny));
    eventually("node-b holding the DENY", || {
        b.state.snapshot().policies().len() == 2
    })
    .await;
    let mut s = a.connect_as("client", w.service_vip()).await.unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send_and_read_back(&mut s, b"hello"),
    )
    .await
    .expect("no hang");
    assert!(r.map_or(true, |back| back.is_empty()), "denied");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
}
