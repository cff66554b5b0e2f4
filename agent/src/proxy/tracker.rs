//! Open inbound connections, kept so that a policy change can close those
//! it now denies (Istio re-authorizes established connections too).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::warn;

use crate::identity::Identity;
use crate::state::{authz, Snapshot, Workload};

/// One open connection as authorization saw it.
struct Tracked {
    workload: Arc<Workload>,
    src_ip: IpAddr,
    src_identity: Option<Identity>,
    dst: SocketAddr,
    close: Arc<Notify>,
}

/// The open inbound connections of an agent.
#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
}

/// Registration of one connection; dropping it forgets the connection.
pub struct Registration {
    tracker: Arc<Tracker>,
    id: u64,
    close: Arc<Notify>,
}

impl Registration {
    /// Resolves when policy no longer allows the connection.
    pub async fn revoked(&self) {
        self.close.notified().await
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = lock(&self.tracker.open);
        open.remove(&self.id);
        // A table grown by a burst gives its memory back as the burst ends
        // (at a quarter full, halved: amortized O(1) per removal).
        if open.capacity() > 1024 && open.len() < open.capacity() / 4 {
            let keep = open.len() * 2;
            open.shrink_to(keep);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// Remembers an authorized connection to `workload`.
    pub fn register(
        self: &Arc<Self>,
        workload: Arc<Workload>,
        conn: &authz::Connection<'_>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        lock(&self.open).insert(
            id,
            Tracked {
                workload,
                src_ip: conn.src_ip,
                src_identity: conn.src_identity.cloned(),
                dst: conn.dst,
                close: close.clone(),
            },
        );
        Registration {
            tracker: self.clone(),
            id,
            close,
        }
    }

    /// Re-authorizes every open connection under `snap`'s policies and
    /// closes those now denied. Returns how many were closed.
    pub fn recheck(&self, snap: &Snapshot) -> usize {
        let open = lock(&self.open);
        let mut closed = 0;
        for t in open.values() {
            let conn = authz::Connection {
                src_ip: t.src_ip,
                src_identity: t.src_identity.as_ref(),
                dst: t.dst,
                request: None,
            };
            // The workload as it is now, if it still exists.
            let workload = snap.workload_by_uid(&t.workload.uid).unwrap_or(&t.workload);
            if let (authz::Decision::Deny(why), _) =
                authz::authorize(snap.policies(), workload, &conn)
            {
                warn!(src = %t.src_ip, dst = %t.dst, reason = %why, "closing an open connection: policy now denies it");
                // A stored permit: the connection sees it even if it is
                // between polls right now.
                t.close.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        lock(&self.open).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
