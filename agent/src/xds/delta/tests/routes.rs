//! A waypoint's routes over xDS: what the mesh file says reaches the model
//! through Envoy's RouteConfiguration and ClusterLoadAssignment, and what
//! the waypoint does not implement is refused with its last good version
//! kept.

use ambient_proto::prost::Message;
use ambient_proto::route::{self as pb_route, RouteConfiguration};
use ambient_proto::{ENDPOINT_TYPE_URL, ROUTE_TYPE_URL};

use super::*;
use crate::state::{HttpAction, HttpMatch, HttpRoute, HttpRule, PathMatch, Snapshot};

const ROUTED: &str = r#"
workloads:
  - {uid: v1, name: v1, namespace: shop, addresses: [10.0.0.1], node: n}
  - {uid: v2, name: v2, namespace: shop, addresses: [10.0.0.2], node: n}
services:
  - {name: web, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: [v1, v2]}
httpRoutes:
  - name: split
    namespace: shop
    service: shop/web.shop.svc.cluster.local
    rules:
      - matches:
          - path: {regex: "/api/v[0-9]+/.*"}
            method: post
            headers:
              x-exact: one
              x-prefix: {prefix: "Bearer "}
              x-gone: {present: true, invert: true}
          - path: {exact: /two}
        backends: [{workloads: [v1], weight: 90}, {workloads: [v2], weight: 10}]
        timeout: 2s
        retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,409,unavailable"}
        fault:
          delay: {fixedDelay: 100ms, percentage: 50}
          abort: {httpStatus: 503, percentage: 0.5}
      - matches: [{path: {prefix: /admin}}]
        deny: true
      - directResponse: {status: 418, body: "short and stout"}
      - backends: [{workloads: [v1, v2]}]
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 10s, maxEjectionPercent: 50}
"#;

/// `route` as a waypoint receives it over xDS: a rule per match (Envoy
/// matches once per route), a rule without matches on prefix `/`, a deny
/// as Istio's 403, no timeout written as zero; then Envoy's 404 for a
/// request no route matches.
fn as_served(route: &HttpRoute) -> HttpRoute {
    let mut rules = Vec::new();
    for rule in &route.rules {
        let action = match &rule.action {
            HttpAction::Deny => HttpAction::Respond {
                status: 403,
                body: "RBAC: access denied\n".into(),
            },
            other => other.clone(),
        };
        let matches = if rule.matches.is_empty() {
            vec![HttpMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..HttpMatch::default()
            }]
        } else {
            rule.matches.clone()
        };
        for m in matches {
            let mut m = m.clone();
            m.path.get_or_insert(PathMatch::Prefix("/".into()));
            m.headers.sort_by(|a, b| a.name.cmp(&b.name));
            let mut policy = rule.policy.clone();
            if !matches!(action, HttpAction::Route(_)) {
                policy.timeout = None;
                policy.retries = None;
            }
            rules.push(HttpRule {
                matches: vec![m],
                action: action.clone(),
                policy,
            });
        }
    }
    rules.push(HttpRule {
        matches: Vec::new(),
        action: HttpAction::Respond {
            status: 404,
            body: String::new(),
        },
        policy: Default::default(),
    });
    HttpRoute {
        rules,
        ..route.clone()
    }
}

fn waypoint_responses(enc: &EncodedMesh) -> Vec<DeltaDiscoveryResponse> {
    WAYPOINT_TYPE_URLS
        .iter()
        .map(|t| {
            let rs = enc.of_type(t).into_iter().map(|(n, a)| resource(&n, a));
            response(t, rs.collect(), &[])
        })
        .collect()
}

fn routes_after(res: &mut Resources, resps: &[DeltaDiscoveryResponse]) -> Vec<String> {
    let mut rejected = Vec::new();
    for r in resps {
        let applied = res.apply(r.clone()).expect("a subscribed type");
        rejected.extend(applied.rejected.iter().map(|r| r.to_string()));
    }
    rejected
}

fn installed_routes(res: &mut Resources) -> Vec<HttpRoute> {
    res.delta(&Snapshot::default())
        .http_routes
        .unwrap_or_default()
}

#[test]
fn the_mesh_files_routes_reach_the_waypoint_through_rds_and_eds() {
    let mesh = parse_mesh("test", ROUTED).expect("valid");
    let enc = encode_mesh(&mesh).expect("encodes");
    assert_eq!(enc.routes.routes.len(), 1);
    // One cluster per backend, each with its workloads' addresses; the
    // service's own cluster with its outlier detection.
    assert_eq!(enc.routes.endpoints.len(), 3);
    assert_eq!(
        enc.routes.clusters.keys().collect::<Vec<_>>(),
        ["outbound|80||web.shop.svc.cluster.local"]
    );
    let mut res = Resources::default();
    assert_eq!(
        routes_after(&mut res, &waypoint_responses(&enc)),
        Vec::<String>::new()
    );
    let got = installed_routes(&mut res);
    assert_eq!(got, vec![as_served(&mesh.http_routes[0])]);
}

/// A valid route configuration for `web`, to spoil.
fn good_route() -> (String, RouteConfiguration) {
    let mesh = parse_mesh("test", ROUTED).expect("valid");
    let enc = encode_mesh(&mesh).expect("encodes");
    let (name, any) = enc.routes.routes.into_iter().next().expect("a route");
    (name, any.to_msg().expect("decodes"))
}

fn route_any(msg: &RouteConfiguration, extra: &[u8]) -> ambient_proto::prost_types::Any {
    let mut value = msg.encode_to_vec();
    value.extend_from_slice(extra);
    ambient_proto::prost_types::Any {
        type_url: ROUTE_TYPE_URL.into(),
        value,
    }
}

fn first_route(c: &mut RouteConfiguration) -> &mut pb_route::Route {
    &mut c.virtual_hosts[0].routes[0]
}

/// The first route's fault filter configuration.
fn fault_of(c: &mut RouteConfiguration) -> &mut ambient_proto::prost_types::Any {
    first_route(c)
        .typed_per_filter_config
        .values_mut()
        .next()
        .expect("a fault")
}

#[test]
fn what_the_waypoint_does_not_implement_is_refused_and_the_last_good_version_kept() {
    type Spoil = fn(&mut RouteConfiguration);
    // (what, spoiling, what the NACK says)
    let cases: &[(&str, Spoil, &str)] = &[
        (
            "a per-filter config other than faults",
            |c| {
                let any = first_route(c)
                    .typed_per_filter_config
                    .values()
                    .next()
                    .cloned();
                first_route(c)
                    .typed_per_filter_config
                    .insert("envoy.filters.http.rbac".into(), any.expect("a fault"));
            },
            "HTTP filter \"envoy.filters.http.rbac\"",
        ),
        (
            "another retry host predicate",
            |c| {
                if let Some(pb_route::route::Action::Route(a)) = &mut first_route(c).action {
                    let r = a.retry_policy.as_mut().expect("retries");
                    r.retry_host_predicate[0].name =
                        "envoy.retry_host_predicates.omit_canary_hosts".into();
                }
            },
            "retry host predicate",
        ),
        (
            "a regex the waypoint cannot compile",
            |c| {
                if let Some(pb_route::route_match::PathSpecifier::SafeRegex(re)) =
                    &mut first_route(c)
                        .r#match
                        .as_mut()
                        .expect("match")
                        .path_specifier
                {
                    re.regex = "(unclosed".into();
                }
            },
            "invalid regular expression",
        ),
        (
            "two virtual hosts",
            |c| c.virtual_hosts.push(c.virtual_hosts[0].clone()),
            "one virtual host per service",
        ),
        (
            "a virtual host for another host",
            |c| c.virtual_hosts[0].domains = vec!["other.example.com".into()],
            "must list the service's hostname",
        ),
        (
            "a pseudo-header match",
            |c| {
                let m = first_route(c).r#match.as_mut().expect("match");
                m.headers[1].name = ":authority".into();
            },
            "pseudo-header :authority",
        ),
        (
            "weights that are all zero",
            |c| {
                if let Some(pb_route::route::Action::Route(a)) = &mut first_route(c).action {
                    if let Some(pb_route::route_action::ClusterSpecifier::WeightedClusters(w)) =
                        &mut a.cluster_specifier
                    {
                        w.clusters.iter_mut().for_each(|c| c.weight = Some(0));
                    }
                }
            },
            "every weight is zero",
        ),
        (
            "a status code in retry_on",
            |c| {
                if let Some(pb_route::route::Action::Route(a)) = &mut first_route(c).action {
                    a.retry_policy.as_mut().expect("retries").retry_on = "5xx,503".into();
                }
            },
            "a status code is not a retry_on condition",
        ),
    ];
    for (what, spoil, says) in cases {
        let (name, good) = good_route();
        let mut res = Resources::default();
        let ok = resource(&name, route_any(&good, &[]));
        assert!(routes_after(&mut res, &[response(ROUTE_TYPE_URL, vec![ok], &[])]).is_empty());
        let before = installed_routes(&mut res);
        let mut bad = good.clone();
        spoil(&mut bad);
        let mut r = resource(&name, route_any(&bad, &[]));
        r.version = "v2".into();
        let rejected = routes_after(&mut res, &[response(ROUTE_TYPE_URL, vec![r], &[])]);
        assert_eq!(rejected.len(), 1, "{what}: {rejected:?}");
        assert!(rejected[0].contains(says), "{what}: {rejected:?}");
        // Nothing changed: the last good version serves.
        assert_eq!(res.delta(&Snapshot::default()).http_routes, None, "{what}");
        assert!(!before.is_empty());
        assert_eq!(res.versions(ROUTE_TYPE_URL)[&name], "v1", "{what}");
    }
}

#[test]
fn fields_outside_the_declared_subset_are_refused_by_where_they_are() {
    let (name, good) = good_route();
    let refused = |any| {
        let mut res = Resources::default();
        let r = resource(&name, any);
        routes_after(&mut res, &[response(ROUTE_TYPE_URL, vec![r], &[])])
    };
    // Envoy's `ignore_port_in_host_matching` (14), which we do not declare.
    let rejected = refused(route_any(&good, &[0x70, 0x01]));
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].ends_with(": not implemented by this waypoint (field 14)"),
        "{rejected:?}"
    );
    // Inside the fault filter's config (an Any of its own): Envoy's
    // `upstream_cluster` (3), which would narrow the fault to one cluster.
    let mut c = good.clone();
    let fault = fault_of(&mut c);
    fault.value.extend_from_slice(&[0x1a, 0x01, b'x']);
    let rejected = refused(route_any(&c, &[]));
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains(
            "virtual_hosts[0].routes[0].typed_per_filter_config[envoy.filters.http.fault]: \
             not implemented by this waypoint (field 3)"
        ),
        "{rejected:?}"
    );
    // An enum value this schema does not name.
    let mut c = good.clone();
    let fault = fault_of(&mut c);
    let mut f: ambient_proto::fault::HttpFault = fault.to_msg().expect("a fault");
    if let Some(d) = f.delay.as_mut() {
        d.percentage.as_mut().expect("a share").denominator = 7;
    }
    *fault = ambient_proto::prost_types::Any::from_msg(&f).expect("encodes");
    let rejected = refused(route_any(&c, &[]));
    assert!(
        rejected.len() == 1
            && rejected[0].contains(
                "delay.percentage.denominator: not implemented by this waypoint (enum value 7)"
            ),
        "{rejected:?}"
    );
}

#[test]
fn a_cluster_follows_its_endpoints_and_the_workloads_at_them() {
    let mesh = parse_mesh("test", ROUTED).expect("valid");
    let enc = encode_mesh(&mesh).expect("encodes");
    let mut res = Resources::default();
    // Routes and endpoints before the workloads: no backend has a workload.
    let resps = waypoint_responses(&enc);
    let (l7, l4): (Vec<_>, Vec<_>) = resps
        .into_iter()
        .partition(|r| r.type_url == ROUTE_TYPE_URL || r.type_url == ENDPOINT_TYPE_URL);
    assert!(routes_after(&mut res, &l7).is_empty());
    let early = installed_routes(&mut res);
    let HttpAction::Route(backends) = &early[0].rules[0].action else {
        panic!("a route")
    };
    assert!(backends.iter().all(|b| b.workload_uids.is_empty()));
    // Then the workloads: the routes are joined again.
    assert!(routes_after(&mut res, &l4).is_empty());
    let d = res.delta(&Snapshot::default());
    let routes = d.http_routes.expect("routes changed");
    assert_eq!(routes, vec![as_served(&mesh.http_routes[0])]);
    // A cluster removed: its backend has nobody (503), the rest stays.
    let cluster = enc
        .routes
        .endpoints
        .keys()
        .next()
        .expect("a cluster")
        .clone();
    assert!(routes_after(
        &mut res,
        &[response(ENDPOINT_TYPE_URL, vec![], &[&cluster])]
    )
    .is_empty());
    let routes = installed_routes(&mut res);
    let HttpAction::Route(backends) = &routes[0].rules[0].action else {
        panic!("a route")
    };
    assert_eq!(
        backends
            .iter()
            .map(|b| b.workload_uids.len())
            .collect::<Vec<_>>(),
        [0, 1]
    );
}

/// The mesh file sends a request no rule matches to any endpoint; Envoy
/// answers it 404. Served over xDS, such a route ends with a route to the
/// service's own cluster (with istiod's default retries).
#[test]
fn a_route_without_a_catch_all_rule_gets_the_services_cluster() {
    // Without the rules that match everything.
    let yaml = ROUTED
        .replace("      - backends: [{workloads: [v1, v2]}]\n", "")
        .replace(
            "      - directResponse: {status: 418, body: \"short and stout\"}\n",
            "",
        );
    let mesh = parse_mesh("test", &yaml).expect("valid");
    let enc = encode_mesh(&mesh).expect("encodes");
    assert!(enc
        .routes
        .endpoints
        .contains_key("outbound|80||web.shop.svc.cluster.local"));
    let mut res = Resources::default();
    assert!(routes_after(&mut res, &waypoint_responses(&enc)).is_empty());
    let got = installed_routes(&mut res);
    let mut want = as_served(&mesh.http_routes[0]);
    let last = want.rules.len() - 1;
    want.rules.insert(
        last,
        HttpRule {
            matches: vec![HttpMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..HttpMatch::default()
            }],
            action: HttpAction::Route(vec![crate::state::Backend {
                workload_uids: vec!["v1".into(), "v2".into()],
                weight: 1,
            }]),
            policy: crate::state::RequestPolicy::istio_default(),
        },
    );
    assert_eq!(got, vec![want]);
}

#[test]
fn a_service_cluster_carries_outlier_detection_and_what_is_not_implemented_is_refused() {
    use crate::state::l7::OutlierDetection;
    use ambient_proto::cluster::{Cluster, OutlierDetection as PbOutlier};
    use ambient_proto::CLUSTER_TYPE_URL;
    let name = "outbound|80||web.shop.svc.cluster.local";
    let cluster = |o: PbOutlier| {
        let c = Cluster {
            name: name.into(),
            outlier_detection: Some(o),
        };
        resource(
            name,
            ambient_proto::prost_types::Any::from_msg(&c).expect("encodes"),
        )
    };
    let apply = |res: &mut Resources, o: PbOutlier| {
        routes_after(res, &[response(CLUSTER_TYPE_URL, vec![cluster(o)], &[])])
    };
    let mesh = parse_mesh("test", ROUTED).expect("valid");
    let enc = encode_mesh(&mesh).expect("encodes");
    let mut res = Resources::default();
    assert!(routes_after(&mut res, &waypoint_responses(&enc)).is_empty());
    let _ = installed_routes(&mut res);
    // Envoy's defaults fill what is unset (5 errors, 30 s, 10%).
    assert!(apply(&mut res, PbOutlier::default()).is_empty());
    let routes = installed_routes(&mut res);
    assert_eq!(
        routes[0].outlier_detection,
        Some(OutlierDetection::default())
    );
    // (what, outlier detection, what the NACK says)
    let refused: &[(&str, PbOutlier, &str)] = &[
        (
            "ejection enforced for a share",
            PbOutlier {
                enforcing_consecutive_5xx: Some(50),
                ..PbOutlier::default()
            },
            "50% is neither 0 nor 100",
        ),
        (
            "success-rate ejection",
            PbOutlier {
                enforcing_success_rate: Some(100),
                ..PbOutlier::default()
            },
            "success-rate ejection",
        ),
        (
            "more than all endpoints",
            PbOutlier {
                max_ejection_percent: Some(101),
                ..PbOutlier::default()
            },
            "101% is more than 100",
        ),
    ];
    for (what, o, says) in refused {
        let rejected = apply(&mut res, *o);
        assert!(
            rejected.len() == 1 && rejected[0].contains(says),
            "{what}: {rejected:?}"
        );
        // The last good version stays.
        assert_eq!(res.delta(&Snapshot::default()).http_routes, None, "{what}");
    }
    // Enforcing 0: no ejection.
    let off = PbOutlier {
        enforcing_consecutive_5xx: Some(0),
        ..PbOutlier::default()
    };
    assert!(apply(&mut res, off).is_empty());
    assert_eq!(installed_routes(&mut res)[0].outlier_detection, None);
}
