//! Micro-benchmarks of the per-connection decisions at mesh scale: L4
//! authorization against 10,000 policies, and destination lookup and
//! routing among 10,000 workloads (with 1,000 services in front of them).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use ambient_agent::identity::Identity;
use ambient_agent::state::authz::{self, Connection};
use ambient_agent::state::{
    ApplicationTunnel, Clause, Delta, Endpoint, Match, Mesh, Policy, PolicyAction, PolicyScope,
    Rule, Service, ServicePort, Snapshot, State, StringMatch, TunnelProtocol, Workload,
};
use criterion::{criterion_group, criterion_main, Criterion};

const NAMESPACES: usize = 100;

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

fn workload(i: usize) -> Workload {
    Workload {
        uid: format!("w{i}").into(),
        name: format!("w{i}").into(),
        namespace: format!("ns-{}", i % NAMESPACES).into(),
        service_account: format!("sa-{}", i % 7).into(),
        trust_domain: "cluster.local".into(),
        addresses: [ip(i)].into_iter().collect(),
        node: format!("node-{}", i % 50).into(),
        local: None,
        protocol: TunnelProtocol::Hbone,
        application_tunnel: ApplicationTunnel::None,
        waypoint: None,
        healthy: true,
        capacity: 1,
        telemetry: Default::default(),
        network: None,
        hostname: None,
    }
}

/// Policy `i`: spread over the namespaces, a third selector-scoped, one in
/// ten a DENY; each rule asks for principals, ports and source ranges, so
/// evaluation does the work a real policy needs.
fn policy(i: usize, scope_all: bool) -> Policy {
    let ns = format!("ns-{}", i % NAMESPACES);
    let scope = if scope_all {
        PolicyScope::Global
    } else if i.is_multiple_of(3) {
        PolicyScope::WorkloadSelector {
            workload_uids: vec![
                format!("w{}", i % 10_000).into(),
                format!("w{}", (i + 1) % 10_000).into(),
            ],
        }
    } else {
        PolicyScope::Namespace
    };
    let m = Match {
        principals: vec![
            StringMatch::Exact(format!("cluster.local/ns/{ns}/sa/sa-{}", i % 5)),
            StringMatch::Prefix(format!("cluster.local/ns/other-{i}/")),
        ],
        destination_ports: vec![8080, 9000 + (i % 100) as u16],
        not_source_ips: vec!["192.168.0.0/16".parse().expect("cidr")],
        ..Default::default()
    };
    Policy {
        name: format!("p{i}"),
        namespace: ns,
        scope,
        action: if i % 10 == 9 {
            PolicyAction::Deny
        } else {
            PolicyAction::Allow
        },
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![m],
                ..Default::default()
            }],
            ..Default::default()
        }],
        dry_run: false,
        unsupported: Vec::new(),
    }
}

fn authorization(c: &mut Criterion) {
    let dst = workload(42);
    let src = Identity::new("cluster.local", "ns-42", "sa-3");
    let conn = Connection {
        src_ip: ip(7),
        src_identity: Some(&src),
        dst: SocketAddr::new(ip(42), 8080),
        request: None,
    };
    let mut group = c.benchmark_group("authorize_10k_policies");
    for (name, all) in [("namespace_scoped", false), ("all_apply", true)] {
        let policies: Vec<Arc<Policy>> = (0..10_000).map(|i| Arc::new(policy(i, all))).collect();
        let applying = policies
            .iter()
            .filter(|p| authz::applies_to(p, &dst))
            .count();
        eprintln!("{name}: {applying} of 10000 policies apply");
        group.bench_function(name, |b| {
            b.iter(|| authz::authorize(black_box(&policies), black_box(&dst), black_box(&conn)))
        });
    }
    group.finish();
}

/// `n` workloads behind `n / 10` services of 10 endpoints each.
fn mesh(n: usize) -> Mesh {
    let services = (0..n / 10)
        .map(|s| Service {
            load_balancing: None,
            name: format!("svc{s}").into(),
            namespace: format!("ns-{}", s % NAMESPACES).into(),
            hostname: format!("svc{s}.ns-{}.svc.cluster.local", s % NAMESPACES).into(),
            vips: vec![IpAddr::V4(Ipv4Addr::new(172, 16, (s >> 8) as u8, s as u8))],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: (0..10)
                .map(|e| Endpoint {
                    workload_uid: format!("w{}", s * 10 + e).into(),
                })
                .collect(),
            subject_alt_names: vec![],
            visibility: Default::default(),
            ip_families: Default::default(),
            waypoint: None,
        })
        .collect();
    Mesh {
        workloads: (0..n).map(workload).collect(),
        services,
        ..Mesh::default()
    }
}

fn routing(c: &mut Criterion) {
    for (group_name, n) in [
        ("route_10k_workloads", 10_000),
        ("route_100k_workloads", 100_000),
    ] {
        let snap = Snapshot::new(mesh(n));
        let to_workload = SocketAddr::new(ip(4242), 8080);
        let to_service = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(172, 16, 1, 200)), 80);
        let outside = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 443);
        let mut group = c.benchmark_group(group_name);
        group.bench_function("destination_workload", |b| {
            b.iter(|| snap.destination(black_box(to_workload)))
        });
        group.bench_function("destination_outside_mesh", |b| {
            b.iter(|| snap.destination(black_box(outside)))
        });
        group.bench_function("route_workload", |b| {
            b.iter(|| snap.route(black_box(to_workload), 15008))
        });
        group.bench_function("route_service_10_endpoints", |b| {
            b.iter(|| snap.route(black_box(to_service), 15008))
        });
        group.finish();
    }
}

/// Policy evaluation at the scale benchmark's shape: 1,000 policies over
/// 100 namespaces, against a destination in a 100,000-workload mesh.
fn authorization_at_scale(c: &mut Criterion) {
    let snap = Snapshot::new(Mesh {
        policies: (0..1_000).map(|i| policy(i, false)).collect(),
        ..mesh(100_000)
    });
    let dst = snap
        .workload_by_uid("w42")
        .expect("w42 is in the mesh")
        .clone();
    let src = Identity::new("cluster.local", "ns-42", "sa-3");
    let conn = Connection {
        src_ip: ip(7),
        src_identity: Some(&src),
        dst: SocketAddr::new(ip(42), 8080),
        request: None,
    };
    c.bench_function("authorize_1k_policies_100k_workloads", |b| {
        b.iter(|| {
            authz::authorize(
                black_box(snap.policies()),
                black_box(&dst),
                black_box(&conn),
            )
        })
    });
}

/// One workload changed in a 100,000-workload mesh: the cost of a Delta
/// xDS push of one resource, once decoded (the new version shares the
/// rest with the one before).
fn incremental_update(c: &mut Criterion) {
    let state = State::new(mesh(100_000));
    let mut i = 0usize;
    c.bench_function("apply_one_workload_change_100k", |b| {
        b.iter(|| {
            i += 1;
            let mut w = workload(i % 100_000);
            w.healthy = i.is_multiple_of(2);
            let delta = Delta {
                workloads: vec![Arc::new(w)],
                ..Delta::default()
            };
            state.apply_since(delta, Instant::now())
        })
    });
}

criterion_group!(
    benches,
    authorization,
    routing,
    authorization_at_scale,
    incremental_update
);
criterion_main!(benches);
