//! Client of the Istio CA: `istio.v1.auth.IstioCertificateService/
//! CreateCertificate` over gRPC and TLS, as istiod serves it on port 15012.
//!
//! A request carries the PEM CSR and the wanted lifetime in seconds, with a
//! bearer service-account token and the `ClusterID` header; the answer is a
//! list of PEM strings, leaf first and root last. [`IstioCaClient`] is a
//! [`CertificateSigner`], so the [`CertManager`](super::CertManager) handles
//! caching, renewal and retries; this module only speaks the protocol and
//! turns failures into [`CaError`]s that say what went wrong and where.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambient_proto::ca::IstioCertificateRequest;
use ambient_proto::tonic::metadata::AsciiMetadataValue;
use ambient_proto::tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use ambient_proto::tonic::{Code, Request, Status};
use http::Uri;
use tracing::{debug, info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{CaError, CertificateSigner, Identity, SignFuture};

/// Header naming the cluster whose API server issued the token; gRPC
/// metadata keys are lower case on the wire.
const CLUSTER_ID_HEADER: &str = "clusterid";

/// Where and how to reach the Istio CA.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// E.g. `https://istiod.istio-system.svc:15012`; without a scheme,
    /// `https://` is assumed (Istio's `CA_ADDR` usually has none).
    pub address: String,
    /// PEM root(s) that signed the CA's serving certificate.
    pub root_cert: PathBuf,
    /// TLS name to verify; defaults to the host of `address`.
    pub server_name: Option<String>,
    /// Bearer token file, re-read on every request: projected
    /// service-account tokens rotate.
    pub token_path: Option<PathBuf>,
    /// Sent as the `ClusterID` header (Istio's default is `Kubernetes`).
    pub cluster_id: String,
    /// Limit on one signing request, connecting included.
    pub request_timeout: Duration,
}

/// A [`CertificateSigner`] asking the Istio CA over gRPC.
pub struct IstioCaClient {
    /// The address as configured, for error messages.
    address: String,
    server_name: String,
    endpoint: Endpoint,
    /// The root file istiod's serving certificate must chain to: read
    /// again before each signing request, so a rotated istiod root is
    /// followed without a restart (as ztunnel does).
    root_cert: PathBuf,
    request_timeout: Duration,
    /// Created on first use (a channel spawns its worker task, which needs
    /// a Tokio runtime that the constructor may not run in), and again
    /// when the root file's content changes: (that content, the channel).
    channel: Mutex<Option<(String, Channel)>>,
    token_path: Option<PathBuf>,
    cluster_id: AsciiMetadataValue,
    timeout: Duration,
}

impl fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field("token_path", &self.token_path)
            .field("cluster_id", &self.cluster_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl IstioCaClient {
    /// Checks the configuration and reads the root; no connection is made
    /// until the first signing request.
    pub fn new(cfg: IstioCaConfig) -> Result<Self, CaError> {
        let uri = https_uri(&cfg.address)?;
        let server_name = match cfg.server_name {
            Some(name) => name,
            None => uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or_else(|| config(&cfg.address, "no host"))?,
        };
        if cfg.request_timeout.is_zero() {
            return Err(CaError::Config("request timeout is zero".into()));
        }
        let cluster_id = AsciiMetadataValue::try_from(cfg.cluster_id.as_str()).map_err(|_| {
            CaError::Config(format!(
                "cluster id {:?} is not a valid header value",
                cfg.cluster_id
            ))
        })?;

        let root = read_root(&cfg.root_cert)?;
        let endpoint = Endpoint::from(uri)
            .connect_timeout(cfg.request_timeout)
            .timeout(cfg.request_timeout);
        // Checked now, so a bad setting fails at start.
        tls_endpoint(&endpoint, &root, &server_name, cfg.request_timeout)
            .map_err(|e| config(&cfg.address, &format!("TLS: {}", error_chain(&e))))?;

        Ok(IstioCaClient {
            address: cfg.address,
            server_name,
            endpoint,
            root_cert: cfg.root_cert,
            request_timeout: cfg.request_timeout,
            channel: Mutex::new(None),
            token_path: cfg.token_path,
            cluster_id,
            timeout: cfg.request_timeout,
        })
    }

    /// One `CreateCertificate` call, returning the chain as single PEM
    /// certificates.
    async fn create_certificate(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let mut request = Request::new(IstioCertificateRequest {
            csr: csr_pem.to_string(),
            // Whole seconds; a sub-second ttl must not become 0, which Istio
            // reads as "use your default".
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
            // The agent asks on behalf of its pods; istiod signs the token's
            // own identity unless another is named here.
            metadata: Some(impersonate(identity)),
        });
        if let Some(path) = &self.token_path {
            request
                .metadata_mut()
                .insert("authorization", bearer(path).await?);
        }
        request
            .metadata_mut()
            .insert(CLUSTER_ID_HEADER, self.cluster_id.clone());

        let channel = self.channel()?;
        let response = IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map_err(|status| self.status_error(&status))?;
        // `root_cert`, when a CA fills it, is not needed: peers are verified
        // against the configured trust bundle.
        split_chain(&response.into_inner().cert_chain)
    }

    fn status_error(&self, status: &Status) -> CaError {
        let code = status.code();
        let detail = describe(status);
        match code {
            Code::Unauthenticated | Code::PermissionDenied => {
                let token = match &self.token_path {
                    Some(path) => format!("token file {}", path.display()),
                    None => "no token configured".to_string(),
                };
                CaError::Refused(format!(
                    "token refused by {} ({token}): {code:?}: {detail}",
                    self.address
                ))
            }
            // Transport failures (connect, TLS, timeouts) surface as these:
            // worth retrying later.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::ResourceExhausted => {
                CaError::Unavailable(format!("{}: {code:?}: {detail}", self.address))
            }
            _ => CaError::Signing(format!("{}: {code:?}: {detail}", self.address)),
        }
    }
}

impl CertificateSigner for IstioCaClient {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> SignFuture<'a> {
        Box::pin(async move {
            debug!(%identity, address = %self.address, "requesting a certificate from the Istio CA");
            // The endpoint's own timeouts do not cover everything (e.g. a
            // reconnect queued behind another); this bounds the whole call.
            match tokio::time::timeout(
                self.timeout,
                self.create_certificate(identity, csr_pem, ttl),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(CaError::Unavailable(format!(
                    "{}: no answer within {:?}",
                    self.address, self.timeout
                ))),
            }
        })
    }
}

/// `address` as an `https` URI: without a scheme `https://` is assumed;
/// anything else is refused, since tonic would speak plaintext to `http`.
fn https_uri(address: &str) -> Result<Uri, CaError> {
    let full = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let uri: Uri = full
        .parse()
        .map_err(|e: http::uri::InvalidUri| config(address, &e.to_string()))?;
    if uri.scheme_str() != Some("https") {
        return Err(config(address, "the scheme must be https"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(config(address, "no host"));
    }
    Ok(uri)
}

fn config(address: &str, why: &str) -> CaError {
    CaError::Config(format!("CA address {address:?}: {why}"))
}

fn io_error(path: &Path, source: io::Error) -> CaError {
    CaError::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// The root file's text, once it is known to hold at least one certificate.
/// `endpoint` over TLS trusting `root` (PEM) for `server_name`.
fn tls_endpoint(
    endpoint: &Endpoint,
    root: &str,
    server_name: &str,
    timeout: Duration,
) -> Result<Endpoint, ambient_proto::tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root))
        .domain_name(server_name.to_string())
        .timeout(timeout);
    endpoint.clone().tls_config(tls)
}

impl IstioCaClient {
    /// The channel to the CA under the root file's current content; a root
    /// file that cannot be read now keeps the channel made under the last
    /// good one.
    fn channel(&self) -> Result<Channel, CaError> {
        let mut slot = self.channel.lock().unwrap_or_else(|e| e.into_inner());
        let root = match (read_root(&self.root_cert), slot.as_ref()) {
            (Ok(root), _) => root,
            (Err(e), Some((_, channel))) => {
                warn!(error = %e, "CA root file unusable; keeping the one read before");
                return Ok(channel.clone());
            }
            (Err(e), None) => return Err(e),
        };
        if let Some((seen, channel)) = slot.as_ref() {
            if *seen == root {
                return Ok(channel.clone());
            }
        }
        let endpoint = tls_endpoint(
            &self.endpoint,
            &root,
            &self.server_name,
            self.request_timeout,
        )
        .map_err(|e| config(&self.address, &format!("TLS: {}", error_chain(&e))))?;
        if slot.is_some() {
            info!(path = %self.root_cert.display(), "CA root changed; reconnecting under it");
        }
        let channel = endpoint.connect_lazy();
        *slot = Some((root, channel.clone()));
        Ok(channel)
    }
}

fn read_root(path: &Path) -> Result<String, CaError> {
    let pem = std::fs::read_to_string(path).map_err(|e| {
        io_error(
            path,
            io::Error::new(e.kind(), format!("reading the CA root: {e}")),
        )
    })?;
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::BadPem(format!("CA root {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(CaError::BadPem(format!(
            "CA root {}: no CERTIFICATE block",
            path.display()
        )));
    }
    Ok(pem)
}

/// The `authorization` header from the token file at `path`.
async fn bearer(path: &Path) -> Result<AsciiMetadataValue, CaError> {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        io_error(
            path,
            io::Error::new(e.kind(), format!("reading the CA token: {e}")),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io_error(
            path,
            io::Error::new(io::ErrorKind::InvalidData, "the CA token file is empty"),
        ));
    }
    // The token itself never goes into an error message.
    let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
        io_error(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                "the CA token holds characters not allowed in a header",
            ),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The status message, or the code's description when there is none, with
/// the causes behind it.
fn describe(status: &Status) -> String {
    let message = if status.message().is_empty() {
        status.code().description().to_string()
    } else {
        status.message().to_string()
    };
    with_causes(message, std::error::Error::source(status))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `message` followed by the causes it does not already say: transport
/// errors often repeat their source's text.
fn with_causes(
    mut message: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

/// The CA's `cert_chain` as one PEM certificate per element, in order: an
/// element may hold several PEM blocks (Istio sends intermediates that
/// way), and each block must decode to an X.509 certificate.
fn split_chain(elements: &[String]) -> Result<Vec<String>, CaError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut chain = Vec::new();
    for (i, element) in elements.iter().enumerate() {
        let mut rest = element.as_str();
        let before = chain.len();
        while let Some(start) = rest.find(BEGIN) {
            let len = rest[start..].find(END).ok_or_else(|| {
                CaError::BadChain(format!("chain element {i}: unterminated PEM block"))
            })? + END.len();
            let block = format!("{}\n", &rest[start..start + len]);
            check_certificate(&block)
                .map_err(|why| CaError::BadChain(format!("chain element {i}: {why}")))?;
            chain.push(block);
            rest = &rest[start + len..];
        }
        if chain.len() == before {
            return Err(CaError::BadChain(format!(
                "chain element {i} holds no PEM certificate"
            )));
        }
    }
    if chain.is_empty() {
        return Err(CaError::BadChain(
            "the CA answered with an empty certificate chain".into(),
        ));
    }
    Ok(chain)
}

/// Whether one PEM block is one well-formed X.509 certificate.
fn check_certificate(block: &str) -> Result<(), String> {
    let der = match rustls_pemfile::certs(&mut block.as_bytes()).next() {
        Some(Ok(der)) => der,
        Some(Err(e)) => return Err(format!("bad PEM: {e}")),
        None => return Err("bad PEM block".into()),
    };
    X509Certificate::from_der(&der)
        .map(|_| ())
        .map_err(|e| format!("unparsable certificate: {e}"))
}

/// Request metadata naming the identity the agent asks for.
fn impersonate(identity: &Identity) -> ambient_proto::prost_types::Struct {
    use ambient_proto::prost_types::{value::Kind, Struct, Value};
    let value = Value {
        kind: Some(Kind::StringValue(identity.to_uri())),
    };
    Struct {
        fields: [("ImpersonatedIdentity".to_string(), value)].into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    fn root_file(dir: &Path) -> PathBuf {
        let path = dir.join("root.pem");
        let ca = LocalCa::generate("td").unwrap();
        std::fs::write(&path, ca.root_pem()).unwrap();
        path
    }

    fn cfg(dir: &Path, address: &str) -> IstioCaConfig {
        IstioCaConfig {
            address: address.into(),
            root_cert: root_file(dir),
            server_name: None,
            token_path: None,
            cluster_id: "Kubernetes".into(),
            request_timeout: Duration::from_secs(2),
        }
    }

    fn pem() -> String {
        LocalCa::generate("td").unwrap().root_pem()
    }

    #[test]
    fn address_and_server_name() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            IstioCaClient::new(cfg(dir.path(), "https://istiod.istio-system.svc:15012")).unwrap();
        assert_eq!(c.server_name, "istiod.istio-system.svc");

        // Istio's CA_ADDR usually has no scheme.
        let c = IstioCaClient::new(cfg(dir.path(), "istiod.istio-system.svc:15012")).unwrap();
        assert_eq!(c.server_name, "istiod.istio-system.svc");
        assert_eq!(c.endpoint.uri().scheme_str(), Some("https"));

        let mut named = cfg(dir.path(), "https://10.0.0.1:15012");
        named.server_name = Some("istiod.istio-system.svc".into());
        let c = IstioCaClient::new(named).unwrap();
        assert_eq!(c.server_name, "istiod.istio-system.svc");

        for bad in ["http://istiod:15012", "https://", "https://bad host:1"] {
            let err = IstioCaClient::new(cfg(dir.path(), bad)).unwrap_err();
            assert!(
                matches!(&err, CaError::Config(m) if m.contains(bad)),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let address = "https://istiod:15012";

        let mut c = cfg(dir.path(), address);
        c.root_cert = dir.path().join("missing.pem");
        let err = IstioCaClient::new(c).unwrap_err();
        assert!(
            matches!(&err, CaError::Io { path, .. } if path.ends_with("missing.pem")),
            "{err}"
        );
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let mut c = cfg(dir.path(), address);
        std::fs::write(dir.path().join("junk.pem"), "junk").unwrap();
        c.root_cert = dir.path().join("junk.pem");
        let err = IstioCaClient::new(c).unwrap_err();
        assert!(
            matches!(&err, CaError::BadPem(m) if m.contains("junk.pem")),
            "{err}"
        );

        let mut c = cfg(dir.path(), address);
        c.cluster_id = "bad\nid".into();
        let err = IstioCaClient::new(c).unwrap_err();
        assert!(matches!(err, CaError::Config(_)), "{err}");

        let mut c = cfg(dir.path(), address);
        c.request_timeout = Duration::ZERO;
        let err = IstioCaClient::new(c).unwrap_err();
        assert!(matches!(err, CaError::Config(_)), "{err}");
    }

    #[test]
    fn chains_are_split_into_single_certificates() {
        let (a, b, c) = (pem(), pem(), pem());
        let chain = split_chain(&[a.clone(), format!("{b}\n{c}")]).unwrap();
        assert_eq!(chain, [a.clone(), b, c]);
        // CRLF line ends and text around the blocks are tolerated.
        let crlf = a.replace('\n', "\r\n");
        let chain = split_chain(&[format!("leaf:\r\n{crlf}")]).unwrap();
        assert_eq!(chain.len(), 1);
    }

    #[test]
    fn unusable_chains_are_bad_chains() {
        let good = pem();
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let not_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        let cases: Vec<Vec<String>> = vec![
            vec![],
            vec![String::new()],
            vec!["not a certificate".into()],
            vec![good.clone(), String::new()],
            vec![good.clone(), garbage.into()],
            vec![not_base64.into()],
            vec![unterminated.into()],
        ];
        for case in cases {
            let err = split_chain(&case).unwrap_err();
            assert!(matches!(err, CaError::BadChain(_)), "{case:?}: {err}");
        }
    }

    #[test]
    fn statuses_map_to_errors_naming_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let address = "https://istiod.istio-system.svc:15012";
        let mut c = cfg(dir.path(), address);
        c.token_path = Some(dir.path().join("token"));
        let client = IstioCaClient::new(c).unwrap();

        for code in [Code::Unauthenticated, Code::PermissionDenied] {
            let err = client.status_error(&Status::new(code, "authentication failed"));
            let text = err.to_string();
            assert!(matches!(err, CaError::Refused(_)), "{text}");
            assert!(
                text.contains("token refused by") && text.contains(address),
                "{text}"
            );
            assert!(text.contains("authentication failed"), "{text}");
            assert!(text.contains("token"), "{text}");
        }
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            let err = client.status_error(&Status::new(code, ""));
            assert!(
                matches!(&err, CaError::Unavailable(m) if m.contains(address)),
                "{err}"
            );
        }
        let err = client.status_error(&Status::internal("boom"));
        assert!(
            matches!(&err, CaError::Signing(m) if m.contains(address) && m.contains("boom")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn token_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("istio-token");
        let err = bearer(&path).await.unwrap_err();
        assert!(
            matches!(&err, CaError::Io { path: p, .. } if p == &path),
            "{err}"
        );
        assert!(err.to_string().contains("istio-token"), "{err}");

        std::fs::write(&path, " \n").unwrap();
        let err = bearer(&path).await.unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");

        std::fs::write(&path, "secret\u{7f}").unwrap();
        let err = bearer(&path).await.unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");

        // Surrounding whitespace (a trailing newline) is not part of it.
        std::fs::write(&path, "abc.def\n").unwrap();
        let value = bearer(&path).await.unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer abc.def");
        assert!(value.is_sensitive());
    }

    #[tokio::test]
    async fn unreachable_ca_is_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        // A port nobody listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("https://127.0.0.1:{port}");
        let client = IstioCaClient::new(cfg(dir.path(), &address)).unwrap();
        let id = Identity::new("td", "ns", "sa");
        let err = client
            .sign(&id, "csr", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CaError::Unavailable(m) if m.contains(&address)),
            "{err}"
        );

        // A missing token is reported before anything is sent.
        let mut c = cfg(dir.path(), &address);
        c.token_path = Some(dir.path().join("no-token"));
        let client = IstioCaClient::new(c).unwrap();
        let err = client
            .sign(&id, "csr", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no-token"), "{err}");
    }
}
