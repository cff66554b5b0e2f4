//! The side-by-side harness: builds two nodes and three pods in network
//! namespaces, runs two agents as their own processes (`ambient-agent run`,
//! nft capture, local CA), and measures in one run, from the client pod:
//!
//! - direct TCP to a pod outside the mesh, the socket marked so capture
//!   leaves it alone (the baseline);
//! - the same destination captured: the agent as a plain TCP proxy;
//! - a mesh pod on the other node: HBONE through both agents.
//!
//! Prints one table with each figure and its ratio to direct TCP. Needs
//! root and a release build of `ambient-agent` next to this binary; see
//! `benches/README.md`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambient_agent::identity::LocalCa;
use ambient_benches::apps::{self, ECHO_PORT, SINK_PORT};
use ambient_benches::nodes::{self, mesh_yaml, tune_pod, Reaped, Setup};
use ambient_benches::procstat;
use ambient_tests::netns::Topology;
use anyhow::Context;
use clap::Parser;

/// Gigabits in a GiB.
const GBIT_PER_GIB: f64 = (1u64 << 30) as f64 * 8.0 / 1e9;

#[derive(Parser, Debug)]
#[command(about = "Direct TCP vs the agent as a TCP proxy vs HBONE, in one run")]
struct Args {
    /// MiB moved by each throughput run.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Timed round trips per latency run.
    #[arg(long, default_value_t = 20_000)]
    iters: usize,
    /// Seconds each connection-rate run lasts.
    #[arg(long, default_value_t = 2.0)]
    rate_secs: f64,
    /// Concurrent client loops in the connection-rate runs.
    #[arg(long, default_value_t = 8)]
    rate_workers: usize,
    /// Idle tunneled connections held for the memory figure.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// Rounds of the throughput, latency and connection-rate runs, the three
    /// paths interleaved in each; throughput and rates report the median
    /// round, latency the quantiles of all samples together.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Workloads in the mesh (the two pods plus placeholders on other nodes).
    #[arg(long, default_value_t = 100)]
    workloads: usize,
    /// The agents' log filter (per-connection lines are logged at info).
    #[arg(long, default_value = "warn")]
    agent_log: String,
    /// The agents' log filter while idle connections are held for the
    /// memory figure: the agent's own default, since at info each
    /// connection's span is kept, formatted, for the connection's life.
    #[arg(long, default_value = "info")]
    memory_agent_log: String,
    /// Run only these parts (repeat the flag for several); all by default.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// The agent binary. [default: `ambient-agent` next to this binary]
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Internal: serve the echo and sink applications on this address (the
    /// harness runs itself this way inside each server pod).
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
}

/// The harness's parts, for `--only`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// Memory per idle connection.
    Memory,
    /// Throughput and CPU per GiB.
    Throughput,
    /// Round-trip latency.
    Latency,
    /// New connections per second.
    Rate,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// `cases` when `part` runs, else none.
    fn cases<T>(&self, part: Part, cases: &'static [T]) -> &'static [T] {
        if self.runs(part) {
            cases
        } else {
            &[]
        }
    }
}

/// The three ways the client reaches its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct,
    Proxy,
    Hbone,
}

const PATHS: [Via; 3] = [Via::Direct, Via::Proxy, Via::Hbone];

struct Net {
    client_ns: PathBuf,
    /// Outside the mesh (direct and plain proxy).
    outside: IpAddr,
    /// In the mesh, on the other node.
    server: IpAddr,
}

impl Net {
    fn dst(&self, p: Via, port: u16) -> (SocketAddr, bool) {
        match p {
            Via::Direct => (SocketAddr::new(self.outside, port), true),
            Via::Proxy => (SocketAddr::new(self.outside, port), false),
            Via::Hbone => (SocketAddr::new(self.server, port), false),
        }
    }
}

/// Tries a round trip through `p` until it works (the capture rules and
/// listeners come up with readiness, the first tunnel needs a handshake).
fn probe(net: &Net, p: Via) -> anyhow::Result<()> {
    let (dst, bypass) = net.dst(p, ECHO_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = apps::run_in_netns(&net.client_ns, move || async move {
            // A tunnel that never answers is an error, not a hang.
            let rt = apps::latency(dst, bypass, 1, 0, 1);
            let mut s = tokio::time::timeout(Duration::from_secs(5), rt)
                .await
                .context("no answer in 5 s")??;
            Ok(s.pop())
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("{p:?} probe"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// One figure for each path (None where it does not apply).
struct Row {
    name: String,
    unit: &'static str,
    values: [Option<f64>; 3],
    target: String,
}

fn fmt_val(v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if v >= 1000.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn print_table(rows: &[Row]) {
    println!();
    println!("| figure | unit | direct TCP | agent TCP proxy | HBONE (2 agents) | proxy / direct | HBONE / direct | target |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let ratio = |v: Option<f64>| match (v, r.values[0]) {
            (Some(v), Some(d)) if d > 0.0 => format!("{:.2}x", v / d),
            _ => "—".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.unit,
            fmt_val(r.values[0]),
            fmt_val(r.values[1]),
            fmt_val(r.values[2]),
            ratio(r.values[1]),
            ratio(r.values[2]),
            r.target
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Each process holds at most one socket per idle connection plus a few.
    procstat::raise_fd_limit(args.idle_conns as u64 + 1024)?;
    let Some(agent_bin) = nodes::start(args.serve, args.agent.as_deref())? else {
        return Ok(());
    };

    let topo = Topology::new("bench")?;
    let client = topo.add_pod("client", 0)?;
    let server = topo.add_pod("server", 1)?;
    let outside = topo.add_pod("outside", 1)?;
    for p in [&client, &server, &outside] {
        tune_pod(p)?;
    }
    let dir = tempfile::tempdir()?;
    let ca = LocalCa::generate("cluster.local")?;
    ca.write_pem(
        &dir.path().join("root.pem"),
        &dir.path().join("root-key.pem"),
    )?;
    std::fs::write(
        dir.path().join("mesh.yaml"),
        mesh_yaml(&client, &server, args.workloads),
    )?;
    // The applications run in their own processes, so this one's open-file
    // limit covers the client side alone.
    let exe = std::env::current_exe()?;
    let mut servers = Vec::new();
    for p in [&server, &outside] {
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .arg(&exe)
            .arg("--idle-conns")
            .arg(args.idle_conns.to_string())
            .arg("--serve")
            .arg(p.ip.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the server applications")?;
        servers.push(Reaped(child));
    }
    let net = Net {
        client_ns: client.netns_path().into(),
        outside: IpAddr::V4(outside.ip),
        server: IpAddr::V4(server.ip),
    };
    let setup = Setup {
        dir,
        agent_bin,
        log_level: args.agent_log.clone(),
    };

    eprintln!("starting agents ({})", setup.agent_bin.display());
    let mut a = setup.agent("node-a", "")?;
    let b = setup.agent("node-b", "")?;
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = [a.rss(), b.rss()];
    eprintln!(
        "idle RSS with {} workloads: node-a {} KiB, node-b {} KiB",
        args.workloads,
        idle_rss[0] / 1024,
        idle_rss[1] / 1024
    );
    for p in PATHS {
        probe(&net, p)?;
    }

    let mut rows = Vec::new();
    let kib = 1024.0;
    rows.push(Row {
        name: format!(
            "agent RSS idle, {} workloads (node-a / node-b)",
            args.workloads
        ),
        unit: "KiB",
        values: [
            None,
            Some(idle_rss[0] as f64 / kib),
            Some(idle_rss[1] as f64 / kib),
        ],
        target: "<= 16384".into(),
    });

    // Memory per idle connection, each path on fresh agents: memory the
    // allocator kept from earlier runs would hide the cost.
    let mut per_conn = [None, None, None];
    let mut per_conn_b = None;
    // RSS above the pre-burst value once the connections closed: after 2 s
    // and after 10 s, both well inside the pool's idle timeout (60 s).
    let mut left = [[None; 3]; 2];
    let mut held = [0; 3];
    let mut b = b;
    let memory_paths = args.cases(Part::Memory, &[Via::Proxy, Via::Hbone]);
    for &p in memory_paths {
        drop((a, b));
        a = setup.agent_logging("node-a", "", &args.memory_agent_log)?;
        b = setup.agent_logging("node-b", "", &args.memory_agent_log)?;
        probe(&net, p)?;
        std::thread::sleep(Duration::from_secs(1));
        let (dst, bypass) = net.dst(p, ECHO_PORT);
        let before = [a.rss(), b.rss()];
        // The plain proxy holds two sockets per connection in one process:
        // half as many keep it within the same open-file limit.
        let n = match p {
            Via::Proxy => args.idle_conns / 2,
            _ => args.idle_conns,
        };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let holder = apps::in_netns(&net.client_ns, move || async move {
            match apps::open_idle(dst, bypass, n, 200).await {
                Ok(conns) => {
                    let _ = held_tx.send(Ok(()));
                    // Hold them until measured.
                    let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
                    drop(conns);
                    Ok(())
                }
                Err(e) => {
                    let _ = held_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    Err(e)
                }
            }
        });
        held_rx
            .recv()
            .context("holder thread")?
            .with_context(|| format!("{p:?}: opening {n} idle connections"))?;
        std::thread::sleep(Duration::from_secs(2));
        let after = [a.rss(), b.rss()];
        let _ = tx.send(());
        let _ = holder.join();
        std::thread::sleep(Duration::from_secs(2));
        let closed_2s = [a.rss(), b.rss()];
        std::thread::sleep(Duration::from_secs(8));
        let closed_10s = [a.rss(), b.rss()];
        let grew = |now: [u64; 2], i: usize| now[i].saturating_sub(before[i]) as f64 / 1024.0;
        eprintln!(
            "{p:?}: after closing them, RSS above before: +2 s node-a {:.0} KiB, node-b {:.0} KiB; \
             +10 s node-a {:.0} KiB, node-b {:.0} KiB",
            grew(closed_2s, 0),
            grew(closed_2s, 1),
            grew(closed_10s, 0),
            grew(closed_10s, 1)
        );
        let col = match p {
            Via::Proxy => 1,
            _ => 2,
        };
        left[0][col] = Some(grew(closed_2s, 0));
        left[1][col] = Some(grew(closed_10s, 0));
        let per = |i: usize| after[i].saturating_sub(before[i]) as f64 / n as f64;
        eprintln!(
            "{p:?}: {n} idle connections: node-a +{:.0} B/conn, node-b +{:.0} B/conn",
            per(0),
            per(1)
        );
        held[p as usize] = n;
        match p {
            Via::Proxy => per_conn[1] = Some(per(0)),
            _ => {
                per_conn[2] = Some(per(0));
                per_conn_b = Some(per(1));
            }
        }
    }
    if args.runs(Part::Memory) {
        for (i, when) in ["2 s", "10 s"].into_iter().enumerate() {
            rows.push(Row {
                name: format!(
                    "agent RSS above its pre-burst value {when} after the held connections closed (node-a)"
                ),
                unit: "KiB",
                values: left[i],
                target: "<= 2048".into(),
            });
        }
        rows.push(Row {
            name: format!(
                "agent memory per idle connection, {} (proxy) / {} (HBONE) held (node-a, log {})",
                held[1], held[2], args.memory_agent_log
            ),
            unit: "B",
            values: per_conn,
            target: "<= 4096".into(),
        });
        rows.push(Row {
            name: format!(
                "agent memory per idle connection (node-b, HBONE inbound, log {})",
                args.memory_agent_log
            ),
            unit: "B",
            values: [None, None, per_conn_b],
            target: "<= 4096".into(),
        });
    }

    // Throughput, with the agents' and the applications' CPU time.
    let total = args.mib << 20;
    let gib = total as f64 / (1u64 << 30) as f64;
    let rounds = args.rounds.max(1);
    let stream_counts = args.cases(Part::Throughput, &[1usize, 4]);
    let mut ceilings = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for &streams in stream_counts {
        let mut runs: [Vec<f64>; 3] = Default::default();
        let mut cpu_total = [Duration::ZERO; 3];
        let mut machine_total = [Duration::ZERO; 3];
        let mut wall_total = [Duration::ZERO; 3];
        for _ in 0..rounds {
            for p in PATHS {
                let (dst, bypass) = net.dst(p, SINK_PORT);
                let (cpu_a, cpu_b, cpu_app) = (a.cpu(), b.cpu(), procstat::self_cpu());
                let machine = procstat::machine_busy()?;
                let took = apps::run_in_netns(&net.client_ns, move || {
                    apps::throughput(dst, bypass, streams, total)
                })?;
                machine_total[p as usize] += procstat::machine_busy()?.saturating_sub(machine);
                wall_total[p as usize] += took;
                let agents = (a.cpu() - cpu_a) + (b.cpu() - cpu_b);
                let app = procstat::self_cpu() - cpu_app;
                let rate = total as f64 * 8.0 / took.as_secs_f64() / 1e9;
                runs[p as usize].push(rate);
                // The baseline's yardstick: what the applications spend.
                cpu_total[p as usize] += match p {
                    Via::Direct => app,
                    _ => agents,
                };
                eprintln!(
                    "{p:?} {streams} stream(s): {rate:.2} Gbit/s, agents {:.2} s CPU, apps {:.2} s CPU",
                    agents.as_secs_f64(),
                    app.as_secs_f64()
                );
            }
        }
        let gbits = runs.map(|r| Some(median(r)));
        let cpu = cpu_total.map(|c| Some(c.as_secs_f64() / (gib * rounds as f64)));
        rows.push(Row {
            name: format!("throughput, {streams} stream(s), {} MiB", args.mib),
            unit: "Gbit/s",
            values: gbits,
            target: ">= 0.45x".into(),
        });
        rows.push(Row {
            name: format!("CPU per GiB, {streams} stream(s) (direct: the apps; else the agents)"),
            unit: "s/GiB",
            values: cpu,
            target: String::new(),
        });
        let machine = machine_total.map(|c| Some(c.as_secs_f64() / (gib * rounds as f64)));
        rows.push(Row {
            name: format!(
                "machine CPU per GiB, {streams} stream(s) (every process and the kernel)"
            ),
            unit: "s/GiB",
            values: machine,
            target: String::new(),
        });
        rows.push(Row {
            name: format!("cores busy during the {streams}-stream runs"),
            unit: "cores",
            values: std::array::from_fn(|i| {
                Some(machine_total[i].as_secs_f64() / wall_total[i].as_secs_f64().max(1e-9))
            }),
            target: String::new(),
        });
        // Throughput is CPU-bound here: with every core on it, HBONE could
        // move at most this much, given what a GiB costs the machine.
        if let (Some(direct), Some(hbone)) = (gbits[0], machine[2]) {
            let ceiling = cores as f64 * GBIT_PER_GIB / hbone;
            ceilings.push((streams, hbone, ceiling, ceiling / direct));
        }
    }

    // Latency on a persistent connection.
    let mut added = Vec::new();
    let sizes = args.cases(Part::Latency, &[1usize, 1024]);
    for &size in sizes {
        let mut samples: [Vec<Duration>; 3] = Default::default();
        for _ in 0..rounds {
            for p in PATHS {
                let (dst, bypass) = net.dst(p, ECHO_PORT);
                let iters = args.iters;
                samples[p as usize].extend(apps::run_in_netns(&net.client_ns, move || {
                    apps::latency(dst, bypass, size, iters / 10, iters)
                })?);
            }
        }
        let q = |q: f64| {
            samples.clone().map(|mut s| {
                s.sort_unstable();
                Some(us(apps::quantile(&s, q)))
            })
        };
        let (p50, p99) = (q(0.50), q(0.99));
        if size == 1 {
            let d = |v: [Option<f64>; 3]| v[2].unwrap_or(0.0) - v[0].unwrap_or(0.0);
            added.push((d(p50), d(p99)));
        }
        let label = if size == 1 { "1 B" } else { "1 KiB" };
        rows.push(Row {
            name: format!("round trip p50, {label}"),
            unit: "us",
            values: p50,
            target: if size == 1 {
                "+<= 30 us".into()
            } else {
                String::new()
            },
        });
        rows.push(Row {
            name: format!("round trip p99, {label}"),
            unit: "us",
            values: p99,
            target: if size == 1 {
                "+<= 100 us".into()
            } else {
                String::new()
            },
        });
    }

    // New connections per second. First with a fresh mTLS handshake per
    // tunnel (node-a retires each HTTP/2 connection after one stream), while
    // the namespaces' port space is clean: tens of thousands of TIME_WAIT
    // sockets from the pooled runs slow the agents' bound connects (seen:
    // 70/s instead of 1,000/s when run after them).
    let secs = Duration::from_secs_f64(args.rate_secs);
    if args.runs(Part::Rate) {
        drop(a);
        a = setup.agent("node-a", "streamsPerConnection: 1")?;
        probe(&net, Via::Hbone)?;
        let opened_before = a.pool_opened()?;
        let (dst, bypass) = net.dst(Via::Hbone, ECHO_PORT);
        let workers = args.rate_workers;
        let mut fresh_rates = Vec::new();
        let mut conns = 0.0;
        for _ in 0..rounds {
            let t = Instant::now();
            let r = apps::run_in_netns(&net.client_ns, move || {
                apps::connection_rate(dst, bypass, workers, secs)
            })?;
            conns += r * t.elapsed().as_secs_f64();
            fresh_rates.push(r);
            std::thread::sleep(Duration::from_secs(1));
        }
        let fresh = median(fresh_rates);
        let handshakes = a.pool_opened()? - opened_before;
        eprintln!(
            "fresh mTLS: {fresh:.0} conn/s; {handshakes} handshakes for ~{conns:.0} connections"
        );

        // Then pooled HTTP/2 (node-a back on the default pool).
        drop(a);
        a = setup.agent("node-a", "")?;
        probe(&net, Via::Hbone)?;
        let mut rates: [Vec<f64>; 3] = Default::default();
        for _ in 0..rounds {
            for p in PATHS {
                let (dst, bypass) = net.dst(p, ECHO_PORT);
                let workers = args.rate_workers;
                rates[p as usize].push(apps::run_in_netns(&net.client_ns, move || {
                    apps::connection_rate(dst, bypass, workers, secs)
                })?);
                // TIME_WAIT and the agents' closing connections settle.
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        let rate = rates.map(|r| Some(median(r)));
        rows.push(Row {
            name: "new connections/s, 1 round trip each (HBONE: pooled HTTP/2)".into(),
            unit: "conn/s",
            values: rate,
            target: ">= 1500".into(),
        });
        rows.push(Row {
            name: format!("new connections/s, fresh mTLS handshake each ({handshakes} handshakes)"),
            unit: "conn/s",
            values: [rate[0], None, Some(fresh)],
            target: ">= 500".into(),
        });
    }

    println!(
        "\nambient-agent harness: {} cores, {} workloads, {} MiB per throughput run, {} round trips per latency run, {} rounds",
        cores,
        args.workloads,
        args.mib,
        args.iters,
        rounds
    );
    print_table(&rows);
    for (streams, cost, ceiling, ratio) in ceilings {
        println!("\n{streams} stream(s): a GiB through HBONE costs the machine {cost:.2} s of CPU; with all {cores} cores on it, HBONE could move at most {ceiling:.2} Gbit/s = {ratio:.2}x this run's direct TCP");
    }
    for (p50, p99) in added {
        println!("\nadded round-trip latency through two agents, 1 B: p50 +{p50:.1} us, p99 +{p99:.1} us (targets +30 / +100)");
    }
    drop(a);
    drop(b);
    drop(servers);
    drop(topo);
    Ok(())
}
