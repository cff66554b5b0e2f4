//! Looking up the address of a workload known by DNS name (a ServiceEntry
//! with DNS resolution), as ztunnel does on demand when it connects.
//!
//! The names are asked of the same upstream resolvers the DNS proxy
//! forwards to (`dns.upstreams`, else /etc/resolv.conf), from the agent's
//! own namespace; with none, of the system resolver. Answers are kept for
//! their TTL (at most [`MAX_TTL`]), a failure for [`NEGATIVE_TTL`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::forward::{ForwardError, Forwarder};
use crate::socket::Sockets;

/// Longest an answer is kept.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// How long a failed lookup is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// How long the system resolver's answer is kept (it gives no TTL).
const SYSTEM_TTL: Duration = Duration::from_secs(5);
/// Names kept; beyond it the cache starts over.
const MAX_NAMES: usize = 4096;

/// Why a name has no address.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LookupError {
    #[error("{0:?} is not a valid DNS name")]
    Name(String),
    #[error("{name}: {why}")]
    Failed { name: String, why: String },
    #[error("{0}: no address")]
    NoAddress(String),
}

/// An answer and until when it holds.
type Cached = (Instant, Result<Vec<IpAddr>, LookupError>);

/// A DNS client with a small cache.
#[derive(Debug)]
pub struct Resolver {
    forwarder: Option<Forwarder>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Resolver {
    /// Asks `upstreams` (none: the system resolver), each answer within
    /// `timeout`, from sockets carrying `mark`.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration, mark: Option<u32>) -> Self {
        let forwarder = (!upstreams.is_empty()).then(|| Forwarder {
            upstreams,
            timeout,
            sockets: Sockets::Host,
            mark,
            spares: Default::default(),
        });
        Resolver {
            forwarder,
            cache: Mutex::default(),
        }
    }

    /// The addresses of `name`, IPv4 and IPv6.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, LookupError> {
        let now = Instant::now();
        if let Some((until, answer)) = self.cached(name) {
            if until > now {
                return answer;
            }
        }
        let (answer, ttl) = match &self.forwarder {
            Some(f) => ask(f, name).await,
            None => (system(name).await, SYSTEM_TTL),
        };
        let ttl = match &answer {
            Ok(_) => ttl.min(MAX_TTL),
            Err(_) => NEGATIVE_TTL,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_NAMES {
            cache.clear();
        }
        cache.insert(name.to_string(), (now + ttl, answer.clone()));
        answer
    }

    fn cached(&self, name: &str) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(name).cloned()
    }
}

/// A and AAAA of `name` from the upstreams, and the shortest TTL seen.
async fn ask(f: &Forwarder, name: &str) -> (Result<Vec<IpAddr>, LookupError>, Duration) {
    let fqdn = if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    };
    let Ok(qname) = Name::from_ascii(&fqdn) else {
        return (Err(LookupError::Name(name.to_string())), NEGATIVE_TTL);
    };
    let (v4, v6) = tokio::join!(
        one(f, qname.clone(), RecordType::A),
        one(f, qname, RecordType::AAAA)
    );
    let failed = |why: String| LookupError::Failed {
        name: name.to_string(),
        why,
    };
    let (mut ips, mut ttl) = (Vec::new(), MAX_TTL);
    let mut errors = Vec::new();
    for r in [v4, v6] {
        match r {
            Ok((found, t)) => {
                ips.extend(found);
                ttl = ttl.min(t);
            }
            Err(e) => errors.push(e),
        }
    }
    if ips.is_empty() {
        return match errors.pop() {
            Some(e) => (Err(failed(e)), NEGATIVE_TTL),
            None => (Err(LookupError::NoAddress(name.to_string())), NEGATIVE_TTL),
        };
    }
    (Ok(ips), ttl)
}

/// One question's addresses and their shortest TTL (no record: none).
async fn one(
    f: &Forwarder,
    name: Name,
    qtype: RecordType,
) -> Result<(Vec<IpAddr>, Duration), String> {
    let mut q = Message::query();
    q.metadata.id = rand::random();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name, qtype));
    let bytes = q.to_vec().map_err(|e| e.to_string())?;
    let answer = f
        .forward(&bytes, true)
        .await
        .map_err(|e: ForwardError| e.to_string())?;
    let m = Message::from_vec(&answer).map_err(|e| e.to_string())?;
    match m.metadata.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => {}
        code => return Err(format!("the resolver answered {code}")),
    }
    let mut ttl = MAX_TTL;
    let ips = m
        .answers
        .iter()
        .filter_map(|r| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            ttl = ttl.min(Duration::from_secs(u64::from(r.ttl)));
            Some(ip)
        })
        .collect();
    Ok((ips, ttl))
}

async fn system(name: &str) -> Result<Vec<IpAddr>, LookupError> {
    let found = tokio::net::lookup_host((name, 0))
        .await
        .map_err(|e| LookupError::Failed {
            name: name.to_string(),
            why: e.to_string(),
        })?;
    let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
    ips.dedup();
    if ips.is_empty() {
        return Err(LookupError::NoAddress(name.to_string()));
    }
    Ok(ips)
}
