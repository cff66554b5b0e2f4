//! The ZDS exchange against a fake istio-cni on a socket pair.

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
