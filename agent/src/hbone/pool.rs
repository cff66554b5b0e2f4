//! Pooled HBONE client connections (DESIGN §4).
//!
//! Connections are shared by streams with the same [`PoolKey`]. Each carries
//! at most `max_streams` streams (fewer if the peer says so); past that a new
//! connection opens. While more than one stream is active, new streams are
//! spread over up to `spread` connections (least busy first): one HTTP/2
//! connection is driven by one task, so a single connection would keep the
//! streams of a busy destination on one core. Creation is single-flight per key, so a burst of
//! connects to one destination opens one TLS connection at a time instead
//! of a thundering herd. A connection idle for `idle_timeout` is released;
//! one that stops answering PINGs is dropped. A connection may also be
//! retired after a number of streams over its life (`streams_per_connection`),
//! which forces fresh handshakes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use rustls::ClientConfig;
use tracing::{debug, info_span, warn, Instrument};

use super::stream::H2Stream;
use super::tls::{self, TlsError};
use super::tls_conn::{self, TlsConn};
use super::H2Settings;
use crate::identity::{
    CaError, CertManager, Identity, PeerGuard, PeerRole, TrustBundle, WorkloadCert,
};
use crate::socket::{ConnectOpts, Sockets};

/// Pool behaviour; see each field for its default.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Streams per connection before another opens (default 100).
    pub max_streams: usize,
    /// How long a connection with no streams is kept (default 60 s).
    pub idle_timeout: Duration,
    /// PING interval on each connection (default 10 s).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered (default 10 s).
    pub keepalive_timeout: Duration,
    /// TCP + TLS + HTTP/2 handshake budget (default 10 s).
    pub connect_timeout: Duration,
    pub h2: H2Settings,
    /// SO_MARK on the agent's own sockets, so capture skips them.
    pub socket_mark: Option<u32>,
    /// TCP keepalive under the PINGs (default none): the PINGs notice a
    /// dead peer of a busy or idle connection; this also covers the
    /// handshake and a peer that answers PINGs but not data.
    pub tcp_keepalive: Option<crate::socket::Keepalive>,
    /// Streams a connection carries over its whole life before it takes no
    /// more and closes once they end; 0 = no limit (default). 1 gives every
    /// tunnel its own mTLS handshake (benchmarks, rotation drills).
    pub streams_per_connection: u64,
    /// Connections per key that concurrent streams are spread over before
    /// they share (default 2; 1 = one connection until `max_streams`).
    pub spread: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams: 100,
            idle_timeout: Duration::from_secs(60),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            h2: H2Settings::default(),
            socket_mark: None,
            tcp_keepalive: None,
            streams_per_connection: 0,
            spread: 2,
        }
    }
}

/// Which streams may share a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    pub dst_identity: Identity,
    /// The peer agent's HBONE address.
    pub dst: SocketAddr,
    /// Source address to bind, if any.
    pub src_ip: Option<IpAddr>,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no certificate for {0}: {1}")]
    Certificate(Identity, #[source] CaError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Handshake(SocketAddr, #[source] std::io::Error),
    #[error("peer {0} did not negotiate ALPN h2")]
    NoH2(SocketAddr),
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("peer answered CONNECT with {0}")]
    Status(StatusCode),
    #[error("TLS handshake with the destination inside the gateway's tunnel: {0}")]
    InnerHandshake(#[source] std::io::Error),
    #[error("the destination inside the gateway's tunnel did not negotiate ALPN h2")]
    InnerNoH2,
    #[error("building the CONNECT request: {0}")]
    Request(String),
}

/// Counters describing the pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// TLS connections opened since start.
    pub connections_opened: u64,
    /// Connections currently pooled.
    pub connections_open: usize,
    /// Streams currently open.
    pub streams_active: usize,
}

/// A pool of HBONE client connections. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    certs: Arc<CertManager>,
    cfg: PoolConfig,
    entries: Mutex<HashMap<PoolKey, Arc<Entry>>>,
    /// TLS client configs by (source, expected peers), with the certificate
    /// they present: building one parses the roots and keys every time.
    tls: Mutex<HashMap<TlsKey, CachedTls>>,
    opened: AtomicU64,
    next_id: AtomicU64,
}

type TlsKey = (Identity, Vec<Identity>);
/// What a handshake yields: the h2 handle and driver, the server's chain
/// (leaf first), and the trust generation it was verified under.
type Handshaken = (
    SendRequest<Bytes>,
    h2::client::Connection<TlsConn, Bytes>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    u64,
);
/// A cached client config, the certificate it presents and the trust
/// generation it verifies with.
type CachedTls = (Arc<WorkloadCert>, u64, Arc<ClientConfig>);

/// Tries of one stream whose peer refused it unprocessed.
const MAX_ATTEMPTS: usize = 3;

/// Whether the peer refused the stream before doing anything with it: it
/// is going away (GOAWAY: streams above its last id were never processed)
/// or refused it outright (RFC 9113, 8.7).
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// `r` again (a CONNECT request has no body).
fn copy_request(r: &Request<()>) -> Request<()> {
    let mut c = Request::new(());
    *c.method_mut() = r.method().clone();
    *c.uri_mut() = r.uri().clone();
    *c.headers_mut() = r.headers().clone();
    *c.version_mut() = r.version();
    c
}

/// Cached TLS configs kept at most; past it the cache starts over (a bound,
/// not an eviction policy: a node talks to far fewer identity sets).
const TLS_CACHE_MAX: usize = 1024;

/// The connections of one key.
#[derive(Default)]
struct Entry {
    /// Held while a connection for this key is being created.
    creating: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Arc<Conn>>>,
}

/// Set in `Conn::state` once the connection takes no more streams.
const CLOSED: usize = 1 << (usize::BITS - 1);

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Active stream count, with the [`CLOSED`] bit.
    state: AtomicUsize,
    max_streams: usize,
    idle_since: Mutex<Instant>,
    /// Streams still allowed over the connection's life; `u64::MAX` = no limit.
    budget: AtomicU64,
    /// Wakes the connection's driver once it is closed and has no stream.
    retired: Arc<tokio::sync::Notify>,
    /// Wakes the driver when the connection's last stream ends, to close
    /// it at once if its key has idle connections to spare.
    idle: Arc<tokio::sync::Notify>,
}

impl Conn {
    /// Claims a stream slot unless the connection is full, closed or has
    /// spent its life budget.
    fn try_reserve(&self) -> bool {
        let max = self.max_streams.min(self.send.current_max_send_streams());
        let Some(last) = self.take_budget() else {
            return false;
        };
        let reserved = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                (v & CLOSED == 0 && v < max).then_some(v + 1)
            })
            .is_ok();
        if !reserved {
            self.refund_budget();
        } else if last {
            self.close();
        }
        reserved
    }

    /// Takes one stream from the life budget: `None` when it is spent,
    /// `Some(true)` when this was the last one.
    fn take_budget(&self) -> Option<bool> {
        if self.budget.load(Ordering::Relaxed) == u64::MAX {
            return Some(false);
        }
        self.budget
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| b.checked_sub(1))
            .ok()
            .map(|before| before == 1)
    }

    fn refund_budget(&self) {
        if self.budget.load(Ordering::Relaxed) != u64::MAX {
            self.budget.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn release(&self) {
        let before = self.state.fetch_sub(1, Ordering::AcqRel);
        if before & !CLOSED == 1 {
            *lock(&self.idle_since) = Instant::now();
            if before & CLOSED != 0 {
                self.retired.notify_one();
            } else {
                self.idle.notify_one();
            }
        }
    }

    /// Closes the connection if it has had no stream for `timeout`.
    fn close_if_idle(&self, timeout: Duration) -> bool {
        lock(&self.idle_since).elapsed() >= timeout
            && self
                .state
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    fn active(&self) -> usize {
        self.state.load(Ordering::Acquire) & !CLOSED
    }
}

/// Holds a stream slot; releases it when the stream ends.
struct Slot(Arc<Conn>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(certs: Arc<CertManager>, cfg: PoolConfig) -> Self {
        Pool {
            inner: Arc::new(Inner {
                certs,
                cfg,
                entries: Mutex::default(),
                tls: Mutex::default(),
                opened: AtomicU64::new(0),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a CONNECT stream for `request` on a connection of `key`, whose
    /// peer must prove one of `expected`. Succeeds only on a 200 answer.
    ///
    /// A stream the peer refused unprocessed (it sent GOAWAY: its agent is
    /// draining, e.g. handing its node to a successor; or REFUSED_STREAM)
    /// is opened again, on another connection: the peer never saw it.
    pub async fn connect(
        &self,
        key: &PoolKey,
        expected: &[Identity],
        mut request: Request<()>,
        sockets: &Sockets,
    ) -> Result<H2Stream, PoolError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let again = (attempts < MAX_ATTEMPTS).then(|| copy_request(&request));
            match self.connect_once(key, expected, request, sockets).await {
                Err(PoolError::H2(e)) if again.is_some() && unprocessed(&e) => {
                    debug!(dst = %key.dst, error = %e, "stream refused unprocessed; opening it again");
                    request = again.unwrap_or_default();
                }
                other => return other,
            }
        }
    }

    async fn connect_once(
        &self,
        key: &PoolKey,
        expected: &[Identity],
        request: Request<()>,
        sockets: &Sockets,
    ) -> Result<H2Stream, PoolError> {
        let entry = self.entry(key);
        let conn = match entry.pick() {
            // Another stream is already active on the least busy connection:
            // open one more (unless one is being opened) so the streams can
            // run on different cores. Not with a stream budget, which the
            // reservation has already drawn on.
            Some(c)
                if c.active() > 1
                    && self.inner.cfg.streams_per_connection == 0
                    && entry.open_count() < self.inner.cfg.spread =>
            {
                match entry.creating.try_lock() {
                    Ok(_creating) => {
                        match Box::pin(self.open(key, expected, &entry, sockets)).await {
                            Ok(fresh) => {
                                c.release();
                                fresh
                            }
                            Err(e) => {
                                debug!(dst = %key.dst, error = %e, "extra connection failed; sharing");
                                c
                            }
                        }
                    }
                    Err(_) => c,
                }
            }
            Some(c) => c,
            None => {
                let _creating = entry.creating.lock().await;
                match entry.pick() {
                    Some(c) => c,
                    // Boxed: the handshake's state is large and needed only
                    // while connecting; inline, every tunnel's task would
                    // carry it for its whole life.
                    None => Box::pin(self.open(key, expected, &entry, sockets)).await?,
                }
            }
        };
        let slot = Slot(conn);
        // A connection that fails a stream (a GOAWAY, a reset) takes no more.
        let closing = |_: &h2::Error| slot.0.close();
        let mut send = slot.0.send.clone().ready().await.inspect_err(closing)?;
        let (response, send_stream) = send.send_request(request, false).inspect_err(closing)?;
        let response = response.await.inspect_err(closing)?;
        if response.status() != StatusCode::OK {
            return Err(PoolError::Status(response.status()));
        }
        Ok(H2Stream::new(send_stream, response.into_body()).with_guard(slot))
    }

    pub fn stats(&self) -> PoolStats {
        let entries = lock(&self.inner.entries);
        let mut stats = PoolStats {
            connections_opened: self.inner.opened.load(Ordering::Relaxed),
            ..Default::default()
        };
        for e in entries.values() {
            for c in lock(&e.conns).iter() {
                stats.connections_open += 1;
                stats.streams_active += c.active();
            }
        }
        stats
    }

    fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        lock(&self.inner.entries)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Opens a new connection for `key` with its first stream slot taken.
    async fn open(
        &self,
        key: &PoolKey,
        expected: &[Identity],
        entry: &Arc<Entry>,
        sockets: &Sockets,
    ) -> Result<Arc<Conn>, PoolError> {
        let cfg = &self.inner.cfg;
        let (send, connection, chain, generation) =
            tokio::time::timeout(cfg.connect_timeout, self.handshake(key, expected, sockets))
                .await
                .map_err(|_| PoolError::Timeout(key.dst))??;
        let guard = self
            .inner
            .certs
            .trust()
            .register_peer(chain, PeerRole::Server, generation);
        let budget = match cfg.streams_per_connection {
            0 => u64::MAX,
            n => n,
        };
        let conn = Arc::new(Conn {
            id: self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            state: AtomicUsize::new(1),
            max_streams: cfg.max_streams.max(1),
            idle_since: Mutex::new(Instant::now()),
            budget: AtomicU64::new(budget),
            retired: Arc::default(),
            idle: Arc::default(),
        });
        // The first stream is taken here, not through `try_reserve`.
        if conn.take_budget() == Some(true) {
            conn.close();
        }
        self.inner.opened.fetch_add(1, Ordering::Relaxed);
        lock(&entry.conns).push(conn.clone());
        let span = info_span!("hbone_conn", id = conn.id, dst = %key.dst, peer = %key.dst_identity);
        tokio::spawn(
            drive(
                connection,
                guard,
                [conn.retired.clone(), conn.idle.clone()],
                Arc::downgrade(&conn),
                Arc::downgrade(entry),
                Arc::downgrade(&self.inner),
                key.clone(),
            )
            .instrument(span),
        );
        Ok(conn)
    }

    async fn handshake(
        &self,
        key: &PoolKey,
        expected: &[Identity],
        sockets: &Sockets,
    ) -> Result<Handshaken, PoolError> {
        let cfg = &self.inner.cfg;
        let cert = self
            .inner
            .certs
            .fetch(&key.src_identity)
            .await
            .map_err(|e| PoolError::Certificate(key.src_identity.clone(), e))?;
        let trust = self.inner.certs.trust_bundle();
        let tls_cfg = self.client_config(&key.src_identity, cert, expected, &trust)?;
        let opts = ConnectOpts {
            bind: key.src_ip.map(|ip| SocketAddr::new(ip, 0)),
            transparent: false,
            mark: cfg.socket_mark,
            keepalive: cfg.tcp_keepalive,
        };
        let tcp = sockets
            .connect(key.dst, opts)
            .await
            .map_err(|e| PoolError::Connect(key.dst, e))?;
        let tls = tls_conn::connect(tls_cfg, tls::placeholder_server_name(), tcp)
            .await
            .map_err(|e| {
                if tls::revoked(&e) {
                    self.inner.certs.trust().count_revoked(PeerRole::Server);
                }
                PoolError::Handshake(key.dst, e)
            })?;
        if tls.alpn.as_deref() != Some(tls::ALPN_H2) {
            return Err(PoolError::NoH2(key.dst));
        }
        let chain = tls.peer_certificates;
        let tls = tls.conn;
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(cfg.h2.stream_window)
            .initial_connection_window_size(cfg.h2.connection_window)
            .max_frame_size(cfg.h2.max_frame_size)
            .handshake(tls)
            .await?;
        debug!(dst = %key.dst, peer = %key.dst_identity, "HBONE connection established");
        Ok((send, connection, chain, trust.generation))
    }
}

impl Pool {
    /// The TLS config for a connection from `src` to a peer that must
    /// prove one of `expected` (for a connection the pool does not hold,
    /// such as the inner one of double HBONE).
    pub async fn tls_config(
        &self,
        src: &Identity,
        expected: &[Identity],
    ) -> Result<Arc<ClientConfig>, PoolError> {
        let cert = self
            .inner
            .certs
            .fetch(src)
            .await
            .map_err(|e| PoolError::Certificate(src.clone(), e))?;
        let trust = self.inner.certs.trust_bundle();
        Ok(self.client_config(src, cert, expected, &trust)?)
    }

    /// The TLS config presenting `cert` and expecting `expected`, reused
    /// until the certificate is renewed or the trust anchors change.
    fn client_config(
        &self,
        src: &Identity,
        cert: Arc<WorkloadCert>,
        expected: &[Identity],
        trust: &TrustBundle,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (src.clone(), expected.to_vec());
        if let Some((c, generation, cfg)) = lock(&self.inner.tls).get(&key) {
            if Arc::ptr_eq(c, &cert) && *generation == trust.generation {
                return Ok(cfg.clone());
            }
        }
        let cfg = Arc::new(tls::client_config(&cert, trust, expected.to_vec())?);
        let mut cache = lock(&self.inner.tls);
        if cache.len() >= TLS_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, (cert, trust.generation, cfg.clone()));
        Ok(cfg)
    }
}

impl Entry {
    /// Takes a stream slot on the least busy connection with room.
    fn pick(&self) -> Option<Arc<Conn>> {
        let conns = lock(&self.conns);
        // Closed connections sort last: their state carries the CLOSED bit.
        if let Some(c) = conns.iter().min_by_key(|c| c.state.load(Ordering::Acquire)) {
            if c.try_reserve() {
                return Some(c.clone());
            }
        }
        conns.iter().find(|c| c.try_reserve()).cloned()
    }

    /// Connections still taking streams.
    fn open_count(&self) -> usize {
        lock(&self.conns)
            .iter()
            .filter(|c| c.state.load(Ordering::Acquire) & CLOSED == 0)
            .count()
    }
}

/// Why a pooled connection stopped being used.
#[derive(Debug)]
enum Ending {
    Closed,
    Failed,
    Idle,
    /// Idle while its key had more idle connections than it spreads over:
    /// what a burst opened is closed as soon as the burst ends, with the
    /// memory it holds (its TLS and HTTP/2 buffers, on both agents).
    Surplus,
    Released,
    Retired,
    KeepAliveFailed,
    /// The peer's root left the trust anchors: dropped with its streams.
    Untrusted,
}

/// Whether `entry` has more connections without a stream than `spread`
/// (which stay, for the next streams to reuse).
fn surplus(entry: &Weak<Entry>, spread: usize) -> bool {
    entry.upgrade().is_some_and(|e| {
        lock(&e.conns)
            .iter()
            .filter(|c| c.state.load(Ordering::Acquire) == 0)
            .count()
            > spread.max(1)
    })
}

/// Drives one connection: polls it, PINGs it, releases it when idle, and
/// removes it from the pool when it ends.
async fn drive(
    mut connection: h2::client::Connection<TlsConn, Bytes>,
    peer: PeerGuard,
    [retired, idle]: [Arc<tokio::sync::Notify>; 2],
    conn: Weak<Conn>,
    entry: Weak<Entry>,
    pool: Weak<Inner>,
    key: PoolKey,
) {
    let Some(cfg) = pool.upgrade().map(|p| p.cfg.clone()) else {
        return;
    };
    let mut ping_pong = connection.ping_pong();
    let tick = cfg
        .keepalive_interval
        .min(cfg.idle_timeout / 2)
        .max(Duration::from_millis(10));
    let maintain = async {
        let mut since_ping = Duration::ZERO;
        // Its own deadline: idle wake-ups in between do not postpone the
        // PINGs and the idle check.
        let sleep = tokio::time::sleep(tick);
        tokio::pin!(sleep);
        loop {
            let woke = tokio::select! {
                () = &mut sleep => {
                    sleep.as_mut().reset(tokio::time::Instant::now() + tick);
                    false
                }
                () = idle.notified() => true,
            };
            let Some(c) = conn.upgrade() else {
                return Ending::Released;
            };
            if woke {
                if surplus(&entry, cfg.spread) && c.close_if_idle(Duration::ZERO) {
                    return Ending::Surplus;
                }
                continue;
            }
            since_ping += tick;
            if c.close_if_idle(cfg.idle_timeout) {
                return Ending::Idle;
            }
            drop(c);
            if since_ping >= cfg.keepalive_interval {
                since_ping = Duration::ZERO;
                if let Some(pp) = ping_pong.as_mut() {
                    let pong =
                        tokio::time::timeout(cfg.keepalive_timeout, pp.ping(h2::Ping::opaque()));
                    if !matches!(pong.await, Ok(Ok(_))) {
                        return Ending::KeepAliveFailed;
                    }
                }
            }
        }
    };
    let why = tokio::select! {
        r = &mut connection => match r {
            Ok(()) => Ending::Closed,
            Err(e) => {
                warn!(error = %e, "HBONE connection failed");
                Ending::Failed
            }
        },
        why = maintain => why,
        _ = retired.notified() => Ending::Retired,
        () = peer.untrusted() => {
            warn!("closing an HBONE connection: no trusted root vouches for its peer any more");
            Ending::Untrusted
        }
    };
    debug!(reason = ?why, "HBONE connection leaves the pool");
    if let Some(c) = conn.upgrade() {
        c.close();
        if let Some(entry) = entry.upgrade() {
            lock(&entry.conns).retain(|other| !Arc::ptr_eq(other, &c));
            if lock(&entry.conns).is_empty() {
                if let Some(pool) = pool.upgrade() {
                    let mut entries = lock(&pool.entries);
                    // Keep the entry while someone is creating a connection in it.
                    if entry.creating.try_lock().is_ok() && lock(&entry.conns).is_empty() {
                        entries.remove(&key);
                    }
                }
            }
        }
    }
    // A released connection has no streams left; let it say goodbye. A dead
    // one is dropped at once, so a black-holed peer cannot hold the task.
    if matches!(
        why,
        Ending::Idle | Ending::Surplus | Ending::Released | Ending::Retired
    ) {
        let _ = tokio::time::timeout(cfg.keepalive_timeout, connection).await;
    }
}
