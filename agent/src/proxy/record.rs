//! What the proxies report about each connection: an "opened" event once
//! its upstream (socket or tunnel) is established, and exactly one
//! [`ConnectionRecord`] when it ends, refused or failed ones included. Each
//! record is written as one access-log line (`tracing` target
//! [`ACCESS_TARGET`]) and broadcast to subscribers (metrics, tests); with
//! nobody listening a broadcast costs one failed send.
//!
//! The proxies build records through [`Connection`], so the fields are
//! filled in one way in one place.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::admin::Metrics;
use crate::identity::Identity;
use crate::state::{Service, Snapshot, State, Workload};

/// The `tracing` target of access-log lines.
pub const ACCESS_TARGET: &str = "access";

/// Which proxy handled the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured leaving a local workload.
    Outbound,
    /// Arrived over HBONE for a local workload.
    Inbound,
    /// Arrived in plaintext for a local workload.
    InboundPlaintext,
}

impl Direction {
    /// The name in access-log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// A workload as the mesh names it; any part may be unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadName {
    pub name: Option<String>,
    pub namespace: Option<String>,
    /// The workload, when the mesh knows it (its telemetry names and
    /// identity label the metrics; read only where needed).
    pub workload: Option<Arc<Workload>>,
}

impl WorkloadName {
    /// The workload at `ip`; else the one workload with identity `id`; else
    /// unnamed, in the identity's namespace if there is one.
    pub fn resolve(snap: &Snapshot, ip: IpAddr, id: Option<&Identity>) -> WorkloadName {
        match snap.workload_by_ip(ip) {
            Some(w) => Self::of(w),
            None => Self::by_identity(snap, id),
        }
    }

    fn of(w: &Arc<Workload>) -> WorkloadName {
        WorkloadName {
            name: Some(w.name.to_string()),
            namespace: Some(w.namespace.to_string()),
            workload: Some(w.clone()),
        }
    }

    /// The one workload with identity `id`; else unnamed, in the
    /// identity's namespace if there is one.
    pub fn by_identity(snap: &Snapshot, id: Option<&Identity>) -> WorkloadName {
        let Some(id) = id else {
            return WorkloadName::default();
        };
        let same =
            snap.workloads_with_identity(id.trust_domain(), id.namespace(), id.service_account());
        match same {
            [w] => Self::of(w),
            _ => WorkloadName {
                namespace: Some(id.namespace().to_string()),
                ..WorkloadName::default()
            },
        }
    }
}

/// One finished (or failed, or refused) connection.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub direction: Direction,
    /// The client's address.
    pub src: IpAddr,
    /// The client's port, when this proxy saw it (not through HBONE).
    pub src_port: Option<u16>,
    /// Where the bytes went: the application's address.
    pub dst: SocketAddr,
    /// The client's identity, when it proved one.
    pub src_identity: Option<Identity>,
    /// The server's identity, when it proved one.
    pub dst_identity: Option<Identity>,
    /// The service the client addressed, when it did.
    pub service: Option<Arc<Service>>,
    /// The client's workload, from the mesh when the record was made.
    pub src_workload: WorkloadName,
    /// The server's workload, from the mesh when the record was made.
    pub dst_workload: WorkloadName,
    /// Bytes from the client towards the server.
    pub sent: u64,
    /// Bytes from the server back to the client.
    pub received: u64,
    /// Whether the bytes crossed the network inside mutual TLS.
    pub encrypted: bool,
    pub duration: Duration,
    /// Why the connection failed or was refused, if it was.
    pub error: Option<String>,
    /// Refused by policy (authorization, waypoint-only admission).
    pub denied: bool,
    /// Whether an "opened" event was reported; false for a connection that
    /// ended before its upstream was established.
    pub opened: bool,
}

impl ConnectionRecord {
    /// The client as `ip:port`, or `ip` when the port is not known.
    pub fn src_display(&self) -> String {
        match self.src_port {
            Some(port) => SocketAddr::new(self.src, port).to_string(),
            None => self.src.to_string(),
        }
    }

    /// Istio's `connection_security_policy`.
    pub fn security_policy(&self) -> &'static str {
        if self.encrypted {
            "mutual_tls"
        } else {
            "none"
        }
    }

    /// Envoy-style response flags: `-` for none, `DENY` for a policy
    /// refusal (ours or the peer's 401/403), `NR` when there was no route,
    /// `UO` when a per-workload limit refused it, `UF` when the upstream
    /// could not be reached, `UC` when it failed mid-connection.
    pub fn response_flags(&self) -> &'static str {
        let Some(e) = self.error.as_deref() else {
            return "-";
        };
        if self.denied || e.contains("401") || e.contains("403") {
            "DENY"
        } else if e.starts_with("destination unreachable") {
            "NR"
        } else if e.starts_with("overloaded") {
            "UO"
        } else if e.starts_with("copying") || self.opened {
            "UC"
        } else {
            "UF"
        }
    }

    /// Writes the record's access-log line: one `info` event on target
    /// [`ACCESS_TARGET`] with flat fields, `-` for what is not known. The
    /// keys are part of the agent's interface (README, "Access log").
    pub fn log(&self) {
        let id = |i: &Option<Identity>| i.as_ref().map_or_else(|| "-".into(), |i| i.to_string());
        let or_dash = |s: &Option<String>| s.as_deref().unwrap_or("-").to_string();
        // A root event: the line stands alone, whatever span it is written in.
        tracing::info!(
            target: ACCESS_TARGET,
            parent: None,
            direction = %self.direction.as_str(),
            src = %self.src_display(),
            dst = %self.dst,
            src_identity = %id(&self.src_identity),
            dst_identity = %id(&self.dst_identity),
            dst_service = %self.service.as_ref().map_or("-", |s| s.hostname.as_str()),
            src_workload = %or_dash(&self.src_workload.name),
            src_namespace = %or_dash(&self.src_workload.namespace),
            dst_workload = %or_dash(&self.dst_workload.name),
            dst_namespace = %or_dash(&self.dst_workload.namespace),
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            connection_security_policy = %self.security_policy(),
            response_flags = %self.response_flags(),
            error = %or_dash(&self.error),
            "connection closed"
        );
    }
}

/// Where connection events go: the metrics, counted as each record is
/// made, and subscribers (tests, tools). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Reporter {
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// Connections open, for giving their memory back after a burst.
    heap: Arc<crate::heap::BurstRelease>,
    opened: broadcast::Sender<Arc<ConnectionRecord>>,
    closed: broadcast::Sender<Arc<ConnectionRecord>>,
}

impl Reporter {
    /// Names workloads from `state`; each channel buffers `capacity` events
    /// for a slow subscriber (which may miss some; the metrics never do).
    pub fn new(state: Arc<State>, capacity: usize) -> Self {
        Reporter {
            state,
            metrics: Arc::new(Metrics::new()),
            heap: Arc::default(),
            opened: broadcast::channel(capacity).0,
            closed: broadcast::channel(capacity).0,
        }
    }

    /// What counts connections open for the allocator's sake (its
    /// [`run`](crate::heap::BurstRelease::run) task is the agent's to spawn).
    pub fn heap(&self) -> &Arc<crate::heap::BurstRelease> {
        &self.heap
    }

    /// The metrics records are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Connections as they open (bytes, duration and error still empty).
    pub fn subscribe_opened(&self) -> broadcast::Receiver<Arc<ConnectionRecord>> {
        self.opened.subscribe()
    }

    /// Connections as they end.
    pub fn subscribe_closed(&self) -> broadcast::Receiver<Arc<ConnectionRecord>> {
        self.closed.subscribe()
    }

    /// Starts tracking a connection from `src` (port if known) to `dst`.
    pub fn start(
        &self,
        direction: Direction,
        src: IpAddr,
        src_port: Option<u16>,
        dst: SocketAddr,
    ) -> Connection {
        self.heap.opened();
        Connection {
            reporter: self.clone(),
            start: Instant::now(),
            done: false,
            relayed: false,
            record: ConnectionRecord {
                direction,
                src,
                src_port,
                dst,
                src_identity: None,
                dst_identity: None,
                service: None,
                src_workload: WorkloadName::default(),
                dst_workload: WorkloadName::default(),
                sent: 0,
                received: 0,
                encrypted: false,
                duration: Duration::ZERO,
                error: None,
                denied: false,
                opened: false,
            },
        }
    }
}

/// A connection being proxied. Report [`Connection::opened`] once its
/// upstream is established, then end it with [`Connection::finish`] or
/// [`Connection::deny`]; one dropped unfinished (the agent cut it) still
/// gets its record.
#[derive(Debug)]
pub struct Connection {
    reporter: Reporter,
    start: Instant,
    record: ConnectionRecord,
    done: bool,
    /// The source address is a relay's (a network gateway's), not the
    /// client's: the client is named by its identity alone.
    relayed: bool,
}

impl Connection {
    pub fn src_identity(mut self, id: Option<Identity>) -> Self {
        self.record.src_identity = id;
        self
    }

    pub fn dst_identity(mut self, id: Option<Identity>) -> Self {
        self.record.dst_identity = id;
        self
    }

    pub fn service(mut self, service: Option<Arc<Service>>) -> Self {
        self.record.service = service;
        self
    }

    /// Says whether the source address is a relay's (see `relayed`).
    pub fn relayed(mut self, relayed: bool) -> Self {
        self.relayed = relayed;
        self
    }

    pub fn encrypted(mut self, encrypted: bool) -> Self {
        self.record.encrypted = encrypted;
        self
    }

    /// Records that the connection now crosses the network in mutual TLS
    /// (the tunnel's handshake succeeded).
    pub fn encrypted_now(&mut self) {
        self.record.encrypted = true;
    }

    /// Reports that the upstream is established.
    pub fn opened(&mut self) {
        if self.record.opened {
            return;
        }
        self.record.opened = true;
        let r = self.named();
        self.reporter.metrics.opened(&r);
        let _ = self.reporter.opened.send(Arc::new(r));
    }

    /// Ends the connection: `Ok((sent, received))`, or why it failed.
    pub fn finish<E: fmt::Display>(mut self, result: Result<(u64, u64), E>) {
        match result {
            Ok((sent, received)) => {
                self.record.sent = sent;
                self.record.received = received;
            }
            Err(e) => self.record.error = Some(e.to_string()),
        }
        self.close();
    }

    /// Ends a connection whose bytes were being copied: what moved counts
    /// whether or not the copy ended in an error.
    pub fn copied(mut self, sent: u64, received: u64, error: Option<impl fmt::Display>) {
        self.record.sent = sent;
        self.record.received = received;
        self.record.error = error.map(|e| format!("copying: {e}"));
        self.close();
    }

    /// Ends a connection refused by policy, with the reason.
    pub fn deny(mut self, reason: impl fmt::Display) {
        self.record.denied = true;
        self.record.error = Some(reason.to_string());
        self.close();
    }

    /// A copy of the record with its workloads named from the current
    /// mesh. Names go only into the copies reported: the record a
    /// connection keeps for its whole life stays without them.
    fn named(&self) -> ConnectionRecord {
        let snap = self.reporter.state.snapshot();
        let mut r = self.record.clone();
        r.src_workload = if self.relayed {
            WorkloadName::by_identity(&snap, r.src_identity.as_ref())
        } else {
            WorkloadName::resolve(&snap, r.src, r.src_identity.as_ref())
        };
        r.dst_workload = WorkloadName::resolve(&snap, r.dst.ip(), r.dst_identity.as_ref());
        r
    }

    fn close(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.record.duration = self.start.elapsed();
        let r = self.named();
        r.log();
        self.reporter.metrics.closed(&r);
        let _ = self.reporter.closed.send(Arc::new(r));
        self.reporter.heap.closed();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.done {
            self.record.error = Some("cut before it finished (agent stopping)".into());
            self.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Mesh, Workload};

    fn state() -> Arc<State> {
        let mut mesh = Mesh::default();
        mesh.workloads.push(Workload {
            name: "client".into(),
            service_account: "client".into(),
            ..Workload::for_test("c", "test", Some("10.0.0.1"))
        });
        Arc::new(State::new(mesh))
    }

    #[tokio::test]
    async fn one_record_per_connection_even_when_dropped() {
        let reporter = Reporter::new(state(), 8);
        let mut opened = reporter.subscribe_opened();
        let mut closed = reporter.subscribe_closed();
        let dst: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let src: IpAddr = "10.0.0.1".parse().expect("ip");

        let mut c = reporter
            .start(Direction::Outbound, src, Some(4000), dst)
            .src_identity(Some(Identity::new("td", "test", "client")))
            .encrypted(true);
        c.opened();
        c.opened();
        let o = opened.try_recv().expect("opened");
        assert!(opened.try_recv().is_err(), "opened once");
        assert_eq!(o.src_workload.name.as_deref(), Some("client"));
        c.finish(Ok::<_, std::io::Error>((5, 7)));
        let r = closed.try_recv().expect("closed");
        assert_eq!((r.sent, r.received, r.opened), (5, 7, true));
        assert_eq!(r.src_display(), "10.0.0.1:4000");
        assert_eq!(r.response_flags(), "-");
        assert_eq!(r.security_policy(), "mutual_tls");

        reporter
            .start(Direction::Inbound, src, None, dst)
            .deny("no ALLOW policy matched");
        let r = closed.try_recv().expect("denied");
        assert_eq!(r.response_flags(), "DENY");
        assert_eq!(r.src_display(), "10.0.0.1");

        let mut cut = reporter.start(Direction::InboundPlaintext, src, Some(1), dst);
        cut.opened();
        drop(cut);
        let r = closed.try_recv().expect("dropped");
        assert_eq!(r.response_flags(), "UC");
        assert_eq!(r.security_policy(), "none");
        assert!(closed.try_recv().is_err(), "exactly one record each");
    }

    #[test]
    fn flags_from_errors() {
        let reporter = Reporter::new(state(), 1);
        let dst: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let flags = |e: &str| {
            let mut rx = reporter.subscribe_closed();
            reporter
                .start(Direction::Outbound, dst.ip(), None, dst)
                .finish(Err::<(u64, u64), _>(e));
            rx.try_recv().expect("record").response_flags()
        };
        assert_eq!(flags("peer answered CONNECT with 401 Unauthorized"), "DENY");
        assert_eq!(flags("destination unreachable: x"), "NR");
        assert_eq!(flags("connecting to 1.2.3.4:5: refused"), "UF");
        assert_eq!(flags("copying: reset"), "UC");
    }
}
