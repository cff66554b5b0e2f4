//! Keeps the served workloads in step with the mesh and the CNI's pods:
//! one [`WorkloadProxy`] per local workload, and capture in its network
//! namespace.
//!
//! Fail closed: capture comes off a namespace only when its workload
//! leaves the mesh (gone from the mesh file, deleted by the CNI). When a
//! workload's details change its listeners are replaced in place while
//! capture stays; when the agent stops, capture stays too, so a pod no
//! agent serves has its TCP refused, never sent in plaintext. A pod the
//! CNI hands over is served from that moment, from the identity the CNI
//! gives, before istiod lists it; until it does, the pod may send (over
//! HBONE, with that identity) but accepts nothing, since the policies that
//! select it are not known yet.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};

use super::lock;
use crate::admin::LocalWorkloads;
use crate::capture::netns::{Netns, NetnsId};
use crate::capture::nft::NftCapture;
use crate::capture::zds::{WorkloadInfo, ZdsEvent};
use crate::capture::{Backend, CaptureSpec, Enrollment};
use crate::config::{Config, Mode};
use crate::identity::Identity;
use crate::proxy::{ListenerAddrs, ProxyContext, WorkloadProxy};
use crate::socket::Sockets;
use crate::state::{ApplicationTunnel, Snapshot, TunnelProtocol, Workload};

/// Where a served workload's network namespace comes from.
#[derive(Clone)]
enum NetnsSource {
    /// None of its own: listeners in the agent's namespace (loopback use).
    Host,
    /// A path from the local mesh file.
    Path(PathBuf),
    /// An fd the CNI sent.
    Cni(Arc<Netns>),
}

impl PartialEq for NetnsSource {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (NetnsSource::Host, NetnsSource::Host) => true,
            (NetnsSource::Path(a), NetnsSource::Path(b)) => a == b,
            // One namespace, whichever fd the CNI sent it with.
            (NetnsSource::Cni(a), NetnsSource::Cni(b)) => a.id() == b.id(),
            _ => false,
        }
    }
}

/// A pod the CNI handed over.
struct CniPod {
    netns: Arc<Netns>,
    info: WorkloadInfo,
    /// Its addresses, read from inside its namespace when it arrived.
    addresses: Vec<IpAddr>,
}

/// A workload to serve, and where.
struct Wanted {
    workload: Arc<Workload>,
    source: NetnsSource,
}

/// A local workload being served.
struct Served {
    workload: Arc<Workload>,
    source: NetnsSource,
    proxy: WorkloadProxy,
    /// Its namespace and capture, when it has a namespace of its own.
    enrollment: Option<Enrollment>,
}

impl Served {
    /// The workload left the mesh: capture off, then listeners closed.
    async fn release(self) {
        if let Some(e) = self.enrollment {
            e.release().await;
        }
        drop(self.proxy);
    }
}

/// Keeps the served workloads in step with the mesh and the CNI's pods.
pub(super) struct Reconciler {
    ctx: ProxyContext,
    cfg: Config,
    backend: Backend,
    /// By pod key: the workload uid in local mode, the CNI's pod uid in
    /// Istio mode (istiod names the same pod otherwise).
    served: Mutex<HashMap<String, Served>>,
    cni: Mutex<HashMap<String, CniPod>>,
    /// Pods (by key) that should be served and could not be, and why;
    /// retried by [`Reconciler::retry`].
    failed: Mutex<HashMap<String, String>>,
    /// Istio mode: whether the CNI's snapshot arrived on its current
    /// connection (the pods are then known); `None` in local mode.
    cni_synced: Option<tokio::sync::watch::Receiver<bool>>,
    /// One reconciliation at a time (mesh changes and CNI events race).
    running: tokio::sync::Mutex<()>,
}

impl Reconciler {
    pub(super) fn new(
        ctx: ProxyContext,
        cfg: Config,
        backend: Backend,
        cni_synced: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Self {
        Reconciler {
            cni_synced,
            ctx,
            cfg,
            backend,
            served: Mutex::default(),
            cni: Mutex::default(),
            failed: Mutex::default(),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// The listener addresses of the served workload `uid`.
    pub(super) fn listeners(&self, uid: &str) -> Option<ListenerAddrs> {
        let served = lock(&self.served);
        let mut all = served.values();
        all.find(|s| s.workload.uid == uid).map(|s| s.proxy.addrs)
    }

    /// The workloads served now.
    pub(super) fn served(&self) -> Vec<Arc<Workload>> {
        let served = lock(&self.served);
        served.values().map(|s| s.workload.clone()).collect()
    }

    /// Retries what could not be started, every `interval` while anything
    /// is left (a pod whose namespace was not ready, a port not yet free).
    pub(super) async fn retry(&self, interval: std::time::Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if !lock(&self.failed).is_empty() {
                self.run().await;
            }
        }
    }

    /// Closes every listener; capture stays.
    pub(super) fn stop_accepting(&self) {
        for s in lock(&self.served).values() {
            s.proxy.stop_accepting();
        }
    }

    /// Stops serving everything, leaving capture in place (the agent is
    /// stopping, not the workloads leaving the mesh).
    pub(super) fn shut_down(&self) {
        let served = std::mem::take(&mut *lock(&self.served));
        drop(served);
    }

    /// The workloads this agent should serve, by pod key.
    fn wanted(&self) -> HashMap<String, Wanted> {
        let snap = self.ctx.state.snapshot();
        match self.cfg.mode {
            Mode::Local => snap
                .local_workloads(&self.cfg.node)
                .filter(|w| w.protocol == TunnelProtocol::Hbone)
                .map(|w| {
                    let source = w
                        .netns()
                        .map_or(NetnsSource::Host, |p| NetnsSource::Path(p.to_path_buf()));
                    let wanted = Wanted {
                        workload: w.clone(),
                        source,
                    };
                    (w.uid.to_string(), wanted)
                })
                .collect(),
            // The CNI says which pods are here; the mesh says who they are,
            // or, until it does, the CNI.
            Mode::Istio => lock(&self.cni)
                .iter()
                .map(|(uid, pod)| {
                    let workload = from_mesh(&snap, uid, &pod.info)
                        .unwrap_or_else(|| Arc::new(self.described_by_cni(uid, pod)));
                    let source = NetnsSource::Cni(pod.netns.clone());
                    (uid.clone(), Wanted { workload, source })
                })
                .collect(),
        }
    }

    /// A pod istiod does not list (yet), as the CNI describes it.
    fn described_by_cni(&self, uid: &str, pod: &CniPod) -> Workload {
        let info = &pod.info;
        let service_account = if info.service_account.is_empty() {
            "default".to_string()
        } else {
            info.service_account.clone()
        };
        Workload {
            uid: uid.into(),
            name: info.name.as_str().into(),
            namespace: info.namespace.as_str().into(),
            service_account: service_account.into(),
            trust_domain: self.cfg.ca.trust_domain.as_str().into(),
            addresses: pod.addresses.iter().copied().collect(),
            node: self.cfg.node.as_str().into(),
            local: None,
            protocol: TunnelProtocol::Hbone,
            application_tunnel: ApplicationTunnel::None,
            waypoint: None,
            healthy: true,
            capacity: 1,
            // Telemetry names come from istiod's listing.
            telemetry: Default::default(),
            network: None,
            hostname: None,
        }
    }

    /// Starts what is new, replaces what changed, releases what left.
    pub(super) async fn run(&self) {
        let _one = self.running.lock().await;
        let mut wanted = self.wanted();
        let (leaving, changing) = {
            let mut served = lock(&self.served);
            let gone: Vec<String> = served
                .keys()
                .filter(|k| !wanted.contains_key(*k))
                .cloned()
                .collect();
            // Capture comes off before the entry goes: while a workload is
            // listed as served, its capture may still be in place.
            let leaving: Vec<(String, Arc<Workload>, Option<Enrollment>)> = gone
                .into_iter()
                .filter_map(|k| {
                    let s = served.get_mut(&k)?;
                    Some((k, s.workload.clone(), s.enrollment.take()))
                })
                .collect();
            let changed: Vec<String> = wanted
                .iter()
                .filter(|(k, w)| {
                    served
                        .get(*k)
                        .is_none_or(|s| s.workload != w.workload || s.source != w.source)
                })
                .map(|(k, _)| k.clone())
                .collect();
            let changing: Vec<(String, Option<Served>)> = changed
                .into_iter()
                .map(|k| {
                    let old = served.remove(&k);
                    (k, old)
                })
                .collect();
            (leaving, changing)
        };
        let kept: HashSet<Identity> = wanted.values().map(|w| w.workload.identity()).collect();
        let mut dropped_ids = Vec::new();
        lock(&self.failed).retain(|k, _| wanted.contains_key(k));
        for (key, workload, enrollment) in leaving {
            info!(uid = %workload.uid, "workload left the mesh; releasing it");
            dropped_ids.push(workload.identity());
            if let Some(e) = enrollment {
                e.release().await;
            }
            lock(&self.served).remove(&key);
        }
        for (key, old) in changing {
            let Some(want) = wanted.remove(&key) else {
                continue;
            };
            self.ctx.certs.track(want.workload.identity());
            let before = old.as_ref().map(|o| o.workload.identity());
            let uid = want.workload.uid.clone();
            match self.serve(want, old).await {
                Ok(s) => {
                    dropped_ids.extend(before);
                    lock(&self.failed).remove(&key);
                    lock(&self.served).insert(key, s);
                }
                Err((e, old)) => {
                    warn!(%uid, error = %e, "cannot serve the workload; will retry");
                    lock(&self.failed).insert(key.clone(), e);
                    // Keep what served before: it is retried on the next
                    // change, and its capture can still be released.
                    if let Some(old) = old {
                        lock(&self.served).insert(key, old);
                    }
                }
            }
        }
        // Another local workload may share an identity.
        for id in dropped_ids {
            if !kept.contains(&id) {
                self.ctx.certs.forget(&id);
            }
        }
    }

    /// Serves `want`. In the namespace `old` already captured, the new
    /// listeners open beside the old ones (SO_REUSEPORT) before those
    /// close, and capture stays; in another namespace, `old` is released
    /// first. On error, `old` comes back untouched where it can.
    async fn serve(
        &self,
        want: Wanted,
        old: Option<Served>,
    ) -> Result<Served, (String, Option<Served>)> {
        let Wanted { workload, source } = want;
        let old = match old {
            Some(old) if old.source == source => {
                let sockets = old
                    .enrollment
                    .as_ref()
                    .map_or(Sockets::Host, Enrollment::sockets);
                let proxy =
                    match WorkloadProxy::start(self.ctx.clone(), workload.clone(), sockets).await {
                        Ok(p) => p,
                        Err(e) => return Err((format!("opening listeners: {e}"), Some(old))),
                    };
                let Served {
                    workload: before,
                    mut enrollment,
                    proxy: old_proxy,
                    ..
                } = old;
                drop(old_proxy);
                if let Some(e) = &mut enrollment {
                    if before.addresses != workload.addresses
                        || before.cgroup() != workload.cgroup()
                    {
                        if let Err(err) = e.capture(&self.backend, self.spec(&workload)).await {
                            warn!(uid = %workload.uid, error = %err, "updating capture");
                        }
                    }
                }
                info!(uid = %workload.uid, "workload changed; listeners replaced, capture kept");
                return Ok(Served {
                    workload,
                    source,
                    proxy,
                    enrollment,
                });
            }
            other => other,
        };
        if let Some(old) = old {
            info!(uid = %old.workload.uid, "workload moved to another namespace");
            old.release().await;
        }
        self.start(workload, source).await.map_err(|e| (e, None))
    }

    /// Opens a workload's listeners and, when it has its own namespace,
    /// enrolls it: capture first (with the return path the listeners'
    /// transparent connections need, so nothing they answer leaves the
    /// pod unrouted), then the listeners. Between the two, the pod's TCP
    /// is refused, never uncaptured; a pod an earlier agent captured keeps
    /// its capture throughout.
    async fn start(&self, w: Arc<Workload>, source: NetnsSource) -> Result<Served, String> {
        let mut enrollment = match &source {
            NetnsSource::Host => {
                let proxy = WorkloadProxy::start(self.ctx.clone(), w.clone(), Sockets::Host)
                    .await
                    .map_err(|e| format!("opening listeners: {e}"))?;
                return Ok(Served {
                    workload: w,
                    source,
                    proxy,
                    enrollment: None,
                });
            }
            NetnsSource::Path(path) => Enrollment::open(path).await.map_err(|e| e.to_string())?,
            NetnsSource::Cni(ns) => Enrollment::with_netns(ns.clone()),
        };
        enrollment
            .capture(&self.backend, self.spec(&w))
            .await
            .map_err(|e| e.to_string())?;
        let proxy = WorkloadProxy::start(self.ctx.clone(), w.clone(), enrollment.sockets())
            .await
            .map_err(|e| format!("opening listeners in the workload's namespace: {e}"))?;
        info!(uid = %w.uid, "workload enrolled");
        Ok(Served {
            workload: w,
            source,
            proxy,
            enrollment: Some(enrollment),
        })
    }

    fn spec(&self, w: &Workload) -> CaptureSpec {
        let cfg = &self.cfg;
        CaptureSpec {
            rules: NftCapture {
                socket_mark: cfg.socket_mark,
                outbound_port: cfg.ports.outbound,
                inbound_plaintext_port: cfg.ports.inbound_plaintext,
                hbone_port: cfg.ports.hbone,
                redirect: true,
                dns_port: cfg.dns_enabled().then_some(cfg.dns.port),
            },
            addresses: w.addresses.to_vec(),
            cgroup: w.cgroup().map(Path::to_path_buf),
            interface: cfg.pod_interface.clone(),
        }
    }

    /// Applies one message from the CNI; the answer becomes its ack.
    pub(super) async fn on_cni(&self, event: ZdsEvent) -> Result<(), String> {
        match event {
            ZdsEvent::Add { uid, netns, info } => {
                // As ztunnel: the pod's identity comes with it, so it can be
                // served before istiod lists it.
                let info = info.ok_or_else(|| format!("pod {uid} came without workload info"))?;
                // A pod is its namespace: an Add re-sent for the same one
                // (the CNI reconnected) changes nothing.
                let id = NetnsId::of(&netns).map_err(|e| format!("the pod's namespace: {e}"))?;
                let same = lock(&self.cni)
                    .get(&uid)
                    .is_some_and(|p| p.netns.id() == id);
                if same {
                    debug!(%uid, "pod added again with the same namespace; nothing to do");
                    return self.outcome(&uid);
                }
                let name = PathBuf::from(format!("cni:{uid}"));
                let ns = tokio::task::spawn_blocking(move || Netns::from_fd(name, netns))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("entering the pod's namespace: {e}"))?;
                let addresses = ns
                    .addresses()
                    .await
                    .map_err(|e| format!("reading the pod's addresses: {e}"))?;
                info!(%uid, ?addresses, "pod added by the CNI");
                lock(&self.cni).insert(
                    uid.clone(),
                    CniPod {
                        netns: Arc::new(ns),
                        info,
                        addresses,
                    },
                );
                self.run().await;
                return self.outcome(&uid);
            }
            // Before the snapshot only: the pod is not to be released. For
            // a pod this agent does not hold there is nothing to keep (as
            // ztunnel, which acks it).
            ZdsEvent::Keep { uid } => {
                if !lock(&self.cni).contains_key(&uid) {
                    debug!(%uid, "keep for a pod not served here");
                }
            }
            ZdsEvent::Del { uid } => {
                info!(%uid, "pod removed by the CNI");
                lock(&self.cni).remove(&uid);
            }
            ZdsEvent::SnapshotSent { current } => {
                lock(&self.cni).retain(|uid, _| current.contains(uid));
            }
        }
        self.run().await;
        Ok(())
    }

    /// The CNI's answer for pod `uid` after a reconciliation: an error
    /// while it could not be started (it is retried meanwhile).
    fn outcome(&self, uid: &str) -> Result<(), String> {
        match lock(&self.failed).get(uid) {
            Some(why) => Err(format!("pod {uid} cannot be served yet: {why}")),
            None => Ok(()),
        }
    }
}

impl LocalWorkloads for Reconciler {
    fn served(&self) -> Vec<Arc<Workload>> {
        Reconciler::served(self)
    }

    fn pending(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = lock(&self.failed)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort();
        out
    }

    fn pods_known(&self) -> bool {
        self.cni_synced.as_ref().is_none_or(|s| *s.borrow())
    }
}

/// The mesh's workload for CNI pod `uid`: by uid, else by name and
/// namespace (istiod's uids are not the pod's).
fn from_mesh(snap: &Snapshot, uid: &str, info: &WorkloadInfo) -> Option<Arc<Workload>> {
    snap.workload_by_uid(uid).cloned().or_else(|| {
        snap.workloads()
            .find(|w| w.name == info.name && w.namespace == info.namespace)
            .cloned()
    })
}
