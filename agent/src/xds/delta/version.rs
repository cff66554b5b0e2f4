//! A resource's version as the server gave it, held compactly: the client
//! keeps one per resource (to send back as `initial_resource_versions` when
//! it reconnects), so at 100,000 workloads a string each is megabytes.

use std::fmt;

/// istiod writes address versions as a 64-bit hash in lowercase hex with
/// no leading zeros (`strconv.FormatUint(xxhash, 16)` in
/// `pilot/pkg/model/service.go`); those are kept as the number. Anything
/// else is kept as given, so what goes back to the server is always
/// exactly what it sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Version {
    Hash(u64),
    /// Boxed twice so the common case stays 16 bytes.
    #[allow(clippy::box_collection)]
    Text(Box<String>),
}

impl From<&str> for Version {
    fn from(s: &str) -> Self {
        let hex = !s.is_empty()
            && s.len() <= 16
            && !s.starts_with('0')
            && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match u64::from_str_radix(s, 16) {
            Ok(h) if hex => Version::Hash(h),
            _ => Version::Text(Box::new(s.to_string())),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::Hash(h) => write!(f, "{h:x}"),
            Version::Text(s) => f.write_str(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_reads_back_as_given() {
        for (given, hashed) in [
            ("1f3a9c0e2b7d4455", true),
            ("a", true),
            ("ffffffffffffffff", true),
            ("0", false),
            ("01", false),
            ("", false),
            ("1F3A", false),
            ("10000000000000000", false),
            ("v1", false),
            ("2026-12-02T10:00:00Z/17", false),
            ("+1", false),
        ] {
            let v = Version::from(given);
            assert_eq!(matches!(v, Version::Hash(_)), hashed, "{given:?}");
            assert_eq!(v.to_string(), given);
        }
    }
}
