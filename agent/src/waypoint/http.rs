//! The waypoint's L7 layer: the HTTP inside each accepted tunnel, HTTP/1.1
//! or HTTP/2 with prior knowledge (h2c, as gRPC clients speak), told apart
//! by the HTTP/2 preface. Every request is decided on its own (deny, or
//! which workload) and forwarded with its body and trailers streamed both
//! ways, so one client connection can be spread across a service's subsets
//! by weight and a gRPC status reaches the client. An HTTP/1.1 upgrade
//! (WebSocket) the backend accepts with 101 becomes a byte stream between
//! the two.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tracing::{debug, info, warn, Instrument};

use super::forward::To;
use super::path;
use super::upstream::{Body, Upstreams};
use super::{RequestRecord, Shared};
use crate::hbone::server::{ConnectRequest, Handler, Responder};
use crate::hbone::{Authority, StreamIo};
use crate::identity::Identity;
use crate::state::{authz, Destination, L7Decision, RequestPolicy};

/// The waypoint's answer to each CONNECT.
pub(super) struct L7(pub Arc<Shared>);

/// Who opened a tunnel, for what, and the backend connections its
/// requests use.
pub(super) struct Tunnel {
    pub src: IpAddr,
    pub src_identity: Identity,
    pub target: SocketAddr,
    pub upstreams: Upstreams,
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
            // Policies that select the waypoint itself: without conditions
            // on requests they decide for the whole tunnel (401); with
            // some, every request is decided on its own (403).
            let conn = authz::Connection {
                src_ip: src,
                src_identity: Some(&req.peer_identity),
                dst: target,
                request: None,
            };
            let per_request = authz::has_request_conditions(snap.policies(), &shared.workload);
            if let (false, (authz::Decision::Deny(why), _)) = (
                per_request,
                authz::authorize(snap.policies(), &shared.workload, &conn),
            ) {
                warn!(reason = %why, "tunnel denied by policy; 401");
                return responder.refuse(StatusCode::UNAUTHORIZED);
            }
            drop(snap);
            let stream = match responder.accept() {
                Ok(s) => s,
                Err(e) => return debug!(error = %e, "client went away"),
            };
            let tunnel = Arc::new(Tunnel {
                src,
                src_identity: req.peer_identity.clone(),
                target,
                upstreams: Upstreams::default(),
            });
            let service = service_fn(move |r| {
                let (shared, tunnel) = (shared.clone(), tunnel.clone());
                async move { Ok::<_, Infallible>(shared.request(&tunnel, r).await) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(StreamIo::new(stream)), service)
                .await
            {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        }
        .instrument(span)
        .await
    }
}

pub(super) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Headers that describe one connection and must not be passed on
/// (RFC 9110 §7.6.1): the fixed ones and those `Connection` names. An
/// upgrade keeps `Connection: upgrade` and `Upgrade`, which the backend
/// has to see.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(n);
    }
    headers.remove(header::PROXY_AUTHORIZATION);
    // `TE: trailers` is how a gRPC client says it takes trailers; any other
    // TE value is this hop's business.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// An HTTP/1.1 request asking to switch protocols.
pub(super) fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The options `Connection` lists, over all its values.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

impl Shared {
    /// Decides and serves one request; logs it and records it.
    async fn request(&self, t: &Tunnel, req: Request<Incoming>) -> Response<Body> {
        let mut record = RequestRecord {
            src: t.src,
            src_identity: t.src_identity.clone(),
            target: t.target,
            protocol: protocol(req.version()),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            backend: None,
            attempts: 0,
            status: 0,
            reason: None,
        };
        let response = self.respond(t, req, &mut record).await;
        record.status = response.status().as_u16();
        info!(
            protocol = record.protocol,
            method = %record.method,
            path = %record.path,
            backend = record.backend.as_deref().unwrap_or("-"),
            attempts = record.attempts,
            status = record.status,
            reason = record.reason.as_deref().unwrap_or("-"),
            "request"
        );
        let _ = self.records.send(Arc::new(record));
        response
    }

    /// The answer to one request; what led to it goes into `record`.
    async fn respond(
        &self,
        t: &Tunnel,
        mut req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        // One canonical path for authorization, routing and the backend.
        match path::normalize_uri(req.uri()) {
            Some(uri) => *req.uri_mut() = uri,
            None => {
                record.reason = Some("the path has no canonical form".into());
                return text(StatusCode::BAD_REQUEST, "bad request path\n");
            }
        }
        record.path = req.uri().path().to_string();
        let snap = self.state.snapshot();
        // Authorization first, then routing (Envoy's RBAC filter comes
        // before the router); policies are read anew for each request.
        let conn = authz::Connection {
            src_ip: t.src,
            src_identity: Some(&t.src_identity),
            dst: t.target,
            request: Some(authz::Request::of(&req)),
        };
        if let authz::Decision::Deny(why) =
            authz::authorize(snap.policies(), &self.workload, &conn).0
        {
            record.reason = Some(why);
            return text(StatusCode::FORBIDDEN, "RBAC: access denied\n");
        }
        let (decision, policy, to) = match snap.destination(t.target) {
            Destination::Service(s) => {
                let outlier = snap.http_route(&s).and_then(|r| r.outlier_detection);
                let ejected = match outlier {
                    Some(_) => self.outliers.ejected(),
                    None => Vec::new(),
                };
                let (decision, policy) = snap.route_request(&s, t.target.ip(), &req, &ejected);
                let port = s.target_port(t.target.port());
                (decision, policy, port.map(|port| (Some(s), port, outlier)))
            }
            Destination::Workload(w) => (
                L7Decision::Forward(w),
                RequestPolicy::default(),
                Some((None, t.target.port(), None)),
            ),
            Destination::Unknown => (L7Decision::NoBackend, RequestPolicy::default(), None),
        };
        drop(snap);
        match (decision, to) {
            (L7Decision::Deny { rule }, _) => {
                record.reason = Some(format!("denied by {rule}"));
                text(StatusCode::FORBIDDEN, "RBAC: access denied\n")
            }
            (L7Decision::Respond { status, body }, _) => {
                record.reason = Some("direct response".into());
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                let mut r = Response::new(
                    Full::new(Bytes::from(body))
                        .map_err(|never: Infallible| match never {})
                        .boxed(),
                );
                *r.status_mut() = status;
                r
            }
            (L7Decision::Forward(first), Some((service, port, outlier))) => {
                let to = To {
                    first,
                    service,
                    port,
                    outlier,
                };
                let out = self.forward(t, to, req, &policy).await;
                record.backend = out.backend.map(|uid| uid.to_string());
                record.attempts = out.attempts;
                record.reason = out.reason;
                out.response
            }
            _ => {
                record.reason = Some("no healthy backend".into());
                text(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
            }
        }
    }
}

/// Once both sides have switched protocols, joins them byte for byte.
pub(super) fn splice_upgrade(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    tokio::spawn(
        async move {
            let (down, up) = match tokio::try_join!(downstream, upstream) {
                Ok(both) => both,
                Err(e) => return debug!(error = %e, "upgrade did not complete"),
            };
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            match tokio::io::copy_bidirectional(&mut down, &mut up).await {
                Ok((to_backend, to_client)) => {
                    debug!(to_backend, to_client, "upgraded connection closed")
                }
                Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
            }
        }
        .in_current_span(),
    );
}
