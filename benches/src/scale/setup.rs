//! Starting the processes of a scale run: `ambient-control-plane` (xDS,
//! the Istio CA and istio-cni's ZDS socket for the agent's node) and an
//! `ambient-agent` on loopback ports of its own that needs no privilege.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{free_ports, mib, nap, timed_lines, Proc, Source};

/// The agent's node: no generated workload is on it, so it serves no pod.
pub const NODE: &str = "bench-node";
/// How often `ambient-control-plane` re-reads its mesh file (its own,
/// fixed setting).
pub const CP_POLL: Duration = Duration::from_millis(500);

/// A running control plane.
pub struct ControlPlane {
    pub proc: Proc,
    /// What it prints on stderr, a line per push to its xDS clients.
    pub stderr: Receiver<(Instant, String)>,
    /// The settings it printed (`xdsAddress`, `caAddress`, ...).
    pub settings: HashMap<String, String>,
}

/// Starts `bin` serving `mesh` (and playing istio-cni for [`NODE`]), its
/// files in `dir`, and waits up to `timeout` for it to say it is ready.
pub fn start_control_plane(
    bin: &Path,
    dir: &Path,
    mesh: &Path,
    timeout: Duration,
) -> anyhow::Result<ControlPlane> {
    let ports = free_ports(2)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--mesh")
        .arg(mesh)
        .args(["--xds", &format!("127.0.0.1:{}", ports[0])])
        .args(["--ca", &format!("127.0.0.1:{}", ports[1])])
        .arg("--out")
        .arg(dir.join("cp"))
        .arg("--cni-socket")
        .arg(dir.join("cni.sock"))
        .args(["--node", NODE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut proc = Proc::spawn("ambient-control-plane", &mut cmd, None)?;
    let stdout = timed_lines(proc.child().stdout.take().context("no stdout")?);
    let stderr = timed_lines(proc.child().stderr.take().context("no stderr")?);
    let deadline = started + timeout;
    let mut settings = HashMap::new();
    loop {
        nap(Duration::ZERO)?;
        match stdout.recv_timeout(Duration::from_millis(100)) {
            Ok((_, line)) if line == "ready" => break,
            Ok((_, line)) => {
                if let Some((k, v)) = line.split_once(": ") {
                    settings.insert(k.to_string(), v.to_string());
                }
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
            Err(RecvTimeoutError::Timeout) => {
                bail!("control plane not ready after {} s", timeout.as_secs())
            }
            Err(RecvTimeoutError::Disconnected) => {
                proc.check_alive()?;
                let said: Vec<String> = stderr.try_iter().map(|(_, l)| l).collect();
                bail!("control plane closed its output: {}", said.join("\n"));
            }
        }
    }
    println!(
        "   control plane ready in {:.2} s (CPU {:.2} s, RSS {:.1} MiB)",
        started.elapsed().as_secs_f64(),
        proc.cpu()?.as_secs_f64(),
        mib(proc.rss()?)
    );
    Ok(ControlPlane {
        proc,
        stderr,
        settings,
    })
}

/// The ports an agent listens on, all free loopback ports.
#[derive(Clone, Copy, Debug)]
pub struct AgentPorts {
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
    pub dns: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl AgentPorts {
    pub fn free() -> anyhow::Result<AgentPorts> {
        let p = free_ports(7)?;
        Ok(AgentPorts {
            outbound: p[0],
            inbound_plaintext: p[1],
            hbone: p[2],
            dns: p[3],
            admin: p[4],
            metrics: p[5],
            readiness: p[6],
        })
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics))
    }

    pub fn readiness_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.readiness))
    }
}

/// An agent's configuration file: [`NODE`], every endpoint on 127.0.0.1
/// at `ports`, nothing that needs privileges (no capture, no socket
/// mark), DNS proxy off. Local mode reads `mesh` every `mesh_poll`; Istio
/// mode (given the control plane's settings) follows the control plane.
pub fn agent_config(
    ports: &AgentPorts,
    log_level: &str,
    mesh: &Path,
    mesh_poll: Duration,
    cp: Option<&HashMap<String, String>>,
) -> String {
    let p = ports;
    let mut yaml = format!(
        "node: {NODE}\nsocketMark: 0\ncapture: none\n\
         ports: {{outbound: {}, inboundPlaintext: {}, hbone: {}}}\n\
         dns: {{enabled: false, port: {}}}\n\
         adminAddress: 127.0.0.1\nadminPort: {}\n\
         metricsAddress: 127.0.0.1\nmetricsPort: {}\n\
         readinessAddress: 127.0.0.1\nreadinessPort: {}\n\
         log: {{level: {log_level}}}\n",
        p.outbound, p.inbound_plaintext, p.hbone, p.dns, p.admin, p.metrics, p.readiness
    );
    match cp {
        Some(s) => {
            let get = |k: &str| s.get(k).map(String::as_str).unwrap_or_default();
            yaml += &format!(
                "mode: istio\ncontrolPlane:\n  xdsAddress: {}\n  caAddress: {}\n  \
                 rootCert: {}\n  serverName: {}\n  tokenPath: {}\n  cniSocket: {}\n  \
                 podName: ztunnel-bench\n  podNamespace: istio-system\n  podIp: 127.0.0.1\n",
                get("xdsAddress"),
                get("caAddress"),
                get("rootCert"),
                get("serverName"),
                get("tokenPath"),
                get("cniSocket"),
            );
        }
        None => {
            yaml += &format!(
                "mode: local\nmeshFile: {}\nmeshPollInterval: {}ms\n",
                mesh.display(),
                mesh_poll.as_millis()
            );
        }
    }
    yaml
}

/// Starts `bin run --config <config>`, its output into `log`, with none of
/// the environment variables it reads (so nothing here overrides the file).
pub fn spawn_agent(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<Proc> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    for var in ambient_agent::cli::run_env_vars() {
        cmd.env_remove(var);
    }
    for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("ISTIO_META_")) {
        cmd.env_remove(var);
    }
    Proc::spawn("ambient-agent", &mut cmd, Some(log))
}

/// The source's file poll interval, as `agent_config` and the control
/// plane set it.
pub fn file_poll(source: Source, mesh_poll: Duration) -> Duration {
    match source {
        Source::Local => mesh_poll,
        Source::Xds => CP_POLL,
    }
}
