//! L4 authorization with Istio's semantics (DESIGN §6).
//!
//! Policies apply to a destination workload by scope (global, its
//! namespace, or a selector naming it). Any matching DENY denies; when no
//! ALLOW policy applies, the connection is allowed; otherwise a matching
//! ALLOW is needed. A policy matches when any rule does; a rule when all its
//! clauses do; a clause when any of its matches does; a match when every
//! field it sets holds (a field holds when any value matches; a `not_`
//! field when none does). As in ztunnel, a policy with no rules matches
//! nothing, a rule with no clauses and a clause with no matches match
//! everything, and a match that sets no field matches nothing. Dry-run
//! policies are evaluated and reported but never decide.
//!
//! What a source could not fully understand (see `unsupported` in the
//! model) counts against an ALLOW and for a DENY: it may never widen the
//! one nor drop the other. Conditions on the HTTP request (`request`)
//! are evaluated where there is one (a waypoint); without one they count
//! as not understood.

mod request;

pub use request::Request;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use super::model::{
    Match, Policy, PolicyAction, PolicyScope, ServiceAccountMatch, StringMatch, Workload,
};
use crate::identity::Identity;

/// What is known about a connection when it is authorized.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// The client's address (the original client, not its agent).
    pub src_ip: IpAddr,
    /// The client's proven identity; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// Where the client connects to.
    pub dst: SocketAddr,
    /// The HTTP request, at a waypoint.
    pub request: Option<Request<'a>>,
}

/// The outcome for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, with the reason (which policy, or that no ALLOW matched).
    Deny(String),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// Whether `policy` applies to connections to `workload`.
pub fn applies_to(policy: &Policy, workload: &Workload) -> bool {
    match &policy.scope {
        PolicyScope::Global => true,
        PolicyScope::Namespace => policy.namespace == workload.namespace,
        // The source resolved the selector; istiod lists root-namespace
        // policies on workloads of every namespace.
        PolicyScope::WorkloadSelector { workload_uids } => workload_uids.contains(&workload.uid),
    }
}

/// Decides `conn` to `dst` under `policies`. Dry-run matches are returned
/// separately, for logging.
pub fn authorize<'p>(
    policies: &'p [Arc<Policy>],
    dst: &Workload,
    conn: &Connection<'_>,
) -> (Decision, Vec<&'p Policy>) {
    let mut dry_run_hits = Vec::new();
    let mut allow_applies = false;
    let mut allowed = false;
    let subject = Subject::of(conn);
    for p in policies.iter().map(|p| &**p).filter(|p| applies_to(p, dst)) {
        let hit = policy_matches(p, &subject);
        if p.dry_run {
            if hit {
                dry_run_hits.push(p);
            }
            continue;
        }
        match p.action {
            PolicyAction::Deny if hit => {
                return (
                    Decision::Deny(format!("denied by policy {}", p.key())),
                    dry_run_hits,
                );
            }
            PolicyAction::Deny => {}
            PolicyAction::Allow => {
                allow_applies = true;
                allowed |= hit;
            }
        }
    }
    let decision = if !allow_applies || allowed {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    };
    (decision, dry_run_hits)
}

/// A connection with what matches compare against worked out once, not
/// per match.
struct Subject<'a> {
    conn: &'a Connection<'a>,
    /// Istio writes principals without the scheme: td/ns/<ns>/sa/<sa>.
    principal: Option<&'a str>,
}

impl<'a> Subject<'a> {
    fn of(conn: &'a Connection<'a>) -> Self {
        let principal = conn.src_identity.map(|i| i.principal());
        Subject { conn, principal }
    }
}

/// Whether `p` matches. What the agent cannot evaluate counts against an
/// ALLOW and for a DENY, so it can never widen the one nor drop the other.
fn policy_matches(p: &Policy, subject: &Subject<'_>) -> bool {
    let deny = p.action == PolicyAction::Deny;
    if !deny && !p.unsupported.is_empty() {
        return false;
    }
    // No rules: matches nothing (as ztunnel). No clauses: matches all.
    p.rules.iter().any(|rule| {
        if !rule.unsupported.is_empty() {
            return deny;
        }
        rule.clauses.iter().all(|clause| {
            if !clause.unsupported.is_empty() {
                return deny;
            }
            clause.matches.is_empty()
                || clause.matches.iter().any(|m| match_holds(m, subject, deny))
        })
    })
}

fn match_holds(m: &Match, subject: &Subject<'_>, deny: bool) -> bool {
    // Sets nothing: never holds (ztunnel skips such a match).
    if m.is_empty() {
        return false;
    }
    if !deny && !m.unsupported.is_empty() {
        return false;
    }
    let conn = subject.conn;
    let id = conn.src_identity;
    let principal = subject.principal;
    let ns = id.map(|i| i.namespace());
    let strings = |values: &[StringMatch], subject: Option<&str>| {
        subject.is_some_and(|s| values.iter().any(|v| v.matches(s)))
    };
    // Namespace and name; the trust domain is not compared (as ztunnel).
    let accounts = |values: &[ServiceAccountMatch]| {
        id.is_some_and(|i| {
            values
                .iter()
                .any(|v| v.namespace == i.namespace() && v.name == i.service_account())
        })
    };
    let nets = |values: &[ipnet::IpNet], ip: IpAddr| values.iter().any(|n| n.contains(&ip));
    let port = conn.dst.port();
    positive(&m.namespaces, |v| strings(v, ns))
        && negative(&m.not_namespaces, |v| strings(v, ns))
        && positive(&m.service_accounts, accounts)
        && negative(&m.not_service_accounts, accounts)
        && positive(&m.principals, |v| strings(v, principal))
        && negative(&m.not_principals, |v| strings(v, principal))
        && positive(&m.source_ips, |v| nets(v, conn.src_ip))
        && negative(&m.not_source_ips, |v| nets(v, conn.src_ip))
        && positive(&m.destination_ips, |v| nets(v, conn.dst.ip()))
        && negative(&m.not_destination_ips, |v| nets(v, conn.dst.ip()))
        && positive(&m.destination_ports, |v| v.contains(&port))
        && negative(&m.not_destination_ports, |v| v.contains(&port))
        && match (&m.request, &conn.request) {
            (None, _) => true,
            (Some(r), Some(req)) => r.holds(req),
            // Unknowable here: against an ALLOW, for a DENY.
            (Some(_), None) => deny,
        }
}

/// Whether any of `policies` that apply to `dst` has conditions on the
/// HTTP request (a waypoint then decides per request, not per tunnel).
pub fn has_request_conditions(policies: &[Arc<Policy>], dst: &Workload) -> bool {
    policies.iter().filter(|p| applies_to(p, dst)).any(|p| {
        p.rules
            .iter()
            .flat_map(|r| &r.clauses)
            .flat_map(|c| &c.matches)
            .any(|m| m.request.is_some())
    })
}

/// An unset field holds; a set one holds when `any` finds a match.
fn positive<T>(values: &[T], any: impl Fn(&[T]) -> bool) -> bool {
    values.is_empty() || any(values)
}

/// An unset `not_` field holds; a set one holds when nothing matches.
fn negative<T>(values: &[T], any: impl Fn(&[T]) -> bool) -> bool {
    values.is_empty() || !any(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::{Clause, Rule};

    fn workload(ns: &str, uid: &str) -> Workload {
        Workload {
            service_account: "server".into(),
            trust_domain: "cluster.local".into(),
            ..Workload::for_test(uid, ns, Some("10.0.0.2"))
        }
    }

    fn policy(name: &str, scope: PolicyScope, action: PolicyAction, m: Match) -> Policy {
        Policy {
            name: name.into(),
            namespace: "prod".into(),
            scope,
            action,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![m],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            dry_run: false,
            unsupported: vec![],
        }
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    fn sa(namespace: &str, name: &str) -> ServiceAccountMatch {
        ServiceAccountMatch {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn decisions() {
        let dst = workload("prod", "db");
        let client = Identity::new("cluster.local", "prod", "client");
        let other = Identity::new("cluster.local", "test", "other");
        let allow_client = policy(
            "allow-client",
            PolicyScope::Namespace,
            PolicyAction::Allow,
            Match {
                service_accounts: vec![sa("prod", "client")],
                ..Default::default()
            },
        );
        let deny_test_ns = policy(
            "deny-test",
            PolicyScope::Global,
            PolicyAction::Deny,
            Match {
                namespaces: vec![exact("test")],
                ..Default::default()
            },
        );
        let strict = policy(
            "strict",
            PolicyScope::Namespace,
            PolicyAction::Deny,
            Match {
                not_principals: vec![StringMatch::Presence],
                ..Default::default()
            },
        );
        let deny_port = policy(
            "deny-9000",
            PolicyScope::WorkloadSelector {
                workload_uids: vec!["db".into()],
            },
            PolicyAction::Deny,
            Match {
                destination_ports: vec![9000],
                ..Default::default()
            },
        );
        let deny_net = policy(
            "deny-net",
            PolicyScope::Namespace,
            PolicyAction::Deny,
            Match {
                source_ips: vec!["10.9.0.0/16".parse().unwrap()],
                not_source_ips: vec!["10.9.9.9/32".parse().unwrap()],
                ..Default::default()
            },
        );
        let mut dry = deny_test_ns.clone();
        dry.name = "dry".into();
        dry.dry_run = true;
        let conn = |id: Option<&'static Identity>, ip: &str, port: u16| Connection {
            src_ip: ip.parse().unwrap(),
            src_identity: id,
            dst: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
            request: None,
        };
        let client: &'static Identity = Box::leak(Box::new(client));
        let other: &'static Identity = Box::leak(Box::new(other));
        let cases: Vec<(&str, Vec<Policy>, Connection<'_>, bool)> = vec![
            ("no policy allows", vec![], conn(None, "10.1.0.1", 80), true),
            (
                "allow by sa",
                vec![allow_client.clone()],
                conn(Some(client), "10.1.0.1", 80),
                true,
            ),
            (
                "allow needed",
                vec![allow_client.clone()],
                conn(Some(other), "10.1.0.1", 80),
                false,
            ),
            (
                "plaintext not allowed by sa",
                vec![allow_client.clone()],
                conn(None, "10.1.0.1", 80),
                false,
            ),
            (
                "deny by namespace",
                vec![deny_test_ns.clone()],
                conn(Some(other), "10.1.0.1", 80),
                false,
            ),
            (
                "deny other ns only",
                vec![deny_test_ns.clone()],
                conn(Some(client), "10.1.0.1", 80),
                true,
            ),
            (
                "deny before allow",
                vec![allow_client.clone(), deny_port.clone()],
                conn(Some(client), "10.1.0.1", 9000),
                false,
            ),
            (
                "deny port other port",
                vec![deny_port.clone()],
                conn(Some(client), "10.1.0.1", 80),
                true,
            ),
            (
                "strict denies plaintext",
                vec![strict.clone()],
                conn(None, "10.1.0.1", 80),
                false,
            ),
            (
                "strict allows mtls",
                vec![strict.clone()],
                conn(Some(client), "10.1.0.1", 80),
                true,
            ),
            (
                "cidr deny",
                vec![deny_net.clone()],
                conn(Some(client), "10.9.1.1", 80),
                false,
            ),
            (
                "not_ cidr exempts",
                vec![deny_net.clone()],
                conn(Some(client), "10.9.9.9", 80),
                true,
            ),
            (
                "dry run never decides",
                vec![dry.clone()],
                conn(Some(other), "10.1.0.1", 80),
                true,
            ),
        ];
        for (name, policies, c, want) in cases {
            let policies: Vec<Arc<Policy>> = policies.into_iter().map(Arc::new).collect();
            let (d, _) = authorize(&policies, &dst, &c);
            assert_eq!(d.is_allowed(), want, "{name}: {d:?}");
        }
        let dry = Arc::new(dry);
        let (_, dry_hits) = authorize(
            std::slice::from_ref(&dry),
            &dst,
            &conn(Some(other), "10.1.0.1", 80),
        );
        assert_eq!(dry_hits.len(), 1);
    }

    #[test]
    fn scopes() {
        let p = |scope| policy("p", scope, PolicyAction::Deny, Match::default());
        let in_prod = workload("prod", "db");
        let in_test = workload("test", "db");
        assert!(applies_to(&p(PolicyScope::Global), &in_test));
        assert!(applies_to(&p(PolicyScope::Namespace), &in_prod));
        assert!(!applies_to(&p(PolicyScope::Namespace), &in_test));
        let sel = PolicyScope::WorkloadSelector {
            workload_uids: vec!["db".into()],
        };
        assert!(applies_to(&p(sel.clone()), &in_prod));
        let other = PolicyScope::WorkloadSelector {
            workload_uids: vec!["web".into()],
        };
        assert!(!applies_to(&p(other), &in_test));
    }

    /// Facts from ztunnel's RBAC (istio/ztunnel src/rbac.rs and its
    /// `rbac_empty_policy` test): a policy with no rules matches nothing; a
    /// rule with no clauses and a clause with no matches match everything;
    /// a match that sets no field matches nothing; service accounts compare
    /// namespace and name and never match plaintext. And this agent's own
    /// rule: what it cannot evaluate counts against an ALLOW, for a DENY.
    #[test]
    fn empty_parts_service_accounts_and_what_is_not_understood() {
        let dst = workload("prod", "db");
        let client: &'static Identity =
            Box::leak(Box::new(Identity::new("other.td", "prod", "client")));
        let conn = |id: Option<&'static Identity>, port: u16| Connection {
            src_ip: "10.1.0.1".parse().unwrap(),
            src_identity: id,
            dst: SocketAddr::new("10.0.0.2".parse().unwrap(), port),
            request: None,
        };
        let with_rules = |action, rules: Vec<Rule>| Policy {
            rules,
            ..policy("p", PolicyScope::Namespace, action, Match::default())
        };
        let one = |action, m: Match| policy("p", PolicyScope::Namespace, action, m);
        let port = |p: u16| Match {
            destination_ports: vec![p],
            ..Default::default()
        };
        let unsupported = |m: Match| Match {
            unsupported: vec!["extension x".into()],
            ..m
        };
        let rule_unsupported = Rule {
            unsupported: vec!["unknown field 9".into()],
            ..Default::default()
        };
        let clause_unsupported = Rule {
            clauses: vec![Clause {
                matches: vec![port(80)],
                unsupported: vec!["unknown field 9".into()],
            }],
            ..Default::default()
        };
        let policy_unsupported = |action| Policy {
            unsupported: vec!["extension y".into()],
            ..one(action, port(80))
        };
        use PolicyAction::{Allow, Deny};
        let cases: Vec<(&str, Policy, Connection<'_>, bool)> = vec![
            (
                "ALLOW, no rules: matches nothing",
                with_rules(Allow, vec![]),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, no rules: matches nothing",
                with_rules(Deny, vec![]),
                conn(Some(client), 80),
                true,
            ),
            (
                "ALLOW, rule without clauses: all",
                with_rules(Allow, vec![Rule::default()]),
                conn(None, 80),
                true,
            ),
            (
                "DENY, rule without clauses: all",
                with_rules(Deny, vec![Rule::default()]),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, clause without matches: all",
                with_rules(
                    Deny,
                    vec![Rule {
                        clauses: vec![Clause::default()],
                        ..Default::default()
                    }],
                ),
                conn(Some(client), 80),
                false,
            ),
            (
                "ALLOW, empty match: nothing",
                one(Allow, Match::default()),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, empty match: no effect",
                one(Deny, Match::default()),
                conn(Some(client), 80),
                true,
            ),
            (
                "sa ignores trust domain",
                one(
                    Allow,
                    Match {
                        service_accounts: vec![sa("prod", "client")],
                        ..Default::default()
                    },
                ),
                conn(Some(client), 80),
                true,
            ),
            (
                "sa needs namespace",
                one(
                    Allow,
                    Match {
                        service_accounts: vec![sa("test", "client")],
                        ..Default::default()
                    },
                ),
                conn(Some(client), 80),
                false,
            ),
            (
                "sa never plaintext",
                one(
                    Allow,
                    Match {
                        service_accounts: vec![sa("prod", "client")],
                        ..Default::default()
                    },
                ),
                conn(None, 80),
                false,
            ),
            (
                "not_sa matches plaintext",
                one(
                    Deny,
                    Match {
                        not_service_accounts: vec![sa("prod", "client")],
                        ..Default::default()
                    },
                ),
                conn(None, 80),
                false,
            ),
            (
                "not_sa exempts",
                one(
                    Deny,
                    Match {
                        not_service_accounts: vec![sa("prod", "client")],
                        ..Default::default()
                    },
                ),
                conn(Some(client), 80),
                true,
            ),
            (
                "ALLOW, unsupported match: never",
                one(Allow, unsupported(port(80))),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported match: on what is known",
                one(Deny, unsupported(port(80))),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported match: known part decides",
                one(Deny, unsupported(port(80))),
                conn(Some(client), 81),
                true,
            ),
            (
                "DENY, only unsupported: everyone",
                one(Deny, unsupported(Match::default())),
                conn(Some(client), 81),
                false,
            ),
            (
                "ALLOW, unsupported clause: never",
                with_rules(Allow, vec![clause_unsupported.clone()]),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported clause: holds",
                with_rules(Deny, vec![clause_unsupported.clone()]),
                conn(Some(client), 81),
                false,
            ),
            (
                "ALLOW, unsupported rule: never",
                with_rules(Allow, vec![rule_unsupported.clone()]),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported rule: holds",
                with_rules(Deny, vec![rule_unsupported.clone()]),
                conn(Some(client), 80),
                false,
            ),
            (
                "ALLOW, unsupported policy: nothing",
                policy_unsupported(Allow),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported policy: by its rules",
                policy_unsupported(Deny),
                conn(Some(client), 80),
                false,
            ),
            (
                "DENY, unsupported policy: rules decide",
                policy_unsupported(Deny),
                conn(Some(client), 81),
                true,
            ),
        ];
        for (name, p, c, want) in cases {
            let (d, _) = authorize(&[Arc::new(p)], &dst, &c);
            assert_eq!(d.is_allowed(), want, "{name}: {d:?}");
        }
    }
}

#[cfg(test)]
mod request_tests {
    use super::*;
    use crate::state::model::{Clause, RequestMatch, Rule};

    fn policy(name: &str, action: PolicyAction, m: Match) -> Arc<Policy> {
        Arc::new(Policy {
            name: name.into(),
            namespace: "prod".into(),
            scope: PolicyScope::Global,
            action,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![m],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            dry_run: false,
            unsupported: vec![],
        })
    }

    /// A principal and a request condition (`paths: /public*`).
    fn client_on_public() -> Match {
        Match {
            principals: vec![StringMatch::Exact("cluster.local/ns/prod/sa/client".into())],
            request: Some(Box::new(RequestMatch {
                paths: vec![StringMatch::Prefix("/public".into())],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    /// Without a request (an agent's L4 check), request conditions count
    /// against an ALLOW and for a DENY, as istiod makes them for ztunnel:
    /// an L7 ALLOW never opens L4 traffic, an L7 DENY closes it whole.
    /// With a request (a waypoint), they are evaluated.
    #[test]
    fn request_conditions_with_and_without_a_request() {
        let dst = Workload::for_test("db", "prod", Some("10.0.0.2"));
        let client = Identity::new("cluster.local", "prod", "client");
        let get = |path: &str| http::Request::get(path).body(()).expect("request");
        let (public, private) = (get("/public/a"), get("/private"));
        fn conn<'a>(id: &'a Identity, req: Option<&'a http::Request<()>>) -> Connection<'a> {
            Connection {
                src_ip: "10.0.0.1".parse().expect("ip"),
                src_identity: Some(id),
                dst: "10.0.0.2:80".parse().expect("addr"),
                request: req.map(Request::of),
            }
        }
        // (policy action, request, allowed)
        let cases = [
            (PolicyAction::Allow, None, false),
            (PolicyAction::Allow, Some(&public), true),
            (PolicyAction::Allow, Some(&private), false),
            (PolicyAction::Deny, None, false),
            (PolicyAction::Deny, Some(&public), false),
            (PolicyAction::Deny, Some(&private), true),
        ];
        for (action, req, allowed) in cases {
            let policies = [policy("p", action, client_on_public())];
            let (decision, _) = authorize(&policies, &dst, &conn(&client, req));
            assert_eq!(
                decision.is_allowed(),
                allowed,
                "{action:?} {:?}",
                req.map(|r| r.uri())
            );
            assert!(has_request_conditions(&policies, &dst));
        }
        let l4_only = [policy(
            "l4",
            PolicyAction::Allow,
            Match {
                principals: vec![StringMatch::Presence],
                ..Default::default()
            },
        )];
        assert!(!has_request_conditions(&l4_only, &dst));
    }
}
