//! SPIFFE identities of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// A workload identity: trust domain, namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a SPIFFE identity this mesh understands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityParseError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("identity {0:?} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")]
    Shape(String),
}

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Self {
        Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        }
    }

    /// The URI form, as put in a certificate's SAN.
    pub fn to_uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
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
                Ok(Identity::new(*td, *ns, *sa))
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
}
