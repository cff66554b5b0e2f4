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

use tokio::sync::broadcast;

use crate::config::Config;
use crate::hbone::server::HandshakeLimits;
use crate::hbone::terminate::{Bound, Serving, Standalone, StartError};
use crate::hbone::H2Settings;
use crate::identity::{CertManager, Identity};
use crate::socket::Sockets;
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
pub type GatewayError = StartError;

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
    /// Stops the listeners when dropped (before the mesh source below).
    _serving: Serving,
    /// What keeps the mesh current, when the gateway owns it.
    standalone: Option<Standalone>,
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
        let settings = (cfg.h2, cfg.handshakes);
        let bound = Bound::new(
            &state,
            certs,
            &sockets,
            &cfg.workload_uid,
            cfg.hbone_port,
            settings,
        )
        .await?;
        let records = broadcast::channel(4096).0;
        let splice = Arc::new(splice::Splice {
            state,
            workload: bound.workload.clone(),
            sockets,
            cfg,
            records: records.clone(),
        });
        let serving = bound.serve("gateway", splice);
        Ok(Gateway {
            addrs: serving.addrs.clone(),
            records,
            _serving: serving,
            standalone: None,
        })
    }

    /// Starts as the agent would from `cfg` (its CA, its mesh source, its
    /// HBONE settings), as mesh workload `uid`, listening in the current
    /// network namespace.
    pub async fn from_config(cfg: &Config, uid: &str) -> Result<Gateway, GatewayError> {
        let standalone = Standalone::from_config(cfg, false).await?;
        let gcfg = GatewayConfig {
            hbone_port: cfg.ports.hbone,
            peer_hbone_port: cfg.ports.hbone,
            connect_timeout: cfg.connect_timeout,
            socket_mark: cfg.socket_mark(),
            handshakes: cfg.handshakes.limits(),
            h2: cfg.h2(),
            ..GatewayConfig::new(uid)
        };
        let (state, certs) = (standalone.state.clone(), standalone.certs.clone());
        let mut gw = Gateway::start(state, certs, Sockets::Host, gcfg).await?;
        gw.standalone = Some(standalone);
        Ok(gw)
    }

    /// A record of every stream handled from now on.
    pub fn streams(&self) -> broadcast::Receiver<Arc<StreamRecord>> {
        self.records.subscribe()
    }
}
