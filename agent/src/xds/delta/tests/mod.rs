//! Tests of the Delta xDS client: decoding (`convert`), the resource set
//! (`resources`), and the client's ACK/NACK and connection handling
//! (`client`), with the helpers they share.

use std::net::IpAddr;

use ambient_proto::discovery::Resource;
use ambient_proto::prost_types::Any;
use ambient_proto::{security as pb_sec, workload as pb};

use super::convert::{decode, Decoded};
use super::resources::Resources;
use super::*;
use crate::state::{
    GatewayAddress, GatewayTarget, Mesh, PolicyAction, PolicyScope, ServicePort, StringMatch,
    TunnelProtocol,
};
use crate::xds::local::parse_mesh;

mod applying;
mod client;
mod decoding;
mod incremental;
mod memory;
mod networks;
mod routes;

const MESH: &str = r#"
workloads:
  - uid: c1
    name: client
    namespace: test
    serviceAccount: client
    addresses: [10.0.1.1, "fd00::1"]
    node: node-a
    netns: /var/run/netns/c1
    cgroup: /sys/fs/cgroup/pods/c1
  - uid: s1
    name: server
    namespace: test
    serviceAccount: server
    trustDomain: example.org
    addresses: [10.0.2.1]
    node: node-b
    healthy: false
    waypoint: {address: 10.0.9.9, hbonePort: 15009}
  - uid: s2
    name: server
    namespace: test
    addresses: [10.0.2.2]
    node: node-b
    protocol: NONE
  - uid: wp
    name: waypoint
    namespace: test
    addresses: [10.0.9.9]
    node: node-b
    applicationTunnel: PROXY
    applicationTunnelPort: 15088
    capacity: 2
    waypoint: {service: test/other.test.svc.cluster.local}
services:
  - name: server
    namespace: test
    vips: [10.96.0.1, "fd00::96"]
    ports: [{port: 80, targetPort: 8080}, {port: 443}]
    endpoints: [s2, s1]
    subjectAltNames: ["spiffe://cluster.local/ns/test/sa/alt"]
    waypoint: {address: 10.0.9.9}
  - name: empty
    namespace: other
    hostname: empty.example.com
    vips: [10.96.0.2]
policies:
  - name: deny-all-but
    namespace: test
    scope: GLOBAL
    action: DENY
    rules:
      - clauses:
          - matches:
              - notPrincipals: ["cluster.local/ns/test/sa/client", "*/sa/admin", "cluster.local/*", "*"]
                namespaces: [test]
                notNamespaces: [kube-system]
                sourceIps: [10.0.0.0/16, 10.0.1.1]
                notSourceIps: ["fd00::/64"]
                destinationIps: [10.0.2.1/32]
                notDestinationIps: [10.0.3.0/24]
                destinationPorts: [8080]
                notDestinationPorts: [22]
              - principals: ["cluster.local/ns/test/sa/server"]
          - matches: []
  - name: selected
    namespace: test
    scope: WORKLOAD_SELECTOR
    selector: [s2, s1]
    rules: []
  - name: ns
    namespace: test
"#;

fn mesh() -> Mesh {
    parse_mesh("test", MESH).expect("test mesh is valid")
}

fn resource(name: &str, any: Any) -> Resource {
    Resource {
        name: name.into(),
        version: "v1".into(),
        resource: Some(any),
        ..Default::default()
    }
}

fn response(type_url: &str, resources: Vec<Resource>, removed: &[&str]) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: "n1".into(),
        resources,
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Every resource of `enc`, as the two responses a server would send.
fn responses(enc: &EncodedMesh) -> Vec<DeltaDiscoveryResponse> {
    TYPE_URLS
        .iter()
        .map(|t| {
            let rs = enc.of_type(t).into_iter().map(|(n, a)| resource(&n, a));
            response(t, rs.collect(), &[])
        })
        .collect()
}

/// Applies `resps`, each of which must be accepted whole.
fn apply_all(res: &mut Resources, resps: &[DeltaDiscoveryResponse]) -> Mesh {
    for r in resps {
        let applied = res.apply(r.clone()).expect("a subscribed type");
        assert_eq!(applied.rejected, [], "nothing refused");
    }
    res.build()
}

fn workload_any(f: impl FnOnce(&mut pb::Workload)) -> Any {
    let mut w = pb::Workload {
        uid: "w".into(),
        name: "w".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        tunnel_protocol: pb::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    f(&mut w);
    Any::from_msg(&pb::Address {
        r#type: Some(pb::address::Type::Workload(w)),
    })
    .unwrap()
}

fn service_any(f: impl FnOnce(&mut pb::Service)) -> Any {
    let mut s = pb::Service {
        name: "svc".into(),
        namespace: "ns".into(),
        hostname: "svc.ns.svc.cluster.local".into(),
        addresses: vec![pb::NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            ..Default::default()
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        ..Default::default()
    };
    f(&mut s);
    Any::from_msg(&pb::Address {
        r#type: Some(pb::address::Type::Service(s)),
    })
    .unwrap()
}

fn policy_any(f: impl FnOnce(&mut pb_sec::Authorization)) -> Any {
    let mut a = pb_sec::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        rules: vec![pb_sec::Rule {
            clauses: vec![pb_sec::Clause {
                matches: vec![pb_sec::Match::default()],
            }],
        }],
        ..Default::default()
    };
    f(&mut a);
    Any::from_msg(&a).unwrap()
}

fn one_match(f: impl FnOnce(&mut pb_sec::Match)) -> impl FnOnce(&mut pb_sec::Authorization) {
    move |a| f(&mut a.rules[0].clauses[0].matches[0])
}

const SVC: &str = "ns/svc.ns.svc.cluster.local";
