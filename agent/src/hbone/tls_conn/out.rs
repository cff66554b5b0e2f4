//! Sealed records waiting for the socket, and reading a record that
//! may span several received buffers.

use super::*;

/// The `len` bytes from `skip` on, if they lie in one of `bufs`.
pub(super) fn contiguous<B: Deref<Target = [u8]>>(
    bufs: &[B],
    mut skip: usize,
    len: usize,
) -> Option<&[u8]> {
    for b in bufs {
        if skip < b.len() {
            return b.get(skip..skip + len);
        }
        skip -= b.len();
    }
    (len == 0).then_some(&[][..])
}

/// Copies the bytes from `skip` on, across `bufs`, until `out` is full.
pub(super) fn gather<B: Deref<Target = [u8]>>(bufs: &[B], mut skip: usize, mut out: &mut [u8]) {
    for b in bufs {
        if out.is_empty() {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(out.len());
        let (now, later) = out.split_at_mut(n);
        now.copy_from_slice(&b[skip..skip + n]);
        out = later;
        skip = 0;
    }
}

/// Sealed records waiting for the socket. The storage stays initialised
/// (zeroed when it grows), so the cipher can write records straight into
/// it; like `BytesMut`, the unsent part moves to the front only when that
/// copies no more than it frees.
#[derive(Default)]
pub(super) struct OutBuf {
    pub(super) store: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl OutBuf {
    pub(super) fn pending(&self) -> &[u8] {
        &self.store[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for `n` more bytes after the pending ones; `commit` keeps what
    /// was written.
    pub(super) fn tail(&mut self, n: usize) -> &mut [u8] {
        if self.end + n > self.store.len() {
            if self.start >= self.len() && self.len() + n <= self.store.len() {
                self.store.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.store.len() * 2).min(2 * (MAX_PENDING_OUT + MAX_RECORD));
                self.store.resize(grown.max(self.end + n), 0);
            }
        }
        &mut self.store[self.end..self.end + n]
    }

    pub(super) fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.store.len());
    }

    /// Once drained, a small buffer is cheap to take again and goes; a
    /// grown one belongs to a busy connection and stays.
    pub(super) fn release_if_small(&mut self) {
        if self.is_empty() && self.store.len() <= MAX_RECORD {
            self.store = Vec::new();
        }
    }
}

pub(super) fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
