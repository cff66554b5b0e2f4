//! [`Delta`]: one change to the mesh, and how a [`Snapshot`] takes it.
//!
//! Sources that know what changed (Delta xDS) build a delta directly;
//! [`Snapshot::diff`] works one out from a whole new [`Mesh`] (the mesh
//! file), keeping the current copy of everything that did not change.
//! [`Snapshot::apply`] then updates only the index entries the changed
//! workloads, services and policies touch.

use std::collections::HashSet;
use std::sync::Arc;

use super::{HttpRoute, IdentityKey, Mesh, Name, Policy, Service, ServiceKey, Snapshot, Workload};

/// What changed in the mesh.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Workloads added or changed (replacing the one with their uid).
    pub workloads: Vec<Arc<Workload>>,
    /// Uids of workloads removed.
    pub removed_workloads: Vec<Name>,
    /// Services added or changed (by namespace and hostname), each with
    /// its full endpoint list.
    pub services: Vec<Arc<Service>>,
    /// Services removed: (namespace, hostname).
    pub removed_services: Vec<(Name, Name)>,
    /// Policies added or changed (by `namespace/name`).
    pub policies: Vec<Arc<Policy>>,
    /// Keys (`namespace/name`) of policies removed.
    pub removed_policies: Vec<String>,
    /// The new set of L7 routes, when it changed.
    pub http_routes: Option<Vec<HttpRoute>>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
            && self.removed_workloads.is_empty()
            && self.services.is_empty()
            && self.removed_services.is_empty()
            && self.policies.is_empty()
            && self.removed_policies.is_empty()
            && self.http_routes.is_none()
    }
}

impl Snapshot {
    /// What turns this version into `mesh`.
    pub fn diff(&self, mesh: Mesh) -> Delta {
        let mut d = Delta::default();
        let mut uids = HashSet::with_capacity(mesh.workloads.len());
        for w in mesh.workloads {
            if self
                .workloads
                .get(w.uid.as_str())
                .is_some_and(|old| **old == w)
            {
                uids.insert(w.uid);
                continue;
            }
            uids.insert(w.uid.clone());
            d.workloads.push(Arc::new(w));
        }
        d.removed_workloads = self
            .workloads
            .iter()
            .filter(|(uid, _)| !uids.contains(uid.as_str()))
            .map(|(uid, _)| uid.clone())
            .collect();
        drop(uids);
        let mut keys = HashSet::with_capacity(mesh.services.len());
        for s in mesh.services {
            let key = (s.namespace.clone(), s.hostname.clone());
            let same = self
                .services
                .get(&(key.0.as_str(), key.1.as_str()))
                .is_some_and(|old| **old == s);
            keys.insert(key);
            if !same {
                d.services.push(Arc::new(s));
            }
        }
        d.removed_services = self
            .services
            .iter()
            .map(|(k, _)| (k.namespace.clone(), k.hostname.clone()))
            .filter(|k| !keys.contains(k))
            .collect();
        let mut policy_keys = HashSet::with_capacity(mesh.policies.len());
        for p in mesh.policies {
            let key = p.key();
            if !self.policies.get(&key).is_some_and(|old| **old == p) {
                d.policies.push(Arc::new(p));
            }
            policy_keys.insert(key);
        }
        d.removed_policies = self
            .policies
            .keys()
            .filter(|k| !policy_keys.contains(*k))
            .cloned()
            .collect();
        if *self.http_routes != mesh.http_routes {
            d.http_routes = Some(mesh.http_routes);
        }
        d
    }

    /// Takes `d` in, touching only what it changes.
    pub fn apply(&mut self, d: Delta) {
        for uid in &d.removed_workloads {
            if let Some(old) = self.workloads.remove(uid.as_str()) {
                self.unindex_workload(&old);
            }
        }
        for w in d.workloads {
            if let Some(old) = self.workloads.insert(w.uid.clone(), w.clone()) {
                self.unindex_workload(&old);
            }
            self.index_workload(&w);
        }
        for (namespace, hostname) in &d.removed_services {
            if let Some(old) = self
                .services
                .remove(&(namespace.as_str(), hostname.as_str()))
            {
                self.unindex_service(&old);
            }
        }
        for s in d.services {
            let key = ServiceKey {
                namespace: s.namespace.clone(),
                hostname: s.hostname.clone(),
            };
            if let Some(old) = self.services.insert(key, s.clone()) {
                self.unindex_service(&old);
            }
            self.index_service(&s);
        }
        if !d.policies.is_empty() || !d.removed_policies.is_empty() {
            let policies = Arc::make_mut(&mut self.policies);
            for key in &d.removed_policies {
                policies.remove(key);
            }
            for p in d.policies {
                policies.insert(p.key(), p);
            }
            self.policy_list = policies.values().cloned().collect();
        }
        if let Some(routes) = d.http_routes {
            self.http_routes = Arc::new(routes);
        }
    }

    fn index_workload(&mut self, w: &Arc<Workload>) {
        for ip in &w.addresses {
            self.workload_by_ip.insert(*ip, w.clone());
        }
        self.workloads_by_identity
            .entry_mut(identity_key(w), Vec::new)
            .push(w.clone());
    }

    fn unindex_workload(&mut self, w: &Arc<Workload>) {
        for ip in &w.addresses {
            // Another workload may have taken the address in this delta.
            self.workload_by_ip.update(ip, |held| !Arc::ptr_eq(held, w));
        }
        let key = (&*w.trust_domain, &*w.namespace, &*w.service_account);
        self.workloads_by_identity.update(&key, |list| {
            list.retain(|held| !Arc::ptr_eq(held, w));
            !list.is_empty()
        });
    }

    fn index_service(&mut self, s: &Arc<Service>) {
        for vip in &s.vips {
            self.service_by_vip.insert(*vip, s.clone());
        }
        self.services_by_hostname
            .entry_mut(Name::from(s.hostname.to_ascii_lowercase()), Vec::new)
            .push(s.clone());
        if s.waypoint.is_some() {
            for e in &s.endpoints {
                self.waypointed_by_endpoint
                    .entry_mut(e.workload_uid.clone(), Vec::new)
                    .push(s.clone());
            }
        }
    }

    fn unindex_service(&mut self, s: &Arc<Service>) {
        for vip in &s.vips {
            self.service_by_vip
                .update(vip, |held| !Arc::ptr_eq(held, s));
        }
        let lower = s.hostname.to_ascii_lowercase();
        let drop_it = |list: &mut Vec<Arc<Service>>| {
            list.retain(|held| !Arc::ptr_eq(held, s));
            !list.is_empty()
        };
        self.services_by_hostname.update(lower.as_str(), drop_it);
        if s.waypoint.is_some() {
            for e in &s.endpoints {
                self.waypointed_by_endpoint
                    .update(e.workload_uid.as_str(), drop_it);
            }
        }
    }
}

fn identity_key(w: &Workload) -> IdentityKey {
    IdentityKey(
        w.trust_domain.clone(),
        w.namespace.clone(),
        w.service_account.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, GatewayAddress, GatewayTarget, PolicyAction, PolicyScope};

    fn service(name: &str, vip: &str, endpoints: &[&str], waypoint: bool) -> Service {
        Service {
            load_balancing: None,
            name: name.into(),
            namespace: "ns".into(),
            hostname: format!("{name}.ns.svc.cluster.local").into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![],
            endpoints: endpoints
                .iter()
                .map(|u| Endpoint {
                    workload_uid: (*u).into(),
                })
                .collect(),
            subject_alt_names: vec![],
            waypoint: waypoint.then(|| {
                Box::new(GatewayAddress {
                    target: GatewayTarget::Address("10.9.9.9".parse().unwrap()),
                    hbone_port: 15008,
                })
            }),
            visibility: Default::default(),
            ip_families: Default::default(),
        }
    }

    fn policy(name: &str, uids: &[&str]) -> Policy {
        Policy {
            name: name.into(),
            namespace: "ns".into(),
            scope: PolicyScope::WorkloadSelector {
                workload_uids: uids.iter().map(|u| (*u).into()).collect(),
            },
            action: PolicyAction::Allow,
            rules: vec![],
            dry_run: false,
            unsupported: vec![],
        }
    }

    fn mesh() -> Mesh {
        Mesh {
            workloads: (0..50)
                .map(|i| Workload::for_test(&format!("w{i}"), "ns", Some(&format!("10.0.0.{i}"))))
                .collect(),
            services: vec![
                service("a", "10.96.0.1", &["w1", "w2"], false),
                service("b", "10.96.0.2", &["w3"], true),
            ],
            policies: vec![policy("p", &["w1"]), policy("q", &["w2"])],
            http_routes: vec![],
        }
    }

    /// Every index of `snap` says what a snapshot built from scratch from
    /// the same mesh says.
    fn assert_same_as_fresh(snap: &Snapshot) {
        let fresh = Snapshot::new(snap.to_mesh());
        assert_eq!(snap.to_mesh(), fresh.to_mesh());
        for w in fresh.workloads() {
            for ip in &w.addresses {
                assert_eq!(snap.workload_by_ip(*ip).map(|x| &x.uid), Some(&w.uid));
            }
            let same = |s: &Snapshot| {
                let mut v: Vec<Name> = s
                    .workloads_with_identity(&w.trust_domain, &w.namespace, &w.service_account)
                    .iter()
                    .map(|x| x.uid.clone())
                    .collect();
                v.sort();
                v
            };
            assert_eq!(same(snap), same(&fresh));
            let wp = |s: &Snapshot| {
                let mut v: Vec<Name> = s
                    .waypointed_services_of(&w.uid)
                    .iter()
                    .map(|x| x.name.clone())
                    .collect();
                v.sort();
                v
            };
            assert_eq!(wp(snap), wp(&fresh), "{}", w.uid);
        }
        assert_eq!(snap.workload_by_ip.len(), fresh.workload_by_ip.len());
        assert_eq!(snap.service_by_vip.len(), fresh.service_by_vip.len());
        assert_eq!(
            snap.services_by_hostname.len(),
            fresh.services_by_hostname.len()
        );
        assert_eq!(
            snap.waypointed_by_endpoint.len(),
            fresh.waypointed_by_endpoint.len()
        );
        assert_eq!(
            snap.workloads_by_identity.len(),
            fresh.workloads_by_identity.len()
        );
    }

    #[test]
    fn a_change_touches_only_what_it_changes_and_indexes_follow() {
        let base = Snapshot::new(mesh());
        let mut m = mesh();
        // One workload moves address and identity, one goes, one comes;
        // a service loses its waypoint and an endpoint; a policy changes.
        m.workloads[5].addresses = smallvec::smallvec!["10.0.1.5".parse().unwrap()];
        m.workloads[5].service_account = "other".into();
        m.workloads.remove(7);
        m.workloads
            .push(Workload::for_test("new", "ns", Some("10.0.0.7")));
        m.services[1] = service("b", "10.96.0.3", &[], false);
        m.policies[0] = policy("p", &["w1", "w9"]);
        let d = base.diff(m.clone());
        assert_eq!(d.workloads.len(), 2, "{d:?}");
        assert_eq!(d.removed_workloads, vec![Name::from("w7")]);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.policies.len(), 1);
        let mut next = base.clone();
        next.apply(d);
        assert_eq!(next.to_mesh(), Snapshot::new(m).to_mesh());
        assert_same_as_fresh(&next);
        assert_eq!(next.workload_by_ip("10.0.0.5".parse().unwrap()), None);
        assert_eq!(
            next.workload_by_ip("10.0.0.7".parse().unwrap())
                .map(|w| &*w.uid),
            Some("new")
        );
        assert_eq!(next.service_by_vip("10.96.0.2".parse().unwrap()), None);
        assert!(next.waypointed_services_of("w3").is_empty());
        // The version before is untouched, and the workloads that did not
        // change are the same copies in both.
        assert_same_as_fresh(&base);
        assert_eq!(base.workload_by_uid("w7").map(|w| &*w.uid), Some("w7"));
        let (a, b) = (base.workload_by_uid("w9"), next.workload_by_uid("w9"));
        assert!(Arc::ptr_eq(a.unwrap(), b.unwrap()));
        assert!(base.diff(base.to_mesh()).is_empty());
    }

    #[test]
    fn an_address_passed_between_workloads_in_one_delta_stays_with_the_new_owner() {
        let base = Snapshot::new(mesh());
        let mut m = mesh();
        // w1 gives 10.0.0.1 to w2, and w2 gives its address to w1.
        m.workloads[1].addresses = smallvec::smallvec!["10.0.0.2".parse().unwrap()];
        m.workloads[2].addresses = smallvec::smallvec!["10.0.0.1".parse().unwrap()];
        let mut next = base.clone();
        next.apply(base.diff(m));
        assert_same_as_fresh(&next);
        let at = |ip: &str| {
            next.workload_by_ip(ip.parse().unwrap())
                .map(|w| w.uid.clone())
        };
        assert_eq!(at("10.0.0.1"), Some("w2".into()));
        assert_eq!(at("10.0.0.2"), Some("w1".into()));
    }
}
