//! The incremental path: what a response changes becomes a [`Delta`]
//! against the installed snapshot, and installing it gives the mesh a
//! from-scratch join of every held resource gives.

use std::sync::Arc;

use super::*;
use crate::state::{Delta, Snapshot, Workload};

/// Workload `uid` at 10.0.<ip>, backing `services` and listing `policies`.
fn workload(uid: &str, ip: u16, sa: &str, services: &[&str], policies: &[&str]) -> Resource {
    let (uid_, sa) = (uid.to_string(), sa.to_string());
    let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
    let policies: Vec<String> = policies.iter().map(|s| s.to_string()).collect();
    resource(
        uid,
        workload_any(move |w| {
            w.uid = uid_;
            w.service_account = sa;
            w.addresses = vec![vec![10, 0, (ip >> 8) as u8, ip as u8]];
            for s in services {
                w.services.insert(
                    s,
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 80,
                            target_port: 8080,
                            ..Default::default()
                        }],
                    },
                );
            }
            w.authorization_policies = policies;
        }),
    )
}

/// Service `ns/<host>` at 10.96.0.<vip>.
fn service(host: &str, vip: u8) -> Resource {
    let h = host.to_string();
    resource(
        &format!("ns/{host}"),
        service_any(move |s| {
            s.hostname = h;
            s.addresses[0].address = vec![10, 96, 0, vip];
        }),
    )
}

fn selector_policy(name: &str) -> Resource {
    let n = name.to_string();
    resource(
        &format!("ns/{name}"),
        policy_any(move |p| {
            p.name = n;
            p.scope = pb_sec::Scope::WorkloadSelector as i32;
        }),
    )
}

/// Applies `resp` to `res` and its delta to `snap`; returns the delta.
fn step(res: &mut Resources, snap: &mut Snapshot, resp: &DeltaDiscoveryResponse) -> Delta {
    res.apply(resp.clone()).expect("a subscribed type");
    let d = res.delta(snap);
    snap.apply(d.clone());
    d
}

fn assert_same_as_fresh_join(res: &Resources, snap: &Snapshot) {
    let fresh = Snapshot::new(res.build());
    assert_eq!(snap.to_mesh(), fresh.to_mesh());
    for w in fresh.workloads() {
        for ip in &w.addresses {
            let at = snap.workload_by_ip(*ip).map(|x| x.uid.clone());
            assert_eq!(at.as_ref(), Some(&w.uid), "{ip}");
        }
    }
    for s in fresh.services() {
        for vip in &s.vips {
            let at = snap.service_by_vip(*vip).map(|x| x.hostname.clone());
            assert_eq!(at.as_ref(), Some(&s.hostname), "{vip}");
        }
    }
}

// A Delta xDS response carries only what changed (ztunnel applies each
// resource on its own, istio/ztunnel src/xds/client.rs); one changed
// workload must cost one workload, not a rebuild of the mesh.
#[test]
fn one_changed_workload_is_all_a_response_installs() {
    let mut res = Resources::default();
    let mut snap = Snapshot::default();
    let mut all: Vec<Resource> = (0..200)
        .map(|i| {
            let svc = format!("ns/s{}", i % 20);
            workload(&format!("w{i}"), i, "sa", &[&svc], &["ns/p"])
        })
        .collect();
    all.extend((0..20).map(|i| service(&format!("s{i}"), i as u8)));
    step(&mut res, &mut snap, &response(ADDRESS_TYPE_URL, all, &[]));
    let policies = vec![selector_policy("p"), selector_policy("q")];
    let first = step(
        &mut res,
        &mut snap,
        &response(AUTHORIZATION_TYPE_URL, policies, &[]),
    );
    assert_eq!(first.policies.len(), 2);
    assert_eq!(snap.workload_count(), 200);
    let before = snap.clone();

    // w7 changes service account, moves from s7 to s8, and from p to q.
    let changed = workload("w7", 7, "other", &["ns/s8"], &["ns/q"]);
    let d = step(
        &mut res,
        &mut snap,
        &response(ADDRESS_TYPE_URL, vec![changed], &[]),
    );
    let uids: Vec<&str> = d.workloads.iter().map(|w| w.uid.as_str()).collect();
    assert_eq!(uids, ["w7"]);
    let mut services: Vec<&str> = d.services.iter().map(|s| s.hostname.as_str()).collect();
    services.sort();
    assert_eq!(services, ["s7", "s8"]);
    let mut policies: Vec<String> = d.policies.iter().map(|p| p.key()).collect();
    policies.sort();
    assert_eq!(policies, ["ns/p", "ns/q"]);
    assert!(d.removed_workloads.is_empty() && d.removed_services.is_empty());
    assert_same_as_fresh_join(&res, &snap);

    // Everything else is the very copy the version before holds.
    let w7 = snap.workload_by_uid("w7").unwrap();
    assert_eq!(w7.service_account, "other");
    for w in before.workloads().filter(|w| w.uid != "w7") {
        let now = snap.workload_by_uid(&w.uid).unwrap();
        assert!(Arc::ptr_eq(w, now), "{} was copied", w.uid);
    }
    let s9 = |s: &Snapshot| s.service_by_host("ns", "s9").unwrap().clone();
    assert!(Arc::ptr_eq(&s9(&before), &s9(&snap)));
    assert!(before.workload_by_uid("w7").unwrap().service_account == "sa");

    // The same workload again: nothing to install.
    let again = workload("w7", 7, "other", &["ns/s8"], &["ns/q"]);
    res.apply(response(ADDRESS_TYPE_URL, vec![again], &[]))
        .unwrap();
    let d = res.delta(&snap);
    assert_eq!(d.workloads.len(), 1, "a re-sent resource is a new copy");
    assert!(d.services.is_empty() && d.policies.is_empty(), "{d:?}");
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

// Whatever the server sends — changes, removals, addresses passed around
// and clashing, services and policies coming and going — the incremental
// snapshot is the mesh a from-scratch join of the held resources makes.
#[test]
fn random_responses_keep_the_snapshot_equal_to_a_fresh_join() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut res = Resources::default();
    let mut snap = Snapshot::default();
    for round in 0..400 {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let type_url = if rng.below(4) == 0 {
            for _ in 0..rng.below(3) + 1 {
                let name = format!("p{}", rng.below(5));
                if rng.below(3) == 0 {
                    removed.push(format!("ns/{name}"));
                } else {
                    resources.push(selector_policy(&name));
                }
            }
            AUTHORIZATION_TYPE_URL
        } else {
            let mut used = std::collections::BTreeSet::new();
            for _ in 0..rng.below(4) + 1 {
                match rng.below(10) {
                    0 => removed.push(format!("w{}", rng.below(40))),
                    1 => removed.push(format!("ns/s{}", rng.below(6))),
                    2 => {
                        let host = format!("s{}", rng.below(6));
                        if used.insert(format!("ns/{host}")) {
                            // A small VIP pool: some clash with each other.
                            resources.push(service(&host, rng.below(8) as u8));
                        }
                    }
                    _ => {
                        let uid = format!("w{}", rng.below(40));
                        if !used.insert(uid.clone()) {
                            continue;
                        }
                        let svc = format!("ns/s{}", rng.below(6));
                        let pol = format!("ns/p{}", rng.below(5));
                        let sa = format!("sa{}", rng.below(3));
                        // Addresses from a pool smaller than the workloads.
                        let ip = rng.below(50) as u16;
                        resources.push(workload(&uid, ip, &sa, &[&svc], &[&pol]));
                    }
                }
            }
            ADDRESS_TYPE_URL
        };
        let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
        step(
            &mut res,
            &mut snap,
            &response(type_url, resources, &removed),
        );
        assert_same_as_fresh_join(&res, &snap);
        // What is held never claims one address twice.
        let mesh = res.build();
        let mut ips: Vec<_> = mesh
            .workloads
            .iter()
            .flat_map(|w: &Workload| w.addresses.clone())
            .chain(mesh.services.iter().flat_map(|s| s.vips.clone()))
            .collect();
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n, "round {round}: an address held twice");
    }
    assert!(snap.workload_count() > 0);
}
