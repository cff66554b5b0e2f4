//! Deciding where an outbound connection goes: which workload, over which
//! tunnel, expecting which identities.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::seq::IndexedRandom;

use super::{Service, Snapshot, TunnelProtocol, Workload};
use crate::identity::Identity;

/// What the original destination address names.
#[derive(Clone, Debug)]
pub enum Destination {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    /// Not an address of the mesh.
    Unknown,
}

/// How to carry one outbound connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Tunnel through HBONE to `gateway` (the destination's agent) asking
    /// for `target`; the peer must prove one of `identities`.
    Hbone {
        gateway: SocketAddr,
        target: SocketAddr,
        identities: Vec<Identity>,
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
    },
    /// Plain TCP to `target`.
    Passthrough {
        target: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
    /// Refused: the address belongs to the mesh but cannot be served.
    Unreachable(String),
}

impl Snapshot {
    /// What `dst` names: a workload IP first, then a service VIP.
    pub fn destination(&self, dst: SocketAddr) -> Destination {
        if let Some(w) = self.workload_by_ip(dst.ip()) {
            Destination::Workload(w.clone())
        } else if let Some(s) = self.service_by_vip(dst.ip()) {
            Destination::Service(s.clone())
        } else {
            Destination::Unknown
        }
    }

    /// Chooses how to carry a connection to `dst`, tunneling to the peer's
    /// agent on `hbone_port`.
    pub fn route(&self, dst: SocketAddr, hbone_port: u16) -> Route {
        match self.destination(dst) {
            Destination::Unknown => Route::Passthrough {
                target: dst,
                workload: None,
                service: None,
            },
            Destination::Workload(w) => workload_route(w, dst.port(), None, hbone_port),
            Destination::Service(s) => {
                let Some(target_port) = s.target_port(dst.port()) else {
                    return Route::Unreachable(format!(
                        "service {}/{} has no port {}",
                        s.namespace,
                        s.hostname,
                        dst.port()
                    ));
                };
                match self.choose_endpoint(&s, dst.ip().is_ipv4()) {
                    Some(w) => workload_route(w, target_port, Some(s), hbone_port),
                    None => Route::Unreachable(format!(
                        "service {}/{} has no healthy endpoint",
                        s.namespace, s.hostname
                    )),
                }
            }
        }
    }

    /// A healthy endpoint of `service` with an address of the wanted family,
    /// chosen at random so load spreads across endpoints.
    pub fn choose_endpoint(&self, service: &Service, want_v4: bool) -> Option<Arc<Workload>> {
        let candidates: Vec<&Arc<Workload>> = service
            .endpoints
            .iter()
            .filter_map(|e| self.workload_by_uid(&e.workload_uid))
            .filter(|w| w.healthy && pick_address(w, want_v4).is_some())
            .collect();
        candidates.choose(&mut rand::rng()).map(|w| (*w).clone())
    }
}

/// The workload's first address of the wanted family, else its first.
fn pick_address(w: &Workload, want_v4: bool) -> Option<std::net::IpAddr> {
    w.addresses
        .iter()
        .find(|a| a.is_ipv4() == want_v4)
        .or_else(|| w.addresses.first())
        .copied()
}

fn workload_route(
    w: Arc<Workload>,
    port: u16,
    service: Option<Arc<Service>>,
    hbone_port: u16,
) -> Route {
    let Some(ip) = pick_address(&w, true) else {
        return Route::Unreachable(format!("workload {} has no address", w.uid));
    };
    let target = SocketAddr::new(ip, port);
    match w.protocol {
        TunnelProtocol::None => Route::Passthrough {
            target,
            workload: Some(w),
            service,
        },
        TunnelProtocol::Hbone => {
            let mut identities = vec![w.identity()];
            if let Some(s) = &service {
                identities.extend(s.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
            }
            Route::Hbone {
                gateway: SocketAddr::new(ip, hbone_port),
                target,
                identities,
                workload: w,
                service,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, Mesh, ServicePort};

    fn wl(uid: &str, ip: &str, protocol: TunnelProtocol, healthy: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            service_account: uid.into(),
            trust_domain: "td".into(),
            addresses: vec![ip.parse().unwrap()],
            node: "n1".into(),
            netns: None,
            cgroup: None,
            protocol,
            application_tunnel: Default::default(),
            waypoint: None,
            healthy,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot::new(Mesh {
            workloads: vec![
                wl("a", "10.0.0.1", TunnelProtocol::Hbone, true),
                wl("b", "10.0.0.2", TunnelProtocol::None, true),
                wl("sick", "10.0.0.3", TunnelProtocol::Hbone, false),
            ],
            services: vec![
                Service {
                    name: "svc".into(),
                    namespace: "ns".into(),
                    hostname: "svc.ns.svc.cluster.local".into(),
                    vips: vec!["10.96.0.1".parse().unwrap()],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 8080,
                    }],
                    endpoints: vec![
                        Endpoint {
                            workload_uid: "a".into(),
                        },
                        Endpoint {
                            workload_uid: "sick".into(),
                        },
                    ],
                    subject_alt_names: vec!["spiffe://td/ns/ns/sa/extra".into()],
                    waypoint: None,
                },
                Service {
                    name: "empty".into(),
                    namespace: "ns".into(),
                    hostname: "empty".into(),
                    vips: vec!["10.96.0.2".parse().unwrap()],
                    ports: vec![ServicePort {
                        port: 80,
                        target_port: 0,
                    }],
                    endpoints: vec![Endpoint {
                        workload_uid: "sick".into(),
                    }],
                    subject_alt_names: vec![],
                    waypoint: None,
                },
            ],
            policies: vec![],
        })
    }

    #[test]
    fn routes() {
        let snap = snapshot();
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // Mesh workload: HBONE to its agent, same port.
        match snap.route(sa("10.0.0.1:9000"), 15008) {
            Route::Hbone {
                gateway,
                target,
                identities,
                ..
            } => {
                assert_eq!(gateway, sa("10.0.0.1:15008"));
                assert_eq!(target, sa("10.0.0.1:9000"));
                assert_eq!(identities, vec![Identity::new("td", "ns", "a")]);
            }
            r => panic!("unexpected {r:?}"),
        }
        // Workload outside the mesh: plain TCP.
        assert!(matches!(
            snap.route(sa("10.0.0.2:9000"), 15008),
            Route::Passthrough { target, workload: Some(_), .. } if target == sa("10.0.0.2:9000")
        ));
        // Unknown address: plain TCP, untouched.
        assert!(matches!(
            snap.route(sa("192.0.2.1:443"), 15008),
            Route::Passthrough { target, workload: None, .. } if target == sa("192.0.2.1:443")
        ));
        // Service VIP: the healthy endpoint, mapped port, service SANs.
        for _ in 0..20 {
            match snap.route(sa("10.96.0.1:80"), 15008) {
                Route::Hbone {
                    gateway,
                    target,
                    identities,
                    service,
                    ..
                } => {
                    assert_eq!(gateway, sa("10.0.0.1:15008"));
                    assert_eq!(target, sa("10.0.0.1:8080"));
                    assert_eq!(identities.len(), 2);
                    assert!(service.is_some());
                }
                r => panic!("unexpected {r:?}"),
            }
        }
        // Port the service does not expose, and a service with no healthy endpoint.
        assert!(matches!(
            snap.route(sa("10.96.0.1:81"), 15008),
            Route::Unreachable(_)
        ));
        assert!(matches!(
            snap.route(sa("10.96.0.2:80"), 15008),
            Route::Unreachable(_)
        ));
    }
}
