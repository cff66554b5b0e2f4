//! Parts of the scale benchmark (`src/bin/scale.rs`): here child
//! processes that are killed when dropped (and when this process dies),
//! free loopback ports, the agent's mesh metrics over plain HTTP,
//! timestamped output lines of a child, atomic file writes; in [`setup`]
//! how the agent and the control plane are started; in [`report`] what a
//! run measured and the summary table.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procstat;

pub mod report;
pub mod setup;

/// Where the agent gets the mesh from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Local mode: the agent reads the mesh file.
    Local,
    /// Istio mode: Delta xDS from `ambient-control-plane`, which reads the file.
    Xds,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Local => "mesh file",
            Source::Xds => "xDS",
        }
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped. It is also
/// killed if this process dies first (`PR_SET_PDEATHSIG`), so an
/// interrupted benchmark leaves nothing running.
pub struct Proc {
    name: String,
    child: Child,
    /// Where its output goes, shown when it dies.
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `cmd` from the calling thread (the death signal follows the
    /// thread that spawned it, so call this from the main thread).
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> anyhow::Result<Proc> {
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.map(Path::to_path_buf),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        procstat::cpu(self.pid()).with_context(|| format!("CPU time of {}", self.name))
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> anyhow::Result<u64> {
        procstat::rss(self.pid()).with_context(|| format!("RSS of {}", self.name))
    }

    /// The most it has had resident, in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        procstat::peak_rss(self.pid()).with_context(|| format!("peak RSS of {}", self.name))
    }

    /// An error (with the end of its log) if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = self.log.as_deref().map(tail).unwrap_or_default();
            bail!("{} exited ({status}); its log ends:\n{log}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last 30 lines of `path`.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `k` distinct free ports on 127.0.0.1 (held together while chosen, so
/// they differ; free again, and so racy, once returned).
pub fn free_ports(k: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..k)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<Vec<_>>>()
        .context("choosing free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// `GET path` on `addr`: the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("not an HTTP response")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

/// The agent's mesh metrics (`ambient_mesh_*` on `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MeshMetrics {
    /// `ambient_mesh_updates_total`: versions of the mesh installed.
    pub updates: u64,
    /// `ambient_mesh_update_seconds_total`.
    pub update_seconds_total: f64,
    /// `ambient_mesh_update_last_seconds`: the last update's time in the agent.
    pub update_last_seconds: f64,
    pub workloads: u64,
    pub services: u64,
    pub policies: u64,
}

impl MeshMetrics {
    /// Reads them from a Prometheus/OpenMetrics text exposition.
    pub fn parse(text: &str) -> anyhow::Result<MeshMetrics> {
        let values: HashMap<&str, f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                Some((name, value.trim().parse().ok()?))
            })
            .collect();
        let get = |name: &str| {
            values
                .get(name)
                .copied()
                .with_context(|| format!("no {name} in the agent's metrics"))
        };
        Ok(MeshMetrics {
            updates: get("ambient_mesh_updates_total")? as u64,
            update_seconds_total: get("ambient_mesh_update_seconds_total")?,
            update_last_seconds: get("ambient_mesh_update_last_seconds")?,
            workloads: get("ambient_mesh_workloads")? as u64,
            services: get("ambient_mesh_services")? as u64,
            policies: get("ambient_mesh_policies")? as u64,
        })
    }

    /// Scrapes `http://<addr>/metrics`.
    pub fn scrape(addr: SocketAddr) -> anyhow::Result<MeshMetrics> {
        let (status, body) = http_get(addr, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        MeshMetrics::parse(&body)
    }
}

/// Each line `reader` yields, with the time it was read, on a channel fed
/// by a thread of its own (which ends with the stream).
pub fn timed_lines(reader: impl Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Set by SIGINT or SIGTERM.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// From now on SIGINT and SIGTERM make [`nap`] (and so every wait of the
/// benchmark) fail, so the run unwinds through its guards: the processes
/// are killed and the temporary directories removed.
pub fn stop_on_signals() {
    let handler = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Whether SIGINT or SIGTERM arrived (see [`stop_on_signals`]).
pub fn interrupted() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Sleeps for `d`, failing early if the benchmark was told to stop.
pub fn nap(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Replaces `path` with `text` in one step (a temporary file renamed over
/// it), so a reader polling it never sees half a file.
pub fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming over {}", path.display()))
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_mesh_metrics() {
        let text = "# TYPE ambient_mesh_updates counter\nambient_mesh_updates_total 3\n\
                    ambient_mesh_update_seconds_total 0.25\nambient_mesh_update_last_seconds 0.125\n\
                    ambient_mesh_workloads 1000\nambient_mesh_services 100\n\
                    ambient_mesh_policies 1000\nambient_mesh_workloads_other 7\n# EOF\n";
        let m = MeshMetrics::parse(text).expect("parses");
        assert_eq!(m.updates, 3);
        assert_eq!(m.update_last_seconds, 0.125);
        assert_eq!((m.workloads, m.services, m.policies), (1000, 100, 1000));
        assert!(MeshMetrics::parse("ambient_mesh_workloads 1\n").is_err());
    }
}
