//! Loading the capture programs once per agent and attaching them per pod:
//! the tc classifier inside the pod's netns, the cgroup programs on the
//! pod's cgroup, the pod's entries in the shared maps; and undoing all of it.

use std::collections::HashSet;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::cgroup_sockopt::CgroupSockoptLink;
use aya::programs::links::{CgroupAttachMode, FdLink, Link as _, LinkOrder};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError};
use aya::programs::{
    CgroupSockAddr, CgroupSockopt, ProgramError, SchedClassifier, SockOps, TcAttachType,
};
use aya::util::KernelVersion;
use aya::Ebpf;

use crate::maps::{self, stat, AddrKey, FlowKey, OrigDst, PodCfg};
use crate::netns::{current_netns_cookie, in_netns};
use crate::objects::*;
use crate::{bpf_sys, cgroup, netlink, EbpfError};

/// One pod to capture.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    /// The pod's network namespace: `/var/run/netns/x` or `/proc/<pid>/ns/net`.
    pub netns: &'a Path,
    /// The cgroup v2 directory holding the pod's processes; without it only
    /// inbound traffic is captured.
    pub cgroup: Option<&'a Path>,
    /// The pod's addresses. Inbound capture covers all of them; outbound
    /// connections are sent to the first IPv4 (for IPv4) and first IPv6.
    pub pod_ips: &'a [IpAddr],
    /// The pod-side interface, e.g. `eth0`.
    pub interface: &'a str,
    /// The port of the agent's DNS proxy on the pod's loopback: with it,
    /// the pod's DNS (UDP and TCP to port 53 of a non-loopback address) is
    /// sent there, and answers show the server asked as their source.
    /// Needs `cgroup`.
    pub dns_port: Option<u16>,
}

/// How the tc classifier is attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcMode {
    /// TCX on kernels >= 6.6, netlink (clsact + filter) before.
    #[default]
    Auto,
    /// A TCX link (BPF_LINK_DETACH on detach; gone with the agent anyway).
    Tcx,
    /// A clsact qdisc (added if missing, removed if added) and a cls_bpf
    /// filter, both removed on detach.
    Netlink,
}

/// Options for [`EbpfCapture::load_with`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The cgroup v2 directory of the process that owns the agent's
    /// listeners; default: this process's cgroup. The `SO_ORIGINAL_DST`
    /// answerer attaches there because an accepted socket belongs to its
    /// listener's cgroup, not to the pod's.
    pub agent_cgroup: Option<PathBuf>,
    /// How to attach the tc classifier.
    pub tc: TcMode,
}

/// Counters kept by the programs (summed over CPUs since load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Inbound packets that are not TCP over IPv4/IPv6 (or are fragments).
    pub inbound_not_tcp: u64,
    /// Inbound TCP not addressed to an attached pod address.
    pub inbound_not_pod: u64,
    /// Inbound TCP to the HBONE port, left to the agent's own listener.
    pub inbound_hbone: u64,
    /// Inbound TCP from the kubelet-probe source, left to the application.
    pub inbound_probe: u64,
    /// Inbound TCP of an existing connection, left to the stack.
    pub inbound_established: u64,
    /// Inbound TCP handed to the transparent listener.
    pub inbound_assigned: u64,
    /// Inbound TCP that found no listener on the capture port (passed).
    pub inbound_no_listener: u64,
    /// Inbound TCP the listener refused (dropped).
    pub inbound_assign_failed: u64,
    /// Outbound connects sent to the outbound listener.
    pub outbound_redirected: u64,
    /// Outbound connects left alone (agent mark, loopback, own address).
    pub outbound_skipped: u64,
    /// Captured connections whose client address was recorded.
    pub outbound_recorded: u64,
    /// `SO_ORIGINAL_DST` questions answered.
    pub outbound_answered: u64,
    /// `SO_ORIGINAL_DST` questions about an unknown client.
    pub outbound_unknown: u64,
    /// DNS queries (UDP sends, UDP and TCP connects) sent to the DNS proxy.
    pub dns_redirected: u64,
    /// Answers (or peer names) shown as from the DNS server asked.
    pub dns_restored: u64,
}

/// The loaded programs and maps, shared by every pod attachment.
pub struct EbpfCapture {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EbpfCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfCapture")
            .field("tc_mode", &self.shared.tc_mode)
            .finish_non_exhaustive()
    }
}

struct Shared {
    programs: Mutex<Programs>,
    maps: Mutex<Maps>,
    tc_mode: TcMode,
    /// Detached when the capture and every attachment are gone.
    getsockopt: Option<CgroupSockoptLink>,
    getsockopt_prog: u32,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // aya offers no FdLink for this link type: find it by program id.
        let ids: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|l| l.program_id() == self.getsockopt_prog)
            .map(|l| l.id())
            .collect();
        for id in ids {
            if let Err(e) = bpf_sys::detach_link(id) {
                tracing::warn!(error = %e, "ebpf capture: detaching the getsockopt link");
            }
        }
        drop(self.getsockopt.take());
    }
}

/// A bpf_link we own, with its kernel id for a forced detach.
struct OwnedLink {
    link: FdLink,
    id: u32,
    program: &'static str,
}

impl OwnedLink {
    fn new<L>(link: L, program: &'static str) -> Result<Self, EbpfError>
    where
        FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
    {
        let perr = |source| EbpfError::Link { program, source };
        let link = FdLink::try_from(link).map_err(perr)?;
        let id = link.info().map_err(perr)?.id();
        Ok(OwnedLink { link, id, program })
    }

    fn detach(self) -> Result<(), EbpfError> {
        let program = self.program;
        let r =
            bpf_sys::detach_link(self.id).map_err(|source| EbpfError::Detach { program, source });
        drop(self.link);
        r
    }
}

struct Programs {
    inbound: Ebpf,
    outbound: Ebpf,
    /// Pods attached, by netns cookie and by address.
    netns: HashSet<u64>,
    addrs: HashSet<IpAddr>,
}

struct Maps {
    pod_addrs: HashMap<MapData, AddrKey, u64>,
    pods: HashMap<MapData, u64, PodCfg>,
    flows: HashMap<MapData, FlowKey, OrigDst>,
    inbound_stats: PerCpuArray<MapData, u64>,
    outbound_stats: PerCpuArray<MapData, u64>,
}

/// aya attaches cgroup programs as bpf_links (kernel >= 5.7, which we need
/// anyway). A link attach must pass no flags (BPF_F_ALLOW_MULTI gives
/// EINVAL) and is always non-exclusive: it runs beside other programs on
/// the same hook, as BPF_F_ALLOW_MULTI would.
const CGROUP_MODE: CgroupAttachMode = CgroupAttachMode::Single;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn prog_err(program: &'static str) -> impl Fn(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { program, source }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { map, source }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or_else(|| EbpfError::Program {
        program: name,
        source: ProgramError::NotLoaded,
    })?;
    p.try_into().map_err(prog_err(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or_else(|| EbpfError::Map {
        map: name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(m).map_err(map_err(name))
}

fn open_cgroup(path: &Path) -> Result<File, EbpfError> {
    File::open(path).map_err(|source| EbpfError::Cgroup {
        path: path.into(),
        source,
    })
}

impl EbpfCapture {
    /// Loads the programs and attaches the `SO_ORIGINAL_DST` answerer to this
    /// process's cgroup. Needs root (CAP_BPF + CAP_NET_ADMIN + CAP_SYS_ADMIN).
    pub fn load() -> Result<Self, EbpfError> {
        Self::load_with(&LoadOptions::default())
    }

    /// [`load`](Self::load) with explicit options.
    pub fn load_with(opts: &LoadOptions) -> Result<Self, EbpfError> {
        let agent_cgroup = match &opts.agent_cgroup {
            Some(p) => p.clone(),
            None => cgroup::own_cgroup()?,
        };
        let agent_cgroup = open_cgroup(&agent_cgroup)?;

        let mut inbound = load_inbound()?;
        let mut outbound = Ebpf::load(OUTBOUND).map_err(|source| EbpfError::Load {
            object: "outbound.bpf.o",
            source,
        })?;
        for &name in [PROG_CONNECT4, PROG_CONNECT6].iter().chain(&DNS_PROGS) {
            program::<CgroupSockAddr>(&mut outbound, name)?
                .load()
                .map_err(prog_err(name))?;
        }
        program::<SockOps>(&mut outbound, PROG_SOCKOPS)?
            .load()
            .map_err(prog_err(PROG_SOCKOPS))?;
        let getsockopt = program::<CgroupSockopt>(&mut outbound, PROG_GETSOCKOPT)?;
        getsockopt.load().map_err(prog_err(PROG_GETSOCKOPT))?;
        let id = getsockopt
            .attach(&agent_cgroup, CGROUP_MODE)
            .map_err(prog_err(PROG_GETSOCKOPT))?;
        let getsockopt_link = getsockopt
            .take_link(id)
            .map_err(prog_err(PROG_GETSOCKOPT))?;
        let getsockopt_prog = getsockopt.info().map_err(prog_err(PROG_GETSOCKOPT))?.id();

        let maps = Maps {
            pod_addrs: take_map(&mut inbound, MAP_POD_ADDRS)?,
            inbound_stats: take_map(&mut inbound, MAP_STATS)?,
            pods: take_map(&mut outbound, MAP_PODS)?,
            flows: take_map(&mut outbound, MAP_FLOWS)?,
            outbound_stats: take_map(&mut outbound, MAP_STATS)?,
        };
        let tc_mode = match opts.tc {
            TcMode::Auto => match KernelVersion::current() {
                Ok(v) if v >= KernelVersion::new(6, 6, 0) => TcMode::Tcx,
                _ => TcMode::Netlink,
            },
            m => m,
        };
        Ok(EbpfCapture {
            shared: Arc::new(Shared {
                programs: Mutex::new(Programs {
                    inbound,
                    outbound,
                    netns: HashSet::new(),
                    addrs: HashSet::new(),
                }),
                maps: Mutex::new(maps),
                tc_mode,
                getsockopt: Some(getsockopt_link),
                getsockopt_prog,
            }),
        })
    }

    /// The tc attach mode in use (never [`TcMode::Auto`]).
    pub fn tc_mode(&self) -> TcMode {
        self.shared.tc_mode
    }

    /// Captures `pod`'s traffic until the returned attachment is dropped or
    /// detached. On error nothing of this pod stays attached.
    pub fn attach(&self, pod: &PodSpec) -> Result<PodAttachment, EbpfError> {
        let mut cfg = pod_cfg(pod.pod_ips)?;
        cfg.dns_port = pod.dns_port.map_or(0, u32::from);
        let netns = File::open(pod.netns).map_err(|source| EbpfError::Netns {
            path: pod.netns.into(),
            source,
        })?;
        let cgroup = pod.cgroup.map(open_cgroup).transpose()?;

        let mut progs = lock(&self.shared.programs);
        if let Some(ip) = pod.pod_ips.iter().find(|ip| progs.addrs.contains(ip)) {
            return Err(EbpfError::AlreadyAttached(ip.to_string()));
        }
        let mode = self.shared.tc_mode;
        let classifier = program::<SchedClassifier>(&mut progs.inbound, PROG_INBOUND)?;
        let interface = pod.interface;
        let (cookie, tc_link) = in_netns(&netns, pod.netns, move || -> Result<_, EbpfError> {
            let cookie = current_netns_cookie().map_err(|source| EbpfError::Netns {
                path: pod.netns.into(),
                source,
            })?;
            Ok((cookie, attach_tc(classifier, interface, mode)?))
        })??;

        // From here on, dropping `att` undoes whatever was done.
        let mut att = PodAttachment {
            shared: self.shared.clone(),
            netns,
            netns_path: pod.netns.into(),
            interface: interface.into(),
            cookie,
            addrs: Vec::new(),
            registered: false,
            tc: Some(tc_link),
            cgroup_links: Vec::new(),
            detached: false,
        };
        let result =
            self.register_and_attach_cgroup(&mut progs, &mut att, pod, cfg, cgroup.as_ref());
        // Release the lock before `att` can roll back: teardown takes it.
        drop(progs);
        result.map(|()| att)
    }

    /// The part of [`attach`](Self::attach) after tc: bookkeeping, map
    /// entries, cgroup links. Everything done is recorded in `att`.
    fn register_and_attach_cgroup(
        &self,
        progs: &mut Programs,
        att: &mut PodAttachment,
        pod: &PodSpec,
        cfg: PodCfg,
        cgroup: Option<&File>,
    ) -> Result<(), EbpfError> {
        let cookie = att.cookie;
        if !progs.netns.insert(cookie) {
            return Err(EbpfError::AlreadyAttached(pod.netns.display().to_string()));
        }
        progs.addrs.extend(pod.pod_ips.iter().copied());
        att.registered = true;
        att.addrs = pod.pod_ips.to_vec();
        {
            let mut maps = lock(&self.shared.maps);
            for ip in pod.pod_ips {
                maps.pod_addrs
                    .insert(AddrKey::new(*ip), cookie, 0)
                    .map_err(map_err(MAP_POD_ADDRS))?;
            }
            maps.pods
                .insert(cookie, cfg, 0)
                .map_err(map_err(MAP_PODS))?;
        }
        let Some(cgroup) = cgroup else {
            return Ok(());
        };
        let dns: &[&'static str] = if pod.dns_port.is_some() {
            &DNS_PROGS
        } else {
            &[]
        };
        for &name in [PROG_CONNECT4, PROG_CONNECT6].iter().chain(dns) {
            let p = program::<CgroupSockAddr>(&mut progs.outbound, name)?;
            let id = p.attach(cgroup, CGROUP_MODE).map_err(prog_err(name))?;
            let link = p.take_link(id).map_err(prog_err(name))?;
            att.cgroup_links.push(OwnedLink::new(link, name)?);
        }
        let p = program::<SockOps>(&mut progs.outbound, PROG_SOCKOPS)?;
        let id = p
            .attach(cgroup, CGROUP_MODE)
            .map_err(prog_err(PROG_SOCKOPS))?;
        let link = p.take_link(id).map_err(prog_err(PROG_SOCKOPS))?;
        att.cgroup_links.push(OwnedLink::new(link, PROG_SOCKOPS)?);
        Ok(())
    }

    /// The programs' counters.
    pub fn stats(&self) -> Result<CaptureStats, EbpfError> {
        let maps = lock(&self.shared.maps);
        let sum = |m: &PerCpuArray<MapData, u64>, slot: u32| -> Result<u64, EbpfError> {
            Ok(m.get(&slot, 0).map_err(map_err(MAP_STATS))?.iter().sum())
        };
        let (i, o) = (&maps.inbound_stats, &maps.outbound_stats);
        Ok(CaptureStats {
            inbound_not_tcp: sum(i, stat::IN_NOT_TCP)?,
            inbound_not_pod: sum(i, stat::IN_NOT_POD)?,
            inbound_hbone: sum(i, stat::IN_HBONE)?,
            inbound_probe: sum(i, stat::IN_PROBE)?,
            inbound_established: sum(i, stat::IN_ESTABLISHED)?,
            inbound_assigned: sum(i, stat::IN_ASSIGNED)?,
            inbound_no_listener: sum(i, stat::IN_NO_LISTENER)?,
            inbound_assign_failed: sum(i, stat::IN_ASSIGN_FAILED)?,
            outbound_redirected: sum(o, stat::OUT_REDIRECTED)?,
            outbound_skipped: sum(o, stat::OUT_SKIPPED)?,
            outbound_recorded: sum(o, stat::OUT_RECORDED)?,
            outbound_answered: sum(o, stat::OUT_ANSWERED)?,
            outbound_unknown: sum(o, stat::OUT_UNKNOWN)?,
            dns_redirected: sum(o, stat::DNS_REDIRECTED)?,
            dns_restored: sum(o, stat::DNS_RESTORED)?,
        })
    }

    /// Kernel ids of the loaded programs, in this order: inbound classifier,
    /// connect4, connect6, sockops, getsockopt, then the DNS programs
    /// (sendmsg4/6, recvmsg4/6, getpeername4/6), for checks that nothing
    /// is left behind.
    pub fn program_ids(&self) -> Result<Vec<u32>, EbpfError> {
        let progs = lock(&self.shared.programs);
        let mut ids = Vec::new();
        let outbound = [PROG_CONNECT4, PROG_CONNECT6, PROG_SOCKOPS, PROG_GETSOCKOPT];
        let outbound: Vec<&'static str> = outbound.into_iter().chain(DNS_PROGS).collect();
        for (ebpf, names) in [
            (&progs.inbound, &[PROG_INBOUND][..]),
            (&progs.outbound, &outbound[..]),
        ] {
            for name in names {
                let p = ebpf.program(name).ok_or(EbpfError::Program {
                    program: name,
                    source: ProgramError::NotLoaded,
                })?;
                ids.push(p.info().map_err(prog_err(name))?.id());
            }
        }
        Ok(ids)
    }
}

/// Loads `inbound.bpf.o` and its classifier.
pub(crate) fn load_inbound() -> Result<Ebpf, EbpfError> {
    let mut inbound = Ebpf::load(INBOUND).map_err(|source| EbpfError::Load {
        object: "inbound.bpf.o",
        source,
    })?;
    program::<SchedClassifier>(&mut inbound, PROG_INBOUND)?
        .load()
        .map_err(prog_err(PROG_INBOUND))?;
    Ok(inbound)
}

fn pod_cfg(ips: &[IpAddr]) -> Result<PodCfg, EbpfError> {
    if ips.is_empty() {
        return Err(EbpfError::NoPodAddress);
    }
    let mut cfg = PodCfg::default();
    for (i, ip) in ips.iter().enumerate() {
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ips[..i].contains(ip) {
            return Err(EbpfError::BadAddress(*ip));
        }
        match ip {
            IpAddr::V4(v4) if cfg.flags & maps::POD_HAS_V4 == 0 => {
                cfg.flags |= maps::POD_HAS_V4;
                cfg.ip4 = maps::wire4(*v4);
            }
            IpAddr::V6(v6) if cfg.flags & maps::POD_HAS_V6 == 0 => {
                cfg.flags |= maps::POD_HAS_V6;
                cfg.ip6 = maps::wire6(*v6);
            }
            _ => {}
        }
    }
    Ok(cfg)
}

/// Runs inside the pod's netns.
fn attach_tc(
    prog: &mut SchedClassifier,
    interface: &str,
    mode: TcMode,
) -> Result<TcLink, EbpfError> {
    let perr = prog_err(PROG_INBOUND);
    if mode != TcMode::Netlink {
        // First, so an earlier program cannot end processing before capture;
        // ours hands every packet it does not take to the next one.
        let opts = TcAttachOptions::TcxOrder(LinkOrder::first());
        let id = prog
            .attach_with_options(interface, TcAttachType::Ingress, opts)
            .map_err(&perr)?;
        return Ok(TcLink::Tcx(OwnedLink::new(
            prog.take_link(id).map_err(&perr)?,
            PROG_INBOUND,
        )?));
    }
    // SAFETY: if_nametoindex on a NUL-terminated copy of the name.
    let ifindex =
        std::ffi::CString::new(interface).map(|c| unsafe { libc::if_nametoindex(c.as_ptr()) });
    let ifindex = match ifindex {
        Ok(i) if i != 0 => i,
        _ => {
            let source = ProgramError::TcError(TcError::IoError(
                std::io::Error::from_raw_os_error(libc::ENODEV),
            ));
            return Err(perr(source));
        }
    };
    let created_qdisc = match tc::qdisc_add_clsact(interface) {
        Ok(()) => true,
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(source) => {
            return Err(EbpfError::Qdisc {
                interface: interface.into(),
                source,
            })
        }
    };
    let attached = prog
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .and_then(|id| prog.take_link(id));
    match attached {
        Ok(link) => Ok(TcLink::Netlink {
            link: ManuallyDrop::new(link),
            ifindex,
            created_qdisc,
        }),
        Err(e) => {
            if created_qdisc {
                let _ = netlink::delete_clsact(ifindex);
            }
            Err(perr(e))
        }
    }
}

enum TcLink {
    Tcx(OwnedLink),
    /// A netlink filter is named by (ifindex, priority, handle) of *some*
    /// netns: detaching it anywhere but inside the pod's netns would hit
    /// another interface. Never dropped implicitly, hence ManuallyDrop.
    Netlink {
        link: ManuallyDrop<SchedClassifierLink>,
        ifindex: u32,
        created_qdisc: bool,
    },
}

/// One pod's capture. Dropping it (or [`detach`](Self::detach)) removes
/// every link, filter, qdisc and map entry it created; nothing is pinned.
pub struct PodAttachment {
    shared: Arc<Shared>,
    netns: File,
    netns_path: PathBuf,
    interface: String,
    cookie: u64,
    addrs: Vec<IpAddr>,
    registered: bool,
    tc: Option<TcLink>,
    cgroup_links: Vec<OwnedLink>,
    detached: bool,
}

impl std::fmt::Debug for PodAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodAttachment")
            .field("netns", &self.netns_path)
            .field("interface", &self.interface)
            .field("netns_cookie", &self.cookie)
            .field("addrs", &self.addrs)
            .finish()
    }
}

impl PodAttachment {
    /// The kernel's cookie for the pod's network namespace.
    pub fn netns_cookie(&self) -> u64 {
        self.cookie
    }

    /// Removes the capture, reporting the first failure (every step is tried).
    pub fn detach(mut self) -> Result<(), EbpfError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), EbpfError> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let mut first: Option<EbpfError> = None;
        let mut note = |r: Result<(), EbpfError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };

        // Stop capturing new connections first, then the inbound path.
        for link in self.cgroup_links.drain(..) {
            note(link.detach());
        }
        match self.tc.take() {
            Some(TcLink::Tcx(link)) => note(link.detach()),
            Some(TcLink::Netlink {
                link,
                ifindex,
                created_qdisc,
            }) => {
                let interface = self.interface.clone();
                // If the thread cannot enter the netns, the closure is dropped
                // unrun and ManuallyDrop keeps the link from detaching here.
                let r = in_netns(&self.netns, &self.netns_path, move || {
                    let mut r = ManuallyDrop::into_inner(link)
                        .detach()
                        .map_err(prog_err(PROG_INBOUND));
                    if created_qdisc {
                        if let Err(source) = netlink::delete_clsact(ifindex) {
                            r = r.and(Err(EbpfError::QdiscDelete { interface, source }));
                        }
                    }
                    r
                });
                note(r.and_then(|r| r));
            }
            None => {}
        }

        {
            let mut maps = lock(&self.shared.maps);
            for ip in &self.addrs {
                note(
                    maps.pod_addrs
                        .remove(&AddrKey::new(*ip))
                        .map_err(map_err(MAP_POD_ADDRS)),
                );
            }
            if self.registered {
                note(maps.pods.remove(&self.cookie).map_err(map_err(MAP_PODS)));
                let stale: Vec<FlowKey> = maps
                    .flows
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| k.netns == self.cookie)
                    .collect();
                for k in stale {
                    // Racing LRU eviction may have removed it already.
                    let _ = maps.flows.remove(&k);
                }
            }
        }
        if self.registered {
            let mut progs = lock(&self.shared.programs);
            progs.netns.remove(&self.cookie);
            for ip in &self.addrs {
                progs.addrs.remove(ip);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for PodAttachment {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(netns = %self.netns_path.display(), error = %e, "ebpf capture: detach failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<EbpfCapture>();
        shareable::<PodAttachment>();
    }

    #[test]
    fn pod_cfg_takes_first_of_each_family() {
        let ips: Vec<IpAddr> = ["10.0.0.1", "2001:db8::1", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let cfg = pod_cfg(&ips).unwrap();
        assert_eq!(cfg.flags, maps::POD_HAS_V4 | maps::POD_HAS_V6);
        assert_eq!(cfg.ip4.to_ne_bytes(), [10, 0, 0, 1]);
        assert!(matches!(pod_cfg(&[]), Err(EbpfError::NoPodAddress)));
        let dup: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(); 2];
        assert!(matches!(pod_cfg(&dup), Err(EbpfError::BadAddress(_))));
        assert!(matches!(
            pod_cfg(&["127.0.0.1".parse().unwrap()]),
            Err(EbpfError::BadAddress(_))
        ));
    }
}
