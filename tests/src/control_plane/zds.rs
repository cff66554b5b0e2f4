//! The CNI side of ZDS for tests: istio-cni's node agent in miniature.
//!
//! [`TestCni`] listens on a `SOCK_SEQPACKET` unix socket, waits for the
//! agent's `ZdsHello`, then does what istio-cni does on every connection:
//! sends each pod it considers current (`add` with the netns fd in
//! `SCM_RIGHTS`, or `keep` when it holds no netns for the pod), then
//! `snapshot_sent`, then live `add`/`del` requests, each waiting for its
//! ack. As istio-cni (cni/pkg/nodeagent/ztunnelserver.go), it keeps every
//! agent connection until the agent closes it: an `add` goes to the latest
//! one, a `del` to all of them (during an upgrade both agents hear that a
//! pod is gone). It is written against the wire format, independently of the
//! agent's client, so the two check each other.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ambient_agent::capture::zds::WorkloadInfo;
use ambient_proto::prost::Message;
use ambient_proto::zds::{self as pb, workload_request::Payload};
use anyhow::{anyhow, bail, Context};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How long istio-cni waits for the hello and for each ack.
const DEADLINE: Duration = Duration::from_secs(5);
/// istio-cni reads the agent's messages into 1 KiB; so do we, so that an
/// agent sending more fails here as it would there.
const READ_BUF: usize = 1024;

/// A ZDS server standing in for istio-cni.
pub struct TestCni {
    shared: Arc<Shared>,
    path: PathBuf,
    accept: JoinHandle<()>,
}

struct Shared {
    state: Mutex<State>,
    /// Whether an agent is connected and has said hello.
    connected: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// Pods the CNI considers current, like istio-cni's pod cache.
    pods: BTreeMap<String, Pod>,
    /// The connections that said hello, oldest first; adds go to the last.
    conns: Vec<Conn>,
    next_conn: u64,
}

struct Pod {
    /// `None` once forgotten: the pod is then replayed as `keep`.
    netns: Option<OwnedFd>,
    info: Option<WorkloadInfo>,
}

struct Conn {
    id: u64,
    requests: mpsc::Sender<Request>,
    /// Dropping this closes the connection.
    _close: oneshot::Sender<()>,
    /// Resolves (with an error) once the connection's socket is closed.
    closed: oneshot::Receiver<()>,
}

struct Request {
    payload: Payload,
    fd: Option<OwnedFd>,
    reply: oneshot::Sender<anyhow::Result<Result<(), String>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl TestCni {
    /// Listens on a `SOCK_SEQPACKET` unix socket at `path` (replacing a
    /// stale socket file, as istio-cni does).
    pub async fn start(path: &Path) -> anyhow::Result<TestCni> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => {}
        }
        let listener = listen(path).with_context(|| format!("listening on {}", path.display()))?;
        let (connected, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            connected,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(TestCni {
            shared,
            path: path.to_path_buf(),
            accept,
        })
    }

    /// Adds a pod: records it as current and, if an agent is connected,
    /// sends `add { uid, workload_info }` with the netns at `netns_path`
    /// (e.g. `/var/run/netns/x`) in `SCM_RIGHTS` and returns the ack: the
    /// agent's error text, if any. Without an agent this is an error, but
    /// the pod is still sent with the next snapshot (as in istio-cni).
    pub async fn add_pod(
        &self,
        uid: &str,
        netns_path: &Path,
        info: Option<WorkloadInfo>,
    ) -> anyhow::Result<Result<(), String>> {
        let netns: OwnedFd = File::open(netns_path)
            .with_context(|| format!("opening {}", netns_path.display()))?
            .into();
        let sender = {
            let mut state = self.shared.lock();
            state.pods.insert(
                uid.to_owned(),
                Pod {
                    netns: Some(netns.try_clone()?),
                    info: info.clone(),
                },
            );
            state.conns.last().map(|c| c.requests.clone())
        };
        let Some(sender) = sender else {
            bail!("no agent connected; {uid} will be sent with the next snapshot");
        };
        let add = Payload::Add(pb::AddWorkload {
            uid: uid.to_owned(),
            workload_info: info.map(to_proto),
        });
        send_request(sender, add, Some(netns)).await
    }

    /// Deletes a pod: forgets it and sends `del { uid }` to every
    /// connected agent; returns the latest one's ack.
    pub async fn del_pod(&self, uid: &str) -> anyhow::Result<Result<(), String>> {
        let senders: Vec<_> = {
            let mut state = self.shared.lock();
            state.pods.remove(uid);
            state.conns.iter().map(|c| c.requests.clone()).collect()
        };
        let mut answer = Ok(Ok(()));
        // istio-cni sends deletes to whoever is connected, possibly nobody.
        for sender in senders {
            let del = Payload::Del(pb::DelWorkload {
                uid: uid.to_owned(),
            });
            answer = send_request(sender, del, None).await;
        }
        answer
    }

    /// Forgets pod `uid` without telling the agent, as for a pod deleted
    /// while no agent was connected: the next snapshot leaves it out.
    pub fn drop_pod(&self, uid: &str) -> bool {
        self.shared.lock().pods.remove(uid).is_some()
    }

    /// Drops the netns held for `uid` (as when istio-cni restarts and
    /// cannot find it again), so the next snapshot sends `keep` for it.
    /// False if the pod is unknown.
    pub fn forget_netns(&self, uid: &str) -> bool {
        match self.shared.lock().pods.get_mut(uid) {
            Some(pod) => {
                pod.netns = None;
                true
            }
            None => false,
        }
    }

    /// The uids of the pods the CNI considers current.
    pub fn pods(&self) -> Vec<String> {
        self.shared.lock().pods.keys().cloned().collect()
    }

    /// Whether an agent is connected and has said hello.
    pub fn connected(&self) -> bool {
        *self.shared.connected.borrow()
    }

    /// Waits until [`TestCni::connected`], at most `limit`.
    pub async fn wait_connected(&self, limit: Duration) -> anyhow::Result<()> {
        let mut rx = self.shared.connected.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .map_err(|_| anyhow!("no agent connected within {limit:?}"))?
            .map_err(|_| anyhow!("the CNI stopped"))?;
        Ok(())
    }

    /// How many agents are connected.
    pub fn connections(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Closes the latest agent's connection and waits until its socket is closed.
    /// When the agent reconnects, it is sent the current pods (`add`, or
    /// `keep` for forgotten netns), then `snapshot_sent`.
    pub async fn disconnect_agent(&self) {
        let conn = {
            let mut state = self.shared.lock();
            let conn = state.conns.pop();
            self.shared.connected.send_replace(!state.conns.is_empty());
            conn
        };
        if let Some(Conn { _close, closed, .. }) = conn {
            drop(_close);
            let _ = tokio::time::timeout(DEADLINE, closed).await;
        }
    }
}

impl Drop for TestCni {
    fn drop(&mut self) {
        self.accept.abort();
        // Dropping the connection's close handle ends its task.
        self.shared.lock().conns.clear();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn to_proto(info: WorkloadInfo) -> pb::WorkloadInfo {
    pb::WorkloadInfo {
        name: info.name,
        namespace: info.namespace,
        service_account: info.service_account,
    }
}

/// Queues `payload` on a connection and waits for the agent's ack.
async fn send_request(
    sender: mpsc::Sender<Request>,
    payload: Payload,
    fd: Option<OwnedFd>,
) -> anyhow::Result<Result<(), String>> {
    let (reply, answer) = oneshot::channel();
    sender
        .send(Request { payload, fd, reply })
        .await
        .map_err(|_| anyhow!("agent connection closed"))?;
    drop(sender);
    // Generous: the request may queue behind a snapshot.
    tokio::time::timeout(DEADLINE * 4, answer)
        .await
        .map_err(|_| anyhow!("no ack within {:?}", DEADLINE * 4))?
        .map_err(|_| anyhow!("agent connection closed before the ack"))?
}

fn listen(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: addr is a valid sockaddr_un of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 16) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // accept(2) is the same for every socket type, so tokio's listener
    // serves; we only ever move whole packets with sendmsg/recvmsg.
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                debug!("agent connection accepted");
                tokio::spawn(connection(stream, shared.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting agent connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One agent connection: hello, snapshot, then queued requests.
async fn connection(stream: UnixStream, shared: Arc<Shared>) {
    match tokio::time::timeout(DEADLINE, read_hello(&stream)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return warn!(error = %e, "bad hello from agent"),
        Err(_) => return warn!("no hello from agent within {DEADLINE:?}"),
    }
    let (requests, queue) = mpsc::channel(64);
    let (close_tx, close) = oneshot::channel();
    let (closed_tx, closed) = oneshot::channel::<()>();
    let (id, snapshot) = {
        let mut state = shared.lock();
        state.next_conn += 1;
        let id = state.next_conn;
        // The latest connection gets the adds; older ones stay.
        state.conns.push(Conn {
            id,
            requests,
            _close: close_tx,
            closed,
        });
        let snapshot: Vec<_> = state
            .pods
            .iter()
            .map(|(uid, pod)| {
                let fd = pod.netns.as_ref().and_then(|fd| fd.try_clone().ok());
                (uid.clone(), fd, pod.info.clone())
            })
            .collect();
        (id, snapshot)
    };
    shared.connected.send_replace(true);
    info!(id, pods = snapshot.len(), "agent said hello");

    tokio::select! {
        _ = close => debug!(id, "closing agent connection"),
        r = serve(&stream, snapshot, queue) => match r {
            Ok(()) => info!(id, "agent connection ended"),
            Err(e) => warn!(id, error = %e, "agent connection failed"),
        },
    }
    drop(stream);
    drop(closed_tx);
    let mut state = shared.lock();
    state.conns.retain(|c| c.id != id);
    shared.connected.send_replace(!state.conns.is_empty());
}

async fn read_hello(stream: &UnixStream) -> anyhow::Result<()> {
    let msg = recv(stream)
        .await?
        .ok_or_else(|| anyhow!("closed before hello"))?;
    let hello = pb::ZdsHello::decode(&msg[..])?;
    if hello.version != pb::Version::V1 as i32 {
        bail!("unsupported version {}", hello.version);
    }
    Ok(())
}

async fn serve(
    stream: &UnixStream,
    snapshot: Vec<(String, Option<OwnedFd>, Option<WorkloadInfo>)>,
    mut queue: mpsc::Receiver<Request>,
) -> anyhow::Result<()> {
    for (uid, fd, info) in snapshot {
        let payload = match fd {
            Some(_) => Payload::Add(pb::AddWorkload {
                uid: uid.clone(),
                workload_info: info.map(to_proto),
            }),
            None => Payload::Keep(pb::KeepWorkload { uid: uid.clone() }),
        };
        // Like istio-cni: a refused pod is logged, the snapshot goes on.
        if let Err(e) = exchange(stream, payload, fd).await? {
            warn!(uid, error = e, "agent refused snapshot pod");
        }
    }
    let done = Payload::SnapshotSent(pb::SnapshotSent {});
    if let Err(e) = exchange(stream, done, None).await? {
        warn!(error = e, "agent refused snapshot_sent");
    }
    loop {
        tokio::select! {
            request = queue.recv() => {
                let Some(Request { payload, fd, reply }) = request else {
                    return Ok(());
                };
                let answer = exchange(stream, payload, fd).await;
                let failed = answer.is_err();
                let _ = reply.send(answer);
                if failed {
                    bail!("exchange failed");
                }
            }
            // The agent speaks only when asked: anything else is EOF or a
            // protocol error (istio-cni's keepalive check).
            msg = recv(stream) => match msg? {
                None => return Ok(()),
                Some(_) => bail!("unprompted message from agent"),
            },
        }
    }
}

/// Sends one request and waits for its ack: `Err(text)` for an ack error.
async fn exchange(
    stream: &UnixStream,
    payload: Payload,
    fd: Option<OwnedFd>,
) -> anyhow::Result<Result<(), String>> {
    let msg = pb::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec();
    let raw = fd.as_ref().map(|f| f.as_raw_fd());
    stream
        .async_io(Interest::WRITABLE, || {
            send_with_fd(stream.as_raw_fd(), &msg, raw)
        })
        .await
        .context("sending request")?;
    let reply = tokio::time::timeout(DEADLINE, recv(stream))
        .await
        .map_err(|_| anyhow!("no ack within {DEADLINE:?}"))??
        .ok_or_else(|| anyhow!("agent closed the connection instead of acking"))?;
    match pb::WorkloadResponse::decode(&reply[..])?.payload {
        Some(pb::workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
        Some(pb::workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
        None => bail!("response without an ack"),
    }
}

/// Receives one packet; `None` at EOF.
async fn recv(stream: &UnixStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; READ_BUF];
    let (n, flags) = stream
        .async_io(Interest::READABLE, || {
            recv_packet(stream.as_raw_fd(), &mut buf)
        })
        .await?;
    if flags & libc::MSG_TRUNC != 0 {
        bail!("agent message longer than {READ_BUF} bytes");
    }
    if flags & libc::MSG_CTRUNC != 0 {
        bail!("agent sent control data");
    }
    if n == 0 {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(buf))
}

fn recv_packet(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, libc::c_int)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; no control buffer, so any fds the
    // agent might send are discarded by the kernel (and flagged CTRUNC).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: msg points at `buf`, which outlives the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, msg.msg_flags))
}

/// `sendmsg` of one packet, with `fd` in `SCM_RIGHTS` if given.
fn send_with_fd(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let len = size_of::<RawFd>() as libc::c_uint;
        // SAFETY: `control` (32 bytes) holds CMSG_SPACE(4) = 24 bytes; the
        // header and data written stay inside it.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = libc::CMSG_SPACE(len) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(len) as _;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
        }
    }
    // SAFETY: msg points at live buffers; MSG_NOSIGNAL turns a closed peer
    // into EPIPE instead of SIGPIPE.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
    }
    Ok(())
}
