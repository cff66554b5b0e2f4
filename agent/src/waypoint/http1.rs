//! The waypoint's L7 layer: HTTP/1.1 inside each accepted tunnel. Every
//! request is decided on its own (deny, or which workload) and forwarded
//! over its own HBONE stream, so one client connection can be spread
//! across a service's subsets by weight.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn, Instrument};

use super::{RequestRecord, Shared};
use crate::hbone::server::{ConnectRequest, Handler, Responder};
use crate::hbone::{self, Authority, PoolKey};
use crate::identity::Identity;
use crate::socket::ConnectOpts;
use crate::state::{
    authz, pick_address, Destination, IpFamilies, L7Decision, Route, Snapshot, Workload,
};

type Body = BoxBody<Bytes, hyper::Error>;

/// Buffer between an HBONE stream and the HTTP/1.1 codec.
const BRIDGE_BUF: usize = 64 * 1024;

/// The waypoint's answer to each CONNECT.
pub(super) struct L7(pub Arc<Shared>);

/// Who opened a tunnel, and for what.
struct Tunnel {
    src: IpAddr,
    src_identity: Identity,
    target: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("building the CONNECT request: {0}")]
    Request(#[from] http::Error),
    #[error(transparent)]
    Pool(#[from] hbone::PoolError),
    #[error("connecting: {0}")]
    Connect(#[from] std::io::Error),
    #[error("HTTP/1.1 to the backend: {0}")]
    Http(#[from] hyper::Error),
}

impl Handler for L7 {
    async fn handle(self: Arc<Self>, req: ConnectRequest, responder: Responder) {
        let shared = self.0.clone();
        // The client's agent connects from the client's own address; its
        // `Forwarded` is a claim this waypoint has no reason to believe.
        let src = req.peer_addr.ip();
        let span = tracing::info_span!("waypoint_tunnel", %src, src_id = %req.peer_identity, target = %req.target);
        async move {
            let Authority::Addr(target) = req.target else {
                warn!("a waypoint is asked for an address, not a hostname; 400");
                return responder.refuse(StatusCode::BAD_REQUEST);
            };
            let snap = shared.state.snapshot();
            if matches!(snap.destination(target), Destination::Unknown) {
                warn!("target is neither a service nor a workload of the mesh; 400");
                return responder.refuse(StatusCode::BAD_REQUEST);
            }
            // Policies that select the waypoint itself apply at L4 first.
            let conn = authz::Connection {
                src_ip: src,
                src_identity: Some(&req.peer_identity),
                dst: target,
            };
            if let (authz::Decision::Deny(why), _) =
                authz::authorize(snap.policies(), &shared.workload, &conn)
            {
                warn!(reason = %why, "tunnel denied by policy; 401");
                return responder.refuse(StatusCode::UNAUTHORIZED);
            }
            let stream = match responder.accept() {
                Ok(s) => s,
                Err(e) => return debug!(error = %e, "client went away"),
            };
            let (ours, theirs) = tokio::io::duplex(BRIDGE_BUF);
            let copy = tokio::spawn(hbone::copy_bidirectional_io(stream, ours));
            let tunnel = Arc::new(Tunnel {
                src,
                src_identity: req.peer_identity.clone(),
                target,
            });
            let service = service_fn(move |r| {
                let (shared, tunnel) = (shared.clone(), tunnel.clone());
                async move { Ok::<_, Infallible>(shared.request(&tunnel, r).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(theirs), service)
                .await
            {
                debug!(error = %e, "HTTP/1.1 connection ended with an error");
            }
            let _ = copy.await;
        }
        .instrument(span)
        .await
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

impl Shared {
    /// Decides and serves one request; logs it and records it.
    async fn request(&self, t: &Tunnel, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let snap = self.state.snapshot();
        let (decision, port) = match snap.destination(t.target) {
            Destination::Service(s) => (
                snap.route_request(&s, t.target.ip(), &parts),
                s.target_port(t.target.port()),
            ),
            Destination::Workload(w) => (L7Decision::Forward(w), Some(t.target.port())),
            Destination::Unknown => (L7Decision::NoBackend, None),
        };
        let mut record = RequestRecord {
            src: t.src,
            src_identity: t.src_identity.clone(),
            target: t.target,
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            backend: None,
            status: 0,
            reason: None,
        };
        let response = match (decision, port) {
            (L7Decision::Deny { rule }, _) => {
                record.reason = Some(format!("denied by {rule}"));
                text(StatusCode::FORBIDDEN, "RBAC: access denied\n")
            }
            (L7Decision::Forward(w), Some(port)) => {
                record.backend = Some(w.uid.to_string());
                match self
                    .forward(&snap, &w, port, t, Request::from_parts(parts, body))
                    .await
                {
                    Ok(r) => r.map(BodyExt::boxed),
                    Err(e) => {
                        record.reason = Some(e.to_string());
                        text(StatusCode::BAD_GATEWAY, "upstream connect error\n")
                    }
                }
            }
            _ => {
                record.reason = Some("no healthy backend".into());
                text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
            }
        };
        record.status = response.status().as_u16();
        info!(
            method = %record.method,
            path = %record.path,
            backend = record.backend.as_deref().unwrap_or("-"),
            status = record.status,
            reason = record.reason.as_deref().unwrap_or("-"),
            "request"
        );
        let _ = self.records.send(Arc::new(record));
        response
    }

    /// Sends `req` to workload `w` on `port`, over HBONE when it is in the
    /// mesh (as the waypoint, on behalf of the tunnel's client).
    async fn forward(
        &self,
        snap: &Snapshot,
        w: &Workload,
        port: u16,
        t: &Tunnel,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let ip = pick_address(w, t.target.ip(), IpFamilies::Automatic)
            .ok_or_else(|| ForwardError::Unreachable(format!("{} has no address", w.uid)))?;
        let route = snap.route_from(
            Some(&self.workload),
            SocketAddr::new(ip, port),
            self.cfg.peer_hbone_port,
        );
        let io: Box<dyn Io> = match route {
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
                    hbone::connect_request(target, t.src, &hbone::baggage(&self.workload))?;
                let stream = self
                    .pool
                    .connect(&key, &identities, request, &self.sockets)
                    .await?;
                let (ours, theirs) = tokio::io::duplex(BRIDGE_BUF);
                tokio::spawn(hbone::copy_bidirectional_io(stream, ours));
                Box::new(theirs)
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
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "backend connection ended with an error");
            }
        });
        Ok(send.send_request(req).await?)
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
