//! Flow control isolates streams: a reader that stops reading one tunnel
//! never blocks the other tunnels sharing its HTTP/2 connection (DESIGN §4:
//! the connection window exceeds the stream window, and the agent releases
//! a stream's window only as its bytes leave). With the connection window
//! set equal to the stream window this test fails (checked by hand), as
//! the design warns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_agent::hbone::{H2Settings, H2Stream, PoolConfig};
use ambient_agent::socket::Sockets;
use ambient_tests::*;
use bytes::Bytes;
use h2::SendStream;
use http::{Method, Request};
use tokio::time::timeout;

/// Generous: only there to turn a stall into a failure instead of a hang.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends `data` as the peer's window allows, counting bytes in `sent`.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes, sent: &AtomicU64) {
    while !data.is_empty() {
        send.reserve_capacity(data.len().min(1 << 20));
        let granted = std::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .expect("stream open")
            .expect("capacity");
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        send.send_data(chunk, false).expect("send");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_never_blocks_other_streams_on_the_connection() {
    init_tracing();
    let w = World::new(181);
    let _server = w.agent("node-b").await;
    let _echo = Echo::start(w.server_app()).await;
    // One connection for both tunnels: that sharing is what is under test.
    let (pool, key, server_id) = w.client_pool(PoolConfig {
        spread: 1,
        ..Default::default()
    });
    let open = || {
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(w.server_app().to_string())
            .body(())
            .expect("request");
        pool.connect(&key, std::slice::from_ref(&server_id), req, &Sockets::Host)
    };
    let stalled: H2Stream = open().await.expect("first tunnel");
    let busy: H2Stream = open().await.expect("second tunnel");
    let stats = pool.stats();
    assert_eq!(
        stats.connections_opened, 1,
        "both tunnels share one connection: {stats:?}"
    );
    assert_eq!(stats.streams_active, 2, "{stats:?}");

    // The first tunnel's reader never reads: the echo backs up into the
    // client's receive window, then the echo server stops reading, then the
    // agent stops releasing the tunnel's window and the writer stalls.
    let window = u64::from(H2Settings::default().stream_window);
    let stalled_sent = Arc::new(AtomicU64::new(0));
    let progress = stalled_sent.clone();
    let H2Stream {
        send: mut stalled_send,
        recv: _stalled_recv,
        ..
    } = stalled;
    let big = Bytes::from(vec![0x42u8; 512 << 20]);
    let writer = tokio::spawn(async move {
        send_all(&mut stalled_send, big, &progress).await;
        stalled_send
    });
    timeout(FAILURE_TIMEOUT, async {
        while stalled_sent.load(Ordering::SeqCst) <= window {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the stalled tunnel's writer pushes more than a stream window");

    // The second tunnel moves 64 MiB both ways, intact, meanwhile.
    let data = payload(64 << 20, 7);
    let want = sha256(&data);
    let H2Stream {
        send: mut busy_send,
        recv: mut busy_recv,
        ..
    } = busy;
    let sent = AtomicU64::new(0);
    let up = async {
        send_all(&mut busy_send, Bytes::from(data), &sent).await;
        busy_send.send_data(Bytes::new(), true).expect("end stream");
    };
    let down = async {
        let mut back = Vec::with_capacity(64 << 20);
        while let Some(chunk) = busy_recv.data().await {
            let chunk = chunk.expect("echo data");
            busy_recv
                .flow_control()
                .release_capacity(chunk.len())
                .expect("release");
            back.extend_from_slice(&chunk);
        }
        back
    };
    let ((), back) = timeout(FAILURE_TIMEOUT, async { tokio::join!(up, down) })
        .await
        .expect("the second tunnel is not blocked by the stalled one");
    assert_eq!(back.len(), 64 << 20);
    assert_eq!(sha256(&back), want, "second tunnel's bytes intact");

    // The first tunnel is still stalled, not finished: nobody read it.
    assert!(
        !writer.is_finished(),
        "the stalled writer cannot have completed"
    );
    assert!(stalled_sent.load(Ordering::SeqCst) < 512 << 20);
    assert_eq!(pool.stats().connections_opened, 1, "still one connection");
    writer.abort();
}
