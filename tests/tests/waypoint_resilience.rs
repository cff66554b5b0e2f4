//! The waypoint's resilience features end to end in network namespaces:
//! route timeouts, retries (with per-try timeouts, to another endpoint),
//! injected faults and direct responses, from a client pod's ordinary
//! HTTP/1.1 requests to a service behind the waypoint.
//!
//! Facts (Istio's VirtualService, as Envoy carries it out):
//! - `timeout` bounds the wait for the backend's answer, retries
//!   included; on expiry Envoy answers 504 `upstream request timeout`.
//! - `retries.retryOn` takes Envoy's conditions (`5xx`, `gateway-error`,
//!   `connect-failure`, `reset`, `retriable-status-codes`, and bare status
//!   codes); `attempts` counts retries after the first try; a
//!   `perTryTimeout` expiry is retried under `5xx` and `gateway-error`.
//!   Istio sets the `previous_hosts` retry predicate, so a retry goes to
//!   another endpoint when there is one.
//! - A connect failure that is not retried is answered 503
//!   (`upstream connect error or disconnect/reset before headers`).
//! - `fault.abort` answers with `httpStatus` and body `fault filter abort`
//!   on `percentage` of requests; `fault.delay` holds requests back by
//!   `fixedDelay` before forwarding.
//! - `directResponse` answers with its status and body, no backend.
//!
//! Needs root (fails, never skips, without it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::start_waypoint;
use ambient_agent::waypoint::{RequestRecord, Waypoint};
use ambient_tests::l7apps::{drain, h1_client, h1_request, l7_app, ratings_mesh, RATINGS_VIP};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::Empty;

fn vip() -> SocketAddr {
    RATINGS_VIP.parse().expect("vip")
}

/// The client (node-a); endpoints `good` and `bad` (the test app) and
/// `dead` (nothing listening) of service `ratings` and its waypoint
/// (node-b), with both agents capturing.
struct Ratings {
    _topo: Topology,
    /// Holds the mesh file the agents follow.
    _world: World,
    client: Pod,
    waypoint: Waypoint,
    _agents: [Agent; 2],
    _apps: [tokio::task::JoinHandle<()>; 2],
}

/// [`Ratings`] with `route` (see [`mesh`]).
async fn ratings(tag: &str, route: &str) -> Ratings {
    init_tracing();
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let good = topo.add_pod("good", 1).expect("pod");
    let bad = topo.add_pod("bad", 1).expect("pod");
    let dead = topo.add_pod("dead", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let world = World::new(0);
    world.write_mesh(&mesh(&client, &good, &bad, &dead, &wp, route));
    let agents = [
        world.capturing_agent("node-a", CaptureMode::Nft).await,
        world.capturing_agent("node-b", CaptureMode::Nft).await,
    ];
    let waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    let apps = [
        l7_app(&good, "good").await.expect("app"),
        l7_app(&bad, "bad").await.expect("app"),
    ];
    Ratings {
        _topo: topo,
        _world: world,
        client,
        waypoint,
        _agents: agents,
        _apps: apps,
    }
}

/// Service `ratings` behind waypoint `wp`, with endpoints `good`, `bad`
/// and `dead` (no application listening), and `route` (the HTTP route's
/// fields after `service:`, YAML at the route's indentation).
fn mesh(client: &Pod, good: &Pod, bad: &Pod, dead: &Pod, wp: &Pod, route: &str) -> String {
    ratings_mesh(client, &[good, bad, dead], wp, route)
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, String) {
    get_with(send, path, &[]).await
}

async fn get_with(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut all = vec![("host", "ratings.test")];
    all.extend_from_slice(headers);
    h1_request(send, http::Method::GET, path, &all).await
}

#[tokio::test]
async fn timeouts_retries_faults_and_direct_responses() {
    // The retried rules send to `bad` or `dead` and `good` only, so that a
    // retry has exactly one other endpoint to go to.
    let (g, b, d) = ("good", "bad", "dead");
    let rules = format!(
        r#"    rules:
      - matches: [{{path: {{prefix: /delay/}}}}]
        backends: [{{workloads: [{g}]}}]
        timeout: 300ms
      - matches: [{{path: {{prefix: /fail-on/}}, headers: {{x-retry: "no"}}}}]
        backends: [{{workloads: [{g}, {b}]}}]
        retries: {{attempts: 0}}
      - matches: [{{path: {{prefix: /fail-on/}}}}]
        backends: [{{workloads: [{g}, {b}]}}]
        retries: {{attempts: 2, retryOn: 5xx}}
      - matches: [{{path: {{prefix: /slow-on/}}}}]
        backends: [{{workloads: [{g}, {b}]}}]
        retries: {{attempts: 1, perTryTimeout: 300ms, retryOn: gateway-error}}
      - matches: [{{path: {{exact: /connect}}, headers: {{x-retry: "no"}}}}]
        backends: [{{workloads: [{d}]}}]
        retries: {{attempts: 0}}
      - matches: [{{path: {{exact: /connect-default}}}}]
        backends: [{{workloads: [{g}, {d}]}}]
      - matches: [{{path: {{exact: /connect-off}}}}]
        backends: [{{workloads: [{g}, {d}]}}]
        retries: {{attempts: 0}}
      - matches: [{{path: {{exact: /connect}}}}]
        backends: [{{workloads: [{g}, {d}]}}]
        retries: {{attempts: 1, retryOn: connect-failure}}
      - matches: [{{path: {{regex: "/abort/[0-9]+"}}}}]
        backends: [{{workloads: [{g}]}}]
        fault: {{abort: {{httpStatus: 503, percentage: 50}}}}
      - matches: [{{path: {{prefix: /delay-fault}}}}]
        backends: [{{workloads: [{g}]}}]
        fault: {{delay: {{fixedDelay: 400ms}}}}
      - matches: [{{path: {{exact: /teapot}}}}]
        directResponse: {{status: 418, body: "short and stout"}}
      - backends: [{{workloads: [{g}]}}]
"#
    );
    let r = ratings("wres", &rules).await;
    let mut seen = r.waypoint.requests();
    let mut send = h1_client(&r.client, vip()).await;

    // Route timeout: a fast answer passes, a slow one is cut at 300 ms.
    assert_eq!(
        get(&mut send, "/delay/10").await,
        (StatusCode::OK, "good".into())
    );
    let start = Instant::now();
    assert_eq!(
        get(&mut send, "/delay/3000").await,
        (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout".into()
        )
    );
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "{:?}",
        start.elapsed()
    );
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert_eq!(records[1].reason.as_deref(), Some("route timeout (300ms)"));

    drain(&mut seen);
    // Without retries, `bad` answers 503 about half the time.
    let mut failed = 0;
    for _ in 0..40 {
        let (status, _) = get_with(&mut send, "/fail-on/bad", &[("x-retry", "no")]).await;
        failed += usize::from(status == StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(
        (5..=35).contains(&failed),
        "{failed} of 40 failed without retries"
    );
    // With retries on 5xx, every request succeeds, some on a second try,
    // which went to the other endpoint.
    drain(&mut seen);
    for _ in 0..40 {
        assert_eq!(
            get(&mut send, "/fail-on/bad").await,
            (StatusCode::OK, "good".into())
        );
    }
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert_eq!(records.len(), 40);
    let retried = records.iter().filter(|r| r.attempts == 2).count();
    assert!(retried >= 5, "{retried} of 40 were retried");
    assert!(records.iter().all(|r| r.attempts <= 2));
    assert!(records.iter().all(|r| r.backend.as_deref() == Some(g)));

    // Per-try timeout: an attempt on the slow endpoint is abandoned after
    // 300 ms and retried on the other.
    for _ in 0..10 {
        assert_eq!(
            get(&mut send, "/slow-on/bad").await,
            (StatusCode::OK, "good".into())
        );
    }
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert!(records.iter().any(|r| r.attempts == 2), "{records:?}");

    // Connect failure: 503 without retries; retried to the live endpoint.
    let (status, body) = get_with(&mut send, "/connect", &[("x-retry", "no")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.starts_with("upstream connect error"), "{body}");
    for _ in 0..10 {
        let answer = get(&mut send, "/connect").await;
        assert_eq!(answer, (StatusCode::OK, "good HTTP/1.1".into()));
    }
    // A route that says nothing of retries gets istiod's default policy
    // (2 retries on connect-failure, refused-stream, unavailable,
    // cancelled; pilot/pkg/networking/core/route/retry): the dead endpoint
    // is passed over. `attempts: 0` turns retries off, so about half fail.
    for _ in 0..10 {
        let answer = get(&mut send, "/connect-default").await;
        assert_eq!(answer, (StatusCode::OK, "good HTTP/1.1".into()));
    }
    let mut failed = 0;
    for _ in 0..20 {
        if get(&mut send, "/connect-off").await.0 == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    // All 20 on the live endpoint: one chance in a million.
    assert!(failed > 0, "no request of 20 went to the dead endpoint");

    // Abort on half the requests (regex path match).
    drain(&mut seen);
    let mut aborted = 0;
    for i in 0..100 {
        let (status, body) = get(&mut send, &format!("/abort/{i}")).await;
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body, "fault filter abort");
                aborted += 1;
            }
            StatusCode::OK => assert_eq!(body, "good HTTP/1.1"),
            other => panic!("unexpected {other}"),
        }
    }
    // 50 expected; the standard deviation is 5.
    assert!((25..=75).contains(&aborted), "{aborted} of 100 aborted");
    let records: Vec<RequestRecord> = drain(&mut seen);
    let faulted = records
        .iter()
        .filter(|r| r.reason.as_deref() == Some("fault injected: abort"))
        .count();
    assert_eq!(faulted, aborted);
    assert!(records
        .iter()
        .filter(|r| r.status == 503)
        .all(|r| r.attempts == 0));

    // Delay: the answer comes no sooner than the fixed delay.
    let start = Instant::now();
    assert_eq!(get(&mut send, "/delay-fault").await.0, StatusCode::OK);
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );

    // Direct response.
    assert_eq!(
        get(&mut send, "/teapot").await,
        (StatusCode::IM_A_TEAPOT, "short and stout".into())
    );
    let records: Vec<RequestRecord> = drain(&mut seen);
    let teapot = records
        .iter()
        .find(|r| r.path == "/teapot")
        .expect("record");
    assert_eq!((teapot.backend.as_deref(), teapot.attempts), (None, 0));
}

/// DestinationRule-style outlier detection: an endpoint that fails three
/// times in a row is left out (Envoy counts 5xx answers and failures to
/// get one), and the service is served by the others meanwhile.
#[tokio::test]
async fn a_failing_endpoint_is_ejected() {
    let route = "    rules:\n      - backends: [{workloads: [good, bad]}]\n    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 60s, maxEjectionPercent: 50}\n";
    let r = ratings("wout", route).await;
    let mut seen = r.waypoint.requests();
    let mut send = h1_client(&r.client, vip()).await;
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(get(&mut send, "/fail-on/bad").await.0);
    }
    let failed = statuses.iter().filter(|s| **s != StatusCode::OK).count();
    assert_eq!(
        failed, 3,
        "bad answers 503 three times, then is out: {statuses:?}"
    );
    let records: Vec<RequestRecord> = drain(&mut seen);
    let last_bad = records
        .iter()
        .rposition(|r| r.backend.as_deref() == Some("bad"))
        .expect("bad was tried");
    assert!(
        records[last_bad + 1..]
            .iter()
            .all(|r| r.status == 200 && r.backend.as_deref() == Some("good")),
        "{records:?}"
    );
}
