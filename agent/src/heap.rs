//! What the agent asks of the process's allocator (glibc's, unless built
//! with the `jemalloc` or `mimalloc` feature): settings for a process that
//! runs for weeks, and giving back at once what large transient work freed.
//!
//! glibc returns freed memory to the OS only from the top of a heap, and
//! keeps it in the arena of whichever thread freed it. Work that allocates
//! a lot for a moment (parsing a mesh file, decoding an xDS response of
//! 100,000 resources) leaves that memory resident under the long-lived
//! state it allocated in between, unless it is handed back explicitly.

/// Settings for the process, before it allocates in earnest: keeps glibc
/// from handing the copy path's large buffers (HTTP/2 frames up to 1 MiB,
/// 256 KiB socket reads) back to the kernel after every use. With the
/// default, adaptive thresholds each one is mapped, page-faulted in and
/// unmapped again, a few percent of the agent's CPU under load. Free
/// memory above 4 MiB at the top of a heap is still returned.
pub fn tune() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
}

/// Hands memory freed by the work just done back to the OS. Costs a walk
/// of the allocator's free lists (milliseconds at 100,000 workloads), so it
/// is for after large, rare work, not per connection.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory of glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Connections that end together, fewer than this, leave too little freed
/// memory behind to be worth a trim (~4 KB each).
const BURST: usize = 1024;
/// How long after a burst's end the release waits, so the connections
/// still closing with it are freed first, and one trim covers them all.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives back the memory of a burst of connections once it has ended,
/// rather than when the allocator next happens to trim: glibc keeps what
/// freed connections held in its free lists (a closed burst of 10,000
/// tunnels left tens of MiB resident). Counts connections open, and when
/// the count has fallen by [`BURST`] or more to under half of its peak
/// since the last release, wakes [`BurstRelease::run`], which trims once
/// after [`SETTLE`]. Nothing wakes while connections come and go in
/// smaller numbers.
#[derive(Debug)]
pub struct BurstRelease {
    burst: usize,
    settle: std::time::Duration,
    open: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
    /// A release is due: later drops before it happens join it.
    due: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
    releases: std::sync::atomic::AtomicU64,
}

impl Default for BurstRelease {
    fn default() -> Self {
        BurstRelease::new(BURST, SETTLE)
    }
}

impl BurstRelease {
    /// Releases after `burst` connections or more ended, `settle` later.
    pub fn new(burst: usize, settle: std::time::Duration) -> BurstRelease {
        BurstRelease {
            burst,
            settle,
            open: Default::default(),
            peak: Default::default(),
            due: Default::default(),
            wake: Default::default(),
            releases: Default::default(),
        }
    }

    pub fn opened(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        let now = self.open.fetch_add(1, AcqRel) + 1;
        self.peak.fetch_max(now, AcqRel);
    }

    pub fn closed(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let now = self.open.fetch_sub(1, AcqRel).saturating_sub(1);
        let peak = self.peak.load(Acquire);
        if peak >= now + self.burst
            && now <= peak / 2
            && self
                .peak
                .compare_exchange(peak, now, AcqRel, Acquire)
                .is_ok()
            && !self.due.swap(true, AcqRel)
        {
            self.wake.notify_one();
        }
    }

    /// Trims after each burst until `stop` resolves.
    pub async fn run(self: std::sync::Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = &mut stop => return,
            }
            tokio::time::sleep(self.settle).await;
            self.due.store(false, std::sync::atomic::Ordering::Release);
            let _ = tokio::task::spawn_blocking(release_freed).await;
            self.releases
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    /// Trims done so far.
    pub fn releases(&self) -> u64 {
        self.releases.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    const N: usize = 100;
    const WAIT: Duration = Duration::from_millis(100);

    fn open_close(b: &BurstRelease, open: usize, close: usize) {
        (0..open).for_each(|_| b.opened());
        (0..close).for_each(|_| b.closed());
    }

    #[tokio::test]
    async fn a_burst_that_ends_is_released_once_and_small_churn_never() {
        let b = Arc::new(BurstRelease::new(N, Duration::from_millis(10)));
        let task = tokio::spawn(b.clone().run(std::future::pending()));
        // Churn below the threshold, however long: nothing.
        for _ in 0..10 {
            open_close(&b, N - 1, N - 1);
        }
        tokio::time::sleep(WAIT).await;
        assert_eq!(b.releases(), 0);
        // A burst of 3N, ending: one release.
        open_close(&b, 3 * N, 3 * N);
        tokio::time::sleep(WAIT).await;
        assert_eq!(b.releases(), 1);
        // A quarter of 4N ending is not the burst's end; the rest is.
        open_close(&b, 4 * N, N);
        tokio::time::sleep(WAIT).await;
        assert_eq!(b.releases(), 1);
        open_close(&b, 0, 3 * N);
        tokio::time::sleep(WAIT).await;
        assert_eq!(b.releases(), 2);
        task.abort();
    }
}
