//! The waypoint's connections to backends.
//!
//! Each tunnel keeps the backend connections its requests opened, one per
//! (workload address, HTTP version), and reuses them: an HTTP/2 connection
//! carries every concurrent request of the tunnel to that backend, an
//! HTTP/1.1 one the tunnel's next request (a tunnel's HTTP/1.1 requests
//! come one after another). The upstream protocol is the downstream one,
//! as Istio's `USE_DOWNSTREAM_PROTOCOL`: gRPC stays HTTP/2 end to end.
//! A backend in the mesh is reached over HBONE as the waypoint, with the
//! original client's address in `Forwarded`; the HBONE stream is the
//! connection's transport, with no copy in between.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;
use tracing::{debug, Instrument};

use super::Shared;
use crate::hbone::{self, PoolKey, StreamIo};
use crate::socket::ConnectOpts;
use crate::state::Route;

/// A request's body on its way to a backend.
pub(super) type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error(transparent)]
    Pool(#[from] hbone::PoolError),
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("HTTP to the backend: {0}")]
    Http(#[from] hyper::Error),
}

/// One backend connection's request side.
#[derive(Clone)]
enum Sender {
    Http1(Arc<Mutex<http1::SendRequest<Body>>>),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            // Locked means in use, not closed.
            Sender::Http1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// The backend connections of one tunnel.
#[derive(Default)]
pub(super) struct Upstreams {
    conns: std::sync::Mutex<Vec<(SocketAddr, Version, Sender)>>,
}

impl Upstreams {
    /// Sends `req` to `addr` (a workload's address and the service's target
    /// port), reusing this tunnel's connection to it when it is still open.
    pub(super) async fn send(
        &self,
        shared: &Shared,
        client: IpAddr,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let version = match req.version() {
            Version::HTTP_2 => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        let sender = match self.cached(addr, version) {
            Some(s) => s,
            None => {
                let io = shared.connect(client, addr).await?;
                let s = handshake(io, version).await?;
                self.keep(addr, version, s.clone());
                s
            }
        };
        match sender {
            Sender::Http2(mut s) => Ok(s.send_request(req).await?),
            Sender::Http1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
        }
    }

    fn cached(&self, addr: SocketAddr, version: Version) -> Option<Sender> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|(_, _, s)| !s.is_closed());
        conns
            .iter()
            .find(|(a, v, _)| *a == addr && *v == version)
            .map(|(_, _, s)| s.clone())
    }

    fn keep(&self, addr: SocketAddr, version: Version, s: Sender) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|(a, v, _)| !(*a == addr && *v == version));
        conns.push((addr, version, s));
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

async fn handshake(io: Box<dyn Io>, version: Version) -> Result<Sender, ForwardError> {
    let io = TokioIo::new(io);
    if version == Version::HTTP_2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "HTTP/2 backend connection ended with an error");
                }
            }
            .in_current_span(),
        );
        Ok(Sender::Http2(send))
    } else {
        let (send, conn) = http1::handshake(io).await?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "HTTP/1.1 backend connection ended with an error");
                }
            }
            .in_current_span(),
        );
        Ok(Sender::Http1(Arc::new(Mutex::new(send))))
    }
}

impl Shared {
    /// A byte stream to `addr`: over HBONE as the waypoint when the
    /// workload is in the mesh, plain TCP otherwise.
    async fn connect(&self, client: IpAddr, addr: SocketAddr) -> Result<Box<dyn Io>, ForwardError> {
        let snap = self.state.snapshot();
        let route = snap.route_from(Some(&self.workload), addr, self.cfg.peer_hbone_port);
        Ok(match route {
            Route::Hbone {
                gateway,
                target,
                identities,
                ..
            } => {
                let key = PoolKey {
                    src_identity: self.workload.identity(),
                    dst_identity: identities[0].clone(),
                    dst: gateway,
                    src_ip: None,
                };
                let request =
                    hbone::connect_request(target, client, &hbone::baggage(&self.workload))?;
                let stream = self
                    .pool
                    .connect(&key, &identities, request, &self.sockets)
                    .await?;
                Box::new(StreamIo::new(stream))
            }
            Route::Passthrough { target, .. } => {
                Box::new(self.sockets.connect(target, ConnectOpts::default()).await?)
            }
            Route::Unreachable(why) => return Err(ForwardError::Unreachable(why)),
            // A workload address never routes through a network gateway,
            // nor names a workload without one.
            Route::DoubleHbone { .. } | Route::Lookup { .. } => {
                return Err(ForwardError::Unreachable(
                    "on another network or known by name: not from the waypoint".into(),
                ))
            }
        })
    }
}
