//! The east-west gateway: where double HBONE from other networks enters
//! this one (Istio's is an Envoy; this is the same role, same wire).
//!
//! It terminates the outer HBONE tunnel as its own workload's identity,
//! applies the policies that select it to the outer peer, resolves the
//! CONNECT's `service-hostname:port` to one of the service's endpoints on
//! this network (the service's load-balancing rules, from the gateway's
//! place), and splices the stream's bytes to that endpoint's HBONE port.
//! Those bytes are the client's inner TLS: the gateway never sees inside
//! them, and the destination sees the client's own identity.

mod splice;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tracing::{info, Instrument};

use crate::config::{Config, Mode};
use crate::hbone::server::HandshakeLimits;
use crate::hbone::terminate::Terminator;
use crate::hbone::H2Settings;
use crate::identity::{CaError, CertManager, Identity};
use crate::socket::{ListenOpts, Sockets};
use crate::state::State;

/// Where and how the gateway runs.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The mesh workload this gateway is (its identity, addresses and
    /// network).
    pub workload_uid: String,
    /// Port to accept outer HBONE on (Istio's gateways: 15008).
    pub hbone_port: u16,
    /// HBONE port of the endpoints' agents, where inner tunnels go.
    pub peer_hbone_port: u16,
    pub connect_timeout: Duration,
    /// SO_MARK on connections to endpoints.
    pub socket_mark: Option<u32>,
    pub handshakes: HandshakeLimits,
    pub h2: H2Settings,
}

impl GatewayConfig {
    pub fn new(workload_uid: impl Into<String>) -> Self {
        GatewayConfig {
            workload_uid: workload_uid.into(),
            hbone_port: crate::hbone::HBONE_PORT,
            peer_hbone_port: crate::hbone::HBONE_PORT,
            connect_timeout: Duration::from_secs(10),
            socket_mark: None,
            handshakes: HandshakeLimits::default(),
            h2: H2Settings::default(),
        }
    }
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
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

/// One stream the gateway handled.
#[derive(Clone, Debug)]
pub struct StreamRecord {
    /// The outer peer (the client's agent) and the identity it proved.
    pub src: IpAddr,
    pub src_identity: Identity,
    /// The CONNECT's authority.
    pub authority: String,
    /// The endpoint chosen (uid) and where its bytes went.
    pub endpoint: Option<String>,
    pub upstream: Option<SocketAddr>,
    /// 200, or the refusal's status.
    pub status: u16,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// Bytes from the client, and back to it.
    pub sent: u64,
    pub received: u64,
}

/// A running gateway; dropping it stops it.
pub struct Gateway {
    /// Every address it listens on (one per address of its workload).
    pub addrs: Vec<SocketAddr>,
    records: broadcast::Sender<Arc<StreamRecord>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// What keeps the mesh current, when the gateway owns it.
    sources: Vec<tokio::task::JoinHandle<()>>,
    sources_stop: Option<watch::Sender<bool>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(stop) = &self.sources_stop {
            let _ = stop.send(true);
        }
        for t in self.tasks.iter().chain(&self.sources) {
            t.abort();
        }
    }
}

impl Gateway {
    /// Listens on the gateway workload's addresses inside `sockets` and
    /// serves until dropped.
    pub async fn start(
        state: Arc<State>,
        certs: Arc<CertManager>,
        sockets: Sockets,
        cfg: GatewayConfig,
    ) -> Result<Gateway, GatewayError> {
        let workload = state
            .snapshot()
            .workload_by_uid(&cfg.workload_uid)
            .cloned()
            .ok_or_else(|| GatewayError::UnknownWorkload(cfg.workload_uid.clone()))?;
        if workload.addresses.is_empty() {
            return Err(GatewayError::NoAddress(workload.uid.to_string()));
        }
        // Fail now, not at the first connection, if no certificate comes.
        certs.fetch(&workload.identity()).await?;
        certs.track(workload.identity());
        let mut listeners = Vec::new();
        for ip in &workload.addresses {
            let addr = SocketAddr::new(*ip, cfg.hbone_port);
            let listener = sockets
                .listen(addr, ListenOpts::default())
                .await
                .map_err(|e| GatewayError::Listen(addr, e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| GatewayError::Listen(addr, e))?;
            listeners.push((listener, addr));
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let records = broadcast::channel(4096).0;
        let terminator = Arc::new(Terminator::new(
            certs,
            workload.identity(),
            cfg.h2,
            cfg.handshakes,
        ));
        let splice = Arc::new(splice::Splice {
            state,
            workload,
            sockets,
            cfg,
            records: records.clone(),
        });
        let addrs = listeners.iter().map(|(_, a)| *a).collect();
        let tasks = listeners
            .into_iter()
            .map(|(listener, addr)| {
                let span = tracing::info_span!("gateway", uid = %splice.workload.uid, %addr);
                info!(parent: &span, network = splice.workload.network_name(), "east-west gateway listening");
                let accept = terminator
                    .clone()
                    .accept_loop(listener, splice.clone(), shutdown_rx.clone());
                tokio::spawn(accept.instrument(span))
            })
            .collect();
        Ok(Gateway {
            addrs,
            records,
            shutdown,
            tasks,
            sources: Vec::new(),
            sources_stop: None,
        })
    }

    /// Starts as the agent would from `cfg` (its CA, its mesh source, its
    /// HBONE settings), as mesh workload `uid`, listening in the current
    /// network namespace.
    pub async fn from_config(cfg: &Config, uid: &str) -> Result<Gateway, GatewayError> {
        let (signer, trust) = crate::agent::signer_for(cfg)?;
        let certs = CertManager::new(signer, trust.store.clone(), cfg.certificates());
        let state = Arc::new(State::default());
        let (stop, stop_rx) = watch::channel(false);
        let mut sources = Vec::new();
        sources.extend(trust.follow_files());
        crate::agent::follow_mesh(cfg, &state, &stop_rx, &mut sources)?;
        if cfg.mode == Mode::Istio {
            // Wait for the first push: the gateway must find itself in it.
            let mut changes = state.subscribe();
            let _ = tokio::time::timeout(cfg.connect_timeout, changes.changed()).await;
        }
        let gcfg = GatewayConfig {
            hbone_port: cfg.ports.hbone,
            peer_hbone_port: cfg.ports.hbone,
            connect_timeout: cfg.connect_timeout,
            socket_mark: cfg.socket_mark(),
            handshakes: cfg.handshakes.limits(),
            h2: cfg.h2(),
            ..GatewayConfig::new(uid)
        };
        let mut gw = Gateway::start(state, certs, Sockets::Host, gcfg).await?;
        gw.sources = sources;
        gw.sources_stop = Some(stop);
        Ok(gw)
    }

    /// A record of every stream handled from now on.
    pub fn streams(&self) -> broadcast::Receiver<Arc<StreamRecord>> {
        self.records.subscribe()
    }
}
