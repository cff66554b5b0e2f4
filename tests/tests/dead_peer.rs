//! Peers that vanish without closing: a blackholed application (its
//! packets dropped in its namespace) is noticed by TCP keepalive, a
//! blackholed peer agent by the HBONE pool's HTTP/2 PINGs; either way the
//! connection is closed end to end (the other pod's socket sees it end)
//! within the configured bound, and counted in metrics and the access
//! record. Needs root.

use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::config::{Config, KeepaliveConfig};
use ambient_agent::proxy::record::Direction;
use ambient_tests::netns::{in_ns, Pod};
use ambient_tests::pods::PodMesh;
use ambient_tests::*;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Short keepalive: a dead peer is noticed after 1 + 2 x 1 = 3 s idle.
const KEEPALIVE: KeepaliveConfig = KeepaliveConfig {
    enabled: true,
    time: Duration::from_secs(1),
    interval: Duration::from_secs(1),
    retries: 2,
    user_timeout: true,
};
/// What the test allows beyond the configured bound (scheduling, the
/// kernel's timer granularity, the other side's close travelling back).
const SLACK: Duration = Duration::from_secs(10);

async fn agent(m: &PodMesh, node: &str, tune: impl FnOnce(&mut Config)) -> Agent {
    let mut cfg = m
        .world
        .capturing_config(node, ambient_agent::capture::CaptureMode::Nft);
    tune(&mut cfg);
    m.world.agent_with(cfg).await
}

/// Drops the packets matching any of `rules` entering or leaving `pod`'s
/// namespace (nft, a table of the test's own, gone with the namespace).
fn blackhole(pod: &Pod, rules: &[&str]) {
    let mut script = String::from(
        "add table inet blackhole\n\
         add chain inet blackhole out { type filter hook output priority -300; }\n\
         add chain inet blackhole in { type filter hook input priority -300; }\n",
    );
    for rule in rules {
        for chain in ["out", "in"] {
            script += &format!("add rule inet blackhole {chain} {rule} drop\n");
        }
    }
    let path = std::env::temp_dir().join(format!("blackhole-{}.nft", pod.netns));
    std::fs::write(&path, script).expect("nft script");
    in_ns(&pod.netns, "nft", &["-f", &path.to_string_lossy()]).expect("blackhole installed");
    let _ = std::fs::remove_file(path);
}

/// Waits for `conn` to end (EOF or error) and returns how long it took.
async fn ended(conn: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), conn.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

/// The server application stops answering (its packets dropped): the
/// server agent's keepalive on its socket to the application gives up
/// after time + retries x interval, and the close travels back through the
/// tunnel to the client pod's socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_application_is_noticed_by_tcp_keepalive() {
    init_tracing();
    let m = PodMesh::build("deadapp");
    let long_pings = |c: &mut Config| {
        c.keepalive = KEEPALIVE;
        // The tunnel stays healthy: only the application goes.
        c.pool.keepalive_interval = Duration::from_secs(60);
    };
    let a = agent(&m, "node-a", long_pings).await;
    let b = agent(&m, "node-b", long_pings).await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let mut records_b = b.connections();
    let mut conn = m.connect_echo().await.expect("echo through the mesh");

    blackhole(&m.server, &["tcp dport 8080", "tcp sport 8080"]);
    let bound = KEEPALIVE.socket().expect("on").bound();
    let took = ended(&mut conn, bound + SLACK).await;
    tracing::info!(?took, ?bound, "client socket closed");

    let record = next_record_where(&mut records_b, |r| r.direction == Direction::Inbound).await;
    assert!(
        record.error.is_some(),
        "the inbound record says why it ended: {record:?}"
    );
    assert!(failed_connections(&b, "reporter=\"destination\"") >= 1);
    drop(a);
}

/// The server's whole pod goes dark (node lost, partition): the client
/// agent's PING on the HBONE connection goes unanswered, the connection
/// and its streams are closed, and so is the client pod's socket, before
/// TCP keepalive (set long here) would have noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_agent_is_noticed_by_http2_pings() {
    init_tracing();
    let m = PodMesh::build("deadpeer");
    let pings = |c: &mut Config| {
        c.keepalive = KeepaliveConfig {
            time: Duration::from_secs(600),
            ..KEEPALIVE
        };
        c.pool.keepalive_interval = Duration::from_secs(1);
        c.pool.keepalive_timeout = Duration::from_secs(1);
    };
    let a = agent(&m, "node-a", pings).await;
    let _b = agent(&m, "node-b", pings).await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let mut records_a = a.connections();
    let mut conn = m.connect_echo().await.expect("echo through the mesh");

    blackhole(
        &m.server,
        &["meta iifname != \"lo\" meta oifname != \"lo\""],
    );
    let bound = Duration::from_secs(2);
    let took = ended(&mut conn, bound + SLACK).await;
    tracing::info!(?took, ?bound, "client socket closed");

    let record = next_record_where(&mut records_a, |r| r.direction == Direction::Outbound).await;
    assert!(
        record.error.is_some(),
        "the outbound record says why it ended: {record:?}"
    );
    assert!(failed_connections(&a, "reporter=\"source\"") >= 1);
}
