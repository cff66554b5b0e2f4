//! Large socket reads under TLS.
//!
//! rustls asks its transport for 4 KiB at a time (at most one record), so a
//! busy HBONE connection costs several `recv` calls per 16 KiB record, and
//! the syscalls, not the crypto, dominate the receive side. [`ReadAhead`]
//! sits between the socket and rustls: it reads as much as the socket has
//! (up to [`MAX_BUF`]) into its own buffer and serves rustls's small reads
//! from memory. An idle connection holds no buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first read after idling takes this much; reads that fill the buffer
/// double it, up to [`MAX_BUF`].
const MIN_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// `io` with reads taken in large bites; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    io: S,
    buf: BytesMut,
    size: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(io: S) -> Self {
        ReadAhead {
            io,
            buf: BytesMut::new(),
            size: MIN_BUF,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            // A reader that asks for as much as we would take gains
            // nothing from a second copy.
            if out.remaining() >= this.size {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.reserve(this.size);
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Going idle: a small buffer is cheap to take again;
                    // a grown one belongs to a busy connection and stays.
                    if this.size == MIN_BUF {
                        this.buf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            };
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            if n >= this.size && this.size < MAX_BUF {
                this.size *= 2;
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Small reads see every byte in order across buffer refills, growth
    /// and idle periods, and EOF arrives after the last byte.
    #[tokio::test]
    async fn small_reads_see_every_byte_in_order() {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(100_000) {
                b.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut r = ReadAhead::new(a);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        loop {
            let n = r.read(&mut small).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&small[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ");
        assert!(r.size > MIN_BUF, "a bulk transfer grows the buffer");
    }

    /// A reader with room for a whole buffer reads the socket directly,
    /// and an idle small buffer is given back.
    #[tokio::test]
    async fn idle_reader_holds_no_buffer() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(a);
        b.write_all(b"hello").await.unwrap();
        let mut small = [0u8; 2];
        r.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"he");
        let mut rest = [0u8; 3];
        r.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"llo");
        // Nothing more to read: the pending poll lets the buffer go.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut small));
        assert!(pending.await.is_err());
        assert_eq!(r.buf.capacity(), 0);
        let mut big = vec![0u8; MAX_BUF];
        b.write_all(b"direct").await.unwrap();
        let n = r.read(&mut big).await.unwrap();
        assert_eq!(&big[..n], b"direct");
        assert_eq!(r.buf.capacity(), 0);
    }
}
