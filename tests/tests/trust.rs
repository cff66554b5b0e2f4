//! Trust that changes while traffic flows, on loopback with real TLS: a
//! root rotation (a new root added to every agent's trust bundle, agents
//! moved to it, the old root removed) drops no tunnel that is still
//! vouched for, and closes those that are not.
//!
//! Facts relied on: Istio rotates a mesh root by distributing a bundle
//! holding both roots first, then moving the CA to the new root, then
//! removing the old one (Istio's "plug in CA certificates" and root
//! rotation procedures); ztunnel refuses a client whose chain does not
//! lead to its roots (src/tls/certificate.rs, the inbound
//! WebPkiClientVerifier over the workload's roots).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::config::Config;
use ambient_agent::identity::LocalCa;
use ambient_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(30);

/// A CA's key and certificate on disk, as an operator would keep them.
struct CaFiles {
    ca: Arc<LocalCa>,
    cert: PathBuf,
    key: PathBuf,
}

impl CaFiles {
    fn write(ca: Arc<LocalCa>, dir: &Path, name: &str) -> CaFiles {
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        ca.write_pem(&cert, &key).expect("write CA");
        CaFiles { ca, cert, key }
    }
}

/// Writes a trust bundle file holding `roots`.
fn bundle(path: &Path, roots: &[&CaFiles]) {
    let pem: String = roots.iter().map(|c| c.ca.root_pem()).collect();
    // Written aside and renamed in, as Kubernetes updates a mounted file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).expect("write bundle");
    std::fs::rename(&tmp, path).expect("rename bundle");
}

async fn agent(w: &World, node: &str, ca: &CaFiles, trust: &Path) -> Agent {
    let mut cfg: Config = w.config(node);
    cfg.ca.root_cert = Some(ca.cert.clone());
    cfg.ca.root_key = Some(ca.key.clone());
    cfg.ca.trust_bundle = Some(trust.to_path_buf());
    Agent::start(cfg).await.expect("agent starts")
}

/// Waits until `agent` trusts exactly `n` roots.
async fn trusts(agent: &Agent, n: usize) {
    for _ in 0..200 {
        if agent.certs.trust_bundle().roots.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the agent trusts {} roots, not {n}",
        agent.certs.trust_bundle().roots.len()
    );
}

/// An echo application that answers everything it reads.
async fn echo_app(addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_drops_nothing_still_trusted_and_closes_what_is_not() {
    init_tracing();
    let w = World::new(41);
    let n = w.net;
    // A third node, moved to the new root first.
    let newpod = format!(
        "  - uid: newpod\n    name: newpod\n    namespace: test\n    serviceAccount: newpod\n    addresses: [127.{n}.4.1]\n    node: node-c\n"
    );
    w.write_mesh(&w.mesh_with("server", &newpod, "server"));
    let newpod_app: std::net::SocketAddr = format!("127.{n}.4.1:8080").parse().unwrap();
    let dir = w.dir.path();
    let old = CaFiles::write(w.ca.clone(), dir, "old-root");
    let new = CaFiles::write(
        Arc::new(LocalCa::generate("cluster.local").expect("CA")),
        dir,
        "new-root",
    );
    let (tb_a, tb_b, tb_c) = (dir.join("a.pem"), dir.join("b.pem"), dir.join("c.pem"));
    bundle(&tb_a, &[&old]);
    bundle(&tb_b, &[&old]);
    bundle(&tb_c, &[&new]);
    let a = agent(&w, "node-a", &old, &tb_a).await;
    let b = agent(&w, "node-b", &old, &tb_b).await;
    let c = agent(&w, "node-c", &new, &tb_c).await;
    let _server = echo_app(w.server_app()).await;
    let _newpod = echo_app(newpod_app).await;

    // Before the rotation the roots do not know each other.
    let mut s = c.connect_as("newpod", w.server_app()).await.unwrap();
    let refused = timeout(LIMIT, send_and_read_back(&mut s, b"hello")).await;
    assert!(
        !matches!(refused, Ok(Ok(ref v)) if v == b"hello"),
        "a pod under an unknown root got through"
    );

    // A long transfer under the old root, in flight through the rotation.
    const SIZE: usize = 48 << 20;
    let mut long = a.connect_as("client", w.server_app()).await.unwrap();
    let transfer = tokio::spawn(async move {
        let data = payload(SIZE, 7);
        let (mut rd, mut wr) = long.split();
        let send = async {
            for chunk in data.chunks(1 << 20) {
                wr.write_all(chunk).await?;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            wr.shutdown().await
        };
        let mut back = Vec::with_capacity(SIZE);
        let (sent, got) = tokio::join!(send, rd.read_to_end(&mut back));
        sent.and(got)
            .map(|_| sha256(&back) == sha256(&data) && back.len() == SIZE)
    });

    // The rotation's first step: every agent trusts both roots.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for path in [&tb_a, &tb_b, &tb_c] {
        bundle(path, &[&old, &new]);
    }
    for agent in [&a, &b, &c] {
        trusts(agent, 2).await;
    }
    // A pod under the new root reaches one under the old, and back.
    let mut s = c.connect_as("newpod", w.server_app()).await.unwrap();
    assert_eq!(
        timeout(LIMIT, send_and_read_back(&mut s, b"new to old"))
            .await
            .unwrap()
            .unwrap(),
        b"new to old"
    );
    let mut held = a.connect_as("client", newpod_app).await.unwrap();
    held.write_all(b"old to new").await.unwrap();
    let mut got = [0u8; 10];
    timeout(LIMIT, held.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"old to new");

    let intact = timeout(Duration::from_secs(120), transfer)
        .await
        .expect("the transfer finishes")
        .expect("transfer task")
        .expect("the transfer is not cut");
    assert!(intact, "the transfer arrived byte-exact");
    assert_eq!(b.certs.trust().untrusted_closed(), 0);

    // The last step on node-c: the old root goes. Its open tunnel from a
    // pod still under the old root is closed, and counted; new ones are
    // refused at the handshake.
    bundle(&tb_c, &[&new]);
    trusts(&c, 1).await;
    let mut rest = Vec::new();
    let closed = timeout(LIMIT, held.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the untrusted tunnel stayed open");
    // Both ways: the inbound tunnel from node-a, and node-c's own pooled
    // connection to node-b (whose server certificate is under the old root).
    assert!(c.certs.trust().untrusted_closed() >= 2);
    for _ in 0..100 {
        if c.pool.stats().connections_open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        c.pool.stats().connections_open,
        0,
        "an untrusted pooled connection stayed"
    );
    let mut s = a.connect_as("client", newpod_app).await.unwrap();
    let refused = timeout(LIMIT, send_and_read_back(&mut s, b"again")).await;
    assert!(
        !matches!(refused, Ok(Ok(ref v)) if v == b"again"),
        "a client under a removed root got through"
    );
    // Tunnels among agents that still trust the old root are untouched.
    let mut s = a.connect_as("client", w.server_app()).await.unwrap();
    assert_eq!(
        timeout(LIMIT, send_and_read_back(&mut s, b"still"))
            .await
            .unwrap()
            .unwrap(),
        b"still"
    );
}

/// Istio's plug-in CA: each cluster's CA is an intermediate under one
/// root; workloads serve leaf + intermediate and trust the root only, so
/// chains are verified through the intermediate both ways, also between
/// workloads under different intermediates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_chains_are_served_and_verified_both_ways() {
    init_tracing();
    let w = World::new(42);
    let n = w.net;
    let other = format!(
        "  - uid: other\n    name: other\n    namespace: test\n    serviceAccount: other\n    addresses: [127.{n}.4.1]\n    node: node-c\n"
    );
    w.write_mesh(&w.mesh_with("server", &other, "server"));
    let dir = w.dir.path();
    let root = &w.ca;
    let start = |node: &'static str, cluster: &str| {
        let mid = root
            .intermediate("cluster.local", cluster)
            .expect("intermediate");
        let (cert, key, chain) = (
            dir.join(format!("{cluster}-ca-cert.pem")),
            dir.join(format!("{cluster}-ca-key.pem")),
            dir.join(format!("{cluster}-cert-chain.pem")),
        );
        mid.write_pem(&cert, &key).expect("write");
        std::fs::write(&chain, mid.chain_pem()).expect("write chain");
        let mut cfg: Config = w.config(node);
        cfg.ca.root_cert = Some(cert);
        cfg.ca.root_key = Some(key);
        cfg.ca.cert_chain = Some(chain);
        async move { Agent::start(cfg).await.expect("agent starts") }
    };
    let a = start("node-a", "cluster-1").await;
    let b = start("node-b", "cluster-1").await;
    let c = start("node-c", "cluster-2").await;
    for agent in [&a, &b, &c] {
        assert_eq!(
            *agent.certs.trust_bundle().roots,
            *root.trust_bundle().roots,
            "only the root is an anchor"
        );
    }
    let _server = echo_app(w.server_app()).await;
    for (agent, uid) in [(&a, "client"), (&c, "other")] {
        let mut s = agent.connect_as(uid, w.server_app()).await.unwrap();
        assert_eq!(
            timeout(LIMIT, send_and_read_back(&mut s, b"through the chain"))
                .await
                .unwrap()
                .unwrap(),
            b"through the chain",
            "{uid}"
        );
    }
    // What each side presented: leaf and intermediate, never the root.
    for agent in [&a, &b, &c] {
        for cert in agent.certs.certificates() {
            assert_eq!(cert.chain.len(), 2, "{}", cert.identity);
            assert!(!root.trust_bundle().roots.contains(&cert.chain[1]));
        }
    }
}

/// Revocation as ztunnel enforces it (src/tls/crl.rs, revocation.rs): a
/// CRL file followed on disk; a peer whose certificate is revoked is
/// refused at the handshake and its open connections closed on reload,
/// counted as `istio_crl_policy_rejections`; a bad version of the file
/// keeps the last good one. Unlike ztunnel, an unusable file at start
/// stops the agent instead of turning revocation off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_is_refused_and_its_open_tunnel_closed() {
    init_tracing();
    let w = World::new(43);
    let n = w.net;
    let other = format!(
        "  - uid: other\n    name: other\n    namespace: test\n    serviceAccount: other\n    addresses: [127.{n}.1.2]\n    node: node-a\n"
    );
    w.write_mesh(&w.mesh_with("server", &other, "server"));
    let dir = w.dir.path();
    let ca = CaFiles::write(w.ca.clone(), dir, "root");
    let crl = dir.join("ca-crl.pem");
    let config = |node: &str| {
        let mut cfg: Config = w.config(node);
        cfg.ca.root_cert = Some(ca.cert.clone());
        cfg.ca.root_key = Some(ca.key.clone());
        cfg.crl = Some(crl.clone());
        cfg
    };
    // Nothing published yet: nothing revoked.
    let a = Agent::start(config("node-a")).await.expect("starts");
    let b = Agent::start(config("node-b")).await.expect("starts");
    let _server = echo_app(w.server_app()).await;
    let echoes = |uid: &'static str| {
        let a = &a;
        let app = w.server_app();
        async move {
            let Ok(mut s) = a.connect_as(uid, app).await else {
                return false;
            };
            matches!(
                timeout(LIMIT, send_and_read_back(&mut s, b"ping")).await,
                Ok(Ok(v)) if v == b"ping"
            )
        }
    };
    assert!(echoes("client").await);
    let mut held = a.connect_as("client", w.server_app()).await.unwrap();
    held.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    timeout(LIMIT, held.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();

    // The client's certificate is revoked.
    let client_leaf = a
        .certs
        .certificates()
        .into_iter()
        .find(|c| c.identity.to_string().ends_with("/sa/client"))
        .expect("the client's certificate")
        .chain[0]
        .clone();
    let serial = LocalCa::serial_of(&client_leaf).unwrap();
    let write_crl = |pem: &str| {
        let tmp = crl.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, &crl).unwrap();
    };
    write_crl(&w.ca.revocation_list(&[serial]).unwrap());
    let mut rest = Vec::new();
    let closed = timeout(LIMIT, held.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the revoked peer's tunnel stayed open");
    assert!(b.certs.trust().revoked()[1] >= 1, "counted as destination");
    assert!(!echoes("client").await, "a revoked peer got through");
    assert!(b.certs.trust().revoked()[1] >= 2, "the refusal is counted");
    assert!(
        echoes("other").await,
        "only the revoked certificate is refused"
    );

    // A bad version keeps the last good one.
    let generation = b.certs.trust_bundle().generation;
    write_crl("-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n");
    tokio::time::sleep(ambient_agent::agent::TRUST_POLL_INTERVAL * 2).await;
    assert_eq!(b.certs.trust_bundle().generation, generation);
    assert!(
        !echoes("client").await,
        "a broken CRL file lifted a revocation"
    );

    // A new list without it: accepted again.
    write_crl(&w.ca.revocation_list(&[]).unwrap());
    let mut back = false;
    for _ in 0..50 {
        if echoes("client").await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        back,
        "the client stayed refused after its revocation was withdrawn"
    );

    // An unusable file at start: the agent does not start.
    write_crl("not a CRL at all");
    let refused = Agent::start(config("node-c")).await;
    assert!(refused.is_err(), "started with an unusable CRL file");
}

/// Trust-domain migration in local mode: with `trustDomain: new-td` and
/// `trustDomainAliases: [old-td]`, a policy written for
/// `old-td/ns/test/sa/client` matches the client now in `new-td`, as
/// istiod rewrites principals for Envoy (pilot/pkg/security/trustdomain/
/// bundle.go, `ReplaceTrustDomainAliases`). Without the alias it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_naming_an_alias_matches_the_migrated_identity() {
    init_tracing();
    let w = World::new(44);
    let n = w.net;
    let mesh = |aliases: &str| {
        format!(
            r#"{aliases}
workloads:
  - {{uid: client, name: client, namespace: test, serviceAccount: client, trustDomain: new-td, addresses: [127.{n}.1.1], node: node-a}}
  - {{uid: server, name: server, namespace: test, serviceAccount: server, trustDomain: new-td, addresses: [127.{n}.2.1], node: node-b}}
policies:
  - name: only-the-client
    namespace: test
    action: ALLOW
    rules:
      - clauses:
          - matches:
              - principals: ["old-td/ns/test/sa/client"]
"#
        )
    };
    w.write_mesh(&mesh("trustDomain: new-td\ntrustDomainAliases: [old-td]"));
    let a = w.agent("node-a").await;
    let _b = w.agent("node-b").await;
    let _server = echo_app(w.server_app()).await;
    let echoes = || async {
        let Ok(mut s) = a.connect_as("client", w.server_app()).await else {
            return false;
        };
        matches!(
            timeout(LIMIT, send_and_read_back(&mut s, b"alias")).await,
            Ok(Ok(v)) if v == b"alias"
        )
    };
    assert!(echoes().await, "the alias did not match");

    // The same policy without the alias: the ALLOW matches nobody.
    w.write_mesh(&mesh(""));
    let mut denied = false;
    for _ in 0..50 {
        if !echoes().await {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(denied, "the principal matched without its alias");
}
