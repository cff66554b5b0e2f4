//! The compiled programs, embedded from the build script's output, and the
//! names of their programs and maps (as written in `src/bpf/*.bpf.c`).

use aya::include_bytes_aligned;

/// tc ingress classifier (`inbound.bpf.c`).
pub(crate) static INBOUND: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inbound.bpf.o"));
/// connect4/6, sockops, getsockopt and the DNS programs (`outbound.bpf.c`).
pub(crate) static OUTBOUND: &[u8] =
    include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outbound.bpf.o"));

pub(crate) const PROG_INBOUND: &str = "amb_inbound";
pub(crate) const PROG_CONNECT4: &str = "amb_connect4";
pub(crate) const PROG_CONNECT6: &str = "amb_connect6";
pub(crate) const PROG_SOCKOPS: &str = "amb_sockops";
pub(crate) const PROG_GETSOCKOPT: &str = "amb_getsockopt";
pub(crate) const PROG_SENDMSG4: &str = "amb_sendmsg4";
pub(crate) const PROG_SENDMSG6: &str = "amb_sendmsg6";
pub(crate) const PROG_RECVMSG4: &str = "amb_recvmsg4";
pub(crate) const PROG_RECVMSG6: &str = "amb_recvmsg6";
pub(crate) const PROG_GETPEERNAME4: &str = "amb_getpeername4";
pub(crate) const PROG_GETPEERNAME6: &str = "amb_getpeername6";
/// The cgroup/sock_addr programs attached to a pod's cgroup when its DNS
/// is captured (connect4/6 serve both TCP capture and DNS).
pub(crate) const DNS_PROGS: [&str; 6] = [
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_RECVMSG4,
    PROG_RECVMSG6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
];

pub(crate) const MAP_POD_ADDRS: &str = "amb_pod_addrs";
pub(crate) const MAP_PODS: &str = "amb_pods";
pub(crate) const MAP_FLOWS: &str = "amb_flows";
pub(crate) const MAP_STATS: &str = "amb_stats";

#[cfg(test)]
mod tests {
    use super::*;

    /// Global data (`.rodata`, `.data`, `.bss`) turned out unreliable here: a
    /// struct initializer that clang placed in `.rodata` read back as zeros.
    /// The programs initialise field by field; keep it that way.
    #[test]
    fn objects_have_no_global_data() {
        for (name, obj) in [("inbound", INBOUND), ("outbound", OUTBOUND)] {
            for section in [&b".rodata"[..], b".data", b".bss"] {
                assert!(
                    !obj.windows(section.len()).any(|w| w == section),
                    "{name}.bpf.o has a {} section",
                    String::from_utf8_lossy(section)
                );
            }
        }
    }
}
