//! The agent's configuration: one typed struct with documented defaults,
//! assembled in one place from the config file, then environment variables
//! and flags (flags win; clap reads the environment for each flag).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::hbone::H2Settings;

mod sections;
pub mod ztunnel_env;
pub use sections::*;
pub use ztunnel_env::Ignored;

/// Default for `node`, as the Kubernetes downward API sets it.
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// Defaults for the agent's own pod in Istio mode, as Istio's charts set them.
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_INSTANCE_IP: &str = "INSTANCE_IP";
/// The cluster's name, as ztunnel reads it: `ISTIO_META_CLUSTER_ID`, else
/// `CLUSTER_ID` (Istio's ztunnel chart sets the former).
pub const ENV_META_CLUSTER_ID: &str = "ISTIO_META_CLUSTER_ID";
pub const ENV_CLUSTER_ID: &str = "CLUSTER_ID";
/// `ISTIO_META_<KEY>=<value>` adds `<KEY>: <value>` to the xDS node
/// metadata, as for every Istio proxy.
pub const ENV_META_PREFIX: &str = "ISTIO_META_";
/// The environment variables defaults are read from; each flag also has
/// its own `AMBIENT_*` variable (see [`Overrides`]), and any
/// `ISTIO_META_*` variable is node metadata.
pub const DEFAULT_ENV: [&str; 6] = [
    ENV_NODE_NAME,
    ENV_POD_NAME,
    ENV_POD_NAMESPACE,
    ENV_INSTANCE_IP,
    ENV_META_CLUSTER_ID,
    ENV_CLUSTER_ID,
];

/// Everything the agent can be told. Every field has a default, so an empty
/// file (or none) is a valid configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// This node's name; the agent serves the workloads whose `node` is this.
    /// Default: `$NODE_NAME`, else the host name.
    pub node: String,
    /// Where the mesh and certificates come from: `local` (a YAML file and
    /// an in-process CA) or `istio` (istiod's xDS and CA, pods from the
    /// CNI). Default: local.
    pub mode: Mode,
    /// Local mode: the YAML file describing the mesh. Relative paths are
    /// relative to the config file. Default: none (an empty mesh).
    pub mesh_file: Option<PathBuf>,
    /// The mesh file is re-read when inotify reports a change; this is how
    /// often it is polled instead where inotify cannot watch it (no such
    /// directory yet, the watch limit reached). Default: 1s.
    #[serde(with = "humantime_serde")]
    pub mesh_poll_interval: Duration,
    pub ca: CaConfig,
    /// Istio mode: the control plane and the CNI.
    pub control_plane: ControlPlaneConfig,
    pub ports: Ports,
    pub pool: PoolSettings,
    /// SO_MARK on the agent's own sockets so capture skips them; 0 leaves
    /// sockets unmarked (needs no privilege). Default: 1337 (0x539).
    pub socket_mark: u32,
    /// How enrolled workloads' traffic is redirected: `nft`, `ebpf`, or
    /// `none` (istio-cni's in-pod rules do it). Default: nft in local mode,
    /// none in Istio mode; see [`Config::capture`].
    pub capture: Option<crate::capture::CaptureMode>,
    /// The workload's network interface inside its namespace, where eBPF
    /// inbound capture attaches. Default: eth0.
    pub pod_interface: String,
    /// Budget for connecting to an application or a peer agent. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TCP keepalive on the agent's connections.
    pub keepalive: KeepaliveConfig,
    /// Per-workload caps.
    pub limits: LimitsConfig,
    /// Inbound mTLS handshakes, per HBONE listener (one per local workload).
    pub handshakes: HandshakeSettings,
    /// The DNS proxy on 15053.
    pub dns: DnsConfig,
    /// Certificate revocation lists (PEM, one or more `X509 CRL` blocks,
    /// or one DER CRL), followed on disk: a peer whose leaf or
    /// intermediate is revoked is refused, and its open connections
    /// closed. Unreadable at start: the agent does not start; a bad
    /// version later: the last good one stays. Missing: nothing revoked
    /// until it appears. Default: none. Env: `CRL_PATH` (ztunnel's).
    pub crl: Option<PathBuf>,
    pub log: LogConfig,
    /// On SIGTERM, how long connections in flight may take to finish before
    /// they are cut. Default: 25s (under Kubernetes' 30s grace period).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Admin endpoint (`/config_dump`, `/logging`, `/quitquitquit`); 0
    /// disables it. Default: 15000.
    pub admin_port: u16,
    /// Address the admin endpoint binds. Default: 127.0.0.1 (local only).
    pub admin_address: IpAddr,
    /// Prometheus endpoint (`/metrics`); 0 disables it. Default: 15020.
    pub metrics_port: u16,
    /// Address the metrics endpoint binds. Default: 0.0.0.0.
    pub metrics_address: IpAddr,
    /// Readiness endpoint (`/healthz/ready`); 0 disables it. Default: 15021.
    pub readiness_port: u16,
    /// Address the readiness endpoint binds. Default: 0.0.0.0.
    pub readiness_address: IpAddr,
    /// Threads carrying traffic. Default: one per core (in Istio mode,
    /// ztunnel's `ZTUNNEL_*` CPU variables set it as ztunnel would).
    pub worker_threads: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: default_node_name(),
            mode: Mode::Local,
            mesh_file: None,
            mesh_poll_interval: Duration::from_secs(1),
            ca: CaConfig::default(),
            control_plane: ControlPlaneConfig::default(),
            ports: Ports::default(),
            pool: PoolSettings::default(),
            socket_mark: 0x539,
            capture: None,
            pod_interface: "eth0".into(),
            connect_timeout: Duration::from_secs(10),
            keepalive: KeepaliveConfig::default(),
            limits: LimitsConfig::default(),
            handshakes: HandshakeSettings::default(),
            dns: DnsConfig::default(),
            crl: None,
            log: LogConfig::default(),
            drain_timeout: Duration::from_secs(25),
            admin_port: 15000,
            admin_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            metrics_port: 15020,
            metrics_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            readiness_port: 15021,
            readiness_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            worker_threads: None,
        }
    }
}

/// Flags (and their environment variables) that override the file.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct Overrides {
    /// Agent configuration file (YAML). Every setting has a default, so this
    /// is optional.
    #[arg(long, short = 'c', env = "AMBIENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name: the agent serves the workloads placed on it.
    /// [default: $NODE_NAME, else the host name]
    #[arg(long, env = "AMBIENT_NODE", value_name = "NAME")]
    pub node: Option<String>,
    /// `local` (mesh file + local CA) or `istio` (istiod + CNI). [default: local]
    #[arg(long, env = "AMBIENT_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Local mode: the mesh description (YAML), re-read when it changes.
    #[arg(long, env = "AMBIENT_MESH_FILE", value_name = "FILE")]
    pub mesh_file: Option<PathBuf>,
    /// How enrolled workloads' traffic is captured. [default: nft in local
    /// mode, none in Istio mode (istio-cni captures)]
    #[arg(long, env = "AMBIENT_CAPTURE", value_enum)]
    pub capture: Option<crate::capture::CaptureMode>,
    /// Certificate revocation lists to enforce (PEM or DER), followed on
    /// disk. [default: none]
    #[arg(long, env = "CRL_PATH", value_name = "FILE")]
    pub crl: Option<PathBuf>,
    /// Log filter, e.g. `info` or `ambient_agent=debug`. [default: info]
    #[arg(long, env = "AMBIENT_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format. [default: text]
    #[arg(long, env = "AMBIENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// ztunnel's wording, so that operators find it the same way.
    #[error("invalid env var {var}={value} ({reason})")]
    Env {
        var: String,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Defaults, then the file named by `--config`, then flags/env.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let env = std::env::vars().collect();
        Config::load_with_env(overrides, &env).map(|(cfg, _)| cfg)
    }

    /// Defaults, then the file named by `--config`, then (Istio mode)
    /// ztunnel's variables in `env`, then `ISTIO_META_*` node metadata, then
    /// flags. Also returns the ztunnel variables that were set but have no
    /// effect, for the caller to warn about once logging is up.
    pub fn load_with_env(
        overrides: &Overrides,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<(Config, Vec<Ignored>), ConfigError> {
        let mut cfg = match &overrides.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(mode) = overrides.mode {
            cfg.mode = mode;
        }
        let ignored = match cfg.mode {
            Mode::Istio => ztunnel_env::apply(&mut cfg, env)?,
            Mode::Local => Vec::new(),
        };
        if let Some(node) = &overrides.node {
            cfg.node = node.clone();
        }
        if let Some(mesh) = &overrides.mesh_file {
            cfg.mesh_file = Some(mesh.clone());
        }
        if let Some(capture) = overrides.capture {
            cfg.capture = Some(capture);
        }
        if let Some(crl) = &overrides.crl {
            cfg.crl = Some(crl.clone());
        }
        cfg.control_plane
            .proxy_metadata
            .extend(istio_meta(env.iter().map(|(k, v)| (k.clone(), v.clone()))));
        if let Some(level) = &overrides.log_level {
            cfg.log.level = level.clone();
        }
        if let Some(format) = overrides.log_format {
            cfg.log.format = format;
        }
        cfg.validate()?;
        Ok((cfg, ignored))
    }

    /// Parses a config file; errors name the line and field.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        if let Some(dir) = path.parent() {
            for p in cfg.file_relative_paths() {
                *p = dir.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// The settings a config file gives relative to itself (those that are
    /// set): the mesh file, the local CA's files, the CRL.
    pub fn file_relative_paths(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        [
            &mut self.mesh_file,
            &mut self.ca.root_cert,
            &mut self.ca.root_key,
            &mut self.ca.cert_chain,
            &mut self.ca.trust_bundle,
            &mut self.crl,
        ]
        .into_iter()
        .flatten()
    }

    /// Parses config text (YAML).
    pub fn parse(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let opts = marked_yaml::LoaderOptions::default().error_on_duplicate_keys(true);
        marked_yaml::from_yaml_with_options(0, text, opts).map_err(|e| describe_yaml_error(&e))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pool;
        if p.connection_window <= p.stream_window {
            return Err(ConfigError::Invalid(format!(
                "pool.connectionWindow ({}) must be larger than pool.streamWindow ({}): \
                 equal windows let one stalled stream block the connection",
                p.connection_window, p.stream_window
            )));
        }
        if !(16_384..=16_777_215).contains(&p.max_frame_size) {
            return Err(ConfigError::Invalid(format!(
                "pool.maxFrameSize ({}) must be within 16384..=16777215 (RFC 9113)",
                p.max_frame_size
            )));
        }
        if p.max_streams == 0 {
            return Err(ConfigError::Invalid(
                "pool.maxStreams must be at least 1".into(),
            ));
        }
        if self.ca.root_cert.is_some() != self.ca.root_key.is_some() {
            return Err(ConfigError::Invalid(
                "ca.rootCert and ca.rootKey must be given together".into(),
            ));
        }
        if self.ca.cert_chain.is_some() && self.ca.root_cert.is_none() {
            return Err(ConfigError::Invalid(
                "ca.certChain needs ca.rootCert and ca.rootKey (the intermediate it starts from)"
                    .into(),
            ));
        }
        let defaults = Ports::default();
        if self.capture() == crate::capture::CaptureMode::Ebpf && self.ports != defaults {
            return Err(ConfigError::Invalid(format!(
                "capture: ebpf uses the standard ports {}/{}/{} (compiled into its programs); \
                 ports may only be changed with nft capture",
                defaults.outbound, defaults.inbound_plaintext, defaults.hbone
            )));
        }
        // Checks the setting without reading /etc/resolv.conf (`dns()` does,
        // once, when the agent starts).
        if self.dns_enabled() {
            self.configured_upstreams()?;
        }
        if self.node.is_empty() {
            return Err(ConfigError::Invalid("node must not be empty".into()));
        }
        // The kernel's limits (TCP_KEEPIDLE/TCP_KEEPINTVL, TCP_KEEPCNT).
        let ka = &self.keepalive;
        let secs = 1..=32_767;
        if ka.enabled
            && !(secs.contains(&ka.time.as_secs())
                && secs.contains(&ka.interval.as_secs())
                && (1..=127).contains(&ka.retries))
        {
            return Err(ConfigError::Invalid(
                "keepalive: time and interval must be within 1s..=32767s and retries within \
                 1..=127 (or keepalive.enabled: false)"
                    .into(),
            ));
        }
        if self.worker_threads == Some(0) {
            return Err(ConfigError::Invalid(
                "workerThreads must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// `dns.upstreams` as addresses (port 53 where none is given).
    fn configured_upstreams(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        let mut upstreams = Vec::new();
        for u in &self.dns.upstreams {
            let addr = u
                .parse::<std::net::SocketAddr>()
                .or_else(|_| {
                    u.parse::<IpAddr>()
                        .map(|ip| std::net::SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    ConfigError::Invalid(format!("dns.upstreams: {u:?} is not an ip or ip:port"))
                })?;
            upstreams.push(addr);
        }
        Ok(upstreams)
    }

    /// Whether the DNS proxy runs: the setting, else in Istio mode the
    /// proxy metadata `DNS_CAPTURE` as ztunnel reads it, else off.
    pub fn dns_enabled(&self) -> bool {
        self.dns.enabled.unwrap_or_else(|| match self.mode {
            Mode::Istio => self
                .control_plane
                .proxy_metadata
                .get("DNS_CAPTURE")
                .is_none_or(|v| v.eq_ignore_ascii_case("true")),
            Mode::Local => false,
        })
    }

    /// The DNS proxy's settings, or `None` when it is off. Upstreams come
    /// from /etc/resolv.conf when none are configured.
    pub fn dns(&self) -> Result<Option<crate::dns::DnsSettings>, ConfigError> {
        let d = &self.dns;
        if !self.dns_enabled() {
            return Ok(None);
        }
        let mut upstreams = self.configured_upstreams()?;
        if upstreams.is_empty() {
            // No resolv.conf (or no nameserver in it): mesh names are still
            // answered, others get SERVFAIL.
            upstreams = crate::dns::resolv_conf_nameservers(Path::new("/etc/resolv.conf"))
                .unwrap_or_default();
        }
        Ok(Some(crate::dns::DnsSettings {
            port: d.port,
            upstreams,
            timeout: d.timeout,
            cluster_domain: d.cluster_domain.clone(),
        }))
    }

    /// Where workloads known by DNS name are looked up: `dns.upstreams`,
    /// else /etc/resolv.conf's nameservers (whether or not the DNS proxy
    /// runs); empty: the system resolver.
    pub fn lookup_upstreams(&self) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
        let upstreams = self.configured_upstreams()?;
        if !upstreams.is_empty() {
            return Ok(upstreams);
        }
        Ok(crate::dns::resolv_conf_nameservers(Path::new("/etc/resolv.conf")).unwrap_or_default())
    }

    /// How pods' traffic is captured: the setting, else the mode's default.
    pub fn capture(&self) -> crate::capture::CaptureMode {
        self.capture
            .unwrap_or_else(|| crate::capture::CaptureMode::default_for(self.mode))
    }

    /// The mark for the agent's sockets, if any.
    pub fn socket_mark(&self) -> Option<u32> {
        (self.socket_mark != 0).then_some(self.socket_mark)
    }

    pub fn h2(&self) -> H2Settings {
        H2Settings {
            stream_window: self.pool.stream_window,
            connection_window: self.pool.connection_window,
            max_frame_size: self.pool.max_frame_size,
            max_concurrent_streams: self.pool.max_streams.min(u32::MAX as usize) as u32,
        }
    }

    /// How workload certificates are requested and renewed.
    pub fn certificates(&self) -> crate::identity::CertManagerConfig {
        crate::identity::CertManagerConfig {
            ttl: self.ca.cert_ttl,
            ..Default::default()
        }
    }
}

/// `line:column: field: message` from a marked-yaml error.
pub fn describe_yaml_error(e: &marked_yaml::FromYamlError) -> String {
    use marked_yaml::FromYamlError;
    match e {
        FromYamlError::ParseYaml(e) => format!("YAML syntax: {e}"),
        FromYamlError::FromNode(e) => {
            let at = e
                .start_mark()
                .map(|m| format!("{}:{}: ", m.line(), m.column()))
                .unwrap_or_default();
            let field = e.path().map(|p| format!("{p}: ")).unwrap_or_default();
            let inner: &marked_yaml::Error = e;
            format!("{at}{field}{inner}")
        }
    }
}

/// `ISTIO_META_<KEY>=<value>` variables as `<KEY>: <value>`.
fn istio_meta(
    vars: impl Iterator<Item = (String, String)>,
) -> impl Iterator<Item = (String, String)> {
    vars.filter_map(|(k, v)| {
        let key = k.strip_prefix(ENV_META_PREFIX)?;
        (!key.is_empty()).then(|| (key.to_string(), v))
    })
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn default_node_name() -> String {
    std::env::var(ENV_NODE_NAME)
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_proxy_default_by_mode_and_ztunnels_dns_capture_metadata() {
        // ztunnel: on unless DNS_CAPTURE is present and not "true".
        let cases: &[(Mode, Option<bool>, Option<&str>, bool)] = &[
            (Mode::Istio, None, None, true),
            (Mode::Istio, None, Some("true"), true),
            (Mode::Istio, None, Some("TRUE"), true),
            (Mode::Istio, None, Some("false"), false),
            (Mode::Istio, None, Some(""), false),
            (Mode::Istio, Some(true), Some("false"), true),
            (Mode::Local, None, None, false),
            (Mode::Local, Some(true), None, true),
        ];
        for (mode, enabled, capture, want) in cases {
            let mut cfg = Config {
                mode: *mode,
                ..Config::default()
            };
            cfg.dns.enabled = *enabled;
            if let Some(v) = capture {
                cfg.control_plane
                    .proxy_metadata
                    .insert("DNS_CAPTURE".into(), v.to_string());
            }
            assert_eq!(cfg.dns_enabled(), *want, "{mode:?} {enabled:?} {capture:?}");
        }
    }

    #[test]
    fn istio_meta_variables_become_node_metadata() {
        // As Istio's proxies read them: the prefix is stripped, the rest
        // of the name is the key, unprefixed variables are not metadata.
        let vars = [
            ("ISTIO_META_CLUSTER_ID", "east"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("ISTIO_META_", "no key"),
            ("CLUSTER_ID", "not metadata"),
            ("XISTIO_META_A", "not metadata"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let got: Vec<(String, String)> = istio_meta(vars.into_iter()).collect();
        assert_eq!(
            got,
            [("CLUSTER_ID", "east"), ("DNS_CAPTURE", "true")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.ports.hbone, 15008);
        assert_eq!(cfg.ports.outbound, 15001);
        assert_eq!(cfg.ports.inbound_plaintext, 15006);
        assert_eq!(cfg.socket_mark(), Some(0x539));
        assert_eq!(cfg.pool.max_streams, 100);
        assert_eq!(cfg.pool.stream_window, 4 << 20);
        assert!(cfg.pool.connection_window > cfg.pool.stream_window);
    }

    #[test]
    fn istio_mode_defaults_are_istios() {
        let cfg = Config::parse("mode: istio\n").unwrap();
        assert_eq!(cfg.mode, Mode::Istio);
        let cp = &cfg.control_plane;
        let k8s = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
        assert_eq!(cp.xds_address, ztunnel_env::default_istiod_address(k8s));
        assert_eq!(
            cp.cni_socket,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(cp.cluster_id, "Kubernetes");
    }

    #[test]
    fn file_values() {
        let cfg = Config::parse(
            "node: n1\nmeshFile: mesh.yaml\nsocketMark: 0\npool:\n  maxStreams: 7\n  idleTimeout: 90s\nca:\n  certTtl: 1h\nlog:\n  format: json\n",
        )
        .unwrap();
        assert_eq!(cfg.node, "n1");
        assert_eq!(cfg.socket_mark(), None);
        assert_eq!(cfg.pool.max_streams, 7);
        assert_eq!(cfg.pool.idle_timeout, Duration::from_secs(90));
        assert_eq!(cfg.ca.cert_ttl, Duration::from_secs(3600));
        assert_eq!(cfg.log.format, LogFormat::Json);
    }

    #[test]
    fn bad_files_name_line_and_field() {
        let cases = [
            ("node: n1\nportz: {}\n", "portz"),
            ("pool:\n  maxStreams: lots\n", "2:"),
            ("pool:\n  idleTimeout: soon\n", "pool.idleTimeout"),
            ("log:\n  format: xml\n", "xml"),
            ("node: [\n", "YAML syntax"),
        ];
        for (text, want) in cases {
            let err = Config::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn overrides_win_and_invalid_combinations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "node: from-file\nmeshFile: m.yaml\n").unwrap();
        let cfg = Config::load(&Overrides {
            config: Some(path.clone()),
            node: Some("from-flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.node, "from-flag");
        assert_eq!(cfg.mesh_file, Some(dir.path().join("m.yaml")));

        std::fs::write(
            &path,
            "pool:\n  streamWindow: 1048576\n  connectionWindow: 1048576\n",
        )
        .unwrap();
        let err = Config::load(&Overrides {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("connectionWindow"), "{err}");
    }
}
