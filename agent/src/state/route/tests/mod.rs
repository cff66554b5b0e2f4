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

mod network_tests;

mod hostname_tests;
