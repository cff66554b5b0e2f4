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
    handshake(conn, io).await
}

/// Runs the server side of the handshake on `io`.
pub async fn accept(config: Arc<ServerConfig>, io: TcpStream) -> io::Result<Established> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    handshake(conn, io).await
}

/// The two unbuffered connection types, as the handshake needs them.
trait Unbuffered: Send {
    type Keys: KeySchedule + 'static;
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Self::Keys), rustls::Error>;
    fn common(&self) -> &rustls::CommonState;
}

/// The same four lines for each side: rustls's two types share the
/// methods but no trait.
macro_rules! unbuffered {
    ($conn:ty, $data:ty) => {
        impl Unbuffered for $conn {
            type Keys = rustls::kernel::KernelConnection<$data>;
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Self::Keys), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData);
unbuffered!(UnbufferedServerConnection, ServerConnectionData);

/// Drives rustls through the handshake: we read and write, rustls encodes
/// and decides. Application data the peer sent along with its last flight
/// is kept, and so are bytes of records rustls has not seen.
async fn handshake<C: Unbuffered>(mut conn: C, mut io: TcpStream) -> io::Result<Established> {
    // Taken at the first read, not before: a peer that connects and says
    // nothing costs no buffer.
    let mut incoming = Vec::new();
    let mut used = 0;
    let mut outgoing = Vec::new();
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..used]);
        let mut read_more = false;
        let mut writable = false;
        match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut enc) => loop {
                let start = outgoing.len();
                outgoing.resize(outgoing.capacity().max(start + 4096), 0);
                match enc.encode(&mut outgoing[start..]) {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        outgoing.truncate(start);
                        outgoing.reserve(e.required_size);
                    }
                    Err(e) => return Err(io::Error::other(format!("TLS handshake encode: {e}"))),
                }
            },
            ConnectionState::TransmitTlsData(tx) => {
                io.write_all(&outgoing).await?;
                outgoing.clear();
                tx.done();
            }
            ConnectionState::BlockedHandshake => read_more = true,
            ConnectionState::ReadTraffic(mut rd) => {
                while let Some(rec) = rd.next_record() {
                    plaintext.extend_from_slice(rec.map_err(tls_error)?.payload);
                }
            }
            // A server may be let write before the client's Finished
            // (half-RTT data); the handshake is over only when rustls says.
            ConnectionState::WriteTraffic(_) => writable = true,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            _ => return Err(io::Error::other("unexpected TLS handshake state")),
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if writable {
            if !conn.common().is_handshaking() {
                break;
            }
            read_more = true;
        }
        if read_more {
            if used == incoming.len() {
                // rustls refuses oversized messages itself; this bounds what
                // a peer can make us buffer before it gets that far.
                if used >= MAX_HANDSHAKE_BUF {
                    return Err(invalid("TLS handshake too large"));
                }
                if incoming.is_empty() {
                    io.readable().await?;
                }
                incoming.resize((used * 2).max(FIRST_HANDSHAKE_READ), 0);
            }
            let n = io.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake eof",
                ));
            }
            used += n;
        }
    }
    let alpn = conn.common().alpn_protocol().map(<[u8]>::to_vec);
    let peer_certificates = conn
        .common()
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let (secrets, keys) = conn.into_kernel().map_err(tls_error)?;
    let conn = TlsConn::new(io, plaintext, &incoming[..used], secrets, Box::new(keys))?;
    Ok(Established {
        conn,
        alpn,
        peer_certificates,
    })
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What rustls keeps after the hand-over: the key schedule, to derive the
/// next keys on a key update (client and server connections alike).
trait KeySchedule: Send + Sync {
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D: Send + Sync> KeySchedule for rustls::kernel::KernelConnection<D> {
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }

    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }
}

fn record_len(header: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([header[3], header[4]]))
}

/// A traffic key aws-lc-rs cannot take (not an AEAD TLS 1.3 uses).
#[derive(Debug, thiserror::Error)]
#[error("unsupported TLS traffic key")]
struct KeyError;

/// One direction's key, IV and sequence number.
struct Direction {
    key: LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, KeyError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(KeyError),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| KeyError)?;
        let iv = iv.as_ref().try_into().map_err(|_| KeyError)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446, 5.3): the IV xor the sequence
    /// number; each nonce is used once, as the sequence only grows.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
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

/// What a record of post-handshake messages asks of us.
#[derive(Debug, Default, PartialEq)]
struct PostHandshake {
    key_update: bool,
    update_requested: bool,
}

/// Reads a record of post-handshake messages: session tickets are dropped
/// unread (resumption is off); a KeyUpdate must end its record (the next
/// one is under the new key); anything else ends the connection, as does
/// a message split across records.
fn post_handshake(mut msgs: &[u8]) -> io::Result<PostHandshake> {
    let mut out = PostHandshake::default();
    while !msgs.is_empty() {
        let [kind, a, b, c, ..] = *msgs else {
            return Err(invalid("truncated TLS handshake message"));
        };
        let len = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if msgs.len() < len {
            return Err(invalid("TLS handshake message split across records"));
        }
        match (kind, &msgs[4..len]) {
            (NEW_SESSION_TICKET, _) => {}
            (KEY_UPDATE, &[request @ (0 | 1)]) if len == msgs.len() => {
                out.key_update = true;
                out.update_requested = request == 1;
            }
            (KEY_UPDATE, _) => return Err(invalid("malformed TLS key update")),
            _ => return Err(invalid("unexpected TLS handshake message")),
        }
        msgs = &msgs[len..];
    }
    Ok(out)
}

/// The `len` bytes from `skip` on, if they lie in one of `bufs`.
fn contiguous<B: Deref<Target = [u8]>>(bufs: &[B], mut skip: usize, len: usize) -> Option<&[u8]> {
    for b in bufs {
        if skip < b.len() {
            return b.get(skip..skip + len);
        }
        skip -= b.len();
    }
    (len == 0).then_some(&[][..])
}

/// Copies the bytes from `skip` on, across `bufs`, until `out` is full.
fn gather<B: Deref<Target = [u8]>>(bufs: &[B], mut skip: usize, mut out: &mut [u8]) {
    for b in bufs {
        if out.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(out.len());
        let (now, later) = out.split_at_mut(n);
        now.copy_from_slice(&b[skip..skip + n]);
        out = later;
        skip = 0;
    }
}

/// Sealed records waiting for the socket. The storage stays initialised
/// (zeroed when it grows), so the cipher can write records straight into
/// it; like `BytesMut`, the unsent part moves to the front only when that
/// copies no more than it frees.
#[derive(Default)]
struct OutBuf {
    store: Vec<u8>,
    start: usize,
    end: usize,
}

impl OutBuf {
    fn pending(&self) -> &[u8] {
        &self.store[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for `n` more bytes after the pending ones; `commit` keeps what
    /// was written.
    fn tail(&mut self, n: usize) -> &mut [u8] {
        if self.end + n > self.store.len() {
            if self.start >= self.len() && self.len() + n <= self.store.len() {
                self.store.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.store.len() * 2).min(2 * (MAX_PENDING_OUT + MAX_RECORD));
                self.store.resize(grown.max(self.end + n), 0);
            }
        }
        &mut self.store[self.end..self.end + n]
    }

    fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.store.len());
    }

    /// Once drained, a small buffer is cheap to take again and goes; a
    /// grown one belongs to a busy connection and stays.
    fn release_if_small(&mut self) {
        if self.is_empty() && self.store.len() <= MAX_RECORD {
            self.store = Vec::new();
        }
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
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

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

    /// Test fixture: a throwaway self-signed certificate, TLS 1.3 only.
    fn configs(tickets: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let provider = crate::hbone::tls::provider();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.send_tls13_tickets = tickets;
        // Data written before the handshake ends leaves with the server's
        // Finished: the client's rustls decrypts it before the hand-over.
        server.send_half_rtt_data = true;
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    async fn client(cfg: Arc<ClientConfig>, tcp: TcpStream, ours: bool) -> Box<dyn Io> {
        if ours {
            Box::new(connect(cfg, name(), tcp).await.unwrap().conn)
        } else {
            let connector = tokio_rustls::TlsConnector::from(cfg);
            Box::new(connector.connect(name(), tcp).await.unwrap())
        }
    }

    async fn server(cfg: Arc<ServerConfig>, tcp: TcpStream, ours: bool) -> Box<dyn Io> {
        if ours {
            Box::new(accept(cfg, tcp).await.unwrap().conn)
        } else {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            Box::new(acceptor.accept(tcp).await.unwrap())
        }
    }

    /// Interop with rustls's own record layer in both roles, and with
    /// ourselves: bulk data both ways in uneven writes (records split and
    /// coalesced), half-close by close_notify each way (a rustls peer
    /// reports EOF without close_notify as an error, so a clean EOF proves
    /// ours is valid).
    #[tokio::test]
    async fn bulk_both_ways_and_close_notify_interoperate() {
        for (ours_client, ours_server) in [(true, false), (false, true), (true, true)] {
            let (scfg, ccfg) = configs(0);
            let (c, s) = tcp_pair().await;
            let (mut c, mut s) =
                tokio::join!(client(ccfg, c, ours_client), server(scfg, s, ours_server));
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let expect = data.clone();
            let echo = tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(&mut s);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let (mut r, mut w) = tokio::io::split(&mut c);
            let send = async {
                let mut sizes = [1usize, 100, 16_384, 16_385, 70_000, 5].iter().cycle();
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = (*sizes.next().unwrap()).min(rest.len());
                    w.write_all(&rest[..n]).await.unwrap();
                    rest = &rest[n..];
                }
                w.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let recv = r.read_to_end(&mut back);
            let ((), got) = tokio::join!(send, recv);
            got.unwrap_or_else(|e| panic!("client {ours_client} server {ours_server}: {e}"));
            echo.await.unwrap();
            assert!(
                back == expect,
                "client {ours_client} server {ours_server}: bytes differ"
            );
        }
    }

    /// A rustls server that sends application data in the same flight as
    /// its Finished (so rustls decrypts it before the hand-over) and then
    /// session tickets: nothing is lost, tickets are skipped, and the
    /// server's close_notify ends the stream.
    #[tokio::test]
    async fn data_decrypted_during_the_handshake_and_tickets_survive_the_hand_over() {
        let (scfg, ccfg) = configs(2);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(scfg).unwrap();
            // Buffered now, sent right after the server's Finished.
            conn.writer().write_all(b"early").unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
            s.conn.send_close_notify();
            s.flush().unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut c = client(ccfg, tcp, true).await;
        let mut buf = [0u8; 5];
        let early =
            tokio::time::timeout(std::time::Duration::from_secs(10), c.read_exact(&mut buf));
        early
            .await
            .expect("data sent with Finished was lost")
            .unwrap();
        assert_eq!(&buf, b"early");
        c.write_all(b"howdy").await.unwrap();
        c.flush().await.unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"howdy");
        srv.join().unwrap();
    }

    /// Key updates interoperate with rustls: its KeyUpdate asking for ours
    /// moves our receive key and gets an answer; ours (every 3 records
    /// here) move its receive key. Then both of ours over many rotations.
    #[tokio::test]
    async fn key_updates_both_ways() {
        let (scfg, ccfg) = configs(0);
        let (c, s) = tcp_pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(scfg);
        let (c, s) = tokio::join!(connect(ccfg, name(), c), acceptor.accept(s));
        let (mut c, mut s) = (c.unwrap().conn, s.unwrap());
        c.tx_key_lifetime = 3;
        let mut buf = [0u8; 3];
        for round in 0..5u8 {
            // rustls: data, then KeyUpdate (update_requested), then data.
            s.write_all(&[round]).await.unwrap();
            s.get_mut().1.refresh_traffic_keys().unwrap();
            s.write_all(&[round, round]).await.unwrap();
            s.flush().await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round; 3]);
            // Ours: each write is a record, so the key changes as we go.
            for i in 0..4u8 {
                c.write_all(&[round, i, 7]).await.unwrap();
                c.flush().await.unwrap();
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, [round, i, 7]);
            }
        }
        assert!(c.tx.seq < 3, "our key never rotated");

        let (mut c, mut s) = conn_pair().await;
        c.tx_key_lifetime = 2;
        s.tx_key_lifetime = 5;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let (mut got_s, mut got_c) = (vec![0u8; data.len()], vec![0u8; data.len()]);
        let a = async {
            c.write_all(&data).await.unwrap();
            c.flush().await.unwrap();
            c.read_exact(&mut got_c).await.unwrap();
        };
        let b = async {
            s.read_exact(&mut got_s).await.unwrap();
            s.write_all(&got_s).await.unwrap();
            s.flush().await.unwrap();
        };
        tokio::join!(a, b);
        assert!(got_c == data, "bytes differ across key updates");
    }

    /// What a peer that is not a TLS client gets from `accept`: an error,
    /// promptly, with bounded buffering.
    #[tokio::test]
    async fn bad_handshakes_fail() {
        let mut huge = vec![HANDSHAKE, 3, 1, 0xff, 0xff];
        huge.resize(600 * 1024, 0);
        let cases: [(&str, Vec<u8>); 3] = [
            ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("an endless record", huge),
            ("EOF mid-record", vec![HANDSHAKE, 3, 1, 0, 200, 1]),
        ];
        for (what, bytes) in cases {
            let (scfg, _) = configs(0);
            let (mut c, s) = tcp_pair().await;
            let writer = tokio::spawn(async move {
                let _ = c.write_all(&bytes).await;
                let _ = c.shutdown().await;
                // Held open until the server gives up.
                let mut sink = Vec::new();
                let _ = c.read_to_end(&mut sink).await;
            });
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), accept(scfg, s)).await;
            assert!(matches!(r, Ok(Err(_))), "{what}: not refused");
            writer.abort();
        }
    }

    async fn conn_pair() -> (TlsConn, TlsConn) {
        let (scfg, ccfg) = configs(0);
        let (c, s) = tcp_pair().await;
        let (c, s) = tokio::join!(connect(ccfg, name(), c), accept(scfg, s));
        (c.unwrap().conn, s.unwrap().conn)
    }

    /// Sealed by `from`, to be handed to the peer as if received.
    fn sealed(from: &mut TlsConn, data: &[u8]) -> BytesMut {
        sealed_as(from, data, APPLICATION_DATA)
    }

    fn sealed_as(from: &mut TlsConn, data: &[u8], kind: u8) -> BytesMut {
        from.seal(&[data], 0, kind).unwrap();
        let out = BytesMut::from(from.outbuf.pending());
        from.outbuf.consume(out.len());
        out
    }

    /// What each kind of record does to the reader: tickets and empty
    /// records are skipped, close_notify is EOF, other alerts and
    /// handshake messages (a key update among them) are errors.
    #[tokio::test]
    async fn record_contents_after_the_handshake() {
        let eof = Ok(Vec::new());
        let after = Ok(b"after".to_vec());
        type Case = (
            &'static str,
            u8,
            &'static [u8],
            Result<Vec<u8>, io::ErrorKind>,
        );
        let cases: [Case; 7] = [
            (
                "session tickets",
                HANDSHAKE,
                &[4, 0, 0, 2, 9, 9, 4, 0, 0, 0],
                after.clone(),
            ),
            ("empty data", APPLICATION_DATA, &[], after.clone()),
            ("close_notify", ALERT, &[1, 0], eof),
            (
                "fatal alert",
                ALERT,
                &[2, 40],
                Err(io::ErrorKind::ConnectionAborted),
            ),
            (
                "malformed key update",
                HANDSHAKE,
                &[24, 0, 0, 1, 7],
                Err(io::ErrorKind::InvalidData),
            ),
            (
                "split message",
                HANDSHAKE,
                &[4, 0, 0, 9, 1],
                Err(io::ErrorKind::InvalidData),
            ),
            (
                "change cipher spec",
                20,
                &[1],
                Err(io::ErrorKind::InvalidData),
            ),
        ];
        for (what, kind, content, want) in cases {
            let (mut c, mut s) = conn_pair().await;
            s.inbuf.unsplit(sealed_as(&mut c, content, kind));
            s.inbuf.unsplit(sealed(&mut c, b"after"));
            let got = match read_now(&mut s) {
                Poll::Ready(r) => r.map_err(|e| e.kind()),
                Poll::Pending => panic!("{what}: pending"),
            };
            assert_eq!(got, want, "{what}");
        }
    }

    /// Records cut from several buffers (HTTP/2 hands over a frame head and
    /// its payload) come out whole and in order, whether a record lies in
    /// one buffer (sealed from where it lies) or spans several (gathered).
    #[tokio::test]
    async fn records_sealed_from_several_buffers() {
        let layouts: [&[usize]; 6] = [
            &[9, 40_000],
            &[3, 3, 3],
            &[MAX_PLAIN],
            &[1, MAX_PLAIN - 1, 1],
            &[0, 5, 0, 20_000, 0],
            &[MAX_PLAIN + 7, MAX_PLAIN - 7, 100],
        ];
        for layout in layouts {
            let (mut c, mut s) = conn_pair().await;
            // Period 251: no record or buffer boundary repeats the bytes.
            let mut i = 0usize;
            let bufs: Vec<Vec<u8>> = layout
                .iter()
                .map(|&n| {
                    (0..n)
                        .map(|_| {
                            i += 1;
                            (i % 251) as u8
                        })
                        .collect()
                })
                .collect();
            let want = bufs.concat();
            let mut done = 0;
            while done < want.len() {
                done += c.seal(&bufs, done, APPLICATION_DATA).unwrap();
            }
            s.inbuf.unsplit(BytesMut::from(c.outbuf.pending()));
            let mut got = Vec::new();
            while got.len() < want.len() {
                match read_now(&mut s) {
                    Poll::Ready(Ok(b)) if !b.is_empty() => got.extend(b),
                    other => panic!("{layout:?}: {other:?} after {} bytes", got.len()),
                }
            }
            assert!(got == want, "{layout:?}");
        }
    }

    #[test]
    fn contiguous_finds_spans_inside_one_buffer() {
        let bufs: [&[u8]; 3] = [b"abc", b"", b"defg"];
        let cases: [(usize, usize, Option<&[u8]>); 7] = [
            (0, 3, Some(b"abc")),
            (1, 2, Some(b"bc")),
            (2, 2, None),
            (3, 4, Some(b"defg")),
            (4, 2, Some(b"ef")),
            (5, 3, None),
            (7, 0, Some(b"")),
        ];
        for (skip, len, want) in cases {
            assert_eq!(contiguous(&bufs, skip, len), want, "{skip}+{len}");
        }
    }

    /// The outgoing buffer keeps unsent bytes in order while records are
    /// added and the socket takes some, and moves them only when cheap.
    #[test]
    fn out_buf_keeps_order_across_partial_sends() {
        let mut out = OutBuf::default();
        let mut sent = Vec::new();
        let mut want = Vec::new();
        for i in 0..200u32 {
            let n = 1 + (i as usize * 997) % MAX_RECORD;
            let fill = (i % 251) as u8;
            out.tail(n).fill(fill);
            out.commit(n);
            want.extend(std::iter::repeat_n(fill, n));
            // The socket takes about two thirds of what is pending.
            let take = out.len() * 2 / 3;
            sent.extend_from_slice(&out.pending()[..take]);
            out.consume(take);
            assert!(out.store.len() <= 2 * (MAX_PENDING_OUT + MAX_RECORD) + MAX_RECORD);
        }
        sent.extend_from_slice(out.pending());
        out.consume(out.len());
        assert!(sent == want);
        assert!(out.is_empty());
    }

    fn read_now(conn: &mut TlsConn) -> Poll<io::Result<Vec<u8>>> {
        let mut buf = [0u8; 64];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(conn)
            .poll_read(&mut cx, &mut rb)
            .map_ok(|()| rb.filled().to_vec())
    }

    /// Tampered, replayed, reordered and malformed records are refused.
    #[tokio::test]
    async fn bad_records_are_refused() {
        type Mangle = fn(&mut BytesMut, &mut TlsConn);
        let cases: [(&str, Mangle); 5] = [
            ("flipped ciphertext bit", |r, _| r[HEADER + 1] ^= 1),
            ("flipped header byte", |r, _| r[2] ^= 1),
            ("wrong outer type", |r, _| r[0] = HANDSHAKE),
            ("oversized length", |r, _| {
                r[3] = 0x50;
            }),
            // The receiver expects sequence 0; this record is number 1.
            ("skipped sequence number", |r, c| *r = sealed(c, b"second")),
        ];
        for (what, mangle) in cases {
            let (mut c, mut s) = conn_pair().await;
            let mut rec = sealed(&mut c, b"hello");
            mangle(&mut rec, &mut c);
            s.inbuf.unsplit(rec);
            match read_now(&mut s) {
                Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
        // A replayed record fails too: its nonce has been used.
        let (mut c, mut s) = conn_pair().await;
        let rec = sealed(&mut c, b"hello");
        s.inbuf.unsplit(rec.clone());
        assert_eq!(
            read_now(&mut s).map(|r| r.unwrap()),
            Poll::Ready(b"hello".to_vec())
        );
        s.inbuf.unsplit(rec);
        assert!(
            matches!(read_now(&mut s), Poll::Ready(Err(_))),
            "replay accepted"
        );
    }

    /// An idle connection gives its small read buffer back.
    #[tokio::test]
    async fn idle_connection_holds_no_read_buffer() {
        let (mut c, mut s) = conn_pair().await;
        c.write_all(b"ping").await.unwrap();
        c.flush().await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        assert!(read_now(&mut s).is_pending());
        assert_eq!(s.inbuf.capacity(), 0);
        assert_eq!(c.outbuf.store.capacity(), 0);
    }
}
