//! L7 authorization at the waypoint, end to end in network namespaces:
//! policies that select the waypoint, with conditions on paths, methods,
//! hosts and headers beside the client's identity, decide each request of
//! a client pod's ordinary HTTP/1.1 connection.
//!
//! Facts (Istio's AuthorizationPolicy, enforced by a waypoint's RBAC):
//! - a request is denied if any DENY policy matches it; otherwise, when
//!   ALLOW policies apply, it must match one of them;
//! - `to.operation` paths, methods and hosts and `when:
//!   request.headers[...]` are request conditions; `from.source`
//!   principals are the original client's identity (the HBONE peer of the
//!   waypoint, not a node identity);
//! - a denied request is answered 403 with body `RBAC: access denied`,
//!   and the connection stays usable;
//! - hosts compare without case;
//! - paths are normalized first (Istio's default `BASE`: Envoy's
//!   `normalize_path`, RFC 3986 dot segments and unreserved escapes), so
//!   `/api/../admin` is `/admin` to a policy, as to the backend.
//!
//! Needs root (fails, never skips, without it).

use std::net::SocketAddr;
use std::time::Duration;

use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::{reviews_yaml, start_waypoint, WAYPOINT_UID};
use ambient_agent::waypoint::RequestRecord;
use ambient_tests::l7apps::{drain, h1_client, h1_request, l7_app};
use ambient_tests::netns::Topology;
use ambient_tests::*;
use http::{Method, StatusCode};

const VIP: &str = "10.96.0.1:80";

fn vip() -> SocketAddr {
    VIP.parse().expect("vip")
}

/// Only `client` may use the API (GET or POST under `/api/`, host
/// reviews.test); nobody may send `x-debug`; `/admin` is reserved.
const POLICIES: &str = r#"policies:
  - name: api-for-client
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [waypoint]
    action: ALLOW
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/test/sa/client"]
                paths: ["/api/*"]
                methods: [GET, POST]
                hosts: [reviews.test]
  - name: no-debug
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [waypoint]
    action: DENY
    rules:
      - clauses:
          - matches:
              - requestHeaders: {x-debug: ["*"]}
"#;

#[tokio::test]
async fn l7_policies_decide_each_request_at_the_waypoint() {
    init_tracing();
    let topo = Topology::new("wauthz").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let other = topo.add_pod("other", 0).expect("pod");
    let v1 = topo.add_pod("v1", 1).expect("pod");
    let v2 = topo.add_pod("v2", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let world = World::new(0);
    let mut y = String::from("workloads:\n");
    y += &client.workload_yaml("test", "node-a", "client");
    y += &other.workload_yaml("test", "node-a", "other");
    y += &reviews_yaml("test", "node-b", &v1, &v2, &wp, vip().ip());
    y += POLICIES;
    assert!(y.contains(&format!("uid: {WAYPOINT_UID}")));
    world.write_mesh(&y);
    let _a = world.capturing_agent("node-a", CaptureMode::Nft).await;
    let _b = world.capturing_agent("node-b", CaptureMode::Nft).await;
    let waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    let _apps = [
        l7_app(&v1, "v1").await.expect("app"),
        l7_app(&v2, "v2").await.expect("app"),
    ];
    let mut seen = waypoint.requests();
    let denied = (StatusCode::FORBIDDEN, "RBAC: access denied\n".to_string());
    let host = |h: &'static str| [("host", h)];

    // One connection of the allowed client: each request on its own.
    let mut send = h1_client(&client, vip()).await;
    let (status, _) = h1_request(&mut send, Method::GET, "/api/who", &host("reviews.test")).await;
    assert_eq!(status, StatusCode::OK);
    // Hosts compare without case, and without the port.
    let (status, _) = h1_request(
        &mut send,
        Method::POST,
        "/api/who",
        &host("Reviews.TEST:80"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h1_request(&mut send, Method::DELETE, "/api/who", &host("reviews.test")).await,
        denied
    );
    assert_eq!(
        h1_request(&mut send, Method::GET, "/who", &host("reviews.test")).await,
        denied
    );
    assert_eq!(
        h1_request(&mut send, Method::GET, "/api/who", &host("ratings.test")).await,
        denied
    );
    let debug = [("host", "reviews.test"), ("x-debug", "1")];
    assert_eq!(
        h1_request(&mut send, Method::GET, "/api/who", &debug).await,
        denied
    );
    // The connection still serves after denials.
    let (status, _) = h1_request(&mut send, Method::GET, "/api/who", &host("reviews.test")).await;
    assert_eq!(status, StatusCode::OK);

    // Paths are made canonical before they are decided on (Istio's
    // default normalization): a dot segment cannot climb out of `/api/`,
    // and an escaped unreserved character is the character.
    assert_eq!(
        h1_request(&mut send, Method::GET, "/api/../who", &host("reviews.test")).await,
        denied
    );
    let (status, _) = h1_request(&mut send, Method::GET, "/%61pi/who", &host("reviews.test")).await;
    assert_eq!(status, StatusCode::OK);

    // Another identity matches no ALLOW.
    let mut send = h1_client(&other, vip()).await;
    assert_eq!(
        h1_request(&mut send, Method::GET, "/api/who", &host("reviews.test")).await,
        denied
    );

    // Every decision is in the waypoint's log, with the policy that made it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records: Vec<RequestRecord> = drain(&mut seen);
    let outcome: Vec<(u16, Option<&str>)> = records
        .iter()
        .map(|r| (r.status, r.reason.as_deref()))
        .collect();
    let no_allow = outcome[2].1;
    assert_eq!(
        outcome,
        [
            (200, None),
            (200, None),
            (403, no_allow),
            (403, no_allow),
            (403, no_allow),
            (403, Some("denied by policy test/no-debug")),
            (200, None),
            (403, no_allow),
            (200, None),
            (403, no_allow),
        ],
        "{records:?}"
    );
    assert!(
        no_allow.is_some_and(|r| r.contains("ALLOW")),
        "{no_allow:?}"
    );
    assert_eq!(
        (records[7].path.as_str(), records[8].path.as_str()),
        ("/who", "/api/who")
    );
    let other_id = records[9].src_identity.to_string();
    assert_eq!(other_id, "spiffe://cluster.local/ns/test/sa/other");
    // Denied requests never reached a backend.
    assert!(records
        .iter()
        .filter(|r| r.status == 403)
        .all(|r| r.backend.is_none()));
}
