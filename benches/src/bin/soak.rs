//! The soak: two agents (`ambient-agent run`, nft capture) carrying
//! connection churn through HBONE for a long time while the mesh file
//! changes under them, printing their RSS and open files as they go and,
//! at the end, the slope of each (least squares over the samples after the
//! warm-up). A leak shows as a slope that does not fall to noise. Needs
//! root and a release build of `ambient-agent`; `scripts/bench soak`.
//!
//! The churn, from the client pod to the server pod on the other node:
//! `--workers` loops each opening a connection, one round trip, closing;
//! plus bursts of `--held` connections opened together, held 5 s and
//! closed. Every `--push-secs` the mesh file is rewritten: filler
//! workloads come and go and a policy (that never matches the client) is
//! renamed, so each agent applies a change and re-checks its connections.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_agent::identity::LocalCa;
use ambient_benches::apps::{self, ECHO_PORT};
use ambient_benches::nodes::{self, mesh_yaml, tune_pod, AgentProc, Reaped, Setup};
use ambient_benches::procstat;
use ambient_tests::netns::Topology;
use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "Connection churn and mesh pushes through two agents; RSS and fds over time")]
struct Args {
    /// How long the churn lasts.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Concurrent open-round-trip-close loops.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Connections in each held burst (opened together, held 5 s, closed).
    #[arg(long, default_value_t = 1000)]
    held: usize,
    /// Seconds between mesh file rewrites.
    #[arg(long, default_value_t = 10)]
    push_secs: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 30)]
    sample_secs: u64,
    /// Samples before this many minutes are warm-up, left out of the slopes.
    #[arg(long, default_value_t = 5.0)]
    warmup_minutes: f64,
    /// Workloads in the mesh (the two pods plus placeholders).
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// The agent binary. [default: `ambient-agent` next to this binary]
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Internal: serve the echo application on this address.
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
}

/// What the churn has done so far.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    errors: AtomicU64,
    bursts: AtomicU64,
}

/// One sample of both agents.
struct Sample {
    minutes: f64,
    rss_kib: [f64; 2],
    fds: [f64; 2],
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    procstat::raise_fd_limit(args.held as u64 * 2 + 4096)?;
    let Some(agent_bin) = nodes::start(args.serve, args.agent.as_deref())? else {
        return Ok(());
    };

    let topo = Topology::new("soak")?;
    let client = topo.add_pod("client", 0)?;
    let server = topo.add_pod("server", 1)?;
    for p in [&client, &server] {
        tune_pod(p)?;
    }
    let dir = tempfile::tempdir()?;
    let ca = LocalCa::generate("cluster.local")?;
    ca.write_pem(
        &dir.path().join("root.pem"),
        &dir.path().join("root-key.pem"),
    )?;
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh_yaml(&client, &server, args.workloads))?;
    let _server_app = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &server.netns])
            .arg(std::env::current_exe()?)
            .arg("--serve")
            .arg(server.ip.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the echo application")?,
    );
    let setup = Setup {
        dir,
        agent_bin,
        log_level: "warn".into(),
    };
    let a = setup.agent("node-a", "")?;
    let b = setup.agent("node-b", "")?;
    let dst = SocketAddr::new(IpAddr::V4(server.ip), ECHO_PORT);
    let client_ns = std::path::PathBuf::from(client.netns_path());
    probe(&client_ns, dst)?;

    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (counters, stop, workers, held) =
            (counters.clone(), stop.clone(), args.workers, args.held);
        apps::in_netns(&client_ns, move || {
            churn(dst, workers, held, counters, stop)
        })
    };

    let start = Instant::now();
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let (mut next_push, mut next_sample) = (start, start);
    let mut pushes = 0u64;
    let mut samples = Vec::new();
    println!(
        "{:>7} {:>11} {:>7} {:>7} {:>7} {:>12} {:>12} {:>6} {:>6}",
        "minutes",
        "connections",
        "per s",
        "errors",
        "pushes",
        "RSS a KiB",
        "RSS b KiB",
        "fds a",
        "fds b"
    );
    let mut last = (Instant::now(), 0u64);
    while start.elapsed() < total {
        let now = Instant::now();
        if now >= next_push {
            pushes += 1;
            std::fs::write(
                &mesh_path,
                pushed_mesh(&client, &server, args.workloads, pushes),
            )?;
            next_push += Duration::from_secs(args.push_secs);
        }
        if now >= next_sample {
            let s = sample(&a, &b, start);
            let done = counters.connections.load(Ordering::Relaxed);
            let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64().max(1e-3);
            last = (Instant::now(), done);
            println!(
                "{:>7.1} {:>11} {:>7.0} {:>7} {:>7} {:>12.0} {:>12.0} {:>6} {:>6}",
                s.minutes,
                done,
                rate,
                counters.errors.load(Ordering::Relaxed),
                pushes,
                s.rss_kib[0],
                s.rss_kib[1],
                s.fds[0],
                s.fds[1]
            );
            samples.push(s);
            next_sample += Duration::from_secs(args.sample_secs);
        }
        if churn.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    std::thread::sleep(Duration::from_secs(5));
    let end = sample(&a, &b, start);
    println!(
        "after the churn stopped (+5 s): RSS a {:.0} KiB, b {:.0} KiB; fds a {}, b {}",
        end.rss_kib[0], end.rss_kib[1], end.fds[0], end.fds[1]
    );
    println!(
        "{} connections, {} held bursts of {}, {} errors, {} mesh pushes in {:.1} min",
        counters.connections.load(Ordering::Relaxed),
        counters.bursts.load(Ordering::Relaxed),
        args.held,
        counters.errors.load(Ordering::Relaxed),
        pushes,
        start.elapsed().as_secs_f64() / 60.0
    );
    let steady: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.minutes >= args.warmup_minutes)
        .collect();
    if steady.len() < 3 {
        println!("too few samples after the warm-up for a slope");
        return Ok(());
    }
    // Open files swing by a burst's worth between samples (taken in a
    // burst or between two), so their leak signal is the count once the
    // churn has stopped against the count before it began.
    let first = &samples[0];
    for (i, node) in ["node-a", "node-b"].into_iter().enumerate() {
        let rss = slope(steady.iter().map(|s| (s.minutes, s.rss_kib[i])));
        println!(
            "{node}: RSS slope {:+.1} KiB/min ({:+.0} KiB/hour) after {} min warm-up; \
             open files {} before the churn, {} after it",
            rss,
            rss * 60.0,
            args.warmup_minutes,
            first.fds[i],
            end.fds[i]
        );
    }
    Ok(())
}

fn sample(a: &AgentProc, b: &AgentProc, start: Instant) -> Sample {
    let fds = |p: &AgentProc| procstat::fds(p.pid()).unwrap_or(0) as f64;
    Sample {
        minutes: start.elapsed().as_secs_f64() / 60.0,
        rss_kib: [a.rss() as f64 / 1024.0, b.rss() as f64 / 1024.0],
        fds: [fds(a), fds(b)],
    }
}

/// Least-squares slope of `points` (y per unit of x).
fn slope(points: impl Iterator<Item = (f64, f64)>) -> f64 {
    let pts: Vec<(f64, f64)> = points.collect();
    let n = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / n,
        pts.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

/// The mesh of push `k`: every other push has 50 more filler workloads,
/// and a DENY policy (of a principal no workload has) renamed each time.
fn pushed_mesh(
    client: &ambient_tests::netns::Pod,
    server: &ambient_tests::netns::Pod,
    workloads: usize,
    k: u64,
) -> String {
    let n = workloads + if k % 2 == 1 { 50 } else { 0 };
    mesh_yaml(client, server, n)
        + &format!(
            "policies:\n  - name: deny-nobody-{k}\n    namespace: bench\n    action: DENY\n    rules:\n      - clauses:\n          - matches:\n              - principals: [\"cluster.local/ns/none/sa/none-{k}\"]\n"
        )
}

/// A round trip through the mesh, retried until the agents are serving.
fn probe(client_ns: &std::path::Path, dst: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = apps::run_in_netns(client_ns, move || async move {
            let rt = apps::latency(dst, false, 1, 0, 1);
            tokio::time::timeout(Duration::from_secs(5), rt)
                .await
                .context("no answer in 5 s")??;
            Ok(())
        });
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context("probe")),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The churn, inside the client pod, until `stop`.
async fn churn(
    dst: SocketAddr,
    workers: usize,
    held: usize,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (counters, stop) = (counters.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match round_trip(dst).await {
                    Ok(()) => counters.connections.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    while !stop.load(Ordering::Relaxed) {
        match apps::open_idle(dst, false, held, 100).await {
            Ok(conns) => {
                counters
                    .connections
                    .fetch_add(conns.len() as u64, Ordering::Relaxed);
                counters.bursts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(conns);
            }
            Err(_) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// One connection: connect, a one-byte round trip, close; 5 s at most.
async fn round_trip(dst: SocketAddr) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = apps::connect(dst, false).await?;
        let mut byte = [7u8];
        s.write_all(&byte).await?;
        s.read_exact(&mut byte).await?;
        anyhow::Ok(())
    })
    .await
    .context("round trip timed out")?
}
