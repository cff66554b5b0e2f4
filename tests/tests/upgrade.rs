//! Upgrading the agent of a node while its pods talk: the new agent takes
//! the pods (from the mesh file here; from the CNI's snapshot in Istio
//! mode), opens their listeners beside the old one's (SO_REUSEPORT, as
//! ztunnel does), and only then the old one drains. ztunnel's handover
//! (istio/istio architecture/ambient/ztunnel-cni-lifecycle.md): the new
//! one binds and is ready, then the old one closes its listeners at
//! SIGTERM and lets its connections finish. Needs root.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::agent::Agent;
use ambient_tests::netns::Pod;
use ambient_tests::pods::*;
use ambient_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the load saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// Opens a short connection through the mesh every `every` until `stop`
/// flips; each sends `MSG` and must get it back.
fn short_connections(
    from: Pod,
    dst: std::net::SocketAddr,
    every: Duration,
    tally: Arc<Tally>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut inflight = tokio::task::JoinSet::new();
        while !*stop.borrow() {
            tick.tick().await;
            let (from, tally) = (from.clone(), tally.clone());
            inflight.spawn(async move {
                match pod_exchange(&from, dst, MSG).await {
                    Ok(back) if back == MSG => tally.ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("short connection failed: {other:?}");
                        tally.failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            });
        }
        while inflight.join_next().await.is_some() {}
    })
}

/// Sends `len` bytes (in paced chunks) from `from` to the echo at `dst`
/// and returns (hash sent, hash received).
async fn long_transfer(
    from: &Pod,
    dst: std::net::SocketAddr,
    len: usize,
    seed: u8,
) -> ([u8; 32], [u8; 32]) {
    let data = payload(len, seed);
    let s = from
        .sockets()
        .connect(dst, Default::default())
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let sent = sha256(&data);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            if let Err(e) = wr.write_all(chunk).await {
                eprintln!("transfer {seed}: write: {e}");
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let _ = wr.shutdown().await;
    });
    let mut back = Vec::with_capacity(len);
    if let Err(e) = rd.read_to_end(&mut back).await {
        eprintln!("transfer {seed}: read: {e}");
    }
    let _ = writer.await;
    (sent, sha256(&back))
}

/// A transfer's (hash sent, hash received).
type Hashes = ([u8; 32], [u8; 32]);

/// The load an upgrade runs under: 200 new connections a second from
/// `client` to `app`, and two paced 32 MiB transfers.
struct Load {
    tally: Arc<Tally>,
    stop: tokio::sync::watch::Sender<bool>,
    short: tokio::task::JoinHandle<()>,
    transfers: tokio::task::JoinHandle<(Hashes, Hashes)>,
}

impl Load {
    fn start(client: &Pod, app: std::net::SocketAddr) -> Load {
        let tally = Arc::new(Tally::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let short = short_connections(
            client.clone(),
            app,
            Duration::from_millis(5),
            tally.clone(),
            stopped,
        );
        let (c1, c2) = (client.clone(), client.clone());
        let transfers = tokio::spawn(async move {
            let len = 32 << 20;
            tokio::join!(
                long_transfer(&c1, app, len, 1),
                long_transfer(&c2, app, len, 2)
            )
        });
        Load {
            tally,
            stop,
            short,
            transfers,
        }
    }

    /// Waits for the transfers, stops the short connections, and checks
    /// that nothing was refused, broken, corrupted or sent in plaintext on
    /// `wire`.
    async fn finish(self, wire: ambient_tests::netns::Sniffer) {
        let (t1, t2) = self.transfers.await.expect("transfers");
        self.stop.send_replace(true);
        self.short.await.expect("load");
        let (ok, failed) = (
            self.tally.ok.load(Ordering::SeqCst),
            self.tally.failed.load(Ordering::SeqCst),
        );
        eprintln!("during the handovers: {ok} connections succeeded, {failed} failed");
        assert_eq!(failed, 0, "connections refused or broken ({ok} succeeded)");
        assert!(ok > 200, "too little load to tell: {ok}");
        assert_eq!(t1.0, t1.1, "first long transfer corrupted");
        assert_eq!(t2.0, t2.1, "second long transfer corrupted");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = wire.finish();
        assert!(
            !seen
                .iter()
                .any(|s| s.payload.windows(MSG.len()).any(|w| w == MSG)),
            "plaintext on the wire"
        );
    }
}

/// Starts the successor of `old` for `node`, waits until it serves the
/// node's pods, then drains `old`.
async fn hand_over(m: &PodMesh, old: Agent, node: &str, uids: &[&str]) -> Agent {
    let new = m.agent(node).await;
    for uid in uids {
        assert!(
            new.listeners(uid).is_some(),
            "the new agent does not serve {uid}"
        );
    }
    let cut = old.drain(Duration::from_secs(20)).await;
    assert_eq!(cut, 0, "connections cut at the drain deadline");
    new
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_hands_its_node_over_without_refusing_or_breaking_a_connection() {
    init_tracing();
    raise_fd_limit();
    let m = PodMesh::build("upgr");
    let _echo = PodEcho::start(&m.server, 8080).await;
    let app = m.server_app(8080);
    let a = m.agent("node-a").await;
    let b = m.agent("node-b").await;
    let wire = m.topo.sniff_wire(0).expect("sniffer");

    let load = Load::start(&m.client, app);
    // Both nodes at once, while the long transfers run through both old
    // agents (the client's outbound, the server's inbound).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = tokio::join!(
        hand_over(&m, a, "node-a", &["client", "intruder"]),
        hand_over(&m, b, "node-b", &["server"]),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.finish(wire).await;
    assert!(allowed(&m.client, app).await, "served by the new agents");
    drop((a, b));
}

/// Istio mode, as a DaemonSet rollout with `maxSurge: 1` does it: the new
/// agent connects to istio-cni's socket beside the old one and gets the
/// node's pods in the CNI's snapshot (istio-cni keeps every connection and
/// sends adds to the latest, cni/pkg/nodeagent/ztunnelserver.go), binds
/// their listeners beside the old ones, and only then the old one drains.
/// Capture is istio-cni's rules throughout, as in a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_istio_mode_an_agent_hands_its_node_over_without_a_refused_connection() {
    use ambient_tests::istio::*;
    init_tracing();
    raise_fd_limit();
    let topo = ambient_tests::netns::Topology::new("upgristio").expect("topology");
    let client = topo.add_pod("client", 0).expect("pod");
    let server = topo.add_pod("server", 1).expect("pod");
    let mut world =
        IstioWorld::start(&mesh_of(&[(&client, "node-a"), (&server, "node-b")]), 25026).await;
    assert_eq!(world.add_pod(0, &client, info("client")).await, Ok(()));
    assert_eq!(world.add_pod(1, &server, info("server")).await, Ok(()));
    let _echo = PodEcho::start(&server, 8080).await;
    let app = server.addr(8080);
    assert!(allowed(&client, app).await, "served before the upgrade");
    let wire = topo.sniff_wire(0).expect("sniffer");

    let load = Load::start(&client, app);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let olds = std::mem::take(&mut world.agents);
    let mut news = Vec::new();
    for (i, (old, uid)) in olds.into_iter().zip(["client", "server"]).enumerate() {
        // A surge pod has its own address; here both share the node's
        // loopback, so the newcomer serves no metrics or admin.
        let cfg = ambient_agent::config::Config {
            metrics_port: 0,
            admin_port: 0,
            ..world.configs[i].clone()
        };
        let new = Agent::start(cfg).await.expect("the new agent starts");
        wait_for("the new agent on the CNI's socket", || {
            world.cnis[i].connections() == 2
        })
        .await;
        wait_for("the new agent serving the pod", || {
            new.listeners(uid).is_some()
        })
        .await;
        let cut = old.drain(Duration::from_secs(20)).await;
        assert_eq!(cut, 0, "connections cut at the drain deadline");
        wait_for("the old agent gone from the CNI", || {
            world.cnis[i].connections() == 1
        })
        .await;
        news.push(new);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.finish(wire).await;
    // The new agents are the CNI's now: a deleted pod is released by them.
    assert_eq!(world.del_pod(0, &client).await, Ok(()));
    wait_for("client released by the new agent", || {
        news[0].listeners("client").is_none()
    })
    .await;
}
