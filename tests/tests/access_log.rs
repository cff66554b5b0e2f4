//! The access log: real tunneled traffic between two agents on loopback,
//! logged through the agent's own subscriber ([`LogHandle::build`]) into
//! memory. One line per connection on each agent that proxied it, with the
//! right bytes and identities; refused and unreachable connections carry
//! their reason; in JSON every access line is one flat object.

use std::time::Duration;

use ambient_agent::admin::LogHandle;
use ambient_agent::config::LogFormat;
use ambient_tests::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::{sleep, timeout, Instant};

const LIMIT: Duration = Duration::from_secs(30);
const REQUEST: usize = 54_321;
const RESPONSE: usize = 1_234;

/// The keys of every access line (documented in the README).
const KEYS: [&str; 16] = [
    "direction",
    "src",
    "dst",
    "src_identity",
    "dst_identity",
    "dst_service",
    "src_workload",
    "src_namespace",
    "dst_workload",
    "dst_namespace",
    "bytes_sent",
    "bytes_received",
    "duration_ms",
    "connection_security_policy",
    "response_flags",
    "error",
];

/// Installs the agent's subscriber for this test's thread (the test runs
/// on a current-thread runtime, so the agents' tasks log through it).
fn capture(format: LogFormat) -> (CapturedLogs, LogHandle, tracing::subscriber::DefaultGuard) {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let (subscriber, handle) =
        LogHandle::build("info", format, false, move || writer.clone()).expect("subscriber");
    (logs, handle, tracing::subscriber::set_default(subscriber))
}

/// An application that reads the whole request, then answers `RESPONSE`
/// bytes, for each connection.
async fn app(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_ok() {
                let _ = s.write_all(&payload(RESPONSE, 2)).await;
                let _ = s.shutdown().await;
            }
        });
    }
}

/// Waits until `logs` holds `n` lines that `is_access` accepts.
async fn access_lines(
    logs: &CapturedLogs,
    n: usize,
    is_access: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let lines: Vec<String> = logs
            .text()
            .lines()
            .filter(|l| is_access(l))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn json_access_lines_one_per_connection_with_reasons() {
    let (logs, _handle, _guard) = capture(LogFormat::Json);
    let w = World::new(81);
    let a = w.agent("node-a").await;
    let b = w.agent("node-b").await;
    let _app = tokio::spawn(app(TcpListener::bind(w.server_app())
        .await
        .expect("bind app")));
    let is_access = |l: &str| l.contains("\"target\":\"access\"");

    // One allowed connection through the service VIP.
    let mut c = a.connect_as("client", w.service_vip()).await.expect("conn");
    let back = timeout(LIMIT, send_and_read_back(&mut c, &payload(REQUEST, 1)))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(back.len(), RESPONSE);
    let lines = access_lines(&logs, 2, is_access).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    for v in &parsed {
        for key in KEYS.iter().chain(&["timestamp", "level", "message"]) {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        assert!(
            v.get("span").is_none() && v.get("fields").is_none(),
            "flat: {v}"
        );
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["bytes_sent"], REQUEST as u64, "{v}");
        assert_eq!(v["bytes_received"], RESPONSE as u64, "{v}");
        assert_eq!(
            v["src_identity"],
            "spiffe://cluster.local/ns/test/sa/client"
        );
        assert_eq!(
            v["dst_identity"],
            "spiffe://cluster.local/ns/test/sa/server"
        );
        assert_eq!(v["src_workload"], "client");
        assert_eq!(v["src_namespace"], "test");
        assert_eq!(v["dst_workload"], "server");
        assert_eq!(v["dst_namespace"], "test");
        assert_eq!(v["dst"], w.server_app().to_string());
        assert_eq!(v["connection_security_policy"], "mutual_tls");
        assert_eq!(v["response_flags"], "-");
        assert_eq!(v["error"], "-");
        assert!(v["duration_ms"].is_u64(), "{v}");
    }
    let by = |dir: &str| {
        parsed
            .iter()
            .find(|v| v["direction"] == dir)
            .unwrap_or_else(|| panic!("no {dir} line in {parsed:#?}"))
            .clone()
    };
    let out = by("outbound");
    let src: std::net::SocketAddr = out["src"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("outbound knows the client's port: {out}"));
    assert_eq!(out["dst_service"], "server.test.svc.cluster.local");
    let inb = by("inbound");
    // The HBONE connection's peer, which the client's agent binds to the
    // client workload's address (never `Forwarded`, which any peer could
    // forge: ztunnel takes the source from the peer too). No port.
    assert_eq!(inb["src"], w.client_ip().to_string(), "{inb}");
    assert_ne!(src.port(), 0);

    // Refused by the destination's policy: a line on each side with why.
    let mut changes = b.state.subscribe();
    w.write_mesh(&w.deny_client_mesh());
    timeout(LIMIT, changes.changed())
        .await
        .expect("mesh change in time")
        .expect("state");
    let mut c = a.connect_as("client", w.server_app()).await.expect("conn");
    let mut rest = Vec::new();
    let _ = timeout(LIMIT, c.read_to_end(&mut rest)).await;
    // A destination outside any service port: no route at all.
    let mut vip81 = w.service_vip();
    vip81.set_port(81);
    let mut c = a.connect_as("client", vip81).await.expect("conn");
    let _ = timeout(LIMIT, c.read_to_end(&mut rest)).await;

    let lines = access_lines(&logs, 5, is_access).await;
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let refused: Vec<Value> = lines[2..]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |dir: &str, flags: &str| {
        refused
            .iter()
            .find(|v| v["direction"] == dir && v["response_flags"] == flags)
            .unwrap_or_else(|| panic!("no {dir} {flags} line in {refused:#?}"))
    };
    let denied_in = find("inbound", "DENY");
    let why = denied_in["error"].as_str().expect("error");
    assert!(why.contains("401") && why.contains("deny-client"), "{why}");
    assert_eq!(denied_in["bytes_sent"], 0);
    let denied_out = find("outbound", "DENY");
    assert!(
        denied_out["error"].as_str().expect("error").contains("401"),
        "{denied_out}"
    );
    let unreachable = find("outbound", "NR");
    let why = unreachable["error"].as_str().expect("error");
    assert!(why.contains("has no port 81"), "{why}");
    assert_eq!(unreachable["dst"], vip81.to_string());
    for v in &refused {
        for key in KEYS {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
    }

    // A line logged inside a connection names both ends through its
    // spans: the local workload's identity on `workload`, the peer's on
    // the HBONE connection's `inbound`, the addresses on `connect`.
    let denial = logs
        .text()
        .lines()
        .find(|l| l.contains("connection denied by policy"))
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .expect("the denial is logged");
    let spans = denial["spans"].as_array().expect("span list");
    let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["workload", "inbound", "connect"], "{denial}");
    assert_eq!(spans[0]["id"], "spiffe://cluster.local/ns/test/sa/server");
    assert_eq!(
        spans[1]["src_id"],
        "spiffe://cluster.local/ns/test/sa/client"
    );
    assert_eq!(spans[2]["dst"], w.server_app().to_string(), "{denial}");
}

#[tokio::test]
async fn text_access_lines_carry_the_same_fields_and_follow_the_filter() {
    let (logs, handle, _guard) = capture(LogFormat::Text);
    let w = World::new(82);
    let a = w.agent("node-a").await;
    let b = w.agent("node-b").await;
    let _app = tokio::spawn(app(TcpListener::bind(w.server_app())
        .await
        .expect("bind app")));
    let mut c = a.connect_as("client", w.server_app()).await.expect("conn");
    let back = timeout(LIMIT, send_and_read_back(&mut c, &payload(REQUEST, 3)))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(back.len(), RESPONSE);
    let lines = access_lines(&logs, 2, |l| l.contains(" access: ")).await;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for dir in ["outbound", "inbound"] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("direction={dir} ")))
            .unwrap_or_else(|| panic!("no {dir} line in {lines:#?}"));
        for want in [
            " INFO access: connection closed".to_string(),
            format!("bytes_sent={REQUEST}"),
            format!("bytes_received={RESPONSE}"),
            format!("dst={}", w.server_app()),
            "src_identity=spiffe://cluster.local/ns/test/sa/client".into(),
            "dst_identity=spiffe://cluster.local/ns/test/sa/server".into(),
            "src_workload=client src_namespace=test dst_workload=server dst_namespace=test".into(),
            "connection_security_policy=mutual_tls response_flags=- error=-".into(),
        ] {
            assert!(line.contains(&want), "{want} not in {line}");
        }
    }

    // The run-time filter (what `/logging` changes) silences them...
    handle.set("info,access=off").expect("filter");
    let (mut done_a, mut done_b) = (a.connections(), b.connections());
    let mut c = a.connect_as("client", w.server_app()).await.expect("conn");
    let back = timeout(LIMIT, send_and_read_back(&mut c, &payload(10, 4)))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(back.len(), RESPONSE);
    // Both agents are done with it before the filter changes back.
    for done in [&mut done_a, &mut done_b] {
        let r = timeout(LIMIT, done.recv())
            .await
            .expect("in time")
            .expect("record");
        assert_eq!(r.sent, 10);
    }
    // ...and brings them back: the next connection is the third line.
    handle.set("info").expect("filter");
    let mut c = a.connect_as("client", w.server_app()).await.expect("conn");
    let back = timeout(LIMIT, send_and_read_back(&mut c, &payload(20, 5)))
        .await
        .expect("in time")
        .expect("exchange");
    assert_eq!(back.len(), RESPONSE);
    let lines = access_lines(&logs, 4, |l| l.contains(" access: ")).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(
        lines[2..].iter().all(|l| l.contains("bytes_sent=20 ")),
        "none from the silenced connection: {lines:#?}"
    );
}
