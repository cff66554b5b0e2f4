//! The reference waypoint: an L7 proxy for tests and the demo.
//!
//! It terminates HBONE with the waypoint workload's identity, reads the
//! HTTP/1.1 or HTTP/2 requests inside each tunnel, applies the mesh's L7 routes for
//! the target service (deny with 403, or pick a weighted subset of its
//! workloads), and carries each request over HBONE to the chosen workload,
//! which sees the waypoint's identity. It is configured from the same
//! mesh as the agents (local YAML or xDS).

mod forward;
mod http;
mod outlier;
mod path;
mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::hbone::server::HandshakeLimits;
use crate::hbone::terminate::{Bound, Serving, Standalone, StartError};
use crate::hbone::{H2Settings, Pool, PoolConfig};
use crate::identity::{CertManager, Identity};
use crate::socket::Sockets;
use crate::state::{State, Workload};

/// Where and how the waypoint runs.
#[derive(Clone, Debug)]
pub struct WaypointConfig {
    /// The mesh workload this waypoint is (its identity and address).
    pub workload_uid: String,
    /// Port to accept HBONE on (default 15008).
    pub hbone_port: u16,
    /// HBONE port of the agents it forwards to.
    pub peer_hbone_port: u16,
    pub connect_timeout: Duration,
    /// Bounds on inbound mTLS handshakes.
    pub handshakes: HandshakeLimits,
    pub h2: H2Settings,
}

impl WaypointConfig {
    pub fn new(workload_uid: impl Into<String>) -> Self {
        WaypointConfig {
            workload_uid: workload_uid.into(),
            hbone_port: crate::hbone::HBONE_PORT,
            peer_hbone_port: crate::hbone::HBONE_PORT,
            connect_timeout: Duration::from_secs(10),
            handshakes: HandshakeLimits::default(),
            h2: H2Settings::default(),
        }
    }
}

/// Why the waypoint could not start.
pub type WaypointError = StartError;

/// One request the waypoint handled.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub src: IpAddr,
    pub src_identity: Identity,
    /// The tunnel's target: a service VIP:port or a workload address.
    pub target: SocketAddr,
    /// `HTTP/1.1` or `HTTP/2`, as the client spoke (and the backend too).
    pub protocol: &'static str,
    pub method: String,
    pub path: String,
    /// The workload chosen (of the last attempt), if the request was
    /// forwarded.
    pub backend: Option<String>,
    /// Attempts made to get a backend's answer (0 when none was tried).
    pub attempts: u32,
    pub status: u16,
    /// Why it got no backend's answer (denying rule, direct response,
    /// fault, timeout, no backend, error), or the last error retried.
    pub reason: Option<String>,
}

/// A running waypoint; dropping it stops it.
pub struct Waypoint {
    /// Where it listens: its workload's first address.
    pub addr: SocketAddr,
    /// Every address it listens on: one per address of its workload (a
    /// dual-stack waypoint is reached in the family its clients dialed).
    pub addrs: Vec<SocketAddr>,
    records: broadcast::Sender<Arc<RequestRecord>>,
    /// Stops the listeners when dropped (before the mesh source below).
    _serving: Serving,
    /// What keeps the mesh current, when the waypoint owns it.
    standalone: Option<Standalone>,
}

/// What every tunnel of the waypoint shares.
pub(crate) struct Shared {
    pub state: Arc<State>,
    pub pool: Pool,
    pub workload: Arc<Workload>,
    pub sockets: Sockets,
    pub cfg: WaypointConfig,
    pub records: broadcast::Sender<Arc<RequestRecord>>,
    /// Endpoints left out for failing.
    outliers: outlier::Outliers,
}

impl Waypoint {
    /// Listens on the waypoint workload's addresses inside `sockets` and
    /// serves until dropped.
    pub async fn start(
        state: Arc<State>,
        certs: Arc<CertManager>,
        pool: Pool,
        sockets: Sockets,
        cfg: WaypointConfig,
    ) -> Result<Waypoint, WaypointError> {
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
        let shared = Arc::new(Shared {
            state,
            pool,
            workload: bound.workload.clone(),
            sockets,
            cfg,
            records: records.clone(),
            outliers: outlier::Outliers::default(),
        });
        let serving = bound.serve("waypoint", Arc::new(http::L7(shared)));
        Ok(Waypoint {
            addr: serving.addrs[0],
            addrs: serving.addrs.clone(),
            records,
            _serving: serving,
            standalone: None,
        })
    }

    /// Starts as the agent would from `cfg`: its CA, its mesh source, its
    /// HBONE settings; the waypoint is mesh workload `uid`, listening in
    /// the current network namespace.
    pub async fn from_config(cfg: &Config, uid: &str) -> Result<Waypoint, WaypointError> {
        let standalone = Standalone::from_config(cfg, true).await?;
        let certs = standalone.certs.clone();
        let state = standalone.state.clone();
        let pool = Pool::new(
            certs.clone(),
            PoolConfig {
                connect_timeout: cfg.connect_timeout,
                h2: cfg.h2(),
                ..Default::default()
            },
        );
        let wcfg = WaypointConfig {
            hbone_port: cfg.ports.hbone,
            peer_hbone_port: cfg.ports.hbone,
            connect_timeout: cfg.connect_timeout,
            handshakes: cfg.handshakes.limits(),
            h2: cfg.h2(),
            ..WaypointConfig::new(uid)
        };
        let mut wp = Waypoint::start(state, certs, pool, Sockets::Host, wcfg).await?;
        // The sources stop with the waypoint.
        wp.standalone = Some(standalone);
        Ok(wp)
    }

    /// A record of every request handled from now on.
    pub fn requests(&self) -> broadcast::Receiver<Arc<RequestRecord>> {
        self.records.subscribe()
    }
}
