//! Workload identity: SPIFFE identities, the certificates that prove them,
//! and where those certificates come from.
//!
//! The data plane asks [`CertManager::fetch`] for the certificate of an
//! identity and gets a cached [`WorkloadCert`]; how it was signed (the local
//! CA here, the Istio CA later) is hidden behind [`CertificateSigner`].

mod ca;
pub mod istio_ca;
mod manager;
mod spiffe;
pub mod trust;
pub mod verify;

pub use ca::{CaError, LocalCa};
pub use manager::{CertManager, CertManagerConfig};
pub use spiffe::{Identity, IdentityParseError};
pub use trust::{PeerGuard, PeerRole, TrustStore};

use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A workload's certificate chain and private key, as served in mTLS.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity named in the leaf's URI SAN.
    pub identity: Identity,
    /// Leaf first, then intermediates; the root is not included.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    /// The instant at which the certificate should be replaced: half of its
    /// lifetime, as Istio does.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    /// Whether the certificate is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// Something that turns a certificate signing request into a signed chain:
/// the in-process [`LocalCa`], or a remote CA such as Istio's.
pub trait CertificateSigner: Send + Sync + 'static {
    /// Signs `csr_pem` (PKCS#10, PEM) for `identity`, valid for `ttl`.
    /// Returns the chain as PEM certificates, leaf first, root last.
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: std::time::Duration,
    ) -> SignFuture<'a>;
}

/// The future a [`CertificateSigner`] returns (boxed so signers can be
/// chosen at run time).
pub type SignFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<String>, CaError>> + Send + 'a>>;

/// The trust anchors against which peers' certificates are verified, as
/// of one moment ([`TrustStore`] holds the live set).
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub roots: Arc<Vec<CertificateDer<'static>>>,
    /// Revocation lists (DER), each parsed when it was read.
    pub crls: Arc<Vec<rustls_pki_types::CertificateRevocationListDer<'static>>>,
    /// Which version of the live set this is: TLS configurations built
    /// from an older one are rebuilt.
    pub generation: u64,
}

impl TrustBundle {
    /// Every certificate in a PEM file (the mesh root(s) in Istio mode).
    pub fn from_pem_file(path: &std::path::Path) -> Result<TrustBundle, CaError> {
        Ok(TrustBundle {
            roots: Arc::new(trust::read_pem_roots(path)?),
            crls: Arc::default(),
            generation: 0,
        })
    }
}

/// A fixed bundle (roots and revocation lists) as a live set that never
/// changes by itself.
impl From<TrustBundle> for Arc<TrustStore> {
    fn from(b: TrustBundle) -> Self {
        let store = TrustStore::new(b.roots.to_vec());
        if !b.crls.is_empty() {
            store.set_crls(b.crls.to_vec());
        }
        store
    }
}
