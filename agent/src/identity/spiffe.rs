//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A workload identity: trust domain, namespace and service account.
///
/// Kept as its URI in one shared string, so a clone (one per connection
/// record, pool key and policy check) is a reference count, not three
/// allocations; the parts are slices of it.
#[derive(Clone)]
pub struct Identity {
    uri: Arc<str>,
    /// End of the trust domain in `uri`.
    td_end: u32,
    /// End of the namespace in `uri`.
    ns_end: u32,
}

/// Why a string is not a SPIFFE identity this mesh understands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityParseError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("identity {0:?} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")]
    Shape(String),
}

const SCHEME: &str = "spiffe://";
const NS: &str = "/ns/";
const SA: &str = "/sa/";

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        let uri = format!("{SCHEME}{trust_domain}{NS}{namespace}{SA}{service_account}");
        // Offsets fit in u32: a longer identity could not be in a certificate.
        let td_end = (SCHEME.len() + trust_domain.len()) as u32;
        let ns_end = td_end + (NS.len() + namespace.len()) as u32;
        Identity {
            uri: uri.into(),
            td_end,
            ns_end,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end as usize]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.td_end as usize + NS.len()..self.ns_end as usize]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.ns_end as usize + SA.len()..]
    }

    /// Istio's principal form: the URI without its scheme,
    /// `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The URI form, as put in a certificate's SAN.
    pub fn to_uri(&self) -> String {
        self.uri.to_string()
    }

    fn parts(&self) -> (&str, &str, &str) {
        (
            self.trust_domain(),
            self.namespace(),
            self.service_account(),
        )
    }
}

// Compared part by part, as the three fields were before: a part could in
// principle hold a '/' (through `new`), and then two URIs could be equal
// strings with different parts.
impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.parts().cmp(&other.parts())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain())
            .field("namespace", &self.namespace())
            .field("service_account", &self.service_account())
            .finish()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for Identity {
    type Err = IdentityParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityParseError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(IdentityParseError::Shape(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        let cases = [
            ("spiffe://cluster.local/ns/default/sa/web", true),
            ("spiffe://td/ns/a/sa/b", true),
            ("http://cluster.local/ns/default/sa/web", false),
            ("spiffe://cluster.local/ns/default", false),
            ("spiffe://cluster.local/ns//sa/web", false),
            ("spiffe:///ns/a/sa/b", false),
            ("spiffe://td/ns/a/sa/b/extra", false),
        ];
        for (input, ok) in cases {
            let parsed = input.parse::<Identity>();
            assert_eq!(parsed.is_ok(), ok, "{input}");
            if let Ok(id) = parsed {
                assert_eq!(id.to_string(), input);
            }
        }
    }

    #[test]
    fn parts_are_slices_of_the_uri() {
        let cases = [
            ("cluster.local", "default", "web"),
            ("td", "a", "b"),
            ("example.org", "long-namespace-name", "sa-with-dashes"),
        ];
        for (td, ns, sa) in cases {
            let id = Identity::new(td, ns, sa);
            assert_eq!(
                (id.trust_domain(), id.namespace(), id.service_account()),
                (td, ns, sa)
            );
            assert_eq!(id.principal(), format!("{td}/ns/{ns}/sa/{sa}"));
            assert_eq!(id.to_uri(), format!("spiffe://{td}/ns/{ns}/sa/{sa}"));
            let parsed: Identity = id.to_uri().parse().expect("round trip");
            assert_eq!(parsed, id);
        }
    }

    #[test]
    fn clones_share_the_uri() {
        let id = Identity::new("td", "ns", "sa");
        let copy = id.clone();
        assert!(Arc::ptr_eq(&id.uri, &copy.uri));
    }

    /// Equality and order are the parts', in order, not the URI string's:
    /// '.' sorts before '/', so the strings would order these two the
    /// other way round.
    #[test]
    fn ordered_by_parts() {
        let short = Identity::new("a", "x", "y");
        let long = Identity::new("a.b", "x", "y");
        assert!(short < long);
        assert!(short.to_uri() > long.to_uri());
        assert_ne!(short, long);
        assert_eq!(short, Identity::new("a", "x", "y"));
    }
}
