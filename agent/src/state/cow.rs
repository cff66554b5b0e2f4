//! [`CowMap`]: a hash map that many snapshots of the mesh share.
//!
//! The map is split into a fixed number of shards, each behind an `Arc`.
//! Cloning the map copies the shard table (a few hundred pointers), not
//! the entries; a write copies only the shard it lands in, and only if an
//! older snapshot still holds that shard. So one change to a mesh of
//! 100,000 workloads copies a few hundred entries, while readers keep the
//! version they started with. [`AddrMap`] is one keyed by IP address.

use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, Equivalent, HashMap};

const SHARD_BITS: u32 = 8;
const SHARDS: usize = 1 << SHARD_BITS;

type Shard<K, V> = Arc<HashMap<K, V>>;

/// A sharded, copy-on-write hash map.
#[derive(Clone)]
pub struct CowMap<K, V> {
    shards: Arc<Vec<Shard<K, V>>>,
    /// Picks the shard; independent of the shards' own hashing.
    hasher: DefaultHashBuilder,
    len: usize,
}

impl<K, V> Default for CowMap<K, V> {
    fn default() -> Self {
        // Every shard starts as one shared empty map.
        let empty = Arc::new(HashMap::new());
        CowMap {
            shards: Arc::new(vec![empty; SHARDS]),
            hasher: DefaultHashBuilder::default(),
            len: 0,
        }
    }
}

impl<K: std::fmt::Debug, V: std::fmt::Debug> std::fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K, V> CowMap<K, V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) & (SHARDS - 1)
    }

    pub fn get<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> Option<&V> {
        self.shards[self.shard_of(key)].get(key)
    }

    pub fn contains_key<Q: Hash + Equivalent<K> + ?Sized>(&self, key: &Q) -> bool {
        self.get(key).is_some()
    }

    /// The shard holding `key`, copied first if a snapshot shares it.
    fn shard_mut<Q: Hash + ?Sized>(&mut self, key: &Q) -> &mut HashMap<K, V> {
        let i = self.shard_of(key);
        Arc::make_mut(&mut Arc::make_mut(&mut self.shards)[i])
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.shard_mut(&key).insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove<Q: Hash + Equivalent<K> + ?Sized>(&mut self, key: &Q) -> Option<V> {
        // Skip the copy when there is nothing to remove.
        self.get(key)?;
        let old = self.shard_mut(key).remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Room for about `n` more entries, spread over the shards (copying
    /// any a snapshot shares), so a large load does not grow the tables
    /// step by step. Fewer than one per shard is left to grow as it goes:
    /// a table per shard for a handful of entries would cost more.
    pub fn reserve(&mut self, n: usize) {
        if n < SHARDS {
            return;
        }
        let per_shard = n.div_ceil(SHARDS) + n.div_ceil(SHARDS) / 8;
        for shard in Arc::make_mut(&mut self.shards).iter_mut() {
            Arc::make_mut(shard).reserve(per_shard);
        }
    }

    /// The value at `key`, made (with `make`) if absent, to change in place.
    pub fn entry_mut(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.contains_key(&key) {
            self.len += 1;
        }
        self.shard_mut(&key).entry(key).or_insert_with(make)
    }

    /// Changes the value at `key` in place (copying its shard if shared);
    /// removes the entry when `f` returns false.
    pub fn update<Q: Hash + Equivalent<K> + ?Sized>(
        &mut self,
        key: &Q,
        f: impl FnOnce(&mut V) -> bool,
    ) {
        if self.get(key).is_none() {
            return;
        }
        let shard = self.shard_mut(key);
        let keep = shard.get_mut(key).is_some_and(f);
        let removed = !keep && shard.remove(key).is_some();
        if removed {
            self.len -= 1;
        }
    }
}

/// A [`CowMap`] keyed by IP address, one map per family: an IPv4 key
/// then takes 4 bytes, not the 17 of an `IpAddr` padded to the value's
/// alignment (an entry of 16 bytes instead of 32, most keys being IPv4).
#[derive(Clone, Debug)]
pub struct AddrMap<V> {
    v4: CowMap<Ipv4Addr, V>,
    v6: CowMap<Ipv6Addr, V>,
}

impl<V> Default for AddrMap<V> {
    fn default() -> Self {
        AddrMap {
            v4: CowMap::default(),
            v6: CowMap::default(),
        }
    }
}

impl<V: Clone> AddrMap<V> {
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => self.v4.get(a),
            IpAddr::V6(a) => self.v6.get(a),
        }
    }

    pub fn insert(&mut self, ip: IpAddr, value: V) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.insert(a, value),
            IpAddr::V6(a) => self.v6.insert(a, value),
        }
    }

    pub fn remove(&mut self, ip: &IpAddr) -> Option<V> {
        match ip {
            IpAddr::V4(a) => self.v4.remove(a),
            IpAddr::V6(a) => self.v6.remove(a),
        }
    }

    /// Room for about `n` more IPv4 addresses (the common case).
    pub fn reserve(&mut self, n: usize) {
        self.v4.reserve(n);
    }

    /// As [`CowMap::update`].
    pub fn update(&mut self, ip: &IpAddr, f: impl FnOnce(&mut V) -> bool) {
        match ip {
            IpAddr::V4(a) => self.v4.update(a, f),
            IpAddr::V6(a) => self.v6.update(a, f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_keeps_its_version_while_the_other_changes() {
        let mut a: CowMap<u32, String> = CowMap::default();
        for i in 0..1000 {
            a.insert(i, i.to_string());
        }
        let before = a.clone();
        a.insert(5, "five".into());
        a.remove(&7);
        a.insert(2000, "new".into());
        assert_eq!(before.get(&5).map(String::as_str), Some("5"));
        assert_eq!(before.get(&7).map(String::as_str), Some("7"));
        assert_eq!(before.get(&2000), None);
        assert_eq!(before.len(), 1000);
        assert_eq!(a.get(&5).map(String::as_str), Some("five"));
        assert_eq!(a.get(&7), None);
        assert_eq!(a.len(), 1000);
        assert_eq!(a.iter().count(), 1000);
        // Only the shards written were copied.
        let shared = (0..SHARDS)
            .filter(|&i| Arc::ptr_eq(&a.shards[i], &before.shards[i]))
            .count();
        assert!(shared >= SHARDS - 3, "{shared} of {SHARDS} shards shared");
    }

    #[test]
    fn update_changes_in_place_or_removes() {
        let mut m: CowMap<&str, Vec<u32>> = CowMap::default();
        m.entry_mut("a", Vec::new).push(1);
        m.entry_mut("a", Vec::new).push(2);
        assert_eq!(m.get("a"), Some(&vec![1, 2]));
        m.update("a", |v| {
            v.retain(|x| *x != 1);
            !v.is_empty()
        });
        assert_eq!(m.get("a"), Some(&vec![2]));
        m.update("a", |v| {
            v.clear();
            !v.is_empty()
        });
        assert_eq!((m.get("a"), m.len()), (None, 0));
        m.update("missing", |_| true);
        assert_eq!(m.len(), 0);
    }
}
