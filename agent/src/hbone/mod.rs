//! HBONE: TCP tunneled in HTTP/2 CONNECT streams over mutual TLS 1.3.
//!
//! - [`tls`]: TLS configurations and SPIFFE peer verification;
//! - [`server`]: the CONNECT side of an established connection;
//! - [`pool`]: pooled client connections and stream opening;
//! - [`stream`]: joining a stream to a TCP socket;
//! - [`record`]: TLS 1.3 records after the handshake, decrypted in place.

pub mod pool;
pub mod record;
pub mod server;
pub mod stream;
pub mod tls;

pub use pool::{Pool, PoolConfig, PoolError, PoolKey};
pub use record::TlsConn;
pub use stream::{copy_bidirectional, copy_bidirectional_io, H2Stream, Transferred};

/// A CONNECT request for `target` on behalf of `client` (sent as
/// `Forwarded: for=`), with `baggage` describing the source workload and
/// a fresh `traceparent`.
pub fn connect_request(
    target: std::net::SocketAddr,
    client: std::net::IpAddr,
    baggage: &str,
) -> Result<http::Request<()>, http::Error> {
    let for_ip = match client {
        std::net::IpAddr::V4(ip) => format!("for=\"{ip}\""),
        std::net::IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    let trace_id: u128 = rand::random();
    let span_id: u64 = rand::random();
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", for_ip)
        .header("baggage", baggage)
        .header(
            "traceparent",
            format!("00-{trace_id:032x}-{span_id:016x}-00"),
        )
        .body(())
}

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
