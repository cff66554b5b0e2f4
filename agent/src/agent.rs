//! The running agent: wires configuration, state, identity and the HBONE
//! pool together, and keeps one [`WorkloadProxy`] per local mesh workload
//! in step with the mesh as it changes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::capture::nft::NftCapture;
use crate::capture::{Backend, CaptureError, CaptureSpec, Enrollment};
use crate::config::Config;
use crate::hbone::{Pool, PoolConfig};
use crate::identity::{
    CaError, CertManager, CertManagerConfig, CertificateSigner, LocalCa, TrustBundle,
};
use crate::proxy::record::ConnectionRecord;
use crate::proxy::{ListenerAddrs, Outbound, ProxyContext, ProxySettings, WorkloadProxy};
use crate::socket::Sockets;
use crate::state::{State, TunnelProtocol, Workload};
use crate::xds::local::{LocalConfigError, LocalSource};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("mesh configuration: {0}")]
    Mesh(#[from] LocalConfigError),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
}

/// A local workload being served.
struct Local {
    /// The version of the workload the proxy was started for.
    workload: Arc<Workload>,
    proxy: WorkloadProxy,
    /// Its namespace and capture, when it has a namespace of its own.
    enrollment: Option<Enrollment>,
}

/// The local workloads being served, by uid.
type Proxies = Mutex<HashMap<String, Local>>;

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
        // Capture comes off every namespace now, not whenever the aborted
        // tasks happen to be dropped.
        let locals = std::mem::take(&mut *lock(&self.proxies));
        drop(locals);
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
        let backend = Backend::load(cfg.capture).await?;
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
            records: tokio::sync::broadcast::channel(1024).0,
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
        reconcile(&agent.ctx, &agent.cfg, &backend, &agent.proxies).await;
        let (ctx, cfg, proxies) = (agent.ctx.clone(), agent.cfg.clone(), agent.proxies.clone());
        agent.tasks.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                reconcile(&ctx, &cfg, &backend, &proxies).await;
            }
        }));
        info!(node = %agent.cfg.node, "agent started");
        Ok(agent)
    }

    /// A stream of records of finished connections (see [`ConnectionRecord`]).
    pub fn connections(&self) -> tokio::sync::broadcast::Receiver<Arc<ConnectionRecord>> {
        self.ctx.records.subscribe()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The listener addresses of local workload `uid`, if it is served.
    pub fn listeners(&self, uid: &str) -> Option<ListenerAddrs> {
        lock(&self.proxies).get(uid).map(|l| l.proxy.addrs)
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
        let outbound = Outbound::new(self.ctx.clone(), source, Sockets::Host);
        tokio::spawn(async move { outbound.proxy(captured, peer, dst).await });
        Ok(app)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts proxies for new or changed local mesh workloads and stops those
/// that left.
async fn reconcile(ctx: &ProxyContext, cfg: &Config, backend: &Backend, proxies: &Proxies) {
    let snap = ctx.state.snapshot();
    let wanted: HashMap<String, Arc<Workload>> = snap
        .local_workloads(&cfg.node)
        .filter(|w| w.protocol == TunnelProtocol::Hbone)
        .map(|w| (w.uid.clone(), w.clone()))
        .collect();
    let identities: HashSet<_> = wanted.values().map(|w| w.identity()).collect();
    let (leaving, to_start): (Vec<Local>, Vec<Arc<Workload>>) = {
        let mut running = lock(proxies);
        let gone: Vec<String> = running
            .iter()
            .filter(|(uid, l)| wanted.get(*uid) != Some(&l.workload))
            .map(|(uid, _)| uid.clone())
            .collect();
        let leaving = gone.iter().filter_map(|uid| running.remove(uid)).collect();
        let to_start = wanted
            .values()
            .filter(|w| !running.contains_key(&w.uid))
            .cloned()
            .collect();
        (leaving, to_start)
    };
    for l in leaving {
        info!(uid = %l.workload.uid, "workload left or changed; releasing it");
        // Another local workload may share the identity.
        if !identities.contains(&l.workload.identity()) {
            ctx.certs.forget(&l.workload.identity());
        }
        // Stop redirecting before the listeners close.
        if let Some(e) = l.enrollment {
            e.release().await;
        }
    }
    for w in to_start {
        ctx.certs.track(w.identity());
        match start_local(ctx, cfg, backend, w.clone()).await {
            Ok(l) => {
                lock(proxies).insert(w.uid.clone(), l);
            }
            Err(e) => warn!(uid = %w.uid, error = %e, "cannot serve the workload"),
        }
    }
}

/// Opens a workload's listeners and, when it has its own namespace,
/// enrolls it: listeners inside the namespace first, then capture.
async fn start_local(
    ctx: &ProxyContext,
    cfg: &Config,
    backend: &Backend,
    w: Arc<Workload>,
) -> Result<Local, String> {
    let Some(path) = &w.netns else {
        let proxy = WorkloadProxy::start(ctx.clone(), w.clone(), Sockets::Host)
            .await
            .map_err(|e| format!("opening listeners: {e}"))?;
        return Ok(Local {
            workload: w,
            proxy,
            enrollment: None,
        });
    };
    let mut enrollment = Enrollment::open(path).await.map_err(|e| e.to_string())?;
    let proxy = WorkloadProxy::start(ctx.clone(), w.clone(), enrollment.sockets())
        .await
        .map_err(|e| format!("opening listeners in {}: {e}", path.display()))?;
    let spec = CaptureSpec {
        rules: NftCapture {
            socket_mark: cfg.socket_mark,
            outbound_port: cfg.ports.outbound,
            inbound_plaintext_port: cfg.ports.inbound_plaintext,
            hbone_port: cfg.ports.hbone,
            redirect: true,
        },
        addresses: w.addresses.clone(),
        cgroup: w.cgroup.clone(),
        interface: cfg.pod_interface.clone(),
    };
    enrollment
        .capture(backend, spec)
        .await
        .map_err(|e| e.to_string())?;
    info!(uid = %w.uid, netns = %path.display(), "workload enrolled");
    Ok(Local {
        workload: w,
        proxy,
        enrollment: Some(enrollment),
    })
}
