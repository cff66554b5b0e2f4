//! One tunneled TCP connection as an HTTP/2 stream: the copy loop that
//! joins it to a TCP socket with half-close in both directions, and
//! [`StreamIo`], the stream as a byte stream for a protocol that runs
//! inside it (the inner TLS of double HBONE, the waypoint's HTTP).
//!
//! An idle tunnel holds no copy buffer (socket reads are sized by
//! `copy::poll_read_sized`, which gives a small buffer back when the
//! socket goes idle), so ten thousand quiet connections cost the agent a
//! few hundred bytes each, not kilobytes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::copy::{poll_read_sized, CopyError, MIN_BUF};

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
/// shutdown on the socket. An error in either direction ends both, the
/// stream reset with CONNECT_ERROR (RFC 9113 §8.5: a TCP connection that
/// failed), which the peer takes as a failure; a plain CANCEL would read
/// as a finished stream (see `ends_stream`).
///
/// A hand-written state machine rather than two joined `async` loops: it
/// lives as long as the tunnel, and the loops' suspended futures took
/// about 650 bytes of every open tunnel.
pub fn copy_bidirectional(
    stream: H2Stream,
    socket: TcpStream,
) -> impl std::future::Future<Output = Result<Transferred, CopyError<Transferred>>> + Send {
    let H2Stream { send, recv, guard } = stream;
    Copy {
        socket,
        send,
        recv,
        _guard: guard,
        up: Up {
            buf: BytesMut::new(),
            size: MIN_BUF,
            pending: Bytes::new(),
            total: 0,
            done: false,
        },
        down: Down {
            chunk: Bytes::new(),
            chunk_len: 0,
            total: 0,
            done: false,
        },
    }
}

struct Copy {
    socket: TcpStream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    _guard: Option<Box<dyn Send + Sync>>,
    up: Up,
    down: Down,
}

/// Socket -> stream: the read buffer, and bytes read but not yet sent for
/// want of window.
struct Up {
    buf: BytesMut,
    size: usize,
    pending: Bytes,
    total: u64,
    done: bool,
}

/// Stream -> socket: the DATA chunk being written, and its full length
/// (its window is released once all of it has left).
struct Down {
    chunk: Bytes,
    chunk_len: usize,
    total: u64,
    done: bool,
}

impl std::future::Future for Copy {
    type Output = Result<Transferred, CopyError<Transferred>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut failed = None;
        if !this.up.done {
            match this.poll_up(cx) {
                Poll::Ready(Ok(())) => this.up.done = true,
                Poll::Ready(Err(e)) => failed = Some(e),
                Poll::Pending => {}
            }
        }
        if failed.is_none() && !this.down.done {
            match this.poll_down(cx) {
                Poll::Ready(Ok(())) => this.down.done = true,
                Poll::Ready(Err(e)) => failed = Some(e),
                Poll::Pending => {}
            }
        }
        let moved = Transferred {
            to_stream: this.up.total,
            from_stream: this.down.total,
        };
        match failed {
            Some(error) => {
                this.send.send_reset(h2::Reason::CONNECT_ERROR);
                Poll::Ready(Err(CopyError { error, moved }))
            }
            None if this.up.done && this.down.done => Poll::Ready(Ok(moved)),
            None => Poll::Pending,
        }
    }
}

impl Copy {
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let up = &mut self.up;
        loop {
            while !up.pending.is_empty() {
                self.send.reserve_capacity(up.pending.len());
                let granted = match ready!(self.send.poll_capacity(cx)) {
                    Some(Ok(n)) => n,
                    // The peer ended the stream: what is left is unwanted.
                    _ if peer_ended(&mut self.send, cx) => return Poll::Ready(Ok(())),
                    Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                    None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                };
                let chunk = up.pending.split_to(granted.min(up.pending.len()));
                if !chunk.is_empty() {
                    let n = chunk.len() as u64;
                    self.send.send_data(chunk, false).map_err(h2_to_io)?;
                    // Counted once handed on, as the other direction is.
                    up.total += n;
                }
            }
            let n = ready!(poll_read_sized(&self.socket, &mut up.buf, &mut up.size, cx))?;
            if n == 0 {
                return Poll::Ready(finish(&mut self.send, cx));
            }
            up.pending = up.buf.split().freeze();
        }
    }

    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let down = &mut self.down;
        loop {
            while !down.chunk.is_empty() {
                let n = ready!(Pin::new(&mut self.socket).poll_write(cx, &down.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                down.chunk.advance(n);
            }
            if down.chunk_len > 0 {
                // Only give the peer more window once the bytes have left
                // us, so a slow reader pushes back on its own stream only.
                self.recv
                    .flow_control()
                    .release_capacity(down.chunk_len)
                    .map_err(h2_to_io)?;
                down.total += down.chunk_len as u64;
                down.chunk_len = 0;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    down.chunk_len = data.len();
                    down.chunk = data;
                }
                Some(Err(e)) if !ends_stream(&e) => return Poll::Ready(Err(h2_to_io(e))),
                // The peer finished sending (or reset the stream as its
                // way of finishing, see `ends_stream`).
                Some(Err(_)) | None => {
                    ready!(Pin::new(&mut self.socket).poll_shutdown(cx))?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
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
                std::future::poll_fn(|cx| Poll::Ready(finish(&mut send, cx))).await?;
                return Ok::<_, io::Error>(total);
            }
            total += n as u64;
            send_all(&mut send, buf.split().freeze()).await?;
        }
    };
    let down = stream_to_socket(&mut recv, &mut wr);
    let joined = tokio::try_join!(up, down);
    let (to_stream, from_stream) =
        joined.inspect_err(|_| send.send_reset(h2::Reason::CONNECT_ERROR))?;
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
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) if ends_stream(&e) => break,
            Err(e) => return Err(h2_to_io(e)),
        };
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

/// Whether a receive error is the peer's way of ending the stream: a
/// reset with NO_ERROR or CANCEL, as ztunnel sends when it drops a
/// finished stream (it reads both as end of stream itself,
/// src/proxy/h2.rs). Ending there, rather than failing, lets what the
/// peer sent before it be delivered and the other side be half-closed.
pub(super) fn ends_stream(e: &h2::Error) -> bool {
    e.is_remote() && matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL))
}

/// Ends our half of the stream with END_STREAM. A stream the peer has
/// already ended with a reset (see `ends_stream`) has nothing left to end.
fn finish(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Result<()> {
    match send.send_data(Bytes::new(), true) {
        Ok(()) => Ok(()),
        Err(_) if peer_ended(send, cx) => Ok(()),
        Err(e) => Err(h2_to_io(e)),
    }
}

/// Whether the peer has reset the stream as its way of ending it.
fn peer_ended(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> bool {
    matches!(
        send.poll_reset(cx),
        Poll::Ready(Ok(h2::Reason::NO_ERROR | h2::Reason::CANCEL))
    )
}

pub(super) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::other(e)
    }
}

/// How long a shut-down [`StreamIo`] waits for the peer to end its side.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// A CONNECT stream as a byte stream (for TLS to run over it).
pub struct StreamIo {
    stream: H2Stream,
    /// Received, not yet read.
    pending: Bytes,
    shut_down: bool,
    /// While shutting down: until when to wait for the peer's end.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl StreamIo {
    pub fn new(stream: H2Stream) -> Self {
        StreamIo {
            stream,
            pending: Bytes::new(),
            shut_down: false,
            linger: None,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Window back as the bytes are taken: the reader paces it.
                this.stream
                    .recv
                    .flow_control()
                    .release_capacity(n)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(()));
            }
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) if !ends_stream(&e) => return Poll::Ready(Err(h2_to_io(e))),
                Some(Err(_)) | None => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.get_mut().stream.send;
        loop {
            send.reserve_capacity(data.len());
            let granted = match ready!(send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            };
            if granted > 0 {
                let n = granted.min(data.len());
                send.send_data(Bytes::copy_from_slice(&data[..n]), false)
                    .map_err(h2_to_io)?;
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends END_STREAM, then waits (at most [`LINGER`]) for the peer to
    /// end its side, discarding what it still sends: h2 resets a stream
    /// dropped before the peer ended it, and the reset throws away what is
    /// still queued to send (the last bytes, END_STREAM), which the peer
    /// would see as a cut connection (double HBONE's inner TLS closing
    /// at once after its last write, seen at the destination as a broken
    /// pipe).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut_down {
            this.shut_down = true;
            finish(&mut this.stream.send, cx)?;
        }
        let deadline = this
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LINGER)));
        loop {
            if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.stream.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.stream.recv.flow_control().release_capacity(data.len());
                }
                Some(Err(_)) | None => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A stream as the server side of an HTTP/2 connection sees it, and
    /// the client's sending half, over an in-memory pipe.
    async fn pair() -> (H2Stream, SendStream<Bytes>, tokio::task::JoinHandle<()>) {
        let (a, b) = duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(b).await.expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("ok");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("respond");
            let stream = H2Stream::new(send, req.into_body());
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            stream
        });
        let (mut client, conn) = h2::client::handshake(a).await.expect("client handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::post("http://x/").body(()).expect("request");
        let (_resp, send) = client.send_request(req, false).expect("send request");
        let stream = server.await.expect("server task");
        (stream, send, driver)
    }

    /// ztunnel ends a finished stream with RST_STREAM(CANCEL): what it sent
    /// before arrives, and the copy ends cleanly with a half-close.
    #[tokio::test]
    async fn a_cancel_after_data_reads_as_end_of_stream() {
        for reason in [h2::Reason::CANCEL, h2::Reason::NO_ERROR] {
            let (stream, mut send, _driver) = pair().await;
            let (ours, mut app) = duplex(64 * 1024);
            let copy = tokio::spawn(copy_bidirectional_io(stream, ours));
            send.send_data(Bytes::from_static(b"hello"), false)
                .expect("data");
            // Let the data go out before the reset.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            send.send_reset(reason);
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.expect("read to the end");
            assert_eq!(got, b"hello", "{reason:?}");
            drop(app);
            let moved = copy.await.expect("task");
            assert!(
                moved.as_ref().is_ok_and(|m| m.from_stream == 5),
                "{reason:?}: {moved:?}"
            );
        }
    }

    /// Any other reset is a failure, never a clean end.
    #[tokio::test]
    async fn other_resets_are_errors() {
        let (stream, mut send, _driver) = pair().await;
        let (ours, mut app) = duplex(64 * 1024);
        let copy = tokio::spawn(copy_bidirectional_io(stream, ours));
        send.send_data(Bytes::from_static(b"partial"), false)
            .expect("data");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        send.send_reset(h2::Reason::INTERNAL_ERROR);
        let result = copy.await.expect("task");
        assert!(result.is_err(), "{result:?}");
        let mut got = Vec::new();
        let _ = app.read_to_end(&mut got).await;
    }

    /// A copy that fails resets the stream with CONNECT_ERROR, which a
    /// peer cannot take for a finished stream.
    #[tokio::test]
    async fn a_failed_copy_resets_with_connect_error() {
        let (stream, mut send, _driver) = pair().await;
        let (ours, app) = duplex(16);
        // The application is gone: writing to it fails.
        drop(app);
        let copy = tokio::spawn(copy_bidirectional_io(stream, ours));
        send.send_data(Bytes::from_static(b"to nobody"), false)
            .expect("data");
        assert!(copy.await.expect("task").is_err());
        let reason = std::future::poll_fn(|cx| send.poll_reset(cx))
            .await
            .expect("a reset");
        assert_eq!(reason, h2::Reason::CONNECT_ERROR);
    }
}
