//! Test topology for the agent's integration tests and benchmarks.
//!
//! Loopback worlds need no privilege: every workload gets its own 127.x.y.z
//! address, so several agents listen on the standard ports side by side.
//! Each test picks its own second octet (`net`) so tests running in
//! parallel never share an address.

pub mod control_plane;
pub mod dns;
pub mod h2raw;
pub mod istio;
pub mod istio_cni;
pub mod l7apps;
pub mod pods;

/// The namespace topology lives with the demo, which builds the same world.
pub use ambient_agent::demo::topology as netns;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ambient_agent::agent::Agent;
use ambient_agent::config::Config;
use ambient_agent::identity::{CertManager, Identity, LocalCa};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A mesh file in a temporary directory, and the root CA the agents share.
pub struct World {
    pub dir: tempfile::TempDir,
    pub ca: Arc<LocalCa>,
    pub net: u8,
}

impl World {
    /// A world on 127.`net`.0.0/16 with the standard two-node mesh:
    /// - `client` (sa `client`) on node-a at 127.net.1.1
    /// - `server` (sa `server`) on node-b at 127.net.2.1, app port 8080
    /// - service `server` VIP 127.net.3.1 port 80 -> 8080
    pub fn new(net: u8) -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("root CA"));
        let world = World { dir, ca, net };
        world.write_mesh(&world.standard_mesh("server"));
        world
    }

    pub fn mesh_path(&self) -> PathBuf {
        self.dir.path().join("mesh.yaml")
    }

    pub fn write_mesh(&self, yaml: &str) {
        std::fs::write(self.mesh_path(), yaml).expect("write mesh");
    }

    /// The standard mesh, with the server running as service account `server_sa`.
    pub fn standard_mesh(&self, server_sa: &str) -> String {
        self.mesh_with(server_sa, "", "server")
    }

    /// The standard mesh with `extra_workloads` (YAML list items) after the
    /// two standard ones, and the service's endpoints set to `endpoints`.
    pub fn mesh_with(&self, server_sa: &str, extra_workloads: &str, endpoints: &str) -> String {
        let n = self.net;
        format!(
            r#"
workloads:
  - uid: client
    name: client
    namespace: test
    serviceAccount: client
    addresses: [127.{n}.1.1]
    node: node-a
  - uid: server
    name: server
    namespace: test
    serviceAccount: {server_sa}
    addresses: [127.{n}.2.1]
    node: node-b
{extra_workloads}services:
  - name: server
    namespace: test
    vips: [127.{n}.3.1]
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints: [{endpoints}]
"#
        )
    }

    /// The standard mesh plus a DENY of the client's principal.
    pub fn deny_client_mesh(&self) -> String {
        self.standard_mesh("server") + "policies:\n" + DENY_CLIENT
    }

    pub fn client_ip(&self) -> std::net::IpAddr {
        format!("127.{}.1.1", self.net).parse().expect("ip")
    }

    pub fn server_ip(&self) -> std::net::IpAddr {
        format!("127.{}.2.1", self.net).parse().expect("ip")
    }

    pub fn server_app(&self) -> SocketAddr {
        SocketAddr::new(self.server_ip(), 8080)
    }

    /// A pool acting for the `client` workload towards the `server`'s
    /// agent: the pool, the key its streams use, and the identity the
    /// server must prove.
    pub fn client_pool(
        &self,
        cfg: ambient_agent::hbone::PoolConfig,
    ) -> (
        ambient_agent::hbone::Pool,
        ambient_agent::hbone::PoolKey,
        Identity,
    ) {
        let certs = CertManager::new(self.ca.clone(), self.ca.trust_bundle(), Default::default());
        let server_id = Identity::new("cluster.local", "test", "server");
        let key = ambient_agent::hbone::PoolKey {
            src_identity: Identity::new("cluster.local", "test", "client"),
            dst_identity: server_id.clone(),
            dst: self.server_hbone(),
            src_ip: Some(self.client_ip()),
        };
        (ambient_agent::hbone::Pool::new(certs, cfg), key, server_id)
    }

    pub fn server_hbone(&self) -> SocketAddr {
        SocketAddr::new(self.server_ip(), 15008)
    }

    pub fn service_vip(&self) -> SocketAddr {
        format!("127.{}.3.1:80", self.net).parse().expect("addr")
    }

    /// Config for the agent of `node` in this world.
    pub fn config(&self, node: &str) -> Config {
        Config {
            node: node.into(),
            mesh_file: Some(self.mesh_path()),
            mesh_poll_interval: std::time::Duration::from_millis(100),
            socket_mark: 0,
            connect_timeout: std::time::Duration::from_secs(3),
            // Several agents share a process: no fixed admin ports unless a
            // test asks for them.
            admin_port: 0,
            metrics_port: 0,
            readiness_port: 0,
            ..Config::default()
        }
    }

    /// [`World::config`] for an agent capturing its pods with `mode`, its
    /// own sockets marked 0x539 so capture lets them pass.
    pub fn capturing_config(
        &self,
        node: &str,
        mode: ambient_agent::capture::CaptureMode,
    ) -> Config {
        Config {
            capture: Some(mode),
            socket_mark: 0x539,
            ..self.config(node)
        }
    }

    /// An agent with [`World::capturing_config`].
    pub async fn capturing_agent(
        &self,
        node: &str,
        mode: ambient_agent::capture::CaptureMode,
    ) -> Agent {
        self.agent_with(self.capturing_config(node, mode)).await
    }

    pub async fn agent(&self, node: &str) -> Agent {
        self.agent_with(self.config(node)).await
    }

    pub async fn agent_with(&self, cfg: Config) -> Agent {
        Agent::start_with_signer(cfg, self.ca.clone(), self.ca.trust_bundle())
            .await
            .expect("agent starts")
    }
}

/// A mesh-file policy (a `policies:` list item): DENY of the standard
/// client's principal, `test/deny-client`.
pub const DENY_CLIENT: &str = r#"  - name: deny-client
    namespace: test
    action: DENY
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/test/sa/client"]
"#;

/// The next record from `rx` that `wanted` picks, within 5 s.
pub async fn next_record_where(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<ambient_agent::proxy::record::ConnectionRecord>>,
    wanted: impl Fn(&ambient_agent::proxy::record::ConnectionRecord) -> bool,
) -> Arc<ambient_agent::proxy::record::ConnectionRecord> {
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let r = rx.recv().await.expect("records");
            if wanted(&r) {
                return r;
            }
        }
    })
    .await
    .expect("a record in time")
}

/// Logs to the test output when `RUST_LOG` is set.
/// The `ambient-agent` binary of this build (cargo puts it beside the
/// `deps/` directory of test binaries; `cargo test --workspace` builds it,
/// as the agent package's own integration tests need it).
pub fn agent_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("ambient-agent"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p ambient-agent), or run the suite \
         with cargo test --workspace",
        bin.display()
    );
    bin
}

/// The sum of `istio_tcp_connections_failed_total` over the series of
/// `agent`'s metrics whose labels contain `label` (e.g.
/// `response_flags="UO"`).
pub fn failed_connections(agent: &ambient_agent::agent::Agent, label: &str) -> u64 {
    let text = agent
        .metrics()
        .encode(&ambient_agent::admin::metrics::AgentGauges::default())
        .expect("metrics encode");
    text.lines()
        .filter(|l| l.starts_with("istio_tcp_connections_failed_total{") && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Log output kept in memory, for tests that read what was logged: a
/// `tracing` writer (`move || captured.clone()`).
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// An echo server counting its connections; echoes until EOF, then
/// half-closes.
pub struct Echo {
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start(addr: SocketAddr) -> Echo {
        let listener = TcpListener::bind(addr).await.expect("bind echo");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.split();
                    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                        let _ = wr.shutdown().await;
                    }
                });
            }
        });
        Echo { accepted, task }
    }
}

/// Deterministic test payload.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u32::from(seed) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// Sends `data`, half-closes, and returns everything read back.
pub async fn send_and_read_back(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_all(data).await?;
        wr.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let (s, r) = tokio::join!(send, rd.read_to_end(&mut back));
    s?;
    r?;
    Ok(back)
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Raises the open-file limit to its hard maximum: a thousand tunneled
/// connections hold several thousand sockets in one test process.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// An HTTP/2 client over mutual TLS to an HBONE port, presenting `cert`,
/// for tests that speak to the server directly.
pub async fn raw_hbone_client(
    addr: SocketAddr,
    cert: &ambient_agent::identity::WorkloadCert,
    trust: &ambient_agent::identity::TrustBundle,
    expected: ambient_agent::identity::Identity,
) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    raw_hbone_client_over(tcp, cert, trust, expected).await
}

/// [`raw_hbone_client`] over an established TCP connection (e.g. one made
/// inside a pod's namespace).
pub async fn raw_hbone_client_over(
    tcp: TcpStream,
    cert: &ambient_agent::identity::WorkloadCert,
    trust: &ambient_agent::identity::TrustBundle,
    expected: ambient_agent::identity::Identity,
) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
    use ambient_agent::hbone::tls;
    let cfg = tls::client_config(cert, trust, vec![expected])?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(tls::placeholder_server_name(), tcp)
        .await?;
    let (send, conn) = h2::client::handshake(stream).await?;
    tokio::spawn(conn);
    Ok(send.ready().await?)
}

/// Sends a request with no body and returns the response status.
pub async fn status_of(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    method: http::Method,
    uri: &str,
) -> anyhow::Result<http::StatusCode> {
    let req = http::Request::builder().method(method).uri(uri).body(())?;
    let (resp, _stream) = send.send_request(req, false)?;
    Ok(resp.await?.status())
}

/// An echo server inside a pod that remembers each client's address.
pub struct PodEcho {
    pub peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PodEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodEcho {
    /// On `port` of every address of `pod` (`[::]` when it has IPv6).
    pub async fn start(pod: &netns::Pod, port: u16) -> PodEcho {
        let listener = pod
            .sockets()
            .listen(pod.any_addr(port), Default::default())
            .await
            .expect("listen in pod");
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, peer)) = listener.accept().await {
                let peer = ambient_agent::socket::canonical(peer);
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = s.split();
                    if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                        let _ = wr.shutdown().await;
                    }
                });
            }
        });
        PodEcho { peers, task }
    }

    pub fn peer_ips(&self) -> Vec<std::net::IpAddr> {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| p.ip())
            .collect()
    }
}

/// A mesh file entry for a pod of namespace `test` served by the agent of `node`.
pub fn pod_workload(pod: &netns::Pod, node: &str, service_account: &str) -> String {
    pod.workload_yaml("test", node, service_account)
}

pub use ambient_agent::demo::client::{payload as payload_with_marker, MARKER};

/// Runs the `pod-client` application (`exe`) as a process of `from` (its
/// namespace and cgroup): it sends `len` bytes to `dst` and reads the echo.
/// Returns (hash sent, hash received).
pub async fn run_pod_client(
    exe: &str,
    from: &netns::Pod,
    dst: SocketAddr,
    len: usize,
    seed: u8,
) -> (String, String) {
    let x = from
        .run_client(exe, false, dst, len, seed)
        .await
        .expect("pod client");
    (x.sent, x.received)
}

/// Sends `msg` from inside `from` (an ordinary socket of the pod, so
/// capture applies), closes the write side and returns what came back
/// within 5 s: the echo when allowed; an error or nothing when refused.
pub async fn pod_exchange(
    from: &netns::Pod,
    dst: SocketAddr,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    let run = async {
        let mut s = from.sockets().connect(dst, Default::default()).await?;
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok(back)
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), run)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            ))
        })
}

/// Waits until `agent` runs a mesh whose policies are exactly `names`
/// (after a mesh file edit).
pub async fn wait_for_policies(agent: &Agent, names: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let snap = agent.state.snapshot();
        let mut have: Vec<&str> = snap.policies().iter().map(|p| p.name.as_str()).collect();
        have.sort_unstable();
        let mut want = names.to_vec();
        want.sort_unstable();
        if have == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not load policies {want:?} (has {have:?})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An app on 8080 in `pod` that answers each connection (after reading
/// what the client sent first) with `name` and closes: who answered.
pub async fn pod_who(pod: &netns::Pod, name: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = pod
        .sockets()
        .listen(pod.any_addr(8080), Default::default())
        .await
        .expect("listen in the pod");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    })
}

/// One connection from `pod` (captured like an app's) to `dst`, asking a
/// [`pod_who`] app: its answer, or `None` when refused or cut.
pub async fn pod_ask(pod: &netns::Pod, dst: SocketAddr) -> Option<String> {
    let exchange = async {
        let mut s = pod.sockets().connect(dst, Default::default()).await.ok()?;
        s.write_all(b"who?").await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        (!out.is_empty()).then(|| String::from_utf8_lossy(&out).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .expect("an answer or a refusal in time")
}
