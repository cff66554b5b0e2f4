//! Workload certificates from an Istio CA over real gRPC and TLS on
//! loopback: the agent's `IstioCaClient` against the test control plane's
//! `TestCa`, alone, behind a `CertManager`, and under two agents carrying
//! HBONE traffic while their certificates rotate and while the CA is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambient_agent::agent::Agent;
use ambient_agent::hbone::tls;
use ambient_agent::identity::istio_ca::{IstioCaClient, IstioCaConfig};
use ambient_agent::identity::{
    CaError, CertManager, CertManagerConfig, CertificateSigner, Identity, TrustBundle, WorkloadCert,
};
use ambient_tests::control_plane::ca::TestCa;
use ambient_tests::*;
use http::{Method, StatusCode};
use rustls_pki_types::UnixTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const TOKEN: &str = "the-service-account-token";
const LIMIT: Duration = Duration::from_secs(10);

/// A world, its Istio CA (signing with the world's root) on 127.`net`.9.1,
/// and a client of that CA holding the right token.
struct Setup {
    w: World,
    ca: TestCa,
    signer: Arc<IstioCaClient>,
}

async fn setup(net: u8) -> Setup {
    init_tracing();
    let w = World::new(net);
    let addr: SocketAddr = format!("127.{net}.9.1:0").parse().unwrap();
    let ca = TestCa::start(addr, w.ca.clone(), TOKEN).await.unwrap();
    let signer =
        Arc::new(IstioCaClient::new(client_config(&w, &ca, "istio-token", TOKEN)).unwrap());
    Setup { w, ca, signer }
}

/// Client settings for `ca`, with `token` in the token file `file`.
fn client_config(w: &World, ca: &TestCa, file: &str, token: &str) -> IstioCaConfig {
    let root_cert = w.dir.path().join("istiod-root.pem");
    std::fs::write(&root_cert, ca.root_pem()).unwrap();
    let token_path = w.dir.path().join(file);
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
    IstioCaConfig {
        address: ca.url(),
        root_cert,
        server_name: Some(ca.server_name().to_string()),
        token_path: Some(token_path),
        cluster_id: "Kubernetes".into(),
        request_timeout: Duration::from_secs(3),
    }
}

/// The two agents of the world, with certificates of `ttl` from the CA.
async fn agents(s: &Setup, ttl: Duration) -> (Agent, Agent) {
    let mut agents = Vec::new();
    for node in ["node-a", "node-b"] {
        let mut cfg = s.w.config(node);
        cfg.ca.cert_ttl = ttl;
        let agent = Agent::start_with_signer(cfg, s.signer.clone(), s.w.ca.trust_bundle())
            .await
            .unwrap();
        agents.push(agent);
    }
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    (a, b)
}

fn client_id() -> Identity {
    Identity::new("cluster.local", "test", "client")
}

fn server_id() -> Identity {
    Identity::new("cluster.local", "test", "server")
}

/// The certificate `agent` currently holds for `id`, if any.
fn held(agent: &Agent, id: &Identity) -> Option<Arc<WorkloadCert>> {
    agent
        .certs
        .certificates()
        .into_iter()
        .find(|c| &c.identity == id)
}

/// Checks that `cert` names `id` and chains to `trust`.
fn assert_issued_for(cert: &WorkloadCert, id: &Identity, trust: &TrustBundle) {
    assert_eq!(&tls::identity_of(&cert.chain[0]).unwrap(), id);
    let mut roots = rustls::RootCertStore::empty();
    for root in trust.roots.iter() {
        roots.add(root.clone()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&cert.chain[0], &cert.chain[1..], UnixTime::now())
        .expect("chains to the mesh root");
}

/// One round trip of a small message on an open tunnel.
async fn ping(stream: &mut TcpStream, n: u32) {
    let msg = n.to_be_bytes();
    let mut back = [0u8; 4];
    timeout(LIMIT, async {
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await
    })
    .await
    .expect("no hang")
    .expect("tunnel still works");
    assert_eq!(back, msg);
}

/// A new tunnel from `client` to the server app carries data intact.
async fn fresh_tunnel_works(a: &Agent, w: &World, seed: u8) {
    let data = payload(64 * 1024, seed);
    let back = timeout(LIMIT, async {
        let mut s = a.connect_as("client", w.server_app()).await?;
        send_and_read_back(&mut s, &data).await
    })
    .await
    .expect("no hang")
    .expect("new tunnel works");
    assert_eq!(sha256(&back), sha256(&data));
}

/// A new mutual-TLS handshake with node-b's HBONE port, presenting the
/// client certificate node-a holds now: proves both current certificates
/// are accepted (pooled connections might hide an unusable one).
async fn fresh_handshake_works(a: &Agent, w: &World) {
    let cert = a.certs.fetch(&client_id()).await.unwrap();
    let status = timeout(LIMIT, async {
        let mut send =
            raw_hbone_client(w.server_hbone(), &cert, &w.ca.trust_bundle(), server_id()).await?;
        status_of(&mut send, Method::CONNECT, &w.server_app().to_string()).await
    })
    .await
    .expect("no hang")
    .expect("handshake and CONNECT");
    assert_eq!(status, StatusCode::OK);
}

/// Waits until `cond` holds, polling every 50ms, for at most `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// Sleeps until the wall clock reaches `at`.
async fn sleep_until(at: SystemTime) {
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

#[tokio::test]
async fn cert_manager_obtains_a_certificate_from_the_istio_ca() {
    let s = setup(41).await;

    // The signer on its own: leaf first, the mesh root last.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        client_id().to_uri().try_into().unwrap(),
    )];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let chain = s
        .signer
        .sign(&client_id(), &csr, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], s.w.ca.root_pem());
    assert_eq!(s.ca.requests(), 1);
    assert_eq!(s.ca.last_cluster_id().as_deref(), Some("Kubernetes"));

    // Behind a CertManager: issued once, then cached.
    let ttl = Duration::from_secs(3600);
    let mgr = CertManager::new(
        s.signer.clone(),
        s.w.ca.trust_bundle(),
        CertManagerConfig {
            ttl,
            ..Default::default()
        },
    );
    let cert = mgr.fetch(&server_id()).await.unwrap();
    assert_eq!(cert.identity, server_id());
    assert_eq!(cert.chain.len(), 1, "the root is not presented");
    assert_issued_for(&cert, &server_id(), &s.w.ca.trust_bundle());
    // The requested lifetime reached the CA (the local CA backdates by 1m).
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(
        life.abs_diff(ttl + Duration::from_secs(60)) <= Duration::from_secs(2),
        "{life:?}"
    );
    let again = mgr.fetch(&server_id()).await.unwrap();
    assert!(Arc::ptr_eq(&cert, &again));
    assert_eq!(s.ca.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_keep_working_across_certificate_rotation() {
    let s = setup(42).await;
    let ttl = Duration::from_secs(4);
    let (a, b) = agents(&s, ttl).await;
    let _echo = Echo::start(s.w.server_app()).await;

    let mut long = a.connect_as("client", s.w.server_app()).await.unwrap();
    ping(&mut long, 0).await;
    let first_client = a.certs.fetch(&client_id()).await.unwrap();
    let first_server = b.certs.fetch(&server_id()).await.unwrap();
    assert_issued_for(&first_client, &client_id(), &s.w.ca.trust_bundle());
    assert_issued_for(&first_server, &server_id(), &s.w.ca.trust_bundle());

    // Keep the tunnel busy until both first certificates have expired;
    // meanwhile they are renewed (at half-life) without anyone asking.
    let expired = first_client.not_after.max(first_server.not_after) + Duration::from_millis(300);
    let mut n = 1;
    while SystemTime::now() < expired {
        ping(&mut long, n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ping(&mut long, n).await;

    let now = SystemTime::now();
    for (agent, id, first) in [
        (&a, client_id(), &first_client),
        (&b, server_id(), &first_server),
    ] {
        let current = held(agent, &id).expect("still holds a certificate");
        assert!(!Arc::ptr_eq(&current, first), "{id} renewed");
        assert!(current.is_valid_at(now), "{id} current certificate valid");
        assert!(!first.is_valid_at(now), "{id} first certificate expired");
        assert_issued_for(&current, &id, &s.w.ca.trust_bundle());
    }
    // Two identities, each issued, then renewed about every 2s.
    assert!(s.ca.requests() >= 4, "{} requests", s.ca.requests());

    fresh_tunnel_works(&a, &s.w, 1).await;
    fresh_handshake_works(&a, &s.w).await;
    ping(&mut long, n + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_continues_while_the_ca_is_down_and_renewal_resumes() {
    let mut s = setup(43).await;
    // Renewal at about 4s, expiry at about 8s.
    let ttl = Duration::from_secs(8);
    let (a, b) = agents(&s, ttl).await;
    let _echo = Echo::start(s.w.server_app()).await;
    fresh_tunnel_works(&a, &s.w, 2).await;
    let got_at = SystemTime::now();
    let first_client = a.certs.fetch(&client_id()).await.unwrap();
    let first_server = b.certs.fetch(&server_id()).await.unwrap();
    let issued = s.ca.requests();

    s.ca.stop().await;
    // Renewal is due at the latest half-way from now to expiry (each
    // certificate was received before `got_at`); let it be tried and fail.
    let expiry = first_client.not_after.min(first_server.not_after);
    let due = got_at + expiry.duration_since(got_at).unwrap() / 2;
    sleep_until(due + Duration::from_millis(500)).await;
    assert!(SystemTime::now() < expiry, "test too slow to be meaningful");

    // Still the first certificates, still valid, and new tunnels and new
    // handshakes work with them.
    assert!(Arc::ptr_eq(&held(&a, &client_id()).unwrap(), &first_client));
    assert!(Arc::ptr_eq(&held(&b, &server_id()).unwrap(), &first_server));
    fresh_tunnel_works(&a, &s.w, 3).await;
    fresh_handshake_works(&a, &s.w).await;
    assert_eq!(s.ca.requests(), issued, "nothing was signed while down");

    // Back up: background renewal (retrying with backoff) gets through.
    s.ca.restart().await.unwrap();
    let renewed = eventually(Duration::from_secs(6), || {
        held(&a, &client_id()).is_some_and(|c| !Arc::ptr_eq(&c, &first_client))
            && held(&b, &server_id()).is_some_and(|c| !Arc::ptr_eq(&c, &first_server))
    })
    .await;
    assert!(renewed, "certificates renewed after the CA came back");
    assert!(s.ca.requests() >= issued + 2);
    fresh_tunnel_works(&a, &s.w, 4).await;
    fresh_handshake_works(&a, &s.w).await;
}

#[tokio::test]
async fn a_wrong_token_is_refused_with_a_clear_error() {
    let s = setup(44).await;
    let wrong =
        IstioCaClient::new(client_config(&s.w, &s.ca, "wrong-token", "not-the-token")).unwrap();
    let mgr = CertManager::new(
        Arc::new(wrong),
        s.w.ca.trust_bundle(),
        CertManagerConfig::default(),
    );
    let err = mgr.fetch(&client_id()).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CaError::Refused(_)), "{text}");
    assert!(text.contains("token refused"), "{text}");
    assert!(text.contains("Unauthenticated"), "{text}");
    assert!(text.contains(&s.ca.url()), "{text}");
    assert!(
        !text.contains("not-the-token"),
        "the token is not echoed: {text}"
    );
    assert_eq!(s.ca.requests(), 0);

    // The right token, for comparison, works on the same CA.
    let mgr = CertManager::new(
        s.signer.clone(),
        s.w.ca.trust_bundle(),
        CertManagerConfig::default(),
    );
    mgr.fetch(&client_id()).await.unwrap();
    assert_eq!(s.ca.requests(), 1);
}

#[tokio::test]
async fn other_failures_name_what_went_wrong() {
    let mut s = setup(45).await;
    let id = client_id();
    let mgr = |signer: IstioCaClient| {
        CertManager::new(
            Arc::new(signer),
            s.w.ca.trust_bundle(),
            CertManagerConfig::default(),
        )
    };

    // A token file that is not there.
    let mut cfg = client_config(&s.w, &s.ca, "istio-token", TOKEN);
    let missing = s.w.dir.path().join("no-such-token");
    cfg.token_path = Some(missing.clone());
    let err = mgr(IstioCaClient::new(cfg).unwrap())
        .fetch(&id)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CaError::Io { path, .. } if path == &missing),
        "{err}"
    );

    // A CA whose serving certificate does not chain to the configured root.
    let mut cfg = client_config(&s.w, &s.ca, "istio-token", TOKEN);
    let other_root = s.w.dir.path().join("other-root.pem");
    std::fs::write(&other_root, s.w.ca.root_pem()).unwrap();
    cfg.root_cert = other_root;
    let err = mgr(IstioCaClient::new(cfg).unwrap())
        .fetch(&id)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CaError::Unavailable(m) if m.contains(&s.ca.url()) && m.contains("certificate")),
        "{err}"
    );

    // The CA is down.
    s.ca.stop().await;
    let err = mgr(IstioCaClient::new(client_config(&s.w, &s.ca, "istio-token", TOKEN)).unwrap())
        .fetch(&id)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CaError::Unavailable(m) if m.contains(&s.ca.url())),
        "{err}"
    );
    assert_eq!(s.ca.requests(), 0);
}

/// istiod's serving root rotates: the client reads its root file again
/// for each request and reconnects under the new content, without a
/// restart (ztunnel reloads this file too: src/tls/control.rs).
#[tokio::test]
async fn the_ca_client_follows_its_root_file() {
    let s = setup(46).await;
    let id = client_id();
    // Built while the file holds a root istiod's certificate does not chain to.
    let mut cfg = client_config(&s.w, &s.ca, "istio-token", TOKEN);
    let root_file = s.w.dir.path().join("rotating-root.pem");
    std::fs::write(&root_file, s.w.ca.root_pem()).unwrap();
    cfg.root_cert = root_file.clone();
    let signer = Arc::new(IstioCaClient::new(cfg).unwrap());
    let mgr = CertManager::new(signer, s.w.ca.trust_bundle(), CertManagerConfig::default());
    let err = mgr.fetch(&id).await.unwrap_err();
    assert!(matches!(err, CaError::Unavailable(_)), "{err}");

    // The file now holds istiod's root: the next request succeeds.
    std::fs::write(&root_file, s.ca.root_pem()).unwrap();
    let cert = mgr
        .fetch(&id)
        .await
        .expect("a certificate under the new root");
    assert_eq!(cert.identity, id);

    // An unusable file later keeps the connection made under the last good one.
    std::fs::write(&root_file, "garbage").unwrap();
    mgr.forget(&id);
    assert!(mgr.fetch(&id).await.is_ok());
}
