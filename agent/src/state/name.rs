//! Shared, immutable strings for the mesh model.
//!
//! A mesh of 100,000 workloads repeats a few hundred namespaces, service
//! accounts, trust domains and node names; [`Name`] lets every workload
//! point at one copy ([`Interner`]), and lets indexes and the control
//! plane's resource store share a workload's uid instead of copying it.
//! The interner shares the other thing workloads repeat, their services'
//! port lists, the same way.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use triomphe::ThinArc;

use super::{Network, ServicePort, Telemetry};

/// An immutable string; cloning it shares it. One pointer wide (the
/// length lives with the bytes), so the model's many names and the indexes
/// keyed by them cost half what `Arc<str>` would.
#[derive(Clone)]
pub struct Name(ThinArc<(), u8>);

/// Whether `host` is a DNS name (RFC 1123 labels, a trailing dot
/// allowed), not an address: digits and dots alone are a malformed
/// address, never a name.
pub fn valid_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    host.len() <= 253 && !numeric && host.split('.').all(label_ok)
}

impl Name {
    pub fn as_str(&self) -> &str {
        // SAFETY: a `Name` is only ever made from a `&str` (`From<&str>`,
        // which the other constructors call) and its bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0.slice) }
    }

    /// Whether `self` and `other` are the same copy (a cheap equality
    /// that may say "no" for equal strings).
    pub fn same_copy(&self, other: &Name) -> bool {
        self.0.ptr() == other.0.ptr()
    }

    /// How many copies share this one.
    fn holders(&self) -> usize {
        ThinArc::strong_count(&self.0)
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.same_copy(other) || self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl Hash for Name {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // As `str` hashes, so lookups by `&str` find it (`Borrow<str>`).
        self.as_str().hash(h)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Default for Name {
    fn default() -> Self {
        Name::from("")
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(ThinArc::from_header_and_slice((), s.as_bytes()))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name::from(s.as_str())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name::from(s.as_str())
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.as_str().to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A value the [`Pool`] can hand out copies of.
trait Shared: Clone + Eq + Hash {
    /// How many copies exist, the pool's own included.
    fn holders(&self) -> usize;
}

impl Shared for Name {
    fn holders(&self) -> usize {
        Name::holders(self)
    }
}

impl Shared for Arc<[ServicePort]> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
}

impl Shared for Arc<Telemetry> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
}

impl Shared for Arc<Network> {
    fn holders(&self) -> usize {
        Arc::strong_count(self)
    }
}

impl From<&Network> for Arc<Network> {
    fn from(n: &Network) -> Self {
        Arc::new(n.clone())
    }
}

impl From<&Telemetry> for Arc<Telemetry> {
    fn from(t: &Telemetry) -> Self {
        Arc::new(t.clone())
    }
}

/// One shared copy of each value asked for. Forgets the values nobody
/// else holds whenever it has doubled since it last did.
#[derive(Debug)]
struct Pool<S> {
    set: HashSet<S>,
    /// Size after the last prune.
    pruned_at: usize,
}

impl<S> Default for Pool<S> {
    fn default() -> Self {
        Pool {
            set: HashSet::new(),
            pruned_at: 0,
        }
    }
}

impl<S: Shared> Pool<S> {
    fn get<Q>(&mut self, v: &Q) -> S
    where
        Q: ?Sized + Eq + Hash,
        S: Borrow<Q> + for<'a> From<&'a Q>,
    {
        if let Some(shared) = self.set.get(v) {
            return shared.clone();
        }
        if self.set.len() >= 2 * self.pruned_at.max(512) {
            self.prune();
        }
        let shared = S::from(v);
        self.set.insert(shared.clone());
        shared
    }

    fn prune(&mut self) {
        self.set.retain(|v| v.holders() > 1);
        self.pruned_at = self.set.len();
    }
}

/// Hands out one shared copy of each string (and port list) it is asked
/// for.
#[derive(Debug, Default)]
pub struct Interner {
    names: Pool<Name>,
    port_lists: Pool<Arc<[ServicePort]>>,
    telemetry: Pool<Arc<Telemetry>>,
    networks: Pool<Arc<Network>>,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> Name {
        self.names.get(s)
    }

    /// The shared copy of a port list (most workloads of a service back
    /// it with the same ports).
    pub fn ports(&mut self, ports: &[ServicePort]) -> Arc<[ServicePort]> {
        self.port_lists.get(ports)
    }

    /// The shared copy of a workload's telemetry names (replicas of a
    /// deployment have the same).
    pub fn telemetry(&mut self, t: &Telemetry) -> Arc<Telemetry> {
        self.telemetry.get(t)
    }

    /// The shared copy of a network (its workloads all have the same).
    pub fn network(&mut self, n: &Network) -> Arc<Network> {
        self.networks.get(n)
    }

    /// Forgets what nothing else holds any more.
    pub fn prune(&mut self) {
        self.networks.prune();
        self.names.prune();
        self.port_lists.prune();
        self.telemetry.prune();
    }

    /// Strings held.
    pub fn len(&self) -> usize {
        self.names.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_shares_one_copy_and_prune_drops_unused() {
        let mut i = Interner::default();
        let a = i.intern("ns-1");
        let b = i.intern("ns-1");
        assert!(a.same_copy(&b));
        assert_eq!(a, "ns-1");
        drop(i.intern("gone"));
        assert_eq!(i.len(), 2);
        i.prune();
        assert_eq!(i.len(), 1, "only the name still held stays");
        assert!(i.intern("ns-1").same_copy(&a));
    }

    #[test]
    fn port_lists_are_shared_too() {
        let mut i = Interner::default();
        let p = [ServicePort {
            port: 80,
            target_port: 8080,
        }];
        let a = i.ports(&p);
        assert!(Arc::ptr_eq(&a, &i.ports(&p)));
        assert!(!Arc::ptr_eq(&a, &i.ports(&p[..0])));
    }
}
