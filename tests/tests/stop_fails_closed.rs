//! Stopping the agent never opens the pods: capture stays in their
//! namespaces, so while no agent serves them their TCP is refused (not
//! sent in plaintext, not let in unauthenticated); a new agent takes over;
//! only `ambient-agent uninstall` takes capture off. For both backends:
//! the eBPF programs go with the agent's process, and the nft fail-safe
//! they are installed with refuses what they no longer redirect.
//!
//! One test in its own binary: `uninstall` looks at every namespace of the
//! host, so nothing else may be running beside it. Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use ambient_agent::capture::CaptureMode;
use ambient_tests::netns::{in_ns, Pod};
use ambient_tests::pods::*;
use ambient_tests::*;

fn has_capture(pod: &Pod) -> bool {
    in_ns(&pod.netns, "nft", &["list", "tables"]).is_ok_and(|t| t.contains("ambient_agent"))
}

/// Whether `from`'s own application (the pod-client process, in the pod's
/// cgroup, as eBPF capture needs) gets its bytes echoed by `dst`.
async fn pod_app_reaches(from: &Pod, dst: SocketAddr) -> bool {
    let exe = env!("CARGO_BIN_EXE_pod-client");
    match tokio::time::timeout(
        Duration::from_secs(10),
        from.run_client(exe, false, dst, 4096, 5),
    )
    .await
    {
        Ok(Ok(x)) => x.sent == x.received,
        _ => false,
    }
}

/// Stops (gracefully) and restarts the agents of a mesh capturing with
/// `mode`; returns the mesh for the uninstall check.
async fn stop_and_take_over(mode: CaptureMode, tag: &str) -> PodMesh {
    let m = PodMesh::build(tag);
    let echo = PodEcho::start(&m.server, 8080).await;
    let app = m.server_app(8080);
    let a = m.agent_capturing("node-a", mode).await;
    let b = m.agent_capturing("node-b", mode).await;
    assert!(
        pod_app_reaches(&m.client, app).await,
        "{mode:?}: through the mesh"
    );
    // A socket of the pod's namespace made by a process outside its
    // cgroup: nft captures it; the eBPF programs (cgroup hooks) do not see
    // it, and the fail-safe refuses it rather than let it out in plaintext.
    let outside_cgroup = allowed(&m.client, app).await;
    assert_eq!(outside_cgroup, mode == CaptureMode::Nft, "{mode:?}");
    let seen = echo.peer_ips().len();

    // A graceful stop (what SIGTERM does), of both agents.
    assert_eq!(a.drain(Duration::from_secs(1)).await, 0);
    assert_eq!(b.drain(Duration::from_secs(1)).await, 0);
    for pod in [&m.client, &m.server] {
        assert!(
            has_capture(pod),
            "{mode:?}: capture removed from {}",
            pod.name
        );
    }
    // Nobody serves the pods: the client's outbound is refused, not sent
    // in plaintext; plaintext from outside the mesh does not get in.
    assert!(
        !pod_app_reaches(&m.client, app).await,
        "{mode:?}: the client's TCP leaked"
    );
    assert!(
        !allowed(&m.outside, app).await,
        "{mode:?}: plaintext reached the pod"
    );
    assert_eq!(
        echo.peer_ips().len(),
        seen,
        "{mode:?}: {:?}",
        echo.peer_ips()
    );

    // A new agent takes the pods over.
    let a = m.agent_capturing("node-a", mode).await;
    let b = m.agent_capturing("node-b", mode).await;
    assert!(
        pod_app_reaches(&m.client, app).await,
        "{mode:?}: after the restart"
    );
    drop((a, b));
    assert!(has_capture(&m.client) && has_capture(&m.server));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_leaves_pods_refusing_and_uninstall_opens_them() {
    init_tracing();
    let meshes = [
        stop_and_take_over(CaptureMode::Nft, "stopnft").await,
        stop_and_take_over(CaptureMode::Ebpf, "stopbpf").await,
    ];

    // Taking the agent off the node for good.
    let done = ambient_agent::capture::uninstall();
    assert!(done.failed.is_empty(), "{:?}", done.failed);
    for m in &meshes {
        for pod in [&m.client, &m.server, &m.intruder] {
            assert!(!has_capture(pod), "capture left in {}", pod.name);
            let path = std::path::PathBuf::from(pod.netns_path());
            assert!(
                done.removed.contains(&path),
                "{path:?} not in {:?}",
                done.removed
            );
        }
        let _echo = PodEcho::start(&m.server, 8080).await;
        let app = m.server_app(8080);
        assert!(
            allowed(&m.outside, app).await,
            "no agent and no capture: plain TCP"
        );
        assert!(
            pod_app_reaches(&m.client, app).await,
            "no agent and no capture"
        );
    }
}
