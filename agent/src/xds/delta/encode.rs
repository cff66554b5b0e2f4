//! Model -> proto, the inverse of [`convert`](super::convert): a [`Mesh`]
//! as istiod would serve it, for test control planes and tools.
//!
//! Service membership is written on the workload side, as istiod does
//! (`Workload.services["namespace/hostname"]`), and selector-scoped
//! policies are listed in `Workload.authorization_policies`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use ambient_proto::prost_types::Any;
use ambient_proto::{
    security as pb_sec, workload as pb, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL, ROUTE_TYPE_URL,
};
use ipnet::IpNet;

use crate::state::{
    ApplicationTunnel, GatewayAddress, GatewayTarget, HealthPolicy, LbMode, LbScope, LoadBalancing,
    Match, Mesh, Policy, PolicyAction, PolicyScope, Service, ServiceAccountMatch, StringMatch,
    Telemetry, TunnelProtocol, Workload, DEFAULT_CLUSTER,
};

/// Why a mesh cannot be served over xDS.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("policy {0}: what this agent did not understand cannot be served again")]
    Unsupported(String),
    #[error("{name}: {source}")]
    Encode {
        name: String,
        #[source]
        source: ambient_proto::prost::EncodeError,
    },
}

/// A mesh as xDS resources: name -> body, per type URL.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedMesh {
    /// `istio.workload.Address` by uid (workloads) or `namespace/hostname`.
    pub addresses: BTreeMap<String, Any>,
    /// `istio.security.Authorization` by `namespace/name`.
    pub authorizations: BTreeMap<String, Any>,
    /// A waypoint's routes and their clusters' endpoints.
    pub routes: super::routes::EncodedRoutes,
}

impl EncodedMesh {
    /// The resources of `type_url` (empty for an unknown type).
    pub fn of_type(&self, type_url: &str) -> BTreeMap<String, Any> {
        match type_url {
            ADDRESS_TYPE_URL => self.addresses.clone(),
            AUTHORIZATION_TYPE_URL => self.authorizations.clone(),
            ROUTE_TYPE_URL => self.routes.routes.clone(),
            ENDPOINT_TYPE_URL => self.routes.endpoints.clone(),
            CLUSTER_TYPE_URL => self.routes.clusters.clone(),
            _ => BTreeMap::new(),
        }
    }
}

/// Encodes `mesh` as istiod would serve it.
pub fn encode_mesh(mesh: &Mesh) -> Result<EncodedMesh, EncodeError> {
    let mut out = EncodedMesh::default();
    // What each workload refers to, found once rather than per workload.
    let mut refs: HashMap<&str, Refs<'_>> = HashMap::new();
    for s in &mesh.services {
        for e in &s.endpoints {
            refs.entry(&e.workload_uid).or_default().services.push(s);
        }
    }
    for p in &mesh.policies {
        if let PolicyScope::WorkloadSelector { workload_uids } = &p.scope {
            for uid in workload_uids {
                refs.entry(uid).or_default().policies.push(p);
            }
        }
    }
    let none = Refs::default();
    for w in &mesh.workloads {
        let r = refs.get(w.uid.as_str()).unwrap_or(&none);
        let msg = pb::Address {
            r#type: Some(pb::address::Type::Workload(workload(r, w))),
        };
        out.addresses.insert(w.uid.to_string(), any(&w.uid, &msg)?);
    }
    for s in &mesh.services {
        let name = format!("{}/{}", s.namespace, s.hostname);
        let msg = pb::Address {
            r#type: Some(pb::address::Type::Service(service(s))),
        };
        out.addresses.insert(name.clone(), any(&name, &msg)?);
    }
    for p in &mesh.policies {
        let name = p.key();
        let msg = authorization(p)?;
        out.authorizations.insert(name.clone(), any(&name, &msg)?);
    }
    out.routes = super::routes::encode_routes(mesh)?;
    Ok(out)
}

/// `mesh` as a client reads it back from xDS: entries in resource-name
/// order, endpoints and selectors in uid order, no netns or cgroup (local
/// mode only; pods come through ZDS). `canonical(m) == decode(encode_mesh(m))`.
pub fn canonical(mesh: &Mesh) -> Mesh {
    let mut m = mesh.clone();
    m.workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    for w in &mut m.workloads {
        w.local = None;
        if w.telemetry.cluster.is_empty() {
            Arc::make_mut(&mut w.telemetry).cluster = DEFAULT_CLUSTER.into();
        }
    }
    m.services
        .sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
    for s in &mut m.services {
        s.endpoints
            .sort_by(|a, b| a.workload_uid.cmp(&b.workload_uid));
    }
    // L7 routes are waypoint configuration, which node agents do not
    // subscribe to.
    m.http_routes.clear();
    m.policies.sort_by_key(Policy::key);
    for p in &mut m.policies {
        if let PolicyScope::WorkloadSelector { workload_uids } = &mut p.scope {
            workload_uids.sort();
            workload_uids.dedup();
        }
    }
    m
}

fn any<M: ambient_proto::prost::Name>(name: &str, msg: &M) -> Result<Any, EncodeError> {
    Any::from_msg(msg).map_err(|source| EncodeError::Encode {
        name: name.to_string(),
        source,
    })
}

fn ip_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The services a workload backs and the selector policies naming it.
#[derive(Default)]
struct Refs<'a> {
    services: Vec<&'a Service>,
    policies: Vec<&'a Policy>,
}

fn workload(refs: &Refs<'_>, w: &Workload) -> pb::Workload {
    let services = refs
        .services
        .iter()
        .map(|s| {
            let ports = s.ports.iter().map(|p| pb::Port {
                service_port: p.port.into(),
                target_port: p.target_port.into(),
                ..Default::default()
            });
            let key = format!("{}/{}", s.namespace, s.hostname);
            (
                key,
                pb::PortList {
                    ports: ports.collect(),
                },
            )
        })
        .collect();
    let authorization_policies = refs.policies.iter().map(|p| p.key()).collect();
    pb::Workload {
        uid: w.uid.to_string(),
        name: w.name.to_string(),
        namespace: w.namespace.to_string(),
        addresses: w.addresses.iter().map(|ip| ip_bytes(*ip)).collect(),
        tunnel_protocol: match w.protocol {
            TunnelProtocol::None => pb::TunnelProtocol::None as i32,
            TunnelProtocol::Hbone => pb::TunnelProtocol::Hbone as i32,
            TunnelProtocol::Unsupported(p) => p,
        },
        trust_domain: w.trust_domain.to_string(),
        service_account: w.service_account.to_string(),
        waypoint: w.waypoint.as_deref().map(gateway),
        node: w.node.to_string(),
        status: if w.healthy {
            pb::WorkloadStatus::Healthy
        } else {
            pb::WorkloadStatus::Unhealthy
        } as i32,
        services,
        authorization_policies,
        application_tunnel: match w.application_tunnel {
            ApplicationTunnel::None => None,
            ApplicationTunnel::Proxy { port } => Some(pb::ApplicationTunnel {
                protocol: pb::application_tunnel::Protocol::Proxy as i32,
                port: port.map_or(0, u32::from),
            }),
            ApplicationTunnel::Unsupported(protocol) => {
                Some(pb::ApplicationTunnel { protocol, port: 0 })
            }
        },
        capacity: (w.capacity != 1).then_some(w.capacity),
        workload_name: w.telemetry.workload_name.to_string(),
        canonical_name: w.telemetry.canonical_name.to_string(),
        canonical_revision: w.telemetry.canonical_revision.to_string(),
        cluster_id: w.telemetry.cluster.to_string(),
        locality: locality(&w.telemetry),
        network: w.network_name().to_string(),
        network_gateway: w.network_gateway().map(gateway),
        hostname: w.hostname.as_ref().map_or(String::new(), |h| h.to_string()),
        ..Default::default()
    }
}

fn locality(t: &Telemetry) -> Option<pb::Locality> {
    (!t.region.is_empty() || !t.zone.is_empty() || !t.subzone.is_empty()).then(|| pb::Locality {
        region: t.region.to_string(),
        zone: t.zone.to_string(),
        subzone: t.subzone.to_string(),
    })
}

fn service(s: &Service) -> pb::Service {
    pb::Service {
        name: s.name.to_string(),
        namespace: s.namespace.to_string(),
        hostname: s.hostname.to_string(),
        addresses: s
            .vips
            .iter()
            .map(|ip| pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
                ..Default::default()
            })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|p| pb::Port {
                service_port: p.port.into(),
                target_port: p.target_port.into(),
                ..Default::default()
            })
            .collect(),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_deref().map(gateway),
        visibility: match s.visibility {
            crate::state::Visibility::Public => pb::service::Visibility::Public,
            crate::state::Visibility::Namespace => pb::service::Visibility::Namespace,
        } as i32,
        ip_families: match s.ip_families {
            crate::state::IpFamilies::Automatic => pb::IpFamilies::Automatic,
            crate::state::IpFamilies::V4Only => pb::IpFamilies::Ipv4Only,
            crate::state::IpFamilies::V6Only => pb::IpFamilies::Ipv6Only,
            crate::state::IpFamilies::Dual => pb::IpFamilies::Dual,
        } as i32,
        load_balancing: s.load_balancing.as_deref().map(load_balancing),
        ..Default::default()
    }
}

fn load_balancing(lb: &LoadBalancing) -> pb::LoadBalancing {
    use pb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    pb::LoadBalancing {
        routing_preference: lb
            .routing_preference
            .iter()
            .map(|s| match s {
                LbScope::Region => S::Region as i32,
                LbScope::Zone => S::Zone as i32,
                LbScope::Subzone => S::Subzone as i32,
                LbScope::Node => S::Node as i32,
                LbScope::Cluster => S::Cluster as i32,
                LbScope::Network => S::Network as i32,
                LbScope::Unknown(v) => *v,
            })
            .collect(),
        mode: match lb.mode {
            LbMode::Standard => M::UnspecifiedMode,
            LbMode::Strict => M::Strict,
            LbMode::Failover => M::Failover,
            LbMode::Passthrough => M::Passthrough,
        } as i32,
        health_policy: match lb.health_policy {
            HealthPolicy::OnlyHealthy => H::OnlyHealthy,
            HealthPolicy::AllowAll => H::AllowAll,
        } as i32,
    }
}

fn gateway(w: &GatewayAddress) -> pb::GatewayAddress {
    use pb::gateway_address::Destination;
    pb::GatewayAddress {
        destination: Some(match &w.target {
            GatewayTarget::Address(ip) => Destination::Address(pb::NetworkAddress {
                network: String::new(),
                address: ip_bytes(*ip),
                ..Default::default()
            }),
            GatewayTarget::Service {
                namespace,
                hostname,
            } => Destination::Hostname(pb::NamespacedHostname {
                namespace: namespace.to_string(),
                hostname: hostname.to_string(),
            }),
        }),
        hbone_mtls_port: w.hbone_port.into(),
    }
}

fn authorization(p: &Policy) -> Result<pb_sec::Authorization, EncodeError> {
    let unsupported = !p.unsupported.is_empty()
        || p.rules.iter().any(|r| {
            !r.unsupported.is_empty()
                || r.clauses.iter().any(|c| {
                    !c.unsupported.is_empty() || c.matches.iter().any(|m| !m.unsupported.is_empty())
                })
        });
    if unsupported {
        return Err(EncodeError::Unsupported(p.key()));
    }
    // Request conditions have no place in istio.security.Authorization;
    // as istiod translates for ztunnel (pilot/pkg/serviceregistry/ambient/
    // authorization.go, handleRule): an ALLOW's rule with any is dropped
    // (it never matches at L4), a DENY keeps its L4 conditions (a match
    // left with none is skipped, a no-op).
    let with_request = |r: &&crate::state::Rule| {
        r.clauses
            .iter()
            .any(|c| c.matches.iter().any(|m| m.request.is_some()))
    };
    let rules = p
        .rules
        .iter()
        .filter(|r| p.action == PolicyAction::Deny || !with_request(r))
        .map(|r| pb_sec::Rule {
            clauses: r
                .clauses
                .iter()
                .map(|c| pb_sec::Clause {
                    matches: c.matches.iter().map(match_entry).collect(),
                })
                .collect(),
        })
        .collect();
    Ok(pb_sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            PolicyScope::Global => pb_sec::Scope::Global,
            PolicyScope::Namespace => pb_sec::Scope::Namespace,
            PolicyScope::WorkloadSelector { .. } => pb_sec::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            PolicyAction::Allow => pb_sec::Action::Allow,
            PolicyAction::Deny => pb_sec::Action::Deny,
        } as i32,
        rules,
        dry_run: p.dry_run,
        extensions: Vec::new(),
    })
}

fn match_entry(m: &Match) -> pb_sec::Match {
    let strings = |v: &[StringMatch]| v.iter().map(string_match).collect();
    let nets = |v: &[IpNet]| {
        v.iter()
            .map(|n| pb_sec::Address {
                address: ip_bytes(n.addr()),
                length: n.prefix_len().into(),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|a| pb_sec::ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.name.clone(),
            })
            .collect()
    };
    pb_sec::Match {
        namespaces: strings(&m.namespaces),
        not_namespaces: strings(&m.not_namespaces),
        principals: strings(&m.principals),
        not_principals: strings(&m.not_principals),
        source_ips: nets(&m.source_ips),
        not_source_ips: nets(&m.not_source_ips),
        destination_ips: nets(&m.destination_ips),
        not_destination_ips: nets(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        extensions: Vec::new(),
    }
}

fn string_match(s: &StringMatch) -> pb_sec::StringMatch {
    use pb_sec::string_match::MatchType;
    pb_sec::StringMatch {
        match_type: Some(match s {
            StringMatch::Exact(v) => MatchType::Exact(v.clone()),
            StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
            StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
            StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}
