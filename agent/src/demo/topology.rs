//! Network-namespace worlds for the demo and the end-to-end tests: "node"
//! namespaces joined by a veth "wire", "pod" namespaces wired to their node,
//! routes between them, and a packet sniffer on the wire. Everything is
//! removed when the [`Topology`] is dropped, including on panic.
//!
//! Needs root. [`check_root`] says why when the machine cannot build
//! namespaces; tests turn that into a failure, never a silent skip.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::capture::netns::Netns;
use crate::socket::Sockets;

/// Why a topology could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TopologyError(pub String);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether network namespaces can be built here; the error says why not.
pub fn check_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "building network namespaces needs root (euid is {euid}); run as root, as CI does"
        ));
    }
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let probe = format!("amb{}-probe{n}", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|e| {
        format!("cannot create network namespaces here ({e}); is iproute2 installed and /var/run/netns writable?")
    })?;
    let _ = ip(&["netns", "del", &probe]);
    sweep_stale();
    Ok(())
}

/// Fails the calling test, with the reason, unless namespaces can be built.
pub fn require_root() {
    if let Err(why) = check_root() {
        panic!("{why}");
    }
}

/// Removes namespaces left by earlier test processes that died hard.
fn sweep_stale() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix("amb").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Runs `ip` with `args`; returns stdout or a message with stderr.
pub fn ip(args: &[&str]) -> Result<String, String> {
    run("ip", args)
}

pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `program args` inside namespace `ns`.
pub fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String, String> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    ip(&full)
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_root() -> Result<PathBuf, TopologyError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| TopologyError(format!("reading mountinfo: {e}")))?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(PathBuf::from)
        })
        .ok_or_else(|| {
            TopologyError(
                "no cgroup v2 hierarchy is mounted (ebpf/install-deps.sh mounts one)".into(),
            )
        })
}

/// Which addresses a pod has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 (IPv6 enabled but link-local only), as most tests use.
    #[default]
    V4,
    /// IPv4 and IPv6.
    Dual,
    /// IPv6 only.
    V6,
    /// IPv4, with IPv6 disabled in the namespace (`disable_ipv6`), as on
    /// an IPv4-only node.
    V4NoIpv6,
}

/// A pod namespace and its addresses.
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    /// Its IPv4 address; `0.0.0.0` for an IPv6-only pod.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if it has one.
    pub ip6: Option<Ipv6Addr>,
    pub node: usize,
    /// The pod's cgroup v2 directory: its processes go here.
    pub cgroup: PathBuf,
    ns: Arc<Netns>,
}

impl Pod {
    /// `/var/run/netns/<netns>`, as the agent's mesh file names it.
    pub fn netns_path(&self) -> String {
        format!("/var/run/netns/{}", self.netns)
    }

    /// Sockets made inside the pod, as its applications' would be.
    pub fn sockets(&self) -> Sockets {
        Sockets::Netns(self.ns.clone())
    }

    /// Its IPv4 address (its IPv6 one if it has no IPv4) and `port`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        match self.ip6 {
            Some(v6) if self.ip.is_unspecified() => SocketAddr::new(IpAddr::V6(v6), port),
            _ => SocketAddr::new(IpAddr::V4(self.ip), port),
        }
    }

    /// Its IPv6 address and `port`; panics for a pod without one.
    pub fn addr6(&self, port: u16) -> SocketAddr {
        let v6 = self
            .ip6
            .unwrap_or_else(|| panic!("pod {} has no IPv6 address", self.name));
        SocketAddr::new(IpAddr::V6(v6), port)
    }

    /// `port` on every address it has: `[::]` (dual stack) with IPv6, else
    /// its IPv4 address.
    pub fn any_addr(&self, port: u16) -> SocketAddr {
        match self.ip6 {
            Some(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            None => self.addr(port),
        }
    }

    /// Every address it has, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = (!self.ip.is_unspecified()).then_some(IpAddr::V4(self.ip));
        v4.into_iter().chain(self.ip6.map(IpAddr::V6)).collect()
    }

    /// This pod as a workload entry of a local-mode mesh file, served by
    /// the agent of `node`.
    pub fn workload_yaml(&self, namespace: &str, node: &str, service_account: &str) -> String {
        format!(
            "  - uid: {name}\n    name: {name}\n    namespace: {namespace}\n    serviceAccount: {service_account}\n    addresses: [{ips}]\n    node: {node}\n    netns: {path}\n    cgroup: {cgroup}\n",
            name = self.name,
            ips = self
                .addresses()
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect::<Vec<_>>()
                .join(", "),
            path = self.netns_path(),
            cgroup = self.cgroup.display()
        )
    }
}

/// Two nodes joined by a wire, with pods hanging off them.
pub struct Topology {
    prefix: String,
    namespaces: Mutex<Vec<String>>,
    cgroups: Mutex<Vec<PathBuf>>,
    pub nodes: Vec<String>,
    pods: Mutex<HashMap<String, Pod>>,
    pod_count: AtomicUsize,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clear();
        for cg in self
            .cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            if let Err(e) = std::fs::remove_dir(&cg) {
                eprintln!("topology cleanup: removing cgroup {}: {e}", cg.display());
            }
        }
        for ns in self
            .namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .rev()
        {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("topology cleanup: {e}");
            }
        }
    }
}

/// The node-side name of the wire interface.
pub const WIRE: &str = "wire";

impl Topology {
    /// Node `i` (0-based) is `10.0.0.(i+1)` and `fd00::(i+1)` on the wire;
    /// its pods are in `10.(i+1).0.0/16` and `fd10:(i+1)::/32`.
    pub fn new(tag: &str) -> Result<Topology, TopologyError> {
        check_root().map_err(TopologyError)?;
        let prefix = format!("amb{}-{tag}", std::process::id());
        let topo = Topology {
            prefix: prefix.clone(),
            namespaces: Mutex::default(),
            cgroups: Mutex::default(),
            nodes: vec![format!("{prefix}-n1"), format!("{prefix}-n2")],
            pods: Mutex::default(),
            pod_count: AtomicUsize::new(0),
        };
        for n in &topo.nodes {
            topo.add_ns(n)?;
            in_ns(n, "ip", &["link", "set", "lo", "up"])
                .map_err(|e| TopologyError(format!("lo up: {e}")))?;
            in_ns(n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])
                .map_err(|e| TopologyError(format!("forwarding: {e}")))?;
            in_ns(n, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])
                .map_err(|e| TopologyError(format!("IPv6 forwarding: {e}")))?;
        }
        let (n1, n2) = (&topo.nodes[0], &topo.nodes[1]);
        ip(&[
            "link", "add", "amb-w1", "netns", n1, "type", "veth", "peer", "name", "amb-w2",
            "netns", n2,
        ])
        .map_err(|e| TopologyError(format!("wire veth: {e}")))?;
        for (i, (ns, dev)) in [(n1, "amb-w1"), (n2, "amb-w2")].into_iter().enumerate() {
            in_ns(ns, "ip", &["link", "set", dev, "name", WIRE])
                .map_err(|e| TopologyError(format!("rename wire: {e}")))?;
            let addr = format!("10.0.0.{}/24", i + 1);
            in_ns(ns, "ip", &["addr", "add", &addr, "dev", WIRE])
                .map_err(|e| TopologyError(format!("wire addr: {e}")))?;
            in_ns(ns, "ip", &["link", "set", WIRE, "up"])
                .map_err(|e| TopologyError(format!("wire up: {e}")))?;
            let (other_net, other_gw) = if i == 0 {
                ("10.2.0.0/16", "10.0.0.2")
            } else {
                ("10.1.0.0/16", "10.0.0.1")
            };
            in_ns(ns, "ip", &["route", "add", other_net, "via", other_gw])
                .map_err(|e| TopologyError(format!("route to other node: {e}")))?;
            let addr6 = format!("fd00::{}/64", i + 1);
            in_ns(
                ns,
                "ip",
                &["-6", "addr", "add", &addr6, "dev", WIRE, "nodad"],
            )
            .map_err(|e| TopologyError(format!("wire IPv6 addr: {e}")))?;
            let (other_net6, other_gw6) = if i == 0 {
                ("fd10:2::/32", "fd00::2")
            } else {
                ("fd10:1::/32", "fd00::1")
            };
            in_ns(
                ns,
                "ip",
                &["-6", "route", "add", other_net6, "via", other_gw6],
            )
            .map_err(|e| TopologyError(format!("IPv6 route to other node: {e}")))?;
        }
        Ok(topo)
    }

    fn add_ns(&self, name: &str) -> Result<(), TopologyError> {
        ip(&["netns", "add", name]).map_err(TopologyError)?;
        self.namespaces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.to_string());
        Ok(())
    }

    /// Adds an IPv4 pod named `name` on node `node` (0-based).
    pub fn add_pod(&self, name: &str, node: usize) -> Result<Pod, TopologyError> {
        self.add_pod_with(name, node, Stack::V4)
    }

    /// Adds a pod with the addresses `stack` says: pod `i` of node `n` is
    /// `10.n.i.2/30` and `fd10:n:i::2/64`, its node side `.1` and `::1`.
    pub fn add_pod_with(
        &self,
        name: &str,
        node: usize,
        stack: Stack,
    ) -> Result<Pod, TopologyError> {
        let i = self.pod_count.fetch_add(1, Ordering::SeqCst) + 1;
        let netns = format!("{}-{name}", self.prefix);
        self.add_ns(&netns)?;
        let node_ns = &self.nodes[node];
        let host_dev = format!("veth{i}");
        let ip_addr = Ipv4Addr::new(10, node as u8 + 1, i as u8, 2);
        let gw = Ipv4Addr::new(10, node as u8 + 1, i as u8, 1);
        let ip6 = Ipv6Addr::new(0xfd10, node as u16 + 1, i as u16, 0, 0, 0, 0, 2);
        let gw6 = Ipv6Addr::new(0xfd10, node as u16 + 1, i as u16, 0, 0, 0, 0, 1);
        let (has4, has6) = match stack {
            Stack::V4 | Stack::V4NoIpv6 => (true, false),
            Stack::Dual => (true, true),
            Stack::V6 => (false, true),
        };
        ip(&[
            "link", "add", "amb-p", "netns", &netns, "type", "veth", "peer", "name", &host_dev,
            "netns", node_ns,
        ])
        .map_err(|e| TopologyError(format!("pod veth: {e}")))?;
        let step = |ns: &str, args: &[&str], what: &str| {
            in_ns(ns, "ip", args).map_err(|e| TopologyError(format!("{what}: {e}")))
        };
        step(&netns, &["link", "set", "amb-p", "name", "eth0"], "rename")?;
        if stack == Stack::V4NoIpv6 {
            for key in ["all", "default", "lo", "eth0"] {
                in_ns(
                    &netns,
                    "sysctl",
                    &["-qw", &format!("net.ipv6.conf.{key}.disable_ipv6=1")],
                )
                .map_err(|e| TopologyError(format!("disabling IPv6: {e}")))?;
            }
        }
        step(&netns, &["link", "set", "eth0", "up"], "eth0 up")?;
        step(&netns, &["link", "set", "lo", "up"], "lo up")?;
        step(node_ns, &["link", "set", &host_dev, "up"], "node side up")?;
        if has4 {
            let (pod, node_side) = (format!("{ip_addr}/30"), format!("{gw}/30"));
            step(&netns, &["addr", "add", &pod, "dev", "eth0"], "pod addr")?;
            step(
                &netns,
                &["route", "add", "default", "via", &gw.to_string()],
                "default route",
            )?;
            step(
                node_ns,
                &["addr", "add", &node_side, "dev", &host_dev],
                "node side addr",
            )?;
        }
        if has6 {
            let (pod, node_side) = (format!("{ip6}/64"), format!("{gw6}/64"));
            step(
                &netns,
                &["-6", "addr", "add", &pod, "dev", "eth0", "nodad"],
                "pod IPv6 addr",
            )?;
            step(
                node_ns,
                &["-6", "addr", "add", &node_side, "dev", &host_dev, "nodad"],
                "node side IPv6 addr",
            )?;
            step(
                &netns,
                &["-6", "route", "add", "default", "via", &gw6.to_string()],
                "IPv6 default route",
            )?;
        }
        let ns = Arc::new(
            Netns::open(std::path::Path::new(&format!("/var/run/netns/{netns}")))
                .map_err(|e| TopologyError(format!("open pod netns: {e}")))?,
        );
        let cgroup = cgroup2_root()?.join(&netns);
        std::fs::create_dir_all(&cgroup)
            .map_err(|e| TopologyError(format!("creating cgroup {}: {e}", cgroup.display())))?;
        self.cgroups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cgroup.clone());
        let pod = Pod {
            cgroup,
            name: name.into(),
            netns,
            ip: if has4 { ip_addr } else { Ipv4Addr::UNSPECIFIED },
            ip6: has6.then_some(ip6),
            node,
            ns,
        };
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), pod.clone());
        Ok(pod)
    }

    /// Starts capturing every frame on node `node`'s wire interface.
    pub fn sniff_wire(&self, node: usize) -> Result<Sniffer, TopologyError> {
        let ns = Netns::open(std::path::Path::new(&format!(
            "/var/run/netns/{}",
            self.nodes[node]
        )))
        .map_err(|e| TopologyError(format!("open node netns: {e}")))?;
        Sniffer::start(&ns, WIRE)
    }

    /// Makes node `node` the edge of a network of its own: packets that
    /// arrive over the wire are forwarded only to the `open` addresses (a
    /// network gateway's HBONE port) or as part of a connection already
    /// let through; everything else the wire brings is dropped.
    pub fn only_through(&self, node: usize, open: &[SocketAddr]) -> Result<(), TopologyError> {
        let ns = &self.nodes[node];
        let nft = |args: &[&str]| {
            in_ns(ns, "nft", args).map_err(|e| TopologyError(format!("nft {args:?}: {e}")))
        };
        nft(&["add", "table", "inet", "amb-edge"])?;
        nft(&[
            "add",
            "chain",
            "inet",
            "amb-edge",
            "forward",
            "{ type filter hook forward priority 0; policy accept; }",
        ])?;
        nft(&[
            "add",
            "rule",
            "inet",
            "amb-edge",
            "forward",
            "iifname",
            WIRE,
            "ct",
            "state",
            "established,related",
            "accept",
        ])?;
        for addr in open {
            let (family, ip, port) = (
                if addr.is_ipv4() { "ip" } else { "ip6" },
                addr.ip().to_string(),
                addr.port().to_string(),
            );
            nft(&[
                "add", "rule", "inet", "amb-edge", "forward", "iifname", WIRE, family, "daddr",
                &ip, "tcp", "dport", &port, "accept",
            ])?;
        }
        nft(&[
            "add", "rule", "inet", "amb-edge", "forward", "iifname", WIRE, "drop",
        ])?;
        Ok(())
    }

    /// The node namespaces' names.
    pub fn node_names(&self) -> &[String] {
        &self.nodes
    }

    /// Names of this topology's namespaces that still exist.
    pub fn remaining_namespaces(&self) -> Vec<String> {
        let list = ip(&["netns", "list"]).unwrap_or_default();
        list.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&self.prefix))
            .map(str::to_string)
            .collect()
    }
}

/// One TCP segment seen on the wire.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// A packet socket on one interface, collecting TCP segments until stopped.
pub struct Sniffer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Segment>>>,
}

impl Sniffer {
    fn start(ns: &Netns, dev: &str) -> Result<Sniffer, TopologyError> {
        let dev =
            std::ffi::CString::new(dev).map_err(|e| TopologyError(format!("dev name: {e}")))?;
        let fd = ns
            .run_blocking(move || {
                // SAFETY: plain socket syscalls on values we own.
                unsafe {
                    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                    let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                    sll.sll_family = libc::AF_PACKET as u16;
                    sll.sll_protocol = proto as u16;
                    sll.sll_ifindex = libc::if_nametoindex(dev.as_ptr()) as i32;
                    let rc = libc::bind(
                        fd,
                        (&sll as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if rc != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let tv = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 100_000,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    );
                    Ok(fd)
                }
            })
            .map_err(|e| TopologyError(format!("packet socket: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut segments = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::SeqCst) {
                // SAFETY: reading into a buffer we own, of the size given.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    if let Some(s) = parse_frame(&buf[..n as usize]) {
                        segments.push(s);
                    }
                }
            }
            // SAFETY: closing the fd this thread owns.
            unsafe { libc::close(fd) };
            segments
        });
        Ok(Sniffer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops capturing and returns what was seen.
    pub fn finish(mut self) -> Vec<Segment> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Ethernet + IPv4 or IPv6 (no extension headers) + TCP, else None.
fn parse_frame(f: &[u8]) -> Option<Segment> {
    let ip = f.get(14..)?;
    let (src_ip, dst_ip, tcp): (IpAddr, IpAddr, &[u8]) = match f.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ip.len() < ihl + 20 || total > ip.len() || total < ihl {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (src.into(), dst.into(), &ip[ihl..total])
        }
        [0x86, 0xdd] => {
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if *ip.get(6)? != 6 || ip.len() < 40 + payload || payload < 20 {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (src.into(), dst.into(), &ip[40..40 + payload])
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let doff = usize::from(*tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        payload: tcp.get(doff..).unwrap_or_default().to_vec(),
    })
}
