//! HTTP through the waypoint against HTTP over plain HBONE, in one run:
//! two nodes in network namespaces, agents and the reference waypoint as
//! their own processes (`ambient-agent run`, `ambient-agent waypoint`),
//! and from the client pod on node-a, interleaved in each round:
//!
//! - HTTP to service `direct`, whose endpoint (`plain`, node-b) has no
//!   waypoint: the agents' HBONE only (the baseline);
//! - HTTP to service `l7`, whose endpoint (`behind`, node-b) is behind the
//!   waypoint (also on node-b): client agent -> waypoint -> backend agent.
//!
//! Each in HTTP/1.1 (keep-alive connections, one request in flight on
//! each) and HTTP/2 (prior knowledge, one connection, concurrent
//! streams). Prints requests per second under concurrency and the
//! latency of one request at a time, with ratios of waypoint to direct.
//! Needs root and a release build of `ambient-agent` next to this binary
//! (`scripts/bench waypoint`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambient_agent::identity::LocalCa;
use ambient_benches::apps;
use ambient_benches::nodes::{self, tune_pod, Reaped, Setup};
use ambient_benches::procstat;
use ambient_tests::netns::{Pod, Topology};
use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser, Debug)]
#[command(about = "HTTP through the waypoint vs over plain HBONE, in one run")]
struct Args {
    /// Seconds each requests-per-second run lasts.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Requests in flight in the requests-per-second runs (HTTP/1.1:
    /// connections; HTTP/2: streams on one connection).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Timed requests per latency run (one at a time).
    #[arg(long, default_value_t = 5_000)]
    iters: usize,
    /// Rounds; rates report the median round, latency all samples.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The agent binary. [default: `ambient-agent` next to this binary]
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Internal: serve HTTP on this address, port 8080.
    #[arg(long, hide = true)]
    serve_http: Option<IpAddr>,
}

const PORT: u16 = 8080;
const DIRECT_VIP: &str = "10.96.0.1";
const L7_VIP: &str = "10.96.0.2";
/// The body every answer carries.
const ANSWER: &[u8] = b"ok";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    Http1,
    Http2,
}

fn mesh(client: &Pod, plain: &Pod, behind: &Pod, wp: &Pod) -> String {
    let wp_ip = wp.ip;
    format!(
        "workloads:\n{}{}{}    waypoint: {{address: \"{wp_ip}\"}}\n\
         \x20 - {{uid: waypoint, name: waypoint, namespace: bench, serviceAccount: waypoint, addresses: [\"{wp_ip}\"], node: waypoints}}\n\
         services:\n\
         \x20 - {{name: direct, namespace: bench, vips: [\"{DIRECT_VIP}\"], ports: [{{port: 80, targetPort: {PORT}}}], endpoints: [{p}]}}\n\
         \x20 - {{name: l7, namespace: bench, vips: [\"{L7_VIP}\"], ports: [{{port: 80, targetPort: {PORT}}}], endpoints: [{b}], waypoint: {{address: \"{wp_ip}\"}}}}\n",
        client.workload_yaml("bench", "node-a", "client"),
        plain.workload_yaml("bench", "node-b", "plain"),
        behind.workload_yaml("bench", "node-b", "behind"),
        p = plain.name,
        b = behind.name,
    )
}

/// Answers every request with [`ANSWER`], HTTP/1.1 or HTTP/2.
async fn serve_http(ip: IpAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, PORT)).await?;
    loop {
        let (s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(ANSWER))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), service)
                .await;
        });
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

async fn open(vip: &str, proto: Proto) -> anyhow::Result<Sender> {
    let dst = SocketAddr::new(vip.parse()?, 80);
    let s = apps::connect(dst, false).await?;
    let io = TokioIo::new(s);
    Ok(match proto {
        Proto::Http1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(send)
        }
        Proto::Http2 => {
            let (send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(send)
        }
    })
}

async fn one(send: &mut Sender) -> anyhow::Result<()> {
    let req = Request::builder()
        .uri("http://bench.test/")
        .body(Empty::new())?;
    let resp = match send {
        Sender::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::H2(s) => s.send_request(req).await?,
    };
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(body.as_ref() == ANSWER, "body {body:?}");
    Ok(())
}

/// Requests per second with `concurrency` in flight for `secs`.
async fn rate(
    vip: &'static str,
    proto: Proto,
    concurrency: usize,
    secs: Duration,
) -> anyhow::Result<f64> {
    let h2 = match proto {
        Proto::Http2 => Some(open(vip, proto).await?),
        Proto::Http1 => None,
    };
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut send = match &h2 {
            Some(Sender::H2(s)) => Sender::H2(s.clone()),
            _ => open(vip, proto).await?,
        };
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                one(&mut send).await?;
                n += 1;
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Latency of `iters` requests, one at a time on one connection, after
/// `iters / 10` unrecorded.
async fn latency(vip: &'static str, proto: Proto, iters: usize) -> anyhow::Result<Vec<Duration>> {
    let mut send = open(vip, proto).await?;
    for _ in 0..iters / 10 {
        one(&mut send).await?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        one(&mut send).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_unstable_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(ip) = args.serve_http {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(serve_http(ip));
    }
    let Some(agent_bin) = nodes::start(None, args.agent.as_deref())? else {
        return Ok(());
    };
    let topo = Topology::new("wpb")?;
    let client = topo.add_pod("client", 0)?;
    let plain = topo.add_pod("plain", 1)?;
    let behind = topo.add_pod("behind", 1)?;
    let wp = topo.add_pod("waypoint", 1)?;
    for p in [&client, &plain, &behind] {
        tune_pod(p)?;
    }
    let dir = tempfile::tempdir()?;
    let (root, key) = (dir.path().join("root.pem"), dir.path().join("root-key.pem"));
    LocalCa::generate("cluster.local")?.write_pem(&root, &key)?;
    let mesh_path = dir.path().join("mesh.yaml");
    std::fs::write(&mesh_path, mesh(&client, &plain, &behind, &wp))?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for p in [&plain, &behind] {
        let child = Command::new("ip")
            .args(["netns", "exec", &p.netns])
            .arg(&exe)
            .arg("--serve-http")
            .arg(p.ip.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("starting the HTTP servers")?;
        children.push(Reaped(child));
    }
    let setup = Setup {
        dir,
        agent_bin,
        log_level: "warn".into(),
    };
    let waypoint = setup.role(&wp, "waypoint", "waypoint")?;
    let a = setup.agent("node-a", "")?;
    let b = setup.agent("node-b", "")?;
    let client_ns: PathBuf = client.netns_path().into();
    // Both paths answer before anything is timed.
    for vip in [DIRECT_VIP, L7_VIP] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = apps::run_in_netns(&client_ns, move || async move {
                let mut s = open(vip, Proto::Http1).await?;
                tokio::time::timeout(Duration::from_secs(5), one(&mut s)).await?
            });
            match r {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("probe {vip}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    let cpu = || a.cpu() + b.cpu() + procstat::cpu(waypoint.0.id()).unwrap_or_default();

    // (protocol, path) in a fixed order: h1 direct, h1 waypoint, h2 direct, h2 waypoint.
    let cases = [
        (Proto::Http1, DIRECT_VIP),
        (Proto::Http1, L7_VIP),
        (Proto::Http2, DIRECT_VIP),
        (Proto::Http2, L7_VIP),
    ];
    let mut rps: [Vec<f64>; 4] = Default::default();
    let mut cpu_per_k: [Vec<f64>; 4] = Default::default();
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let secs = Duration::from_secs_f64(args.secs);
    for round in 0..args.rounds.max(1) {
        for (i, (proto, vip)) in cases.into_iter().enumerate() {
            let before = cpu();
            let conc = args.concurrency;
            let r = apps::run_in_netns(&client_ns, move || rate(vip, proto, conc, secs))?;
            let used = (cpu() - before).as_secs_f64();
            rps[i].push(r);
            cpu_per_k[i].push(used / (r * secs.as_secs_f64()) * 1000.0);
            let iters = args.iters;
            let mut s = apps::run_in_netns(&client_ns, move || latency(vip, proto, iters))?;
            samples[i].append(&mut s);
            eprintln!("round {round} {proto:?} {vip}: {r:.0} req/s");
        }
    }
    let q = |s: &mut Vec<Duration>, q: f64| {
        s.sort_unstable();
        apps::quantile(s, q).as_secs_f64() * 1e6
    };
    println!();
    println!("| protocol | figure | unit | direct HBONE | via waypoint | waypoint / direct |");
    println!("|---|---|---|---|---|---|");
    for (proto, i) in [("HTTP/1.1", 0), ("HTTP/2", 2)] {
        let rows = [
            (
                format!("requests/s, {} in flight", args.concurrency),
                "req/s",
                median(rps[i].clone()),
                median(rps[i + 1].clone()),
            ),
            (
                "CPU per 1,000 requests (agents + waypoint)".into(),
                "ms",
                median(cpu_per_k[i].clone()) * 1000.0,
                median(cpu_per_k[i + 1].clone()) * 1000.0,
            ),
            (
                "latency p50, one at a time".into(),
                "µs",
                q(&mut samples[i], 0.5),
                q(&mut samples[i + 1], 0.5),
            ),
            (
                "latency p99, one at a time".into(),
                "µs",
                q(&mut samples[i], 0.99),
                q(&mut samples[i + 1], 0.99),
            ),
        ];
        for (name, unit, d, w) in rows {
            println!(
                "| {proto} | {name} | {unit} | {d:.1} | {w:.1} | {:.2}x |",
                w / d
            );
        }
    }
    drop((a, b, waypoint, children));
    Ok(())
}
