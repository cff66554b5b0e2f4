//! Prometheus metrics (`GET /metrics`): Istio's standard TCP metrics,
//! counted by the proxies' [`Reporter`](crate::proxy::record::Reporter) as
//! it makes each [`ConnectionRecord`] (so they are exact, never sampled
//! from a channel that can fall behind), failed connections, plus the agent's
//! own: xDS connection state, ACKs and NACKs (Istio mode), pool,
//! certificates, enrolled workloads; in the OpenMetrics text format.
//!
//! Byte counters follow Istio's meaning: `istio_tcp_received_bytes_total`
//! counts request bytes (client towards server, the record's `sent`) and
//! `istio_tcp_sent_bytes_total` response bytes (the record's `received`).
//! `opened` is counted when a proxy reports the connection established and
//! `closed` when it ends, with the same labels except `response_flags`
//! (`-` at open, the outcome at close). A connection that ended before it
//! was established (refused, unreachable) counts as opened and closed at
//! once, so the two totals agree once every connection is done.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::process::{self, ProcessMetrics};
use crate::hbone::pool::PoolStats;
use crate::identity::{Identity, WorkloadCert};
use crate::proxy::record::{ConnectionRecord, Direction, WorkloadName};
use crate::state::{Name, Telemetry};
use crate::xds::delta::XdsStatus;

/// The labels of Istio's TCP metrics: ztunnel's 27, in its order
/// (`CommonTrafficLabels`, `src/proxy/metrics.rs`), so Istio's dashboards
/// and alerts read ours as theirs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabel {
    policy: String,
    action: &'static str,
}

/// What the agent's gauges show at scrape time.
#[derive(Clone, Debug, Default)]
pub struct AgentGauges {
    pub pool: PoolStats,
    pub certificates: Vec<Arc<WorkloadCert>>,
    pub enrolled: usize,
    /// Workloads that should be served and are not yet (being retried).
    pub pending: usize,
    /// The xDS client's status (Istio mode only).
    pub xds: Option<XdsStatus>,
    /// Trust anchors in the live set.
    pub trust_roots: usize,
    /// Connections closed because their peer's root left the set.
    pub untrusted_closed: u64,
    /// Peers refused or closed for a revoked certificate, as `source`
    /// and as `destination`.
    pub revoked: [u64; 2],
    /// Changes installed into the mesh state, and its size.
    pub mesh: crate::state::UpdateStats,
}

/// `istio_build`'s labels: ztunnel's (`src/metrics/meta.rs`), so
/// dashboards that list the mesh's ztunnels by version list this agent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReporterLabel {
    reporter: &'static str,
}

/// The agent's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    handshakes_failed: Family<ReasonLabel, Counter>,
    dry_run_matches: Family<PolicyLabel, Counter>,
    xds_connected: Gauge,
    xds_synced: Gauge,
    xds_resources: Gauge,
    xds_connections: Counter,
    xds_failures: Counter,
    xds_acks: Counter,
    xds_nacks: Counter,
    pool_opened: Counter,
    pool_open: Gauge,
    pool_streams: Gauge,
    cert_expiry: Family<IdentityLabel, Gauge>,
    dns: crate::dns::metrics::DnsMetrics,
    certificates: Gauge,
    enrolled: Gauge,
    /// ztunnel's names for the served and not-yet-served pods, which its
    /// Grafana dashboard's "Workload Manager" panel reads.
    proxies_active: Gauge,
    proxies_pending: Gauge,
    trust_roots: Gauge,
    certificates_invalid: Gauge,
    untrusted_closed: Counter,
    crl_rejections: Family<ReporterLabel, Counter>,
    mesh_updates: Counter,
    mesh_update_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    mesh_update_last: Gauge<f64, std::sync::atomic::AtomicU64>,
    mesh_workloads: Gauge,
    mesh_services: Gauge,
    mesh_policies: Gauge,
    build: Family<BuildLabels, Gauge>,
    process: ProcessMetrics,
    /// One scrape at a time updates the gauges and encodes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failed: Family::default(),
            handshakes_failed: Family::default(),
            dry_run_matches: Family::default(),
            xds_connected: Gauge::default(),
            xds_synced: Gauge::default(),
            xds_resources: Gauge::default(),
            xds_connections: Counter::default(),
            xds_failures: Counter::default(),
            xds_acks: Counter::default(),
            xds_nacks: Counter::default(),
            pool_opened: Counter::default(),
            pool_open: Gauge::default(),
            pool_streams: Gauge::default(),
            cert_expiry: Family::default(),
            dns: Default::default(),
            certificates: Gauge::default(),
            enrolled: Gauge::default(),
            proxies_active: Gauge::default(),
            proxies_pending: Gauge::default(),
            trust_roots: Gauge::default(),
            certificates_invalid: Gauge::default(),
            mesh_updates: Counter::default(),
            mesh_update_seconds: Counter::default(),
            mesh_update_last: Gauge::default(),
            mesh_workloads: Gauge::default(),
            mesh_services: Gauge::default(),
            mesh_policies: Gauge::default(),
            untrusted_closed: Counter::default(),
            crl_rejections: Family::default(),
            build: Family::default(),
            process: ProcessMetrics::default(),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        // Counter names get `_total` from the encoder.
        let counters = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                &m.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                &m.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent in responses (server to client)",
                &m.sent,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received in requests (client to server)",
                &m.received,
            ),
        ];
        for (name, help, family) in counters {
            registry.register(name, help, family.clone());
        }
        // ztunnel's name for it (marked unstable there), and ours.
        registry.register(
            "istio_tcp_connections_failed",
            "TCP connections that ended in an error or were refused",
            m.failed.clone(),
        );
        registry.register(
            "ambient_tcp_connections_failed",
            "TCP connections that ended in an error or were refused (Istio's labels; response_flags says why)",
            m.failed.clone(),
        );
        registry.register(
            "ambient_hbone_handshakes_failed",
            "Inbound HBONE connections refused before or during the mTLS handshake, by reason (too_many, timeout, tls, identity, foreign_trust_domain)",
            m.handshakes_failed.clone(),
        );
        registry.register(
            "ambient_dry_run_policy_matches",
            "Connections a dry-run policy matched (evaluated, never enforced), by policy and its action",
            m.dry_run_matches.clone(),
        );
        let gauges = [
            (
                "ambient_xds_connected",
                "1 while a stream to the control plane is open",
                &m.xds_connected,
            ),
            (
                "ambient_xds_synced",
                "1 once every subscribed type was received and accepted",
                &m.xds_synced,
            ),
            (
                "ambient_xds_resources",
                "xDS resources held",
                &m.xds_resources,
            ),
            (
                "ambient_mesh_workloads",
                "Workloads in the mesh",
                &m.mesh_workloads,
            ),
            (
                "ambient_mesh_services",
                "Services in the mesh",
                &m.mesh_services,
            ),
            (
                "ambient_mesh_policies",
                "Authorization policies in the mesh",
                &m.mesh_policies,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        registry.register(
            "ambient_mesh_updates",
            "New versions of the mesh installed (from xDS or the mesh file)",
            m.mesh_updates.clone(),
        );
        registry.register(
            "ambient_mesh_update_seconds",
            "Time spent installing mesh updates, from the source's input to serving",
            m.mesh_update_seconds.clone(),
        );
        registry.register(
            "ambient_mesh_update_last_seconds",
            "Time the last mesh update took, from the source's input to serving",
            m.mesh_update_last.clone(),
        );
        let xds_counters = [
            (
                "ambient_xds_connections",
                "xDS streams opened",
                &m.xds_connections,
            ),
            (
                "ambient_xds_connection_failures",
                "xDS connection attempts that failed or streams that ended",
                &m.xds_failures,
            ),
            ("ambient_xds_acks", "xDS responses accepted", &m.xds_acks),
            (
                "ambient_xds_nacks",
                "xDS responses rejected (NACK)",
                &m.xds_nacks,
            ),
        ];
        for (name, help, counter) in xds_counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "ambient_pool_connections_opened",
            "HBONE client connections opened since start",
            m.pool_opened.clone(),
        );
        registry.register(
            "ambient_pool_connections_open",
            "HBONE client connections currently pooled",
            m.pool_open.clone(),
        );
        registry.register(
            "ambient_pool_streams_active",
            "HBONE streams currently open",
            m.pool_streams.clone(),
        );
        registry.register(
            "ambient_certificate_expiry_seconds",
            "Expiry of each held workload certificate, seconds since the epoch",
            m.cert_expiry.clone(),
        );
        registry.register(
            "ambient_certificates",
            "Workload certificates held",
            m.certificates.clone(),
        );
        registry.register(
            "ambient_enrolled_workloads",
            "Local workloads being served",
            m.enrolled.clone(),
        );
        // ztunnel registers these at the root, without the istio_ prefix.
        registry.register(
            "workload_manager_active_proxy_count",
            "Pods the agent serves",
            m.proxies_active.clone(),
        );
        registry.register(
            "workload_manager_pending_proxy_count",
            "Pods handed to the agent that it does not serve yet (retried)",
            m.proxies_pending.clone(),
        );
        registry.register(
            "ambient_certificates_invalid",
            "Workload certificates held that are expired or not yet valid (their workloads are refused until renewed)",
            m.certificates_invalid.clone(),
        );
        registry.register(
            "ambient_trust_roots",
            "Trust anchors in the live set (configured roots and the CA's)",
            m.trust_roots.clone(),
        );
        registry.register(
            "ambient_trust_untrusted_connections_closed",
            "HBONE connections closed because their peer's root left the trust anchors",
            m.untrusted_closed.clone(),
        );
        // ztunnel's name and label.
        registry.register(
            "istio_crl_policy_rejections",
            "Peers refused at the handshake, or connections closed, for a revoked certificate",
            m.crl_rejections.clone(),
        );
        registry.register("istio_build", "Istio component build info", m.build.clone());
        m.process.register(&mut registry);
        m.dns.register(&mut registry);
        m.set_build_tag(None);
        Metrics { registry, ..m }
    }

    /// The DNS proxy's metrics.
    pub fn dns(&self) -> &crate::dns::metrics::DnsMetrics {
        &self.dns
    }

    /// Counts a connection whose upstream was just established.
    pub fn opened(&self, r: &ConnectionRecord) {
        self.opened.get_or_create(&labels(r)).inc();
    }

    /// Counts one finished connection, and its opening if that was never
    /// reported.
    pub fn closed(&self, r: &ConnectionRecord) {
        let labels = labels(r);
        if !r.opened {
            self.opened.get_or_create(&labels).inc();
        }
        self.closed.get_or_create(&labels).inc();
        if r.error.is_some() {
            self.failed.get_or_create(&labels).inc();
        }
        self.received.get_or_create(&labels).inc_by(r.sent);
        self.sent.get_or_create(&labels).inc_by(r.received);
    }

    /// Sets `istio_build`'s `tag`: the Istio version the agent is deployed
    /// as (`ISTIO_META_ISTIO_VERSION`, as ztunnel), else `unknown`.
    pub fn set_build_tag(&self, tag: Option<&str>) {
        self.build.clear();
        let tag = known(tag);
        self.build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag,
            })
            .set(1);
    }

    /// Counts an inbound handshake that did not complete, by reason.
    pub fn handshake_failed(&self, reason: &'static str) {
        self.handshakes_failed
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a connection dry-run policy `policy` (`namespace/name`) matched.
    pub fn dry_run_matched(&self, policy: String, deny: bool) {
        let action = if deny { "deny" } else { "allow" };
        self.dry_run_matches
            .get_or_create(&PolicyLabel { policy, action })
            .inc();
    }

    /// Updates the agent gauges and encodes everything.
    pub fn encode(&self, gauges: &AgentGauges) -> Result<String, std::fmt::Error> {
        let _one = self.scrape.lock().unwrap_or_else(PoisonError::into_inner);
        catch_up(&self.pool_opened, gauges.pool.connections_opened);
        if let Some(x) = &gauges.xds {
            self.xds_connected.set(i64::from(x.connected));
            self.xds_synced.set(i64::from(x.synced));
            self.xds_resources.set(to_i64(x.resources as u64));
            catch_up(&self.xds_connections, x.connections);
            catch_up(&self.xds_failures, x.failures);
            catch_up(&self.xds_acks, x.acks);
            catch_up(&self.xds_nacks, x.nacks);
        }
        self.pool_open
            .set(to_i64(gauges.pool.connections_open as u64));
        self.pool_streams
            .set(to_i64(gauges.pool.streams_active as u64));
        self.cert_expiry.clear();
        for c in &gauges.certificates {
            let expiry = c
                .not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| to_i64(d.as_secs()));
            self.cert_expiry
                .get_or_create(&IdentityLabel {
                    identity: c.identity.to_string(),
                })
                .set(expiry);
        }
        self.certificates
            .set(to_i64(gauges.certificates.len() as u64));
        self.enrolled.set(to_i64(gauges.enrolled as u64));
        self.proxies_active.set(to_i64(gauges.enrolled as u64));
        self.proxies_pending.set(to_i64(gauges.pending as u64));
        self.trust_roots.set(to_i64(gauges.trust_roots as u64));
        let now = std::time::SystemTime::now();
        let invalid = gauges
            .certificates
            .iter()
            .filter(|c| !c.is_valid_at(now))
            .count();
        self.certificates_invalid.set(to_i64(invalid as u64));
        catch_up(&self.untrusted_closed, gauges.untrusted_closed);
        for (reporter, total) in crate::identity::PeerRole::REPORTERS
            .into_iter()
            .zip(gauges.revoked)
        {
            catch_up(
                &self
                    .crl_rejections
                    .get_or_create(&ReporterLabel { reporter }),
                total,
            );
        }
        catch_up(&self.mesh_updates, gauges.mesh.updates);
        let behind = gauges.mesh.seconds_total - self.mesh_update_seconds.get();
        if behind > 0.0 {
            self.mesh_update_seconds.inc_by(behind);
        }
        self.mesh_update_last.set(gauges.mesh.last_seconds);
        self.mesh_workloads
            .set(to_i64(gauges.mesh.workloads as u64));
        self.mesh_services.set(to_i64(gauges.mesh.services as u64));
        self.mesh_policies.set(to_i64(gauges.mesh.policies as u64));
        self.process.set(&process::Reading::now());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Moves `counter` up to `total`, a running total kept elsewhere.
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The labels for a record, filled as ztunnel fills them: the reporter is
/// the side that proxied it; a workload's names come from the mesh (its
/// `workload_name`, canonical service and revision, cluster, locality);
/// the source principal only from a proved identity (none for plain TCP
/// out); the destination principal from the proved identity, else the
/// destination workload's; anything missing or empty is `unknown`.
pub fn labels(r: &ConnectionRecord) -> TcpLabels {
    let reporter = match r.direction {
        Direction::Outbound => "source",
        Direction::Inbound | Direction::InboundPlaintext => "destination",
    };
    let (src, dst) = (&r.src_workload, &r.dst_workload);
    let (st, dt) = (telemetry_of(src), telemetry_of(dst));
    let tel = |t: Option<&Telemetry>, f: fn(&Telemetry) -> &Name| known(t.map(|t| f(t).as_str()));
    let principal = |id: Option<&Identity>| id.map_or_else(|| UNKNOWN.into(), |i| i.to_string());
    // Outbound, the agent speaks for its workload only inside a tunnel:
    // a passthrough connection proves no identity.
    let src_principal = match r.direction {
        Direction::Outbound if !r.encrypted && r.dst_identity.is_none() => None,
        _ => r.src_identity.as_ref(),
    };
    let service = r.service.as_deref();
    TcpLabels {
        reporter,
        source_workload: tel(st, |t| &t.workload_name),
        source_canonical_service: tel(st, |t| &t.canonical_name),
        source_canonical_revision: tel(st, |t| &t.canonical_revision),
        source_workload_namespace: known(src.namespace.as_deref()),
        source_principal: principal(src_principal),
        source_app: tel(st, |t| &t.canonical_name),
        source_version: tel(st, |t| &t.canonical_revision),
        source_cluster: tel(st, |t| &t.cluster),
        destination_service: known(service.map(|s| s.hostname.as_str())),
        destination_service_namespace: known(service.map(|s| s.namespace.as_str())),
        destination_service_name: known(service.map(|s| s.name.as_str())),
        destination_workload: tel(dt, |t| &t.workload_name),
        destination_canonical_service: tel(dt, |t| &t.canonical_name),
        destination_canonical_revision: tel(dt, |t| &t.canonical_revision),
        destination_workload_namespace: known(dst.namespace.as_deref()),
        destination_principal: match (&r.dst_identity, &dst.workload) {
            (Some(id), _) => id.to_string(),
            (None, Some(w)) => w.identity().to_string(),
            (None, None) => UNKNOWN.into(),
        },
        destination_app: tel(dt, |t| &t.canonical_name),
        destination_version: tel(dt, |t| &t.canonical_revision),
        destination_cluster: tel(dt, |t| &t.cluster),
        // ztunnel proxies bytes: always `tcp`.
        request_protocol: "tcp",
        response_flags: r.response_flags(),
        // Istio's metrics say `unknown`, not `none`, for plaintext.
        connection_security_policy: if r.encrypted { "mutual_tls" } else { UNKNOWN },
        source_region: tel(st, |t| &t.region),
        source_zone: tel(st, |t| &t.zone),
        destination_region: tel(dt, |t| &t.region),
        destination_zone: tel(dt, |t| &t.zone),
    }
}

fn telemetry_of(n: &WorkloadName) -> Option<&Telemetry> {
    n.workload.as_ref().map(|w| &*w.telemetry)
}

/// A label value: `unknown` when missing or empty (ztunnel's
/// `DefaultedUnknown`).
fn known(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => UNKNOWN.into(),
    }
}

const UNKNOWN: &str = "unknown";

/// Seconds since the epoch of `t` (0 before it).
pub fn epoch_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::record::WorkloadName;
    use std::time::Duration;

    fn record(error: Option<&str>, opened: bool) -> ConnectionRecord {
        ConnectionRecord {
            direction: Direction::Outbound,
            src: "10.0.0.1".parse().expect("ip"),
            src_port: Some(4000),
            dst: "10.0.0.2:80".parse().expect("addr"),
            src_identity: Some(Identity::new("td", "test", "client")),
            dst_identity: Some(Identity::new("td", "other", "server")),
            service: None,
            src_workload: WorkloadName {
                name: Some("client-7d9f-abcde".into()),
                namespace: Some("test".into()),
                workload: Some(Arc::new(crate::state::Workload {
                    telemetry: Arc::new(Telemetry {
                        workload_name: "client".into(),
                        canonical_name: "client-app".into(),
                        canonical_revision: "v1".into(),
                        cluster: "Kubernetes".into(),
                        region: "eu".into(),
                        zone: "eu-1".into(),
                        subzone: "".into(),
                    }),
                    ..crate::state::Workload::for_test("client", "test", Some("10.0.0.1"))
                })),
            },
            dst_workload: WorkloadName {
                namespace: Some("other".into()),
                ..WorkloadName::default()
            },
            sent: 5,
            received: 7,
            encrypted: true,
            duration: Duration::from_millis(1),
            error: error.map(str::to_string),
            denied: false,
            opened,
        }
    }

    /// ztunnel's label keys in its order (`CommonTrafficLabels`,
    /// istio/ztunnel `src/proxy/metrics.rs`), for `record`: a known source
    /// (labelled by its workload name, canonical service and revision,
    /// cluster and locality, not its pod name) and an unknown destination
    /// workload in namespace `other`; `unknown` for every missing value.
    fn labels_text(flags: &str) -> String {
        format!(
            "reporter=\"source\",source_workload=\"client\",source_canonical_service=\"client-app\",\
             source_canonical_revision=\"v1\",source_workload_namespace=\"test\",\
             source_principal=\"spiffe://td/ns/test/sa/client\",source_app=\"client-app\",\
             source_version=\"v1\",source_cluster=\"Kubernetes\",destination_service=\"unknown\",\
             destination_service_namespace=\"unknown\",destination_service_name=\"unknown\",\
             destination_workload=\"unknown\",destination_canonical_service=\"unknown\",\
             destination_canonical_revision=\"unknown\",destination_workload_namespace=\"other\",\
             destination_principal=\"spiffe://td/ns/other/sa/server\",destination_app=\"unknown\",\
             destination_version=\"unknown\",destination_cluster=\"unknown\",request_protocol=\"tcp\",\
             response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\",\
             source_region=\"eu\",source_zone=\"eu-1\",destination_region=\"unknown\",\
             destination_zone=\"unknown\""
        )
    }

    #[test]
    fn opened_counts_at_open_and_closed_at_close() {
        let m = Metrics::new();
        let r = record(None, true);
        m.opened(&r);
        let text = m.encode(&AgentGauges::default()).expect("encode");
        let opened = format!(
            "istio_tcp_connections_opened_total{{{}}} 1",
            labels_text("-")
        );
        assert!(text.contains(&opened), "{opened}\nnot in\n{text}");
        assert!(
            !text.contains("istio_tcp_connections_closed_total{"),
            "{text}"
        );

        m.closed(&r);
        let text = m.encode(&AgentGauges::default()).expect("encode");
        let want = labels_text("-");
        for line in [
            format!("istio_tcp_connections_opened_total{{{want}}} 1"),
            format!("istio_tcp_connections_closed_total{{{want}}} 1"),
            format!("istio_tcp_received_bytes_total{{{want}}} 5"),
            format!("istio_tcp_sent_bytes_total{{{want}}} 7"),
        ] {
            assert!(text.contains(&line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn ztunnels_workload_manager_gauges() {
        // istio/ztunnel src/inpod/metrics.rs: gauges on the root registry
        // (no istio_ prefix), read by Istio's Ztunnel dashboard.
        let m = Metrics::new();
        let text = m
            .encode(&AgentGauges {
                enrolled: 3,
                pending: 1,
                ..Default::default()
            })
            .expect("encode");
        for line in [
            "workload_manager_active_proxy_count 3",
            "workload_manager_pending_proxy_count 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn a_connection_that_never_opened_counts_both_at_close() {
        let m = Metrics::new();
        m.closed(&record(Some("destination unreachable: gone"), false));
        let text = m.encode(&AgentGauges::default()).expect("encode");
        let want = labels_text("NR");
        for line in [
            format!("istio_tcp_connections_opened_total{{{want}}} 1"),
            format!("istio_tcp_connections_closed_total{{{want}}} 1"),
        ] {
            assert!(text.contains(&line), "{line}\nnot in\n{text}");
        }
    }
}
