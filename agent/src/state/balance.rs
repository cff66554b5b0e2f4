//! Which of a service's endpoints a connection may go to: the service's
//! health policy, then its routing preference (Istio's `LoadBalancing`):
//! endpoints ranked by how closely they share the client's network,
//! locality, node and cluster, the closest tier kept. Capacity weights
//! within the tier are [`route`](super::route)'s.

use std::sync::Arc;

use super::Workload;

/// A scope of routing preference (Istio's `LoadBalancing.Scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
    /// A scope newer than this agent: it never counts as shared, so under
    /// `STRICT` nothing is chosen rather than something too far away.
    Unknown(i32),
}

/// How strictly the preference holds (Istio's `LoadBalancing.Mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// No preference: every eligible endpoint.
    #[default]
    Standard,
    /// Only endpoints that share every scope listed.
    Strict,
    /// The endpoints that share the most scopes, in the order listed.
    Failover,
    /// No endpoint is chosen: the connection goes to the address dialed.
    Passthrough,
}

/// Whether unhealthy endpoints may be chosen (Istio's `HealthPolicy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

/// A service's endpoint selection policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadBalancing {
    pub routing_preference: Vec<LbScope>,
    pub mode: LbMode,
    pub health_policy: HealthPolicy,
}

impl LoadBalancing {
    /// Whether `w`'s health lets it be chosen.
    pub fn admits(lb: Option<&LoadBalancing>, w: &Workload) -> bool {
        w.healthy || lb.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll)
    }

    /// The closest tier of `candidates` for a client `source` (ztunnel's
    /// `load_balance`): each endpoint's rank is the number of listed scopes
    /// it shares with the source, counted in order up to the first it does
    /// not share. When `Network` is listed first it is a tier of its own
    /// above all the others: an endpoint on the source's network outranks
    /// every endpoint off it, and one off it is still ranked by the other
    /// scopes. `Strict` drops an endpoint that does not share every scope;
    /// then only the highest rank is kept. Without a source nothing is
    /// shared.
    pub fn tier<'a>(
        &self,
        source: Option<&Workload>,
        candidates: Vec<&'a Arc<Workload>>,
    ) -> Vec<&'a Arc<Workload>> {
        if matches!(self.mode, LbMode::Standard | LbMode::Passthrough) {
            return candidates;
        }
        let prefs = &self.routing_preference;
        let network_first = prefs.first() == Some(&LbScope::Network);
        let ranked: Vec<(usize, &Arc<Workload>)> = candidates
            .into_iter()
            .filter_map(|w| {
                let mut rank = 0;
                let mut bonus = 0;
                for scope in prefs {
                    let shared = source.is_some_and(|src| shares(*scope, src, w));
                    if network_first && *scope == LbScope::Network {
                        if !shared {
                            continue;
                        }
                        bonus = prefs.len() - 1;
                    }
                    if !shared {
                        break;
                    }
                    rank += 1;
                }
                if self.mode == LbMode::Strict && rank != prefs.len() {
                    return None;
                }
                Some((rank + bonus, w))
            })
            .collect();
        let Some(best) = ranked.iter().map(|(r, _)| *r).max() else {
            return Vec::new();
        };
        ranked
            .into_iter()
            .filter(|(r, _)| *r == best)
            .map(|(_, w)| w)
            .collect()
    }
}

/// Whether `a` and `b` are alike in `scope`.
fn shares(scope: LbScope, a: &Workload, b: &Workload) -> bool {
    let (ta, tb) = (&a.telemetry, &b.telemetry);
    match scope {
        LbScope::Region => ta.region == tb.region,
        LbScope::Zone => ta.zone == tb.zone,
        LbScope::Subzone => ta.subzone == tb.subzone,
        LbScope::Node => a.node == b.node,
        LbScope::Cluster => ta.cluster == tb.cluster,
        LbScope::Network => a.network_name() == b.network_name(),
        LbScope::Unknown(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Network, Telemetry};

    /// A workload at `place`: `network/region/zone/subzone/node/cluster`.
    fn at(uid: &str, place: &str) -> Arc<Workload> {
        let p: Vec<&str> = place.split('/').collect();
        let network = (!p[0].is_empty()).then(|| {
            Arc::new(Network {
                name: p[0].into(),
                gateway: None,
            })
        });
        Arc::new(Workload {
            node: p[4].into(),
            telemetry: Arc::new(Telemetry {
                region: p[1].into(),
                zone: p[2].into(),
                subzone: p[3].into(),
                cluster: p[5].into(),
                ..Telemetry::default()
            }),
            network,
            ..Workload::for_test(uid, "ns", None)
        })
    }

    fn lb(mode: LbMode, prefs: &[LbScope]) -> LoadBalancing {
        LoadBalancing {
            routing_preference: prefs.to_vec(),
            mode,
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }

    /// ztunnel (src/state.rs, `load_balance`): rank = scopes shared, in
    /// order, up to the first not shared; `STRICT` keeps only full
    /// matches; the highest rank wins; a leading `NETWORK` outranks the
    /// rest and does not stop the count when not shared.
    #[test]
    fn the_closest_tier_is_kept() {
        use LbMode::*;
        use LbScope::*;
        let src = at("src", "n1/r1/z1/s1/node1/c1");
        let eps = [
            at("same-zone", "n1/r1/z1/s2/node2/c1"),
            at("same-region", "n1/r1/z2/s1/node3/c1"),
            at("far", "n1/r2/z1/s1/node4/c1"),
            at("other-net-same-zone", "n2/r1/z1/s1/node5/c1"),
            at("same-node", "n1/r1/z1/s1/node1/c1"),
        ];
        // Mode, preference, endpoints offered, the tier expected.
        type Case<'a> = (LbMode, &'a [LbScope], &'a [&'a str], &'a [&'a str]);
        let cases: &[Case] = &[
            // FAILOVER: the closest tier, spilling over when it is empty.
            (
                Failover,
                &[Region, Zone],
                &["same-zone", "same-region", "far"],
                &["same-zone"],
            ),
            (
                Failover,
                &[Region, Zone],
                &["same-region", "far"],
                &["same-region"],
            ),
            (Failover, &[Region, Zone], &["far"], &["far"]),
            (
                Failover,
                &[Region, Zone, Subzone, Node],
                &["same-zone", "same-node"],
                &["same-node"],
            ),
            // The count stops at the first scope not shared: same zone but
            // another region shares nothing.
            (
                Failover,
                &[Region, Zone],
                &["far", "same-region"],
                &["same-region"],
            ),
            // STRICT: full matches only, never spilling over.
            (
                Strict,
                &[Region, Zone],
                &["same-zone", "same-region"],
                &["same-zone"],
            ),
            (Strict, &[Region, Zone], &["same-region", "far"], &[]),
            (
                Strict,
                &[Region],
                &["same-zone", "same-region", "far"],
                &["same-zone", "same-region"],
            ),
            // A leading NETWORK: same network first, whatever the rest.
            (
                Failover,
                &[Network, Region, Zone],
                &["other-net-same-zone", "far"],
                &["far"],
            ),
            (
                Failover,
                &[Network, Region, Zone],
                &["other-net-same-zone"],
                &["other-net-same-zone"],
            ),
            // NETWORK not first is an ordinary scope.
            (
                Failover,
                &[Region, Zone, Network],
                &["other-net-same-zone", "far"],
                &["other-net-same-zone"],
            ),
            (Strict, &[Network, Region], &["other-net-same-zone"], &[]),
            // No preference, or STANDARD: every candidate.
            (Failover, &[], &["same-zone", "far"], &["same-zone", "far"]),
            (
                Standard,
                &[Region, Zone],
                &["same-zone", "far"],
                &["same-zone", "far"],
            ),
            // A scope this agent does not know is never shared.
            (Strict, &[Unknown(99)], &["same-node"], &[]),
            (
                Failover,
                &[Unknown(99), Region],
                &["same-zone", "far"],
                &["same-zone", "far"],
            ),
            // Cluster and node.
            (
                Strict,
                &[Cluster, Node],
                &["same-zone", "same-node"],
                &["same-node"],
            ),
        ];
        for (mode, prefs, offered, want) in cases {
            let candidates: Vec<&Arc<Workload>> = eps
                .iter()
                .filter(|w| offered.contains(&w.uid.as_str()))
                .collect();
            let mut got: Vec<&str> = lb(*mode, prefs)
                .tier(Some(&src), candidates)
                .into_iter()
                .map(|w| w.uid.as_str())
                .collect();
            got.sort_unstable();
            let mut want = want.to_vec();
            want.sort_unstable();
            assert_eq!(got, want, "{mode:?} {prefs:?} of {offered:?}");
        }
    }

    #[test]
    fn without_a_source_nothing_is_shared() {
        let eps = [at("a", "n1/r1/z1/s1/node1/c1")];
        let candidates: Vec<&Arc<Workload>> = eps.iter().collect();
        let strict = lb(LbMode::Strict, &[LbScope::Region]);
        assert!(strict.tier(None, candidates.clone()).is_empty());
        let failover = lb(LbMode::Failover, &[LbScope::Region]);
        assert_eq!(failover.tier(None, candidates).len(), 1);
    }

    /// ztunnel (src/state/service.rs, `should_include_endpoint`): an
    /// unhealthy endpoint only under `ALLOW_ALL`.
    #[test]
    fn health_policy() {
        let sick = Workload {
            healthy: false,
            ..Workload::for_test("sick", "ns", None)
        };
        let well = Workload::for_test("well", "ns", None);
        let allow_all = LoadBalancing {
            health_policy: HealthPolicy::AllowAll,
            ..LoadBalancing::default()
        };
        assert!(!LoadBalancing::admits(None, &sick));
        assert!(!LoadBalancing::admits(
            Some(&LoadBalancing::default()),
            &sick
        ));
        assert!(LoadBalancing::admits(Some(&allow_all), &sick));
        assert!(LoadBalancing::admits(None, &well));
    }
}
