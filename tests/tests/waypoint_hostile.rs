//! Hostile HTTP/2 clients against the waypoint, in network namespaces: a
//! pod speaking h2c to a service behind the waypoint (its agent tunnels
//! the bytes there) floods it with what took HTTP/2 servers down in the
//! past, and an ordinary client of the same service must still be served
//! during and after, with the waypoint process alive.
//!
//! The attacks (facts: RFC 9113 and the advisories they come from):
//! - Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM at once, over
//!   and over, so the server starts work the client never waits for.
//! - CONTINUATION flood (CVE-2024-27316 and kin): a header block that
//!   never ends, CONTINUATION after CONTINUATION, which a server buffers.
//! - A header list far over the 16 KiB the server announces in
//!   SETTINGS_MAX_HEADER_LIST_SIZE: the request must not be served.
//! - Many streams at once: past SETTINGS_MAX_CONCURRENT_STREAMS, streams
//!   are refused (RST_STREAM REFUSED_STREAM or PROTOCOL_ERROR).
//!
//! Needs root (fails, never skips, without it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::start_waypoint;
use ambient_tests::h2raw::{self, frame, request_headers};
use ambient_tests::l7apps::{h1_client, h1_request, l7_app, ratings_mesh, RATINGS_VIP};
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const AUTHORITY: &str = "ratings.test";

fn vip() -> SocketAddr {
    RATINGS_VIP.parse().expect("vip")
}

/// An h2c connection from `pod` to the service, preface and SETTINGS sent.
async fn raw_h2c(pod: &Pod) -> TcpStream {
    let mut s = pod
        .sockets()
        .connect(vip(), Default::default())
        .await
        .expect("connect from the pod");
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(h2raw::SETTINGS, 0, 0, &[]));
    s.write_all(&hello).await.expect("preface");
    s
}

/// What the server sent until it closed, went quiet for `quiet`, or
/// `limit` passed: (frame types seen, whether the connection ended).
async fn drain_frames(s: &mut TcpStream, quiet: Duration, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = Instant::now() + limit;
    let mut kinds = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (kinds, false);
        }
        match tokio::time::timeout(quiet.min(left), s.read(&mut chunk)).await {
            Err(_) => return (kinds, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (kinds, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            kinds.push(buf[3]);
            buf.drain(..9 + len);
        }
    }
}

/// What the waypoint sends an attacker until it closes or goes quiet.
async fn answers(s: &mut TcpStream) -> (Vec<u8>, bool) {
    drain_frames(s, Duration::from_millis(500), Duration::from_secs(5)).await
}

/// An ordinary HTTP/1.1 request from `pod` through the waypoint: served.
async fn served(pod: &Pod) {
    let mut send = h1_client(pod, vip()).await;
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        h1_request(&mut send, http::Method::GET, "/who", &[("host", AUTHORITY)]),
    )
    .await
    .expect("an answer in time");
    assert_eq!(got, (StatusCode::OK, "good HTTP/1.1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http2_clients_do_not_take_the_waypoint_down() {
    init_tracing();
    let topo = Topology::new("whost").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let good = topo.add_pod("good", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let rules = format!(
        "    rules:\n      - backends: [{{workloads: [{}]}}]\n",
        good.name
    );
    let world = World::new(0);
    world.write_mesh(&ratings_mesh(&client, &[&good], &wp, &rules));
    let _agents: [Agent; 2] = [
        world.capturing_agent("node-a", CaptureMode::Nft).await,
        world.capturing_agent("node-b", CaptureMode::Nft).await,
    ];
    let _waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    let _app = l7_app(&good, "good").await.expect("app");
    served(&client).await;

    // Rapid reset: 5,000 requests cancelled as soon as sent (each one
    // would wait a second at the backend), while an ordinary client asks.
    let mut attacker = raw_h2c(&client).await;
    let get = request_headers("GET", "/delay/1000", AUTHORITY, &[]);
    let mut flood = Vec::new();
    for i in 0..5_000u32 {
        let id = 2 * i + 1;
        flood.extend(frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            id,
            &get,
        ));
        flood.extend(frame(
            h2raw::RST_STREAM,
            0,
            id,
            &h2raw::error_code(h2raw::CANCEL),
        ));
    }
    let writer = tokio::spawn(async move {
        let _ = attacker.write_all(&flood).await;
        attacker
    });
    served(&client).await;
    let mut attacker = writer.await.expect("flood written");
    let (_, _) = answers(&mut attacker).await;
    drop(attacker);
    served(&client).await;

    // CONTINUATION flood: a header block of 8 MiB that never ends. The
    // waypoint must stop reading it (a connection error) long before.
    let mut attacker = raw_h2c(&client).await;
    let mut block = request_headers("GET", "/who", AUTHORITY, &[]);
    block.truncate(block.len() - 1);
    let mut flood = frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &block);
    let filler = vec![b'a'; 16 * 1024 - 9];
    let started = Instant::now();
    let mut sent = 0usize;
    let mut cut = false;
    while sent < 8 << 20 && started.elapsed() < Duration::from_secs(10) {
        flood.extend(frame(h2raw::CONTINUATION, 0, 1, &filler));
        match tokio::time::timeout(Duration::from_secs(2), attacker.write_all(&flood)).await {
            Ok(Ok(())) => sent += flood.len(),
            // Refused (reset) or no longer read at all: either way the
            // block is not being buffered.
            Ok(Err(_)) | Err(_) => {
                cut = true;
                break;
            }
        }
        flood.clear();
    }
    let (kinds, ended) = answers(&mut attacker).await;
    assert!(
        cut || ended || kinds.contains(&h2raw::GOAWAY),
        "an endless header block was read on ({sent} bytes, frames {kinds:?})"
    );
    drop(attacker);
    served(&client).await;

    // A header list of 64 KiB, four times what the server allows: the
    // request is refused, not served.
    let mut attacker = raw_h2c(&client).await;
    let big = "b".repeat(64 * 1024);
    let block = request_headers("GET", "/who", AUTHORITY, &[("x-big", &big)]);
    let mut req = Vec::new();
    // HEADERS, then CONTINUATION frames, each within the 16 KiB default
    // frame size.
    let mut chunks = block.chunks(16 * 1024).peekable();
    let mut first = true;
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        let flags = if last { h2raw::END_HEADERS } else { 0 };
        if first {
            req.extend(frame(h2raw::HEADERS, flags | h2raw::END_STREAM, 1, c));
            first = false;
        } else {
            req.extend(frame(h2raw::CONTINUATION, flags, 1, c));
        }
    }
    let _ = attacker.write_all(&req).await;
    let (kinds, ended) = answers(&mut attacker).await;
    // HEADERS back would be a response: it can only be a refusal (431),
    // which carries no DATA "good".
    assert!(
        ended
            || kinds.contains(&h2raw::RST_STREAM)
            || kinds.contains(&h2raw::GOAWAY)
            || kinds.contains(&h2raw::HEADERS),
        "the oversized request got no answer at all: {kinds:?}"
    );
    assert!(
        !kinds.contains(&h2raw::DATA),
        "the oversized request was served: {kinds:?}"
    );
    drop(attacker);

    // 1,000 streams at once (slow requests): those past the limit the
    // waypoint announces are refused, and others are still served.
    let mut attacker = raw_h2c(&client).await;
    let slow = request_headers("GET", "/delay/3000", AUTHORITY, &[]);
    let mut many = Vec::new();
    for i in 0..1_000u32 {
        many.extend(frame(
            h2raw::HEADERS,
            h2raw::END_HEADERS | h2raw::END_STREAM,
            2 * i + 1,
            &slow,
        ));
    }
    let _ = attacker.write_all(&many).await;
    served(&client).await;
    let (kinds, ended) = answers(&mut attacker).await;
    assert!(
        ended || kinds.contains(&h2raw::RST_STREAM) || kinds.contains(&h2raw::GOAWAY),
        "1,000 concurrent streams were all taken: {kinds:?}"
    );
    drop(attacker);
    served(&client).await;
}
