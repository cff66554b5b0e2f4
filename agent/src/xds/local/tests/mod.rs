//! Parsing and validation tests; `watch.rs` tests the file watcher, and
//! `bad_files` the table of refused files and their messages.

mod bad_files;

use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;

use super::*;
use crate::state::*;

/// Strips the leading newline and the common indentation of a raw string,
/// so line 1 of the YAML is the line after `r#"`.
pub(super) fn yaml(s: &str) -> String {
    let s = s.strip_prefix('\n').unwrap_or(s);
    let indent = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for line in s.lines() {
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    // Drop the closing line's indentation, keep one final newline.
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

const FULL: &str = r#"
    # Two nodes, a client, a server with a waypoint, and policies.
    workloads:
      - uid: node-a/client
        name: client
        namespace: default
        serviceAccount: client
        addresses: [10.0.1.2, "fd00::1:2"]
        node: node-a
        netns: /var/run/netns/client
      - uid: node-b/echo
        name: echo
        namespace: default
        trustDomain: example.org
        addresses:
          - 10.0.2.2
        node: node-b
        netns: ~
        protocol: NONE
        applicationTunnel: PROXY
        applicationTunnelPort: 15088
        capacity: 3
        healthy: false
        waypoint:
          address: 10.0.0.9
      - uid: node-b/waypoint
        name: waypoint
        namespace: default
        addresses: [10.0.0.9]
        node: node-b
        waypoint:
    services:
      - name: echo
        namespace: default
        vips: [10.96.0.10]
        ports: [{port: 80, targetPort: 8080}, {port: 443}]
        endpoints: [node-b/echo]
        subjectAltNames: ["spiffe://example.org/ns/default/sa/echo"]
        waypoint:
          service: default/waypoint.default.svc.cluster.local
          hbonePort: 15009
      - name: other
        namespace: test
        hostname: other.example.com
        vips: ["fd00::10"]
    policies:
      - name: allow-client
        namespace: default
        scope: WORKLOAD_SELECTOR
        selector: [node-b/echo]
        rules:
          - clauses:
              - matches:
                  - namespaces: ["default", "prod-*", "*-test", "*"]
                    notNamespaces: [kube-system]
                    serviceAccounts: [client, other/robot]
                    notServiceAccounts: [evil]
                    principals: ["cluster.local/ns/default/sa/client"]
                    notPrincipals: ["*/sa/evil"]
                    sourceIps: ["10.0.0.0/8", "10.1.2.3", "fd00::/8", "fd00::1"]
                    notSourceIps: [10.9.0.0/16]
                    destinationIps: [10.96.0.10]
                    notDestinationIps: [10.96.0.11/32]
                    destinationPorts: [8080]
                    notDestinationPorts: [9090]
                    hosts: ["*.example.com"]
                    notHosts: [Admin.Example.com]
                    paths: ["/api/*"]
                    notPaths: ["/api/admin*"]
                    methods: [get, POST]
                    notMethods: [DELETE]
                    requestHeaders: {X-User: [alice, "bob*"]}
                    notRequestHeaders: {x-debug: ["*"]}
                  - {}
              - matches: []
          - {}
      - name: deny-all
        namespace: default
        scope: GLOBAL
        action: DENY
        dryRun: true
        selector: []
      - name: ns
        namespace: test
    httpRoutes:
      - name: echo-routes
        namespace: default
        service: default/echo.default.svc.cluster.local
        rules:
          - matches:
              - path: {prefix: /admin}
              - method: delete
                headers: {X-User: mallory}
            deny: true
          - matches: [{path: {exact: /v2}}]
            backends:
              - {workloads: [node-b/echo], weight: 9}
              - {workloads: [node-a/client, node-b/echo]}
"#;

fn expected_full() -> Mesh {
    let workload = |uid: &str, name: &str, addresses: Vec<IpAddr>, node: &str| Workload {
        network: None,
        hostname: None,
        uid: uid.into(),
        name: name.into(),
        namespace: "default".into(),
        service_account: "default".into(),
        trust_domain: "cluster.local".into(),
        addresses: addresses.into(),
        node: node.into(),
        local: None,
        protocol: TunnelProtocol::Hbone,
        application_tunnel: ApplicationTunnel::None,
        waypoint: None,
        healthy: true,
        capacity: 1,
        // istiod's defaults without labels: the workload's own name, `latest`.
        telemetry: Arc::new(Telemetry {
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: "latest".into(),
            cluster: "Kubernetes".into(),
            ..Telemetry::default()
        }),
    };
    let client = Workload {
        service_account: "client".into(),
        local: Some(Box::new(LocalPod {
            netns: Some(PathBuf::from("/var/run/netns/client")),
            cgroup: None,
        })),
        ..workload(
            "node-a/client",
            "client",
            vec![ip("10.0.1.2"), ip("fd00::1:2")],
            "node-a",
        )
    };
    let echo = Workload {
        trust_domain: "example.org".into(),
        protocol: TunnelProtocol::None,
        application_tunnel: ApplicationTunnel::Proxy { port: Some(15088) },
        capacity: 3,
        healthy: false,
        waypoint: Some(Box::new(GatewayAddress {
            target: GatewayTarget::Address(ip("10.0.0.9")),
            hbone_port: 15008,
        })),
        ..workload("node-b/echo", "echo", vec![ip("10.0.2.2")], "node-b")
    };
    let waypoint = workload(
        "node-b/waypoint",
        "waypoint",
        vec![ip("10.0.0.9")],
        "node-b",
    );
    let exact = |s: &str| StringMatch::Exact(s.into());
    let sa = |ns: &str, name: &str| ServiceAccountMatch {
        namespace: ns.into(),
        name: name.into(),
    };
    let full_match = Match {
        namespaces: vec![
            exact("default"),
            StringMatch::Prefix("prod-".into()),
            StringMatch::Suffix("-test".into()),
            StringMatch::Presence,
        ],
        not_namespaces: vec![exact("kube-system")],
        service_accounts: vec![sa("default", "client"), sa("other", "robot")],
        not_service_accounts: vec![sa("default", "evil")],
        principals: vec![exact("cluster.local/ns/default/sa/client")],
        not_principals: vec![StringMatch::Suffix("/sa/evil".into())],
        source_ips: vec![
            net("10.0.0.0/8"),
            net("10.1.2.3/32"),
            net("fd00::/8"),
            net("fd00::1/128"),
        ],
        not_source_ips: vec![net("10.9.0.0/16")],
        destination_ips: vec![net("10.96.0.10/32")],
        not_destination_ips: vec![net("10.96.0.11/32")],
        destination_ports: vec![8080],
        not_destination_ports: vec![9090],
        request: Some(Box::new(RequestMatch {
            hosts: vec![StringMatch::Suffix(".example.com".into())],
            not_hosts: vec![exact("admin.example.com")],
            paths: vec![StringMatch::Prefix("/api/".into())],
            not_paths: vec![StringMatch::Prefix("/api/admin".into())],
            methods: vec!["GET".into(), "POST".into()],
            not_methods: vec!["DELETE".into()],
            headers: vec![(
                "x-user".into(),
                vec![exact("alice"), StringMatch::Prefix("bob".into())],
            )],
            not_headers: vec![("x-debug".into(), vec![StringMatch::Presence])],
        })),
        unsupported: vec![],
    };
    Mesh {
        workloads: vec![client, echo, waypoint],
        services: vec![
            Service {
                load_balancing: None,
                name: "echo".into(),
                namespace: "default".into(),
                hostname: "echo.default.svc.cluster.local".into(),
                vips: vec![ip("10.96.0.10")],
                ports: vec![
                    ServicePort {
                        port: 80,
                        target_port: 8080,
                    },
                    ServicePort {
                        port: 443,
                        target_port: 0,
                    },
                ],
                endpoints: vec![Endpoint {
                    workload_uid: "node-b/echo".into(),
                }],
                subject_alt_names: vec!["spiffe://example.org/ns/default/sa/echo".into()],
                visibility: Default::default(),
                ip_families: Default::default(),
                waypoint: Some(Box::new(GatewayAddress {
                    target: GatewayTarget::Service {
                        namespace: "default".into(),
                        hostname: "waypoint.default.svc.cluster.local".into(),
                    },
                    hbone_port: 15009,
                })),
            },
            Service {
                load_balancing: None,
                name: "other".into(),
                namespace: "test".into(),
                hostname: "other.example.com".into(),
                vips: vec![ip("fd00::10")],
                ports: vec![],
                endpoints: vec![],
                subject_alt_names: vec![],
                visibility: Default::default(),
                ip_families: Default::default(),
                waypoint: None,
            },
        ],
        policies: vec![
            Policy {
                name: "allow-client".into(),
                namespace: "default".into(),
                scope: PolicyScope::WorkloadSelector {
                    workload_uids: vec!["node-b/echo".into()],
                },
                action: PolicyAction::Allow,
                rules: vec![
                    Rule {
                        clauses: vec![
                            Clause {
                                matches: vec![full_match, Match::default()],
                                unsupported: vec![],
                            },
                            Clause::default(),
                        ],
                        unsupported: vec![],
                    },
                    Rule::default(),
                ],
                dry_run: false,
                unsupported: vec![],
            },
            Policy {
                name: "deny-all".into(),
                namespace: "default".into(),
                scope: PolicyScope::Global,
                action: PolicyAction::Deny,
                rules: vec![],
                dry_run: true,
                unsupported: vec![],
            },
            Policy {
                name: "ns".into(),
                namespace: "test".into(),
                scope: PolicyScope::Namespace,
                action: PolicyAction::Allow,
                rules: vec![],
                dry_run: false,
                unsupported: vec![],
            },
        ],
        http_routes: vec![HttpRoute {
            name: "echo-routes".into(),
            namespace: "default".into(),
            service_namespace: "default".into(),
            service_hostname: "echo.default.svc.cluster.local".into(),
            outlier_detection: None,
            rules: vec![
                HttpRule {
                    matches: vec![
                        HttpMatch {
                            path: Some(PathMatch::Prefix("/admin".into())),
                            ..Default::default()
                        },
                        HttpMatch {
                            method: Some("DELETE".into()),
                            headers: vec![HeaderMatch {
                                name: "x-user".into(),
                                value: ValueMatch::Exact("mallory".into()),
                                invert: false,
                            }],
                            ..Default::default()
                        },
                    ],
                    action: HttpAction::Deny,
                    policy: RequestPolicy::default(),
                },
                HttpRule {
                    matches: vec![HttpMatch {
                        path: Some(PathMatch::Exact("/v2".into())),
                        ..Default::default()
                    }],
                    action: HttpAction::Route(vec![
                        Backend {
                            workload_uids: vec!["node-b/echo".into()],
                            weight: 9,
                        },
                        Backend {
                            workload_uids: vec!["node-a/client".into(), "node-b/echo".into()],
                            weight: 1,
                        },
                    ]),
                    // No `retries`: istiod's default policy.
                    policy: RequestPolicy::istio_default(),
                },
            ],
        }],
    }
}

#[test]
fn full_file_maps_to_model_with_defaults() {
    let mesh = parse_mesh("mesh.yaml", &yaml(FULL)).unwrap();
    let expected = expected_full();
    // Field by field first, for a readable failure.
    for (got, want) in mesh.workloads.iter().zip(&expected.workloads) {
        assert_eq!(got, want);
    }
    for (got, want) in mesh.services.iter().zip(&expected.services) {
        assert_eq!(got, want);
    }
    for (got, want) in mesh.policies.iter().zip(&expected.policies) {
        assert_eq!(got, want);
    }
    assert_eq!(mesh, expected);
    assert_eq!(
        mesh.workloads[1].identity().to_string(),
        "spiffe://example.org/ns/default/sa/default"
    );
}

#[test]
fn empty_sections_mean_empty_mesh_and_blank_files_are_refused() {
    // A truncated file (an editor's or a non-atomic write) is blank for a
    // while: it must not read as "release every pod".
    for text in ["", "\n\n", "# nothing yet\n", "---\n# nothing\n...\n"] {
        let err = parse_mesh("mesh.yaml", text).unwrap_err().to_string();
        assert_eq!(
            err, "mesh.yaml: the mesh file is blank; an empty mesh is written `workloads: []`",
            "{text:?}"
        );
    }
    for text in [
        "workloads:\nservices:\npolicies:\n",
        "workloads: []\nservices: []\npolicies: []\n",
        "{}\n",
    ] {
        assert_eq!(
            parse_mesh("mesh.yaml", text).unwrap(),
            Mesh::default(),
            "{text:?}"
        );
    }
}

#[test]
fn error_display_is_file_line_column_field_message() {
    let text = yaml(
        "
        workloads:
          - uid: a
            name: a
            namespace: default
            addresses: [10.0.0.1]
            node: n
          - uid: b
            name: b
            namespace: default
            node: n
            addresses:
              - 10.0.0.300
        ",
    );
    let err = parse_mesh("mesh.yaml", &text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "mesh.yaml:12:9: workloads[1].addresses[0]: invalid IP address \"10.0.0.300\""
    );
    match err {
        LocalConfigError::Invalid {
            at, field, problem, ..
        } => {
            assert_eq!(
                at,
                Some(Location {
                    line: 12,
                    column: 9
                })
            );
            assert_eq!(field, "workloads[1].addresses[0]");
            assert_eq!(problem, Problem::InvalidIp("10.0.0.300".into()));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn load_mesh_reads_the_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml(FULL)).unwrap();
    assert_eq!(load_mesh(&path).unwrap(), expected_full());

    std::fs::write(&path, "workloads: 5\n").unwrap();
    let err = load_mesh(&path).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:1:12: workloads:", path.display())),
        "{err}"
    );

    let missing = dir.path().join("absent.yaml");
    let err = load_mesh(&missing).unwrap_err();
    assert!(matches!(err, LocalConfigError::Io { ref path, .. } if path == &missing));
    assert!(err.to_string().contains("absent.yaml"), "{err}");
}

#[test]
fn test_helper_dedents() {
    assert_eq!(yaml("\n    a:\n      b: 1\n    "), "a:\n  b: 1\n");
}
