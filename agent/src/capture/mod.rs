//! Traffic capture: getting a workload's TCP to the agent's listeners with
//! the original destination intact, and entering workloads' network
//! namespaces to do so.
//!
//! An [`Enrollment`] is one workload's namespace with capture installed;
//! [`Enrollment::release`] (or drop, as a fallback) removes it again.

pub mod netns;
pub mod nft;

use std::path::Path;
use std::sync::Arc;

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
}

/// Why a workload could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("network namespace: {0}")]
    Netns(#[source] std::io::Error),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("capture mode {0:?} is not available in this build")]
    Unsupported(CaptureMode),
    #[error("capture task failed: {0}")]
    Task(String),
}

/// A workload's namespace with capture installed in it.
pub struct Enrollment {
    netns: Arc<Netns>,
    installed: bool,
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
        })
    }

    /// How to make sockets inside the workload's namespace.
    pub fn sockets(&self) -> Sockets {
        Sockets::Netns(self.netns.clone())
    }

    /// Starts redirecting the workload's traffic. Call once its listeners
    /// are up, so nothing is redirected to a closed port.
    pub async fn capture(
        &mut self,
        mode: CaptureMode,
        rules: NftCapture,
    ) -> Result<(), CaptureError> {
        if mode != CaptureMode::Nft {
            return Err(CaptureError::Unsupported(mode));
        }
        let ns = self.netns.clone();
        tokio::task::spawn_blocking(move || rules.install(&ns))
            .await
            .map_err(|e| CaptureError::Task(e.to_string()))??;
        self.installed = true;
        info!(netns = %self.netns.path().display(), "capture installed");
        Ok(())
    }

    /// Stops redirecting and removes everything capture installed.
    pub async fn release(mut self) {
        if !std::mem::take(&mut self.installed) {
            return;
        }
        let ns = self.netns.clone();
        match tokio::task::spawn_blocking(move || NftCapture::remove(&ns)).await {
            Ok(Ok(())) => info!(netns = %self.netns.path().display(), "capture removed"),
            Ok(Err(e)) => {
                warn!(netns = %self.netns.path().display(), error = %e, "removing capture")
            }
            Err(e) => warn!(error = %e, "removing capture"),
        }
    }
}

impl Drop for Enrollment {
    fn drop(&mut self) {
        // Fallback when release() was not awaited (e.g. the agent is torn
        // down): leaving redirect rules behind would black-hole the pod.
        if self.installed {
            if let Err(e) = NftCapture::remove(&self.netns) {
                warn!(netns = %self.netns.path().display(), error = %e, "removing capture");
            }
        }
    }
}
