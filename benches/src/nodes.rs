//! The agents and pods the namespace benchmarks run: agent processes
//! (`ambient-agent run`, nft capture, local CA) with their readiness and
//! metrics ports, and the mesh file they share.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ambient_tests::netns::{in_ns, Pod};
use anyhow::{bail, Context};

use crate::{apps, procstat};

/// How a namespace benchmark starts. With `serve`, this process is the
/// applications inside a server pod (the benchmark runs itself that way)
/// and serves until killed: `None`. Else, checked to run as root, the agent
/// binary to start: `agent`, or `ambient-agent` next to this binary.
pub fn start(serve: Option<IpAddr>, agent: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    if let Some(ip) = serve {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(apps::serve(ip))?;
        return Ok(None);
    }
    ambient_tests::netns::check_root().map_err(anyhow::Error::msg)?;
    let bin = match agent {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("ambient-agent"),
    };
    if !bin.exists() {
        bail!(
            "{} is missing: build it with cargo build --release -p ambient-agent (scripts/bench does)",
            bin.display()
        );
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; figures are only meaningful in release");
    }
    Ok(Some(bin))
}

/// A child process killed when dropped.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An agent process; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct AgentProc {
    pub name: &'static str,
    pub child: Child,
    pub readiness: u16,
    pub metrics: u16,
    pub log: PathBuf,
}

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss(&self) -> u64 {
        procstat::rss(self.pid()).unwrap_or(0)
    }

    pub fn cpu(&self) -> Duration {
        procstat::cpu(self.pid()).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "agent {} exited ({status}); log:\n{}",
                    self.name,
                    tail(&self.log)
                );
            }
            if http_get(self.readiness, "/healthz/ready")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent {} not ready; log:\n{}", self.name, tail(&self.log))
    }

    /// `ambient_pool_connections_opened` from the agent's metrics.
    pub fn pool_opened(&self) -> anyhow::Result<u64> {
        let body = http_get(self.metrics, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with("ambient_pool_connections_opened"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .context("no ambient_pool_connections_opened metric")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A minimal HTTP/1.0 GET on 127.0.0.1:`port`; returns the whole answer.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub agent_bin: PathBuf,
    pub log_level: String,
}

impl Setup {
    /// Starts the agent of `node` (`a` or `b`), `pool_extra` added under
    /// `pool:`, logging at the run's level.
    pub fn agent(&self, node: &'static str, pool_extra: &str) -> anyhow::Result<AgentProc> {
        self.agent_logging(node, pool_extra, &self.log_level)
    }

    /// `ambient-agent <command> --workload <uid>` (`gateway`, `waypoint`)
    /// inside `pod`, with the run's mesh, CA and log level; it logs to
    /// `<command>.log`.
    pub fn role(&self, pod: &Pod, command: &str, uid: &str) -> anyhow::Result<Reaped> {
        let d = self.dir.path();
        let cfg = d.join(format!("{command}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "meshFile: {}\nca: {{rootCert: {}, rootKey: {}}}\nlog: {{level: {}}}\n",
                d.join("mesh.yaml").display(),
                d.join("root.pem").display(),
                d.join("root-key.pem").display(),
                self.log_level,
            ),
        )?;
        let log = std::fs::File::create(d.join(format!("{command}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .arg(&self.agent_bin)
            .args([command, "--workload", uid, "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting the {command}"))?;
        Ok(Reaped(child))
    }

    /// [`Setup::agent`] with the log filter `level`.
    pub fn agent_logging(
        &self,
        node: &'static str,
        pool_extra: &str,
        level: &str,
    ) -> anyhow::Result<AgentProc> {
        let (readiness, metrics) = match node {
            "node-a" => (15121, 15120),
            _ => (15221, 15220),
        };
        let d = self.dir.path();
        let cfg = d.join(format!("{node}.yaml"));
        let yaml = format!(
            "node: {node}\nmeshFile: {mesh}\nsocketMark: {mark}\ncapture: nft\n\
             drainTimeout: 1s\nadminPort: 0\n\
             metricsPort: {metrics}\nmetricsAddress: 127.0.0.1\n\
             readinessPort: {readiness}\nreadinessAddress: 127.0.0.1\n\
             ca: {{rootCert: {root}, rootKey: {key}, trustDomain: cluster.local}}\n\
             log: {{level: {level}}}\npool: {{{pool_extra}}}\n",
            mesh = d.join("mesh.yaml").display(),
            mark = apps::BYPASS_MARK,
            root = d.join("root.pem").display(),
            key = d.join("root-key.pem").display(),
        );
        std::fs::write(&cfg, yaml)?;
        let log = d.join(format!("{node}.log"));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.agent_bin.display()))?;
        let mut agent = AgentProc {
            name: node,
            child,
            readiness,
            metrics,
            log,
        };
        agent.wait_ready()?;
        Ok(agent)
    }
}

/// The mesh: the client and server pods plus placeholders up to `n`
/// workloads, on nodes no agent serves (state only).
pub fn mesh_yaml(client: &Pod, server: &Pod, n: usize) -> String {
    let mut y = String::from("workloads:\n");
    y += &client.workload_yaml("bench", "node-a", "client");
    y += &server.workload_yaml("bench", "node-b", "server");
    for i in 0..n.saturating_sub(2) {
        y += &format!(
            "  - uid: filler-{i}\n    name: filler-{i}\n    namespace: bench\n    serviceAccount: filler\n    addresses: [10.200.{}.{}]\n    node: node-{}\n",
            i / 250,
            i % 250 + 1,
            ["c", "d", "e"][i % 3],
        );
    }
    y
}

/// Lets each pod reuse TIME_WAIT ports for new connections, with a wide
/// port range: the connection-rate runs open tens of thousands.
pub fn tune_pod(p: &Pod) -> anyhow::Result<()> {
    for kv in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        in_ns(&p.netns, "sysctl", &["-qw", kv]).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
