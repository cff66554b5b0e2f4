//! eBPF capture for the agent: C programs under `ebpf/src/bpf/`, compiled
//! with clang by the build script and attached with aya. (Arrives with the
//! capture issue; the constants below are the contract every capture
//! backend shares with the proxy.)

/// SO_MARK carried by the agent's own sockets; capture never redirects them.
pub const AGENT_MARK: u32 = 0x539;
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture port.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE port (never captured).
pub const HBONE_PORT: u16 = 15008;
