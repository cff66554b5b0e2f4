//! TLS for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, mutual
//! authentication by SPIFFE identity in the URI SAN, no SNI.
//!
//! The server side requires a client certificate chaining to the mesh root
//! and reports the peer's identity; the client side verifies the chain and
//! then that the server's identity is one of those the destination may have.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::verify::{self, ChainVerifier};
use crate::identity::{Identity, PeerRole, TrustBundle, WorkloadCert};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS configuration could not be built, or a peer was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("building TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate has no SPIFFE identity: {0}")]
    NoIdentity(String),
    #[error("peer did not negotiate ALPN h2")]
    NoH2,
}

/// The crypto provider for every HBONE connection: aws-lc-rs restricted to
/// the TLS 1.3 AES-GCM suites Istio uses.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, cipher_suite};
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

fn root_store(trust: &TrustBundle) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for root in trust.roots.iter() {
        roots.add(root.clone())?;
    }
    Ok(roots)
}

/// The server config for the current certificate of one identity, kept
/// until the certificate (rotation) or the trust anchors change instead of
/// rebuilt per connection.
#[derive(Debug, Default)]
pub struct ServerConfigCache(std::sync::Mutex<Option<CachedServerConfig>>);

type CachedServerConfig = (Arc<WorkloadCert>, u64, Arc<ServerConfig>);

impl ServerConfigCache {
    /// The config for `cert` under `trust`, built now only if either is new.
    pub fn get(
        &self,
        cert: Arc<WorkloadCert>,
        trust: &TrustBundle,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, generation, cfg)) = slot.as_ref() {
            if Arc::ptr_eq(c, &cert) && *generation == trust.generation {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(server_config(&cert, trust)?);
        *slot = Some((cert, trust.generation, cfg.clone()));
        Ok(cfg)
    }
}

/// Server configuration presenting `cert` and requiring a client
/// certificate that chains to `trust`.
pub fn server_config(cert: &WorkloadCert, trust: &TrustBundle) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    // Revocation as in `identity::verify`: the whole chain, unknown status
    // allowed, a CRL past its next update still counts (rustls's defaults
    // but the first).
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(trust)?), provider.clone())
            .with_crls(trust.crls.iter().cloned())
            .allow_unknown_revocation_status()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients never resume (see `client_config`): tickets would be signed,
    // sent and stored for nothing on every handshake.
    config.send_tls13_tickets = 0;
    // After the handshake, records are protected by `tls_conn::TlsConn`.
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Client configuration presenting `cert` and accepting only a server that
/// chains to `trust` and proves one of `expected` identities.
pub fn client_config(
    cert: &WorkloadCert,
    trust: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        chain: ChainVerifier::new(trust),
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    // One config serves every connection to the same identities, and all
    // share the placeholder server name: a resumed session would skip the
    // identity check against whichever peer it reached. Always verify.
    config.resumption = rustls::client::Resumption::disabled();
    // After the handshake, records are protected by `tls_conn::TlsConn`.
    config.enable_secret_extraction = true;
    Ok(config)
}

/// Whether a failed handshake's error is a revoked certificate in the
/// peer's chain.
pub fn revoked(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked
        ))
    )
}

/// The server name handed to rustls: unused for verification (identities
/// are checked instead) and never sent, since SNI is off.
pub fn placeholder_server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, parsed) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::NoIdentity(format!("unparsable certificate: {e}")))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::NoIdentity(format!("bad SAN extension: {e}")))?
        .ok_or_else(|| TlsError::NoIdentity("no SAN extension".into()))?;
    let mut last_err = "no URI SAN".to_string();
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            match uri.parse() {
                Ok(id) => return Ok(id),
                Err(e) => last_err = e.to_string(),
            }
        }
    }
    Err(TlsError::NoIdentity(last_err))
}

/// The identity of the peer of an established connection.
pub fn peer_identity(peer_certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = peer_certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf)
}

/// Verifies a server chain against the mesh roots and revocation lists,
/// then its SPIFFE identity against the destination's expected identities
/// (instead of a DNS name).
struct SpiffeServerVerifier {
    chain: ChainVerifier,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(intermediates.len() + 1);
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        self.chain
            .verify(&chain, PeerRole::Server, now)
            .map_err(verify::to_rustls)?;
        let id = identity_of(end_entity)
            .map_err(|e| rustls::Error::General(format!("server identity: {e}")))?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            let want: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
            Err(rustls::Error::General(format!(
                "server identity {id} is not one of the expected [{}]",
                want.join(", ")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
