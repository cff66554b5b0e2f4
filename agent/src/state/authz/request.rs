//! Authorization's request conditions (Istio's L7 AuthorizationPolicy
//! fields), evaluated by a waypoint for each HTTP request.

use super::super::model::{RequestMatch, StringMatch};

/// What a waypoint knows of one HTTP request when authorizing it.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// `Host` or `:authority`, as sent.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl<'a> Request<'a> {
    /// The attributes of `req` (HTTP/1.1's `Host` header or HTTP/2's
    /// `:authority`).
    pub fn of<B>(req: &'a http::Request<B>) -> Request<'a> {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("");
        Request {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: req.headers(),
        }
    }
}

impl RequestMatch {
    pub(super) fn holds(&self, req: &Request<'_>) -> bool {
        let strings = |values: &[StringMatch], s: &str| values.iter().any(|v| v.matches(s));
        // Host values are held in lower case; the request's host is
        // lowered only when a condition needs it.
        let host = if self.hosts.is_empty() && self.not_hosts.is_empty() {
            String::new()
        } else {
            host_without_port(req.host).to_ascii_lowercase()
        };
        let hosts = |values: &[StringMatch]| strings(values, &host);
        let header = |name: &str, values: &[StringMatch]| {
            req.headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| strings(values, v))
        };
        let method = |values: &[String]| values.iter().any(|m| m == req.method);
        (self.hosts.is_empty() || hosts(&self.hosts))
            && !hosts(&self.not_hosts)
            && (self.paths.is_empty() || strings(&self.paths, req.path))
            && !strings(&self.not_paths, req.path)
            && (self.methods.is_empty() || method(&self.methods))
            && !method(&self.not_methods)
            && self.headers.iter().all(|(n, v)| header(n, v))
            && !self.not_headers.iter().any(|(n, v)| header(n, v))
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `[::1]`.
fn host_without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn request_conditions() {
        let exact = |s: &str| StringMatch::Exact(s.into());
        let prefix = |s: &str| StringMatch::Prefix(s.into());
        let suffix = |s: &str| StringMatch::Suffix(s.into());
        // (match, request, holds)
        let cases: Vec<(RequestMatch, http::Request<()>, bool)> = vec![
            (
                RequestMatch {
                    paths: vec![prefix("/api/")],
                    methods: vec!["GET".into()],
                    ..Default::default()
                },
                req("GET", "/api/users?x=1", &[]),
                true,
            ),
            (
                RequestMatch {
                    paths: vec![exact("/api/users")],
                    ..Default::default()
                },
                // The query is not part of the path.
                req("GET", "/api/users?admin=1", &[]),
                true,
            ),
            (
                RequestMatch {
                    methods: vec!["GET".into()],
                    ..Default::default()
                },
                req("POST", "/", &[]),
                false,
            ),
            (
                RequestMatch {
                    not_paths: vec![prefix("/admin")],
                    ..Default::default()
                },
                req("GET", "/admin/x", &[]),
                false,
            ),
            (
                RequestMatch {
                    hosts: vec![suffix(".example.com")],
                    ..Default::default()
                },
                // Case and port do not count.
                req("GET", "/", &[("host", "API.Example.com:8080")]),
                true,
            ),
            (
                RequestMatch {
                    hosts: vec![exact("reviews")],
                    ..Default::default()
                },
                req("GET", "http://reviews:9080/", &[]),
                true,
            ),
            (
                RequestMatch {
                    headers: vec![("x-user".into(), vec![exact("alice")])],
                    ..Default::default()
                },
                req("GET", "/", &[("x-user", "bob"), ("x-user", "alice")]),
                true,
            ),
            (
                RequestMatch {
                    headers: vec![("x-user".into(), vec![StringMatch::Presence])],
                    ..Default::default()
                },
                req("GET", "/", &[]),
                false,
            ),
            (
                RequestMatch {
                    not_headers: vec![("x-debug".into(), vec![StringMatch::Presence])],
                    ..Default::default()
                },
                req("GET", "/", &[("x-debug", "1")]),
                false,
            ),
            (
                RequestMatch {
                    not_methods: vec!["DELETE".into()],
                    ..Default::default()
                },
                req("GET", "/", &[]),
                true,
            ),
        ];
        for (m, r, want) in &cases {
            assert_eq!(m.holds(&Request::of(r)), *want, "{m:?} on {r:?}");
        }
    }

    #[test]
    fn hosts_lose_only_a_numeric_port() {
        assert_eq!(host_without_port("a.b:80"), "a.b");
        assert_eq!(host_without_port("a.b"), "a.b");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
        assert_eq!(host_without_port("[::1]"), "[::1]");
    }
}
