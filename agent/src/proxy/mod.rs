//! The proxies a workload's traffic passes through: outbound capture
//! (15001), inbound HBONE (15008) and inbound plaintext (15006).
//!
//! A [`WorkloadProxy`] owns the three listeners of one local workload; the
//! capture layer decides how connections reach them.

mod inbound;
mod inbound_passthrough;
pub mod orig_dst;
mod outbound;

pub use inbound::Inbound;
pub use inbound_passthrough::InboundPassthrough;
pub use outbound::Outbound;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{info, warn, Instrument};

use crate::hbone::{H2Settings, Pool};
use crate::identity::CertManager;
use crate::state::{State, Workload};

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
    pub h2: H2Settings,
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
}

impl Drop for WorkloadProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl WorkloadProxy {
    /// Binds `workload`'s listeners on its first address in the current
    /// network namespace and starts serving.
    pub async fn start(ctx: ProxyContext, workload: Arc<Workload>) -> std::io::Result<Self> {
        let ip = workload.addresses.first().copied().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "workload has no address")
        })?;
        let s = &ctx.settings;
        let outbound = bind(SocketAddr::new(ip, s.outbound_port))?;
        let inbound_plain = bind(SocketAddr::new(ip, s.inbound_plaintext_port))?;
        let hbone = bind(SocketAddr::new(ip, s.hbone_port))?;
        let addrs = ListenerAddrs {
            outbound: outbound.local_addr()?,
            inbound_plaintext: inbound_plain.local_addr()?,
            hbone: hbone.local_addr()?,
        };
        let span = tracing::info_span!("workload", uid = %workload.uid);
        info!(parent: &span, ?addrs, "listening");
        let ob = Arc::new(Outbound::new(ctx.clone(), workload.clone()));
        let ib = Arc::new(Inbound::new(ctx.clone(), workload.clone()));
        let ip = Arc::new(InboundPassthrough::new(ctx.clone(), workload.clone()));
        let tasks = vec![
            tokio::spawn(accept_loop(outbound, ob, "outbound").instrument(span.clone())),
            tokio::spawn(accept_loop(hbone, ib, "hbone").instrument(span.clone())),
            tokio::spawn(accept_loop(inbound_plain, ip, "inbound_plaintext").instrument(span)),
        ];
        Ok(WorkloadProxy { addrs, tasks })
    }
}

/// A listening socket that accepts connections for another address when
/// capture hands them over: reuse the address across quick restarts.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Something that serves accepted connections.
pub trait Accept: Send + Sync + 'static {
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send;
}

async fn accept_loop<A: Accept>(listener: TcpListener, handler: Arc<A>, name: &'static str) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handler.clone().serve(stream, peer).in_current_span());
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
