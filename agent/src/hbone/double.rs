//! Double HBONE, the client's inner half: an HBONE connection of its own
//! (mTLS with the destination, then one CONNECT) carried inside a CONNECT
//! stream that another network's gateway terminates. The gateway sees
//! only ciphertext; the destination sees the client's identity.
//!
//! The inner connection carries one stream and is not pooled: each one
//! may reach a different endpoint, whichever the gateway picks.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::{Request, StatusCode};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, Instrument};

use super::stream::h2_to_io;
use super::{tls, H2Settings, H2Stream, PoolError};

/// A CONNECT stream as a byte stream (for TLS to run over it).
pub struct StreamIo {
    stream: H2Stream,
    /// Received, not yet read.
    pending: Bytes,
    shut_down: bool,
}

impl StreamIo {
    pub fn new(stream: H2Stream) -> Self {
        StreamIo {
            stream,
            pending: Bytes::new(),
            shut_down: false,
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
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Ok(())),
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

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut_down {
            this.shut_down = true;
            this.stream
                .send
                .send_data(Bytes::new(), true)
                .map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Opens the inner tunnel inside `outer`: TLS with `tls` (which verifies
/// the destination's identity), HTTP/2, and `request`'s CONNECT, which
/// must be answered 200. The inner connection is driven by a task of its
/// own and closes with its one stream.
pub async fn connect_inner(
    outer: H2Stream,
    tls: Arc<ClientConfig>,
    request: Request<()>,
    h2: H2Settings,
) -> Result<H2Stream, PoolError> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let conn = connector
        .connect(tls::placeholder_server_name(), StreamIo::new(outer))
        .await
        .map_err(PoolError::InnerHandshake)?;
    if conn.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
        return Err(PoolError::InnerNoH2);
    }
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(h2.stream_window)
        .initial_connection_window_size(h2.connection_window)
        .max_frame_size(h2.max_frame_size)
        .handshake::<_, Bytes>(conn)
        .await?;
    tokio::spawn(
        async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "inner HBONE connection ended with an error");
            }
        }
        .in_current_span(),
    );
    let mut send = send.ready().await?;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        debug!(status = %response.status(), "inner CONNECT refused");
        return Err(PoolError::Status(response.status()));
    }
    Ok(H2Stream::new(stream, response.into_body()))
}
