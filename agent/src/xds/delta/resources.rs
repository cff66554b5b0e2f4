//! The resources the client holds, and how a response changes them: each
//! resource is applied on its own (a bad one is refused and keeps its last
//! good version), addresses claimed twice are refused, and the set is
//! joined into a [`Mesh`] ([`Resources::build`]), where the references
//! istiod expresses from the workload side (the services it backs, the
//! selector policies that apply to it) become the model's service
//! endpoints and policy selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ambient_proto::discovery::DeltaDiscoveryResponse;
use ambient_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use tracing::warn;

use super::convert::{
    decode, field, AddressResource, Decoded, RejectReason, Rejected, ResponseError,
};
use super::ignored::{self, Ignored};
use crate::state::{Endpoint, Mesh, Policy, PolicyScope, Service, ServicePort};
use crate::xds::local::Problem;

/// One accepted resource and the version the server gave it.
#[derive(Clone, Debug)]
struct Entry<T> {
    version: String,
    value: Arc<T>,
    /// Fields it carries that the agent does not act on.
    ignored: Ignored,
}

/// Every accepted resource, by type and name: what the client holds.
#[derive(Clone, Debug, Default)]
pub(super) struct Resources {
    addresses: BTreeMap<String, Entry<AddressResource>>,
    policies: BTreeMap<String, Entry<Policy>>,
}

/// What applying one response did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Applied {
    /// Names added or changed.
    pub changed: BTreeSet<String>,
    /// Resources refused. Each keeps its last good version, if it had one:
    /// a bad push of a resource never takes away what it said before.
    pub rejected: Vec<Rejected>,
}

impl Applied {
    /// What the NACK says, if anything was refused.
    pub(super) fn into_error(self) -> Option<ResponseError> {
        (!self.rejected.is_empty()).then_some(ResponseError::Rejected(self.rejected))
    }
}

impl Resources {
    /// Name -> version of the resources held of `type_url`.
    pub(super) fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Entry<T>>) -> BTreeMap<String, String> {
            m.iter()
                .map(|(k, e)| (k.clone(), e.version.clone()))
                .collect()
        }
        match type_url {
            ADDRESS_TYPE_URL => of(&self.addresses),
            AUTHORIZATION_TYPE_URL => of(&self.policies),
            _ => BTreeMap::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.addresses.len() + self.policies.len()
    }

    /// Field name -> how many held resources carry it, for the fields the
    /// agent does not act on.
    pub(super) fn ignored_fields(&self) -> BTreeMap<String, usize> {
        let addresses = self.addresses.values().map(|e| e.ignored);
        ignored::count(addresses.chain(self.policies.values().map(|e| e.ignored)))
    }

    /// Applies a response resource by resource, as ztunnel does: removals,
    /// then every resource that decodes and fits with the rest; a bad one
    /// is refused and named, and its last good version keeps serving.
    /// Only a response of a type not subscribed to is refused whole.
    pub(super) fn apply(
        &mut self,
        resp: &DeltaDiscoveryResponse,
    ) -> Result<Applied, ResponseError> {
        let type_url = resp.type_url.as_str();
        if type_url != ADDRESS_TYPE_URL && type_url != AUTHORIZATION_TYPE_URL {
            return Err(ResponseError::UnknownType(type_url.to_string()));
        }
        for name in &resp.removed_resources {
            if type_url == ADDRESS_TYPE_URL {
                self.addresses.remove(name);
            } else {
                self.policies.remove(name);
            }
        }
        let mut applied = Applied::default();
        // The versions the accepted addresses replaced, to go back to when
        // one turns out to clash with the rest.
        let mut replaced: BTreeMap<String, Option<Entry<AddressResource>>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for r in &resp.resources {
            let reject = |reason| Rejected {
                name: r.name.clone(),
                reason,
            };
            if !seen.insert(r.name.as_str()) {
                applied.rejected.push(reject(RejectReason::DuplicateName));
                continue;
            }
            let Some(any) = &r.resource else {
                applied.rejected.push(reject(RejectReason::MissingBody));
                continue;
            };
            match decode(type_url, &r.name, any) {
                Ok((Decoded::Address(a), ignored)) => {
                    let e = entry(&r.version, *a, ignored);
                    let old = self.addresses.insert(r.name.clone(), e);
                    replaced.insert(r.name.clone(), old);
                }
                Ok((Decoded::Policy(p), ignored)) => {
                    let e = entry(&r.version, p, ignored);
                    self.policies.insert(r.name.clone(), e);
                }
                Err(reason) => {
                    applied.rejected.push(reject(reason));
                    continue;
                }
            }
            applied.changed.insert(r.name.clone());
        }
        // Each round puts back at least one changed address, so this ends
        // at the latest with the set held before (which was consistent).
        loop {
            let clashes = self.clashes(&applied.changed);
            if clashes.is_empty() {
                break;
            }
            for c in clashes {
                match replaced.remove(&c.name).flatten() {
                    Some(old) => self.addresses.insert(c.name.clone(), old),
                    None => self.addresses.remove(&c.name),
                };
                applied.changed.remove(&c.name);
                applied.rejected.push(c);
            }
        }
        Ok(applied)
    }

    /// Addresses claimed twice, blamed on the resources in `changed` (the
    /// others were accepted together before).
    fn clashes(&self, changed: &BTreeSet<String>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut claims: HashMap<IpAddr, String> = HashMap::new();
        let mut order: Vec<(&String, &AddressResource)> = self
            .addresses
            .iter()
            .map(|(name, e)| (name, &*e.value))
            .collect();
        order.sort_by_key(|(name, _)| changed.contains(*name));
        for (name, a) in order {
            let (owner, ips) = match a {
                AddressResource::Workload(w) => {
                    (format!("workload {name:?}"), &w.workload.addresses)
                }
                AddressResource::Service(s) => (format!("service {name:?}"), &s.vips),
            };
            for (i, ip) in ips.iter().enumerate() {
                if let Some(first) = claims.get(ip) {
                    if !changed.contains(name) {
                        // Two resources held before clash: impossible, as
                        // every accepted set was checked; never loop on it.
                        warn!(%ip, %name, "two held resources claim one address");
                        continue;
                    }
                    let problem = Problem::DuplicateAddress {
                        ip: *ip,
                        first: first.clone(),
                    };
                    rejected.push(Rejected {
                        name: name.clone(),
                        reason: field(format!("addresses[{i}]"), problem),
                    });
                    break;
                } else {
                    claims.insert(*ip, owner.clone());
                }
            }
        }
        rejected
    }

    /// Joins the resources into a mesh.
    pub(super) fn build(&self) -> Mesh {
        let mut mesh = Mesh::default();
        // Service key -> its endpoints' uids and ports; policy key -> uids.
        let mut backing: HashMap<&str, Vec<(&str, &[ServicePort])>> = HashMap::new();
        let mut selected: HashMap<&str, Vec<String>> = HashMap::new();
        for e in self.addresses.values() {
            if let AddressResource::Workload(w) = &*e.value {
                let uid = w.workload.uid.as_str();
                for (key, ports) in &w.services {
                    backing.entry(key).or_default().push((uid, ports));
                }
                for key in &w.policies {
                    selected.entry(key).or_default().push(uid.to_string());
                }
                mesh.workloads.push(w.workload.clone());
            }
        }
        for (key, e) in &self.addresses {
            if let AddressResource::Service(s) = &*e.value {
                let backers = backing.get(key.as_str()).map_or(&[][..], |v| v.as_slice());
                mesh.services.push(with_endpoints(s, backers));
            }
        }
        for (key, e) in &self.policies {
            let mut p = (*e.value).clone();
            if let PolicyScope::WorkloadSelector { workload_uids } = &mut p.scope {
                // istiod lists a root-namespace policy on workloads of every
                // namespace, so uids are not limited to the policy's.
                *workload_uids = selected.remove(key.as_str()).unwrap_or_default();
            }
            mesh.policies.push(p);
        }
        mesh
    }
}

fn entry<T>(version: &str, value: T, ignored: Ignored) -> Entry<T> {
    Entry {
        version: version.to_string(),
        value: Arc::new(value),
        ignored,
    }
}

/// `s` with its endpoints (`backers`, in uid order). The model has one
/// target port per service port; where the service leaves it unset (a
/// named target port), the endpoints' port lists supply it if they agree.
fn with_endpoints(s: &Service, backers: &[(&str, &[ServicePort])]) -> Service {
    let mut s = s.clone();
    s.endpoints = backers
        .iter()
        .map(|(uid, _)| Endpoint {
            workload_uid: uid.to_string(),
        })
        .collect();
    for p in s.ports.iter_mut().filter(|p| p.target_port == 0) {
        let mut targets = backers
            .iter()
            .flat_map(|(_, ports)| ports.iter())
            .filter(|q| q.port == p.port && q.target_port != 0)
            .map(|q| q.target_port);
        if let Some(first) = targets.next() {
            if targets.all(|t| t == first) {
                p.target_port = first;
            }
        }
    }
    s
}
