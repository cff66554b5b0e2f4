//! Hostile mesh peers: forged sources, the agent's own ports, TLS the
//! mesh does not speak.

use super::*;

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
    let cert = client_cert(&w).await;
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

/// Chains the mesh must refuse at TLS even though every certificate in
/// them is well formed: a revoked leaf, a leaf under an intermediate the
/// root revoked, a leaf whose intermediate is withheld, and a leaf that
/// claims a leaf (not a CA) as its issuer. Revocation is checked over the
/// whole chain, as ztunnel does (src/tls/revocation.rs,
/// `RevocationCheckDepth::Chain`).
#[tokio::test]
async fn chains_a_crl_or_the_path_rules_out_are_refused() {
    init_tracing();
    let w = World::new(97);
    let dir = tempfile::tempdir().expect("tempdir");
    let (root_cert, root_key, crl) = (
        dir.path().join("root.pem"),
        dir.path().join("root.key"),
        dir.path().join("crl.pem"),
    );
    w.ca.write_pem(&root_cert, &root_key).expect("root");
    let client_uri = "spiffe://cluster.local/ns/test/sa/client";
    let hour = time::Duration::hours(1);
    let revoked = leaf(&w, Some(client_uri), -hour, hour);
    let fine = leaf(&w, Some(client_uri), -hour, hour);
    let mid =
        w.ca.intermediate("cluster.local", "revoked-mid")
            .expect("mid");
    let under_mid = |issuer: &ambient_agent::identity::LocalCa, send_issuer: bool| {
        let d = tempfile::tempdir().expect("tempdir");
        let (c, k) = (d.path().join("c.pem"), d.path().join("k.pem"));
        issuer.write_pem(&c, &k).expect("issuer");
        let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&k).unwrap()).unwrap();
        let issuer_pem = std::fs::read_to_string(&c).unwrap();
        let is = rcgen::Issuer::from_ca_cert_pem(&issuer_pem, key).unwrap();
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(client_uri.try_into().unwrap())];
        let cert = p.signed_by(&leaf_key, &is).unwrap();
        let mut chain = vec![cert.der().clone()];
        if send_issuer {
            chain.push(issuer.ca_cert().clone());
        }
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        (chain, key)
    };
    let revoked_mid = under_mid(&mid, true);
    // A leaf of the root (not a CA) signing another leaf.
    let not_a_ca = {
        let d = tempfile::tempdir().expect("tempdir");
        let (c, k) = (d.path().join("c.pem"), d.path().join("k.pem"));
        w.ca.write_pem(&c, &k).expect("root");
        let root_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&k).unwrap()).unwrap();
        let root = rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&c).unwrap(), root_key)
            .unwrap();
        let fake_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut fake = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        fake.is_ca = rcgen::IsCa::ExplicitNoCa;
        fake.distinguished_name
            .push(rcgen::DnType::CommonName, "not a CA");
        let fake_cert = fake.signed_by(&fake_key, &root).unwrap();
        let fake_issuer = rcgen::Issuer::new(fake, fake_key);
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = vec![rcgen::SanType::URI(client_uri.try_into().unwrap())];
        let cert = p.signed_by(&leaf_key, &fake_issuer).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        (vec![cert.der().clone(), fake_cert.der().clone()], key)
    };
    let withheld = under_mid(
        &w.ca.intermediate("cluster.local", "fine-mid").unwrap(),
        false,
    );
    let serials = vec![
        ambient_agent::identity::LocalCa::serial_of(&revoked.0[0]).unwrap(),
        ambient_agent::identity::LocalCa::serial_of(mid.ca_cert()).unwrap(),
    ];
    std::fs::write(&crl, w.ca.revocation_list(&serials).unwrap()).unwrap();
    let mut cfg = w.config("node-b");
    cfg.ca.root_cert = Some(root_cert);
    cfg.ca.root_key = Some(root_key);
    cfg.crl = Some(crl);
    let b = ambient_agent::agent::Agent::start(cfg)
        .await
        .expect("starts");
    let _echo = Echo::start(w.server_app()).await;

    assert_eq!(
        tunnel_with(&w, tls_client(Some(fine), b"h2")).await,
        Ok(StatusCode::OK)
    );
    let cases = [
        ("revoked leaf", revoked),
        ("leaf under a revoked intermediate", revoked_mid),
        ("intermediate withheld", withheld),
        ("issued by a certificate that is not a CA", not_a_ca),
    ];
    for (name, auth) in cases {
        let got = tunnel_with(&w, tls_client(Some(auth), b"h2")).await;
        assert!(got.is_err(), "{name}: {got:?}");
    }
    assert!(
        b.certs.trust().revoked()[1] >= 2,
        "revoked refusals counted: {:?}",
        b.certs.trust().revoked()
    );
}

/// A CONNECT by service hostname (the inner request of double HBONE,
/// ztunnel's `HboneAddress::SvcHostname`) reaches the workload's own
/// address on the port the service maps to (ztunnel's
/// `find_inbound_upstream`), and only for a service the workload backs:
/// a name is never a way to another workload's service, to a port the
/// agent owns, or to a port the service does not have.
#[tokio::test]
async fn a_hostname_authority_reaches_only_a_service_the_workload_backs() {
    init_tracing();
    let w = World::new(104);
    let n = w.net;
    let other = format!(
        "  - uid: other\n    name: other\n    namespace: test\n    serviceAccount: other\n    addresses: [127.{n}.4.1]\n    node: node-b\n"
    );
    let services = format!(
        "  - name: other\n    namespace: test\n    vips: [127.{n}.3.2]\n    ports: [{{port: 80, targetPort: 8080}}]\n    endpoints: [other]\n\
         \x20 - name: sneaky\n    namespace: test\n    vips: [127.{n}.3.3]\n    ports: [{{port: 80, targetPort: 15001}}]\n    endpoints: [server]\n"
    );
    w.write_mesh(&(w.mesh_with("server", &other, "server") + &services));
    let _b = w.agent("node-b").await;
    let _app = Echo::start(w.server_app()).await;
    let cert = client_cert(&w).await;
    let server_id = Identity::new("cluster.local", "test", "server");
    let mut send = raw_hbone_client(w.server_hbone(), &cert, &w.ca.trust_bundle(), server_id)
        .await
        .expect("mTLS");
    let cases = [
        ("server.test.svc.cluster.local:80", StatusCode::OK),
        ("SERVER.test.svc.cluster.local.:80", StatusCode::OK),
        ("other.test.svc.cluster.local:80", StatusCode::BAD_REQUEST),
        ("sneaky.test.svc.cluster.local:80", StatusCode::BAD_REQUEST),
        ("server.test.svc.cluster.local:81", StatusCode::BAD_REQUEST),
        ("nowhere.test.svc.cluster.local:80", StatusCode::BAD_REQUEST),
        ("server_test:80", StatusCode::BAD_REQUEST),
        ("server.test.svc.cluster.local:0", StatusCode::BAD_REQUEST),
    ];
    for (authority, want) in cases {
        let status = tokio::time::timeout(LIMIT, status_of(&mut send, Method::CONNECT, authority))
            .await
            .expect("no hang")
            .expect("answer");
        assert_eq!(status, want, "{authority}");
    }
}
