//! The running agent: wires configuration, state, identity and the HBONE
//! pool together, and keeps one [`WorkloadProxy`] per local mesh workload
//! in step with the mesh as it changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use crate::hbone::{Pool, PoolConfig};
use crate::identity::{
    CaError, CertManager, CertManagerConfig, CertificateSigner, LocalCa, TrustBundle,
};
use crate::proxy::{ListenerAddrs, Outbound, ProxyContext, ProxySettings, WorkloadProxy};
use crate::state::{State, TunnelProtocol, Workload};
use crate::xds::local::{LocalConfigError, LocalSource};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("mesh configuration: {0}")]
    Mesh(#[from] LocalConfigError),
}

/// The proxies running for local workloads, by uid, with the workload
/// version each was started for.
type Proxies = Mutex<HashMap<String, (Arc<Workload>, WorkloadProxy)>>;

/// A running agent. Dropping it stops it.
pub struct Agent {
    cfg: Config,
    pub state: Arc<State>,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    ctx: ProxyContext,
    proxies: Arc<Proxies>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Agent {
    /// Starts with the CA the configuration names (loaded or generated).
    pub async fn start(cfg: Config) -> Result<Agent, AgentError> {
        let ca = match (&cfg.ca.root_cert, &cfg.ca.root_key) {
            (Some(cert), Some(key)) => LocalCa::load(cert, key)?,
            _ => LocalCa::generate(&cfg.ca.trust_domain)?,
        };
        let trust = ca.trust_bundle();
        Self::start_with_signer(cfg, Arc::new(ca), trust).await
    }

    /// Starts with a given signer and trust bundle.
    pub async fn start_with_signer(
        cfg: Config,
        signer: Arc<dyn CertificateSigner>,
        trust: TrustBundle,
    ) -> Result<Agent, AgentError> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let certs = CertManager::new(
            signer,
            trust,
            CertManagerConfig {
                ttl: cfg.ca.cert_ttl,
                ..Default::default()
            },
        );
        let state = Arc::new(State::default());
        let mut tasks = Vec::new();
        if let Some(path) = &cfg.mesh_file {
            let mut source = LocalSource::new(path.clone(), state.clone(), cfg.mesh_poll_interval);
            source.load_initial()?;
            let mut rx = shutdown_rx.clone();
            tasks.push(tokio::spawn(source.run(async move {
                let _ = rx.wait_for(|s| *s).await;
            })));
        }
        let pool = Pool::new(
            certs.clone(),
            PoolConfig {
                max_streams: cfg.pool.max_streams,
                idle_timeout: cfg.pool.idle_timeout,
                keepalive_interval: cfg.pool.keepalive_interval,
                connect_timeout: cfg.connect_timeout,
                h2: cfg.h2(),
                socket_mark: cfg.socket_mark(),
                ..Default::default()
            },
        );
        let ctx = ProxyContext {
            state: state.clone(),
            certs: certs.clone(),
            pool: pool.clone(),
            settings: Arc::new(ProxySettings {
                hbone_port: cfg.ports.hbone,
                outbound_port: cfg.ports.outbound,
                inbound_plaintext_port: cfg.ports.inbound_plaintext,
                socket_mark: cfg.socket_mark(),
                connect_timeout: cfg.connect_timeout,
                h2: cfg.h2(),
            }),
            shutdown: shutdown_rx,
        };
        let mut agent = Agent {
            cfg,
            state,
            certs,
            pool,
            ctx,
            proxies: Arc::default(),
            shutdown,
            tasks,
        };
        // Listeners are up before start returns; later changes follow.
        let mut changes = agent.state.subscribe();
        reconcile(&agent.ctx, &agent.cfg.node, &agent.proxies).await;
        let (ctx, node, proxies) = (
            agent.ctx.clone(),
            agent.cfg.node.clone(),
            agent.proxies.clone(),
        );
        agent.tasks.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                reconcile(&ctx, &node, &proxies).await;
            }
        }));
        info!(node = %agent.cfg.node, "agent started");
        Ok(agent)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The listener addresses of local workload `uid`, if it is served.
    pub fn listeners(&self, uid: &str) -> Option<ListenerAddrs> {
        lock(&self.proxies).get(uid).map(|(_, p)| p.addrs)
    }

    /// Hands a new connection to workload `uid`'s outbound proxy as if it
    /// had been captured on its way to `dst`, and returns the application's
    /// end. Stands in for capture where there is none (tests, the loopback
    /// demo); with capture, applications simply connect to `dst`.
    pub async fn connect_as(&self, uid: &str, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let source = self
            .state
            .snapshot()
            .workload_by_uid(uid)
            .cloned()
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, format!("no workload {uid}"))
            })?;
        let ip = source.addresses.first().copied().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "workload has no address")
        })?;
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let app = TcpStream::connect(listener.local_addr()?).await?;
        let (captured, peer) = listener.accept().await?;
        captured.set_nodelay(true)?;
        app.set_nodelay(true)?;
        let outbound = Outbound::new(self.ctx.clone(), source);
        tokio::spawn(async move { outbound.proxy(captured, peer, dst).await });
        Ok(app)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts proxies for new or changed local mesh workloads and stops those
/// that left.
async fn reconcile(
    ctx: &ProxyContext,
    node: &str,
    proxies: &Proxies,
) {
    let snap = ctx.state.snapshot();
    let wanted: HashMap<String, Arc<Workload>> = snap
        .local_workloads(node)
        .filter(|w| w.protocol == TunnelProtocol::Hbone)
        .map(|w| (w.uid.clone(), w.clone()))
        .collect();
    let identities: std::collections::HashSet<_> = wanted.values().map(|w| w.identity()).collect();
    let to_start: Vec<Arc<Workload>> = {
        let mut running = lock(proxies);
        running.retain(|uid, (w, _)| {
            let keep = wanted.get(uid).is_some_and(|n| n == w);
            if !keep {
                info!(%uid, "workload left or changed; closing its listeners");
                // Another local workload may share the identity.
                if !identities.contains(&w.identity()) {
                    ctx.certs.forget(&w.identity());
                }
            }
            keep
        });
        wanted
            .values()
            .filter(|w| !running.contains_key(&w.uid))
            .cloned()
            .collect()
    };
    for w in to_start {
        ctx.certs.track(w.identity());
        match WorkloadProxy::start(ctx.clone(), w.clone()).await {
            Ok(p) => {
                lock(proxies).insert(w.uid.clone(), (w, p));
            }
            Err(e) => warn!(uid = %w.uid, error = %e, "cannot open the workload's listeners"),
        }
    }
}
