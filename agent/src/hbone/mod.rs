//! HBONE: TCP tunneled in HTTP/2 CONNECT streams over mutual TLS 1.3.
//!
//! - [`tls`]: TLS configurations and SPIFFE peer verification;
//! - [`server`]: the CONNECT side of an established connection;
//! - [`pool`]: pooled client connections and stream opening;
//! - [`stream`]: joining a stream to a TCP socket;
//! - [`double`]: the inner tunnel of double HBONE, inside a gateway's;
//! - [`terminate`]: HBONE served as one workload (waypoint, gateway);
//! - [`record`]: TLS 1.3 records after the handshake, decrypted in place.

pub mod double;
pub mod pool;
pub mod server;
pub mod stream;
pub mod terminate;
pub mod tls;
pub mod tls_conn;

pub use pool::{Pool, PoolConfig, PoolError, PoolKey};
pub use stream::{copy_bidirectional, copy_bidirectional_io, H2Stream, StreamIo, Transferred};
pub use tls_conn::TlsConn;

use std::net::{IpAddr, SocketAddr};

/// What a CONNECT asks for: its `:authority`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    /// An address: a workload's, or a service's VIP (to a waypoint).
    Addr(SocketAddr),
    /// A service by hostname and service port: double HBONE, where the
    /// client cannot know the far network's addresses.
    Service { hostname: String, port: u16 },
}

impl Authority {
    /// Parses `ip:port`, `[v6]:port` or `hostname:port`; `None` for
    /// anything else (a port of 0, a host that is not a DNS name).
    pub fn parse(s: &str) -> Option<Authority> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return (addr.port() != 0).then_some(Authority::Addr(addr));
        }
        let (host, port) = s.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        if !crate::state::valid_hostname(host) {
            return None;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        Some(Authority::Service {
            hostname: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl std::fmt::Display for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authority::Addr(a) => a.fmt(f),
            Authority::Service { hostname, port } => write!(f, "{hostname}:{port}"),
        }
    }
}

/// A CONNECT request for `target` on behalf of `client` (sent as
/// `Forwarded: for=`), with `baggage` describing the source workload and
/// a fresh `traceparent`.
pub fn connect_request(
    target: SocketAddr,
    client: IpAddr,
    baggage: &str,
) -> Result<http::Request<()>, http::Error> {
    connect_request_to(&Authority::Addr(target), client, baggage, None, None)
}

/// A CONNECT request for `authority`, as [`connect_request`]; with
/// `service`, `Forwarded` also names the service's hostname (`host=`), and
/// with `origin_network` it carries `x-forwarded-network` (the inner
/// request of double HBONE, as ztunnel sends it).
pub fn connect_request_to(
    authority: &Authority,
    client: IpAddr,
    baggage: &str,
    service: Option<&str>,
    origin_network: Option<&str>,
) -> Result<http::Request<()>, http::Error> {
    let mut forwarded = match client {
        IpAddr::V4(ip) => format!("for=\"{ip}\""),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if let Some(host) = service {
        forwarded.push_str(";host=");
        forwarded.push_str(host);
    }
    let trace_id: u128 = rand::random();
    let span_id: u64 = rand::random();
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .header("forwarded", forwarded)
        .header("baggage", baggage)
        .header(
            "traceparent",
            format!("00-{trace_id:032x}-{span_id:016x}-00"),
        );
    if let Some(network) = origin_network {
        req = req.header(FORWARDED_NETWORK, network);
    }
    req.body(())
}

/// The header naming the client's network on the inner CONNECT of double
/// HBONE (ztunnel's `X_FORWARDED_NETWORK_HEADER`).
pub const FORWARDED_NETWORK: &str = "x-forwarded-network";

/// The `baggage` header describing workload `w`.
pub fn baggage(w: &crate::state::Workload) -> String {
    format!(
        "k8s.namespace.name={},k8s.pod.name={},service.name={}",
        w.namespace, w.name, w.name
    )
}

/// The port every agent accepts HBONE on.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 flow-control and framing settings (DESIGN §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Settings {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Connection receive window. Must exceed the stream window: when they
    /// are equal one stalled stream can starve the rest.
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams a peer may open on one connection towards us.
    pub max_concurrent_streams: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 100,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ztunnel's `HboneAddress`: an ip:port, or a service `hostname:port`
    /// (double HBONE's authority); nothing else is a target.
    #[test]
    fn authorities() {
        let svc = |h: &str, port| {
            Some(Authority::Service {
                hostname: h.into(),
                port,
            })
        };
        let cases = [
            (
                "10.1.0.2:8080",
                Some(Authority::Addr("10.1.0.2:8080".parse().unwrap())),
            ),
            (
                "[fd10::2]:80",
                Some(Authority::Addr("[fd10::2]:80".parse().unwrap())),
            ),
            (
                "echo.test.svc.cluster.local:80",
                svc("echo.test.svc.cluster.local", 80),
            ),
            (
                "Echo.Test.svc.cluster.local.:80",
                svc("echo.test.svc.cluster.local", 80),
            ),
            ("echo:9000", svc("echo", 9000)),
            ("10.1.0.2:0", None),
            ("echo:0", None),
            ("echo", None),
            ("echo:http", None),
            ("10.1.0:80", None),
            ("-echo.test:80", None),
            ("echo..test:80", None),
            ("echo_test:80", None),
            ("user@echo:80", None),
            (":80", None),
            ("fd10::2:80", None),
        ];
        for (s, want) in cases {
            assert_eq!(Authority::parse(s), want, "{s}");
            if let Some(a) = want {
                assert_eq!(
                    Authority::parse(&a.to_string()),
                    Some(a),
                    "round trip of {s}"
                );
            }
        }
    }

    #[test]
    fn the_inner_request_of_double_hbone() {
        let a = Authority::Service {
            hostname: "echo.test.svc.cluster.local".into(),
            port: 80,
        };
        let r = connect_request_to(
            &a,
            "10.1.0.2".parse().unwrap(),
            "k8s.pod.name=c",
            Some("echo.test.svc.cluster.local"),
            Some("net1"),
        )
        .unwrap();
        assert_eq!(r.uri().to_string(), "echo.test.svc.cluster.local:80");
        assert_eq!(r.method(), http::Method::CONNECT);
        // ztunnel's build_forwarded with a service: for="..";host=<hostname>.
        assert_eq!(
            r.headers()["forwarded"],
            "for=\"10.1.0.2\";host=echo.test.svc.cluster.local"
        );
        assert_eq!(r.headers()[FORWARDED_NETWORK], "net1");
        let outer = connect_request_to(&a, "10.1.0.2".parse().unwrap(), "", None, None).unwrap();
        assert!(outer.headers().get(FORWARDED_NETWORK).is_none());
    }
}
