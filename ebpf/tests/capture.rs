//! End-to-end capture in network namespaces: a "pod" netns wired by a veth
//! pair to a "peer" netns, a cgroup v2 directory for the pod's processes,
//! the agent's listeners opened inside the pod netns by this process (which
//! plays the agent: it is outside the pod cgroup). Needs root, `ip`
//! (iproute2), `tc` and `bpftool`; fails loudly when any is missing.
//! Everything created is removed by guards, on success, failure or panic.

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

use ambient_ebpf::{
    EbpfCapture, EbpfError, LoadOptions, PodSpec, TcMode, AGENT_MARK, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
};
use socket2::{Domain, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(5);
const APP_PORT: u16 = 8080;
const PEER_PORT: u16 = 9090;

// ---------------------------------------------------------------- world --

static NEXT: AtomicU32 = AtomicU32::new(1);

fn require(cond: bool, why: &str) {
    assert!(cond, "cannot run the eBPF capture tests: {why}");
}

fn run(cmd: &str, args: &[&str]) -> String {
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

fn cgroup2_root() -> PathBuf {
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
struct World {
    pod: String,
    peer: String,
    cgroup: PathBuf,
    pod4: Ipv4Addr,
    peer4: Ipv4Addr,
    pod6: Ipv6Addr,
    peer6: Ipv6Addr,
}

impl World {
    fn new(tag: &str) -> World {
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

    fn netns(&self, name: &str) -> PathBuf {
        Path::new("/var/run/netns").join(name)
    }
    fn pod_ns(&self) -> PathBuf {
        self.netns(&self.pod)
    }
    fn peer_ns(&self) -> PathBuf {
        self.netns(&self.peer)
    }
    fn pod_ips(&self) -> [IpAddr; 2] {
        [self.pod4.into(), self.pod6.into()]
    }
    fn spec<'a>(&'a self, netns: &'a Path, ips: &'a [IpAddr]) -> PodSpec<'a> {
        PodSpec {
            netns,
            cgroup: Some(&self.cgroup),
            pod_ips: ips,
            interface: "eth0",
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
fn in_ns<R: Send>(netns: &Path, f: impl FnOnce() -> R + Send) -> R {
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

fn listener(addr: SocketAddr, transparent: bool) -> TcpListener {
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

fn timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
}

fn accept_within(l: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
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

fn assert_nothing_queued(l: &TcpListener, what: &str) {
    l.set_nonblocking(true).expect("nonblocking");
    match l.accept() {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("{what}: unexpected connection from {peer}"),
        Err(e) => panic!("{what}: accept: {e}"),
    }
}

/// Reads the client's line and answers `who`.
fn serve(mut s: TcpStream, who: &str) {
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).expect("read request");
    assert_eq!(&buf, b"hi\n");
    s.write_all(format!("{who}\n").as_bytes())
        .expect("write answer");
}

/// Connects from the calling thread's netns, sends a line, returns the answer.
fn talk(dst: SocketAddr, mark: Option<u32>) -> io::Result<String> {
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
fn original_dst(fd: RawFd) -> Option<SocketAddr> {
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

/// A client process inside the pod: joins the pod cgroup (when given) and
/// netns, connects to `dst`, sends "hi\n", and exits 0 iff the answer is
/// `expect`. Everything the child touches is prepared before fork, and the
/// child makes only raw syscalls.
struct PodClient {
    pid: libc::pid_t,
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
    fn spawn(
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
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (family, len) = match dst {
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
                (libc::AF_INET, size_of::<libc::sockaddr_in>())
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
                (libc::AF_INET6, size_of::<libc::sockaddr_in6>())
            }
        };
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
            libc::alarm(20);
            // Drop every descriptor inherited from the test process (other
            // tests' bpf links among them: a copy would keep them attached).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            if let Some(p) = &procs {
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
            if libc::connect(
                s,
                (&ss as *const libc::sockaddr_storage).cast(),
                len as libc::socklen_t,
            ) != 0
            {
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
    fn wait(mut self) -> i32 {
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
fn client_failure(code: i32) -> &'static str {
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

fn in_netns_cmd(ns: &str, cmd: &[&str]) -> String {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

fn bpftool_cgroup(cgroup: &Path) -> String {
    run("bpftool", &["cgroup", "show", &cgroup.to_string_lossy()])
}

/// Program ids attached with TCX to the interface's ingress.
fn tcx_ids(w: &World) -> Vec<u32> {
    in_ns(&w.pod_ns(), || {
        let (_, progs) =
            aya::programs::SchedClassifier::query_tcx("eth0", aya::programs::TcAttachType::Ingress)
                .expect("query tcx");
        progs.iter().map(|p| p.id()).collect()
    })
}

fn prog_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .map(|o| o.status.success())
        .unwrap_or_else(|e| panic!("cannot run bpftool (apt-get install bpftool): {e}"))
}

/// The kernel frees programs after an RCU grace period: poll a little.
fn wait_gone(ids: &[u32]) {
    let deadline = Instant::now() + TIMEOUT;
    while ids.iter().any(|id| prog_exists(*id)) {
        assert!(Instant::now() < deadline, "programs still loaded: {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_cgroup() -> PathBuf {
    let c = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let rel = c
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 membership");
    cgroup2_root().join(rel.trim_start_matches('/'))
}

// ---------------------------------------------------------------- tests --

/// The agent's listeners in the pod netns.
struct AgentListeners {
    in4: TcpListener,
    in6: TcpListener,
    out4: TcpListener,
    out6: TcpListener,
    hbone: TcpListener,
}

fn agent_listeners(w: &World) -> AgentListeners {
    in_ns(&w.pod_ns(), || AgentListeners {
        in4: listener((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(), true),
        in6: listener((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT).into(), true),
        out4: listener((Ipv4Addr::UNSPECIFIED, OUTBOUND_PORT).into(), false),
        out6: listener((Ipv6Addr::UNSPECIFIED, OUTBOUND_PORT).into(), false),
        hbone: listener((Ipv4Addr::UNSPECIFIED, HBONE_PORT).into(), false),
    })
}

/// Inbound from the peer to `dst` is accepted by `l` with the original
/// destination as local address; returns the client's answer.
fn inbound_captured(w: &World, l: &TcpListener, dst: SocketAddr, who: &str) {
    std::thread::scope(|s| {
        let client = s.spawn(|| in_ns(&w.peer_ns(), || talk(dst, None)));
        let (conn, peer) =
            accept_within(l).unwrap_or_else(|e| panic!("inbound to {dst} not captured: {e}"));
        assert_eq!(
            conn.local_addr().expect("local addr"),
            dst,
            "getsockname is the original destination"
        );
        let expect_peer: IpAddr = if dst.is_ipv4() {
            w.peer4.into()
        } else {
            w.peer6.into()
        };
        assert_eq!(peer.ip(), expect_peer, "the client address is preserved");
        serve(conn, who);
        assert_eq!(
            client.join().expect("client thread").expect("client talk"),
            who
        );
    });
}

/// A pod process (in the pod cgroup) connecting to `dst` is accepted by
/// `l`, and SO_ORIGINAL_DST on the accepted socket is `dst`.
fn outbound_captured(w: &World, capture: &EbpfCapture, l: &TcpListener, dst: SocketAddr) {
    let client = PodClient::spawn(&w.pod_ns(), Some(&w.cgroup), None, dst, "agent-out");
    let accepted = accept_within(l);
    let (conn, peer) = match accepted {
        Ok(c) => c,
        Err(e) => {
            let code = client.wait();
            panic!(
                "outbound to {dst} not captured: {e} (client: {})",
                client_failure(code)
            );
        }
    };
    let pod_ip: IpAddr = if dst.is_ipv4() {
        w.pod4.into()
    } else {
        w.pod6.into()
    };
    assert_eq!(peer.ip(), pod_ip, "the agent sees the pod IP as the source");
    assert_eq!(
        original_dst(conn.as_raw_fd()),
        Some(dst),
        "SO_ORIGINAL_DST; {:?}",
        capture.stats()
    );
    serve(conn, "agent-out");
    let code = client.wait();
    assert_eq!(code, 0, "pod client: {}", client_failure(code));
}

/// A connection to the real peer server answered by the peer.
fn reaches_peer(peer: &TcpListener, client: impl FnOnce() -> i32 + Send, what: &str) {
    std::thread::scope(|s| {
        let c = s.spawn(client);
        let (conn, _) =
            accept_within(peer).unwrap_or_else(|e| panic!("{what}: never reached the peer: {e}"));
        serve(conn, "peer");
        let code = c.join().expect("client thread");
        assert_eq!(code, 0, "{what}: client: {}", client_failure(code));
    });
}

#[test]
fn captures_inbound_and_outbound_until_detached() {
    let w = World::new("full");
    let ips = w.pod_ips();
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load().expect("load capture");
    assert_eq!(capture.tc_mode(), TcMode::Tcx, "this kernel has TCX");
    let prog_ids = capture.program_ids().expect("program ids");
    let agent = agent_listeners(&w);
    let (peer4, peer6) = in_ns(&w.peer_ns(), || {
        (
            listener((w.peer4, PEER_PORT).into(), false),
            listener((w.peer6, PEER_PORT).into(), false),
        )
    });

    let att = capture.attach(&w.spec(&pod_ns, &ips)).expect("attach");
    assert!(
        tcx_ids(&w).contains(&prog_ids[0]),
        "classifier attached with TCX"
    );
    let cg = bpftool_cgroup(&w.cgroup);
    for hook in ["connect4", "connect6", "sock_ops"] {
        assert!(cg.contains(hook), "cgroup has {hook}: {cg}");
    }

    // (a) inbound: peer -> pod:8080 lands on the transparent 15006 listener.
    inbound_captured(&w, &agent.in4, (w.pod4, APP_PORT).into(), "agent-in");
    inbound_captured(&w, &agent.in6, (w.pod6, APP_PORT).into(), "agent-in6");
    // ... but HBONE goes to its own listener.
    std::thread::scope(|s| {
        let dst: SocketAddr = (w.pod4, HBONE_PORT).into();
        let peer_ns = w.peer_ns();
        let client = s.spawn(move || in_ns(&peer_ns, || talk(dst, None)));
        let (conn, _) = accept_within(&agent.hbone).expect("HBONE reaches 15008");
        assert_eq!(conn.local_addr().expect("local"), dst);
        serve(conn, "hbone");
        assert_eq!(client.join().expect("client").expect("talk"), "hbone");
    });
    assert_nothing_queued(&agent.in4, "15006 after HBONE");

    // (b) outbound: a pod process -> peer:9090 lands on 15001, original dst kept.
    outbound_captured(&w, &capture, &agent.out4, (w.peer4, PEER_PORT).into());
    outbound_captured(&w, &capture, &agent.out6, (w.peer6, PEER_PORT).into());

    // (c) not captured: the agent's mark inside the pod cgroup, a process
    // outside the pod cgroup (the agent itself), loopback.
    let peer_dst: SocketAddr = (w.peer4, PEER_PORT).into();
    reaches_peer(
        &peer4,
        || PodClient::spawn(&pod_ns, Some(&w.cgroup), Some(AGENT_MARK), peer_dst, "peer").wait(),
        "marked socket",
    );
    reaches_peer(
        &peer4,
        || in_ns(&pod_ns, || talk(peer_dst, None)).map_or(14, |a| if a == "peer" { 0 } else { 16 }),
        "process outside the pod cgroup",
    );
    let local = in_ns(&pod_ns, || {
        listener((Ipv4Addr::LOCALHOST, PEER_PORT).into(), false)
    });
    reaches_peer(
        &local,
        || {
            PodClient::spawn(
                &pod_ns,
                Some(&w.cgroup),
                None,
                (Ipv4Addr::LOCALHOST, PEER_PORT).into(),
                "peer",
            )
            .wait()
        },
        "loopback",
    );
    assert_nothing_queued(&agent.out4, "15001 after uncaptured connections");
    let stats = capture.stats().expect("stats");
    assert!(stats.inbound_assigned >= 2, "{stats:?}");
    assert!(stats.outbound_answered >= 2, "{stats:?}");
    assert!(stats.outbound_skipped >= 2, "{stats:?}");

    // (d) detach: nothing left, nothing captured.
    att.detach().expect("detach");
    assert!(!tcx_ids(&w).contains(&prog_ids[0]), "classifier detached");
    assert_eq!(
        in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]).trim(),
        ""
    );
    assert!(!in_netns_cmd(&w.pod, &["tc", "qdisc", "show", "dev", "eth0"]).contains("clsact"));
    let cg = bpftool_cgroup(&w.cgroup);
    assert!(
        !cg.contains("connect4") && !cg.contains("sock_ops"),
        "cgroup programs left: {cg}"
    );

    let refused = in_ns(&w.peer_ns(), || talk((w.pod4, APP_PORT).into(), None));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused),
        "no app on 8080 any more"
    );
    reaches_peer(
        &peer4,
        || PodClient::spawn(&pod_ns, Some(&w.cgroup), None, peer_dst, "peer").wait(),
        "pod process after detach",
    );
    reaches_peer(
        &peer6,
        || {
            PodClient::spawn(
                &pod_ns,
                Some(&w.cgroup),
                None,
                (w.peer6, PEER_PORT).into(),
                "peer",
            )
            .wait()
        },
        "pod process after detach (IPv6)",
    );
    assert_nothing_queued(&agent.in4, "15006 after detach");
    assert_nothing_queued(&agent.out4, "15001 after detach");

    // Dropping the capture unloads every program and the getsockopt hook.
    let getsockopt_id = prog_ids[4].to_string();
    assert!(
        bpftool_cgroup(&agent_cgroup()).contains(&getsockopt_id),
        "getsockopt on the agent cgroup"
    );
    drop(capture);
    wait_gone(&prog_ids);
    let agent_cg = bpftool_cgroup(&agent_cgroup());
    assert!(
        !agent_cg
            .lines()
            .any(|l| l.split_whitespace().next() == Some(getsockopt_id.as_str())),
        "getsockopt left on the agent cgroup: {agent_cg}"
    );
}

#[test]
fn legacy_tc_attach_removes_its_filter_and_qdisc() {
    let w = World::new("nl");
    let ips = [IpAddr::from(w.pod4)];
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load_with(&LoadOptions {
        tc: TcMode::Netlink,
        ..Default::default()
    })
    .expect("load");
    let prog_ids = capture.program_ids().expect("ids");
    let agent = agent_listeners(&w);
    let spec = PodSpec {
        netns: &pod_ns,
        cgroup: None,
        pod_ips: &ips,
        interface: "eth0",
    };

    let att = capture.attach(&spec).expect("attach");
    let filters = in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]);
    assert!(
        filters.contains("amb_inbound"),
        "filter installed: {filters}"
    );
    inbound_captured(&w, &agent.in4, (w.pod4, APP_PORT).into(), "agent-in");

    // Dropping (not detach) must clean up too, from whatever thread.
    drop(att);
    assert_eq!(
        in_netns_cmd(&w.pod, &["tc", "filter", "show", "dev", "eth0", "ingress"]).trim(),
        ""
    );
    assert!(!in_netns_cmd(&w.pod, &["tc", "qdisc", "show", "dev", "eth0"]).contains("clsact"));
    let refused = in_ns(&w.peer_ns(), || talk((w.pod4, APP_PORT).into(), None));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionRefused)
    );
    drop(capture);
    wait_gone(&prog_ids);
}

#[test]
fn failed_attach_leaves_nothing_and_duplicates_are_refused() {
    let w = World::new("err");
    let ips = w.pod_ips();
    let pod_ns = w.pod_ns();
    let capture = EbpfCapture::load().expect("load");
    let prog_ids = capture.program_ids().expect("ids");

    let bad = PodSpec {
        interface: "nosuchif0",
        ..w.spec(&pod_ns, &ips)
    };
    assert!(
        matches!(capture.attach(&bad), Err(EbpfError::Program { .. })),
        "unknown interface"
    );
    let missing = PathBuf::from("/var/run/netns/amb-does-not-exist");
    let bad = PodSpec {
        netns: &missing,
        ..w.spec(&pod_ns, &ips)
    };
    assert!(matches!(capture.attach(&bad), Err(EbpfError::Netns { .. })));
    assert!(matches!(
        capture.attach(&PodSpec {
            pod_ips: &[],
            ..w.spec(&pod_ns, &ips)
        }),
        Err(EbpfError::NoPodAddress)
    ));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect"))
            .count(),
        0
    );
    assert!(!tcx_ids(&w).contains(&prog_ids[0]));

    // The failures above registered nothing: the real attach works, once.
    let att = capture
        .attach(&w.spec(&pod_ns, &ips))
        .expect("attach after failures");
    assert!(matches!(
        capture.attach(&w.spec(&pod_ns, &ips)),
        Err(EbpfError::AlreadyAttached(_))
    ));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect4"))
            .count(),
        1
    );
    att.detach().expect("detach");
    let again = capture
        .attach(&w.spec(&pod_ns, &ips))
        .expect("attach after detach");
    drop(again);
    assert!(!tcx_ids(&w).contains(&prog_ids[0]));
    assert_eq!(
        bpftool_cgroup(&w.cgroup)
            .lines()
            .filter(|l| l.contains("connect"))
            .count(),
        0
    );
}
