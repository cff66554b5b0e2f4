//! PROXY protocol v2 headers for workloads whose application tunnel is
//! PROXY (waypoints): the source address, the tunnel's target, and the
//! source's SPIFFE identity in TLV 0xD0, as Istio's waypoints expect.

use std::net::SocketAddr;

use ppp::v2::{Builder, Command, Header, Protocol, Version};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::identity::Identity;

/// The TLV type carrying the peer's SPIFFE identity.
pub const TLV_PEER_IDENTITY: u8 = 0xD0;

/// Signature (12) + version/command + family/protocol + length (2).
const FIXED_LEN: usize = 16;

/// What a PROXY v2 header told the receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    pub src: SocketAddr,
    /// Where the client meant to go (the HBONE target).
    pub dst: SocketAddr,
    /// The source's identity, when the sender vouched for one.
    pub identity: Option<Identity>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("source {src} and target {dst} are of different address families")]
    MixedFamilies { src: SocketAddr, dst: SocketAddr },
    #[error("encoding: {0}")]
    Encode(#[source] std::io::Error),
    #[error("reading the header: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed header: {0}")]
    Parse(#[from] ppp::v2::ParseError),
    #[error("header carries no TCP addresses")]
    NoAddresses,
    #[error("identity TLV is not a SPIFFE id: {0}")]
    Identity(String),
}

/// Encodes a PROXY v2 header for a stream from `src` to `dst` made by `identity`.
pub fn encode(
    src: SocketAddr,
    dst: SocketAddr,
    identity: &Identity,
) -> Result<Vec<u8>, ProxyProtocolError> {
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ProxyProtocolError::MixedFamilies { src, dst });
    }
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .write_tlv(TLV_PEER_IDENTITY, identity.to_uri().as_bytes())
        .and_then(|b| b.build())
        .map_err(ProxyProtocolError::Encode)
}

/// Reads one PROXY v2 header from the start of `stream`, and nothing more.
pub async fn read<R: AsyncRead + Unpin>(stream: &mut R) -> Result<ProxyHeader, ProxyProtocolError> {
    let mut buf = vec![0u8; FIXED_LEN];
    stream.read_exact(&mut buf).await?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    buf.resize(FIXED_LEN + len, 0);
    stream.read_exact(&mut buf[FIXED_LEN..]).await?;
    let header = Header::try_from(buf.as_slice())?;
    let (src, dst) = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        _ => return Err(ProxyProtocolError::NoAddresses),
    };
    let mut identity = None;
    for tlv in header.tlvs() {
        let tlv = tlv?;
        if tlv.kind == TLV_PEER_IDENTITY {
            let text = String::from_utf8_lossy(&tlv.value).into_owned();
            identity = Some(
                text.parse()
                    .map_err(|_| ProxyProtocolError::Identity(text))?,
            );
        }
    }
    Ok(ProxyHeader { src, dst, identity })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_leaves_the_payload() {
        let id = Identity::new("cluster.local", "ns", "client");
        for (src, dst) in [
            ("10.0.0.1:40000", "10.96.0.1:80"),
            ("[fd00::1]:40000", "[fd00::2]:8080"),
        ] {
            let (src, dst) = (src.parse().expect("src"), dst.parse().expect("dst"));
            let mut bytes = encode(src, dst, &id).expect("encode");
            assert_eq!(&bytes[..12], b"\r\n\r\n\0\r\nQUIT\n");
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let mut rd = bytes.as_slice();
            let h = read(&mut rd).await.expect("parse");
            assert_eq!(
                h,
                ProxyHeader {
                    src,
                    dst,
                    identity: Some(id.clone())
                }
            );
            assert_eq!(rd, b"GET / HTTP/1.1\r\n", "only the header is consumed");
        }
    }

    #[test]
    fn mixed_families_are_refused() {
        let id = Identity::new("td", "ns", "sa");
        let r = encode(
            "10.0.0.1:1".parse().expect("v4"),
            "[::1]:2".parse().expect("v6"),
            &id,
        );
        assert!(matches!(r, Err(ProxyProtocolError::MixedFamilies { .. })));
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        let mut rd: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(read(&mut rd).await.is_err());
    }
}
