//! HTTP/2, gRPC and HTTP/1.1 upgrades through the reference waypoint, end
//! to end in network namespaces: a client pod speaks to the reviews
//! service's VIP (captured, tunneled to the waypoint), the waypoint routes
//! each request (the L7 routes of `demo::waypoint::reviews_yaml`) and
//! forwards it over HBONE to a backend pod.
//!
//! Facts these tests hold the waypoint to:
//! - gRPC runs over HTTP/2 only, and its status travels in trailers
//!   (`grpc-status`, `grpc-message`; gRPC's PROTOCOL-HTTP2 spec); a proxy
//!   that drops trailers turns every error into "missing status".
//! - Istio's waypoint (Envoy) talks to a backend in the protocol the
//!   client used when the port's protocol is not declared
//!   (`USE_DOWNSTREAM_PROTOCOL`), so an HTTP/2 client reaches the backend
//!   over HTTP/2 and an HTTP/1.1 one over HTTP/1.1.
//! - A request's and a response's bodies stream: a bidirectional gRPC
//!   call gets its first answer before it has sent its last message.
//! - An HTTP/1.1 `Upgrade` the backend accepts (101) turns the connection
//!   into a byte stream between client and backend (WebSocket's path
//!   through Envoy's `upgrade_configs`).
//!
//! Needs root (fails, never skips, without it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::{reviews_yaml, start_waypoint};
use ambient_agent::identity::Identity;
use ambient_agent::waypoint::{RequestRecord, Waypoint};
use ambient_proto::tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use ambient_tests::l7apps::{connect, drain, echo, grpc_app, grpc_client, h2_client, l7_app};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const VIP: &str = "10.96.0.1:80";

fn vip() -> SocketAddr {
    VIP.parse().expect("vip")
}

/// The client (node-a), reviews v1 and v2 and the waypoint (node-b), with
/// both agents capturing.
struct Setup {
    _topo: Topology,
    client: Pod,
    v1: Pod,
    v2: Pod,
    waypoint: Waypoint,
    _agents: [Agent; 2],
}

async fn setup(tag: &str) -> Setup {
    init_tracing();
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let v1 = topo.add_pod("v1", 1).expect("pod");
    let v2 = topo.add_pod("v2", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let world = World::new(0);
    let mut y = String::from("workloads:\n");
    y += &client.workload_yaml("test", "node-a", "client");
    y += &reviews_yaml("test", "node-b", &v1, &v2, &wp, vip().ip());
    world.write_mesh(&y);
    let agents = [
        world.capturing_agent("node-a", CaptureMode::Nft).await,
        world.capturing_agent("node-b", CaptureMode::Nft).await,
    ];
    let waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    Setup {
        _topo: topo,
        client,
        v1,
        v2,
        waypoint,
        _agents: agents,
    }
}

fn get(
    path: &str,
    headers: &[(&str, &str)],
) -> Request<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://reviews.test{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Empty::new().map_err(|never| match never {}).boxed())
        .expect("request")
}

async fn text(resp: http::Response<hyper::body::Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn http2_through_the_waypoint_keeps_its_streams_and_trailers() {
    let s = setup("wh2").await;
    let _apps = [
        l7_app(&s.v1, "v1").await.expect("app"),
        l7_app(&s.v2, "v2").await.expect("app"),
    ];
    let mut seen = s.waypoint.requests();
    let mut send = h2_client(&s.client, vip()).await;

    // Routes apply to HTTP/2 requests; the backend is spoken to in HTTP/2.
    let r = send.send_request(get("/who", &[("x-version", "v2")])).await;
    assert_eq!(
        text(r.expect("response")).await,
        (StatusCode::OK, "v2 HTTP/2".into())
    );
    let r = send.send_request(get("/admin/users", &[])).await;
    assert_eq!(
        text(r.expect("response")).await,
        (StatusCode::FORBIDDEN, "RBAC: access denied\n".into())
    );

    // Many concurrent streams on the one client connection, each routed on
    // its own (80/20 between v1 and v2).
    let calls = (0..200).map(|_| {
        let mut send = send.clone();
        async move { text(send.send_request(get("/who", &[])).await.expect("response")).await }
    });
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (status, body) in futures_join_all(calls).await {
        assert_eq!(status, StatusCode::OK);
        *counts.entry(body).or_default() += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
    assert!(counts.keys().all(|k| k.ends_with(" HTTP/2")), "{counts:?}");
    assert!(counts.contains_key("v1 HTTP/2"), "{counts:?}");

    // Streaming both ways: each chunk comes back before the next is sent,
    // and the backend's trailers reach the client.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(4);
    let req = Request::builder()
        .method(Method::POST)
        .uri("http://reviews.test/echo")
        .header("x-version", "v2")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
        .expect("request");
    let resp = send.send_request(req).await.expect("response headers");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    for chunk in ["first ", "second ", "third"] {
        tx.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes()))))
            .await
            .expect("send chunk");
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the chunk comes back while the request is still open")
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().expect("data"), chunk.as_bytes());
    }
    drop(tx);
    let trailers = loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("trailers in time")
            .expect("a frame")
            .expect("no error");
        if let Ok(t) = frame.into_trailers() {
            break t;
        }
    };
    assert_eq!(
        trailers.get("x-served-by").map(|v| v.as_bytes()),
        Some(&b"v2"[..])
    );
    assert_eq!(
        trailers.get("x-bytes").map(|v| v.as_bytes()),
        Some(&b"18"[..])
    );

    // An HTTP/1.1 client is answered by an HTTP/1.1 backend.
    let (mut send1, conn) = hyper::client::conn::http1::handshake(connect(&s.client, vip()).await)
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/who")
        .header("host", "reviews.test")
        .header("x-version", "v2")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let r = send1.send_request(req).await.expect("response");
    assert_eq!(text(r).await, (StatusCode::OK, "v2 HTTP/1.1".into()));

    // The waypoint's records name the protocol of each request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert_eq!(records.len(), 2 + 200 + 1 + 1);
    let by_protocol = |p: &str| records.iter().filter(|r| r.protocol == p).count();
    assert_eq!((by_protocol("HTTP/2"), by_protocol("HTTP/1.1")), (203, 1));
    let client_id = Identity::new("cluster.local", "test", "client");
    assert!(records.iter().all(|r| r.src_identity == client_id));
    let echo = records
        .iter()
        .find(|r| r.path == "/echo")
        .expect("echo record");
    assert_eq!((echo.method.as_str(), echo.status), ("POST", 200));
    assert_eq!(echo.backend.as_deref(), Some(s.v2.name.as_str()));
}

/// `futures::future::join_all` without the dependency: one task each.
async fn futures_join_all<F>(calls: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn grpc_through_the_waypoint_keeps_status_and_streams() {
    let s = setup("wgrpc").await;
    let _apps = [
        grpc_app(&s.v1, "v1").await.expect("app"),
        grpc_app(&s.v2, "v2").await.expect("app"),
    ];
    let mut seen = s.waypoint.requests();
    let mut client = grpc_client(&s.client, vip()).await;

    // Unary, routed by metadata (a header to the waypoint).
    let mut req = tonic::Request::new(echo::EchoRequest {
        text: "hello".into(),
    });
    req.metadata_mut()
        .insert("x-version", "v2".parse().expect("value"));
    let reply = client.say(req).await.expect("unary call").into_inner();
    assert_eq!(
        (reply.text.as_str(), reply.served_by.as_str()),
        ("hello", "v2")
    );

    // An error status arrives as the backend sent it (trailers kept).
    let err = client
        .say(echo::EchoRequest {
            text: "fail:no such review".into(),
        })
        .await
        .expect_err("the backend answers NOT_FOUND");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no such review");

    // Bidirectional streaming: each answer before the next message.
    let (tx, rx) = mpsc::channel(4);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("x-version", "v2".parse().expect("value"));
    tx.send(echo::EchoRequest { text: "m0".into() })
        .await
        .expect("send");
    let mut replies = client.chat(req).await.expect("chat opens").into_inner();
    for i in 0..5 {
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.message())
            .await
            .expect("answer in time, with the call still open")
            .expect("no error")
            .expect("a message");
        assert_eq!(reply.text, format!("m{i}"));
        assert_eq!(reply.served_by, "v2");
        if i < 4 {
            tx.send(echo::EchoRequest {
                text: format!("m{}", i + 1),
            })
            .await
            .expect("send");
        }
    }
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("end in time");
    assert!(matches!(end, Ok(None)), "the call ends with OK: {end:?}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let records: Vec<RequestRecord> = drain(&mut seen);
    let paths: Vec<_> = records
        .iter()
        .map(|r| (r.path.as_str(), r.protocol, r.status))
        .collect();
    assert_eq!(
        paths,
        [
            ("/ambient.test.v1.Echo/Say", "HTTP/2", 200),
            ("/ambient.test.v1.Echo/Say", "HTTP/2", 200),
            ("/ambient.test.v1.Echo/Chat", "HTTP/2", 200),
        ],
        "gRPC errors are HTTP 200 with a status in trailers"
    );
}

#[tokio::test]
async fn http1_upgrade_through_the_waypoint_becomes_a_byte_stream() {
    let s = setup("wupg").await;
    let _apps = [
        l7_app(&s.v1, "v1").await.expect("app"),
        l7_app(&s.v2, "v2").await.expect("app"),
    ];
    let mut seen = s.waypoint.requests();
    let mut io = connect(&s.client, vip()).await.into_inner();
    io.write_all(
        b"GET /ws HTTP/1.1\r\nHost: reviews.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\nx-version: v2\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    let mut greeting = [0u8; 3];
    io.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"v2:");
    for msg in [&b"ping"[..], b"pong after ping"] {
        io.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, msg);
    }
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!((records[0].path.as_str(), records[0].status), ("/ws", 101));
    assert_eq!(records[0].backend.as_deref(), Some(s.v2.name.as_str()));
    let _ = &s.v1;
}
