//! HBONE served as one mesh workload by a process of its own (the
//! waypoint, the east-west gateway) rather than by a node's agent: the
//! listener's accept loop, mTLS as that workload, and each CONNECT handed
//! to a [`Handler`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn, Instrument};

use super::server::Handler;
use super::server::{self, ConnectionError, ConnectionInfo, HandshakeGate, HandshakeLimits};
use super::{tls, H2Settings};
use crate::identity::{CertManager, Identity, PeerRole};

/// Terminates HBONE connections as one identity.
pub struct Terminator {
    certs: Arc<CertManager>,
    identity: Identity,
    h2: H2Settings,
    tls: tls::ServerConfigCache,
    handshakes: HandshakeGate,
}

impl Terminator {
    pub fn new(
        certs: Arc<CertManager>,
        identity: Identity,
        h2: H2Settings,
        handshakes: HandshakeLimits,
    ) -> Self {
        Terminator {
            certs,
            identity,
            h2,
            tls: tls::ServerConfigCache::default(),
            handshakes: HandshakeGate::new(handshakes),
        }
    }

    /// Accepts on `listener` until `shutdown`, each connection served on
    /// a task of its own.
    pub async fn accept_loop<H: Handler>(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Arc<H>,
        shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let (this, handler, shutdown) = (self.clone(), handler.clone(), shutdown.clone());
            tokio::spawn(
                async move {
                    match this.serve(stream, peer, handler, shutdown).await {
                        Ok(()) => {}
                        // The peer went away (e.g. its agent stopped).
                        Err(ConnectionError::H2(e)) if e.is_io() => {
                            debug!(%peer, error = %e, "HBONE connection closed")
                        }
                        Err(e) => {
                            warn!(%peer, error = %e, "HBONE connection refused or failed")
                        }
                    }
                }
                .in_current_span(),
            );
        }
    }

    /// mTLS as our identity (a client of our trust domain only), then
    /// HTTP/2 until the client leaves, `shutdown` fires, or its root is no
    /// longer trusted.
    async fn serve<H: Handler>(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        handler: Arc<H>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), ConnectionError> {
        let local = stream
            .local_addr()
            .map(crate::socket::canonical)
            .unwrap_or(peer);
        let cert = self.certs.fetch(&self.identity).await?;
        let trust = self.certs.trust_bundle();
        let cfg = self.tls.get(cert, &trust)?;
        let td = self.identity.trust_domain();
        let accepted = server::accept_tls(stream, peer.ip(), cfg, &self.handshakes, td).await?;
        let guard =
            self.certs
                .trust()
                .register_peer(accepted.chain, PeerRole::Client, trust.generation);
        let info = ConnectionInfo {
            peer_identity: accepted.peer,
            peer_addr: crate::socket::canonical(peer),
            local_addr: local,
        };
        server::serve(
            accepted.conn,
            info,
            &self.h2,
            handler,
            shutdown,
            guard.untrusted(),
        )
        .await?;
        Ok(())
    }
}
