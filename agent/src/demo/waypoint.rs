//! The reviews service behind the reference waypoint, as the demo and the
//! waypoint tests build it: two workloads (`v1`, `v2`) on one node, the
//! waypoint in a pod no agent serves (it terminates HBONE itself), and L7
//! routes: `/admin*` denied, `x-version: v2` to v2, else 80/20.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::topology::Pod;
use crate::hbone::{Pool, PoolConfig};
use crate::identity::{CertManager, LocalCa};
use crate::state::State;
use crate::waypoint::{Waypoint, WaypointConfig};
use crate::xds::local::LocalSource;

/// The waypoint workload's uid.
pub const WAYPOINT_UID: &str = "waypoint";

/// Mesh file entries (workload list items, then the `services:` and
/// `httpRoutes:` sections) for service `reviews` of `namespace` at `vip`:80,
/// served on 8080 by pods `v1` and `v2` of `node`, through waypoint `wp`.
/// The workload items must come last in the file's `workloads:` list.
pub fn reviews_yaml(
    namespace: &str,
    node: &str,
    v1: &Pod,
    v2: &Pod,
    wp: &Pod,
    vip: IpAddr,
) -> String {
    // The waypoint's first address (IPv6 for an IPv6-only pod), quoted
    // for YAML's sake.
    let wp_ip = wp.addr(0).ip();
    let behind = format!("    waypoint: {{address: \"{wp_ip}\"}}\n");
    format!(
        r#"{v1_entry}{behind}{v2_entry}{behind}  - uid: {WAYPOINT_UID}
    name: waypoint
    namespace: {namespace}
    serviceAccount: waypoint
    addresses: [{wp_all}]
    node: waypoints
services:
  - name: reviews
    namespace: {namespace}
    vips: ["{vip}"]
    ports: [{{port: 80, targetPort: 8080}}]
    endpoints: [{v1}, {v2}]
    waypoint: {{address: "{wp_ip}"}}
httpRoutes:
  - name: reviews
    namespace: {namespace}
    service: {namespace}/reviews.{namespace}.svc.cluster.local
    rules:
      - matches: [{{path: {{prefix: /admin}}}}]
        deny: true
      - matches: [{{headers: {{x-version: v2}}}}]
        backends: [{{workloads: [{v2}]}}]
      - backends: [{{workloads: [{v1}], weight: 80}}, {{workloads: [{v2}], weight: 20}}]
"#,
        v1_entry = v1.workload_yaml(namespace, node, "reviews"),
        v2_entry = v2.workload_yaml(namespace, node, "reviews"),
        v1 = v1.name,
        v2 = v2.name,
        wp_all = wp
            .addresses()
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The reference waypoint inside `pod`, as workload [`WAYPOINT_UID`] of
/// the mesh file `mesh`, with certificates from `ca`.
pub async fn start_waypoint(mesh: &Path, ca: &Arc<LocalCa>, pod: &Pod) -> anyhow::Result<Waypoint> {
    let state = Arc::new(State::default());
    LocalSource::new(mesh.to_path_buf(), state.clone(), Duration::from_secs(1))
        .load_initial()
        .context("loading the mesh for the waypoint")?;
    let certs = CertManager::new(ca.clone(), ca.trust_bundle(), Default::default());
    let pool = Pool::new(certs.clone(), PoolConfig::default());
    Waypoint::start(
        state,
        certs,
        pool,
        pod.sockets(),
        WaypointConfig::new(WAYPOINT_UID),
    )
    .await
    .context("starting the waypoint")
}

/// An HTTP application inside `pod` on 8080 answering `name`.
pub async fn http_app(
    pod: &Pod,
    name: &'static str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .sockets()
        .listen(pod.any_addr(8080), Default::default())
        .await?;
    Ok(super::serve_http(listener, name))
}
