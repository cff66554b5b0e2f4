//! The demo on a real kernel: two node namespaces, six pods, real capture
//! (nft or eBPF), two agents, and the link between the nodes watched.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::client::MARKER;
use super::topology::{Pod, Topology};
use super::waypoint::{http_app, reviews_yaml, start_waypoint};
use crate::agent::Agent;
use crate::capture::CaptureMode;
use crate::config::Config;
use crate::identity::LocalCa;
use crate::proxy::record::Direction;

/// The reviews service's address.
const REVIEWS_VIP: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 1)),
    80,
);

pub async fn run(bytes: usize, capture: CaptureMode) -> anyhow::Result<()> {
    let topo = Topology::new("demo").context("building the demo topology")?;
    let client = topo.add_pod("client", 0)?;
    let server = topo.add_pod("server", 1)?;
    let outside = topo.add_pod("outside", 1)?;
    let v1 = topo.add_pod("reviews-v1", 1)?;
    let v2 = topo.add_pod("reviews-v2", 1)?;
    let wp = topo.add_pod("waypoint", 1)?;

    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mesh = dir.path().join("mesh.yaml");
    let entry = |p: &Pod, node: &str| p.workload_yaml("demo", node, &p.name);
    let yaml = format!(
        "workloads:\n{}{}{}",
        entry(&client, "node-a"),
        entry(&server, "node-b"),
        reviews_yaml("demo", "node-b", &v1, &v2, &wp, REVIEWS_VIP.ip())
    );
    std::fs::write(&mesh, &yaml).context("writing the demo mesh")?;

    let ca = Arc::new(LocalCa::generate("cluster.local").context("generating the root CA")?);
    let cfg = |node: &str| Config {
        node: node.into(),
        mesh_file: Some(mesh.clone()),
        capture: Some(capture),
        // Two agents in one process: no admin endpoints.
        admin_port: 0,
        metrics_port: 0,
        readiness_port: 0,
        ..Config::default()
    };
    let a = Agent::start_with_signer(cfg("node-a"), ca.clone(), ca.trust_bundle()).await?;
    let b = Agent::start_with_signer(cfg("node-b"), ca.clone(), ca.trust_bundle()).await?;
    let _apps = [
        echo(&server, 8080).await?,
        echo(&outside, 9090).await?,
        http_app(&v1, "v1").await?,
        http_app(&v2, "v2").await?,
    ];
    let waypoint = start_waypoint(&mesh, &ca, &wp).await?;

    let mode = format!("{capture:?}").to_lowercase();
    println!("ambient-agent demo: 2 nodes, 6 pods, {mode} capture, local CA\n");
    println!(
        "  node-a ({})  pod client  {}  spiffe://cluster.local/ns/demo/sa/client",
        topo.nodes[0], client.ip
    );
    println!(
        "  node-b ({})  pod server  {}  spiffe://cluster.local/ns/demo/sa/server",
        topo.nodes[1], server.ip
    );
    println!(
        "  node-b                   pod outside {}  (not in the mesh)",
        outside.ip
    );
    println!(
        "  node-b                   pods reviews-v1 {}, reviews-v2 {}: service reviews {REVIEWS_VIP}, through",
        v1.ip, v2.ip
    );
    println!(
        "                           the waypoint pod {} (L7: /admin denied, x-version: v2 -> v2, else 80/20)\n",
        wp.ip
    );

    let mut report = String::new();
    let mut at_b = b.connections();
    for (what, dst) in [
        ("client -> server (in the mesh)", server.addr(8080)),
        ("client -> outside (not in the mesh)", outside.addr(9090)),
    ] {
        let mut records = b.connections();
        let wire = topo.sniff_wire(0)?;
        let started = Instant::now();
        // The client is a process of the pod, as an application would be.
        let exe = std::env::current_exe().context("locating ambient-agent")?;
        let x = client
            .run_client(&exe.to_string_lossy(), true, dst, bytes, 1)
            .await
            .with_context(|| what.to_string())?;
        anyhow::ensure!(x.intact(), "{what}: the echo differs from what was sent");
        let echoed = x.bytes;
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = wire.finish();
        // The service side of each segment: the lower port, as the other
        // end is ephemeral.
        let ports: std::collections::BTreeSet<u16> = seen
            .iter()
            .map(|s| s.src.port().min(s.dst.port()))
            .collect();
        let clear = seen
            .iter()
            .any(|s| s.payload.windows(MARKER.len()).any(|w| w == MARKER));
        let inbound = records_now(&mut records)
            .into_iter()
            .find(|r| r.direction == Direction::Inbound && r.dst == dst);
        writeln!(report, "  {what}")?;
        writeln!(report, "    the client opened a plain TCP socket to {dst}; {bytes} B sent, {echoed} B echoed back intact ({:.1} ms)", elapsed.as_secs_f64() * 1e3)?;
        match inbound {
            Some(r) => writeln!(
                report,
                "    node-b's agent accepted it over HBONE from {} proving {}",
                r.src,
                r.src_identity.map(|i| i.to_string()).unwrap_or_default()
            )?,
            None => writeln!(
                report,
                "    no agent tunneled it: it left the client pod as plain TCP"
            )?,
        }
        writeln!(
            report,
            "    on the wire between the nodes: {} TCP segments, port(s) {:?}, plaintext visible: {}\n",
            seen.len(),
            ports,
            if clear { "YES" } else { "no (encrypted)" }
        )?;
    }
    let exe = std::env::current_exe().context("locating ambient-agent")?;
    let exe = exe.to_string_lossy();
    let mut requests = waypoint.requests();
    writeln!(
        report,
        "  client -> service reviews {REVIEWS_VIP} (HTTP through the waypoint)"
    )?;
    for (what, count, path, header) in [
        ("GET /admin/users", 1, "/admin/users", None),
        ("GET / with x-version: v2", 10, "/", Some("x-version:v2")),
        ("GET /", 100, "/", None),
    ] {
        let mut args = vec![
            "pod-http".to_string(),
            REVIEWS_VIP.to_string(),
            count.to_string(),
            path.to_string(),
        ];
        args.extend(header.map(str::to_string));
        let out = client
            .run_process(&exe, &args)
            .await
            .with_context(|| what.to_string())?;
        let mut tally = std::collections::BTreeMap::<&str, usize>::new();
        for line in out.lines() {
            *tally.entry(line).or_default() += 1;
        }
        let tally: Vec<String> = tally
            .iter()
            .map(|(k, n)| format!("{n} x \"{k}\""))
            .collect();
        writeln!(report, "    {what} ({count}): {}", tally.join(", "))?;
    }
    let seen = records_now(&mut requests);
    let ids: std::collections::BTreeSet<String> =
        seen.iter().map(|r| r.src_identity.to_string()).collect();
    writeln!(
        report,
        "    the waypoint handled {} requests from {}",
        seen.len(),
        ids.into_iter().collect::<Vec<_>>().join(", ")
    )?;
    let by_waypoint: std::collections::BTreeSet<String> = records_now(&mut at_b)
        .into_iter()
        .filter(|r| {
            r.direction == Direction::Inbound
                && [v1.ip, v2.ip]
                    .iter()
                    .any(|ip| r.dst.ip() == std::net::IpAddr::V4(*ip))
        })
        .filter_map(|r| r.src_identity.map(|i| i.to_string()))
        .collect();
    writeln!(
        report,
        "    node-b's agent accepted the reviews connections from {}\n",
        by_waypoint.into_iter().collect::<Vec<_>>().join(", ")
    )?;
    print!("{report}");
    drop(waypoint);
    drop((a, b));
    println!("agents stopped; capture removed; namespaces deleted on exit");
    Ok(())
}

fn records_now<T: Clone>(rx: &mut tokio::sync::broadcast::Receiver<Arc<T>>) -> Vec<T> {
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push((*r).clone());
    }
    out
}

/// An echo server inside `pod`.
async fn echo(pod: &Pod, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = pod
        .sockets()
        .listen(pod.addr(port), Default::default())
        .await?;
    Ok(super::serve_echo(listener))
}
