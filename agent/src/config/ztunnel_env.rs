//! ztunnel's environment variables, read in Istio mode so that Istio's own
//! ztunnel Helm chart runs this agent with only the image swapped.
//!
//! The names, syntaxes and defaults are ztunnel's (`src/config.rs` of
//! istio/ztunnel): booleans are exactly `true` or `false`, durations are
//! `duration-str` expressions (a bare number is seconds), and a value that
//! does not parse stops the agent with `invalid env var NAME=value (why)`.
//! Each variable lands in one of three places:
//!
//! - it maps to a setting of ours and is applied with ztunnel's meaning;
//! - it is read but has no effect here (a feature we lack that widens
//!   nothing when absent): it is reported once, as a warning;
//! - honouring it is impossible and ignoring it would run the agent other
//!   than its operator asked (a local xDS file, a fake CA, a dedicated
//!   proxy, post-quantum-only TLS): the agent refuses to start.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Config, ConfigError, LogFormat};

/// A variable that was set but changes nothing here, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored {
    pub var: String,
    pub why: &'static str,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.var, self.why)
    }
}

/// ztunnel's default istiod address: the in-cluster Service when running
/// in Kubernetes (`KUBERNETES_SERVICE_HOST` set), else localhost.
pub fn default_istiod_address(in_kubernetes: bool) -> &'static str {
    if in_kubernetes {
        "https://istiod.istio-system.svc:15012"
    } else {
        "https://localhost:15012"
    }
}

/// Variables ztunnel reads that change nothing here, with the reason
/// given in the warning. Listed only when set (and, for booleans, set to
/// the value that would ask for the missing feature).
const NO_EFFECT: &[(&str, &str)] = &[
    (
        "NETWORK",
        "each workload's network comes from xDS, and addresses are looked up mesh-wide, not within the node's network",
    ),
    (
        "PROXY_WORKLOAD_INFO",
        "only meaningful with PROXY_MODE=dedicated",
    ),
    (
        "PREFERED_SERVICE_NAMESPACE",
        "no preferred-namespace service lookup",
    ),
    ("LOCALHOST_APP_TUNNEL", "not configurable here"),
    ("ENABLE_RESPONSE_BAGGAGE", "no baggage is read or sent"),
    (
        "AUTHZ_POLICY_INFO_LOGGING",
        "policy decisions are in the access log",
    ),
    (
        "SERVICE_ACCOUNT",
        "no self-proxy listener for the agent's own metrics",
    ),
    (
        "TRUST_DOMAIN",
        "no self-proxy listener for the agent's own metrics",
    ),
    ("CA_HEADER_*", "extra CA request headers are not sent"),
    ("XDS_HEADER_*", "extra xDS request headers are not sent"),
    ("ISTIO_METAJSON_*", "JSON node metadata is not sent"),
];

/// Applies the variables set in `env` over `cfg` (Istio mode); unset ones
/// leave it as it is. Returns those that were set but have no effect.
pub fn apply(
    cfg: &mut Config,
    env: &BTreeMap<String, String>,
) -> Result<Vec<Ignored>, ConfigError> {
    let e = Env(env);
    let mut ignored = Vec::new();
    refuse_unsupported(&e)?;

    // ProxyConfig (YAML), below the dedicated variables as in ztunnel.
    let pc = e.proxy_config()?;
    if let Some(port) = pc.proxy_admin_port {
        cfg.admin_port = port;
    }
    if let Some(port) = pc.stats_port {
        cfg.metrics_port = port;
    }
    for (k, v) in pc.proxy_metadata {
        let key = k
            .strip_prefix(super::ENV_META_PREFIX)
            .unwrap_or(&k)
            .to_string();
        // ISTIO_META_* variables win; Config::load adds them afterwards.
        cfg.control_plane.proxy_metadata.insert(key, v);
    }

    let cp = &mut cfg.control_plane;
    let xds_before = cp.xds_address.clone();
    if let Some(addr) = e
        .address("XDS_ADDRESS")?
        .or(pc.discovery_address.map(with_scheme))
    {
        cp.xds_address = addr;
    }
    match e.address("CA_ADDRESS")? {
        Some(addr) => cp.ca_address = Some(addr),
        // ztunnel's CA default is istiod's address, not XDS_ADDRESS.
        None if cp.ca_address.is_none() && cp.xds_address != xds_before => {
            let k8s = e.get("KUBERNETES_SERVICE_HOST").is_some();
            cp.ca_address = Some(default_istiod_address(k8s).to_string());
        }
        None => {}
    }
    if let Some(root) = e.root_cert("XDS_ROOT_CA")? {
        cp.xds_root_cert = Some(root);
    }
    if let Some(root) = e.root_cert("CA_ROOT_CA")? {
        cp.root_cert = root;
    }
    if let Some(name) = e.nonempty("ALT_XDS_HOSTNAME") {
        cp.xds_server_name = Some(name.to_string());
    }
    if let Some(name) = e.nonempty("ALT_CA_HOSTNAME") {
        cp.ca_server_name = Some(name.to_string());
    }
    if let Some(token) = e.get("AUTH_TOKEN") {
        cp.token_path = token_path(token)?;
    }
    if let Some(id) = e
        .nonempty(super::ENV_META_CLUSTER_ID)
        .or(e.nonempty(super::ENV_CLUSTER_ID))
    {
        cp.cluster_id = id.to_string();
    }
    if let Some(path) = e.nonempty("INPOD_UDS") {
        cp.cni_socket = PathBuf::from(path);
    }
    if let Some(v) = e.nonempty(super::ENV_POD_NAME) {
        cp.pod_name = v.to_string();
    }
    if let Some(v) = e.nonempty(super::ENV_POD_NAMESPACE) {
        cp.pod_namespace = v.to_string();
    }
    if let Some(v) = e.nonempty(super::ENV_INSTANCE_IP) {
        cp.pod_ip = v.to_string();
    }
    if let Some(node) = e.nonempty(super::ENV_NODE_NAME) {
        cfg.node = node.to_string();
    }
    if let Some(domain) = e.nonempty("CLUSTER_DOMAIN") {
        cfg.dns.cluster_domain = domain.to_string();
    }
    if let Some(addr) = e.nonempty("ISTIO_META_DNS_PROXY_ADDR") {
        cfg.dns.port = dns_proxy_port(addr)?;
    }
    if let Some(mark) = e.parse::<u32>("PACKET_MARK")? {
        cfg.socket_mark = mark;
    }
    if let Some(n) = e.parse::<u16>("POOL_MAX_STREAMS_PER_CONNECTION")? {
        cfg.pool.max_streams = usize::from(n);
    }
    if let Some(d) = e.duration("POOL_UNUSED_RELEASE_TIMEOUT")? {
        cfg.pool.idle_timeout = d;
    }
    if let Some(n) = e.parse::<u32>("HTTP2_STREAM_WINDOW_SIZE")? {
        cfg.pool.stream_window = n;
    }
    if let Some(n) = e.parse::<u32>("HTTP2_CONNECTION_WINDOW_SIZE")? {
        cfg.pool.connection_window = n;
    }
    if let Some(n) = e.parse::<u32>("HTTP2_FRAME_SIZE")? {
        cfg.pool.max_frame_size = n;
    }
    if let Some(d) = e.termination_deadline()? {
        cfg.drain_timeout = d;
    }
    if let Some(on) = e.parse::<bool>("KEEPALIVE_ENABLED")? {
        cfg.keepalive.enabled = on;
    }
    if let Some(d) = e.duration("KEEPALIVE_TIME")? {
        cfg.keepalive.time = d;
    }
    if let Some(d) = e.duration("KEEPALIVE_INTERVAL")? {
        cfg.keepalive.interval = d;
    }
    if let Some(n) = e.parse::<u32>("KEEPALIVE_RETRIES")? {
        cfg.keepalive.retries = n;
    }
    if let Some(on) = e.parse::<bool>("USER_TIMEOUT_ENABLED")? {
        cfg.keepalive.user_timeout = on;
    }
    if let Some(d) = e.duration("SECRET_TTL")? {
        cfg.ca.cert_ttl = d;
    }
    if let Some(path) = e.nonempty("CRL_PATH") {
        cfg.crl = Some(PathBuf::from(path));
    }
    if let Some(v6) = e.parse::<bool>("IPV6_ENABLED")? {
        // ztunnel binds its stats and readiness servers to [::] or 0.0.0.0.
        let any = if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        cfg.metrics_address = any;
        cfg.readiness_address = any;
    }
    if let Some(filter) = e.nonempty("RUST_LOG") {
        cfg.log.level = filter.to_string();
    }
    if let Some(format) = e.get("LOG_FORMAT") {
        cfg.log.format = if format == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    if let Some(workers) = e.worker_threads(pc.concurrency)? {
        cfg.worker_threads = Some(workers);
    }

    // Booleans whose default is what we do: only the other value is ignored.
    for (var, ours, why) in [
        (
            "INPOD_PORT_REUSE",
            true,
            "in-pod listeners always use SO_REUSEPORT",
        ),
        (
            "ENABLE_ORIG_SRC",
            true,
            "inbound connections always keep the client's address",
        ),
        ("XDS_ON_DEMAND", false, "the whole mesh is always fetched"),
        ("TLS12_ENABLED", false, "TLS 1.3 only"),
        ("UNSTABLE_ENABLE_SOCKS5", false, "no SOCKS5 listener"),
    ] {
        if e.parse::<bool>(var)?.is_some_and(|v| v != ours) {
            ignored.push(Ignored {
                var: var.into(),
                why,
            });
        }
    }
    for (var, why) in NO_EFFECT {
        let set: Vec<&String> = match var.strip_suffix('*') {
            Some(prefix) => env.keys().filter(|k| k.starts_with(prefix)).collect(),
            None => env
                .get_key_value(*var)
                .map(|(k, _)| k)
                .into_iter()
                .collect(),
        };
        for k in set {
            ignored.push(Ignored {
                var: k.clone(),
                why,
            });
        }
    }
    Ok(ignored)
}

/// Settings that cannot be honoured and would change what the agent is if
/// ignored.
fn refuse_unsupported(e: &Env<'_>) -> Result<(), ConfigError> {
    let refuse = |var: &str, value: &str, why: &str| {
        Err(ConfigError::Env {
            var: var.into(),
            value: value.into(),
            reason: why.into(),
        })
    };
    if let Some(mode) = e.get("PROXY_MODE") {
        match mode {
            "shared" => {}
            "dedicated" => {
                return refuse(
                    "PROXY_MODE",
                    mode,
                    "dedicated (per-pod) mode is not supported",
                );
            }
            _ => return refuse("PROXY_MODE", mode, "expected shared or dedicated"),
        }
    }
    for var in ["LOCAL_XDS_PATH", "LOCAL_XDS"] {
        if let Some(v) = e.nonempty(var) {
            return refuse(
                var,
                v,
                "ztunnel's local config format is not read; use local mode with a mesh file",
            );
        }
    }
    if e.parse::<bool>("FAKE_CA")? == Some(true) {
        return refuse(
            "FAKE_CA",
            "true",
            "no fake CA in Istio mode; use local mode's CA",
        );
    }
    if e.parse::<bool>("ENABLE_PROXY")? == Some(false) {
        return refuse("ENABLE_PROXY", "false", "a DNS-only agent is not supported");
    }
    if e.get("COMPLIANCE_POLICY") == Some("pqc") {
        return refuse(
            "COMPLIANCE_POLICY",
            "pqc",
            "post-quantum-only TLS is not supported",
        );
    }
    for var in ["XDS_ADDRESS", "CA_ADDRESS"] {
        if e.get(var) == Some("") {
            return refuse(var, "", "running without it is not supported");
        }
    }
    Ok(())
}

/// The environment, read with ztunnel's parsing rules.
struct Env<'a>(&'a BTreeMap<String, String>);

impl Env<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(String::as_str)
    }

    fn nonempty(&self, var: &str) -> Option<&str> {
        self.get(var).filter(|v| !v.is_empty())
    }

    fn invalid(var: &str, value: &str, reason: impl ToString) -> ConfigError {
        ConfigError::Env {
            var: var.into(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }

    /// `T::from_str`, as ztunnel: for `bool` only `true` and `false`.
    fn parse<T: std::str::FromStr>(&self, var: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(var)
            .map(|v| v.parse::<T>().map_err(|e| Self::invalid(var, v, e)))
            .transpose()
    }

    fn duration(&self, var: &str) -> Result<Option<Duration>, ConfigError> {
        self.get(var)
            .map(|v| duration_str::parse(v).map_err(|e| Self::invalid(var, v, e)))
            .transpose()
    }

    /// An address, `https://` added when it has no scheme (Istio's charts
    /// render `host:port`).
    fn address(&self, var: &str) -> Result<Option<String>, ConfigError> {
        let Some(v) = self.nonempty(var) else {
            return Ok(None);
        };
        v.parse::<http::Uri>()
            .map_err(|e| Self::invalid(var, v, e))?;
        Ok(Some(with_scheme(v.to_string())))
    }

    /// `XDS_ROOT_CA` / `CA_ROOT_CA`: ztunnel takes an existing path as a
    /// file, `SYSTEM` as the system roots, anything else as inline PEM.
    /// Only files are supported here; the others are refused rather than
    /// read as a path that cannot exist.
    fn root_cert(&self, var: &str) -> Result<Option<PathBuf>, ConfigError> {
        let Some(v) = self.nonempty(var) else {
            return Ok(None);
        };
        if v == "SYSTEM" || v.contains("-----BEGIN") {
            return Err(Self::invalid(
                var,
                if v == "SYSTEM" { v } else { "<inline PEM>" },
                "only a root certificate file is supported",
            ));
        }
        Ok(Some(PathBuf::from(v)))
    }

    /// ztunnel's self-termination deadline: `CONNECTION_TERMINATION_DEADLINE`,
    /// else from the pod's grace period: 5 s less above 10 s, 1 s less at
    /// or below, never under 1 s.
    fn termination_deadline(&self) -> Result<Option<Duration>, ConfigError> {
        if let Some(d) = self.duration("CONNECTION_TERMINATION_DEADLINE")? {
            return Ok(Some(d));
        }
        Ok(self
            .parse::<u64>("TERMINATION_GRACE_PERIOD_SECONDS")?
            .map(|secs| {
                let margin = if secs > 10 { 5 } else { 1 };
                Duration::from_secs(secs.saturating_sub(margin).max(1))
            }))
    }

    fn proxy_config(&self) -> Result<ProxyConfig, ConfigError> {
        let Some(text) = self.nonempty("PROXY_CONFIG") else {
            return Ok(ProxyConfig::default());
        };
        marked_yaml::from_yaml(0, text)
            .map_err(|e| Self::invalid("PROXY_CONFIG", "<yaml>", super::describe_yaml_error(&e)))
    }

    /// A whole number of CPUs from a Kubernetes quantity ("2", "1.5",
    /// "500m"), rounded up.
    fn cpu_quantity(&self, var: &str) -> Result<Option<usize>, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(None);
        };
        let cores = match raw.strip_suffix('m') {
            Some(millis) => millis.parse::<f64>().map(|m| m / 1000.0),
            None => raw.parse::<f64>(),
        }
        .map_err(|e| Self::invalid(var, raw, e))?;
        if !cores.is_finite() || cores <= 0.0 {
            return Err(Self::invalid(var, raw, "must be a positive CPU quantity"));
        }
        Ok(Some(cores.ceil() as usize))
    }

    /// CPUs the agent may use: the explicit limit, else the downward API's
    /// `limits.cpu` (the node's cores when no limit is set), else the
    /// machine's.
    fn cpus(&self) -> Result<usize, ConfigError> {
        if let Some(limit) = self.cpu_quantity("ZTUNNEL_RESOURCE_CPU_LIMIT")? {
            return Ok(limit);
        }
        if let Some(n) = self.parse::<usize>("ZTUNNEL_CPU_LIMIT")? {
            return Ok(n);
        }
        Ok(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// ztunnel's worker-thread count, when anything that sets it is given
    /// (else the runtime's default, one per core, stays):
    /// `ZTUNNEL_WORKER_THREADS` (`N`, `N%` of the CPUs, 0 = all), else the
    /// ProxyConfig's `concurrency` (0 = all), else the explicit CPU limit
    /// raised to the request, else a quarter of the CPUs, at least the
    /// request and at least 2.
    fn worker_threads(&self, concurrency: Option<u16>) -> Result<Option<usize>, ConfigError> {
        const VARS: [&str; 4] = [
            "ZTUNNEL_WORKER_THREADS",
            "ZTUNNEL_CPU_LIMIT",
            "ZTUNNEL_RESOURCE_CPU_LIMIT",
            "ZTUNNEL_RESOURCE_CPU_REQUEST",
        ];
        if concurrency.is_none() && VARS.iter().all(|v| self.get(v).is_none()) {
            return Ok(None);
        }
        let var = "ZTUNNEL_WORKER_THREADS";
        let n = match self.get(var) {
            Some(v) => match v.strip_suffix('%') {
                Some(pct) => {
                    let pct: f64 = pct
                        .parse()
                        .map_err(|e| Self::invalid(var, v, format!("invalid percentage: {e}")))?;
                    if pct <= 0.0 || pct > 100.0 {
                        return Err(Self::invalid(
                            var,
                            v,
                            "percentage must be between 0 and 100",
                        ));
                    }
                    ((self.cpus()? as f64 * pct / 100.0).ceil() as usize).max(1)
                }
                None => match v
                    .parse::<usize>()
                    .map_err(|e| Self::invalid(var, v, format!("invalid number: {e}")))?
                {
                    0 => self.cpus()?,
                    n => n,
                },
            },
            None => match concurrency {
                Some(0) => self.cpus()?,
                Some(n) => usize::from(n),
                None => {
                    let request = self
                        .cpu_quantity("ZTUNNEL_RESOURCE_CPU_REQUEST")?
                        .unwrap_or(0);
                    match self.cpu_quantity("ZTUNNEL_RESOURCE_CPU_LIMIT")? {
                        Some(limit) => limit.max(request),
                        None => ((self.cpus()? as f64 * 0.25).ceil() as usize)
                            .max(request)
                            .max(2),
                    }
                }
            },
        };
        Ok(Some(n.max(1)))
    }
}

/// The part of Istio's ProxyConfig (`PROXY_CONFIG`) ztunnel reads.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfig {
    discovery_address: Option<String>,
    proxy_admin_port: Option<u16>,
    stats_port: Option<u16>,
    concurrency: Option<u16>,
    #[serde(default)]
    proxy_metadata: BTreeMap<String, String>,
}

fn with_scheme(addr: String) -> String {
    if addr.contains("://") {
        addr
    } else {
        format!("https://{addr}")
    }
}

/// `AUTH_TOKEN`: ztunnel reads an existing path as the token file and any
/// other value as the token itself; only files are supported here.
fn token_path(v: &str) -> Result<PathBuf, ConfigError> {
    if v.starts_with('/') || v.starts_with("./") || std::path::Path::new(v).exists() {
        Ok(PathBuf::from(v))
    } else {
        Err(ConfigError::Env {
            var: "AUTH_TOKEN".into(),
            value: "<token>".into(),
            reason: "only a token file path is supported".into(),
        })
    }
}

/// `ISTIO_META_DNS_PROXY_ADDR`: `localhost:<port>` or `ip:port`; the proxy
/// binds inside each pod, so only the port is used.
fn dns_proxy_port(v: &str) -> Result<u16, ConfigError> {
    let port = match v.strip_prefix("localhost:") {
        Some(p) => p.parse::<u16>().ok(),
        None => v.parse::<std::net::SocketAddr>().ok().map(|a| a.port()),
    };
    port.ok_or_else(|| {
        Env::invalid(
            "ISTIO_META_DNS_PROXY_ADDR",
            v,
            "expected localhost:<port> or ip:port",
        )
    })
}

#[cfg(test)]
mod tests;
