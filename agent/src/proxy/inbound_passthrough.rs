//! Inbound plaintext (15006): a connection to a local workload that did not
//! come through HBONE (a client outside the mesh). No peer identity.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{orig_dst::original_dst, Accept, ProxyContext};
use crate::hbone;
use crate::state::Workload;

pub struct InboundPassthrough {
    ctx: ProxyContext,
    workload: Arc<Workload>,
}

impl InboundPassthrough {
    pub fn new(ctx: ProxyContext, workload: Arc<Workload>) -> Self {
        InboundPassthrough { ctx, workload }
    }
}

impl Accept for InboundPassthrough {
    async fn serve(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        let dst = match original_dst(&stream) {
            Ok(d) => d,
            Err(e) => return warn!(%peer, error = %e, "no original destination; closing"),
        };
        let own = stream.local_addr().ok() == Some(dst);
        if own || !self.workload.addresses.contains(&dst.ip()) {
            return warn!(%peer, %dst, "plaintext connection not addressed to this workload; closing");
        }
        let upstream = hbone::pool::connect_tcp(dst, None, self.ctx.settings.socket_mark);
        let mut upstream =
            match tokio::time::timeout(self.ctx.settings.connect_timeout, upstream).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return warn!(%peer, %dst, error = %e, "target unreachable"),
                Err(_) => return warn!(%peer, %dst, "target connect timed out"),
            };
        match tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
            Ok((up, down)) => {
                info!(src = %peer, %dst, received = up, sent = down, "plaintext connection complete")
            }
            Err(e) => warn!(src = %peer, %dst, error = %e, "plaintext connection failed"),
        }
    }
}
