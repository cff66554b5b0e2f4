//! Shared, immutable strings for the mesh model.
//!
//! A mesh of 100,000 workloads repeats a few hundred namespaces, service
//! accounts, trust domains and node names; [`Name`] lets every workload
//! point at one copy ([`Interner`]), and lets indexes and the control
//! plane's resource store share a workload's uid instead of copying it.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

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

/// Hands out one shared copy of each string it is asked for.
#[derive(Debug, Default)]
pub struct Interner {
    names: HashSet<Name>,
    /// Size after the last prune; the set is pruned when it doubles.
    pruned_at: usize,
}

impl Interner {
    /// The shared copy of `s`.
    pub fn intern(&mut self, s: &str) -> Name {
        if let Some(n) = self.names.get(s) {
            return n.clone();
        }
        if self.names.len() >= 2 * self.pruned_at.max(512) {
            self.prune();
        }
        let n = Name::from(s);
        self.names.insert(n.clone());
        n
    }

    /// Forgets the strings nothing else holds any more.
    pub fn prune(&mut self) {
        self.names.retain(|n| Arc::strong_count(&n.0) > 1);
        self.pruned_at = self.names.len();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
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
}
