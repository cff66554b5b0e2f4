//! The mesh model every configuration source produces: workloads, services
//! and authorization policies. Plain, validated data; no I/O.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use smallvec::SmallVec;

pub use super::balance::{HealthPolicy, LbMode, LbScope, LoadBalancing};
use super::Name;
use crate::identity::Identity;

/// How traffic reaches a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelProtocol {
    /// Not in the mesh (or not captured): plain TCP.
    #[default]
    None,
    /// HTTP/2 CONNECT over mutual TLS to the workload's agent on 15008.
    Hbone,
    /// A protocol this agent cannot speak (Istio's sidecar mTLS, or one
    /// newer than it): never plaintext, so traffic to it is refused.
    Unsupported(i32),
}

/// What a workload expects after the HBONE handshake reaches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ApplicationTunnel {
    /// Raw bytes of the tunneled connection.
    #[default]
    None,
    /// A PROXY protocol v2 header first (waypoints), carrying the source,
    /// the tunnel's target and the source identity (TLV 0xD0). Delivered
    /// to `port` when given, else to the target's port.
    Proxy { port: Option<u16> },
    /// A protocol this agent does not know: it cannot deliver what the
    /// workload expects, so tunnels to it are refused.
    Unsupported(i32),
}

impl ApplicationTunnel {
    /// Whether the workload is a waypoint-like proxy: it serves tunnels
    /// for targets other than its own addresses.
    pub fn is_proxy(&self) -> bool {
        matches!(self, ApplicationTunnel::Proxy { .. })
    }
}

/// Where a waypoint or network gateway is found.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayTarget {
    /// A workload address.
    Address(IpAddr),
    /// A service, by `namespace/hostname`.
    Service { namespace: Name, hostname: Name },
}

/// A waypoint or network gateway reference, as Istio's `GatewayAddress`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayAddress {
    pub target: GatewayTarget,
    pub hbone_port: u16,
}

/// The network a workload is on, and the east-west gateway through which
/// callers on other networks reach it (Istio's `network` and
/// `network_gateway`). Shared by the workloads of a network
/// ([`Interner::network`](super::Interner::network)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Network {
    pub name: Name,
    pub gateway: Option<GatewayAddress>,
}

/// A workload's addresses: nearly always one (or two, dual stack), so the
/// first is kept inline rather than in an allocation of its own.
pub type Addresses = SmallVec<[IpAddr; 1]>;

/// How Istio's telemetry names a workload: the `*_workload`,
/// `*_canonical_service`, `*_canonical_revision`, `*_app`, `*_version`,
/// `*_cluster`, `*_region` and `*_zone` labels of its metrics. Replicas of
/// one deployment share all of it, so workloads hold an interned copy
/// ([`Interner::telemetry`](super::Interner::telemetry)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Telemetry {
    /// The workload's owner, e.g. its Deployment (Istio's `workload_name`).
    pub workload_name: Name,
    /// istiod derives it from the `service.istio.io/canonical-name`,
    /// `app.kubernetes.io/name` or `app` label, else the workload name.
    pub canonical_name: Name,
    /// From `service.istio.io/canonical-revision`, `app.kubernetes.io/version`
    /// or `version`, else `latest`.
    pub canonical_revision: Name,
    /// The cluster it runs in (Istio's `cluster_id`).
    pub cluster: Name,
    pub region: Name,
    pub zone: Name,
    pub subzone: Name,
}

/// The labels istiod takes a workload's canonical service from, first
/// present first (`istio/istio` `pkg/kube/labels/labels.go`).
pub const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];

/// The labels istiod takes a workload's canonical revision from.
pub const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// istiod's canonical revision when no label gives one.
pub const DEFAULT_CANONICAL_REVISION: &str = "latest";

/// ztunnel's cluster for a workload whose cluster is not given
/// (`src/state/workload.rs`, conversion from xDS), and Istio's default
/// `CLUSTER_ID`.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// One workload (a pod, or anything with an identity and addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: Name,
    pub name: Name,
    pub namespace: Name,
    pub service_account: Name,
    pub trust_domain: Name,
    pub addresses: Addresses,
    /// The node whose agent serves this workload.
    pub node: Name,
    /// Where its pod is on this host, when the mesh file says (local
    /// mode). Out of line: most workloads are elsewhere, and every byte
    /// here is paid once per workload in the mesh.
    pub local: Option<Box<LocalPod>>,
    pub protocol: TunnelProtocol,
    pub application_tunnel: ApplicationTunnel,
    /// Out of line for the same reason as `local`.
    pub waypoint: Option<Box<GatewayAddress>>,
    /// Unhealthy workloads are not chosen as service endpoints.
    pub healthy: bool,
    /// Relative weight among a service's endpoints (Istio's `capacity`,
    /// default 1); 0 is chosen only when every candidate has 0.
    pub capacity: u32,
    /// What its metrics are labelled with (and its cluster and locality).
    pub telemetry: Arc<Telemetry>,
    /// Its network; `None` is the default network (named ``) with no
    /// gateway, as in a single-network mesh.
    pub network: Option<Arc<Network>>,
    /// A DNS name to look up for its address (a ServiceEntry with DNS
    /// resolution), used when it has no address of its own.
    pub hostname: Option<Name>,
}

/// A pod's place on this host, as the mesh file gives it (local mode; in
/// Istio mode pods arrive over ZDS instead).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPod {
    /// Network namespace to enter for the workload's listeners.
    pub netns: Option<PathBuf>,
    /// cgroup v2 directory holding the workload's processes (eBPF capture
    /// hooks the workload's outbound connects there).
    pub cgroup: Option<PathBuf>,
}

impl Workload {
    /// The network namespace of its pod on this host, if the mesh says.
    pub fn netns(&self) -> Option<&Path> {
        self.local.as_ref()?.netns.as_deref()
    }

    /// The cgroup of its pod on this host, if the mesh says.
    pub fn cgroup(&self) -> Option<&Path> {
        self.local.as_ref()?.cgroup.as_deref()
    }

    pub fn identity(&self) -> Identity {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// The name of its network (empty: the default network).
    pub fn network_name(&self) -> &str {
        self.network.as_ref().map_or("", |n| n.name.as_str())
    }

    /// Its network's east-west gateway, if it has one.
    pub fn network_gateway(&self) -> Option<&GatewayAddress> {
        self.network.as_ref()?.gateway.as_ref()
    }

    /// Whether `id` is this workload's identity (without building ours).
    pub fn has_identity(&self, id: &Identity) -> bool {
        *self.namespace == *id.namespace()
            && *self.service_account == *id.service_account()
            && *self.trust_domain == *id.trust_domain()
    }
}

#[cfg(test)]
impl Workload {
    /// A healthy HBONE workload for unit tests: service account = uid,
    /// trust domain `td`, node `n`, at `ip` if given.
    pub(crate) fn for_test(uid: &str, namespace: &str, ip: Option<&str>) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: namespace.into(),
            service_account: uid.into(),
            trust_domain: "td".into(),
            addresses: ip
                .map(|ip| ip.parse().expect("test ip"))
                .into_iter()
                .collect(),
            node: "n".into(),
            local: None,
            protocol: TunnelProtocol::Hbone,
            application_tunnel: ApplicationTunnel::None,
            waypoint: None,
            healthy: true,
            capacity: 1,
            telemetry: Arc::default(),
            network: None,
            hostname: None,
        }
    }
}

/// A service port and the workload port it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub port: u16,
    /// 0 means "same as `port`".
    pub target_port: u16,
}

/// A workload backing a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_uid: Name,
}

/// A service: virtual addresses in front of a set of workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: Name,
    pub namespace: Name,
    pub hostname: Name,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// Extra identities a client accepts from this service's endpoints.
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<Box<GatewayAddress>>,
    /// Who may see it by name (Istio's `exportTo`).
    pub visibility: Visibility,
    /// The address families it serves.
    pub ip_families: IpFamilies,
    /// How an endpoint is chosen (Istio's `load_balancing`); `None`: any
    /// healthy endpoint, by capacity.
    pub load_balancing: Option<Box<LoadBalancing>>,
}

/// The address families a service serves (istiod's `Service.ip_families`,
/// from the Kubernetes service's `ipFamilyPolicy`/`ipFamilies`). A
/// single-stack service answers no DNS query of the other family, even
/// where its endpoints (a headless service's pods) have such addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamilies {
    /// Not stated: whatever the service's addresses are.
    #[default]
    Automatic,
    V4Only,
    V6Only,
    Dual,
}

impl IpFamilies {
    /// Whether the service serves addresses of the family of `ip`.
    pub fn admits(self, ip: &IpAddr) -> bool {
        !matches!(
            (self, ip),
            (IpFamilies::V4Only, IpAddr::V6(_)) | (IpFamilies::V6Only, IpAddr::V4(_))
        )
    }
}

/// Which namespaces a service's name is visible to (istiod's
/// `Service.visibility`, from `exportTo`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Visibility {
    /// Every namespace.
    #[default]
    Public,
    /// Only its own namespace.
    Namespace,
}

impl Service {
    /// The workload port for service port `port`, if the service exposes it.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports.iter().find(|p| p.port == port).map(|p| {
            if p.target_port == 0 {
                p.port
            } else {
                p.target_port
            }
        })
    }
}

/// Which workloads a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads in the policy's namespace whose uid is listed (the local
    /// form of a label selector; xDS resolves selectors to workloads).
    WorkloadSelector { workload_uids: Vec<Name> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// A string matcher as Istio's `StringMatch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Matches any present value.
    Presence,
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

/// A peer's Kubernetes service account, as Istio's `ServiceAccountMatch`:
/// namespace and name, compared exactly (the trust domain is not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub name: String,
}

/// One match: every non-empty field must hold; each field is an OR of its
/// values; a `not_` field holds when none of its values match. A match
/// that sets nothing never holds (as ztunnel: istiod sends one when it
/// stripped every L7 condition of a DENY, meaning "no effect here").
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// Conditions on the HTTP request (Istio's `to.operation` and
    /// `when: request.headers[...]`), which only a waypoint can evaluate.
    /// Where there is no request (an agent's L4 check), they count as
    /// `unsupported` conditions do: against an ALLOW, for a DENY.
    pub request: Option<Box<RequestMatch>>,
    /// Conditions this agent cannot evaluate (extensions, fields newer
    /// than its schema), described. An ALLOW's match with any never holds;
    /// a DENY's is taken to satisfy them (the source already dropped what
    /// could only narrow the DENY).
    pub unsupported: Vec<String>,
}

/// A match's conditions on an HTTP request; each set field must hold, as
/// in [`Match`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestMatch {
    /// The request's host (`Host` / `:authority`, without a port),
    /// compared case-insensitively: values are held in lower case.
    pub hosts: Vec<StringMatch>,
    pub not_hosts: Vec<StringMatch>,
    /// The path, without the query.
    pub paths: Vec<StringMatch>,
    pub not_paths: Vec<StringMatch>,
    /// Upper-case methods.
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// Header (lower-case name) whose value must match one of these.
    pub headers: Vec<(String, Vec<StringMatch>)>,
    /// Header whose value must match none of these.
    pub not_headers: Vec<(String, Vec<StringMatch>)>,
}

impl Match {
    /// Whether the match sets no condition at all, known or not.
    pub fn is_empty(&self) -> bool {
        let Match {
            namespaces,
            not_namespaces,
            service_accounts,
            not_service_accounts,
            principals,
            not_principals,
            source_ips,
            not_source_ips,
            destination_ips,
            not_destination_ips,
            destination_ports,
            not_destination_ports,
            request,
            unsupported,
        } = self;
        namespaces.is_empty()
            && not_namespaces.is_empty()
            && service_accounts.is_empty()
            && not_service_accounts.is_empty()
            && principals.is_empty()
            && not_principals.is_empty()
            && source_ips.is_empty()
            && not_source_ips.is_empty()
            && destination_ips.is_empty()
            && not_destination_ips.is_empty()
            && destination_ports.is_empty()
            && not_destination_ports.is_empty()
            && request.is_none()
            && unsupported.is_empty()
    }
}

/// A clause holds when any of its matches holds (or it has none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clause {
    pub matches: Vec<Match>,
    /// What the clause carries that this agent cannot evaluate: an ALLOW's
    /// clause with any never holds, a DENY's always does.
    pub unsupported: Vec<String>,
}

/// A rule holds when all of its clauses hold (or it has none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub clauses: Vec<Clause>,
    /// As [`Clause::unsupported`], for the whole rule.
    pub unsupported: Vec<String>,
}

/// An L4 authorization policy; it applies when any of its rules holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: PolicyAction,
    pub rules: Vec<Rule>,
    /// Evaluated and reported, never enforced.
    pub dry_run: bool,
    /// What the policy carries beyond its rules that this agent cannot
    /// evaluate (extensions, newer fields): an ALLOW with any matches
    /// nothing (and so still denies what no other ALLOW admits); a DENY is
    /// enforced by its rules as understood.
    pub unsupported: Vec<String>,
}

impl Policy {
    /// `namespace/name`, the key Istio uses.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A complete, validated mesh description.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mesh {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Policy>,
    /// L7 routes for waypoints (local mode only: istiod sends these to
    /// Envoy waypoints in its own resources, not to node agents).
    pub http_routes: Vec<super::l7::HttpRoute>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_identity_compares_every_part() {
        let w = Workload::for_test("web", "shop", None);
        let own = w.identity();
        assert!(w.has_identity(&own));
        let others = [
            Identity::new("other", own.namespace(), own.service_account()),
            Identity::new(own.trust_domain(), "other", own.service_account()),
            Identity::new(own.trust_domain(), own.namespace(), "other"),
        ];
        for id in others {
            assert!(!w.has_identity(&id), "{id}");
        }
    }
}
