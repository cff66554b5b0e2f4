//! Networks, network gateways and load balancing in route choice.

use super::super::*;
use crate::identity::Identity;
use crate::state::{Endpoint, HealthPolicy, LbScope, Mesh, Network, ServicePort};

fn on(uid: &str, ip: &str, network: &str, healthy: bool) -> Workload {
    Workload {
        network: (!network.is_empty()).then(|| {
            Arc::new(Network {
                name: network.into(),
                gateway: None,
            })
        }),
        healthy,
        ..Workload::for_test(uid, "ns", Some(ip))
    }
}

fn svc(endpoints: &[&str], lb: Option<LoadBalancing>) -> Service {
    Service {
        name: "svc".into(),
        namespace: "ns".into(),
        hostname: "svc.ns.svc.cluster.local".into(),
        vips: vec!["10.96.0.1".parse().unwrap()],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
        }],
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint {
                workload_uid: (*e).into(),
            })
            .collect(),
        subject_alt_names: vec![],
        visibility: Default::default(),
        ip_families: Default::default(),
        waypoint: None,
        load_balancing: lb.map(Box::new),
    }
}

fn mesh(workloads: Vec<Workload>, service: Service) -> Snapshot {
    Snapshot::new(Mesh {
        workloads,
        services: vec![service],
        ..Mesh::default()
    })
}

fn target(r: Route) -> String {
    match r {
        Route::Hbone { target, .. } | Route::Passthrough { target, .. } => target.to_string(),
        Route::DoubleHbone {
            gateway,
            workload,
            port,
            ..
        } => format!("{} via {gateway} for :{port}", workload.uid),
        Route::Lookup { hostname, .. } => format!("lookup {hostname}"),
        Route::Unreachable(why) => format!("unreachable: {why}"),
    }
}

fn gateway(target: GatewayTarget) -> Option<GatewayAddress> {
    Some(GatewayAddress {
        target,
        hbone_port: 15008,
    })
}

/// `uid` on network `network`, whose gateway is `gw`; no address when
/// `ip` is empty (istiod may list a remote workload by network only).
fn remote(uid: &str, ip: &str, network: &str, gw: Option<GatewayAddress>) -> Workload {
    let mut w = Workload::for_test(uid, "ns", (!ip.is_empty()).then_some(ip));
    w.network = Some(Arc::new(Network {
        name: network.into(),
        gateway: gw,
    }));
    w
}

/// A destination on another network is reached only through that
/// network's gateway, and only by a service (ztunnel's
/// `build_request_through_gateway`: a workload address of another
/// network is never dialed, a remote endpoint needs a gateway); a
/// remote workload without addresses is still an endpoint through the
/// gateway (ztunnel's `load_balance`), a local one without is not.
#[test]
fn other_networks_only_through_their_gateway() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let src = on("src", "10.1.0.1", "n1", true);
    let by_ip = || gateway(GatewayTarget::Address("10.2.0.9".parse().unwrap()));
    let ewgw = || remote("ewgw", "10.2.0.9", "n2", None);
    let cases: Vec<(&str, Vec<Workload>, &str, &str)> = vec![
        (
            "no gateway: no endpoint",
            vec![remote("far", "10.2.0.2", "n2", None)],
            "10.96.0.1:80",
            "unreachable: service ns/svc.ns.svc.cluster.local has no healthy endpoint",
        ),
        (
            "a workload address on another network",
            vec![remote("far", "10.2.0.2", "n2", by_ip()), ewgw()],
            "10.2.0.2:80",
            "unreachable: workload far is on network \"n2\", not \"n1\": another network is reached by a service, not a workload address",
        ),
        (
            "gateway by address",
            vec![remote("far", "10.2.0.2", "n2", by_ip()), ewgw()],
            "10.96.0.1:80",
            "far via 10.2.0.9:15008 for :80",
        ),
        (
            "remote endpoint with no address",
            vec![remote("far", "", "n2", by_ip()), ewgw()],
            "10.96.0.1:80",
            "far via 10.2.0.9:15008 for :80",
        ),
        (
            "gateway not in the mesh",
            vec![remote("far", "10.2.0.2", "n2", by_ip())],
            "10.96.0.1:80",
            "unreachable: the gateway Address(10.2.0.9) of network \"n2\" is not in the mesh",
        ),
        (
            "a local endpoint with no address",
            vec![remote("near", "", "n1", by_ip()), ewgw()],
            "10.96.0.1:80",
            "unreachable: service ns/svc.ns.svc.cluster.local has no healthy endpoint",
        ),
    ];
    for (name, mut workloads, dst, want) in cases {
        let eps: Vec<String> = workloads
            .iter()
            .filter(|w| *w.uid != *"ewgw")
            .map(|w| w.uid.to_string())
            .collect();
        let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
        workloads.push(src.clone());
        let snap = mesh(workloads, svc(&eps, None));
        assert_eq!(
            target(snap.route_from(Some(&src), sa(dst), 15008)),
            want,
            "{name}"
        );
    }
}

/// What each tunnel of a double HBONE must prove: the outer the
/// gateway's workload identity and its service's SANs (ztunnel's
/// `workload_and_services_san`); the inner the destination service's
/// SANs and, beyond ztunnel (which fails without SANs), the
/// identities of the service's endpoints on that network, any of which
/// the gateway may pick.
#[test]
fn double_hbone_expects_the_gateway_then_the_service() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let src = on("src", "10.1.0.1", "n1", true);
    let gw_svc = || {
        gateway(GatewayTarget::Service {
            namespace: "istio-system".into(),
            hostname: "eastwest.istio-system.svc.cluster.local".into(),
        })
    };
    let mut far = remote("far", "", "n2", gw_svc());
    far.service_account = "far-sa".into();
    let mut other = remote("other", "", "n2", gw_svc());
    other.service_account = "other-sa".into();
    let ew = Workload {
        namespace: "istio-system".into(),
        service_account: "eastwest".into(),
        ..remote("ew-1", "10.2.0.9", "n2", None)
    };
    let mut gws = svc(&["ew-1"], None);
    gws.namespace = "istio-system".into();
    gws.hostname = "eastwest.istio-system.svc.cluster.local".into();
    gws.vips = vec!["10.96.9.9".parse().unwrap()];
    gws.subject_alt_names = vec!["spiffe://cluster.local/ns/istio-system/sa/ew-extra".into()];
    let mut dest = svc(&["far", "other"], None);
    dest.subject_alt_names = vec!["spiffe://cluster.local/ns/ns/sa/extra".into()];
    let snap = Snapshot::new(Mesh {
        workloads: vec![src.clone(), far, other, ew],
        services: vec![dest, gws],
        ..Mesh::default()
    });
    let Route::DoubleHbone {
        gateway,
        gateway_identities,
        port,
        identities,
        service,
        ..
    } = snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)
    else {
        panic!("not double HBONE");
    };
    assert_eq!(gateway, sa("10.2.0.9:15008"));
    assert_eq!(port, 80);
    assert_eq!(&*service.hostname, "svc.ns.svc.cluster.local");
    let ids = |v: &[Identity]| {
        let mut v: Vec<String> = v.iter().map(|i| i.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(
        ids(&gateway_identities),
        [
            "spiffe://cluster.local/ns/istio-system/sa/ew-extra",
            "spiffe://td/ns/istio-system/sa/eastwest"
        ]
    );
    assert_eq!(
        ids(&identities),
        [
            "spiffe://cluster.local/ns/ns/sa/extra",
            "spiffe://td/ns/ns/sa/far-sa",
            "spiffe://td/ns/ns/sa/other-sa"
        ]
    );
}

/// FAILOVER with NETWORK first keeps traffic on the source's network
/// while it has a healthy endpoint, and spills through the gateway
/// when it has none; without load balancing settings both networks
/// share it (ztunnel ranks nothing then).
#[test]
fn network_failover_spills_through_the_gateway() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let src = on("src", "10.1.0.1", "n1", true);
    let by_ip = || gateway(GatewayTarget::Address("10.2.0.9".parse().unwrap()));
    let workloads = |near_healthy: bool| {
        vec![
            src.clone(),
            on("near", "10.1.0.2", "n1", near_healthy),
            remote("far", "10.2.0.2", "n2", by_ip()),
            remote("ewgw", "10.2.0.9", "n2", None),
        ]
    };
    let lb = LoadBalancing {
        routing_preference: vec![LbScope::Network],
        mode: LbMode::Failover,
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let snap = mesh(workloads(true), svc(&["near", "far"], Some(lb.clone())));
    for _ in 0..20 {
        assert_eq!(
            target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)),
            "10.1.0.2:8080"
        );
    }
    let snap = mesh(workloads(false), svc(&["near", "far"], Some(lb.clone())));
    assert_eq!(
        target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)),
        "far via 10.2.0.9:15008 for :80"
    );
    let strict = LoadBalancing {
        mode: LbMode::Strict,
        ..lb
    };
    let snap = mesh(workloads(false), svc(&["near", "far"], Some(strict)));
    let r = target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008));
    assert!(r.starts_with("unreachable"), "{r}");
    let snap = mesh(workloads(true), svc(&["near", "far"], None));
    let seen: std::collections::HashSet<String> = (0..200)
        .map(|_| target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)))
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[test]
fn load_balancing_applies_to_service_endpoints() {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let src = on("src", "10.1.0.1", "", true);
    let workloads = || {
        vec![
            src.clone(),
            on("sick", "10.1.0.2", "", false),
            Workload {
                node: "other".into(),
                ..on("well", "10.1.0.3", "", true)
            },
        ]
    };
    // ALLOW_ALL lets the unhealthy endpoint be chosen; STRICT by node
    // picks it (same node as the source), FAILOVER too.
    for mode in [LbMode::Strict, LbMode::Failover] {
        let lb = LoadBalancing {
            routing_preference: vec![LbScope::Node],
            mode,
            health_policy: HealthPolicy::AllowAll,
        };
        let snap = mesh(workloads(), svc(&["sick", "well"], Some(lb)));
        for _ in 0..20 {
            assert_eq!(
                target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)),
                "10.1.0.2:8080",
                "{mode:?}"
            );
        }
    }
    // ONLY_HEALTHY: STRICT by node has nothing left; FAILOVER spills over.
    let strict = LoadBalancing {
        routing_preference: vec![LbScope::Node],
        mode: LbMode::Strict,
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let snap = mesh(workloads(), svc(&["sick", "well"], Some(strict.clone())));
    let r = target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008));
    assert!(r.starts_with("unreachable"), "{r}");
    let failover = LoadBalancing {
        mode: LbMode::Failover,
        ..strict
    };
    let snap = mesh(workloads(), svc(&["sick", "well"], Some(failover)));
    assert_eq!(
        target(snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008)),
        "10.1.0.3:8080"
    );
    // PASSTHROUGH: no endpoint is chosen, the dialed address is kept.
    let passthrough = LoadBalancing {
        mode: LbMode::Passthrough,
        ..LoadBalancing::default()
    };
    let snap = mesh(workloads(), svc(&["well"], Some(passthrough)));
    assert!(matches!(
        snap.route_from(Some(&src), sa("10.96.0.1:80"), 15008),
        Route::Passthrough { target, workload: None, service: Some(_) } if target == sa("10.96.0.1:80")
    ));
}
