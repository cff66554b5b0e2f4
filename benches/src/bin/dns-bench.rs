//! DNS proxy benchmark (release builds, root): queries per second and
//! p50/p99 latency from a pod for a mesh name (answered by the agent's
//! proxy), a forwarded name (proxy → upstream resolver in another pod) and
//! the same name asked of the upstream directly (socket marked so capture
//! leaves it alone: the baseline, same hops without the proxy).
//!
//! ```sh
//! cargo build --release -p ambient-benches --bin dns-bench
//! target/release/dns-bench --queries 20000 --workers 8
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_agent::capture::CaptureMode;
use ambient_agent::config::{Config, DnsConfig};
use ambient_agent::identity::LocalCa;
use ambient_agent::socket::Sockets;
use ambient_tests::dns::{Upstream, CLUSTER_DNS};
use ambient_tests::netns::Topology;
use ambient_tests::World;
use anyhow::Context;
use clap::Parser;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

#[derive(Parser)]
struct Args {
    /// Timed queries per path, per worker.
    #[arg(long, default_value_t = 5000)]
    queries: usize,
    /// Concurrent clients (each its own socket) for the throughput runs.
    #[arg(long, default_value_t = 8)]
    workers: usize,
}

const MARK: u32 = 0x539;

fn query_bytes(name: &str, id: u16) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, RecordType::A));
    Ok(m.to_vec()?)
}

/// Sequential queries on one socket: per-query latencies.
async fn latencies(
    sockets: &Sockets,
    mark: Option<u32>,
    server: SocketAddr,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
    let s = sockets.udp(any, mark, false).await?;
    s.connect(server).await?;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let q = query_bytes(name, (i % 65_536) as u16)?;
        let t = Instant::now();
        s.send(&q).await?;
        tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .context("no answer in 5 s")??;
        // The first tenth warms up.
        if i >= n / 10 {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `workers` sequential clients at once: queries per second over all.
async fn throughput(
    sockets: &Sockets,
    mark: Option<u32>,
    server: SocketAddr,
    name: &str,
    n: usize,
    workers: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (sockets, name) = (sockets.clone(), name.to_string());
        tasks.push(tokio::spawn(async move {
            latencies(&sockets, mark, server, &name, n).await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??.len();
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ambient_tests::netns::check_root().map_err(anyhow::Error::msg)?;
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; figures are only meaningful in release");
    }
    let topo = Topology::new("dnsb")?;
    let client = topo.add_pod("client", 0)?;
    let resolver = topo.add_pod("resolver", 1)?;
    let upstream_addr = SocketAddr::new(IpAddr::V4(resolver.ip), 53);
    let _upstream = Upstream::start(&resolver.sockets(), upstream_addr).await;
    let w = World::new(0);
    w.write_mesh(&format!(
        "workloads:\n{}services:\n  - name: echo\n    namespace: test\n    vips: [10.96.1.1]\n",
        client.workload_yaml("test", "node-a", "client")
    ));
    let cfg = Config {
        capture: Some(CaptureMode::Nft),
        socket_mark: MARK,
        dns: DnsConfig {
            enabled: Some(true),
            upstreams: vec![upstream_addr.to_string()],
            ..DnsConfig::default()
        },
        ..w.config("node-a")
    };
    let ca = Arc::new(LocalCa::generate("cluster.local")?);
    let _agent =
        ambient_agent::agent::Agent::start_with_signer(cfg, ca.clone(), ca.trust_bundle()).await?;
    let sockets = client.sockets();
    let proxy = SocketAddr::new(IpAddr::V4(CLUSTER_DNS), 53);
    let paths = [
        (
            "upstream directly (baseline)",
            Some(MARK),
            upstream_addr,
            "outside.example.",
        ),
        ("forwarded by the proxy", None, proxy, "outside.example."),
        (
            "mesh name, from the proxy",
            None,
            proxy,
            "echo.test.svc.cluster.local.",
        ),
    ];
    println!("DNS over UDP from a pod, {} queries per path", args.queries);
    let mut base_qps = 0.0;
    for (i, (what, mark, server, name)) in paths.into_iter().enumerate() {
        let mut l = latencies(&sockets, mark, server, name, args.queries).await?;
        l.sort_unstable();
        let qps = throughput(&sockets, mark, server, name, args.queries / 4, args.workers).await?;
        if i == 0 {
            base_qps = qps;
        }
        println!(
            "{what:32} p50 {:>7.1} µs  p99 {:>7.1} µs  {qps:>9.0} q/s with {} clients ({:.2}x baseline)",
            percentile(&l, 0.5).as_secs_f64() * 1e6,
            percentile(&l, 0.99).as_secs_f64() * 1e6,
            args.workers,
            qps / base_qps
        );
    }
    Ok(())
}
