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
    // An application that never completes a handshake: a listener with a
    // backlog of one, filled, so the agent's connect waits (SYNs dropped)
    // until its connect timeout.
    let stuck =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    stuck.set_reuse_address(true).expect("reuse");
    stuck.bind(&w.server_app().into()).expect("bind app");
    stuck.listen(0).expect("listen");
    let _filler = std::net::TcpStream::connect(w.server_app()).expect("fills the backlog");

    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    let cert = certs
        .fetch(&Identity::new("cluster.local", "test", "client"))
        .await
        .expect("cert");
    let server_id = Identity::new("cluster.local", "test", "server");
    let mut send = raw_hbone_client(w.server_hbone(), &cert, &w.ca.trust_bundle(), server_id)
        .await
        .expect("HBONE");
    let connect = |send: &mut h2::client::SendRequest<bytes::Bytes>| {
        let req = http::Request::builder()
            .method(Method::CONNECT)
            .uri(w.server_app().to_string())
            .body(())
            .expect("request");
        send.send_request(req, false).expect("send").0
    };
    let waiting = connect(&mut send);
    // The first is being admitted (connecting) before the second arrives.
    for _ in 0..100 {
        if pending_seen(&w) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pending_seen(&w), "the first stream is connecting");
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

/// Whether the agent has a connection attempt towards the stuck app in
/// flight (a SYN_SENT socket to it).
fn pending_seen(w: &World) -> bool {
    let app = w.server_app();
    std::process::Command::new("ss")
        .args(["-tn", "state", "syn-sent", "dst", &app.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count() > 1)
        .unwrap_or(false)
}
