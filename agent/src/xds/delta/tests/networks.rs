//! Networks, network gateways and load balancing: decoded from istiod's
//! fields (`Workload.network` 4, `network_gateway` 19, `locality` 24,
//! `cluster_id` 18; `Service.load_balancing` 8 with `routing_preference`
//! 1, `mode` 2, `health_policy` 3; `Scope` REGION 1 .. NETWORK 6, `Mode`
//! STRICT 1, FAILOVER 2, PASSTHROUGH 3, `HealthPolicy` ALLOW_ALL 1, all
//! from workload.proto), and the same from the mesh file through the
//! control plane's encoding.

use super::*;
use crate::state::{
    GatewayTarget, HealthPolicy, LbMode, LbScope, LoadBalancing, Service, Workload,
};

fn decoded_workload(f: fn(&mut pb::Workload)) -> Workload {
    let mut res = Resources::default();
    let r = response(ADDRESS_TYPE_URL, vec![resource("w", workload_any(f))], &[]);
    apply_all(&mut res, &[r]).workloads[0].clone()
}

fn decoded_service(f: &dyn Fn(&mut pb::Service)) -> Service {
    match decode(
        ADDRESS_TYPE_URL,
        "ns/svc.ns.svc.cluster.local",
        &service_any(f),
        &mut crate::state::Interner::default(),
    ) {
        Ok((Decoded::Address(a), _)) => match *a {
            crate::xds::delta::convert::AddressResource::Service(s) => *s,
            other => panic!("not a service: {other:?}"),
        },
        other => panic!("refused: {other:?}"),
    }
}

#[test]
fn a_workloads_network_and_gateway_decode() {
    let w = decoded_workload(|w| {
        w.network = "west".into();
        w.network_gateway = Some(pb::GatewayAddress {
            destination: Some(pb::gateway_address::Destination::Address(
                pb::NetworkAddress {
                    network: "west".into(),
                    address: vec![192, 0, 2, 10],
                    ..Default::default()
                },
            )),
            hbone_mtls_port: 15008,
        });
    });
    assert_eq!(w.network_name(), "west");
    let gw = w.network_gateway().expect("gateway");
    assert_eq!(
        gw.target,
        GatewayTarget::Address("192.0.2.10".parse().unwrap())
    );
    assert_eq!(gw.hbone_port, 15008);
    // The default network, without a gateway, costs nothing.
    let plain = decoded_workload(|_| {});
    assert_eq!((plain.network_name(), plain.network.is_none()), ("", true));
}

#[test]
fn a_gateway_without_a_destination_is_refused() {
    let any = workload_any(|w| {
        w.network = "west".into();
        w.network_gateway = Some(pb::GatewayAddress {
            destination: None,
            hbone_mtls_port: 15008,
        });
    });
    let err = decode(ADDRESS_TYPE_URL, "w", &any, &mut Default::default()).expect_err("refused");
    assert!(err.to_string().contains("network_gateway"), "{err}");
}

/// Values newer than this agent take the meaning that reaches least far:
/// an unknown scope is never shared, an unknown mode is STRICT, an
/// unknown health policy only healthy.
#[test]
fn load_balancing_decodes_and_unknown_values_narrow() {
    let lb = |prefs: Vec<i32>, mode: i32, health: i32| {
        decoded_service(&|s| {
            s.load_balancing = Some(pb::LoadBalancing {
                routing_preference: prefs.clone(),
                mode,
                health_policy: health,
            })
        })
        .load_balancing
        .map(|b| *b)
    };
    let cases = [
        (
            (vec![6, 1, 2, 3, 4, 5], 2, 0),
            LoadBalancing {
                routing_preference: vec![
                    LbScope::Network,
                    LbScope::Region,
                    LbScope::Zone,
                    LbScope::Subzone,
                    LbScope::Node,
                    LbScope::Cluster,
                ],
                mode: LbMode::Failover,
                health_policy: HealthPolicy::OnlyHealthy,
            },
        ),
        (
            (vec![1], 1, 1),
            LoadBalancing {
                routing_preference: vec![LbScope::Region],
                mode: LbMode::Strict,
                health_policy: HealthPolicy::AllowAll,
            },
        ),
        (
            (vec![], 3, 0),
            LoadBalancing {
                mode: LbMode::Passthrough,
                ..LoadBalancing::default()
            },
        ),
        (
            (vec![0, 42], 9, 7),
            LoadBalancing {
                routing_preference: vec![LbScope::Unknown(0), LbScope::Unknown(42)],
                mode: LbMode::Strict,
                health_policy: HealthPolicy::OnlyHealthy,
            },
        ),
    ];
    for ((prefs, mode, health), want) in cases {
        assert_eq!(
            lb(prefs.clone(), mode, health),
            Some(want),
            "{prefs:?} {mode} {health}"
        );
    }
    assert_eq!(decoded_service(&|_| {}).load_balancing, None);
}

/// The mesh file's `network`, `networkGateway` and `loadBalancing` reach
/// an agent in Istio mode unchanged through the control plane's encoding.
#[test]
fn the_mesh_files_networks_round_trip_through_xds() {
    let m = parse_mesh(
        "test",
        r#"
workloads:
  - uid: east-1
    name: east-1
    namespace: test
    addresses: [10.1.0.1]
    node: a
    locality: us-east/us-east-1a/rack1
    clusterId: east
    network: east
    networkGateway: {address: 192.0.2.1, hbonePort: 15008}
  - uid: west-1
    name: west-1
    namespace: test
    addresses: [10.2.0.1]
    node: b
    network: west
    networkGateway: {service: istio-system/eastwest.istio-system.svc.cluster.local}
services:
  - name: svc
    namespace: test
    vips: [10.96.0.1]
    ports: [{port: 80, targetPort: 8080}]
    endpoints: [east-1, west-1]
    loadBalancing:
      routingPreference: [NETWORK, REGION, ZONE]
      mode: FAILOVER
      healthPolicy: ALLOW_ALL
"#,
    )
    .expect("valid mesh");
    let east = &m.workloads[0];
    assert_eq!(east.network_name(), "east");
    assert_eq!(
        east.network_gateway().map(|g| &g.target),
        Some(&GatewayTarget::Address("192.0.2.1".parse().unwrap()))
    );
    let lb = m.services[0].load_balancing.as_deref().expect("lb");
    assert_eq!(lb.mode, LbMode::Failover);
    assert_eq!(lb.health_policy, HealthPolicy::AllowAll);
    let enc = encode_mesh(&m).unwrap();
    let mut res = Resources::default();
    let back = apply_all(&mut res, &responses(&enc));
    assert_eq!(back, canonical(&m));
    let west = back
        .workloads
        .iter()
        .find(|w| &*w.uid == "west-1")
        .expect("west");
    assert_eq!(west.network_name(), "west");
    assert!(matches!(
        west.network_gateway().map(|g| &g.target),
        Some(GatewayTarget::Service { hostname, .. }) if &**hostname == "eastwest.istio-system.svc.cluster.local"
    ));
}

/// `Workload.hostname` (21): a workload known by DNS name (a ServiceEntry
/// with DNS resolution) decodes with no address; a value that is not a
/// DNS name is refused, naming the field.
#[test]
fn a_workloads_hostname_decodes_and_a_bad_one_is_refused() {
    let w = decoded_workload(|w| {
        w.addresses.clear();
        w.hostname = "API.Example.com".into();
    });
    assert!(w.addresses.is_empty());
    assert_eq!(
        w.hostname.as_ref().map(|h| h.as_str()),
        Some("api.example.com")
    );
    for bad in ["10.0.0.1", "a..b", "-a.example", "a b"] {
        let any = workload_any(|w| w.hostname = bad.into());
        let err =
            decode(ADDRESS_TYPE_URL, "w", &any, &mut Default::default()).expect_err("refused");
        assert!(err.to_string().contains("hostname"), "{bad}: {err}");
    }
}
