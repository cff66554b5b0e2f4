//! A pod's client application for the demo and the end-to-end tests, run
//! as its own process inside the pod: only a process in the pod's cgroup
//! is seen by eBPF capture, as a real pod's would be.
//!
//! [`Pod::run_client`] starts it (`ambient-agent pod-client ADDR LEN SEED`)
//! inside the pod's namespace, moves it into the pod's cgroup, then writes
//! `go`; [`main`] connects with an ordinary socket, sends the payload,
//! half-closes, reads the echo and prints both hashes.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::topology::Pod;

/// Planted in every payload: seen on the wire only if traffic is in the clear.
pub const MARKER: &[u8] = b"PLAINTEXT-MARKER-0123456789";

/// `len` deterministic bytes for `seed`, with [`MARKER`] every 12 KiB.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut state = u32::from(seed) | 1;
    let mut data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        if i % 3 == 0 && chunk.len() >= MARKER.len() {
            chunk[..MARKER.len()].copy_from_slice(MARKER);
        }
    }
    data
}

/// What a client run reports: hashes of what it sent and got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub sent: String,
    pub received: String,
    pub bytes: usize,
}

impl Exchange {
    pub fn intact(&self) -> bool {
        self.sent == self.received
    }
}

/// The client process: waits for `go`, then exchanges with `addr`.
pub fn main(addr: SocketAddr, len: usize, seed: u8) -> anyhow::Result<()> {
    wait_for_go()?;
    let data = payload(len, seed);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let sent = hex(&Sha256::digest(&data));
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let mut back = Vec::new();
    (&stream)
        .read_to_end(&mut back)
        .context("reading the echo")?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?
        .context("sending")?;
    println!(
        "sent={sent} received={} bytes={}",
        hex(&Sha256::digest(&back)),
        back.len()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Pod {
    /// Runs `exe pod-client...` (or `exe` itself when `subcommand` is
    /// false) as a process of this pod and returns what it reported.
    pub async fn run_client(
        &self,
        exe: &str,
        subcommand: bool,
        dst: SocketAddr,
        len: usize,
        seed: u8,
    ) -> anyhow::Result<Exchange> {
        let mut args: Vec<String> = Vec::new();
        if subcommand {
            args.push("pod-client".into());
        }
        args.extend([dst.to_string(), len.to_string(), seed.to_string()]);
        let text = self.run_process(exe, &args).await?;
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .map(str::to_string)
                .with_context(|| format!("no {k} in the client's report {text:?}"))
        };
        Ok(Exchange {
            sent: field("sent=")?,
            received: field("received=")?,
            bytes: field("bytes=")?.parse().context("bytes=")?,
        })
    }

    /// Runs `exe args...` as a process of this pod (its namespace, then its
    /// cgroup, before it is told `go`) and returns its standard output.
    pub async fn run_process(&self, exe: &str, args: &[String]) -> anyhow::Result<String> {
        let ns = std::fs::File::open(self.netns_path()).context("opening the pod's netns")?;
        let fd = ns.as_raw_fd();
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: only setns, async-signal-safe, runs between fork and exec;
        // `ns` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {exe}"))?;
        let pid = child.id().context("the client exited at once")?;
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string())
            .context("moving the client into the pod's cgroup")?;
        let mut stdin = child.stdin.take().context("client stdin")?;
        stdin.write_all(b"go\n").await?;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("the client did not finish in time")??;
        anyhow::ensure!(
            out.status.success(),
            "the client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Waits for the parent's `go` (it first moves us into the pod's cgroup).
fn wait_for_go() -> anyhow::Result<()> {
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .context("waiting for go")?;
    anyhow::ensure!(go.trim() == "go", "expected go, got {go:?}");
    Ok(())
}

/// The HTTP client process (`ambient-agent pod-http ADDR COUNT PATH
/// [NAME:VALUE]`): `COUNT` GETs of `PATH` on one connection to `ADDR`,
/// printing `STATUS BODY` for each.
pub async fn http_main(
    addr: SocketAddr,
    count: usize,
    path: String,
    header: Option<String>,
) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Empty};
    tokio::task::spawn_blocking(wait_for_go).await??;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let header = header
        .as_deref()
        .map(|h| h.split_once(':').context("a header is NAME:VALUE"))
        .transpose()?;
    for _ in 0..count {
        let mut req = http::Request::get(path.as_str()).header("host", addr.to_string());
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        send.ready().await?;
        let resp = send
            .send_request(req.body(Empty::<bytes::Bytes>::new())?)
            .await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        println!("{status} {}", String::from_utf8_lossy(&body).trim());
    }
    Ok(())
}
