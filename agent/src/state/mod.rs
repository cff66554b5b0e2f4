//! What the agent knows about the mesh, and the lookups the proxy makes in it.
//!
//! A configuration source (local YAML, xDS) says what changed as a
//! [`Delta`] (or hands a whole [`Mesh`] to [`State::replace`], which works
//! out the delta); readers take a [`Snapshot`], an immutable, indexed view,
//! so a connection decides against one consistent version. A new version
//! shares everything a change did not touch with the one before it
//! ([`cow::CowMap`]), so a change costs what it changes, not what the mesh
//! holds.

pub mod authz;
mod balance;
mod cow;
mod delta;
pub mod l7;
pub mod model;
mod name;
mod route;

pub use delta::Delta;
pub use l7::{
    Backend, HeaderMatch, HttpAction, HttpMatch, HttpRoute, HttpRule, L7Decision, PathMatch,
    RequestPolicy, ValueMatch,
};
pub use model::*;
pub use name::{valid_hostname, Interner, Name};
pub use route::{pick_address, pick_found, Destination, Reach, Route};

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use hashbrown::Equivalent;
use tokio::sync::watch;

pub use cow::AddrMap;
use cow::CowMap;

/// A service's key: its namespace and hostname.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ServiceKey {
    namespace: Name,
    hostname: Name,
}

impl Equivalent<ServiceKey> for (&str, &str) {
    fn equivalent(&self, k: &ServiceKey) -> bool {
        self.0 == &*k.namespace && self.1 == &*k.hostname
    }
}

/// A workload identity's parts: trust domain, namespace, service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey(Name, Name, Name);

impl Equivalent<IdentityKey> for (&str, &str, &str) {
    fn equivalent(&self, k: &IdentityKey) -> bool {
        self.0 == &*k.0 && self.1 == &*k.1 && self.2 == &*k.2
    }
}

/// An indexed, immutable version of the mesh.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    workloads: CowMap<Name, Arc<Workload>>,
    workload_by_ip: AddrMap<Arc<Workload>>,
    /// For naming a peer known only by its identity.
    workloads_by_identity: CowMap<IdentityKey, Vec<Arc<Workload>>>,
    services: CowMap<ServiceKey, Arc<Service>>,
    service_by_vip: CowMap<IpAddr, Arc<Service>>,
    /// Services by lowercased hostname, over every namespace (DNS).
    services_by_hostname: CowMap<Name, Vec<Arc<Service>>>,
    /// Services that have a waypoint, by the uid of each endpoint.
    waypointed_by_endpoint: CowMap<Name, Vec<Arc<Service>>>,
    policies: Arc<BTreeMap<String, Arc<Policy>>>,
    /// `policies`' values, in key order, for evaluation.
    policy_list: Arc<[Arc<Policy>]>,
    http_routes: Arc<Vec<HttpRoute>>,
}

impl Snapshot {
    /// Indexes `mesh`. The mesh is assumed valid (sources validate).
    pub fn new(mesh: Mesh) -> Self {
        let mut snap = Snapshot::default();
        let delta = snap.diff(mesh);
        snap.apply(delta);
        snap
    }

    /// The whole mesh, in a stable order (workloads by uid, services by
    /// namespace and hostname, policies by key). Copies everything: for
    /// dumps and tests, not for the data path.
    pub fn to_mesh(&self) -> Mesh {
        let mut workloads: Vec<Workload> = self.workloads.values().map(|w| (**w).clone()).collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<Service> = self.services.values().map(|s| (**s).clone()).collect();
        services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
        Mesh {
            workloads,
            services,
            policies: self.policy_list.iter().map(|p| (**p).clone()).collect(),
            http_routes: (*self.http_routes).clone(),
        }
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    /// Whether `w` is a workload of this mesh (by uid), rather than one
    /// served before the control plane described it.
    pub fn knows(&self, w: &Workload) -> bool {
        self.workloads.contains_key(w.uid.as_str())
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(&ip)
    }

    /// The workloads whose identity has these parts.
    pub fn workloads_with_identity(
        &self,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> &[Arc<Workload>] {
        self.workloads_by_identity
            .get(&(trust_domain, namespace, service_account))
            .map_or(&[], Vec::as_slice)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service_by_host(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.services.get(&(namespace, hostname))
    }

    /// Every service named `hostname` (lowercase), whatever its namespace.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<Service>] {
        self.services_by_hostname
            .get(hostname)
            .map_or(&[], Vec::as_slice)
    }

    /// The services with a waypoint that workload `uid` backs.
    pub fn waypointed_services_of(&self, uid: &str) -> &[Arc<Service>] {
        self.waypointed_by_endpoint
            .get(uid)
            .map_or(&[], Vec::as_slice)
    }

    /// Workloads served by the agent of `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workloads.values().filter(move |w| w.node == node)
    }

    /// The policy with key `namespace/name`.
    pub fn policy(&self, key: &str) -> Option<&Arc<Policy>> {
        self.policies.get(key)
    }

    /// The authorization policies, in key order.
    pub fn policies(&self) -> &[Arc<Policy>] {
        &self.policy_list
    }

    pub fn http_routes(&self) -> &[HttpRoute] {
        &self.http_routes
    }
}

/// Changes installed so far, for metrics and the scale benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpdateStats {
    /// New versions installed.
    pub updates: u64,
    /// Time the last one took, from the source having its input (a
    /// response, a changed file) to the new version serving.
    pub last_seconds: f64,
    /// Sum of those times over every update.
    pub seconds_total: f64,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
}

/// The shared, swappable mesh state.
#[derive(Debug)]
pub struct State {
    current: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
    /// One writer at a time builds the next version.
    stats: Mutex<UpdateStats>,
}

impl Default for State {
    fn default() -> Self {
        Self::new(Mesh::default())
    }
}

impl State {
    pub fn new(mesh: Mesh) -> Self {
        State {
            current: ArcSwap::from_pointee(Snapshot::new(mesh)),
            version: watch::channel(0).0,
            stats: Mutex::default(),
        }
    }

    /// The current version of the mesh.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Updates installed so far and what the mesh holds.
    pub fn stats(&self) -> UpdateStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes `mesh` the current version (only what differs is changed)
    /// and wakes everyone watching, unless nothing changed.
    pub fn replace(&self, mesh: Mesh) -> bool {
        self.replace_since(mesh, Instant::now())
    }

    /// [`State::replace`], counting the update's time from `started`
    /// (when the source got its input).
    pub fn replace_since(&self, mesh: Mesh, started: Instant) -> bool {
        let delta = self.snapshot().diff(mesh);
        self.apply_since(delta, started)
    }

    /// Installs `delta` as a new version, unless it changes nothing.
    pub fn apply_since(&self, delta: Delta, started: Instant) -> bool {
        if delta.is_empty() {
            return false;
        }
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = Snapshot::clone(&self.current.load());
        next.apply(delta);
        let counts = (
            next.workloads.len(),
            next.services.len(),
            next.policy_list.len(),
        );
        self.current.store(Arc::new(next));
        let took = started.elapsed().as_secs_f64();
        stats.updates += 1;
        stats.last_seconds = took;
        stats.seconds_total += took;
        (stats.workloads, stats.services, stats.policies) = counts;
        drop(stats);
        self.version.send_modify(|v| *v += 1);
        true
    }

    /// A receiver that sees a new value after every installed change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
