//! A waypoint's L7 configuration over xDS: Envoy `RouteConfiguration`s
//! (one per service, named `<namespace>/<hostname>`) and the
//! `ClusterLoadAssignment`s of the clusters their routes name
//! (`outbound|<port>|<subset>|<host>`, as istiod names them), and the
//! `Cluster`s of services (`outbound|<port>||<host>`: their outlier
//! detection). Each is
//! decoded on its own (`decode`); [`join`] makes the model's
//! [`HttpRoute`]s of them, a cluster's endpoint addresses becoming the
//! workloads that hold them. `encode` is the way back, for control planes.

mod decode;
mod encode;

use std::net::IpAddr;

pub(super) use decode::{cluster, cluster_load_assignment, route_configuration, RouteInvalid};
pub use encode::{encode_routes, EncodedRoutes};

use crate::state::{Backend, HttpAction, HttpRoute};

/// A decoded route configuration: the service's routes, each rule's
/// backends still to be filled from `targets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RouteResource {
    pub route: HttpRoute,
    /// Per rule (same order), the clusters it sends to.
    pub targets: Vec<RuleTargets>,
}

/// The clusters one rule sends to, with their weights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct RuleTargets(pub Vec<(String, u32)>);

/// A decoded cluster: what the waypoint takes from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ClusterSettings {
    pub outlier_detection: Option<crate::state::l7::OutlierDetection>,
}

/// `(port, subset, host)` of a cluster istiod names
/// `outbound|<port>|<subset>|<host>`.
pub(super) fn parse_cluster_name(name: &str) -> Option<(u16, &str, &str)> {
    let mut parts = name.split('|');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("outbound"), Some(port), Some(subset), Some(host), None) => {
            Some((port.parse().ok()?, subset, host))
        }
        _ => None,
    }
}

/// A decoded endpoint assignment: the addresses that may take traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointsResource {
    pub addresses: Vec<IpAddr>,
}

/// `route` with each rule's backends: the workloads (by uid, found by
/// `workload_at`) at its clusters' endpoint addresses, and the service's
/// `outlier_detection`. A cluster with no
/// assignment yet has no backend, and its share of requests gets 503, as
/// in Envoy.
pub(super) fn join<'a>(
    r: &RouteResource,
    endpoints: impl Fn(&str) -> Option<&'a EndpointsResource>,
    workload_at: impl Fn(&IpAddr) -> Option<&'a str>,
    outlier_detection: Option<crate::state::l7::OutlierDetection>,
) -> HttpRoute {
    let mut route = r.route.clone();
    route.outlier_detection = outlier_detection;
    for (rule, targets) in route.rules.iter_mut().zip(&r.targets) {
        if let HttpAction::Route(backends) = &mut rule.action {
            *backends = targets
                .0
                .iter()
                .map(|(name, weight)| Backend {
                    workload_uids: endpoints(name)
                        .map(|c| {
                            c.addresses
                                .iter()
                                .filter_map(&workload_at)
                                .map(str::to_string)
                                .collect()
                        })
                        .unwrap_or_default(),
                    weight: *weight,
                })
                .collect();
        }
    }
    route
}
