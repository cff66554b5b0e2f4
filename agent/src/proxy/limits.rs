//! Per-workload caps, so one noisy pod cannot exhaust the node agent for
//! the others: the connections a workload has open through the agent (in
//! and out), and its inbound HBONE streams still being admitted (policy,
//! connecting to the application). A connection or stream over a cap is
//! refused at once (outbound and plaintext: closed; HBONE: 503) and
//! recorded with response flag `UO`, Envoy's "upstream overflow".
//!
//! One peer (a client identity) may hold at most half of a workload's
//! pending places: a client that opens streams to targets that never
//! answer then delays only its own streams, not every other client's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::identity::Identity;

/// The caps; 0 means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadLimits {
    pub connections: usize,
    pub pending_streams: usize,
}

/// Why a connection was refused: the error its record carries. The
/// `overloaded` prefix is what the record's response flags read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    #[error("overloaded: the workload has {0} connections open, its limit")]
    Connections(usize),
    #[error("overloaded: the workload has {0} HBONE streams being admitted, its limit")]
    PendingStreams(usize),
    #[error(
        "overloaded: this peer has {0} HBONE streams being admitted to the workload, its share"
    )]
    PeerPendingStreams(usize),
}

/// One workload's use of its caps.
#[derive(Debug)]
pub struct Budget {
    limits: WorkloadLimits,
    connections: AtomicUsize,
    pending: AtomicUsize,
    /// Pending places held by each peer that holds any.
    peers: Mutex<HashMap<Identity, usize>>,
}

/// A place under a cap, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Connection,
    Pending,
    /// A pending place, and one of `peer`'s share.
    PeerPending(Identity),
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = match &self.kind {
            Kind::Connection => &self.budget.connections,
            Kind::Pending => &self.budget.pending,
            Kind::PeerPending(peer) => {
                self.budget.release_peer(peer);
                &self.budget.pending
            }
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Budget {
    pub fn new(limits: WorkloadLimits) -> Arc<Budget> {
        Arc::new(Budget {
            limits,
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            peers: Mutex::default(),
        })
    }

    /// A place for one more open connection.
    pub fn connection(self: &Arc<Self>) -> Result<Slot, Overloaded> {
        self.take(false)
            .ok_or(Overloaded::Connections(self.limits.connections))
    }

    /// A place for one more HBONE stream from `peer` being admitted:
    /// under the workload's cap, and under the peer's share of it.
    pub fn pending_stream(self: &Arc<Self>, peer: &Identity) -> Result<Slot, Overloaded> {
        let cap = self.limits.pending_streams;
        let place = self.take(true).ok_or(Overloaded::PendingStreams(cap))?;
        if cap == 0 {
            return Ok(place);
        }
        let share = self.peer_share();
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let held = peers.entry(peer.clone()).or_default();
        if *held >= share {
            drop(peers);
            // `place` gives the workload's place back as it drops.
            return Err(Overloaded::PeerPendingStreams(share));
        }
        *held += 1;
        let mut place = place;
        place.kind = Kind::PeerPending(peer.clone());
        Ok(place)
    }

    /// The most pending places one peer may hold.
    fn peer_share(&self) -> usize {
        (self.limits.pending_streams / 2).max(1)
    }

    fn release_peer(&self, peer: &Identity) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = peers.get_mut(peer) {
            *held -= 1;
            if *held == 0 {
                peers.remove(peer);
            }
        }
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    fn take(self: &Arc<Self>, pending: bool) -> Option<Slot> {
        let (counter, cap) = if pending {
            (&self.pending, self.limits.pending_streams)
        } else {
            (&self.connections, self.limits.connections)
        };
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            budget: self.clone(),
            kind: if pending {
                Kind::Pending
            } else {
                Kind::Connection
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_refused_at_the_cap_and_come_back_when_dropped() {
        let b = Budget::new(WorkloadLimits {
            connections: 2,
            pending_streams: 1,
        });
        let one = b.connection().expect("first");
        let _two = b.connection().expect("second");
        assert_eq!(b.connection().unwrap_err(), Overloaded::Connections(2));
        drop(one);
        let _three = b.connection().expect("a place came back");
        assert_eq!(b.connections(), 2);

        // The two caps are separate.
        let peer = Identity::new("td", "ns", "peer");
        let p = b.pending_stream(&peer).expect("pending");
        assert_eq!(
            b.pending_stream(&peer).unwrap_err(),
            Overloaded::PendingStreams(1)
        );
        drop(p);
        assert!(b.pending_stream(&peer).is_ok());

        // 0: no cap.
        let free = Budget::new(WorkloadLimits {
            connections: 0,
            pending_streams: 0,
        });
        let held: Vec<Slot> = (0..1000)
            .map(|_| free.connection().expect("no cap"))
            .collect();
        assert_eq!(free.connections(), held.len());
    }

    #[test]
    fn the_refusal_reads_as_overflow() {
        // The record's response flags key on the prefix.
        for e in [
            Overloaded::Connections(5),
            Overloaded::PendingStreams(5),
            Overloaded::PeerPendingStreams(5),
        ] {
            assert!(e.to_string().starts_with("overloaded:"), "{e}");
        }
    }

    #[test]
    fn one_peer_holds_at_most_half_of_the_pending_places() {
        let b = Budget::new(WorkloadLimits {
            connections: 0,
            pending_streams: 4,
        });
        let (greedy, other) = (
            Identity::new("td", "ns", "greedy"),
            Identity::new("td", "ns", "other"),
        );
        let held: Vec<Slot> = (0..2)
            .map(|_| b.pending_stream(&greedy).expect("within its share"))
            .collect();
        assert_eq!(
            b.pending_stream(&greedy).unwrap_err(),
            Overloaded::PeerPendingStreams(2)
        );
        // The refusal gave the workload's place back: the others' half
        // is whole.
        let theirs: Vec<Slot> = (0..2)
            .map(|_| b.pending_stream(&other).expect("the other half"))
            .collect();
        assert_eq!(
            b.pending_stream(&other).unwrap_err(),
            Overloaded::PendingStreams(4)
        );
        drop(held);
        assert!(
            b.peers.lock().unwrap().get(&greedy).is_none(),
            "forgotten at zero"
        );
        let _again = b.pending_stream(&greedy).expect("its places came back");
        drop(theirs);
        // A cap of one still lets each peer have one.
        let one = Budget::new(WorkloadLimits {
            connections: 0,
            pending_streams: 1,
        });
        let _p = one
            .pending_stream(&greedy)
            .expect("a share of at least one");
    }
}
