//! The admin `GET /config_dump` document: what the agent knows and holds —
//! workloads, services, policies, certificates, pool and served workloads —
//! as JSON, for people and scripts debugging a node. The mesh and the
//! certificates are in ztunnel's shape ([`ztunnel`]), so `istioctl
//! ztunnel-config` reads them; the other sections are this agent's own.

mod settings;
mod ztunnel;

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::hbone::pool::PoolStats;
use crate::identity::WorkloadCert;
use crate::state::{Snapshot, Workload};
use crate::xds::delta::XdsStatus;

use super::metrics::epoch_seconds;

/// Everything the dump shows.
pub struct DumpInput<'a> {
    pub node: &'a str,
    pub snapshot: &'a Snapshot,
    pub certificates: &'a [Arc<WorkloadCert>],
    pub pool: PoolStats,
    pub served: &'a [Arc<Workload>],
    pub now: SystemTime,
    /// Istio mode: the xDS client's state.
    pub xds: Option<XdsStatus>,
    /// The DNS proxy's settings, if it runs.
    pub dns: Option<&'a crate::dns::DnsSettings>,
    /// The trust anchors and revocation lists in force.
    pub trust: &'a crate::identity::TrustBundle,
    /// Open HBONE connections whose peer chain is watched, and how many
    /// were closed for an untrusted root.
    pub trust_peers: usize,
    pub untrusted_closed: u64,
    pub settings: &'a Settings,
}

/// The `config` and `version` sections, in ztunnel's shape: built once at
/// start, since neither changes while the agent runs.
#[derive(Clone, Debug)]
pub struct Settings {
    config: Value,
    version: Value,
}

impl Settings {
    /// From the agent's configuration and its runtime's worker count.
    pub fn new(cfg: &crate::config::Config, workers: usize, istio_version: &str) -> Settings {
        Settings {
            config: settings::config(cfg, workers),
            version: settings::version(istio_version),
        }
    }
}

/// Builds the config dump.
pub fn dump(input: &DumpInput<'_>) -> Value {
    let mesh = input.snapshot.to_mesh();
    let mut served: Vec<&str> = input.served.iter().map(|w| w.uid.as_str()).collect();
    served.sort_unstable();
    json!({
        "node": input.node,
        // What istioctl ztunnel-config reads, in ztunnel's shape.
        "workloads": ztunnel::workloads(&mesh),
        "services": ztunnel::services(&mesh),
        "policies": ztunnel::policies(&mesh),
        "certificates": ztunnel::certificates(input.certificates, &input.trust.roots, input.now),
        "config": input.settings.config,
        "version": input.settings.version,
        // Ours.
        "certificateExpiry": input.certificates.iter().map(|c| json!({
            "identity": c.identity.to_string(),
            "notBefore": epoch_seconds(c.not_before),
            "notAfter": epoch_seconds(c.not_after),
            "expiresInSeconds": c.not_after.duration_since(input.now).map_or(0, |d| d.as_secs()),
            "valid": c.is_valid_at(input.now),
        })).collect::<Vec<_>>(),
        "pool": {
            "connectionsOpened": input.pool.connections_opened,
            "connectionsOpen": input.pool.connections_open,
            "streamsActive": input.pool.streams_active,
        },
        "enrolledWorkloads": served,
        "dns": input.dns.map(|d| dns(d, &mesh)),
        "trust": trust(input),
        "xds": input.xds.as_ref().map(|x| json!({
            "connected": x.connected,
            "synced": x.synced,
            "resources": x.resources,
            "acks": x.acks,
            "nacks": x.nacks,
            "lastNack": x.last_nack,
            "lastError": x.last_error,
            // What istiod sent that this agent does not act on yet.
            "ignoredFields": x.ignored_fields,
        })),
    })
}

/// The trust anchors (subject, validity, SHA-256 of the DER) and
/// revocation lists (issuer, entries) in force: what a rotation or a CRL
/// reload changed.
fn trust(input: &DumpInput<'_>) -> Value {
    use sha2::{Digest, Sha256};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let hex = |d: &[u8]| -> String {
        Sha256::digest(d)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let roots: Vec<Value> = input
        .trust
        .roots
        .iter()
        .map(|r| match X509Certificate::from_der(r) {
            Ok((_, c)) => json!({
                "subject": c.subject().to_string(),
                "notAfter": c.validity().not_after.timestamp(),
                "sha256": hex(r),
            }),
            Err(_) => json!({"sha256": hex(r), "unparsable": true}),
        })
        .collect();
    let crls: Vec<Value> = input
        .trust
        .crls
        .iter()
        .map(|c| {
            use x509_parser::revocation_list::CertificateRevocationList;
            match CertificateRevocationList::from_der(c) {
                Ok((_, l)) => json!({
                    "issuer": l.issuer().to_string(),
                    "revoked": l.iter_revoked_certificates().count(),
                    "sha256": hex(c),
                }),
                Err(_) => json!({"sha256": hex(c), "unparsable": true}),
            }
        })
        .collect();
    json!({
        "generation": input.trust.generation,
        "roots": roots,
        "crls": crls,
        "watchedConnections": input.trust_peers,
        "untrustedConnectionsClosed": input.untrusted_closed,
    })
}

/// The DNS proxy's settings and the names it answers from the mesh.
fn dns(d: &crate::dns::DnsSettings, mesh: &crate::state::Mesh) -> Value {
    let mut names: Vec<Value> = mesh
        .services
        .iter()
        .map(|s| {
            json!({
                "hostname": s.hostname,
                "namespace": s.namespace,
                "addresses": s.vips,
                "headless": s.vips.is_empty(),
            })
        })
        .collect();
    names.sort_by(|a, b| a["hostname"].as_str().cmp(&b["hostname"].as_str()));
    json!({
        "port": d.port,
        "upstreams": d.upstreams,
        "timeoutSeconds": d.timeout.as_secs_f64(),
        "clusterDomain": d.cluster_domain,
        "names": names,
    })
}
