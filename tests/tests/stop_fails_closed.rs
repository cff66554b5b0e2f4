//! Stopping the agent never opens the pods: capture stays in their
//! namespaces, so while no agent serves them their TCP is refused (not
//! sent in plaintext, not let in unauthenticated); a new agent takes over;
//! only `ambient-agent uninstall` takes capture off.
//!
//! One test in its own binary: `uninstall` looks at every namespace of the
//! host, so nothing else may be running beside it. Needs root.

use std::time::Duration;

use ambient_tests::netns::{in_ns, Pod};
use ambient_tests::pods::*;
use ambient_tests::*;

fn has_capture(pod: &Pod) -> bool {
    in_ns(&pod.netns, "nft", &["list", "tables"]).is_ok_and(|t| t.contains("ambient_agent"))
}

#[tokio::test]
async fn a_stopped_agent_leaves_pods_refusing_and_uninstall_opens_them() {
    init_tracing();
    let m = PodMesh::build("stop");
    let echo = PodEcho::start(&m.server, 8080).await;
    let app = m.server_app(8080);
    let a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    assert!(allowed(&m.client, app).await, "through the mesh");
    let seen = echo.peer_ips().len();

    // A graceful stop (what SIGTERM does), of both agents.
    assert_eq!(a.drain(Duration::from_secs(1)).await, 0);
    assert_eq!(b.drain(Duration::from_secs(1)).await, 0);
    for pod in [&m.client, &m.server] {
        assert!(has_capture(pod), "capture removed from {}", pod.name);
    }
    // Nobody serves the pods: the client's outbound is refused, not sent
    // in plaintext; plaintext from outside the mesh does not get in.
    assert!(!allowed(&m.client, app).await, "the client's TCP leaked");
    assert!(!allowed(&m.outside, app).await, "plaintext reached the pod");
    assert_eq!(echo.peer_ips().len(), seen, "{:?}", echo.peer_ips());

    // A new agent takes the pods over.
    let a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    assert!(allowed(&m.client, app).await, "after the restart");
    drop((a, b));
    assert!(has_capture(&m.client) && has_capture(&m.server));

    // Taking the agent off the node for good.
    let done = ambient_agent::capture::uninstall();
    assert!(done.failed.is_empty(), "{:?}", done.failed);
    for pod in [&m.client, &m.server, &m.intruder] {
        assert!(!has_capture(pod), "capture left in {}", pod.name);
        let path = std::path::PathBuf::from(pod.netns_path());
        assert!(
            done.removed.contains(&path),
            "{path:?} not in {:?}",
            done.removed
        );
    }
    assert!(
        allowed(&m.outside, app).await,
        "no agent and no capture: plain TCP"
    );
}
