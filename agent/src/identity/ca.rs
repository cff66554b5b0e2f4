//! The in-process certificate authority of local mode. (stub: being written)

use super::{CertificateSigner, Identity, SignFuture, TrustBundle};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("stub")]
    Stub,
}

pub struct LocalCa {}

impl LocalCa {
    pub fn generate(_trust_domain: &str) -> Result<Self, CaError> {
        Err(CaError::Stub)
    }
    pub fn trust_bundle(&self) -> TrustBundle {
        unimplemented!()
    }
}

impl CertificateSigner for LocalCa {
    fn sign<'a>(&'a self, _i: &'a Identity, _c: &'a str, _t: std::time::Duration) -> SignFuture<'a> {
        Box::pin(async { Err(CaError::Stub) })
    }
}
impl LocalCa {
    pub fn load(_c: &std::path::Path, _k: &std::path::Path) -> Result<Self, CaError> { Err(CaError::Stub) }
}
