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

/// One received packet.
struct Packet {
    len: usize,
    fds: Vec<OwnedFd>,
    /// The data or the fds did not fit.
    truncated: bool,
}

/// A connected `SOCK_SEQPACKET` unix socket (tokio has stream sockets only).
struct SeqPacket(AsyncFd<Socket>);

impl SeqPacket {
    fn connect(path: &Path) -> io::Result<SeqPacket> {
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking().cloexec(), None)?;
        // A unix connect completes at once or fails (EAGAIN when the
        // backlog is full); either way there is nothing to wait for.
        socket.connect(&SockAddr::unix(path)?)?;
        Self::register(socket)
    }

    fn register(socket: Socket) -> io::Result<SeqPacket> {
        // SAFETY: the Socket owns its fd and keeps it open and unchanged
        // until the AsyncFd (which owns the Socket) is dropped.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(SeqPacket(fd))
    }

    async fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.0.writable().await?;
            // MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE.
            if let Ok(sent) = guard.try_io(|s| s.get_ref().send_with_flags(msg, libc::MSG_NOSIGNAL))
            {
                return match sent? {
                    n if n == msg.len() => Ok(()),
                    n => Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes", msg.len()),
                    )),
                };
            }
        }
    }

    /// Receives one packet; cancel-safe (nothing is read until it is ready).
    async fn recv(&self, buf: &mut [u8]) -> io::Result<Packet> {
        loop {
            let mut guard = self.0.readable().await?;
            if let Ok(packet) = guard.try_io(|s| recv_with_fds(s.as_raw_fd(), buf)) {
                return packet;
            }
        }
    }
}

/// `recvmsg` with room for [`MAX_FDS`] fds in `SCM_RIGHTS`.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<Packet> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CONTROL_BYTES.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: msg points at buffers of the stated sizes that outlive the
    // call. MSG_CMSG_CLOEXEC: received fds must not leak into children
    // (e.g. the `nft` commands capture runs).
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // Own every received fd before anything can fail, so none leaks.
    // SAFETY: the kernel filled msg_control up to msg_controllen, and the
    // CMSG_* walk stays within it; SCM_RIGHTS data is an array of fds that
    // now belong to this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                #[allow(clippy::unnecessary_cast)]
                let bytes = ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Packet {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn request(payload: Payload) -> Vec<u8> {
        pb::WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec()
    }

    fn add(uid: &str) -> Payload {
        Payload::Add(pb::AddWorkload {
            uid: uid.into(),
            workload_info: Some(pb::WorkloadInfo {
                name: "web-0".into(),
                namespace: "default".into(),
                service_account: "web".into(),
            }),
        })
    }

    fn keep(uid: &str) -> Payload {
        Payload::Keep(pb::KeepWorkload { uid: uid.into() })
    }

    fn del(uid: &str) -> Payload {
        Payload::Del(pb::DelWorkload { uid: uid.into() })
    }

    fn snapshot() -> Payload {
        Payload::SnapshotSent(pb::SnapshotSent {})
    }

    fn fd(path: &str) -> OwnedFd {
        File::open(path).expect("open").into()
    }

    /// What an event looks like, without its fd.
    fn summary(e: &ZdsEvent) -> String {
        match e {
            ZdsEvent::Add { uid, info, .. } => {
                format!("add {uid} {:?}", info.as_ref().map(|i| &i.name))
            }
            ZdsEvent::Keep { uid } => format!("keep {uid}"),
            ZdsEvent::Del { uid } => format!("del {uid}"),
            ZdsEvent::SnapshotSent { current } => {
                let mut v: Vec<_> = current.iter().cloned().collect();
                v.sort();
                format!("snapshot {v:?}")
            }
        }
    }

    #[test]
    fn single_requests() {
        let netns = "/proc/self/ns/net";
        // (request bytes, fds, expected summary or error substring)
        type Case = (
            Vec<u8>,
            Vec<&'static str>,
            Result<&'static str, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (request(add("a")), vec![netns], Ok(r#"add a Some("web-0")"#)),
            (
                request(Payload::Add(pb::AddWorkload {
                    uid: "a".into(),
                    workload_info: None,
                })),
                vec![netns],
                Ok("add a None"),
            ),
            (request(add("a")), vec![], Err("carried 0 fds, expected 1")),
            (request(add("a")), vec![netns, netns], Err("carried 2 fds")),
            (
                request(add("a")),
                vec!["/dev/null"],
                Err("not a network namespace"),
            ),
            (
                request(add("a")),
                vec!["/proc/self/ns/uts"],
                Err("namespace type"),
            ),
            (request(add("")), vec![netns], Err("without a pod uid")),
            (request(keep("k")), vec![], Ok("keep k")),
            (
                request(keep("k")),
                vec![netns],
                Err("carried 1 fds, expected 0"),
            ),
            (request(del("d")), vec![], Ok("del d")),
            (request(del("d")), vec![netns], Err("carried 1 fds")),
            (request(snapshot()), vec![], Ok("snapshot []")),
            (Vec::new(), vec![], Err("no payload")),
            (vec![0x0a, 0x05, 0x01], vec![], Err("decoding")),
        ];
        for (i, (data, fds, want)) in cases.into_iter().enumerate() {
            let fds = fds.into_iter().map(fd).collect();
            let got = Session::default().event(&data, fds, false);
            match (got, want) {
                (Ok(e), Ok(s)) => assert_eq!(summary(&e), s, "case {i}"),
                (Err(e), Err(s)) => assert!(e.to_string().contains(s), "case {i}: {e}"),
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn truncated_packets_are_refused() {
        let got = Session::default().event(&request(del("d")), vec![], true);
        assert!(matches!(got, Err(ZdsError::Truncated)), "{got:?}");
    }

    #[test]
    fn sequences() {
        // Each case: requests on one connection, and what each turns into.
        let cases: Vec<(Vec<Payload>, Vec<&str>)> = vec![
            (
                vec![add("a"), keep("k"), add("b"), snapshot(), add("c")],
                vec![
                    r#"add a Some("web-0")"#,
                    "keep k",
                    r#"add b Some("web-0")"#,
                    r#"snapshot ["a", "b", "k"]"#,
                    r#"add c Some("web-0")"#,
                ],
            ),
            // A pod deleted during the snapshot is not current.
            (
                vec![add("a"), add("b"), del("a"), snapshot(), del("b")],
                vec![
                    r#"add a Some("web-0")"#,
                    r#"add b Some("web-0")"#,
                    "del a",
                    r#"snapshot ["b"]"#,
                    "del b",
                ],
            ),
            (
                vec![snapshot(), keep("k")],
                vec!["snapshot []", "error: keep for \"k\" after snapshot_sent"],
            ),
            (
                vec![snapshot(), snapshot()],
                vec![
                    "snapshot []",
                    "error: second snapshot_sent on one connection",
                ],
            ),
        ];
        for (i, (requests, want)) in cases.into_iter().enumerate() {
            let mut session = Session::default();
            let got: Vec<String> = requests
                .into_iter()
                .map(|p| {
                    let fds = match p {
                        Payload::Add(_) => vec![fd("/proc/self/ns/net")],
                        _ => vec![],
                    };
                    match session.event(&request(p), fds, false) {
                        Ok(e) => summary(&e),
                        Err(e) => format!("error: {e}"),
                    }
                })
                .collect();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn acks() {
        let long = "é".repeat(1000);
        // (answer, expected error text)
        let cases = [
            (Ok(()), String::new()),
            (Err("no capture".to_owned()), "no capture".to_owned()),
            (Err(String::new()), "unspecified error".to_owned()),
            (Err(long.clone()), "é".repeat(MAX_ACK_ERROR / 2)),
        ];
        for (answer, want) in cases {
            let bytes = ack(answer);
            // istio-cni reads acks into 1 KiB.
            assert!(bytes.len() <= 1024, "{} bytes", bytes.len());
            let resp = pb::WorkloadResponse::decode(&bytes[..]).expect("decode");
            let Some(pb::workload_response::Payload::Ack(a)) = resp.payload else {
                panic!("not an ack: {resp:?}");
            };
            assert_eq!(a.error, want);
        }
    }

    /// Sends `data` with `fds` in SCM_RIGHTS over `sock` (the CNI's half).
    fn send_with_fds(sock: &Socket, data: &[u8], fds: &[RawFd]) {
        let mut control = [0u64; CONTROL_BYTES.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut _,
            iov_len: data.len(),
        };
        // SAFETY: test-only; buffers outlive the call and fit the fds.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if !fds.is_empty() {
                let len = size_of_val(fds) as libc::c_uint;
                msg.msg_control = control.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(len) as _;
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
            assert_eq!(
                libc::sendmsg(sock.as_raw_fd(), &msg, 0),
                data.len() as isize
            );
        }
    }

    #[tokio::test]
    async fn seqpacket_carries_fds_and_keeps_boundaries() {
        let (cni, agent) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).expect("pair");
        agent.set_nonblocking(true).expect("nonblocking");
        let agent = SeqPacket::register(agent).expect("register");
        let netns = fd("/proc/self/ns/net");
        let null = fd("/dev/null");
        send_with_fds(&cni, b"one", &[netns.as_raw_fd()]);
        send_with_fds(&cni, b"two", &[]);
        send_with_fds(&cni, &[7u8; 100], &[null.as_raw_fd(); 3]);

        let mut buf = [0u8; 64];
        let p = agent.recv(&mut buf).await.expect("recv");
        assert_eq!(
            (&buf[..p.len], p.fds.len(), p.truncated),
            (&b"one"[..], 1, false)
        );
        let (got, want) = (fstat(&p.fds[0]), fstat(&netns));
        assert_eq!(got, want, "same namespace inode");
        let p = agent.recv(&mut buf).await.expect("recv");
        assert_eq!(
            (&buf[..p.len], p.fds.len(), p.truncated),
            (&b"two"[..], 0, false)
        );
        // Too long for the buffer: reported as truncated, fds still owned.
        let p = agent.recv(&mut buf).await.expect("recv");
        assert_eq!((p.len, p.fds.len(), p.truncated), (64, 3, true));

        agent.send(&ack(Ok(()))).await.expect("send");
        let mut reply = [0u8; 16];
        let n = cni.recv(as_uninit(&mut reply)).expect("recv");
        assert_eq!(&reply[..n], &ack(Ok(()))[..]);

        drop(cni);
        let p = agent.recv(&mut buf).await.expect("recv");
        assert_eq!((p.len, p.fds.len()), (0, 0), "EOF");
    }

    fn fstat(fd: &OwnedFd) -> (u64, u64) {
        // SAFETY: stat is plain data; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        #[allow(clippy::unnecessary_cast)]
        (st.st_dev as u64, st.st_ino as u64)
    }

    fn as_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
        // SAFETY: u8 and MaybeUninit<u8> share a layout; recv only writes.
        unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) }
    }

    #[tokio::test]
    async fn keeps_retrying_then_shuts_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = ZdsClient::new(dir.path().join("absent.sock"))
            .with_backoff(Duration::from_millis(1), Duration::from_millis(5));
        let run = client.run(
            |_| async { Ok(()) },
            tokio::time::sleep(Duration::from_millis(50)),
        );
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run returns on shutdown");
    }
}
