//! The proxies a workload's traffic passes through: outbound capture
//! (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! A [`WorkloadProxy`] owns the three listeners of one local workload; the
//! capture layer decides how connections reach them.

mod inbound;
mod inbound_passthrough;
pub mod limits;
pub mod orig_dst;
mod outbound;
pub mod proxy_protocol;
pub mod record;
pub mod tracker;

pub use inbound::Inbound;
pub use inbound_passthrough::InboundPassthrough;
pub use outbound::Outbound;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::hbone::{H2Settings, Pool};
use crate::identity::CertManager;
use crate::socket::{canonical, ConnectOpts, ListenOpts, Sockets};
use crate::state::{authz, State, Workload};

/// Settings every proxy shares.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    pub hbone_port: u16,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    /// SO_MARK on the agent's own sockets.
    pub socket_mark: Option<u32>,
    /// Budget for connecting to a destination application.
    pub connect_timeout: Duration,
    /// TCP keepalive on connections to and from applications.
    pub keepalive: Option<crate::socket::Keepalive>,
    /// What each workload may hold open.
    pub limits: limits::WorkloadLimits,
    /// Bounds on each HBONE listener's inbound handshakes.
    pub handshakes: crate::hbone::server::HandshakeLimits,
    pub h2: H2Settings,
    /// The DNS proxy, if on.
    pub dns: Option<crate::dns::DnsSettings>,
    /// Ports the agent itself serves: a tunnel or plaintext connection to
    /// one of them is refused, never connected (it would loop back into
    /// the agent, or reach its admin endpoints from the network).
    pub reserved_ports: ReservedPorts,
}

/// The ports a tunnel may not target. Istio keeps 15000-15090 for its
/// proxies; ztunnel refuses 15001, 15006 and 15008 (its `illegal_ports`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedPorts(Vec<u16>);

impl ReservedPorts {
    /// Istio's well-known agent ports: admin 15000, outbound 15001,
    /// inbound plaintext 15006, HBONE 15008, metrics 15020, readiness
    /// 15021, DNS 15053.
    pub const WELL_KNOWN: [u16; 7] = [15000, 15001, 15006, 15008, 15020, 15021, 15053];

    /// The well-known ports and `configured` (0 meaning "none").
    pub fn new(configured: impl IntoIterator<Item = u16>) -> Self {
        let mut ports: Vec<u16> = Self::WELL_KNOWN.into_iter().chain(configured).collect();
        ports.retain(|p| *p != 0);
        ports.sort_unstable();
        ports.dedup();
        ReservedPorts(ports)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.binary_search(&port).is_ok()
    }
}

impl Default for ReservedPorts {
    fn default() -> Self {
        Self::new([])
    }
}

/// What the proxies share: the mesh, certificates and the HBONE pool.
#[derive(Clone)]
pub struct ProxyContext {
    pub state: Arc<State>,
    pub certs: Arc<CertManager>,
    pub pool: Pool,
    pub settings: Arc<ProxySettings>,
    /// Flips to true when the agent drains.
    pub shutdown: watch::Receiver<bool>,
    /// Connections being served (for draining).
    pub active: Arc<Active>,
    /// Open inbound connections, re-authorized when policy changes.
    pub tracker: Arc<tracker::Tracker>,
    /// Where connections are reported as they open and close.
    pub reporter: record::Reporter,
    /// Looks up workloads known by DNS name.
    pub resolver: Arc<crate::dns::lookup::Resolver>,
}

/// Bound addresses of a workload's listeners.
#[derive(Clone, Copy, Debug)]
pub struct ListenerAddrs {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub hbone: SocketAddr,
}

/// The listeners of one local workload; dropping it closes them.
pub struct WorkloadProxy {
    pub addrs: ListenerAddrs,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    dns: Option<crate::dns::DnsServer>,
}

impl Drop for WorkloadProxy {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

impl WorkloadProxy {
    /// Closes the listeners; connections already accepted carry on.
    pub fn stop_accepting(&self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(dns) = &self.dns {
            dns.stop();
        }
    }

    /// Where the workload's DNS proxy listens, if it has one.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|d| d.addr)
    }
}

impl WorkloadProxy {
    /// Opens `workload`'s listeners and starts serving. Inside the
    /// workload's own namespace they listen on every address, marked and
    /// transparent as capture needs; without one, on the workload's first
    /// address in the agent's namespace.
    pub async fn start(
        ctx: ProxyContext,
        workload: Arc<Workload>,
        sockets: Sockets,
    ) -> std::io::Result<Self> {
        let ip = workload.addresses.first().copied().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "workload has no address")
        })?;
        let s = &ctx.settings;
        let (ip, opts) = match sockets {
            // Dual stack: the workload's IPv6 and IPv4 connections alike.
            Sockets::Netns(_) => (
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                ListenOpts {
                    transparent: true,
                    mark: s.socket_mark,
                    keepalive: s.keepalive,
                },
            ),
            Sockets::Host => (
                ip,
                ListenOpts {
                    keepalive: s.keepalive,
                    ..Default::default()
                },
            ),
        };
        let outbound = listen(&sockets, ip, s.outbound_port, opts).await?;
        let inbound_plain = listen(&sockets, ip, s.inbound_plaintext_port, opts).await?;
        let hbone = listen(&sockets, ip, s.hbone_port, opts).await?;
        let addrs = ListenerAddrs {
            outbound: outbound.local_addr()?,
            inbound_plaintext: inbound_plain.local_addr()?,
            hbone: hbone.local_addr()?,
        };
        let dns = match &s.dns {
            Some(d) => Some(
                crate::dns::DnsServer::start(
                    ctx.state.clone(),
                    workload.clone(),
                    sockets.clone(),
                    d,
                    s.socket_mark,
                    ctx.reporter.metrics().dns().clone(),
                )
                .await?,
            ),
            None => None,
        };
        // The workload's identity is here, once, rather than on each of
        // its connections' spans: a span's fields are kept formatted for
        // its whole life, and idle connections are many.
        let span = tracing::info_span!("workload", uid = %workload.uid, id = %workload.identity());
        info!(parent: &span, ?addrs, "listening");
        // One budget for the workload's connections in and out.
        let budget = limits::Budget::new(s.limits);
        let ob = Arc::new(Outbound::new(
            ctx.clone(),
            workload.clone(),
            sockets.clone(),
            budget.clone(),
        ));
        let ib = Arc::new(Inbound::new(
            ctx.clone(),
            workload.clone(),
            sockets.clone(),
            budget.clone(),
        ));
        let ip = Arc::new(InboundPassthrough::new(
            ctx.clone(),
            workload.clone(),
            sockets,
            budget,
        ));
        let tasks = vec![
            tokio::spawn(
                accept_loop(outbound, ob, ctx.active.clone(), "outbound").instrument(span.clone()),
            ),
            tokio::spawn(
                accept_loop(hbone, ib, ctx.active.clone(), "hbone").instrument(span.clone()),
            ),
            tokio::spawn(
                accept_loop(inbound_plain, ip, ctx.active.clone(), "inbound_plaintext")
                    .instrument(span),
            ),
        ];
        Ok(WorkloadProxy { addrs, tasks, dns })
    }
}

/// A listener on `ip:port`; `[::]` becomes `0.0.0.0` on a kernel built
/// without IPv6, where no IPv6 socket can be made (a namespace with IPv6
/// disabled still takes `[::]`, and serves its IPv4 through it).
async fn listen(
    sockets: &Sockets,
    ip: IpAddr,
    port: u16,
    opts: ListenOpts,
) -> std::io::Result<TcpListener> {
    match sockets.listen(SocketAddr::new(ip, port), opts).await {
        Err(e)
            if ip == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            info!(port, "no IPv6 in this kernel; listening on IPv4 only");
            sockets
                .listen(
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    opts,
                )
                .await
        }
        other => other,
    }
}

/// Applies the L4 policies of the current mesh to a connection for
/// `workload`; logs dry-run matches and denials.
fn authorize(
    ctx: &ProxyContext,
    workload: &Workload,
    conn: &authz::Connection<'_>,
) -> authz::Decision {
    let snap = ctx.state.snapshot();
    let (decision, dry_run) = authz::authorize(snap.policies(), workload, conn);
    for p in dry_run {
        let deny = p.action == crate::state::PolicyAction::Deny;
        info!(policy = %p.key(), action = ?p.action, src = %conn.src_ip,
            "dry-run policy matched (not enforced)");
        ctx.reporter.metrics().dry_run_matched(p.key(), deny);
    }
    if let authz::Decision::Deny(why) = &decision {
        warn!(src = %conn.src_ip, dst = %conn.dst, src_id = ?conn.src_identity.map(|i| i.to_string()), reason = %why, "connection denied by policy");
    }
    decision
}

/// Whether `dst` is the listener `stream` was accepted on: what the
/// original destination looks like when nothing redirected the connection.
/// Following it would connect the proxy to itself forever.
fn addressed_to_listener(stream: &TcpStream, dst: SocketAddr, listener_port: u16) -> bool {
    dst.port() == listener_port && stream.local_addr().ok().map(canonical) == Some(dst)
}

/// Connects to a local application on behalf of `client`: as `client`
/// itself where the namespace routes replies back to us, else plainly.
async fn connect_app(
    ctx: &ProxyContext,
    sockets: &Sockets,
    target: SocketAddr,
    client: IpAddr,
) -> std::io::Result<TcpStream> {
    let opts = ConnectOpts {
        bind: sockets
            .preserves_source()
            .then_some(SocketAddr::new(client, 0)),
        transparent: true,
        mark: ctx.settings.socket_mark,
        keepalive: ctx.settings.keepalive,
    };
    tokio::time::timeout(ctx.settings.connect_timeout, sockets.connect(target, opts))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Something that serves accepted connections.
pub trait Accept: Send + Sync + 'static {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send;
}

/// Connections being served, so a drain knows when the last one is done,
/// and the agent can cut those left when it stops.
#[derive(Debug)]
pub struct Active {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    terminate: watch::Sender<bool>,
}

impl Default for Active {
    fn default() -> Self {
        Active {
            count: Default::default(),
            idle: Default::default(),
            terminate: watch::Sender::new(false),
        }
    }
}

/// Counts one connection while it lives.
struct ActiveGuard(Arc<Active>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl Active {
    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes every connection still being served.
    pub fn terminate(&self) {
        self.terminate.send_replace(true);
    }

    /// Resolves once no connection is being served.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

async fn accept_loop<A: Accept>(
    listener: TcpListener,
    handler: Arc<A>,
    active: Arc<Active>,
    name: &'static str,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let peer = canonical(peer);
                let _ = stream.set_nodelay(true);
                let guard = active.enter();
                let handler = handler.clone();
                let mut terminated = active.terminate.subscribe();
                tokio::spawn(
                    async move {
                        // The serve future is made here, not captured: a
                        // captured future is stored twice in the task (as
                        // capture and as select operand), doubling the
                        // memory every open connection holds. Dropping it
                        // closes its sockets.
                        tokio::select! {
                            _ = handler.serve(stream, peer) => {}
                            _ = terminated.wait_for(|t| *t) => {}
                        }
                        drop(guard);
                    }
                    .in_current_span(),
                );
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
