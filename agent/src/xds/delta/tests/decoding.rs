//! Decoding and checking single resources.

use super::*;

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
                            ..Default::default()
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
                            ..Default::default()
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
                    ..Default::default()
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
        let got = decode_one(type_url, name, &any);
        let err = match got {
            Err(e) => e.to_string(),
            Ok(d) => panic!("{what}: accepted as {d:?}"),
        };
        assert!(err.contains(want), "{what}: {err:?} lacks {want:?}");
    }
}

#[test]
fn good_resources_convert_with_istio_defaults() {
    let decode_workload = |any: Any| match decode_one(ADDRESS_TYPE_URL, "w", &any) {
        Ok((Decoded::Address(a), _)) => match *a {
            crate::xds::delta::convert::AddressResource::Workload(w) => w,
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
        w.workload.addresses.as_slice(),
        ["10.0.0.1".parse::<IpAddr>().unwrap()]
    );

    type Check = Box<dyn Fn(&crate::xds::delta::convert::WorkloadResource) -> bool>;
    let cases: Vec<(&str, Any, Check)> = vec![
        (
            "no address, no node (DNS workload, VM)",
            workload_any(|w| w.addresses.clear()),
            Box::new(|w| w.workload.addresses.is_empty() && w.workload.node.is_empty()),
        ),
        (
            "IPv6",
            workload_any(|w| w.addresses = vec![[0u8; 16].to_vec()]),
            Box::new(|w| w.workload.addresses.as_slice() == ["::".parse::<IpAddr>().unwrap()]),
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
                w.workload.waypoint.as_deref()
                    == Some(&GatewayAddress {
                        target: GatewayTarget::Service {
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
                            ..Default::default()
                        }],
                    },
                );
            }),
            Box::new(|w| {
                *w.services[0].1
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

    let Ok((Decoded::Policy(p), _)) = decode_one(
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
    match decode_one(AUTHORIZATION_TYPE_URL, "ns/p", any)? {
        (Decoded::Policy(p), _) => Ok(p),
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
        request: None,
    };
    let decide = |p: &crate::state::Policy| {
        crate::state::authz::authorize(&[std::sync::Arc::new(p.clone())], &dst, &conn)
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
    ];
    for (any, want) in bad {
        let err = decode_policy(&any).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}

/// istiod is often newer than its proxies: an enum value this agent does
/// not know never refuses the resource; it takes the meaning that trusts
/// least. An unknown (or sidecar-only) tunnel protocol is not plaintext;
/// an unknown network mode does not let an address identify the workload;
/// an unknown status is not healthy; an unknown application tunnel cannot
/// be delivered; a policy of unknown scope applies everywhere and one of
/// unknown action denies.
#[test]
fn unknown_enum_values_take_the_meaning_that_trusts_least() {
    let w = |f: fn(&mut pb::Workload)| match decode_one(ADDRESS_TYPE_URL, "w", &workload_any(f)) {
        Ok((Decoded::Address(a), _)) => match *a {
            crate::xds::delta::convert::AddressResource::Workload(w) => w.workload,
            other => panic!("not a workload: {other:?}"),
        },
        other => panic!("refused: {other:?}"),
    };
    use crate::state::ApplicationTunnel;
    assert_eq!(
        w(|w| w.tunnel_protocol = 7).protocol,
        TunnelProtocol::Unsupported(7)
    );
    assert_eq!(
        w(|w| w.tunnel_protocol = 2).protocol,
        TunnelProtocol::Unsupported(2)
    );
    assert!(w(|w| w.network_mode = 4).addresses.is_empty());
    assert!(!w(|w| w.status = 9).healthy);
    let tunnel = w(|w| {
        w.application_tunnel = Some(pb::ApplicationTunnel {
            protocol: 5,
            port: 0,
        })
    });
    assert_eq!(tunnel.application_tunnel, ApplicationTunnel::Unsupported(5));

    let scope = decode_policy(&policy_any(|p| p.scope = 3)).unwrap();
    assert_eq!(scope.scope, PolicyScope::Global);
    assert_eq!(
        scope.unsupported,
        ["unknown scope 3 (applied to every workload)"]
    );
    let action = decode_policy(&policy_any(|p| p.action = 2)).unwrap();
    assert_eq!(action.action, PolicyAction::Deny);
    assert_eq!(action.unsupported, ["unknown action 2 (enforced as DENY)"]);
}

/// `Service.ip_families` (istio.workload.IPFamilies: AUTOMATIC 0,
/// IPV4_ONLY 1, IPV6_ONLY 2, DUAL 3) and `Service.visibility` (PUBLIC 0,
/// NAMESPACE 1) as the DNS proxy uses them; values newer than this agent
/// take the meaning that narrows nothing for families, the narrowest
/// visibility.
#[test]
fn service_families_and_visibility_decode() {
    use crate::state::{IpFamilies, Visibility};
    let s = |f: &dyn Fn(&mut pb::Service)| match decode_one(
        ADDRESS_TYPE_URL,
        "ns/svc.ns.svc.cluster.local",
        &service_any(f),
    ) {
        Ok((Decoded::Address(a), _)) => match *a {
            crate::xds::delta::convert::AddressResource::Service(s) => *s,
            other => panic!("not a service: {other:?}"),
        },
        other => panic!("refused: {other:?}"),
    };
    let families = [
        (0, IpFamilies::Automatic),
        (1, IpFamilies::V4Only),
        (2, IpFamilies::V6Only),
        (3, IpFamilies::Dual),
        (9, IpFamilies::Automatic),
    ];
    for (value, want) in families {
        assert_eq!(s(&|s| s.ip_families = value).ip_families, want, "{value}");
    }
    let visibility = [
        (0, Visibility::Public),
        (1, Visibility::Namespace),
        (7, Visibility::Namespace),
    ];
    for (value, want) in visibility {
        assert_eq!(s(&|s| s.visibility = value).visibility, want, "{value}");
    }
}

/// [`decode`] with an interner of its own.
fn decode_one(
    type_url: &str,
    name: &str,
    any: &Any,
) -> Result<(Decoded, super::super::ignored::Ignored), RejectReason> {
    decode(type_url, name, any, &mut crate::state::Interner::default())
}

/// The telemetry fields ztunnel copies verbatim from a Workload
/// (`workload_name` 13, `canonical_name` 10, `canonical_revision` 11,
/// `cluster_id` 18, `locality` 24 in `workload.proto`), with an empty
/// `cluster_id` read as `Kubernetes` (ztunnel `src/state/workload.rs`).
#[test]
fn telemetry_names_are_decoded_as_ztunnel_reads_them() {
    let decode = |f: fn(&mut pb::Workload)| {
        let mut res = Resources::default();
        let r = response(ADDRESS_TYPE_URL, vec![resource("w", workload_any(f))], &[]);
        apply_all(&mut res, &[r]).workloads[0].telemetry.clone()
    };
    let t = decode(|w| {
        w.workload_name = "reviews-v1".into();
        w.canonical_name = "reviews".into();
        w.canonical_revision = "v1".into();
        w.cluster_id = "east".into();
        w.locality = Some(pb::Locality {
            region: "us-east".into(),
            zone: "us-east-1b".into(),
            subzone: "rack-2".into(),
        });
    });
    assert_eq!(
        (
            t.workload_name.as_str(),
            t.canonical_name.as_str(),
            t.canonical_revision.as_str(),
            t.cluster.as_str(),
        ),
        ("reviews-v1", "reviews", "v1", "east")
    );
    assert_eq!(
        (t.region.as_str(), t.zone.as_str(), t.subzone.as_str()),
        ("us-east", "us-east-1b", "rack-2")
    );
    let bare = decode(|_| {});
    assert_eq!(bare.cluster.as_str(), "Kubernetes");
    assert!(bare.workload_name.is_empty() && bare.canonical_name.is_empty());
    assert!(bare.region.is_empty() && bare.zone.is_empty());
}
