//! Verifying a peer's chain against one [`TrustBundle`]: its roots as
//! anchors, its revocation lists for the leaf and every intermediate. The
//! one check behind the handshakes the agent verifies itself (a server's
//! chain, as a client) and behind the re-check of open connections after
//! the bundle changes.
//!
//! Revocation as ztunnel checks it (src/tls/revocation.rs): the whole
//! chain; a certificate whose issuer published no CRL passes (unknown
//! status allowed); a CRL past its `nextUpdate` still counts.

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use super::{PeerRole, TrustBundle};

/// The anchors and revocation lists of one bundle, parsed once.
pub struct ChainVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
}

impl ChainVerifier {
    /// Roots or CRLs that do not parse are left out (they were checked
    /// when read: nothing unparsable gets into a bundle).
    pub fn new(bundle: &TrustBundle) -> ChainVerifier {
        let anchors = bundle
            .roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .map(|a| a.to_owned())
            .collect();
        let crls = bundle
            .crls
            .iter()
            .filter_map(|c| OwnedCertRevocationList::from_der(c).ok())
            .map(CertRevocationList::Owned)
            .collect();
        ChainVerifier { anchors, crls }
    }

    /// Whether `chain` (leaf first, then intermediates) leads to an anchor
    /// as of `at`, for a peer acting as `role`, with nothing in it revoked.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        role: PeerRole,
        at: UnixTime,
    ) -> Result<(), webpki::Error> {
        let (leaf, intermediates) = chain.split_first().ok_or(webpki::Error::BadDer)?;
        let leaf = EndEntityCert::try_from(leaf)?;
        let usage = match role {
            PeerRole::Client => KeyUsage::client_auth(),
            PeerRole::Server => KeyUsage::server_auth(),
        };
        let refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = RevocationOptionsBuilder::new(&refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .with_expiration_policy(ExpirationPolicy::Ignore)
                .build()
        });
        let algorithms = crate::hbone::tls::provider()
            .signature_verification_algorithms
            .all;
        leaf.verify_for_usage(
            algorithms,
            &self.anchors,
            intermediates,
            at,
            usage,
            revocation,
            None,
        )
        .map(|_| ())
    }
}

/// A webpki verdict as the rustls error a handshake reports.
pub fn to_rustls(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    let c = match e {
        webpki::Error::CertRevoked => C::Revoked,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(std::sync::Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(c)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::CertificateRevocationListDer;

    use super::*;
    use crate::identity::{trust, CertManager, Identity, LocalCa};

    /// A workload chain (leaf first, intermediates after) from `ca`.
    async fn chain_from(ca: Arc<LocalCa>, sa: &str) -> Vec<CertificateDer<'static>> {
        let certs = CertManager::new(ca.clone(), ca.trust_bundle(), Default::default());
        certs
            .fetch(&Identity::new("td", "ns", sa))
            .await
            .unwrap()
            .chain
            .clone()
    }

    fn bundle(root: &LocalCa, crls: &[String]) -> TrustBundle {
        let crls = crls
            .iter()
            .flat_map(|pem| {
                rustls_pemfile::crls(&mut pem.as_bytes())
                    .map(Result::unwrap)
                    .collect::<Vec<CertificateRevocationListDer<'static>>>()
            })
            .collect();
        TrustBundle {
            crls: Arc::new(crls),
            ..root.trust_bundle()
        }
    }

    fn serial(cert: &CertificateDer<'_>) -> Vec<u8> {
        LocalCa::serial_of(cert).unwrap()
    }

    /// Revocation as ztunnel applies it: the leaf and every intermediate
    /// are checked; a certificate whose issuer published no CRL passes; an
    /// unrelated revocation changes nothing.
    #[tokio::test]
    async fn revoked_leaves_and_intermediates_are_refused_in_both_roles() {
        let root = Arc::new(LocalCa::generate("td").unwrap());
        let mid = Arc::new(root.intermediate("td", "cluster-1").unwrap());
        let direct = chain_from(root.clone(), "direct").await;
        let under_mid = chain_from(mid.clone(), "under-mid").await;
        assert_eq!(under_mid.len(), 2);
        let now = UnixTime::now();
        let ok = |v: &ChainVerifier, chain: &[CertificateDer<'_>]| {
            [PeerRole::Client, PeerRole::Server].map(|r| v.verify(chain, r, now))
        };

        let v = ChainVerifier::new(&bundle(&root, &[]));
        assert_eq!(ok(&v, &direct), [Ok(()), Ok(())]);
        assert_eq!(ok(&v, &under_mid), [Ok(()), Ok(())]);

        // The root revokes the direct leaf: only that one is refused.
        let crl = root.revocation_list(&[serial(&direct[0])]).unwrap();
        let v = ChainVerifier::new(&bundle(&root, &[crl]));
        let revoked = Err(webpki::Error::CertRevoked);
        assert_eq!(ok(&v, &direct), [revoked.clone(), revoked.clone()]);
        assert_eq!(
            ok(&v, &under_mid),
            [Ok(()), Ok(())],
            "the intermediate has no CRL: unknown is allowed"
        );

        // The root revokes the intermediate: everything under it goes.
        let crl = root.revocation_list(&[serial(mid.ca_cert())]).unwrap();
        let v = ChainVerifier::new(&bundle(&root, &[crl]));
        assert_eq!(ok(&v, &under_mid), [revoked.clone(), revoked.clone()]);
        assert_eq!(ok(&v, &direct), [Ok(()), Ok(())]);

        // The intermediate revokes its own leaf, beside an unrelated CRL.
        let other = LocalCa::generate("td").unwrap();
        let crls = [
            mid.revocation_list(&[serial(&under_mid[0])]).unwrap(),
            other.revocation_list(&[serial(&direct[0])]).unwrap(),
        ];
        let v = ChainVerifier::new(&bundle(&root, &crls));
        assert_eq!(ok(&v, &under_mid), [revoked.clone(), revoked]);
        assert_eq!(ok(&v, &direct), [Ok(()), Ok(())], "another issuer's CRL");
    }

    /// The CRL file formats ztunnel reads (src/tls/crl.rs): PEM with any
    /// number of CRLs (other blocks skipped), one DER CRL, an empty file
    /// (nothing revoked); one bad CRL spoils the file.
    #[test]
    fn crl_files_in_pem_der_or_empty() {
        let ca = LocalCa::generate("td").unwrap();
        let (one, two) = (
            ca.revocation_list(&[vec![1]]).unwrap(),
            ca.revocation_list(&[vec![2]]).unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        let pem = file("two.pem", format!("{one}{}{two}", ca.root_pem()).as_bytes());
        assert_eq!(trust::read_crls(&pem).unwrap().len(), 2);
        let der = rustls_pemfile::crls(&mut one.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let der = file("one.der", der.as_ref());
        assert_eq!(trust::read_crls(&der).unwrap().len(), 1);
        assert!(trust::read_crls(&file("empty.pem", b""))
            .unwrap()
            .is_empty());
        assert!(
            trust::read_crls(&file("root.pem", ca.root_pem().as_bytes()))
                .unwrap()
                .is_empty()
        );
        assert!(trust::read_crls(&file("junk.der", b"\x30\x03junk")).is_err());
        let bad = "-----BEGIN X509 CRL-----\nMAA=\n-----END X509 CRL-----\n";
        assert!(trust::read_crls(&file("bad.pem", format!("{one}{bad}").as_bytes())).is_err());
        assert!(trust::read_crls(&dir.path().join("missing.pem")).is_err());
    }
}
