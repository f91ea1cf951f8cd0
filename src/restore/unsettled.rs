//! The bound on blocks written but not yet settled: how much work a crash
//! can throw away, whatever the disk's fdatasync latency.
//!
//! The settler syncs every `checkpoint.interval_bytes` of written data (or
//! `interval_millis`), and while one fdatasync runs the units go on fetching
//! and writing. Without a bound, a slow fdatasync (a disk busy with
//! writeback) would let the restore write any amount that the next crash
//! loses. So the dispatcher takes a unit's write bytes from this gate before
//! the unit fetches anything, and the settler gives them back only once the
//! blocks are settled: fdatasync done **and** the checkpoint naming them
//! saved (`docs/architecture.md` invariant 9). Requested-or-written and not
//! settled is at most the gate's capacity, `checkpoint.unsettled_bytes_max`:
//! by default one byte interval plus the in-flight budget, which is the
//! "one interval plus the blocks in flight" the README promises and never
//! binds while fdatasync keeps up. A dispatcher waiting on the gate makes a
//! settle due at once ([`UnsettledGate::is_waited_on`]), so a gate smaller
//! than the interval slows the restore but never stalls it.
//!
//! One gate per restore run (the budget is the process's; this is the run's
//! ledger). A unit larger than the whole gate is clamped to it, so it waits
//! for an empty gate rather than forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits are KiB, so a gate of terabytes fits a semaphore's `u32` count.
const UNIT_BYTES: u64 = 1024;

#[derive(Debug, Clone)]
pub(super) struct UnsettledGate {
    semaphore: Arc<Semaphore>,
    capacity_units: u64,
    /// The dispatcher waits for room.
    waited_on: Arc<AtomicBool>,
}

/// Write bytes of one unit, held from its dispatch until its blocks settle.
#[derive(Debug)]
pub(super) struct UnsettledPermit {
    _permit: OwnedSemaphorePermit,
    units: u64,
}

impl UnsettledPermit {
    pub(super) fn bytes(&self) -> u64 {
        self.units * UNIT_BYTES
    }
}

impl UnsettledGate {
    pub(super) fn new(capacity_bytes: u64) -> Self {
        let capacity_units = capacity_bytes.div_ceil(UNIT_BYTES).clamp(1, u64::from(u32::MAX));
        Self {
            semaphore: Arc::new(Semaphore::new(capacity_units as usize)),
            capacity_units,
            waited_on: Arc::new(AtomicBool::new(false)),
        }
    }

    #[cfg(test)]
    fn capacity_bytes(&self) -> u64 {
        self.capacity_units * UNIT_BYTES
    }

    /// Wait until `bytes` more may be requested and written before the next
    /// settle.
    pub(super) async fn acquire(&self, bytes: u64) -> UnsettledPermit {
        let units = bytes.div_ceil(UNIT_BYTES).clamp(1, self.capacity_units);
        if let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_many_owned(units as u32) {
            return UnsettledPermit { _permit: permit, units };
        }
        // Cleared however the wait ends, a cancelled one included.
        let _waiting = Waiting::on(&self.waited_on);
        let permit = Arc::clone(&self.semaphore)
            .acquire_many_owned(units as u32)
            .await
            .expect("the unsettled gate's semaphore is never closed");
        UnsettledPermit { _permit: permit, units }
    }

    /// The dispatcher waits for room: only a settle makes any.
    pub(super) fn is_waited_on(&self) -> bool {
        self.waited_on.load(Ordering::Relaxed)
    }

    /// Bytes held by units dispatched and not yet settled.
    #[cfg(test)]
    fn held_bytes(&self) -> u64 {
        (self.capacity_units - self.semaphore.available_permits() as u64) * UNIT_BYTES
    }
}

/// Sets a flag while alive.
struct Waiting<'a>(&'a AtomicBool);

impl<'a> Waiting<'a> {
    fn on(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn holds_its_capacity_until_settled() {
        let gate = UnsettledGate::new(8 << 20);
        assert_eq!(gate.capacity_bytes(), 8 << 20);
        let first = gate.acquire(4 << 20).await;
        let second = gate.acquire(4 << 20).await;
        assert_eq!(gate.held_bytes(), 8 << 20);
        assert!(!gate.is_waited_on());
        let mut waiting = Box::pin(gate.acquire(1 << 20));
        let blocked = tokio::time::timeout(Duration::from_millis(50), &mut waiting).await;
        assert!(blocked.is_err(), "a full gate makes the next unit wait for a settle");
        assert!(gate.is_waited_on(), "and says so, so the settler settles at once");
        drop(waiting);
        assert!(!gate.is_waited_on(), "a wait given up is not a wait");
        assert_eq!(first.bytes(), 4 << 20);
        drop(first);
        let _third = gate.acquire(1 << 20).await;
        assert!(!gate.is_waited_on());
        drop(second);
        assert_eq!(gate.held_bytes(), 1 << 20);
    }

    #[tokio::test]
    async fn a_unit_larger_than_the_gate_waits_for_it_empty_not_forever() {
        let gate = UnsettledGate::new(1);
        assert_eq!(gate.capacity_bytes(), 1024, "the smallest gate is one permit");
        let huge = tokio::time::timeout(Duration::from_millis(50), gate.acquire(1 << 30)).await;
        assert!(huge.is_ok(), "clamped to the whole gate");
        let held = huge.unwrap();
        assert_eq!(held.bytes(), 1024);
        let next = tokio::time::timeout(Duration::from_millis(50), gate.acquire(1)).await;
        assert!(next.is_err());
    }
}
