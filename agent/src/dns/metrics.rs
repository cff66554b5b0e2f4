//! Istio's DNS metrics, as ztunnel exports them (src/dns/metrics.rs):
//! `istio_dns_requests_total` (every query answered, from the mesh or
//! forwarded), `istio_dns_upstream_requests_total`,
//! `istio_dns_upstream_failures_total` (no answer, or an answer without
//! records: NXDOMAIN, NODATA, SERVFAIL...) and
//! `istio_dns_upstream_request_duration_seconds`, each labelled with the
//! query type, the protocol and the client's canonical service and
//! revision.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upstream latency buckets, seconds (ztunnel's).
const BUCKETS: [f64; 6] = [0.0005, 0.001, 0.01, 0.1, 1.0, 5.0];

/// The labels of every DNS metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// Lowercase record type (`a`, `aaaa`...); `unknown` without exactly
    /// one question.
    pub request_query_type: String,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// The DNS proxy's counters.
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        DnsMetrics {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
        }
    }
}

impl DnsMetrics {
    /// Adds the metrics to `registry` (counters get `_total` there).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_dns_requests",
            "DNS queries answered by the proxy",
            self.requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to an upstream resolver",
            self.upstream_requests.clone(),
        );
        registry.register(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries that got no answer or no records",
            self.upstream_failures.clone(),
        );
        registry.register(
            "istio_dns_upstream_request_duration_seconds",
            "Time upstream resolvers took to answer",
            self.upstream_duration.clone(),
        );
    }

    pub fn request(&self, l: &DnsLabels) {
        self.requests.get_or_create(l).inc();
    }

    /// A forwarded query, how long it took, and whether it failed.
    pub fn upstream(&self, l: &DnsLabels, seconds: f64, failed: bool) {
        self.upstream_requests.get_or_create(l).inc();
        self.upstream_duration.get_or_create(l).observe(seconds);
        if failed {
            self.upstream_failures.get_or_create(l).inc();
        }
    }
}
