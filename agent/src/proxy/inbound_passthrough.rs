//! Inbound plaintext (15006): a connection to a local workload that did not
//! come through HBONE (a client outside the mesh). No peer identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::record::{ConnectionRecord, Direction};
use super::{
    addressed_to_listener, authorize, connect_app, orig_dst::original_dst, Accept, ProxyContext,
};
use crate::socket::Sockets;
use crate::state::authz;
use crate::state::Workload;

pub struct InboundPassthrough {
    ctx: ProxyContext,
    workload: Arc<Workload>,
    sockets: Sockets,
}

impl InboundPassthrough {
    pub fn new(ctx: ProxyContext, workload: Arc<Workload>, sockets: Sockets) -> Self {
        InboundPassthrough {
            ctx,
            workload,
            sockets,
        }
    }
}

impl Accept for InboundPassthrough {
    async fn serve(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let dst = match original_dst(&stream) {
            Ok(d) => d,
            Err(e) => return warn!(%peer, error = %e, "no original destination; closing"),
        };
        let own = addressed_to_listener(&stream, dst, self.ctx.settings.inbound_plaintext_port);
        if own || !self.workload.addresses.contains(&dst.ip()) {
            return warn!(%peer, %dst, "plaintext connection not addressed to this workload; closing");
        }
        if !self
            .ctx
            .state
            .snapshot()
            .waypoint_identities(&self.workload)
            .is_empty()
        {
            return warn!(%peer, %dst, "plaintext connection to a workload behind a waypoint; closing");
        }
        let conn = authz::Connection {
            src_ip: peer.ip(),
            src_identity: None,
            dst,
        };
        if !authorize(&self.ctx, &self.workload, &conn).is_allowed() {
            return;
        }
        let registration = self.ctx.tracker.register(self.workload.clone(), &conn);
        let mut upstream = match connect_app(&self.ctx, &self.sockets, dst, peer.ip()).await {
            Ok(s) => s,
            Err(e) => return warn!(%peer, %dst, error = %e, "target unreachable"),
        };
        let start = std::time::Instant::now();
        let result = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => r,
            _ = registration.revoked() => Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "closed: policy changed",
            )),
        };
        let (sent, received, error) = match result {
            Ok((up, down)) => (up, down, None),
            Err(e) => (0, 0, Some(e.to_string())),
        };
        match &error {
            None => info!(src = %peer, %dst, sent, received, "plaintext connection complete"),
            Some(e) => warn!(src = %peer, %dst, error = %e, "plaintext connection failed"),
        }
        self.ctx.report(ConnectionRecord {
            direction: Direction::InboundPlaintext,
            src: peer.ip(),
            dst,
            src_identity: None,
            dst_identity: Some(self.workload.identity()),
            sent,
            received,
            encrypted: false,
            duration: start.elapsed(),
            error,
        });
    }
}
