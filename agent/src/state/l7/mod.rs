//! L7 routes a waypoint applies to the HTTP requests of a service: match
//! a request by path, method or headers (`matching`), then deny it (403),
//! answer it directly, or send it to one of weighted subsets of the
//! service's workloads, with the rule's timeout, retries and faults
//! (`resilience`).

mod matching;
mod resilience;

use std::sync::Arc;

use rand::seq::IndexedRandom;

use super::{Reach, Service, Snapshot, Workload};

pub use matching::{HeaderMatch, HttpMatch, PathMatch, Pattern, ValueMatch};
pub use resilience::{
    Attempt, Fault, OutlierDetection, RequestPolicy, RetryOn, RetryPolicy, Share, UnknownCondition,
};

/// The routes of one service, tried in order; the first rule whose
/// matches hold decides. Without a matching rule any endpoint serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// The service (`namespace`, `hostname`) whose traffic it routes.
    pub service_namespace: String,
    pub service_hostname: String,
    pub rules: Vec<HttpRule>,
    /// Whether and when the waypoint leaves a failing endpoint out.
    pub outlier_detection: Option<OutlierDetection>,
}

/// Holds when any of `matches` holds (or always, when there are none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRule {
    pub matches: Vec<HttpMatch>,
    pub action: HttpAction,
    pub policy: RequestPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpAction {
    /// Answer 403 Forbidden.
    Deny,
    /// Send to one of these subsets, chosen by weight.
    Route(Vec<Backend>),
    /// Answer with this status and body, without a backend.
    Respond { status: u16, body: String },
}

/// A subset of a service's workloads and its share of the traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub workload_uids: Vec<String>,
    pub weight: u32,
}

/// What to do with one request.
#[derive(Clone, Debug, PartialEq)]
pub enum L7Decision {
    /// Refuse with 403; names the route and rule that denied it.
    Deny { rule: String },
    /// Answer with this status and body.
    Respond { status: u16, body: String },
    /// Send to this workload.
    Forward(Arc<Workload>),
    /// Nothing healthy to send it to.
    NoBackend,
}

impl Snapshot {
    /// The routes of `service`, if any are configured.
    pub fn http_route(&self, service: &Service) -> Option<&HttpRoute> {
        self.http_routes().iter().find(|r| {
            r.service_namespace == service.namespace && r.service_hostname == service.hostname
        })
    }

    /// Decides where request `req` to `service` goes, and with which
    /// timeout, retries and faults. `dialed` is the address the client
    /// asked the waypoint for; `tried` names workloads earlier attempts of
    /// this request went to, which a retry avoids while others remain (as
    /// Istio's `previous_hosts` retry predicate).
    pub fn route_request<B>(
        &self,
        service: &Service,
        dialed: std::net::IpAddr,
        req: &http::Request<B>,
        tried: &[super::Name],
    ) -> (L7Decision, RequestPolicy) {
        let rule = self.http_route(service).and_then(|route| {
            route
                .rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.matches.is_empty() || r.matches.iter().any(|m| m.holds(req)))
                .map(|(i, r)| (route, i, r))
        });
        let Some((route, i, rule)) = rule else {
            // A retry goes elsewhere if it can; a first attempt follows the
            // service's load balancing.
            let elsewhere = (!tried.is_empty())
                .then(|| {
                    self.choose_among(service.endpoints.iter().map(|e| &*e.workload_uid), tried)
                })
                .flatten();
            let chosen =
                elsewhere.or_else(|| self.choose_endpoint(service, dialed, None, Reach::Local));
            let decision = chosen.map_or(L7Decision::NoBackend, L7Decision::Forward);
            // Istio's default route retries as its default policy says.
            return (decision, RequestPolicy::istio_default());
        };
        let decision = match &rule.action {
            HttpAction::Deny => L7Decision::Deny {
                rule: format!("{}/{} rule {i}", route.namespace, route.name),
            },
            HttpAction::Respond { status, body } => L7Decision::Respond {
                status: *status,
                body: body.clone(),
            },
            HttpAction::Route(backends) => backends
                .choose_weighted(&mut rand::rng(), |b| b.weight)
                .ok()
                .and_then(|b| {
                    let uids = || b.workload_uids.iter().map(String::as_str);
                    self.choose_among(uids(), tried)
                        .or_else(|| self.choose_among(uids(), &[]))
                })
                .map_or(L7Decision::NoBackend, L7Decision::Forward),
        };
        (decision, rule.policy.clone())
    }

    /// A healthy workload among `uids` and not in `tried`, weighted by
    /// capacity.
    fn choose_among<'a>(
        &self,
        uids: impl Iterator<Item = &'a str>,
        tried: &[super::Name],
    ) -> Option<Arc<Workload>> {
        let candidates: Vec<&Arc<Workload>> = uids
            .filter(|uid| !tried.iter().any(|t| t.as_str() == *uid))
            .filter_map(|uid| self.workload_by_uid(uid))
            .filter(|w| w.healthy && !w.addresses.is_empty())
            .collect();
        super::route::choose_weighted(&candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, Mesh, ServicePort};

    fn mesh(rules: Vec<HttpRule>) -> Snapshot {
        let workloads = ["v1", "v2"]
            .iter()
            .enumerate()
            .map(|(i, uid)| Workload::for_test(uid, "ns", Some(&format!("10.0.0.{}", i + 1))))
            .collect();
        Snapshot::new(Mesh {
            workloads,
            services: vec![Service {
                load_balancing: None,
                name: "svc".into(),
                namespace: "ns".into(),
                hostname: "svc.ns".into(),
                vips: vec!["10.1.0.1".parse().expect("ip")],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: vec![
                    Endpoint {
                        workload_uid: "v1".into(),
                    },
                    Endpoint {
                        workload_uid: "v2".into(),
                    },
                ],
                subject_alt_names: vec![],
                visibility: Default::default(),
                ip_families: Default::default(),
                waypoint: None,
            }],
            http_routes: vec![HttpRoute {
                name: "r".into(),
                namespace: "ns".into(),
                service_namespace: "ns".into(),
                service_hostname: "svc.ns".into(),
                outlier_detection: None,
                rules,
            }],
            ..Mesh::default()
        })
    }

    fn to(uids: &[(&str, u32)]) -> HttpAction {
        HttpAction::Route(
            uids.iter()
                .map(|(u, w)| Backend {
                    workload_uids: vec![u.to_string()],
                    weight: *w,
                })
                .collect(),
        )
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    fn decide(snap: &Snapshot, r: &http::Request<()>) -> String {
        let svc = snap.to_mesh().services[0].clone();
        match snap.route_request(&svc, svc.vips[0], r, &[]).0 {
            L7Decision::Deny { rule } => format!("deny {rule}"),
            L7Decision::Respond { status, body } => format!("{status} {body}"),
            L7Decision::Forward(w) => w.uid.to_string(),
            L7Decision::NoBackend => "none".into(),
        }
    }

    #[test]
    fn rules_match_in_order() {
        let snap = mesh(vec![
            HttpRule {
                matches: vec![HttpMatch {
                    path: Some(PathMatch::Prefix("/admin".into())),
                    ..Default::default()
                }],
                action: HttpAction::Deny,
                policy: RequestPolicy::default(),
            },
            HttpRule {
                matches: vec![HttpMatch {
                    method: Some("DELETE".into()),
                    ..Default::default()
                }],
                action: HttpAction::Deny,
                policy: RequestPolicy::default(),
            },
            HttpRule {
                matches: vec![
                    HttpMatch {
                        headers: vec![HeaderMatch {
                            name: "x-version".into(),
                            value: ValueMatch::Exact("v2".into()),
                            invert: false,
                        }],
                        ..Default::default()
                    },
                    HttpMatch {
                        path: Some(PathMatch::Exact("/v2".into())),
                        ..Default::default()
                    },
                ],
                action: to(&[("v2", 1)]),
                policy: RequestPolicy::default(),
            },
            HttpRule {
                matches: vec![],
                action: to(&[("v1", 1)]),
                policy: RequestPolicy::default(),
            },
        ]);
        // (method, path, headers, expected decision)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("GET", "/admin/x", &[], "deny ns/r rule 0"),
            ("GET", "/adminx", &[], "deny ns/r rule 0"),
            ("DELETE", "/thing", &[], "deny ns/r rule 1"),
            ("GET", "/thing", &[("x-version", "v2")], "v2"),
            ("GET", "/thing", &[("x-version", "v3")], "v1"),
            ("GET", "/v2", &[], "v2"),
            ("GET", "/v2/deeper", &[], "v1"),
            ("POST", "/", &[], "v1"),
        ];
        for (method, path, headers, want) in cases {
            assert_eq!(
                decide(&snap, &req(method, path, headers)),
                *want,
                "{method} {path} {headers:?}"
            );
        }
    }

    #[test]
    fn weights_split_traffic() {
        let snap = mesh(vec![HttpRule {
            matches: vec![],
            action: to(&[("v1", 80), ("v2", 20)]),
            policy: RequestPolicy::default(),
        }]);
        let r = req("GET", "/", &[]);
        let v2 = (0..10_000).filter(|_| decide(&snap, &r) == "v2").count();
        // 2,000 expected; 5 standard deviations is 200.
        assert!((1_800..=2_200).contains(&v2), "{v2} of 10000 went to v2");
    }

    #[test]
    fn without_routes_any_endpoint_serves() {
        let snap = mesh(vec![]);
        let r = req("GET", "/", &[]);
        let seen: std::collections::HashSet<String> = (0..200).map(|_| decide(&snap, &r)).collect();
        assert_eq!(seen.len(), 2, "{seen:?}");
    }

    #[test]
    fn unhealthy_or_missing_backends_yield_none() {
        let snap = mesh(vec![HttpRule {
            matches: vec![],
            action: to(&[("gone", 1)]),
            policy: RequestPolicy::default(),
        }]);
        assert_eq!(decide(&snap, &req("GET", "/", &[])), "none");
    }
}
