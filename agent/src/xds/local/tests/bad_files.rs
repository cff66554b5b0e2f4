//! Refused mesh files: each names the file, line, column and field of its
//! problem, whether serde or the validation pass found it.

use super::*;

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
