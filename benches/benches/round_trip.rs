//! Request/response round trip on a persistent connection: direct TCP
//! (baseline) against the same exchange tunneled through two agents.

use criterion::{criterion_group, criterion_main, Criterion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use ambient_tests::{Echo, World};

async fn ping(stream: &mut TcpStream, buf: &mut [u8]) {
    stream.write_all(&buf[..1]).await.expect("write");
    stream.read_exact(&mut buf[..1]).await.expect("read");
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let world = World::new(201);
    let (a, _b, _echo, mut direct, mut tunneled) = rt.block_on(async {
        let a = world.agent("node-a").await;
        let b = world.agent("node-b").await;
        let echo = Echo::start(world.server_app()).await;
        let direct = TcpStream::connect(world.server_app())
            .await
            .expect("direct");
        direct.set_nodelay(true).expect("nodelay");
        let tunneled = a
            .connect_as("client", world.server_app())
            .await
            .expect("tunnel");
        (a, b, echo, direct, tunneled)
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
    drop(a);
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
