//! Inbound HBONE (15008): terminates mTLS with the destination workload's
//! certificate, accepts CONNECT streams addressed to that workload, and
//! joins each to a TCP connection to the application.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::StatusCode;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn, Instrument};

use super::{orig_dst::original_dst, Accept, ProxyContext};
use crate::hbone::server::{self, ConnectRequest, ConnectionInfo, Handler, Responder};
use crate::hbone::{self, tls};
use crate::identity::WorkloadCert;
use crate::state::Workload;

/// The HBONE server of one local workload.
pub struct Inbound {
    ctx: ProxyContext,
    workload: Arc<Workload>,
    /// The TLS config for the current certificate, rebuilt on rotation.
    tls: Mutex<Option<(Arc<WorkloadCert>, Arc<ServerConfig>)>>,
}

impl Accept for Inbound {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = match original_dst(&stream) {
            Ok(a) => a,
            Err(e) => {
                warn!(%peer, error = %e, "no destination address; closing");
                return;
            }
        };
        let span = tracing::info_span!("inbound", src = %peer, dst = %local);
        if let Err(e) = self
            .clone()
            .serve_tls(stream, peer, local)
            .instrument(span.clone())
            .await
        {
            warn!(parent: &span, error = %e, "HBONE connection refused");
        }
    }
}

impl Inbound {
    pub fn new(ctx: ProxyContext, workload: Arc<Workload>) -> Self {
        Inbound {
            ctx,
            workload,
            tls: Mutex::new(None),
        }
    }

    async fn server_config(&self) -> Result<Arc<ServerConfig>, InboundError> {
        let cert = self.ctx.certs.fetch(&self.workload.identity()).await?;
        let mut slot = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((c, cfg)) = slot.as_ref() {
            if Arc::ptr_eq(c, &cert) {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(tls::server_config(&cert, self.ctx.certs.trust_bundle())?);
        *slot = Some((cert, cfg.clone()));
        Ok(cfg)
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), InboundError> {
        let cfg = self.server_config().await?;
        let handshake = TlsAcceptor::from(cfg).accept(stream);
        let tls = tokio::time::timeout(self.ctx.settings.connect_timeout, handshake)
            .await
            .map_err(|_| InboundError::HandshakeTimeout)?
            .map_err(InboundError::Handshake)?;
        let (_, conn) = tls.get_ref();
        if conn.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(tls::TlsError::NoH2.into());
        }
        let peer_identity = tls::peer_identity(conn.peer_certificates())?;
        let info = ConnectionInfo {
            peer_identity,
            peer_addr: peer,
            local_addr: local,
        };
        let settings = self.ctx.settings.h2;
        let shutdown = self.ctx.shutdown.clone();
        server::serve(tls, info, &settings, self, shutdown).await?;
        Ok(())
    }
}

impl Handler for Inbound {
    async fn handle(&self, req: ConnectRequest, responder: Responder) {
        let src = req.forwarded_for.unwrap_or(req.peer_addr.ip());
        let span = tracing::info_span!("connect", %src, src_id = %req.peer_identity, dst = %req.target, dst_id = %self.workload.identity());
        async move {
            // The tunnel may only reach the workload it was sent to.
            if !self.workload.addresses.contains(&req.target.ip()) {
                warn!("target is not an address of this workload; 400");
                return responder.refuse(StatusCode::BAD_REQUEST);
            }
            let start = Instant::now();
            let connect = hbone::pool::connect_tcp(req.target, None, self.ctx.settings.socket_mark);
            let upstream =
                match tokio::time::timeout(self.ctx.settings.connect_timeout, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        warn!(error = %e, "target unreachable; 503");
                        return responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    Err(_) => {
                        warn!("target connect timed out; 503");
                        return responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                    }
                };
            let tunnel = match responder.accept() {
                Ok(t) => t,
                Err(e) => return warn!(error = %e, "client went away"),
            };
            let elapsed_ms = || start.elapsed().as_millis() as u64;
            match hbone::copy_bidirectional(tunnel, upstream).await {
                Ok(t) => info!(
                    received = t.from_stream,
                    sent = t.to_stream,
                    elapsed_ms = elapsed_ms(),
                    "connection complete"
                ),
                Err(e) => warn!(error = %e, elapsed_ms = elapsed_ms(), "connection failed"),
            }
        }
        .instrument(span)
        .await
    }
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("certificate: {0}")]
    Certificate(#[from] crate::identity::CaError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}
