//! Route decisions: addresses, families, services, waypoints, networks.

mod basics {
    use super::super::*;
    use crate::state::{Endpoint, Mesh, ServicePort};

    fn wl(uid: &str, ip: &str, protocol: TunnelProtocol, healthy: bool) -> Workload {
        Workload {
            namespace: "ns".into(),
            protocol,
            healthy,
            ..Workload::for_test(uid, "ns", Some(ip))
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::new(Mesh {
            workloads: vec![
                wl("a", "10.0.0.1", TunnelProtocol::Hbone, true),
                wl("b", "10.0.0.2", TunnelProtocol::None, true),
                wl("sick", "10.0.0.3", TunnelProtocol::Hbone, false),
            ],
            services: vec![
                Service {
                    load_balancing: None,
                    name: "svc".into(),
                    namespace: "ns".into(),
                    hostname: "svc.ns.svc.cluster.local".into(),
                    vips: vec!["10.96.0.1".parse().unwrap()],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 8080,
                    }],
                    endpoints: vec![
                        Endpoint {
                            workload_uid: "a".into(),
                        },
                        Endpoint {
                            workload_uid: "sick".into(),
                        },
                    ],
                    subject_alt_names: vec!["spiffe://td/ns/ns/sa/extra".into()],
                    visibility: Default::default(),
                    ip_families: Default::default(),
                    waypoint: None,
                },
                Service {
                    load_balancing: None,
                    name: "empty".into(),
                    namespace: "ns".into(),
                    hostname: "empty".into(),
                    vips: vec!["10.96.0.2".parse().unwrap()],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 0,
                    }],
                    endpoints: vec![Endpoint {
                        workload_uid: "sick".into(),
                    }],
                    subject_alt_names: vec![],
                    visibility: Default::default(),
                    ip_families: Default::default(),
                    waypoint: None,
                },
            ],
            ..Mesh::default()
        })
    }

    #[test]
    fn routes() {
        let snap = snapshot();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Mesh workload: HBONE to its agent, same port.
        match snap.route(sa("10.0.0.1:9000"), 15008) {
            Route::Hbone {
                gateway,
                target,
                identities,
                ..
            } => {
                assert_eq!(gateway, sa("10.0.0.1:15008"));
                assert_eq!(target, sa("10.0.0.1:9000"));
                assert_eq!(identities, vec![Identity::new("td", "ns", "a")]);
            }
            r => panic!("unexpected {r:?}"),
        }
        // Workload outside the mesh: plain TCP.
        assert!(matches!(
            snap.route(sa("10.0.0.2:9000"), 15008),
            Route::Passthrough { target, workload: Some(_), .. } if target == sa("10.0.0.2:9000")
        ));
        // Unknown address: plain TCP, untouched.
        assert!(matches!(
            snap.route(sa("192.0.2.1:443"), 15008),
            Route::Passthrough { target, workload: None, .. } if target == sa("192.0.2.1:443")
        ));
        // Service VIP: the healthy endpoint, mapped port, service SANs.
        for _ in 0..20 {
            match snap.route(sa("10.96.0.1:80"), 15008) {
                Route::Hbone {
                    gateway,
                    target,
                    identities,
                    service,
                    ..
                } => {
                    assert_eq!(gateway, sa("10.0.0.1:15008"));
                    assert_eq!(target, sa("10.0.0.1:8080"));
                    assert_eq!(identities.len(), 2);
                    assert!(service.is_some());
                }
                r => panic!("unexpected {r:?}"),
            }
        }
        // Port the service does not expose, and a service with no healthy endpoint.
        assert!(matches!(
            snap.route(sa("10.96.0.1:81"), 15008),
            Route::Unreachable(_)
        ));
        assert!(matches!(
            snap.route(sa("10.96.0.2:80"), 15008),
            Route::Unreachable(_)
        ));
    }
}

mod family_tests {
    use super::super::*;
    use crate::state::{Endpoint, Mesh, ServicePort};

    fn dual(uid: &str, addrs: &[&str]) -> Workload {
        Workload {
            addresses: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
            ..Workload::for_test(uid, "ns", None)
        }
    }

    /// ztunnel (state.rs, `pick_workload_destination_or_resolve`): the
    /// dialed address itself when the workload has it; else the first
    /// address of the dialed family among those the service's
    /// `ip_families` admits; else the first admitted, of either family.
    #[test]
    fn the_dialed_family_is_kept_where_the_workload_has_it() {
        use IpFamilies::*;
        let cases: &[(&[&str], &str, IpFamilies, Option<&str>)] = &[
            (
                &["10.1.0.2", "fd10::2"],
                "fd10::2",
                Automatic,
                Some("fd10::2"),
            ),
            (
                &["10.1.0.2", "fd10::2"],
                "10.1.0.2",
                Automatic,
                Some("10.1.0.2"),
            ),
            // A VIP: the family of the VIP.
            (
                &["10.1.0.2", "fd10::2"],
                "fd96::1",
                Automatic,
                Some("fd10::2"),
            ),
            (
                &["fd10::2", "10.1.0.2"],
                "10.96.0.1",
                Automatic,
                Some("10.1.0.2"),
            ),
            // No address of that family: the other one.
            (&["10.1.0.2"], "fd96::1", Automatic, Some("10.1.0.2")),
            (&["fd10::2"], "10.96.0.1", Automatic, Some("fd10::2")),
            // The service's families restrict the choice.
            (
                &["10.1.0.2", "fd10::2"],
                "fd96::1",
                V4Only,
                Some("10.1.0.2"),
            ),
            (
                &["10.1.0.2", "fd10::2"],
                "10.96.0.1",
                V6Only,
                Some("fd10::2"),
            ),
            (&["10.1.0.2"], "fd96::1", V6Only, None),
            (&[], "10.96.0.1", Automatic, None),
            // The dialed address of the workload wins over the families.
            (
                &["10.1.0.2", "fd10::2"],
                "10.1.0.2",
                V6Only,
                Some("10.1.0.2"),
            ),
        ];
        for (addrs, dialed, families, want) in cases {
            let w = dual("w", addrs);
            let got = pick_address(&w, dialed.parse().expect("ip"), *families);
            let want = want.map(|a| a.parse::<IpAddr>().expect("ip"));
            assert_eq!(got, want, "{addrs:?} dialed {dialed} {families:?}");
        }
    }

    #[test]
    fn a_dual_stack_service_is_reached_in_the_family_dialed() {
        let snap = Snapshot::new(Mesh {
            workloads: vec![dual("a", &["10.1.0.2", "fd10::2"])],
            services: vec![Service {
                load_balancing: None,
                name: "svc".into(),
                namespace: "ns".into(),
                hostname: "svc.ns.svc.cluster.local".into(),
                vips: vec!["10.96.0.1".parse().unwrap(), "fd96::1".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                }],
                endpoints: vec![Endpoint {
                    workload_uid: "a".into(),
                }],
                subject_alt_names: vec![],
                visibility: Default::default(),
                ip_families: IpFamilies::Dual,
                waypoint: None,
            }],
            ..Mesh::default()
        });
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (dialed, gateway, target) in [
            ("[fd96::1]:80", "[fd10::2]:15008", "[fd10::2]:8080"),
            ("10.96.0.1:80", "10.1.0.2:15008", "10.1.0.2:8080"),
            ("[fd10::2]:9000", "[fd10::2]:15008", "[fd10::2]:9000"),
        ] {
            match snap.route(sa(dialed), 15008) {
                Route::Hbone {
                    gateway: g,
                    target: t,
                    ..
                } => assert_eq!((g, t), (sa(gateway), sa(target)), "{dialed}"),
                r => panic!("{dialed}: unexpected {r:?}"),
            }
        }
    }
}

mod waypoint_tests {
    use super::super::*;
    use crate::state::{ApplicationTunnel, Endpoint, Mesh, ServicePort};

    fn wl(uid: &str, ip: &str, waypoint: Option<GatewayAddress>) -> Workload {
        let application_tunnel = if uid.starts_with("wp") {
            ApplicationTunnel::Proxy { port: None }
        } else {
            ApplicationTunnel::None
        };
        Workload {
            application_tunnel,
            waypoint: waypoint.map(Box::new),
            ..Workload::for_test(uid, "ns", Some(ip))
        }
    }

    fn svc(name: &str, vip: &str, endpoints: &[&str], waypoint: Option<GatewayAddress>) -> Service {
        Service {
            load_balancing: None,
            name: name.into(),
            namespace: "ns".into(),
            hostname: format!("{name}.ns").into(),
            vips: vec![vip.parse().unwrap()],
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
            waypoint: waypoint.map(Box::new),
        }
    }

    /// `web` (service with a waypoint service `wp`), `db` (workload with a
    /// waypoint at an address), `plain`, and the waypoints themselves.
    fn snapshot() -> Snapshot {
        let by_service = GatewayAddress {
            target: GatewayTarget::Service {
                namespace: "ns".into(),
                hostname: "wp.ns".into(),
            },
            hbone_port: 15008,
        };
        let by_address = GatewayAddress {
            target: GatewayTarget::Address("10.0.9.2".parse().unwrap()),
            hbone_port: 15008,
        };
        Snapshot::new(Mesh {
            workloads: vec![
                wl("client", "10.0.0.1", None),
                wl("web", "10.0.0.2", None),
                wl("db", "10.0.0.3", Some(by_address)),
                wl("plain", "10.0.0.4", None),
                wl("wp1", "10.0.9.1", None),
                wl("wp2", "10.0.9.2", None),
            ],
            services: vec![
                svc("web", "10.96.0.1", &["web"], Some(by_service)),
                svc("wp", "10.96.0.9", &["wp1"], None),
            ],
            ..Mesh::default()
        })
    }

    /// A workload that expects a tunnel this agent cannot speak (Istio's
    /// sidecar mTLS, or a protocol newer than it) is never sent plaintext.
    #[test]
    fn an_unsupported_tunnel_protocol_is_unreachable_not_plaintext() {
        let legacy = Workload {
            protocol: TunnelProtocol::Unsupported(2),
            ..Workload::for_test("legacy", "ns", Some("10.0.7.1"))
        };
        let snap = Snapshot::new(Mesh {
            workloads: vec![legacy],
            ..Mesh::default()
        });
        let route = snap.route("10.0.7.1:80".parse().unwrap(), 15008);
        assert!(
            matches!(route, Route::Unreachable(ref why) if why.contains("tunnel protocol 2")),
            "{route:?}"
        );
    }

    #[test]
    fn waypoint_routes() {
        let snap = snapshot();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let w = |uid: &str| snap.workload_by_uid(uid).unwrap().clone();
        // (source, destination, expected gateway, expected :authority, expected identity)
        let cases = [
            (
                "client",
                "10.96.0.1:80",
                "10.0.9.1:15008",
                "10.96.0.1:80",
                "wp1",
            ),
            (
                "client",
                "10.0.0.3:5432",
                "10.0.9.2:15008",
                "10.0.0.3:5432",
                "wp2",
            ),
            (
                "client",
                "10.0.0.4:80",
                "10.0.0.4:15008",
                "10.0.0.4:80",
                "plain",
            ),
            // The waypoint itself goes straight to the endpoint: no loop.
            (
                "wp1",
                "10.96.0.1:80",
                "10.0.0.2:15008",
                "10.0.0.2:8080",
                "web",
            ),
            (
                "wp2",
                "10.0.0.3:5432",
                "10.0.0.3:15008",
                "10.0.0.3:5432",
                "db",
            ),
        ];
        for (src, dst, gw, authority, peer) in cases {
            let src_w = w(src);
            match snap.route_from(Some(&src_w), sa(dst), 15008) {
                Route::Hbone {
                    gateway,
                    target,
                    identities,
                    ..
                } => {
                    assert_eq!(gateway, sa(gw), "{src} -> {dst}");
                    assert_eq!(target, sa(authority), "{src} -> {dst}");
                    assert_eq!(identities, vec![w(peer).identity()], "{src} -> {dst}");
                }
                r => panic!("{src} -> {dst}: {r:?}"),
            }
        }
    }

    #[test]
    fn only_the_waypoint_may_reach_what_is_behind_it() {
        let snap = snapshot();
        let w = |uid: &str| snap.workload_by_uid(uid).unwrap().clone();
        assert_eq!(
            snap.waypoint_identities(&w("web")),
            vec![w("wp1").identity()]
        );
        assert_eq!(
            snap.waypoint_identities(&w("db")),
            vec![w("wp2").identity()]
        );
        assert!(snap.waypoint_identities(&w("plain")).is_empty());
        assert!(snap.is_waypoint(
            &w("wp1"),
            snap.service_by_vip("10.96.0.1".parse().unwrap())
                .unwrap()
                .waypoint
                .as_ref()
                .unwrap()
        ));
    }

    /// A service waypoint made of two waypoint workloads of capacity 3
    /// and 1: tunnels spread 3:1 between them.
    #[test]
    fn waypoint_workloads_are_chosen_by_capacity() {
        let wp = |uid: &str, ip: &str, capacity: u32| Workload {
            capacity,
            ..Workload::for_test(uid, "ns", Some(ip))
        };
        let by_service = GatewayAddress {
            target: GatewayTarget::Service {
                namespace: "ns".into(),
                hostname: "wp.ns".into(),
            },
            hbone_port: 15008,
        };
        let snap = Snapshot::new(Mesh {
            workloads: vec![
                wp("big", "10.0.9.1", 3),
                wp("small", "10.0.9.2", 1),
                Workload::for_test("app", "ns", Some("10.0.0.1")),
            ],
            services: vec![
                svc("wp", "10.96.0.9", &["big", "small"], None),
                svc("app", "10.96.0.1", &["app"], Some(by_service)),
            ],
            ..Mesh::default()
        });
        let dst: SocketAddr = "10.96.0.1:80".parse().expect("dst");
        let small = (0..4000)
            .filter(|_| match snap.route(dst, 15008) {
                Route::Hbone { workload, .. } => workload.uid == "small",
                r => panic!("unexpected {r:?}"),
            })
            .count();
        // 1,000 expected; the standard deviation is about 27.
        assert!(
            (850..=1150).contains(&small),
            "{small} of 4000 to capacity 1"
        );
    }
}

mod network_tests {
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
}

mod hostname_tests {
    use super::super::*;
    use crate::state::{Endpoint, Mesh, ServicePort};

    /// ztunnel's `load_balance` counts a hostname as an address, and
    /// `pick_workload_destination_or_resolve` resolves it on demand, an
    /// address of the dialed family preferred, at random among them.
    #[test]
    fn a_workload_known_by_name_is_looked_up() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let mut ext = Workload::for_test("ext", "ns", None);
        ext.hostname = Some("ext.example".into());
        ext.protocol = TunnelProtocol::None;
        let nameless = Workload::for_test("nameless", "ns", None);
        let service = |ep: &str, vip: &str| Service {
            name: ep.into(),
            namespace: "ns".into(),
            hostname: format!("{ep}.ns.svc.cluster.local").as_str().into(),
            vips: vec![vip.parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec![Endpoint {
                workload_uid: ep.into(),
            }],
            subject_alt_names: vec![],
            visibility: Default::default(),
            ip_families: Default::default(),
            waypoint: None,
            load_balancing: None,
        };
        let snap = Snapshot::new(Mesh {
            workloads: vec![ext, nameless],
            services: vec![
                service("ext", "10.96.0.5"),
                service("nameless", "10.96.0.6"),
            ],
            ..Mesh::default()
        });
        match snap.route(sa("10.96.0.5:80"), 15008) {
            Route::Lookup {
                hostname,
                port,
                dialed,
                workload,
                service,
            } => {
                assert_eq!(hostname.as_str(), "ext.example");
                assert_eq!(port, 8080, "the service's target port");
                assert_eq!(dialed, sa("10.96.0.5:80").ip());
                assert_eq!(&*workload.uid, "ext");
                assert!(service.is_some());
                // Once found, as to that address: plain TCP for NONE.
                let to = Route::to_address(workload, sa("192.0.2.1:8080"), service, 15008);
                assert!(
                    matches!(to, Route::Passthrough { target, .. } if target == sa("192.0.2.1:8080")),
                    "{to:?}"
                );
            }
            other => panic!("not a lookup: {other:?}"),
        }
        // Neither an address nor a name: no endpoint at all.
        assert!(matches!(
            snap.route(sa("10.96.0.6:80"), 15008),
            Route::Unreachable(_)
        ));
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(pick_found(&[v4, v6], "10.0.0.1".parse().unwrap()), Some(v4));
        assert_eq!(pick_found(&[v4], "fd00::1".parse().unwrap()), Some(v4));
        assert_eq!(pick_found(&[], v4), None);
        let seen: std::collections::HashSet<IpAddr> = (0..100)
            .filter_map(|_| pick_found(&[v4, v6, v6b], "fd00::1".parse().unwrap()))
            .collect();
        assert_eq!(seen, [v6, v6b].into_iter().collect());
    }
}
