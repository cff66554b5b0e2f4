//! Outbound: a connection a local workload made, captured on 15001, sent to
//! its destination over HBONE (mesh) or plain TCP (outside the mesh).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn, Instrument};

use super::limits::{Budget, Overloaded};
use super::record::{Connection, Direction};
use super::{addressed_to_listener, orig_dst::original_dst, Accept, ProxyContext};
use crate::copy::{copy_tcp, CopyError};
use crate::hbone::{self, Authority, PoolKey};
use crate::identity::Identity;
use crate::socket::{ConnectOpts, Sockets};
use crate::state::{pick_found, Route, Service, Workload};

/// The outbound proxy of one local workload (the source of its traffic).
pub struct Outbound {
    ctx: ProxyContext,
    source: Arc<Workload>,
    /// `source`'s identity, made once: each connection shares it.
    source_identity: Identity,
    sockets: Sockets,
    budget: Arc<Budget>,
}

impl Accept for Outbound {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let dst = match original_dst(&stream) {
            Ok(d) => d,
            Err(e) => {
                warn!(%peer, error = %e, "no original destination; closing");
                return;
            }
        };
        if addressed_to_listener(&stream, dst, self.ctx.settings.outbound_port) {
            warn!(%peer, %dst, "connection addressed to the outbound listener itself; closing");
            return;
        }
        self.proxy(stream, peer, dst).await;
    }
}

impl Outbound {
    pub fn new(
        ctx: ProxyContext,
        source: Arc<Workload>,
        sockets: Sockets,
        budget: Arc<Budget>,
    ) -> Self {
        Outbound {
            ctx,
            source_identity: source.identity(),
            source,
            sockets,
            budget,
        }
    }

    /// Carries `stream` (from `peer`, originally for `dst`) to `dst`.
    ///
    /// Not an `async fn`: the route and record are made before the future,
    /// which then holds one copy of them; an `async fn` moving its locals
    /// into an inner future holds two for the connection's whole life.
    pub fn proxy(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        dst: SocketAddr,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let route = self.ctx.state.snapshot().route_from(
            Some(&self.source),
            dst,
            self.ctx.settings.hbone_port,
        );
        // The source's identity is on the enclosing `workload` span.
        let span = tracing::info_span!("outbound", src = %peer, %dst);
        let (target, dst_identity, service) = match &route {
            Route::Hbone {
                target,
                identities,
                service,
                ..
            } => (*target, identities.first().cloned(), service.as_ref()),
            Route::Passthrough {
                target, service, ..
            } => (*target, None, service.as_ref()),
            // Recorded as ztunnel does: to the gateway, for the service.
            Route::DoubleHbone {
                gateway,
                identities,
                service,
                ..
            } => (*gateway, identities.first().cloned(), Some(service)),
            Route::Lookup { service, .. } => (dst, None, service.as_ref()),
            Route::Unreachable(_) => (dst, None, None),
        };
        // Encrypted only once the mTLS tunnel is up: a failed handshake is
        // not `mutual_tls`.
        let mut conn = self
            .ctx
            .reporter
            .start(Direction::Outbound, peer.ip(), Some(peer.port()), target)
            .src_identity(Some(self.source_identity.clone()))
            .dst_identity(dst_identity)
            .service(service.cloned());
        // Setup is boxed, and made out here so the future below does not
        // capture its inputs: its state (the route, connect, TLS and HTTP/2
        // handshakes) is large and needed only until the ends are joined,
        // while the future below lives as long as the connection.
        let slot = self.budget.connection();
        let establish = Box::pin(async move {
            let ends = match &slot {
                Ok(_) => self.establish(stream, peer, &route, &mut conn).await,
                Err(over) => Err(OutboundError::Overloaded(*over)),
            };
            (conn, slot, ends)
        });
        async move {
            match establish.await {
                // The slot is held until the connection ends, and freed
                // before the record says so (whoever reads the record may
                // open the next connection at once).
                (conn, slot, Ok(ends)) => {
                    let copied = ends.copy().await;
                    drop(slot);
                    match copied {
                        Ok((sent, received)) => conn.copied(sent, received, None::<&str>),
                        Err(e) => conn.copied(e.moved.0, e.moved.1, Some(e.error)),
                    }
                }
                (conn, slot, Err(e)) => {
                    drop(slot);
                    if let OutboundError::Overloaded(_) = e {
                        warn!("{e}; closing");
                    }
                    conn.finish(Err(e))
                }
            }
        }
        .instrument(span)
    }

    /// Connects the upstream end for `stream`.
    async fn establish(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        route: &Route,
        conn: &mut Connection,
    ) -> Result<Ends, OutboundError> {
        match route {
            Route::Unreachable(why) => Err(OutboundError::Unreachable(why.clone())),
            Route::Lookup {
                hostname,
                port,
                dialed,
                workload,
                service,
            } => {
                let found = self
                    .ctx
                    .resolver
                    .lookup(hostname)
                    .await
                    .map_err(|e| OutboundError::Unreachable(e.to_string()))?;
                let ip = pick_found(&found, *dialed)
                    .ok_or_else(|| OutboundError::Unreachable(format!("{hostname}: no address")))?;
                let route = Route::to_address(
                    workload.clone(),
                    SocketAddr::new(ip, *port),
                    service.clone(),
                    self.ctx.settings.hbone_port,
                );
                debug!(%hostname, %ip, "looked up");
                // Once: an address never routes to another lookup.
                match route {
                    Route::Lookup { .. } => Err(OutboundError::Unreachable(format!(
                        "{hostname} looked up to itself"
                    ))),
                    route => Box::pin(self.establish(stream, peer, &route, conn)).await,
                }
            }
            Route::Passthrough { target, .. } => {
                let opts = ConnectOpts {
                    mark: self.ctx.settings.socket_mark,
                    keepalive: self.ctx.settings.keepalive,
                    ..Default::default()
                };
                let upstream = self
                    .sockets
                    .connect(*target, opts)
                    .await
                    .map_err(|e| OutboundError::Connect(*target, e))?;
                conn.opened();
                Ok(Ends::Plain(stream, upstream))
            }
            Route::Hbone {
                gateway,
                target,
                identities,
                ..
            } => {
                let request =
                    hbone::connect_request(*target, peer.ip(), &hbone::baggage(&self.source))
                        .map_err(|e| OutboundError::Request(e.to_string()))?;
                let key = self.pool_key(*gateway, &identities[0]);
                let opened = self
                    .ctx
                    .pool
                    .connect(&key, identities, request, &self.sockets)
                    .await;
                joined(conn, opened, stream)
            }
            Route::DoubleHbone {
                gateway,
                gateway_identities,
                port,
                identities,
                service,
                ..
            } => {
                let outer = (*gateway, gateway_identities.as_slice());
                let opened = self
                    .double_hbone(peer, outer, *port, identities, service)
                    .await;
                joined(conn, opened, stream)
            }
        }
    }

    /// The pool key of tunnels from the source to `dst`, whose peer proves
    /// `dst_identity`: from the source's address of `dst`'s family.
    fn pool_key(&self, dst: SocketAddr, dst_identity: &Identity) -> PoolKey {
        PoolKey {
            src_identity: self.source_identity.clone(),
            dst_identity: dst_identity.clone(),
            dst,
            src_ip: self
                .source
                .addresses
                .iter()
                .find(|a| a.is_ipv4() == dst.is_ipv4())
                .copied(),
        }
    }

    /// Double HBONE: the outer tunnel to the gateway (pooled like any
    /// HBONE connection) asking for the service by name, and the inner one
    /// inside it, end to end with the destination (ztunnel's
    /// `proxy_to_double_hbone`: the same authority both times; the inner
    /// request names the client's network).
    async fn double_hbone(
        &self,
        peer: SocketAddr,
        (gateway, gateway_identities): (SocketAddr, &[Identity]),
        port: u16,
        identities: &[Identity],
        service: &Service,
    ) -> Result<hbone::H2Stream, hbone::PoolError> {
        let w = &self.source;
        let authority = Authority::Service {
            hostname: service.hostname.to_string(),
            port,
        };
        let baggage = hbone::baggage(w);
        let host = Some(&*service.hostname);
        let request = |network| {
            hbone::connect_request_to(&authority, peer.ip(), &baggage, host, network)
                .map_err(|e| hbone::PoolError::Request(e.to_string()))
        };
        let key = self.pool_key(gateway, &gateway_identities[0]);
        let outer = self
            .ctx
            .pool
            .connect(&key, gateway_identities, request(None)?, &self.sockets)
            .await?;
        let tls = self
            .ctx
            .pool
            .tls_config(&self.source_identity, identities)
            .await?;
        let inner = request(Some(w.network_name()))?;
        hbone::double::connect_inner(outer, tls, inner, self.ctx.settings.h2).await
    }
}

/// The ends of a connection whose tunnel `opened` (or not): encrypted
/// from here, or already when the peer refused it over mutual TLS.
fn joined(
    conn: &mut Connection,
    opened: Result<hbone::H2Stream, hbone::PoolError>,
    stream: TcpStream,
) -> Result<Ends, OutboundError> {
    if let Err(hbone::PoolError::Status(_)) | Ok(_) = &opened {
        conn.encrypted_now();
    }
    let tunnel = opened?;
    conn.opened();
    Ok(Ends::Hbone(tunnel, stream))
}

/// A connection's two established ends, to be joined.
enum Ends {
    Plain(TcpStream, TcpStream),
    Hbone(hbone::H2Stream, TcpStream),
}

impl Ends {
    /// Copies until both directions end: (client -> upstream, back),
    /// which an error carries too.
    async fn copy(self) -> Result<(u64, u64), CopyError<(u64, u64)>> {
        let both = |t: hbone::Transferred| (t.to_stream, t.from_stream);
        match self {
            Ends::Plain(client, upstream) => copy_tcp(client, upstream).await,
            Ends::Hbone(tunnel, client) => hbone::copy_bidirectional(tunnel, client)
                .await
                .map(both)
                .map_err(|e| CopyError {
                    error: e.error,
                    moved: both(e.moved),
                }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum OutboundError {
    #[error("destination unreachable: {0}")]
    Unreachable(String),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("building CONNECT request: {0}")]
    Request(String),
    #[error(transparent)]
    Hbone(#[from] hbone::PoolError),
    #[error(transparent)]
    Overloaded(Overloaded),
}
