//! Inbound HBONE (15008): terminates mTLS with the destination workload's
//! certificate, accepts CONNECT streams addressed to that workload, and
//! joins each to a TCP connection to the application.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use rustls::ServerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn, Instrument};

use super::limits::{Budget, Slot};
use super::record::{Connection, Direction};
use super::tracker::Registration;
use super::{authorize, connect_app, orig_dst::original_dst, proxy_protocol, Accept, ProxyContext};
use crate::hbone::server::{
    self, ConnectRequest, ConnectionError, ConnectionInfo, Handler, Responder,
};
use crate::hbone::Authority;
use crate::hbone::{self, tls, H2Stream};
use crate::identity::{Identity, PeerRole};
use crate::socket::Sockets;
use crate::state::{authz, ApplicationTunnel, Service, Snapshot, Workload};

/// The HBONE server of one local workload.
pub struct Inbound {
    ctx: ProxyContext,
    workload: Arc<Workload>,
    /// `workload`'s identity, made once: each stream shares it.
    identity: Identity,
    sockets: Sockets,
    /// The TLS config for the current certificate, rebuilt on rotation.
    tls: tls::ServerConfigCache,
    /// The handshakes in progress on this workload's HBONE listener.
    handshakes: server::HandshakeGate,
    /// What the workload may hold open (shared with its other proxies).
    budget: Arc<Budget>,
}

impl Accept for Inbound {
    async fn serve(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let local = match original_dst(&stream) {
            Ok(a) => a,
            Err(e) => {
                warn!(%peer, error = %e, "no destination address; closing");
                return;
            }
        };
        // The client's identity is recorded once the handshake proves it.
        let span = tracing::info_span!(
            "inbound",
            src = %peer,
            dst = %local,
            src_id = tracing::field::Empty
        );
        if let Err(e) = self
            .clone()
            .serve_tls(stream, peer, local)
            .instrument(span.clone())
            .await
        {
            match e {
                // The peer went away after the handshake (e.g. it stopped).
                ConnectionError::H2(e) if e.is_io() => {
                    debug!(parent: &span, error = %e, "HBONE connection closed")
                }
                ConnectionError::H2(e) => {
                    warn!(parent: &span, error = %e, "HBONE connection failed")
                }
                // A TCP probe or a scan: nothing was attempted.
                ConnectionError::Handshake(server::HandshakeError::Closed) => {
                    debug!(parent: &span, "closed before the handshake")
                }
                e => warn!(parent: &span, error = %e, "HBONE connection refused"),
            }
        }
    }
}

impl Inbound {
    pub fn new(
        ctx: ProxyContext,
        workload: Arc<Workload>,
        sockets: Sockets,
        budget: Arc<Budget>,
    ) -> Self {
        Inbound {
            handshakes: server::HandshakeGate::new(ctx.settings.handshakes),
            ctx,
            identity: workload.identity(),
            workload,
            sockets,
            budget,
            tls: tls::ServerConfigCache::default(),
        }
    }

    /// The server config now, and the trust generation it verifies with.
    async fn server_config(&self) -> Result<(Arc<ServerConfig>, u64), ConnectionError> {
        let cert = self.ctx.certs.fetch(&self.identity).await?;
        let trust = self.ctx.certs.trust_bundle();
        Ok((self.tls.get(cert, &trust)?, trust.generation))
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<(), ConnectionError> {
        let (cfg, generation) = self.server_config().await?;
        let td = &self.workload.trust_domain;
        let accepted = server::accept_tls(stream, peer.ip(), cfg, &self.handshakes, td).await;
        let accepted = accepted.inspect_err(|e| {
            if !matches!(e, server::HandshakeError::Closed) {
                self.ctx.reporter.metrics().handshake_failed(e.reason());
            }
            if e.reason() == "revoked" {
                self.ctx.certs.trust().count_revoked(PeerRole::Client);
            }
        })?;
        tracing::Span::current().record("src_id", tracing::field::display(&accepted.peer));
        let guard =
            self.ctx
                .certs
                .trust()
                .register_peer(accepted.chain, PeerRole::Client, generation);
        let info = ConnectionInfo {
            peer_identity: accepted.peer,
            peer_addr: peer,
            local_addr: local,
        };
        let settings = self.ctx.settings.h2;
        let shutdown = self.ctx.shutdown.clone();
        let untrusted = guard.untrusted();
        server::serve(accepted.conn, info, &settings, self, shutdown, untrusted).await?;
        Ok(())
    }
}

impl Inbound {
    /// Connects to the application for `req`. A PROXY-tunnel workload (a
    /// waypoint) is reached on its tunnel port and told first who came,
    /// for what target, with which identity.
    async fn connect_upstream(
        &self,
        req: &ConnectRequest,
        target: SocketAddr,
        src: IpAddr,
    ) -> std::io::Result<TcpStream> {
        let port = match self.workload.application_tunnel {
            ApplicationTunnel::None => {
                return connect_app(&self.ctx, &self.sockets, target, src).await
            }
            ApplicationTunnel::Proxy { port } => port,
            // What the workload expects cannot be produced: raw bytes could
            // be taken for something they are not.
            ApplicationTunnel::Unsupported(p) => {
                return Err(std::io::Error::other(format!(
                    "the workload expects application tunnel protocol {p}, which this agent does not speak"
                )))
            }
        };
        let own = self
            .workload
            .addresses
            .iter()
            .find(|a| a.is_ipv4() == target.is_ipv4())
            .or(self.workload.addresses.first())
            .copied()
            .ok_or_else(|| std::io::Error::other("workload has no address"))?;
        let app = SocketAddr::new(own, port.unwrap_or(target.port()));
        // The client's port is only known when it connected directly.
        let src_port = if src == req.peer_addr.ip() {
            req.peer_addr.port()
        } else {
            0
        };
        let header =
            proxy_protocol::encode(SocketAddr::new(src, src_port), target, &req.peer_identity)
                .map_err(std::io::Error::other)?;
        let mut upstream = connect_app(&self.ctx, &self.sockets, app, src).await?;
        upstream.write_all(&header).await?;
        Ok(upstream)
    }
}

impl Handler for Inbound {
    // Not an `async fn`, for the reason given at `Outbound::proxy`.
    fn handle(
        self: Arc<Self>,
        req: ConnectRequest,
        responder: Responder,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let snap = self.ctx.state.snapshot();
        let waypoints = snap.waypoint_identities(&self.workload);
        let src = client_ip(&req, &waypoints);
        let target = resolve_target(&snap, &self.workload, &req);
        drop(snap);
        // The identities are on the enclosing spans: the peer's on the
        // HBONE connection's (`inbound`), ours on the `workload` span.
        let span = tracing::info_span!("connect", %src, dst = %req.target, origin_network = req.origin_network.as_deref());
        // Forwarded carries no port: the client's port is not known here.
        let record = self
            .ctx
            .reporter
            .start(
                Direction::Inbound,
                src,
                None,
                *target.as_ref().unwrap_or(&req.local_addr),
            )
            .src_identity(Some(req.peer_identity.clone()))
            .dst_identity(Some(self.identity.clone()))
            // Through another network's gateway (ztunnel's `from_gateway`):
            // the peer address is the gateway's.
            .relayed(
                req.origin_network
                    .as_deref()
                    .is_some_and(|n| n != self.workload.network_name()),
            )
            .encrypted(true);
        // Admission is boxed, and made out here so the future below does
        // not capture the request: as in `Outbound::proxy`, its state is
        // needed only until the tunnel is joined.
        let admit = Box::pin(async move {
            self.admit(req, target, src, &waypoints, responder, record)
                .await
        });
        async move {
            let Some((tunnel, upstream, registration, mut record, slot)) = admit.await else {
                return;
            };
            record.opened();
            let ended = tokio::select! {
                r = hbone::copy_bidirectional(tunnel, upstream) => Some(r),
                _ = registration.revoked() => None,
            };
            // The place is free before the record says the connection
            // ended (whoever reads the record may open the next one).
            drop(slot);
            match ended {
                // from_stream: bytes the client sent; to_stream: the app's answer.
                Some(Ok(t)) => record.copied(t.from_stream, t.to_stream, None::<&str>),
                Some(Err(e)) => {
                    record.copied(e.moved.from_stream, e.moved.to_stream, Some(e.error))
                }
                None => record.deny("closed: policy changed"),
            }
        }
        .instrument(span)
    }
}

impl Inbound {
    /// Checks `req` (tunneled for client `src`) against the workload and
    /// its policies, connects the application and accepts the stream.
    /// Refusals are answered and recorded here (`None`).
    async fn admit(
        &self,
        req: ConnectRequest,
        target: Result<SocketAddr, String>,
        src: IpAddr,
        waypoints: &[Identity],
        responder: Responder,
        record: Connection,
    ) -> Option<(H2Stream, TcpStream, Registration, Connection, Slot)> {
        // Over a cap: refused before any work is done for it.
        let places = self
            .budget
            .pending_stream(&req.peer_identity)
            .and_then(|pending| Ok((pending, self.budget.connection()?)));
        let (_pending, slot) = match places {
            Ok(places) => places,
            Err(over) => {
                warn!("{over}; 503");
                record.finish(Err(over));
                responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        let target = match target {
            Ok(t) => t,
            Err(why) => {
                warn!("{why}; 400");
                record.finish(Err(format!("400: {why}")));
                responder.refuse(StatusCode::BAD_REQUEST);
                return None;
            }
        };
        // A pod the CNI handed over before istiod listed it: the policies
        // that select it are not known yet, so nothing may come in.
        if !self.ctx.state.snapshot().knows(&self.workload) {
            warn!("workload not (yet) in the mesh; 503");
            record.finish(Err("503: workload not (yet) known to the control plane"));
            responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
        // Never into the agent itself (checked before anything connects).
        if self.ctx.settings.reserved_ports.contains(target.port()) {
            warn!("target port is one the agent serves; 400");
            record.finish(Err("400: target port is reserved by the agent"));
            responder.refuse(StatusCode::BAD_REQUEST);
            return None;
        }
        // The tunnel may only reach the workload it was sent to, unless
        // that workload is a waypoint: it serves other targets.
        let waypoint = self.workload.application_tunnel.is_proxy();
        if !waypoint && !self.workload.addresses.contains(&target.ip()) {
            warn!("target is not an address of this workload; 400");
            record.finish(Err("400: target is not an address of this workload"));
            responder.refuse(StatusCode::BAD_REQUEST);
            return None;
        }
        // Behind a waypoint, only the waypoint may come in.
        if !waypoints.is_empty() && !waypoints.contains(&req.peer_identity) {
            warn!(waypoints = ?waypoints.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "direct connection to a workload behind a waypoint; 401");
            record.deny("401: direct connection to a workload behind a waypoint");
            responder.refuse(StatusCode::UNAUTHORIZED);
            return None;
        }
        let conn = authz::Connection {
            src_ip: src,
            src_identity: Some(&req.peer_identity),
            dst: target,
            request: None,
        };
        if let authz::Decision::Deny(why) = authorize(&self.ctx, &self.workload, &conn) {
            record.deny(format!("401: {why}"));
            responder.refuse(StatusCode::UNAUTHORIZED);
            return None;
        }
        let registration = self.ctx.tracker.register(self.workload.clone(), &conn);
        let mut responder = responder;
        // A client that resets its CONNECT meanwhile (rapid reset) gets no
        // upstream opened on its behalf.
        let connected = tokio::select! {
            r = self.connect_upstream(&req, target, src) => r,
            reason = responder.reset() => {
                debug!(?reason, "client reset the stream before it was answered");
                record.finish(Err("client reset the stream"));
                return None;
            }
        };
        let upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "target unreachable; 503");
                record.finish(Err(format!("503: target unreachable: {e}")));
                responder.refuse(StatusCode::SERVICE_UNAVAILABLE);
                return None;
            }
        };
        let tunnel = match responder.accept() {
            Ok(t) => t,
            Err(e) => {
                record.finish(Err(format!("client went away: {e}")));
                return None;
            }
        };
        Some((tunnel, upstream, registration, record, slot))
    }
}

/// The address a CONNECT's authority names: as given, or for a service
/// hostname (double HBONE, through a network gateway), `workload`'s
/// address the tunnel arrived on and the port the service maps the
/// service port to. The service must be one `workload` backs: a name is
/// never a way to reach something else.
fn resolve_target(
    snap: &Snapshot,
    workload: &Workload,
    req: &ConnectRequest,
) -> Result<SocketAddr, String> {
    let (hostname, port) = match &req.target {
        Authority::Addr(a) => return Ok(*a),
        Authority::Service { hostname, port } => (hostname, *port),
    };
    let backs = |s: &&Arc<Service>| s.endpoints.iter().any(|e| e.workload_uid == workload.uid);
    let services = snap.services_by_hostname(hostname);
    // As ztunnel, the workload's own namespace first.
    let service = services
        .iter()
        .filter(backs)
        .find(|s| s.namespace == workload.namespace)
        .or_else(|| services.iter().find(backs))
        .ok_or_else(|| format!("{hostname} is not a service this workload backs"))?;
    let target_port = service
        .target_port(port)
        .ok_or_else(|| format!("service {hostname} has no port {port}"))?;
    Ok(SocketAddr::new(req.local_addr.ip(), target_port))
}

/// The client a CONNECT stands for: the HBONE peer itself, unless the peer
/// is one of the workload's waypoints, which relays its own client's
/// address in `Forwarded`. From anyone else the header is a claim, not a
/// fact: trusting it would let any mesh peer pick its source address (and
/// so pass a `sourceIps` rule, or have the application see a forged
/// client). ztunnel never takes the source from `Forwarded` at all.
fn client_ip(req: &ConnectRequest, waypoints: &[Identity]) -> IpAddr {
    match req.forwarded_for {
        Some(ip) if waypoints.contains(&req.peer_identity) => ip,
        _ => req.peer_addr.ip(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_the_peer_unless_a_waypoint_relays_it() {
        let waypoint = Identity::new("cluster.local", "test", "waypoint");
        let client = Identity::new("cluster.local", "test", "client");
        let peer: SocketAddr = "10.1.0.2:40000".parse().unwrap();
        let claimed: IpAddr = "10.9.9.9".parse().unwrap();
        let req = |id: &Identity, fwd: Option<IpAddr>| ConnectRequest {
            peer_identity: id.clone(),
            peer_addr: peer,
            local_addr: "10.2.0.2:15008".parse().unwrap(),
            target: Authority::Addr("10.2.0.2:8080".parse().unwrap()),
            forwarded_for: fwd,
            baggage: None,
            origin_network: None,
        };
        let wps = std::slice::from_ref(&waypoint);
        let cases = [
            ("no header", req(&client, None), wps, peer.ip()),
            ("peer's claim", req(&client, Some(claimed)), wps, peer.ip()),
            (
                "no waypoint at all",
                req(&waypoint, Some(claimed)),
                &[][..],
                peer.ip(),
            ),
            (
                "waypoint relays",
                req(&waypoint, Some(claimed)),
                wps,
                claimed,
            ),
            ("waypoint, no header", req(&waypoint, None), wps, peer.ip()),
        ];
        for (name, r, waypoints, want) in cases {
            assert_eq!(client_ip(&r, waypoints), want, "{name}");
        }
    }
}
