//! The DNS proxy end to end in network namespaces: a pod's ordinary
//! resolver (glibc through `getent`, with the resolv.conf Kubernetes
//! writes: search list, ndots:5) has its DNS redirected to the agent's
//! proxy, which answers mesh names and forwards the rest to an upstream
//! resolver running in another pod. Needs root.
//!
//! Facts relied on (istio/ztunnel src/dns/server.rs): a pod's short and
//! search-expanded names of a mesh service are answered with its VIPs,
//! authoritatively, TTL 30 s; other names are forwarded from the pod's
//! own address (its namespace, the proxy's mark); an upstream that is down
//! gives SERVFAIL.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::config::{Config, DnsConfig};
use ambient_tests::dns::*;
use ambient_tests::netns::{Pod, Topology};
use ambient_tests::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

const VIP: &str = "10.96.1.1";

fn mesh(client: &Pod, server: &Pod) -> String {
    let mut yaml = String::from("workloads:\n");
    yaml += &client.workload_yaml("test", "node-a", "client");
    yaml += &server.workload_yaml("test", "node-b", "server");
    yaml += &format!(
        "services:\n  - name: echo\n    namespace: test\n    vips: [{VIP}]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [server]\n"
    );
    yaml
}

/// Where node-a's agent serves metrics (one address per test: they run at
/// once), and its admin port there.
const METRICS: &str = "127.0.93.1:25030";
const METRICS_EBPF: &str = "127.0.93.2:25030";
const ADMIN_PORT: u16 = 26030;

async fn agent(
    w: &World,
    node: &str,
    upstream: SocketAddr,
    capture: CaptureMode,
    metrics: &str,
) -> Agent {
    let metrics: SocketAddr = metrics.parse().unwrap();
    let cfg = Config {
        metrics_address: metrics.ip(),
        metrics_port: if node == "node-a" { metrics.port() } else { 0 },
        admin_address: metrics.ip(),
        admin_port: if node == "node-a" { ADMIN_PORT } else { 0 },
        capture: Some(capture),
        socket_mark: 0x539,
        dns: DnsConfig {
            enabled: Some(true),
            upstreams: vec![upstream.to_string()],
            timeout: Duration::from_secs(2),
            ..DnsConfig::default()
        },
        ..w.config(node)
    };
    w.agent_with(cfg).await
}

/// Two nodes: `client` and an upstream resolver (a pod outside the mesh)
/// on node-a, `server` behind service `echo` on node-b; both agents with
/// `capture` and the DNS proxy on.
struct Setup {
    _topo: Topology,
    client: Pod,
    server: Pod,
    upstream: Upstream,
    upstream_addr: SocketAddr,
    _w: World,
    a: Agent,
    b: Agent,
}

async fn setup(tag: &str, capture: CaptureMode, metrics: &str) -> Setup {
    init_tracing();
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let resolver = topo.add_pod("resolver", 0).expect("pod");
    let upstream_addr = SocketAddr::new(IpAddr::V4(resolver.ip), 53);
    let upstream = Upstream::start(&resolver.sockets(), upstream_addr).await;
    let w = World::new(0);
    w.write_mesh(&mesh(&client, &server));
    let a = agent(&w, "node-a", upstream_addr, capture, metrics).await;
    let b = agent(&w, "node-b", upstream_addr, capture, metrics).await;
    Setup {
        _topo: topo,
        client,
        server,
        upstream,
        upstream_addr,
        _w: w,
        a,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_resolves_mesh_names_locally_and_the_rest_upstream() {
    let Setup {
        client,
        server,
        upstream,
        upstream_addr,
        _topo,
        _w,
        a: _a,
        b: _b,
    } = setup("dns", CaptureMode::Nft, METRICS).await;
    let _conf = PodResolvConf::write(&client.netns, "test");
    let vip: IpAddr = VIP.parse().unwrap();

    // Mesh names, as the application writes them; glibc expands them
    // with the search list first (ndots:5), the proxy answers.
    for name in [
        "echo",
        "echo.test",
        "echo.test.svc",
        "echo.test.svc.cluster.local",
        "echo.test.svc.cluster.local.",
    ] {
        assert_eq!(getaddrinfo(&client, name), Some(vip), "{name}");
    }
    assert_eq!(upstream.queries(), 0, "a mesh name went upstream");
    // And the name leads through the mesh.
    let _echo = PodEcho::start(&server, 8080).await;
    let back = pod_exchange(&client, SocketAddr::new(vip, 80), b"by name")
        .await
        .expect("exchange");
    assert_eq!(back, b"by name");

    // Other names: the upstream's answer, asked from the pod's address.
    assert_eq!(
        getaddrinfo(&client, "outside.example"),
        Some(IpAddr::V4(OUTSIDE_IP))
    );
    assert_eq!(getaddrinfo(&client, "nowhere.example"), None);
    let from = upstream.asked_from.lock().unwrap().clone();
    assert!(!from.is_empty(), "the upstream was never asked");
    assert!(
        from.iter().all(|ip| *ip == IpAddr::V4(client.ip)),
        "asked from {from:?}, not the pod's address"
    );

    // The same through raw queries, over UDP and TCP, to the address the
    // pod's resolv.conf names (capture takes it to the proxy).
    let dns = SocketAddr::new(IpAddr::V4(CLUSTER_DNS), 53);
    let sockets = client.sockets();
    for tcp in [false, true] {
        let m = query(
            &sockets,
            dns,
            "echo.test.svc.cluster.local.",
            RecordType::A,
            tcp,
        )
        .await
        .expect("answer");
        assert_eq!(a_records(&m), vec![vip], "tcp={tcp}");
        assert!(m.metadata.authoritative, "mesh answers are authoritative");
        assert!(m.answers.iter().all(|r| r.ttl == 30));
        // A mesh name has no other records, and is not forwarded.
        let m = query(
            &sockets,
            dns,
            "echo.test.svc.cluster.local.",
            RecordType::MX,
            tcp,
        )
        .await
        .expect("answer");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // An ndots miss: a CNAME to the stripped name, then its address.
        let m = query(
            &sockets,
            dns,
            "echo.test.svc.cluster.local.test.svc.cluster.local.",
            RecordType::A,
            tcp,
        )
        .await
        .expect("answer");
        assert_eq!(a_records(&m), vec![vip]);
        assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
        // Upstream codes pass through unchanged.
        let m = query(&sockets, dns, "nowhere.example.", RecordType::A, tcp)
            .await
            .expect("answer");
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = query(&sockets, dns, "fail.example.", RecordType::A, tcp)
            .await
            .expect("answer");
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
    // A big answer: truncated over UDP (the client retries over TCP), whole
    // over TCP.
    let m = query(&sockets, dns, "big.example.", RecordType::A, false)
        .await
        .expect("answer");
    assert!(m.metadata.truncation, "100 records fit no UDP answer");
    let m = query(&sockets, dns, "big.example.", RecordType::A, true)
        .await
        .expect("answer");
    assert_eq!(a_records(&m).len(), 100);

    // Istio's DNS metrics, as ztunnel names and labels them.
    let text = ambient_tests::istio::scrape(METRICS.parse().unwrap()).await;
    let value = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let udp_a = r#"{request_query_type="a",request_protocol="udp",source_canonical_service="unknown",source_canonical_revision="unknown"}"#;
    assert!(
        value(&format!("istio_dns_requests_total{udp_a}")) >= 5.0,
        "{text}"
    );
    assert!(value("istio_dns_upstream_requests_total") >= 4.0, "{text}");
    assert!(
        value("istio_dns_upstream_failures_total") >= 2.0,
        "NXDOMAIN and SERVFAIL: {text}"
    );
    assert!(
        value("istio_dns_upstream_request_duration_seconds_count") >= 4.0,
        "{text}"
    );

    // The name table and the upstreams, in /config_dump.
    let admin = SocketAddr::new(METRICS.parse::<SocketAddr>().unwrap().ip(), ADMIN_PORT);
    let dump: serde_json::Value =
        serde_json::from_str(&ambient_tests::istio::get(admin, "/config_dump").await)
            .expect("JSON");
    let names = dump["dns"]["names"].as_array().expect("names");
    assert!(
        names
            .iter()
            .any(|n| n["hostname"] == "echo.test.svc.cluster.local" && n["addresses"][0] == VIP),
        "{dump}"
    );
    assert_eq!(dump["dns"]["upstreams"][0], upstream_addr.to_string());

    // The upstream goes away: SERVFAIL, in bounded time.
    upstream.stop().await;
    let started = Instant::now();
    let m = query(&sockets, dns, "outside.example.", RecordType::A, false)
        .await
        .expect("an answer, not silence");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(8));
    // Mesh names do not need it.
    assert_eq!(getaddrinfo(&client, "echo"), Some(vip));
}

/// The eBPF backend takes a pod's DNS to the proxy too (cgroup connect and
/// sendmsg hooks on port 53), and the answers read as coming from the
/// nameserver the pod asked, or glibc would drop them: over UDP and, with
/// `options use-vc`, over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_capture_takes_a_pods_dns_to_the_proxy() {
    let Setup {
        client,
        server,
        upstream,
        _topo,
        _w,
        a,
        b,
        ..
    } = setup("dnsbpf", CaptureMode::Ebpf, METRICS_EBPF).await;
    let vip: IpAddr = VIP.parse().unwrap();

    for tcp in [false, true] {
        let _conf = if tcp {
            PodResolvConf::write_tcp(&client.netns, "test")
        } else {
            PodResolvConf::write(&client.netns, "test")
        };
        for name in ["echo", "echo.test.svc.cluster.local"] {
            assert_eq!(getaddrinfo(&client, name), Some(vip), "{name} tcp={tcp}");
        }
        assert_eq!(
            getaddrinfo(&client, "outside.example"),
            Some(IpAddr::V4(OUTSIDE_IP)),
            "tcp={tcp}"
        );
    }
    // Forwarded by the proxy (the pod's resolv.conf names 10.96.0.10,
    // which nobody serves), from the pod's address.
    let from = upstream.asked_from.lock().unwrap().clone();
    assert!(from.len() >= 2, "{from:?}");
    assert!(
        from.iter().all(|ip| *ip == IpAddr::V4(client.ip)),
        "{from:?}"
    );

    // Both protocols were the proxy's.
    let text = ambient_tests::istio::scrape(METRICS_EBPF.parse().unwrap()).await;
    for proto in ["udp", "tcp"] {
        let asked: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("istio_dns_requests_total")
                    && l.contains(&format!("request_protocol=\"{proto}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(asked >= 3.0, "{proto}: {text}");
    }

    // The name leads through the mesh.
    let _echo = PodEcho::start(&server, 8080).await;
    let mut inbound = b.connections();
    let (sent, got) = run_pod_client(
        env!("CARGO_BIN_EXE_pod-client"),
        &client,
        SocketAddr::new(vip, 80),
        4096,
        7,
    )
    .await;
    assert_eq!(sent, got);
    let record = tokio::time::timeout(Duration::from_secs(5), inbound.recv())
        .await
        .expect("a connection record")
        .expect("record");
    assert_eq!(record.src, IpAddr::V4(client.ip), "{record:?}");
    assert!(record.src_identity.is_some(), "not over HBONE: {record:?}");
    drop(a);
}
