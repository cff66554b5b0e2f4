//! The original destination of a captured connection, read the same way for
//! every capture backend: `SO_ORIGINAL_DST` (IPv4, then IPv6), else the
//! accepted socket's local address (TPROXY, `bpf_sk_assign`, no capture).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h).
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// Where the client meant to connect.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if let Some(a) = getsockopt_addr(fd, libc::SOL_IP, SO_ORIGINAL_DST) {
        return Ok(a);
    }
    if let Some(a) = getsockopt_addr(fd, libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST) {
        return Ok(a);
    }
    stream.local_addr()
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
}
