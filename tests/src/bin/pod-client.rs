//! A client application for the end-to-end tests. The test starts it inside
//! a pod's network namespace, moves it into the pod's cgroup, then writes
//! `go` on its stdin: only then does it connect to ADDR with an ordinary
//! socket, send LEN bytes of the seeded test payload, half-close, read the
//! echo, and print `sent=<sha256> received=<sha256> bytes=<n>`.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, len, seed] = args.as_slice() else {
        anyhow::bail!("usage: pod-client ADDR LEN SEED");
    };
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let len: usize = len.parse().context("LEN")?;
    let seed: u8 = seed.parse().context("SEED")?;
    let mut go = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut go)
        .context("waiting for go")?;
    anyhow::ensure!(go.trim() == "go", "expected go, got {go:?}");

    let data = ambient_tests::payload_with_marker(len, seed);
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
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
    let sent = ambient_tests::payload_with_marker(len, seed);
    println!(
        "sent={} received={} bytes={}",
        hex(&ambient_tests::sha256(&sent)),
        hex(&ambient_tests::sha256(&back)),
        back.len()
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
