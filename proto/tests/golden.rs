//! Wire-format checks against Istio's published schema.
//!
//! Each test builds a message, encodes it and compares with bytes written by
//! hand from the published field numbers (tag byte = field_number << 3 |
//! wire_type; wire type 0 = varint, 2 = length-delimited), then decodes the
//! golden bytes back and compares with the message.
//!
//! prost writes fields in field-number order (oneofs included), as Go's
//! protobuf does, so the golden bytes are in that order. Decoding must not
//! depend on order: `gateway_address_decodes_out_of_order` checks that.

use std::collections::BTreeMap;

use ambient_proto::prost::{Message, Name};
use ambient_proto::prost_types::{self, value::Kind};
use ambient_proto::{ca, core, discovery, rpc, security, workload, zds};
use ambient_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// Concatenates byte groups: arrays of literal bytes and byte strings.
macro_rules! golden {
    ($($part:expr),* $(,)?) => {{
        let mut v: Vec<u8> = Vec::new();
        $( v.extend_from_slice(AsRef::<[u8]>::as_ref(&$part)); )*
        v
    }};
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Encode `msg` and compare with `golden`, then decode `golden` and compare with `msg`.
fn check<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, golden: &[u8]) {
    let name = std::any::type_name::<M>();
    let enc = msg.encode_to_vec();
    assert_eq!(hex(&enc), hex(golden), "encoding of {name}");
    assert_eq!(msg.encoded_len(), golden.len(), "encoded_len of {name}");
    let dec = M::decode(golden).unwrap_or_else(|e| panic!("decoding golden {name}: {e}"));
    assert_eq!(&dec, msg, "decoding golden {name}");
}

/// google.protobuf.Struct {"k": "v"}.
fn struct_k_v() -> prost_types::Struct {
    prost_types::Struct {
        fields: BTreeMap::from([(
            "k".to_string(),
            prost_types::Value {
                kind: Some(Kind::StringValue("v".into())),
            },
        )]),
    }
}

/// Encoding of `struct_k_v()` (10 bytes).
fn struct_k_v_bytes() -> Vec<u8> {
    golden! {
        [0x0A, 0x08],             // Struct.fields (1, LEN 8): one map entry
        [0x0A, 0x01], b"k",       //   entry.key (1) = "k"
        [0x12, 0x03],             //   entry.value (2, LEN 3): Value
        [0x1A, 0x01], b"v",       //     Value.string_value (3) = "v"
    }
}

#[test]
fn workload_fields() {
    let w = workload::Workload {
        uid: "u1".into(),
        name: "p".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        network: "net".into(),
        tunnel_protocol: workload::TunnelProtocol::Hbone as i32,
        trust_domain: "td".into(),
        service_account: "sa".into(),
        waypoint: Some(workload::GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Address(
                workload::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 9],
                    ..Default::default()
                },
            )),
            hbone_mtls_port: 15008,
        }),
        node: "n1".into(),
        canonical_name: "c".into(),
        canonical_revision: "v1".into(),
        workload_type: workload::WorkloadType::Pod as i32,
        workload_name: "w".into(),
        native_tunnel: true,
        authorization_policies: vec!["ns/pol".into()],
        status: workload::WorkloadStatus::Unhealthy as i32,
        cluster_id: "c1".into(),
        services: BTreeMap::from([(
            "ns/h".to_string(),
            workload::PortList {
                ports: vec![workload::Port {
                    service_port: 80,
                    target_port: 8080,
                    ..Default::default()
                }],
            },
        )]),
        application_tunnel: Some(workload::ApplicationTunnel {
            protocol: workload::application_tunnel::Protocol::Proxy as i32,
            port: 0,
        }),
        locality: Some(workload::Locality {
            region: "r".into(),
            zone: "z".into(),
            subzone: String::new(),
        }),
        network_mode: workload::NetworkMode::HostNetwork as i32,
        capacity: Some(3),
        ..Default::default()
    };
    let golden = golden! {
        [0x0A, 0x01], b"p",                   // name (1) = "p"
        [0x12, 0x02], b"ns",                  // namespace (2) = "ns"
        [0x1A, 0x04, 10, 0, 0, 1],            // addresses (3) = [10.0.0.1] as 4 raw bytes
        [0x22, 0x03], b"net",                 // network (4) = "net"
        [0x28, 0x01],                         // tunnel_protocol (5, varint) = HBONE (1)
        [0x32, 0x02], b"td",                  // trust_domain (6) = "td"
        [0x3A, 0x02], b"sa",                  // service_account (7) = "sa"
        [0x42, 0x0B],                         // waypoint (8, LEN 11): GatewayAddress
        [0x12, 0x06],                         //   oneof destination: address (2, LEN 6)
        [0x12, 0x04, 10, 0, 0, 9],            //     NetworkAddress.address (2) = 10.0.0.9
        [0x18, 0xA0, 0x75],                   //   hbone_mtls_port (3) = 15008
        [0x4A, 0x02], b"n1",                  // node (9) = "n1"
        [0x52, 0x01], b"c",                   // canonical_name (10) = "c"
        [0x5A, 0x02], b"v1",                  // canonical_revision (11) = "v1"
        [0x60, 0x02],                         // workload_type (12, varint) = POD (2)
        [0x6A, 0x01], b"w",                   // workload_name (13) = "w"
        [0x70, 0x01],                         // native_tunnel (14) = true
        [0x82, 0x01, 0x06], b"ns/pol",        // authorization_policies (16) = ["ns/pol"]
        [0x88, 0x01, 0x01],                   // status (17, varint) = UNHEALTHY (1)
        [0x92, 0x01, 0x02], b"c1",            // cluster_id (18) = "c1"
        [0xA2, 0x01, 0x02], b"u1",            // uid (20) = "u1"
        [0xB2, 0x01, 0x0F],                   // services (22, LEN 15): one map entry
        [0x0A, 0x04], b"ns/h",                //   key (1) = "ns/h"
        [0x12, 0x07],                         //   value (2, LEN 7): PortList
        [0x0A, 0x05],                         //     ports (1, LEN 5): Port
        [0x08, 0x50],                         //       service_port (1) = 80
        [0x10, 0x90, 0x3F],                   //       target_port (2) = 8080
        [0xBA, 0x01, 0x02],                   // application_tunnel (23, LEN 2)
        [0x08, 0x01],                         //   protocol (1) = PROXY (1)
        [0xC2, 0x01, 0x06],                   // locality (24, LEN 6)
        [0x0A, 0x01], b"r",                   //   region (1) = "r"
        [0x12, 0x01], b"z",                   //   zone (2) = "z"
        [0xC8, 0x01, 0x01],                   // network_mode (25, varint) = HOST_NETWORK (1)
        [0xDA, 0x01, 0x02],                   // capacity (27, LEN 2): UInt32Value
        [0x08, 0x03],                         //   value (1) = 3
    };
    check(&w, &golden);
}

#[test]
fn workload_ignores_retired_and_unknown_fields() {
    // An older istiod may still send virtual_ips (15); a newer one may send
    // fields we do not declare (here 99). Both must be skipped.
    let golden = golden! {
        [0x0A, 0x01], b"p",                   // name (1) = "p"
        [0x7A, 0x02, 0x0A, 0x00],             // field 15 (LEN 2): retired virtual_ips entry
        [0x98, 0x06, 0x07],                   // field 99 (varint) = 7: unknown
        [0xA2, 0x01, 0x01], b"u",             // uid (20) = "u"
    };
    let w = workload::Workload::decode(golden.as_slice()).unwrap();
    assert_eq!(
        w,
        workload::Workload {
            name: "p".into(),
            uid: "u".into(),
            ..Default::default()
        }
    );
}

#[test]
fn service_fields() {
    let s = workload::Service {
        name: "s".into(),
        namespace: "ns".into(),
        hostname: "s.ns".into(),
        addresses: vec![workload::NetworkAddress {
            network: "net".into(),
            address: vec![10, 96, 0, 1],
            ..Default::default()
        }],
        ports: vec![workload::Port {
            service_port: 80,
            target_port: 8080,
            ..Default::default()
        }],
        subject_alt_names: vec!["spiffe://td/ns/ns/sa/s".into()],
        waypoint: Some(workload::GatewayAddress {
            destination: Some(workload::gateway_address::Destination::Hostname(
                workload::NamespacedHostname {
                    namespace: "ns".into(),
                    hostname: "wp".into(),
                },
            )),
            hbone_mtls_port: 15008,
        }),
        load_balancing: Some(workload::LoadBalancing {
            routing_preference: vec![
                workload::load_balancing::Scope::Node as i32,
                workload::load_balancing::Scope::Zone as i32,
            ],
            mode: workload::load_balancing::Mode::Failover as i32,
            health_policy: workload::load_balancing::HealthPolicy::AllowAll as i32,
        }),
        ip_families: workload::IpFamilies::Dual as i32,
        extensions: vec![],
        canonical: true,
        ..Default::default()
    };
    let golden = golden! {
        [0x0A, 0x01], b"s",                   // name (1) = "s"
        [0x12, 0x02], b"ns",                  // namespace (2) = "ns"
        [0x1A, 0x04], b"s.ns",                // hostname (3) = "s.ns"
        [0x22, 0x0B],                         // addresses (4, LEN 11): NetworkAddress
        [0x0A, 0x03], b"net",                 //   network (1) = "net"
        [0x12, 0x04, 10, 96, 0, 1],           //   address (2) = 10.96.0.1
        [0x2A, 0x05],                         // ports (5, LEN 5): Port
        [0x08, 0x50],                         //   service_port (1) = 80
        [0x10, 0x90, 0x3F],                   //   target_port (2) = 8080
        [0x32, 0x16], b"spiffe://td/ns/ns/sa/s", // subject_alt_names (6), 22 bytes
        [0x3A, 0x0D],                         // waypoint (7, LEN 13): GatewayAddress
        [0x0A, 0x08],                         //   oneof destination: hostname (1, LEN 8)
        [0x0A, 0x02], b"ns",                  //     NamespacedHostname.namespace (1)
        [0x12, 0x02], b"wp",                  //     NamespacedHostname.hostname (2)
        [0x18, 0xA0, 0x75],                   //   hbone_mtls_port (3) = 15008
        [0x42, 0x08],                         // load_balancing (8, LEN 8)
        [0x0A, 0x02, 0x04, 0x02],             //   routing_preference (1, packed) = [NODE, ZONE]
        [0x10, 0x02],                         //   mode (2) = FAILOVER (2)
        [0x18, 0x01],                         //   health_policy (3) = ALLOW_ALL (1)
        [0x48, 0x03],                         // ip_families (9, varint) = DUAL (3)
        [0x58, 0x01],                         // canonical (11) = true
    };
    check(&s, &golden);
}

#[test]
fn gateway_address_decodes_out_of_order() {
    // Protobuf allows any field order on the wire; port (3) comes first here.
    let golden = golden! {
        [0x18, 0xA0, 0x75],                   // hbone_mtls_port (3) = 15008
        [0x12, 0x06],                         // address (2, LEN 6): NetworkAddress
        [0x12, 0x04, 10, 0, 0, 9],            //   address (2) = 10.0.0.9
    };
    let g = workload::GatewayAddress::decode(golden.as_slice()).unwrap();
    assert_eq!(g.hbone_mtls_port, 15008);
    assert_eq!(
        g.destination,
        Some(workload::gateway_address::Destination::Address(
            workload::NetworkAddress {
                network: String::new(),
                address: vec![10, 0, 0, 9],
                ..Default::default()
            }
        ))
    );
}

#[test]
fn address_oneof() {
    let w = workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: "u".into(),
            name: "p".into(),
            ..Default::default()
        })),
    };
    check(
        &w,
        &golden! {
            [0x0A, 0x07],                     // workload (1, LEN 7)
            [0x0A, 0x01], b"p",               //   name (1) = "p"
            [0xA2, 0x01, 0x01], b"u",         //   uid (20) = "u"
        },
    );

    let s = workload::Address {
        r#type: Some(workload::address::Type::Service(workload::Service {
            name: "s".into(),
            hostname: "h".into(),
            ..Default::default()
        })),
    };
    check(
        &s,
        &golden! {
            [0x12, 0x06],                     // service (2, LEN 6)
            [0x0A, 0x01], b"s",               //   name (1) = "s"
            [0x1A, 0x01], b"h",               //   hostname (3) = "h"
        },
    );

    // Wrapped the way istiod ships it: Any with the WDS type URL.
    assert_eq!(workload::Address::type_url(), ADDRESS_TYPE_URL);
    let any = prost_types::Any::from_msg(&s).unwrap();
    assert_eq!(any.type_url, ADDRESS_TYPE_URL);
    assert_eq!(any.value, s.encode_to_vec());
    assert_eq!(any.to_msg::<workload::Address>().unwrap(), s);
}

#[test]
fn authorization_fields() {
    use security::string_match::MatchType;
    let m = security::Match {
        namespaces: vec![security::StringMatch {
            match_type: Some(MatchType::Exact("x".into())),
        }],
        principals: vec![security::StringMatch {
            match_type: Some(MatchType::Suffix("/sa/a".into())),
        }],
        not_principals: vec![security::StringMatch {
            match_type: Some(MatchType::Presence(())),
        }],
        source_ips: vec![security::Address {
            address: vec![10, 0, 0, 0],
            length: 8,
        }],
        destination_ports: vec![80, 443],
        not_destination_ports: vec![22],
        service_accounts: vec![security::ServiceAccountMatch {
            namespace: "n".into(),
            service_account: "s".into(),
        }],
        not_service_accounts: vec![security::ServiceAccountMatch {
            namespace: "m".into(),
            service_account: "t".into(),
        }],
        extensions: vec![workload::Extension {
            name: "e".into(),
            config: None,
        }],
        ..Default::default()
    };
    let a = security::Authorization {
        name: "a".into(),
        namespace: "ns".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause { matches: vec![m] }],
        }],
        dry_run: true,
        extensions: vec![workload::Extension {
            name: "f".into(),
            config: None,
        }],
    };
    let golden = golden! {
        [0x0A, 0x01], b"a",                   // name (1) = "a"
        [0x12, 0x02], b"ns",                  // namespace (2) = "ns"
        [0x18, 0x01],                         // scope (3) = NAMESPACE (1)
        [0x20, 0x01],                         // action (4) = DENY (1)
        [0x2A, 0x3D],                         // rules (5, LEN 61): Rule
        [0x0A, 0x3B],                         //   clauses (1, LEN 59): Clause
        [0x12, 0x39],                         //     matches (2, LEN 57): Match
        [0x0A, 0x03],                         //       namespaces (1, LEN 3): StringMatch
        [0x0A, 0x01], b"x",                   //         exact (1) = "x"
        [0x1A, 0x07],                         //       principals (3, LEN 7): StringMatch
        [0x1A, 0x05], b"/sa/a",               //         suffix (3) = "/sa/a"
        [0x22, 0x02],                         //       not_principals (4, LEN 2): StringMatch
        [0x22, 0x00],                         //         presence (4) = Empty
        [0x2A, 0x08],                         //       source_ips (5, LEN 8): Address
        [0x0A, 0x04, 10, 0, 0, 0],            //         address (1) = 10.0.0.0
        [0x10, 0x08],                         //         length (2) = 8
        [0x4A, 0x03, 0x50, 0xBB, 0x03],       //       destination_ports (9, packed) = [80, 443]
        [0x52, 0x01, 0x16],                   //       not_destination_ports (10, packed) = [22]
        [0x5A, 0x06],                         //       service_accounts (11, LEN 6): ServiceAccountMatch
        [0x0A, 0x01], b"n",                   //         namespace (1) = "n"
        [0x12, 0x01], b"s",                   //         serviceAccount (2) = "s"
        [0x62, 0x06],                         //       not_service_accounts (12, LEN 6)
        [0x0A, 0x01], b"m",                   //         namespace (1) = "m"
        [0x12, 0x01], b"t",                   //         serviceAccount (2) = "t"
        [0x6A, 0x03],                         //       extensions (13, LEN 3): istio.workload.Extension
        [0x0A, 0x01], b"e",                   //         name (1) = "e"
        [0x30, 0x01],                         // dry_run (6) = true
        [0x3A, 0x03],                         // extensions (7, LEN 3): istio.workload.Extension
        [0x0A, 0x01], b"f",                   //   name (1) = "f"
    };
    check(&a, &golden);

    // Prefix match uses number 2.
    check(
        &security::StringMatch {
            match_type: Some(MatchType::Prefix("p".into())),
        },
        &golden! {[0x12, 0x01], b"p"}, // prefix (2) = "p"
    );
    assert_eq!(security::Authorization::type_url(), AUTHORIZATION_TYPE_URL);
}

#[test]
fn certificate_request_and_response() {
    let req = ca::IstioCertificateRequest {
        csr: "CSR".into(),
        validity_duration: 86400,
        metadata: Some(struct_k_v()),
    };
    let golden = golden! {
        [0x0A, 0x03], b"CSR",                 // csr (1) = "CSR"
        [0x18, 0x80, 0xA3, 0x05],             // validity_duration (3, int64 varint) = 86400
        [0x22, 0x0A],                         // metadata (4, LEN 10): Struct
        struct_k_v_bytes(),
    };
    check(&req, &golden);

    let resp = ca::IstioCertificateResponse {
        cert_chain: vec!["L".into(), "R".into()],
    };
    let golden = golden! {
        [0x0A, 0x01], b"L",                   // cert_chain (1)[0] = "L" (leaf)
        [0x0A, 0x01], b"R",                   // cert_chain (1)[1] = "R" (root)
    };
    check(&resp, &golden);
}

#[test]
fn delta_discovery_request() {
    let req = discovery::DeltaDiscoveryRequest {
        node: Some(core::Node {
            id: "n".into(),
            cluster: "c".into(),
            metadata: Some(struct_k_v()),
            locality: None,
            user_agent_name: "a".into(),
            client_features: vec!["f".into()],
            user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentVersion(
                "1".into(),
            )),
            ..Default::default()
        }),
        type_url: ADDRESS_TYPE_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        resource_names_unsubscribe: vec!["old".into()],
        initial_resource_versions: BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]),
        response_nonce: "n1".into(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "bad".into(),
            details: vec![prost_types::Any {
                type_url: "t".into(),
                value: vec![1],
            }],
        }),
        ..Default::default()
    };
    let golden = golden! {
        [0x0A, 0x1B],                         // node (1, LEN 27): Node
        [0x0A, 0x01], b"n",                   //   id (1) = "n"
        [0x12, 0x01], b"c",                   //   cluster (2) = "c"
        [0x1A, 0x0A],                         //   metadata (3, LEN 10): Struct
        struct_k_v_bytes(),
        [0x32, 0x01], b"a",                   //   user_agent_name (6) = "a"
        [0x3A, 0x01], b"1",                   //   oneof user_agent_version (7) = "1"
        [0x52, 0x01], b"f",                   //   client_features (10) = ["f"]
        [0x12, 0x2A], ADDRESS_TYPE_URL,       // type_url (2), 42 bytes
        [0x1A, 0x01], b"*",                   // resource_names_subscribe (3) = ["*"]
        [0x22, 0x03], b"old",                 // resource_names_unsubscribe (4) = ["old"]
        [0x2A, 0x06],                         // initial_resource_versions (5): entry, LEN 6
        [0x0A, 0x01], b"a",                   //   key (1) = "a"
        [0x12, 0x01], b"1",                   //   value (2) = "1"
        [0x2A, 0x06],                         // initial_resource_versions (5): entry, LEN 6
        [0x0A, 0x01], b"b",                   //   key (1) = "b"
        [0x12, 0x01], b"2",                   //   value (2) = "2"
        [0x32, 0x02], b"n1",                  // response_nonce (6) = "n1"
        [0x3A, 0x0F],                         // error_detail (7, LEN 15): google.rpc.Status
        [0x08, 0x03],                         //   code (1) = 3
        [0x12, 0x03], b"bad",                 //   message (2) = "bad"
        [0x1A, 0x06],                         //   details (3, LEN 6): Any
        [0x0A, 0x01], b"t",                   //     type_url (1) = "t"
        [0x12, 0x01, 0x01],                   //     value (2) = [0x01]
    };
    check(&req, &golden);

    // A plain ACK: type_url and response_nonce only.
    let ack = discovery::DeltaDiscoveryRequest {
        type_url: AUTHORIZATION_TYPE_URL.into(),
        response_nonce: "x".into(),
        ..Default::default()
    };
    check(
        &ack,
        &golden! {
            [0x12, 0x30], AUTHORIZATION_TYPE_URL, // type_url (2), 48 bytes
            [0x32, 0x01], b"x",                   // response_nonce (6) = "x"
        },
    );
}

#[test]
fn delta_discovery_response() {
    let addr = workload::Address {
        r#type: Some(workload::address::Type::Workload(workload::Workload {
            uid: "u".into(),
            ..Default::default()
        })),
    };
    let resp = discovery::DeltaDiscoveryResponse {
        system_version_info: "v".into(),
        resources: vec![discovery::Resource {
            version: "1".into(),
            resource: Some(prost_types::Any::from_msg(&addr).unwrap()),
            name: "u".into(),
            aliases: vec![],
            ttl: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            cache_control: None,
            ..Default::default()
        }],
        type_url: ADDRESS_TYPE_URL.into(),
        nonce: "n1".into(),
        removed_resources: vec!["gone".into()],
        control_plane: Some(core::ControlPlane {
            identifier: "istiod".into(),
        }),
        ..Default::default()
    };
    let golden = golden! {
        [0x0A, 0x01], b"v",                   // system_version_info (1) = "v"
        [0x12, 0x40],                         // resources (2, LEN 64): Resource
        [0x0A, 0x01], b"1",                   //   version (1) = "1"
        [0x12, 0x34],                         //   resource (2, LEN 52): Any
        [0x0A, 0x2A], ADDRESS_TYPE_URL,       //     type_url (1), 42 bytes
        [0x12, 0x06],                         //     value (2, LEN 6): istio.workload.Address
        [0x0A, 0x04],                         //       workload (1, LEN 4)
        [0xA2, 0x01, 0x01], b"u",             //         uid (20) = "u"
        [0x1A, 0x01], b"u",                   //   name (3) = "u"
        [0x32, 0x02],                         //   ttl (6, LEN 2): Duration
        [0x08, 0x05],                         //     seconds (1) = 5
        [0x22, 0x2A], ADDRESS_TYPE_URL,       // type_url (4), 42 bytes
        [0x2A, 0x02], b"n1",                  // nonce (5) = "n1"
        [0x32, 0x04], b"gone",                // removed_resources (6) = ["gone"]
        [0x3A, 0x08],                         // control_plane (7, LEN 8): ControlPlane
        [0x0A, 0x06], b"istiod",              //   identifier (1) = "istiod"
    };
    check(&resp, &golden);
    let back = resp.resources[0]
        .resource
        .as_ref()
        .unwrap()
        .to_msg::<workload::Address>();
    assert_eq!(back.unwrap(), addr);
}

#[test]
fn zds_hello() {
    let hello = zds::ZdsHello {
        version: zds::Version::V1 as i32,
    };
    check(&hello, &[0x08, 0x01]); // version (1, varint) = V1 (1)
}

#[test]
fn zds_workload_requests() {
    use zds::workload_request::Payload;
    let add = zds::WorkloadRequest {
        payload: Some(Payload::Add(zds::AddWorkload {
            uid: "u1".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    };
    check(
        &add,
        &golden! {
            [0x0A, 0x11],                     // add (1, LEN 17): AddWorkload
            [0x0A, 0x02], b"u1",              //   uid (1) = "u1"
            [0x12, 0x0B],                     //   workload_info (2, LEN 11)
            [0x0A, 0x01], b"p",               //     name (1) = "p"
            [0x12, 0x02], b"ns",              //     namespace (2) = "ns"
            [0x1A, 0x02], b"sa",              //     service_account (3) = "sa"
        },
    );

    let keep = zds::WorkloadRequest {
        payload: Some(Payload::Keep(zds::KeepWorkload { uid: "u1".into() })),
    };
    check(
        &keep,
        &golden! {
            [0x2A, 0x04],                     // keep (5, LEN 4): KeepWorkload
            [0x0A, 0x02], b"u1",              //   uid (1) = "u1"
        },
    );

    let del = zds::WorkloadRequest {
        payload: Some(Payload::Del(zds::DelWorkload { uid: "u1".into() })),
    };
    check(
        &del,
        &golden! {
            [0x12, 0x04],                     // del (2, LEN 4): DelWorkload
            [0x12, 0x02], b"u1",              //   uid (2!) = "u1"
        },
    );

    let snap = zds::WorkloadRequest {
        payload: Some(Payload::SnapshotSent(zds::SnapshotSent {})),
    };
    check(&snap, &[0x1A, 0x00]); // snapshot_sent (3, LEN 0)
}

#[test]
fn zds_workload_response_ack() {
    use zds::workload_response::Payload;
    let ok = zds::WorkloadResponse {
        payload: Some(Payload::Ack(zds::Ack {
            error: String::new(),
        })),
    };
    check(&ok, &[0x0A, 0x00]); // ack (1, LEN 0): empty Ack = success

    let err = zds::WorkloadResponse {
        payload: Some(Payload::Ack(zds::Ack {
            error: "bad".into(),
        })),
    };
    check(
        &err,
        &golden! {
            [0x0A, 0x05],                     // ack (1, LEN 5): Ack
            [0x0A, 0x03], b"bad",             //   error (1) = "bad"
        },
    );
}

/// Fields istiod added later: `NetworkAddress.length` (3, proto3
/// `optional`: a prefix length of 0 is still sent), `Port.app_protocol`
/// (3), `Service.ingress_use_waypoint` (12), `weighted_waypoints` (13),
/// `visibility` (14); `WeightedWaypoint.weight` (2).
#[test]
fn newer_workload_api_fields() {
    let s = workload::Service {
        addresses: vec![workload::NetworkAddress {
            address: vec![10, 0, 0, 0],
            length: Some(0),
            ..Default::default()
        }],
        ports: vec![workload::Port {
            service_port: 80,
            app_protocol: workload::AppProtocol::Grpc as i32,
            ..Default::default()
        }],
        ingress_use_waypoint: true,
        weighted_waypoints: vec![workload::WeightedWaypoint {
            destination: None,
            weight: 3,
        }],
        visibility: workload::service::Visibility::Namespace as i32,
        ..Default::default()
    };
    let golden = golden! {
        [0x22, 0x08],                         // addresses (4, LEN 8): NetworkAddress
        [0x12, 0x04, 10, 0, 0, 0],            //   address (2) = 10.0.0.0
        [0x18, 0x00],                         //   length (3, optional) = 0, present
        [0x2A, 0x04],                         // ports (5, LEN 4): Port
        [0x08, 0x50],                         //   service_port (1) = 80
        [0x18, 0x03],                         //   app_protocol (3) = GRPC (3)
        [0x60, 0x01],                         // ingress_use_waypoint (12) = true
        [0x6A, 0x02],                         // weighted_waypoints (13, LEN 2)
        [0x10, 0x03],                         //   weight (2) = 3
        [0x70, 0x01],                         // visibility (14) = NAMESPACE (1)
    };
    check(&s, &golden);
}

#[test]
fn enum_values() {
    assert_eq!(workload::TunnelProtocol::Hbone as i32, 1);
    assert_eq!(workload::WorkloadType::Job as i32, 3);
    assert_eq!(workload::IpFamilies::Ipv6Only as i32, 2);
    assert_eq!(workload::load_balancing::Scope::Network as i32, 6);
    assert_eq!(workload::load_balancing::Mode::Passthrough as i32, 3);
    assert_eq!(workload::TunnelProtocol::LegacyIstioMtls as i32, 2);
    assert_eq!(workload::AppProtocol::Grpc as i32, 3);
    assert_eq!(workload::service::Visibility::Namespace as i32, 1);
    assert_eq!(security::Scope::WorkloadSelector as i32, 2);
    assert_eq!(security::Action::Deny as i32, 1);
    assert_eq!(zds::Version::V1 as i32, 1);
}

#[test]
fn grpc_service_names() {
    assert_eq!(
        ca::istio_certificate_service_server::SERVICE_NAME,
        "istio.v1.auth.IstioCertificateService"
    );
    assert_eq!(
        discovery::aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
}
