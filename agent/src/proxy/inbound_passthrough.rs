//! Inbound plaintext (15006): a connection to a local workload that did not
//! come through HBONE (a client outside the mesh). No peer identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::warn;

use super::limits::Budget;
use super::record::Direction;
use super::{
    addressed_to_listener, authorize, connect_app, orig_dst::original_dst, Accept, ProxyContext,
};
use crate::copy::copy_tcp;
use crate::identity::Identity;
use crate::socket::Sockets;
use crate::state::authz;
use crate::state::Workload;

pub struct InboundPassthrough {
    ctx: ProxyContext,
    workload: Arc<Workload>,
    /// `workload`'s identity, made once: each connection shares it.
    identity: Identity,
    sockets: Sockets,
    budget: Arc<Budget>,
}

impl InboundPassthrough {
    pub fn new(
        ctx: ProxyContext,
        workload: Arc<Workload>,
        sockets: Sockets,
        budget: Arc<Budget>,
    ) -> Self {
        InboundPassthrough {
            ctx,
            identity: workload.identity(),
            workload,
            sockets,
            budget,
        }
    }
}

impl Accept for InboundPassthrough {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let dst = match original_dst(&stream) {
            Ok(d) => d,
            Err(e) => return warn!(%peer, error = %e, "no original destination; closing"),
        };
        let record = self
            .ctx
            .reporter
            .start(
                Direction::InboundPlaintext,
                peer.ip(),
                Some(peer.port()),
                dst,
            )
            .dst_identity(Some(self.identity.clone()));
        // Held until the connection ends.
        let slot = match self.budget.connection() {
            Ok(slot) => slot,
            Err(over) => {
                warn!(%peer, %dst, "{over}; closing");
                return record.finish(Err(over));
            }
        };
        let own = addressed_to_listener(&stream, dst, self.ctx.settings.inbound_plaintext_port);
        if own || self.ctx.settings.reserved_ports.contains(dst.port()) {
            warn!(%peer, %dst, "plaintext connection to a port the agent serves; closing");
            return record.finish(Err("target port is reserved by the agent"));
        }
        if !self.ctx.state.snapshot().knows(&self.workload) {
            warn!(%peer, %dst, "workload not (yet) in the mesh; closing");
            return record.finish(Err("workload not (yet) known to the control plane"));
        }
        if !self.workload.addresses.contains(&dst.ip()) {
            warn!(%peer, %dst, "plaintext connection not addressed to this workload; closing");
            return record.finish(Err("not addressed to this workload"));
        }
        if !self
            .ctx
            .state
            .snapshot()
            .waypoint_identities(&self.workload)
            .is_empty()
        {
            warn!(%peer, %dst, "plaintext connection to a workload behind a waypoint; closing");
            return record.deny("plaintext connection to a workload behind a waypoint");
        }
        let conn = authz::Connection {
            src_ip: peer.ip(),
            src_identity: None,
            dst,
            request: None,
        };
        if let authz::Decision::Deny(why) = authorize(&self.ctx, &self.workload, &conn) {
            return record.deny(why);
        }
        let registration = self.ctx.tracker.register(self.workload.clone(), &conn);
        let upstream = match connect_app(&self.ctx, &self.sockets, dst, peer.ip()).await {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, %dst, error = %e, "target unreachable");
                return record.finish(Err(format!("target unreachable: {e}")));
            }
        };
        let mut record = record;
        record.opened();
        let ended = tokio::select! {
            r = copy_tcp(stream, upstream) => Some(r),
            _ = registration.revoked() => None,
        };
        // The place is free before the record says the connection ended
        // (whoever reads the record may open the next one at once).
        drop(slot);
        match ended {
            Some(Ok((sent, received))) => record.copied(sent, received, None::<&str>),
            Some(Err(e)) => record.copied(e.moved.0, e.moved.1, Some(e.error)),
            None => record.deny("closed: policy changed"),
        }
    }
}
