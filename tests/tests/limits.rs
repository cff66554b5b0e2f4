//! Per-workload caps: one pod cannot hold more connections, or more HBONE
//! streams waiting to be admitted, than configured; the excess is refused
//! at once (outbound: closed; HBONE: 503), recorded with response flag
//! `UO` (Envoy's "upstream overflow"), counted in
//! `istio_tcp_connections_failed_total`, and the place comes back when a
//! connection ends. Needs root for the pod mesh.

use std::time::Duration;

use ambient_agent::config::{Config, LimitsConfig};
use ambient_agent::identity::{CertManager, Identity};
use ambient_agent::proxy::record::Direction;
use ambient_tests::pods::PodMesh;
use ambient_tests::*;
use http::{Method, StatusCode};
use tokio::io::AsyncReadExt as _;

fn limits(connections: usize, pending: usize) -> LimitsConfig {
    LimitsConfig {
        connections_per_workload: connections,
        pending_streams_per_workload: pending,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_over_its_connection_cap_is_refused_until_one_closes() {
    init_tracing();
    let m = PodMesh::build("limconn");
    let agent = |node: &'static str| {
        let cfg = Config {
            capture: Some(ambient_agent::capture::CaptureMode::Nft),
            socket_mark: 0x539,
            limits: limits(2, 0),
            ..m.world.config(node)
        };
        m.world.agent_with(cfg)
    };
    let a = agent("node-a").await;
    let _b = agent("node-b").await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let mut records = a.connections();

    let first = m.connect_echo().await.expect("first of two");
    let _second = m.connect_echo().await.expect("second of two");
    // The third is accepted by capture and closed by the agent at once.
    let mut third = m
        .client
        .sockets()
        .connect(m.server.addr(8080), Default::default())
        .await
        .expect("capture accepts");
    let mut buf = [0u8; 8];
    let got = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed, not left hanging");
    assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    let refused = next_record_where(&mut records, |r| {
        r.direction == Direction::Outbound && r.error.is_some()
    })
    .await;
    assert_eq!(refused.response_flags(), "UO", "{refused:?}");
    assert!(
        refused
            .error
            .as_deref()
            .is_some_and(|e| e.contains("2 connections open")),
        "{refused:?}"
    );
    assert_eq!(failed_connections(&a, "response_flags=\"UO\""), 1);

    // One ends: its place comes back.
    drop(first);
    next_record_where(&mut records, |r| {
        r.direction == Direction::Outbound && r.error.is_none()
    })
    .await;
    let _again = m.connect_echo().await.expect("a place came back");
}

#[tokio::test]
async fn hbone_streams_over_the_pending_cap_get_503() {
    init_tracing();
    let w = World::new(102);
    let b = w
        .agent_with(Config {
            limits: limits(0, 1),
            ..w.config("node-b")
        })
        .await;
    let mut records = b.connections();
    let _stuck = StuckApp::new(&w);
    let mut send = hbone_as(&w, "client").await;
    let connect = |send: &mut h2::client::SendRequest<bytes::Bytes>| connect_app(&w, send);
    let waiting = connect(&mut send);
    // The first is being admitted (connecting) before the second arrives.
    wait_for_pending(&w, 1).await;
    let over = connect(&mut send);
    tokio::pin!(waiting);
    tokio::select! {
        r = over => {
            assert_eq!(r.expect("answered").status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        r = &mut waiting => panic!("the first was answered first: {r:?}"),
    }
    let refused = next_record_where(&mut records, |r| r.direction == Direction::Inbound).await;
    assert_eq!(refused.response_flags(), "UO", "{refused:?}");
    assert_eq!(failed_connections(&b, "response_flags=\"UO\""), 1);
    // The first ends with the connect timeout (503, unreachable); then a
    // stream is admitted again.
    let first = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("connect timeout answers")
        .expect("answered");
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    let after = next_record_where(&mut records, |r| r.direction == Direction::Inbound).await;
    assert_eq!(after.response_flags(), "UF", "{after:?}");
}

/// One peer may hold at most half of a workload's pending places (2 of
/// 4): its third stream is refused while the workload still has room, and
/// another peer's streams are admitted into that room.
#[tokio::test]
async fn one_peer_cannot_take_every_pending_place() {
    init_tracing();
    let w = World::new(103);
    let b = w
        .agent_with(Config {
            limits: limits(0, 4),
            ..w.config("node-b")
        })
        .await;
    let mut records = b.connections();
    let _stuck = StuckApp::new(&w);
    let mut greedy = hbone_as(&w, "client").await;
    let _held = [connect_app(&w, &mut greedy), connect_app(&w, &mut greedy)];
    wait_for_pending(&w, 2).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), connect_app(&w, &mut greedy))
        .await
        .expect("refused at once")
        .expect("answered");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = next_record_where(&mut records, |r| r.direction == Direction::Inbound).await;
    assert_eq!(r.response_flags(), "UO", "{r:?}");
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("its share")),
        "{r:?}"
    );
    // Another client's streams still get in: two more attempts in flight.
    let mut other = hbone_as(&w, "other").await;
    let _theirs = [connect_app(&w, &mut other), connect_app(&w, &mut other)];
    wait_for_pending(&w, 4).await;
}

/// An application that never completes a handshake: a listener with a
/// backlog of one, filled, so the agent's connects to it wait (SYNs
/// dropped) until their timeout.
struct StuckApp {
    _listener: socket2::Socket,
    _filler: std::net::TcpStream,
}

impl StuckApp {
    fn new(w: &World) -> StuckApp {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        listener.set_reuse_address(true).expect("reuse");
        listener.bind(&w.server_app().into()).expect("bind app");
        listener.listen(0).expect("listen");
        let filler = std::net::TcpStream::connect(w.server_app()).expect("fills the backlog");
        StuckApp {
            _listener: listener,
            _filler: filler,
        }
    }
}

/// An HBONE client to the server's agent as service account `sa`.
async fn hbone_as(w: &World, sa: &str) -> h2::client::SendRequest<bytes::Bytes> {
    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    let cert = certs
        .fetch(&Identity::new("cluster.local", "test", sa))
        .await
        .expect("cert");
    let server_id = Identity::new("cluster.local", "test", "server");
    raw_hbone_client(w.server_hbone(), &cert, &w.ca.trust_bundle(), server_id)
        .await
        .expect("HBONE")
}

/// A CONNECT to the server's application; resolves with its answer.
fn connect_app(
    w: &World,
    send: &mut h2::client::SendRequest<bytes::Bytes>,
) -> h2::client::ResponseFuture {
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri(w.server_app().to_string())
        .body(())
        .expect("request");
    send.send_request(req, false).expect("send").0
}

/// Waits until the agent has `n` connection attempts to the stuck app in
/// flight.
async fn wait_for_pending(w: &World, n: usize) {
    for _ in 0..100 {
        if pending(w) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pending(w), n, "streams being admitted (connecting)");
}

/// The agent's connection attempts towards the stuck app in flight
/// (SYN_SENT sockets to it).
fn pending(w: &World) -> usize {
    let app = w.server_app();
    std::process::Command::new("ss")
        .args(["-tn", "state", "syn-sent", "dst", &app.to_string()])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .count()
                .saturating_sub(1)
        })
        .unwrap_or(0)
}
