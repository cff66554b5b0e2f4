//! Double HBONE against single HBONE, in one run: two nodes in network
//! namespaces, agents and an east-west gateway as their own processes
//! (`ambient-agent run`, `ambient-agent gateway`), and from the client
//! pod on node-a, interleaved in each round:
//!
//! - direct TCP to the `outside` pod on node-b (not in the mesh), marked
//!   so capture leaves it alone (the baseline);
//! - HBONE to service `near`, whose endpoint (`server`) is on the client's
//!   network;
//! - double HBONE to service `far`, whose endpoint (`far`, also on node-b)
//!   is on another network, through that network's gateway (`ewgw`, on
//!   node-b too, so both tunnels cross the same wire).
//!
//! Prints throughput, round-trip latency and new connections per second
//! for each, with ratios to direct TCP and of double to single HBONE.
//! Needs root and a release build of `ambient-agent` next to this binary
//! (`scripts/bench double`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambient_agent::identity::LocalCa;
use ambient_benches::apps::{self, ECHO_PORT, SINK_PORT};
use ambient_benches::nodes::{self, tune_pod, Reaped, Setup};
use ambient_benches::procstat;
use ambient_tests::netns::{Pod, Topology};
use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Direct TCP vs HBONE vs double HBONE through a gateway, in one run")]
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
    /// Rounds, the three paths interleaved in each; throughput and rates
    /// report the median round, latency the quantiles of all samples.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The agent binary. [default: `ambient-agent` next to this binary]
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Internal: serve the echo and sink applications on this address.
    #[arg(long, hide = true)]
    serve: Option<IpAddr>,
}

const NEAR_VIP: &str = "10.96.0.1";
const FAR_VIP: &str = "10.96.0.2";

#[derive(Clone, Copy, Debug)]
enum Via {
    Direct,
    Hbone,
    Double,
}

const PATHS: [Via; 3] = [Via::Direct, Via::Hbone, Via::Double];

fn dst(p: Via, outside: &Pod, port: u16) -> (SocketAddr, bool) {
    let vip = |v: &str| SocketAddr::new(v.parse().expect("vip"), port);
    match p {
        Via::Direct => (outside.addr(port), true),
        Via::Hbone => (vip(NEAR_VIP), false),
        Via::Double => (vip(FAR_VIP), false),
    }
}

fn mesh(client: &Pod, server: &Pod, far: &Pod, ewgw: &Pod) -> String {
    let net = |y: String, n: &str| format!("{y}    network: {n}\n");
    let ports = format!("[{{port: {ECHO_PORT}}}, {{port: {SINK_PORT}}}]");
    format!(
        "workloads:\n{}{}{}    networkGateway: {{address: \"{gw}\", hbonePort: 15008}}\n\
         \x20 - uid: ewgw\n    name: ewgw\n    namespace: gateways\n    serviceAccount: eastwest\n    addresses: [\"{gw}\"]\n    node: gateways\n    network: net2\n\
         services:\n\
         \x20 - {{name: near, namespace: bench, vips: [\"{NEAR_VIP}\"], ports: {ports}, endpoints: [server]}}\n\
         \x20 - {{name: far, namespace: bench, vips: [\"{FAR_VIP}\"], ports: {ports}, endpoints: [far]}}\n",
        net(client.workload_yaml("bench", "node-a", "client"), "net1"),
        net(server.workload_yaml("bench", "node-b", "server"), "net1"),
        net(far.workload_yaml("bench", "node-b", "far"), "net2"),
        gw = ewgw.ip,
    )
}

fn probe(client_ns: &std::path::Path, dst: SocketAddr, bypass: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = apps::run_in_netns(client_ns, move || async move {
            let rt = apps::latency(dst, bypass, 1, 0, 1);
            tokio::time::timeout(Duration::from_secs(5), rt)
                .await
                .context("no answer in 5 s")?
        });
        match r {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("probe {dst}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(agent_bin) = nodes::start(args.serve, args.agent.as_deref())? else {
        return Ok(());
    };
    let topo = Topology::new("dbl")?;
    let client = topo.add_pod("client", 0)?;
    let server = topo.add_pod("server", 1)?;
    let far = topo.add_pod("far", 1)?;
    let ewgw = topo.add_pod("ewgw", 1)?;
    let outside = topo.add_pod("outside", 1)?;
    for p in [&client, &server, &far, &outside] {
        tune_pod(p)?;
    }
    let dir = tempfile::tempdir()?;
    let (root, key) = (dir.path().join("root.pem"), dir.path().join("root-key.pem"));
    LocalCa::generate("cluster.local")?.write_pem(&root, &key)?;
    std::fs::write(
        dir.path().join("mesh.yaml"),
        mesh(&client, &server, &far, &ewgw),
    )?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for p in [&server, &far, &outside] {
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .arg(&exe)
            .arg("--serve")
            .arg(p.ip.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the server applications")?;
        children.push(Reaped(child));
    }
    let setup = Setup {
        dir,
        agent_bin,
        log_level: "warn".into(),
    };
    let gateway = setup.role(&ewgw, "gateway", "ewgw")?;
    let a = setup.agent("node-a", "")?;
    let b = setup.agent("node-b", "")?;
    let client_ns: PathBuf = client.netns_path().into();
    for p in PATHS {
        let (d, bypass) = dst(p, &outside, ECHO_PORT);
        probe(&client_ns, d, bypass).with_context(|| format!("{p:?}"))?;
    }
    let cpu = || a.cpu() + b.cpu() + procstat::cpu(gateway.0.id()).unwrap_or_default();

    let total = args.mib << 20;
    let rounds = args.rounds.max(1);
    let mut gbits: [Vec<f64>; 3] = Default::default();
    let mut cpu_per_gib = [Duration::ZERO; 3];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for (i, p) in PATHS.into_iter().enumerate() {
            let (d, bypass) = dst(p, &outside, SINK_PORT);
            let before = cpu();
            let took =
                apps::run_in_netns(&client_ns, move || apps::throughput(d, bypass, 1, total))?;
            cpu_per_gib[i] += cpu() - before;
            let rate = total as f64 * 8.0 / took.as_secs_f64() / 1e9;
            gbits[i].push(rate);
            let (d, bypass) = dst(p, &outside, ECHO_PORT);
            let iters = args.iters;
            let mut s = apps::run_in_netns(&client_ns, move || {
                apps::latency(d, bypass, 1, iters / 10, iters)
            })?;
            samples[i].append(&mut s);
            let (workers, secs) = (args.rate_workers, Duration::from_secs_f64(args.rate_secs));
            let cps = apps::run_in_netns(&client_ns, move || {
                apps::connection_rate(d, bypass, workers, secs)
            })?;
            rates[i].push(cps);
            eprintln!("round {round} {p:?}: {rate:.2} Gbit/s, {cps:.0} conn/s");
        }
    }
    let gib = total as f64 * rounds as f64 / (1u64 << 30) as f64;
    let rows: Vec<(String, &str, [f64; 3])> = vec![
        (
            format!("throughput, 1 stream, {} MiB", args.mib),
            "Gbit/s",
            gbits.map(median),
        ),
        (
            "CPU per GiB (agents and gateway; direct: none)".into(),
            "s/GiB",
            cpu_per_gib.map(|c| c.as_secs_f64() / gib),
        ),
        (
            "round trip p50, 1 byte".into(),
            "µs",
            samples.clone().map(|mut s| {
                s.sort_unstable();
                apps::quantile(&s, 0.5).as_secs_f64() * 1e6
            }),
        ),
        (
            "round trip p99, 1 byte".into(),
            "µs",
            samples.map(|mut s| {
                s.sort_unstable();
                apps::quantile(&s, 0.99).as_secs_f64() * 1e6
            }),
        ),
        (
            format!("new connections, {} loops", args.rate_workers),
            "conn/s",
            rates.map(median),
        ),
    ];
    println!();
    println!("| figure | unit | direct TCP | HBONE | double HBONE | HBONE / direct | double / direct | double / HBONE |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, unit, v) in rows {
        let ratio = |x: f64, y: f64| {
            if y > 0.0 {
                format!("{:.2}x", x / y)
            } else {
                "—".into()
            }
        };
        println!(
            "| {name} | {unit} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            v[0],
            v[1],
            v[2],
            ratio(v[1], v[0]),
            ratio(v[2], v[0]),
            ratio(v[2], v[1])
        );
    }
    drop((a, b, gateway, children));
    Ok(())
}
