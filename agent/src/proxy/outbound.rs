//! Outbound: a connection a local workload made, captured on 15001, sent to
//! its destination over HBONE (mesh) or plain TCP (outside the mesh).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::{info, warn, Instrument};

use super::record::{ConnectionRecord, Direction};
use super::{addressed_to_listener, orig_dst::original_dst, Accept, ProxyContext};
use crate::hbone::{self, PoolKey};
use crate::socket::{ConnectOpts, Sockets};
use crate::state::{Route, Workload};

/// The outbound proxy of one local workload (the source of its traffic).
pub struct Outbound {
    ctx: ProxyContext,
    source: Arc<Workload>,
    sockets: Sockets,
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
    pub fn new(ctx: ProxyContext, source: Arc<Workload>, sockets: Sockets) -> Self {
        Outbound {
            ctx,
            source,
            sockets,
        }
    }

    /// Carries `stream` (from `peer`, originally for `dst`) to `dst`.
    pub async fn proxy(&self, stream: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        let route = self.ctx.state.snapshot().route_from(
            Some(&self.source),
            dst,
            self.ctx.settings.hbone_port,
        );
        let src_identity = self.source.identity();
        let span = tracing::info_span!("outbound", src = %peer, %dst, src_id = %src_identity);
        async move {
            let start = Instant::now();
            let result = self.forward(stream, peer, &route).await;
            let duration = start.elapsed();
            let (target, dst_identity, encrypted) = match &route {
                Route::Hbone { target, identities, .. } => (*target, identities.first().cloned(), true),
                Route::Passthrough { target, .. } => (*target, None, false),
                Route::Unreachable(_) => (dst, None, false),
            };
            let (sent, received, error) = match result {
                Ok((s, r)) => (s, r, None),
                Err(e) => (0, 0, Some(e.to_string())),
            };
            let elapsed_ms = duration.as_millis() as u64;
            match &error {
                None => info!(%target, dst_id = ?dst_identity.as_ref().map(|i| i.to_string()), encrypted, sent, received, elapsed_ms, "connection complete"),
                Some(e) => warn!(%target, error = %e, elapsed_ms, "connection failed"),
            }
            self.ctx.report(ConnectionRecord {
                direction: Direction::Outbound,
                src: peer.ip(),
                dst: target,
                src_identity: Some(src_identity),
                dst_identity,
                sent,
                received,
                encrypted,
                duration,
                error,
            });
        }
        .instrument(span)
        .await
    }

    async fn forward(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        route: &Route,
    ) -> Result<(u64, u64), OutboundError> {
        match route {
            Route::Unreachable(why) => Err(OutboundError::Unreachable(why.clone())),
            Route::Passthrough { target, .. } => {
                let opts = ConnectOpts {
                    mark: self.ctx.settings.socket_mark,
                    ..Default::default()
                };
                let mut upstream = self
                    .sockets
                    .connect(*target, opts)
                    .await
                    .map_err(|e| OutboundError::Connect(*target, e))?;
                let mut stream = stream;
                tokio::io::copy_bidirectional(&mut stream, &mut upstream)
                    .await
                    .map_err(OutboundError::Io)
            }
            Route::Hbone {
                gateway,
                target,
                identities,
                ..
            } => {
                let w = &self.source;
                let key = PoolKey {
                    src_identity: self.source.identity(),
                    dst_identity: identities[0].clone(),
                    dst: *gateway,
                    src_ip: self.source.addresses.first().copied(),
                };
                let request = hbone::connect_request(*target, peer.ip(), &hbone::baggage(w))
                    .map_err(|e| OutboundError::Request(e.to_string()))?;
                let tunnel = self
                    .ctx
                    .pool
                    .connect(&key, identities, request, &self.sockets)
                    .await?;
                let t = hbone::copy_bidirectional(tunnel, stream)
                    .await
                    .map_err(OutboundError::Io)?;
                Ok((t.to_stream, t.from_stream))
            }
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
    #[error("copying: {0}")]
    Io(#[source] std::io::Error),
}
