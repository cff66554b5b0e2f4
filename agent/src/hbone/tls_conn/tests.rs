//! Records against rustls's own buffered connection, key updates, and
//! hostile record streams.

use std::io::{Read as _, Write as _};
use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Test fixture: a throwaway self-signed certificate, TLS 1.3 only.
fn configs(tickets: usize) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = crate::hbone::tls::provider();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.send_tls13_tickets = tickets;
    // Data written before the handshake ends leaves with the server's
    // Finished: the client's rustls decrypts it before the hand-over.
    server.send_half_rtt_data = true;
    server.enable_secret_extraction = true;
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (Arc::new(server), Arc::new(client))
}

fn name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

async fn client(cfg: Arc<ClientConfig>, tcp: TcpStream, ours: bool) -> Box<dyn Io> {
    if ours {
        Box::new(connect(cfg, name(), tcp).await.unwrap().conn)
    } else {
        let connector = tokio_rustls::TlsConnector::from(cfg);
        Box::new(connector.connect(name(), tcp).await.unwrap())
    }
}

async fn server(cfg: Arc<ServerConfig>, tcp: TcpStream, ours: bool) -> Box<dyn Io> {
    if ours {
        Box::new(accept(cfg, tcp).await.unwrap().conn)
    } else {
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        Box::new(acceptor.accept(tcp).await.unwrap())
    }
}

/// Interop with rustls's own record layer in both roles, and with
/// ourselves: bulk data both ways in uneven writes (records split and
/// coalesced), half-close by close_notify each way (a rustls peer
/// reports EOF without close_notify as an error, so a clean EOF proves
/// ours is valid).
#[tokio::test]
async fn bulk_both_ways_and_close_notify_interoperate() {
    for (ours_client, ours_server) in [(true, false), (false, true), (true, true)] {
        let (scfg, ccfg) = configs(0);
        let (c, s) = tcp_pair().await;
        let (mut c, mut s) =
            tokio::join!(client(ccfg, c, ours_client), server(scfg, s, ours_server));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = data.clone();
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut s);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let (mut r, mut w) = tokio::io::split(&mut c);
        let send = async {
            let mut sizes = [1usize, 100, 16_384, 16_385, 70_000, 5].iter().cycle();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = (*sizes.next().unwrap()).min(rest.len());
                w.write_all(&rest[..n]).await.unwrap();
                rest = &rest[n..];
            }
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let ((), got) = tokio::join!(send, recv);
        got.unwrap_or_else(|e| panic!("client {ours_client} server {ours_server}: {e}"));
        echo.await.unwrap();
        assert!(
            back == expect,
            "client {ours_client} server {ours_server}: bytes differ"
        );
    }
}

/// A rustls server that sends application data in the same flight as
/// its Finished (so rustls decrypts it before the hand-over) and then
/// session tickets: nothing is lost, tickets are skipped, and the
/// server's close_notify ends the stream.
#[tokio::test]
async fn data_decrypted_during_the_handshake_and_tickets_survive_the_hand_over() {
    let (scfg, ccfg) = configs(2);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let srv = std::thread::spawn(move || {
        let (tcp, _) = l.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(scfg).unwrap();
        // Buffered now, sent right after the server's Finished.
        conn.writer().write_all(b"early").unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        s.conn.send_close_notify();
        s.flush().unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = client(ccfg, tcp, true).await;
    let mut buf = [0u8; 5];
    let early = tokio::time::timeout(std::time::Duration::from_secs(10), c.read_exact(&mut buf));
    early
        .await
        .expect("data sent with Finished was lost")
        .unwrap();
    assert_eq!(&buf, b"early");
    c.write_all(b"howdy").await.unwrap();
    c.flush().await.unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"howdy");
    srv.join().unwrap();
}

/// Key updates interoperate with rustls: its KeyUpdate asking for ours
/// moves our receive key and gets an answer; ours (every 3 records
/// here) move its receive key. Then both of ours over many rotations.
#[tokio::test]
async fn key_updates_both_ways() {
    let (scfg, ccfg) = configs(0);
    let (c, s) = tcp_pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(scfg);
    let (c, s) = tokio::join!(connect(ccfg, name(), c), acceptor.accept(s));
    let (mut c, mut s) = (c.unwrap().conn, s.unwrap());
    c.tx_key_lifetime = 3;
    let mut buf = [0u8; 3];
    for round in 0..5u8 {
        // rustls: data, then KeyUpdate (update_requested), then data.
        s.write_all(&[round]).await.unwrap();
        s.get_mut().1.refresh_traffic_keys().unwrap();
        s.write_all(&[round, round]).await.unwrap();
        s.flush().await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [round; 3]);
        // Ours: each write is a record, so the key changes as we go.
        for i in 0..4u8 {
            c.write_all(&[round, i, 7]).await.unwrap();
            c.flush().await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round, i, 7]);
        }
    }
    assert!(c.tx.seq < 3, "our key never rotated");

    let (mut c, mut s) = conn_pair().await;
    c.tx_key_lifetime = 2;
    s.tx_key_lifetime = 5;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (mut got_s, mut got_c) = (vec![0u8; data.len()], vec![0u8; data.len()]);
    let a = async {
        c.write_all(&data).await.unwrap();
        c.flush().await.unwrap();
        c.read_exact(&mut got_c).await.unwrap();
    };
    let b = async {
        s.read_exact(&mut got_s).await.unwrap();
        s.write_all(&got_s).await.unwrap();
        s.flush().await.unwrap();
    };
    tokio::join!(a, b);
    assert!(got_c == data, "bytes differ across key updates");
}

/// What a peer that is not a TLS client gets from `accept`: an error,
/// promptly, with bounded buffering.
#[tokio::test]
async fn bad_handshakes_fail() {
    let mut huge = vec![HANDSHAKE, 3, 1, 0xff, 0xff];
    huge.resize(600 * 1024, 0);
    let cases: [(&str, Vec<u8>); 3] = [
        ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("an endless record", huge),
        ("EOF mid-record", vec![HANDSHAKE, 3, 1, 0, 200, 1]),
    ];
    for (what, bytes) in cases {
        let (scfg, _) = configs(0);
        let (mut c, s) = tcp_pair().await;
        let writer = tokio::spawn(async move {
            let _ = c.write_all(&bytes).await;
            let _ = c.shutdown().await;
            // Held open until the server gives up.
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink).await;
        });
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), accept(scfg, s)).await;
        assert!(matches!(r, Ok(Err(_))), "{what}: not refused");
        writer.abort();
    }
}

async fn conn_pair() -> (TlsConn, TlsConn) {
    let (scfg, ccfg) = configs(0);
    let (c, s) = tcp_pair().await;
    let (c, s) = tokio::join!(connect(ccfg, name(), c), accept(scfg, s));
    (c.unwrap().conn, s.unwrap().conn)
}

/// Sealed by `from`, to be handed to the peer as if received.
fn sealed(from: &mut TlsConn, data: &[u8]) -> BytesMut {
    sealed_as(from, data, APPLICATION_DATA)
}

fn sealed_as(from: &mut TlsConn, data: &[u8], kind: u8) -> BytesMut {
    from.seal(&[data], 0, kind).unwrap();
    let out = BytesMut::from(from.outbuf.pending());
    from.outbuf.consume(out.len());
    out
}

/// What each kind of record does to the reader: tickets and empty
/// records are skipped, close_notify is EOF, other alerts and
/// handshake messages (a key update among them) are errors.
#[tokio::test]
async fn record_contents_after_the_handshake() {
    let eof = Ok(Vec::new());
    let after = Ok(b"after".to_vec());
    type Case = (
        &'static str,
        u8,
        &'static [u8],
        Result<Vec<u8>, io::ErrorKind>,
    );
    let cases: [Case; 7] = [
        (
            "session tickets",
            HANDSHAKE,
            &[4, 0, 0, 2, 9, 9, 4, 0, 0, 0],
            after.clone(),
        ),
        ("empty data", APPLICATION_DATA, &[], after.clone()),
        ("close_notify", ALERT, &[1, 0], eof),
        (
            "fatal alert",
            ALERT,
            &[2, 40],
            Err(io::ErrorKind::ConnectionAborted),
        ),
        (
            "malformed key update",
            HANDSHAKE,
            &[24, 0, 0, 1, 7],
            Err(io::ErrorKind::InvalidData),
        ),
        (
            "split message",
            HANDSHAKE,
            &[4, 0, 0, 9, 1],
            Err(io::ErrorKind::InvalidData),
        ),
        (
            "change cipher spec",
            20,
            &[1],
            Err(io::ErrorKind::InvalidData),
        ),
    ];
    for (what, kind, content, want) in cases {
        let (mut c, mut s) = conn_pair().await;
        s.inbuf.unsplit(sealed_as(&mut c, content, kind));
        s.inbuf.unsplit(sealed(&mut c, b"after"));
        let got = match read_now(&mut s) {
            Poll::Ready(r) => r.map_err(|e| e.kind()),
            Poll::Pending => panic!("{what}: pending"),
        };
        assert_eq!(got, want, "{what}");
    }
}

/// Records cut from several buffers (HTTP/2 hands over a frame head and
/// its payload) come out whole and in order, whether a record lies in
/// one buffer (sealed from where it lies) or spans several (gathered).
#[tokio::test]
async fn records_sealed_from_several_buffers() {
    let layouts: [&[usize]; 6] = [
        &[9, 40_000],
        &[3, 3, 3],
        &[MAX_PLAIN],
        &[1, MAX_PLAIN - 1, 1],
        &[0, 5, 0, 20_000, 0],
        &[MAX_PLAIN + 7, MAX_PLAIN - 7, 100],
    ];
    for layout in layouts {
        let (mut c, mut s) = conn_pair().await;
        // Period 251: no record or buffer boundary repeats the bytes.
        let mut i = 0usize;
        let bufs: Vec<Vec<u8>> = layout
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        i += 1;
                        (i % 251) as u8
                    })
                    .collect()
            })
            .collect();
        let want = bufs.concat();
        let mut done = 0;
        while done < want.len() {
            done += c.seal(&bufs, done, APPLICATION_DATA).unwrap();
        }
        s.inbuf.unsplit(BytesMut::from(c.outbuf.pending()));
        let mut got = Vec::new();
        while got.len() < want.len() {
            match read_now(&mut s) {
                Poll::Ready(Ok(b)) if !b.is_empty() => got.extend(b),
                other => panic!("{layout:?}: {other:?} after {} bytes", got.len()),
            }
        }
        assert!(got == want, "{layout:?}");
    }
}

#[test]
fn contiguous_finds_spans_inside_one_buffer() {
    let bufs: [&[u8]; 3] = [b"abc", b"", b"defg"];
    let cases: [(usize, usize, Option<&[u8]>); 7] = [
        (0, 3, Some(b"abc")),
        (1, 2, Some(b"bc")),
        (2, 2, None),
        (3, 4, Some(b"defg")),
        (4, 2, Some(b"ef")),
        (5, 3, None),
        (7, 0, Some(b"")),
    ];
    for (skip, len, want) in cases {
        assert_eq!(contiguous(&bufs, skip, len), want, "{skip}+{len}");
    }
}

/// The outgoing buffer keeps unsent bytes in order while records are
/// added and the socket takes some, and moves them only when cheap.
#[test]
fn out_buf_keeps_order_across_partial_sends() {
    let mut out = OutBuf::default();
    let mut sent = Vec::new();
    let mut want = Vec::new();
    for i in 0..200u32 {
        let n = 1 + (i as usize * 997) % MAX_RECORD;
        let fill = (i % 251) as u8;
        out.tail(n).fill(fill);
        out.commit(n);
        want.extend(std::iter::repeat_n(fill, n));
        // The socket takes about two thirds of what is pending.
        let take = out.len() * 2 / 3;
        sent.extend_from_slice(&out.pending()[..take]);
        out.consume(take);
        assert!(out.store.len() <= 2 * (MAX_PENDING_OUT + MAX_RECORD) + MAX_RECORD);
    }
    sent.extend_from_slice(out.pending());
    out.consume(out.len());
    assert!(sent == want);
    assert!(out.is_empty());
}

fn read_now(conn: &mut TlsConn) -> Poll<io::Result<Vec<u8>>> {
    let mut buf = [0u8; 64];
    let mut rb = ReadBuf::new(&mut buf);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    Pin::new(conn)
        .poll_read(&mut cx, &mut rb)
        .map_ok(|()| rb.filled().to_vec())
}

/// Tampered, replayed, reordered and malformed records are refused.
#[tokio::test]
async fn bad_records_are_refused() {
    type Mangle = fn(&mut BytesMut, &mut TlsConn);
    let cases: [(&str, Mangle); 5] = [
        ("flipped ciphertext bit", |r, _| r[HEADER + 1] ^= 1),
        ("flipped header byte", |r, _| r[2] ^= 1),
        ("wrong outer type", |r, _| r[0] = HANDSHAKE),
        ("oversized length", |r, _| {
            r[3] = 0x50;
        }),
        // The receiver expects sequence 0; this record is number 1.
        ("skipped sequence number", |r, c| *r = sealed(c, b"second")),
    ];
    for (what, mangle) in cases {
        let (mut c, mut s) = conn_pair().await;
        let mut rec = sealed(&mut c, b"hello");
        mangle(&mut rec, &mut c);
        s.inbuf.unsplit(rec);
        match read_now(&mut s) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // A replayed record fails too: its nonce has been used.
    let (mut c, mut s) = conn_pair().await;
    let rec = sealed(&mut c, b"hello");
    s.inbuf.unsplit(rec.clone());
    assert_eq!(
        read_now(&mut s).map(|r| r.unwrap()),
        Poll::Ready(b"hello".to_vec())
    );
    s.inbuf.unsplit(rec);
    assert!(
        matches!(read_now(&mut s), Poll::Ready(Err(_))),
        "replay accepted"
    );
}

/// An idle connection gives its small read buffer back.
#[tokio::test]
async fn idle_connection_holds_no_read_buffer() {
    let (mut c, mut s) = conn_pair().await;
    c.write_all(b"ping").await.unwrap();
    c.flush().await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert!(read_now(&mut s).is_pending());
    assert_eq!(s.inbuf.capacity(), 0);
    assert_eq!(c.outbuf.store.capacity(), 0);
}
