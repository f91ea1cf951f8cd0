//! The global in-flight byte budget.
//!
//! One budget per process, shared by every restore: memory is bounded by the
//! budget, not by the number of jobs. A block takes its length from the budget
//! before its fetch starts and gives it back when its bytes are written (or
//! dropped): the [`BudgetPermit`] travels with the block.
//!
//! Reads of a volume still being restored (a lazy export) must not wait
//! behind the background restore, which keeps the budget full by design: they
//! take their bytes from a separate **demand reserve** ([`acquire_demand`](Budget::acquire_demand)),
//! a quarter of the budget on top of it (at least [`DEMAND_RESERVE_MIN_BYTES`],
//! so a few blocks wedged on a store never take all of it). Memory is bounded
//! by the budget plus the reserve; a full background queue never delays a
//! demand read.
//!
//! A fetch holds more than its block: through hyper, the request's
//! connection keeps an HTTP read buffer while the body arrives (it grows to
//! about 400 KiB) and it stays with the connection in the pool afterwards;
//! the S3 store's own GET keeps only a response head. So a restore charges
//! each fetch its sources' request overhead on top of its block
//! ([`REQUEST_OVERHEAD_BYTES`] through hyper, 64 KiB on `s3://`:
//! `StoreUrl::request_overhead_bytes`): with small blocks the budget then
//! admits fewer requests, and the resident set stays the budget plus a
//! constant whatever the block size (256 KiB blocks through hyper: 170
//! fetches in flight for 128 MiB, not 512 fetches and twice the memory; 409
//! on `s3://`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits are KiB so that a budget of terabytes still fits a semaphore's
/// `u32` acquire count for one block.
const UNIT_BYTES: u64 = 1024;

/// The smallest demand reserve: 32 blocks of 1 MiB (8 of 4 MiB) read on
/// demand at once, whatever the budget.
pub const DEMAND_RESERVE_MIN_BYTES: u64 = 32 << 20;

/// What one fetch through a hyper client holds besides its block's bytes
/// (the `http(s)://` and EBS stores; see [`StoreUrl::request_overhead_bytes`](crate::store::StoreUrl::request_overhead_bytes)
/// for each store): the connection's HTTP read buffer (hyper's adaptive
/// buffer grows to `8 KiB + 100 × 4 KiB`, and a `BytesMut` reallocation can
/// round that up) and the request's own state.
/// Measured: peak RSS grew by about 0.6 MiB per extra request in flight
/// (1 GiB in 256 KiB blocks at 30 ms, medians of 3: 233 MiB with 64
/// requests, 498 MiB with 512).
pub const REQUEST_OVERHEAD_BYTES: u64 = 512 << 10;

#[derive(Debug, Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    capacity_bytes: u64,
    /// The demand reserve: blocks a reader is waiting for now.
    demand: Arc<Semaphore>,
    demand_capacity_bytes: u64,
}

/// Bytes held in flight; returned to the budget when dropped.
#[derive(Debug)]
pub struct BudgetPermit {
    _permit: OwnedSemaphorePermit,
}

impl Budget {
    pub fn new(capacity_bytes: u64) -> Self {
        let units = (capacity_bytes / UNIT_BYTES).max(1) as usize;
        // A quarter, and at least DEMAND_RESERVE_MIN_BYTES: room for many
        // blocks read on demand at once, so one wedged on a store (holding
        // its bytes while it waits) never holds up a read of another.
        let demand_capacity_bytes = (capacity_bytes / 4).max(DEMAND_RESERVE_MIN_BYTES);
        let demand_units = (demand_capacity_bytes / UNIT_BYTES) as usize;
        Self {
            semaphore: Arc::new(Semaphore::new(units)),
            capacity_bytes,
            demand: Arc::new(Semaphore::new(demand_units)),
            demand_capacity_bytes,
        }
    }

    /// Wait until `bytes` fit in the demand reserve (never behind the
    /// background's queue). Clamped like [`acquire`](Self::acquire).
    pub async fn acquire_demand(&self, bytes: u64) -> BudgetPermit {
        let units = bytes.div_ceil(UNIT_BYTES).clamp(1, self.demand_capacity_bytes / UNIT_BYTES) as u32;
        let permit =
            Arc::clone(&self.demand).acquire_many_owned(units).await.expect("demand semaphore is never closed");
        BudgetPermit { _permit: permit }
    }

    /// Wait until `bytes` fit in the budget. A request larger than the whole
    /// budget is clamped to it, so it waits for an empty budget rather than
    /// forever.
    pub async fn acquire(&self, bytes: u64) -> BudgetPermit {
        let units = bytes.div_ceil(UNIT_BYTES).clamp(1, (self.capacity_bytes / UNIT_BYTES).max(1)) as u32;
        let permit =
            Arc::clone(&self.semaphore).acquire_many_owned(units).await.expect("budget semaphore is never closed");
        BudgetPermit { _permit: permit }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes the demand reserve holds at most.
    pub fn demand_capacity_bytes(&self) -> u64 {
        self.demand_capacity_bytes
    }

    /// Bytes currently held by blocks in flight.
    pub fn inflight_bytes(&self) -> u64 {
        let free = self.semaphore.available_permits() as u64;
        ((self.capacity_bytes / UNIT_BYTES).max(1) - free) * UNIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_and_returns_bytes() {
        let budget = Budget::new(4 << 20);
        let a = budget.acquire(3 << 20).await;
        assert_eq!(budget.inflight_bytes(), 3 << 20);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire(2 << 20)).await;
        assert!(waiting.is_err(), "over budget must wait");
        drop(a);
        let _b = budget.acquire(2 << 20).await;
        let _huge = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire(1 << 40)).await;
        assert_eq!(budget.inflight_bytes(), 2 << 20);
    }

    #[tokio::test]
    async fn a_full_budget_never_delays_a_demand_read() {
        let budget = Budget::new(4 << 20);
        assert_eq!(
            budget.demand_capacity_bytes(),
            DEMAND_RESERVE_MIN_BYTES,
            "a small budget still has the minimum reserve"
        );
        assert_eq!(Budget::new(1 << 30).demand_capacity_bytes(), 256 << 20, "a quarter of a large one");
        let _all = budget.acquire(4 << 20).await;
        let demand = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire_demand(1 << 20)).await;
        assert!(demand.is_ok(), "the demand reserve is separate from the background's budget");
        let _held = demand.unwrap();
        let _rest = budget.acquire_demand(DEMAND_RESERVE_MIN_BYTES - (1 << 20)).await;
        let over = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire_demand(1 << 20)).await;
        assert!(over.is_err(), "the reserve is bounded too");
    }
}
