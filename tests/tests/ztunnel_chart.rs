//! Istio's ztunnel Helm chart running this agent with only the image
//! swapped: the binary started as the chart starts it (`args: [proxy,
//! ztunnel]`), with exactly the environment the chart renders with default
//! values, and the chart's volumes at their paths. Facts from
//! istio/istio@86c9f01f `manifests/charts/ztunnel/templates/daemonset.yaml`
//! and istio/ztunnel@62d82653 `src/config.rs`.
//!
//! A private mount namespace stands in for the pod: the test's files are
//! bound at `/var/run/secrets/istio` (the `istio-ca-root-cert` ConfigMap:
//! `root-cert.pem`), `/var/run/secrets/tokens` (the projected token:
//! `istio-token`) and `/var/run/ztunnel` (istio-cni's socket directory),
//! and `/etc/hosts` names istiod (the Service DNS a pod resolves). Nothing
//! in the agent's environment points at the test: it finds everything at
//! ztunnel's defaults. Needs root.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::identity::LocalCa;
use ambient_agent::xds::local::parse_mesh;
use ambient_tests::control_plane::{ca::TestCa, istiod::TestIstiod, xds::TestXds, zds::TestCni};
use ambient_tests::istio::{get, info, mesh_of, netns, node_metadata, wait_for, TOKEN};
use ambient_tests::istio_cni;
use ambient_tests::netns::Topology;
use tokio::io::AsyncReadExt as _;

const NODE: &str = "worker-1";
const POD_IP: &str = "10.244.1.5";
/// Where the test istiod listens; /etc/hosts maps the chart's
/// `istiod.istio-system.svc` to it, on the chart's port 15012.
const ISTIOD: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 15, 12)), 15012);

/// The chart's `env:` with default values, in its order (the conditional
/// `LOG_FORMAT`, `NETWORK`, `ZTUNNEL_RESOURCE_CPU_LIMIT` and `CRL_PATH`
/// are not rendered by default); fieldRefs filled as the kubelet does:
/// `ZTUNNEL_CPU_LIMIT` is the node's cores when no limit is set, the
/// default `requests.cpu: 200m` with divisor 1 becomes 1. Plus the ambient
/// profile's proxyMetadata (`ISTIO_META_ENABLE_HBONE`) and the image's PATH.
fn chart_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CA_ADDRESS", "istiod.istio-system.svc:15012"),
        ("XDS_ADDRESS", "istiod.istio-system.svc:15012"),
        ("RUST_LOG", "info"),
        ("RUST_BACKTRACE", "1"),
        ("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        ("INPOD_ENABLED", "true"),
        ("TERMINATION_GRACE_PERIOD_SECONDS", "30"),
        ("POD_NAME", "ztunnel-x7k2p"),
        ("POD_NAMESPACE", "istio-system"),
        ("NODE_NAME", NODE),
        ("INSTANCE_IP", POD_IP),
        ("SERVICE_ACCOUNT", "ztunnel"),
        ("ISTIO_META_ENABLE_HBONE", "true"),
        ("ZTUNNEL_CPU_LIMIT", "8"),
        ("ZTUNNEL_RESOURCE_CPU_REQUEST", "1"),
        (
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ),
    ]
}

/// Mounts the pod's volumes in a private mount namespace, then becomes the
/// agent: `$1` is the test's directory, `$2` the agent binary.
const POD_MOUNTS: &str = r#"set -e
mount -t tmpfs pod-run /var/run
mkdir -p /var/run/secrets/istio /var/run/secrets/tokens /var/run/ztunnel
mount --bind "$1/istio" /var/run/secrets/istio
mount --bind "$1/tokens" /var/run/secrets/tokens
mount --bind "$1/ztunnel" /var/run/ztunnel
mount --bind "$1/hosts" /etc/hosts
exec "$2" proxy ztunnel
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_ztunnel_chart_runs_the_agent_with_only_the_image_swapped() {
    ambient_tests::init_tracing();
    let topo = Topology::new("zchart").expect("topology (needs root)");
    let pod = topo.add_pod("app", 0).expect("pod");

    // istiod: xDS and the CA on one TLS address, as on 15012.
    let xds = TestXds::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("xDS");
    xds.set_mesh(&parse_mesh("mesh", &mesh_of(&[(&pod, NODE)])).expect("mesh"));
    let mesh_root = Arc::new(LocalCa::generate("cluster.local").expect("root"));
    let ca = TestCa::start("127.0.0.1:0".parse().unwrap(), mesh_root.clone(), TOKEN)
        .await
        .expect("CA");
    let _istiod = TestIstiod::start(ISTIOD, &xds, &ca)
        .await
        .expect("istiod on 127.0.15.12:15012");

    // The pod's volumes.
    let dir = tempfile::tempdir().expect("tempdir");
    for sub in ["istio", "tokens", "ztunnel"] {
        std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
    }
    std::fs::write(
        dir.path().join("istio/root-cert.pem"),
        format!("{}{}", mesh_root.root_pem(), ca.root_pem()),
    )
    .expect("root");
    std::fs::write(dir.path().join("tokens/istio-token"), TOKEN).expect("token");
    std::fs::write(
        dir.path().join("hosts"),
        format!(
            "127.0.0.1 localhost\n{} istiod.istio-system.svc\n",
            ISTIOD.ip()
        ),
    )
    .expect("hosts");
    let cni = TestCni::start(&dir.path().join("ztunnel/ztunnel.sock"))
        .await
        .expect("CNI");

    let mut agent = tokio::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            POD_MOUNTS,
            "sh",
        ])
        .arg(dir.path())
        .arg(ambient_tests::agent_binary())
        .env_clear()
        .envs(chart_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs");
    let pid = agent.id().expect("pid");

    // istio-cni's socket at ztunnel's default INPOD_UDS.
    cni.wait_connected(Duration::from_secs(20))
        .await
        .expect("the agent connects to /var/run/ztunnel/ztunnel.sock");

    // xDS at the chart's XDS_ADDRESS (https added), verified with the
    // mounted root, the mounted token as bearer, ISTIO_META_CLUSTER_ID as
    // clusterid; ztunnel's node id from POD_NAME, POD_NAMESPACE,
    // INSTANCE_IP; metadata from NODE_NAME and the ISTIO_META_* variables.
    wait_for("the agent's xDS stream", || xds.last_node().is_some()).await;
    assert_eq!(xds.last_cluster_id().as_deref(), Some("Kubernetes"));
    assert_eq!(
        xds.last_authorization().as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    let node = xds.last_node().expect("node");
    assert_eq!(
        node.id,
        format!("ztunnel~{POD_IP}~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local")
    );
    let metadata = node_metadata(&node);
    for (k, v) in [
        ("NAME", "ztunnel-x7k2p"),
        ("NAMESPACE", "istio-system"),
        ("INSTANCE_IPS", POD_IP),
        ("NODE_NAME", NODE),
        ("CLUSTER_ID", "Kubernetes"),
        ("ENABLE_HBONE", "true"),
    ] {
        assert_eq!(
            metadata.get(k).map(String::as_str),
            Some(v),
            "{k} in {metadata:?}"
        );
    }

    // A pod handed over by the CNI gets its certificate from the CA at
    // CA_ADDRESS, with the same token and cluster.
    istio_cni::install_inpod(&pod.netns, true).expect("istio-cni rules");
    let added = cni
        .add_pod(&pod.name, &netns(&pod), info(&pod.name))
        .await
        .expect("the agent answers");
    assert_eq!(added, Ok(()));
    for _ in 0..200 {
        if ca.requests() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ca.requests() > 0, "no certificate asked of CA_ADDRESS");
    assert_eq!(ca.last_cluster_id().as_deref(), Some("Kubernetes"));

    // The chart's probe and Prometheus annotations: readiness on 15021,
    // metrics on 15020.
    let ready = SocketAddr::from(([127, 0, 0, 1], 15021));
    let mut ok = false;
    for _ in 0..100 {
        if probe(ready).await == Some(200) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "GET :15021/healthz/ready never answered 200");
    let metrics = get(SocketAddr::from(([127, 0, 0, 1], 15020)), "/metrics").await;
    assert!(metrics.contains("istio_build{"), "{metrics}");

    // The admin port's config dump shows the settings under ztunnel's
    // names and shapes (`config`, as ztunnel's `Config` serializes).
    let dump: serde_json::Value =
        serde_json::from_str(&get(SocketAddr::from(([127, 0, 0, 1], 15000)), "/config_dump").await)
            .expect("config_dump is JSON");
    let config = &dump["config"];
    for (key, want) in [
        (
            "xdsAddress",
            serde_json::json!("https://istiod.istio-system.svc:15012"),
        ),
        (
            "caAddress",
            serde_json::json!("https://istiod.istio-system.svc:15012"),
        ),
        ("localNode", serde_json::json!(NODE)),
        ("clusterId", serde_json::json!("Kubernetes")),
        (
            "selfTerminationDeadline",
            serde_json::json!({"secs": 25, "nanos": 0}),
        ),
        ("numWorkerThreads", serde_json::json!(2)),
        ("packetMark", serde_json::json!(1337)),
        (
            "inpodUds",
            serde_json::json!("/var/run/ztunnel/ztunnel.sock"),
        ),
        (
            "caRootCert",
            serde_json::json!({"File": "/var/run/secrets/istio/root-cert.pem"}),
        ),
        ("proxyArgs", serde_json::json!("proxy ztunnel")),
    ] {
        assert_eq!(config[key], want, "config.{key} in {config:#}");
    }

    // SIGTERM: the agent drains and exits; its log says once which of the
    // chart's variables have no effect (SERVICE_ACCOUNT: ztunnel's
    // self-proxy identity), and nothing about those neither reads.
    let _ = cni.del_pod(&pod.name).await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent exits within the 25 s drain deadline")
        .expect("wait");
    assert!(status.success(), "{status}");
    let mut log = String::new();
    if let Some(mut out) = agent.stdout.take() {
        out.read_to_string(&mut log).await.expect("stdout");
    }
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ztunnel setting has no effect here"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains("var=SERVICE_ACCOUNT"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    // Worker threads as ztunnel counts them: no CPU limit, so a quarter of
    // ZTUNNEL_CPU_LIMIT=8, at least the request (1) and at least 2; the
    // agent logs its runtime's count when it starts.
    let starting = log
        .lines()
        .find(|l| l.contains(" starting "))
        .unwrap_or_default();
    assert!(starting.contains("workers=2"), "{log}");
}

/// The status code of `GET /healthz/ready` at `addr`, if it answers.
async fn probe(addr: SocketAddr) -> Option<u16> {
    use tokio::io::AsyncWriteExt as _;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut raw))
        .await
        .ok()?
        .ok()?;
    raw.split_whitespace().nth(1)?.parse().ok()
}
