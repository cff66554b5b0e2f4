//! Running code inside a pod's network namespace: always on a fresh thread
//! that enters the namespace with `setns(CLONE_NEWNET)` and then ends, so no
//! other thread (a tokio worker above all) ever changes namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::EbpfError;

/// `SO_NETNS_COOKIE` (linux/socket.h, 5.14+); not in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Runs `f` on a new thread inside the network namespace `netns` (an open
/// `/var/run/netns/x` or `/proc/<pid>/ns/net`). `f` may borrow from the
/// caller; the thread is joined before this returns.
pub(crate) fn in_netns<R: Send>(
    netns: &File,
    path: &Path,
    f: impl FnOnce() -> R + Send,
) -> Result<R, EbpfError> {
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("ambient-netns".into())
            .spawn_scoped(s, || {
                // SAFETY: plain syscall on a descriptor we own; affects only
                // this thread, which ends when `f` returns.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .map_err(|source| EbpfError::Netns {
                path: path.into(),
                source,
            })?;
        match thread.join() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(source)) => Err(EbpfError::Netns {
                path: path.into(),
                source,
            }),
            Err(_) => Err(EbpfError::ThreadPanicked),
        }
    })
}

/// The cookie the kernel gives the calling thread's network namespace (what
/// `bpf_get_netns_cookie` returns to the programs).
pub(crate) fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: creating and closing a socket we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a u64 and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the descriptor created above.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(cookie)
}
