//! The one rtnetlink request aya does not offer: deleting the clsact qdisc
//! this crate added (legacy tc attach on kernels without TCX). Runs in the
//! calling thread's network namespace.

use std::io;
use std::mem::size_of;

const RTM_DELQDISC: u16 = 37;
const NLMSG_ERROR: u16 = 2;
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;
const CLSACT_HANDLE: u32 = 0xFFFF_0000;

#[repr(C)]
#[derive(Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    hdr: NlMsgHdr,
    tc: TcMsg,
}

/// Deletes the clsact qdisc of `ifindex` (and with it any filter left on it).
pub(crate) fn delete_clsact(ifindex: u32) -> io::Result<()> {
    // SAFETY: creating a netlink socket we own and close below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = request(fd, ifindex);
    // SAFETY: closing the descriptor created above.
    unsafe { libc::close(fd) };
    result
}

fn request(fd: libc::c_int, ifindex: u32) -> io::Result<()> {
    let req = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: RTM_DELQDISC,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            seq: 1,
            pid: 0,
        },
        tc: TcMsg {
            family: libc::AF_UNSPEC as u8,
            pad1: 0,
            pad2: 0,
            ifindex: ifindex as i32,
            handle: CLSACT_HANDLE,
            parent: TC_H_CLSACT,
            info: 0,
        },
    };
    // SAFETY: sending the bytes of a plain C struct to the kernel.
    let sent = unsafe { libc::send(fd, (&req as *const Request).cast(), size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // A receive timeout keeps a silent kernel from hanging detach forever.
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setting a socket option from a timeval of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: receiving into a buffer of the given length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    let hdr_len = size_of::<NlMsgHdr>();
    if n < hdr_len + 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink answer",
        ));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind != NLMSG_ERROR {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink answer",
        ));
    }
    let errno = i32::from_ne_bytes([
        buf[hdr_len],
        buf[hdr_len + 1],
        buf[hdr_len + 2],
        buf[hdr_len + 3],
    ]);
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}
