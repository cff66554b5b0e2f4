//! The HTTP/2 half of an HBONE server: accepts CONNECT streams on an
//! established mTLS connection, validates each request, and hands it to a
//! [`Handler`] that either refuses it or accepts it exactly once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn, Instrument};

use super::stream::H2Stream;
use super::tls::{self, TlsError};
use super::tls_conn::{self, TlsConn};
use super::{Authority, H2Settings};
use crate::identity::Identity;

/// Why an HBONE connection was not established.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer {0} is not in this mesh's trust domain")]
    ForeignTrustDomain(Identity),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("TLS handshake: {0}")]
    Io(#[source] std::io::Error),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("too many TLS handshakes in progress (from this client, or in all)")]
    TooMany,
    /// The client closed before sending anything (a TCP probe, a scan).
    #[error("closed before the handshake")]
    Closed,
}

impl HandshakeError {
    /// A short name for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::ForeignTrustDomain(_) => "foreign_trust_domain",
            HandshakeError::Tls(_) => "identity",
            HandshakeError::Io(e) if tls::revoked(e) => "revoked",
            HandshakeError::Io(_) => "tls",
            HandshakeError::Timeout => "timeout",
            HandshakeError::TooMany => "too_many",
            HandshakeError::Closed => "closed",
        }
    }
}

/// Bounds on the mTLS handshakes one HBONE listener runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// From accepting the connection to a finished handshake, waiting for
    /// the client's first bytes included.
    pub timeout: Duration,
    /// Handshakes in progress at once (a connection is in progress from
    /// its first bytes; a silent one costs its socket only).
    pub max_concurrent: usize,
    /// Of those, from one client address: one noisy peer cannot take the
    /// listener from the others.
    pub max_per_client: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            timeout: Duration::from_secs(10),
            max_concurrent: 1024,
            max_per_client: 64,
        }
    }
}

/// The handshakes in progress on one listener, counted against its
/// [`HandshakeLimits`].
#[derive(Debug, Default)]
pub struct HandshakeGate {
    limits: HandshakeLimits,
    in_progress: Mutex<GateCounts>,
}

#[derive(Debug, Default)]
struct GateCounts {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// One handshake's place; dropping it frees the place.
struct GatePermit<'a> {
    gate: &'a HandshakeGate,
    client: IpAddr,
}

impl HandshakeGate {
    pub fn new(limits: HandshakeLimits) -> Self {
        HandshakeGate {
            limits,
            in_progress: Mutex::default(),
        }
    }

    pub fn limits(&self) -> HandshakeLimits {
        self.limits
    }

    fn enter(&self, client: IpAddr) -> Option<GatePermit<'_>> {
        let mut c = self.in_progress.lock().unwrap_or_else(|e| e.into_inner());
        let mine = c.by_client.get(&client).copied().unwrap_or(0);
        if c.total >= self.limits.max_concurrent || mine >= self.limits.max_per_client {
            return None;
        }
        c.total += 1;
        c.by_client.insert(client, mine + 1);
        Some(GatePermit { gate: self, client })
    }
}

impl Drop for GatePermit<'_> {
    fn drop(&mut self) {
        let mut c = self
            .gate
            .in_progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                c.by_client.remove(&self.client);
            }
        }
    }
}

/// Why serving one accepted HBONE connection ended early (the agent's
/// inbound and the waypoint alike).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("certificate: {0}")]
    Certificate(#[from] crate::identity::CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
}

/// Completes the mTLS handshake of an accepted HBONE connection from
/// `client`: TLS with `cfg` within the gate's timeout, ALPN h2, and a
/// client identity of `trust_domain` (one root may sign several trust
/// domains; only ours is the mesh). Nothing is allocated for the
/// handshake until the client sends its first bytes; from then on it
/// holds a place at `gate`, or is refused when there is none.
pub async fn accept_tls(
    stream: tokio::net::TcpStream,
    client: IpAddr,
    cfg: Arc<rustls::ServerConfig>,
    gate: &HandshakeGate,
    trust_domain: &str,
) -> Result<Accepted, HandshakeError> {
    let handshake = async {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await.map_err(HandshakeError::Io)? == 0 {
            return Err(HandshakeError::Closed);
        }
        let _place = gate.enter(client).ok_or(HandshakeError::TooMany)?;
        tls_conn::accept(cfg, stream)
            .await
            .map_err(HandshakeError::Io)
    };
    let tls = tokio::time::timeout(gate.limits.timeout, handshake)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    if tls.alpn.as_deref() != Some(tls::ALPN_H2) {
        return Err(TlsError::NoH2.into());
    }
    let peer = tls::peer_identity(Some(&tls.peer_certificates))?;
    if peer.trust_domain() != trust_domain {
        return Err(HandshakeError::ForeignTrustDomain(peer));
    }
    Ok(Accepted {
        conn: tls.conn,
        peer,
        chain: tls.peer_certificates,
    })
}

/// An authenticated HBONE connection.
pub struct Accepted {
    pub conn: TlsConn,
    /// The identity the client proved.
    pub peer: Identity,
    /// The client's chain, leaf first.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
}

/// A validated CONNECT request.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The SPIFFE identity the client proved in the TLS handshake.
    pub peer_identity: Identity,
    /// The TCP peer of the HBONE connection (the client's agent).
    pub peer_addr: SocketAddr,
    /// The address the HBONE connection arrived on.
    pub local_addr: SocketAddr,
    /// `:authority`: where the client wants its bytes to go.
    pub target: Authority,
    /// The original client address from `Forwarded: for=`, if given.
    pub forwarded_for: Option<IpAddr>,
    /// The `baggage` header, if any.
    pub baggage: Option<String>,
    /// `x-forwarded-network`: the client's network, when it came through
    /// a network gateway (double HBONE).
    pub origin_network: Option<String>,
}

/// The answer to one CONNECT: refuse with a status, or accept and get the
/// stream. Dropping it without either resets the stream.
pub struct Responder {
    respond: SendResponse<Bytes>,
    recv: h2::RecvStream,
}

impl Responder {
    /// Answers with `status` (an error) and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let _ = self.respond.send_response(response(status), true);
    }

    /// Resolves when the client resets the stream before it is answered
    /// (it gave up: nothing more should be done for it).
    pub async fn reset(&mut self) -> h2::Reason {
        std::future::poll_fn(|cx| self.respond.poll_reset(cx))
            .await
            .unwrap_or(h2::Reason::CANCEL)
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self
            .respond
            .send_response(response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.recv))
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    r
}

/// Decides what to do with each valid CONNECT request.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: ConnectRequest,
        responder: Responder,
    ) -> impl std::future::Future<Output = ()> + Send + 'static;
}

/// Facts about the HBONE connection every request on it shares.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    pub peer_identity: Identity,
    pub peer_addr: SocketAddr,
    pub local_addr: SocketAddr,
}

/// Serves HTTP/2 on an established, authenticated connection until the
/// client goes away or `shutdown` fires (then GOAWAY and drain). When
/// `untrusted` resolves (the client's root left the trust anchors) the
/// connection and every stream on it end at once.
pub async fn serve<IO, H>(
    io: IO,
    info: ConnectionInfo,
    settings: &H2Settings,
    handler: Arc<H>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    untrusted: impl std::future::Future<Output = ()>,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    tokio::pin!(untrusted);
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .handshake::<_, Bytes>(Lingering(Some(io)))
        .await?;
    let mut draining = *shutdown.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            () = &mut untrusted => {
                warn!(peer = %info.peer_identity, "closing an HBONE connection: no trusted root vouches for its peer any more");
                conn.abrupt_shutdown(h2::Reason::CANCEL);
                // Flush the GOAWAY, briefly; dropping the connection then
                // ends every stream still open.
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Some(Ok(_)) = conn.accept().await {}
                })
                .await;
                return Ok(());
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (req, respond) = next?;
        let handler = handler.clone();
        let span = tracing::debug_span!("hbone_stream", peer = %info.peer_identity, authority = ?req.uri().authority().map(|a| a.as_str()));
        match validate(req, respond, &info) {
            // Spawned as is, with no wrapping future: a wrapper would hold
            // the request a second time for the life of the stream.
            Ok((req, responder)) => {
                tokio::spawn(handler.handle(req, responder).instrument(span));
            }
            Err((responder, status, why)) => {
                let _span = span.enter();
                warn!(%status, reason = why, "refusing HBONE request");
                responder.refuse(status);
            }
        }
    }
}

/// How long a closed server connection waits for its client to close.
const LINGER: Duration = Duration::from_secs(5);

/// The transport of a server connection, closed gently. When h2 is done
/// with it (say after a graceful GOAWAY), what was written goes out and
/// what the client still sends is read and dropped until it closes too
/// (or [`LINGER`] passes). Closing a socket with unread input makes the
/// kernel reset the connection and throw away the answers still queued —
/// the end of a tunnel's data, and the client's transfer with it.
struct Lingering<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(Option<IO>);

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Lingering<IO> {
    fn io(&mut self) -> std::io::Result<&mut IO> {
        self.0
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Lingering<IO> {
    fn drop(&mut self) {
        let (Some(mut io), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tokio::time::timeout(LINGER, async {
                let _ = io.shutdown().await;
                let mut scratch = [0u8; 4096];
                while matches!(io.read(&mut scratch).await, Ok(n) if n > 0) {}
            })
            .await;
        });
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Lingering<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.io()?).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.io()?).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.io()?).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.io()?).poll_shutdown(cx)
    }
}

type Invalid = (Responder, StatusCode, &'static str);

/// Checks the method and authority; everything else is the handler's call.
fn validate(
    req: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
    info: &ConnectionInfo,
) -> Result<(ConnectRequest, Responder), Invalid> {
    let (parts, recv) = req.into_parts();
    let responder = Responder { respond, recv };
    if parts.method != Method::CONNECT {
        return Err((responder, StatusCode::BAD_REQUEST, "method is not CONNECT"));
    }
    let Some(target) = parts
        .uri
        .authority()
        .and_then(|a| Authority::parse(a.as_str()))
    else {
        return Err((
            responder,
            StatusCode::BAD_REQUEST,
            "authority is not an ip:port or hostname:port",
        ));
    };
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let forwarded_for = header("forwarded").and_then(|f| parse_forwarded_for(&f));
    debug!(%target, ?forwarded_for, "CONNECT");
    Ok((
        ConnectRequest {
            peer_identity: info.peer_identity.clone(),
            peer_addr: info.peer_addr,
            local_addr: info.local_addr,
            target,
            forwarded_for,
            baggage: header("baggage"),
            origin_network: header(super::FORWARDED_NETWORK),
        },
        responder,
    ))
}

/// The address in the first `for=` of a `Forwarded` header (RFC 7239),
/// quoted or not, IPv6 in brackets.
fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    value
        .split([';', ','])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("for"))
        .and_then(|(_, v)| {
            let v = v.trim_matches('"');
            let v = v
                .strip_prefix('[')
                .map_or(v, |s| s.split(']').next().unwrap_or(s));
            v.parse::<IpAddr>()
                .ok()
                .or_else(|| v.parse::<SocketAddr>().ok().map(|s| s.ip()))
                // `::ffff:10.0.0.1` is 10.0.0.1: policies on IPv4 ranges
                // must see it as such.
                .map(|ip| ip.to_canonical())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for() {
        let cases = [
            (r#"for="10.0.0.1""#, Some("10.0.0.1")),
            ("for=10.0.0.1;proto=http", Some("10.0.0.1")),
            (r#"proto=http;For="[2001:db8::1]""#, Some("2001:db8::1")),
            (r#"for="10.0.0.1:4711""#, Some("10.0.0.1")),
            (r#"for="[::ffff:10.0.0.1]""#, Some("10.0.0.1")),
            ("for=unknown", None),
            ("by=10.0.0.1", None),
        ];
        for (input, want) in cases {
            let got = parse_forwarded_for(input);
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{input}");
        }
    }
}
