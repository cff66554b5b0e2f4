//! Synthetic meshes for the scale benchmark, in the local-mode YAML format
//! (`agent/src/xds/local/schema.rs`): `n` workloads over 100 namespaces,
//! `n / 10` services of 10 endpoints each and 1,000 L4 authorization
//! policies. Deterministic: the same `n` and [`Edits`] give the same text.
//!
//! Workload `i`: uid `wl-<i>`, namespace `ns-<i % 100>`, service account
//! `sa-<i % 20>`, address `10.0.0.0 + i + 1`, node `node-<i % 500>`, HBONE.
//! Service `j`: namespace `ns-<j % 100>`, VIP `172.16.0.0 + j + 1`, port
//! 80 -> 8080, endpoints the ten workloads `k + 100 * (10 * (j / 100) + m)`
//! (mod `n`) of its namespace `k`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// Namespaces the workloads are spread over.
pub const NAMESPACES: usize = 100;
/// Distinct service accounts per namespace.
pub const SERVICE_ACCOUNTS: usize = 20;
/// Nodes the workloads are placed on (`node-<k>`); no agent should use
/// one of these names.
pub const NODES: usize = 500;
/// Endpoints per service.
pub const ENDPOINTS: usize = 10;
/// Authorization policies, whatever the size.
pub const POLICIES: usize = 1_000;

/// Changes to single workloads, applied on top of the generated mesh.
#[derive(Clone, Debug, Default)]
pub struct Edits {
    /// Workload index -> service account replacing `sa-<i % 20>`.
    pub service_account: BTreeMap<usize, String>,
    /// Workload indexes marked `healthy: false`.
    pub unhealthy: std::collections::BTreeSet<usize>,
}

/// Whether `n` is a size the generator supports.
pub fn check_size(n: usize) -> Result<(), String> {
    if n < 1_000 || !n.is_multiple_of(NAMESPACES) || n >= 1 << 24 {
        return Err(format!(
            "{n} workloads: sizes must be multiples of {NAMESPACES}, at least 1000 and below 2^24"
        ));
    }
    Ok(())
}

/// The `i`th address of `base` (i = 0 is `base + 1`).
fn nth_addr(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + 1 + i as u32)
}

/// Workload `i`'s uid.
pub fn uid(i: usize) -> String {
    format!("wl-{i}")
}

/// Services in a mesh of `n` workloads.
pub fn services(n: usize) -> usize {
    n / ENDPOINTS
}

/// The endpoints (workload indexes) of service `j` in a mesh of `n`.
fn endpoints(n: usize, j: usize) -> impl Iterator<Item = usize> {
    let (k, q) = (j % NAMESPACES, j / NAMESPACES);
    (0..ENDPOINTS).map(move |m| (k + NAMESPACES * (ENDPOINTS * q + m)) % n)
}

/// The mesh file for `n` workloads (see [`check_size`]) with `edits`.
pub fn mesh_yaml(n: usize, edits: &Edits) -> String {
    // ~170 bytes a workload, ~200 a service, ~250 a policy.
    let mut out = String::with_capacity(n * 190 + POLICIES * 250 + 4096);
    let _ = writeln!(
        out,
        "# scale benchmark: {n} workloads, {} services, {POLICIES} policies",
        services(n)
    );
    out.push_str("workloads:\n");
    for i in 0..n {
        let sa = edits
            .service_account
            .get(&i)
            .cloned()
            .unwrap_or_else(|| format!("sa-{}", i % SERVICE_ACCOUNTS));
        let health = if edits.unhealthy.contains(&i) {
            ", healthy: false"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  - {{uid: {uid}, name: wl-{i}, namespace: ns-{ns}, serviceAccount: {sa}, \
             addresses: [{ip}], node: node-{node}, protocol: HBONE{health}}}",
            uid = uid(i),
            ns = i % NAMESPACES,
            ip = nth_addr(Ipv4Addr::new(10, 0, 0, 0), i),
            node = i % NODES,
        );
    }
    out.push_str("services:\n");
    for j in 0..services(n) {
        let ns = j % NAMESPACES;
        let eps: Vec<String> = endpoints(n, j).map(uid).collect();
        let _ = writeln!(
            out,
            "  - {{name: svc-{j}, namespace: ns-{ns}, hostname: svc-{j}.ns-{ns}.svc.cluster.local, \
             vips: [{vip}], ports: [{{port: 80, targetPort: 8080}}], endpoints: [{eps}]}}",
            vip = nth_addr(Ipv4Addr::new(172, 16, 0, 0), j),
            eps = eps.join(", "),
        );
    }
    out.push_str("policies:\n");
    for p in 0..POLICIES {
        policy(&mut out, n, p);
    }
    out
}

/// Policy `p`: in namespace `ns-<p % 100>`; one in 50 a namespace-scoped
/// DENY (a namespace on a port), one in 10 an ALLOW selecting two of the
/// namespace's workloads, the rest namespace-scoped ALLOWs of two
/// principals (or a principal prefix) on one or two ports.
fn policy(out: &mut String, n: usize, p: usize) {
    let ns = p % NAMESPACES;
    let peer = (p * 7 + 1) % NAMESPACES;
    let sa = p % SERVICE_ACCOUNTS;
    let _ = writeln!(out, "  - name: pol-{p}\n    namespace: ns-{ns}");
    if p % 50 == 7 {
        let _ = writeln!(
            out,
            "    action: DENY\n    rules:\n      - clauses:\n          \
             - matches: [{{namespaces: [ns-{peer}]}}]\n          \
             - matches: [{{destinationPorts: [{port}]}}]",
            port = 9000 + p % 100,
        );
        return;
    }
    if p % 10 == 9 {
        // Two workloads of this namespace: indexes ns + 100 * t.
        let per_ns = n / NAMESPACES;
        let t = (2 * p) % per_ns;
        let a = uid(ns + NAMESPACES * t);
        let b = uid(ns + NAMESPACES * ((t + 1) % per_ns));
        let _ = writeln!(
            out,
            "    scope: WORKLOAD_SELECTOR\n    selector: [{a}, {b}]\n    rules:\n      \
             - clauses:\n          - matches: [{{principals: [cluster.local/ns/ns-{peer}/sa/sa-{sa}]}}]",
        );
        return;
    }
    let ports = if p.is_multiple_of(3) {
        "[8080]"
    } else {
        "[8080, 9090]"
    };
    let second = if p.is_multiple_of(4) {
        format!("cluster.local/ns/ns-{ns}/sa/*")
    } else {
        format!(
            "cluster.local/ns/ns-{peer}/sa/sa-{}",
            (sa + 1) % SERVICE_ACCOUNTS
        )
    };
    let _ = writeln!(
        out,
        "    rules:\n      - clauses:\n          \
         - matches: [{{principals: [cluster.local/ns/ns-{peer}/sa/sa-{sa}, {second}]}}]\n          \
         - matches: [{{destinationPorts: {ports}}}]",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_parses_it() {
        let mut edits = Edits::default();
        edits.service_account.insert(500, "sa-changed".into());
        edits.unhealthy.insert(11);
        for n in [1_000, 1_500, 3_000] {
            let text = mesh_yaml(n, &edits);
            let mesh = ambient_agent::xds::local::parse_mesh("gen", &text)
                .unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(mesh.workloads.len(), n);
            assert_eq!(mesh.services.len(), n / 10);
            assert_eq!(mesh.policies.len(), POLICIES);
            assert!(mesh.services.iter().all(|s| s.endpoints.len() == ENDPOINTS));
            assert_eq!(mesh.workloads[500].service_account, "sa-changed");
            assert!(!mesh.workloads[11].healthy && mesh.workloads[12].healthy);
            ambient_agent::xds::delta::encode_mesh(&mesh).expect("servable over xDS");
        }
    }
}
