//! Scaffolding shared by the eBPF end-to-end tests: a "pod" netns wired
//! by a veth pair to a "peer" netns with a cgroup v2 directory for the
//! pod's processes, sockets made inside a netns by this process (which
//! plays the agent: it is outside the pod cgroup), forked pod processes,
//! and inspections of what is attached. Needs root, `ip` (iproute2), `tc`
//! and `bpftool`; fails loudly when any is missing. Everything created is
//! removed by guards, on success, failure or panic.
#![allow(dead_code)] // each test crate uses part of it

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ambient_ebpf::PodSpec;
use socket2::{Domain, Socket, Type};

pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const APP_PORT: u16 = 8080;
pub const PEER_PORT: u16 = 9090;

// ---------------------------------------------------------------- world --

pub static NEXT: AtomicU32 = AtomicU32::new(1);

pub fn require(cond: bool, why: &str) {
    assert!(cond, "cannot run the eBPF capture tests: {why}");
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (install it: see ebpf/install-deps.sh): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn cgroup2_root() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .unwrap_or_else(|| {
            panic!("no cgroup v2 hierarchy is mounted: mount -t cgroup2 none /sys/fs/cgroup")
        })
}

/// A pod netns and a peer netns joined by a veth pair, and a pod cgroup.
pub struct World {
    pub pod: String,
    pub peer: String,
    pub cgroup: PathBuf,
    pub pod4: Ipv4Addr,
    pub peer4: Ipv4Addr,
    pub pod6: Ipv6Addr,
    pub peer6: Ipv6Addr,
}

impl World {
    pub fn new(tag: &str) -> World {
        // SAFETY: geteuid has no preconditions.
        require(
            unsafe { libc::geteuid() } == 0,
            "they need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
        );
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let subnet = (pid.wrapping_mul(7).wrapping_add(n) % 250) as u8;
        let w = World {
            pod: format!("amb-{tag}-pod-{pid}"),
            peer: format!("amb-{tag}-peer-{pid}"),
            cgroup: cgroup2_root().join(format!("amb-test-{tag}-{pid}")),
            pod4: Ipv4Addr::new(198, 18, subnet, 2),
            peer4: Ipv4Addr::new(198, 18, subnet, 1),
            pod6: Ipv6Addr::new(0x2001, 0xdb8, subnet as u16, 0, 0, 0, 0, 2),
            peer6: Ipv6Addr::new(0x2001, 0xdb8, subnet as u16, 0, 0, 0, 0, 1),
        };
        // The guard exists before anything is created: a failure below
        // still removes what was made.
        run("ip", &["netns", "add", &w.pod]);
        run("ip", &["netns", "add", &w.peer]);
        run(
            "ip",
            &[
                "-n", &w.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
                "netns", &w.peer,
            ],
        );
        for (ns, v4, v6) in [(&w.pod, w.pod4, w.pod6), (&w.peer, w.peer4, w.peer6)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"],
            );
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            );
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        fs::create_dir(&w.cgroup)
            .unwrap_or_else(|e| panic!("create cgroup {}: {e}", w.cgroup.display()));
        w
    }

    pub fn netns(&self, name: &str) -> PathBuf {
        Path::new("/var/run/netns").join(name)
    }
    pub fn pod_ns(&self) -> PathBuf {
        self.netns(&self.pod)
    }
    pub fn peer_ns(&self) -> PathBuf {
        self.netns(&self.peer)
    }
    pub fn pod_ips(&self) -> [IpAddr; 2] {
        [self.pod4.into(), self.pod6.into()]
    }
    pub fn spec<'a>(&'a self, netns: &'a Path, ips: &'a [IpAddr]) -> PodSpec<'a> {
        PodSpec {
            netns,
            cgroup: Some(&self.cgroup),
            pod_ips: ips,
            interface: "eth0",
            dns_port: None,
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Forked clients are reaped before this runs; rmdir fails loudly in
        // the log (not a panic during unwinding) if one is still there.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.pod])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.peer])
            .status();
        if self.cgroup.exists() {
            if let Err(e) = fs::remove_dir(&self.cgroup) {
                eprintln!("could not remove cgroup {}: {e}", self.cgroup.display());
            }
        }
    }
}

// -------------------------------------------------------------- sockets --

/// Runs `f` on a thread inside `netns` (sockets made there stay there).
pub fn in_ns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> R {
    let file = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace file, for this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("netns thread panicked")
    })
}

pub fn listener(addr: SocketAddr, transparent: bool) -> TcpListener {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    if addr.is_ipv6() {
        s.set_only_v6(true).expect("IPV6_V6ONLY");
    }
    if transparent {
        if addr.is_ipv4() {
            s.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        } else {
            s.set_ip_transparent_v6(true).expect("IPV6_TRANSPARENT");
        }
    }
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(64).expect("listen");
    s.into()
}

pub fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
}

pub fn accept_within(l: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                timeouts(&s);
                return Ok((s, a));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "nothing to accept"))
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn assert_nothing_queued(l: &TcpListener, what: &str) {
    l.set_nonblocking(true).expect("nonblocking");
    match l.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: unexpected connection from {peer}"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

/// Reads the client's line and answers `who`.
pub fn serve(mut s: TcpStream, who: &str) {
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).expect("read request");
    assert_eq!(&buf, b"hi\n");
    s.write_all(format!("{who}\n").as_bytes())
        .expect("write answer");
}

/// Connects from the calling thread's netns, sends a line, returns the answer.
pub fn talk(dst: SocketAddr, mark: Option<u32>) -> io::Result<String> {
    let domain = if dst.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, None)?;
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    s.connect_timeout(&dst.into(), TIMEOUT)?;
    let mut s: TcpStream = s.into();
    timeouts(&s);
    s.write_all(b"hi\n")?;
    let mut answer = String::new();
    let mut b = [0u8; 64];
    let n = s.read(&mut b)?;
    answer.push_str(&String::from_utf8_lossy(&b[..n]));
    Ok(answer.trim_end().to_owned())
}

/// What the agent does: SO_ORIGINAL_DST (IPv4, then IPv6), else None.
pub fn original_dst(fd: RawFd) -> Option<SocketAddr> {
    for level in [libc::SOL_IP, libc::SOL_IPV6] {
        let mut ss = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buffer and length describe writable memory of that size.
        let rc = unsafe { libc::getsockopt(fd, level, 80, ss.as_mut_ptr().cast(), &mut len) };
        if rc != 0 {
            continue;
        }
        // SAFETY: zeroed then possibly filled by the kernel; any bits are valid.
        let ss = unsafe { ss.assume_init() };
        // SAFETY: the family says which sockaddr the storage holds.
        return Some(unsafe {
            match ss.ss_family as i32 {
                libc::AF_INET => {
                    let sin: libc::sockaddr_in =
                        std::ptr::read((&ss as *const libc::sockaddr_storage).cast());
                    SocketAddr::new(
                        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into(),
                        u16::from_be(sin.sin_port),
                    )
                }
                libc::AF_INET6 => {
                    let sin6: libc::sockaddr_in6 =
                        std::ptr::read((&ss as *const libc::sockaddr_storage).cast());
                    SocketAddr::new(
                        Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                        u16::from_be(sin6.sin6_port),
                    )
                }
                f => panic!("SO_ORIGINAL_DST answered family {f}"),
            }
        });
    }
    None
}

// -------------------------------------------------- pod process (fork) --

/// In a forked child: bounds its life, drops every descriptor inherited
/// from the test process (other tests' bpf links among them: a copy would
/// keep them attached), joins the pod's cgroup (`procs`, its
/// `cgroup.procs`) and netns, or `_exit`s with 10 (cgroup) or 11 (netns).
/// Raw syscalls only, on memory prepared before the fork.
///
/// # Safety
/// Call only in a child between `fork` and `_exit`.
pub unsafe fn enter_pod(ns: &CString, procs: Option<&CString>) {
    // SAFETY: async-signal-safe syscalls on NUL-terminated paths.
    unsafe {
        libc::alarm(20);
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if let Some(p) = procs {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(10);
            }
            libc::close(fd);
        }
        let nsfd = libc::open(ns.as_ptr(), libc::O_RDONLY);
        if nsfd < 0 || libc::setns(nsfd, libc::CLONE_NEWNET) != 0 {
            libc::_exit(11);
        }
    }
}

/// `addr` as the kernel takes it, prepared before a fork.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A client process inside the pod: joins the pod cgroup (when given) and
/// netns, connects to `dst`, sends "hi\n", and exits 0 iff the answer is
/// `expect`. Everything the child touches is prepared before fork, and the
/// child makes only raw syscalls.
pub struct PodClient {
    pub pid: libc::pid_t,
}

impl Drop for PodClient {
    fn drop(&mut self) {
        if self.pid > 0 {
            // Not waited for (a failed assertion): kill and reap it so the
            // cgroup can be removed.
            let mut status = 0;
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, &mut status, 0);
            }
        }
    }
}

impl PodClient {
    pub fn spawn(
        netns: &Path,
        cgroup: Option<&Path>,
        mark: Option<u32>,
        dst: SocketAddr,
        expect: &str,
    ) -> PodClient {
        let ns = CString::new(netns.to_string_lossy().as_bytes()).expect("netns path");
        let procs = cgroup.map(|c| {
            CString::new(c.join("cgroup.procs").to_string_lossy().as_bytes()).expect("path")
        });
        let mut expect = expect.as_bytes().to_vec();
        expect.push(b'\n');
        let (ss, len) = sockaddr(dst);
        let family = i32::from(ss.ss_family);
        let tv = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        let tvlen = size_of::<libc::timeval>() as libc::socklen_t;

        // SAFETY: the child only makes async-signal-safe syscalls on memory
        // prepared above, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid > 0 {
            return PodClient { pid };
        }
        unsafe {
            enter_pod(&ns, procs.as_ref());
            let s = libc::socket(family, libc::SOCK_STREAM, 0);
            if s < 0 {
                libc::_exit(12);
            }
            if let Some(m) = mark {
                let rc = libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&m as *const u32).cast(),
                    4,
                );
                if rc != 0 {
                    libc::_exit(13);
                }
            }
            let tvp = (&tv as *const libc::timeval).cast();
            libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tvp, tvlen);
            libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvlen);
            if libc::connect(s, (&ss as *const libc::sockaddr_storage).cast(), len) != 0 {
                libc::_exit(14);
            }
            if libc::write(s, b"hi\n".as_ptr().cast(), 3) != 3 {
                libc::_exit(15);
            }
            let mut buf = [0u8; 64];
            let n = libc::read(s, buf.as_mut_ptr().cast(), buf.len());
            if n != expect.len() as isize || buf[..expect.len()] != expect[..] {
                libc::_exit(16);
            }
            libc::_exit(0);
        }
    }

    /// Exit code, or panics after a deadline (killing the child).
    pub fn wait(mut self) -> i32 {
        let deadline = Instant::now() + 3 * TIMEOUT;
        loop {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                self.pid = 0;
                assert!(libc::WIFEXITED(status), "client died: status {status}");
                return libc::WEXITSTATUS(status);
            }
            assert!(rc == 0, "waitpid: {}", io::Error::last_os_error());
            if Instant::now() > deadline {
                panic!("client process hung"); // Drop kills and reaps it
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Client exit codes: 0 = got the expected answer.
pub fn client_failure(code: i32) -> &'static str {
    match code {
        0 => "ok",
        10 => "joining the pod cgroup failed",
        11 => "entering the pod netns failed",
        14 => "connect failed",
        16 => "unexpected answer",
        _ => "other failure",
    }
}

// --------------------------------------------------------- inspections --

pub fn in_netns_cmd(ns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

pub fn bpftool_cgroup(cgroup: &Path) -> String {
    run("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])
}

/// Program ids attached with TCX to the interface's ingress.
pub fn tcx_ids(w: &World) -> Vec<u32> {
    in_ns(&w.pod_ns(), || {
        let (_, progs) =
            aya::programs::SchedClassifier::query_tcx("eth0", aya::programs::TcAttachType::Ingress)
                .expect("query tcx");
        progs.iter().map(|p| p.id()).collect()
    })
}

pub fn prog_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or_else(|e| panic!("cannot run bpftool (apt-get install bpftool): {e}"))
}

/// The kernel frees programs after an RCU grace period: poll a little.
pub fn wait_gone(ids: &[u32]) {
    let deadline = Instant::now() + TIMEOUT;
    while ids.iter().any(|id| prog_exists(*id)) {
        assert!(Instant::now() < deadline, "programs still loaded: {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn agent_cgroup() -> PathBuf {
    let c = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = c
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 membership");
    cgroup2_root().join(rel.trim_start_matches('/'))
}
