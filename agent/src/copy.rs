//! Reading sockets into buffers sized to their traffic, and copying between
//! two TCP sockets (the plaintext paths: passthrough and port 15006).
//!
//! An idle connection holds no copy buffer: a socket is read only once it
//! is readable, into a buffer taken then, and a small buffer is given back
//! when the socket runs dry. A busy one reads in bites that double up to
//! [`MAX_BUF`], so bulk transfers make few syscalls.

use std::io;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The first read after idling takes this much.
pub const MIN_BUF: usize = 8 * 1024;
/// Reads that fill their buffer double it, up to this.
pub const MAX_BUF: usize = 256 * 1024;

/// Successive reads of one socket, each returned as its own chunk.
#[derive(Debug)]
pub struct Chunks {
    rd: OwnedReadHalf,
    buf: BytesMut,
    size: usize,
}

impl Chunks {
    pub fn new(rd: OwnedReadHalf) -> Self {
        Chunks {
            rd,
            buf: BytesMut::new(),
            size: MIN_BUF,
        }
    }

    /// The next bytes the socket has, or `None` at EOF. Waits for them
    /// without holding a buffer. Once the returned chunk is dropped, its
    /// memory is reused by the next read.
    pub async fn next(&mut self) -> io::Result<Option<BytesMut>> {
        loop {
            self.buf.reserve(self.size);
            match self.rd.try_read_buf(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    if n == self.size && self.size < MAX_BUF {
                        self.size *= 2;
                    }
                    return Ok(Some(self.buf.split()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Going idle: a small buffer is cheap to take again; a
                    // grown one belongs to a busy connection and stays.
                    if self.size == MIN_BUF {
                        self.buf = BytesMut::new();
                    }
                    self.rd.readable().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Copies both ways between `a` and `b` until both directions have ended;
/// EOF on one side's reads becomes a write shutdown on the other's. An
/// error in either direction ends both. Returns the bytes moved a -> b and
/// b -> a.
pub async fn copy_tcp(a: TcpStream, b: TcpStream) -> io::Result<(u64, u64)> {
    let (a_rd, a_wr) = a.into_split();
    let (b_rd, b_wr) = b.into_split();
    tokio::try_join!(one_way(a_rd, b_wr), one_way(b_rd, a_wr))
}

async fn one_way(rd: OwnedReadHalf, mut wr: OwnedWriteHalf) -> io::Result<u64> {
    let mut chunks = Chunks::new(rd);
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await? {
        wr.write_all(&chunk).await?;
        total += chunk.len() as u64;
    }
    wr.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Both directions arrive intact and in order, half-close crosses the
    /// proxy each way, and the byte counts are what moved.
    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let proxy = tokio::spawn(copy_tcp(proxy_in, proxy_out));
        let up: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
        let down: Vec<u8> = (0..700_000u32).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let srv = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down2).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&up2).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(srv.await.unwrap() == up, "client -> server bytes differ");
        assert!(back == down, "server -> client bytes differ");
        let (a_to_b, b_to_a) = proxy.await.unwrap().unwrap();
        assert_eq!((a_to_b, b_to_a), (up.len() as u64, down.len() as u64));
    }

    /// Reads grow while the socket keeps them full, and an idle socket's
    /// small buffer is given back.
    #[tokio::test]
    async fn buffers_follow_the_traffic() {
        let (mut w, r) = pair().await;
        let (rd, _wr) = r.into_split();
        let mut chunks = Chunks::new(rd);
        w.write_all(b"hi").await.unwrap();
        assert_eq!(&chunks.next().await.unwrap().unwrap()[..], b"hi");
        let idle = tokio::time::timeout(std::time::Duration::from_millis(20), chunks.next());
        assert!(idle.await.is_err(), "nothing to read");
        assert_eq!(chunks.buf.capacity(), 0, "idle: no buffer held");
        let writer = tokio::spawn(async move {
            w.write_all(&vec![7u8; 4 << 20]).await.unwrap();
        });
        let mut total = 0;
        while let Some(c) = chunks.next().await.unwrap() {
            total += c.len();
        }
        assert_eq!(total, 4 << 20);
        writer.await.unwrap();
        assert!(chunks.size > MIN_BUF, "bulk reads grew the buffer");
    }
}
