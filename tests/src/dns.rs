//! DNS for tests: an upstream resolver to forward to, a pod's resolver
//! configuration, and queries made from inside a pod.
//!
//! [`Upstream`] is a small authoritative server (hickory) with fixed
//! answers: `outside.example` → 192.0.2.10, `fail.example` → SERVFAIL,
//! `big.example` → 100 A records (truncated over UDP), anything else
//! NXDOMAIN. It counts what it is asked, and from which address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_agent::demo::topology::Pod;
use ambient_agent::socket::Sockets;
use hickory_proto::op::{Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the upstream answers `outside.example` with.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// The test's upstream resolver; dropping it stops it.
pub struct Upstream {
    server: hickory_server::Server<Answers>,
    /// Source addresses of the queries received.
    pub asked_from: Arc<Mutex<Vec<IpAddr>>>,
    pub addr: SocketAddr,
}

impl Upstream {
    /// Serves on `addr` (UDP and TCP), with sockets made by `sockets`.
    pub async fn start(sockets: &Sockets, addr: SocketAddr) -> Upstream {
        Self::start_with(sockets, addr, Vec::new()).await
    }

    /// [`Upstream::start`], also answering each of `names` (`name.`,
    /// absolute) with its address (A or AAAA by family).
    pub async fn start_with(
        sockets: &Sockets,
        addr: SocketAddr,
        names: Vec<(String, IpAddr)>,
    ) -> Upstream {
        let udp = sockets.udp(addr, None, false).await.expect("upstream udp");
        let tcp = sockets
            .listen(addr, Default::default())
            .await
            .expect("upstream tcp");
        let asked_from = Arc::new(Mutex::new(Vec::new()));
        let mut server = hickory_server::Server::new(Answers {
            asked_from: asked_from.clone(),
            names,
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        Upstream {
            server,
            asked_from,
            addr,
        }
    }

    pub fn queries(&self) -> usize {
        self.asked_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Stops answering.
    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

struct Answers {
    asked_from: Arc<Mutex<Vec<IpAddr>>>,
    names: Vec<(String, IpAddr)>,
}

#[async_trait::async_trait]
impl RequestHandler for Answers {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        self.asked_from
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.src().ip());
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut m = Metadata::response_from_request(&request.metadata);
        m.recursion_available = true;
        let name = request
            .queries
            .queries()
            .first()
            .map(|q| q.name().to_string())
            .unwrap_or_default();
        let owner = Name::from_ascii(&name).unwrap_or_default();
        let qtype = request.queries.queries().first().map(|q| q.query_type());
        let extra: Vec<Record> = self
            .names
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, ip)| match (ip, qtype) {
                (IpAddr::V4(v4), Some(RecordType::A)) => {
                    Some(Record::from_rdata(owner.clone(), 60, RData::A(A(*v4))))
                }
                (IpAddr::V6(v6), Some(RecordType::AAAA)) => Some(Record::from_rdata(
                    owner.clone(),
                    60,
                    RData::AAAA(hickory_proto::rr::rdata::AAAA(*v6)),
                )),
                _ => None,
            })
            .collect();
        let known = self.names.iter().any(|(n, _)| *n == name);
        let records: Vec<Record> = match name.as_str() {
            _ if known => extra,
            "outside.example." => vec![Record::from_rdata(owner, 60, RData::A(A(OUTSIDE_IP)))],
            "big.example." => (0..100u8)
                .map(|i| {
                    Record::from_rdata(
                        owner.clone(),
                        60,
                        RData::A(A(Ipv4Addr::new(198, 51, 100, i))),
                    )
                })
                .collect(),
            "fail.example." => {
                m.response_code = ResponseCode::ServFail;
                Vec::new()
            }
            _ => {
                m.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
        };
        let r = builder.build(m, records.iter(), [], [], []);
        match response.send_response(r).await {
            Ok(info) => info,
            Err(_) => hickory_proto::op::Header {
                metadata: Metadata::new(0, MessageType::Response, OpCode::Query),
                counts: Default::default(),
            }
            .into(),
        }
    }
}

/// A pod's `/etc/resolv.conf` as Kubernetes writes it for namespace `ns`
/// (`ip netns exec` shows `/etc/netns/<name>/resolv.conf` as the pod's);
/// removed on drop.
pub struct PodResolvConf {
    dir: PathBuf,
}

/// The cluster DNS service address the pods' resolv.conf names (capture
/// redirects queries to it to the agent's proxy).
pub const CLUSTER_DNS: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

impl PodResolvConf {
    pub fn write(netns: &str, ns: &str) -> PodResolvConf {
        Self::write_with(netns, ns, "")
    }

    /// Over TCP only (glibc's `options use-vc`).
    pub fn write_tcp(netns: &str, ns: &str) -> PodResolvConf {
        Self::write_with(netns, ns, " use-vc")
    }

    fn write_with(netns: &str, ns: &str, options: &str) -> PodResolvConf {
        let dir = PathBuf::from(format!("/etc/netns/{netns}"));
        std::fs::create_dir_all(&dir).expect("/etc/netns dir");
        std::fs::write(
            dir.join("resolv.conf"),
            format!(
                "nameserver {CLUSTER_DNS}\nsearch {ns}.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 timeout:2 attempts:1{options}\n"
            ),
        )
        .expect("resolv.conf");
        PodResolvConf { dir }
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `getent ahostsv4 <name>` as a process of `pod` (its netns, with the
/// pod's resolv.conf, and its cgroup): glibc's own resolution (search
/// list, ndots) as an application does it. The first address, or `None`
/// when the name does not resolve.
pub fn getaddrinfo(pod: &Pod, name: &str) -> Option<IpAddr> {
    // Into the cgroup first, so eBPF capture applies from the first query.
    let script = r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" getent ahostsv4 "$3""#;
    let out = std::process::Command::new("sh")
        .args(["-c", script, "sh"])
        .arg(&pod.cgroup)
        .args([&pod.netns, name])
        .output()
        .expect("getent");
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
}

/// A query for `name`/`qtype` sent from `sockets` (a pod) to `server` over
/// UDP or TCP; the answer, or `None` if none came within 10 s.
pub async fn query(
    sockets: &Sockets,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    tcp: bool,
) -> Option<Message> {
    let mut msg = Message::query();
    msg.metadata.id = rand_id();
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).ok()?, qtype));
    let bytes = msg.to_vec().ok()?;
    let ask = async {
        if tcp {
            let mut s = sockets.connect(server, Default::default()).await.ok()?;
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            s.write_all(&framed).await.ok()?;
            let n = s.read_u16().await.ok()?;
            let mut buf = vec![0u8; usize::from(n)];
            s.read_exact(&mut buf).await.ok()?;
            Message::from_vec(&buf).ok()
        } else {
            let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
            let s = sockets.udp(any, None, false).await.ok()?;
            s.send_to(&bytes, server).await.ok()?;
            let mut buf = vec![0u8; 65535];
            let (n, _) = s.recv_from(&mut buf).await.ok()?;
            Message::from_vec(&buf[..n]).ok()
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .ok()
        .flatten()
}

/// The A records' addresses in `m`.
pub fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

fn rand_id() -> u16 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos % 65_521) as u16
}
