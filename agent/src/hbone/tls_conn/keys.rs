//! Traffic keys: each direction's key and sequence number, what a key
//! update needs, and the post-handshake messages that carry one.

use super::*;

/// What rustls keeps after the hand-over: the key schedule, to derive the
/// next keys on a key update (client and server connections alike).
pub(super) trait KeySchedule: Send + Sync {
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error>;
}

impl<D: Send + Sync> KeySchedule for rustls::kernel::KernelConnection<D> {
    fn next_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_rx_secret()
    }

    fn next_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        self.update_tx_secret()
    }
}

pub(super) fn record_len(header: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([header[3], header[4]]))
}

/// A traffic key aws-lc-rs cannot take (not an AEAD TLS 1.3 uses).
#[derive(Debug, thiserror::Error)]
#[error("unsupported TLS traffic key")]
pub(super) struct KeyError;

/// One direction's key, IV and sequence number.
pub(super) struct Direction {
    pub(super) key: LessSafeKey,
    pub(super) iv: [u8; aead::NONCE_LEN],
    pub(super) seq: u64,
}

impl Direction {
    pub(super) fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Self, KeyError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(KeyError),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| KeyError)?;
        let iv = iv.as_ref().try_into().map_err(|_| KeyError)?;
        Ok(Direction {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446, 5.3): the IV xor the sequence
    /// number; each nonce is used once, as the sequence only grows.
    pub(super) fn next_nonce(&mut self) -> io::Result<Nonce> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS sequence number exhausted"))?;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// What a record of post-handshake messages asks of us.
#[derive(Debug, Default, PartialEq)]
pub(super) struct PostHandshake {
    pub(super) key_update: bool,
    pub(super) update_requested: bool,
}

/// Reads a record of post-handshake messages: session tickets are dropped
/// unread (resumption is off); a KeyUpdate must end its record (the next
/// one is under the new key); anything else ends the connection, as does
/// a message split across records.
pub(super) fn post_handshake(mut msgs: &[u8]) -> io::Result<PostHandshake> {
    let mut out = PostHandshake::default();
    while !msgs.is_empty() {
        let [kind, a, b, c, ..] = *msgs else {
            return Err(invalid("truncated TLS handshake message"));
        };
        let len = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if msgs.len() < len {
            return Err(invalid("TLS handshake message split across records"));
        }
        match (kind, &msgs[4..len]) {
            (NEW_SESSION_TICKET, _) => {}
            (KEY_UPDATE, &[request @ (0 | 1)]) if len == msgs.len() => {
                out.key_update = true;
                out.update_requested = request == 1;
            }
            (KEY_UPDATE, _) => return Err(invalid("malformed TLS key update")),
            _ => return Err(invalid("unexpected TLS handshake message")),
        }
        msgs = &msgs[len..];
    }
    Ok(out)
}
