//! Copying between two TCP sockets (the plaintext paths: passthrough and
//! port 15006), with buffers sized to the traffic.
//!
//! An idle connection holds no copy buffer: a socket is read only once it
//! is readable, into a buffer taken then, and a small buffer is given back
//! when the socket runs dry. A busy one reads in bites that double up to
//! [`MAX_BUF`], so bulk transfers make few syscalls.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The first read after idling takes this much.
pub const MIN_BUF: usize = 8 * 1024;
/// Reads that fill their buffer double it, up to this.
pub const MAX_BUF: usize = 256 * 1024;

/// Reads what `src` has into the empty `buf`, once it is readable: `size`
/// bytes are reserved first and doubled (up to [`MAX_BUF`]) after a read
/// that fills them; a small buffer is given back when the socket goes
/// idle, a grown one belongs to a busy connection and stays. `Ok(0)` is
/// EOF. Shared by both copy state machines (here and `hbone::stream`).
pub(crate) fn poll_read_sized(
    src: &TcpStream,
    buf: &mut BytesMut,
    size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        if src.poll_read_ready(cx)?.is_pending() {
            if *size == MIN_BUF {
                *buf = BytesMut::new();
            }
            return Poll::Pending;
        }
        buf.reserve(*size);
        let room = buf.capacity() - buf.len();
        match read_draining(src, room, || src.try_read_buf(buf)) {
            Ok(n) => {
                if n >= *size && *size < MAX_BUF {
                    *size *= 2;
                }
                return Poll::Ready(Ok(n));
            }
            // A stale readiness; the next poll registers for the wake-up.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// One `read` of at most `room` bytes from `src`. A short read drained the
/// socket, so its readiness is cleared then, rather than learnt from a
/// second `recv` saying EAGAIN (one syscall per message; tokio's own
/// `poll_read` does the same). What is cleared is the readiness seen
/// *before* the read: `try_io` takes the I/O driver's tick first and
/// clears only if no edge came in since, so data that arrives while we
/// read keeps the socket readable. (Clearing after the read, with a
/// fresh tick, can wipe such an edge; with edge-triggered epoll the
/// socket then never wakes us again, and a full receive window means no
/// further edge comes. That hung a tunnel under load.)
fn read_draining(
    src: &TcpStream,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let r = src.try_io(Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (got, r) {
        (Some(n), _) => Ok(n),
        (None, Err(e)) => Err(e),
        // `try_io` returns `Ok` only from the closure, which sets `got`.
        (None, Ok(())) => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// A copy that stopped on an error, and what had moved by then: those
/// bytes were delivered, so they count (in records and metrics alike).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct CopyError<T: std::fmt::Debug> {
    #[source]
    pub error: io::Error,
    pub moved: T,
}

/// Copies both ways between `a` and `b` until both directions have ended;
/// EOF on one side's reads becomes a write shutdown on the other's. An
/// error in either direction ends both. Resolves to the bytes moved a -> b
/// and b -> a, which an error carries too.
///
/// A hand-written state machine, not two joined `async` loops: it lives as
/// long as the connection, and the loops' suspended futures took about
/// 750 bytes of every open one.
pub fn copy_tcp(
    a: TcpStream,
    b: TcpStream,
) -> impl Future<Output = Result<(u64, u64), CopyError<(u64, u64)>>> + Send {
    CopyTcp {
        a,
        b,
        ab: Half::default(),
        ba: Half::default(),
    }
}

struct CopyTcp {
    a: TcpStream,
    b: TcpStream,
    ab: Half,
    ba: Half,
}

/// One direction: bytes read and not yet written, the size of the next
/// read, and how far it got.
#[derive(Debug)]
struct Half {
    buf: BytesMut,
    size: usize,
    total: u64,
    eof: bool,
    done: bool,
}

impl Default for Half {
    fn default() -> Self {
        Half {
            buf: BytesMut::new(),
            size: MIN_BUF,
            total: 0,
            eof: false,
            done: false,
        }
    }
}

impl Future for CopyTcp {
    type Output = Result<(u64, u64), CopyError<(u64, u64)>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut failed = None;
        for (half, src, dst) in [
            (&mut this.ab, &this.a, &this.b),
            (&mut this.ba, &this.b, &this.a),
        ] {
            if !half.done {
                match half.poll(src, dst, cx) {
                    Poll::Ready(Ok(())) => half.done = true,
                    Poll::Ready(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Poll::Pending => {}
                }
            }
        }
        if let Some(error) = failed {
            let moved = (this.ab.total, this.ba.total);
            return Poll::Ready(Err(CopyError { error, moved }));
        }
        if this.ab.done && this.ba.done {
            Poll::Ready(Ok((this.ab.total, this.ba.total)))
        } else {
            Poll::Pending
        }
    }
}

impl Half {
    fn poll(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            while !self.buf.is_empty() {
                ready!(dst.poll_write_ready(cx))?;
                match dst.try_write(&self.buf) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.buf.advance(n);
                        self.total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.eof {
                socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)?;
                return Poll::Ready(Ok(()));
            }
            if ready!(poll_read_sized(src, &mut self.buf, &mut self.size, cx))? == 0 {
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Data that arrives while a short read is under way keeps the socket
    /// readable: the readiness cleared is the one seen before the read.
    /// The read below lets more bytes land and waits for the runtime's
    /// other worker to record their edge before returning short; clearing
    /// with a tick taken after the read loses that edge and the socket
    /// never turns readable again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn short_read_keeps_an_edge_that_came_during_it() {
        let (client, server) = pair().await;
        client.try_write(b"first").unwrap();
        server.readable().await.unwrap();
        let mut buf = [0u8; 64];
        let n = read_draining(&server, buf.len(), || {
            let n = server.try_read(&mut buf)?;
            client.try_write(b"second").unwrap();
            // The other worker polls epoll and bumps the socket's tick.
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(n)
        })
        .unwrap();
        assert_eq!(&buf[..n], b"first");
        tokio::time::timeout(std::time::Duration::from_secs(2), server.readable())
            .await
            .expect("the edge of the second write was lost")
            .unwrap();
        let n = server.try_read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
    }

    /// A short read with nothing behind it clears readiness (no EAGAIN
    /// `recv` needed to learn it); a full read leaves it, as more may wait.
    #[tokio::test]
    async fn short_read_clears_readiness_and_full_read_keeps_it() {
        let (client, server) = pair().await;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        for (sent, room, readable_after) in [(5usize, 64usize, false), (64, 64, true)] {
            client.try_write(&vec![7u8; sent]).unwrap();
            server.readable().await.unwrap();
            let mut buf = vec![0u8; room];
            let n = read_draining(&server, room, || server.try_read(&mut buf)).unwrap();
            assert_eq!(n, sent.min(room));
            let ready = server.poll_read_ready(&mut cx).is_ready();
            assert_eq!(ready, readable_after, "{sent} bytes into {room}");
            if ready {
                // Drain what a full read may have left for the next case.
                while server.try_read(&mut buf).is_ok() {}
            }
        }
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

    /// Reads grow while a socket keeps them full, and an idle socket's
    /// small buffer is given back.
    #[tokio::test]
    async fn buffers_follow_the_traffic() {
        let (mut client, proxy_in) = pair().await;
        let (proxy_out, mut server) = pair().await;
        let mut copy = CopyTcp {
            a: proxy_in,
            b: proxy_out,
            ab: Half::default(),
            ba: Half::default(),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        client.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        let read = server.read_exact(&mut got);
        let moved = async {
            loop {
                assert!(Pin::new(&mut copy).poll(&mut cx).is_pending());
                tokio::task::yield_now().await;
                if copy.ab.total == 2 {
                    break;
                }
            }
        };
        let (r, ()) = tokio::join!(read, moved);
        r.unwrap();
        assert_eq!(&got, b"hi");
        assert!(Pin::new(&mut copy).poll(&mut cx).is_pending());
        assert_eq!(copy.ab.buf.capacity(), 0, "idle: no buffer held");
        let writer = tokio::spawn(async move {
            client.write_all(&vec![7u8; 4 << 20]).await.unwrap();
            client
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4 << 20];
            server.read_exact(&mut buf).await.unwrap();
        });
        while copy.ab.total < 2 + (4 << 20) {
            assert!(Pin::new(&mut copy).poll(&mut cx).is_pending());
            tokio::task::yield_now().await;
        }
        reader.await.unwrap();
        drop(writer.await.unwrap());
        assert!(copy.ab.size > MIN_BUF, "bulk reads grew the buffer");
    }
}
