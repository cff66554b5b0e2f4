//! Shared, immutable strings for the mesh model.
//!
//! A mesh of 100,000 workloads repeats a few hundred namespaces, service
//! accounts, trust domains and node names; [`Name`] lets every workload
//! point at one copy ([`Interner`]), and lets indexes and the control
//! plane's resource store share a workload's uid instead of copying it.
//! The interner shares the other thing workloads repeat, their services'
//! port lists, the same way.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::ops::Deref;
use std::sync::Arc;

use super::ServicePort;

/// An immutable string; cloning it shares it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` and `other` are the same copy (a cheap equality
    /// that may say "no" for equal strings).
    pub fn same_copy(&self, other: &Name) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
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
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(Arc::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name(Arc::from(s.as_str()))
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == &*other.0
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One shared copy of each value asked for. Forgets the values nobody
/// else holds whenever it has doubled since it last did.
#[derive(Debug)]
struct Pool<T: ?Sized> {
    set: HashSet<Arc<T>>,
    /// Size after the last prune.
    pruned_at: usize,
}

impl<T: ?Sized> Default for Pool<T> {
    fn default() -> Self {
        Pool {
            set: HashSet::new(),
            pruned_at: 0,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Pool<T>
where
    for<'a> Arc<T>: From<&'a T>,
{
    fn get(&mut self, v: &T) -> Arc<T> {
        if let Some(shared) = self.set.get(v) {
            return shared.clone();
        }
        if self.set.len() >= 2 * self.pruned_at.max(512) {
            self.prune();
        }
        let shared = Arc::from(v);
        self.set.insert(shared.clone());
        shared
    }

    fn prune(&mut self) {
        self.set.retain(|v| Arc::strong_count(v) > 1);
        self.pruned_at = self.set.len();
    }
}

/// Hands out one shared copy of each string (and port list) it is asked
/// for.
#[derive(Debug, Default)]
pub struct Interner {
    names: Pool<str>,
    port_lists: Pool<[ServicePort]>,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> Name {
        Name(self.names.get(s))
    }

    /// The shared copy of a port list (most workloads of a service back
    /// it with the same ports).
    pub fn ports(&mut self, ports: &[ServicePort]) -> Arc<[ServicePort]> {
        self.port_lists.get(ports)
    }

    /// Forgets what nothing else holds any more.
    pub fn prune(&mut self) {
        self.names.prune();
        self.port_lists.prune();
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
