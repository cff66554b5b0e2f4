//! Proto -> model: each resource is decoded and checked on its own
//! ([`decode`]). What spans resources (addresses used twice, references
//! between workloads, services and policies) is the business of
//! [`Resources`](super::resources::Resources).
//!
//! The rules follow local mode's (see [`crate::xds::local`]) with the
//! differences a real istiod needs: a workload may have no address (DNS
//! workloads) and no node (VMs, remote clusters), a service may have no
//! VIP (headless), and a reference to a service or policy that has not
//! arrived is simply not followed yet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ambient_proto::prost_types::Any;
use ambient_proto::unknown::{self, Unknown};
use ambient_proto::{security as pb_sec, workload as pb, ADDRESS_TYPE_URL};
use ipnet::IpNet;

use crate::identity::Identity;
use crate::state::{
    Addresses, ApplicationTunnel, Clause, GatewayAddress, GatewayTarget, HealthPolicy, LbMode,
    LbScope, LoadBalancing, Match, Network, Policy, PolicyAction, PolicyScope, Rule, Service,
    ServiceAccountMatch, ServicePort, StringMatch, Telemetry, TunnelProtocol, Workload,
    DEFAULT_CLUSTER,
};
use crate::state::{Interner, Name};
use crate::xds::local::Problem;

use super::ignored::Ignored;

pub(super) const DEFAULT_SERVICE_ACCOUNT: &str = "default";
pub(super) const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub(super) const DEFAULT_HBONE_PORT: u16 = 15008;

/// What is wrong with one field of a resource.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    /// A rule shared with local mode.
    #[error(transparent)]
    Problem(#[from] Problem),
    #[error("an IP address must be 4 or 16 bytes, not {0}")]
    AddressLength(usize),
    #[error("prefix length {len} is too long for {ip}")]
    PrefixLength { ip: IpAddr, len: u32 },
    #[error("port {0} is not in 1..=65535")]
    Port(u32),
    #[error("target port {0} is not in 0..=65535")]
    TargetPort(u32),
    #[error("string match has no value")]
    EmptyStringMatch,
    #[error("waypoint has neither an address nor a hostname")]
    WaypointNoDestination,
    #[error("{0:?} is not of the form <namespace>/<hostname>")]
    ServiceKey(String),
    #[error("service account {0:?} needs a namespace and a name, neither with '/'")]
    ServiceAccount(String),
    /// A waypoint's route or endpoint resource.
    #[error(transparent)]
    Route(#[from] super::routes::RouteInvalid),
}

/// Why one resource was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RejectReason {
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("resource has no body")]
    MissingBody,
    #[error("Address holds neither a workload nor a service")]
    EmptyAddress,
    #[error("resource name must be {expected:?} (istiod names resources by uid, namespace/hostname or namespace/name)")]
    Name { expected: String },
    #[error("sent twice in one response")]
    DuplicateName,
    #[error("{field}: {invalid}")]
    Field { field: String, invalid: Invalid },
}

/// A refused resource, by its xDS name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}: {reason}")]
pub struct Rejected {
    pub name: String,
    pub reason: RejectReason,
}

/// Why a whole response was refused (and NACKed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("unknown type URL {0:?}")]
    UnknownType(String),
    #[error("rejected {}: {}", .0.len(), Joined(.0))]
    Rejected(Vec<Rejected>),
}

/// `a; b; c`.
struct Joined<'a>(&'a [Rejected]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

pub(super) fn field(field: impl Into<String>, invalid: impl Into<Invalid>) -> RejectReason {
    RejectReason::Field {
        field: field.into(),
        invalid: invalid.into(),
    }
}

/// A decoded `istio.workload.Address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AddressResource {
    Workload(WorkloadResource),
    /// Endpoints are filled in by the resource set. Boxed: most address
    /// resources are workloads, and the enum is as large as its largest.
    Service(Box<Service>),
}

/// A workload with the references istiod sends on the workload side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct WorkloadResource {
    /// Shared with the snapshots that hold it.
    pub workload: Arc<Workload>,
    /// Services it backs (`namespace/hostname`) and their ports, by key.
    pub services: Box<[(Name, Arc<[ServicePort]>)]>,
    /// Selector-scoped policies (`namespace/name`) that apply to it.
    pub policies: Box<[Name]>,
}

/// A decoded resource of either type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Decoded {
    Address(Box<AddressResource>),
    /// Selector uids are filled in by [`Resources::build`].
    Policy(Policy),
}

/// Decodes and checks one resource named `name` of type `type_url`; also
/// says which of the fields the agent does not act on it carries.
pub(super) fn decode(
    type_url: &str,
    name: &str,
    any: &Any,
    names: &mut Interner,
) -> Result<(Decoded, Ignored), RejectReason> {
    let decode_error = |e: &dyn std::fmt::Display| RejectReason::Decode(e.to_string());
    if type_url == ADDRESS_TYPE_URL {
        let msg: pb::Address = any.to_msg().map_err(|e| decode_error(&e))?;
        let ignored = Ignored::of_address(&msg);
        address(name, msg, names).map(|a| (Decoded::Address(Box::new(a)), ignored))
    } else {
        let msg: pb_sec::Authorization = any.to_msg().map_err(|e| decode_error(&e))?;
        // prost drops what our schema does not declare; a policy must not.
        let unknown =
            unknown::find(AUTHORIZATION_MESSAGE, &any.value).map_err(|e| decode_error(&e))?;
        policy(name, msg, &unknown).map(|p| (Decoded::Policy(p), Ignored::default()))
    }
}

/// The full name of the message behind [`ambient_proto::AUTHORIZATION_TYPE_URL`].
const AUTHORIZATION_MESSAGE: &str = "istio.security.Authorization";

fn address(
    name: &str,
    a: pb::Address,
    names: &mut Interner,
) -> Result<AddressResource, RejectReason> {
    match a.r#type {
        Some(pb::address::Type::Workload(w)) => {
            workload(name, w, names).map(AddressResource::Workload)
        }
        Some(pb::address::Type::Service(s)) => {
            service(name, s, names).map(|s| AddressResource::Service(Box::new(s)))
        }
        None => Err(RejectReason::EmptyAddress),
    }
}

fn required(name: &str, value: String) -> Result<String, RejectReason> {
    if value.trim().is_empty() {
        return Err(field(name, Problem::Empty));
    }
    Ok(value)
}

/// A namespace, service account or trust domain: a segment of a SPIFFE id.
fn identity_part(name: &str, value: String) -> Result<String, RejectReason> {
    let value = required(name, value)?;
    if value.contains('/') {
        return Err(field(name, Problem::Slash));
    }
    Ok(value)
}

/// Like [`identity_part`], with a default for the empty string (proto3
/// cannot tell "unset" from "").
fn identity_part_or(name: &str, value: String, default: &str) -> Result<String, RejectReason> {
    if value.is_empty() {
        return Ok(default.to_string());
    }
    identity_part(name, value)
}

pub(super) fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, Invalid> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(Invalid::AddressLength(b.len()))
    }
}

fn port(name: &str, p: u32) -> Result<u16, RejectReason> {
    match u16::try_from(p) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(field(name, Invalid::Port(p))),
    }
}

fn target_port(name: &str, p: u32) -> Result<u16, RejectReason> {
    u16::try_from(p).map_err(|_| field(name, Invalid::TargetPort(p)))
}

/// `namespace/rest`, both parts non-empty, `rest` without '/'.
fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
        .filter(|(ns, rest)| !ns.is_empty() && !rest.is_empty() && !rest.contains('/'))
}

fn workload(
    name: &str,
    w: pb::Workload,
    names: &mut Interner,
) -> Result<WorkloadResource, RejectReason> {
    let uid = required("uid", w.uid)?;
    if uid != name {
        return Err(RejectReason::Name { expected: uid });
    }
    // An enum value newer than this agent is never refused (istiod is
    // often newer than its proxies); it takes the meaning that trusts
    // least.
    let mut addresses = Addresses::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        addresses.push(ip_from_bytes(a).map_err(|e| field(format!("addresses[{i}]"), e))?);
    }
    // Host-network pods share the node's address: it cannot identify them,
    // so they are known by uid only. So is a workload of an unknown mode.
    if pb::NetworkMode::try_from(w.network_mode) != Ok(pb::NetworkMode::Standard) {
        addresses.clear();
    }
    let protocol = match pb::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(pb::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pb::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        // Sidecar mTLS (ztunnel cannot send it either), or newer: never
        // plaintext.
        Ok(pb::TunnelProtocol::LegacyIstioMtls) | Err(_) => {
            TunnelProtocol::Unsupported(w.tunnel_protocol)
        }
    };
    let application_tunnel = match &w.application_tunnel {
        None => ApplicationTunnel::None,
        Some(t) => match pb::application_tunnel::Protocol::try_from(t.protocol) {
            Ok(pb::application_tunnel::Protocol::None) => ApplicationTunnel::None,
            Ok(pb::application_tunnel::Protocol::Proxy) => ApplicationTunnel::Proxy {
                port: match t.port {
                    0 => None,
                    p => Some(port("application_tunnel.port", p)?),
                },
            },
            Err(_) => ApplicationTunnel::Unsupported(t.protocol),
        },
    };
    // Only a workload known to be healthy takes traffic.
    let healthy = pb::WorkloadStatus::try_from(w.status) == Ok(pb::WorkloadStatus::Healthy);
    let mut services = Vec::with_capacity(w.services.len());
    for (key, list) in &w.services {
        let at = format!("services[{key:?}]");
        if split_key(key).is_none() {
            return Err(field(at, Invalid::ServiceKey(key.clone())));
        }
        let mut ports = Vec::with_capacity(list.ports.len());
        for (j, p) in list.ports.iter().enumerate() {
            ports.push(ServicePort {
                port: port(&format!("{at}.ports[{j}].service_port"), p.service_port)?,
                target_port: target_port(&format!("{at}.ports[{j}].target_port"), p.target_port)?,
            });
        }
        services.push((names.intern(key), names.ports(&ports)));
    }
    services.sort_by(|a, b| a.0.cmp(&b.0));
    // An identity part is checked before it is interned.
    let namespace = identity_part("namespace", w.namespace)?;
    let service_account = identity_part_or(
        "service_account",
        w.service_account,
        DEFAULT_SERVICE_ACCOUNT,
    )?;
    let trust_domain = identity_part_or("trust_domain", w.trust_domain, DEFAULT_TRUST_DOMAIN)?;
    addresses.shrink_to_fit();
    let workload = Workload {
        uid: uid.into(),
        name: required("name", w.name)?.into(),
        namespace: names.intern(&namespace),
        service_account: names.intern(&service_account),
        trust_domain: names.intern(&trust_domain),
        addresses,
        node: names.intern(&w.node),
        // Pods reach the agent through ZDS, not xDS.
        local: None,
        protocol,
        application_tunnel,
        waypoint: waypoint("waypoint", w.waypoint, names)?,
        healthy,
        // Unset means one instance.
        capacity: w.capacity.unwrap_or(1),
        telemetry: telemetry(
            &w.workload_name,
            &w.canonical_name,
            &w.canonical_revision,
            &w.cluster_id,
            w.locality.as_ref(),
            names,
        ),
        network: network(&w.network, w.network_gateway, names)?,
        hostname: match w.hostname.as_str() {
            "" => None,
            h if crate::state::valid_hostname(h) => Some(h.to_ascii_lowercase().as_str().into()),
            h => return Err(field("hostname", Problem::Hostname(h.to_string()))),
        },
    };
    Ok(WorkloadResource {
        workload: Arc::new(workload),
        services: services.into_boxed_slice(),
        policies: w
            .authorization_policies
            .iter()
            .map(|p| names.intern(p))
            .collect(),
    })
}

/// A workload's telemetry names as ztunnel reads them: verbatim, but an
/// empty cluster is [`DEFAULT_CLUSTER`] (ztunnel's conversion does the
/// same, so its `*_cluster` labels say `Kubernetes`, not `unknown`).
fn telemetry(
    workload_name: &str,
    canonical_name: &str,
    canonical_revision: &str,
    cluster: &str,
    locality: Option<&pb::Locality>,
    names: &mut Interner,
) -> Arc<Telemetry> {
    let cluster = if cluster.is_empty() {
        DEFAULT_CLUSTER
    } else {
        cluster
    };
    let at = |f: fn(&pb::Locality) -> &str| locality.map_or("", f);
    let t = Telemetry {
        workload_name: names.intern(workload_name),
        canonical_name: names.intern(canonical_name),
        canonical_revision: names.intern(canonical_revision),
        cluster: names.intern(cluster),
        region: names.intern(at(|l| &l.region)),
        zone: names.intern(at(|l| &l.zone)),
        subzone: names.intern(at(|l| &l.subzone)),
    };
    names.telemetry(&t)
}

fn service(name: &str, s: pb::Service, names: &mut Interner) -> Result<Service, RejectReason> {
    let svc_name = required("name", s.name)?;
    let namespace = required("namespace", s.namespace)?;
    let hostname = required("hostname", s.hostname)?;
    let expected = format!("{namespace}/{hostname}");
    if name != expected {
        return Err(RejectReason::Name { expected });
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        vips.push(ip_from_bytes(&a.address).map_err(|e| field(format!("addresses[{i}]"), e))?);
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.len());
    for (j, p) in s.ports.iter().enumerate() {
        let at = format!("ports[{j}]");
        let sp = port(&format!("{at}.service_port"), p.service_port)?;
        if let Some(k) = ports.iter().position(|q| q.port == sp) {
            let problem = Problem::DuplicatePort {
                port: sp,
                first: format!("ports[{k}]"),
            };
            return Err(field(format!("{at}.service_port"), problem));
        }
        ports.push(ServicePort {
            port: sp,
            target_port: target_port(&format!("{at}.target_port"), p.target_port)?,
        });
    }
    for (j, san) in s.subject_alt_names.iter().enumerate() {
        if let Err(e) = san.parse::<Identity>() {
            return Err(field(
                format!("subject_alt_names[{j}]"),
                Problem::InvalidIdentity(e),
            ));
        }
    }
    Ok(Service {
        name: svc_name.into(),
        namespace: names.intern(&namespace),
        hostname: hostname.into(),
        vips,
        ports,
        endpoints: Vec::new(),
        subject_alt_names: s.subject_alt_names,
        // A value newer than this agent: the narrowest visibility.
        visibility: match pb::service::Visibility::try_from(s.visibility) {
            Ok(pb::service::Visibility::Public) => crate::state::Visibility::Public,
            Ok(pb::service::Visibility::Namespace) | Err(_) => crate::state::Visibility::Namespace,
        },
        // A value newer than this agent narrows nothing: families are not a
        // matter of trust, and whatever addresses the service has are its.
        ip_families: match pb::IpFamilies::try_from(s.ip_families) {
            Ok(pb::IpFamilies::Ipv4Only) => crate::state::IpFamilies::V4Only,
            Ok(pb::IpFamilies::Ipv6Only) => crate::state::IpFamilies::V6Only,
            Ok(pb::IpFamilies::Dual) => crate::state::IpFamilies::Dual,
            Ok(pb::IpFamilies::Automatic) | Err(_) => crate::state::IpFamilies::Automatic,
        },
        waypoint: waypoint("waypoint", s.waypoint, names)?,
        load_balancing: s.load_balancing.map(load_balancing),
    })
}

/// A workload's network; `None` for the default one without a gateway.
fn network(
    name: &str,
    gateway: Option<pb::GatewayAddress>,
    names: &mut Interner,
) -> Result<Option<Arc<Network>>, RejectReason> {
    let gateway = waypoint("network_gateway", gateway, names)?.map(|g| *g);
    if name.is_empty() && gateway.is_none() {
        return Ok(None);
    }
    let name = names.intern(name);
    Ok(Some(names.network(&Network { name, gateway })))
}

/// A service's load balancing. Values newer than this agent take the
/// meaning that reaches least far: an unknown scope is never shared, an
/// unknown mode is `STRICT`, an unknown health policy only healthy.
fn load_balancing(lb: pb::LoadBalancing) -> Box<LoadBalancing> {
    use pb::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let routing_preference = lb
        .routing_preference
        .iter()
        .map(|s| match S::try_from(*s) {
            Ok(S::Region) => LbScope::Region,
            Ok(S::Zone) => LbScope::Zone,
            Ok(S::Subzone) => LbScope::Subzone,
            Ok(S::Node) => LbScope::Node,
            Ok(S::Cluster) => LbScope::Cluster,
            Ok(S::Network) => LbScope::Network,
            Ok(S::UnspecifiedScope) | Err(_) => LbScope::Unknown(*s),
        })
        .collect();
    let mode = match M::try_from(lb.mode) {
        Ok(M::UnspecifiedMode) => LbMode::Standard,
        Ok(M::Failover) => LbMode::Failover,
        Ok(M::Passthrough) => LbMode::Passthrough,
        Ok(M::Strict) | Err(_) => LbMode::Strict,
    };
    let health_policy = match H::try_from(lb.health_policy) {
        Ok(H::AllowAll) => HealthPolicy::AllowAll,
        Ok(H::OnlyHealthy) | Err(_) => HealthPolicy::OnlyHealthy,
    };
    Box::new(LoadBalancing {
        routing_preference,
        mode,
        health_policy,
    })
}

fn waypoint(
    at: &str,
    g: Option<pb::GatewayAddress>,
    names: &mut Interner,
) -> Result<Option<Box<GatewayAddress>>, RejectReason> {
    let Some(g) = g else { return Ok(None) };
    let target = match g.destination {
        Some(pb::gateway_address::Destination::Address(a)) => GatewayTarget::Address(
            ip_from_bytes(&a.address).map_err(|e| field(format!("{at}.address.address"), e))?,
        ),
        Some(pb::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() || h.hostname.contains('/') {
                let problem = Problem::WaypointService(format!("{}/{}", h.namespace, h.hostname));
                return Err(field(format!("{at}.hostname"), problem));
            }
            GatewayTarget::Service {
                namespace: names.intern(&h.namespace),
                hostname: names.intern(&h.hostname),
            }
        }
        None => return Err(field(at, Invalid::WaypointNoDestination)),
    };
    // proto3 cannot tell an unset port from 0; istiod always sets it.
    let hbone_port = match g.hbone_mtls_port {
        0 => DEFAULT_HBONE_PORT,
        p => port(&format!("{at}.hbone_mtls_port"), p)?,
    };
    Ok(Some(Box::new(GatewayAddress { target, hbone_port })))
}

fn policy(
    name: &str,
    a: pb_sec::Authorization,
    unknown: &[Unknown],
) -> Result<Policy, RejectReason> {
    let policy_name = required("name", a.name)?;
    let namespace = required("namespace", a.namespace)?;
    let expected = format!("{namespace}/{policy_name}");
    if name != expected {
        return Err(RejectReason::Name { expected });
    }
    // Unknown values are not refused: the broadest scope and DENY never
    // let a policy this agent does not understand admit more.
    let mut unsupported = Vec::new();
    let scope = match pb_sec::Scope::try_from(a.scope) {
        Ok(pb_sec::Scope::Global) => PolicyScope::Global,
        Ok(pb_sec::Scope::Namespace) => PolicyScope::Namespace,
        Ok(pb_sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector {
            workload_uids: Vec::new(),
        },
        Err(_) => {
            unsupported.push(format!(
                "unknown scope {} (applied to every workload)",
                a.scope
            ));
            PolicyScope::Global
        }
    };
    let action = match pb_sec::Action::try_from(a.action) {
        Ok(pb_sec::Action::Allow) => PolicyAction::Allow,
        Ok(pb_sec::Action::Deny) => PolicyAction::Deny,
        Err(_) => {
            unsupported.push(format!("unknown action {} (enforced as DENY)", a.action));
            PolicyAction::Deny
        }
    };
    let mut parts = UnknownParts::sort(unknown);
    unsupported.extend(parts.take(&[]));
    unsupported.extend(a.extensions.iter().map(extension));
    let mut rules = Vec::with_capacity(a.rules.len());
    for (r, rule) in a.rules.iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for (c, clause) in rule.clauses.iter().enumerate() {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for (m, entry) in clause.matches.iter().enumerate() {
                let at = format!("rules[{r}].clauses[{c}].matches[{m}]");
                let unknown = parts.in_match(r, c, m);
                matches.push(match_entry(&at, entry, action, unknown)?);
            }
            clauses.push(Clause {
                matches,
                unsupported: parts.take(&[(RULES, r), (CLAUSES, c)]),
            });
        }
        rules.push(Rule {
            clauses,
            unsupported: parts.take(&[(RULES, r)]),
        });
    }
    Ok(Policy {
        name: policy_name,
        namespace,
        scope,
        action,
        rules,
        dry_run: a.dry_run,
        unsupported,
    })
}

/// Field numbers on the way from an `Authorization` to its matches' values.
const RULES: u32 = 5;
const CLAUSES: u32 = 1;
const MATCHES: u32 = 2;
/// `Authorization.extensions` and `Match.extensions`: declared, but what
/// is inside one is not this agent's to know.
const POLICY_EXTENSIONS: u32 = 7;
const MATCH_EXTENSIONS: u32 = 13;

/// What the reflection pass found in a policy that its schema does not
/// declare, sorted by the part of the policy it belongs to.
#[derive(Default)]
struct UnknownParts {
    /// Path of (field, index) pairs to the policy, rule, clause or match
    /// holding the unknown part -> its descriptions.
    at: BTreeMap<Vec<(u32, usize)>, Vec<String>>,
    /// (rule, clause, match) -> (field, index) of values holding one.
    values: BTreeMap<(usize, usize, usize), BTreeSet<(u32, usize)>>,
}

/// The unknown parts of one match.
#[derive(Default)]
struct MatchUnknown {
    /// Described, for the match's `unsupported`.
    notes: Vec<String>,
    /// (field, index) of values holding an unknown part.
    values: BTreeSet<(u32, usize)>,
}

impl UnknownParts {
    fn sort(unknown: &[Unknown]) -> Self {
        let mut parts = UnknownParts::default();
        for u in unknown {
            let path: Vec<(u32, usize)> = u
                .at()
                .iter()
                .map(|s| (s.field, s.index.unwrap_or(0)))
                .collect();
            let what = match u {
                Unknown::Field { number, .. } => format!("unknown field {number}"),
                Unknown::EnumValue { value, .. } => format!("unknown enum value {value}"),
            };
            match path.as_slice() {
                // Scope and action: given their safest meaning where read.
                [(3 | 4, _)] if matches!(u, Unknown::EnumValue { .. }) => {}
                // Inside an extension: the extension itself is the news.
                [(POLICY_EXTENSIONS, _), ..] => {}
                [(RULES, _), (CLAUSES, _), (MATCHES, _), (MATCH_EXTENSIONS, _), ..] => {}
                // Inside a value of a match (a StringMatch, an Address...).
                [(RULES, r), (CLAUSES, c), (MATCHES, m), (field, i), ..] => {
                    parts
                        .values
                        .entry((*r, *c, *m))
                        .or_default()
                        .insert((*field, *i));
                    let note = format!("{what} in value {i} of field {field}");
                    parts.at.entry(path[..3].to_vec()).or_default().push(note);
                }
                []
                | [(RULES, _)]
                | [(RULES, _), (CLAUSES, _)]
                | [(RULES, _), (CLAUSES, _), (MATCHES, _)] => {
                    parts.at.entry(path).or_default().push(what);
                }
                // Anywhere else is a field we know holding a value we do
                // not: count it against the policy as a whole.
                _ => parts.at.entry(Vec::new()).or_default().push(what),
            }
        }
        parts
    }

    /// The descriptions of what is unknown directly at `path`.
    fn take(&mut self, path: &[(u32, usize)]) -> Vec<String> {
        self.at.remove(path).unwrap_or_default()
    }

    fn in_match(&mut self, r: usize, c: usize, m: usize) -> MatchUnknown {
        MatchUnknown {
            notes: self.take(&[(RULES, r), (CLAUSES, c), (MATCHES, m)]),
            values: self.values.remove(&(r, c, m)).unwrap_or_default(),
        }
    }
}

fn extension(e: &ambient_proto::workload::Extension) -> String {
    format!("extension {:?}", e.name)
}

/// A match, with what is not understood in it made safe for `action`: an
/// ALLOW's match keeps it as `unsupported` (never holds); in a DENY's, a
/// value that cannot be read makes a positive field hold for anyone and
/// is left out of a `not_` field (so it exempts no one).
fn match_entry(
    at: &str,
    m: &pb_sec::Match,
    action: PolicyAction,
    unknown: MatchUnknown,
) -> Result<Match, RejectReason> {
    let deny = action == PolicyAction::Deny;
    let ctx = FieldCtx {
        at,
        deny,
        unknown: &unknown.values,
    };
    let ports = |name: &str, list: &[u32]| -> Result<Vec<u16>, RejectReason> {
        let list = list.iter().enumerate();
        list.map(|(k, p)| port(&format!("{at}.{name}[{k}]"), *p))
            .collect()
    };
    let mut unsupported = unknown.notes;
    unsupported.extend(m.extensions.iter().map(extension));
    Ok(Match {
        namespaces: ctx.values(1, "namespaces", &m.namespaces, string_match)?,
        not_namespaces: ctx.values(2, "not_namespaces", &m.not_namespaces, string_match)?,
        principals: ctx.values(3, "principals", &m.principals, string_match)?,
        not_principals: ctx.values(4, "not_principals", &m.not_principals, string_match)?,
        source_ips: ctx.values(5, "source_ips", &m.source_ips, cidr)?,
        not_source_ips: ctx.values(6, "not_source_ips", &m.not_source_ips, cidr)?,
        destination_ips: ctx.values(7, "destination_ips", &m.destination_ips, cidr)?,
        not_destination_ips: ctx.values(8, "not_destination_ips", &m.not_destination_ips, cidr)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
        service_accounts: ctx.values(
            11,
            "service_accounts",
            &m.service_accounts,
            service_account,
        )?,
        not_service_accounts: ctx.values(
            12,
            "not_service_accounts",
            &m.not_service_accounts,
            service_account,
        )?,
        // istio.security.Authorization carries no L7 conditions.
        request: None,
        unsupported,
    })
}

/// Where a match's fields are read, and which of their values hold
/// something this agent cannot read.
struct FieldCtx<'a> {
    at: &'a str,
    deny: bool,
    /// (field number, index) of unreadable values.
    unknown: &'a BTreeSet<(u32, usize)>,
}

impl FieldCtx<'_> {
    /// The readable values of field `number`. In a DENY, a positive field
    /// (odd numbers 1..=11; `not_` fields are even) with an unreadable
    /// value is left empty, so it holds for anyone.
    fn values<T, U>(
        &self,
        number: u32,
        name: &str,
        list: &[T],
        convert: impl Fn(&T) -> Result<U, Invalid>,
    ) -> Result<Vec<U>, RejectReason> {
        let unreadable = |k: usize| self.unknown.contains(&(number, k));
        if self.deny && number % 2 == 1 && (0..list.len()).any(unreadable) {
            return Ok(Vec::new());
        }
        list.iter()
            .enumerate()
            .filter(|(k, _)| !unreadable(*k))
            .map(|(k, v)| convert(v).map_err(|e| field(format!("{}.{name}[{k}]", self.at), e)))
            .collect()
    }
}

/// Istio's service account match: both parts required, no '/' in either
/// (they are segments of a SPIFFE identity).
fn service_account(s: &pb_sec::ServiceAccountMatch) -> Result<ServiceAccountMatch, Invalid> {
    let part = |v: &str| !v.is_empty() && !v.contains('/');
    if !part(&s.namespace) || !part(&s.service_account) {
        return Err(Invalid::ServiceAccount(format!(
            "{}/{}",
            s.namespace, s.service_account
        )));
    }
    Ok(ServiceAccountMatch {
        namespace: s.namespace.clone(),
        name: s.service_account.clone(),
    })
}

/// An absent match is refused rather than dropped: dropped from a `not_`
/// list it would widen the policy.
fn string_match(s: &pb_sec::StringMatch) -> Result<StringMatch, Invalid> {
    use pb_sec::string_match::MatchType;
    match &s.match_type {
        Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
        Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
        Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
        None => Err(Invalid::EmptyStringMatch),
    }
}

fn cidr(a: &pb_sec::Address) -> Result<IpNet, Invalid> {
    let ip = ip_from_bytes(&a.address)?;
    u8::try_from(a.length)
        .ok()
        .and_then(|len| IpNet::new(ip, len).ok())
        .ok_or(Invalid::PrefixLength { ip, len: a.length })
}
