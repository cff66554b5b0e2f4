//! `BPF_PROG_TEST_RUN` tests of the inbound classifier on crafted packets.
//! They need root and fail (not skip) without it. Each runs in a fresh
//! network namespace of its own thread, so no listener of the machine can
//! answer the program's socket lookups.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;

use crate::capture::load_inbound;
use crate::maps::{stat, AddrKey};
use crate::objects::{MAP_POD_ADDRS, MAP_STATS, PROG_INBOUND};
use crate::{HBONE_PORT, INBOUND_PLAINTEXT_PORT};

const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;

const POD4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PEER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "BPF_PROG_TEST_RUN tests need root (CAP_BPF, CAP_NET_ADMIN); run `sudo -E cargo test -p ambient-ebpf`");
}

/// Runs `f` on a thread in a new, empty network namespace with `lo` up.
fn in_fresh_netns<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: if_nametoindex on a static NUL-terminated name.
            let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
            // SAFETY: a netlink request about an interface index of this netns.
            unsafe { aya::netlink_set_link_up(lo as i32) }.expect("set lo up");
            f()
        })
        .join()
        .expect("test thread panicked")
    })
}

struct Inbound {
    ebpf: Ebpf,
    /// Keeps the pod address map's descriptor with the test.
    _addrs: HashMap<MapData, AddrKey, u64>,
    stats: PerCpuArray<MapData, u64>,
}

impl Inbound {
    fn load(pod_ips: &[IpAddr]) -> Self {
        require_root();
        let mut ebpf = load_inbound().expect("load inbound.bpf.o");
        let mut addrs: HashMap<MapData, AddrKey, u64> =
            HashMap::try_from(ebpf.take_map(MAP_POD_ADDRS).expect("pod addrs map"))
                .expect("hash map");
        for ip in pod_ips {
            addrs
                .insert(AddrKey::new(*ip), 1, 0)
                .expect("insert pod address");
        }
        let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).expect("stats map"))
            .expect("per-cpu array");
        Inbound {
            ebpf,
            _addrs: addrs,
            stats,
        }
    }

    fn run(&self, packet: &[u8]) -> u32 {
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROG_INBOUND)
            .expect("program")
            .try_into()
            .expect("classifier");
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
    }

    fn stat(&self, slot: u32) -> u64 {
        self.stats.get(&slot, 0).expect("read stats").iter().sum()
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

fn tcp_header(sport: u16, dport: u16, flags: u8) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: usize, payload: &[u8]) -> Vec<u8> {
    let mut p = eth(0x0800);
    let ihl = 5 + options / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    p.push(0x40 | ihl as u8);
    p.push(0);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend(std::iter::repeat_n(1u8, options)); // NOP options
    p.extend_from_slice(payload);
    p
}

fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, 6, 0, &tcp_header(sport, dport, flags))
}

fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = eth(0x86dd);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&[6, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&tcp_header(sport, dport, flags));
    p
}

#[test]
fn syn_to_pod_without_listener_passes() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD4.into()]);
        assert_eq!(
            prog.run(&tcp4(PEER4, 40000, POD4, 8080, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(prog.stat(stat::IN_NO_LISTENER), 1);
        assert_eq!(prog.stat(stat::IN_ASSIGNED), 0);
        // IP options shift the TCP header; still parsed.
        let with_options = ipv4(PEER4, POD4, 6, 8, &tcp_header(40001, 8080, SYN));
        assert_eq!(prog.run(&with_options), TC_ACT_UNSPEC);
        assert_eq!(prog.stat(stat::IN_NO_LISTENER), 2);
    });
}

#[test]
fn hbone_port_passes_untouched() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD4.into(), POD6.into()]);
        // Even with a capture listener present, 15008 is not looked at.
        let _listener =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)).expect("bind 15006");
        assert_eq!(
            prog.run(&tcp4(PEER4, 40000, POD4, HBONE_PORT, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(
            prog.run(&tcp6(PEER6, 40000, POD6, HBONE_PORT, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(prog.stat(stat::IN_HBONE), 2);
        assert_eq!(
            prog.stat(stat::IN_ASSIGNED) + prog.stat(stat::IN_ASSIGN_FAILED),
            0
        );
    });
}

/// istio-cni's in-pod rules accept TCP from its kubelet-probe SNAT source
/// (169.254.7.127; fd16:9254:7127:1337:ffff:ffff:ffff:ffff) before any
/// redirect, so probes reach the application even under STRICT.
#[test]
fn kubelet_probes_pass_to_the_application() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD4.into(), POD6.into()]);
        let _listener =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)).expect("bind 15006");
        let probe4: Ipv4Addr = "169.254.7.127".parse().unwrap();
        let probe6: Ipv6Addr = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(
            prog.run(&tcp4(probe4, 40000, POD4, 8080, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(
            prog.run(&tcp6(probe6, 40000, POD6, 8080, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(prog.stat(stat::IN_PROBE), 2);
        assert_eq!(prog.stat(stat::IN_ASSIGNED), 0);
        // A neighbour of the probe address is captured as usual.
        let near: Ipv4Addr = "169.254.7.126".parse().unwrap();
        prog.run(&tcp4(near, 40000, POD4, 8080, SYN));
        assert_eq!(prog.stat(stat::IN_PROBE), 2);
        assert_eq!(
            prog.stat(stat::IN_ASSIGNED) + prog.stat(stat::IN_ASSIGN_FAILED),
            1
        );
    });
}

#[test]
fn non_tcp_and_foreign_destinations_pass() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD4.into()]);
        let udp = ipv4(PEER4, POD4, 17, 0, &[0x9c, 0x40, 0x1f, 0x90, 0, 8, 0, 0]);
        assert_eq!(prog.run(&udp), TC_ACT_UNSPEC);
        let mut arp = eth(0x0806);
        arp.extend_from_slice(&[0u8; 28]);
        assert_eq!(prog.run(&arp), TC_ACT_UNSPEC);
        // A later fragment has no TCP header.
        let mut frag = tcp4(PEER4, 40000, POD4, 8080, SYN);
        frag[14 + 6] = 0x00;
        frag[14 + 7] = 0x10;
        assert_eq!(prog.run(&frag), TC_ACT_UNSPEC);
        assert_eq!(prog.stat(stat::IN_NOT_TCP), 3);
        let other = Ipv4Addr::new(198, 18, 0, 99);
        assert_eq!(
            prog.run(&tcp4(PEER4, 40000, other, 8080, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(prog.stat(stat::IN_NOT_POD), 1);
        assert_eq!(prog.stat(stat::IN_NO_LISTENER), 0);
    });
}

#[test]
fn ipv6_syn_without_listener_passes() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD6.into()]);
        assert_eq!(
            prog.run(&tcp6(PEER6, 40000, POD6, 8080, SYN)),
            TC_ACT_UNSPEC
        );
        assert_eq!(prog.stat(stat::IN_NO_LISTENER), 1);
    });
}

#[test]
fn syn_with_listener_is_steered_to_it() {
    in_fresh_netns(|| {
        let prog = Inbound::load(&[POD4.into()]);
        let _listener =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)).expect("bind 15006");
        // The program finds the listener and asks to assign it. Outside a
        // real tc ingress hook (test runs are not) the kernel refuses the
        // assignment, and the program fails closed rather than let the
        // packet bypass the agent.
        assert_eq!(prog.run(&tcp4(PEER4, 40000, POD4, 8080, SYN)), TC_ACT_SHOT);
        assert_eq!(
            prog.stat(stat::IN_ASSIGN_FAILED),
            1,
            "the listener was found"
        );
        assert_eq!(prog.stat(stat::IN_ASSIGNED), 0);
        assert_eq!(prog.stat(stat::IN_NO_LISTENER), 0);
    });
}

#[test]
fn packets_of_existing_connections_pass() {
    in_fresh_netns(|| {
        let lo = Ipv4Addr::LOCALHOST;
        let prog = Inbound::load(&[lo.into()]);
        let _capture =
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT)).expect("bind 15006");
        let app = TcpListener::bind((lo, 0)).expect("bind app");
        let mut client = TcpStream::connect(app.local_addr().expect("addr")).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (mut server, _) = app.accept().expect("accept");
        let (cport, sport) = (
            client.local_addr().expect("addr").port(),
            app.local_addr().expect("addr").port(),
        );

        // An ACK from the client to the server's established socket.
        assert_eq!(prog.run(&tcp4(lo, cport, lo, sport, ACK)), TC_ACT_UNSPEC);
        assert_eq!(prog.stat(stat::IN_ESTABLISHED), 1);
        // A SYN to the application's own listener is still captured: a
        // listener found by the first lookup is not an established flow.
        assert_eq!(prog.run(&tcp4(lo, 50000, lo, sport, SYN)), TC_ACT_SHOT);
        assert_eq!(prog.stat(stat::IN_ASSIGN_FAILED), 1);

        server.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        client.read_exact(&mut b).expect("read");
    });
}
