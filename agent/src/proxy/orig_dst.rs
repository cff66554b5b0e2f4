//! The original destination of a captured connection, read the same way for
//! every capture backend: `SO_ORIGINAL_DST` (IPv4, then IPv6), else the
//! accepted socket's local address (TPROXY, `bpf_sk_assign`, no capture).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

use crate::socket::canonical;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h).
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the client meant to connect.
/// An IPv4 connection accepted by a dual-stack listener answers in IPv4
/// (the kernel looks it up by its IPv4 tuple) or, for the local address,
/// as IPv4-mapped; either way the result is the plain IPv4 address.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    let found = getsockopt_addr(fd, libc::SOL_IP, SO_ORIGINAL_DST)
        .or_else(|| getsockopt_addr(fd, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST));
    match found {
        Some(a) => Ok(canonical(a)),
        None => stream.local_addr().map(canonical),
    }
}

fn getsockopt_addr(fd: libc::c_int, level: libc::c_int, name: libc::c_int) -> Option<SocketAddr> {
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe valid writable memory of
    // the size the kernel is told; the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockopt(fd, level, name, storage.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised and possibly filled by the kernel; every bit
    // pattern is a valid sockaddr_storage.
    let storage = unsafe { storage.assume_init() };
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(ip.into(), u16::from_be(sin6.sin6_port)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn falls_back_to_local_address_without_capture() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(original_dst(&accepted).unwrap(), addr);
        client.await.unwrap().unwrap();
    }

    /// A dual-stack listener (as in-pod listeners are) shows an IPv4
    /// connection's addresses as `::ffff:a.b.c.d`; what the proxy sees is
    /// the IPv4 address, so it matches workloads and policies.
    #[tokio::test]
    async fn an_ipv4_connection_to_a_dual_stack_listener_reads_as_ipv4() {
        let listener = crate::socket::Sockets::Host
            .listen("[::]:0".parse().unwrap(), Default::default())
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (accepted, peer) = listener.accept().await.unwrap();
        assert!(peer.is_ipv6(), "the kernel reports {peer}");
        assert_eq!(original_dst(&accepted).unwrap(), addr);
        let client = client.await.unwrap().unwrap();
        assert_eq!(crate::socket::canonical(peer), client.local_addr().unwrap());
    }
}
