//! A hostile pod against the DNS proxy: garbage, malformed queries,
//! oversized datagrams, truncated TCP frames and a flood of queries to an
//! upstream that never answers. Each gets FORMERR, NOTIMP, SERVFAIL or
//! silence, as a DNS server owes (RFC 1035 4.1.1; hickory drops what is
//! too short to answer and responses), and the proxy keeps answering
//! everyone else.

use std::net::SocketAddr;
use std::time::Duration;

use ambient_agent::config::{Config, DnsConfig};
use ambient_agent::socket::Sockets;
use ambient_tests::dns::{a_records, query};
use ambient_tests::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A node-a agent whose DNS upstream swallows every query.
async fn setup(w: &World) -> (ambient_agent::agent::Agent, SocketAddr, UdpSocket) {
    // Bound and never read: queries vanish, as with a black-holed resolver.
    let black_hole = UdpSocket::bind(SocketAddr::new(w.client_ip(), 5353))
        .await
        .expect("black hole");
    let cfg = Config {
        dns: DnsConfig {
            enabled: Some(true),
            upstreams: vec![black_hole.local_addr().expect("addr").to_string()],
            timeout: Duration::from_secs(2),
            ..DnsConfig::default()
        },
        ..w.config("node-a")
    };
    w.write_mesh(&w.standard_mesh("server"));
    let a = w.agent_with(cfg).await;
    // Without capture the client's proxy listens on the client's address.
    let dns = SocketAddr::new(w.client_ip(), 15053);
    (a, dns, black_hole)
}

/// Sends `bytes` and returns the answer, if one comes within 2 s.
async fn exchange(dns: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let s = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    s.send_to(bytes, dns).await.ok()?;
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf[..n]).ok()
}

/// The proxy still answers a mesh name (the world's service).
async fn still_serving(w: &World, dns: SocketAddr) {
    let m = query(
        &Sockets::Host,
        dns,
        "server.test.svc.cluster.local.",
        RecordType::A,
        false,
    )
    .await
    .expect("the proxy stopped answering");
    assert_eq!(a_records(&m), vec![w.service_vip().ip()]);
}

/// A query header: id 0x4242, the given flags and counts, then `rest`.
fn header(flags: u16, qd: u16, rest: &[u8]) -> Vec<u8> {
    let mut v = vec![0x42, 0x42];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&qd.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    v.extend_from_slice(rest);
    v
}

/// `server.test.svc.cluster.local` IN A, as a question section.
fn question() -> Vec<u8> {
    let mut q = Vec::new();
    for label in ["server", "test", "svc", "cluster", "local"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_formerr_notimp_or_silence_and_the_proxy_keeps_serving() {
    init_tracing();
    let w = World::new(181);
    let (_a, dns, _hole) = setup(&w).await;
    still_serving(&w, dns).await;

    // Garbage shorter than a header: silence.
    assert!(exchange(dns, b"\x01\x02\x03").await.is_none());
    // A header announcing a question that is not there: FORMERR.
    let m = exchange(dns, &header(0x0100, 1, &[]))
        .await
        .expect("FORMERR");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // Two questions: not one well-formed query.
    let mut two = question();
    two.extend(question());
    let m = exchange(dns, &header(0x0100, 2, &two))
        .await
        .expect("answer");
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A response sent as if a query: dropped.
    assert!(exchange(dns, &header(0x8100, 1, &question()))
        .await
        .is_none());
    // Another opcode (STATUS): NOTIMP.
    let m = exchange(dns, &header(0x1100, 1, &question()))
        .await
        .expect("NOTIMP");
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    // A 60 KB datagram whose question is junk: FORMERR or silence.
    let mut big = header(0x0100, 1, &[]);
    big.extend(std::iter::repeat_n(0xff, 60_000));
    if let Some(m) = exchange(dns, &big).await {
        assert_ne!(m.metadata.response_code, ResponseCode::NoError);
    }
    still_serving(&w, dns).await;

    // TCP: a frame announcing 65535 bytes, then the client gives up.
    let mut s = TcpStream::connect(dns).await.expect("tcp");
    s.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
    drop(s);
    // A frame of garbage of its announced length: FORMERR or a close.
    let mut s = TcpStream::connect(dns).await.expect("tcp");
    s.write_all(&[0, 4, 9, 9, 9, 9]).await.expect("write");
    let mut len = [0u8; 2];
    let got = tokio::time::timeout(Duration::from_secs(6), s.read_exact(&mut len)).await;
    if let Ok(Ok(_)) = got {
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut body).await.expect("body");
        let m = Message::from_vec(&body).expect("a DNS message");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
    still_serving(&w, dns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_to_a_silent_upstream_is_bounded_and_mesh_names_still_answer() {
    init_tracing();
    let w = World::new(182);
    let (_a, dns, _hole) = setup(&w).await;
    // 5000 forwarded queries at once; each would wait 2 s for the black
    // hole. Beyond the proxy's bound they are refused at once (SERVFAIL).
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    for i in 0..5000u16 {
        let mut q = header(0x0100, 1, &[]);
        q[0..2].copy_from_slice(&i.to_be_bytes());
        q.truncate(12);
        let name = format!("flood{i}.example");
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        s.send_to(&q, dns).await.expect("send");
    }
    let mut servfail = 0;
    let mut buf = vec![0u8; 4096];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(500), s.recv_from(&mut buf)).await
    {
        if Message::from_vec(&buf[..n])
            .is_ok_and(|m| m.metadata.response_code == ResponseCode::ServFail)
        {
            servfail += 1;
        }
    }
    assert!(
        servfail > 0,
        "nothing refused: the flood was queued unbounded"
    );
    // Meanwhile, mesh names are answered at once.
    still_serving(&w, dns).await;
}
