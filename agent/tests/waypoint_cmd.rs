//! `ambient-agent waypoint` as an operator runs it: a config file naming
//! the local CA and the mesh file, the waypoint's workload uid. Two agents
//! (in this process) send a client's HTTP requests for a service through
//! it; its L7 routes answer 403 or forward. Runs on loopback, no root.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ambient_agent::agent::Agent;
use ambient_agent::config::{CaConfig, Config};
use ambient_agent::identity::LocalCa;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

const MESH: &str = r#"
workloads:
  - {uid: client, name: client, namespace: test, serviceAccount: client, addresses: [127.77.1.1], node: node-a}
  - {uid: v1, name: v1, namespace: test, serviceAccount: reviews, addresses: [127.77.2.1], node: node-b,
     waypoint: {address: 127.77.9.1}}
  - {uid: waypoint, name: waypoint, namespace: test, serviceAccount: waypoint, addresses: [127.77.9.1], node: waypoint-host}
services:
  - name: reviews
    namespace: test
    vips: [127.77.3.1]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [v1]
    waypoint: {address: 127.77.9.1}
httpRoutes:
  - name: reviews
    namespace: test
    service: test/reviews.test.svc.cluster.local
    rules:
      - matches: [{path: {prefix: /admin}}]
        deny: true
"#;

async fn wait_for_listener(addr: SocketAddr, child: &mut tokio::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the waypoint exited: {status}");
        }
        assert!(Instant::now() < deadline, "the waypoint never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn waypoint_command_serves_the_mesh_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("root.pem"), dir.path().join("root.key"));
    LocalCa::generate("cluster.local")
        .expect("ca")
        .write_pem(&cert, &key)
        .expect("write the CA");
    std::fs::write(dir.path().join("mesh.yaml"), MESH).expect("mesh");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "meshFile: mesh.yaml\nca: {rootCert: root.pem, rootKey: root.key}\nsocketMark: 0\n",
    )
    .expect("config");

    let mut waypoint = tokio::process::Command::new(env!("CARGO_BIN_EXE_ambient-agent"))
        .args(["waypoint", "--workload", "waypoint", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the waypoint");
    wait_for_listener("127.77.9.1:15008".parse().expect("addr"), &mut waypoint).await;

    let agent = |node: &str| Config {
        node: node.into(),
        mesh_file: Some(dir.path().join("mesh.yaml")),
        ca: CaConfig {
            root_cert: Some(cert.clone()),
            root_key: Some(key.clone()),
            ..CaConfig::default()
        },
        socket_mark: 0,
        admin_port: 0,
        metrics_port: 0,
        readiness_port: 0,
        ..Config::default()
    };
    let a = Agent::start(agent("node-a")).await.expect("agent a");
    let _b = Agent::start(agent("node-b")).await.expect("agent b");

    // The reviews application.
    let app = tokio::net::TcpListener::bind("127.77.2.1:8080")
        .await
        .expect("app");
    tokio::spawn(async move {
        while let Ok((s, _)) = app.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    Bytes::from_static(b"v1"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), service),
            );
        }
    });

    let conn = a
        .connect_as("client", "127.77.3.1:80".parse().expect("vip"))
        .await
        .expect("captured connection");
    let (mut send, driver) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .expect("handshake");
    tokio::spawn(driver);
    for (path, status, body) in [
        ("/reviews", 200, "v1"),
        ("/admin/x", 403, "RBAC: access denied\n"),
        ("/reviews/2", 200, "v1"),
    ] {
        let req = http::Request::get(path)
            .header("host", "reviews")
            .body(Empty::<Bytes>::new())
            .expect("request");
        send.ready().await.expect("ready");
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .expect("answer in time")
            .expect("response");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(got, body.as_bytes(), "{path}");
    }
}
