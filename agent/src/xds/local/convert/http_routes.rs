//! The mesh file's `httpRoutes`: each service's L7 rules, checked and
//! built into [`HttpRoute`]s (regular expressions compiled, durations and
//! retry conditions parsed, references to services and workloads
//! resolved).

use std::sync::Arc;
use std::time::Duration;

use marked_yaml::Spanned;

use super::super::schema::{
    BackendEntry, FaultEntry, HeaderMatchEntry, HeaderValueEntry, HttpMatchEntry, HttpRouteEntry,
    HttpRuleEntry, OutlierEntry, PathEntry, RetriesEntry, Text,
};
use super::{Converter, Problem, Result};
use crate::state::l7::{Fault, OutlierDetection, Pattern, RetryOn, RetryPolicy, Share};
use crate::state::{
    Backend, HeaderMatch, HttpAction, HttpMatch, HttpRoute, HttpRule, PathMatch, RequestPolicy,
    Service, ValueMatch,
};

impl Converter<'_> {
    pub(super) fn http_route(
        &self,
        i: usize,
        r: &HttpRouteEntry,
        services: &[Service],
    ) -> Result<HttpRoute> {
        let f = |name: &str| format!("httpRoutes[{i}].{name}");
        let name = self.required(&f("name"), &r.name)?;
        let namespace = self.required(&f("namespace"), &r.namespace)?;
        let service = match r.service.split_once('/') {
            Some((ns, host))
                if services
                    .iter()
                    .any(|s| s.namespace == ns && s.hostname == host) =>
            {
                (ns.to_string(), host.to_string())
            }
            _ => {
                let problem = Problem::UnknownService(r.service.to_string());
                return Err(self.err(f("service"), r.service.span(), problem));
            }
        };
        let rules = r
            .rules
            .iter()
            .enumerate()
            .map(|(j, rule)| self.http_rule(&f(&format!("rules[{j}]")), &r.name, rule))
            .collect::<Result<_>>()?;
        let outlier_detection = r
            .outlier_detection
            .as_ref()
            .map(|o| self.outlier(&f("outlierDetection"), o))
            .transpose()?;
        Ok(HttpRoute {
            name,
            namespace,
            service_namespace: service.0,
            service_hostname: service.1,
            rules,
            outlier_detection,
        })
    }

    fn outlier(&self, field: &str, o: &OutlierEntry) -> Result<OutlierDetection> {
        let d = OutlierDetection::default();
        let percent = match &o.max_ejection_percent {
            None => d.max_ejection_percent,
            Some(p) if **p <= 100 => **p,
            Some(p) => {
                let field = format!("{field}.maxEjectionPercent");
                return Err(self.err(field, p.span(), Problem::Percentage));
            }
        };
        Ok(OutlierDetection {
            consecutive_errors: o
                .consecutive_5xx_errors
                .unwrap_or(d.consecutive_errors)
                .max(1),
            base_ejection_time: match &o.base_ejection_time {
                None => d.base_ejection_time,
                Some(t) => self.duration(&format!("{field}.baseEjectionTime"), t)?,
            },
            max_ejection_percent: percent,
        })
    }

    fn http_rule(&self, field: &str, route_name: &Text, rule: &HttpRuleEntry) -> Result<HttpRule> {
        let matches = rule
            .matches
            .iter()
            .enumerate()
            .map(|(k, m)| self.http_match(&format!("{field}.matches[{k}]"), route_name, m))
            .collect::<Result<_>>()?;
        let actions = usize::from(rule.deny)
            + usize::from(rule.backends.is_some())
            + usize::from(rule.direct_response.is_some());
        let action = match (&rule.deny, &rule.backends, &rule.direct_response) {
            (true, None, None) => HttpAction::Deny,
            (false, Some(backends), None) => {
                HttpAction::Route(self.backends(&format!("{field}.backends"), backends)?)
            }
            (false, None, Some(d)) => {
                let status = *d.status;
                if !(200..=599).contains(&status) {
                    let field = format!("{field}.directResponse.status");
                    return Err(self.err(field, d.status.span(), Problem::HttpStatus));
                }
                HttpAction::Respond {
                    status,
                    body: d.body.clone(),
                }
            }
            _ => {
                let span = route_name.span();
                return Err(self.err(field, span, Problem::RuleActions(actions)));
            }
        };
        let timeout = rule
            .timeout
            .as_ref()
            .map(|t| self.duration(&format!("{field}.timeout"), t))
            .transpose()?;
        // As istiod: no `retries` on a route is its default policy,
        // `attempts: 0` none.
        let retries = match &rule.retries {
            None if matches!(action, HttpAction::Route(_)) => Some(RetryPolicy::istio_default()),
            None => None,
            Some(r) if r.attempts == 0 => None,
            Some(r) => Some(Arc::new(self.retries(&format!("{field}.retries"), r)?)),
        };
        let fault = rule
            .fault
            .as_ref()
            .map(|f| self.fault(&format!("{field}.fault"), f))
            .transpose()?;
        Ok(HttpRule {
            matches,
            action,
            policy: RequestPolicy {
                timeout,
                retries,
                fault,
            },
        })
    }

    fn http_match(&self, field: &str, route_name: &Text, m: &HttpMatchEntry) -> Result<HttpMatch> {
        let path = match &m.path {
            None => None,
            Some(PathEntry::Exact(p)) => Some(PathMatch::Exact(p.clone())),
            Some(PathEntry::Prefix(p)) => Some(PathMatch::Prefix(p.clone())),
            Some(PathEntry::Regex(re)) => Some(PathMatch::Regex(self.pattern(
                &format!("{field}.path.regex"),
                re.span(),
                re,
            )?)),
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (name, value) in &m.headers {
            let f = format!("{field}.headers.{name}");
            let (value, invert) = match value {
                HeaderValueEntry::Exact(v) => (ValueMatch::Exact(v.clone()), false),
                HeaderValueEntry::Match(h) => (self.header_value(&f, route_name, h)?, h.invert),
            };
            headers.push(HeaderMatch {
                name: name.to_ascii_lowercase(),
                value,
                invert,
            });
        }
        Ok(HttpMatch {
            path,
            method: m.method.as_ref().map(|m| m.to_ascii_uppercase()),
            headers,
        })
    }

    fn header_value(
        &self,
        field: &str,
        route_name: &Text,
        h: &HeaderMatchEntry,
    ) -> Result<ValueMatch> {
        let kinds = usize::from(h.exact.is_some())
            + usize::from(h.prefix.is_some())
            + usize::from(h.regex.is_some())
            + usize::from(h.present);
        // A header match has no span of its own; the route's name points
        // the reader to the right entry.
        let span = route_name.span();
        match (&h.exact, &h.prefix, &h.regex, h.present) {
            (Some(e), None, None, false) => Ok(ValueMatch::Exact(e.clone())),
            (None, Some(p), None, false) => Ok(ValueMatch::Prefix(p.clone())),
            (None, None, Some(re), false) => Ok(ValueMatch::Regex(self.pattern(
                &format!("{field}.regex"),
                span,
                re,
            )?)),
            (None, None, None, true) => Ok(ValueMatch::Present),
            _ => Err(self.err(field, span, Problem::HeaderMatchKinds(kinds))),
        }
    }

    fn pattern(&self, field: &str, span: &marked_yaml::Span, re: &str) -> Result<Pattern> {
        Pattern::new(re).map_err(|e| {
            // The parser's message spans lines (the pattern, a caret); its
            // last line says what is wrong.
            let text = e.to_string();
            let why = text.lines().last().unwrap_or_default().trim().to_string();
            self.err(field, span, Problem::Regex(why))
        })
    }

    fn duration(&self, field: &str, t: &Text) -> Result<Duration> {
        humantime_serde::re::humantime::parse_duration(t.trim())
            .map_err(|_| self.err(field, t.span(), Problem::Duration(t.to_string())))
    }

    fn retries(&self, field: &str, r: &RetriesEntry) -> Result<RetryPolicy> {
        let on = match &r.retry_on {
            Some(t) => RetryOn::parse(t)
                .map_err(|e| self.err(format!("{field}.retryOn"), t.span(), Problem::RetryOn(e)))?,
            // istiod keeps its default conditions.
            None => RetryPolicy::istio_default().on.clone(),
        };
        let per_try_timeout = r
            .per_try_timeout
            .as_ref()
            .map(|t| self.duration(&format!("{field}.perTryTimeout"), t))
            .transpose()?;
        Ok(RetryPolicy {
            attempts: r.attempts,
            per_try_timeout,
            on,
        })
    }

    fn fault(&self, field: &str, f: &FaultEntry) -> Result<Fault> {
        let share = |name: &str, p: &Option<Spanned<f64>>| -> Result<Share> {
            match p {
                None => Ok(Share::ALL),
                Some(p) => Share::percent(**p).ok_or_else(|| {
                    self.err(
                        format!("{field}.{name}.percentage"),
                        p.span(),
                        Problem::Percentage,
                    )
                }),
            }
        };
        let delay = match &f.delay {
            None => None,
            Some(d) => Some((
                self.duration(&format!("{field}.delay.fixedDelay"), &d.fixed_delay)?,
                share("delay", &d.percentage)?,
            )),
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                if !(200..=599).contains(&*a.http_status) {
                    let field = format!("{field}.abort.httpStatus");
                    return Err(self.err(field, a.http_status.span(), Problem::HttpStatus));
                }
                Some((*a.http_status, share("abort", &a.percentage)?))
            }
        };
        Ok(Fault { delay, abort })
    }

    fn backends(&self, field: &str, entries: &Spanned<Vec<BackendEntry>>) -> Result<Vec<Backend>> {
        if entries.iter().all(|b| b.weight == 0) {
            return Err(self.err(field, entries.span(), Problem::NoWeight));
        }
        let mut backends = Vec::with_capacity(entries.len());
        for (k, b) in entries.iter().enumerate() {
            let field = format!("{field}[{k}].workloads");
            if b.workloads.is_empty() {
                return Err(self.err(field, b.workloads.span(), Problem::Empty));
            }
            let mut uids = Vec::with_capacity(b.workloads.len());
            for t in b.workloads.iter() {
                if !self.workloads.contains_key(t.as_str()) {
                    let problem = Problem::UnknownWorkload(t.to_string());
                    return Err(self.err(field, t.span(), problem));
                }
                uids.push(t.to_string());
            }
            backends.push(Backend {
                workload_uids: uids,
                weight: b.weight,
            });
        }
        Ok(backends)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::state::l7::{Fault, OutlierDetection, RetryOn, Share};
    use crate::state::{HttpAction, PathMatch, ValueMatch};
    use crate::xds::local::parse_mesh;

    const MESH: &str = r#"
workloads:
  - {uid: a, name: a, namespace: default, addresses: [10.0.0.1], node: n}
services:
  - {name: s, namespace: default, vips: [10.96.0.1], endpoints: [a]}
httpRoutes:
  - name: r
    namespace: default
    service: default/s.default.svc.cluster.local
    rules:
      - matches:
          - path: {regex: "/api/v[0-9]+/.*"}
            headers:
              x-exact: one
              x-prefix: {prefix: "Bearer "}
              x-gone: {present: true, invert: true}
        backends: [{workloads: [a]}]
        timeout: 2s
        retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "gateway-error,409"}
        fault:
          delay: {fixedDelay: 100ms, percentage: 50}
          abort: {httpStatus: 503}
      - directResponse: {status: 418, body: "short and stout"}
      - backends: [{workloads: [a]}]
        retries: {attempts: 2}
      - backends: [{workloads: [a]}]
      - backends: [{workloads: [a]}]
        retries: {attempts: 0}
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 10s}
"#;

    #[test]
    fn every_feature_of_a_rule_reaches_the_model() {
        let mesh = parse_mesh("mesh.yaml", MESH).expect("valid");
        let rules = &mesh.http_routes[0].rules;
        let m = &rules[0].matches[0];
        assert!(matches!(&m.path, Some(PathMatch::Regex(p)) if p.as_str() == "/api/v[0-9]+/.*"));
        let headers: Vec<_> = m
            .headers
            .iter()
            .map(|h| (h.name.as_str(), &h.value, h.invert))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-exact", &ValueMatch::Exact("one".into()), false),
                ("x-gone", &ValueMatch::Present, true),
                ("x-prefix", &ValueMatch::Prefix("Bearer ".into()), false),
            ]
        );
        let p = &rules[0].policy;
        assert_eq!(p.timeout, Some(Duration::from_secs(2)));
        let retries = p.retries.as_deref().expect("retries");
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(
            retries.on,
            RetryOn::parse("gateway-error,409").expect("valid")
        );
        assert_eq!(
            p.fault,
            Some(Fault {
                delay: Some((
                    Duration::from_millis(100),
                    Share::percent(50.0).expect("share")
                )),
                abort: Some((503, Share::ALL)),
            })
        );
        assert_eq!(
            rules[1].action,
            HttpAction::Respond {
                status: 418,
                body: "short and stout".into()
            }
        );
        // Envoy's default for what the route leaves out.
        assert_eq!(
            mesh.http_routes[0].outlier_detection,
            Some(OutlierDetection {
                consecutive_errors: 3,
                base_ejection_time: Duration::from_secs(10),
                max_ejection_percent: 10,
            })
        );
        // Istio's retryOn when `retries` leaves it out (no status codes).
        let default = rules[2].policy.retries.as_deref().expect("retries");
        assert_eq!(
            default.on,
            RetryOn::parse("connect-failure,refused-stream,unavailable,cancelled").expect("valid")
        );
        assert!(default.on.status_codes.is_empty());
        assert_eq!(rules[4].policy.retries, None, "attempts: 0");
        // No `retries` on a route: istiod's default policy, 2 retries.
        assert_eq!(rules[1].policy.retries, None, "a direct response");
        assert_eq!(
            rules[3].policy.retries,
            Some(crate::state::l7::RetryPolicy::istio_default())
        );
    }
}
