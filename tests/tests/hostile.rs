//! The attacker's view: a hostile mesh peer, a bad control-plane push, an
//! operator's restart. Each case is a real client over real sockets with
//! the outcome a zero-trust agent owes. `SECURITY.md` lists every threat
//! with the test that shows it (some live in other files, named there).
//!
//! The namespace cases need root (they fail, never skip, without it).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::identity::{CertManager, Identity};
use ambient_agent::socket::ConnectOpts;
use ambient_agent::xds::local::parse_mesh;
use ambient_proto::discovery::Resource;
use ambient_proto::prost_types::Any;
use ambient_proto::AUTHORIZATION_TYPE_URL;
use ambient_tests::control_plane::xds::{eventually, xds_agent, TestXds};
use ambient_tests::pods::*;
use ambient_tests::*;
use http::{Method, StatusCode};

const LIMIT: Duration = Duration::from_secs(5);

/// A CONNECT to `target` with a `Forwarded: for=` claim.
fn connect_claiming(target: SocketAddr, claimed: IpAddr) -> http::Request<()> {
    http::Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{claimed}\""))
        .body(())
        .expect("request")
}

/// An HBONE client inside `pod` with a genuine certificate for `who`,
/// speaking straight to `server`'s agent (marked, so capture lets it by).
async fn hbone_from_pod(
    m: &PodMesh,
    pod: &ambient_tests::netns::Pod,
    who: Identity,
) -> h2::client::SendRequest<bytes::Bytes> {
    let trust = m.world.ca.trust_bundle();
    let cert = CertManager::new(m.world.ca.clone(), trust.clone(), Default::default())
        .fetch(&who)
        .await
        .expect("cert");
    let opts = ConnectOpts {
        mark: Some(0x539),
        ..Default::default()
    };
    let tcp = pod
        .sockets()
        .connect(m.server.addr(15008), opts)
        .await
        .expect("tcp to the server's HBONE port");
    let server_id = Identity::new("cluster.local", "test", "server");
    raw_hbone_client_over(tcp, &cert, &trust, server_id)
        .await
        .expect("mTLS with a genuine certificate")
}

/// Sends `req`, and when answered 200 a message; returns the status and
/// what came back.
async fn exchange(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
) -> (StatusCode, Vec<u8>) {
    tokio::time::timeout(LIMIT, async {
        let (resp, mut body_tx) = send.send_request(req, false).expect("send");
        let resp = resp.await.expect("response");
        let status = resp.status();
        if status != StatusCode::OK {
            return (status, Vec::new());
        }
        body_tx
            .send_data(bytes::Bytes::from_static(MSG), true)
            .expect("data");
        let mut body = resp.into_body();
        let mut back = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("chunk");
            let _ = body.flow_control().release_capacity(chunk.len());
            back.extend_from_slice(&chunk);
        }
        (status, back)
    })
    .await
    .expect("no hang")
}

/// Point 1: any authenticated peer could name its source in `Forwarded`
/// and pass a `sourceIps` ALLOW, or have the application see a forged
/// client (even 127.0.0.1). Only a destination's waypoint may relay its
/// client's address that way; ztunnel never takes the source from
/// `Forwarded` at all (it reads only `host=` for metrics).
#[tokio::test]
async fn forwarded_from_a_peer_that_is_not_a_waypoint_is_ignored() {
    init_tracing();
    let m = PodMesh::build("hfwd");
    let only_client = on_server(
        "only-client-ip",
        "ALLOW",
        &format!("sourceIps: [{}/32]", m.client.ip),
    );
    m.set_policies(&only_client);
    let _a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    wait_for_policies(&b, &["only-client-ip"]).await;
    let echo = PodEcho::start(&m.server, 8080).await;
    let intruder = Identity::new("cluster.local", "other", "intruder");

    let mut send = hbone_from_pod(&m, &m.intruder, intruder.clone()).await;
    let (status, _) = exchange(
        &mut send,
        connect_claiming(m.server_app(8080), m.client.ip.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a claimed source passed");
    assert!(allowed(&m.client, m.server_app(8080)).await, "the real one");

    // No policy: the tunnel opens, and the application sees the peer.
    m.set_policies("");
    wait_for_policies(&b, &[]).await;
    for claimed in [IpAddr::from([127, 0, 0, 1]), m.client.ip.into()] {
        let (status, back) =
            exchange(&mut send, connect_claiming(m.server_app(8080), claimed)).await;
        assert_eq!((status, back.as_slice()), (StatusCode::OK, MSG));
    }
    let seen = echo.peer_ips();
    assert!(seen.contains(&IpAddr::V4(m.client.ip)), "{seen:?}");
    let from_intruder: Vec<_> = seen.iter().filter(|ip| **ip != m.client.ip).collect();
    assert_eq!(
        from_intruder,
        [&IpAddr::V4(m.intruder.ip), &IpAddr::V4(m.intruder.ip)],
        "the application saw a forged source"
    );
}

/// The standard loopback mesh plus `policies` (YAML list items).
fn mesh_with_policies(w: &World, policies: &str) -> ambient_agent::state::Mesh {
    let yaml = w.standard_mesh("server") + "policies:\n" + policies;
    parse_mesh("mesh", &yaml).expect("valid mesh")
}

/// CONNECTs to the server app through node-b's agent as `who` (a genuine
/// certificate of the world's root), from the client's address.
async fn status_as(w: &World, who: Identity) -> StatusCode {
    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    let cert = certs.fetch(&who).await.expect("cert");
    let server_id = Identity::new("cluster.local", "test", "server");
    tokio::time::timeout(LIMIT, async {
        let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
        tcp.bind(SocketAddr::new(w.client_ip(), 0)).expect("bind");
        let tcp = tcp.connect(w.server_hbone()).await.expect("tcp");
        let mut send = raw_hbone_client_over(tcp, &cert, &w.ca.trust_bundle(), server_id)
            .await
            .expect("mTLS");
        status_of(&mut send, Method::CONNECT, &w.server_app().to_string())
            .await
            .expect("answer")
    })
    .await
    .expect("no hang")
}

/// Point 2: istiod sends `Match.service_accounts` (11) and
/// `Authorization.dry_run` (6); an agent that dropped them turned an ALLOW
/// of one service account into "everyone" and enforced dry-run DENYs.
/// Service accounts compare namespace and name (ztunnel's rbac.rs); a
/// dry-run policy is evaluated and logged, never enforced.
#[tokio::test]
async fn service_account_allows_and_dry_run_denies_arrive_over_xds_with_their_meaning() {
    init_tracing();
    let w = World::new(91);
    let policies = r#"
  - name: allow-client-sa
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [server]
    rules:
      - clauses:
          - matches:
              - serviceAccounts: [test/client]
  - name: dry-deny-client
    namespace: test
    action: DENY
    dryRun: true
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/test/sa/client"]
"#;
    let m = mesh_with_policies(&w, policies);
    let xds = TestXds::start(format!("127.{}.0.1:0", w.net).parse().unwrap())
        .await
        .unwrap();
    xds.set_mesh(&m);
    let (b, feed) = xds_agent(&w, &xds, "node-b").await;
    eventually("node-b synced", || feed.status.borrow().synced).await;
    eventually("node-b serving", || b.listeners("server").is_some()).await;
    let _echo = Echo::start(w.server_app()).await;
    let client = Identity::new("cluster.local", "test", "client");
    // Same name, another namespace; and another name in the namespace.
    let other_ns = Identity::new("cluster.local", "prod", "client");
    let other_sa = Identity::new("cluster.local", "test", "robot");
    assert_eq!(
        status_as(&w, client).await,
        StatusCode::OK,
        "dry run enforced"
    );
    assert_eq!(status_as(&w, other_ns).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_as(&w, other_sa).await, StatusCode::UNAUTHORIZED);
    assert!(xds.nacks().is_empty(), "{:?}", xds.nacks());
    // Evaluated and counted (and logged), though not enforced.
    let text = metrics_text(&b);
    let label = "policy=\"test/dry-deny-client\",action=\"deny\"";
    assert_eq!(
        metric_sum(&text, "ambient_dry_run_policy_matches_total", label),
        1,
        "{text}"
    );
}

/// Point 3: a response was applied whole or not at all, so a valid DENY
/// that came beside an undecodable resource was NACKed with it, never
/// applied, and never sent again. ztunnel applies each resource on its
/// own and NACKs only the bad ones (src/xds/client.rs,
/// `handle_single_resource`).
#[tokio::test]
async fn a_valid_deny_beside_a_bad_resource_is_applied() {
    init_tracing();
    let w = World::new(92);
    let m = mesh_with_policies(&w, "");
    let xds = TestXds::start(format!("127.{}.0.1:0", w.net).parse().unwrap())
        .await
        .unwrap();
    xds.set_mesh(&m);
    let (b, feed) = xds_agent(&w, &xds, "node-b").await;
    eventually("node-b synced", || feed.status.borrow().synced).await;
    eventually("node-b serving", || b.listeners("server").is_some()).await;
    let _echo = Echo::start(w.server_app()).await;
    let client = Identity::new("cluster.local", "test", "client");
    assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);

    let deny = mesh_with_policies(&w, DENY_CLIENT);
    let encoded = ambient_agent::xds::delta::encode_mesh(&deny).expect("encode");
    let good = Resource {
        name: "test/deny-client".into(),
        resource: encoded.authorizations.get("test/deny-client").cloned(),
        ..Default::default()
    };
    let bad = Resource {
        name: "test/garbage".into(),
        resource: Some(Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![0x0a, 0xff],
        }),
        ..Default::default()
    };
    xds.push_response(AUTHORIZATION_TYPE_URL, vec![bad, good]);
    eventually("a NACK", || !xds.nacks().is_empty()).await;
    let nack = xds.nacks().remove(0);
    assert!(nack.contains("test/garbage"), "{nack}");
    assert!(!nack.contains("test/deny-client"), "{nack}");
    eventually("the DENY applied", || {
        b.state
            .snapshot()
            .policies()
            .iter()
            .any(|p| p.name == "deny-client")
    })
    .await;
    assert_eq!(status_as(&w, client).await, StatusCode::UNAUTHORIZED);
}

/// Point 7: a CONNECT to the workload's address on a port the agent
/// serves looped back into the agent (200 on 15001: a tunnel into the
/// outbound proxy) or reached its admin endpoints. ztunnel refuses its own
/// ports (`illegal_ports`: 15001, 15006, 15008); this agent refuses every
/// port it owns, with 400, before connecting anywhere.
#[tokio::test]
async fn connect_to_the_agents_own_ports_is_refused_with_400() {
    init_tracing();
    let w = World::new(93);
    let _b = w.agent("node-b").await;
    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    let cert = certs
        .fetch(&Identity::new("cluster.local", "test", "client"))
        .await
        .expect("cert");
    let server_id = Identity::new("cluster.local", "test", "server");
    let mut send = raw_hbone_client(w.server_hbone(), &cert, &w.ca.trust_bundle(), server_id)
        .await
        .expect("mTLS");
    for port in [15000, 15001, 15006, 15008, 15020, 15021, 15053] {
        let target = SocketAddr::new(w.server_ip(), port).to_string();
        let status = tokio::time::timeout(LIMIT, status_of(&mut send, Method::CONNECT, &target))
            .await
            .expect("no hang")
            .expect("answer");
        assert_eq!(status, StatusCode::BAD_REQUEST, "port {port}");
    }
}

/// The handle nft gave the agent's table in `pod`: a table removed and
/// made again gets a new one.
fn capture_table_handle(pod: &ambient_tests::netns::Pod) -> Option<String> {
    let args = ["-a", "list", "table", "inet", "ambient_agent"];
    let out = ambient_tests::netns::in_ns(&pod.netns, "nft", &args).ok()?;
    let first = out.lines().next()?;
    first.split("# handle").nth(1).map(|h| h.trim().to_string())
}

/// Point 5's twin: a workload whose details change (here its capacity)
/// had its capture removed and installed again, a window in which its
/// traffic left uncaptured. Capture now stays; only the listeners are
/// replaced (beside the old ones, with SO_REUSEPORT).
#[tokio::test]
async fn a_workload_update_never_takes_capture_off_its_pod() {
    init_tracing();
    let m = PodMesh::build("hupd");
    let b = m.agent("node-b").await;
    let _a = m.agent("node-a").await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let before = capture_table_handle(&m.server).expect("captured");
    assert!(allowed(&m.client, m.server_app(8080)).await);

    let mut yaml = String::from("workloads:\n");
    yaml += &m.client.workload_yaml("test", "node-a", "client");
    yaml += &m.intruder.workload_yaml("other", "node-a", "intruder");
    yaml += &m.server.workload_yaml("test", "node-b", "server");
    yaml += "    capacity: 3\n";
    m.world.write_mesh(&yaml);
    eventually("the new server workload", || {
        b.state
            .snapshot()
            .workload_by_uid("server")
            .is_some_and(|w| w.capacity == 3)
    })
    .await;
    eventually("its listeners replaced", || {
        b.served()
            .iter()
            .any(|w| w.uid == "server" && w.capacity == 3)
    })
    .await;
    assert_eq!(
        capture_table_handle(&m.server),
        Some(before),
        "capture was redone"
    );
    assert!(
        allowed(&m.client, m.server_app(8080)).await,
        "served after the change"
    );
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn metrics_text(agent: &ambient_agent::agent::Agent) -> String {
    agent
        .metrics()
        .encode(&Default::default())
        .expect("metrics encode")
}

/// The next record of `direction` from `rx`.
async fn next_record(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ambient_agent::proxy::record::ConnectionRecord>>,
    direction: ambient_agent::proxy::record::Direction,
) -> Arc<ambient_agent::proxy::record::ConnectionRecord> {
    next_record_where(rx, |r| r.direction == direction).await
}

/// Point 9: accounting that lied. (a) A connection that ended in an error
/// was recorded with 0 bytes although 1 MiB had moved each way (ztunnel
/// counts bytes as they are written, whatever ends the copy). (b) Metrics
/// came from a 1,024-slot broadcast and fell behind under load; they are
/// now counted where the record is made. (c) A tunnel whose TLS handshake
/// failed was labelled `mutual_tls`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_metrics_tell_what_happened() {
    use ambient_agent::proxy::record::Direction;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    raise_fd_limit();
    let w = World::new(94);
    let a = w.agent("node-a").await;
    let b = w.agent("node-b").await;
    const MIB: usize = 1 << 20;

    // (a) 1 MiB each way, then the application resets the connection.
    let app = tokio::net::TcpListener::bind(w.server_app()).await.unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut buf = vec![0u8; MIB];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.set_zero_linger().unwrap();
        drop(s);
        app
    });
    let mut at_a = a.connections();
    let mut at_b = b.connections();
    let mut c = a.connect_as("client", w.server_app()).await.unwrap();
    c.write_all(&payload(MIB, 9)).await.unwrap();
    let mut back = vec![0u8; MIB];
    c.read_exact(&mut back).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, c.read_to_end(&mut rest)).await;
    let app = server.await.unwrap();
    for (side, r) in [
        ("inbound", next_record(&mut at_b, Direction::Inbound).await),
        (
            "outbound",
            next_record(&mut at_a, Direction::Outbound).await,
        ),
    ] {
        assert!(r.error.is_some(), "{side}: the reset is the outcome: {r:?}");
        assert_eq!(
            (r.sent, r.received),
            (MIB as u64, MIB as u64),
            "{side}: {r:?}"
        );
        assert_eq!(r.security_policy(), "mutual_tls", "{side}");
    }
    let text = metrics_text(&b);
    assert_eq!(
        metric_sum(
            &text,
            "istio_tcp_received_bytes_total",
            "reporter=\"destination\""
        ),
        MIB as u64,
        "{text}"
    );

    // (b) Many connections at once: every one is counted, on both sides.
    drop(app);
    let _echo = Echo::start(w.server_app()).await;
    let n = 2_000;
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = a.connect_as("client", w.server_app()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut c = c;
            let _ = send_and_read_back(&mut c, &[i as u8; 16]).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for (agent, reporter) in [(&a, "source"), (&b, "destination")] {
        let mut closed = 0;
        for _ in 0..100 {
            let text = metrics_text(agent);
            let label = format!("reporter=\"{reporter}\"");
            closed = metric_sum(&text, "istio_tcp_connections_closed_total", &label);
            if closed == n + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(closed, n + 1, "{reporter}: every connection counted");
    }

    // (c) The server's agent proves an identity the client does not
    // expect: the handshake fails, and nothing says `mutual_tls`.
    drop(b);
    let impostor = w.dir.path().join("impostor.yaml");
    std::fs::write(&impostor, w.standard_mesh("impostor")).unwrap();
    let mut cfg = w.config("node-b");
    cfg.mesh_file = Some(impostor);
    let _b = w.agent_with(cfg).await;
    let mut at_a = a.connections();
    let mut c = a.connect_as("client", w.server_app()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, c.read_to_end(&mut rest)).await;
    let r = next_record(&mut at_a, Direction::Outbound).await;
    assert!(r.error.is_some(), "{r:?}");
    assert_eq!(r.security_policy(), "none", "{r:?}");
    let text = metrics_text(&a);
    assert_eq!(
        metric_sum(
            &text,
            "ambient_tcp_connections_failed_total",
            "connection_security_policy=\"unknown\""
        ),
        1,
        "{text}"
    );
}

/// A TCP connection to `dst` from `src` (any port).
async fn tcp_from(src: IpAddr, dst: SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src, 0)).expect("bind");
    s.connect(dst).await.expect("connect")
}

/// Whether the agent closed `s` within `limit` (EOF or reset), whatever
/// it answered first.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Point 8: each pending handshake took 16 KiB before the client said a
/// word, there was no cap, and a handshake waited `connectTimeout`. Now a
/// silent connection costs no buffer and is closed at the handshake's own
/// timeout; handshakes in progress are capped per listener and per client
/// (excess closed at once, counted), so one noisy client cannot keep
/// another from handshaking. (ztunnel has no such bound; these are ours,
/// configured under `handshakes`.)
#[tokio::test]
async fn handshakes_are_bounded_in_time_and_number_per_client() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let w = World::new(95);
    let mut cfg = w.config("node-b");
    cfg.connect_timeout = Duration::from_secs(30);
    cfg.handshakes.timeout = Duration::from_millis(700);
    cfg.handshakes.max_per_client = 4;
    let b = w.agent_with(cfg).await;
    let _echo = Echo::start(w.server_app()).await;
    let hbone = w.server_hbone();
    let noisy: IpAddr = format!("127.{}.1.7", w.net).parse().unwrap();

    // Silent: closed at the handshake timeout, not the connect timeout.
    let mut silent = tcp_from(noisy, hbone).await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "silent kept open"
    );

    // Four handshakes begun and stalled (the first byte of a record).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = tcp_from(noisy, hbone).await;
        s.write_all(&[0x16]).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A fifth from the same client is refused at once...
    let mut fifth = tcp_from(noisy, hbone).await;
    fifth.write_all(&[0x16]).await.unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_millis(300)).await,
        "fifth admitted"
    );
    // ... while another client handshakes and tunnels.
    let client = Identity::new("cluster.local", "test", "client");
    assert_eq!(status_as(&w, client).await, StatusCode::OK);
    // The stalled ones end at the timeout.
    for mut s in stalled {
        assert!(
            closed_within(&mut s, Duration::from_secs(5)).await,
            "stalled kept open"
        );
    }
    // A TCP probe (connect, close) is no failed handshake.
    drop(tcp_from(noisy, hbone).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = metrics_text(&b);
    let failed = |reason: &str| {
        metric_sum(
            &text,
            "ambient_hbone_handshakes_failed_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(failed("too_many"), 1, "{text}");
    assert_eq!(failed("timeout"), 5, "{text}");
    assert_eq!(failed("closed"), 0, "{text}");
}

/// Test-only: trusts any server (these cases test the server's checks).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config presenting `chain` + `key` (or nothing) with `alpn`.
fn tls_client(
    client_auth: Option<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )>,
    alpn: &[u8],
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// Whether a client with `cfg` gets a tunnel (200) from `w`'s server.
async fn tunnel_with(w: &World, cfg: rustls::ClientConfig) -> Result<StatusCode, String> {
    tokio::time::timeout(LIMIT, async {
        let tcp = tcp_from(w.client_ip(), w.server_hbone()).await;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ambient_agent::hbone::tls::placeholder_server_name(), tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(conn);
        status_of(&mut send, Method::CONNECT, &w.server_app().to_string())
            .await
            .map_err(|e| format!("CONNECT: {e}"))
    })
    .await
    .unwrap_or_else(|_| Err("hung".into()))
}

/// A leaf for `uri` (no SAN when `None`) signed by `w`'s root, valid from
/// `from` to `to` (relative to now).
fn leaf(
    w: &World,
    uri: Option<&str>,
    from: time::Duration,
    to: time::Duration,
) -> (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = (dir.path().join("root.pem"), dir.path().join("root-key.pem"));
    w.ca.write_pem(&cert_path, &key_path).expect("root");
    let root_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&key_path).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&cert_path).unwrap(), root_key)
            .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    if let Some(uri) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    }
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + from;
    params.not_after = now + to;
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (vec![cert.der().clone()], key)
}

/// Clients the mesh must not let in at TLS: an expired certificate, one
/// with no SPIFFE SAN, none at all, the wrong ALPN, TLS 1.2. (Another
/// root's certificate and a foreign trust domain: `hbone.rs`,
/// `client_certificate_from_another_root_is_refused` and
/// `a_client_from_another_trust_domain_is_refused`.) HBONE is TLS 1.3
/// with ALPN h2 and a SPIFFE URI SAN (DESIGN §3; ztunnel's server config
/// offers only TLS 1.3 and h2).
#[tokio::test]
async fn tls_clients_outside_hbone_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let w = World::new(96);
    let _b = w.agent("node-b").await;
    let echo = Echo::start(w.server_app()).await;
    let client_uri = "spiffe://cluster.local/ns/test/sa/client";
    let hour = time::Duration::hours(1);
    let good = leaf(&w, Some(client_uri), -hour, hour);
    let again = (good.0.clone(), good.1.clone_key());
    assert_eq!(
        tunnel_with(&w, tls_client(Some(again), b"h2")).await,
        Ok(StatusCode::OK)
    );
    let cases = [
        (
            "expired",
            tls_client(Some(leaf(&w, Some(client_uri), -2 * hour, -hour)), b"h2"),
        ),
        (
            "not yet valid",
            tls_client(Some(leaf(&w, Some(client_uri), hour, 2 * hour)), b"h2"),
        ),
        (
            "no SAN",
            tls_client(Some(leaf(&w, None, -hour, hour)), b"h2"),
        ),
        ("no certificate", tls_client(None, b"h2")),
        ("ALPN http/1.1", tls_client(Some(good), b"http/1.1")),
    ];
    for (name, cfg) in cases {
        let got = tunnel_with(&w, cfg).await;
        assert!(got.is_err(), "{name}: {got:?}");
    }
    assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

    // TLS 1.2 (a ClientHello without supported_versions): no ServerHello,
    // the connection is closed.
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // no session id
    hello.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]); // ECDHE-RSA-AES128-GCM-SHA256
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, 0x00, hello.len() as u8];
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    record.extend_from_slice(&hs);
    let mut s = tcp_from(w.client_ip(), w.server_hbone()).await;
    s.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(LIMIT, s.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "left open");
    assert!(
        answer.first() != Some(&0x16),
        "a handshake answer: {answer:?}"
    );
}

/// A raw HTTP/2 client of `w`'s server agent, as the mesh client.
async fn raw_h2(w: &World, settings: &[(u16, u32)]) -> ambient_tests::h2raw::RawH2 {
    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    let cert = certs
        .fetch(&Identity::new("cluster.local", "test", "client"))
        .await
        .expect("cert");
    let server_id = Identity::new("cluster.local", "test", "server");
    let src: IpAddr = format!("127.{}.1.8", w.net).parse().unwrap();
    ambient_tests::h2raw::RawH2::connect(
        src,
        w.server_hbone(),
        &cert,
        &w.ca.trust_bundle(),
        server_id,
        settings,
    )
    .await
    .expect("raw HTTP/2 over mTLS")
}

/// Reads frames until EOF, a GOAWAY, or `limit`; returns them and whether
/// the connection ended (EOF or GOAWAY).
async fn read_frames(
    c: &mut ambient_tests::h2raw::RawH2,
    limit: Duration,
) -> (Vec<ambient_tests::h2raw::Frame>, bool) {
    use ambient_tests::h2raw::GOAWAY;
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, c.read()).await {
            Ok(Ok(Some(f))) => {
                let goaway = f.kind == GOAWAY;
                frames.push(f);
                if goaway {
                    return (frames, true);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => return (frames, true),
            Err(_) => return (frames, false),
        }
    }
}

/// HTTP/2 abuse on one connection, each answered the way the protocol
/// allows, and none of it keeps a legitimate client out: rapid reset
/// (CVE-2023-44487), a CONTINUATION flood (CVE-2024-27316), a SETTINGS
/// flood, more streams than the server advertised. h2 (the server's
/// HTTP/2) bounds the first two (GOAWAY) and refuses extra streams, and
/// never hands over a stream reset before it was accepted; one reset
/// later stops its upstream connect (next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_abuse_is_bounded_and_others_keep_working() {
    use ambient_tests::h2raw::*;
    init_tracing();
    raise_fd_limit();
    let w = World::new(97);
    let _b = w.agent("node-b").await;
    let echo = Echo::start(w.server_app()).await;
    let client = Identity::new("cluster.local", "test", "client");
    let app = w.server_app().to_string();

    // Rapid reset: 10,000 CONNECTs, each cancelled as soon as sent.
    let mut c = raw_h2(&w, &[]).await;
    let mut burst = Vec::new();
    for i in 0..10_000u32 {
        let id = 2 * i + 1;
        burst.extend(frame(HEADERS, END_HEADERS, id, &connect_headers(&app)));
        burst.extend(frame(RST_STREAM, 0, id, &error_code(CANCEL)));
    }
    let _ = c.send_raw(&burst).await;
    let (_, ended) = read_frames(&mut c, LIMIT).await;
    assert!(ended, "rapid reset: the connection was kept");
    let opened = echo.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        opened < 1_000,
        "rapid reset opened {opened} upstream connections"
    );
    assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);

    // CONTINUATION flood: a header block that never ends.
    let mut c = raw_h2(&w, &[]).await;
    let _ = c.send(HEADERS, 0, 1, &connect_headers(&app)).await;
    let junk = vec![0x40u8; 16 * 1024];
    let mut flood = Vec::new();
    for _ in 0..256 {
        flood.extend(frame(CONTINUATION, 0, 1, &junk));
    }
    let _ = c.send_raw(&flood).await;
    let (_, ended) = read_frames(&mut c, LIMIT).await;
    assert!(ended, "CONTINUATION flood: the connection was kept");
    assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);

    // SETTINGS flood, never reading the ACKs: the server may push back or
    // close; either way others are served meanwhile.
    let mut c = raw_h2(&w, &[]).await;
    let flood: Vec<u8> = (0..50_000)
        .flat_map(|_| frame(SETTINGS, 0, 0, &[]))
        .collect();
    let writing = tokio::spawn(async move {
        let _ = tokio::time::timeout(LIMIT, c.send_raw(&flood)).await;
        c
    });
    assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);
    drop(writing.await.unwrap());

    // More streams than advertised (100): the extra ones are refused.
    let mut c = raw_h2(&w, &[]).await;
    let mut many = Vec::new();
    for i in 0..150u32 {
        many.extend(frame(
            HEADERS,
            END_HEADERS,
            2 * i + 1,
            &connect_headers(&app),
        ));
    }
    c.send_raw(&many).await.unwrap();
    let mut ok = 0;
    let mut refused = 0;
    let mut ended = false;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while ok + refused < 150 && !ended {
        match tokio::time::timeout_at(deadline, c.read()).await {
            Ok(Ok(Some(f))) if f.kind == HEADERS => ok += 1,
            Ok(Ok(Some(f))) if f.kind == RST_STREAM => refused += 1,
            Ok(Ok(Some(f))) if f.kind == GOAWAY => ended = true,
            Ok(Ok(Some(_))) => {}
            _ => ended = true,
        }
    }
    assert!(ok <= 100, "{ok} streams opened over the limit of 100");
    assert!(
        refused >= 50 || ended,
        "extra streams: {refused} refused, ended: {ended}"
    );
    assert_eq!(status_as(&w, client).await, StatusCode::OK);
}

/// A tunnel whose client never opens its receive window (initial window
/// 0, no WINDOW_UPDATE) must push back on the application, not make the
/// agent buffer what the application writes: its writes stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_window_reader_pushes_back_on_the_application() {
    use ambient_tests::h2raw::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let w = World::new(98);
    let _b = w.agent("node-b").await;
    let written = Arc::new(AtomicU64::new(0));
    let app = tokio::net::TcpListener::bind(w.server_app()).await.unwrap();
    let count = written.clone();
    let writer = tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {
            count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    });
    let mut c = raw_h2(&w, &[(INITIAL_WINDOW_SIZE, 0)]).await;
    let headers = connect_headers(&w.server_app().to_string());
    c.send(HEADERS, END_HEADERS, 1, &headers).await.unwrap();
    // Answer what must be answered (SETTINGS ACK), never open the window.
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = c.read().await {
            if f.kind == SETTINGS && f.flags & 1 == 0 {
                let _ = c.send(SETTINGS, 1, 0, &[]).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_two = written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_three = written.load(Ordering::SeqCst);
    assert!(at_two > 0, "the application never wrote");
    assert!(
        at_three - at_two < 1 << 20,
        "still writing: {at_two} then {at_three} bytes"
    );
    assert!(
        at_three < 64 << 20,
        "{at_three} bytes taken from the application"
    );
    reader.abort();
    writer.abort();
}

/// A slowloris burst (connections that begin a handshake and stall, and
/// silent ones) while a legitimate client opens tunnels: it is served
/// throughout. Its latency is printed (`--nocapture`), not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_burst_does_not_keep_a_legitimate_client_out() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    raise_fd_limit();
    let w = World::new(99);
    let _b = w.agent("node-b").await;
    let _echo = Echo::start(w.server_app()).await;
    let hbone = w.server_hbone();
    let mut held = Vec::new();
    // 8 attackers x 150: each reaches its per-client cap (64) of stalled
    // handshakes; the rest say nothing.
    for a in 0..8u8 {
        let src: IpAddr = format!("127.{}.5.{}", w.net, a + 1).parse().unwrap();
        for i in 0..150 {
            let mut s = tcp_from(src, hbone).await;
            if i % 2 == 0 {
                let _ = s.write_all(&[0x16, 0x03]).await;
            }
            held.push(s);
        }
    }
    let client = Identity::new("cluster.local", "test", "client");
    let mut took = Vec::new();
    for _ in 0..20 {
        let start = std::time::Instant::now();
        assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);
        took.push(start.elapsed());
    }
    took.sort();
    eprintln!(
        "legitimate tunnels during a burst of {} connections: p50 {:?}, max {:?}",
        held.len(),
        took[took.len() / 2],
        took[took.len() - 1]
    );
}

/// Garbage on every listener the agent has: each connection is closed,
/// the agent keeps serving.
#[tokio::test]
async fn garbage_on_every_listener_is_closed_and_the_agent_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let w = World::new(100);
    let ip = w.server_ip();
    let mut cfg = w.config("node-b");
    cfg.admin_address = ip;
    cfg.metrics_address = ip;
    cfg.readiness_address = ip;
    cfg.admin_port = 15000;
    cfg.metrics_port = 15020;
    cfg.readiness_port = 15021;
    let _b = w.agent_with(cfg).await;
    let _echo = Echo::start(w.server_app()).await;
    let garbage = payload(64 * 1024, 3);
    for port in [15001, 15006, 15008, 15000, 15020, 15021] {
        let mut s = tcp_from(w.client_ip(), SocketAddr::new(ip, port)).await;
        let _ = s.write_all(&garbage).await;
        assert!(
            closed_within(&mut s, LIMIT).await,
            "port {port} kept a garbage connection"
        );
    }
    // A request line that never ends, on the HTTP endpoints: answered
    // and dropped once it outgrows any real request's head.
    let mut endless = b"GET /".to_vec();
    endless.extend(std::iter::repeat_n(b'a', 64 * 1024));
    for port in [15000, 15020, 15021] {
        let mut s = tcp_from(w.client_ip(), SocketAddr::new(ip, port)).await;
        let _ = s.write_all(&endless).await;
        assert!(
            closed_within(&mut s, LIMIT).await,
            "port {port} kept an endless request"
        );
    }
    let client = Identity::new("cluster.local", "test", "client");
    assert_eq!(status_as(&w, client).await, StatusCode::OK);
}

/// A CONNECT its client resets while the agent is still connecting the
/// application is dropped then, not carried on to the connect timeout
/// (rapid reset's cost is the upstream each stream opens).
#[tokio::test]
async fn a_connect_reset_by_its_client_stops_connecting_upstream() {
    use ambient_agent::proxy::record::Direction;
    use ambient_tests::h2raw::*;
    init_tracing();
    let w = World::new(101);
    let mut cfg = w.config("node-b");
    cfg.connect_timeout = Duration::from_secs(30);
    let b = w.agent_with(cfg).await;
    // An application whose accept queue is full: connecting to it hangs.
    let app = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    app.bind(&w.server_app().into()).unwrap();
    app.listen(1).unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&w.server_app().into());
        fill.push(s);
    }
    let mut at_b = b.connections();
    let mut c = raw_h2(&w, &[]).await;
    c.send(
        HEADERS,
        END_HEADERS,
        1,
        &connect_headers(&w.server_app().to_string()),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(RST_STREAM, 0, 1, &error_code(CANCEL)).await.unwrap();
    let r = next_record(&mut at_b, Direction::Inbound).await;
    // Not "target unreachable: connect timed out", 30 s later.
    assert_eq!(r.error.as_deref(), Some("client reset the stream"), "{r:?}");
    drop((app, fill));
}
