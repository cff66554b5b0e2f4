//! ztunnel's environment, checked against facts from istio/ztunnel@62d82653
//! (`src/config.rs`) and the environment Istio's chart renders
//! (istio/istio@86c9f01f `manifests/charts/ztunnel/templates/daemonset.yaml`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Config, ConfigError, LogFormat, Mode, Overrides};

fn env(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn istio() -> Overrides {
    Overrides {
        mode: Some(Mode::Istio),
        ..Default::default()
    }
}

fn load(vars: &[(&str, &str)]) -> Result<(Config, Vec<String>), ConfigError> {
    Config::load_with_env(&istio(), &env(vars))
        .map(|(c, ignored)| (c, ignored.into_iter().map(|i| i.var).collect()))
}

/// The chart's `env:` with default values, in its order, the downward-API
/// fields filled as the kubelet would (`ZTUNNEL_CPU_LIMIT` is the node's
/// cores when no limit is set; `requests.cpu: 200m` with divisor 1 is
/// rounded up to 1), and the ambient profile's proxyMetadata
/// (`ISTIO_META_ENABLE_HBONE`).
pub const CHART_ENV: &[(&str, &str)] = &[
    ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
    ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
    ("RUST_LOG", "info"),
    ("RUST_BACKTRACE", "1"),
    ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
    ("INPOD_ENABLED", "true"),
    ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
    ("POD_NAME", "ztunnel-x7k2p"),
    ("POD_NAMESPACE", "istio-system"),
    ("NODE_NAME", "worker-1"),
    ("INSTANCE_IP", "10.244.1.5"),
    ("SERVICE_ACCOUNT", "ztunnel"),
    ("ISTIO_META_ENABLE_HBONE", "true"),
    ("ZTUNNEL_CPU_LIMIT", "8"),
    ("ZTUNNEL_RESOURCE_CPU_REQUEST", "1"),
];

#[test]
fn the_charts_environment_configures_istio_mode_as_ztunnel() {
    let (cfg, ignored) = load(CHART_ENV).expect("loads");
    let cp = &cfg.control_plane;
    // validate_uri: a value without a scheme gets https://.
    assert_eq!(cp.xds_address, "https://istiod.istio-system.svc:15012");
    assert_eq!(
        cp.ca_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    // ISTIO_META_CLUSTER_ID wins over CLUSTER_ID; both are metadata too.
    assert_eq!(cp.cluster_id, "Kubernetes");
    assert_eq!(
        cp.proxy_metadata.get("CLUSTER_ID").map(String::as_str),
        Some("Kubernetes")
    );
    assert_eq!(
        cp.proxy_metadata.get("ENABLE_HBONE").map(String::as_str),
        Some("true")
    );
    assert_eq!(cfg.node, "worker-1");
    assert_eq!(
        (
            cp.pod_name.as_str(),
            cp.pod_namespace.as_str(),
            cp.pod_ip.as_str()
        ),
        ("ztunnel-x7k2p", "istio-system", "10.244.1.5")
    );
    // Grace period 30 s > 10 s: the deadline is 5 s less.
    assert_eq!(cfg.drain_timeout, Duration::from_secs(25));
    assert_eq!(cfg.log.level, "info");
    assert_eq!(cfg.log.format, LogFormat::Text);
    // No explicit limit: max(ceil(8 * 0.25), request 1, 2) = 2.
    assert_eq!(cfg.worker_threads, Some(2));
    // Defaults ztunnel shares: PACKET_MARK 1337, INPOD_UDS, root cert
    // and token under /var/run/secrets, the DNS proxy on (no DNS_CAPTURE).
    assert_eq!(cfg.socket_mark(), Some(1337));
    assert_eq!(
        cp.cni_socket,
        std::path::Path::new("/var/run/ztunnel/ztunnel.sock")
    );
    assert_eq!(
        cp.root_cert,
        std::path::Path::new("/var/run/secrets/istio/root-cert.pem")
    );
    assert_eq!(
        cp.token_path,
        std::path::Path::new("/var/run/secrets/tokens/istio-token")
    );
    assert!(cfg.dns_enabled());
    assert_eq!(cfg.capture(), crate::capture::CaptureMode::None);
    // Keepalive: ztunnel's defaults, 180s/180s/9, no user timeout.
    let ka = cfg.keepalive.socket().expect("keepalive on");
    assert_eq!(
        (ka.time, ka.interval, ka.retries, ka.user_timeout),
        (Duration::from_secs(180), Duration::from_secs(180), 9, false)
    );
    // INPOD_ENABLED and RUST_BACKTRACE are set by the chart but read by
    // neither ztunnel nor us: not reported. SERVICE_ACCOUNT names
    // ztunnel's self-proxy identity, which we do not serve.
    assert_eq!(ignored, ["SERVICE_ACCOUNT"]);
}

#[test]
fn each_variable_maps_to_its_setting() {
    type Check = fn(&Config) -> bool;
    let cases: &[(&str, &str, Check)] = &[
        ("XDS_ADDRESS", "http://istiod:15010", |c| {
            c.control_plane.xds_address == "http://istiod:15010"
        }),
        ("XDS_ROOT_CA", "/etc/xds-root.pem", |c| {
            c.control_plane.xds_root_cert.as_deref() == Some("/etc/xds-root.pem".as_ref())
        }),
        ("CA_ROOT_CA", "/etc/ca-root.pem", |c| {
            c.control_plane.root_cert == std::path::Path::new("/etc/ca-root.pem")
        }),
        ("ALT_XDS_HOSTNAME", "istiod.example", |c| {
            c.control_plane.xds_server_name.as_deref() == Some("istiod.example")
                && c.control_plane.ca_server_name.is_none()
        }),
        ("ALT_CA_HOSTNAME", "ca.example", |c| {
            c.control_plane.ca_server_name.as_deref() == Some("ca.example")
        }),
        ("AUTH_TOKEN", "/var/run/t/token", |c| {
            c.control_plane.token_path == std::path::Path::new("/var/run/t/token")
        }),
        ("CLUSTER_ID", "east", |c| {
            c.control_plane.cluster_id == "east"
        }),
        ("CLUSTER_DOMAIN", "corp.local", |c| {
            c.dns.cluster_domain == "corp.local"
        }),
        ("INPOD_UDS", "/run/cni/z.sock", |c| {
            c.control_plane.cni_socket == std::path::Path::new("/run/cni/z.sock")
        }),
        ("PACKET_MARK", "4242", |c| c.socket_mark == 4242),
        ("PROXY_MODE", "shared", |c| c.mode == Mode::Istio),
        ("POOL_MAX_STREAMS_PER_CONNECTION", "250", |c| {
            c.pool.max_streams == 250
        }),
        // duration-str: a bare number is seconds; expressions add.
        ("POOL_UNUSED_RELEASE_TIMEOUT", "90", |c| {
            c.pool.idle_timeout == Duration::from_secs(90)
        }),
        ("POOL_UNUSED_RELEASE_TIMEOUT", "3m+31", |c| {
            c.pool.idle_timeout == Duration::from_secs(211)
        }),
        ("HTTP2_STREAM_WINDOW_SIZE", "1048576", |c| {
            c.pool.stream_window == 1 << 20
        }),
        ("HTTP2_CONNECTION_WINDOW_SIZE", "33554432", |c| {
            c.pool.connection_window == 32 << 20
        }),
        ("HTTP2_FRAME_SIZE", "65536", |c| {
            c.pool.max_frame_size == 65536
        }),
        ("CONNECTION_TERMINATION_DEADLINE", "12s", |c| {
            c.drain_timeout == Duration::from_secs(12)
        }),
        ("SECRET_TTL", "12h", |c| {
            c.ca.cert_ttl == Duration::from_secs(12 * 3600)
        }),
        ("KEEPALIVE_ENABLED", "false", |c| {
            c.keepalive.socket().is_none()
        }),
        ("KEEPALIVE_TIME", "60s", |c| {
            c.keepalive.time == Duration::from_secs(60)
        }),
        ("KEEPALIVE_INTERVAL", "20", |c| {
            c.keepalive.interval == Duration::from_secs(20)
        }),
        ("KEEPALIVE_RETRIES", "3", |c| c.keepalive.retries == 3),
        ("USER_TIMEOUT_ENABLED", "true", |c| c.keepalive.user_timeout),
        ("CRL_PATH", "/var/run/secrets/istio/crl/ca-crl.pem", |c| {
            c.crl.as_deref() == Some("/var/run/secrets/istio/crl/ca-crl.pem".as_ref())
        }),
        ("IPV6_ENABLED", "true", |c| {
            c.metrics_address.is_ipv6() && c.readiness_address.is_ipv6()
        }),
        ("IPV6_ENABLED", "false", |c| {
            c.metrics_address.is_ipv4() && c.readiness_address.is_ipv4()
        }),
        ("LOG_FORMAT", "json", |c| c.log.format == LogFormat::Json),
        ("LOG_FORMAT", "plain", |c| c.log.format == LogFormat::Text),
        ("RUST_LOG", "ambient_agent=debug", |c| {
            c.log.level == "ambient_agent=debug"
        }),
        ("ISTIO_META_DNS_CAPTURE", "false", |c| !c.dns_enabled()),
        ("ISTIO_META_DNS_PROXY_ADDR", "localhost:15054", |c| {
            c.dns.port == 15054
        }),
        ("ZTUNNEL_WORKER_THREADS", "3", |c| {
            c.worker_threads == Some(3)
        }),
        (
            "PROXY_CONFIG",
            "discoveryAddress: istiod-1-24.istio-system.svc:15012",
            |c| c.control_plane.xds_address == "https://istiod-1-24.istio-system.svc:15012",
        ),
        (
            "PROXY_CONFIG",
            "proxyAdminPort: 15100\nstatsPort: 15120\nconcurrency: 3",
            |c| c.admin_port == 15100 && c.metrics_port == 15120 && c.worker_threads == Some(3),
        ),
        (
            "PROXY_CONFIG",
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"",
            |c| !c.dns_enabled(),
        ),
    ];
    for (var, value, check) in cases {
        let (cfg, _) = load(&[(var, value)]).unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        assert!(check(&cfg), "{var}={value}: {cfg:#?}");
    }
}

#[test]
fn precedence_between_variables() {
    // XDS_ADDRESS over ProxyConfig's discoveryAddress.
    let (cfg, _) = load(&[
        ("XDS_ADDRESS", "istiod-a:15012"),
        ("PROXY_CONFIG", "discoveryAddress: istiod-b:15012"),
    ])
    .unwrap();
    assert_eq!(cfg.control_plane.xds_address, "https://istiod-a:15012");
    // CA_ADDRESS unset: ztunnel's default istiod address, not XDS_ADDRESS.
    assert_eq!(
        cfg.control_plane.ca_address.as_deref(),
        Some("https://localhost:15012")
    );
    let (cfg, _) = load(&[
        ("XDS_ADDRESS", "istiod-a:15012"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
    ])
    .unwrap();
    assert_eq!(
        cfg.control_plane.ca_address.as_deref(),
        Some("https://istiod.istio-system.svc:15012")
    );
    // ISTIO_META_* over ProxyConfig's proxyMetadata.
    let (cfg, _) = load(&[
        ("ISTIO_META_DNS_CAPTURE", "true"),
        ("PROXY_CONFIG", "proxyMetadata: {DNS_CAPTURE: \"false\"}"),
    ])
    .unwrap();
    assert!(cfg.dns_enabled());
    // CONNECTION_TERMINATION_DEADLINE over the grace period.
    let (cfg, _) = load(&[
        ("CONNECTION_TERMINATION_DEADLINE", "7s"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
    ])
    .unwrap();
    assert_eq!(cfg.drain_timeout, Duration::from_secs(7));
}

#[test]
fn termination_deadline_from_the_grace_period() {
    // secs > 10: secs - 5; else secs - 1; never below 1.
    for (secs, want) in [
        ("30", 25),
        ("11", 6),
        ("10", 9),
        ("2", 1),
        ("1", 1),
        ("0", 1),
    ] {
        let (cfg, _) = load(&[("TERMINATION_GRACE_PERIOD_SECONDS", secs)]).unwrap();
        assert_eq!(cfg.drain_timeout, Duration::from_secs(want), "{secs}");
    }
}

#[test]
fn worker_threads_as_ztunnel_counts_them() {
    let cases: &[(&[(&str, &str)], usize)] = &[
        // A quarter of the CPUs, at least 2 and at least the request.
        (&[("ZTUNNEL_CPU_LIMIT", "32")], 8),
        (&[("ZTUNNEL_CPU_LIMIT", "4")], 2),
        (
            &[
                ("ZTUNNEL_CPU_LIMIT", "4"),
                ("ZTUNNEL_RESOURCE_CPU_REQUEST", "3"),
            ],
            3,
        ),
        (
            &[
                ("ZTUNNEL_CPU_LIMIT", "4"),
                ("ZTUNNEL_RESOURCE_CPU_REQUEST", "2500m"),
            ],
            3,
        ),
        // An explicit limit wins, even below 2; the request raises it.
        (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1")], 1),
        (&[("ZTUNNEL_RESOURCE_CPU_LIMIT", "1.5")], 2),
        (
            &[
                ("ZTUNNEL_RESOURCE_CPU_LIMIT", "500m"),
                ("ZTUNNEL_RESOURCE_CPU_REQUEST", "4"),
            ],
            4,
        ),
        // ZTUNNEL_WORKER_THREADS: N, N% of the CPUs (rounded up), 0 = all.
        (
            &[("ZTUNNEL_WORKER_THREADS", "5"), ("ZTUNNEL_CPU_LIMIT", "32")],
            5,
        ),
        (
            &[
                ("ZTUNNEL_WORKER_THREADS", "10%"),
                ("ZTUNNEL_CPU_LIMIT", "32"),
            ],
            4,
        ),
        (
            &[("ZTUNNEL_WORKER_THREADS", "1%"), ("ZTUNNEL_CPU_LIMIT", "4")],
            1,
        ),
        (
            &[("ZTUNNEL_WORKER_THREADS", "0"), ("ZTUNNEL_CPU_LIMIT", "6")],
            6,
        ),
        (
            &[
                ("PROXY_CONFIG", "concurrency: 0"),
                ("ZTUNNEL_CPU_LIMIT", "6"),
            ],
            6,
        ),
    ];
    for (vars, want) in cases {
        let (cfg, _) = load(vars).unwrap_or_else(|e| panic!("{vars:?}: {e}"));
        assert_eq!(cfg.worker_threads, Some(*want), "{vars:?}");
    }
    // Nothing set: our default (one per core), not ztunnel's.
    assert_eq!(load(&[]).unwrap().0.worker_threads, None);
}

#[test]
fn bad_values_are_refused_in_ztunnels_words() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        // bool::from_str: only "true" and "false".
        (
            &[("INPOD_PORT_REUSE", "1")],
            "invalid env var INPOD_PORT_REUSE=1",
        ),
        (
            &[("IPV6_ENABLED", "True")],
            "invalid env var IPV6_ENABLED=True",
        ),
        (
            &[("PACKET_MARK", "0x539")],
            "invalid env var PACKET_MARK=0x539",
        ),
        (
            &[("POOL_MAX_STREAMS_PER_CONNECTION", "70000")],
            "POOL_MAX_STREAMS_PER_CONNECTION=70000",
        ),
        (&[("SECRET_TTL", "soon")], "invalid env var SECRET_TTL=soon"),
        (&[("ZTUNNEL_WORKER_THREADS", "150%")], "between 0 and 100"),
        (
            &[("ZTUNNEL_RESOURCE_CPU_REQUEST", "-1")],
            "positive CPU quantity",
        ),
        (&[("PROXY_CONFIG", "concurrency: [")], "PROXY_CONFIG"),
        // Not ignorable: the agent would not be what its operator asked.
        (
            &[("PROXY_MODE", "dedicated")],
            "dedicated (per-pod) mode is not supported",
        ),
        (&[("PROXY_MODE", "Shared")], "expected shared or dedicated"),
        (&[("LOCAL_XDS_PATH", "/etc/z.yaml")], "local config format"),
        (&[("FAKE_CA", "true")], "no fake CA"),
        (&[("ENABLE_PROXY", "false")], "DNS-only"),
        (&[("COMPLIANCE_POLICY", "pqc")], "post-quantum"),
        (&[("XDS_ADDRESS", "")], "XDS_ADDRESS="),
        (&[("XDS_ROOT_CA", "SYSTEM")], "only a root certificate file"),
        (
            &[("CA_ROOT_CA", "-----BEGIN CERTIFICATE-----\nMII")],
            "<inline PEM>",
        ),
        (&[("AUTH_TOKEN", "eyJhbGciOi")], "only a token file path"),
        // Checked by our own rules after mapping.
        (
            &[("HTTP2_CONNECTION_WINDOW_SIZE", "1024")],
            "connectionWindow",
        ),
        (&[("KEEPALIVE_RETRIES", "0")], "retries within"),
        (
            &[("KEEPALIVE_ENABLED", "yes")],
            "invalid env var KEEPALIVE_ENABLED=yes",
        ),
    ];
    for (vars, want) in cases {
        let err = load(vars)
            .map(|_| ())
            .expect_err(&format!("{vars:?} accepted"));
        assert!(err.to_string().contains(want), "{vars:?}: {err}");
    }
}

#[test]
fn variables_without_effect_are_reported_once_each() {
    let (_, ignored) = load(&[
        ("NETWORK", "net-1"),
        // Honoured: not reported.
        ("KEEPALIVE_TIME", "60s"),
        ("XDS_HEADER_X_ORG", "acme"),
        ("XDS_ON_DEMAND", "true"),
        // Our behaviour already: not reported.
        ("XDS_ON_DEMAND_X", "true"),
        ("INPOD_PORT_REUSE", "true"),
        ("ENABLE_ORIG_SRC", "false"),
    ])
    .unwrap();
    let mut ignored = ignored;
    ignored.sort();
    assert_eq!(
        ignored,
        [
            "ENABLE_ORIG_SRC",
            "NETWORK",
            "XDS_HEADER_X_ORG",
            "XDS_ON_DEMAND"
        ]
    );
}

#[test]
fn local_mode_reads_none_of_them() {
    let vars = env(&[
        ("PACKET_MARK", "7"),
        ("XDS_ADDRESS", ""),
        ("PROXY_MODE", "dedicated"),
    ]);
    let (cfg, ignored) = Config::load_with_env(&Overrides::default(), &vars).expect("loads");
    assert_eq!(cfg.mode, Mode::Local);
    assert_eq!(cfg.socket_mark, 0x539);
    assert!(ignored.is_empty());
}

#[test]
fn default_istiod_address_depends_on_kubernetes() {
    // ztunnel: the in-cluster Service when KUBERNETES_SERVICE_HOST is set.
    assert_eq!(
        super::default_istiod_address(true),
        "https://istiod.istio-system.svc:15012"
    );
    assert_eq!(
        super::default_istiod_address(false),
        "https://localhost:15012"
    );
}
