//! What the mesh costs in memory, per workload, once held: the client's
//! resources and the installed snapshot together, counted by the test
//! allocator ([`crate::test_heap`]) as glibc chunks. The shape is the scale
//! benchmark's (`benches/src/meshgen.rs`): workloads over 100 namespaces
//! with 20 service accounts each, one address each, a tenth as many
//! services of ten endpoints with one port.

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::state::{Endpoint, Service, Snapshot, Workload};
use crate::test_heap::live;

fn generated(n: usize) -> Mesh {
    let ip = |base: [u8; 4], i: usize| {
        IpAddr::V4(Ipv4Addr::from(u32::from_be_bytes(base) + 1 + i as u32))
    };
    let workloads = (0..n)
        .map(|i| {
            let mut w = Workload::for_test(&format!("wl-{i}"), &format!("ns-{}", i % 100), None);
            w.service_account = format!("sa-{}", i % 20).as_str().into();
            w.trust_domain = "cluster.local".into();
            w.node = format!("node-{}", i % 500).as_str().into();
            w.addresses = smallvec::smallvec![ip([10, 0, 0, 0], i)];
            w
        })
        .collect();
    let services = (0..n / 10)
        .map(|j| {
            let (k, q) = (j % 100, j / 100);
            let ns = format!("ns-{k}");
            Service {
                load_balancing: None,
                name: format!("svc-{j}").as_str().into(),
                hostname: format!("svc-{j}.{ns}.svc.cluster.local").as_str().into(),
                namespace: ns.as_str().into(),
                vips: vec![ip([172, 16, 0, 0], j)],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: (0..10)
                    .map(|m| Endpoint {
                        workload_uid: format!("wl-{}", (k + 100 * (10 * q + m)) % n)
                            .as_str()
                            .into(),
                    })
                    .collect(),
                subject_alt_names: vec![],
                waypoint: None,
                visibility: Default::default(),
                ip_families: Default::default(),
            }
        })
        .collect();
    Mesh {
        workloads,
        services,
        ..Default::default()
    }
}

/// Heap bytes held for a mesh of `n` workloads: (client resources, both).
fn held(n: usize) -> (isize, isize) {
    let mut resps = responses(&encode_mesh(&generated(n)).expect("encodable"));
    // Versions as istiod writes them: a 64-bit hash in hex.
    for (i, r) in resps.iter_mut().flat_map(|r| &mut r.resources).enumerate() {
        r.version = format!("{:x}", (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    let start = live();
    let mut res = Resources::default();
    let mut snap = Snapshot::default();
    for r in &resps {
        res.apply(r.clone()).expect("a subscribed type");
    }
    let resources = live() - start;
    let d = res.delta(&snap);
    snap.apply(d);
    assert_eq!(snap.workload_count(), n);
    (resources, live() - start)
}

/// The slope between 2,000 and 20,000 workloads, so what does not grow
/// with the mesh (tables' first allocations, the interner's namespaces)
/// does not count. The budget is the scale target, 0.8 MiB of resident
/// memory per 1,000 workloads (839 B each), less a margin for what the
/// allocator adds in a real process (`scripts/bench scale` measures that).
#[test]
fn a_workload_costs_a_bounded_number_of_bytes() {
    let (small, large) = (2_000, 20_000);
    let (r1, t1) = held(small);
    let (r2, t2) = held(large);
    let per = |a: isize, b: isize| (b - a) / (large - small) as isize;
    let (resources, total) = (per(r1, r2), per(t1, t2));
    eprintln!(
        "per workload: {total} B ({resources} B client resources, {} B snapshot)",
        total - resources
    );
    assert!(total <= 650, "{total} B per workload");
}
