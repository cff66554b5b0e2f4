//! One outer CONNECT at the gateway: checked, resolved to a local
//! endpoint, and spliced to that endpoint's HBONE port unopened.

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{info, warn, Instrument};

use super::{GatewayConfig, StreamRecord};
use crate::hbone::server::{ConnectRequest, Handler, Responder};
use crate::hbone::{self, Authority};
use crate::socket::{ConnectOpts, Sockets};
use crate::state::{authz, pick_address, Reach, State, TunnelProtocol, Workload};

/// The gateway's answer to each CONNECT.
pub(super) struct Splice {
    pub state: Arc<State>,
    /// The gateway itself: its network, its place, the policies on it.
    pub workload: Arc<Workload>,
    pub sockets: Sockets,
    pub cfg: GatewayConfig,
    pub records: tokio::sync::broadcast::Sender<Arc<StreamRecord>>,
}

/// Why a CONNECT is refused, and with which status.
struct Refusal(StatusCode, String);

impl Handler for Splice {
    async fn handle(self: Arc<Self>, req: ConnectRequest, responder: Responder) {
        let span = tracing::info_span!(
            "gateway_stream",
            src = %req.peer_addr,
            src_id = %req.peer_identity,
            authority = %req.target
        );
        async move {
            let mut record = StreamRecord {
                src: req.peer_addr.ip(),
                src_identity: req.peer_identity.clone(),
                authority: req.target.to_string(),
                endpoint: None,
                upstream: None,
                status: 200,
                reason: None,
                sent: 0,
                received: 0,
            };
            match self.open(&req, &mut record).await {
                Err(Refusal(status, why)) => {
                    warn!(%status, "{why}");
                    responder.refuse(status);
                    record.status = status.as_u16();
                    record.reason = Some(why);
                }
                Ok(upstream) => match responder.accept() {
                    Err(e) => record.reason = Some(format!("client went away: {e}")),
                    Ok(stream) => {
                        let (moved, error) = match hbone::copy_bidirectional(stream, upstream).await
                        {
                            Ok(t) => (t, None),
                            Err(e) => (e.moved, Some(e.error.to_string())),
                        };
                        record.sent = moved.from_stream;
                        record.received = moved.to_stream;
                        record.reason = error;
                        info!(
                            endpoint = record.endpoint.as_deref(),
                            sent = record.sent,
                            received = record.received,
                            error = record.reason.as_deref(),
                            "stream spliced"
                        );
                    }
                },
            }
            let _ = self.records.send(Arc::new(record));
        }
        .instrument(span)
        .await
    }
}

impl Splice {
    /// Admits `req` and connects its endpoint: the outer peer must pass
    /// the gateway's policies, the authority must name a service port
    /// (ztunnel's client always sends the service's hostname to a
    /// gateway), and an endpoint on this network must take HBONE.
    async fn open(
        &self,
        req: &ConnectRequest,
        record: &mut StreamRecord,
    ) -> Result<TcpStream, Refusal> {
        let bad = |why: String| Refusal(StatusCode::BAD_REQUEST, why);
        let unavailable = |why: String| Refusal(StatusCode::SERVICE_UNAVAILABLE, why);
        let Authority::Service { hostname, port } = &req.target else {
            return Err(bad(
                "a gateway routes service hostnames, not addresses".into()
            ));
        };
        let snap = self.state.snapshot();
        let conn = authz::Connection {
            src_ip: req.peer_addr.ip(),
            src_identity: Some(&req.peer_identity),
            dst: req.local_addr,
            request: None,
        };
        if let (authz::Decision::Deny(why), _) =
            authz::authorize(snap.policies(), &self.workload, &conn)
        {
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                format!("denied by policy: {why}"),
            ));
        }
        // A hostname may exist in several namespaces; the one with an
        // endpoint here is meant.
        let services = snap.services_by_hostname(hostname);
        let service = services
            .iter()
            .find(|s| s.target_port(*port).is_some())
            .ok_or_else(|| bad(format!("no service {hostname} with port {port}")))?;
        let local = self.workload.addresses[0];
        let endpoint = snap
            .choose_endpoint(service, local, Some(&self.workload), Reach::Local)
            .ok_or_else(|| {
                unavailable(format!(
                    "service {hostname} has no healthy endpoint on network {:?}",
                    self.workload.network_name()
                ))
            })?;
        record.endpoint = Some(endpoint.uid.to_string());
        if endpoint.protocol != TunnelProtocol::Hbone {
            // The inner bytes are TLS for an HBONE listener: anything
            // else would take them for its own protocol.
            return Err(unavailable(format!(
                "endpoint {} does not take HBONE",
                endpoint.uid
            )));
        }
        let ip = pick_address(&endpoint, local, service.ip_families)
            .ok_or_else(|| unavailable(format!("endpoint {} has no address", endpoint.uid)))?;
        let upstream = SocketAddr::new(ip, self.cfg.peer_hbone_port);
        record.upstream = Some(upstream);
        drop(snap);
        let opts = ConnectOpts {
            mark: self.cfg.socket_mark,
            ..Default::default()
        };
        let connect = self.sockets.connect(upstream, opts);
        match tokio::time::timeout(self.cfg.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(unavailable(format!("connecting to {upstream}: {e}"))),
            Err(_) => Err(unavailable(format!("timed out connecting to {upstream}"))),
        }
    }
}
