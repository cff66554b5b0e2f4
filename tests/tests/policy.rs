//! L4 authorization end to end in network namespaces: pods' ordinary
//! sockets are captured (nft) and the destination's agent decides with the
//! identity the client proved. Needs root (fails, never skips, without it).

use std::time::Duration;

use ambient_agent::identity::{CertManager, Identity, LocalCa};
use ambient_agent::socket::ConnectOpts;
use ambient_tests::pods::*;
use ambient_tests::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn l4_policies_decide_by_identity_address_and_port() {
    init_tracing();
    let m = PodMesh::build("pol");
    let a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let _echo2 = PodEcho::start(&m.server, 9090).await;
    let app = m.server_app(8080);

    // No policy: everyone in, including plaintext from outside the mesh.
    assert!(allowed(&m.client, app).await);
    assert!(allowed(&m.intruder, app).await);
    assert!(allowed(&m.outside, app).await);

    // ALLOW by service account: the client in, another account out.
    let p = on_server("allow-client", "ALLOW", "serviceAccounts: [client]");
    apply(&m, &[&a, &b], &[("allow-client", p)]).await;
    assert!(allowed(&m.client, app).await, "allowed service account");
    assert!(!allowed(&m.intruder, app).await, "other service account");
    assert!(!allowed(&m.outside, app).await, "no identity at all");

    // DENY by namespace.
    let p = on_server("deny-other", "DENY", "namespaces: [other]");
    apply(&m, &[&a, &b], &[("deny-other", p)]).await;
    assert!(!allowed(&m.intruder, app).await, "denied namespace");
    assert!(allowed(&m.client, app).await, "namespace not denied");

    // Source IP.
    let p = on_server(
        "deny-client-ip",
        "DENY",
        &format!("sourceIps: [{}/32]", m.client.ip),
    );
    apply(&m, &[&a, &b], &[("deny-client-ip", p)]).await;
    assert!(!allowed(&m.client, app).await, "denied source address");
    assert!(allowed(&m.intruder, app).await, "other source address");

    // Destination ports.
    let p = on_server("allow-8080", "ALLOW", "destinationPorts: [8080]");
    apply(&m, &[&a, &b], &[("allow-8080", p)]).await;
    assert!(allowed(&m.client, app).await, "allowed port");
    assert!(
        !allowed(&m.client, m.server_app(9090)).await,
        "port not allowed"
    );

    // STRICT, as Istio encodes it: deny sources without a principal. The
    // plaintext client from outside the mesh is refused; mTLS clients pass.
    let p = on_server("strict", "DENY", "notPrincipals: [\"*\"]");
    apply(&m, &[&a, &b], &[("strict", p)]).await;
    assert!(!allowed(&m.outside, app).await, "plaintext under STRICT");
    assert!(allowed(&m.client, app).await, "mTLS under STRICT");
    drop((a, b));
}

#[tokio::test]
async fn a_policy_added_while_a_connection_is_open_closes_it() {
    init_tracing();
    let m = PodMesh::build("polopen");
    let a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    let _echo = PodEcho::start(&m.server, 8080).await;

    let mut conn = m
        .client
        .sockets()
        .connect(m.server_app(8080), ConnectOpts::default())
        .await
        .expect("connect");
    conn.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"ping");

    let p = on_server(
        "deny-client",
        "DENY",
        "principals: [\"cluster.local/ns/test/sa/client\"]",
    );
    apply(&m, &[&a, &b], &[("deny-client", p)]).await;
    // The open connection ends (EOF or reset) without our closing it.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the denied connection was left open");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        !allowed(&m.client, m.server_app(8080)).await,
        "new connection"
    );
    drop((a, b));
}

#[tokio::test]
async fn foreign_roots_and_claimed_identities_are_refused() {
    init_tracing();
    let m = PodMesh::build("polid");
    // Only the client's identity may reach the server.
    let p = on_server(
        "allow-client",
        "ALLOW",
        "principals: [\"cluster.local/ns/test/sa/client\"]",
    );
    m.set_policies(&p);
    let _a = m.agent("node-a").await;
    let _b = m.agent("node-b").await;
    let echo = PodEcho::start(&m.server, 8080).await;
    let target = m.server_app(8080).to_string();
    let server_id = Identity::new("cluster.local", "test", "server");
    let trust = m.world.ca.trust_bundle();
    // A raw HBONE client inside the intruder pod, marked so capture lets
    // it speak to the server's HBONE port itself.
    let dial = || async {
        let opts = ConnectOpts {
            mark: Some(0x539),
            ..Default::default()
        };
        m.intruder
            .sockets()
            .connect(m.server.addr(15008), opts)
            .await
            .expect("tcp to the server's HBONE port")
    };

    // The client's identity, but signed by another root: TLS fails.
    let other = std::sync::Arc::new(LocalCa::generate("cluster.local").expect("ca"));
    let forged = CertManager::new(other.clone(), other.trust_bundle(), Default::default())
        .fetch(&Identity::new("cluster.local", "test", "client"))
        .await
        .expect("cert");
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        let mut send =
            raw_hbone_client_over(dial().await, &forged, &trust, server_id.clone()).await?;
        status_of(&mut send, Method::CONNECT, &target).await
    })
    .await
    .expect("no hang");
    assert!(r.is_err(), "another root's certificate got {r:?}");

    // A genuine certificate of another identity, with headers claiming to
    // be the client: the identity comes from the certificate, so 401.
    let certs = CertManager::new(m.world.ca.clone(), trust.clone(), Default::default());
    let own = certs
        .fetch(&Identity::new("cluster.local", "other", "intruder"))
        .await
        .expect("cert");
    let mut send = raw_hbone_client_over(dial().await, &own, &trust, server_id.clone())
        .await
        .expect("handshake with a genuine certificate");
    let claim = http::Request::builder()
        .method(Method::CONNECT)
        .uri(&target)
        .header("forwarded", format!("for=\"{}\"", m.client.ip))
        .header("baggage", "k8s.namespace.name=test,k8s.pod.name=client")
        .body(())
        .expect("request");
    let (resp, _stream) = send.send_request(claim, false).expect("send");
    assert_eq!(
        resp.await.expect("response").status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(
        echo.peer_ips().is_empty(),
        "the server app saw {:?}",
        echo.peer_ips()
    );

    // The real client gets in, so the refusals above were about identity.
    assert!(allowed(&m.client, m.server_app(8080)).await);
}
