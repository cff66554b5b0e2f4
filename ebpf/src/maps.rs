//! Rust mirrors of the map keys and values in `src/bpf/common.h` (same
//! layout, addresses in network byte order) and the counter slots.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) const AF_INET: u32 = libc::AF_INET as u32;
pub(crate) const AF_INET6: u32 = libc::AF_INET6 as u32;

/// An address as the programs see it: `addr` holds the bytes in wire order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct AddrKey {
    pub family: u32,
    pub addr: [u32; 4],
}

// SAFETY: plain C layout without padding; every bit pattern is valid.
unsafe impl aya::Pod for AddrKey {}

impl AddrKey {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddrKey {
                family: AF_INET,
                addr: [wire4(v4), 0, 0, 0],
            },
            IpAddr::V6(v6) => AddrKey {
                family: AF_INET6,
                addr: wire6(v6),
            },
        }
    }
}

pub(crate) const POD_HAS_V4: u32 = 1;
pub(crate) const POD_HAS_V6: u32 = 2;

/// `struct amb_pod`: where a pod's outbound connections are sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PodCfg {
    pub flags: u32,
    pub ip4: u32,
    pub ip6: [u32; 4],
    /// The DNS proxy's port on the pod's loopback; 0: DNS not captured.
    pub dns_port: u32,
}

// SAFETY: plain C layout without padding; every bit pattern is valid.
unsafe impl aya::Pod for PodCfg {}

/// `struct amb_flow_key`: only the netns part is read from userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FlowKey {
    pub netns: u64,
    pub family: u32,
    pub addr: [u32; 4],
    pub port: u32,
}

// SAFETY: plain C layout without padding; every bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}

/// `struct amb_orig_dst`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct OrigDst {
    pub family: u32,
    pub addr: [u32; 4],
    pub port: u32,
}

// SAFETY: plain C layout without padding; every bit pattern is valid.
unsafe impl aya::Pod for OrigDst {}

/// The four bytes of `ip` as a u32 holding them in wire order.
pub(crate) fn wire4(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub(crate) fn wire6(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Counter slots of `amb_stats` (`enum amb_stat`).
pub(crate) mod stat {
    pub const IN_NOT_TCP: u32 = 0;
    pub const IN_NOT_POD: u32 = 1;
    pub const IN_HBONE: u32 = 2;
    pub const IN_ESTABLISHED: u32 = 3;
    pub const IN_ASSIGNED: u32 = 4;
    pub const IN_NO_LISTENER: u32 = 5;
    pub const IN_ASSIGN_FAILED: u32 = 6;
    pub const OUT_REDIRECTED: u32 = 7;
    pub const OUT_SKIPPED: u32 = 8;
    pub const OUT_RECORDED: u32 = 9;
    pub const OUT_ANSWERED: u32 = 10;
    pub const OUT_UNKNOWN: u32 = 11;
    pub const IN_PROBE: u32 = 12;
    pub const DNS_REDIRECTED: u32 = 13;
    pub const DNS_RESTORED: u32 = 14;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn layouts_match_common_h() {
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<PodCfg>(), 28);
        assert_eq!(size_of::<FlowKey>(), 32);
        assert_eq!(size_of::<OrigDst>(), 24);
    }

    #[test]
    fn addresses_are_in_wire_order() {
        let k = AddrKey::new("10.1.2.3".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        let k = AddrKey::new("2001:db8::1".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(k.addr[3].to_ne_bytes(), [0, 0, 0, 1]);
    }
}
