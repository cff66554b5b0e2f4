//! The sections of the agent's configuration: each a typed struct with
//! its documented defaults (the `Config` in `mod.rs` holds them).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    env_or, ENV_CLUSTER_ID, ENV_INSTANCE_IP, ENV_META_CLUSTER_ID, ENV_POD_NAME, ENV_POD_NAMESPACE,
};
use crate::hbone::H2Settings;

/// The local certificate authority (local mode).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CaConfig {
    /// Root certificate (PEM). With `rootKey`, loaded; without both, a new
    /// root is generated at start (agents then trust only themselves).
    pub root_cert: Option<PathBuf>,
    /// Root private key (PEM, PKCS#8).
    pub root_key: Option<PathBuf>,
    /// With it, `rootCert`/`rootKey` are an intermediate CA (Istio's
    /// plug-in `ca-cert.pem`/`ca-key.pem`) and this PEM file holds the
    /// chain from it to the root (`cert-chain.pem`); workloads then serve
    /// leaf + intermediates and peers need only the root. Default: none.
    pub cert_chain: Option<PathBuf>,
    /// Roots trusted besides the local CA's own (PEM; e.g. the old root
    /// during a rotation, or another mesh's), re-read when the file
    /// changes. Default: none.
    pub trust_bundle: Option<PathBuf>,
    /// Trust domain of a generated root. Default: `cluster.local`.
    pub trust_domain: String,
    /// Lifetime of workload certificates; renewed at half-life. Default: 24h.
    #[serde(with = "humantime_serde")]
    pub cert_ttl: Duration,
}

/// Where configuration and identity come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Mesh from `meshFile`, certificates from the local CA, pods from the
    /// mesh file's `netns` paths.
    #[default]
    Local,
    /// Mesh over Delta xDS and certificates from the Istio CA (istiod), pods
    /// from the CNI over ZDS.
    Istio,
}

/// Istio mode settings; the defaults are Istio's own.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// istiod's xDS address. Default (ztunnel's):
    /// https://istiod.istio-system.svc:15012 when `$KUBERNETES_SERVICE_HOST`
    /// is set, else https://localhost:15012.
    pub xds_address: String,
    /// The Istio CA's address. Default: the xDS address.
    pub ca_address: Option<String>,
    /// Root that signed the CA's serving certificate, and the mesh root.
    /// Default: /var/run/secrets/istio/root-cert.pem.
    pub root_cert: PathBuf,
    /// Root that signed istiod's xDS serving certificate. Default: `rootCert`.
    pub xds_root_cert: Option<PathBuf>,
    /// Name in the control plane's certificates. Default: the host of
    /// each address.
    pub server_name: Option<String>,
    /// Name in istiod's xDS certificate. Default: `serverName`.
    pub xds_server_name: Option<String>,
    /// Name in the CA's certificate. Default: `serverName`.
    pub ca_server_name: Option<String>,
    /// Service-account token sent as the bearer credential.
    /// Default: /var/run/secrets/tokens/istio-token.
    pub token_path: PathBuf,
    /// The cluster's name: the `clusterid` header on the xDS and CA
    /// streams and `CLUSTER_ID` in the node metadata.
    /// Default: `$ISTIO_META_CLUSTER_ID`, else `$CLUSTER_ID`, else Kubernetes.
    pub cluster_id: String,
    /// Extra xDS node metadata (istiod reads e.g. `DNS_CAPTURE`,
    /// `DNS_AUTO_ALLOCATE`). `ISTIO_META_<KEY>` environment variables are
    /// added to it and win over the file, as in Istio's proxies.
    /// Default: none.
    pub proxy_metadata: std::collections::BTreeMap<String, String>,
    /// The CNI's ZDS socket. Default: /var/run/ztunnel/ztunnel.sock.
    pub cni_socket: PathBuf,
    /// The agent's own pod, as istiod knows it (its xDS node id).
    /// Default: `$POD_NAME`, `$POD_NAMESPACE` (else istio-system),
    /// `$INSTANCE_IP`, as the Istio charts set them.
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_ip: String,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            xds_address: super::ztunnel_env::default_istiod_address(
                std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            )
            .into(),
            ca_address: None,
            root_cert: "/var/run/secrets/istio/root-cert.pem".into(),
            xds_root_cert: None,
            server_name: None,
            xds_server_name: None,
            ca_server_name: None,
            token_path: "/var/run/secrets/tokens/istio-token".into(),
            cluster_id: std::env::var(ENV_META_CLUSTER_ID)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| env_or(ENV_CLUSTER_ID, "Kubernetes")),
            proxy_metadata: Default::default(),
            cni_socket: "/var/run/ztunnel/ztunnel.sock".into(),
            pod_name: env_or(ENV_POD_NAME, "ambient-agent"),
            pod_namespace: env_or(ENV_POD_NAMESPACE, "istio-system"),
            pod_ip: env_or(ENV_INSTANCE_IP, ""),
        }
    }
}

/// Listener ports (DESIGN §2).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ports {
    /// Outbound capture. Default: 15001.
    pub outbound: u16,
    /// Inbound plaintext capture. Default: 15006.
    pub inbound_plaintext: u16,
    /// Inbound HBONE. Default: 15008.
    pub hbone: u16,
}

/// HBONE connection pooling and HTTP/2 flow control (DESIGN §4).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PoolSettings {
    /// Streams per HTTP/2 connection before another opens. Default: 100.
    pub max_streams: usize,
    /// A connection with no stream for this long is closed. Default: 60s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 PING interval. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// A PING unanswered this long closes the connection and every stream
    /// on it (their connections are closed both ends). Default: 10s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Per-stream window in bytes. Default: 4 MiB.
    pub stream_window: u32,
    /// Per-connection window; must exceed the stream window. Default: 16 MiB.
    pub connection_window: u32,
    /// Largest HTTP/2 frame. Default: 1 MiB.
    pub max_frame_size: u32,
    /// Streams a connection carries over its life before it is retired;
    /// 0 = no limit. 1 forces an mTLS handshake per tunnel. Default: 0.
    pub streams_per_connection: u64,
    /// Connections to one peer that concurrent streams are spread over
    /// (least busy first) before they share one, so busy streams use more
    /// than one core. Default: 2.
    pub spread_connections: usize,
}

/// The DNS proxy: each enrolled pod's DNS (redirected by capture) is
/// answered from the mesh for mesh names and forwarded otherwise.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Default in Istio mode: on, as Istio's, following the proxy
    /// metadata `DNS_CAPTURE` as ztunnel does (off unless "true" when
    /// present; `ISTIO_META_DNS_CAPTURE` sets it). Default in local mode:
    /// off (the host's resolver is often on its loopback, which a pod
    /// cannot reach; turn it on with upstreams the pods can reach).
    pub enabled: Option<bool>,
    /// Default: 15053.
    pub port: u16,
    /// Resolvers for names the mesh does not know (`ip` or `ip:port`).
    /// Default: the `nameserver`s of /etc/resolv.conf.
    pub upstreams: Vec<String>,
    /// Budget for the upstreams' answer. Default: 5s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Default: cluster.local.
    pub cluster_domain: String,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            enabled: None,
            port: 15053,
            upstreams: Vec::new(),
            timeout: Duration::from_secs(5),
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// Bounds on the inbound mTLS handshakes of each HBONE listener. Excess
/// connections are closed and counted (`ambient_hbone_handshakes_failed_total`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HandshakeSettings {
    /// From accepting a connection to a finished handshake, waiting for the
    /// client's first bytes included. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Handshakes in progress at once (from a client's first bytes).
    /// Default: 1024.
    pub max_concurrent: usize,
    /// Of those, from one client address. Default: 64.
    pub max_per_client: usize,
}

impl Default for HandshakeSettings {
    fn default() -> Self {
        let l = crate::hbone::server::HandshakeLimits::default();
        HandshakeSettings {
            timeout: l.timeout,
            max_concurrent: l.max_concurrent,
            max_per_client: l.max_per_client,
        }
    }
}

impl HandshakeSettings {
    pub fn limits(&self) -> crate::hbone::server::HandshakeLimits {
        crate::hbone::server::HandshakeLimits {
            timeout: self.timeout,
            max_concurrent: self.max_concurrent.max(1),
            max_per_client: self.max_per_client.max(1),
        }
    }
}

/// TCP keepalive on the agent's connections (to and from applications,
/// to and from peer agents), so a peer that vanished without closing is
/// noticed and its connection closed (with the other side). The defaults
/// are ztunnel's: a dead peer on an idle connection is noticed within
/// time + retries x interval = 30 minutes.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KeepaliveConfig {
    /// Default: true.
    pub enabled: bool,
    /// Idle time before the first probe. Default: 180s.
    #[serde(with = "humantime_serde")]
    pub time: Duration,
    /// Between probes. Default: 180s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Unanswered probes before the connection is closed. Default: 9.
    pub retries: u32,
    /// Also close a connection whose sent data stays unacknowledged for
    /// time + retries x interval (TCP_USER_TIMEOUT). Default: false.
    pub user_timeout: bool,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        KeepaliveConfig {
            enabled: true,
            time: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            retries: 9,
            user_timeout: false,
        }
    }
}

impl KeepaliveConfig {
    /// The socket options, or `None` when disabled.
    pub fn socket(&self) -> Option<crate::socket::Keepalive> {
        self.enabled.then_some(crate::socket::Keepalive {
            time: self.time,
            interval: self.interval,
            retries: self.retries,
            user_timeout: self.user_timeout,
        })
    }
}

/// What one workload may hold open in the agent, so a noisy pod cannot
/// exhaust it for the others; over a cap, a connection is refused (HBONE:
/// 503) and recorded with response flag `UO`. 0 = no cap.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections open through the agent, in and out together.
    /// Default: 65536.
    pub connections_per_workload: usize,
    /// Inbound HBONE streams being admitted (policy, connecting to the
    /// application) at once. Default: 1024.
    pub pending_streams_per_workload: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections_per_workload: 65_536,
            pending_streams_per_workload: 1024,
        }
    }
}

impl LimitsConfig {
    pub fn workload(&self) -> crate::proxy::limits::WorkloadLimits {
        crate::proxy::limits::WorkloadLimits {
            connections: self.connections_per_workload,
            pending_streams: self.pending_streams_per_workload,
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `ambient_agent=debug`. Default: info.
    pub level: String,
    /// `text` or `json`. Default: text.
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for CaConfig {
    fn default() -> Self {
        CaConfig {
            root_cert: None,
            root_key: None,
            cert_chain: None,
            trust_bundle: None,
            trust_domain: "cluster.local".into(),
            cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound_plaintext: 15006,
            hbone: crate::hbone::HBONE_PORT,
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        let h2 = H2Settings::default();
        PoolSettings {
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            stream_window: h2.stream_window,
            connection_window: h2.connection_window,
            max_frame_size: h2.max_frame_size,
            streams_per_connection: 0,
            spread_connections: 2,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}
