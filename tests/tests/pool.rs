//! HBONE pool behaviour against a real agent: stream limits, single-flight
//! creation, idle release, and identity checks.

use std::sync::Arc;
use std::time::Duration;

use ambient_agent::hbone::{H2Stream, Pool, PoolConfig, PoolError, PoolKey};
use ambient_agent::identity::Identity;
use ambient_agent::socket::Sockets;
use ambient_tests::*;
use http::{Method, Request};
use tokio::time::timeout;

fn request(target: std::net::SocketAddr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap()
}

struct Setup {
    w: World,
    _server: ambient_agent::agent::Agent,
    _echo: Echo,
    pool: Pool,
    key: PoolKey,
    expected: Vec<Identity>,
}

async fn setup(net: u8, cfg: PoolConfig) -> Setup {
    init_tracing();
    let w = World::new(net);
    let server = w.agent("node-b").await;
    let echo = Echo::start(w.server_app()).await;
    let (pool, key, server_id) = w.client_pool(cfg);
    Setup {
        w,
        _server: server,
        _echo: echo,
        pool,
        key,
        expected: vec![server_id],
    }
}

impl Setup {
    /// Opens a stream to the server app over the pool, with `key`.
    async fn open_with(&self, key: &PoolKey) -> Result<H2Stream, PoolError> {
        let req = request(self.w.server_app());
        self.pool
            .connect(key, &self.expected, req, &Sockets::Host)
            .await
    }

    async fn open(&self) -> H2Stream {
        self.open_with(&self.key).await.expect("stream opens")
    }
}

#[tokio::test]
async fn opens_a_new_connection_past_max_streams() {
    let s = setup(
        21,
        PoolConfig {
            max_streams: 10,
            ..Default::default()
        },
    )
    .await;
    let mut streams = Vec::new();
    for _ in 0..25 {
        let st = s.open().await;
        streams.push(st);
    }
    let stats = s.pool.stats();
    assert_eq!(stats.connections_opened, 3, "{stats:?}");
    assert_eq!(stats.streams_active, 25);
    drop(streams);
    // Freed slots are reused rather than opening more connections.
    let _again = s.open().await;
    assert_eq!(s.pool.stats().connections_opened, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_is_single_flight_per_key() {
    // 50 concurrent streams: at most `spread` connections, never a
    // handshake per stream.
    for (net, spread) in [(22, 1), (28, 2)] {
        let cfg = PoolConfig {
            spread,
            ..Default::default()
        };
        let s = Arc::new(setup(net, cfg).await);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move { s.open_with(&s.key).await }));
        }
        let mut streams = Vec::new();
        for t in tasks {
            streams.push(t.await.unwrap().unwrap());
        }
        let stats = s.pool.stats();
        assert!(stats.connections_opened <= spread as u64, "{stats:?}");
        assert_eq!(stats.streams_active, 50);
        // The next stream finds them busy and spreads, if it may.
        streams.push(s.open().await);
        assert_eq!(s.pool.stats().connections_opened, spread as u64);
        // A different key (another source address) gets its own connection.
        let mut other = s.key.clone();
        other.src_ip = None;
        let _o = s.open_with(&other).await.unwrap();
        assert_eq!(s.pool.stats().connections_opened, spread as u64 + 1);
    }
}

#[tokio::test]
async fn concurrent_streams_spread_over_connections() {
    let s = setup(29, PoolConfig::default()).await;
    // One stream at a time shares one connection.
    for _ in 0..3 {
        let mut st = s.open().await;
        assert_eq!(round_trip(&mut st, b"one").await, b"one");
    }
    assert_eq!(s.pool.stats().connections_opened, 1);
    // A second concurrent stream gets a second connection; more share the
    // two, least busy first.
    let mut streams = Vec::new();
    for i in 0..6u8 {
        let mut st = s.open().await;
        assert_eq!(round_trip(&mut st, &[i]).await, [i]);
        streams.push(st);
    }
    let stats = s.pool.stats();
    assert_eq!(stats.connections_opened, 2, "{stats:?}");
    assert_eq!(stats.connections_open, 2);
    assert_eq!(stats.streams_active, 6);
}

/// Sends `data` on the tunnel and reads as many bytes back (the echo app).
async fn round_trip(st: &mut H2Stream, data: &[u8]) -> Vec<u8> {
    st.send
        .send_data(bytes::Bytes::copy_from_slice(data), false)
        .unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = timeout(Duration::from_secs(5), st.recv.data())
            .await
            .expect("echo in time")
            .expect("stream open")
            .expect("data");
        st.recv
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    got
}

#[tokio::test]
async fn idle_connections_are_released() {
    let cfg = PoolConfig {
        idle_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let s = setup(23, cfg).await;
    let st = s.open().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.pool.stats().connections_open, 1, "busy connections stay");
    drop(st);
    timeout(Duration::from_secs(5), async {
        while s.pool.stats().connections_open != 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("idle connection released");
    let _st = s.open().await;
    assert_eq!(s.pool.stats().connections_opened, 2);
}

/// What a burst opened is closed as soon as the burst ends, long before
/// the idle timeout: connections left without a stream beyond the
/// `spread` kept for reuse go at once (with the memory they hold).
#[tokio::test]
async fn a_bursts_surplus_connections_close_when_it_ends() {
    let cfg = PoolConfig {
        max_streams: 10,
        spread: 2,
        idle_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let s = setup(25, cfg).await;
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(s.open().await);
    }
    assert_eq!(s.pool.stats().connections_open, 4);
    drop(streams);
    timeout(Duration::from_secs(5), async {
        while s.pool.stats().connections_open != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("surplus connections closed before the idle timeout");
    // The two kept are reused.
    let _st = s.open().await;
    let stats = s.pool.stats();
    assert_eq!((stats.connections_open, stats.connections_opened), (2, 4));
}

#[tokio::test]
async fn keepalive_pings_keep_a_connection_usable() {
    let cfg = PoolConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(500),
        spread: 1,
        ..Default::default()
    };
    let s = setup(24, cfg).await;
    let st = s.open().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let _st2 = s.open().await;
    assert_eq!(
        s.pool.stats().connections_opened,
        1,
        "answered PINGs keep the connection"
    );
    drop(st);
}

#[tokio::test]
async fn unexpected_server_identity_is_refused() {
    let s = setup(25, PoolConfig::default()).await;
    let wrong = vec![Identity::new("cluster.local", "test", "someone-else")];
    let err = s
        .pool
        .connect(&s.key, &wrong, request(s.w.server_app()), &Sockets::Host)
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::Handshake(..)), "{err}");
    assert!(
        err.to_string().contains("someone-else") || format!("{err:?}").contains("someone-else"),
        "{err:?}"
    );
    assert_eq!(s.pool.stats().connections_open, 0);
}

#[tokio::test]
async fn refused_connect_reports_the_status() {
    let s = setup(26, PoolConfig::default()).await;
    let target = format!("127.{}.2.1:1", s.w.net).parse().unwrap();
    let err = s
        .pool
        .connect(&s.key, &s.expected, request(target), &Sockets::Host)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::Status(http::StatusCode::SERVICE_UNAVAILABLE)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn connections_retire_after_their_stream_budget() {
    let cfg = PoolConfig {
        streams_per_connection: 2,
        ..Default::default()
    };
    let s = setup(91, cfg).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        streams.push(s.open().await);
    }
    assert_eq!(s.pool.stats().connections_opened, 3, "2 + 2 + 1 streams");
    drop(streams);
    // Spent connections leave once their streams end; the open one stays.
    timeout(Duration::from_secs(5), async {
        while s.pool.stats().connections_open != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("retired connections leave the pool");
    let one = PoolConfig {
        streams_per_connection: 1,
        ..Default::default()
    };
    let s = setup(92, one).await;
    for i in 1..=3 {
        let mut st = s.open().await;
        st.send
            .send_data(bytes::Bytes::from_static(b"x"), true)
            .expect("send");
        let echoed = st.recv.data().await.expect("echo").expect("data");
        assert_eq!(&echoed[..], b"x");
        drop(st);
        assert_eq!(
            s.pool.stats().connections_opened,
            i,
            "one handshake per tunnel"
        );
    }
}

#[tokio::test]
async fn cached_tls_configs_still_check_the_peer_identity() {
    // One handshake per tunnel, so each connect builds or reuses a config.
    let cfg = PoolConfig {
        streams_per_connection: 1,
        ..Default::default()
    };
    let s = setup(93, cfg).await;
    let wrong = vec![Identity::new("cluster.local", "test", "someone-else")];
    for _ in 0..2 {
        let _ok = s.open().await;
        let err = s
            .pool
            .connect(&s.key, &wrong, request(s.w.server_app()), &Sockets::Host)
            .await
            .unwrap_err();
        assert!(matches!(err, PoolError::Handshake(..)), "{err}");
    }
    assert_eq!(s.pool.stats().connections_opened, 2, "only the good ones");
}
