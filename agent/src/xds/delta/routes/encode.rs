//! The model's [`HttpRoute`]s as a control plane serves them to a
//! waypoint: a `RouteConfiguration` per service and a
//! `ClusterLoadAssignment` per backend, the inverse of `decode`.
//!
//! Each backend (a set of workloads) becomes a subset cluster named as
//! istiod names them, `outbound|<port>|<subset>|<host>`, its subset named
//! after the route, rule and backend. A deny rule is a 403 direct response
//! with Istio's body. Outlier detection is a cluster setting in Envoy: the
//! service's own cluster, `outbound|<port>||<host>`, carries it; that
//! cluster is also the last route's, for requests no rule matches (the
//! mesh file sends them to any endpoint; Envoy answers 404).

use std::collections::BTreeMap;
use std::time::Duration;

use ambient_proto::core::{address, data_source, Address, DataSource, SocketAddress};
use ambient_proto::endpoint::LocalityLbEndpoints;
use ambient_proto::endpoint::{lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint};
use ambient_proto::envoy_type::{fractional_percent::DenominatorType, FractionalPercent};
use ambient_proto::prost_types::{Any, Duration as PbDuration};
use ambient_proto::route::{
    header_matcher, retry_policy, route, route_action, route_match, weighted_cluster,
    DirectResponseAction, HeaderMatcher, RetryPolicy as PbRetry, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};
use ambient_proto::{fault as pb_fault, fault_common, matcher, FAULT_FILTER};

use crate::state::l7::{Fault, RetryOn, RetryPolicy, Share};
use crate::state::{HttpAction, HttpMatch, HttpRule, Mesh, PathMatch, ValueMatch};
use crate::xds::delta::EncodeError;

/// A mesh's routes as xDS resources, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedRoutes {
    /// `RouteConfiguration` by `<namespace>/<hostname>` of its service.
    pub routes: BTreeMap<String, Any>,
    /// `ClusterLoadAssignment` by cluster name.
    pub endpoints: BTreeMap<String, Any>,
    /// `Cluster` by name: services' outlier detection.
    pub clusters: BTreeMap<String, Any>,
}

/// istiod's name for the cluster of `subset` of `host`'s `port`.
fn cluster_name(port: u16, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// Encodes every route of `mesh`, and the endpoints of every cluster they
/// name.
pub fn encode_routes(mesh: &Mesh) -> Result<EncodedRoutes, EncodeError> {
    let mut out = EncodedRoutes::default();
    for r in &mesh.http_routes {
        let service = mesh
            .services
            .iter()
            .find(|s| s.namespace == r.service_namespace && s.hostname == r.service_hostname);
        let port = service.and_then(|s| s.ports.first());
        let (port, target) = port.map_or((0, 0), |p| {
            let t = if p.target_port == 0 {
                p.port
            } else {
                p.target_port
            };
            (p.port, t)
        });
        let name = format!("{}/{}", r.service_namespace, r.service_hostname);
        let mut routes = Vec::with_capacity(r.rules.len());
        for (i, rule) in r.rules.iter().enumerate() {
            let mut clusters = Vec::new();
            if let HttpAction::Route(backends) = &rule.action {
                for (j, b) in backends.iter().enumerate() {
                    let subset = format!("{}-{}-r{i}b{j}", r.namespace, r.name);
                    let cluster = cluster_name(port, &subset, &r.service_hostname);
                    let cla = assignment(mesh, &cluster, &b.workload_uids, target);
                    out.endpoints.insert(cluster.clone(), any(&cluster, &cla)?);
                    clusters.push((cluster, b.weight));
                }
            }
            // Envoy matches once per route: a rule of several matches is a
            // route for each, as istiod writes them.
            let matches: Vec<Option<&HttpMatch>> = if rule.matches.is_empty() {
                vec![None]
            } else {
                rule.matches.iter().map(Some).collect()
            };
            for (k, m) in matches.into_iter().enumerate() {
                routes.push(route(&format!("{}.{i}.{k}", r.name), m, rule, &clusters)?);
            }
        }
        // A request no rule matches goes to any endpoint of the service
        // (the mesh file's rule); Envoy would answer 404, so it is said:
        // the service's own cluster, with istiod's default route retries.
        if !r.rules.iter().any(|rule| rule.matches.is_empty()) {
            let cluster = cluster_name(port, "", &r.service_hostname);
            let uids: Vec<String> = service
                .map(|s| {
                    s.endpoints
                        .iter()
                        .map(|e| e.workload_uid.to_string())
                        .collect()
                })
                .unwrap_or_default();
            let cla = assignment(mesh, &cluster, &uids, target);
            out.endpoints.insert(cluster.clone(), any(&cluster, &cla)?);
            let default = HttpRule {
                matches: Vec::new(),
                action: HttpAction::Route(Vec::new()),
                policy: crate::state::RequestPolicy::istio_default(),
            };
            let name = format!("{}.default", r.name);
            routes.push(route(&name, None, &default, &[(cluster, 1)])?);
        }
        let config = RouteConfiguration {
            name: name.clone(),
            virtual_hosts: vec![VirtualHost {
                name: format!("{}/{}", r.namespace, r.name),
                domains: vec![
                    r.service_hostname.clone(),
                    format!("{}:*", r.service_hostname),
                ],
                routes,
            }],
        };
        out.routes.insert(name.clone(), any(&name, &config)?);
        if let Some(o) = &r.outlier_detection {
            let cluster = cluster_name(port, "", &r.service_hostname);
            let msg = ambient_proto::cluster::Cluster {
                name: cluster.clone(),
                outlier_detection: Some(ambient_proto::cluster::OutlierDetection {
                    consecutive_5xx: Some(o.consecutive_errors),
                    interval: None,
                    base_ejection_time: Some(duration(o.base_ejection_time)),
                    max_ejection_percent: Some(o.max_ejection_percent),
                    enforcing_consecutive_5xx: Some(100),
                    enforcing_success_rate: Some(0),
                }),
            };
            out.clusters.insert(cluster.clone(), any(&cluster, &msg)?);
        }
    }
    Ok(out)
}

fn any<M: ambient_proto::prost::Name>(name: &str, msg: &M) -> Result<Any, EncodeError> {
    Any::from_msg(msg).map_err(|source| EncodeError::Encode {
        name: name.to_string(),
        source,
    })
}

fn assignment(mesh: &Mesh, cluster: &str, uids: &[String], port: u16) -> ClusterLoadAssignment {
    let lb_endpoints = uids
        .iter()
        .filter_map(|uid| {
            mesh.workloads
                .iter()
                .find(|w| w.uid.as_ref() == uid.as_str())
        })
        .filter_map(|w| w.addresses.first())
        .map(|ip| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.to_string(),
                        port_specifier: Some(
                            ambient_proto::core::socket_address::PortSpecifier::PortValue(
                                u32::from(port),
                            ),
                        ),
                    })),
                }),
            })),
            health_status: ambient_proto::core::HealthStatus::Healthy as i32,
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints { lb_endpoints }],
    }
}

fn route(
    name: &str,
    m: Option<&HttpMatch>,
    rule: &HttpRule,
    clusters: &[(String, u32)],
) -> Result<Route, EncodeError> {
    let action = match &rule.action {
        HttpAction::Deny => route::Action::DirectResponse(direct(403, "RBAC: access denied\n")),
        HttpAction::Respond { status, body } => {
            route::Action::DirectResponse(direct(*status, body))
        }
        HttpAction::Route(_) => route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                WeightedCluster {
                    clusters: clusters
                        .iter()
                        .map(|(name, weight)| weighted_cluster::ClusterWeight {
                            name: name.clone(),
                            weight: Some(*weight),
                        })
                        .collect(),
                },
            )),
            // Zero is "no timeout" (unset would be Envoy's 15 s).
            timeout: Some(duration(rule.policy.timeout.unwrap_or_default())),
            retry_policy: rule.policy.retries.as_deref().map(retry),
        }),
    };
    let mut typed_per_filter_config = BTreeMap::new();
    if let Some(f) = &rule.policy.fault {
        typed_per_filter_config.insert(FAULT_FILTER.to_string(), any(name, &fault(f))?);
    }
    Ok(Route {
        name: name.to_string(),
        r#match: Some(route_match(m)),
        action: Some(action),
        typed_per_filter_config,
    })
}

fn direct(status: u16, body: &str) -> DirectResponseAction {
    DirectResponseAction {
        status: u32::from(status),
        body: Some(DataSource {
            specifier: Some(data_source::Specifier::InlineString(body.to_string())),
        }),
    }
}

fn route_match(m: Option<&HttpMatch>) -> RouteMatch {
    let path = match m.and_then(|m| m.path.as_ref()) {
        None => route_match::PathSpecifier::Prefix("/".into()),
        Some(PathMatch::Exact(p)) => route_match::PathSpecifier::Path(p.clone()),
        Some(PathMatch::Prefix(p)) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(PathMatch::Regex(re)) => route_match::PathSpecifier::SafeRegex(regex(re.as_str())),
    };
    let mut headers = Vec::new();
    if let Some(method) = m.and_then(|m| m.method.as_ref()) {
        headers.push(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
                string(&ValueMatch::Exact(method.clone())),
            )),
            invert_match: false,
        });
    }
    for h in m.map(|m| &m.headers[..]).unwrap_or_default() {
        let spec = match &h.value {
            ValueMatch::Present => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
            v => header_matcher::HeaderMatchSpecifier::StringMatch(string(v)),
        };
        headers.push(HeaderMatcher {
            name: h.name.clone(),
            header_match_specifier: Some(spec),
            invert_match: h.invert,
        });
    }
    RouteMatch {
        path_specifier: Some(path),
        headers,
    }
}

fn regex(re: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher { regex: re.into() }
}

fn string(v: &ValueMatch) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let pattern = match v {
        ValueMatch::Exact(s) => MatchPattern::Exact(s.clone()),
        ValueMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
        ValueMatch::Regex(re) => MatchPattern::SafeRegex(regex(re.as_str())),
        // Written as `present_match` by the caller.
        ValueMatch::Present => MatchPattern::Prefix(String::new()),
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
    }
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn retry(r: &RetryPolicy) -> PbRetry {
    let (retry_on, retriable_status_codes) = retry_on(&r.on);
    PbRetry {
        retry_on,
        num_retries: Some(r.attempts),
        per_try_timeout: r.per_try_timeout.map(duration),
        // What the waypoint always does, said as istiod says it.
        retry_host_predicate: vec![retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: None,
        }],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes,
    }
}

/// Envoy's `retry_on` text and status codes for `on`.
fn retry_on(on: &RetryOn) -> (String, Vec<u32>) {
    let mut conds: Vec<&str> = Vec::new();
    let flags = [
        (on.server_error, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.connect_failure, "connect-failure"),
        (on.reset, "reset"),
        (!on.status_codes.is_empty(), "retriable-status-codes"),
    ];
    conds.extend(flags.iter().filter(|(set, _)| *set).map(|(_, c)| *c));
    conds.extend(on.grpc_statuses.iter().filter_map(|g| match g {
        1 => Some("cancelled"),
        4 => Some("deadline-exceeded"),
        8 => Some("resource-exhausted"),
        13 => Some("internal"),
        14 => Some("unavailable"),
        _ => None,
    }));
    let codes = on.status_codes.iter().map(|c| u32::from(*c)).collect();
    (conds.join(","), codes)
}

fn fault(f: &Fault) -> pb_fault::HttpFault {
    pb_fault::HttpFault {
        delay: f.delay.map(|(d, share)| fault_common::FaultDelay {
            fault_delay_secifier: Some(fault_common::fault_delay::FaultDelaySecifier::FixedDelay(
                duration(d),
            )),
            percentage: Some(percent(share)),
        }),
        abort: f.abort.map(|(status, share)| pb_fault::FaultAbort {
            error_type: Some(pb_fault::fault_abort::ErrorType::HttpStatus(u32::from(
                status,
            ))),
            percentage: Some(percent(share)),
        }),
    }
}

fn percent(s: Share) -> FractionalPercent {
    FractionalPercent {
        numerator: s.per_million(),
        denominator: DenominatorType::Million as i32,
    }
}
