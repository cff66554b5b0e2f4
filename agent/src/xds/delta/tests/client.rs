//! The client: installing, ACK/NACK, subscribing, reconnecting.

use super::*;

fn client() -> (XdsClient, Arc<State>) {
    let state = Arc::new(State::default());
    let cfg = XdsConfig {
        address: "http://127.0.0.1:1".into(),
        node_id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
        node_metadata: [("NAMESPACE".to_string(), "istio-system".to_string())].into(),
        ..Default::default()
    };
    (XdsClient::new(cfg, state.clone()), state)
}

#[test]
fn client_installs_after_both_types_then_acks_and_nacks_per_resource() {
    let (mut c, state) = client();
    let status = c.status();
    let m = mesh();
    let resps = responses(&encode_mesh(&m).unwrap());
    let mut changes = state.subscribe();

    let ack = c.handle(resps[0].clone());
    assert_eq!(ack.response_nonce, "n1");
    assert_eq!(ack.type_url, ADDRESS_TYPE_URL);
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    assert!(
        !changes.has_changed().unwrap(),
        "workloads wait for their policies"
    );
    assert!(!status.borrow().synced);

    c.handle(resps[1].clone());
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    assert_eq!(state.snapshot().to_mesh(), canonical(&m));
    assert!(status.borrow().synced);

    // The same again changes nothing: no new version.
    c.handle(resps[1].clone());
    assert!(!changes.has_changed().unwrap());

    let mut bad = response(
        ADDRESS_TYPE_URL,
        vec![resource("x", workload_any(|w| w.uid = "x".into()))],
        &["c1"],
    );
    bad.nonce = "n2".into();
    bad.resources.push(resource(
        "y",
        workload_any(|w| {
            w.uid = "y".into();
            w.addresses = vec![vec![1, 2, 3]];
        }),
    ));
    let nack = c.handle(bad);
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3);
    assert!(
        detail
            .message
            .contains("y: addresses[0]: an IP address must be 4 or 16 bytes, not 3"),
        "{}",
        detail.message
    );
    assert!(
        !detail.message.contains("x:"),
        "only the bad resource is named: {}",
        detail.message
    );
    assert!(
        changes.has_changed().unwrap(),
        "the good part of a partly bad response is applied"
    );
    let held = c.resources.versions(ADDRESS_TYPE_URL);
    assert!(held.contains_key("x") && !held.contains_key("c1") && !held.contains_key("y"));
    let snap = state.snapshot();
    assert!(snap.workload_by_uid("x").is_some() && snap.workload_by_uid("c1").is_none());
    let s = status.borrow().clone();
    assert_eq!((s.acks, s.nacks, s.installs), (3, 1, 2));
    assert_eq!(s.last_nack.as_deref(), Some(detail.message.as_str()));
}

#[test]
fn initial_requests_carry_node_and_held_versions() {
    let (mut c, _state) = client();
    let req = c.initial_request(ADDRESS_TYPE_URL);
    let node = req.node.expect("node on the first requests");
    assert!(node.id.starts_with("ztunnel~"));
    let meta = node.metadata.unwrap();
    assert_eq!(
        meta.fields["NAMESPACE"].kind,
        Some(Kind::StringValue("istio-system".into()))
    );
    assert!(req.resource_names_subscribe.is_empty(), "wildcard");
    assert!(req.initial_resource_versions.is_empty());

    for r in responses(&encode_mesh(&mesh()).unwrap()) {
        c.handle(r);
    }
    let req = c.initial_request(AUTHORIZATION_TYPE_URL);
    assert_eq!(
        req.initial_resource_versions.keys().collect::<Vec<_>>(),
        ["test/deny-all-but", "test/ns", "test/selected"]
    );
    assert!(req.initial_resource_versions.values().all(|v| v == "v1"));
}

#[tokio::test]
async fn unreachable_control_plane_backs_off_and_shutdown_stops_it() {
    let (c, _state) = client();
    let mut c = c;
    c.cfg.reconnect_initial = Duration::from_millis(5);
    c.cfg.reconnect_max = Duration::from_millis(20);
    let mut status = c.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(c.run(async move {
        let _ = stopped.await;
    }));
    let failed = status.wait_for(|s| s.failures >= 3);
    tokio::time::timeout(Duration::from_secs(10), failed)
        .await
        .expect("retries")
        .expect("status");
    let s = status.borrow().clone();
    assert!(!s.connected);
    assert!(s
        .last_error
        .unwrap()
        .contains("connecting to http://127.0.0.1:1"));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test]
async fn https_without_a_root_is_an_error_and_tokens_are_read_per_connect() {
    let (mut c, _state) = client();
    c.cfg.address = "https://istiod.istio-system.svc:15012".into();
    assert!(matches!(c.connect().await, Err(XdsError::NoRootCert)));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    c.cfg.token_path = Some(path.clone());
    assert!(matches!(c.token().await, Err(XdsError::Token { .. })));
    std::fs::write(&path, "tok1\n").unwrap();
    assert_eq!(c.token().await.unwrap().unwrap(), "Bearer tok1");
    std::fs::write(&path, "tok2").unwrap();
    assert_eq!(c.token().await.unwrap().unwrap(), "Bearer tok2");
    std::fs::write(&path, "bad\ntoken").unwrap();
    assert!(matches!(c.token().await, Err(XdsError::BadToken { .. })));
}
