//! `ambient-control-plane`: the test control plane as a command, for running
//! agents in Istio mode without Kubernetes. It serves Delta xDS and the
//! Istio CA from a local mesh file (re-read when it changes) and, with
//! `--cni-socket`, plays istio-cni for one node: it hands the agent the
//! netns of every workload of that node that has a `netns` path.
//!
//! It writes `roots.pem` (mesh root + the CA's serving root) and `token`
//! into `--out`, and prints the settings an agent needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::identity::LocalCa;
use ambient_agent::state::State;
use ambient_agent::xds::local::LocalSource;
use ambient_tests::control_plane::{ca::TestCa, xds::TestXds, zds::TestCni};
use anyhow::Context;
use clap::Parser;

/// Serve Delta xDS and the Istio CA (and optionally the CNI's ZDS socket)
/// from a mesh file.
#[derive(Parser, Debug)]
#[command(name = "ambient-control-plane", version, about)]
struct Args {
    /// The mesh, in the local-mode YAML format.
    #[arg(long)]
    mesh: PathBuf,
    /// Where to serve Delta xDS (plaintext gRPC).
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    /// Where to serve the Istio CA (gRPC over TLS).
    #[arg(long, default_value = "127.0.0.1:15012")]
    ca: SocketAddr,
    /// The bearer token the CA accepts.
    #[arg(long, default_value = "local-token")]
    token: String,
    /// Directory for roots.pem and the token file.
    #[arg(long)]
    out: PathBuf,
    /// Also serve ZDS on this unix socket, handing over this node's pods.
    #[arg(long, requires = "node")]
    cni_socket: Option<PathBuf>,
    /// The node whose pods the CNI hands over.
    #[arg(long)]
    node: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let state = Arc::new(State::default());
    let mut source = LocalSource::new(args.mesh.clone(), state.clone(), Duration::from_millis(500));
    source.load_initial().context("loading the mesh")?;
    let xds = TestXds::start(args.xds).await.context("starting xDS")?;
    xds.set_mesh(&state.snapshot().to_mesh());

    let root = Arc::new(LocalCa::generate("cluster.local").context("generating the root")?);
    let ca = TestCa::start(args.ca, root.clone(), &args.token)
        .await
        .context("starting the CA")?;
    std::fs::create_dir_all(&args.out)?;
    let roots = args.out.join("roots.pem");
    std::fs::write(&roots, format!("{}{}", root.root_pem(), ca.root_pem()))?;
    let token = args.out.join("token");
    std::fs::write(&token, &args.token)?;

    let cni = match (&args.cni_socket, &args.node) {
        (Some(socket), Some(node)) => Some((TestCni::start(socket).await?, node.clone())),
        _ => None,
    };
    println!("xdsAddress: {}", xds.url());
    println!("caAddress: {}", ca.url());
    println!("serverName: {}", ca.server_name());
    println!("rootCert: {}", roots.display());
    println!("tokenPath: {}", token.display());
    if let Some(socket) = &args.cni_socket {
        println!("cniSocket: {}", socket.display());
    }
    println!("ready");

    let mut changes = state.subscribe();
    tokio::spawn(source.run(std::future::pending()));
    let mut handed = std::collections::HashSet::new();
    loop {
        if let Some((cni, node)) = &cni {
            if cni.connected() {
                let snap = state.snapshot();
                for w in snap.local_workloads(node) {
                    let Some(netns) = w.netns() else { continue };
                    if handed.insert(w.uid.clone()) {
                        if let Err(e) = cni.add_pod(&w.uid, netns, None).await {
                            eprintln!("handing over {}: {e}", w.uid);
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                xds.set_mesh(&state.snapshot().to_mesh());
                eprintln!("mesh changed; pushed to xDS clients");
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
