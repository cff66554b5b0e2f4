//! Graceful drain: what is in flight finishes, what is new is refused, and
//! the agent is gone by the deadline.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ambient_tests::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_transfers_finish_and_new_connections_are_refused() {
    init_tracing();
    let w = World::new(31);
    let a = w.agent("node-a").await;
    let b = w.agent("node-b").await;
    let echo = Echo::start(w.server_app()).await;

    // A transfer that takes a while: 32 MiB in paced chunks.
    let c = a.connect_as("client", w.server_app()).await.unwrap();
    let transfer = tokio::spawn(async move {
        let (mut rd, mut wr) = c.into_split();
        let data = payload(32 << 20, 5);
        let expect = Sha256::digest(&data);
        let send = async move {
            for chunk in data.chunks(1 << 20) {
                wr.write_all(chunk).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            wr.shutdown().await
        };
        let mut back = Vec::new();
        let (s, r) = tokio::join!(send, rd.read_to_end(&mut back));
        s.unwrap();
        r.unwrap();
        Sha256::digest(&back) == expect
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    let drain = tokio::spawn(b.drain(Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // New connections are refused once the drain began.
    let mut late = a.connect_as("client", w.server_app()).await.unwrap();
    let _ = late.write_all(b"late").await;
    let mut got = Vec::new();
    let r = timeout(Duration::from_secs(10), late.read_to_end(&mut got))
        .await
        .expect("no hang");
    assert!(
        r.is_err() || got.is_empty(),
        "a new connection got through: {got:?}"
    );

    assert!(
        transfer.await.unwrap(),
        "the in-flight transfer lost or changed bytes"
    );
    let cut = drain.await.unwrap();
    assert_eq!(cut, 0, "nothing left to cut");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        echo.accepted.load(Ordering::SeqCst),
        1,
        "only the first connection reached the app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_gone_by_the_deadline() {
    init_tracing();
    let w = World::new(32);
    let a = w.agent("node-a").await;
    let b = w.agent("node-b").await;
    let _echo = Echo::start(w.server_app()).await;
    // A connection that never finishes.
    let mut idle = a.connect_as("client", w.server_app()).await.unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).await.unwrap();

    let started = Instant::now();
    let cut = b.drain(Duration::from_millis(500)).await;
    let took = started.elapsed();
    assert_eq!(cut, 1, "the idle connection was cut");
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The cut connection is closed for the client too.
    let mut rest = Vec::new();
    let r = timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(r.is_err() || rest.is_empty());
}
