//! What the agent knows about the mesh, and the lookups the proxy makes in it.
//!
//! A configuration source (local YAML, xDS) builds a [`Mesh`] and hands it to
//! [`State::replace`]; readers take a [`Snapshot`] — an immutable, indexed
//! view — so a connection decides against one consistent version.

pub mod authz;
pub mod l7;
pub mod model;
mod route;

pub use l7::{Backend, HttpAction, HttpMatch, HttpRoute, HttpRule, L7Decision, PathMatch};
pub use model::*;
pub use route::{Destination, Route};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

/// An indexed, immutable version of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    mesh: Mesh,
    workload_by_uid: HashMap<String, Arc<Workload>>,
    workload_by_ip: HashMap<IpAddr, Arc<Workload>>,
    service_by_vip: HashMap<IpAddr, Arc<Service>>,
    service_by_host: HashMap<(String, String), Arc<Service>>,
    /// Services by lowercased hostname, over every namespace (DNS).
    services_by_hostname: HashMap<String, Vec<Arc<Service>>>,
}

impl Snapshot {
    /// Indexes `mesh`. The mesh is assumed valid (sources validate).
    pub fn new(mesh: Mesh) -> Self {
        let mut snap = Snapshot::default();
        for w in &mesh.workloads {
            let w = Arc::new(w.clone());
            for ip in &w.addresses {
                snap.workload_by_ip.insert(*ip, w.clone());
            }
            snap.workload_by_uid.insert(w.uid.clone(), w);
        }
        for s in &mesh.services {
            let s = Arc::new(s.clone());
            for vip in &s.vips {
                snap.service_by_vip.insert(*vip, s.clone());
            }
            snap.services_by_hostname
                .entry(s.hostname.to_ascii_lowercase())
                .or_default()
                .push(s.clone());
            snap.service_by_host
                .insert((s.namespace.clone(), s.hostname.clone()), s);
        }
        snap.mesh = mesh;
        snap
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workload_by_uid.get(uid)
    }

    /// Whether `w` is a workload of this mesh (by uid), rather than one
    /// served before the control plane described it.
    pub fn knows(&self, w: &Workload) -> bool {
        self.workload_by_uid.contains_key(&w.uid)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.service_by_vip.get(&ip)
    }

    pub fn service_by_host(&self, namespace: &str, hostname: &str) -> Option<&Arc<Service>> {
        self.service_by_host
            .get(&(namespace.to_string(), hostname.to_string()))
    }

    /// Every service named `hostname` (lowercase), whatever its namespace.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<Service>] {
        self.services_by_hostname
            .get(hostname)
            .map_or(&[], Vec::as_slice)
    }

    /// Workloads served by the agent of `node`.
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Arc<Workload>> {
        self.workload_by_uid
            .values()
            .filter(move |w| w.node == node)
    }

    pub fn policies(&self) -> &[Policy] {
        &self.mesh.policies
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
    stats: std::sync::Mutex<UpdateStats>,
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
            stats: Default::default(),
        }
    }

    /// Updates installed so far and what the mesh holds.
    pub fn stats(&self) -> UpdateStats {
        *self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current version of the mesh.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Installs a new version and wakes everyone watching for changes.
    pub fn replace(&self, mesh: Mesh) {
        self.replace_since(mesh, std::time::Instant::now());
    }

    /// [`State::replace`], counting the update's time from `started`
    /// (when the source got its input).
    pub fn replace_since(&self, mesh: Mesh, started: std::time::Instant) {
        let snap = Snapshot::new(mesh);
        let (workloads, services, policies) = (
            snap.workload_by_uid.len(),
            snap.mesh.services.len(),
            snap.mesh.policies.len(),
        );
        self.current.store(Arc::new(snap));
        let took = started.elapsed().as_secs_f64();
        {
            let mut st = self.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.updates += 1;
            st.last_seconds = took;
            st.seconds_total += took;
            (st.workloads, st.services, st.policies) = (workloads, services, policies);
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// A receiver that sees a new value after every [`State::replace`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
