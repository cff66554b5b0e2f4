//! HTTP/2 by hand, for hostile-peer tests: a client that writes whatever
//! frames it likes (floods, resets, more streams than allowed) over a
//! genuine mTLS connection, and reads what the server answers. RFC 9113
//! framing; header blocks are HPACK literals without Huffman coding.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ambient_agent::identity::{Identity, TrustBundle, WorkloadCert};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS_INITIAL_WINDOW_SIZE.
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
/// RST_STREAM / GOAWAY codes.
pub const CANCEL: u32 = 0x8;
pub const REFUSED_STREAM: u32 = 0x7;

/// One frame as read: type, flags, stream, payload.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// A raw HTTP/2 client connection over mutual TLS.
pub struct RawH2 {
    io: TlsStream<TcpStream>,
}

impl RawH2 {
    /// Connects from `src` to `dst` with `cert`, sends the preface and a
    /// SETTINGS frame with `settings` (id, value pairs).
    pub async fn connect(
        src: IpAddr,
        dst: SocketAddr,
        cert: &WorkloadCert,
        trust: &TrustBundle,
        expected: Identity,
        settings: &[(u16, u32)],
    ) -> anyhow::Result<RawH2> {
        use ambient_agent::hbone::tls;
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(src, 0))?;
        let tcp = sock.connect(dst).await?;
        let cfg = tls::client_config(cert, trust, vec![expected])?;
        let io = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(tls::placeholder_server_name(), tcp)
            .await?;
        let mut c = RawH2 { io };
        c.io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut body = Vec::new();
        for (id, value) in settings {
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(&value.to_be_bytes());
        }
        c.send(SETTINGS, 0, 0, &body).await?;
        Ok(c)
    }

    /// Writes one frame.
    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.io
            .write_all(&frame(kind, flags, stream, payload))
            .await
    }

    /// Writes already-framed bytes (many frames at once).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }

    /// Reads the next frame; `None` at EOF.
    pub async fn read(&mut self) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 9];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.io.read_exact(&mut payload).await?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Ok(Some(Frame {
            kind: head[3],
            flags: head[4],
            stream,
            payload,
        }))
    }
}

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A CONNECT request's header block for `authority`: `:method` (static
/// index 2) and `:authority` (static index 1) as literals with indexed
/// names, not added to the dynamic table.
pub fn connect_headers(authority: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, value) in [(2u8, "CONNECT"), (1u8, authority)] {
        out.push(index); // 0000xxxx: literal without indexing, indexed name
        out.push(value.len() as u8); // no Huffman, length < 127
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A request's header block: `:method` (static index 2), `:scheme`
/// `http` (6), `:path` (4), `:authority` (1) and `extra` headers, all as
/// literals not added to the dynamic table (new names for `extra`).
pub fn request_headers(
    method: &str,
    path: &str,
    authority: &str,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, value) in [(2u8, method), (6, "http"), (4, path), (1, authority)] {
        out.push(index);
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    for (name, value) in extra {
        out.push(0);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// HPACK's integer (RFC 7541 §5.1): `n` with an `bits`-bit prefix after
/// the `first` byte's high bits (here, the Huffman flag, unset).
fn hpack_int(out: &mut Vec<u8>, first: u8, bits: u32, n: usize) {
    let max = (1usize << bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = n - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A RST_STREAM payload.
pub fn error_code(code: u32) -> Vec<u8> {
    code.to_be_bytes().to_vec()
}
