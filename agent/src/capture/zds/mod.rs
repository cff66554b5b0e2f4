//! ZDS: the agent's side of istio-cni's pod hand-off protocol.
//!
//! istio-cni listens on a `SOCK_SEQPACKET` unix socket (by default
//! [`DEFAULT_SOCKET_PATH`]) and the node proxy connects to it. Each packet
//! holds exactly one protobuf message:
//!
//! 1. the agent says `ZdsHello { version: V1 }`;
//! 2. the CNI sends its snapshot: `add` for every pod whose netns it holds
//!    (the netns fd travels in `SCM_RIGHTS` with the message), `keep` for a
//!    pod it knows but holds no netns for, then `snapshot_sent`;
//! 3. from then on, `add` and `del` as pods come and go.
//!
//! Every request is answered by exactly one `WorkloadResponse { ack }`, whose
//! `error` is empty on success. Acks match requests only by order, and the
//! CNI treats anything the agent sends unprompted as a protocol error, so
//! the agent writes nothing but the hello and one ack per request.
//!
//! After a reconnect the CNI starts over with a fresh snapshot; pods the
//! agent serves that the snapshot does not name were deleted meanwhile.
//! [`ZdsEvent::SnapshotSent`] carries the named set so the caller can
//! release the others.
//!
//! [`ZdsClient::run`] owns the connection: it (re)connects with backoff,
//! validates each request, hands it to the caller as a [`ZdsEvent`] and
//! turns the caller's answer into the ack.

use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_proto::prost::Message;
use ambient_proto::zds::workload_request::Payload;
use ambient_proto::zds::{self as pb};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Where istio-cni listens for the node proxy unless configured otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest request accepted; istio-cni's messages are far below 1 KiB.
const MAX_REQUEST: usize = 16 * 1024;
/// Fds one request may carry before the kernel truncates. One is legal; the
/// room for more lets us see (and close) extras instead of guessing.
const MAX_FDS: usize = 8;
const CONTROL_BYTES: usize =
    // SAFETY: CMSG_SPACE only does arithmetic on its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<libc::c_int>()) as libc::c_uint) } as usize;
/// istio-cni reads acks into a 1 KiB buffer and rejects a truncated one,
/// so error texts are cut to leave room for the protobuf framing.
const MAX_ACK_ERROR: usize = 960;
/// istio-cni waits this long for an ack, then moves on; a later ack would
/// be read as the answer to its next request.
const CNI_ACK_DEADLINE: Duration = Duration::from_secs(5);

/// Pod metadata istio-cni sends with `add`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

impl From<pb::WorkloadInfo> for WorkloadInfo {
    fn from(w: pb::WorkloadInfo) -> Self {
        WorkloadInfo {
            name: w.name,
            namespace: w.namespace,
            service_account: w.service_account,
        }
    }
}

/// What the CNI tells the agent, one request at a time.
#[derive(Debug)]
pub enum ZdsEvent {
    /// Serve pod `uid`, whose network namespace is `netns`. May repeat for a
    /// pod already served (after a reconnect); the netns then differs only
    /// if the pod's sandbox was re-created, which the caller can tell by
    /// comparing the fds' inodes.
    Add {
        uid: String,
        netns: OwnedFd,
        info: Option<WorkloadInfo>,
    },
    /// Part of a snapshot only: keep serving `uid` although the CNI holds no
    /// netns for it (e.g. the CNI restarted). Nothing to do for an unknown
    /// pod; answer `Ok`.
    Keep { uid: String },
    /// Stop serving pod `uid` (idempotent: it may be unknown).
    Del { uid: String },
    /// The snapshot is complete. `current` holds every uid named by `Add` or
    /// `Keep` (and not deleted) since this connection began; pods served
    /// before and not in it were removed while disconnected.
    SnapshotSent { current: HashSet<String> },
}

impl ZdsEvent {
    fn kind(&self) -> &'static str {
        match self {
            ZdsEvent::Add { .. } => "add",
            ZdsEvent::Keep { .. } => "keep",
            ZdsEvent::Del { .. } => "del",
            ZdsEvent::SnapshotSent { .. } => "snapshot_sent",
        }
    }

    fn uid(&self) -> &str {
        match self {
            ZdsEvent::Add { uid, .. } | ZdsEvent::Keep { uid } | ZdsEvent::Del { uid } => uid,
            ZdsEvent::SnapshotSent { .. } => "",
        }
    }
}

/// Why a ZDS connection ended or a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("connecting to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("the CNI closed the connection")]
    Closed,
    #[error("request truncated (over {MAX_REQUEST} bytes or {MAX_FDS} fds)")]
    Truncated,
    #[error("decoding request: {0}")]
    Decode(#[from] ambient_proto::prost::DecodeError),
    #[error("request has no payload")]
    NoPayload,
    #[error("{request} request without a pod uid")]
    NoUid { request: &'static str },
    #[error("{request} request for {uid:?} carried {got} fds, expected {expected}")]
    FdCount {
        request: &'static str,
        uid: String,
        got: usize,
        expected: usize,
    },
    #[error("fd sent for {uid:?} is not a network namespace: {reason}")]
    NotNetns { uid: String, reason: String },
    #[error("keep for {uid:?} after snapshot_sent")]
    KeepAfterSnapshot { uid: String },
    #[error("second snapshot_sent on one connection")]
    SnapshotTwice,
}

/// The agent's ZDS connection to istio-cni.
#[derive(Clone, Debug)]
pub struct ZdsClient {
    path: PathBuf,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// True once the current connection's snapshot has been handled.
    synced: Arc<watch::Sender<bool>>,
}

impl ZdsClient {
    /// A client for the CNI listening at `socket_path`.
    pub fn new(socket_path: PathBuf) -> Self {
        ZdsClient {
            path: socket_path,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(15),
            synced: Arc::new(watch::channel(false).0),
        }
    }

    /// Whether the pods are known: true from the handling of the current
    /// connection's `snapshot_sent` until that connection is lost (as
    /// ztunnel, which is not ready again until the next snapshot).
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Overrides the reconnect backoff (doubling from `initial` up to `max`).
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Connects (retrying with backoff while the socket is absent or
    /// refuses), says hello, then passes each request to `handler` and acks
    /// it with the handler's answer (`Err(reason)` becomes `Ack { error }`).
    /// Answer within 5 s: istio-cni stops waiting after that. When the
    /// connection drops, reconnects and starts over, so the handler sees a
    /// fresh sequence ending in [`ZdsEvent::SnapshotSent`]. Returns when
    /// `shutdown` completes; a handler call in progress is finished first.
    pub async fn run<F, Fut>(self, mut handler: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut(ZdsEvent) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delay = self.initial_backoff;
        loop {
            let outcome = match SeqPacket::connect(&self.path) {
                Err(source) => Err(ZdsError::Connect {
                    path: self.path.clone(),
                    source,
                }),
                Ok(conn) => {
                    info!(path = %self.path.display(), "connected to the CNI");
                    let mut session = Session::default();
                    let outcome = serve(
                        &conn,
                        &mut session,
                        &mut handler,
                        &self.synced,
                        shutdown.as_mut(),
                    )
                    .await;
                    self.synced.send_replace(false);
                    // A connection that got as far as a full snapshot was
                    // healthy: reconnect quickly.
                    if session.synced {
                        delay = self.initial_backoff;
                    }
                    outcome
                }
            };
            match outcome {
                Ok(()) => {
                    info!("ZDS client shut down");
                    return;
                }
                Err(e @ ZdsError::Connect { .. }) => {
                    warn!(error = %e, retry_in = ?delay, "cannot reach the CNI; is it running?")
                }
                Err(e) => warn!(error = %e, retry_in = ?delay, "ZDS connection lost"),
            }
            tokio::select! {
                biased;
                () = shutdown.as_mut() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.max_backoff);
        }
    }
}

/// Runs one connection: returns `Ok` on shutdown, else why it ended.
async fn serve<F, Fut>(
    conn: &SeqPacket,
    session: &mut Session,
    handler: &mut F,
    synced: &watch::Sender<bool>,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), ZdsError>
where
    F: FnMut(ZdsEvent) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let hello = pb::ZdsHello {
        version: pb::Version::V1 as i32,
    };
    conn.send(&hello.encode_to_vec()).await?;
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        // Only the wait for a request races shutdown: a handler that has
        // started (e.g. installing capture) is never cut off halfway.
        let packet = tokio::select! {
            biased;
            () = shutdown.as_mut() => return Ok(()),
            p = conn.recv(&mut buf) => p?,
        };
        if packet.len == 0 && packet.fds.is_empty() && !packet.truncated {
            return Err(ZdsError::Closed);
        }
        let event = match session.event(&buf[..packet.len], packet.fds, packet.truncated) {
            Ok(event) => event,
            Err(e) => {
                // Refuse, then reconnect: the fresh snapshot resynchronizes
                // both sides, as ztunnel does.
                warn!(error = %e, "refusing ZDS request");
                conn.send(&ack(Err(e.to_string()))).await?;
                return Err(e);
            }
        };
        let (kind, uid) = (event.kind(), event.uid().to_owned());
        debug!(kind, uid, "ZDS request");
        let started = Instant::now();
        let answer = handler(event).await;
        let took = started.elapsed();
        if took > CNI_ACK_DEADLINE {
            warn!(
                kind,
                uid,
                ?took,
                "ZDS handler was slower than the CNI waits for an ack"
            );
        }
        if let Err(reason) = &answer {
            warn!(kind, uid, reason, "ZDS request failed");
        }
        if kind == "snapshot_sent" {
            synced.send_replace(true);
        }
        conn.send(&ack(answer)).await?;
    }
}

/// Protocol state of one connection.
#[derive(Default)]
struct Session {
    /// `snapshot_sent` has arrived.
    synced: bool,
    /// Pods named by the snapshot so far.
    named: HashSet<String>,
}

impl Session {
    /// Turns one received packet into an event, or says why it is invalid.
    /// Any fds are closed on error.
    fn event(
        &mut self,
        data: &[u8],
        mut fds: Vec<OwnedFd>,
        truncated: bool,
    ) -> Result<ZdsEvent, ZdsError> {
        if truncated {
            return Err(ZdsError::Truncated);
        }
        let payload = pb::WorkloadRequest::decode(data)?
            .payload
            .ok_or(ZdsError::NoPayload)?;
        let (request, uid) = match &payload {
            Payload::Add(a) => ("add", a.uid.as_str()),
            Payload::Keep(k) => ("keep", k.uid.as_str()),
            Payload::Del(d) => ("del", d.uid.as_str()),
            Payload::SnapshotSent(_) => ("snapshot_sent", ""),
        };
        if uid.is_empty() && request != "snapshot_sent" {
            return Err(ZdsError::NoUid { request });
        }
        let expected = usize::from(request == "add");
        if fds.len() != expected {
            return Err(ZdsError::FdCount {
                request,
                uid: uid.to_owned(),
                got: fds.len(),
                expected,
            });
        }
        Ok(match payload {
            Payload::Add(add) => {
                let Some(netns) = fds.pop() else {
                    return Err(ZdsError::FdCount {
                        request,
                        uid: add.uid,
                        got: 0,
                        expected,
                    });
                };
                if let Err(reason) = check_netns(&netns) {
                    return Err(ZdsError::NotNetns {
                        uid: add.uid,
                        reason,
                    });
                }
                if !self.synced {
                    self.named.insert(add.uid.clone());
                }
                ZdsEvent::Add {
                    uid: add.uid,
                    netns,
                    info: add.workload_info.map(WorkloadInfo::from),
                }
            }
            Payload::Keep(keep) => {
                if self.synced {
                    return Err(ZdsError::KeepAfterSnapshot { uid: keep.uid });
                }
                self.named.insert(keep.uid.clone());
                ZdsEvent::Keep { uid: keep.uid }
            }
            Payload::Del(del) => {
                self.named.remove(&del.uid);
                ZdsEvent::Del { uid: del.uid }
            }
            Payload::SnapshotSent(_) => {
                if self.synced {
                    return Err(ZdsError::SnapshotTwice);
                }
                self.synced = true;
                ZdsEvent::SnapshotSent {
                    current: std::mem::take(&mut self.named),
                }
            }
        })
    }
}

/// The encoded ack for a handler's answer.
fn ack(answer: Result<(), String>) -> Vec<u8> {
    let error = match answer {
        Ok(()) => String::new(),
        // An empty error would read as success.
        Err(e) if e.is_empty() => "unspecified error".to_owned(),
        Err(mut e) => {
            if e.len() > MAX_ACK_ERROR {
                let mut end = MAX_ACK_ERROR;
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                e.truncate(end);
            }
            e
        }
    };
    pb::WorkloadResponse {
        payload: Some(pb::workload_response::Payload::Ack(pb::Ack { error })),
    }
    .encode_to_vec()
}

/// Checks that `fd` is a network namespace, so a CNI bug surfaces as a
/// refused request rather than as capture in the wrong place.
fn check_netns(fd: &OwnedFd) -> Result<(), String> {
    // _IO(0xb7, 0x3) from <linux/nsfs.h>.
    const NS_GET_NSTYPE: libc::Ioctl = (0xb7 << 8) | 0x3;
    // SAFETY: NS_GET_NSTYPE takes no argument; the fd is valid and owned.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    if kind >= 0 {
        return if kind == libc::CLONE_NEWNET {
            Ok(())
        } else {
            Err(format!("namespace type {kind:#x}"))
        };
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOTTY) && err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err.to_string());
    }
    // Not a namespace file, or a kernel before 4.11 without NS_GET_NSTYPE:
    // fall back to the file system the fd lives on.
    // SAFETY: statfs is plain data; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `fs`, which outlives the call.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    // The integer types of these differ between libcs.
    #[allow(clippy::unnecessary_cast)]
    let (magic, nsfs, proc) = (
        fs.f_type as i64,
        libc::NSFS_MAGIC as i64,
        libc::PROC_SUPER_MAGIC as i64,
    );
    if magic == nsfs || magic == proc {
        Ok(())
    } else {
        Err(format!("file system magic {magic:#x}"))
    }
}

mod seqpacket;
#[cfg(test)]
mod tests;

use seqpacket::SeqPacket;
