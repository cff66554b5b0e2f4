//! Traffic capture: getting a workload's TCP to the agent's listeners with
//! the original destination intact, and entering workloads' network
//! namespaces to do so.
//!
//! An [`Enrollment`] is one workload's namespace with capture installed;
//! [`Enrollment::release`] removes it again, and is called only when the
//! workload leaves the mesh. Dropping an enrollment (the agent stops or
//! restarts) leaves the nft table in place: with no listener behind it,
//! the pod's TCP is refused, never sent around the mesh in plaintext. The
//! eBPF programs are the agent's own (their links close with it); the nft
//! table installed beside them holds a fail-safe that refuses what they no
//! longer redirect. [`uninstall`] takes every trace of capture off the
//! node.

pub mod netns;
pub mod nft;
pub mod zds;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ambient_ebpf::{EbpfCapture, EbpfError, PodAttachment, PodSpec};

use tracing::{info, warn};

use self::netns::Netns;
use self::nft::{NftCapture, NftError};
use crate::socket::Sockets;

/// Which mechanism redirects a workload's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// nftables rules inside the workload's namespace (portable default).
    #[default]
    Nft,
    /// eBPF programs (tc + cgroup hooks).
    Ebpf,
    /// None of the agent's own: something else redirects the pods' TCP to
    /// the agent's listeners (istio-cni's in-pod rules, which also carry
    /// the return path and the kubelet-probe exemption). The default in
    /// Istio mode.
    None,
}

impl CaptureMode {
    /// The default for a mode: in Istio mode istio-cni owns the pods'
    /// rules (installing ours as well would redirect twice and skip the
    /// CNI's exemptions); in local mode nobody else captures.
    pub fn default_for(mode: crate::config::Mode) -> CaptureMode {
        match mode {
            crate::config::Mode::Istio => CaptureMode::None,
            crate::config::Mode::Local => CaptureMode::Nft,
        }
    }
}

/// A loaded capture backend, shared by every enrollment.
#[derive(Clone)]
pub enum Backend {
    /// Capture is someone else's (istio-cni).
    None,
    Nft,
    Ebpf(Arc<EbpfCapture>),
}

impl Backend {
    /// Prepares `mode` (for eBPF: loads the programs once).
    pub async fn load(mode: CaptureMode) -> Result<Backend, CaptureError> {
        match mode {
            CaptureMode::None => Ok(Backend::None),
            CaptureMode::Nft => Ok(Backend::Nft),
            CaptureMode::Ebpf => {
                let capture = tokio::task::spawn_blocking(EbpfCapture::load)
                    .await
                    .map_err(|e| CaptureError::Task(e.to_string()))??;
                Ok(Backend::Ebpf(Arc::new(capture)))
            }
        }
    }
}

/// What to capture for one workload.
#[derive(Clone, Debug)]
pub struct CaptureSpec {
    pub rules: NftCapture,
    pub addresses: Vec<IpAddr>,
    /// cgroup v2 directory of the workload's processes (eBPF outbound).
    pub cgroup: Option<PathBuf>,
    /// The workload's interface inside its namespace (eBPF inbound).
    pub interface: String,
}

/// Why a workload could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("network namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("eBPF capture: {0}")]
    Ebpf(#[from] EbpfError),
    #[error("capture task failed: {0}")]
    Task(String),
}

/// A workload's namespace with capture installed in it.
pub struct Enrollment {
    netns: Arc<Netns>,
    /// The nft table (all of it, or the return path for eBPF) is in place.
    installed: bool,
    ebpf: Option<PodAttachment>,
}

impl Enrollment {
    /// Enters the namespace at `path` (nothing is redirected yet).
    pub async fn open(path: &Path) -> Result<Enrollment, CaptureError> {
        let path = path.to_path_buf();
        let netns = tokio::task::spawn_blocking(move || Netns::open(&path))
            .await
            .map_err(|e| CaptureError::Task(e.to_string()))?
            .map_err(CaptureError::Netns)?;
        Ok(Enrollment {
            netns: Arc::new(netns),
            installed: false,
            ebpf: None,
        })
    }

    /// Enrolls a namespace already open (e.g. an fd the CNI sent).
    pub fn with_netns(netns: Arc<Netns>) -> Enrollment {
        Enrollment {
            netns,
            installed: false,
            ebpf: None,
        }
    }

    /// How to make sockets inside the workload's namespace.
    pub fn sockets(&self) -> Sockets {
        Sockets::Netns(self.netns.clone())
    }

    /// Starts redirecting the workload's traffic. Call once its listeners
    /// are up, so nothing is redirected to a closed port.
    pub async fn capture(
        &mut self,
        backend: &Backend,
        spec: CaptureSpec,
    ) -> Result<(), CaptureError> {
        if !matches!(backend, Backend::None) {
            let rules = NftCapture {
                redirect: matches!(backend, Backend::Nft),
                ..spec.rules
            };
            let ns = self.netns.clone();
            tokio::task::spawn_blocking(move || rules.install(&ns))
                .await
                .map_err(|e| CaptureError::Task(e.to_string()))??;
            self.installed = true;
        }
        // When an agent hands a pod over to its successor, connections
        // waiting in the old agent's accept queue move to the new one's
        // listener (same SO_REUSEPORT group) instead of being reset.
        let migrate = self
            .netns
            .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))
            .await;
        if let Err(e) = migrate {
            warn!(netns = %self.netns.path().display(), error = %e,
                "cannot enable tcp_migrate_req (kernel < 5.14?); an agent handover may reset queued connections");
        }
        if let Backend::Ebpf(capture) = backend {
            let capture = capture.clone();
            let netns = self.netns.path().to_path_buf();
            let attachment = tokio::task::spawn_blocking(move || {
                capture.attach(&PodSpec {
                    netns: &netns,
                    cgroup: spec.cgroup.as_deref(),
                    pod_ips: &spec.addresses,
                    interface: &spec.interface,
                    dns_port: spec.rules.dns_port,
                })
            })
            .await
            .map_err(|e| CaptureError::Task(e.to_string()))??;
            self.ebpf = Some(attachment);
        }
        match backend {
            Backend::None => info!(netns = %self.netns.path().display(),
                "serving; capture is the CNI's"),
            _ => info!(netns = %self.netns.path().display(), "capture installed"),
        }
        Ok(())
    }

    /// Stops redirecting and removes everything capture installed.
    pub async fn release(mut self) {
        let ebpf = self.ebpf.take();
        let nft = std::mem::take(&mut self.installed);
        let ns = self.netns.clone();
        let done = tokio::task::spawn_blocking(move || remove(&ns, ebpf, nft)).await;
        if let Err(e) = done {
            warn!(error = %e, "removing capture");
        }
    }
}

/// Takes capture off `ns`: the redirection first, then the return path.
fn remove(ns: &Netns, ebpf: Option<PodAttachment>, nft: bool) {
    if let Some(a) = ebpf {
        if let Err(e) = a.detach() {
            warn!(netns = %ns.path().display(), error = %e, "detaching eBPF capture");
        }
    }
    if nft {
        match NftCapture::remove(ns) {
            Ok(()) => info!(netns = %ns.path().display(), "capture removed"),
            Err(e) => warn!(netns = %ns.path().display(), error = %e, "removing capture"),
        }
    }
}

/// What [`uninstall`] found and did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    /// Network namespaces looked at (named ones and those of processes).
    pub checked: usize,
    /// Where the agent's capture was found and removed.
    pub removed: Vec<PathBuf>,
    /// Where it was found and could not be removed, and why.
    pub failed: Vec<(PathBuf, String)>,
}

/// Takes the agent's capture off every network namespace of this host:
/// the named ones (`/var/run/netns`) and those of running processes, each
/// once. For operators removing the agent for good: stopping the agent
/// leaves capture in place on purpose (pods fail closed).
pub fn uninstall() -> Uninstalled {
    use std::os::unix::fs::MetadataExt;
    let mut out = Uninstalled::default();
    let mut seen = std::collections::HashSet::new();
    let named = std::fs::read_dir("/var/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for path in named.chain(processes) {
        // The same namespace under many names: once, by device and inode.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        out.checked += 1;
        let Ok(ns) = Netns::open(&path) else { continue };
        match NftCapture::is_installed(&ns) {
            Ok(true) => match NftCapture::remove(&ns) {
                Ok(()) => out.removed.push(path),
                Err(e) => out.failed.push((path, e.to_string())),
            },
            Ok(false) => {}
            Err(e) => out.failed.push((path, e.to_string())),
        }
    }
    out
}
