//! The validation pass: checks what serde cannot (addresses, ports,
//! references between entries, uniqueness) and builds the model. Field
//! paths in errors use the file's own names, e.g. `services[0].vips[1]`.
//! HTTP routes have a module of their own (`http_routes`).

mod http_routes;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use marked_yaml::{Span, Spanned};

use super::schema::{
    Action, AppTunnel, GatewayEntry, MatchEntry, MeshFile, PolicyEntry, Protocol, RuleEntry, Scope,
    ServiceEntry, Text, WorkloadEntry,
};
use super::{LocalConfigError, Location, Problem};
use crate::identity::Identity;
use crate::state::Interner;
use crate::state::{
    Addresses, ApplicationTunnel, Clause, Endpoint, GatewayAddress, GatewayTarget, LocalPod, Match,
    Mesh, Network, Policy, PolicyAction, PolicyScope, Rule, Service, ServiceAccountMatch,
    ServicePort, StringMatch, Telemetry, TunnelProtocol, Workload, CANONICAL_NAME_LABELS,
    CANONICAL_REVISION_LABELS, DEFAULT_CANONICAL_REVISION, DEFAULT_CLUSTER,
};

const DEFAULT_SERVICE_ACCOUNT: &str = "default";
const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
const DEFAULT_HBONE_PORT: u16 = 15008;

type Result<T> = std::result::Result<T, LocalConfigError>;

/// A policy match's conditions on the HTTP request, if it sets any.
fn request_match(m: &MatchEntry) -> Option<Box<crate::state::RequestMatch>> {
    let headers = |h: &std::collections::BTreeMap<String, Vec<String>>| {
        h.iter()
            .map(|(name, values)| (name.to_ascii_lowercase(), string_matches(values)))
            .collect::<Vec<_>>()
    };
    let upper = |v: &[String]| v.iter().map(|m| m.to_ascii_uppercase()).collect::<Vec<_>>();
    // Hosts compare without case (the model holds them lowered).
    let lower = |v: &[String]| v.iter().map(|h| h.to_ascii_lowercase()).collect::<Vec<_>>();
    let r = crate::state::RequestMatch {
        hosts: string_matches(&lower(&m.hosts)),
        not_hosts: string_matches(&lower(&m.not_hosts)),
        paths: string_matches(&m.paths),
        not_paths: string_matches(&m.not_paths),
        methods: upper(&m.methods),
        not_methods: upper(&m.not_methods),
        headers: headers(&m.request_headers),
        not_headers: headers(&m.not_request_headers),
    };
    (r != crate::state::RequestMatch::default()).then(|| Box::new(r))
}

pub(super) fn convert(file: &str, raw: MeshFile) -> Result<Mesh> {
    let mut cx = Converter {
        file,
        addresses: HashMap::new(),
        workloads: HashMap::new(),
        trust_domains: Vec::new(),
        names: Interner::default(),
    };
    if raw.trust_domain.is_some() || !raw.trust_domain_aliases.is_empty() {
        let td = match &raw.trust_domain {
            Some(t) => cx.identity_part("trustDomain", t)?,
            None => DEFAULT_TRUST_DOMAIN.to_string(),
        };
        cx.trust_domains.push(td);
        for (i, a) in raw.trust_domain_aliases.iter().enumerate() {
            let alias = cx.identity_part(&format!("trustDomainAliases[{i}]"), a)?;
            if !cx.trust_domains.contains(&alias) {
                cx.trust_domains.push(alias);
            }
        }
    }
    let mut mesh = Mesh::default();
    for (i, w) in raw.workloads.iter().enumerate() {
        mesh.workloads.push(cx.workload(i, w)?);
    }
    let mut hosts = HashMap::new();
    for (i, s) in raw.services.iter().enumerate() {
        mesh.services.push(cx.service(i, s, &mut hosts)?);
    }
    let mut keys = HashMap::new();
    for (i, p) in raw.policies.iter().enumerate() {
        mesh.policies.push(cx.policy(i, p, &mut keys)?);
    }
    for (i, r) in raw.http_routes.iter().enumerate() {
        let route = cx.http_route(i, r, &mesh.services)?;
        mesh.http_routes.push(route);
    }
    Ok(mesh)
}

struct Converter<'a> {
    file: &'a str,
    /// One copy of each uid, namespace, service account... in the mesh.
    names: Interner,
    /// Every workload address and service VIP so far -> where it was first used.
    addresses: HashMap<IpAddr, String>,
    /// Workload uid -> (namespace, where it was defined).
    workloads: HashMap<String, (String, String)>,
    /// The trust domain and its aliases, when aliases are in use.
    trust_domains: Vec<String>,
}

/// `field on line N`, to point back at an earlier entry.
fn place(field: &str, span: &Span) -> String {
    match span.start() {
        Some(m) => format!("{field} on line {}", m.line()),
        None => field.to_string(),
    }
}

/// Istio's string match forms: `*` presence, `*x` suffix, `x*` prefix.
fn string_match(s: &str) -> StringMatch {
    if s == "*" {
        StringMatch::Presence
    } else if let Some(rest) = s.strip_prefix('*') {
        StringMatch::Suffix(rest.to_string())
    } else if let Some(rest) = s.strip_suffix('*') {
        StringMatch::Prefix(rest.to_string())
    } else {
        StringMatch::Exact(s.to_string())
    }
}

fn string_matches(values: &[String]) -> Vec<StringMatch> {
    values.iter().map(|s| string_match(s)).collect()
}

impl Converter<'_> {
    fn err(&self, field: impl Into<String>, span: &Span, problem: Problem) -> LocalConfigError {
        LocalConfigError::Invalid {
            file: self.file.to_string(),
            at: span.start().map(Location::from_marker),
            field: field.into(),
            problem,
        }
    }

    fn required(&self, field: &str, t: &Text) -> Result<String> {
        if t.trim().is_empty() {
            return Err(self.err(field, t.span(), Problem::Empty));
        }
        Ok(t.to_string())
    }

    /// A namespace, service account or trust domain: it becomes a segment
    /// of `spiffe://<td>/ns/<ns>/sa/<sa>`.
    fn identity_part(&self, field: &str, t: &Text) -> Result<String> {
        let s = self.required(field, t)?;
        if s.contains('/') {
            return Err(self.err(field, t.span(), Problem::Slash));
        }
        Ok(s)
    }

    fn ip(&self, field: &str, t: &Text) -> Result<IpAddr> {
        t.parse()
            .map_err(|_| self.err(field, t.span(), Problem::InvalidIp(t.to_string())))
    }

    /// A CIDR, or a bare address meaning just that host.
    fn net(&self, field: &str, t: &Text) -> Result<IpNet> {
        let parsed = if t.contains('/') {
            t.parse::<IpNet>().ok()
        } else {
            t.parse::<IpAddr>().ok().map(IpNet::from)
        };
        parsed.ok_or_else(|| self.err(field, t.span(), Problem::InvalidCidr(t.to_string())))
    }

    fn port(&self, field: &str, p: &Spanned<u16>) -> Result<u16> {
        if **p == 0 {
            return Err(self.err(field, p.span(), Problem::PortZero));
        }
        Ok(**p)
    }

    /// Records `ip` as taken; addresses are unique across workloads and VIPs
    /// because the proxy looks destinations up by address.
    fn claim(&mut self, ip: IpAddr, field: &str, span: &Span) -> Result<()> {
        if let Some(first) = self.addresses.get(&ip) {
            let first = first.clone();
            return Err(self.err(field, span, Problem::DuplicateAddress { ip, first }));
        }
        self.addresses.insert(ip, place(field, span));
        Ok(())
    }

    fn workload(&mut self, i: usize, w: &WorkloadEntry) -> Result<Workload> {
        let f = |name: &str| format!("workloads[{i}].{name}");
        let uid = self.required(&f("uid"), &w.uid)?;
        if let Some((_, first)) = self.workloads.get(&uid) {
            let first = first.clone();
            return Err(self.err(f("uid"), w.uid.span(), Problem::DuplicateUid { uid, first }));
        }
        let name = self.required(&f("name"), &w.name)?;
        let namespace = self.identity_part(&f("namespace"), &w.namespace)?;
        let service_account = match &w.service_account {
            Some(t) => self.identity_part(&f("serviceAccount"), t)?,
            None => DEFAULT_SERVICE_ACCOUNT.to_string(),
        };
        let trust_domain = match &w.trust_domain {
            Some(t) => self.identity_part(&f("trustDomain"), t)?,
            None => DEFAULT_TRUST_DOMAIN.to_string(),
        };
        let hostname = match &w.hostname {
            None => None,
            Some(h) if crate::state::valid_hostname(h.trim()) => {
                Some(h.trim().to_ascii_lowercase())
            }
            Some(h) => {
                let problem = Problem::Hostname(h.to_string());
                return Err(self.err(f("hostname"), h.span(), problem));
            }
        };
        if w.addresses.is_empty() && hostname.is_none() {
            return Err(self.err(f("addresses"), w.addresses.span(), Problem::Empty));
        }
        let mut addresses = Addresses::with_capacity(w.addresses.len());
        for (j, a) in w.addresses.iter().enumerate() {
            let field = f(&format!("addresses[{j}]"));
            let ip = self.ip(&field, a)?;
            self.claim(ip, &field, a.span())?;
            addresses.push(ip);
        }
        let node = self.required(&f("node"), &w.node)?;
        // `netns:`, `netns: ~` and `netns: null` are YAML nulls; the loader
        // hands them over as text.
        let optional_path = |t: &Option<Text>| {
            t.as_ref()
                .filter(|t| !matches!(t.as_str(), "" | "~" | "null"))
                .map(|t| PathBuf::from(t.as_str()))
        };
        let netns = optional_path(&w.netns);
        let cgroup = optional_path(&w.cgroup);
        let waypoint = self.waypoint(&f("waypoint"), w.waypoint.as_ref())?;
        let port_field = f("applicationTunnelPort");
        let application_tunnel = match (&w.application_tunnel, &w.application_tunnel_port) {
            (AppTunnel::None, None) => ApplicationTunnel::None,
            (AppTunnel::None, Some(p)) => {
                return Err(self.err(port_field, p.span(), Problem::TunnelPortWithoutProxy))
            }
            (AppTunnel::Proxy, port) => ApplicationTunnel::Proxy {
                port: port
                    .as_ref()
                    .map(|p| self.port(&port_field, p))
                    .transpose()?,
            },
        };
        self.workloads.insert(
            uid.clone(),
            (namespace.clone(), place(&f("uid"), w.uid.span())),
        );
        let telemetry = self.telemetry(w, &name);
        let gateway = self
            .waypoint(&f("networkGateway"), w.network_gateway.as_ref())?
            .map(|g| *g);
        let network_name = w.network.as_ref().map_or("", |t| t.trim());
        let network = (!network_name.is_empty() || gateway.is_some()).then(|| {
            let name = self.names.intern(network_name);
            self.names.network(&Network { name, gateway })
        });
        Ok(Workload {
            uid: self.names.intern(&uid),
            name: name.into(),
            namespace: self.names.intern(&namespace),
            service_account: self.names.intern(&service_account),
            trust_domain: self.names.intern(&trust_domain),
            addresses,
            node: self.names.intern(&node),
            local: (netns.is_some() || cgroup.is_some())
                .then(|| Box::new(LocalPod { netns, cgroup })),
            protocol: match w.protocol {
                Protocol::Hbone => TunnelProtocol::Hbone,
                Protocol::None => TunnelProtocol::None,
            },
            application_tunnel,
            waypoint,
            healthy: w.healthy,
            capacity: w.capacity,
            telemetry,
            network,
            hostname: hostname.map(|h| h.as_str().into()),
        })
    }

    /// What the workload's metrics are labelled with, defaulted as istiod
    /// does (`pkg/kube/labels` `CanonicalService`: the first label present
    /// of each list, else the workload name and `latest`).
    fn telemetry(&mut self, w: &WorkloadEntry, name: &str) -> Arc<Telemetry> {
        let given = |t: &Option<Text>| {
            t.as_ref()
                .map(|t| t.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let label = |keys: [&str; 3]| keys.iter().find_map(|k| w.labels.get(*k).cloned());
        let workload_name = given(&w.workload_name).unwrap_or_else(|| name.to_string());
        let canonical_name = given(&w.canonical_name)
            .or_else(|| label(CANONICAL_NAME_LABELS))
            .unwrap_or_else(|| workload_name.clone());
        let canonical_revision = given(&w.canonical_revision)
            .or_else(|| label(CANONICAL_REVISION_LABELS))
            .unwrap_or_else(|| DEFAULT_CANONICAL_REVISION.to_string());
        let cluster = given(&w.cluster_id).unwrap_or_else(|| DEFAULT_CLUSTER.to_string());
        let locality = given(&w.locality).unwrap_or_default();
        let mut parts = locality.splitn(3, '/');
        let mut next = || parts.next().unwrap_or("");
        let (region, zone, subzone) = (next(), next(), next());
        let t = Telemetry {
            workload_name: self.names.intern(&workload_name),
            canonical_name: self.names.intern(&canonical_name),
            canonical_revision: self.names.intern(&canonical_revision),
            cluster: self.names.intern(&cluster),
            region: self.names.intern(region),
            zone: self.names.intern(zone),
            subzone: self.names.intern(subzone),
        };
        self.names.telemetry(&t)
    }

    fn waypoint(
        &mut self,
        field: &str,
        w: Option<&Spanned<GatewayEntry>>,
    ) -> Result<Option<Box<GatewayAddress>>> {
        let Some(w) = w else { return Ok(None) };
        let target = match (&w.address, &w.service) {
            (Some(a), None) => GatewayTarget::Address(self.ip(&format!("{field}.address"), a)?),
            (None, Some(s)) => {
                let field = format!("{field}.service");
                match s.split_once('/') {
                    Some((ns, host))
                        if !ns.is_empty() && !host.is_empty() && !host.contains('/') =>
                    {
                        GatewayTarget::Service {
                            namespace: self.names.intern(ns),
                            hostname: self.names.intern(host),
                        }
                    }
                    _ => {
                        let problem = Problem::WaypointService(s.to_string());
                        return Err(self.err(field, s.span(), problem));
                    }
                }
            }
            (Some(_), Some(s)) => {
                return Err(self.err(format!("{field}.service"), s.span(), Problem::WaypointBoth))
            }
            (None, None) => {
                // `waypoint:` with no value is YAML null. It reaches us as an
                // empty scalar, whose span (unlike a mapping's) has no end.
                if w.hbone_port.is_none() && w.span().end().is_none() {
                    return Ok(None);
                }
                return Err(self.err(field, w.span(), Problem::WaypointNeither));
            }
        };
        let hbone_port = match &w.hbone_port {
            Some(p) => self.port(&format!("{field}.hbonePort"), p)?,
            None => DEFAULT_HBONE_PORT,
        };
        Ok(Some(Box::new(GatewayAddress { target, hbone_port })))
    }

    fn service(
        &mut self,
        i: usize,
        s: &ServiceEntry,
        hosts: &mut HashMap<(String, String), String>,
    ) -> Result<Service> {
        let f = |name: &str| format!("services[{i}].{name}");
        let name = self.required(&f("name"), &s.name)?;
        let namespace = self.required(&f("namespace"), &s.namespace)?;
        let (hostname, host_field, host_span) = match &s.hostname {
            Some(t) => (self.required(&f("hostname"), t)?, f("hostname"), t.span()),
            None => (
                format!("{name}.{namespace}.svc.cluster.local"),
                f("name"),
                s.name.span(),
            ),
        };
        let key = (namespace.clone(), hostname.clone());
        if let Some(first) = hosts.get(&key) {
            let problem = Problem::DuplicateService {
                service: format!("{namespace}/{hostname}"),
                first: first.clone(),
            };
            return Err(self.err(host_field, host_span, problem));
        }
        hosts.insert(key, place(&host_field, host_span));

        if s.vips.is_empty() {
            return Err(self.err(f("vips"), s.vips.span(), Problem::Empty));
        }
        let mut vips = Vec::with_capacity(s.vips.len());
        for (j, v) in s.vips.iter().enumerate() {
            let field = f(&format!("vips[{j}]"));
            let ip = self.ip(&field, v)?;
            self.claim(ip, &field, v.span())?;
            vips.push(ip);
        }

        let mut ports = Vec::with_capacity(s.ports.len());
        let mut seen_ports: HashMap<u16, String> = HashMap::new();
        for (j, p) in s.ports.iter().enumerate() {
            let field = f(&format!("ports[{j}].port"));
            let port = self.port(&field, &p.port)?;
            if let Some(first) = seen_ports.get(&port) {
                let first = first.clone();
                return Err(self.err(field, p.port.span(), Problem::DuplicatePort { port, first }));
            }
            seen_ports.insert(port, place(&field, p.port.span()));
            ports.push(ServicePort {
                port,
                target_port: p.target_port,
            });
        }

        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(s.endpoints.len());
        for (j, uid) in s.endpoints.iter().enumerate() {
            let field = f(&format!("endpoints[{j}]"));
            if !self.workloads.contains_key(uid.as_str()) {
                return Err(self.err(field, uid.span(), Problem::UnknownWorkload(uid.to_string())));
            }
            if endpoints.iter().any(|e| e.workload_uid == **uid) {
                let problem = Problem::DuplicateEndpoint {
                    uid: uid.to_string(),
                };
                return Err(self.err(field, uid.span(), problem));
            }
            endpoints.push(Endpoint {
                workload_uid: self.names.intern(uid),
            });
        }

        let mut subject_alt_names = Vec::with_capacity(s.subject_alt_names.len());
        for (j, san) in s.subject_alt_names.iter().enumerate() {
            if let Err(e) = san.parse::<Identity>() {
                let field = f(&format!("subjectAltNames[{j}]"));
                return Err(self.err(field, san.span(), Problem::InvalidIdentity(e)));
            }
            subject_alt_names.push(san.to_string());
        }

        let waypoint = self.waypoint(&f("waypoint"), s.waypoint.as_ref())?;
        Ok(Service {
            name: name.into(),
            namespace: self.names.intern(&namespace),
            hostname: hostname.into(),
            vips,
            ports,
            endpoints,
            subject_alt_names,
            visibility: Default::default(),
            ip_families: Default::default(),
            waypoint,
            load_balancing: s.load_balancing.as_ref().map(|lb| Box::new(lb.into())),
        })
    }

    fn policy(
        &mut self,
        i: usize,
        p: &PolicyEntry,
        keys: &mut HashMap<String, String>,
    ) -> Result<Policy> {
        let f = |name: &str| format!("policies[{i}].{name}");
        let name = self.required(&f("name"), &p.name)?;
        let namespace = self.required(&f("namespace"), &p.namespace)?;
        let key = format!("{namespace}/{name}");
        if let Some(first) = keys.get(&key) {
            let first = first.clone();
            return Err(self.err(
                f("name"),
                p.name.span(),
                Problem::DuplicatePolicy { key, first },
            ));
        }
        keys.insert(key, place(&f("name"), p.name.span()));

        // An empty (or null) selector counts as absent.
        let selector = p.selector.as_ref().filter(|s| !s.is_empty());
        let scope = match p.scope.as_deref().copied().unwrap_or_default() {
            Scope::WorkloadSelector => {
                let Some(selector) = selector else {
                    // Only reachable with an explicit scope, so its span exists.
                    let span = p.scope.as_ref().map_or(p.name.span(), |s| s.span());
                    return Err(self.err(f("scope"), span, Problem::MissingSelector));
                };
                let mut workload_uids = Vec::with_capacity(selector.len());
                for (j, uid) in selector.iter().enumerate() {
                    let field = f(&format!("selector[{j}]"));
                    let problem = match self.workloads.get(uid.as_str()) {
                        None => Problem::UnknownWorkload(uid.to_string()),
                        // The model selects within the policy's namespace; a
                        // workload elsewhere would silently never match.
                        Some((ns, _)) if *ns != namespace => Problem::SelectorNamespace {
                            uid: uid.to_string(),
                            workload_namespace: ns.clone(),
                        },
                        Some(_) => {
                            workload_uids.push(self.names.intern(uid));
                            continue;
                        }
                    };
                    return Err(self.err(field, uid.span(), problem));
                }
                PolicyScope::WorkloadSelector { workload_uids }
            }
            other => {
                if let Some(selector) = selector {
                    let problem = Problem::UnexpectedSelector;
                    return Err(self.err(f("selector"), selector.span(), problem));
                }
                match other {
                    Scope::Global => PolicyScope::Global,
                    _ => PolicyScope::Namespace,
                }
            }
        };

        Ok(Policy {
            name,
            scope,
            action: match p.action {
                Action::Allow => PolicyAction::Allow,
                Action::Deny => PolicyAction::Deny,
            },
            rules: self.rules(&f("rules"), &p.rules, &namespace)?,
            namespace,
            dry_run: p.dry_run,
            unsupported: Vec::new(),
        })
    }

    fn rules(&self, field: &str, rules: &[RuleEntry], namespace: &str) -> Result<Vec<Rule>> {
        let mut out = Vec::with_capacity(rules.len());
        for (r, rule) in rules.iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (c, clause) in rule.clauses.iter().enumerate() {
                let mut matches = Vec::with_capacity(clause.matches.len());
                for (m, entry) in clause.matches.iter().enumerate() {
                    let field = format!("{field}[{r}].clauses[{c}].matches[{m}]");
                    matches.push(self.match_entry(&field, entry, namespace)?);
                }
                clauses.push(Clause {
                    matches,
                    ..Default::default()
                });
            }
            out.push(Rule {
                clauses,
                ..Default::default()
            });
        }
        Ok(out)
    }

    fn match_entry(&self, field: &str, m: &MatchEntry, namespace: &str) -> Result<Match> {
        let accounts = |name: &str, values: &[Text]| -> Result<Vec<ServiceAccountMatch>> {
            let list = values.iter().enumerate();
            list.map(|(k, t)| self.service_account(&format!("{field}.{name}[{k}]"), t, namespace))
                .collect()
        };
        let nets = |name: &str, values: &[Text]| -> Result<Vec<IpNet>> {
            let list = values.iter().enumerate();
            list.map(|(k, t)| self.net(&format!("{field}.{name}[{k}]"), t))
                .collect()
        };
        let ports = |name: &str, values: &[Spanned<u16>]| -> Result<Vec<u16>> {
            let list = values.iter().enumerate();
            list.map(|(k, p)| self.port(&format!("{field}.{name}[{k}]"), p))
                .collect()
        };
        Ok(Match {
            namespaces: string_matches(&m.namespaces),
            not_namespaces: string_matches(&m.not_namespaces),
            service_accounts: accounts("serviceAccounts", &m.service_accounts)?,
            not_service_accounts: accounts("notServiceAccounts", &m.not_service_accounts)?,
            principals: string_matches(&super::aliases::expand(&m.principals, &self.trust_domains)),
            not_principals: string_matches(&super::aliases::expand(
                &m.not_principals,
                &self.trust_domains,
            )),
            source_ips: nets("sourceIps", &m.source_ips)?,
            not_source_ips: nets("notSourceIps", &m.not_source_ips)?,
            destination_ips: nets("destinationIps", &m.destination_ips)?,
            not_destination_ips: nets("notDestinationIps", &m.not_destination_ips)?,
            destination_ports: ports("destinationPorts", &m.destination_ports)?,
            not_destination_ports: ports("notDestinationPorts", &m.not_destination_ports)?,
            request: request_match(m),
            unsupported: Vec::new(),
        })
    }

    /// Istio's form: `namespace/name`, or `name` in the policy's namespace;
    /// no empty part, no wildcard, at most one '/'.
    fn service_account(
        &self,
        field: &str,
        t: &Text,
        namespace: &str,
    ) -> Result<ServiceAccountMatch> {
        let (ns, name) = t.split_once('/').unwrap_or((namespace, t.as_str()));
        let part = |s: &str| !s.is_empty() && !s.contains(['/', '*']);
        if !part(ns) || !part(name) {
            return Err(self.err(field, t.span(), Problem::ServiceAccount(t.to_string())));
        }
        Ok(ServiceAccountMatch {
            namespace: ns.to_string(),
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::state::Telemetry;

    /// The telemetry names of the one workload of a mesh file whose entry
    /// ends with `extra` (YAML flow-map fields).
    fn telemetry(extra: &str) -> Telemetry {
        let text = format!(
            "workloads:\n  - {{uid: u, name: pod-1, namespace: ns, addresses: [10.0.0.1], \
             node: n{extra}}}\n"
        );
        let mesh = super::super::parse_mesh("mesh.yaml", &text).expect("valid");
        (*mesh.workloads[0].telemetry).clone()
    }

    fn names(t: &Telemetry) -> [&str; 7] {
        [
            &t.workload_name,
            &t.canonical_name,
            &t.canonical_revision,
            &t.cluster,
            &t.region,
            &t.zone,
            &t.subzone,
        ]
    }

    /// istiod's rules (istio/istio `pkg/kube/labels/labels.go`
    /// `CanonicalService`): the canonical name is the first present of the
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name` and `app`
    /// labels, else the workload name; the revision the first present of
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`
    /// and `version`, else `latest`. A workload without a cluster is in
    /// `Kubernetes` (ztunnel, `src/state/workload.rs`); a WorkloadEntry's
    /// locality is `region/zone/subzone`.
    #[test]
    fn defaults_and_precedence_follow_istiod() {
        let cases: &[(&str, [&str; 7])] = &[
            ("", ["pod-1", "pod-1", "latest", "Kubernetes", "", "", ""]),
            (
                ", workloadName: web",
                ["web", "web", "latest", "Kubernetes", "", "", ""],
            ),
            (
                ", labels: {app: a, version: v3}",
                ["pod-1", "a", "v3", "Kubernetes", "", "", ""],
            ),
            (
                ", labels: {app: a, app.kubernetes.io/name: k, version: v3, \
                 app.kubernetes.io/version: kv}",
                ["pod-1", "k", "kv", "Kubernetes", "", "", ""],
            ),
            (
                ", labels: {app: a, app.kubernetes.io/name: k, \
                 service.istio.io/canonical-name: c, service.istio.io/canonical-revision: cr}",
                ["pod-1", "c", "cr", "Kubernetes", "", "", ""],
            ),
            (
                ", labels: {app: a}, canonicalName: explicit, canonicalRevision: r9",
                ["pod-1", "explicit", "r9", "Kubernetes", "", "", ""],
            ),
            (
                ", clusterId: east, locality: us-west/us-west-2a/rack-7",
                [
                    "pod-1",
                    "pod-1",
                    "latest",
                    "east",
                    "us-west",
                    "us-west-2a",
                    "rack-7",
                ],
            ),
            (
                ", locality: us-west",
                ["pod-1", "pod-1", "latest", "Kubernetes", "us-west", "", ""],
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(names(&telemetry(extra)), *want, "{extra}");
        }
    }

    #[test]
    fn replicas_share_one_copy() {
        let text = "workloads:\n\
            \x20 - {uid: a, name: web-1, workloadName: web, namespace: ns, addresses: [10.0.0.1], node: n}\n\
            \x20 - {uid: b, name: web-2, workloadName: web, namespace: ns, addresses: [10.0.0.2], node: n}\n";
        let mesh = super::super::parse_mesh("mesh.yaml", text).expect("valid");
        let (a, b) = (&mesh.workloads[0].telemetry, &mesh.workloads[1].telemetry);
        assert!(std::sync::Arc::ptr_eq(a, b));
    }
}
