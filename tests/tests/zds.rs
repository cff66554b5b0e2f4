//! ZDS between the agent's client and a test istio-cni over a real
//! `SOCK_SEQPACKET` socket, with real network-namespace fds. Tests that
//! create namespaces need root (they fail, never skip, without it); the
//! others use the test process's own namespace (`/proc/self/ns/net`).

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ambient_agent::capture::netns::Netns;
use ambient_agent::capture::zds::{WorkloadInfo, ZdsClient, ZdsEvent};
use ambient_tests::control_plane::zds::TestCni;
use ambient_tests::netns::{ip, require_root};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(5);
const OWN_NETNS: &str = "/proc/self/ns/net";

/// A network namespace from `ip netns add`, deleted on drop (even on panic).
struct TestNetns {
    name: String,
    path: PathBuf,
}

impl TestNetns {
    fn new() -> TestNetns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // The `amb<pid>-` prefix lets the topology's sweep remove leftovers
        // of a test process that died hard.
        let name = format!(
            "amb{}-zds{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]).expect("ip netns add");
        let path = PathBuf::from(format!("/var/run/netns/{name}"));
        let ns = TestNetns { name, path };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("removing netns {}: {e}", self.name);
        }
    }
}

/// (device, inode) of a file, which identifies a namespace.
fn stat_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).expect("stat");
    (m.dev(), m.ino())
}

fn fstat_id(fd: &OwnedFd) -> (u64, u64) {
    // SAFETY: stat is plain data; fstat fills it for a valid fd.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0, "fstat");
    (st.st_dev, st.st_ino)
}

fn info(name: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: "default".into(),
        service_account: format!("{name}-sa"),
    }
}

type Reply = oneshot::Sender<Result<(), String>>;

/// The agent side: a running [`ZdsClient`] whose handler passes each event
/// to the test and acks with the test's answer.
struct Agent {
    events: mpsc::UnboundedReceiver<(ZdsEvent, Reply)>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Agent {
    fn spawn(client: ZdsClient) -> Agent {
        ambient_tests::init_tracing();
        let (tx, events) = mpsc::unbounded_channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let handler = move |event| {
            let tx = tx.clone();
            async move {
                let (reply, answer) = oneshot::channel();
                tx.send((event, reply))
                    .map_err(|_| "test is gone".to_owned())?;
                answer
                    .await
                    .map_err(|_| "test dropped the reply".to_owned())?
            }
        };
        let task = tokio::spawn(client.run(handler, async {
            let _ = stopped.await;
        }));
        Agent {
            events,
            stop: Some(stop),
            task,
        }
    }

    async fn next(&mut self) -> (ZdsEvent, Reply) {
        timeout(LIMIT, self.events.recv())
            .await
            .expect("no ZDS event in time")
            .expect("ZDS client stopped")
    }

    /// The next event, answered with `answer`.
    async fn answer_next(&mut self, answer: Result<(), String>) -> ZdsEvent {
        let (event, reply) = self.next().await;
        let _ = reply.send(answer);
        event
    }

    /// Events up to and including `SnapshotSent`, all answered `Ok`.
    async fn snapshot(&mut self) -> Vec<ZdsEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.answer_next(Ok(())).await;
            let done = matches!(event, ZdsEvent::SnapshotSent { .. });
            events.push(event);
            if done {
                return events;
            }
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(LIMIT, &mut self.task)
            .await
            .expect("ZDS client did not stop")
            .expect("ZDS client panicked");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A CNI at a fresh path and an agent connected to it, past the (empty)
/// initial snapshot.
async fn connected() -> (tempfile::TempDir, TestCni, Agent) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    let cni = TestCni::start(&path).await.expect("cni");
    let mut agent = Agent::spawn(ZdsClient::new(path));
    cni.wait_connected(LIMIT).await.expect("agent connects");
    match agent.answer_next(Ok(())).await {
        ZdsEvent::SnapshotSent { current } => assert!(current.is_empty(), "{current:?}"),
        other => panic!("expected the empty snapshot, got {other:?}"),
    }
    (dir, cni, agent)
}

#[tokio::test]
async fn hello_then_empty_snapshot() {
    let (_dir, cni, agent) = connected().await;
    assert!(cni.connected());
    agent.stop().await;
}

#[tokio::test]
async fn add_delivers_the_netns_fd_and_the_ack() {
    require_root();
    let ns = TestNetns::new();
    let (_dir, cni, mut agent) = connected().await;

    let (ack, event) = tokio::join!(
        cni.add_pod("pod-a", ns.path(), Some(info("web"))),
        agent.answer_next(Ok(()))
    );
    assert_eq!(ack.expect("add_pod"), Ok(()));
    let ZdsEvent::Add {
        uid,
        netns,
        info: got,
    } = event
    else {
        panic!("expected add, got {event:?}");
    };
    assert_eq!(uid, "pod-a");
    assert_eq!(got, Some(info("web")));
    assert_eq!(fstat_id(&netns), stat_id(ns.path()), "same namespace");
    assert_ne!(fstat_id(&netns), stat_id(Path::new(OWN_NETNS)));

    // Without workload info.
    let (ack, event) = tokio::join!(
        cni.add_pod("pod-b", ns.path(), None),
        agent.answer_next(Ok(()))
    );
    assert_eq!(ack.expect("add_pod"), Ok(()));
    assert!(
        matches!(&event, ZdsEvent::Add { uid, info: None, .. } if uid == "pod-b"),
        "{event:?}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn handler_errors_become_ack_errors() {
    let (_dir, cni, mut agent) = connected().await;
    let path = Path::new(OWN_NETNS);

    let (ack, _) = tokio::join!(
        cni.add_pod("pod-a", path, Some(info("web"))),
        agent.answer_next(Err("no capture for you".into()))
    );
    assert_eq!(ack.expect("add_pod"), Err("no capture for you".into()));

    // A long reason is cut to fit istio-cni's 1 KiB read, not dropped.
    let long = "x".repeat(5000);
    let (ack, _) = tokio::join!(
        cni.add_pod("pod-b", path, None),
        agent.answer_next(Err(long))
    );
    let reason = ack.expect("add_pod").expect_err("ack error");
    assert!(
        reason.len() > 500 && reason.len() < 1000,
        "{}",
        reason.len()
    );

    // The connection survives both.
    let (ack, _) = tokio::join!(cni.del_pod("pod-a"), agent.answer_next(Ok(())));
    assert_eq!(ack.expect("del_pod"), Ok(()));
    agent.stop().await;
}

#[tokio::test]
async fn del_delivers_del() {
    let (_dir, cni, mut agent) = connected().await;
    let (ack, _) = tokio::join!(
        cni.add_pod("pod-a", Path::new(OWN_NETNS), None),
        agent.answer_next(Ok(()))
    );
    assert_eq!(ack.expect("add_pod"), Ok(()));

    let (ack, event) = tokio::join!(cni.del_pod("pod-a"), agent.answer_next(Ok(())));
    assert_eq!(ack.expect("del_pod"), Ok(()));
    assert!(
        matches!(&event, ZdsEvent::Del { uid } if uid == "pod-a"),
        "{event:?}"
    );
    assert!(cni.pods().is_empty());
    agent.stop().await;
}

#[tokio::test]
async fn reconnect_replays_current_pods() {
    require_root();
    let (ns_a, ns_b, ns_c) = (TestNetns::new(), TestNetns::new(), TestNetns::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    let cni = TestCni::start(&path).await.expect("cni");
    // A slow first retry leaves room to change pods while disconnected.
    let client = ZdsClient::new(path).with_backoff(Duration::from_millis(300), LIMIT);
    let mut agent = Agent::spawn(client);
    cni.wait_connected(LIMIT).await.expect("agent connects");
    agent.snapshot().await;

    for (uid, path) in [
        ("pod-a", ns_a.path()),
        ("pod-b", ns_b.path()),
        ("pod-k", Path::new(OWN_NETNS)),
    ] {
        let (ack, _) = tokio::join!(
            cni.add_pod(uid, path, Some(info(uid))),
            agent.answer_next(Ok(()))
        );
        assert_eq!(ack.expect("add_pod"), Ok(()));
    }
    // The CNI loses pod-k's netns: it will be replayed as `keep`.
    assert!(cni.forget_netns("pod-k"));

    cni.disconnect_agent().await;
    assert!(!cni.connected());
    // While disconnected: pod-b goes away, pod-c arrives.
    assert_eq!(cni.del_pod("pod-b").await.expect("del_pod"), Ok(()));
    let err = cni
        .add_pod("pod-c", ns_c.path(), Some(info("pod-c")))
        .await
        .expect_err("no agent to ack");
    assert!(err.to_string().contains("no agent connected"), "{err}");

    cni.wait_connected(LIMIT).await.expect("agent reconnects");
    let replay = agent.snapshot().await;
    let mut adds = Vec::new();
    let mut keeps = Vec::new();
    let mut current = HashSet::new();
    for event in replay {
        match event {
            ZdsEvent::Add { uid, netns, info } => {
                assert_eq!(info.as_ref().map(|i| i.name.as_str()), Some(uid.as_str()));
                adds.push((uid, fstat_id(&netns)));
            }
            ZdsEvent::Keep { uid } => keeps.push(uid),
            ZdsEvent::SnapshotSent { current: c } => current = c,
            ZdsEvent::Del { uid } => panic!("unexpected del {uid}"),
        }
    }
    adds.sort();
    assert_eq!(
        adds,
        vec![
            ("pod-a".to_owned(), stat_id(ns_a.path())),
            ("pod-c".to_owned(), stat_id(ns_c.path())),
        ]
    );
    assert_eq!(keeps, vec!["pod-k".to_owned()]);
    let want: HashSet<String> = ["pod-a", "pod-c", "pod-k"].map(String::from).into();
    assert_eq!(current, want);

    // Live requests flow again on the new connection.
    let (ack, event) = tokio::join!(cni.del_pod("pod-a"), agent.answer_next(Ok(())));
    assert_eq!(ack.expect("del_pod"), Ok(()));
    assert!(matches!(&event, ZdsEvent::Del { uid } if uid == "pod-a"));
    agent.stop().await;
}

#[tokio::test]
async fn keeps_retrying_until_the_cni_listens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ztunnel.sock");
    let mut agent = Agent::spawn(ZdsClient::new(path.clone()));
    // Several attempts fail on the missing socket first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cni = TestCni::start(&path).await.expect("cni");
    cni.wait_connected(LIMIT).await.expect("agent connects");
    let events = agent.snapshot().await;
    assert_eq!(events.len(), 1, "{events:?}");
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_closes_the_connection() {
    let (_dir, cni, agent) = connected().await;
    agent.stop().await;
    timeout(LIMIT, async {
        while cni.connected() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the CNI sees the agent leave");
}

#[tokio::test]
async fn received_netns_fd_is_usable() {
    require_root();
    let ns = TestNetns::new();
    let (_dir, cni, mut agent) = connected().await;
    let (ack, event) = tokio::join!(
        cni.add_pod("pod-a", ns.path(), None),
        agent.answer_next(Ok(()))
    );
    assert_eq!(ack.expect("add_pod"), Ok(()));
    let ZdsEvent::Add { netns, .. } = event else {
        panic!("expected add, got {event:?}");
    };
    let pod = Netns::from_fd(ns.path().to_path_buf(), netns).expect("enter netns");

    // Its thread really is in the pod's namespace.
    let inside = pod
        .run_blocking(|| std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())))
        .expect("stat inside");
    assert_eq!(inside, stat_id(ns.path()));

    // The same loopback port is free in the pod although taken here.
    let host = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("host listener");
    let addr: SocketAddr = host.local_addr().expect("addr");
    let in_pod = pod
        .run_blocking(move || TcpListener::bind(addr))
        .expect("bind in pod");
    in_pod.set_nonblocking(true).expect("nonblocking");
    host.set_nonblocking(true).expect("nonblocking");

    // From here, the address reaches the host listener, not the pod's.
    let _c1 = TcpStream::connect_timeout(&addr, LIMIT).expect("connect here");
    wait_accept(&host).expect("host listener accepts");
    assert_eq!(
        in_pod.accept().map(|_| ()).map_err(|e| e.kind()),
        Err(io::ErrorKind::WouldBlock),
        "the pod's listener must not be reachable from outside"
    );
    // From inside the pod, it reaches the pod's.
    let _c2 = pod
        .run_blocking(move || TcpStream::connect_timeout(&addr, LIMIT))
        .expect("connect in pod");
    wait_accept(&in_pod).expect("pod listener accepts");
    agent.stop().await;
}

/// Accepts on a nonblocking listener, waiting up to [`LIMIT`].
fn wait_accept(listener: &TcpListener) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        match listener.accept() {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}
