//! Workloads known by DNS name in route choice.

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
