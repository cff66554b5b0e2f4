//! Relaying a query the mesh does not answer to the upstream resolvers.
//!
//! The client's query goes out as it came (its id, flags and EDNS), from a
//! socket inside the pod's namespace carrying the agent's mark: the
//! upstream sees the pod's own address, as with ztunnel, and capture does
//! not send the query back to the proxy. The upstream's answer, whatever
//! its code (NXDOMAIN and SERVFAIL included), is what the client gets.
//! Upstreams are tried in order until one answers, within one deadline.
//! UDP first; a truncated answer is fetched again over TCP when the client
//! asked over TCP (a UDP client gets the truncated answer and retries over
//! TCP itself, through the proxy).
//!
//! Every UDP query has a socket of its own, so a fresh random source port
//! (RFC 5452: an off-path spoofer must guess it along with the id); the
//! sockets are made ahead in batches, as making one inside the pod's
//! namespace costs a trip to that namespace's thread.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::socket::{ConnectOpts, Sockets};

/// Largest UDP answer read (EDNS payloads go up to 4096 in practice).
const MAX_UDP: usize = 65_535;
/// Largest TCP answer (its length prefix is 16 bits).
const MAX_TCP: usize = 65_535;
/// UDP sockets made per trip to the pod's namespace.
const SPARE_BATCH: usize = 16;
/// Unused sockets kept per family (a burst makes several batches at once).
const SPARE_MAX: usize = 64;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("{upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{upstream}: answer does not match the query")]
    Mismatch { upstream: SocketAddr },
}

/// Sends queries to the upstream resolvers from a pod's namespace.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub sockets: Sockets,
    pub mark: Option<u32>,
    /// Unused UDP sockets, IPv4 and IPv6, each for one query.
    pub spares: Arc<Spares>,
}

/// UDP sockets made ahead, not yet used.
#[derive(Debug, Default)]
pub struct Spares {
    v4: Mutex<Vec<std::net::UdpSocket>>,
    v6: Mutex<Vec<std::net::UdpSocket>>,
}

impl Forwarder {
    /// The upstream's answer to `query` (raw DNS message), asked over TCP
    /// if `tcp`.
    pub async fn forward(&self, query: &[u8], tcp: bool) -> Result<Vec<u8>, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let attempt = async {
            let mut last = None;
            for &upstream in &self.upstreams {
                match self.ask(upstream, query, tcp).await {
                    Ok(answer) => return Ok(answer),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or(ForwardError::NoUpstream))
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| ForwardError::Timeout(self.timeout))?
    }

    async fn ask(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        tcp: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        // Each upstream gets a share of the deadline, so a dead first one
        // leaves time for the next.
        let share = self.timeout / u32::try_from(self.upstreams.len()).unwrap_or(1).max(1);
        let io = |source| ForwardError::Io { upstream, source };
        let answer = tokio::time::timeout(share, self.udp(upstream, query))
            .await
            .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
            .map_err(io)?;
        check(query, &answer).ok_or(ForwardError::Mismatch { upstream })?;
        if tcp && truncated(&answer) {
            let answer = tokio::time::timeout(share, self.tcp(upstream, query))
                .await
                .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
                .map_err(io)?;
            check(query, &answer).ok_or(ForwardError::Mismatch { upstream })?;
            return Ok(answer);
        }
        Ok(answer)
    }

    async fn udp(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let socket = self.spare(upstream.is_ipv4()).await?;
        socket.connect(upstream)?;
        // Whatever reached the socket while it waited unconnected is not
        // from the upstream (once connected, the kernel filters the rest).
        let mut scratch = [0u8; 1];
        while socket.recv(&mut scratch).is_ok() {}
        let socket = tokio::net::UdpSocket::from_std(socket)?;
        socket.send(query).await?;
        let mut buf = Vec::with_capacity(MAX_UDP);
        loop {
            buf.clear();
            socket.recv_buf(&mut buf).await?;
            // Stray datagrams (another id) are not the answer; keep waiting.
            if check(query, &buf).is_some() {
                return Ok(buf);
            }
        }
    }

    /// A socket no query has used, of the family of `v4`.
    async fn spare(&self, v4: bool) -> std::io::Result<std::net::UdpSocket> {
        let pool = if v4 { &self.spares.v4 } else { &self.spares.v6 };
        let take = || pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(s) = take() {
            return Ok(s);
        }
        let any = if v4 {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let mut made = self
            .sockets
            .udp_batch(SocketAddr::new(any, 0), self.mark, SPARE_BATCH)
            .await?;
        let mine = made
            .pop()
            .ok_or_else(|| std::io::Error::other("no socket made"))?;
        let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
        let room = SPARE_MAX.saturating_sub(pool.len());
        pool.extend(made.into_iter().take(room));
        Ok(mine)
    }

    async fn tcp(&self, upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
        let opts = ConnectOpts {
            mark: self.mark,
            ..ConnectOpts::default()
        };
        let mut s = self.sockets.connect(upstream, opts).await?;
        let len = u16::try_from(query.len())
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        s.write_all(&framed).await?;
        let n = usize::from(s.read_u16().await?);
        if n > MAX_TCP {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut answer = vec![0u8; n];
        s.read_exact(&mut answer).await?;
        Ok(answer)
    }
}

/// `Some` if `answer` looks like a response to `query`: same id and the QR
/// bit (the caller compares the questions once it has parsed them).
fn check(query: &[u8], answer: &[u8]) -> Option<()> {
    if answer.len() < 12 || query.len() < 12 {
        return None;
    }
    let same_id = answer[..2] == query[..2];
    let is_response = answer[2] & 0x80 != 0;
    (same_id && is_response).then_some(())
}

/// The TC bit.
fn truncated(answer: &[u8]) -> bool {
    answer.len() > 2 && answer[2] & 0x02 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder(upstreams: Vec<SocketAddr>, timeout: Duration) -> Forwarder {
        Forwarder {
            upstreams,
            timeout,
            sockets: Sockets::Host,
            mark: None,
            spares: Default::default(),
        }
    }

    /// An upstream on loopback answering every query with NOERROR, and
    /// recording the source port of each.
    async fn recording_upstream() -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = up.local_addr().unwrap();
        let ports = Arc::new(Mutex::new(Vec::new()));
        let seen = ports.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = up.recv_from(&mut buf).await {
                seen.lock().unwrap().push(peer.port());
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80;
                let _ = up.send_to(&answer, peer).await;
            }
        });
        (addr, ports)
    }

    /// RFC 5452: each query from its own source port, sockets made ahead
    /// or not; and nothing that reached a spare socket before its query
    /// is taken for the answer.
    #[tokio::test]
    async fn every_query_has_a_fresh_port_and_only_its_answer() {
        let (upstream, ports) = recording_upstream().await;
        let f = forwarder(vec![upstream], Duration::from_secs(2));
        for _ in 0..40 {
            let answer = f.forward(&QUERY, false).await.expect("answered");
            assert_eq!(answer[3] & 0x0f, 0);
        }
        let mut seen = ports.lock().unwrap().clone();
        assert_eq!(seen.len(), 40);
        seen.sort_unstable();
        seen.dedup();
        // Ports are drawn at random from the ephemeral range, so two
        // queries may draw the same one by chance (a few % for 40); a
        // reused socket would show as one port for many queries.
        assert!(seen.len() >= 35, "source ports reused: {seen:?}");

        // A forged NXDOMAIN with the right id, sent to every spare socket
        // before it is used.
        let spares: Vec<SocketAddr> = f
            .spares
            .v4
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.local_addr().unwrap())
            .collect();
        assert!(!spares.is_empty(), "no spare sockets made ahead");
        let forger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut forged = QUERY.to_vec();
        forged[2] |= 0x80;
        forged[3] = 0x83;
        for s in &spares {
            forger.send_to(&forged, s).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..spares.len() {
            let answer = f.forward(&QUERY, false).await.expect("answered");
            assert_eq!(answer[3] & 0x0f, 0, "a forged answer was taken");
        }
    }

    const QUERY: [u8; 12] = [0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];

    #[tokio::test]
    async fn a_dead_upstream_is_skipped_and_the_next_ones_answer_returned() {
        let live = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = live.recv_from(&mut buf).await.unwrap();
            // A stray answer with another id first, then the real one
            // (NXDOMAIN: rcode 3) which must come back unchanged.
            let mut stray = buf[..n].to_vec();
            stray[0] ^= 0xff;
            stray[2] |= 0x80;
            live.send_to(&stray, peer).await.unwrap();
            let mut answer = buf[..n].to_vec();
            answer[2] |= 0x80;
            answer[3] = 0x83;
            live.send_to(&answer, peer).await.unwrap();
        });
        // Bound but never answering.
        let dead = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let f = forwarder(
            vec![dead.local_addr().unwrap(), live_addr],
            Duration::from_secs(2),
        );
        let answer = f.forward(&QUERY, false).await.expect("answered");
        assert_eq!(&answer[..2], &QUERY[..2]);
        assert_eq!(answer[3] & 0x0f, 3, "NXDOMAIN passed back");
    }

    #[tokio::test]
    async fn no_answer_in_time_is_an_error_in_bounded_time() {
        let dead = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let f = forwarder(vec![dead.local_addr().unwrap()], Duration::from_millis(200));
        let started = std::time::Instant::now();
        assert!(f.forward(&QUERY, false).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            forwarder(Vec::new(), Duration::from_secs(1))
                .forward(&QUERY, false)
                .await,
            Err(ForwardError::NoUpstream)
        ));
    }
}
