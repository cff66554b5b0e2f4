//! The `config` and `version` sections of `/config_dump`, in ztunnel's
//! shape (istio/ztunnel `src/config.rs` `Config`, `src/version.rs`
//! `BuildInfo`, serialized camelCase): the settings in force, under the
//! names ztunnel's users know, each from the setting of ours it maps to
//! (README, "Istio's ztunnel chart, image swapped"). Durations are serde's
//! `{"secs","nanos"}`, addresses `{"SocketAddr": "ip:port"}`, roots
//! `{"File": path}`, as ztunnel writes them. ztunnel's keys for what this
//! agent does not have (DNS resolver options) are left out rather than
//! given values that are not in force.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{Config, Mode};

/// ztunnel's `config` section for `cfg`, with the runtime's `workers`,
/// keys in its field order.
pub fn config(cfg: &Config, workers: usize) -> Value {
    let cp = &cfg.control_plane;
    let istio = cfg.mode == Mode::Istio;
    let any = match cfg.metrics_address {
        IpAddr::V6(_) => cfg.metrics_address,
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let addr = |ip: IpAddr, port: u16| json!({ "SocketAddr": SocketAddr::new(ip, port) });
    let root = |path: &std::path::Path| json!({ "File": path });
    let fields = [
        ("proxy", json!(true)),
        ("dnsProxy", json!(cfg.dns_enabled())),
        ("windowSize", json!(cfg.pool.stream_window)),
        ("connectionWindowSize", json!(cfg.pool.connection_window)),
        ("frameSize", json!(cfg.pool.max_frame_size)),
        ("poolMaxStreamsPerConn", json!(cfg.pool.max_streams)),
        (
            "poolUnusedReleaseTimeout",
            json!(duration(cfg.pool.idle_timeout)),
        ),
        ("socks5Addr", json!(null)),
        ("adminAddr", json!(addr(cfg.admin_address, cfg.admin_port))),
        (
            "statsAddr",
            json!(addr(cfg.metrics_address, cfg.metrics_port)),
        ),
        (
            "readinessAddr",
            json!(addr(cfg.readiness_address, cfg.readiness_port)),
        ),
        ("inboundAddr", json!(addr(any, cfg.ports.hbone))),
        (
            "inboundPlaintextAddr",
            json!(addr(any, cfg.ports.inbound_plaintext)),
        ),
        ("outboundAddr", json!(addr(any, cfg.ports.outbound))),
        (
            "dnsProxyAddr",
            json!(addr(IpAddr::V4(Ipv4Addr::LOCALHOST), cfg.dns.port)),
        ),
        (
            "illegalPorts",
            json!([
                cfg.ports.hbone,
                cfg.ports.inbound_plaintext,
                cfg.ports.outbound
            ]),
        ),
        ("network", json!("")),
        ("localNode", json!(cfg.node)),
        ("proxyMode", json!("Shared")),
        ("proxyWorkloadInformation", json!(null)),
        ("clusterId", json!(cp.cluster_id)),
        ("clusterDomain", json!(cfg.dns.cluster_domain)),
        (
            "caAddress",
            json!(istio.then(|| cp.ca_address.clone().unwrap_or(cp.xds_address.clone()))),
        ),
        ("caRootCert", json!(root(&cp.root_cert))),
        (
            "altCaHostname",
            json!(cp.ca_server_name.as_ref().or(cp.server_name.as_ref())),
        ),
        ("xdsAddress", json!(istio.then_some(&cp.xds_address))),
        (
            "xdsRootCert",
            json!(root(cp.xds_root_cert.as_ref().unwrap_or(&cp.root_cert))),
        ),
        (
            "altXdsHostname",
            json!(cp.xds_server_name.as_ref().or(cp.server_name.as_ref())),
        ),
        ("preferedServiceNamespace", json!(null)),
        ("secretTtl", json!(duration(cfg.ca.cert_ttl))),
        ("xdsOnDemand", json!(false)),
        ("fakeCa", json!(false)),
        ("fakeSelfInbound", json!(false)),
        (
            "selfTerminationDeadline",
            json!(duration(cfg.drain_timeout)),
        ),
        ("proxyMetadata", json!(cp.proxy_metadata)),
        ("numWorkerThreads", json!(workers)),
        ("requireOriginalSource", json!(true)),
        (
            "proxyArgs",
            json!(std::env::args().skip(1).collect::<Vec<_>>().join(" ")),
        ),
        ("inpodUds", json!(cp.cni_socket)),
        ("inpodPortReuse", json!(true)),
        ("packetMark", json!(cfg.socket_mark())),
        (
            "socketConfig",
            json!({
                "keepaliveTime": duration(cfg.keepalive.time),
                "keepaliveInterval": duration(cfg.keepalive.interval),
                "keepaliveRetries": cfg.keepalive.retries,
                "keepaliveEnabled": cfg.keepalive.enabled,
                "userTimeoutEnabled": cfg.keepalive.user_timeout,
            }),
        ),
        ("xdsHeaders", json!([])),
        ("caHeaders", json!([])),
        ("localhostAppTunnel", json!(true)),
        ("ztunnelIdentity", json!(null)),
        ("ztunnelWorkload", json!(null)),
        ("ipv6Enabled", json!(cfg.metrics_address.is_ipv6())),
        ("crlPath", json!(cfg.crl)),
        ("enableEnhancedBaggage", json!(false)),
    ];
    Value::Object(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// ztunnel's `version` section: `istioVersion` is the Istio release the
/// image belongs to (`ISTIO_META_ISTIO_VERSION`), as in `istio_build`.
pub fn version(istio_version: &str) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "gitRevision": "unknown",
        "rustVersion": "unknown",
        "buildProfile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "buildStatus": "unknown",
        "istioVersion": istio_version,
        "cryptoProvider": "aws-lc-rs",
    })
}

fn duration(d: Duration) -> Value {
    json!({ "secs": d.as_secs(), "nanos": d.subsec_nanos() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_value_shapes_are_ztunnels() {
        let cfg = Config::load_with_env(
            &crate::config::Overrides {
                mode: Some(Mode::Istio),
                ..Default::default()
            },
            &[
                ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
                ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
                ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
                ("NODE_NAME", "worker-1"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        )
        .expect("config")
        .0;
        let v = config(&cfg, 2);
        // ztunnel's serde shapes: Duration {secs,nanos}, Address
        // {"SocketAddr": ...}, RootCert {"File": ...}.
        assert_eq!(
            v["selfTerminationDeadline"],
            json!({"secs": 25, "nanos": 0})
        );
        assert_eq!(v["poolUnusedReleaseTimeout"]["secs"], 60);
        assert_eq!(v["adminAddr"], json!({"SocketAddr": "127.0.0.1:15000"}));
        assert_eq!(v["statsAddr"], json!({"SocketAddr": "0.0.0.0:15020"}));
        assert_eq!(
            v["caRootCert"],
            json!({"File": "/var/run/secrets/istio/root-cert.pem"})
        );
        assert_eq!(v["xdsAddress"], "https://istiod.istio-system.svc:15012");
        assert_eq!(v["caAddress"], "https://istiod.istio-system.svc:15012");
        assert_eq!(v["localNode"], "worker-1");
        assert_eq!(v["proxyMode"], "Shared");
        assert_eq!(v["packetMark"], 1337);
        assert_eq!(v["numWorkerThreads"], 2);
        assert_eq!(v["inpodUds"], "/var/run/ztunnel/ztunnel.sock");
        assert_eq!(v["illegalPorts"], json!([15008, 15006, 15001]));
        assert_eq!(v["windowSize"], 4 << 20);
        assert_eq!(v["clusterId"], cfg.control_plane.cluster_id);
        assert_eq!(v["socketConfig"]["keepaliveTime"]["secs"], 180);
        assert_eq!(v["socketConfig"]["keepaliveRetries"], 9);
        // What ztunnel has and this agent does not is absent, not invented.
        assert!(v.get("dnsResolverOpts").is_none());

        let local = config(&Config::default(), 1);
        assert!(local["xdsAddress"].is_null() && local["caAddress"].is_null());
        assert_eq!(version("1.28.0")["istioVersion"], "1.28.0");
    }
}
