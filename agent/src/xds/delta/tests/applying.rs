//! Applying responses to the resource set and joining it into a mesh.

use super::*;

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

/// The names an [`Applied`] accepted and refused.
fn applied(changed: &[&str], rejected: &[&str]) -> (Vec<String>, Vec<String>) {
    (
        changed.iter().map(|s| s.to_string()).collect(),
        rejected.iter().map(|s| s.to_string()).collect(),
    )
}

impl PartialEq<(Vec<String>, Vec<String>)> for crate::xds::delta::resources::Applied {
    fn eq(&self, (changed, rejected): &(Vec<String>, Vec<String>)) -> bool {
        self.accepted == changed.len() && self.rejected.iter().map(|r| &r.name).eq(rejected.iter())
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
        res.apply(first.clone()).unwrap(),
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
    let got = res.apply(resp.clone()).unwrap();
    assert_eq!(got, applied(&["new"], &["bad", "new", "nobody"]));
    assert_eq!(
        got.into_error().unwrap().to_string(),
        "rejected 3: bad: addresses[0]: an IP address must be 4 or 16 bytes, not 1; \
         new: sent twice in one response; nobody: resource has no body"
    );
    let mesh = res.build();
    let by_uid = |uid: &str| mesh.workloads.iter().find(|w| w.uid == uid).cloned();
    assert_eq!(
        by_uid("new").unwrap().addresses.as_slice(),
        ["10.0.0.9".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        by_uid("bad").unwrap().addresses.as_slice(),
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
        res.apply(unknown.clone()).unwrap_err(),
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
    assert_eq!(res.apply(first.clone()).unwrap(), applied(&["a"], &[]));

    // "b" (sorted after "a") takes a's address: b is named, a is kept.
    let clash = response(
        ADDRESS_TYPE_URL,
        vec![resource("b", workload_any(|w| w.uid = "b".into()))],
        &[],
    );
    let got = res.apply(clash.clone()).unwrap();
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
        .apply(vip.clone())
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
    assert_eq!(res.apply(a2.clone()).unwrap(), applied(&["c"], &[]));
    let onto_a = response(
        ADDRESS_TYPE_URL,
        vec![resource("c", workload_any(|w| w.uid = "c".into()))],
        &[],
    );
    assert_eq!(res.apply(onto_a.clone()).unwrap(), applied(&[], &["c"]));
    let c = res
        .build()
        .workloads
        .into_iter()
        .find(|w| w.uid == "c")
        .unwrap();
    assert_eq!(
        c.addresses.as_slice(),
        ["10.0.0.3".parse::<IpAddr>().unwrap()]
    );

    // Removing a and adding b in one response is fine.
    let swap = response(
        ADDRESS_TYPE_URL,
        vec![resource("b", workload_any(|w| w.uid = "b".into()))],
        &["a", "never-held"],
    );
    assert_eq!(res.apply(swap.clone()).unwrap(), applied(&["b"], &[]));
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
                        ..Default::default()
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
    assert_eq!(res.apply(disagree.clone()).unwrap(), applied(&["w2"], &[]));
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

/// istiod's translation for ztunnel (pilot/pkg/serviceregistry/ambient/
/// authorization.go, `handleRule`): an ALLOW rule with HTTP attributes is
/// omitted; a DENY is sent with its HTTP attributes omitted, and a match
/// left with no condition is skipped by ztunnel.
#[test]
fn request_conditions_are_encoded_as_istiod_does_for_ztunnel() {
    use crate::state::{Clause, Match, PolicyAction, RequestMatch, Rule, StringMatch};
    let l7 = || {
        Some(Box::new(RequestMatch {
            paths: vec![StringMatch::Prefix("/admin".into())],
            ..Default::default()
        }))
    };
    let rule = |matches: Vec<Match>| Rule {
        clauses: vec![Clause {
            matches,
            ..Default::default()
        }],
        ..Default::default()
    };
    let principal = || vec![StringMatch::Exact("cluster.local/ns/test/sa/client".into())];
    let mut m = mesh();
    m.policies[0].action = PolicyAction::Allow;
    m.policies[0].rules = vec![
        rule(vec![Match {
            principals: principal(),
            request: l7(),
            ..Default::default()
        }]),
        rule(vec![Match {
            namespaces: vec![StringMatch::Exact("test".into())],
            ..Default::default()
        }]),
    ];
    let key = m.policies[0].key();
    let enc = encode_mesh(&m).unwrap();
    let decode = |any: &ambient_proto::prost_types::Any| {
        any.to_msg::<ambient_proto::security::Authorization>()
            .expect("an Authorization")
    };
    let allow = decode(&enc.authorizations[&key]);
    assert_eq!(
        allow.rules.len(),
        1,
        "the ALLOW rule with HTTP conditions is gone"
    );
    assert_eq!(allow.rules[0].clauses[0].matches[0].namespaces.len(), 1);

    m.policies[0].action = PolicyAction::Deny;
    m.policies[0].rules = vec![rule(vec![
        Match {
            principals: principal(),
            request: l7(),
            ..Default::default()
        },
        Match {
            request: l7(),
            ..Default::default()
        },
    ])];
    let deny = decode(&encode_mesh(&m).unwrap().authorizations[&key]);
    let matches = &deny.rules[0].clauses[0].matches;
    assert_eq!(matches.len(), 2);
    assert_eq!(matches[0].principals.len(), 1, "L4 part kept");
    assert_eq!(
        matches[1],
        Default::default(),
        "nothing left: a no-op match"
    );
}
