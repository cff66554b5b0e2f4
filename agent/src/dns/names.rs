//! Which mesh name a query means, as ztunnel reads it (src/dns/server.rs):
//! a pod's resolver sends short names and search-domain expansions
//! (`name`, `name.ns`, `name.ns.svc`, and misses such as
//! `name.ns.svc.cluster.local.<ns>.svc.cluster.local` from ndots), and the
//! proxy answers each of them for the service they stand for.
//!
//! The candidates are tried in order, the first hit wins:
//! 1. the name itself, then its Kubernetes expansions for the client's
//!    namespace ([`kube_fqdns`]);
//! 2. for each search domain (`<ns>.svc.<cd>`, `svc.<cd>`, `<cd>`) the
//!    name ends with, the name without it (if a label is left), then that
//!    name's expansions.
//!
//! Each candidate is looked up exactly, then as the wildcards that cover
//! it (`*.b.c`, then `*.c`). A hit on a name with a search domain
//! stripped is answered as ztunnel does: a CNAME from the asked name to
//! the stripped one, whose records follow; a hit on the name itself, its
//! expansions or a wildcard is answered under the asked name.

use std::net::IpAddr;
use std::sync::Arc;

use crate::state::{Service, Snapshot};

/// The address family a query asks for (A or AAAA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn admits(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// A mesh name found for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The name the address records are owned by: the asked name, or the
    /// stripped one a CNAME points to.
    pub owner: String,
    /// Whether a CNAME from the asked name to `owner` comes first.
    pub cname: bool,
    /// The service's addresses of the asked family (may be empty: the name
    /// exists in the mesh, with no address of that family).
    pub addrs: Vec<IpAddr>,
}

/// Looks `name` (lowercase, no trailing dot) up in the mesh for a client
/// in `namespace`. `None`: not a mesh name; the query goes upstream.
pub fn resolve(
    snap: &Snapshot,
    namespace: &str,
    cluster_domain: &str,
    name: &str,
    family: Family,
) -> Option<Found> {
    for (alias, stripped) in aliases(namespace, cluster_domain, name) {
        for (candidate, wildcard) in
            std::iter::once((alias.clone(), false)).chain(wildcards(&alias).map(|w| (w, true)))
        {
            let Some(svc) = best(snap.services_by_hostname(&candidate), namespace) else {
                continue;
            };
            let Some(addrs) = addresses(snap, svc, cluster_domain, family) else {
                continue;
            };
            return Some(match stripped {
                Some(base) if !wildcard => Found {
                    owner: base,
                    cname: true,
                    addrs,
                },
                _ => Found {
                    owner: name.to_string(),
                    cname: false,
                    addrs,
                },
            });
        }
    }
    None
}

/// The candidate names for `name`, in order, each with the name left
/// after stripping a search domain, if one was stripped to get it.
pub fn aliases(namespace: &str, cluster_domain: &str, name: &str) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    let mut push = |n: String, stripped: Option<&str>| {
        if !out.iter().any(|(o, _)| *o == n) {
            out.push((n, stripped.map(str::to_string)));
        }
    };
    push(name.to_string(), None);
    for f in kube_fqdns(namespace, cluster_domain, name) {
        push(f, None);
    }
    let search = [
        format!("{namespace}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_string(),
    ];
    for domain in &search {
        let Some(rest) = name.strip_suffix(domain.as_str()) else {
            continue;
        };
        let Some(rest) = rest.strip_suffix('.').filter(|r| !r.is_empty()) else {
            continue;
        };
        push(rest.to_string(), Some(rest));
        for f in kube_fqdns(namespace, cluster_domain, rest) {
            push(f, Some(rest));
        }
    }
    out
}

/// The Kubernetes names a short `name` may stand for, for a client in
/// `namespace`: `svc` → `svc.<ns>.svc.<cd>`; `svc.ns` → `svc.ns.svc.<cd>`
/// (and the client-namespace form); `svc.ns.svc` → `+.<cd>`.
pub fn kube_fqdns(namespace: &str, cluster_domain: &str, name: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    let cd = cluster_domain;
    match labels.as_slice() {
        [_] => vec![format!("{name}.{namespace}.svc.{cd}")],
        [_, _] => vec![
            format!("{name}.svc.{cd}"),
            format!("{name}.{namespace}.svc.{cd}"),
        ],
        [a, b, last] => {
            let mut v = Vec::new();
            if *last == "svc" {
                v.push(format!("{a}.{b}.svc.{cd}"));
            }
            v.push(format!("{name}.svc.{cd}"));
            v
        }
        [_, _, _, "svc"] => vec![format!("{name}.{cd}")],
        _ => Vec::new(),
    }
}

/// `*.b.c`, then `*.c`, for `a.b.c`.
fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    name.match_indices('.')
        .map(move |(i, _)| format!("*{}", &name[i..]))
}

/// Of the services sharing a hostname that the client may see (a
/// namespace-scoped one only from its own namespace, as ztunnel), the
/// client's namespace's first.
fn best<'a>(services: &'a [Arc<Service>], namespace: &str) -> Option<&'a Arc<Service>> {
    let visible = |s: &&Arc<Service>| {
        s.visibility == crate::state::Visibility::Public || s.namespace == namespace
    };
    services
        .iter()
        .filter(visible)
        .find(|s| s.namespace == namespace)
        .or_else(|| services.iter().find(visible))
}

/// A service's addresses of `family`: its VIPs; for a headless Kubernetes
/// service (no VIP, hostname under `.svc.<cd>`) one address per endpoint.
/// `None` for a service with no VIP that is not a Kubernetes service (it
/// is left to the upstream resolver).
fn addresses(
    snap: &Snapshot,
    svc: &Service,
    cluster_domain: &str,
    family: Family,
) -> Option<Vec<IpAddr>> {
    let admits = |ip: &IpAddr| family.admits(ip) && svc.ip_families.admits(ip);
    if !svc.vips.is_empty() {
        return Some(svc.vips.iter().copied().filter(admits).collect());
    }
    if !svc.hostname.ends_with(&format!(".svc.{cluster_domain}")) {
        return None;
    }
    let endpoints = svc.endpoints.iter().filter_map(|e| {
        let w = snap.workload_by_uid(&e.workload_uid)?;
        w.addresses.iter().copied().find(admits)
    });
    Some(endpoints.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, IpFamilies, Mesh, Workload};

    const CD: &str = "cluster.local";

    fn service(ns: &str, hostname: &str, vips: &[&str]) -> Service {
        Service {
            load_balancing: None,
            name: hostname.split('.').next().unwrap_or_default().into(),
            namespace: ns.into(),
            hostname: hostname.into(),
            vips: vips.iter().map(|v| v.parse().unwrap()).collect(),
            ports: Vec::new(),
            endpoints: Vec::new(),
            subject_alt_names: Vec::new(),
            visibility: Default::default(),
            ip_families: Default::default(),
            waypoint: None,
        }
    }

    fn snapshot() -> Snapshot {
        let mut headless = service("ns1", "db.ns1.svc.cluster.local", &[]);
        headless.endpoints = vec![
            Endpoint {
                workload_uid: "db-0".into(),
            },
            Endpoint {
                workload_uid: "db-1".into(),
            },
        ];
        let workload = |uid: &str, ip: &str| Workload::for_test(uid, "ns1", Some(ip));
        // exportTo: [.] in ns2: invisible from ns1.
        let mut private = service("ns2", "private.ns2.svc.cluster.local", &["10.0.0.3"]);
        private.visibility = crate::state::Visibility::Namespace;
        Snapshot::new(Mesh {
            workloads: vec![workload("db-0", "10.1.0.1"), workload("db-1", "10.1.0.2")],
            services: vec![
                service(
                    "ns1",
                    "productpage.ns1.svc.cluster.local",
                    &["10.0.0.1", "fd00::1"],
                ),
                service("ns2", "example.ns2.svc.cluster.local", &["10.0.0.2"]),
                private,
                service("ns1", "api.example.com", &["240.240.0.1"]),
                service("ns1", "*.wild.example", &["240.240.0.2"]),
                service("ns1", "novip.example.com", &[]),
                headless,
            ],
            ..Mesh::default()
        })
    }

    /// Facts from ztunnel's DNS tests (src/dns/server.rs): which names a
    /// client in ns1 gets answered locally, and how.
    #[test]
    fn names_as_ztunnel_answers_them() {
        let snap = snapshot();
        let v4 = |ip: &str| vec![ip.parse::<IpAddr>().unwrap()];
        // (asked, expected owner and CNAME, or None = forwarded)
        type Case<'a> = (&'a str, Option<(&'a str, bool, Vec<IpAddr>)>);
        let cases: &[Case] = &[
            ("productpage", Some(("productpage", false, v4("10.0.0.1")))),
            (
                "productpage.ns1",
                Some(("productpage.ns1", false, v4("10.0.0.1"))),
            ),
            (
                "productpage.ns1.svc",
                Some(("productpage.ns1.svc", false, v4("10.0.0.1"))),
            ),
            (
                "productpage.ns1.svc.cluster.local",
                Some(("productpage.ns1.svc.cluster.local", false, v4("10.0.0.1"))),
            ),
            // ndots misses: the search domain comes off, behind a CNAME.
            (
                "productpage.ns1.svc.cluster.local.ns1.svc.cluster.local",
                Some(("productpage.ns1.svc.cluster.local", true, v4("10.0.0.1"))),
            ),
            (
                "productpage.ns1.svc.cluster.local.cluster.local",
                Some(("productpage.ns1.svc.cluster.local", true, v4("10.0.0.1"))),
            ),
            (
                "productpage.ns1.svc.cluster.local.svc.cluster.local",
                Some(("productpage.ns1.svc.cluster.local", true, v4("10.0.0.1"))),
            ),
            (
                "productpage.ns1.ns1.svc.cluster.local",
                Some(("productpage.ns1", true, v4("10.0.0.1"))),
            ),
            // Another namespace: by name.ns only; a short name means the
            // client's namespace, so it is not a mesh name here.
            ("example.ns2", Some(("example.ns2", false, v4("10.0.0.2")))),
            ("example", None),
            // A namespace-scoped service of another namespace is not
            // visible (ztunnel: the query goes upstream).
            ("private.ns2", None),
            ("private.ns2.svc.cluster.local", None),
            // A search domain of another namespace is not stripped.
            ("example.ns2.svc.cluster.local.ns2.svc.cluster.local", None),
            // ServiceEntry hosts and wildcards.
            (
                "api.example.com",
                Some(("api.example.com", false, v4("240.240.0.1"))),
            ),
            (
                "a.wild.example",
                Some(("a.wild.example", false, v4("240.240.0.2"))),
            ),
            ("wild.example", None),
            // No VIP and not a Kubernetes service: upstream's.
            ("novip.example.com", None),
            // Headless: the endpoints.
            (
                "db.ns1.svc.cluster.local",
                Some((
                    "db.ns1.svc.cluster.local",
                    false,
                    vec!["10.1.0.1".parse().unwrap(), "10.1.0.2".parse().unwrap()],
                )),
            ),
            ("google.com", None),
        ];
        for (asked, want) in cases {
            let got = resolve(&snap, "ns1", CD, asked, Family::V4);
            let want = want.as_ref().map(|(owner, cname, addrs)| Found {
                owner: owner.to_string(),
                cname: *cname,
                addrs: addrs.clone(),
            });
            assert_eq!(got, want, "{asked}");
        }
    }

    #[test]
    fn a_namespace_scoped_service_resolves_in_its_own_namespace() {
        let snap = snapshot();
        let found = resolve(&snap, "ns2", CD, "private", Family::V4).expect("visible");
        assert_eq!(found.addrs, vec!["10.0.0.3".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn the_family_picks_the_addresses_and_a_mesh_name_stays_one_without_them() {
        let snap = snapshot();
        let six = resolve(&snap, "ns1", CD, "productpage", Family::V6).expect("mesh name");
        assert_eq!(six.addrs, vec!["fd00::1".parse::<IpAddr>().unwrap()]);
        let none = resolve(&snap, "ns1", CD, "api.example.com", Family::V6).expect("mesh name");
        assert!(none.addrs.is_empty());
    }

    /// ztunnel's "headless-ipv6" cases: a single-stack service answers
    /// no query of the other family (empty, still authoritative), even
    /// when its pods are dual-stack.
    #[test]
    fn a_single_stack_service_answers_only_its_family() {
        let dual = |uid: &str, v4: &str, v6: &str| {
            let mut w = Workload::for_test(uid, "ns1", Some(v4));
            w.addresses.push(v6.parse().unwrap());
            w
        };
        let headless = |name: &str, families| {
            let mut s = service("ns1", name, &[]);
            s.endpoints = vec![Endpoint {
                workload_uid: "db-0".into(),
            }];
            s.ip_families = families;
            s
        };
        let snap = Snapshot::new(Mesh {
            workloads: vec![dual("db-0", "10.1.0.1", "fd01::1")],
            services: vec![
                headless("six.ns1.svc.cluster.local", IpFamilies::V6Only),
                headless("four.ns1.svc.cluster.local", IpFamilies::V4Only),
                headless("both.ns1.svc.cluster.local", IpFamilies::Dual),
                headless("auto.ns1.svc.cluster.local", IpFamilies::Automatic),
            ],
            ..Mesh::default()
        });
        let addrs = |name: &str, family| -> Vec<String> {
            let found = resolve(&snap, "ns1", CD, name, family).expect("a mesh name");
            found.addrs.iter().map(|ip| ip.to_string()).collect()
        };
        let none: Vec<String> = Vec::new();
        assert_eq!(addrs("six", Family::V6), ["fd01::1"]);
        assert_eq!(addrs("six", Family::V4), none);
        assert_eq!(addrs("four", Family::V4), ["10.1.0.1"]);
        assert_eq!(addrs("four", Family::V6), none);
        for name in ["both", "auto"] {
            assert_eq!(addrs(name, Family::V4), ["10.1.0.1"], "{name}");
            assert_eq!(addrs(name, Family::V6), ["fd01::1"], "{name}");
        }
    }

    #[test]
    fn expansions_by_label_count() {
        let cases: &[(&str, &[&str])] = &[
            ("a", &["a.ns.svc.cluster.local"]),
            (
                "a.b",
                &["a.b.svc.cluster.local", "a.b.ns.svc.cluster.local"],
            ),
            (
                "a.b.svc",
                &["a.b.svc.cluster.local", "a.b.svc.svc.cluster.local"],
            ),
            ("a.b.c", &["a.b.c.svc.cluster.local"]),
            ("a.b.c.svc", &["a.b.c.svc.cluster.local"]),
            ("a.b.c.d", &[]),
            ("a.b.c.d.e", &[]),
        ];
        for (name, want) in cases {
            assert_eq!(kube_fqdns("ns", CD, name), *want, "{name}");
        }
    }
}
