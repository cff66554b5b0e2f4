//! Waypoints end to end in network namespaces: a client pod's requests to
//! a service go through the reference waypoint (L7 routes: 403, header
//! routing, weights) and on to the chosen workload; going around the
//! waypoint is refused; PROXY-tunnel workloads get a PROXY v2 header
//! (IPv4 and IPv6).
//! Needs root (fails, never skips, without it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::demo::waypoint::{http_app, reviews_yaml, start_waypoint};
use ambient_agent::identity::{CertManager, Identity};
use ambient_agent::proxy::record::{ConnectionRecord, Direction};
use ambient_agent::socket::ConnectOpts;
use ambient_agent::waypoint::RequestRecord;
use ambient_tests::l7apps::drain;
use ambient_tests::netns::{Pod, Stack, Topology};
use ambient_tests::*;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const VIP: &str = "10.96.0.1:80";

fn vip() -> SocketAddr {
    VIP.parse().expect("vip")
}

async fn agent(world: &World, node: &str) -> Agent {
    world.capturing_agent(node, CaptureMode::Nft).await
}

/// One HTTP/1.1 connection from inside `pod` (captured like any app's).
async fn http_client(
    pod: &Pod,
    dst: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let s = pod
        .sockets()
        .connect(dst, ConnectOpts::default())
        .await
        .expect("connect from the pod");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    send
}

async fn get(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "reviews.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send.ready().await.expect("connection usable");
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(req.body(Empty::new()).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// node-a: client; node-b: the reviews service behind the waypoint (see
/// [`reviews_yaml`]).
fn mesh_yaml(client: &Pod, v1: &Pod, v2: &Pod, wp: &Pod) -> String {
    let mut y = String::from("workloads:\n");
    y += &client.workload_yaml("test", "node-a", "client");
    y += &reviews_yaml("test", "node-b", v1, v2, wp, vip().ip());
    y
}

#[tokio::test]
async fn requests_go_through_the_waypoint_and_its_routes() {
    init_tracing();
    let topo = Topology::new("wp").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let outside = topo.add_pod("outside", 0).expect("pod");
    let v1 = topo.add_pod("v1", 1).expect("pod");
    let v2 = topo.add_pod("v2", 1).expect("pod");
    let wp = topo.add_pod("waypoint", 1).expect("pod");
    let world = World::new(0);
    world.write_mesh(&mesh_yaml(&client, &v1, &v2, &wp));
    let _a = agent(&world, "node-a").await;
    let b = agent(&world, "node-b").await;
    let waypoint = start_waypoint(&world.mesh_path(), &world.ca, &wp)
        .await
        .expect("waypoint starts");
    let _apps = [
        http_app(&v1, "v1").await.expect("app"),
        http_app(&v2, "v2").await.expect("app"),
    ];
    let mut seen = waypoint.requests();
    let mut at_b = b.connections();

    let mut send = http_client(&client, vip()).await;
    // L7 deny.
    assert_eq!(
        get(&mut send, "/admin/users", &[]).await,
        (StatusCode::FORBIDDEN, "RBAC: access denied\n".into())
    );
    // Header routing: always v2.
    for _ in 0..20 {
        let (status, body) = get(&mut send, "/reviews", &[("x-version", "v2")]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v2"));
    }
    // Weights 80/20 over many requests: 200 of 1000 expected to reach v2,
    // with a standard deviation of about 13; allow 60 either way.
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..1000 {
        let (status, body) = get(&mut send, "/reviews", &[]).await;
        assert_eq!(status, StatusCode::OK);
        *counts.entry(body).or_default() += 1;
    }
    let v2_share = counts.get("v2").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<usize>(), 1000, "{counts:?}");
    assert!((140..=260).contains(&v2_share), "v2 got {v2_share} of 1000");
    drop(send);

    // The waypoint saw every request, with the client's identity.
    let records: Vec<RequestRecord> = drain(&mut seen);
    assert_eq!(records.len(), 1021);
    let client_id = Identity::new("cluster.local", "test", "client");
    assert!(records.iter().all(|r| r.src_identity == client_id));
    assert!(records.iter().all(|r| r.target == vip()));
    let denied: Vec<_> = records.iter().filter(|r| r.status == 403).collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].path, "/admin/users");
    assert_eq!(
        denied[0].reason.as_deref(),
        Some("denied by test/reviews rule 0")
    );

    // The workloads' agent saw the waypoint's identity, never the client's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inbound: Vec<ConnectionRecord> = drain(&mut at_b)
        .into_iter()
        .filter(|r| r.direction == Direction::Inbound)
        .collect();
    assert!(!inbound.is_empty());
    let wp_id = Identity::new("cluster.local", "test", "waypoint");
    for r in &inbound {
        assert_eq!(r.src_identity.as_ref(), Some(&wp_id), "{r:?}");
        assert_eq!(
            r.src,
            std::net::IpAddr::V4(client.ip),
            "original client kept"
        );
    }

    // Going around the waypoint: a genuine client certificate straight to
    // v1's HBONE port gets 401; plaintext from outside the mesh is closed.
    let certs = CertManager::new(
        world.ca.clone(),
        world.ca.trust_bundle(),
        Default::default(),
    );
    let cert = certs.fetch(&client_id).await.expect("cert");
    let tcp = client
        .sockets()
        .connect(
            v1.addr(15008),
            ConnectOpts {
                mark: Some(0x539),
                ..Default::default()
            },
        )
        .await
        .expect("tcp");
    let v1_id = Identity::new("cluster.local", "test", "reviews");
    let mut raw = raw_hbone_client_over(tcp, &cert, &world.ca.trust_bundle(), v1_id)
        .await
        .expect("handshake");
    let status = status_of(&mut raw, Method::CONNECT, &v1.addr(8080).to_string())
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let r = pod_exchange(&outside, v1.addr(8080), b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(
        r.as_ref().map_or(true, |b| b.is_empty()),
        "plaintext around the waypoint got {r:?}"
    );
}

#[tokio::test]
async fn proxy_tunnel_workloads_get_a_proxy_v2_header() {
    proxy_v2_header(Stack::V4, "pp").await;
}

/// The header's addresses are IPv6 (family AF_INET6) between IPv6 pods.
#[tokio::test]
async fn proxy_tunnel_workloads_get_a_proxy_v2_header_over_ipv6() {
    proxy_v2_header(Stack::V6, "pp6").await;
}

async fn proxy_v2_header(stack: Stack, tag: &str) {
    init_tracing();
    let topo = Topology::new(tag).expect("topology");
    let client = topo.add_pod_with("client", 0, stack).expect("pod");
    let proxy = topo.add_pod_with("proxy", 1, stack).expect("pod");
    let world = World::new(0);
    let mut yaml = String::from("workloads:\n");
    yaml += &client.workload_yaml("test", "node-a", "client");
    yaml += &proxy.workload_yaml("test", "node-b", "proxy");
    yaml += "    applicationTunnel: PROXY\n    applicationTunnelPort: 15088\n";
    world.write_mesh(&yaml);
    let _a = agent(&world, "node-a").await;
    let _b = agent(&world, "node-b").await;

    // The "waypoint" application: reads the header, reports it, echoes.
    let listener = proxy
        .sockets()
        .listen(proxy.addr(15088), Default::default())
        .await
        .expect("listen");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let line = match ambient_agent::proxy::proxy_protocol::read(&mut s).await {
                    Ok(h) => format!(
                        "src={} dst={} id={}\n",
                        h.src.ip(),
                        h.dst,
                        h.identity.map(|i| i.to_string()).unwrap_or_default()
                    ),
                    Err(e) => format!("error={e}\n"),
                };
                let _ = s.write_all(line.as_bytes()).await;
                let (mut rd, mut wr) = s.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });

    let s = client
        .sockets()
        .connect(proxy.addr(8080), ConnectOpts::default())
        .await
        .expect("connect");
    let mut s = tokio::io::BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
        .await
        .expect("header report in time")
        .expect("read");
    assert_eq!(
        line,
        format!(
            "src={} dst={} id=spiffe://cluster.local/ns/test/sa/client\n",
            client.addr(0).ip(),
            proxy.addr(8080)
        )
    );
    // The bytes after the header are the client's.
    s.get_mut().write_all(b"after\n").await.expect("write");
    line.clear();
    s.read_line(&mut line).await.expect("echo");
    assert_eq!(line, "after\n");
}
