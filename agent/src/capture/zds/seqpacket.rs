//! A `SOCK_SEQPACKET` unix socket for tokio (which has stream sockets
//! only): one message per packet, file descriptors in `SCM_RIGHTS`.

use super::*;

/// One received packet.
pub(super) struct Packet {
    pub(super) len: usize,
    pub(super) fds: Vec<OwnedFd>,
    /// The data or the fds did not fit.
    pub(super) truncated: bool,
}

/// A connected `SOCK_SEQPACKET` unix socket (tokio has stream sockets only).
pub(super) struct SeqPacket(AsyncFd<Socket>);

impl SeqPacket {
    pub(super) fn connect(path: &Path) -> io::Result<SeqPacket> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking().cloexec(), None)?;
        // A unix connect completes at once or fails (EAGAIN when the
        // backlog is full); either way there is nothing to wait for.
        socket.connect(&SockAddr::unix(path)?)?;
        Self::register(socket)
    }

    pub(super) fn register(socket: Socket) -> io::Result<SeqPacket> {
        // SAFETY: the Socket owns its fd and keeps it open and unchanged
        // until the AsyncFd (which owns the Socket) is dropped.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(SeqPacket(fd))
    }

    pub(super) async fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.0.writable().await?;
            // MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
            if let Ok(sent) = guard.try_io(|s| s.get_ref().send_with_flags(msg, libc::MSG_NOSIGNAL))
            {
                return match sent? {
                    n if n == msg.len() => Ok(()),
                    n => Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes", msg.len()),
                    )),
                };
            }
        }
    }

    /// Receives one packet; cancel-safe (nothing is read until it is ready).
    pub(super) async fn recv(&self, buf: &mut [u8]) -> io::Result<Packet> {
        loop {
            let mut guard = self.0.readable().await?;
            if let Ok(packet) = guard.try_io(|s| recv_with_fds(s.as_raw_fd(), buf)) {
                return packet;
            }
        }
    }
}

/// `recvmsg` with room for [`MAX_FDS`] fds in `SCM_RIGHTS`.
pub(super) fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Packet> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_BYTES.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: msg points at buffers of the stated sizes that outlive the
    // call. MSG_CMSG_CLOEXEC: received fds must not leak into children
    // (e.g. the `nft` commands capture runs).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // Own every received fd before anything can fail, so none leaks.
    // SAFETY: the kernel filled msg_control up to msg_controllen, and the
    // CMSG_* walk stays within it; SCM_RIGHTS data is an array of fds that
    // now belong to this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                #[allow(clippy::unnecessary_cast)]
                let bytes = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Packet {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
    })
}
