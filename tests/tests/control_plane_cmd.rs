//! `ambient-control-plane` run as a command: an xDS client gets the mesh
//! from it, the Istio CA signs through it, and an edit to the mesh file
//! reaches the client.

use std::sync::Arc;
use std::time::Duration;

use ambient_agent::identity::istio_ca::{IstioCaClient, IstioCaConfig};
use ambient_agent::identity::{CertManager, Identity, TrustBundle};
use ambient_agent::state::State;
use ambient_agent::xds::delta::{XdsClient, XdsConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_mesh_file_over_xds_and_signs_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let workload = |uid: &str, ip: &str| {
        format!("  - {{uid: {uid}, name: {uid}, namespace: cp, addresses: [{ip}], node: n1}}\n")
    };
    std::fs::write(
        &mesh,
        format!("workloads:\n{}", workload("one", "127.61.0.1")),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ambient-control-plane"))
        .args([
            "--mesh",
            &mesh.to_string_lossy(),
            "--out",
            &dir.path().to_string_lossy(),
        ])
        .args(["--xds", "127.61.0.254:0", "--ca", "127.61.0.254:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut settings = std::collections::HashMap::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("control plane starts")
        .unwrap()
    {
        if line == "ready" {
            break;
        }
        if let Some((k, v)) = line.split_once(": ") {
            settings.insert(k.to_string(), v.to_string());
        }
    }
    let get = |k: &str| {
        settings
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k} in {settings:?}"))
    };

    let state = Arc::new(State::default());
    let xds = XdsClient::new(
        XdsConfig {
            address: get("xdsAddress"),
            node_id: "ztunnel~127.61.0.9~agent.istio-system~istio-system.svc.cluster.local".into(),
            ..XdsConfig::default()
        },
        state.clone(),
    );
    let mut changes = state.subscribe();
    tokio::spawn(xds.run(std::future::pending()));
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(state.snapshot().workload_by_uid("one").is_some());

    let roots: std::path::PathBuf = get("rootCert").into();
    let signer = IstioCaClient::new(IstioCaConfig {
        address: get("caAddress"),
        root_cert: roots.clone(),
        server_name: Some(get("serverName")),
        token_path: Some(get("tokenPath").into()),
        cluster_id: "Kubernetes".into(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let certs = CertManager::new(
        Arc::new(signer),
        TrustBundle::from_pem_file(&roots).unwrap(),
        Default::default(),
    );
    let cert = certs
        .fetch(&Identity::new("cluster.local", "cp", "default"))
        .await
        .unwrap();
    assert_eq!(
        cert.identity.to_string(),
        "spiffe://cluster.local/ns/cp/sa/default"
    );

    // An edit to the file reaches xDS clients.
    std::fs::write(
        &mesh,
        format!(
            "workloads:\n{}{}",
            workload("one", "127.61.0.1"),
            workload("two", "127.61.0.2")
        ),
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while state.snapshot().workload_by_uid("two").is_none() {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("edit pushed");
}
