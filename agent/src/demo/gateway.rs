//! An east-west gateway inside a test or benchmark pod.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::topology::Pod;
use crate::gateway::{Gateway, GatewayConfig};
use crate::identity::{CertManager, LocalCa};
use crate::state::State;
use crate::xds::local::LocalSource;

/// The gateway inside `pod`, as workload `uid` of the mesh file `mesh`
/// (read once), with certificates from `ca`.
pub async fn start_gateway(
    mesh: &Path,
    ca: &Arc<LocalCa>,
    pod: &Pod,
    uid: &str,
) -> anyhow::Result<Gateway> {
    let state = Arc::new(State::default());
    LocalSource::new(mesh.to_path_buf(), state.clone(), Duration::from_secs(1))
        .load_initial()
        .context("loading the mesh for the gateway")?;
    let certs = CertManager::new(ca.clone(), ca.trust_bundle(), Default::default());
    Gateway::start(state, certs, pod.sockets(), GatewayConfig::new(uid))
        .await
        .context("starting the gateway")
}
