//! The one bpf(2) command aya does not wrap: BPF_LINK_DETACH. Closing a link
//! descriptor detaches only when no copy is left, and any fork (a spawned
//! `nft`/`ip` before its exec) briefly holds copies; BPF_LINK_DETACH cuts
//! the link from its hook at once, whoever still holds a descriptor.

use std::io;

const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

fn bpf(cmd: libc::c_long, attr: &mut [u32; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed bpf_attr prefix of the given size; the
    // kernel treats the missing tail as zero.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Detaches the link with kernel id `id`; a link already gone is fine.
pub(crate) fn detach_link(id: u32) -> io::Result<()> {
    let mut attr = [0u32; 16];
    attr[0] = id; // link_id
    let fd = match bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) {
        Ok(fd) => fd as libc::c_int,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut attr = [0u32; 16];
    attr[0] = fd as u32; // link_detach.link_fd
    let r = bpf(BPF_LINK_DETACH, &mut attr).map(drop);
    // SAFETY: closing the descriptor BPF_LINK_GET_FD_BY_ID gave us.
    unsafe { libc::close(fd) };
    r
}
