//! DNS capture end to end in network namespaces: a pod's queries (UDP
//! `sendto`, connected UDP, TCP; IPv4, IPv6 and v4-mapped) to port 53 of
//! any non-loopback server reach the agent's DNS proxy on the pod's
//! loopback, and the answers read as coming from the server asked, which
//! is what resolvers check before accepting them (glibc compares the
//! answer's source with the nameserver it asked; musl matches it to one).
//! This mirrors what istio-cni's in-pod rules do with REDIRECT and
//! conntrack: `udp dport 53 ! -o lo` and `tcp dport 53 ! -d 127.0.0.1` to
//! 15053, the agent's own (marked) sockets excepted. Needs root, `ip`,
//! `bpftool`; fails loudly without them.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ambient_ebpf::{EbpfCapture, PodSpec, AGENT_MARK};
use common::*;
use socket2::{Domain, Socket, Type};

const DNS_PROXY_PORT: u16 = 15053;

/// Answers `{tag}:{query}` over UDP and TCP on its addresses until dropped.
struct Responder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Responder {
    fn start(netns: &Path, tag: &'static str, addrs: &[SocketAddr]) -> Responder {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let (udp, tcp) = in_ns(netns, || {
                let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
                (udp, listener(addr, false))
            });
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let s = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !s.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let mut answer = format!("{tag}:").into_bytes();
                        answer.extend_from_slice(&buf[..n]);
                        let _ = udp.send_to(&answer, from);
                    }
                }
            }));
            let s = stop.clone();
            threads.push(std::thread::spawn(move || serve_tcp(&tcp, tag, &s)));
        }
        Responder { stop, threads }
    }
}

fn serve_tcp(l: &TcpListener, tag: &str, stop: &AtomicBool) {
    l.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                timeouts(&s);
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf) {
                    let mut answer = format!("{tag}:").into_bytes();
                    answer.extend_from_slice(&buf[..n]);
                    let _ = s.write_all(&answer);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// How the pod process asks.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// `sendto` on an unconnected UDP socket, answer by `recvfrom`.
    UdpSendto,
    /// `connect` then `send` on a UDP socket; `recvfrom` and
    /// `getpeername` must both name the server asked.
    UdpConnected,
    /// A TCP connection; `getpeername` must name the server asked.
    Tcp,
}

/// A process of the pod (its cgroup and netns) sends `q` to `dst` the
/// `way` asked and exits 0 iff the answer is `expect`, seen as coming from
/// `dst`. `v6only: false` asks from a dual-stack IPv6 socket (`dst` then
/// is v4-mapped). The child makes only raw syscalls on memory prepared
/// before the fork.
fn ask(w: &World, way: Way, dst: SocketAddr, mark: Option<u32>, expect: &str) -> i32 {
    let ns = std::ffi::CString::new(w.pod_ns().to_string_lossy().as_bytes()).expect("path");
    let procs = std::ffi::CString::new(w.cgroup.join("cgroup.procs").to_string_lossy().as_bytes())
        .expect("path");
    let (ss, len) = sockaddr(dst);
    let family = i32::from(ss.ss_family);
    let stype = match way {
        Way::Tcp => libc::SOCK_STREAM,
        _ => libc::SOCK_DGRAM,
    };
    let q = b"q";
    let expect = expect.as_bytes().to_vec();
    let tv = libc::timeval {
        tv_sec: TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    let tvlen = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    let sslen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

    // Family, port and address equal (what a resolver compares).
    fn same(a: &libc::sockaddr_storage, b: &libc::sockaddr_storage) -> bool {
        // SAFETY: both are whole sockaddr_storage values.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts((a as *const libc::sockaddr_storage).cast::<u8>(), 24),
                std::slice::from_raw_parts((b as *const libc::sockaddr_storage).cast::<u8>(), 24),
            )
        };
        if a[..4] != b[..4] {
            return false;
        }
        if i32::from(u16::from_ne_bytes([a[0], a[1]])) == libc::AF_INET {
            a[4..8] == b[4..8]
        } else {
            a[8..24] == b[8..24]
        }
    }

    // SAFETY: the child only makes async-signal-safe syscalls on memory
    // prepared above, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid > 0 {
        return wait_child(pid);
    }
    unsafe {
        enter_pod(&ns, Some(&procs));
        let s = libc::socket(family, stype, 0);
        if s < 0 {
            libc::_exit(12);
        }
        if let Some(m) = mark {
            if libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&m as *const u32).cast(),
                4,
            ) != 0
            {
                libc::_exit(13);
            }
        }
        let tvp = (&tv as *const libc::timeval).cast();
        libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_RCVTIMEO, tvp, tvlen);
        libc::setsockopt(s, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvlen);
        let dstp = (&ss as *const libc::sockaddr_storage).cast();
        match way {
            Way::UdpSendto => {
                if libc::sendto(s, q.as_ptr().cast(), q.len(), 0, dstp, len) != q.len() as isize {
                    libc::_exit(14);
                }
            }
            _ => {
                if libc::connect(s, dstp, len) != 0 {
                    libc::_exit(14);
                }
                if libc::write(s, q.as_ptr().cast(), q.len()) != q.len() as isize {
                    libc::_exit(15);
                }
            }
        }
        let mut buf = [0u8; 64];
        let mut from: libc::sockaddr_storage = std::mem::zeroed();
        let mut fromlen = sslen;
        let n = libc::recvfrom(
            s,
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&mut from as *mut libc::sockaddr_storage).cast(),
            &mut fromlen,
        );
        if n != expect.len() as isize || buf[..expect.len()] != expect[..] {
            libc::_exit(16);
        }
        if !matches!(way, Way::Tcp) && !same(&from, &ss) {
            libc::_exit(17);
        }
        if !matches!(way, Way::UdpSendto) {
            let mut peer: libc::sockaddr_storage = std::mem::zeroed();
            let mut peerlen = sslen;
            if libc::getpeername(
                s,
                (&mut peer as *mut libc::sockaddr_storage).cast(),
                &mut peerlen,
            ) != 0
                || !same(&peer, &ss)
            {
                libc::_exit(18);
            }
        }
        libc::_exit(0);
    }
}

fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child (alarm(20) bounds it).
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "query process died: {status}");
    libc::WEXITSTATUS(status)
}

fn why(code: i32) -> &'static str {
    match code {
        0 => "ok",
        14 => "send/connect failed",
        16 => "unexpected answer (or none)",
        17 => "the answer came from another address than the one asked",
        18 => "getpeername names another address than the one asked",
        _ => "setup failed",
    }
}

#[track_caller]
fn expect_answer(w: &World, way: Way, dst: SocketAddr, mark: Option<u32>, expect: &str) {
    let code = ask(w, way, dst, mark, expect);
    assert_eq!(code, 0, "{way:?} to {dst}: {} (want {expect:?})", why(code));
}

fn dual_stack_udp_sendto(w: &World, dst: SocketAddr, expect: &str) -> i32 {
    // A v4-mapped destination from an AF_INET6 socket: `sockaddr` makes
    // the socket's family from the address, so ask with the mapped form.
    let SocketAddr::V4(v4) = dst else {
        unreachable!("an IPv4 server")
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    ask(w, Way::UdpSendto, mapped, None, expect)
}

#[test]
fn dns_goes_to_the_proxy_and_answers_show_the_server_asked() {
    let w = World::new("dns");
    let capture = EbpfCapture::load().expect("load");
    let pod_ns = w.pod_ns();
    let ips = w.pod_ips();
    let server4 = SocketAddr::from((w.peer4, 53));
    let server6 = SocketAddr::from((w.peer6, 53));

    // The agent's DNS proxy in the pod (as the agent opens it: on the
    // pod's loopback, IPv4 and IPv6); the real servers in the peer; a
    // resolver of the pod's own on loopback.
    let _proxy = Responder::start(
        &pod_ns,
        "proxy",
        &[
            (Ipv4Addr::LOCALHOST, DNS_PROXY_PORT).into(),
            (Ipv6Addr::LOCALHOST, DNS_PROXY_PORT).into(),
        ],
    );
    let _servers = Responder::start(&w.peer_ns(), "peer", &[server4, server6]);
    let _local = Responder::start(&pod_ns, "local", &[(Ipv4Addr::LOCALHOST, 53).into()]);

    // Without a DNS port the pod's DNS is not touched, and no DNS program
    // is attached to its cgroup.
    let att = capture.attach(&w.spec(&pod_ns, &ips)).expect("attach");
    expect_answer(&w, Way::UdpSendto, server4, None, "peer:q");
    let progs = bpftool_cgroup(&w.cgroup);
    assert!(!progs.contains("sendmsg4"), "{progs}");
    att.detach().expect("detach");

    let before = capture.stats().expect("stats");
    let att = capture
        .attach(&PodSpec {
            dns_port: Some(DNS_PROXY_PORT),
            ..w.spec(&pod_ns, &ips)
        })
        .expect("attach with DNS");
    let progs = bpftool_cgroup(&w.cgroup);
    for hook in [
        "sendmsg4",
        "sendmsg6",
        "recvmsg4",
        "recvmsg6",
        "getpeername4",
        "getpeername6",
    ] {
        assert!(progs.contains(hook), "{hook} not attached: {progs}");
    }

    for way in [Way::UdpSendto, Way::UdpConnected, Way::Tcp] {
        expect_answer(&w, way, server4, None, "proxy:q");
        expect_answer(&w, way, server6, None, "proxy:q");
    }
    let code = dual_stack_udp_sendto(&w, server4, "proxy:q");
    assert_eq!(code, 0, "v4-mapped from a dual-stack socket: {}", why(code));

    // Left alone: the agent's own (marked) sockets, which is how the
    // proxy's upstream queries leave; a loopback server; other ports.
    expect_answer(&w, Way::UdpSendto, server4, Some(AGENT_MARK), "peer:q");
    expect_answer(&w, Way::Tcp, server4, Some(AGENT_MARK), "peer:q");
    expect_answer(
        &w,
        Way::UdpSendto,
        (Ipv4Addr::LOCALHOST, 53).into(),
        None,
        "local:q",
    );

    let after = capture.stats().expect("stats");
    assert!(
        after.dns_redirected - before.dns_redirected >= 7,
        "{before:?} -> {after:?}"
    );
    assert!(
        after.dns_restored - before.dns_restored >= 7,
        "{before:?} -> {after:?}"
    );

    // Detached: the pod's DNS goes where it is sent again, and nothing of
    // ours is left on its cgroup.
    att.detach().expect("detach");
    expect_answer(&w, Way::UdpSendto, server4, None, "peer:q");
    assert_eq!(bpftool_cgroup(&w.cgroup).trim(), "", "programs left");

    // Queries to other ports were never redirected either.
    let other = SocketAddr::from((w.peer4, 5353));
    let _other = Responder::start(&w.peer_ns(), "other", &[other]);
    let att = capture
        .attach(&PodSpec {
            dns_port: Some(DNS_PROXY_PORT),
            ..w.spec(&pod_ns, &ips)
        })
        .expect("attach with DNS");
    expect_answer(&w, Way::UdpSendto, other, None, "other:q");
    drop(att);
}

/// A dual-stack TCP connect to a v4-mapped server on 53 reaches the proxy
/// too; sockets outside the pod's cgroup (the agent's) are never touched.
#[test]
fn dual_stack_tcp_dns_goes_to_the_proxy() {
    let w = World::new("dns6m");
    let capture = EbpfCapture::load().expect("load");
    let pod_ns = w.pod_ns();
    let ips = w.pod_ips();
    let server4 = SocketAddr::from((w.peer4, 53));
    let _proxy = Responder::start(
        &pod_ns,
        "proxy",
        &[(Ipv4Addr::LOCALHOST, DNS_PROXY_PORT).into()],
    );
    let _servers = Responder::start(&w.peer_ns(), "peer", &[server4]);
    let _att = capture
        .attach(&PodSpec {
            dns_port: Some(DNS_PROXY_PORT),
            ..w.spec(&pod_ns, &ips)
        })
        .expect("attach with DNS");
    let SocketAddr::V4(v4) = server4 else {
        unreachable!()
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), 53);
    let code = ask(&w, Way::Tcp, mapped, None, "proxy:q");
    assert_eq!(code, 0, "{}", why(code));
    // Sockets of the test process (the "agent", outside the pod cgroup)
    // are never redirected.
    let direct = in_ns(&pod_ns, || {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("socket");
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let s: UdpSocket = s.into();
        s.send_to(b"q", server4).expect("send");
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf).expect("answer");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    });
    assert_eq!(direct, ("peer:q".to_string(), server4));
}
