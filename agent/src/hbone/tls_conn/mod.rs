//! TLS 1.3 records after the handshake, protected here instead of in
//! rustls's buffered connection.
//!
//! rustls runs the handshake (certificates, SPIFFE verification, the key
//! schedule) through its unbuffered API ([`connect`], [`accept`]); then
//! [`TlsConn`] takes the traffic keys and rustls's `KernelConnection` (the
//! interface rustls offers for kTLS, which derives the keys after a key
//! update) and seals and opens records itself with aws-lc-rs. The point is
//! copies: the buffered rustls connection copies every received byte three
//! times (into its deframer, into a fresh `Vec` per record, out to the
//! reader); here a record is decrypted in place in the buffer the socket
//! read it into and copied once, to the reader. Sent data is read once, by
//! the cipher, which writes the record straight into the outgoing buffer
//! (no copy of the plaintext first). Since we own the buffers
//! during the handshake too, bytes behind the peer's last handshake record
//! are simply the start of the record stream.
//!
//! Key updates (RFC 8446, 4.6.3) work both ways: a peer's KeyUpdate moves
//! our receive key, and one that asks for an answer gets ours before our
//! next record; we update our own sending key every [`TX_KEY_LIFETIME`]
//! records, well inside AES-GCM's confidentiality limit. Session tickets
//! are dropped (clients never resume). Not done: TLS 1.2 (HBONE is TLS 1.3
//! only) and 0-RTT.

use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use bytes::{Buf, BufMut, BytesMut};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ConnectionTrafficSecrets, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Record header: type, legacy version, length.
const HEADER: usize = 5;
const TAG: usize = 16;
/// Largest plaintext in one record (RFC 8446, 5.1).
const MAX_PLAIN: usize = 1 << 14;
/// Largest ciphertext body a peer may send (RFC 8446, 5.2).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Records we seal with one key before updating it (AES-GCM's limit is
/// 2^24.5 records; rustls updates at 2^23 too).
pub const TX_KEY_LIFETIME: u64 = 1 << 23;
/// First read after idling; reads that fill the buffer double it up to
/// `MAX_READ`.
const MIN_READ: usize = 16 * 1024;
const MAX_READ: usize = 256 * 1024;
/// The handshake's first read (a ClientHello, or a server's flight, fits
/// in one or two); it doubles as needed up to `MAX_HANDSHAKE_BUF`.
const FIRST_HANDSHAKE_READ: usize = 4 * 1024;
/// Most bytes buffered while the handshake is incomplete.
const MAX_HANDSHAKE_BUF: usize = 256 * 1024;
/// Sealed bytes buffered before `poll_write` waits for the socket.
const MAX_PENDING_OUT: usize = 256 * 1024;
/// The largest record we send: header, plaintext, content type, tag.
const MAX_RECORD: usize = HEADER + MAX_PLAIN + 1 + TAG;

mod handshake;
mod keys;
mod out;
#[cfg(test)]
mod tests;

use handshake::tls_error;
use keys::{post_handshake, record_len, Direction, KeySchedule, PostHandshake};
use out::{contiguous, gather, invalid, OutBuf};

/// A completed handshake: the connection, and what the peer proved.
pub struct Established {
    pub conn: TlsConn,
    pub alpn: Option<Vec<u8>>,
    pub peer_certificates: Vec<CertificateDer<'static>>,
}

/// Runs the client side of the handshake on `io`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: TcpStream,
) -> io::Result<Established> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    handshake::handshake(conn, io).await
}

/// Runs the server side of the handshake on `io`.
pub async fn accept(config: Arc<ServerConfig>, io: TcpStream) -> io::Result<Established> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    handshake::handshake(conn, io).await
}

/// An established TLS 1.3 connection over TCP, as `AsyncRead` +
/// `AsyncWrite` for HTTP/2.
pub struct TlsConn {
    io: TcpStream,
    rx: Direction,
    tx: Direction,
    keys: Box<dyn KeySchedule>,
    /// The sending key is updated once its sequence reaches this.
    tx_key_lifetime: u64,
    /// The peer asked for our KeyUpdate; it goes before our next record.
    update_requested: bool,
    /// Received bytes: decrypted plaintext first (`plain` bytes), then
    /// records not yet opened.
    inbuf: BytesMut,
    plain: usize,
    /// Content type, padding and tag after the plaintext, skipped once it
    /// has been read.
    trailer: usize,
    read_size: usize,
    /// close_notify received (or the TCP stream ended between records).
    read_closed: bool,
    /// Sealed records not yet written to the socket.
    outbuf: OutBuf,
    close_sent: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    fn new(
        io: TcpStream,
        plaintext: Vec<u8>,
        unread: &[u8],
        secrets: rustls::ExtractedSecrets,
        keys: Box<dyn KeySchedule>,
    ) -> io::Result<Self> {
        // Plaintext rustls already decrypted goes first, then the records
        // it never saw.
        let mut inbuf = BytesMut::with_capacity(plaintext.len() + unread.len());
        inbuf.put_slice(&plaintext);
        inbuf.put_slice(unread);
        let direction = |d| Direction::new(d).map_err(io::Error::other);
        Ok(TlsConn {
            io,
            rx: direction(secrets.rx)?,
            tx: direction(secrets.tx)?,
            keys,
            tx_key_lifetime: TX_KEY_LIFETIME,
            update_requested: false,
            inbuf,
            plain: plaintext.len(),
            trailer: 0,
            read_size: MIN_READ,
            read_closed: false,
            outbuf: OutBuf::default(),
            close_sent: false,
        })
    }

    /// Opens the record at the front of `inbuf` (known to be whole) and
    /// leaves its application data, if any, as the plaintext: decrypted in
    /// place, read from where it lies.
    fn open_record(&mut self) -> io::Result<()> {
        let len = record_len(&self.inbuf);
        if self.inbuf[0] != APPLICATION_DATA || !(TAG + 1..=MAX_CIPHER).contains(&len) {
            return Err(invalid("malformed TLS record"));
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.inbuf[..HEADER]);
        let nonce = self.rx.next_nonce()?;
        let body = &mut self.inbuf[HEADER..HEADER + len];
        let opened = self
            .rx
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| invalid("TLS record failed authentication"))?;
        // The real content type is the last non-zero byte (after padding).
        let Some(end) = opened.iter().rposition(|&b| b != 0) else {
            return Err(invalid("TLS record without a content type"));
        };
        if end > MAX_PLAIN {
            return Err(invalid("TLS record overflow"));
        }
        let kind = opened[end];
        let second = opened.get(1).copied();
        let handshake = match kind {
            HANDSHAKE => post_handshake(&opened[..end]),
            _ => Ok(PostHandshake::default()),
        };
        if kind == APPLICATION_DATA && end > 0 {
            self.inbuf.advance(HEADER);
            self.plain = end;
            self.trailer = len - end;
            return Ok(());
        }
        self.inbuf.advance(HEADER + len);
        match kind {
            APPLICATION_DATA => Ok(()),
            // close_notify: description 0 (a one-byte alert is malformed).
            ALERT if end == 2 && second == Some(0) => {
                self.read_closed = true;
                Ok(())
            }
            ALERT => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("peer sent TLS alert {second:?}"),
            )),
            HANDSHAKE => {
                let msgs = handshake?;
                if msgs.key_update {
                    self.rx = self.next_keys(|k| k.next_rx())?;
                }
                self.update_requested |= msgs.update_requested;
                Ok(())
            }
            _ => Err(invalid("unexpected TLS record content")),
        }
    }

    /// Seals up to one record's worth of `bufs`, from byte `skip` on, as
    /// content of type `kind`, onto `outbuf`; returns the bytes taken.
    fn seal<B: Deref<Target = [u8]>>(
        &mut self,
        bufs: &[B],
        skip: usize,
        kind: u8,
    ) -> io::Result<usize> {
        if kind != HANDSHAKE && (self.update_requested || self.tx.seq >= self.tx_key_lifetime) {
            self.update_tx_key()?;
        }
        let total = (bufs.iter().map(|b| b.len()).sum::<usize>() - skip).min(MAX_PLAIN);
        let body = total + 1 + TAG;
        let [len_hi, len_lo] = (body as u16).to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, len_hi, len_lo];
        let nonce = self.tx.next_nonce()?;
        let record = self.outbuf.tail(HEADER + body);
        let (head, rest) = record.split_at_mut(HEADER);
        head.copy_from_slice(&header);
        let (text, type_and_tag) = rest.split_at_mut(total);
        let key = &self.tx.key;
        let sealed = match contiguous(bufs, skip, total) {
            // The usual case (a record inside one of HTTP/2's buffers):
            // the cipher reads the plaintext where it lies.
            Some(plain) => key.seal_out_of_place_scatter(
                nonce,
                Aad::from(header),
                plain,
                text,
                &[kind],
                type_and_tag,
            ),
            None => {
                gather(bufs, skip, text);
                key.seal_in_place_scatter(nonce, Aad::from(header), text, &[kind], type_and_tag)
            }
        };
        sealed.map_err(|_| io::Error::other("TLS record encryption failed"))?;
        self.outbuf.commit(HEADER + body);
        Ok(total)
    }

    /// Sends KeyUpdate (not asking for one back) under the current key and
    /// moves to the next.
    fn update_tx_key(&mut self) -> io::Result<()> {
        self.seal(&[&[KEY_UPDATE, 0, 0, 1, 0][..]], 0, HANDSHAKE)?;
        self.tx = self.next_keys(|k| k.next_tx())?;
        self.update_requested = false;
        Ok(())
    }

    fn next_keys(
        &mut self,
        next: impl FnOnce(
            &mut dyn KeySchedule,
        ) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>,
    ) -> io::Result<Direction> {
        let secrets = next(&mut *self.keys).map_err(io::Error::other)?;
        Direction::new(secrets).map_err(io::Error::other)
    }

    /// Writes sealed records until none are left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.outbuf.pending()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outbuf.consume(n);
        }
        self.outbuf.release_if_small();
        Poll::Ready(Ok(()))
    }

    fn poll_write_slices<B: Deref<Target = [u8]>>(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[B],
    ) -> Poll<io::Result<usize>> {
        if self.outbuf.len() >= MAX_PENDING_OUT {
            ready!(self.poll_drain(cx))?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total && self.outbuf.len() < MAX_PENDING_OUT {
            done += self.seal(bufs, done, APPLICATION_DATA)?;
        }
        Poll::Ready(Ok(done))
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain > 0 {
                let n = this.plain.min(out.remaining());
                out.put_slice(&this.inbuf[..n]);
                this.inbuf.advance(n);
                this.plain -= n;
                if this.plain == 0 {
                    this.inbuf.advance(std::mem::take(&mut this.trailer));
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            let mut want = this.read_size;
            if this.inbuf.len() >= HEADER {
                let whole = HEADER + record_len(&this.inbuf);
                if this.inbuf.len() >= whole {
                    this.open_record()?;
                    continue;
                }
                if whole > HEADER + MAX_CIPHER {
                    return Poll::Ready(Err(invalid("oversized TLS record")));
                }
                want = want.max(whole - this.inbuf.len());
            }
            this.inbuf.reserve(want);
            let room = this.inbuf.capacity() - this.inbuf.len();
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.inbuf)
            {
                Poll::Pending => {
                    // Going idle: a small empty buffer is cheap to take
                    // again; a grown one belongs to a busy connection.
                    if this.inbuf.is_empty() && this.read_size == MIN_READ {
                        this.inbuf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(r) => r?,
            };
            if n == 0 {
                if this.inbuf.is_empty() {
                    // The peer closed without close_notify: HTTP/2 frames
                    // are self-delimiting, so this is an ordinary EOF.
                    this.read_closed = true;
                    continue;
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            if n >= room && this.read_size < MAX_READ {
                this.read_size *= 2;
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, &[buf])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            // close_notify: a warning-level alert, description 0.
            this.seal(&[&[1u8, 0][..]], 0, ALERT)?;
            this.close_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
