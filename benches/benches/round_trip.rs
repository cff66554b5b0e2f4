//! Request/response on loopback: direct TCP (baseline) against the same
//! exchange tunneled through two agents (in process, capture stood in for):
//! a 1-byte round trip on a persistent connection, and a new connection
//! plus one round trip, over a pooled HTTP/2 connection or with a fresh mTLS
//! handshake each time (`streams_per_connection = 1`).

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use ambient_agent::agent::Agent;
use ambient_agent::config::Config;
use ambient_tests::{Echo, World};

async fn ping(stream: &mut TcpStream, buf: &mut [u8]) {
    stream.write_all(&buf[..1]).await.expect("write");
    stream.read_exact(&mut buf[..1]).await.expect("read");
}

/// Both agents of `world`, the client's with `streams_per_connection`.
async fn agents(world: &World, streams_per_connection: u64) -> (Agent, Agent, Echo) {
    let mut cfg: Config = world.config("node-a");
    cfg.pool.streams_per_connection = streams_per_connection;
    let a = world.agent_with(cfg).await;
    let b = world.agent("node-b").await;
    let echo = Echo::start(world.server_app()).await;
    (a, b, echo)
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let world = World::new(201);
    let fresh_world = World::new(202);
    let ((a, _b, _echo), (fresh_a, _fresh_b, _fresh_echo)) =
        rt.block_on(async { (agents(&world, 0).await, agents(&fresh_world, 1).await) });
    let (mut direct, mut tunneled) = rt.block_on(async {
        let direct = TcpStream::connect(world.server_app())
            .await
            .expect("direct");
        direct.set_nodelay(true).expect("nodelay");
        let tunneled = a
            .connect_as("client", world.server_app())
            .await
            .expect("tunnel");
        (direct, tunneled)
    });
    let mut buf = [0u8; 1];
    let mut group = c.benchmark_group("round_trip_1_byte");
    group.bench_function("direct_tcp", |b| {
        b.iter(|| rt.block_on(ping(&mut direct, &mut buf)))
    });
    group.bench_function("hbone_two_agents", |b| {
        b.iter(|| rt.block_on(ping(&mut tunneled, &mut buf)))
    });
    group.finish();

    let mut group = c.benchmark_group("connect_and_round_trip");
    group.bench_function("direct_tcp", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = TcpStream::connect(world.server_app())
                    .await
                    .expect("connect");
                s.set_nodelay(true).expect("nodelay");
                ping(&mut s, &mut [7u8]).await;
            })
        })
    });
    group.bench_function("hbone_pooled", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = a
                    .connect_as("client", world.server_app())
                    .await
                    .expect("tunnel");
                ping(&mut s, &mut [7u8]).await;
            })
        })
    });
    group.bench_function("hbone_fresh_mtls", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut s = fresh_a
                    .connect_as("client", fresh_world.server_app())
                    .await
                    .expect("tunnel");
                ping(&mut s, &mut [7u8]).await;
            })
        })
    });
    group.finish();
    drop((a, fresh_a));
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
