//! The sections of `/config_dump` that `istioctl ztunnel-config` reads
//! (`workloads`, `services`, `policies`, `certificates`), in ztunnel's
//! shape: its admin's JSON (istio/ztunnel `src/state/workload.rs`,
//! `src/state/service.rs`, `src/rbac.rs`, `src/admin.rs`), which istioctl
//! decodes into its own structs (istio/istio
//! `istioctl/pkg/writer/ztunnel/configdump/api.go`). Field names are
//! camelCase, enum values PascalCase; a value ztunnel leaves out when empty
//! is left out here too.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::identity::WorkloadCert;
use crate::state::{
    ApplicationTunnel, GatewayAddress, GatewayTarget, IpFamilies, LbScope, Match, Mesh, Policy,
    PolicyAction, PolicyScope, Service, ServiceAccountMatch, StringMatch, TunnelProtocol,
    Visibility, Workload,
};

/// Workloads, sorted by uid as ztunnel's are.
pub fn workloads(mesh: &Mesh) -> Value {
    // A workload's services and the policies that select it, which
    // ztunnel keeps on the workload and this model keeps on the other side.
    let mut services: HashMap<&str, Vec<String>> = HashMap::new();
    for s in &mesh.services {
        for e in &s.endpoints {
            let key = format!("{}/{}", s.namespace, s.hostname);
            services
                .entry(e.workload_uid.as_str())
                .or_default()
                .push(key);
        }
    }
    let mut policies: HashMap<&str, Vec<String>> = HashMap::new();
    for p in &mesh.policies {
        if let PolicyScope::WorkloadSelector { workload_uids } = &p.scope {
            for uid in workload_uids {
                policies.entry(uid.as_str()).or_default().push(p.key());
            }
        }
    }
    let mut ws: Vec<&Workload> = mesh.workloads.iter().collect();
    ws.sort_by(|a, b| a.uid.cmp(&b.uid));
    ws.iter()
        .map(|w| {
            workload(
                w,
                services.get(w.uid.as_str()),
                policies.get(w.uid.as_str()),
            )
        })
        .collect()
}

fn workload(w: &Workload, services: Option<&Vec<String>>, policies: Option<&Vec<String>>) -> Value {
    let t = &w.telemetry;
    let mut o = Map::new();
    let mut put = |k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    put("uid", json!(w.uid));
    put("workloadIps", json!(w.addresses.as_slice()));
    put("protocol", json!(protocol(w.protocol)));
    put("networkMode", json!("Standard"));
    put("name", json!(w.name));
    put("namespace", json!(w.namespace));
    put("trustDomain", json!(w.trust_domain));
    put("serviceAccount", json!(w.service_account));
    put("node", json!(w.node));
    put(
        "status",
        json!(if w.healthy { "Healthy" } else { "Unhealthy" }),
    );
    put("clusterId", json!(t.cluster));
    put("capacity", json!(w.capacity));
    for (k, v) in [
        ("workloadName", &t.workload_name),
        ("canonicalName", &t.canonical_name),
        ("canonicalRevision", &t.canonical_revision),
    ] {
        if !v.is_empty() {
            put(k, json!(v));
        }
    }
    if !(t.region.is_empty() && t.zone.is_empty() && t.subzone.is_empty()) {
        put(
            "locality",
            json!({"region": t.region, "zone": t.zone, "subzone": t.subzone}),
        );
    }
    if let Some(wp) = &w.waypoint {
        put("waypoint", gateway(wp));
    }
    if !w.network_name().is_empty() {
        put("network", json!(w.network_name()));
    }
    if let Some(gw) = w.network_gateway() {
        put("networkGateway", gateway(gw));
    }
    if let Some(h) = &w.hostname {
        put("hostname", json!(h.as_str()));
    }
    match w.application_tunnel {
        ApplicationTunnel::None => {}
        ApplicationTunnel::Proxy { port } => put(
            "applicationTunnel",
            json!({"protocol": "PROXY", "port": port}),
        ),
        ApplicationTunnel::Unsupported(p) => put(
            "applicationTunnel",
            json!({"protocol": format!("Unsupported({p})"), "port": null}),
        ),
    }
    if let Some(s) = services.filter(|s| !s.is_empty()) {
        put("services", json!(s));
    }
    if let Some(p) = policies.filter(|p| !p.is_empty()) {
        put("authorizationPolicies", json!(p));
    }
    // Ours: the identity the workload's certificate carries.
    put("identity", json!(w.identity().to_string()));
    Value::Object(o)
}

fn protocol(p: TunnelProtocol) -> String {
    match p {
        TunnelProtocol::None => "TCP".into(),
        TunnelProtocol::Hbone => "HBONE".into(),
        TunnelProtocol::Unsupported(v) => format!("Unsupported({v})"),
    }
}

/// `GatewayAddress`: `destination` is `namespace/hostname` or
/// `network/ip` (the network empty here: one network).
fn gateway(w: &GatewayAddress) -> Value {
    let destination = match &w.target {
        GatewayTarget::Address(ip) => format!("/{ip}"),
        GatewayTarget::Service {
            namespace,
            hostname,
        } => format!("{namespace}/{hostname}"),
    };
    json!({"destination": destination, "hboneMtlsPort": w.hbone_port})
}

/// Services, ordered by `namespace/hostname`.
pub fn services(mesh: &Mesh) -> Value {
    let health: HashMap<&str, bool> = mesh
        .workloads
        .iter()
        .map(|w| (w.uid.as_str(), w.healthy))
        .collect();
    let mut ss: Vec<&Service> = mesh.services.iter().collect();
    ss.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    ss.iter().map(|s| service(s, &health)).collect()
}

fn service(s: &Service, health: &HashMap<&str, bool>) -> Value {
    // JSON object keys are strings: `{"80": 8080}`.
    let ports: BTreeMap<String, u16> = s
        .ports
        .iter()
        .map(|p| (p.port.to_string(), p.target_port))
        .collect();
    let endpoints: BTreeMap<&str, Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let uid = e.workload_uid.as_str();
            let healthy = health.get(uid).copied().unwrap_or(false);
            let status = if healthy { "Healthy" } else { "Unhealthy" };
            (
                uid,
                json!({"workloadUid": uid, "port": ports, "status": status}),
            )
        })
        .collect();
    let mut o = Map::new();
    o.insert("name".into(), json!(s.name));
    o.insert("namespace".into(), json!(s.namespace));
    o.insert("hostname".into(), json!(s.hostname));
    let vips: Vec<String> = s.vips.iter().map(|ip| format!("/{ip}")).collect();
    o.insert("vips".into(), json!(vips));
    o.insert("ports".into(), json!(ports));
    o.insert("endpoints".into(), json!(endpoints));
    o.insert("subjectAltNames".into(), json!(s.subject_alt_names));
    o.insert("canonical".into(), json!(false));
    o.insert(
        "visibility".into(),
        json!(match s.visibility {
            Visibility::Public => "Public",
            Visibility::Namespace => "Namespace",
        }),
    );
    let families = match s.ip_families {
        IpFamilies::Automatic => None,
        IpFamilies::V4Only => Some("IPv4"),
        IpFamilies::V6Only => Some("IPv6"),
        IpFamilies::Dual => Some("Dual"),
    };
    if let Some(f) = families {
        o.insert("ipFamilies".into(), json!(f));
    }
    if let Some(wp) = &s.waypoint {
        o.insert("waypoint".into(), gateway(wp));
    }
    if let Some(lb) = &s.load_balancing {
        let scopes: Vec<String> = lb
            .routing_preference
            .iter()
            .map(|s| match s {
                LbScope::Unknown(v) => format!("Unknown({v})"),
                known => format!("{known:?}"),
            })
            .collect();
        o.insert(
            "loadBalancer".into(),
            json!({
                "routingPreferences": scopes,
                "mode": format!("{:?}", lb.mode),
                "healthPolicy": format!("{:?}", lb.health_policy),
            }),
        );
    }
    Value::Object(o)
}

/// Authorization policies, sorted by `namespace/name`.
pub fn policies(mesh: &Mesh) -> Value {
    let mut ps: Vec<&Policy> = mesh.policies.iter().collect();
    ps.sort_by_key(|p| p.key());
    ps.iter().map(|p| policy(p)).collect()
}

fn policy(p: &Policy) -> Value {
    let rules: Vec<Vec<Vec<Value>>> = p
        .rules
        .iter()
        .map(|r| {
            r.clauses
                .iter()
                .map(|c| c.matches.iter().map(rbac_match).collect())
                .collect()
        })
        .collect();
    // What this agent could not read of each part (its own field).
    let unsupported: Vec<&String> = p
        .rules
        .iter()
        .flat_map(|r| {
            r.unsupported.iter().chain(r.clauses.iter().flat_map(|c| {
                c.unsupported
                    .iter()
                    .chain(c.matches.iter().flat_map(|m| &m.unsupported))
            }))
        })
        .chain(&p.unsupported)
        .collect();
    json!({
        "name": p.name,
        "namespace": p.namespace,
        "scope": match &p.scope {
            PolicyScope::Global => "Global",
            PolicyScope::Namespace => "Namespace",
            PolicyScope::WorkloadSelector { .. } => "WorkloadSelector",
        },
        "action": match p.action {
            PolicyAction::Allow => "Allow",
            PolicyAction::Deny => "Deny",
        },
        "rules": rules,
        "dryRun": p.dry_run,
        "unsupported": unsupported,
    })
}

/// `RbacMatch`: each list left out when empty.
fn rbac_match(m: &Match) -> Value {
    let mut o = Map::new();
    let strings = |v: &[StringMatch]| -> Value { v.iter().map(string_match).collect() };
    let accounts = |v: &[ServiceAccountMatch]| -> Value {
        v.iter()
            .map(|a| json!({"namespace": a.namespace, "serviceAccount": a.name}))
            .collect()
    };
    let nets = |v: &[ipnet::IpNet]| -> Value { v.iter().map(|n| json!(n.to_string())).collect() };
    let fields: [(&str, bool, Value); 12] = [
        (
            "namespaces",
            m.namespaces.is_empty(),
            strings(&m.namespaces),
        ),
        (
            "notNamespaces",
            m.not_namespaces.is_empty(),
            strings(&m.not_namespaces),
        ),
        (
            "serviceAccounts",
            m.service_accounts.is_empty(),
            accounts(&m.service_accounts),
        ),
        (
            "notServiceAccounts",
            m.not_service_accounts.is_empty(),
            accounts(&m.not_service_accounts),
        ),
        (
            "principals",
            m.principals.is_empty(),
            strings(&m.principals),
        ),
        (
            "notPrincipals",
            m.not_principals.is_empty(),
            strings(&m.not_principals),
        ),
        ("sourceIps", m.source_ips.is_empty(), nets(&m.source_ips)),
        (
            "notSourceIps",
            m.not_source_ips.is_empty(),
            nets(&m.not_source_ips),
        ),
        (
            "destinationIps",
            m.destination_ips.is_empty(),
            nets(&m.destination_ips),
        ),
        (
            "notDestinationIps",
            m.not_destination_ips.is_empty(),
            nets(&m.not_destination_ips),
        ),
        (
            "destinationPorts",
            m.destination_ports.is_empty(),
            json!(m.destination_ports),
        ),
        (
            "notDestinationPorts",
            m.not_destination_ports.is_empty(),
            json!(m.not_destination_ports),
        ),
    ];
    for (k, empty, v) in fields {
        if !empty {
            o.insert(k.into(), v);
        }
    }
    Value::Object(o)
}

/// serde's externally tagged enum, as ztunnel's `StringMatching`.
fn string_match(s: &StringMatch) -> Value {
    match s {
        StringMatch::Exact(v) => json!({"Exact": v}),
        StringMatch::Prefix(v) => json!({"Prefix": v}),
        StringMatch::Suffix(v) => json!({"Suffix": v}),
        StringMatch::Presence => json!({"Presence": []}),
    }
}

/// Certificates by identity: the chain the workload presents (leaf
/// first) and the roots it trusts, each as ztunnel's `CertDump`.
pub fn certificates(
    certs: &[std::sync::Arc<WorkloadCert>],
    roots: &[rustls_pki_types::CertificateDer<'static>],
    now: SystemTime,
) -> Value {
    let mut cs: Vec<&WorkloadCert> = certs.iter().map(|c| &**c).collect();
    cs.sort_by_key(|c| c.identity.to_string());
    let roots: Vec<Value> = roots.iter().map(|r| cert(r)).collect();
    cs.iter()
        .map(|c| {
            let state = if c.is_valid_at(now) {
                "Available".to_string()
            } else {
                "Unavailable: certificate expired or not yet valid".to_string()
            };
            json!({
                "identity": c.identity.to_string(),
                "state": state,
                "certChain": c.chain.iter().map(|d| cert(d)).collect::<Vec<_>>(),
                "rootCerts": roots,
            })
        })
        .collect()
}

/// `pem`: base64 of the PEM text; `serialNumber`: decimal;
/// `validFrom`/`expirationTime`: RFC 3339 in UTC to the second.
fn cert(der: &[u8]) -> Value {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = pem_text(der);
    match X509Certificate::from_der(der) {
        Ok((_, c)) => json!({
            "pem": b64.encode(pem),
            "serialNumber": c.tbs_certificate.serial.to_string(),
            "validFrom": rfc3339(c.validity().not_before.to_datetime()),
            "expirationTime": rfc3339(c.validity().not_after.to_datetime()),
        }),
        Err(_) => json!({"pem": b64.encode(pem), "unparsable": true}),
    }
}

fn pem_text(der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_pem_as_ztunnel_writes_them() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_678_514_246).expect("time");
        assert_eq!(rfc3339(t), "2023-03-11T05:57:26Z");
        let pem = pem_text(&[0u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
    }
}
