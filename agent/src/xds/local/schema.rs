//! The mesh file as serde reads it. Values that a later check may reject
//! are kept as text and wrapped in `Spanned` so the error can name their
//! line; `convert` checks them and builds the model.

use std::collections::BTreeMap;

use marked_yaml::Spanned;
use serde::Deserialize;

use crate::state::{HealthPolicy, LbMode, LbScope, LoadBalancing};

/// A string with its position in the file.
pub(super) type Text = Spanned<String>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct MeshFile {
    /// Istio's `meshConfig.trustDomain`, for `trustDomainAliases`.
    pub trust_domain: Option<Text>,
    /// Istio's `meshConfig.trustDomainAliases`: policy principals naming
    /// one of these domains (or `trustDomain`) match the others too.
    #[serde(default)]
    pub trust_domain_aliases: Vec<Text>,
    #[serde(default)]
    pub workloads: Vec<WorkloadEntry>,
    #[serde(default)]
    pub services: Vec<ServiceEntry>,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    #[serde(default)]
    pub http_routes: Vec<HttpRouteEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct WorkloadEntry {
    pub uid: Text,
    pub name: Text,
    pub namespace: Text,
    pub service_account: Option<Text>,
    pub trust_domain: Option<Text>,
    pub addresses: Spanned<Vec<Text>>,
    pub node: Text,
    pub netns: Option<Text>,
    pub cgroup: Option<Text>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub application_tunnel: AppTunnel,
    /// Where PROXY-protocol tunnels are delivered (default: the target port).
    pub application_tunnel_port: Option<Spanned<u16>>,
    #[serde(default = "default_true")]
    pub healthy: bool,
    /// Weight among a service's endpoints (default 1).
    #[serde(default = "default_capacity")]
    pub capacity: u32,
    pub waypoint: Option<Spanned<GatewayEntry>>,
    /// The workload's owner, e.g. its Deployment (default: `name`).
    pub workload_name: Option<Text>,
    /// The pod's labels: the canonical service and revision are derived
    /// from them as istiod does.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Overrides what `labels` give.
    pub canonical_name: Option<Text>,
    pub canonical_revision: Option<Text>,
    /// Default `Kubernetes`, as Istio's `CLUSTER_ID`.
    pub cluster_id: Option<Text>,
    /// `region/zone/subzone`, as an Istio WorkloadEntry's.
    pub locality: Option<Text>,
    /// Its network (default: the unnamed one).
    pub network: Option<Text>,
    /// How callers on other networks reach it.
    pub network_gateway: Option<Spanned<GatewayEntry>>,
    /// A DNS name for its address (then `addresses` may be empty).
    pub hostname: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum Protocol {
    #[default]
    Hbone,
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum AppTunnel {
    #[default]
    None,
    Proxy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct GatewayEntry {
    pub address: Option<Text>,
    /// `namespace/hostname`.
    pub service: Option<Text>,
    pub hbone_port: Option<Spanned<u16>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ServiceEntry {
    pub name: Text,
    pub namespace: Text,
    pub hostname: Option<Text>,
    pub vips: Spanned<Vec<Text>>,
    #[serde(default)]
    pub ports: Vec<PortEntry>,
    #[serde(default)]
    pub endpoints: Vec<Text>,
    #[serde(default)]
    pub subject_alt_names: Vec<Text>,
    pub waypoint: Option<Spanned<GatewayEntry>>,
    pub load_balancing: Option<LoadBalancingEntry>,
}

/// Istio's `LoadBalancing`, with its enum names.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LoadBalancingEntry {
    #[serde(default)]
    pub routing_preference: Vec<LbScopeName>,
    #[serde(default)]
    pub mode: LbModeName,
    #[serde(default)]
    pub health_policy: HealthPolicyName,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum LbScopeName {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum LbModeName {
    #[default]
    #[serde(alias = "UNSPECIFIED_MODE")]
    Standard,
    Strict,
    Failover,
    Passthrough,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum HealthPolicyName {
    #[default]
    OnlyHealthy,
    AllowAll,
}

impl From<&LoadBalancingEntry> for LoadBalancing {
    fn from(e: &LoadBalancingEntry) -> Self {
        LoadBalancing {
            routing_preference: e
                .routing_preference
                .iter()
                .map(|s| match s {
                    LbScopeName::Region => LbScope::Region,
                    LbScopeName::Zone => LbScope::Zone,
                    LbScopeName::Subzone => LbScope::Subzone,
                    LbScopeName::Node => LbScope::Node,
                    LbScopeName::Cluster => LbScope::Cluster,
                    LbScopeName::Network => LbScope::Network,
                })
                .collect(),
            mode: match e.mode {
                LbModeName::Standard => LbMode::Standard,
                LbModeName::Strict => LbMode::Strict,
                LbModeName::Failover => LbMode::Failover,
                LbModeName::Passthrough => LbMode::Passthrough,
            },
            health_policy: match e.health_policy {
                HealthPolicyName::OnlyHealthy => HealthPolicy::OnlyHealthy,
                HealthPolicyName::AllowAll => HealthPolicy::AllowAll,
            },
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct PortEntry {
    pub port: Spanned<u16>,
    #[serde(default)]
    pub target_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct PolicyEntry {
    pub name: Text,
    pub namespace: Text,
    pub scope: Option<Spanned<Scope>>,
    /// Workload uids.
    pub selector: Option<Spanned<Vec<Text>>>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum Scope {
    Global,
    #[default]
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum Action {
    #[default]
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RuleEntry {
    #[serde(default)]
    pub clauses: Vec<ClauseEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct ClauseEntry {
    #[serde(default)]
    pub matches: Vec<MatchEntry>,
}

/// String fields use Istio's forms: `x` exact, `x*` prefix, `*x` suffix,
/// `*` any present value. IP fields take a CIDR or a bare address.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct MatchEntry {
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// `namespace/name`, or `name` in the policy's namespace (Istio's
    /// `serviceAccounts`; no wildcards).
    pub service_accounts: Vec<Text>,
    pub not_service_accounts: Vec<Text>,
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub source_ips: Vec<Text>,
    pub not_source_ips: Vec<Text>,
    pub destination_ips: Vec<Text>,
    pub not_destination_ips: Vec<Text>,
    pub destination_ports: Vec<Spanned<u16>>,
    pub not_destination_ports: Vec<Spanned<u16>>,
    /// Conditions on the HTTP request, which a waypoint evaluates (Istio's
    /// `to.operation` and `when: request.headers[...]`); string forms as
    /// above.
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// Header name -> values, one of which must match.
    pub request_headers: std::collections::BTreeMap<String, Vec<String>>,
    /// Header name -> values, none of which may match.
    pub not_request_headers: std::collections::BTreeMap<String, Vec<String>>,
}

/// L7 routes of one service, for waypoints.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct HttpRouteEntry {
    pub name: Text,
    pub namespace: Text,
    /// `namespace/hostname` of the service.
    pub service: Text,
    #[serde(default)]
    pub rules: Vec<HttpRuleEntry>,
    /// Istio's DestinationRule `trafficPolicy.outlierDetection` for the
    /// service.
    pub outlier_detection: Option<OutlierEntry>,
}

/// Envoy's defaults for what is left out (5, 30s, 10).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct OutlierEntry {
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub base_ejection_time: Option<Text>,
    pub max_ejection_percent: Option<Spanned<u32>>,
}

/// Exactly one of `deny: true`, `backends` and `directResponse`; the
/// rest are Istio's VirtualService fields of the same names.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct HttpRuleEntry {
    #[serde(default)]
    pub matches: Vec<HttpMatchEntry>,
    #[serde(default)]
    pub deny: bool,
    pub backends: Option<Spanned<Vec<BackendEntry>>>,
    pub direct_response: Option<DirectResponseEntry>,
    /// e.g. `2s`, `500ms`.
    pub timeout: Option<Text>,
    pub retries: Option<RetriesEntry>,
    pub fault: Option<FaultEntry>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct HttpMatchEntry {
    pub path: Option<PathEntry>,
    pub method: Option<Text>,
    /// Header name -> exact value, or a match.
    pub headers: std::collections::BTreeMap<String, HeaderValueEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) enum PathEntry {
    Exact(String),
    Prefix(String),
    /// RE2 syntax, matched against the whole path.
    Regex(Text),
}

/// A header's value: a string is an exact match, a mapping any match.
#[derive(Debug)]
pub(super) enum HeaderValueEntry {
    Exact(String),
    Match(HeaderMatchEntry),
}

// By hand rather than `untagged`: an untagged enum buffers its input, and
// the buffered YAML scalars no longer read as booleans.
impl<'de> Deserialize<'de> for HeaderValueEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderValueEntry;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a string (exact value) or a mapping (exact, prefix, regex, present, invert)",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HeaderValueEntry::Exact(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                m: A,
            ) -> Result<Self::Value, A::Error> {
                HeaderMatchEntry::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(HeaderValueEntry::Match)
            }
        }
        d.deserialize_any(V)
    }
}

/// Exactly one of `exact`, `prefix`, `regex` and `present: true`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct HeaderMatchEntry {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
    pub present: bool,
    /// Holds when the match does not.
    pub invert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct DirectResponseEntry {
    pub status: Spanned<u16>,
    #[serde(default)]
    pub body: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RetriesEntry {
    /// Attempts after the first.
    pub attempts: u32,
    pub per_try_timeout: Option<Text>,
    /// Envoy's conditions, comma separated; Istio's default when absent.
    pub retry_on: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct FaultEntry {
    pub delay: Option<DelayEntry>,
    pub abort: Option<AbortEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct DelayEntry {
    pub fixed_delay: Text,
    /// Of requests, 0-100; all when absent.
    pub percentage: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct AbortEntry {
    pub http_status: Spanned<u16>,
    pub percentage: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct BackendEntry {
    /// Workload uids.
    pub workloads: Spanned<Vec<Text>>,
    #[serde(default = "default_capacity")]
    pub weight: u32,
}

fn default_true() -> bool {
    true
}

fn default_capacity() -> u32 {
    1
}
