//! What the proxies report about each finished connection. Subscribers
//! (tests, and later the access log and metrics) get one record per
//! connection; with nobody listening a record costs one failed send.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::identity::Identity;

/// Which proxy handled the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Captured leaving a local workload.
    Outbound,
    /// Arrived over HBONE for a local workload.
    Inbound,
    /// Arrived in plaintext for a local workload.
    InboundPlaintext,
}

/// One finished (or failed) connection.
#[derive(Clone, Debug)]
pub struct ConnectionRecord {
    pub direction: Direction,
    /// The client's address.
    pub src: IpAddr,
    /// Where the bytes went: the application's address.
    pub dst: SocketAddr,
    /// The client's identity, when it proved one.
    pub src_identity: Option<Identity>,
    /// The server's identity, when it proved one.
    pub dst_identity: Option<Identity>,
    /// Bytes from the client towards the server.
    pub sent: u64,
    /// Bytes from the server back to the client.
    pub received: u64,
    /// Whether the bytes crossed the network inside mutual TLS.
    pub encrypted: bool,
    pub duration: Duration,
    /// Why the connection failed, if it did.
    pub error: Option<String>,
}
