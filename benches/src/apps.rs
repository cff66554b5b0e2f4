//! The applications the harness measures with: echo and sink servers that
//! run inside a pod's network namespace, and the client side of each
//! measurement (throughput, request/response latency, connection rate, idle
//! connections), run inside the client pod's namespace.
//!
//! Each runs on its own OS thread that entered the namespace, so every
//! socket it makes belongs there and is captured exactly as a pod
//! application's would be; no per-socket namespace hop skews the figures.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Echoes every byte back until EOF.
pub const ECHO_PORT: u16 = 8080;
/// Reads until EOF, then answers the byte count (u64, little endian).
pub const SINK_PORT: u16 = 8081;
/// SO_MARK that nft capture leaves alone (the agent's own mark): a socket
/// carrying it reaches its destination directly, without the mesh.
pub const BYPASS_MARK: u32 = 0x539;

/// Runs `f` on a new thread inside the network namespace at `netns`, on a
/// single-threaded runtime.
pub fn in_netns<T, F, Fut>(netns: &Path, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path)?;
        // SAFETY: setns on an fd we own; it affects only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
}

/// Runs `f` in `netns` and waits for it.
pub fn run_in_netns<T, F, Fut>(netns: &Path, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    in_netns(netns, f)
        .join()
        .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?
}

/// Serves echo on [`ECHO_PORT`] and sink on [`SINK_PORT`] of `ip` forever.
pub async fn serve(ip: std::net::IpAddr) -> anyhow::Result<()> {
    let echo = TcpListener::bind(SocketAddr::new(ip, ECHO_PORT)).await?;
    let sink = TcpListener::bind(SocketAddr::new(ip, SINK_PORT)).await?;
    let echoes = async {
        loop {
            let (s, _) = echo.accept().await?;
            tokio::spawn(echo_one(s));
        }
    };
    let sinks = async {
        loop {
            let (s, _) = sink.accept().await?;
            tokio::spawn(sink_one(s));
        }
    };
    let r: io::Result<()> = tokio::select! { r = echoes => r, r = sinks => r };
    Ok(r?)
}

async fn echo_one(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    // Idle connections hold no buffer: wait for data before allocating.
    let mut buf = Vec::new();
    loop {
        if s.readable().await.is_err() {
            return;
        }
        if buf.is_empty() {
            buf = vec![0u8; 64 * 1024];
        }
        match s.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
    let _ = s.shutdown().await;
}

async fn sink_one(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_le_bytes()).await;
    let _ = s.shutdown().await;
}

/// Connects to `dst`, around the mesh when `bypass` is set.
pub async fn connect(dst: SocketAddr, bypass: bool) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if bypass {
        socket2::SockRef::from(&socket).set_mark(BYPASS_MARK)?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

/// Sends `total` bytes to the sink at `dst` over `streams` connections at
/// once; returns the time until every sink confirmed every byte.
pub async fn throughput(
    dst: SocketAddr,
    bypass: bool,
    streams: usize,
    total: u64,
) -> anyhow::Result<Duration> {
    let per = total / streams as u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(tokio::spawn(async move {
            let mut s = connect(dst, bypass).await?;
            let chunk = vec![0x5au8; 256 * 1024];
            let mut left = per;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..n]).await?;
                left -= n as u64;
            }
            s.shutdown().await?;
            let mut count = [0u8; 8];
            s.read_exact(&mut count).await?;
            let got = u64::from_le_bytes(count);
            anyhow::ensure!(got == per, "sink received {got} of {per} bytes");
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// Round trips of `size`-byte messages on one persistent connection to the
/// echo at `dst`: `iters` timed after `warmup` untimed. Sorted ascending.
pub async fn latency(
    dst: SocketAddr,
    bypass: bool,
    size: usize,
    warmup: usize,
    iters: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut s = connect(dst, bypass).await?;
    let msg = vec![0xa5u8; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..warmup + iters {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        if i >= warmup {
            samples.push(t.elapsed());
        }
    }
    anyhow::ensure!(back == msg, "echo differs");
    samples.sort_unstable();
    Ok(samples)
}

/// The value at quantile `q` of sorted `samples`.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let i = ((samples.len() as f64 * q) as usize).min(samples.len() - 1);
    samples[i]
}

/// New connections per second to the echo at `dst`, each doing one 1-byte
/// round trip, from `workers` concurrent loops for `duration`.
pub async fn connection_rate(
    dst: SocketAddr,
    bypass: bool,
    workers: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut byte = [7u8];
            while Instant::now() < deadline {
                let mut s = connect(dst, bypass).await?;
                s.write_all(&byte).await?;
                s.read_exact(&mut byte).await?;
                done += 1;
            }
            anyhow::Ok(done)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// Opens `n` connections to the echo at `dst` (`concurrency` at a time),
/// each proven with one round trip, and returns them still open.
pub async fn open_idle(
    dst: SocketAddr,
    bypass: bool,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<TcpStream>> {
    let mut open = Vec::with_capacity(n);
    while open.len() < n {
        let batch = concurrency.min(n - open.len());
        let mut tasks = Vec::with_capacity(batch);
        for _ in 0..batch {
            tasks.push(tokio::spawn(async move {
                let mut s = connect(dst, bypass).await?;
                let mut byte = [1u8];
                s.write_all(&byte).await?;
                s.read_exact(&mut byte).await?;
                anyhow::Ok(s)
            }));
        }
        for t in tasks {
            open.push(t.await??);
        }
    }
    Ok(open)
}
