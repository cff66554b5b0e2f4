//! Certificate cache and rotation. (stub: being written)

use std::sync::Arc;
use std::time::Duration;

use super::{CaError, CertificateSigner, Identity, TrustBundle, WorkloadCert};

#[derive(Clone, Debug)]
pub struct CertManagerConfig {
    pub ttl: Duration,
}

pub struct CertManager {
    trust: TrustBundle,
}

impl CertManager {
    pub fn new(_signer: Arc<dyn CertificateSigner>, trust: TrustBundle, _cfg: CertManagerConfig) -> Arc<Self> {
        Arc::new(CertManager { trust })
    }
    pub async fn fetch(&self, _id: &Identity) -> Result<Arc<WorkloadCert>, CaError> {
        Err(CaError::Stub)
    }
    pub fn trust_bundle(&self) -> &TrustBundle {
        &self.trust
    }
}
impl CertManager {
    pub fn track(self: &Arc<Self>, _id: Identity) {}
    pub fn forget(&self, _id: &Identity) {}
}
impl Default for CertManagerConfig { fn default() -> Self { CertManagerConfig { ttl: Duration::from_secs(1) } } }
