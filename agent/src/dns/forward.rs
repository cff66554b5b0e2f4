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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::socket::{ConnectOpts, Sockets};

/// Largest UDP answer read (EDNS payloads go up to 4096 in practice).
const MAX_UDP: usize = 65_535;
/// Largest TCP answer (its length prefix is 16 bits).
const MAX_TCP: usize = 65_535;

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
        let any = match upstream.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let socket = self
            .sockets
            .udp(SocketAddr::new(any, 0), self.mark, false)
            .await?;
        socket.connect(upstream).await?;
        socket.send(query).await?;
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let n = socket.recv(&mut buf).await?;
            // Stray datagrams (another id) are not the answer; keep waiting.
            if check(query, &buf[..n]).is_some() {
                buf.truncate(n);
                return Ok(buf);
            }
        }
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
