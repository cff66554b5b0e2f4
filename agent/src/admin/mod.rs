//! The agent's HTTP endpoints (DESIGN §2): readiness on 15021
//! (`/healthz/ready`), Prometheus metrics on 15020 (`/metrics`), and the
//! local admin endpoint on 15000 (`/config_dump`, `/logging`,
//! `/quitquitquit`, `/debug/pprof/*`). [`AdminServer`] is started by the
//! agent; an endpoint that cannot bind is logged and left out rather than
//! stopping the data plane (see [`AdminServer::failures`]).

pub mod config_dump;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod pprof;
pub mod process;
pub mod readiness;

pub use logging::{LogError, LogHandle};
pub use metrics::Metrics;
pub use readiness::{Conditions, MeshReady, Readiness};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use ::http::{Method, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use self::http::{query_param, respond, text, Body, Request};
use crate::config::Config;
use crate::hbone::Pool;
use crate::identity::CertManager;
use crate::state::{State, Workload};

/// The readiness probe's path (on the readiness port).
pub const READINESS_PATH: &str = "/healthz/ready";
/// Prometheus' scrape path (on the metrics port).
pub const METRICS_PATH: &str = "/metrics";

/// Which endpoint a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Endpoint::Admin => "admin",
            Endpoint::Metrics => "metrics",
            Endpoint::Readiness => "readiness",
        })
    }
}

/// Where each endpoint listens; `None` disables it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    pub admin: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub readiness: Option<SocketAddr>,
}

impl AdminConfig {
    /// From the agent configuration; port 0 disables an endpoint.
    pub fn from_config(cfg: &Config) -> Self {
        let addr = |ip, port| (port != 0).then(|| SocketAddr::new(ip, port));
        AdminConfig {
            admin: addr(cfg.admin_address, cfg.admin_port),
            metrics: addr(cfg.metrics_address, cfg.metrics_port),
            readiness: addr(cfg.readiness_address, cfg.readiness_port),
        }
    }
}

/// Why an endpoint is not being served.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{endpoint} endpoint cannot listen on {addr}: {source}")]
    Bind {
        endpoint: Endpoint,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's local workloads, asked at request time.
pub trait LocalWorkloads: Send + Sync {
    /// The workloads served now.
    fn served(&self) -> Vec<Arc<Workload>>;
    /// Workloads that should be served and are not (yet), with why.
    fn pending(&self) -> Vec<(String, String)>;
    /// Whether the list of pods is complete: in Istio mode, once the
    /// CNI's snapshot arrived on the current connection; else always.
    fn pods_known(&self) -> bool;
}

/// What the endpoints read from the agent.
pub struct Sources {
    /// This node's name, for the config dump.
    pub node: String,
    pub state: Arc<State>,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    /// The metrics the proxies count into as they make their records.
    pub metrics: Arc<Metrics>,
    pub workloads: Arc<dyn LocalWorkloads>,
    pub readiness: Readiness,
    /// Sending `true` stops the agent (`/quitquitquit`); readiness reports
    /// 503 from then on.
    pub shutdown: watch::Sender<bool>,
    /// The DNS proxy's settings, if it runs.
    pub dns: Option<crate::dns::DnsSettings>,
    /// The dump's `config` and `version` sections (fixed at start).
    pub settings: config_dump::Settings,
}

struct Shared {
    node: String,
    state: Arc<State>,
    certs: Arc<CertManager>,
    pool: Pool,
    workloads: Arc<dyn LocalWorkloads>,
    readiness: Readiness,
    shutdown: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    dns: Option<crate::dns::DnsSettings>,
    settings: config_dump::Settings,
    log: Mutex<Option<LogHandle>>,
}

/// The running endpoints. Dropping it closes them.
pub struct AdminServer {
    shared: Arc<Shared>,
    addrs: Vec<(Endpoint, SocketAddr)>,
    failures: Vec<AdminError>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl AdminServer {
    /// Binds the configured endpoints.
    pub async fn start(cfg: AdminConfig, sources: Sources) -> AdminServer {
        let Sources {
            node,
            state,
            certs,
            pool,
            metrics,
            workloads,
            readiness,
            shutdown,
            dns,
            settings,
        } = sources;
        let shared = Arc::new(Shared {
            node,
            state,
            certs,
            pool,
            workloads,
            readiness,
            shutdown,
            metrics,
            dns,
            settings,
            log: Mutex::new(None),
        });
        let mut server = AdminServer {
            shared: shared.clone(),
            addrs: Vec::new(),
            failures: Vec::new(),
            tasks: Vec::new(),
        };
        let endpoints = [
            (Endpoint::Readiness, cfg.readiness),
            (Endpoint::Metrics, cfg.metrics),
            (Endpoint::Admin, cfg.admin),
        ];
        for (endpoint, addr) in endpoints {
            let Some(addr) = addr else { continue };
            match bind(endpoint, addr).await {
                Ok(listener) => {
                    let bound = listener.local_addr().unwrap_or(addr);
                    info!(%endpoint, addr = %bound, "serving");
                    let s = shared.clone();
                    let handler = move |req| {
                        let s = s.clone();
                        async move { s.handle(endpoint, req).await }
                    };
                    server
                        .tasks
                        .push(tokio::spawn(http::serve(listener, handler)));
                    server.addrs.push((endpoint, bound));
                }
                Err(e) => {
                    warn!(error = %e, "endpoint not served");
                    server.failures.push(e);
                }
            }
        }
        server
    }

    /// Where an endpoint listens, if it is served.
    pub fn addr(&self, endpoint: Endpoint) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(e, _)| *e == endpoint)
            .map(|(_, a)| *a)
    }

    /// Endpoints that could not be started.
    pub fn failures(&self) -> &[AdminError] {
        &self.failures
    }

    /// Lets `POST /logging` change the log filter through `log`.
    pub fn set_log_handle(&self, log: LogHandle) {
        *self
            .shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(log);
    }

    /// The readiness conditions now.
    pub fn conditions(&self) -> Conditions {
        self.shared.conditions()
    }

    /// The metrics text, as `/metrics` serves it.
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.shared.metrics_text()
    }
}

async fn bind(endpoint: Endpoint, addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind {
            endpoint,
            addr,
            source,
        })
}

impl Shared {
    fn conditions(&self) -> Conditions {
        let shutting_down = *self.shutdown.borrow();
        self.readiness.conditions(
            self.workloads.as_ref(),
            &self.certs.certificates(),
            shutting_down,
            SystemTime::now(),
        )
    }

    fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let gauges = metrics::AgentGauges {
            pool: self.pool.stats(),
            certificates: self.certs.certificates(),
            enrolled: self.workloads.served().len(),
            pending: self.workloads.pending().len(),
            xds: self.readiness.xds_status(),
            trust_roots: self.certs.trust_bundle().roots.len(),
            untrusted_closed: self.certs.trust().untrusted_closed(),
            revoked: self.certs.trust().revoked(),
            mesh: self.state.stats(),
        };
        self.metrics.encode(&gauges)
    }

    async fn handle(&self, endpoint: Endpoint, req: Request) -> Response<Body> {
        let path = req.uri().path();
        let method = req.method();
        let query = req.uri().query();
        match (endpoint, path) {
            (Endpoint::Readiness, READINESS_PATH) => {
                only(method, &Method::GET, || match self.conditions().check() {
                    Ok(()) => text(StatusCode::OK, "ready"),
                    Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
                })
            }
            (Endpoint::Metrics, METRICS_PATH | "/stats/prometheus") => {
                only(method, &Method::GET, || match self.metrics_text() {
                    Ok(body) => respond(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    ),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
                })
            }
            (Endpoint::Admin, "/config_dump") => only(method, &Method::GET, || self.config_dump()),
            (Endpoint::Admin, "/logging") => self.logging(method, query),
            (Endpoint::Admin, "/quitquitquit") => only(method, &Method::POST, || {
                info!("asked to quit over the admin endpoint");
                self.shutdown.send_replace(true);
                text(StatusCode::OK, "shutting down")
            }),
            (Endpoint::Admin, pprof::PROFILE_PATH) => pprof::profile(method, query).await,
            (Endpoint::Admin, pprof::HEAP_PATH) => pprof::heap(method).await,
            (Endpoint::Admin, pprof::HEAP_PROFILING_PATH) => {
                pprof::heap_profiling(method, query).await
            }
            (Endpoint::Admin, "/") => text(
                StatusCode::OK,
                "GET /config_dump\nGET /logging\nPOST /logging?level=<filter>\nPOST /quitquitquit\n\
                 GET /debug/pprof/profile?seconds=<1-300, 10>&frequency=<1-1000 Hz, 100>\n\
                 GET /debug/pprof/heap\nGET /debug/pprof/heap/profiling?activate=<true|false>",
            ),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    fn config_dump(&self) -> Response<Body> {
        let snapshot = self.state.snapshot();
        let certificates = self.certs.certificates();
        let served = self.workloads.served();
        let doc = config_dump::dump(&config_dump::DumpInput {
            node: &self.node,
            snapshot: &snapshot,
            certificates: &certificates,
            pool: self.pool.stats(),
            served: &served,
            now: SystemTime::now(),
            xds: self.readiness.xds_status(),
            dns: self.dns.as_ref(),
            trust: &self.certs.trust_bundle(),
            trust_peers: self.certs.trust().peers(),
            untrusted_closed: self.certs.trust().untrusted_closed(),
            settings: &self.settings,
        });
        match serde_json::to_vec_pretty(&doc) {
            Ok(body) => respond(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
        }
    }

    /// `GET` shows the filter, `POST ?level=` replaces it.
    fn logging(&self, method: &Method, query: Option<&str>) -> Response<Body> {
        let Some(log) = self
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the log filter cannot be changed: no reloadable logger installed",
            );
        };
        if method == Method::GET {
            return text(StatusCode::OK, format!("level: {}", log.current()));
        }
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
        }
        let Some(level) = query_param(query, "level").filter(|l| !l.is_empty()) else {
            return text(StatusCode::BAD_REQUEST, "missing ?level=<filter>");
        };
        match log.set(&level) {
            Ok(()) => {
                info!(%level, "log filter changed over the admin endpoint");
                text(StatusCode::OK, format!("level: {level}"))
            }
            Err(e @ LogError::Filter { .. }) => text(StatusCode::BAD_REQUEST, e.to_string()),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// Answers with `f` for `allowed`, else 405.
fn only(method: &Method, allowed: &Method, f: impl FnOnce() -> Response<Body>) -> Response<Body> {
    if method == allowed {
        f()
    } else {
        text(StatusCode::METHOD_NOT_ALLOWED, format!("use {allowed}"))
    }
}
