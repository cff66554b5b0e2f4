//! Istio's trust-domain aliases for policy principals, applied in local
//! mode as istiod applies them to the policies it compiles for Envoy
//! (pilot/pkg/security/trustdomain/bundle.go): with `trustDomain: td1`
//! and `trustDomainAliases: [td2]`, a principal naming `td1`, `td2` or
//! `cluster.local` (the local trust domain's stand-in) matches the same
//! identity in each of them. A principal of another trust domain, or not
//! of the `td/ns/<ns>/sa/<sa>` form, or whose trust domain is `*`, is
//! left as written.

/// `principals` with every aliased form added, each once, in order.
pub(super) fn expand(principals: &[String], domains: &[String]) -> Vec<String> {
    if domains.is_empty() {
        return principals.to_vec();
    }
    let mut out: Vec<String> = Vec::with_capacity(principals.len() * domains.len());
    let mut push = |p: String| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    for p in principals {
        let parts: Vec<&str> = p.split('/').collect();
        let td = parts[0];
        if parts.len() != 5 || td == "*" {
            push(p.clone());
            continue;
        }
        if !(td == "cluster.local" || domains.iter().any(|d| td_match(td, d))) {
            push(p.clone());
            continue;
        }
        let rest = &p[td.len()..];
        for d in domains {
            // A wildcard trust domain (`*-td`) covering `d` stays as is.
            if suffix_match(d, td) {
                push(p.clone());
            } else {
                push(format!("{d}{rest}"));
            }
        }
    }
    out
}

/// Istio's `stringMatch` of one trust domain against one of the list.
fn td_match(a: &str, b: &str) -> bool {
    a == b
        || b == "*"
        || prefix_match(a, b)
        || prefix_match(b, a)
        || suffix_match(a, b)
        || suffix_match(b, a)
}

fn prefix_match(a: &str, pattern: &str) -> bool {
    pattern
        .strip_suffix('*')
        .is_some_and(|head| a.starts_with(head))
}

fn suffix_match(a: &str, pattern: &str) -> bool {
    pattern
        .strip_prefix('*')
        .is_some_and(|tail| a.ends_with(tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases from Istio's bundle semantics: (domains, principal, result).
    #[test]
    fn principals_gain_their_aliases() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let td = s(&["td1", "td2"]);
        let cases: &[(&[String], &str, &[&str])] = &[
            (
                &td,
                "td1/ns/foo/sa/bar",
                &["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"],
            ),
            (
                &td,
                "td2/ns/foo/sa/bar",
                &["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"],
            ),
            (
                &td,
                "cluster.local/ns/foo/sa/bar",
                &["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar"],
            ),
            (&td, "other/ns/foo/sa/bar", &["other/ns/foo/sa/bar"]),
            (&td, "*/ns/foo/sa/bar", &["*/ns/foo/sa/bar"]),
            (
                &td,
                "td1/ns/foo/sa/*",
                &["td1/ns/foo/sa/*", "td2/ns/foo/sa/*"],
            ),
            (&td, "*", &["*"]),
            (&td, "td1/ns/foo", &["td1/ns/foo"]),
            (
                &td,
                "*td2/ns/foo/sa/bar",
                &["td1/ns/foo/sa/bar", "*td2/ns/foo/sa/bar"],
            ),
            (&[], "td1/ns/foo/sa/bar", &["td1/ns/foo/sa/bar"]),
        ];
        for (domains, principal, want) in cases {
            assert_eq!(
                expand(&[principal.to_string()], domains),
                s(want),
                "{principal} with {domains:?}"
            );
        }
    }
}
