//! Bad control-plane pushes and workload changes: what the agent applies,
//! and what it never lets weaken policy or capture.

use super::*;

/// Point 2: istiod sends `Match.service_accounts` (11) and
/// `Authorization.dry_run` (6); an agent that dropped them turned an ALLOW
/// of one service account into "everyone" and enforced dry-run DENYs.
/// Service accounts compare namespace and name (ztunnel's rbac.rs); a
/// dry-run policy is evaluated and logged, never enforced.
#[tokio::test]
async fn service_account_allows_and_dry_run_denies_arrive_over_xds_with_their_meaning() {
    init_tracing();
    let w = World::new(91);
    let policies = r#"
  - name: allow-client-sa
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [server]
    rules:
      - clauses:
          - matches:
              - serviceAccounts: [test/client]
  - name: dry-deny-client
    namespace: test
    action: DENY
    dryRun: true
    rules:
      - clauses:
          - matches:
              - principals: ["cluster.local/ns/test/sa/client"]
"#;
    let (xds, b, _feed, _echo) = xds_served_node_b(&w, &mesh_with_policies(&w, policies)).await;
    let client = Identity::new("cluster.local", "test", "client");
    // Same name, another namespace; and another name in the namespace.
    let other_ns = Identity::new("cluster.local", "prod", "client");
    let other_sa = Identity::new("cluster.local", "test", "robot");
    assert_eq!(
        status_as(&w, client).await,
        StatusCode::OK,
        "dry run enforced"
    );
    assert_eq!(status_as(&w, other_ns).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_as(&w, other_sa).await, StatusCode::UNAUTHORIZED);
    assert!(xds.nacks().is_empty(), "{:?}", xds.nacks());
    // Evaluated and counted (and logged), though not enforced.
    let text = metrics_text(&b);
    let label = "policy=\"test/dry-deny-client\",action=\"deny\"";
    assert_eq!(
        metric_sum(&text, "ambient_dry_run_policy_matches_total", label),
        1,
        "{text}"
    );
}

/// Point 3: a response was applied whole or not at all, so a valid DENY
/// that came beside an undecodable resource was NACKed with it, never
/// applied, and never sent again. ztunnel applies each resource on its
/// own and NACKs only the bad ones (src/xds/client.rs,
/// `handle_single_resource`).
#[tokio::test]
async fn a_valid_deny_beside_a_bad_resource_is_applied() {
    init_tracing();
    let w = World::new(92);
    let (xds, b, _feed, _echo) = xds_served_node_b(&w, &mesh_with_policies(&w, "")).await;
    let client = Identity::new("cluster.local", "test", "client");
    assert_eq!(status_as(&w, client.clone()).await, StatusCode::OK);

    let deny = mesh_with_policies(&w, DENY_CLIENT);
    let encoded = ambient_agent::xds::delta::encode_mesh(&deny).expect("encode");
    let good = Resource {
        name: "test/deny-client".into(),
        resource: encoded.authorizations.get("test/deny-client").cloned(),
        ..Default::default()
    };
    let bad = Resource {
        name: "test/garbage".into(),
        resource: Some(Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![0x0a, 0xff],
        }),
        ..Default::default()
    };
    xds.push_response(AUTHORIZATION_TYPE_URL, vec![bad, good]);
    eventually("a NACK", || !xds.nacks().is_empty()).await;
    let nack = xds.nacks().remove(0);
    assert!(nack.contains("test/garbage"), "{nack}");
    assert!(!nack.contains("test/deny-client"), "{nack}");
    eventually("the DENY applied", || {
        b.state
            .snapshot()
            .policies()
            .iter()
            .any(|p| p.name == "deny-client")
    })
    .await;
    assert_eq!(status_as(&w, client).await, StatusCode::UNAUTHORIZED);
}

/// The handle nft gave the agent's table in `pod`: a table removed and
/// made again gets a new one.
fn capture_table_handle(pod: &ambient_tests::netns::Pod) -> Option<String> {
    let args = ["-a", "list", "table", "inet", "ambient_agent"];
    let out = ambient_tests::netns::in_ns(&pod.netns, "nft", &args).ok()?;
    let first = out.lines().next()?;
    first.split("# handle").nth(1).map(|h| h.trim().to_string())
}

/// Point 5's twin: a workload whose details change (here its capacity)
/// had its capture removed and installed again, a window in which its
/// traffic left uncaptured. Capture now stays; only the listeners are
/// replaced (beside the old ones, with SO_REUSEPORT).
#[tokio::test]
async fn a_workload_update_never_takes_capture_off_its_pod() {
    init_tracing();
    let m = PodMesh::build("hupd");
    let b = m.agent("node-b").await;
    let _a = m.agent("node-a").await;
    let _echo = PodEcho::start(&m.server, 8080).await;
    let before = capture_table_handle(&m.server).expect("captured");
    assert!(allowed(&m.client, m.server_app(8080)).await);

    let mut yaml = String::from("workloads:\n");
    yaml += &m.client.workload_yaml("test", "node-a", "client");
    yaml += &m.intruder.workload_yaml("other", "node-a", "intruder");
    yaml += &m.server.workload_yaml("test", "node-b", "server");
    yaml += "    capacity: 3\n";
    m.world.write_mesh(&yaml);
    eventually("the new server workload", || {
        b.state
            .snapshot()
            .workload_by_uid("server")
            .is_some_and(|w| w.capacity == 3)
    })
    .await;
    eventually("its listeners replaced", || {
        b.served()
            .iter()
            .any(|w| w.uid == "server" && w.capacity == 3)
    })
    .await;
    assert_eq!(
        capture_table_handle(&m.server),
        Some(before),
        "capture was redone"
    );
    assert!(
        allowed(&m.client, m.server_app(8080)).await,
        "served after the change"
    );
}
