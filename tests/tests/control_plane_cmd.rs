//! `ambient-control-plane` run as a command: an xDS client gets the mesh
//! from it, the Istio CA signs through it, and an edit to the mesh file
//! reaches the client; a waypoint's client also gets the file's HTTP
//! routes (as Envoy RDS + EDS), a node agent's does not.

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

    // HTTP routes: to a client that subscribes as a waypoint, not to the
    // node agent's.
    let routed = |body: &str| {
        format!(
            "workloads:\n{}{}services:\n  - {{name: web, namespace: cp, vips: [10.96.61.1], ports: [{{port: 80}}], endpoints: [one, two]}}\nhttpRoutes:\n  - name: web\n    namespace: cp\n    service: cp/web.cp.svc.cluster.local\n    rules:\n{body}",
            workload("one", "127.61.0.1"),
            workload("two", "127.61.0.2"),
        )
    };
    std::fs::write(
        &mesh,
        routed("      - directResponse: {status: 418, body: first}\n"),
    )
    .unwrap();
    let waypoint_state = Arc::new(State::default());
    let waypoint = XdsClient::new(
        XdsConfig {
            address: get("xdsAddress"),
            node_id: "waypoint~127.61.0.8~wp.cp~cp.svc.cluster.local".into(),
            waypoint: true,
            ..XdsConfig::default()
        },
        waypoint_state.clone(),
    );
    tokio::spawn(waypoint.run(std::future::pending()));
    let answers = |st: &State| -> Vec<String> {
        st.snapshot()
            .http_routes()
            .iter()
            .flat_map(|r| &r.rules)
            .filter_map(|r| match &r.action {
                ambient_agent::state::HttpAction::Respond { status: 418, body } => {
                    Some(body.clone())
                }
                _ => None,
            })
            .collect()
    };
    let until = |st: Arc<State>, want: &'static str| async move {
        let mut changes = st.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            while answers(&st) != [want] {
                changes.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("routes answering {want:?}"));
    };
    until(waypoint_state.clone(), "first").await;
    std::fs::write(
        &mesh,
        routed("      - directResponse: {status: 418, body: second}\n"),
    )
    .unwrap();
    until(waypoint_state.clone(), "second").await;
    assert!(state
        .snapshot()
        .service_by_host("cp", "web.cp.svc.cluster.local")
        .is_some());
    assert!(
        state.snapshot().http_routes().is_empty(),
        "a node agent does not subscribe to routes"
    );
}
