//! eBPF capture for the agent: C programs under `ebpf/src/bpf/`, compiled
//! with clang by the build script and attached with aya.
//!
//! - Inbound: a tc ingress classifier (TCX on kernels >= 6.6, netlink
//!   clsact before) on the pod's interface hands TCP for the pod's
//!   addresses to the agent's transparent listener on
//!   [`INBOUND_PLAINTEXT_PORT`] (`bpf_sk_assign`); the accepted socket's local
//!   address is the original destination. [`HBONE_PORT`] is left alone.
//! - Outbound: cgroup `connect4`/`connect6` on the pod's cgroup send the
//!   pod's TCP connects to `pod-ip:`[`OUTBOUND_PORT`]; `sockops` files the
//!   original destination under the client's address; a cgroup `getsockopt`
//!   program on the agent's own cgroup answers `SO_ORIGINAL_DST` on the
//!   agent's accepted socket.
//!
//! The constants below are the contract every capture backend shares with
//! the proxy; the C side (`src/bpf/common.h`) mirrors them.

mod bpf_sys;
mod capture;
mod cgroup;
mod error;
mod maps;
mod netlink;
mod netns;
mod objects;
#[cfg(test)]
mod test_run;

pub use capture::{CaptureStats, EbpfCapture, LoadOptions, PodAttachment, PodSpec, TcMode};
pub use error::EbpfError;

/// SO_MARK carried by the agent's own sockets; capture never redirects them.
pub const AGENT_MARK: u32 = 0x539;
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE port (never captured).
pub const HBONE_PORT: u16 = 15008;
