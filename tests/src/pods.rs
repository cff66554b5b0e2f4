//! A small mesh in network namespaces for policy and hostile-peer tests:
//! two nodes, pods captured with nft, agents started on demand. Needs root
//! (fails, never skips, without it).

use std::net::SocketAddr;

use ambient_agent::agent::Agent;
use ambient_agent::capture::CaptureMode;
use ambient_agent::config::Config;

use crate::netns::{Pod, Topology};
use crate::{pod_exchange, wait_for_policies, World};

pub const MSG: &[u8] = b"hello through the mesh";

/// Pods `client`, `intruder` and `outside` on node-a, `server` on node-b.
pub struct PodMesh {
    pub topo: Topology,
    pub world: World,
    /// ns `test`, sa `client`, node-a.
    pub client: Pod,
    /// ns `other`, sa `intruder`, node-a.
    pub intruder: Pod,
    /// Not in the mesh, node-a.
    pub outside: Pod,
    /// ns `test`, sa `server`, node-b; echoes on 8080 and 9090.
    pub server: Pod,
}

impl PodMesh {
    pub fn build(tag: &str) -> PodMesh {
        let topo = Topology::new(tag).expect("topology");
        let client = topo.add_pod("client", 0).expect("pod");
        let intruder = topo.add_pod("intruder", 0).expect("pod");
        let outside = topo.add_pod("outside", 0).expect("pod");
        let server = topo.add_pod("server", 1).expect("pod");
        let m = PodMesh {
            topo,
            world: World::new(0),
            client,
            intruder,
            outside,
            server,
        };
        m.set_policies("");
        m
    }

    /// Rewrites the mesh file with `policies` (a YAML list body, or empty).
    pub fn set_policies(&self, policies: &str) {
        let mut yaml = String::from("workloads:\n");
        yaml += &self.client.workload_yaml("test", "node-a", "client");
        yaml += &self.intruder.workload_yaml("other", "node-a", "intruder");
        yaml += &self.server.workload_yaml("test", "node-b", "server");
        if !policies.is_empty() {
            yaml += "policies:\n";
            yaml += policies;
        }
        self.world.write_mesh(&yaml);
    }

    /// The agent of `node`, capturing with nft.
    pub async fn agent(&self, node: &str) -> Agent {
        self.agent_capturing(node, CaptureMode::Nft).await
    }

    pub async fn agent_capturing(&self, node: &str, capture: CaptureMode) -> Agent {
        let cfg = Config {
            capture: Some(capture),
            socket_mark: 0x539,
            ..self.world.config(node)
        };
        self.world.agent_with(cfg).await
    }

    pub fn server_app(&self, port: u16) -> SocketAddr {
        self.server.addr(port)
    }

    /// A connection from `client` to the server's echo on 8080 (which the
    /// test starts), checked to carry a message both ways.
    pub async fn connect_echo(&self) -> std::io::Result<tokio::net::TcpStream> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = self
            .client
            .sockets()
            .connect(self.server.addr(8080), Default::default())
            .await?;
        conn.write_all(b"ping").await?;
        let mut back = [0u8; 4];
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_exact(&mut back),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
        if &back != b"ping" {
            return Err(std::io::Error::other("wrong echo"));
        }
        Ok(conn)
    }
}

/// Whether `from` gets its message echoed by `dst`.
pub async fn allowed(from: &Pod, dst: SocketAddr) -> bool {
    match pod_exchange(from, dst, MSG).await {
        Ok(back) if back == MSG => true,
        Ok(back) if back.is_empty() => false,
        Ok(back) => panic!("partial echo {back:?}"),
        Err(_) => false,
    }
}

/// A policy on the server workload.
pub fn on_server(name: &str, action: &str, matches: &str) -> String {
    format!(
        "  - name: {name}\n    namespace: test\n    scope: WORKLOAD_SELECTOR\n    selector: [server]\n    action: {action}\n    rules:\n      - clauses:\n          - matches:\n              - {matches}\n"
    )
}

pub async fn apply(m: &PodMesh, agents: &[&Agent], policies: &[(&str, String)]) {
    let body: String = policies.iter().map(|(_, p)| p.as_str()).collect();
    m.set_policies(&body);
    let names: Vec<&str> = policies.iter().map(|(n, _)| *n).collect();
    for a in agents {
        wait_for_policies(a, &names).await;
    }
}
