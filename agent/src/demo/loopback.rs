//! `ambient-agent demo`: a two-node mesh on this machine's loopback, with
//! the local CA, traffic sent through it, and a readable account printed.
//!
//! Each workload gets its own 127.x address so two agents can both listen
//! on the standard ports. Capture is stood in for by [`Agent::connect_as`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::agent::Agent;
use crate::config::Config;
use crate::identity::LocalCa;
use crate::state::Route;

const MESH: &str = r#"
workloads:
  - uid: node-a/client
    name: client
    namespace: demo
    serviceAccount: client
    addresses: [127.0.10.1]
    node: node-a
  - uid: node-b/echo
    name: echo
    namespace: demo
    serviceAccount: echo
    addresses: [127.0.20.1]
    node: node-b
services:
  - name: echo
    namespace: demo
    vips: [127.0.30.1]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [node-b/echo]
"#;

/// An application outside the mesh.
const OUTSIDE: &str = "127.0.40.1:9090";

pub async fn run(bytes: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).context("writing the demo mesh")?;
    let ca = Arc::new(LocalCa::generate("cluster.local").context("generating the demo root CA")?);
    let agent_cfg = |node: &str| Config {
        node: node.into(),
        mesh_file: Some(mesh.clone()),
        socket_mark: 0,
        // Two agents in one process: no admin endpoints.
        admin_port: 0,
        metrics_port: 0,
        readiness_port: 0,
        ..Config::default()
    };
    let a = Agent::start_with_signer(agent_cfg("node-a"), ca.clone(), ca.trust_bundle()).await?;
    let b = Agent::start_with_signer(agent_cfg("node-b"), ca.clone(), ca.trust_bundle()).await?;
    echo_server("127.0.20.1:8080".parse()?).await?;
    echo_server(OUTSIDE.parse()?).await?;

    println!("ambient-agent demo: two agents on loopback, local CA, HBONE between them\n");
    println!("  node-a agent serves demo/client  (127.0.10.1)");
    println!("  node-b agent serves demo/echo    (127.0.20.1, app on :8080)");
    println!("  service echo.demo  VIP 127.0.30.1:80 -> :8080");
    println!("  outside the mesh   {OUTSIDE}\n");

    let mut report = String::new();
    for (what, dst) in [
        ("client -> echo service VIP", "127.0.30.1:80"),
        ("client -> echo pod IP", "127.0.20.1:8080"),
        ("client -> app outside the mesh", OUTSIDE),
    ] {
        let dst: SocketAddr = dst.parse()?;
        let route = a.state.snapshot().route(dst, a.config().ports.hbone);
        let started = Instant::now();
        let stream = a.connect_as("node-a/client", dst).await?;
        let echoed = round_trip(stream, bytes)
            .await
            .with_context(|| what.to_string())?;
        let how = match &route {
            Route::Hbone {
                gateway,
                identities,
                ..
            } => format!(
                "encrypted: mTLS+HTTP/2 CONNECT via {gateway}, peer proved {}",
                identities[0]
            ),
            Route::Passthrough { target, .. } => format!("plain TCP to {target} (not in the mesh)"),
            Route::DoubleHbone {
                gateway, workload, ..
            } => format!(
                "double HBONE through the gateway {gateway} to {}",
                workload.uid
            ),
            Route::Lookup { hostname, .. } => format!("to the address {hostname} resolves to"),
            Route::Unreachable(why) => format!("refused: {why}"),
        };
        writeln!(
            report,
            "  {what}\n    from spiffe://cluster.local/ns/demo/sa/client\n    {how}\n    sent {bytes} B, echoed {echoed} B intact (SHA-256 match), {:.1} ms\n",
            started.elapsed().as_secs_f64() * 1000.0
        )?;
    }
    print!("{report}");
    let stats = a.pool.stats();
    println!(
        "  node-a HBONE pool: {} TLS connection(s) opened for all tunneled flows",
        stats.connections_opened
    );
    println!("\ndemo complete; agents stopped and temporary files removed");
    drop((a, b));
    Ok(())
}

/// Sends `bytes` of data, half-closes, reads the echo, checks the hash.
async fn round_trip(mut stream: tokio::net::TcpStream, bytes: usize) -> anyhow::Result<usize> {
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_all(&data).await?;
        wr.shutdown().await
    };
    let mut back = Vec::with_capacity(bytes);
    let recv = rd.read_to_end(&mut back);
    let (s, r) = tokio::join!(send, recv);
    s.context("sending")?;
    r.context("receiving")?;
    anyhow::ensure!(
        Sha256::digest(&back) == Sha256::digest(&data),
        "echo differs from what was sent ({} of {bytes} bytes)",
        back.len()
    );
    Ok(back.len())
}

async fn echo_server(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the demo app on {addr}"))?;
    super::serve_echo(listener);
    Ok(())
}
