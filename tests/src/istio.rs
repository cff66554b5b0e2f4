//! An Istio-mode world for end-to-end tests in network namespaces: the
//! test xDS server, the test Istio CA, one test CNI per node and an agent
//! per node. By default the pods are captured as in a real cluster, by
//! istio-cni's own in-pod rules ([`crate::istio_cni`]); the agent installs
//! none. Needs root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_agent::capture::zds::WorkloadInfo;
use ambient_agent::capture::CaptureMode;
use ambient_agent::config::{Config, ControlPlaneConfig, Mode};
use ambient_agent::identity::LocalCa;
use ambient_agent::xds::local::parse_mesh;

use crate::control_plane::{ca::TestCa, xds::TestXds, zds::TestCni};
use crate::istio_cni;
use crate::netns::{in_ns, Pod};

pub const TOKEN: &str = "test-token";
/// The cluster the agents say they are in.
pub const CLUSTER_ID: &str = "test-cluster";

/// Who redirects the pods' traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// istio-cni's in-pod rules, installed by the test CNI before it hands
    /// a pod over; the agent runs with its default (no capture of its own).
    Cni,
    /// The agent's own (`capture:` set), no CNI rules.
    Agent(CaptureMode),
}

/// Two Istio-mode agents (node-a, node-b) with the test xDS server, Istio
/// CA and one test CNI each.
pub struct IstioWorld {
    pub xds: TestXds,
    pub ca: TestCa,
    pub cnis: Vec<TestCni>,
    pub agents: Vec<Agent>,
    pub capture: Capture,
    /// Each node's agent configuration (to start another agent like it).
    pub configs: Vec<Config>,
    pub dir: tempfile::TempDir,
}

impl IstioWorld {
    /// Serves `mesh_yaml` over xDS and starts the agents, with metrics on
    /// `metrics_port` (tests running side by side pick their own); pods
    /// captured by istio-cni's rules.
    pub async fn start(mesh_yaml: &str, metrics_port: u16) -> IstioWorld {
        Self::start_with(mesh_yaml, metrics_port, Capture::Cni).await
    }

    pub async fn start_with(mesh_yaml: &str, metrics_port: u16, capture: Capture) -> IstioWorld {
        let dir = tempfile::tempdir().unwrap();
        let mesh = parse_mesh("mesh", mesh_yaml).expect("mesh");
        let xds = TestXds::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        xds.set_mesh(&mesh);

        // The Istio CA; one file holds the mesh root and the CA's serving root.
        let root = Arc::new(LocalCa::generate("cluster.local").unwrap());
        let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), root.clone(), TOKEN)
            .await
            .unwrap();
        let roots = dir.path().join("roots.pem");
        std::fs::write(&roots, format!("{}{}", root.root_pem(), ca.root_pem())).unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();

        let mut cnis = Vec::new();
        let mut agents = Vec::new();
        let mut configs = Vec::new();
        for (i, node) in ["node-a", "node-b"].into_iter().enumerate() {
            let socket = dir.path().join(format!("{node}.sock"));
            cnis.push(TestCni::start(&socket).await.unwrap());
            let cfg = Config {
                node: node.into(),
                mode: Mode::Istio,
                socket_mark: 0x539,
                capture: match capture {
                    Capture::Cni => None,
                    Capture::Agent(mode) => Some(mode),
                },
                control_plane: ControlPlaneConfig {
                    xds_address: xds.url(),
                    ca_address: Some(ca.url()),
                    root_cert: roots.clone(),
                    server_name: Some(ca.server_name().to_string()),
                    token_path: token.clone(),
                    cni_socket: socket,
                    cluster_id: CLUSTER_ID.into(),
                    pod_name: format!("ztunnel-{node}"),
                    pod_namespace: "istio-system".into(),
                    pod_ip: format!("10.255.0.{}", i + 1),
                    // As Istio's default: the DNS proxy on.
                    proxy_metadata: [("DNS_CAPTURE".to_string(), "true".to_string())].into(),
                    ..ControlPlaneConfig::default()
                },
                // Metrics and admin on an address of each agent's own, to
                // read the xDS state.
                admin_address: metrics_ip(node),
                admin_port: admin_port(metrics_port),
                metrics_address: metrics_ip(node),
                metrics_port,
                readiness_port: 0,
                ..Config::default()
            };
            configs.push(cfg.clone());
            agents.push(Agent::start(cfg).await.expect("agent starts in Istio mode"));
        }
        for cni in &cnis {
            cni.wait_connected(Duration::from_secs(5)).await.unwrap();
        }
        IstioWorld {
            xds,
            ca,
            cnis,
            agents,
            capture,
            configs,
            dir,
        }
    }

    /// Serves `yaml` over xDS from now on.
    pub fn set_mesh(&self, yaml: &str) {
        self.xds.set_mesh(&parse_mesh("mesh", yaml).expect("mesh"));
    }

    /// Hands `pod` to node `node`'s agent as istio-cni does: its in-pod
    /// rules first (with [`Capture::Cni`]), then `add` with the netns fd.
    /// Returns the agent's answer.
    pub async fn add_pod(
        &self,
        node: usize,
        pod: &Pod,
        info: Option<WorkloadInfo>,
    ) -> Result<(), String> {
        if self.capture == Capture::Cni && !istio_cni::has_inpod(&pod.netns) {
            // istio-cni's default set, DNS capture included (the tests'
            // pods resolve nothing; the agent's DNS proxy is issue 17).
            istio_cni::install_inpod(&pod.netns, true).expect("istio-cni rules");
        }
        self.cnis[node]
            .add_pod(&pod.name, &netns(pod), info)
            .await
            .expect("the agent answers")
    }

    /// Takes `pod` out of the mesh as istio-cni does: `del`, then its
    /// in-pod rules go.
    pub async fn del_pod(&self, node: usize, pod: &Pod) -> Result<(), String> {
        let ack = self.cnis[node]
            .del_pod(&pod.name)
            .await
            .expect("the agent answers");
        if self.capture == Capture::Cni {
            istio_cni::remove_inpod(&pod.netns).expect("istio-cni rules removed");
        }
        ack
    }
}

/// The CNI's workload info for pod `name` of namespace `test` (service
/// account = name).
pub fn info(name: &str) -> Option<WorkloadInfo> {
    Some(WorkloadInfo {
        name: name.into(),
        namespace: "test".into(),
        service_account: name.into(),
    })
}

pub async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..100 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The string values of an xDS node's metadata.
pub fn node_metadata(
    node: &ambient_proto::core::Node,
) -> std::collections::BTreeMap<String, String> {
    node.metadata
        .iter()
        .flat_map(|m| m.fields.iter())
        .filter_map(|(k, v)| match &v.kind {
            Some(ambient_proto::prost_types::value::Kind::StringValue(s)) => {
                Some((k.clone(), s.clone()))
            }
            _ => None,
        })
        .collect()
}

/// Whether the agent's own nft table is in `pod`.
pub fn has_agent_capture(pod: &Pod) -> bool {
    in_ns(&pod.netns, "nft", &["list", "tables"]).is_ok_and(|t| t.contains("ambient_agent"))
}

pub fn netns(p: &Pod) -> PathBuf {
    PathBuf::from(p.netns_path())
}

/// `pods` as xDS workloads of namespace `test` (service account = name),
/// on the given nodes.
pub fn mesh_of(pods: &[(&Pod, &str)]) -> String {
    let mut yaml = String::from("workloads:\n");
    for (p, node) in pods {
        yaml += &format!(
            "  - {{uid: {n}, name: {n}, namespace: test, serviceAccount: {n}, addresses: [{ip}], node: {node}}}\n",
            n = p.name,
            ip = p.ip
        );
    }
    yaml
}

/// Where node `node`'s agent serves metrics.
pub fn metrics_ip(node: &str) -> IpAddr {
    if node == "node-a" {
        IpAddr::V4(Ipv4Addr::new(127, 0, 91, 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(127, 0, 91, 2))
    }
}

/// The admin port of the agents of a world with metrics on `metrics_port`
/// (on the same address).
pub fn admin_port(metrics_port: u16) -> u16 {
    metrics_port + 1000
}

/// The body of `GET /metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> String {
    get(addr, "/metrics").await
}

/// The body of `GET <path>` at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .expect("HTTP response")
}

/// Writes `msg` on `conn` and expects it echoed.
pub async fn echoes(conn: &mut tokio::net::TcpStream, msg: &[u8]) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if conn.write_all(msg).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; msg.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == msg
}
