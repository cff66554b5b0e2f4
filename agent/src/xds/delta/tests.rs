use std::net::IpAddr;

use ambient_proto::discovery::Resource;
use ambient_proto::prost_types::Any;
use ambient_proto::{security as pb_sec, workload as pb};

use super::convert::{decode, Decoded, Resources};
use super::*;
use crate::state::{
    Mesh, PolicyAction, PolicyScope, ServicePort, StringMatch, TunnelProtocol, Waypoint,
    WaypointTarget,
};
use crate::xds::local::parse_mesh;

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
        let applied = res.apply(r).expect("a subscribed type");
        assert_eq!(applied.rejected, [], "nothing refused");
    }
    res.build()
}

#[test]
fn mesh_round_trips_through_resources() {
    let m = mesh();
    let enc = encode_mesh(&m).unwrap();
    assert_eq!(
        enc.addresses.keys().collect::<Vec<_>>(),
        [
            "c1",
            "other/empty.example.com",
            "s1",
            "s2",
            "test/server.test.svc.cluster.local",
            "wp"
        ]
    );
    assert_eq!(
        enc.authorizations.keys().collect::<Vec<_>>(),
        ["test/deny-all-but", "test/ns", "test/selected"]
    );
    let mut res = Resources::default();
    let back = apply_all(&mut res, &responses(&enc));
    assert_eq!(back, canonical(&m));
    assert_eq!(res.len(), 9);
    assert_eq!(res.versions(ADDRESS_TYPE_URL).len(), 6);
    assert_eq!(res.versions(AUTHORIZATION_TYPE_URL)["test/ns"], "v1");
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
        }],
        ports: vec![pb::Port {
            service_port: 80,
            target_port: 8080,
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

#[test]
fn bad_resources_are_rejected_with_the_field_and_problem() {
    let w = ADDRESS_TYPE_URL;
    let a = AUTHORIZATION_TYPE_URL;
    let cases: Vec<(&str, &str, &str, Any, &str)> = vec![
        (
            "five-byte address",
            w,
            "w",
            workload_any(|w| w.addresses = vec![vec![1, 2, 3, 4, 5]]),
            "addresses[0]: an IP address must be 4 or 16 bytes, not 5",
        ),
        (
            "missing uid",
            w,
            "w",
            workload_any(|w| w.uid.clear()),
            "uid: must not be empty",
        ),
        (
            "name is not the uid",
            w,
            "x",
            workload_any(|_| {}),
            "resource name must be \"w\"",
        ),
        (
            "missing name",
            w,
            "w",
            workload_any(|w| w.name.clear()),
            "name: must not be empty",
        ),
        (
            "slash in namespace",
            w,
            "w",
            workload_any(|w| w.namespace = "a/b".into()),
            "namespace: must not contain '/'",
        ),
        (
            "slash in service account",
            w,
            "w",
            workload_any(|w| w.service_account = "a/b".into()),
            "service_account: must not contain '/'",
        ),
        (
            "unknown tunnel protocol",
            w,
            "w",
            workload_any(|w| w.tunnel_protocol = 7),
            "tunnel_protocol: unknown TunnelProtocol value 7",
        ),
        (
            "unknown status",
            w,
            "w",
            workload_any(|w| w.status = 9),
            "status: unknown WorkloadStatus value 9",
        ),
        (
            "unknown network mode",
            w,
            "w",
            workload_any(|w| w.network_mode = 4),
            "network_mode: unknown NetworkMode value 4",
        ),
        (
            "unknown app tunnel",
            w,
            "w",
            workload_any(|w| {
                w.application_tunnel = Some(pb::ApplicationTunnel {
                    protocol: 5,
                    port: 0,
                })
            }),
            "application_tunnel.protocol: unknown",
        ),
        (
            "app tunnel port out of range",
            w,
            "w",
            workload_any(|w| {
                w.application_tunnel = Some(pb::ApplicationTunnel {
                    protocol: pb::application_tunnel::Protocol::Proxy as i32,
                    port: 70000,
                })
            }),
            "application_tunnel.port",
        ),
        (
            "waypoint without destination",
            w,
            "w",
            workload_any(|w| {
                w.waypoint = Some(pb::GatewayAddress {
                    destination: None,
                    hbone_mtls_port: 15008,
                })
            }),
            "waypoint: waypoint has neither",
        ),
        (
            "waypoint port too big",
            w,
            "w",
            workload_any(|w| {
                w.waypoint = Some(pb::GatewayAddress {
                    destination: Some(pb::gateway_address::Destination::Address(
                        pb::NetworkAddress {
                            network: String::new(),
                            address: vec![1, 1, 1, 1],
                        },
                    )),
                    hbone_mtls_port: 70000,
                })
            }),
            "waypoint.hbone_mtls_port: port 70000",
        ),
        (
            "waypoint hostname without namespace",
            w,
            "w",
            workload_any(|w| {
                w.waypoint = Some(pb::GatewayAddress {
                    destination: Some(pb::gateway_address::Destination::Hostname(
                        pb::NamespacedHostname {
                            namespace: String::new(),
                            hostname: "h".into(),
                        },
                    )),
                    hbone_mtls_port: 0,
                })
            }),
            "waypoint.hostname: waypoint service \"/h\"",
        ),
        (
            "bad service key",
            w,
            "w",
            workload_any(|w| {
                w.services.insert("nohost".into(), pb::PortList::default());
            }),
            "services[\"nohost\"]: \"nohost\" is not of the form",
        ),
        (
            "service port zero",
            w,
            "w",
            workload_any(|w| {
                w.services.insert(
                    SVC.into(),
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 0,
                            target_port: 1,
                        }],
                    },
                );
            }),
            ".ports[0].service_port: port 0 is not in 1..=65535",
        ),
        (
            "empty Address",
            w,
            "w",
            Any::from_msg(&pb::Address { r#type: None }).unwrap(),
            "neither a workload nor a service",
        ),
        (
            "not an Address",
            w,
            "w",
            policy_any(|_| {}),
            "cannot decode",
        ),
        (
            "garbage bytes",
            w,
            "w",
            Any {
                type_url: ADDRESS_TYPE_URL.into(),
                value: vec![0xff, 0xff, 0xff],
            },
            "cannot decode",
        ),
        (
            "service name mismatch",
            w,
            "ns/other",
            service_any(|_| {}),
            "resource name must be \"ns/svc.ns.svc.cluster.local\"",
        ),
        (
            "service without hostname",
            w,
            "ns/",
            service_any(|s| s.hostname.clear()),
            "hostname: must not be empty",
        ),
        (
            "service vip of 3 bytes",
            w,
            SVC,
            service_any(|s| s.addresses[0].address = vec![1, 2, 3]),
            "addresses[0]: an IP address must be 4 or 16 bytes, not 3",
        ),
        (
            "duplicate service port",
            w,
            SVC,
            service_any(|s| {
                s.ports.push(pb::Port {
                    service_port: 80,
                    target_port: 9,
                })
            }),
            "ports[1].service_port: duplicate port 80 (first at ports[0])",
        ),
        (
            "target port too big",
            w,
            SVC,
            service_any(|s| s.ports[0].target_port = 65536),
            "ports[0].target_port: target port 65536",
        ),
        (
            "bad SAN",
            w,
            SVC,
            service_any(|s| s.subject_alt_names = vec!["cluster.local/ns/a/sa/b".into()]),
            "subject_alt_names[0]: identity",
        ),
        (
            "policy name mismatch",
            a,
            "ns/q",
            policy_any(|_| {}),
            "resource name must be \"ns/p\"",
        ),
        (
            "policy without namespace",
            a,
            "/p",
            policy_any(|p| p.namespace.clear()),
            "namespace: must not be empty",
        ),
        (
            "unknown scope",
            a,
            "ns/p",
            policy_any(|p| p.scope = 3),
            "scope: unknown Scope value 3",
        ),
        (
            "unknown action",
            a,
            "ns/p",
            policy_any(|p| p.action = 2),
            "action: unknown Action value 2",
        ),
        (
            "empty string match",
            a,
            "ns/p",
            policy_any(one_match(|m| {
                m.not_principals = vec![pb_sec::StringMatch { match_type: None }]
            })),
            "rules[0].clauses[0].matches[0].not_principals[0]: string match has no value",
        ),
        (
            "bad CIDR bytes",
            a,
            "ns/p",
            policy_any(one_match(|m| {
                m.source_ips = vec![pb_sec::Address {
                    address: vec![1],
                    length: 8,
                }]
            })),
            "matches[0].source_ips[0]: an IP address must be 4 or 16 bytes, not 1",
        ),
        (
            "prefix too long",
            a,
            "ns/p",
            policy_any(one_match(|m| {
                m.destination_ips = vec![pb_sec::Address {
                    address: vec![10, 0, 0, 0],
                    length: 33,
                }]
            })),
            "destination_ips[0]: prefix length 33 is too long for 10.0.0.0",
        ),
        (
            "port zero",
            a,
            "ns/p",
            policy_any(one_match(|m| m.destination_ports = vec![0])),
            "destination_ports[0]: port 0",
        ),
        (
            "port too big",
            a,
            "ns/p",
            policy_any(one_match(|m| m.not_destination_ports = vec![65536])),
            "not_destination_ports[0]: port 65536",
        ),
    ];
    for (what, type_url, name, any, want) in cases {
        let got = decode(type_url, name, &any);
        let err = match got {
            Err(e) => e.to_string(),
            Ok(d) => panic!("{what}: accepted as {d:?}"),
        };
        assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
    }
}

#[test]
fn good_resources_convert_with_istio_defaults() {
    let decode_workload = |any: Any| match decode(ADDRESS_TYPE_URL, "w", &any) {
        Ok(Decoded::Address(a)) => match *a {
            convert::AddressResource::Workload(w) => w,
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let w = decode_workload(workload_any(|_| {}));
    assert_eq!(w.workload.service_account, "default");
    assert_eq!(w.workload.trust_domain, "cluster.local");
    assert_eq!(w.workload.protocol, TunnelProtocol::Hbone);
    assert!(w.workload.healthy);
    assert_eq!(
        w.workload.addresses,
        ["10.0.0.1".parse::<IpAddr>().unwrap()]
    );

    type Check = Box<dyn Fn(&convert::WorkloadResource) -> bool>;
    let cases: Vec<(&str, Any, Check)> = vec![
        (
            "no address, no node (DNS workload, VM)",
            workload_any(|w| w.addresses.clear()),
            Box::new(|w| w.workload.addresses.is_empty() && w.workload.node.is_empty()),
        ),
        (
            "IPv6",
            workload_any(|w| w.addresses = vec![[0u8; 16].to_vec()]),
            Box::new(|w| w.workload.addresses == ["::".parse::<IpAddr>().unwrap()]),
        ),
        (
            "host network: known by uid only",
            workload_any(|w| w.network_mode = pb::NetworkMode::HostNetwork as i32),
            Box::new(|w| w.workload.addresses.is_empty()),
        ),
        (
            "unhealthy",
            workload_any(|w| w.status = pb::WorkloadStatus::Unhealthy as i32),
            Box::new(|w| !w.workload.healthy),
        ),
        (
            "waypoint port 0 means 15008",
            workload_any(|w| {
                w.waypoint = Some(pb::GatewayAddress {
                    destination: Some(pb::gateway_address::Destination::Hostname(
                        pb::NamespacedHostname {
                            namespace: "ns".into(),
                            hostname: "wp".into(),
                        },
                    )),
                    hbone_mtls_port: 0,
                })
            }),
            Box::new(|w| {
                w.workload.waypoint
                    == Some(Waypoint {
                        target: WaypointTarget::Service {
                            namespace: "ns".into(),
                            hostname: "wp".into(),
                        },
                        hbone_port: 15008,
                    })
            }),
        ),
        (
            "service ports",
            workload_any(|w| {
                w.services.insert(
                    SVC.into(),
                    pb::PortList {
                        ports: vec![pb::Port {
                            service_port: 80,
                            target_port: 0,
                        }],
                    },
                );
            }),
            Box::new(|w| {
                w.services[SVC]
                    == [ServicePort {
                        port: 80,
                        target_port: 0,
                    }]
            }),
        ),
    ];
    for (what, any, check) in cases {
        assert!(check(&decode_workload(any)), "{what}");
    }

    let Ok(Decoded::Policy(p)) = decode(
        AUTHORIZATION_TYPE_URL,
        "ns/p",
        &policy_any(|p| {
            p.action = pb_sec::Action::Deny as i32;
            p.rules[0].clauses[0].matches[0].principals = vec![pb_sec::StringMatch {
                match_type: Some(pb_sec::string_match::MatchType::Presence(())),
            }];
        }),
    ) else {
        panic!("policy rejected");
    };
    assert_eq!(p.action, PolicyAction::Deny);
    assert_eq!(p.scope, PolicyScope::Global);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].principals,
        [StringMatch::Presence]
    );
}

/// `tag` (field `number`, length-delimited) and `body`.
fn len_field(number: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ambient_proto::prost::encoding::encode_key(
        number,
        ambient_proto::prost::encoding::WireType::LengthDelimited,
        &mut out,
    );
    ambient_proto::prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// Field 20 = 1: a field no version of these messages declares.
const UNKNOWN_FIELD: [u8; 3] = [0xa0, 0x01, 0x01];

/// An Authorization `ns/p` with `action`, one rule of one clause of one
/// match `m`, and raw `extra` bytes appended at the match, clause and
/// policy levels.
fn raw_policy(action: pb_sec::Action, m: Vec<u8>, clause_extra: &[u8], policy_extra: &[u8]) -> Any {
    use ambient_proto::prost::Message;
    let top = pb_sec::Authorization {
        name: "p".into(),
        namespace: "ns".into(),
        action: action as i32,
        ..Default::default()
    };
    let clause = [len_field(2, &m), clause_extra.to_vec()].concat();
    let rule = len_field(1, &clause);
    let mut body = top.encode_to_vec();
    body.extend(len_field(5, &rule));
    body.extend_from_slice(policy_extra);
    Any {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        value: body,
    }
}

fn decode_policy(any: &Any) -> Result<crate::state::Policy, RejectReason> {
    match decode(AUTHORIZATION_TYPE_URL, "ns/p", any)? {
        Decoded::Policy(p) => Ok(p),
        other => panic!("not a policy: {other:?}"),
    }
}

// Fields of istio.security as ztunnel's proto/authorization.proto declares
// them: Authorization.dry_run = 6, extensions = 7 (istio.workload.Extension);
// Match.service_accounts = 11, not_service_accounts = 12 (ServiceAccountMatch
// {namespace = 1, serviceAccount = 2}), extensions = 13. istiod splits
// `serviceAccounts: [ns/name | name]` into namespace and name.
#[test]
fn policies_decode_dry_run_service_accounts_and_fail_closed_on_the_unknown() {
    use ambient_proto::prost::Message;
    use pb_sec::string_match::MatchType;
    let exact = |v: &str| pb_sec::StringMatch {
        match_type: Some(MatchType::Exact(v.into())),
    };
    let sa = |ns: &str, name: &str| pb_sec::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: name.into(),
    };
    let p = decode_policy(&policy_any(|p| {
        p.dry_run = true;
        let m = &mut p.rules[0].clauses[0].matches[0];
        m.service_accounts = vec![sa("prod", "client")];
        m.not_service_accounts = vec![sa("prod", "evil")];
    }))
    .unwrap();
    assert!(p.dry_run);
    let m = &p.rules[0].clauses[0].matches[0];
    let model = |ns: &str, name: &str| crate::state::ServiceAccountMatch {
        namespace: ns.into(),
        name: name.into(),
    };
    assert_eq!(m.service_accounts, [model("prod", "client")]);
    assert_eq!(m.not_service_accounts, [model("prod", "evil")]);
    assert!(p.unsupported.is_empty() && m.unsupported.is_empty());

    // Extensions are declared, but what they ask is not ours to know.
    let p = decode_policy(&policy_any(|p| {
        p.extensions = vec![pb::Extension {
            name: "vendor.policy".into(),
            config: None,
        }];
        p.rules[0].clauses[0].matches[0].extensions = vec![pb::Extension {
            name: "vendor.match".into(),
            config: None,
        }];
    }))
    .unwrap();
    assert_eq!(p.unsupported, ["extension \"vendor.policy\""]);
    assert_eq!(
        p.rules[0].clauses[0].matches[0].unsupported,
        ["extension \"vendor.match\""]
    );

    // Fields newer than our schema, at each level.
    let port80 = pb_sec::Match {
        destination_ports: vec![80],
        ..Default::default()
    };
    let m = [port80.encode_to_vec(), UNKNOWN_FIELD.to_vec()].concat();
    let p = decode_policy(&raw_policy(
        pb_sec::Action::Allow,
        m,
        &UNKNOWN_FIELD,
        &UNKNOWN_FIELD,
    ))
    .unwrap();
    assert_eq!(p.unsupported, ["unknown field 20"]);
    assert_eq!(p.rules[0].clauses[0].unsupported, ["unknown field 20"]);
    let m = &p.rules[0].clauses[0].matches[0];
    assert_eq!(
        (m.destination_ports.as_slice(), m.unsupported.as_slice()),
        (&[80][..], &["unknown field 20".to_string()][..])
    );

    // A value that cannot be read (a StringMatch kind newer than ours,
    // field 5): in a DENY it makes a positive field hold for anyone and
    // exempts no one from a `not_` field; in an ALLOW the match never holds.
    let newer = len_field(5, b"x");
    let values = |field: u32| {
        [
            len_field(field, &exact("a").encode_to_vec()),
            len_field(field, &newer),
        ]
        .concat()
    };
    let deny = decode_policy(&raw_policy(
        pb_sec::Action::Deny,
        [values(3), values(4)].concat(),
        &[],
        &[],
    ))
    .unwrap();
    let m = &deny.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals, [], "positive field holds for anyone");
    assert_eq!(m.not_principals, [StringMatch::Exact("a".into())]);
    assert_eq!(m.unsupported.len(), 2, "{:?}", m.unsupported);
    let allow = decode_policy(&raw_policy(pb_sec::Action::Allow, values(3), &[], &[])).unwrap();
    let m = &allow.rules[0].clauses[0].matches[0];
    assert_eq!(m.principals, [StringMatch::Exact("a".into())]);
    assert_eq!(m.unsupported, ["unknown field 5 in value 1 of field 3"]);

    // What the policy then decides, for a client the readable parts name.
    let dst = crate::state::Workload {
        namespace: "ns".into(),
        ..crate::state::Workload::for_test("dst", "ns", Some("10.0.0.2"))
    };
    let a = crate::identity::Identity::new("td", "ns", "a");
    let conn = crate::state::authz::Connection {
        src_ip: "10.0.0.1".parse().unwrap(),
        src_identity: Some(&a),
        dst: "10.0.0.2:80".parse().unwrap(),
    };
    let decide = |p: &crate::state::Policy| {
        crate::state::authz::authorize(std::slice::from_ref(p), &dst, &conn)
            .0
            .is_allowed()
    };
    assert!(
        !decide(&allow),
        "an ALLOW with an unreadable value admits no one"
    );
    let deny_principal =
        decode_policy(&raw_policy(pb_sec::Action::Deny, values(3), &[], &[])).unwrap();
    assert!(
        !decide(&deny_principal),
        "a DENY with an unreadable value still denies"
    );

    // What is plainly invalid is refused (and keeps its last good version).
    let bad = [
        (
            policy_any(one_match(|m| {
                m.service_accounts = vec![sa("prod/x", "client")]
            })),
            "service_accounts[0]",
        ),
        (
            policy_any(one_match(|m| m.not_service_accounts = vec![sa("prod", "")])),
            "not_service_accounts[0]",
        ),
        (
            policy_any(|p| p.action = 9),
            "action: unknown Action value 9",
        ),
    ];
    for (any, want) in bad {
        let err = decode_policy(&any).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// The names an [`Applied`] accepted and refused.
fn applied(changed: &[&str], rejected: &[&str]) -> (Vec<String>, Vec<String>) {
    (
        changed.iter().map(|s| s.to_string()).collect(),
        rejected.iter().map(|s| s.to_string()).collect(),
    )
}

impl PartialEq<(Vec<String>, Vec<String>)> for super::convert::Applied {
    fn eq(&self, (changed, rejected): &(Vec<String>, Vec<String>)) -> bool {
        self.changed.iter().eq(changed.iter())
            && self.rejected.iter().map(|r| &r.name).eq(rejected.iter())
    }
}

/// Workload `uid` at `address` (raw bytes, valid or not), as a resource.
fn workload_at(uid: &str, address: Vec<u8>) -> Resource {
    let uid_ = uid.to_string();
    resource(
        uid,
        workload_any(move |w| {
            w.uid = uid_;
            w.addresses = vec![address];
        }),
    )
}

// ztunnel applies a Delta xDS response resource by resource: the good ones
// and the removals take effect, each bad one is refused and named in the
// NACK, and keeps its last good version (istio/ztunnel src/xds/client.rs,
// `handle_single_resource`; src/state/policy.rs inserts only on success).
#[test]
fn a_bad_resource_is_refused_alone_and_keeps_its_last_good_version() {
    let mut res = Resources::default();
    let first = response(
        ADDRESS_TYPE_URL,
        vec![
            resource("w", workload_any(|_| {})),
            workload_at("bad", vec![10, 0, 0, 7]),
            workload_at("gone", vec![10, 0, 0, 8]),
        ],
        &[],
    );
    assert_eq!(
        res.apply(&first).unwrap(),
        applied(&["bad", "gone", "w"], &[])
    );
    let resp = response(
        ADDRESS_TYPE_URL,
        vec![
            workload_at("new", vec![10, 0, 0, 9]),
            workload_at("bad", vec![1]),
            resource("new", workload_any(|w| w.uid = "new".into())),
            Resource {
                name: "nobody".into(),
                ..Default::default()
            },
        ],
        &["gone"],
    );
    let got = res.apply(&resp).unwrap();
    assert_eq!(got, applied(&["new"], &["bad", "new", "nobody"]));
    assert_eq!(
        got.into_error().unwrap().to_string(),
        "rejected 3: bad: addresses[0]: an IP address must be 4 or 16 bytes, not 1; \
         new: sent twice in one response; nobody: resource has no body"
    );
    let mesh = res.build();
    let by_uid = |uid: &str| mesh.workloads.iter().find(|w| w.uid == uid).cloned();
    assert_eq!(
        by_uid("new").unwrap().addresses,
        ["10.0.0.9".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        by_uid("bad").unwrap().addresses,
        ["10.0.0.7".parse::<IpAddr>().unwrap()],
        "the refused resource keeps its last good version"
    );
    assert!(
        by_uid("gone").is_none(),
        "removals apply beside a bad resource"
    );
    assert!(by_uid("w").is_some());

    let unknown = response("type.googleapis.com/other", vec![], &[]);
    assert_eq!(
        res.apply(&unknown).unwrap_err(),
        ResponseError::UnknownType("type.googleapis.com/other".into())
    );
}

#[test]
fn duplicate_address_blames_the_newcomer_and_removal_frees_it() {
    let mut res = Resources::default();
    let first = response(
        ADDRESS_TYPE_URL,
        vec![resource("a", workload_any(|w| w.uid = "a".into()))],
        &[],
    );
    assert_eq!(res.apply(&first).unwrap(), applied(&["a"], &[]));

    // "b" (sorted after "a") takes a's address: b is named, a is kept.
    let clash = response(
        ADDRESS_TYPE_URL,
        vec![resource("b", workload_any(|w| w.uid = "b".into()))],
        &[],
    );
    let got = res.apply(&clash).unwrap();
    assert_eq!(
        got.into_error().unwrap().to_string(),
        "rejected 1: b: addresses[0]: address 10.0.0.1 is already used by workload \"a\""
    );
    assert_eq!(
        res.versions(ADDRESS_TYPE_URL)
            .into_keys()
            .collect::<Vec<_>>(),
        ["a"]
    );
    // So is a service VIP on a workload's address, whatever the names' order.
    let vip = response(
        ADDRESS_TYPE_URL,
        vec![resource(
            "0/svc",
            service_any(|s| {
                s.namespace = "0".into();
                s.hostname = "svc".into();
                s.addresses[0].address = vec![10, 0, 0, 1];
            }),
        )],
        &[],
    );
    assert!(res
        .apply(&vip)
        .unwrap()
        .into_error()
        .unwrap()
        .to_string()
        .starts_with("rejected 1: 0/svc: addresses[0]"));

    // A changed resource that clashes goes back to its last good version.
    let a2 = response(
        ADDRESS_TYPE_URL,
        vec![workload_at("c", vec![10, 0, 0, 3])],
        &[],
    );
    assert_eq!(res.apply(&a2).unwrap(), applied(&["c"], &[]));
    let onto_a = response(
        ADDRESS_TYPE_URL,
        vec![resource("c", workload_any(|w| w.uid = "c".into()))],
        &[],
    );
    assert_eq!(res.apply(&onto_a).unwrap(), applied(&[], &["c"]));
    let c = res
        .build()
        .workloads
        .into_iter()
        .find(|w| w.uid == "c")
        .unwrap();
    assert_eq!(c.addresses, ["10.0.0.3".parse::<IpAddr>().unwrap()]);

    // Removing a and adding b in one response is fine.
    let swap = response(
        ADDRESS_TYPE_URL,
        vec![resource("b", workload_any(|w| w.uid = "b".into()))],
        &["a", "never-held"],
    );
    assert_eq!(res.apply(&swap).unwrap(), applied(&["b"], &[]));
    let uids: Vec<_> = res.build().workloads.into_iter().map(|w| w.uid).collect();
    assert_eq!(uids, ["b", "c"]);
}

#[test]
fn endpoints_target_ports_and_selectors_come_from_the_workload_side() {
    let with_service = |uid: &str, ip: u8, target: u32| {
        let uid = uid.to_string();
        workload_any(move |w| {
            w.uid = uid;
            w.addresses = vec![vec![10, 0, 0, ip]];
            w.services.insert(
                SVC.into(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: target,
                    }],
                },
            );
            w.services
                .insert("ns/not-here".into(), pb::PortList::default());
            w.authorization_policies = vec!["ns/p".into(), "ns/not-here".into()];
        })
    };
    let named_target = service_any(|s| s.ports[0].target_port = 0);
    let mut res = Resources::default();
    let resps = [
        response(
            ADDRESS_TYPE_URL,
            vec![
                resource("w2", with_service("w2", 2, 9090)),
                resource("w1", with_service("w1", 1, 9090)),
                resource(SVC, named_target),
            ],
            &[],
        ),
        response(
            AUTHORIZATION_TYPE_URL,
            vec![resource(
                "ns/p",
                policy_any(|p| p.scope = pb_sec::Scope::WorkloadSelector as i32),
            )],
            &[],
        ),
    ];
    let mesh = apply_all(&mut res, &resps);
    let s = &mesh.services[0];
    let uids: Vec<_> = s
        .endpoints
        .iter()
        .map(|e| e.workload_uid.as_str())
        .collect();
    assert_eq!(uids, ["w1", "w2"]);
    assert_eq!(
        s.target_port(80),
        Some(9090),
        "endpoints agree on the named port"
    );
    assert_eq!(
        mesh.policies[0].scope,
        PolicyScope::WorkloadSelector {
            workload_uids: vec!["w1".into(), "w2".into()]
        }
    );

    // Endpoints that disagree leave the port as "same as the service port".
    let disagree = response(
        ADDRESS_TYPE_URL,
        vec![resource("w2", with_service("w2", 2, 9091))],
        &[],
    );
    assert_eq!(res.apply(&disagree).unwrap(), applied(&["w2"], &[]));
    assert_eq!(res.build().services[0].target_port(80), Some(80));
}

#[test]
fn encoding_refuses_what_was_not_understood() {
    let mut m = mesh();
    m.policies[0].rules[0].clauses[0].matches[0].unsupported = vec!["extension x".into()];
    assert!(
        matches!(encode_mesh(&m), Err(EncodeError::Unsupported(k)) if k == "test/deny-all-but")
    );
}

fn client() -> (XdsClient, Arc<State>) {
    let state = Arc::new(State::default());
    let cfg = XdsConfig {
        address: "http://127.0.0.1:1".into(),
        node_id: "ztunnel~10.0.0.1~zt.istio-system~istio-system.svc.cluster.local".into(),
        node_metadata: [("NAMESPACE".to_string(), "istio-system".to_string())].into(),
        ..Default::default()
    };
    (XdsClient::new(cfg, state.clone()), state)
}

#[test]
fn client_installs_after_both_types_then_acks_and_nacks_per_resource() {
    let (mut c, state) = client();
    let status = c.status();
    let m = mesh();
    let resps = responses(&encode_mesh(&m).unwrap());
    let mut changes = state.subscribe();

    let ack = c.handle(resps[0].clone());
    assert_eq!(ack.response_nonce, "n1");
    assert_eq!(ack.type_url, ADDRESS_TYPE_URL);
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    assert!(
        !changes.has_changed().unwrap(),
        "workloads wait for their policies"
    );
    assert!(!status.borrow().synced);

    c.handle(resps[1].clone());
    assert!(changes.has_changed().unwrap());
    changes.mark_unchanged();
    assert_eq!(*state.snapshot().mesh(), canonical(&m));
    assert!(status.borrow().synced);

    // The same again changes nothing: no new version.
    c.handle(resps[1].clone());
    assert!(!changes.has_changed().unwrap());

    let mut bad = response(
        ADDRESS_TYPE_URL,
        vec![resource("x", workload_any(|w| w.uid = "x".into()))],
        &["c1"],
    );
    bad.nonce = "n2".into();
    bad.resources.push(resource(
        "y",
        workload_any(|w| {
            w.uid = "y".into();
            w.tunnel_protocol = 3;
        }),
    ));
    let nack = c.handle(bad);
    assert_eq!(nack.response_nonce, "n2");
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3);
    assert!(
        detail
            .message
            .contains("y: tunnel_protocol: unknown TunnelProtocol value 3"),
        "{}",
        detail.message
    );
    assert!(
        !detail.message.contains("x:"),
        "only the bad resource is named: {}",
        detail.message
    );
    assert!(
        changes.has_changed().unwrap(),
        "the good part of a partly bad response is applied"
    );
    let held = c.resources.versions(ADDRESS_TYPE_URL);
    assert!(held.contains_key("x") && !held.contains_key("c1") && !held.contains_key("y"));
    let snap = state.snapshot();
    assert!(snap.workload_by_uid("x").is_some() && snap.workload_by_uid("c1").is_none());
    let s = status.borrow().clone();
    assert_eq!((s.acks, s.nacks, s.installs), (3, 1, 2));
    assert_eq!(s.last_nack.as_deref(), Some(detail.message.as_str()));
}

#[test]
fn initial_requests_carry_node_and_held_versions() {
    let (mut c, _state) = client();
    let req = c.initial_request(ADDRESS_TYPE_URL);
    let node = req.node.expect("node on the first requests");
    assert!(node.id.starts_with("ztunnel~"));
    let meta = node.metadata.unwrap();
    assert_eq!(
        meta.fields["NAMESPACE"].kind,
        Some(Kind::StringValue("istio-system".into()))
    );
    assert!(req.resource_names_subscribe.is_empty(), "wildcard");
    assert!(req.initial_resource_versions.is_empty());

    for r in responses(&encode_mesh(&mesh()).unwrap()) {
        c.handle(r);
    }
    let req = c.initial_request(AUTHORIZATION_TYPE_URL);
    assert_eq!(
        req.initial_resource_versions.keys().collect::<Vec<_>>(),
        ["test/deny-all-but", "test/ns", "test/selected"]
    );
    assert!(req.initial_resource_versions.values().all(|v| v == "v1"));
}

#[tokio::test]
async fn unreachable_control_plane_backs_off_and_shutdown_stops_it() {
    let (c, _state) = client();
    let mut c = c;
    c.cfg.reconnect_initial = Duration::from_millis(5);
    c.cfg.reconnect_max = Duration::from_millis(20);
    let mut status = c.status();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(c.run(async move {
        let _ = stopped.await;
    }));
    let failed = status.wait_for(|s| s.failures >= 3);
    tokio::time::timeout(Duration::from_secs(10), failed)
        .await
        .expect("retries")
        .expect("status");
    let s = status.borrow().clone();
    assert!(!s.connected);
    assert!(s
        .last_error
        .unwrap()
        .contains("connecting to http://127.0.0.1:1"));
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test]
async fn https_without_a_root_is_an_error_and_tokens_are_read_per_connect() {
    let (mut c, _state) = client();
    c.cfg.address = "https://istiod.istio-system.svc:15012".into();
    assert!(matches!(c.connect().await, Err(XdsError::NoRootCert)));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    c.cfg.token_path = Some(path.clone());
    assert!(matches!(c.token().await, Err(XdsError::Token { .. })));
    std::fs::write(&path, "tok1\n").unwrap();
    assert_eq!(c.token().await.unwrap().unwrap(), "Bearer tok1");
    std::fs::write(&path, "tok2").unwrap();
    assert_eq!(c.token().await.unwrap().unwrap(), "Bearer tok2");
    std::fs::write(&path, "bad\ntoken").unwrap();
    assert!(matches!(c.token().await, Err(XdsError::BadToken { .. })));
}
