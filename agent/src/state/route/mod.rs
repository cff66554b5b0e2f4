//! Deciding where an outbound connection goes: which workload, over which
//! tunnel, expecting which identities.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::seq::IndexedRandom;

use super::{
    GatewayAddress, GatewayTarget, IpFamilies, LbMode, LoadBalancing, Name, Service, Snapshot,
    TunnelProtocol, Workload,
};
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
    /// Through another network's east-west gateway (double HBONE): an
    /// outer tunnel to `gateway`, which must prove one of
    /// `gateway_identities`, asking for `service`'s hostname and `port`;
    /// inside it, mTLS end to end with the destination, which must prove
    /// one of `identities`, asking for the same. The gateway picks the
    /// endpoint; `workload` is the one chosen here, for the record.
    DoubleHbone {
        gateway: SocketAddr,
        gateway_identities: Vec<Identity>,
        port: u16,
        identities: Vec<Identity>,
        workload: Arc<Workload>,
        service: Arc<Service>,
    },
    /// `workload` has no address but a DNS name (a ServiceEntry with DNS
    /// resolution): its address is looked up when connecting (the dialed
    /// family preferred), then the connection goes as
    /// [`Route::to_address`] says for it.
    Lookup {
        hostname: Name,
        port: u16,
        dialed: IpAddr,
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
    /// agent on `hbone_port`, for a source outside the mesh's waypoints.
    pub fn route(&self, dst: SocketAddr, hbone_port: u16) -> Route {
        self.route_from(None, dst, hbone_port)
    }

    /// Chooses how to carry a connection from `source` to `dst` (DESIGN §5):
    /// a service's waypoint first, then the chosen workload's waypoint, else
    /// straight to the workload's agent, or plain TCP outside the mesh. A
    /// waypoint's own traffic is never sent back to it.
    pub fn route_from(&self, source: Option<&Workload>, dst: SocketAddr, hbone_port: u16) -> Route {
        let via = |wp: &GatewayAddress| source.is_none_or(|src| !self.is_waypoint(src, wp));
        let (w, port, service) = match self.destination(dst) {
            Destination::Unknown => {
                return Route::Passthrough {
                    target: dst,
                    workload: None,
                    service: None,
                }
            }
            Destination::Workload(w) => (w, dst.port(), None),
            Destination::Service(s) => {
                let Some(target_port) = s.target_port(dst.port()) else {
                    return Route::Unreachable(format!(
                        "service {}/{} has no port {}",
                        s.namespace,
                        s.hostname,
                        dst.port()
                    ));
                };
                if let Some(wp) = s.waypoint.clone().filter(|wp| via(wp)) {
                    // The waypoint picks the endpoint; it is asked for the VIP.
                    return self.waypoint_route(&wp, dst, Some(s), dst.ip(), source);
                }
                if s.load_balancing
                    .as_ref()
                    .is_some_and(|lb| lb.mode == LbMode::Passthrough)
                {
                    // The service asks for no endpoint selection.
                    return Route::Passthrough {
                        target: dst,
                        workload: None,
                        service: Some(s),
                    };
                }
                match self.choose_endpoint(&s, dst.ip(), source, Reach::ViaGateways) {
                    Some(w) => (w, target_port, Some(s)),
                    None => {
                        return Route::Unreachable(format!(
                            "service {}/{} has no healthy endpoint",
                            s.namespace, s.hostname
                        ))
                    }
                }
            }
        };
        if let Some(src) = source.filter(|src| src.network_name() != w.network_name()) {
            // Only through the other network's gateway: its addresses may
            // mean something else here, so nothing is sent to them.
            return match service {
                Some(s) => self.through_gateway(w, s, dst),
                None => Route::Unreachable(format!(
                    "workload {} is on network {:?}, not {:?}: another network is reached by a service, not a workload address",
                    w.uid,
                    w.network_name(),
                    src.network_name()
                )),
            };
        }
        let families = service
            .as_ref()
            .map_or(IpFamilies::Automatic, |s| s.ip_families);
        let Some(ip) = pick_address(&w, dst.ip(), families) else {
            if let Some(hostname) = w.hostname.clone() {
                if w.waypoint.as_ref().is_some_and(|wp| via(wp)) {
                    return Route::Unreachable(format!(
                        "workload {} is known by name only and has a waypoint: not supported",
                        w.uid
                    ));
                }
                return Route::Lookup {
                    hostname,
                    port,
                    dialed: dst.ip(),
                    workload: w,
                    service,
                };
            }
            return Route::Unreachable(format!(
                "workload {} has no address{}",
                w.uid,
                service.as_ref().map_or(String::new(), |s| format!(
                    " that service {}/{} serves",
                    s.namespace, s.hostname
                ))
            ));
        };
        let target = SocketAddr::new(ip, port);
        if let Some(wp) = w.waypoint.clone().filter(|wp| via(wp)) {
            return self.waypoint_route(&wp, target, service, dst.ip(), source);
        }
        workload_route(w, target, service, hbone_port)
    }

    /// Double HBONE to `w`, an endpoint of `service` on another network
    /// than `source`'s, through that network's gateway; `dst` is what the
    /// client dialed (a VIP of `service`).
    fn through_gateway(&self, w: Arc<Workload>, service: Arc<Service>, dst: SocketAddr) -> Route {
        let Some(gw) = w.network_gateway() else {
            return Route::Unreachable(format!(
                "workload {} is on network {:?}, which has no gateway",
                w.uid,
                w.network_name()
            ));
        };
        let Some((gateway, gateway_identities)) = self.network_gateway(gw, dst.ip()) else {
            return Route::Unreachable(format!(
                "the gateway {:?} of network {:?} is not in the mesh",
                gw.target,
                w.network_name()
            ));
        };
        if w.protocol != TunnelProtocol::Hbone {
            return Route::Unreachable(format!(
                "workload {} on network {:?} does not take HBONE, the only way through its gateway",
                w.uid,
                w.network_name()
            ));
        }
        // ztunnel expects the service's SANs only (and fails without
        // any); the service's endpoints on that network are who the
        // gateway may pick, and the control plane names them too.
        let mut identities: Vec<Identity> = service
            .subject_alt_names
            .iter()
            .filter_map(|s| s.parse().ok())
            .chain(
                service
                    .endpoints
                    .iter()
                    .filter_map(|e| self.workload_by_uid(&e.workload_uid))
                    .filter(|e| e.network_name() == w.network_name())
                    .map(|e| e.identity()),
            )
            .collect();
        identities.sort();
        identities.dedup();
        debug_assert!(!identities.is_empty(), "w is an endpoint on the network");
        Route::DoubleHbone {
            gateway,
            gateway_identities,
            port: dst.port(),
            identities,
            workload: w,
            service,
        }
    }

    /// Where network gateway `gw` is reached (for a client that dialed
    /// `dialed`) and who it must prove to be: a gateway workload named by
    /// address, or one chosen among the endpoints of the gateway service
    /// named by address or hostname, with that service's SANs (ztunnel's
    /// `fetch_network_gateway`).
    fn network_gateway(
        &self,
        gw: &GatewayAddress,
        dialed: IpAddr,
    ) -> Option<(SocketAddr, Vec<Identity>)> {
        let (service, ip) = match &gw.target {
            GatewayTarget::Address(ip) => {
                if let Some(w) = self.workload_by_ip(*ip) {
                    return Some((SocketAddr::new(*ip, gw.hbone_port), vec![w.identity()]));
                }
                (self.service_by_vip(*ip)?, *ip)
            }
            GatewayTarget::Service {
                namespace,
                hostname,
            } => (self.service_by_host(namespace, hostname)?, dialed),
        };
        let w = self.choose_endpoint(service, ip, None, Reach::Local)?;
        let ip = pick_address(&w, ip, service.ip_families)?;
        let identities = service
            .subject_alt_names
            .iter()
            .filter_map(|s| s.parse().ok())
            .chain(std::iter::once(w.identity()))
            .collect();
        Some((SocketAddr::new(ip, gw.hbone_port), identities))
    }

    /// A tunnel to waypoint `wp` asking it for `target`; the waypoint is
    /// reached in the family of `dialed` where it has such an address.
    fn waypoint_route(
        &self,
        wp: &GatewayAddress,
        target: SocketAddr,
        service: Option<Arc<Service>>,
        dialed: IpAddr,
        source: Option<&Workload>,
    ) -> Route {
        let waypoint = match &wp.target {
            GatewayTarget::Address(ip) => self.workload_by_ip(*ip).cloned(),
            GatewayTarget::Service {
                namespace,
                hostname,
            } => self
                .service_by_host(namespace, hostname)
                .and_then(|s| self.choose_endpoint(s, dialed, None, Reach::Local)),
        };
        let Some(waypoint) = waypoint else {
            return Route::Unreachable(format!("waypoint {:?} has no healthy workload", wp.target));
        };
        if let Some(src) = source.filter(|src| src.network_name() != waypoint.network_name()) {
            // ztunnel reaches such a waypoint through the gateway; not yet
            // here, and never directly.
            return Route::Unreachable(format!(
                "waypoint {} is on network {:?}, not {:?}: not reachable yet",
                waypoint.uid,
                waypoint.network_name(),
                src.network_name()
            ));
        }
        let ip = match wp.target {
            // The address the waypoint is named by, whatever its family.
            GatewayTarget::Address(ip) => Some(ip),
            GatewayTarget::Service { .. } => pick_address(&waypoint, dialed, IpFamilies::Automatic),
        };
        let Some(ip) = ip else {
            return Route::Unreachable(format!("waypoint {} has no address", waypoint.uid));
        };
        Route::Hbone {
            gateway: SocketAddr::new(ip, wp.hbone_port),
            target,
            identities: vec![waypoint.identity()],
            workload: waypoint,
            service,
        }
    }

    /// Whether `w` is (one of the workloads of) waypoint `wp`.
    pub fn is_waypoint(&self, w: &Workload, wp: &GatewayAddress) -> bool {
        match &wp.target {
            GatewayTarget::Address(ip) => w.addresses.contains(ip),
            GatewayTarget::Service {
                namespace,
                hostname,
            } => self
                .service_by_host(namespace, hostname)
                .is_some_and(|s| s.endpoints.iter().any(|e| e.workload_uid == w.uid)),
        }
    }

    /// The identities of the waypoints `w` must be reached through (its
    /// own and those of the services it backs); empty when none.
    pub fn waypoint_identities(&self, w: &Workload) -> Vec<Identity> {
        let services = self
            .waypointed_services_of(&w.uid)
            .iter()
            .filter_map(|s| s.waypoint.as_ref());
        let mut ids: Vec<Identity> = w
            .waypoint
            .iter()
            .chain(services)
            .flat_map(|wp| self.waypoint_workloads(wp))
            .map(|wl| wl.identity())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn waypoint_workloads(&self, wp: &GatewayAddress) -> Vec<Arc<Workload>> {
        match &wp.target {
            GatewayTarget::Address(ip) => self.workload_by_ip(*ip).cloned().into_iter().collect(),
            GatewayTarget::Service {
                namespace,
                hostname,
            } => self
                .service_by_host(namespace, hostname)
                .map(|s| {
                    s.endpoints
                        .iter()
                        .filter_map(|e| self.workload_by_uid(&e.workload_uid).cloned())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// An endpoint of `service` for a connection from `source` to
    /// `dialed`: one its health policy admits, with an address the service
    /// serves (the dialed family preferred, see [`pick_address`]) on the
    /// source's network or, as `reach` allows, on another network that has
    /// a gateway; in the closest tier of its routing preference
    /// ([`LoadBalancing::tier`]); at random by capacity within it.
    pub fn choose_endpoint(
        &self,
        service: &Service,
        dialed: IpAddr,
        source: Option<&Workload>,
        reach: Reach,
    ) -> Option<Arc<Workload>> {
        let lb = service.load_balancing.as_deref();
        let reachable = |w: &Workload| {
            let local = source.is_none_or(|src| src.network_name() == w.network_name());
            if local {
                // An address, or a name to look one up by (ztunnel's
                // `load_balance`: a hostname counts as an address).
                pick_address(w, dialed, service.ip_families).is_some() || w.hostname.is_some()
            } else {
                // Through its gateway, whatever its addresses (a remote
                // workload may have none); without one, not at all.
                reach == Reach::ViaGateways && w.network_gateway().is_some()
            }
        };
        let candidates: Vec<&Arc<Workload>> = service
            .endpoints
            .iter()
            .filter_map(|e| self.workload_by_uid(&e.workload_uid))
            .filter(|w| LoadBalancing::admits(lb, w))
            .filter(|w| reachable(w))
            .collect();
        match lb {
            Some(lb) => choose_weighted(&lb.tier(source, candidates)),
            None => choose_weighted(&candidates),
        }
    }
}

/// Which endpoints [`Snapshot::choose_endpoint`] may pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Only those on the source's network (a gateway's own endpoints).
    Local,
    /// Also those on other networks with a gateway (double HBONE).
    ViaGateways,
}

/// One of `candidates`, at random in proportion to their capacity (all
/// alike when every capacity is 0).
pub(super) fn choose_weighted(candidates: &[&Arc<Workload>]) -> Option<Arc<Workload>> {
    let mut rng = rand::rng();
    candidates
        .choose_weighted(&mut rng, |w| w.capacity)
        .or_else(|_| candidates.choose(&mut rng).ok_or(()))
        .ok()
        .map(|w| (*w).clone())
}

/// Which of `w`'s addresses a connection the client dialed to `dialed`
/// goes to, as ztunnel chooses (state.rs `pick_workload_destination`):
/// `dialed` itself when it is one of them; else, among those `families`
/// admits, the first of `dialed`'s family, else the first of any (so a
/// single-stack endpoint of a dual-stack service is still reached).
pub fn pick_address(w: &Workload, dialed: IpAddr, families: IpFamilies) -> Option<IpAddr> {
    if w.addresses.contains(&dialed) {
        return Some(dialed);
    }
    let mut admitted = w.addresses.iter().filter(|a| families.admits(a));
    let first = admitted.clone().next();
    admitted
        .find(|a| a.is_ipv4() == dialed.is_ipv4())
        .or(first)
        .copied()
}

impl Route {
    /// How to carry a connection to `workload` at `target`, an address
    /// found by [`Route::Lookup`].
    pub fn to_address(
        workload: Arc<Workload>,
        target: SocketAddr,
        service: Option<Arc<Service>>,
        hbone_port: u16,
    ) -> Route {
        workload_route(workload, target, service, hbone_port)
    }
}

/// Which of `found` (a name's addresses) to connect to for a client that
/// dialed `dialed`: one of its family at random, else any (ztunnel's
/// `pick_workload_destination_or_resolve`).
pub fn pick_found(found: &[IpAddr], dialed: IpAddr) -> Option<IpAddr> {
    let mut rng = rand::rng();
    let same: Vec<&IpAddr> = found
        .iter()
        .filter(|a| a.is_ipv4() == dialed.is_ipv4())
        .collect();
    same.choose(&mut rng)
        .copied()
        .or_else(|| found.choose(&mut rng))
        .copied()
}

fn workload_route(
    w: Arc<Workload>,
    target: SocketAddr,
    service: Option<Arc<Service>>,
    hbone_port: u16,
) -> Route {
    let ip = target.ip();
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
        // Never plaintext to a workload that expects a tunnel.
        TunnelProtocol::Unsupported(p) => Route::Unreachable(format!(
            "workload {} expects tunnel protocol {p}, which this agent does not speak",
            w.uid
        )),
    }
}

#[cfg(test)]
mod tests;
