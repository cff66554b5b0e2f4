//! Per-workload caps, so one noisy pod cannot exhaust the node agent for
//! the others: the connections a workload has open through the agent (in
//! and out), and its inbound HBONE streams still being admitted (policy,
//! connecting to the application). A connection or stream over a cap is
//! refused at once (outbound and plaintext: closed; HBONE: 503) and
//! recorded with response flag `UO`, Envoy's "upstream overflow".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
}

/// One workload's use of its caps.
#[derive(Debug)]
pub struct Budget {
    limits: WorkloadLimits,
    connections: AtomicUsize,
    pending: AtomicUsize,
}

/// A place under a cap, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    budget: Arc<Budget>,
    pending: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if self.pending {
            &self.budget.pending
        } else {
            &self.budget.connections
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
        })
    }

    /// A place for one more open connection.
    pub fn connection(self: &Arc<Self>) -> Result<Slot, Overloaded> {
        self.take(false)
            .ok_or(Overloaded::Connections(self.limits.connections))
    }

    /// A place for one more HBONE stream being admitted.
    pub fn pending_stream(self: &Arc<Self>) -> Result<Slot, Overloaded> {
        self.take(true)
            .ok_or(Overloaded::PendingStreams(self.limits.pending_streams))
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
            pending,
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
        let p = b.pending_stream().expect("pending");
        assert_eq!(
            b.pending_stream().unwrap_err(),
            Overloaded::PendingStreams(1)
        );
        drop(p);
        assert!(b.pending_stream().is_ok());

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
        for e in [Overloaded::Connections(5), Overloaded::PendingStreams(5)] {
            assert!(e.to_string().starts_with("overloaded:"), "{e}");
        }
    }
}
