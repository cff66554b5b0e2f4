//! Parsing and validation tests; `watch.rs` tests the file watcher.

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
                    notHosts: [admin.example.com]
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
                    policy: RequestPolicy::default(),
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

/// A valid workload taking lines 1-6; cases append to it.
const BASE: &str = "
    workloads:
      - uid: a
        name: a
        namespace: default
        addresses: [10.0.0.1]
        node: n
";

#[test]
fn bad_files_name_file_line_and_field() {
    // BASE followed by `rest`, indented by `indent` (4: more fields of
    // workload `a`, 2: more workloads, 0: more sections).
    let base = yaml(BASE);
    let with_base = |indent: usize, rest: &str| {
        let pad = " ".repeat(indent);
        let rest: String = yaml(rest).lines().map(|l| format!("{pad}{l}\n")).collect();
        format!("{base}{rest}")
    };
    // BASE, a service `s` and one route for it with `rules` (YAML list items).
    let with_route = |rules: &str| {
        with_base(
            0,
            &format!(
                "services:\n  - {{name: s, namespace: default, vips: [10.96.0.1]}}\nhttpRoutes:\n  - name: r\n    namespace: default\n    service: default/s.default.svc.cluster.local\n    rules:\n{}",
                yaml(rules).lines().map(|l| format!("      {l}\n")).collect::<String>()
            ),
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        // --- from the YAML loader and deserialization ---
        (
            "syntax error",
            yaml(
                "
                workloads:
                  - uid: a
                   name: x
                ",
            ),
            "mesh.yaml:3:8: YAML syntax error: while parsing a block collection",
        ),
        (
            "unclosed flow sequence",
            yaml(
                "
                workloads:
                  - uid: a
                    addresses: [10.0.0.1
                services: []
                ",
            ),
            "mesh.yaml:4:9: YAML syntax error: ",
        ),
        (
            "top level is a list",
            "- uid: a\n".to_string(),
            "mesh.yaml:1:1: the top level must be a mapping",
        ),
        (
            "duplicate key",
            with_base(4, "name: b"),
            "mesh.yaml:7:5: duplicate key `name` (first at line 3)",
        ),
        (
            "unknown top-level field",
            yaml(
                "
                workloads: []
                gateways: []
                ",
            ),
            "mesh.yaml:2:1: gateways: Unknown field `gateways`",
        ),
        (
            "unknown field",
            with_base(4, "annotations: {a: b}"),
            "mesh.yaml:7:5: workloads[0].annotations: Unknown field `annotations`",
        ),
        (
            "unknown field in a match",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    rules:
                      - clauses:
                          - matches:
                              - queryParams: [admin]
                ",
            ),
            "mesh.yaml:7:17: policies[0].rules[0].clauses[0].matches[0].queryParams: Unknown field `queryParams`",
        ),
        (
            "hostname that is not a DNS name",
            with_base(4, "hostname: 10.0.0"),
            "mesh.yaml:7:15: workloads[0].hostname: \"10.0.0\" is not a DNS name",
        ),
        (
            "bad protocol",
            with_base(4, "protocol: TCP"),
            "mesh.yaml:7:15: workloads[0].protocol: unknown variant `TCP`, expected `HBONE` or `NONE`",
        ),
        (
            "bad application tunnel",
            with_base(4, "applicationTunnel: proxy"),
            "mesh.yaml:7:24: workloads[0].applicationTunnel: unknown variant `proxy`",
        ),
        (
            "bad scope",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    scope: CLUSTER
                ",
            ),
            "mesh.yaml:4:12: policies[0].scope: unknown variant `CLUSTER`",
        ),
        (
            "bad action",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    action: AUDIT
                ",
            ),
            "mesh.yaml:4:13: policies[0].action: unknown variant `AUDIT`",
        ),
        (
            "bad bool",
            with_base(4, "healthy: yes"),
            "mesh.yaml:7:14: workloads[0].healthy: Value was not a boolean",
        ),
        (
            "list expected",
            yaml(
                "
                workloads:
                  - uid: a
                    name: a
                    namespace: default
                    addresses: 10.0.0.1
                    node: n
                ",
            ),
            "mesh.yaml:5:16: workloads[0].addresses: invalid type: string \"10.0.0.1\", expected a sequence",
        ),
        (
            "missing required field",
            with_base(
                2,
                "
                - uid: b
                  name: b
                  namespace: default
                  addresses: [10.0.0.2]
                ",
            ),
            "mesh.yaml:7:8: workloads[1]: missing field `node`",
        ),
        (
            "missing addresses",
            yaml(
                "
                workloads:
                  - uid: b
                    name: b
                    namespace: default
                    node: n
                ",
            ),
            "mesh.yaml:2:8: workloads[0]: missing field `addresses`",
        ),
        (
            "port too large",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    ports: [{port: 80}, {port: 70000}]
                ",
            ),
            "mesh.yaml:11:32: services[0].ports[1].port: number too large to fit in target type",
        ),
        (
            "port not a number",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    ports:
                      - port: http
                ",
            ),
            "mesh.yaml:12:15: services[0].ports[0].port: invalid digit found in string",
        ),
        // --- from the validation pass ---
        (
            "bad workload IP",
            yaml(
                "
                workloads:
                  - uid: a
                    name: a
                    namespace: default
                    addresses:
                      - 10.0.0.1
                      - 10.0.0.300
                    node: n
                ",
            ),
            "mesh.yaml:7:9: workloads[0].addresses[1]: invalid IP address \"10.0.0.300\"",
        ),
        (
            "no addresses",
            yaml(
                "
                workloads:
                  - uid: a
                    name: a
                    namespace: default
                    addresses: []
                    node: n
                ",
            ),
            "mesh.yaml:5:16: workloads[0].addresses: must not be empty",
        ),
        (
            "empty uid",
            yaml(
                "
                workloads:
                  - uid: \"\"
                    name: a
                    namespace: default
                    addresses: [10.0.0.1]
                    node: n
                ",
            ),
            "mesh.yaml:2:10: workloads[0].uid: must not be empty",
        ),
        (
            "slash in service account",
            with_base(4, "serviceAccount: a/b"),
            "mesh.yaml:7:21: workloads[0].serviceAccount: must not contain '/'",
        ),
        (
            "duplicate uid",
            with_base(
                2,
                "
                  - uid: a
                    name: a2
                    namespace: default
                    addresses: [10.0.0.2]
                    node: n
                ",
            ),
            "mesh.yaml:7:10: workloads[1].uid: duplicate workload uid \"a\" (first at workloads[0].uid on line 2)",
        ),
        (
            "duplicate address across workloads",
            with_base(
                2,
                "
                  - uid: b
                    name: b
                    namespace: default
                    addresses: [10.0.0.2, 10.0.0.1]
                    node: n
                ",
            ),
            "mesh.yaml:10:27: workloads[1].addresses[1]: address 10.0.0.1 is already used by workloads[0].addresses[0] on line 5",
        ),
        (
            "duplicate address within a workload",
            yaml(
                "
                workloads:
                  - uid: a
                    name: a
                    namespace: default
                    addresses: [10.0.0.1, 10.0.0.1]
                    node: n
                ",
            ),
            "mesh.yaml:5:27: workloads[0].addresses[1]: address 10.0.0.1 is already used by workloads[0].addresses[0] on line 5",
        ),
        (
            "VIP equals a workload address",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.0.0.1]
                ",
            ),
            "mesh.yaml:10:12: services[0].vips[0]: address 10.0.0.1 is already used by workloads[0].addresses[0] on line 5",
        ),
        (
            "VIP shared by two services",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                  - name: t
                    namespace: default
                    vips: [10.96.0.1]
                ",
            ),
            "mesh.yaml:7:12: services[1].vips[0]: address 10.96.0.1 is already used by services[0].vips[0] on line 4",
        ),
        (
            "bad VIP",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0]
                ",
            ),
            "mesh.yaml:4:12: services[0].vips[0]: invalid IP address \"10.96.0\"",
        ),
        (
            "no VIPs",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: []
                ",
            ),
            "mesh.yaml:4:11: services[0].vips: must not be empty",
        ),
        (
            "duplicate service hostname",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                  - name: t
                    namespace: default
                    hostname: s.default.svc.cluster.local
                    vips: [10.96.0.2]
                ",
            ),
            "mesh.yaml:7:15: services[1].hostname: duplicate service default/s.default.svc.cluster.local (first at services[0].name on line 2)",
        ),
        (
            "port 0",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    ports:
                      - port: 0
                ",
            ),
            "mesh.yaml:12:15: services[0].ports[0].port: port must be in 1..=65535",
        ),
        (
            "duplicate service port",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    ports:
                      - port: 80
                        targetPort: 8080
                      - port: 80
                ",
            ),
            "mesh.yaml:14:15: services[0].ports[1].port: duplicate port 80 (first at services[0].ports[0].port on line 12)",
        ),
        (
            "unknown endpoint",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    endpoints: [a, b]
                ",
            ),
            "mesh.yaml:11:20: services[0].endpoints[1]: no workload has uid \"b\"",
        ),
        (
            "duplicate endpoint",
            with_base(
                0,
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    endpoints:
                      - a
                      - a
                ",
            ),
            "mesh.yaml:13:9: services[0].endpoints[1]: workload \"a\" is listed twice",
        ),
        (
            "bad subject alt name",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    subjectAltNames:
                      - spiffe://cluster.local/ns/default/sa/s
                      - cluster.local/ns/default/sa/s
                ",
            ),
            "mesh.yaml:7:9: services[0].subjectAltNames[1]: identity \"cluster.local/ns/default/sa/s\" does not start with spiffe://",
        ),
        (
            "waypoint with both address and service",
            with_base(
                4,
                "
                    waypoint:
                      address: 10.0.0.9
                      service: default/wp.default.svc.cluster.local
                ",
            ),
            "mesh.yaml:9:16: workloads[0].waypoint.service: waypoint needs exactly one of `address` and `service`, not both",
        ),
        (
            "waypoint with neither",
            with_base(4, "waypoint: {hbonePort: 15008}"),
            "mesh.yaml:7:15: workloads[0].waypoint: waypoint needs exactly one of `address` and `service`, found neither",
        ),
        (
            "bad waypoint address",
            with_base(4, "waypoint: {address: wp.default}"),
            "mesh.yaml:7:25: workloads[0].waypoint.address: invalid IP address \"wp.default\"",
        ),
        (
            "bad waypoint service",
            yaml(
                "
                services:
                  - name: s
                    namespace: default
                    vips: [10.96.0.1]
                    waypoint:
                      service: wp.default.svc.cluster.local
                ",
            ),
            "mesh.yaml:6:16: services[0].waypoint.service: waypoint service \"wp.default.svc.cluster.local\" is not of the form <namespace>/<hostname>",
        ),
        (
            "waypoint hbone port 0",
            with_base(4, "waypoint: {address: 10.0.0.9, hbonePort: 0}"),
            "mesh.yaml:7:46: workloads[0].waypoint.hbonePort: port must be in 1..=65535",
        ),
        (
            "duplicate policy",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                  - name: p
                    namespace: other
                  - name: p
                    namespace: default
                ",
            ),
            "mesh.yaml:6:11: policies[2].name: duplicate policy default/p (first at policies[0].name on line 2)",
        ),
        (
            "selector with the default scope",
            with_base(
                0,
                "
                policies:
                  - name: p
                    namespace: default
                    selector: [a]
                ",
            ),
            "mesh.yaml:10:15: policies[0].selector: `selector` is only allowed with scope WORKLOAD_SELECTOR",
        ),
        (
            "selector with GLOBAL scope",
            with_base(
                0,
                "
                policies:
                  - name: p
                    namespace: default
                    scope: GLOBAL
                    selector:
                      - a
                ",
            ),
            "mesh.yaml:12:7: policies[0].selector: `selector` is only allowed",
        ),
        (
            "WORKLOAD_SELECTOR without selector",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    scope: WORKLOAD_SELECTOR
                ",
            ),
            "mesh.yaml:4:12: policies[0].scope: scope WORKLOAD_SELECTOR needs a non-empty `selector`",
        ),
        (
            "WORKLOAD_SELECTOR with empty selector",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    scope: WORKLOAD_SELECTOR
                    selector: []
                ",
            ),
            "mesh.yaml:4:12: policies[0].scope: scope WORKLOAD_SELECTOR needs a non-empty `selector`",
        ),
        (
            "unknown selector uid",
            with_base(
                0,
                "
                policies:
                  - name: p
                    namespace: default
                    scope: WORKLOAD_SELECTOR
                    selector: [a, ghost]
                ",
            ),
            "mesh.yaml:11:19: policies[0].selector[1]: no workload has uid \"ghost\"",
        ),
        (
            "selector outside the policy namespace",
            with_base(
                0,
                "
                policies:
                  - name: p
                    namespace: prod
                    scope: WORKLOAD_SELECTOR
                    selector: [a]
                ",
            ),
            "mesh.yaml:11:16: policies[0].selector[0]: workload \"a\" is in namespace \"default\", not the policy's namespace",
        ),
        (
            "bad CIDR",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    rules:
                      - clauses:
                          - matches:
                              - sourceIps: [10.0.0.0/8, 10.0.0.0/33]
                ",
            ),
            "mesh.yaml:7:41: policies[0].rules[0].clauses[0].matches[0].sourceIps[1]: invalid CIDR or IP address \"10.0.0.0/33\"",
        ),
        (
            "bad bare IP in a not-field",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    rules:
                      - clauses:
                          - matches:
                              - {}
                              - notDestinationIps:
                                  - localhost
                ",
            ),
            "mesh.yaml:9:21: policies[0].rules[0].clauses[0].matches[1].notDestinationIps[0]: invalid CIDR or IP address \"localhost\"",
        ),
        (
            "destination port 0",
            yaml(
                "
                policies:
                  - name: p
                    namespace: default
                    rules:
                      - {}
                      - clauses:
                          - matches:
                              - destinationPorts: [0]
                ",
            ),
            "mesh.yaml:8:36: policies[0].rules[1].clauses[0].matches[0].destinationPorts[0]: port must be in 1..=65535",
        ),
        (
            "tunnel port without PROXY",
            with_base(4, "applicationTunnelPort: 15088"),
            "mesh.yaml:7:28: workloads[0].applicationTunnelPort: `applicationTunnelPort` needs `applicationTunnel: PROXY`",
        ),
        (
            "tunnel port 0",
            with_base(4, "applicationTunnel: PROXY\napplicationTunnelPort: 0"),
            "mesh.yaml:8:28: workloads[0].applicationTunnelPort: port must be in 1..=65535",
        ),
        (
            "route for an unknown service",
            with_base(0, "httpRoutes:\n  - {name: r, namespace: default, service: default/nope}"),
            "mesh.yaml:8:44: httpRoutes[0].service: no service \"default/nope\"",
        ),
        (
            "rule with deny and backends",
            with_base(
                0,
                "
                services:
                  - {name: s, namespace: default, vips: [10.96.0.1], endpoints: [a]}
                httpRoutes:
                  - name: r
                    namespace: default
                    service: default/s.default.svc.cluster.local
                    rules:
                      - deny: true
                        backends: [{workloads: [a]}]
                ",
            ),
            "httpRoutes[0].rules[0]: a rule needs exactly one of `deny: true`, `backends` and `directResponse`; found 2",
        ),
        (
            "rule with neither",
            with_route(
                "
                      - matches: [{method: GET}]
                ",
            ),
            "httpRoutes[0].rules[0]: a rule needs exactly one of `deny: true`, `backends` and `directResponse`; found 0",
        ),
        (
            "backend of an unknown workload",
            with_route(
                "
                      - backends: [{workloads: [ghost]}]
                ",
            ),
            "mesh.yaml:14:33: httpRoutes[0].rules[0].backends[0].workloads: no workload has uid \"ghost\"",
        ),
        (
            "backends all weight 0",
            with_route(
                "
                      - backends: [{workloads: [a], weight: 0}]
                ",
            ),
            "httpRoutes[0].rules[0].backends: at least one backend needs a weight above 0",
        ),
        (
            "unknown path match kind",
            with_route(
                "
                      - matches: [{path: {suffix: x}}]
                        deny: true
                ",
            ),
            "httpRoutes[0].rules[0].matches[0].path",
        ),
        (
            "path regex that does not compile",
            with_route(
                "
                      - matches: [{path: {regex: \"/a(\"}}]
                        deny: true
                ",
            ),
            "mesh.yaml:14:34: httpRoutes[0].rules[0].matches[0].path.regex: invalid regular expression: error: unclosed group",
        ),
        (
            "header regex with look-ahead (not RE2)",
            with_route(
                "
                      - matches: [{headers: {x-user: {regex: \"(?=a)\"}}}]
                        deny: true
                ",
            ),
            "httpRoutes[0].rules[0].matches[0].headers.x-user.regex: invalid regular expression",
        ),
        (
            "header match of two kinds",
            with_route(
                "
                      - matches: [{headers: {x-user: {exact: a, prefix: b}}}]
                        deny: true
                ",
            ),
            "httpRoutes[0].rules[0].matches[0].headers.x-user: a header match needs exactly one of `exact`, `prefix`, `regex` and `present: true`; found 2",
        ),
        (
            "timeout that is not a duration",
            with_route(
                "
                      - deny: true
                        timeout: soon
                ",
            ),
            "mesh.yaml:15:18: httpRoutes[0].rules[0].timeout: invalid duration \"soon\"",
        ),
        (
            "unknown retry condition",
            with_route(
                "
                      - backends: [{workloads: [a]}]
                        retries: {attempts: 2, retryOn: \"5xx,whenever\"}
                ",
            ),
            "httpRoutes[0].rules[0].retries.retryOn: unknown retry condition \"whenever\"",
        ),
        (
            "fault percentage above 100",
            with_route(
                "
                      - backends: [{workloads: [a]}]
                        fault: {abort: {httpStatus: 503, percentage: 150}}
                ",
            ),
            "httpRoutes[0].rules[0].fault.abort.percentage: a percentage must be in 0..=100",
        ),
        (
            "direct response with a status out of range",
            with_route(
                "
                      - directResponse: {status: 99, body: x}
                ",
            ),
            "httpRoutes[0].rules[0].directResponse.status: an HTTP status must be in 200..=599",
        ),
    ];
    let mut failures = Vec::new();
    for (name, text, want) in &cases {
        match parse_mesh("mesh.yaml", text) {
            Ok(_) => failures.push(format!("{name}: parsed, want error {want:?}\n{text}")),
            Err(e) if !e.to_string().contains(want) => {
                failures.push(format!("{name}:\n  got  {e}\n  want {want}\n{text}"))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
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
