//! What an L7 rule matches on: the request's path, method and headers,
//! with Istio's kinds of string match (exact, prefix, RE2-style regex
//! matched against the whole value, presence) and inversion.

/// Every given condition must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpMatch {
    pub path: Option<PathMatch>,
    /// Upper-case method, e.g. `DELETE`.
    pub method: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    /// The whole path matches.
    Regex(Pattern),
}

/// A condition on one header (name in lower case). Any of the header's
/// values may satisfy it; `invert` turns it around (an absent header then
/// satisfies every inverted match, as in Envoy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: ValueMatch,
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    /// The whole value matches.
    Regex(Pattern),
    /// The header is there, whatever its value.
    Present,
}

/// A regular expression in RE2's syntax (no look-around, no
/// back-references, as Envoy's `safe_regex` and Istio's `regex`), held with
/// its source text; it must match a whole value.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

/// Regular expressions are bounded in size, as Envoy bounds its RE2
/// program size: a rule cannot make each request expensive.
const MAX_PATTERN_SIZE: usize = 1 << 16;

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, regex::Error> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(MAX_PATTERN_SIZE)
            .build()?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Pattern) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl ValueMatch {
    fn holds(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(s) => value == s.as_bytes(),
            ValueMatch::Prefix(p) => value.starts_with(p.as_bytes()),
            ValueMatch::Regex(re) => std::str::from_utf8(value).is_ok_and(|v| re.matches(v)),
            ValueMatch::Present => true,
        }
    }
}

impl HttpMatch {
    pub(super) fn holds<B>(&self, req: &http::Request<B>) -> bool {
        let path = req.uri().path();
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => path == p,
            Some(PathMatch::Prefix(p)) => path.starts_with(p.as_str()),
            Some(PathMatch::Regex(re)) => re.matches(path),
        };
        let method_ok = self
            .method
            .as_ref()
            .is_none_or(|m| req.method().as_str() == m);
        path_ok && method_ok && self.headers.iter().all(|h| h.holds(req.headers()))
    }
}

impl HeaderMatch {
    fn holds(&self, headers: &http::HeaderMap) -> bool {
        let found = headers
            .get_all(self.name.as_str())
            .iter()
            .any(|v| self.value.holds(v.as_bytes()));
        found != self.invert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(s: &str) -> Pattern {
        Pattern::new(s).expect("valid pattern")
    }

    #[test]
    fn string_matches() {
        // (match, value, holds)
        let cases: &[(ValueMatch, &str, bool)] = &[
            (ValueMatch::Exact("v2".into()), "v2", true),
            (ValueMatch::Exact("v2".into()), "v22", false),
            (ValueMatch::Prefix("Bearer ".into()), "Bearer x", true),
            (ValueMatch::Prefix("Bearer ".into()), "bearer x", false),
            (ValueMatch::Regex(pattern("v[0-9]+")), "v12", true),
            // The whole value, not a part of it (Envoy's safe_regex).
            (ValueMatch::Regex(pattern("v[0-9]+")), "xv12", false),
            (ValueMatch::Regex(pattern("v[0-9]+")), "v12x", false),
            (ValueMatch::Regex(pattern("a|b")), "b", true),
            (ValueMatch::Present, "", true),
        ];
        for (m, value, want) in cases {
            assert_eq!(m.holds(value.as_bytes()), *want, "{m:?} on {value:?}");
        }
    }

    #[test]
    fn header_matches_any_value_and_inverts() {
        let mut headers = http::HeaderMap::new();
        headers.append("x-user", "alice".parse().expect("value"));
        headers.append("x-user", "bob".parse().expect("value"));
        let m = |value: ValueMatch, invert: bool| HeaderMatch {
            name: "x-user".into(),
            value,
            invert,
        };
        assert!(m(ValueMatch::Exact("bob".into()), false).holds(&headers));
        assert!(!m(ValueMatch::Exact("bob".into()), true).holds(&headers));
        assert!(m(ValueMatch::Exact("carol".into()), true).holds(&headers));
        let none = http::HeaderMap::new();
        assert!(!m(ValueMatch::Present, false).holds(&none));
        assert!(m(ValueMatch::Present, true).holds(&none));
    }

    #[test]
    fn regex_paths_match_whole_paths() {
        let m = HttpMatch {
            path: Some(PathMatch::Regex(pattern("/api/v[0-9]+/.*"))),
            ..Default::default()
        };
        let req = |p: &str| http::Request::get(p).body(()).expect("request");
        assert!(m.holds(&req("/api/v1/users")));
        assert!(!m.holds(&req("/x/api/v1/users")));
        assert!(!m.holds(&req("/api/vx/users")));
    }

    #[test]
    fn patterns_compare_by_source_and_refuse_bad_syntax() {
        assert_eq!(pattern("a+"), pattern("a+"));
        assert_ne!(pattern("a+"), pattern("a*"));
        // Look-around is not RE2.
        assert!(Pattern::new("(?=a)").is_err());
        assert!(Pattern::new("(unclosed").is_err());
    }
}
