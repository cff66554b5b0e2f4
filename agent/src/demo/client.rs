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
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .context("waiting for go")?;
    anyhow::ensure!(go.trim() == "go", "expected go, got {go:?}");
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
        let ns = std::fs::File::open(self.netns_path()).context("opening the pod's netns")?;
        let fd = ns.as_raw_fd();
        let mut cmd = tokio::process::Command::new(exe);
        if subcommand {
            cmd.arg("pod-client");
        }
        cmd.args([dst.to_string(), len.to_string(), seed.to_string()])
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
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
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
}
