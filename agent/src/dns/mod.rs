//! The DNS proxy on 15053: each enrolled pod's DNS, redirected there by
//! capture (istio-cni's rules in Istio mode, the agent's in local mode),
//! answered from the mesh where the name is a mesh service's, forwarded
//! to the upstream resolvers otherwise.
//!
//! One [`DnsServer`] per pod, inside the pod's namespace on 127.0.0.1 and
//! ::1 (UDP and TCP, where an OUTPUT REDIRECT delivers), as ztunnel does; its
//! sockets carry the agent's mark so neither its listeners' answers nor
//! its upstream queries are captured again. The wire format and the
//! server loop are hickory's; this module decides the answers:
//! - A and AAAA for mesh names ([`names`]): the service's addresses of
//!   that family, TTL 30 s, authoritative; an empty answer when it has
//!   none of that family. Other types for a mesh name: an empty answer.
//! - everything else: the upstream's answer, unchanged ([`forward`]).
//! - a message that is not one well-formed query: FORMERR (hickory drops
//!   what is too short to answer at all).

pub mod forward;
pub mod lookup;
pub mod metrics;
pub mod names;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::socket::{ListenOpts, Sockets};
use crate::state::{State, Workload};

use self::forward::Forwarder;
use self::names::Family;

/// TTL of the answers made from the mesh (ztunnel's).
const TTL: u32 = 30;
/// A TCP client idle this long between queries is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// Answers queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Queries of one pod being forwarded at once; more are refused
/// (SERVFAIL) rather than queued, so a flood holds bounded memory.
const MAX_FORWARDS: usize = 256;

/// How the proxy runs (the `dns` section of the configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct DnsSettings {
    pub port: u16,
    /// Where names the mesh does not know are asked.
    pub upstreams: Vec<SocketAddr>,
    /// Budget for an upstream's answer, over every upstream tried.
    pub timeout: Duration,
    /// The Kubernetes cluster domain of service names.
    pub cluster_domain: String,
}

/// The `nameserver` lines of a resolv.conf (port 53), in order.
pub fn resolv_conf_nameservers(path: &Path) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

/// One pod's DNS proxy; dropping it closes its sockets.
pub struct DnsServer {
    server: hickory_server::Server<Handler>,
    pub addr: SocketAddr,
}

impl DnsServer {
    /// Listens for `workload` (UDP and TCP on 127.0.0.1 in its namespace,
    /// or on its own address without one).
    pub async fn start(
        state: Arc<State>,
        workload: Arc<Workload>,
        sockets: Sockets,
        settings: &DnsSettings,
        mark: Option<u32>,
        metrics: self::metrics::DnsMetrics,
    ) -> std::io::Result<DnsServer> {
        let ip = match &sockets {
            Sockets::Netns(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Sockets::Host => workload.addresses.first().copied().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "workload has no address")
            })?,
        };
        let addr = SocketAddr::new(ip, settings.port);
        let udp = sockets.udp(addr, mark, true).await?;
        let addr = udp.local_addr()?;
        let opts = ListenOpts {
            mark,
            ..Default::default()
        };
        let tcp = sockets.listen(addr, opts).await?;
        let loopback6 = if let Sockets::Netns(_) = &sockets {
            // Also on ::1 where the pod's loopback has it, as ztunnel
            // (IPv6 DNS is redirected there); a pod without IPv6 is served
            // on 127.0.0.1 alone.
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port());
            match (
                sockets.udp(v6, mark, true).await,
                sockets.listen(v6, opts).await,
            ) {
                (Ok(udp), Ok(tcp)) => Some((udp, tcp)),
                (Err(e), _) | (_, Err(e)) => {
                    debug!(error = %e, "DNS proxy: no IPv6 loopback in the pod, serving 127.0.0.1 only");
                    None
                }
            }
        } else {
            None
        };
        let handler = Handler {
            state,
            namespace: workload.namespace.to_string(),
            cluster_domain: settings.cluster_domain.trim_end_matches('.').to_string(),
            forwarder: Forwarder {
                upstreams: settings.upstreams.clone(),
                timeout: settings.timeout,
                sockets,
                mark,
                spares: Default::default(),
            },
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
            metrics,
        };
        let mut server = hickory_server::Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
        if let Some((udp, tcp)) = loopback6 {
            server.register_socket(udp);
            server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
        }
        Ok(DnsServer { server, addr })
    }

    /// Stops answering (sockets close once their tasks end).
    pub fn stop(&self) {
        self.server.shutdown_token().cancel();
    }
}

/// Answers one pod's queries.
struct Handler {
    state: Arc<State>,
    /// The pod's namespace: short names mean its services.
    namespace: String,
    cluster_domain: String,
    forwarder: Forwarder,
    forwards: Arc<Semaphore>,
    metrics: self::metrics::DnsMetrics,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let refuse = |code| {
            let mut m = Metadata::response_from_request(&request.metadata);
            m.response_code = code;
            m
        };
        if request.metadata.message_type != MessageType::Query {
            return send(
                &mut response,
                builder.build_no_records(refuse(ResponseCode::FormErr)),
            )
            .await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send(
                &mut response,
                builder.build_no_records(refuse(ResponseCode::NotImp)),
            )
            .await;
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return send(
                &mut response,
                builder.build_no_records(refuse(ResponseCode::FormErr)),
            )
            .await;
        };
        let qtype = info.query.query_type();
        let labels = self::metrics::DnsLabels {
            request_query_type: qtype.to_string().to_ascii_lowercase(),
            request_protocol: match request.protocol() {
                hickory_server::net::xfer::Protocol::Tcp => "tcp",
                _ => "udp",
            },
            // The model has no canonical names yet (see xds ignoredFields).
            source_canonical_service: "unknown".into(),
            source_canonical_revision: "unknown".into(),
        };
        self.metrics.request(&labels);
        let asked = info.query.name().to_string();
        let asked = asked.trim_end_matches('.');
        let family = match qtype {
            RecordType::AAAA => Family::V6,
            _ => Family::V4,
        };
        let snap = self.state.snapshot();
        if let Some(found) =
            names::resolve(&snap, &self.namespace, &self.cluster_domain, asked, family)
        {
            let records = match qtype {
                RecordType::A | RecordType::AAAA => mesh_records(asked, &found),
                // A mesh name has no other records.
                _ => Ok(Vec::new()),
            };
            let Ok(records) = records else {
                return send(
                    &mut response,
                    builder.build_no_records(refuse(ResponseCode::ServFail)),
                )
                .await;
            };
            debug!(
                name = asked,
                ?qtype,
                answers = records.len(),
                "answered from the mesh"
            );
            let mut m = Metadata::response_from_request(&request.metadata);
            m.authoritative = true;
            m.recursion_available = true;
            let mut builder = builder;
            if let Some(e) = &request.edns {
                builder.edns(e);
            }
            let r = builder.build(m, records.iter(), [], [], []);
            return send(&mut response, r).await;
        }
        self.forward(request, builder, response, &labels).await
    }
}

impl Handler {
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        builder: MessageResponseBuilder<'_>,
        mut response: R,
        labels: &self::metrics::DnsLabels,
    ) -> ResponseInfo {
        let servfail = || {
            let mut m = Metadata::response_from_request(&request.metadata);
            m.response_code = ResponseCode::ServFail;
            m.recursion_available = true;
            m
        };
        let Ok(_permit) = self.forwards.clone().try_acquire_owned() else {
            warn!(src = %request.src(), "too many DNS queries being forwarded; SERVFAIL");
            return send(&mut response, builder.build_no_records(servfail())).await;
        };
        let tcp = request.protocol() == hickory_server::net::xfer::Protocol::Tcp;
        let started = std::time::Instant::now();
        let answer = match self.forwarder.forward(request.as_slice(), tcp).await {
            Ok(bytes) => Message::from_vec(&bytes).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let failed = match &answer {
            Ok(m) => m.metadata.response_code != ResponseCode::NoError || m.answers.is_empty(),
            Err(_) => true,
        };
        self.metrics
            .upstream(labels, started.elapsed().as_secs_f64(), failed);
        if let (true, Ok(m)) = (failed, &answer) {
            info!(src = %request.src(), query = ?request.queries.queries().first().map(|q| q.name().to_string()),
                code = ?m.metadata.response_code, "upstream DNS answered without records");
        }
        let upstream = match answer {
            Ok(m)
                if m.queries
                    == request
                        .queries
                        .queries()
                        .iter()
                        .map(|q| q.original().clone())
                        .collect::<Vec<_>>() =>
            {
                m
            }
            Ok(_) => {
                warn!(src = %request.src(), "upstream answered another question; SERVFAIL");
                return send(&mut response, builder.build_no_records(servfail())).await;
            }
            Err(error) => {
                warn!(src = %request.src(), %error, "forwarding a DNS query failed; SERVFAIL");
                return send(&mut response, builder.build_no_records(servfail())).await;
            }
        };
        let mut m = upstream.metadata;
        m.id = request.metadata.id;
        let mut builder = builder;
        if let Some(e) = &upstream.edns {
            builder.edns(e);
        }
        let r = builder.build(
            m,
            upstream.answers.iter(),
            upstream.authorities.iter(),
            [],
            upstream.additionals.iter(),
        );
        send(&mut response, r).await
    }
}

/// The records answering `asked` from `found`: a CNAME to the stripped
/// name first where there is one, then the addresses.
fn mesh_records(asked: &str, found: &names::Found) -> Result<Vec<Record>, String> {
    let name = |n: &str| Name::from_ascii(format!("{n}.")).map_err(|e| e.to_string());
    let asked_name = name(asked)?;
    let owner = name(&found.owner)?;
    let mut out = Vec::with_capacity(found.addrs.len() + 1);
    if found.cname {
        out.push(Record::from_rdata(
            asked_name,
            TTL,
            RData::CNAME(CNAME(owner.clone())),
        ));
    }
    for ip in &found.addrs {
        let data = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        out.push(Record::from_rdata(owner.clone(), TTL, data));
    }
    Ok(out)
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let id = message.metadata().id;
    match response.send_response(message).await {
        Ok(info) => info,
        Err(error) => {
            debug!(%error, "sending a DNS answer");
            let mut m = Metadata::new(id, MessageType::Response, OpCode::Query);
            m.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata: m,
                counts: Default::default(),
            }
            .into()
        }
    }
}
