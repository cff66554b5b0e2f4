//! Envoy's route configuration and endpoint assignments -> the waypoint's
//! model, one resource at a time. What the waypoint does not implement is
//! refused, never dropped: our protos declare only implemented fields, so
//! anything else a resource carries is an unknown field and named in the
//! NACK (a route half understood could send traffic where its author did
//! not mean it to go).

use std::net::IpAddr;
use std::time::Duration;

use ambient_proto::envoy_type::{fractional_percent::DenominatorType, FractionalPercent};
use ambient_proto::prost_types::{Any, Duration as PbDuration};
use ambient_proto::route::{self as pb, header_matcher, route, route_action, route_match};
use ambient_proto::unknown::{self, Unknown};
use ambient_proto::{endpoint as pb_eds, fault as pb_fault, matcher, FAULT_FILTER};

use super::{ClusterSettings, EndpointsResource, RouteResource, RuleTargets};
use crate::state::l7::{Fault, OutlierDetection, Pattern, RetryOn, RetryPolicy, Share};
use crate::state::{
    HeaderMatch, HttpAction, HttpMatch, HttpRoute, HttpRule, PathMatch, RequestPolicy, ValueMatch,
};
use crate::xds::delta::convert::{field, Invalid, RejectReason};

const ROUTE_MESSAGE: &str = "envoy.config.route.v3.RouteConfiguration";
const ENDPOINT_MESSAGE: &str = "envoy.config.endpoint.v3.ClusterLoadAssignment";
const FAULT_MESSAGE: &str = "envoy.extensions.filters.http.fault.v3.HTTPFault";
const CLUSTER_MESSAGE: &str = "envoy.config.cluster.v3.Cluster";
/// Envoy's route timeout when `timeout` is unset.
const ENVOY_DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// The retry host predicate the waypoint always applies.
const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";

/// What in a route resource the waypoint cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteInvalid {
    #[error("not implemented by this waypoint ({0})")]
    NotImplemented(String),
    #[error("is required")]
    Required,
    #[error("resource name must be <namespace>/<hostname> of the service it routes")]
    Name,
    #[error("must be the resource's name")]
    NotResourceName,
    #[error("one virtual host per service is supported, not {0}")]
    VirtualHosts(usize),
    #[error("must list the service's hostname {0:?}")]
    Domains(String),
    #[error("must be <namespace>/<name> of the route's source")]
    VirtualHostName,
    #[error("HTTP status {0} is not in 200..=599")]
    Status(u32),
    #[error("invalid regular expression: {0}")]
    Regex(String),
    #[error("{0}")]
    RetryOn(String),
    #[error("every weight is zero")]
    NoWeight,
    #[error("a duration must be 0 or more and its nanoseconds in 0..1e9")]
    Duration,
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("the body is not UTF-8")]
    Body,
    #[error("{0}% is neither 0 nor 100")]
    Enforcing(u32),
    #[error("{0}% is more than 100")]
    Percent(u32),
}

fn bad(at: impl Into<String>, why: RouteInvalid) -> RejectReason {
    field(at, Invalid::Route(why))
}

fn decode_error(e: impl std::fmt::Display) -> RejectReason {
    RejectReason::Decode(e.to_string())
}

/// The first part of `bytes` (a `message`) our schema does not declare, as
/// a refusal.
fn refuse_unknown(message: &str, bytes: &[u8], prefix: &str) -> Result<(), RejectReason> {
    let found: Vec<Unknown> = unknown::find(message, bytes).map_err(decode_error)?;
    match found.first() {
        None => Ok(()),
        Some(u) => {
            let path = unknown::path(message, u);
            let path = match (prefix.is_empty(), path.is_empty()) {
                (true, _) => path,
                (false, true) => prefix.to_string(),
                (false, false) => format!("{prefix}.{path}"),
            };
            Err(bad(path, RouteInvalid::NotImplemented(u.what())))
        }
    }
}

/// Decodes the `RouteConfiguration` named `name` (`<namespace>/<hostname>`
/// of the service whose requests it routes).
pub(in crate::xds::delta) fn route_configuration(
    name: &str,
    any: &Any,
) -> Result<RouteResource, RejectReason> {
    let msg: pb::RouteConfiguration = any.to_msg().map_err(decode_error)?;
    refuse_unknown(ROUTE_MESSAGE, &any.value, "")?;
    if !msg.name.is_empty() && msg.name != name {
        return Err(bad("name", RouteInvalid::NotResourceName));
    }
    let (service_namespace, service_hostname) = name
        .split_once('/')
        .filter(|(ns, host)| !ns.is_empty() && !host.is_empty() && !host.contains('/'))
        .ok_or_else(|| bad("name", RouteInvalid::Name))?;
    let vh = match msg.virtual_hosts.as_slice() {
        [one] => one,
        many => return Err(bad("virtual_hosts", RouteInvalid::VirtualHosts(many.len()))),
    };
    let on_host = |d: &String| {
        d == service_hostname
            || d.strip_prefix(service_hostname)
                .is_some_and(|rest| rest.starts_with(':'))
    };
    if !vh.domains.iter().any(on_host) {
        let why = RouteInvalid::Domains(service_hostname.to_string());
        return Err(bad("virtual_hosts[0].domains", why));
    }
    let (namespace, route_name) = vh
        .name
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
        .ok_or_else(|| bad("virtual_hosts[0].name", RouteInvalid::VirtualHostName))?;
    let mut rules = Vec::with_capacity(vh.routes.len());
    let mut targets = Vec::with_capacity(vh.routes.len());
    for (i, r) in vh.routes.iter().enumerate() {
        let at = format!("virtual_hosts[0].routes[{i}]");
        let (rule, clusters) = rule(&at, r)?;
        rules.push(rule);
        targets.push(clusters);
    }
    // Envoy answers a request no route matches with 404; the model's
    // fallback (any endpoint) is the mesh file's, not Envoy's.
    rules.push(HttpRule {
        matches: Vec::new(),
        action: HttpAction::Respond {
            status: 404,
            body: String::new(),
        },
        policy: RequestPolicy::default(),
    });
    targets.push(RuleTargets::default());
    Ok(RouteResource {
        route: HttpRoute {
            name: route_name.to_string(),
            namespace: namespace.to_string(),
            service_namespace: service_namespace.to_string(),
            service_hostname: service_hostname.to_string(),
            rules,
            // A cluster's (CDS) setting in Envoy; not carried by routes.
            outlier_detection: None,
        },
        targets,
    })
}

fn rule(at: &str, r: &pb::Route) -> Result<(HttpRule, RuleTargets), RejectReason> {
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| bad(format!("{at}.match"), RouteInvalid::Required))?;
    let matched = http_match(&format!("{at}.match"), m)?;
    let fault = fault(at, r)?;
    let (action, policy, targets) = match &r.action {
        Some(route::Action::Route(a)) => {
            let at = format!("{at}.route");
            let (targets, timeout, retries) = route_action(&at, a)?;
            let policy = RequestPolicy {
                timeout,
                retries: retries.map(std::sync::Arc::new),
                fault,
            };
            // Backends are the clusters' workloads, filled in when the
            // route is joined with the endpoint assignments.
            (HttpAction::Route(Vec::new()), policy, targets)
        }
        Some(route::Action::DirectResponse(d)) => {
            let at = format!("{at}.direct_response");
            if !(200..=599).contains(&d.status) {
                return Err(bad(format!("{at}.status"), RouteInvalid::Status(d.status)));
            }
            let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                None => String::new(),
                Some(ambient_proto::core::data_source::Specifier::InlineString(s)) => s.clone(),
                Some(ambient_proto::core::data_source::Specifier::InlineBytes(b)) => {
                    String::from_utf8(b.clone())
                        .map_err(|_| bad(format!("{at}.body"), RouteInvalid::Body))?
                }
            };
            let action = HttpAction::Respond {
                status: d.status as u16,
                body,
            };
            let policy = RequestPolicy {
                fault,
                ..RequestPolicy::default()
            };
            (action, policy, RuleTargets::default())
        }
        None => return Err(bad(format!("{at}.action"), RouteInvalid::Required)),
    };
    let rule = HttpRule {
        matches: vec![matched],
        action,
        policy,
    };
    Ok((rule, targets))
}

fn http_match(at: &str, m: &pb::RouteMatch) -> Result<HttpMatch, RejectReason> {
    let path = match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(route_match::PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(route_match::PathSpecifier::SafeRegex(re)) => {
            PathMatch::Regex(pattern(&format!("{at}.safe_regex"), &re.regex)?)
        }
        None => return Err(bad(format!("{at}.path_specifier"), RouteInvalid::Required)),
    };
    let mut out = HttpMatch {
        path: Some(path),
        method: None,
        headers: Vec::with_capacity(m.headers.len()),
    };
    for (i, h) in m.headers.iter().enumerate() {
        let at = format!("{at}.headers[{i}]");
        let name = h.name.to_ascii_lowercase();
        let (value, invert) = match &h.header_match_specifier {
            // Envoy: `present_match: false` holds when the header is absent.
            Some(header_matcher::HeaderMatchSpecifier::PresentMatch(p)) => {
                (ValueMatch::Present, h.invert_match ^ !*p)
            }
            None => (ValueMatch::Present, h.invert_match),
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(s)) => {
                (string_match(&at, s)?, h.invert_match)
            }
        };
        if name == ":method" {
            match (&value, invert, &out.method) {
                (ValueMatch::Exact(v), false, None) => out.method = Some(v.to_ascii_uppercase()),
                _ => {
                    let why = RouteInvalid::NotImplemented(
                        "a method match other than one exact method".into(),
                    );
                    return Err(bad(at, why));
                }
            }
            continue;
        }
        if name.starts_with(':') {
            let why = RouteInvalid::NotImplemented(format!("a match on pseudo-header {name}"));
            return Err(bad(format!("{at}.name"), why));
        }
        out.headers.push(HeaderMatch {
            name,
            value,
            invert,
        });
    }
    Ok(out)
}

fn string_match(at: &str, s: &matcher::StringMatcher) -> Result<ValueMatch, RejectReason> {
    use matcher::string_matcher::MatchPattern;
    match &s.match_pattern {
        Some(MatchPattern::Exact(v)) => Ok(ValueMatch::Exact(v.clone())),
        Some(MatchPattern::Prefix(v)) => Ok(ValueMatch::Prefix(v.clone())),
        Some(MatchPattern::SafeRegex(re)) => Ok(ValueMatch::Regex(pattern(
            &format!("{at}.string_match.safe_regex"),
            &re.regex,
        )?)),
        None => Err(bad(format!("{at}.string_match"), RouteInvalid::Required)),
    }
}

fn pattern(at: &str, re: &str) -> Result<Pattern, RejectReason> {
    Pattern::new(re).map_err(|e| {
        let text = e.to_string();
        let why = text.lines().last().unwrap_or_default().trim().to_string();
        bad(at, RouteInvalid::Regex(why))
    })
}

type Action = (RuleTargets, Option<Duration>, Option<RetryPolicy>);

fn route_action(at: &str, a: &pb::RouteAction) -> Result<Action, RejectReason> {
    let targets = match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => RuleTargets(vec![(c.clone(), 1)]),
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let clusters: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.unwrap_or(0)))
                .collect();
            if clusters.iter().all(|(_, w)| *w == 0) {
                return Err(bad(
                    format!("{at}.weighted_clusters"),
                    RouteInvalid::NoWeight,
                ));
            }
            RuleTargets(clusters)
        }
        None => {
            return Err(bad(
                format!("{at}.cluster_specifier"),
                RouteInvalid::Required,
            ))
        }
    };
    let timeout = match &a.timeout {
        None => Some(ENVOY_DEFAULT_TIMEOUT),
        Some(d) => {
            let d = duration(&format!("{at}.timeout"), d)?;
            (!d.is_zero()).then_some(d)
        }
    };
    let retries = a
        .retry_policy
        .as_ref()
        .map(|r| retry_policy(&format!("{at}.retry_policy"), r))
        .transpose()?;
    Ok((targets, timeout, retries))
}

fn retry_policy(at: &str, r: &pb::RetryPolicy) -> Result<RetryPolicy, RejectReason> {
    let mut on = RetryOn::parse(&r.retry_on).map_err(|e| {
        bad(
            format!("{at}.retry_on"),
            RouteInvalid::RetryOn(e.to_string()),
        )
    })?;
    if !on.status_codes.is_empty() {
        // Envoy takes codes from `retriable_status_codes` only.
        let why = RouteInvalid::RetryOn("a status code is not a retry_on condition".into());
        return Err(bad(format!("{at}.retry_on"), why));
    }
    if r.retry_on
        .split(',')
        .any(|c| c.trim() == "retriable-status-codes")
    {
        for (i, c) in r.retriable_status_codes.iter().enumerate() {
            let code = u16::try_from(*c)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| {
                    bad(
                        format!("{at}.retriable_status_codes[{i}]"),
                        RouteInvalid::Status(*c),
                    )
                })?;
            on.status_codes.push(code);
        }
    }
    for (i, p) in r.retry_host_predicate.iter().enumerate() {
        if p.name != PREVIOUS_HOSTS {
            let why = RouteInvalid::NotImplemented(format!("retry host predicate {:?}", p.name));
            return Err(bad(format!("{at}.retry_host_predicate[{i}]"), why));
        }
    }
    let per_try_timeout = r
        .per_try_timeout
        .as_ref()
        .map(|d| duration(&format!("{at}.per_try_timeout"), d))
        .transpose()?
        .filter(|d| !d.is_zero());
    Ok(RetryPolicy {
        // Envoy's default when unset.
        attempts: r.num_retries.unwrap_or(1),
        per_try_timeout,
        on,
    })
}

fn duration(at: &str, d: &PbDuration) -> Result<Duration, RejectReason> {
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(s), Ok(n)) if n < 1_000_000_000 => Ok(Duration::new(s, n)),
        _ => Err(bad(at, RouteInvalid::Duration)),
    }
}

/// The route's fault injection, if it carries one; any other per-filter
/// configuration is refused.
fn fault(at: &str, r: &pb::Route) -> Result<Option<Fault>, RejectReason> {
    let mut out = None;
    for (name, any) in &r.typed_per_filter_config {
        let at = format!("{at}.typed_per_filter_config[{name}]");
        if name != FAULT_FILTER {
            let why = RouteInvalid::NotImplemented(format!("HTTP filter {name:?}"));
            return Err(bad(at, why));
        }
        let f: pb_fault::HttpFault = any.to_msg().map_err(decode_error)?;
        refuse_unknown(FAULT_MESSAGE, &any.value, &at)?;
        let delay = match &f.delay {
            None => None,
            Some(d) => {
                let at = format!("{at}.delay");
                let fixed = match &d.fault_delay_secifier {
                    Some(
                        ambient_proto::fault_common::fault_delay::FaultDelaySecifier::FixedDelay(t),
                    ) => duration(&format!("{at}.fixed_delay"), t)?,
                    None => return Err(bad(format!("{at}.fixed_delay"), RouteInvalid::Required)),
                };
                Some((fixed, share(d.percentage.as_ref())))
            }
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                let at = format!("{at}.abort");
                let status = match a.error_type {
                    Some(pb_fault::fault_abort::ErrorType::HttpStatus(s)) => s,
                    None => return Err(bad(format!("{at}.http_status"), RouteInvalid::Required)),
                };
                if !(200..=599).contains(&status) {
                    return Err(bad(
                        format!("{at}.http_status"),
                        RouteInvalid::Status(status),
                    ));
                }
                Some((status as u16, share(a.percentage.as_ref())))
            }
        };
        out = Some(Fault { delay, abort });
    }
    Ok(out)
}

/// Envoy's fraction (of a hundred, ten thousand or a million); unset,
/// every request (Istio always sets it).
fn share(p: Option<&FractionalPercent>) -> Share {
    let Some(p) = p else {
        return Share::ALL;
    };
    let per = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 100.0,
        Ok(DenominatorType::TenThousand) => 10_000.0,
        // Unknown denominators were refused as unknown enum values.
        _ => 1_000_000.0,
    };
    Share::percent((f64::from(p.numerator) / per * 100.0).min(100.0)).unwrap_or(Share::ALL)
}

/// Decodes the `ClusterLoadAssignment` named `name`: the addresses of its
/// endpoints that may take traffic (Envoy's HEALTHY, UNKNOWN, DEGRADED).
pub(in crate::xds::delta) fn cluster_load_assignment(
    name: &str,
    any: &Any,
) -> Result<EndpointsResource, RejectReason> {
    use ambient_proto::core::{address, HealthStatus};
    let msg: pb_eds::ClusterLoadAssignment = any.to_msg().map_err(decode_error)?;
    refuse_unknown(ENDPOINT_MESSAGE, &any.value, "")?;
    if msg.cluster_name != name {
        return Err(bad("cluster_name", RouteInvalid::NotResourceName));
    }
    let mut addresses = Vec::new();
    for (i, l) in msg.endpoints.iter().enumerate() {
        for (j, e) in l.lb_endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}].lb_endpoints[{j}]");
            let serving = matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Unknown | HealthStatus::Healthy | HealthStatus::Degraded)
            );
            let Some(ambient_proto::endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) =
                &e.host_identifier
            else {
                return Err(bad(format!("{at}.endpoint"), RouteInvalid::Required));
            };
            let Some(address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(bad(
                    format!("{at}.endpoint.address"),
                    RouteInvalid::Required,
                ));
            };
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                bad(
                    format!("{at}.endpoint.address.socket_address.address"),
                    RouteInvalid::Address(sa.address.clone()),
                )
            })?;
            if serving {
                addresses.push(ip);
            }
        }
    }
    Ok(EndpointsResource { addresses })
}

/// Decodes the `Cluster` named `name`: what the waypoint takes from it,
/// its outlier detection (Envoy's defaults for what is unset).
pub(in crate::xds::delta) fn cluster(
    name: &str,
    any: &Any,
) -> Result<ClusterSettings, RejectReason> {
    let msg: ambient_proto::cluster::Cluster = any.to_msg().map_err(decode_error)?;
    refuse_unknown(CLUSTER_MESSAGE, &any.value, "")?;
    if msg.name != name {
        return Err(bad("name", RouteInvalid::NotResourceName));
    }
    let Some(o) = msg.outlier_detection else {
        return Ok(ClusterSettings {
            outlier_detection: None,
        });
    };
    let at = "outlier_detection";
    if let Some(rate) = o.enforcing_success_rate.filter(|r| *r != 0) {
        let why = RouteInvalid::NotImplemented(format!("success-rate ejection ({rate}%)"));
        return Err(bad(format!("{at}.enforcing_success_rate"), why));
    }
    let enforced = match o.enforcing_consecutive_5xx.unwrap_or(100) {
        100 => true,
        0 => false,
        other => {
            let why = RouteInvalid::Enforcing(other);
            return Err(bad(format!("{at}.enforcing_consecutive_5xx"), why));
        }
    };
    let d = OutlierDetection::default();
    let max_ejection_percent = match o.max_ejection_percent {
        None => d.max_ejection_percent,
        Some(p) if p <= 100 => p,
        Some(p) => {
            return Err(bad(
                format!("{at}.max_ejection_percent"),
                RouteInvalid::Percent(p),
            ))
        }
    };
    let base_ejection_time = match &o.base_ejection_time {
        None => d.base_ejection_time,
        Some(t) => duration(&format!("{at}.base_ejection_time"), t)?,
    };
    if let Some(t) = &o.interval {
        // Checked, not used: ejection happens at once.
        duration(&format!("{at}.interval"), t)?;
    }
    Ok(ClusterSettings {
        outlier_detection: enforced.then_some(OutlierDetection {
            consecutive_errors: o.consecutive_5xx.unwrap_or(d.consecutive_errors).max(1),
            base_ejection_time,
            max_ejection_percent,
        }),
    })
}
