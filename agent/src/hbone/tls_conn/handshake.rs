//! The handshake, run by rustls's unbuffered API over our own buffers.

use super::*;

/// The two unbuffered connection types, as the handshake needs them.
pub(super) trait Unbuffered: Send {
    type Keys: KeySchedule + 'static;
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Self::Keys), rustls::Error>;
    fn common(&self) -> &rustls::CommonState;
}

/// The same four lines for each side: rustls's two types share the
/// methods but no trait.
macro_rules! unbuffered {
    ($conn:ty, $data:ty) => {
        impl Unbuffered for $conn {
            type Keys = rustls::kernel::KernelConnection<$data>;
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Self::Keys), rustls::Error> {
                self.dangerous_into_kernel_connection()
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData);
unbuffered!(UnbufferedServerConnection, ServerConnectionData);

/// Drives rustls through the handshake: we read and write, rustls encodes
/// and decides. Application data the peer sent along with its last flight
/// is kept, and so are bytes of records rustls has not seen.
pub(super) async fn handshake<C: Unbuffered>(
    mut conn: C,
    mut io: TcpStream,
) -> io::Result<Established> {
    // Taken at the first read, not before: a peer that connects and says
    // nothing costs no buffer.
    let mut incoming = Vec::new();
    let mut used = 0;
    let mut outgoing = Vec::new();
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut incoming[..used]);
        let mut read_more = false;
        let mut writable = false;
        match state.map_err(tls_error)? {
            ConnectionState::EncodeTlsData(mut enc) => loop {
                let start = outgoing.len();
                outgoing.resize(outgoing.capacity().max(start + 4096), 0);
                match enc.encode(&mut outgoing[start..]) {
                    Ok(n) => {
                        outgoing.truncate(start + n);
                        break;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        outgoing.truncate(start);
                        outgoing.reserve(e.required_size);
                    }
                    Err(e) => return Err(io::Error::other(format!("TLS handshake encode: {e}"))),
                }
            },
            ConnectionState::TransmitTlsData(tx) => {
                io.write_all(&outgoing).await?;
                outgoing.clear();
                tx.done();
            }
            ConnectionState::BlockedHandshake => read_more = true,
            ConnectionState::ReadTraffic(mut rd) => {
                while let Some(rec) = rd.next_record() {
                    plaintext.extend_from_slice(rec.map_err(tls_error)?.payload);
                }
            }
            // A server may be let write before the client's Finished
            // (half-RTT data); the handshake is over only when rustls says.
            ConnectionState::WriteTraffic(_) => writable = true,
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err(io::ErrorKind::UnexpectedEof.into())
            }
            _ => return Err(io::Error::other("unexpected TLS handshake state")),
        }
        incoming.copy_within(discard..used, 0);
        used -= discard;
        if writable {
            if !conn.common().is_handshaking() {
                break;
            }
            read_more = true;
        }
        if read_more {
            if used == incoming.len() {
                // rustls refuses oversized messages itself; this bounds what
                // a peer can make us buffer before it gets that far.
                if used >= MAX_HANDSHAKE_BUF {
                    return Err(invalid("TLS handshake too large"));
                }
                if incoming.is_empty() {
                    io.readable().await?;
                }
                incoming.resize((used * 2).max(FIRST_HANDSHAKE_READ), 0);
            }
            let n = io.read(&mut incoming[used..]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS handshake eof",
                ));
            }
            used += n;
        }
    }
    let alpn = conn.common().alpn_protocol().map(<[u8]>::to_vec);
    let peer_certificates = conn
        .common()
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let (secrets, keys) = conn.into_kernel().map_err(tls_error)?;
    let conn = TlsConn::new(io, plaintext, &incoming[..used], secrets, Box::new(keys))?;
    Ok(Established {
        conn,
        alpn,
        peer_certificates,
    })
}

pub(super) fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}
