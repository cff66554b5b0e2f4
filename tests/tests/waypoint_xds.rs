//! A waypoint configured over Delta xDS, end to end in network
//! namespaces: the control plane translates the mesh file's `httpRoutes`
//! into Envoy `RouteConfiguration` and `ClusterLoadAssignment` resources,
//! the waypoint follows them, a change applies to the next request on the
//! same connection (no restart), and a resource the waypoint cannot honour
//! is NACKed while the last good routes keep serving.
//!
//! Facts (Envoy, as istiod configures it):
//! - A route's `direct_response` answers with its status and body.
//! - `typed_per_filter_config["envoy.filters.http.fault"]` (HTTPFault)
//!   aborts with `http_status` on its percentage of requests.
//! - A route's weighted clusters name `outbound|port|subset|host`
//!   clusters, whose endpoints come from EDS.
//! - A client NACKs a response by sending `error_detail` with the
//!   response's nonce, keeping what it had.
//!
//! Needs root (fails, never skips, without it).

use std::net::SocketAddr;
use std::sync::Arc;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::WAYPOINT_UID;
use ambient_agent::hbone::{Pool, PoolConfig};
use ambient_agent::identity::CertManager;
use ambient_agent::state::State;
use ambient_agent::waypoint::{Waypoint, WaypointConfig};
use ambient_agent::xds::delta::{XdsClient, XdsConfig};
use ambient_agent::xds::local::parse_mesh;
use ambient_proto::discovery::Resource;
use ambient_proto::ROUTE_TYPE_URL;
use ambient_tests::control_plane::xds::{eventually, TestXds};
use ambient_tests::l7apps::{h1_client, h1_request, l7_app, ratings_mesh, RATINGS_VIP};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;
use http::StatusCode;

const SERVICE: &str = "test/ratings.test.svc.cluster.local";

fn vip() -> SocketAddr {
    RATINGS_VIP.parse().expect("vip")
}

/// Service `ratings` (endpoints `good` and `bad`) behind the waypoint,
/// with `rules` (YAML at the route's indentation).
fn mesh(client: &Pod, good: &Pod, bad: &Pod, wp: &Pod, rules: &str) -> String {
    ratings_mesh(client, &[good, bad], wp, rules)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_arrive_over_xds_change_without_restart_and_bad_ones_are_nacked() {
    init_tracing();
    let topo = Topology::new("wxds").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let good = topo.add_pod("good", 1).expect("pod");
    let bad = topo.add_pod("bad", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let first = r#"    rules:
      - matches: [{path: {exact: /teapot}}]
        directResponse: {status: 418, body: "from xds"}
      - backends: [{workloads: [good]}]
"#
    .replace("good]", &format!("{}]", good.name));
    let yaml = mesh(&client, &good, &bad, &wp, &first);
    // The node agents follow the file; the waypoint, the control plane.
    let world = World::new(0);
    world.write_mesh(&yaml);
    let _agents: [Agent; 2] = [
        world.capturing_agent("node-a", CaptureMode::Nft).await,
        world.capturing_agent("node-b", CaptureMode::Nft).await,
    ];
    let xds = TestXds::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("xDS server");
    xds.set_mesh(&parse_mesh("mesh", &yaml).expect("mesh"));
    let state = Arc::new(State::default());
    let client_cfg = XdsConfig {
        waypoint: true,
        ..xds.client_config("waypoints")
    };
    let xds_client = XdsClient::new(client_cfg, state.clone());
    let status = xds_client.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follow = tokio::spawn(xds_client.run(async move {
        let _ = stopped.await;
    }));
    eventually("the waypoint's routes", || {
        state.snapshot().http_routes().len() == 1
    })
    .await;
    let certs = CertManager::new(
        world.ca.clone(),
        world.ca.trust_bundle(),
        Default::default(),
    );
    let pool = Pool::new(certs.clone(), PoolConfig::default());
    let _waypoint = Waypoint::start(
        state.clone(),
        certs,
        pool,
        wp.sockets(),
        WaypointConfig::new(WAYPOINT_UID),
    )
    .await
    .expect("waypoint starts");
    let _apps = [
        l7_app(&good, "good").await.expect("app"),
        l7_app(&bad, "bad").await.expect("app"),
    ];
    let mut send = h1_client(&client, vip()).await;
    let host = [("host", "ratings.test")];
    let get = |path: &'static str| (http::Method::GET, path, &host[..]);

    let (m, p, h) = get("/teapot");
    assert_eq!(
        h1_request(&mut send, m, p, h).await,
        (StatusCode::IM_A_TEAPOT, "from xds".into())
    );
    let (m, p, h) = get("/who");
    assert_eq!(
        h1_request(&mut send, m, p, h).await,
        (StatusCode::OK, "good HTTP/1.1".into())
    );

    // A new version: /teapot now denied, a fault on /fault, everything
    // else to `bad`. The next requests on the same connection follow it.
    let second = format!(
        r#"    rules:
      - matches: [{{path: {{exact: /teapot}}}}]
        deny: true
      - matches: [{{path: {{prefix: /fault}}}}]
        backends: [{{workloads: [{good}]}}]
        fault: {{abort: {{httpStatus: 503}}}}
      - backends: [{{workloads: [{bad}]}}]
"#,
        good = good.name,
        bad = bad.name,
    );
    xds.set_mesh(&parse_mesh("mesh", &mesh(&client, &good, &bad, &wp, &second)).expect("mesh"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (m, p, h) = get("/teapot");
        let got = h1_request(&mut send, m, p, h).await;
        if got.0 == StatusCode::FORBIDDEN {
            assert_eq!(got.1, "RBAC: access denied\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new routes never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (m, p, h) = get("/who");
    assert_eq!(
        h1_request(&mut send, m, p, h).await,
        (StatusCode::OK, "bad HTTP/1.1".into())
    );
    let (m, p, h) = get("/fault/1");
    assert_eq!(
        h1_request(&mut send, m, p, h).await,
        (StatusCode::SERVICE_UNAVAILABLE, "fault filter abort".into())
    );

    // A version the waypoint cannot honour (a field outside its subset):
    // NACKed, by name and path, and the last good routes keep serving.
    let nacks_before = status.borrow().nacks;
    let mut bytes = xds_route_bytes(&xds);
    bytes.extend_from_slice(&[0x70, 0x01]); // Envoy's field 14
    xds.push_raw(
        ROUTE_TYPE_URL,
        SERVICE,
        Resource {
            version: "bad".into(),
            resource: Some(ambient_proto::prost_types::Any {
                type_url: ROUTE_TYPE_URL.into(),
                value: bytes,
            }),
            ..Default::default()
        },
    );
    eventually("the NACK", || status.borrow().nacks > nacks_before).await;
    let nack = xds.nacks().last().cloned().unwrap_or_default();
    assert!(
        nack.contains(SERVICE) && nack.contains("not implemented by this waypoint (field 14)"),
        "{nack}"
    );
    let (m, p, h) = get("/teapot");
    assert_eq!(
        h1_request(&mut send, m, p, h).await.0,
        StatusCode::FORBIDDEN
    );
    let (m, p, h) = get("/who");
    assert_eq!(
        h1_request(&mut send, m, p, h).await,
        (StatusCode::OK, "bad HTTP/1.1".into())
    );
    let _ = stop.send(());
    let _ = follow.await;
}

/// The route configuration the control plane serves now, encoded.
fn xds_route_bytes(xds: &TestXds) -> Vec<u8> {
    xds.resource(ROUTE_TYPE_URL, SERVICE)
        .and_then(|r| r.resource)
        .map(|a| a.value)
        .expect("the control plane serves the route")
}
