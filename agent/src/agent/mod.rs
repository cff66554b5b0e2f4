//! The running agent: wires configuration, state, identity and the HBONE
//! pool together; its [`reconciler`] keeps one proxy per local mesh
//! workload in step with the mesh and the CNI as they change.

mod reconciler;

use reconciler::Reconciler;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{AdminConfig, AdminServer, MeshReady, Readiness, Sources};
use crate::capture::zds::ZdsClient;
use crate::capture::{Backend, CaptureError};
use crate::config::{Config, Mode};
use crate::hbone::{Pool, PoolConfig};
use crate::identity::istio_ca::{IstioCaClient, IstioCaConfig};
use crate::identity::{trust, CaError, CertManager, CertificateSigner, LocalCa, TrustStore};
use crate::proxy::record::{ConnectionRecord, Reporter};
use crate::proxy::{ListenerAddrs, Outbound, ProxyContext, ProxySettings, ReservedPorts};
use crate::socket::Sockets;
use crate::state::State;
use crate::xds::delta::{XdsClient, XdsConfig};
use crate::xds::local::{LocalConfigError, LocalSource};

/// How often workloads that could not be started are tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// The proxy metadata key (env `ISTIO_META_ISTIO_VERSION`) Istio's images
/// set to the release; ztunnel tags `istio_build` with it.
const ISTIO_VERSION_METADATA: &str = "ISTIO_VERSION";

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error("mesh configuration: {0}")]
    Mesh(#[from] LocalConfigError),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
}

/// A running agent. Dropping it stops it.
pub struct Agent {
    cfg: Config,
    pub state: Arc<State>,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    ctx: ProxyContext,
    reconciler: Arc<Reconciler>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: AdminServer,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.ctx.active.terminate();
        for t in &self.tasks {
            t.abort();
        }
        // Listeners close now, not whenever the aborted tasks happen to be
        // dropped. Capture stays: the pods still belong to the mesh.
        self.reconciler.shut_down();
    }
}

impl Agent {
    /// Starts with the CA the configuration names: the local CA (loaded
    /// or generated) or, in Istio mode, the Istio CA.
    pub async fn start(cfg: Config) -> Result<Agent, AgentError> {
        let (signer, trust) = signer_for(&cfg)?;
        let mut agent = Self::start_with_signer(cfg, signer, trust.store.clone()).await?;
        agent.tasks.extend(trust.follow_files());
        Ok(agent)
    }

    /// Starts with a given signer and trust anchors (a fixed
    /// [`TrustBundle`](crate::identity::TrustBundle) or a live
    /// [`TrustStore`]).
    pub async fn start_with_signer(
        cfg: Config,
        signer: Arc<dyn CertificateSigner>,
        trust: impl Into<Arc<TrustStore>>,
    ) -> Result<Agent, AgentError> {
        let backend = Backend::load(cfg.capture()).await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let certs = CertManager::new(signer, trust, cfg.certificates());
        let state = Arc::new(State::default());
        let mut tasks = Vec::new();
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mesh_ready = follow_mesh(&cfg, false, &state, &shutdown_rx, &mut tasks)?;
        let pool = Pool::new(
            certs.clone(),
            PoolConfig {
                max_streams: cfg.pool.max_streams,
                idle_timeout: cfg.pool.idle_timeout,
                keepalive_interval: cfg.pool.keepalive_interval,
                keepalive_timeout: cfg.pool.keepalive_timeout,
                connect_timeout: cfg.connect_timeout,
                h2: cfg.h2(),
                socket_mark: cfg.socket_mark(),
                tcp_keepalive: cfg.keepalive.socket(),
                streams_per_connection: cfg.pool.streams_per_connection,
                spread: cfg.pool.spread_connections.max(1),
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
                keepalive: cfg.keepalive.socket(),
                limits: cfg.limits.workload(),
                handshakes: cfg.handshakes.limits(),
                h2: cfg.h2(),
                dns: cfg.dns()?,
                reserved_ports: ReservedPorts::new([
                    cfg.ports.outbound,
                    cfg.ports.inbound_plaintext,
                    cfg.ports.hbone,
                    cfg.admin_port,
                    cfg.metrics_port,
                    cfg.readiness_port,
                ]),
            }),
            shutdown: shutdown_rx,
            active: Arc::default(),
            tracker: Arc::default(),
            reporter: Reporter::new(state.clone(), 1024),
            resolver: Arc::new(crate::dns::lookup::Resolver::new(
                cfg.lookup_upstreams()?,
                cfg.dns.timeout,
                cfg.socket_mark(),
            )),
        };
        let istio_version = cfg
            .control_plane
            .proxy_metadata
            .get(ISTIO_VERSION_METADATA)
            .map(String::as_str);
        ctx.reporter.metrics().set_build_tag(istio_version);
        let settings = crate::admin::config_dump::Settings::new(
            &cfg,
            tokio::runtime::Handle::current().metrics().num_workers(),
            istio_version.unwrap_or("unknown"),
        );
        let zds =
            (cfg.mode == Mode::Istio).then(|| ZdsClient::new(cfg.control_plane.cni_socket.clone()));
        let cni_synced = zds.as_ref().map(ZdsClient::synced);
        let reconciler = Arc::new(Reconciler::new(
            ctx.clone(),
            cfg.clone(),
            backend,
            cni_synced,
        ));
        let readiness = Readiness::new(mesh_ready);
        let admin = AdminServer::start(
            AdminConfig::from_config(&cfg),
            Sources {
                node: cfg.node.clone(),
                state: state.clone(),
                certs: certs.clone(),
                pool: pool.clone(),
                metrics: ctx.reporter.metrics().clone(),
                workloads: reconciler.clone(),
                readiness: readiness.clone(),
                shutdown: shutdown.clone(),
                dns: ctx.settings.dns.clone(),
                settings,
            },
        )
        .await;
        // Listeners are up before start returns; later changes follow.
        let mut changes = state.subscribe();
        reconciler.run().await;
        readiness.listeners_started();
        let (r, tracker, st) = (reconciler.clone(), ctx.tracker.clone(), state.clone());
        tasks.push(tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                r.run().await;
                tracker.recheck(&st.snapshot());
            }
        }));
        let r = reconciler.clone();
        tasks.push(tokio::spawn(async move { r.retry(RETRY_INTERVAL).await }));
        tasks.push(tokio::spawn(
            ctx.reporter
                .heap()
                .clone()
                .run(stopped(shutdown.subscribe())),
        ));
        if let Some(zds) = zds {
            let r = reconciler.clone();
            let handler = move |event| {
                let r = r.clone();
                async move { r.on_cni(event).await }
            };
            tasks.push(tokio::spawn(
                zds.run(handler, stopped(ctx.shutdown.clone())),
            ));
        }
        let agent = Agent {
            cfg,
            state,
            certs,
            pool,
            ctx,
            reconciler,
            shutdown,
            tasks,
            admin,
        };
        info!(node = %agent.cfg.node, "agent started");
        Ok(agent)
    }

    /// Drains, then stops: closes every listener (new connections are
    /// refused), sends GOAWAY to HBONE peers, lets connections in flight
    /// finish for at most `deadline`, then exits. Capture stays in the
    /// pods: until an agent serves them again, their TCP is refused.
    /// Returns how many connections were cut at the deadline.
    pub async fn drain(self, deadline: Duration) -> usize {
        info!(?deadline, "draining");
        let _ = self.shutdown.send(true);
        self.reconciler.stop_accepting();
        let active = self.ctx.active.clone();
        let cut = match tokio::time::timeout(deadline, active.idle()).await {
            Ok(()) => 0,
            Err(_) => active.count(),
        };
        if cut > 0 {
            warn!(
                connections = cut,
                "drain deadline reached; closing what is left"
            );
        } else {
            info!("drained");
        }
        drop(self);
        cut
    }

    /// A stream of records of finished connections (see [`ConnectionRecord`]).
    pub fn connections(&self) -> tokio::sync::broadcast::Receiver<Arc<ConnectionRecord>> {
        self.ctx.reporter.subscribe_closed()
    }

    /// The metrics the agent's proxies count into.
    pub fn metrics(&self) -> &Arc<crate::admin::Metrics> {
        self.ctx.reporter.metrics()
    }

    /// The admin, metrics and readiness endpoints.
    pub fn admin(&self) -> &AdminServer {
        &self.admin
    }

    /// Resolves once the agent is told to stop (`POST /quitquitquit`).
    pub async fn stopped(&self) {
        let _ = self.shutdown.subscribe().wait_for(|s| *s).await;
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The local workloads served now, as their proxies know them.
    pub fn served(&self) -> Vec<Arc<crate::state::Workload>> {
        self.reconciler.served()
    }

    /// The listener addresses of local workload `uid`, if it is served.
    pub fn listeners(&self, uid: &str) -> Option<ListenerAddrs> {
        self.reconciler.listeners(uid)
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
        let outbound = Outbound::new(
            self.ctx.clone(),
            source,
            Sockets::Host,
            crate::proxy::limits::Budget::new(self.ctx.settings.limits),
        );
        tokio::spawn(async move { outbound.proxy(captured, peer, dst).await });
        Ok(app)
    }
}

/// How often a trust bundle file is checked for changes.
pub const TRUST_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The trust anchors the configuration names, and the files to follow.
pub struct TrustSetup {
    pub store: Arc<TrustStore>,
    /// Re-read when it changes (Istio mode: the mesh root file; local
    /// mode: `ca.trustBundle`).
    pub follow: Option<PathBuf>,
    /// The CRL file, re-read when it changes.
    pub crl: Option<PathBuf>,
}

impl TrustSetup {
    /// Tasks that keep the store following its files.
    pub fn follow_files(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let roots = self.follow.clone().map(|path| {
            tokio::spawn(trust::watch_file(
                self.store.clone(),
                path,
                TRUST_POLL_INTERVAL,
            ))
        });
        let crl = self.crl.clone().map(|path| {
            tokio::spawn(trust::watch_crl_file(
                self.store.clone(),
                path,
                TRUST_POLL_INTERVAL,
            ))
        });
        roots.into_iter().chain(crl).collect()
    }

    /// Loads the CRL file, if one is configured: unusable is an error (the
    /// agent does not start trusting what it was told to revoke); missing
    /// revokes nothing until it appears.
    fn load_crl(self) -> Result<Self, AgentError> {
        if let Some(path) = &self.crl {
            match trust::read_crls(path) {
                Ok(crls) => {
                    info!(path = %path.display(), crls = crls.len(), "revocation lists loaded");
                    self.store.set_crls(crls);
                }
                Err(CaError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    info!(path = %path.display(), "no revocation list yet; nothing revoked until it appears");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self)
    }
}

/// The certificate signer and trust anchors the configuration names: the
/// local CA (loaded, or generated when no files are given) with its root
/// and `ca.trustBundle`, or the Istio CA with the mesh root file. Either
/// way the roots the CA returns with certificates are trusted too.
pub fn signer_for(cfg: &Config) -> Result<(Arc<dyn CertificateSigner>, TrustSetup), AgentError> {
    Ok(match cfg.mode {
        Mode::Local => {
            let ca = match (&cfg.ca.root_cert, &cfg.ca.root_key) {
                (Some(cert), Some(key)) => {
                    LocalCa::load_with_chain(cert, key, cfg.ca.cert_chain.as_deref())?
                }
                _ => LocalCa::generate(&cfg.ca.trust_domain)?,
            };
            let store = TrustStore::new(ca.trust_bundle().roots.to_vec());
            if let Some(path) = &cfg.ca.trust_bundle {
                store.set_file_roots(trust::read_pem_roots(path)?)?;
            }
            let setup = TrustSetup {
                store,
                follow: cfg.ca.trust_bundle.clone(),
                crl: cfg.crl.clone(),
            };
            (Arc::new(ca), setup.load_crl()?)
        }
        Mode::Istio => {
            let cp = &cfg.control_plane;
            let client = IstioCaClient::new(IstioCaConfig {
                address: cp
                    .ca_address
                    .clone()
                    .unwrap_or_else(|| cp.xds_address.clone()),
                root_cert: cp.root_cert.clone(),
                server_name: cp.ca_server_name.clone().or(cp.server_name.clone()),
                token_path: Some(cp.token_path.clone()),
                cluster_id: cp.cluster_id.clone(),
                request_timeout: cfg.connect_timeout,
            })?;
            let store = TrustStore::new(Vec::new());
            store.set_file_roots(trust::read_pem_roots(&cp.root_cert)?)?;
            let setup = TrustSetup {
                store,
                follow: Some(cp.root_cert.clone()),
                crl: cfg.crl.clone(),
            };
            (Arc::new(client), setup.load_crl()?)
        }
    })
}

/// Keeps `state` following the configured mesh source (the local file, or
/// istiod over xDS, with a waypoint's routes when `waypoint`) until
/// `shutdown`; the local file is loaded before this returns. Says how readiness learns the mesh is there.
pub fn follow_mesh(
    cfg: &Config,
    waypoint: bool,
    state: &Arc<State>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<MeshReady, AgentError> {
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    match (cfg.mode, &cfg.mesh_file) {
        (Mode::Istio, _) => {
            let xds = XdsClient::new(
                XdsConfig {
                    waypoint,
                    ..xds_config(cfg)
                },
                state.clone(),
            );
            let ready = MeshReady::Xds(xds.status());
            tasks.push(tokio::spawn(xds.run(stopped(shutdown.clone()))));
            Ok(ready)
        }
        (Mode::Local, Some(path)) => {
            let mut source = LocalSource::new(path.clone(), state.clone(), cfg.mesh_poll_interval);
            source.load_initial()?;
            tasks.push(tokio::spawn(source.run(stopped(shutdown.clone()))));
            Ok(MeshReady::Loaded)
        }
        (Mode::Local, None) => Ok(MeshReady::Loaded),
    }
}

/// How the agent introduces itself to istiod, as ztunnel does: id
/// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`; metadata `NAME`,
/// `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, `CLUSTER_ID` (Istio's chart
/// sets `ISTIO_META_CLUSTER_ID`, so ztunnel always sends it), then the
/// proxy metadata over them.
fn xds_config(cfg: &Config) -> XdsConfig {
    let cp = &cfg.control_plane;
    let ns = &cp.pod_namespace;
    let own = [
        ("NAME", cp.pod_name.as_str()),
        ("NAMESPACE", ns.as_str()),
        ("INSTANCE_IPS", cp.pod_ip.as_str()),
        ("NODE_NAME", cfg.node.as_str()),
        ("CLUSTER_ID", cp.cluster_id.as_str()),
    ];
    let mut node_metadata: std::collections::BTreeMap<String, String> = own
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    node_metadata.extend(cp.proxy_metadata.clone());
    XdsConfig {
        address: cp.xds_address.clone(),
        root_cert: cp
            .xds_address
            .starts_with("https://")
            .then(|| cp.xds_root_cert.clone().unwrap_or(cp.root_cert.clone())),
        server_name: cp.xds_server_name.clone().or(cp.server_name.clone()),
        token_path: Some(cp.token_path.clone()),
        cluster_id: Some(cp.cluster_id.clone()),
        node_id: format!(
            "ztunnel~{}~{}.{ns}~{ns}.svc.cluster.local",
            cp.pod_ip, cp.pod_name
        ),
        node_metadata,
        ..XdsConfig::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
