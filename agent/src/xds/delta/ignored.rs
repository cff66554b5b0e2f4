//! Fields istiod sends that this agent declares (so they are decoded and
//! drift is caught) but does not act on yet. Each accepted resource keeps a
//! bitmask of the ones it carries; the client reports how many held
//! resources carry each, in its status and in `/config_dump`, so an
//! operator sees what istiod asked for that the agent does not do.
//!
//! None of these can widen access: authorization is fully decoded (with
//! unknown parts counted against ALLOW and for DENY), and what is listed
//! here is routing, naming and telemetry detail.

use std::collections::BTreeMap;

use ambient_proto::workload as pb;

/// The fields, by the bit each gets. Names are `Message.field` as in the
/// upstream .proto files.
const FIELDS: [&str; 8] = [
    "Workload.workload_type",
    "Workload.native_tunnel",
    "Workload.extensions",
    "Port.app_protocol",
    "Service.extensions",
    "Service.canonical",
    "Service.ingress_use_waypoint",
    "Service.weighted_waypoints",
];

/// The ignored fields one resource carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Ignored(u32);

impl Ignored {
    fn set(&mut self, name: &str, present: bool) {
        if let Some(bit) = FIELDS.iter().position(|f| *f == name) {
            if present {
                self.0 |= 1 << bit;
            }
        }
    }

    /// The names of the fields carried.
    #[cfg(test)]
    pub(super) fn names(self) -> impl Iterator<Item = &'static str> {
        FIELDS
            .iter()
            .enumerate()
            .filter(move |(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, name)| *name)
    }

    pub(super) fn of_address(a: &pb::Address) -> Ignored {
        match &a.r#type {
            Some(pb::address::Type::Workload(w)) => Self::of_workload(w),
            Some(pb::address::Type::Service(s)) => Self::of_service(s),
            None => Ignored::default(),
        }
    }

    fn of_workload(w: &pb::Workload) -> Ignored {
        let mut i = Ignored::default();
        i.set("Workload.workload_type", w.workload_type != 0);
        i.set("Workload.native_tunnel", w.native_tunnel);
        i.set("Workload.extensions", !w.extensions.is_empty());
        let app_protocol = w
            .services
            .values()
            .flat_map(|l| &l.ports)
            .any(|p| p.app_protocol != 0);
        i.set("Port.app_protocol", app_protocol);
        i
    }

    fn of_service(s: &pb::Service) -> Ignored {
        let mut i = Ignored::default();
        i.set("Service.extensions", !s.extensions.is_empty());
        i.set("Service.canonical", s.canonical);
        i.set("Service.ingress_use_waypoint", s.ingress_use_waypoint);
        i.set(
            "Service.weighted_waypoints",
            !s.weighted_waypoints.is_empty(),
        );
        i.set(
            "Port.app_protocol",
            s.ports.iter().any(|p| p.app_protocol != 0),
        );
        i
    }
}

/// How many held resources carry each field, kept up to date as
/// resources come and go (not recounted per response).
#[derive(Clone, Debug, Default)]
pub(super) struct Counts([usize; FIELDS.len()]);

impl Counts {
    pub(super) fn add(&mut self, i: Ignored) {
        for (bit, n) in self.0.iter_mut().enumerate() {
            *n += usize::from(i.0 & (1 << bit) != 0);
        }
    }

    pub(super) fn remove(&mut self, i: Ignored) {
        for (bit, n) in self.0.iter_mut().enumerate() {
            *n -= usize::from(i.0 & (1 << bit) != 0);
        }
    }

    /// Field name -> count, for the fields some resource carries.
    pub(super) fn to_map(&self) -> BTreeMap<String, usize> {
        FIELDS
            .iter()
            .zip(self.0)
            .filter(|(_, n)| *n > 0)
            .map(|(f, n)| (f.to_string(), n))
            .collect()
    }
}

/// Field name -> how many of `resources` carry it.
#[cfg(test)]
pub(super) fn count(resources: impl Iterator<Item = Ignored>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in resources {
        for name in r.names() {
            *out.entry(name.to_string()).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_declared_field() {
        // The names must stay true to the compiled schema.
        for f in FIELDS {
            let (message, field) = f.split_once('.').expect("Message.field");
            let full = format!("istio.workload.{message}");
            assert!(
                ambient_proto::unknown::declares(&full, field),
                "{full} has no field {field}"
            );
        }
    }

    #[test]
    fn a_resource_reports_exactly_what_it_carries() {
        let w = pb::Workload {
            uid: "u".into(),
            native_tunnel: true,
            // Decoded: not reported.
            network: "net-1".into(),
            hostname: "ext.example.com".into(),
            locality: Some(pb::Locality::default()),
            services: [(
                "ns/svc".to_string(),
                pb::PortList {
                    ports: vec![pb::Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 1,
                    }],
                },
            )]
            .into(),
            ..Default::default()
        };
        let a = pb::Address {
            r#type: Some(pb::address::Type::Workload(w)),
        };
        let got: Vec<_> = Ignored::of_address(&a).names().collect();
        assert_eq!(got, ["Workload.native_tunnel", "Port.app_protocol"]);
        let s = pb::Service {
            canonical: true,
            ingress_use_waypoint: true,
            ..Default::default()
        };
        let a = pb::Address {
            r#type: Some(pb::address::Type::Service(s)),
        };
        let i = Ignored::of_address(&a);
        assert_eq!(
            i.names().collect::<Vec<_>>(),
            ["Service.canonical", "Service.ingress_use_waypoint"]
        );
        let counted = count([i, i, Ignored::default()].into_iter());
        assert_eq!(counted.get("Service.canonical"), Some(&2));
        assert_eq!(counted.len(), 2);
        let mut running = Counts::default();
        for r in [i, i, Ignored::default()] {
            running.add(r);
        }
        assert_eq!(running.to_map(), counted);
        running.remove(i);
        assert_eq!(running.to_map().get("Service.canonical"), Some(&1));
    }
}
