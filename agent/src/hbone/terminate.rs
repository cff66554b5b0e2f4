//! HBONE served as one mesh workload by a process of its own (the
//! waypoint, the east-west gateway) rather than by a node's agent: its
//! listeners, their accept loops, mTLS as that workload, and each CONNECT
//! handed to a [`Handler`]; and [`Standalone`], the mesh, certificates and
//! sources such a process runs on when started from the agent's
//! configuration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use super::server::Handler;
use super::server::{self, ConnectionError, ConnectionInfo, HandshakeGate, HandshakeLimits};
use super::{tls, H2Settings};
use crate::config::{Config, Mode};
use crate::identity::{CaError, CertManager, Identity, PeerRole};
use crate::socket::{ListenOpts, Sockets};
use crate::state::{State, Workload};

/// Why a workload's own HBONE server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no workload {0:?} in the mesh")]
    UnknownWorkload(String),
    #[error("workload {0:?} has no address")]
    NoAddress(String),
    #[error("certificate: {0}")]
    Certificate(#[from] CaError),
    #[error("listening on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Setup(#[from] crate::agent::AgentError),
}

/// A workload's HBONE listeners, bound, and what serves them.
pub struct Bound {
    pub workload: Arc<Workload>,
    pub terminator: Arc<Terminator>,
    pub listeners: Vec<(TcpListener, SocketAddr)>,
}

impl Bound {
    /// Mesh workload `uid` of `state`, with its certificate in hand and a
    /// listener on `port` of each of its addresses inside `sockets`.
    pub async fn new(
        state: &State,
        certs: Arc<CertManager>,
        sockets: &Sockets,
        uid: &str,
        port: u16,
        (h2, handshakes): (H2Settings, HandshakeLimits),
    ) -> Result<Bound, StartError> {
        let workload = state
            .snapshot()
            .workload_by_uid(uid)
            .cloned()
            .ok_or_else(|| StartError::UnknownWorkload(uid.to_string()))?;
        if workload.addresses.is_empty() {
            return Err(StartError::NoAddress(workload.uid.to_string()));
        }
        // Fail now, not at the first connection, if no certificate comes.
        certs.fetch(&workload.identity()).await?;
        certs.track(workload.identity());
        let mut listeners = Vec::new();
        for ip in &workload.addresses {
            let addr = SocketAddr::new(*ip, port);
            let listener = sockets
                .listen(addr, ListenOpts::default())
                .await
                .map_err(|e| StartError::Listen(addr, e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| StartError::Listen(addr, e))?;
            listeners.push((listener, addr));
        }
        let terminator = Arc::new(Terminator::new(certs, workload.identity(), h2, handshakes));
        Ok(Bound {
            workload,
            terminator,
            listeners,
        })
    }

    /// Serves every listener with `handler` until the [`Serving`] is
    /// dropped, each in a span naming the `role`, the workload and the
    /// address.
    pub fn serve<H: Handler>(self, role: &'static str, handler: Arc<H>) -> Serving {
        let Bound {
            workload,
            terminator,
            listeners,
        } = self;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let addrs = listeners.iter().map(|(_, a)| *a).collect();
        let tasks = listeners
            .into_iter()
            .map(|(listener, addr)| {
                let span = tracing::info_span!("hbone_server", role, uid = %workload.uid, %addr);
                info!(parent: &span, network = workload.network_name(), "listening");
                let accept =
                    terminator
                        .clone()
                        .accept_loop(listener, handler.clone(), shutdown_rx.clone());
                tokio::spawn(accept.instrument(span))
            })
            .collect();
        Serving {
            addrs,
            shutdown,
            tasks,
        }
    }
}

/// Listeners being served; dropping it stops them (open connections are
/// told to drain, the accept loops end).
pub struct Serving {
    pub addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What a waypoint or gateway process started from the agent's
/// configuration runs on: its certificates, the mesh kept current, and
/// the tasks that keep both (stopped when this is dropped).
pub struct Standalone {
    pub certs: Arc<CertManager>,
    pub state: Arc<State>,
    sources: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Standalone {
    /// The agent's CA and mesh source from `cfg` (with a waypoint's routes
    /// when `waypoint`); in Istio mode, once the first push is in (the
    /// process must find itself in it) or the connect timeout has passed.
    pub async fn from_config(cfg: &Config, waypoint: bool) -> Result<Standalone, StartError> {
        let (signer, trust) = crate::agent::signer_for(cfg)?;
        let certs = CertManager::new(signer, trust.store.clone(), cfg.certificates());
        let state = Arc::new(State::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut sources = Vec::new();
        sources.extend(trust.follow_files());
        crate::agent::follow_mesh(cfg, waypoint, &state, &stop_rx, &mut sources)?;
        if cfg.mode == Mode::Istio {
            let mut changes = state.subscribe();
            let _ = tokio::time::timeout(cfg.connect_timeout, changes.changed()).await;
        }
        Ok(Standalone {
            certs,
            state,
            sources,
            stop,
        })
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.sources {
            t.abort();
        }
    }
}

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
