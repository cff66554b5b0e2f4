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
use ambient_tests::control_plane::xds::{eventually, xds_agent, Feed, TestXds};
use ambient_tests::pods::*;
use ambient_tests::*;
use http::{Method, StatusCode};

const LIMIT: Duration = Duration::from_secs(5);

mod control;
mod dns;
mod load;
mod peers;

/// The standard loopback mesh plus `policies` (YAML list items).
fn mesh_with_policies(w: &World, policies: &str) -> ambient_agent::state::Mesh {
    let yaml = w.standard_mesh("server") + "policies:\n" + policies;
    parse_mesh("mesh", &yaml).expect("valid mesh")
}

/// CONNECTs to the server app through node-b's agent as `who` (a genuine
/// certificate of the world's root), from the client's address.
async fn status_as(w: &World, who: Identity) -> StatusCode {
    let cert = cert_of(w, &who).await;
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

/// A genuine certificate for `who`, from `w`'s root.
async fn cert_of(w: &World, who: &Identity) -> Arc<ambient_agent::identity::WorkloadCert> {
    let certs = CertManager::new(w.ca.clone(), w.ca.trust_bundle(), Default::default());
    certs.fetch(who).await.expect("cert")
}

/// A genuine certificate of the standard client.
async fn client_cert(w: &World) -> Arc<ambient_agent::identity::WorkloadCert> {
    cert_of(w, &Identity::new("cluster.local", "test", "client")).await
}

/// The test xDS server serving `mesh`, and node-b's agent fed by it,
/// synced and serving the server workload (whose app echoes).
async fn xds_served_node_b(
    w: &World,
    mesh: &ambient_agent::state::Mesh,
) -> (TestXds, ambient_agent::agent::Agent, Feed, Echo) {
    let xds = TestXds::start(format!("127.{}.0.1:0", w.net).parse().unwrap())
        .await
        .unwrap();
    xds.set_mesh(mesh);
    let (b, feed) = xds_agent(w, &xds, "node-b").await;
    eventually("node-b synced", || feed.status.borrow().synced).await;
    eventually("node-b serving", || b.listeners("server").is_some()).await;
    let echo = Echo::start(w.server_app()).await;
    (xds, b, feed, echo)
}

/// A raw HTTP/2 client of `w`'s server agent, as the mesh client.
async fn raw_h2(w: &World, settings: &[(u16, u32)]) -> ambient_tests::h2raw::RawH2 {
    let cert = client_cert(w).await;
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
