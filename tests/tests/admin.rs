//! The admin, metrics and readiness endpoints of agents on loopback: TCP
//! metrics after tunneled traffic, the config dump, readiness, run-time log
//! level changes, `/quitquitquit` and the CPU and heap profiles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::admin::{Endpoint, LogHandle};
use ambient_agent::agent::Agent;
use ambient_agent::config::Config;
use ambient_agent::identity::{CaError, CertificateSigner, Identity, SignFuture};
use ambient_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};

#[path = "admin/istioctl.rs"]
mod istioctl;
#[path = "admin/profile_proto.rs"]
mod profile_proto;

const LIMIT: Duration = Duration::from_secs(30);

/// Endpoints on `ip`, on ports away from the standard ones so that agents
/// elsewhere on the machine (on 0.0.0.0:15020...) do not collide.
fn with_endpoints(cfg: Config, ip: std::net::IpAddr) -> Config {
    Config {
        admin_address: ip,
        admin_port: 25000,
        metrics_address: ip,
        metrics_port: 25020,
        readiness_address: ip,
        readiness_port: 25021,
        ..cfg
    }
}

/// The client's and the server's agents, each with its endpoints on its
/// workload's address.
async fn agents_with_endpoints(w: &World) -> (Agent, Agent) {
    let a = w
        .agent_with(with_endpoints(w.config("node-a"), w.client_ip()))
        .await;
    let b = w
        .agent_with(with_endpoints(w.config("node-b"), w.server_ip()))
        .await;
    (a, b)
}

/// Status and body of one HTTP/1.1 request.
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let (status, body) = request_bytes(addr, method, path).await;
    (status, String::from_utf8(body).expect("a text body"))
}

/// As [`request`], for a body that need not be text.
async fn request_bytes(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<u8>) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = timeout(LIMIT, exchange)
        .await
        .expect("answer in time")
        .expect("HTTP exchange");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP response");
    let head = std::str::from_utf8(&raw[..end]).expect("a text head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, raw[end + 4..].to_vec())
}

fn addr(agent: &Agent, e: Endpoint) -> SocketAddr {
    agent.admin().addr(e).expect("endpoint served")
}

/// Scrapes until every line of `want` is present.
async fn scrape_until(agent: &Agent, want: &[String]) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = request(addr(agent, Endpoint::Metrics), "GET", "/metrics").await;
        assert_eq!(status, 200);
        if want.iter().all(|l| body.lines().any(|b| b == l)) {
            return body;
        }
        if Instant::now() > deadline {
            panic!("missing some of {want:#?} in\n{body}");
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// The standard mesh with telemetry names: the client as a pod of
/// Deployment `client` labelled `app`/`version` in cluster `cluster-a`,
/// zone `eu-west-1a`; the server with explicit canonical names, which win
/// over its labels, and no cluster (Istio's default, `Kubernetes`).
fn mesh_with_telemetry(w: &World) -> String {
    w.standard_mesh("server")
        .replace(
            "    name: client\n",
            "    name: client-5d8f9-x2x7q\n    workloadName: client\n    \
             labels: {app: client-app, version: v1}\n    clusterId: cluster-a\n    \
             locality: eu-west/eu-west-1a/rack-1\n",
        )
        .replace(
            "    name: server\n",
            "    name: server\n    labels: {app: not-this, version: nor-this}\n    \
             canonicalName: server-canonical\n    canonicalRevision: v2\n",
        )
}

/// The value of each of Istio's TCP labels for the client -> service
/// connection of [`mesh_with_telemetry`], as the source (client's agent)
/// reports it, in ztunnel's order (`CommonTrafficLabels`,
/// istio/ztunnel@62d82653 `src/proxy/metrics.rs`). The facts behind each:
/// `*_workload` is the workload name (the Deployment), not the pod's;
/// `*_app`/`*_version` repeat the canonical service/revision; istiod takes
/// those from `service.istio.io/canonical-*`, `app.kubernetes.io/*` or
/// `app`/`version` labels, else the workload name and `latest`
/// (istio/istio `pkg/kube/labels/labels.go`), explicit values first;
/// a workload without a cluster is in `Kubernetes` (ztunnel
/// `src/state/workload.rs`); `request_protocol` is always `tcp`; missing
/// values are `unknown`; the four locality labels come last.
const SOURCE_LABELS: [(&str, &str); 27] = [
    ("reporter", "source"),
    ("source_workload", "client"),
    ("source_canonical_service", "client-app"),
    ("source_canonical_revision", "v1"),
    ("source_workload_namespace", "test"),
    (
        "source_principal",
        "spiffe://cluster.local/ns/test/sa/client",
    ),
    ("source_app", "client-app"),
    ("source_version", "v1"),
    ("source_cluster", "cluster-a"),
    ("destination_service", "server.test.svc.cluster.local"),
    ("destination_service_namespace", "test"),
    ("destination_service_name", "server"),
    ("destination_workload", "server"),
    ("destination_canonical_service", "server-canonical"),
    ("destination_canonical_revision", "v2"),
    ("destination_workload_namespace", "test"),
    (
        "destination_principal",
        "spiffe://cluster.local/ns/test/sa/server",
    ),
    ("destination_app", "server-canonical"),
    ("destination_version", "v2"),
    ("destination_cluster", "Kubernetes"),
    ("request_protocol", "tcp"),
    ("response_flags", "-"),
    ("connection_security_policy", "mutual_tls"),
    ("source_region", "eu-west"),
    ("source_zone", "eu-west-1a"),
    ("destination_region", "unknown"),
    ("destination_zone", "unknown"),
];

/// `{k="v",...}` for `labels`.
fn label_set(labels: &[(&str, &str)]) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", pairs.join(","))
}

/// The labels as `reporter` reports the connection. The destination's agent
/// knows the connection by its pod address only: ztunnel guesses the
/// service from the destination port there; this agent does not, so the
/// three `destination_service*` labels are `unknown` on that side (a
/// difference the README lists).
fn tcp_labels(reporter: &str) -> String {
    tcp_labels_to(reporter, true)
}

/// As [`tcp_labels`], for a connection to the service's VIP or (not
/// `via_service`) straight to the server's pod address, which names no
/// service on either side.
fn tcp_labels_to(reporter: &str, via_service: bool) -> String {
    let mut labels = SOURCE_LABELS;
    labels[0].1 = if reporter == "source" {
        "source"
    } else {
        "destination"
    };
    if reporter == "destination" || !via_service {
        for l in &mut labels[9..12] {
            l.1 = "unknown";
        }
    }
    label_set(&labels)
}

#[tokio::test]
async fn tcp_metrics_count_tunneled_connections_and_bytes() {
    const REQUEST: usize = 100_000;
    const RESPONSE: usize = 7_777;
    let w = World::new(71);
    w.write_mesh(&mesh_with_telemetry(&w));
    let (a, b) = agents_with_endpoints(&w).await;
    let app = TcpListener::bind(w.server_app()).await.unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = app.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&payload(RESPONSE, 2)).await.unwrap();
        s.shutdown().await.unwrap();
        got.len()
    });
    let mut c = a.connect_as("client", w.service_vip()).await.unwrap();
    let back = timeout(LIMIT, send_and_read_back(&mut c, &payload(REQUEST, 1)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back.len(), RESPONSE);
    assert_eq!(server.await.unwrap(), REQUEST);

    for (agent, reporter) in [(&a, "source"), (&b, "destination")] {
        let labels = tcp_labels(reporter);
        let want = [
            format!("istio_tcp_connections_opened_total{labels} 1"),
            format!("istio_tcp_connections_closed_total{labels} 1"),
            // Istio's meaning: received = request bytes, sent = response.
            format!("istio_tcp_received_bytes_total{labels} {REQUEST}"),
            format!("istio_tcp_sent_bytes_total{labels} {RESPONSE}"),
            "ambient_enrolled_workloads 1".to_string(),
            "ambient_certificates 1".to_string(),
            "ambient_certificates_invalid 0".to_string(),
            "ambient_trust_roots 1".to_string(),
            "ambient_trust_untrusted_connections_closed_total 0".to_string(),
            format!("istio_crl_policy_rejections_total{{reporter=\"{reporter}\"}} 0"),
            // ztunnel's build metric (`src/metrics/meta.rs`): component
            // `ztunnel`, tag from ISTIO_META_ISTIO_VERSION, else `unknown`.
            "istio_build{component=\"ztunnel\",tag=\"unknown\"} 1".to_string(),
        ];
        let body = scrape_until(agent, &want).await;
        assert!(
            body.contains("# TYPE istio_tcp_sent_bytes counter"),
            "{body}"
        );
        // The process metrics Prometheus users expect, with live values.
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {body}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6, "{body}");
        assert!(value("process_cpu_seconds_total") > 0.0, "{body}");
        assert!(value("process_open_fds") >= 3.0, "{body}");
        assert!(
            value("process_max_fds") >= value("process_open_fds"),
            "{body}"
        );
        assert!(value("process_start_time_seconds") > 1.6e9, "{body}");
        let sa = if reporter == "source" {
            "client"
        } else {
            "server"
        };
        let expiry = format!(
            "ambient_certificate_expiry_seconds{{identity=\"spiffe://cluster.local/ns/test/sa/{sa}\"}} "
        );
        let line = body
            .lines()
            .find(|l| l.starts_with(&expiry))
            .unwrap_or_else(|| panic!("no {expiry} in {body}"));
        let secs: u64 = line[expiry.len()..].parse().expect("seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(secs > now && secs <= now + 25 * 3600, "{line}");
    }
    let body = scrape_until(&a, &["ambient_pool_connections_opened_total 1".into()]).await;
    assert!(body.contains("ambient_pool_connections_open 1"), "{body}");
}

/// Decodes `dump` as `istioctl ztunnel-config` does ([`istioctl`]) and
/// checks what it shows of the standard mesh with [`DENY_CLIENT`], for the
/// client's agent (node-a). The expected values are ztunnel's: enum values
/// `HBONE`/`Healthy`/`Namespace`/`Deny`, VIPs as `network/ip`, service
/// ports as `{"80": 8080}`, a workload's services as `namespace/hostname`,
/// defaults `Kubernetes` and (istiod's) the workload name and `latest`;
/// certificates with the PEM in base64, a decimal serial and RFC 3339
/// times (istio/ztunnel@62d82653 `src/admin.rs`, `src/state/*.rs`).
fn check_istioctl_reads(dump: &str) {
    use base64::Engine as _;
    let d: istioctl::ZtunnelDump = serde_json::from_str(dump).expect("istioctl decodes it");
    let uids: Vec<&str> = d.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(uids, ["client", "server"], "sorted by uid");
    let client = &d.workloads[0];
    assert_eq!(client.workload_ips, ["127.72.1.1"]);
    assert_eq!(
        (
            client.protocol.as_str(),
            client.status.as_str(),
            client.node.as_str()
        ),
        ("HBONE", "Healthy", "node-a")
    );
    assert_eq!(
        (
            client.name.as_str(),
            client.namespace.as_str(),
            client.service_account.as_str()
        ),
        ("client", "test", "client")
    );
    assert_eq!(
        (
            client.workload_name.as_str(),
            client.canonical_name.as_str(),
            client.canonical_revision.as_str(),
            client.cluster_id.as_str(),
            client.trust_domain.as_str(),
        ),
        ("client", "client", "latest", "Kubernetes", "cluster.local")
    );
    assert_eq!(client.capacity, 1);
    assert!(client.locality.is_none() && client.waypoint.is_none());

    assert_eq!(d.services.len(), 1);
    let svc = &d.services[0];
    assert_eq!(
        (
            svc.name.as_str(),
            svc.namespace.as_str(),
            svc.hostname.as_str()
        ),
        ("server", "test", "server.test.svc.cluster.local")
    );
    assert_eq!(svc.vips, ["/127.72.3.1"]);
    assert_eq!(svc.ports.get("80"), Some(&8080));
    let ep = &svc.endpoints["server"];
    assert_eq!(ep.workload_uid, "server");
    assert_eq!(ep.port.get(&80), Some(&8080));
    assert_eq!(svc.visibility, "Public");

    assert_eq!(d.policies.len(), 1);
    let p = &d.policies[0];
    assert_eq!(
        (
            p.name.as_str(),
            p.namespace.as_str(),
            p.scope.as_str(),
            p.action.as_str()
        ),
        ("deny-client", "test", "Namespace", "Deny")
    );
    let principals = &p.rules[0][0][0].principals;
    assert_eq!(principals.len(), 1);
    assert_eq!(
        principals[0].exact.as_deref(),
        Some("cluster.local/ns/test/sa/client")
    );

    assert_eq!(d.certificates.len(), 1, "the client's agent holds one");
    let c = &d.certificates[0];
    assert_eq!(c.identity, "spiffe://cluster.local/ns/test/sa/client");
    assert_eq!(c.state, "Available");
    assert_eq!(c.root_certs.len(), 1, "the world's one root");
    assert!(!c.cert_chain.is_empty());
    let rfc3339 = |t: &str| {
        let b = t.as_bytes();
        t.len() == 20
            && b[4] == b'-'
            && b[10] == b'T'
            && b[19] == b'Z'
            && t.chars().filter(|ch| ch.is_ascii_digit()).count() == 14
    };
    for cert in c.cert_chain.iter().chain(&c.root_certs) {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(&cert.pem)
            .expect("pem is base64");
        let pem = String::from_utf8(pem).expect("PEM text");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        assert!(
            !cert.serial_number.is_empty()
                && cert.serial_number.chars().all(|ch| ch.is_ascii_digit()),
            "{cert:?}"
        );
        assert!(
            rfc3339(&cert.valid_from) && rfc3339(&cert.expiration_time),
            "{cert:?}"
        );
        assert!(cert.valid_from < cert.expiration_time, "{cert:?}");
    }
}

/// A CA that is always down.
struct DownCa;

impl CertificateSigner for DownCa {
    fn sign<'a>(&'a self, _: &'a Identity, _: &'a str, _: Duration) -> SignFuture<'a> {
        Box::pin(async { Err(CaError::Unavailable("test CA is down".into())) })
    }
}

#[tokio::test]
async fn readiness_waits_for_certificates_and_config_dump_shows_the_node() {
    // No certificate can be had: served but not ready. (A world of its own:
    // a dropped agent's sockets close a moment later.)
    let w = World::new(74);
    let cfg = with_endpoints(w.config("node-a"), w.client_ip());
    let down = Agent::start_with_signer(cfg, Arc::new(DownCa), w.ca.trust_bundle())
        .await
        .expect("agent starts");
    sleep(Duration::from_millis(200)).await;
    let (status, body) = request(addr(&down, Endpoint::Readiness), "GET", "/healthz/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no certificate yet for spiffe://cluster.local/ns/test/sa/client"),
        "{body}"
    );
    drop(down);

    let w = World::new(72);
    w.write_mesh(&w.deny_client_mesh());
    // With a CA: ready once the certificate is issued.
    let a = w
        .agent_with(with_endpoints(w.config("node-a"), w.client_ip()))
        .await;
    let ready = addr(&a, Endpoint::Readiness);
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, body) = request(ready, "GET", "/healthz/ready").await;
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "never ready: {body}");
        sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.admin().conditions().check(), Ok(()));

    let (status, dump) = request(addr(&a, Endpoint::Admin), "GET", "/config_dump").await;
    assert_eq!(status, 200);
    for want in ["\"node\": \"node-a\"", "\"connectionsOpened\": 0"] {
        assert!(dump.contains(want), "{want} not in {dump}");
    }
    check_istioctl_reads(&dump);
    // The trust anchors in force: the world's root, by its SHA-256.
    let doc: serde_json::Value = serde_json::from_str(&dump).expect("JSON");
    let root_sha: String = sha256(&w.ca.trust_bundle().roots[0])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        doc["trust"]["roots"][0]["sha256"],
        root_sha.as_str(),
        "{dump}"
    );
    assert_eq!(doc["trust"]["crls"], serde_json::json!([]));
    let enrolled = &dump[dump.find("\"enrolledWorkloads\"").expect("enrolled")..];
    assert!(
        enrolled.starts_with("\"enrolledWorkloads\": [\n    \"client\"\n  ]"),
        "{enrolled}"
    );

    // Wrong method, unknown path, the admin paths not on other ports.
    let (status, _) = request(addr(&a, Endpoint::Admin), "GET", "/quitquitquit").await;
    assert_eq!(status, 405);
    let (status, _) = request(addr(&a, Endpoint::Metrics), "GET", "/config_dump").await;
    assert_eq!(status, 404);

    // Without a log handle the filter cannot change.
    let (status, _) = request(addr(&a, Endpoint::Admin), "POST", "/logging?level=debug").await;
    assert_eq!(status, 503);

    // Quitting stops the agent and readiness says so.
    let (status, _) = request(addr(&a, Endpoint::Admin), "POST", "/quitquitquit").await;
    assert_eq!(status, 200);
    timeout(LIMIT, a.stopped()).await.expect("agent stops");
    let (status, body) = request(ready, "GET", "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (503, "shutting down\n"));
}

#[tokio::test]
async fn logging_level_changes_at_run_time() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::{fmt, reload, EnvFilter};

    let captured = CapturedLogs::default();
    let writer = captured.clone();
    let (filter, handle) = reload::Layer::new(EnvFilter::new("warn"));
    let subscriber = tracing_subscriber::registry().with(filter).with(
        fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone()),
    );
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    let w = World::new(73);
    let a = w
        .agent_with(with_endpoints(w.config("node-a"), w.client_ip()))
        .await;
    a.admin().set_log_handle(LogHandle::new(handle, "warn"));
    let admin = addr(&a, Endpoint::Admin);

    tracing::debug!(target: "admin_test", "marker-before");
    assert_eq!(
        request(admin, "GET", "/logging").await,
        (200, "level: warn\n".into())
    );
    let (status, body) = request(admin, "POST", "/logging?level=warn%2Cadmin_test%3Ddebug").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "level: warn,admin_test=debug\n")
    );
    tracing::debug!(target: "admin_test", "marker-after");
    let logs = captured.text();
    assert!(logs.contains("marker-after"), "{logs}");
    assert!(!logs.contains("marker-before"), "{logs}");

    // A bad filter is refused and the current one kept.
    let (status, body) = request(admin, "POST", "/logging?level=admin_test%3Dloud").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = request(admin, "POST", "/logging").await;
    assert_eq!(status, 400);
    assert_eq!(
        request(admin, "GET", "/logging").await,
        (200, "level: warn,admin_test=debug\n".into())
    );
}

#[tokio::test]
async fn opened_counts_while_a_tunnel_is_open_and_closed_after() {
    let w = World::new(75);
    w.write_mesh(&mesh_with_telemetry(&w));
    let (a, b) = agents_with_endpoints(&w).await;
    let _echo = Echo::start(w.server_app()).await;
    let mut c = a.connect_as("client", w.server_app()).await.unwrap();
    let mut buf = [0u8; 4];
    c.write_all(b"ping").await.unwrap();
    timeout(LIMIT, c.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");

    for (agent, reporter) in [(&a, "source"), (&b, "destination")] {
        let labels = tcp_labels_to(reporter, false);
        let opened = format!("istio_tcp_connections_opened_total{labels} 1");
        let body = scrape_until(agent, std::slice::from_ref(&opened)).await;
        assert!(
            !body.contains("istio_tcp_connections_closed_total{"),
            "still open, nothing closed: {body}"
        );
    }

    drop(c);
    for (agent, reporter) in [(&a, "source"), (&b, "destination")] {
        let labels = tcp_labels_to(reporter, false);
        scrape_until(
            agent,
            &[
                format!("istio_tcp_connections_opened_total{labels} 1"),
                format!("istio_tcp_connections_closed_total{labels} 1"),
                format!("istio_tcp_received_bytes_total{labels} 4"),
                format!("istio_tcp_sent_bytes_total{labels} 4"),
            ],
        )
        .await;
    }
}

#[tokio::test]
async fn refused_connections_are_counted_as_failed() {
    let w = World::new(76);
    // Nobody may reach the server.
    w.write_mesh(&format!(
        "{}policies:\n  - {{name: deny-all, namespace: test, action: DENY, rules: [{{}}]}}\n",
        w.standard_mesh("server")
    ));
    let (a, b) = agents_with_endpoints(&w).await;
    let _echo = Echo::start(w.server_app()).await;
    let mut c = a.connect_as("client", w.server_app()).await.unwrap();
    let _ = c.write_all(b"ping").await;
    let mut rest = Vec::new();
    let _ = timeout(LIMIT, c.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "refused, nothing echoed");
    // The destination refused it (401) and the source saw the tunnel fail.
    for (agent, reporter) in [(&b, "destination"), (&a, "source")] {
        let deadline = Instant::now() + LIMIT;
        loop {
            let (_, body) = request(addr(agent, Endpoint::Metrics), "GET", "/metrics").await;
            let failed: Vec<&str> = body
                .lines()
                .filter(|l| l.starts_with("ambient_tcp_connections_failed_total{"))
                .collect();
            if failed.len() == 1 {
                let line = failed[0];
                assert!(
                    line.contains(&format!("reporter=\"{reporter}\"")) && line.ends_with(" 1"),
                    "{line}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "no failed connection in\n{body}");
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Keeps one core busy in a function the CPU profile must name.
#[inline(never)]
fn burn_cpu(stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut x = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    x
}

/// The profiles at ztunnel's paths, with its answers (istio/ztunnel@62d82653
/// `src/admin.rs`, `handle_pprof` and `handle_jemalloc_pprof_heapgen`):
/// `/debug/pprof/profile` takes `seconds` (u64, 1-300, default 10) and
/// `frequency` (Hz, i32, 1-1000, default 100); a value out of range or
/// not a number is a 400 `invalid seconds value; expected 1-300\n` or
/// `invalid frequency value; expected 1-1000\n`. Else it samples for
/// `seconds` with pprof-rs and answers 200 with the pprof `Profile`
/// protobuf, not gzipped (pprof-rs's `Report::pprof`): sample types
/// `samples`/`count` and `cpu`/`nanoseconds`, period `cpu`/`nanoseconds`
/// of 1e9 / frequency. Built without jemalloc, `/debug/pprof/heap` answers
/// 500 `jemalloc not enabled` (no newline), and so does
/// `/debug/pprof/heap/profiling`. Ours adds one rule: pprof-rs's profiler
/// is process-global, so a profile asked for while another runs is a 409
/// (ztunnel has no such check).
#[tokio::test]
async fn cpu_profile_is_a_pprof_profile_and_bad_queries_are_refused() {
    use std::sync::atomic::{AtomicBool, Ordering};

    let w = World::new(77);
    let (a, _b) = agents_with_endpoints(&w).await;
    let admin = addr(&a, Endpoint::Admin);

    for (query, answer) in [
        ("seconds=0", "invalid seconds value; expected 1-300\n"),
        ("seconds=301", "invalid seconds value; expected 1-300\n"),
        ("seconds=ten", "invalid seconds value; expected 1-300\n"),
        ("frequency=0", "invalid frequency value; expected 1-1000\n"),
        (
            "frequency=1001",
            "invalid frequency value; expected 1-1000\n",
        ),
    ] {
        let path = format!("/debug/pprof/profile?{query}");
        assert_eq!(
            request(admin, "GET", &path).await,
            (400, answer.to_string()),
            "{path}"
        );
    }
    for path in [
        "/debug/pprof/heap",
        "/debug/pprof/heap/profiling?activate=true",
    ] {
        assert_eq!(
            request(admin, "GET", path).await,
            (500, "jemalloc not enabled".to_string()),
            "{path}"
        );
    }
    let (status, _) = request(admin, "POST", "/debug/pprof/profile?seconds=1").await;
    assert_eq!(status, 405);

    // Work while sampling: tunneled echo traffic through both agents (which
    // must not suffer from SIGPROF interrupting their system calls), and a
    // thread that keeps a core busy, so that there are samples to check.
    // Linux sends ITIMER_PROF's signal to whichever thread is running when
    // the process's timer expires, so the busy thread takes most samples;
    // the agents' bursts of work may take none.
    let _echo = Echo::start(w.server_app()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let burner = std::thread::spawn({
        let stop = stop.clone();
        move || burn_cpu(&stop)
    });
    let traffic = tokio::spawn({
        let stop = stop.clone();
        let mut c = a.connect_as("client", w.server_app()).await.unwrap();
        async move {
            let chunk = vec![7u8; 64 * 1024];
            let mut back = vec![0u8; chunk.len()];
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                c.write_all(&chunk).await.unwrap();
                c.read_exact(&mut back).await.unwrap();
                rounds += 1;
            }
            rounds
        }
    });

    // Two at once: one profiles, the other is told to wait its turn.
    let path = "/debug/pprof/profile?seconds=1&frequency=200";
    let started = Instant::now();
    let (one, other) = tokio::join!(
        request_bytes(admin, "GET", path),
        request_bytes(admin, "GET", path)
    );
    let (body, refused) = match (one, other) {
        ((200, body), (409, refused)) | ((409, refused), (200, body)) => (body, refused),
        (one, other) => panic!(
            "want one 200 and one 409, got {} {:?} and {} {:?}",
            one.0,
            String::from_utf8_lossy(&one.1),
            other.0,
            String::from_utf8_lossy(&other.1)
        ),
    };
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        String::from_utf8_lossy(&refused),
        "a CPU profile is already being taken; try again when it ends\n"
    );
    stop.store(true, Ordering::Relaxed);
    burner.join().unwrap();
    let rounds = traffic.await.unwrap();
    assert!(rounds > 0, "traffic flowed while profiling");

    let p: profile_proto::Profile =
        prost::Message::decode(body.as_slice()).expect("a pprof Profile");
    assert_eq!(p.string(0), "", "the string table starts with \"\"");
    let types: Vec<(&str, &str)> = p
        .sample_type
        .iter()
        .map(|t| (p.string(t.r#type), p.string(t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    let period = p.period_type.as_ref().expect("period type");
    assert_eq!(
        (p.string(period.r#type), p.string(period.unit)),
        ("cpu", "nanoseconds")
    );
    assert_eq!(p.period, 1_000_000_000 / 200);
    assert!(
        (1_000_000_000..LIMIT.as_nanos() as i64).contains(&p.duration_nanos),
        "sampled for {} ns",
        p.duration_nanos
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        (now - LIMIT.as_nanos() as i64..now).contains(&p.time_nanos),
        "started at {} ns, now {now}",
        p.time_nanos
    );

    // Samples point at locations, locations at named functions.
    assert!(!p.sample.is_empty(), "a busy core was sampled");
    let function_names: std::collections::HashMap<u64, &str> = p
        .function
        .iter()
        .map(|f| (f.id, p.string(f.name)))
        .collect();
    let locations: std::collections::HashMap<u64, &profile_proto::Location> =
        p.location.iter().map(|l| (l.id, l)).collect();
    let mut names = std::collections::HashSet::new();
    for s in &p.sample {
        assert_eq!(s.value.len(), 2, "{s:?}");
        assert_eq!(s.value[1], s.value[0] * p.period, "{s:?}");
        for id in &s.location_id {
            for line in &locations.get(id).expect("a known location").line {
                names.insert(
                    *function_names
                        .get(&line.function_id)
                        .expect("a known function"),
                );
            }
        }
    }
    assert!(
        names.contains("burn_cpu"),
        "the busy thread's function is named: {names:?}"
    );
}
