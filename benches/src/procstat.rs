//! Resource use of a process, read from `/proc`: resident memory and CPU
//! time (user + system, every thread), so the agents' own costs are
//! measured apart from the applications'.

use std::io;
use std::time::Duration;

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss(pid: u32) -> io::Result<u64> {
    status_bytes(pid, "VmRSS")
}

/// The most `pid` has had resident since it started, in bytes (`VmHWM`,
/// the high-water mark of its RSS).
pub fn peak_rss(pid: u32) -> io::Result<u64> {
    status_bytes(pid, "VmHWM")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("no {field} for pid {pid}")))
}

/// How many file descriptors `pid` has open.
pub fn fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// User + system CPU time of every thread of `pid`.
pub fn cpu(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; fields resume after its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc/pid/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("malformed /proc/pid/stat"))
    };
    Ok(from_ticks(ticks(11)? + ticks(12)?))
}

/// Clock ticks (`USER_HZ`) as time.
fn from_ticks(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Busy CPU time of the whole machine, every CPU together: everything in
/// `/proc/stat`'s `cpu` line but idle and iowait (so softirq work done on
/// behalf of sockets counts, whichever process it interrupted).
pub fn machine_busy() -> io::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| {
            f.parse()
                .map_err(|_| io::Error::other("malformed /proc/stat"))
        })
        .collect::<io::Result<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // inside user and nice).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| !matches!(i, 3 | 4))
        .map(|(_, t)| t)
        .sum();
    Ok(from_ticks(busy))
}

/// CPU time of this process (every thread).
pub fn self_cpu() -> Duration {
    cpu(std::process::id()).unwrap_or_default()
}

/// Raises this process's open-file limit to `want` (soft and, if allowed,
/// hard); children inherit it. Without the privilege to raise the hard
/// limit, the soft limit goes up to the hard one, and too low a hard limit
/// is an error naming it.
pub fn raise_fd_limit(want: u64) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return Ok(());
            }
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if lim.rlim_max < want {
        return Err(io::Error::other(format!(
            "RLIMIT_NOFILE hard limit {} is below the {want} needed; raise it or pass fewer --idle-conns",
            lim.rlim_max
        )));
    }
    Ok(())
}
