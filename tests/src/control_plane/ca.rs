//! A test Istio CA: `istio.v1.auth.IstioCertificateService` over gRPC and
//! TLS, signing CSRs with a [`LocalCa`] for callers that present one bearer
//! token.
//!
//! Unlike istiod, which signs for the identity its token review yields (or
//! for an `ImpersonatedIdentity` a trusted node agent names), this CA signs
//! for the SPIFFE URI the CSR carries: the test mesh has no Kubernetes API
//! to check tokens against. The TLS serving certificate (DNS name
//! [`TestCa::server_name`]) is signed by a root of its own, as istiod's is
//! signed by a root distinct from the mesh's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_agent::identity::{CaError, CertificateSigner, Identity, LocalCa};
use ambient_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambient_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ambient_proto::tonic::codegen::tokio_stream::wrappers::TcpListenerStream;
use ambient_proto::tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};
use ambient_proto::tonic::{self, Request, Response, Status};
use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The DNS name in the serving certificate, as istiod's.
const SERVER_NAME: &str = "istiod.istio-system.svc";
/// Lifetime given when a request asks for none (istiod's default is 24h).
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long `stop` waits for open connections to wind down before cutting
/// them.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A running (or stopped) test Istio CA.
pub struct TestCa {
    addr: SocketAddr,
    service: Arc<Service>,
    tls_cert: String,
    tls_key: String,
    root_pem: String,
    serving: Option<Serving>,
}

struct Serving {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The gRPC service proper; shared across restarts so counts survive.
struct Service {
    ca: Arc<LocalCa>,
    /// The whole `authorization` value accepted.
    bearer: String,
    requests: AtomicUsize,
    last_cluster_id: Mutex<Option<String>>,
}

impl Drop for TestCa {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.shutdown.send(());
            serving.task.abort();
        }
    }
}

impl TestCa {
    /// Serves IstioCertificateService over TLS on `addr` (port 0 picks
    /// one), signing with `ca`, accepting only `token` as bearer.
    pub async fn start(addr: SocketAddr, ca: Arc<LocalCa>, token: &str) -> anyhow::Result<TestCa> {
        let (root_pem, tls_cert, tls_key) = serving_certificate()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the test CA to {addr}"))?;
        let addr = listener.local_addr()?;
        let mut ca = TestCa {
            addr,
            service: Arc::new(Service {
                ca,
                bearer: format!("Bearer {token}"),
                requests: AtomicUsize::new(0),
                last_cluster_id: Mutex::new(None),
            }),
            tls_cert,
            tls_key,
            root_pem,
            serving: None,
        };
        ca.serve(listener)?;
        Ok(ca)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `https://` address to give a client.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The root to trust for the server's TLS certificate.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// The CA service, for a server that carries it beside others
    /// (istiod's 15012 serves xDS and the CA).
    pub fn service(&self) -> IstioCertificateServiceServer<impl IstioCertificateService> {
        IstioCertificateServiceServer::from_arc(self.service.clone())
    }

    /// The serving certificate and key (signed by [`TestCa::root_pem`]).
    pub fn serving_identity(&self) -> TlsIdentity {
        TlsIdentity::from_pem(&self.tls_cert, &self.tls_key)
    }

    /// The DNS name in the serving certificate.
    pub fn server_name(&self) -> &str {
        SERVER_NAME
    }

    /// `CreateCertificate` calls answered with a certificate.
    pub fn requests(&self) -> usize {
        self.service.requests.load(Ordering::SeqCst)
    }

    /// The `ClusterID` header of the last request that had one.
    pub fn last_cluster_id(&self) -> Option<String> {
        lock(&self.service.last_cluster_id).clone()
    }

    /// Stops serving: the listener closes and open connections are told to
    /// go away (cut after a short grace period).
    pub async fn stop(&mut self) {
        let Some(Serving { shutdown, mut task }) = self.serving.take() else {
            return;
        };
        let _ = shutdown.send(());
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            task.abort();
        }
    }

    /// Serves again on the same address, with the same certificates.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.serving.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("binding the test CA to {} again", self.addr))?;
        self.serve(listener)
    }

    fn serve(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        let tls =
            ServerTlsConfig::new().identity(TlsIdentity::from_pem(&self.tls_cert, &self.tls_key));
        let router = Server::builder()
            .tls_config(tls)
            .context("test CA TLS config")?
            .add_service(IstioCertificateServiceServer::from_arc(
                self.service.clone(),
            ));
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            let stopped = async {
                let _ = signal.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                tracing::warn!(error = %e, "test CA stopped with an error");
            }
        });
        self.serving = Some(Serving { shutdown, task });
        Ok(())
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let headers = request.metadata();
        let authorized = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == self.bearer);
        if !authorized {
            return Err(Status::unauthenticated(
                "authentication failed: bearer token not accepted",
            ));
        }
        if let Some(id) = headers.get("clusterid").and_then(|v| v.to_str().ok()) {
            *lock(&self.last_cluster_id) = Some(id.to_string());
        }

        let request = request.into_inner();
        let identity = csr_identity(&request.csr).map_err(Status::invalid_argument)?;
        // Like istiod, an agent asking for another identity must name it.
        let impersonated = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(ambient_proto::prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            });
        if impersonated.as_deref() != Some(identity.to_uri().as_str()) {
            return Err(Status::permission_denied(format!(
                "ImpersonatedIdentity {impersonated:?} does not name the CSR's identity {identity}"
            )));
        }
        let ttl = u64::try_from(request.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TTL, Duration::from_secs);
        let chain = self
            .ca
            .sign(&identity, &request.csr, ttl)
            .await
            .map_err(|e| match e {
                CaError::Csr(_) | CaError::IdentityMismatch { .. } => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        self.requests.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

/// The identity a CSR asks for: its one URI SAN, a SPIFFE id.
fn csr_identity(csr_pem: &str) -> Result<Identity, String> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| format!("bad CSR: {e}"))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => uri.parse().map_err(|e| format!("CSR SAN: {e}")),
        _ => Err(format!("the CSR must carry one URI SAN, found {uris:?}")),
    }
}

/// A fresh root, and a serving certificate for [`SERVER_NAME`] it signed:
/// (root PEM, certificate PEM, key PEM).
fn serving_certificate() -> anyhow::Result<(String, String, String)> {
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "test istiod root");
    root.distinguished_name = dn;
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key)?;
    let issuer = Issuer::new(root, root_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((root_cert.pem(), cert.pem(), key.serialize_pem()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
