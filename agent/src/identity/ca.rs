//! The in-process certificate authority of local mode: a root (generated, or
//! loaded from PEM files shared by several agents), or an intermediate
//! under one (Istio's plug-in CA layout: the signing certificate and key,
//! and the chain from it to the root), that signs workload certificates
//! for CSRs naming exactly the identity asked for.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CertificateSigner, Identity, SignFuture, TrustBundle};

/// Validity of a generated root.
const ROOT_VALIDITY: time::Duration = time::Duration::days(3650);
/// How far back `not_before` is set, so that peers whose clocks lag a little
/// still accept a fresh certificate.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(1);

/// Why a certificate could not be issued, or a CA not set up.
///
/// `Clone` so that one failed signing can be reported to every caller that
/// waited for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Text that should hold PEM certificates or keys does not.
    #[error("bad PEM: {0}")]
    BadPem(String),
    /// A root certificate and key that parse but cannot act as a CA.
    #[error("unusable root: {0}")]
    InvalidRoot(String),
    #[error("key generation failed: {0}")]
    KeyGen(String),
    /// The certificate signing request is malformed or badly signed.
    #[error("bad CSR: {0}")]
    Csr(String),
    /// A CSR or certificate names other identities than the one asked for.
    #[error("identity mismatch: expected {expected}, found {found:?}")]
    IdentityMismatch {
        expected: String,
        found: Vec<String>,
    },
    #[error("signing failed: {0}")]
    Signing(String),
    /// The signer answered with a chain that cannot be used.
    #[error("bad certificate chain: {0}")]
    BadChain(String),
    /// A remote CA could not be reached or refused to answer.
    #[error("CA unavailable: {0}")]
    Unavailable(String),
    /// A remote CA rejected our credentials (e.g. the bearer token).
    #[error("CA refused the request: {0}")]
    Refused(String),
    /// A CA client is configured in a way that cannot work.
    #[error("CA client configuration: {0}")]
    Config(String),
}

impl CaError {
    /// An I/O failure on the file at `path`.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        CaError::Io {
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// A CA held in memory, signing workload certificates: a root, or an
/// intermediate with the chain from it to its root.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// The signing CA's certificate.
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    /// The signing CA's issuers, up to and including the root; empty when
    /// the signing CA is the root.
    above: Vec<(CertificateDer<'static>, String)>,
    /// Leaves are never made to outlive the chain above them.
    root_not_after: OffsetDateTime,
}

impl fmt::Debug for LocalCa {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("root_not_after", &self.root_not_after)
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Generates a self-signed root (ECDSA P-256, CA:true, keyCertSign,
    /// 10-year validity, subject O=<trust domain>, CN=ambient root <random>).
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::KeyGen(e.to_string()))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        // A name of its own: revocation lists are matched to certificates
        // by their issuer's name, and two roots of one trust domain (old
        // and new, during a rotation) must not be taken for each other.
        let tag: [u8; 6] = rand::random();
        let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        dn.push(DnType::CommonName, format!("ambient root {tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + ROOT_VALIDITY;
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError::Signing(format!("self-signing the root: {e}")))?;
        Ok(LocalCa {
            ca_der: cert.der().clone(),
            ca_pem: cert.pem(),
            above: Vec::new(),
            root_not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Makes a new intermediate CA under this one (ECDSA P-256, CA:true
    /// with path length 0, subject O=<trust domain>, CN=`name`), valid as
    /// long as this one: what an operator plugs into each cluster's CA.
    pub fn intermediate(&self, trust_domain: &str, name: &str) -> Result<LocalCa, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::KeyGen(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::now_utc() - CLOCK_SKEW;
        params.not_after = self.root_not_after;
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Signing(format!("signing the intermediate: {e}")))?;
        let mut above = vec![(self.ca_der.clone(), self.ca_pem.clone())];
        above.extend(self.above.iter().cloned());
        Ok(LocalCa {
            ca_der: cert.der().clone(),
            ca_pem: cert.pem(),
            above,
            root_not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a root certificate and its key from PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        Self::load_with_chain(cert_path, key_path, None)
    }

    /// Loads a CA certificate and its key from PEM files; with `chain`, the
    /// CA is an intermediate and `chain` holds the certificates from it
    /// (or its issuer) up to the root, as Istio's `cert-chain.pem`.
    pub fn load_with_chain(
        cert_path: &Path,
        key_path: &Path,
        chain: Option<&Path>,
    ) -> Result<Self, CaError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| CaError::io(p, e));
        let ca = Self::from_pem(&read(cert_path)?, &read(key_path)?)?;
        match chain {
            None => Ok(ca),
            Some(p) => ca.with_chain(&read(p)?),
        }
    }

    /// Builds the CA from a PEM CA certificate (exactly one) and its PEM
    /// private key (PKCS#8, SEC1 or PKCS#1); a root unless
    /// [`with_chain`](Self::with_chain) says otherwise.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::BadPem(format!("root certificate: {e}")))?;
        let ca_der = match <[_; 1]>::try_from(certs) {
            Ok([root]) => root,
            Err(certs) => {
                return Err(CaError::BadPem(format!(
                    "expected exactly one root certificate, found {}",
                    certs.len()
                )))
            }
        };
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::BadPem(format!("root key: {e}")))?;

        let (_, root) = X509Certificate::from_der(&ca_der)
            .map_err(|e| CaError::BadPem(format!("root certificate: {e}")))?;
        if !root.is_ca() {
            return Err(CaError::InvalidRoot("certificate is not a CA".into()));
        }
        if root.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::InvalidRoot(
                "key does not match the certificate".into(),
            ));
        }
        let root_not_after = root.validity().not_after.to_datetime();
        if root_not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::InvalidRoot(format!(
                "certificate expired at {root_not_after}"
            )));
        }

        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| CaError::InvalidRoot(e.to_string()))?;
        let ca_pem = cert_block(cert_pem)
            .ok_or_else(|| CaError::BadPem("root certificate: no CERTIFICATE block".into()))?;
        Ok(LocalCa {
            issuer,
            ca_pem,
            ca_der,
            above: Vec::new(),
            root_not_after,
        })
    }

    /// This CA as an intermediate: `chain_pem` holds its issuers up to the
    /// root (a copy of this CA's own certificate first is skipped). The
    /// chain must lead from this CA to a self-signed root: a workload
    /// certificate signed now is verified against it before it is taken.
    pub fn with_chain(mut self, chain_pem: &str) -> Result<Self, CaError> {
        let mut above = Vec::new();
        for pem in cert_blocks(chain_pem) {
            let der = rustls_pemfile::certs(&mut pem.as_bytes())
                .next()
                .ok_or_else(|| CaError::BadPem("certificate chain: empty block".into()))?
                .map_err(|e| CaError::BadPem(format!("certificate chain: {e}")))?;
            if der == self.ca_der && above.is_empty() {
                continue;
            }
            let (_, cert) = X509Certificate::from_der(&der)
                .map_err(|e| CaError::BadPem(format!("certificate chain: {e}")))?;
            if !cert.is_ca() {
                return Err(CaError::InvalidRoot(
                    "the certificate chain holds a certificate that is not a CA".into(),
                ));
            }
            self.root_not_after = self
                .root_not_after
                .min(cert.validity().not_after.to_datetime());
            above.push((der, pem));
        }
        let Some((root, _)) = above.last() else {
            return Err(CaError::BadPem(
                "the certificate chain holds no issuer".into(),
            ));
        };
        let (_, root) = X509Certificate::from_der(root)
            .map_err(|e| CaError::BadPem(format!("certificate chain: {e}")))?;
        if root.subject().as_raw() != root.issuer().as_raw() {
            return Err(CaError::InvalidRoot(
                "the certificate chain does not end with a self-signed root".into(),
            ));
        }
        self.above = above;
        self.check_chain()?;
        Ok(self)
    }

    /// Signs a throwaway leaf and verifies it, through this CA and its
    /// chain, against the root.
    fn check_chain(&self) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::KeyGen(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| CaError::Signing(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://chain.check/ns/x/sa/y"
                .try_into()
                .map_err(|e| CaError::Signing(format!("{e}")))?,
        )];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.root_der().clone())
            .map_err(|e| CaError::InvalidRoot(format!("root: {e}")))?;
        let mut intermediates = vec![self.ca_der.clone()];
        intermediates.extend(
            self.above[..self.above.len() - 1]
                .iter()
                .map(|(d, _)| d.clone()),
        );
        let parsed = rustls::server::ParsedCertificate::try_from(leaf.der())
            .map_err(|e| CaError::Signing(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &intermediates,
            rustls::pki_types::UnixTime::now(),
            crate::hbone::tls::provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| {
            CaError::InvalidRoot(format!(
                "the certificate chain does not lead from this CA to its root: {e}"
            ))
        })
    }

    /// The root certificate: this CA's, or the last of its chain.
    fn root_der(&self) -> &CertificateDer<'static> {
        self.above.last().map_or(&self.ca_der, |(d, _)| d)
    }

    /// Writes the CA's certificate and key as PEM (key file mode 0600) so
    /// several agents can share one CA.
    pub fn write_pem(&self, cert_path: &Path, key_path: &Path) -> Result<(), CaError> {
        write_private(key_path, self.issuer.key().serialize_pem().as_bytes())?;
        std::fs::write(cert_path, &self.ca_pem).map_err(|e| CaError::io(cert_path, e))
    }

    /// The chain above the CA, up to the root, as PEM (empty for a root).
    pub fn chain_pem(&self) -> String {
        self.above.iter().map(|(_, p)| p.as_str()).collect()
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.above
            .last()
            .map_or_else(|| self.ca_pem.clone(), |(_, p)| p.clone())
    }

    /// A revocation list signed by this CA, revoking the certificates it
    /// issued with these serial numbers (DER INTEGER contents, as in the
    /// certificates), valid for a day; PEM. What an operator publishes
    /// when a workload's key or a cluster's intermediate is compromised.
    pub fn revocation_list(&self, serials: &[Vec<u8>]) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - CLOCK_SKEW,
            next_update: now + time::Duration::days(1),
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - CLOCK_SKEW,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| CaError::Signing(format!("signing the CRL: {e}")))?;
        crl.pem()
            .map_err(|e| CaError::Signing(format!("encoding the CRL: {e}")))
    }

    /// The serial number of a certificate (DER), as [`revocation_list`]
    /// takes it.
    ///
    /// [`revocation_list`]: Self::revocation_list
    pub fn serial_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, CaError> {
        let (_, c) = X509Certificate::from_der(cert)
            .map_err(|e| CaError::BadPem(format!("certificate: {e}")))?;
        Ok(c.raw_serial().to_vec())
    }

    /// This CA's own certificate (a root's, or an intermediate's).
    pub fn ca_cert(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The root, as what peers' chains must lead to.
    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            roots: Arc::new(vec![self.root_der().clone()]),
            crls: Arc::default(),
            generation: 0,
        }
    }

    /// Signs `csr_pem` for `identity`: the CSR contributes its public key and
    /// must request exactly the identity's URI SAN; everything else in the
    /// leaf is decided here.
    fn sign_leaf(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let expected = identity.to_uri();
        let requested = &csr.params.subject_alt_names;
        let matches =
            matches!(requested.as_slice(), [SanType::URI(uri)] if uri.as_str() == expected);
        if !matches {
            return Err(CaError::IdentityMismatch {
                expected,
                found: requested.iter().map(san_to_string).collect(),
            });
        }
        if ttl.is_zero() {
            return Err(CaError::Signing("requested ttl is zero".into()));
        }

        let uri = expected
            .try_into()
            .map_err(|e| CaError::Signing(format!("identity is not a valid URI SAN: {e}")))?;
        let now = OffsetDateTime::now_utc();
        let not_after = time::Duration::try_from(ttl)
            .ok()
            .and_then(|ttl| now.checked_add(ttl))
            .map_or(self.root_not_after, |t| t.min(self.root_not_after));

        let mut params = CertificateParams::default();
        // Empty subject: the identity lives in the (then critical) SAN only.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now - CLOCK_SKEW;
        params.not_after = not_after;

        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CaError::Signing(e.to_string()))?;
        Ok(leaf.pem())
    }
}

impl CertificateSigner for LocalCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> SignFuture<'a> {
        // Signing is a few hundred microseconds of CPU: done inline.
        // Leaf, the signing CA if it is not the root, its issuers, the
        // root last: as an Istio CA answers.
        let result = self.sign_leaf(identity, csr_pem, ttl).map(|leaf| {
            let mut chain = vec![leaf, self.ca_pem.clone()];
            chain.extend(self.above.iter().map(|(_, p)| p.clone()));
            chain
        });
        Box::pin(std::future::ready(result))
    }
}

/// A positive 128-bit random serial (RFC 5280 allows up to 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Clear the sign bit and keep the leading octet non-zero so the DER
    // INTEGER is always 16 octets and positive.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn san_to_string(san: &SanType) -> String {
    match san {
        SanType::URI(s) => s.as_str().to_string(),
        SanType::DnsName(s) => format!("DNS:{}", s.as_str()),
        SanType::Rfc822Name(s) => format!("email:{}", s.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// The PEM block of the (single, already parsed) certificate in `pem`, so
/// that anything else in the file (comments, a stray key) is never passed on.
fn cert_block(pem: &str) -> Option<String> {
    cert_blocks(pem).into_iter().next()
}

/// Every CERTIFICATE block in `pem`, in order, each ending with a newline.
fn cert_blocks(mut pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    while let Some(start) = pem.find(BEGIN) {
        let Some(len) = pem[start..].find(END).map(|l| l + END.len()) else {
            break;
        };
        out.push(format!("{}\n", &pem[start..start + len]));
        pem = &pem[start + len..];
    }
    out
}

/// Writes `data` to `path` readable by the owner only, also when the file
/// already exists with wider permissions.
fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CaError::io(path, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| CaError::io(path, e))?;
    file.write_all(data).map_err(|e| CaError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};

    fn id() -> Identity {
        Identity::new("td", "ns", "sa")
    }

    /// A CSR from a fresh P-256 key with the given URI SANs.
    fn csr(uris: &[&str]) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    async fn sign(ca: &LocalCa, csr: &str, ttl: Duration) -> Result<Vec<String>, CaError> {
        ca.sign(&id(), csr, ttl).await
    }

    #[tokio::test]
    async fn issues_a_workload_certificate() {
        let ca = LocalCa::generate("td").unwrap();
        let ttl = Duration::from_secs(3600);
        let chain = sign(&ca, &csr(&["spiffe://td/ns/ns/sa/sa"]), ttl)
            .await
            .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], ca.root_pem(), "root last");

        let (leaf_der, root_der) = (der(&chain[0]), der(&chain[1]));
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();

        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        assert!(sans.critical, "empty subject needs a critical SAN");
        assert_eq!(
            sans.value.general_names,
            vec![GeneralName::URI("spiffe://td/ns/ns/sa/sa")]
        );

        let spki = leaf.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);

        let validity = leaf.validity();
        let life = validity.not_after.timestamp() - validity.not_before.timestamp();
        let expected = ttl.as_secs() as i64 + 60;
        assert!((life - expected).abs() <= 2, "lifetime {life}s");
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!((validity.not_before.timestamp() - (now - 60)).abs() <= 2);

        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ku = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        assert!(!leaf.is_ca());

        assert_eq!(leaf.issuer(), root.subject());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        root.verify_signature(None).unwrap();

        // A second certificate gets another serial.
        let again = sign(&ca, &csr(&["spiffe://td/ns/ns/sa/sa"]), ttl)
            .await
            .unwrap();
        let again_der = der(&again[0]);
        let (_, again) = X509Certificate::from_der(&again_der).unwrap();
        assert_ne!(leaf.raw_serial(), again.raw_serial());
    }

    #[test]
    fn generated_root_is_a_ca_for_the_trust_domain() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let root_der = der(&ca.root_pem());
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();
        assert!(root.is_ca());
        assert!(root.key_usage().unwrap().unwrap().value.key_cert_sign());
        let org: Vec<_> = root
            .subject()
            .iter_organization()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(org, ["cluster.local"]);
        let years = (root.validity().not_after.timestamp()
            - root.validity().not_before.timestamp())
            / (365 * 24 * 3600);
        assert_eq!(years, 10);
        assert_eq!(ca.trust_bundle().roots.as_slice(), [root_der]);
    }

    #[tokio::test]
    async fn refuses_other_identities() {
        let ca = LocalCa::generate("td").unwrap();
        let ttl = Duration::from_secs(60);
        for uris in [
            &["spiffe://td/ns/ns/sa/other"][..],
            &["spiffe://td/ns/ns/sa/sa", "spiffe://td/ns/ns/sa/other"][..],
            &[][..],
        ] {
            let err = sign(&ca, &csr(uris), ttl).await.unwrap_err();
            match err {
                CaError::IdentityMismatch { expected, found } => {
                    assert_eq!(expected, "spiffe://td/ns/ns/sa/sa");
                    assert_eq!(found, uris);
                }
                other => panic!("{uris:?}: {other}"),
            }
        }
    }

    #[tokio::test]
    async fn refuses_garbage_csr() {
        let ca = LocalCa::generate("td").unwrap();
        let ttl = Duration::from_secs(60);
        for garbage in [
            "",
            "not a csr",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let err = sign(&ca, garbage, ttl).await.unwrap_err();
            assert!(matches!(err, CaError::Csr(_)), "{garbage:?}: {err}");
        }
        // A certificate is not a CSR either.
        let err = sign(&ca, &ca.root_pem(), ttl).await.unwrap_err();
        assert!(matches!(err, CaError::Csr(_)), "{err}");
    }

    #[tokio::test]
    async fn write_load_round_trip() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("root.pem"), dir.path().join("root.key"));
        // A pre-existing world-readable key file is tightened too.
        std::fs::write(&key_path, "old").unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();

        let ca = LocalCa::generate("td").unwrap();
        ca.write_pem(&cert_path, &key_path).unwrap();
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let loaded = LocalCa::load(&cert_path, &key_path).unwrap();
        assert_eq!(loaded.root_pem(), ca.root_pem());

        // The loaded CA signs leaves that chain to the original root.
        let chain = sign(
            &loaded,
            &csr(&["spiffe://td/ns/ns/sa/sa"]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let (leaf_der, root_der) = (der(&chain[0]), der(&ca.root_pem()));
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(leaf.issuer(), root.subject());
    }

    /// Istio's plug-in CA layout: an intermediate (ca-cert.pem, ca-key.pem)
    /// and the chain to the root (cert-chain.pem). Leaves come back as
    /// leaf, intermediate, root; peers need only the root.
    #[tokio::test]
    async fn an_intermediate_signs_with_its_chain_and_the_root_is_the_anchor() {
        let root = LocalCa::generate("td").unwrap();
        let mid = root.intermediate("td", "cluster-1").unwrap();
        assert_eq!(mid.root_pem(), root.root_pem());
        assert_eq!(*mid.trust_bundle().roots, *root.trust_bundle().roots);

        // Through files, as an operator plugs it in.
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        mid.write_pem(&p("ca-cert.pem"), &p("ca-key.pem")).unwrap();
        // cert-chain.pem as Istio's tools write it: the intermediate first.
        std::fs::write(p("cert-chain.pem"), mid.ca_pem.clone() + &mid.chain_pem()).unwrap();
        let loaded = LocalCa::load_with_chain(
            &p("ca-cert.pem"),
            &p("ca-key.pem"),
            Some(&p("cert-chain.pem")),
        )
        .unwrap();
        let chain = sign(
            &loaded,
            &csr(&["spiffe://td/ns/ns/sa/sa"]),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(chain[2], root.root_pem());
        let (leaf_der, mid_der) = (der(&chain[0]), der(&chain[1]));
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, mid_cert) = X509Certificate::from_der(&mid_der).unwrap();
        leaf.verify_signature(Some(mid_cert.public_key())).unwrap();

        // A chain that does not lead from the intermediate to a root, or
        // no chain at all where one is needed, is refused.
        let other = LocalCa::generate("td").unwrap();
        let wrong = LocalCa::load(&p("ca-cert.pem"), &p("ca-key.pem"))
            .unwrap()
            .with_chain(&other.root_pem());
        assert!(matches!(wrong, Err(CaError::InvalidRoot(_))), "{wrong:?}");
        let empty = LocalCa::load(&p("ca-cert.pem"), &p("ca-key.pem"))
            .unwrap()
            .with_chain("");
        assert!(matches!(empty, Err(CaError::BadPem(_))));
        let not_root = LocalCa::load(&p("ca-cert.pem"), &p("ca-key.pem"))
            .unwrap()
            .with_chain(&mid.ca_pem);
        assert!(not_root.is_err(), "a chain of only the intermediate itself");
    }

    #[test]
    fn bad_pem_is_refused() {
        let ca = LocalCa::generate("td").unwrap();
        let other = LocalCa::generate("td").unwrap();
        let key = ca.issuer.key().serialize_pem();
        let cert = ca.root_pem();

        let err = LocalCa::from_pem("garbage", &key).unwrap_err();
        assert!(matches!(err, CaError::BadPem(_)), "{err}");
        let err = LocalCa::from_pem(&format!("{cert}{cert}"), &key).unwrap_err();
        assert!(matches!(err, CaError::BadPem(_)), "{err}");
        let err = LocalCa::from_pem(&cert, "garbage").unwrap_err();
        assert!(matches!(err, CaError::BadPem(_)), "{err}");
        let err = LocalCa::from_pem(&cert, &other.issuer.key().serialize_pem()).unwrap_err();
        assert!(matches!(err, CaError::InvalidRoot(_)), "{err}");

        // A leaf is not a root.
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::default().self_signed(&leaf_key).unwrap();
        let err = LocalCa::from_pem(&leaf.pem(), &leaf_key.serialize_pem()).unwrap_err();
        assert!(matches!(err, CaError::InvalidRoot(_)), "{err}");

        // A key in the certificate file is never echoed into chains.
        let loaded = LocalCa::from_pem(&format!("{key}{cert}"), &key).unwrap();
        assert_eq!(loaded.root_pem(), cert);

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = LocalCa::load(&missing, &missing).unwrap_err();
        assert!(
            matches!(&err, CaError::Io { path, .. } if path == &missing),
            "{err}"
        );
    }
}
