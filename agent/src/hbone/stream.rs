//! One tunneled TCP connection as an HTTP/2 stream, and the copy loop that
//! joins it to a TCP socket with half-close in both directions.
//!
//! An idle tunnel holds no copy buffer (socket reads go through
//! [`crate::copy::Chunks`]), so ten thousand quiet connections cost the
//! agent a few hundred bytes each, not kilobytes.

use std::io;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use crate::copy::{Chunks, MIN_BUF};

/// The two halves of an established CONNECT stream. `guard` is held for the
/// life of the stream (the pool uses it to count streams per connection).
pub struct H2Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    guard: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream").finish_non_exhaustive()
    }
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            guard: None,
        }
    }

    pub(crate) fn with_guard(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }
}

/// Bytes moved by [`copy_bidirectional`]: from the socket into the stream,
/// and from the stream out to the socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    pub to_stream: u64,
    pub from_stream: u64,
}

/// Copies both ways until both directions have ended. A read EOF on the
/// socket becomes END_STREAM; END_STREAM from the peer becomes a write
/// shutdown on the socket. An error in either direction ends both (the
/// dropped stream is reset).
pub async fn copy_bidirectional(stream: H2Stream, socket: TcpStream) -> io::Result<Transferred> {
    let H2Stream {
        mut send,
        mut recv,
        guard: _guard,
    } = stream;
    // Owned halves: no lock shared between the two directions.
    let (rd, mut wr) = socket.into_split();
    let up = socket_to_stream(rd, &mut send);
    let down = stream_to_socket(&mut recv, &mut wr);
    let (to_stream, from_stream) = tokio::try_join!(up, down)?;
    Ok(Transferred {
        to_stream,
        from_stream,
    })
}

async fn socket_to_stream(rd: OwnedReadHalf, send: &mut SendStream<Bytes>) -> io::Result<u64> {
    let mut chunks = Chunks::new(rd);
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await? {
        total += chunk.len() as u64;
        send_all(send, chunk.freeze()).await?;
    }
    send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
    Ok(total)
}

/// Sends `data` as the peer's flow-control window allows.
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> io::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(h2_to_io(e)),
            None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed")),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false).map_err(h2_to_io)?;
    }
    Ok(())
}

/// [`copy_bidirectional`] for any byte stream (e.g. an in-process pipe to
/// an HTTP codec), which has no readiness to wait on before taking a
/// buffer: each read holds one of `MIN_BUF` bytes.
pub async fn copy_bidirectional_io<S>(stream: H2Stream, io: S) -> io::Result<Transferred>
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let H2Stream {
        mut send,
        mut recv,
        guard: _guard,
    } = stream;
    let (mut rd, mut wr) = tokio::io::split(io);
    let up = async {
        let mut total = 0u64;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(MIN_BUF);
            let n = rd.read_buf(&mut buf).await?;
            if n == 0 {
                send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            send_all(&mut send, buf.split().freeze()).await?;
        }
    };
    let down = stream_to_socket(&mut recv, &mut wr);
    let (to_stream, from_stream) = tokio::try_join!(up, down)?;
    Ok(Transferred {
        to_stream,
        from_stream,
    })
}

async fn stream_to_socket<W>(recv: &mut RecvStream, wr: &mut W) -> io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_to_io)?;
        wr.write_all(&chunk).await?;
        total += chunk.len() as u64;
        // Only give the peer more window once the bytes have left us, so a
        // slow reader pushes back on its own stream and no other.
        recv.flow_control()
            .release_capacity(chunk.len())
            .map_err(h2_to_io)?;
    }
    // The peer finished sending; a trailing reset would surface here.
    wr.shutdown().await?;
    Ok(total)
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}
