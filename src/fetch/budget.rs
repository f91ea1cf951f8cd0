//! The global in-flight byte budget.
//!
//! One budget per process, shared by every restore: memory is bounded by the
//! budget, not by the number of jobs. A block takes its length from the budget
//! before its fetch starts and gives it back when its bytes are written (or
//! dropped): the [`BudgetPermit`] travels with the block. Restores share it
//! fairly: freed bytes go to the waiting restore granted the fewest so far
//! (see [`Shared`] for the rule and why a FIFO semaphore was not enough).
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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Budgets are counted in KiB, so that a budget of terabytes still fits the
/// demand reserve's semaphore (a `u32` acquire count for one block).
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
    shared: Arc<Shared>,
    capacity_bytes: u64,
    /// The demand reserve: blocks a reader is waiting for now.
    demand: Arc<Semaphore>,
    demand_capacity_bytes: u64,
}

/// Bytes held in flight; returned to the budget when dropped.
#[derive(Debug)]
pub struct BudgetPermit {
    held: Held,
}

#[derive(Debug)]
enum Held {
    Background { shared: Arc<Shared>, tenant: u64, units: u64 },
    Demand(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl Drop for BudgetPermit {
    fn drop(&mut self) {
        if let Held::Background { shared, tenant, units } = &self.held {
            let mut state = shared.lock();
            state.give_back(*tenant, *units);
            state.grant();
        }
    }
}

/// The background's budget, shared fairly between restores ("tenants").
///
/// Which waiting request goes next: the one whose restore has been granted
/// the fewest bytes so far (the earliest of those), when its bytes are
/// free; nobody passes it while it waits for room, so a large block is
/// never starved by small ones. A restore that starts while others run
/// begins at the least any of them has been granted *and given back* (the
/// virtual time of start-time fair queuing, not counting bytes still in
/// flight): it catches up by at most what they hold, never by their whole
/// history, and a restore that had the worker to itself for a moment keeps
/// no lead of a whole budget over the ones submitted a few milliseconds
/// later (it had: 0.4-0.6 s of a 2.4 s job). One that has left (or never
/// joined), holds nothing and waits for nothing is forgotten. So restores with work waiting are
/// granted bytes at the same rate, whatever their stores' latency and
/// whenever their tasks run.
///
/// Why not a FIFO semaphore: a restore's dispatcher asks again only once
/// its task runs, and grants made while the others' dispatchers were woken
/// but not yet run went to whoever asked next. On a worker with eight
/// restores, one took 27 grants in a row while the other seven waited
/// 32 ms to be polled, and the jobs' progress drifted up to 5 × apart
/// (`benches/ab.sh --jobs 8`: one job done in 1.3 s, the others in
/// 2.0-2.8 s). Fewest *held* first was not enough: a restore whose blocks
/// come back sooner holds fewer and so went first more often (one job of
/// eight at twice the others' rate).
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free_units: u64,
    /// Tenants holding or waiting for units.
    tenants: HashMap<u64, Tenant>,
    waiting: VecDeque<Waiter>,
    next_id: u64,
}

#[derive(Debug, Clone, Copy)]
struct Tenant {
    held: u64,
    /// Units granted since it (last) appeared, counted from the least any
    /// tenant had been granted and given back then (at least `held`).
    granted: u64,
    /// Memberships of a restore that [joined](Budget::join) and has not
    /// left: kept while it holds nothing, so a moment without a request in
    /// flight does not reset its count.
    members: u32,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    tenant: u64,
    units: u64,
    granted: oneshot::Sender<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere
        // while it was held cannot have left it half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn granted(&self, tenant: u64) -> u64 {
        self.tenants.get(&tenant).map_or(0, |t| t.granted)
    }

    /// A request of `tenant` joins the queue.
    fn enqueue(&mut self, waiter: Waiter) {
        self.appear(waiter.tenant);
        self.waiting.push_back(waiter);
    }

    /// A tenant new to the budget starts at the least granted and given
    /// back of those present.
    fn appear(&mut self, tenant: u64) -> &mut Tenant {
        let start = if self.tenants.contains_key(&tenant) {
            0
        } else {
            self.tenants.values().map(|t| t.granted.saturating_sub(t.held)).min().unwrap_or(0)
        };
        self.tenants.entry(tenant).or_insert(Tenant { held: 0, granted: start, members: 0 })
    }

    /// Grant waiting requests while the next one (fewest granted first)
    /// fits.
    fn grant(&mut self) {
        loop {
            let next =
                self.waiting.iter().enumerate().min_by_key(|(i, w)| (self.granted(w.tenant), *i)).map(|(i, _)| i);
            let Some(i) = next else { return };
            if self.waiting[i].units > self.free_units {
                return;
            }
            let Some(waiter) = self.waiting.remove(i) else { return };
            self.free_units -= waiter.units;
            let tenant = self.appear(waiter.tenant);
            tenant.held += waiter.units;
            tenant.granted += waiter.units;
            // A request whose future is gone was taken out of the queue
            // by its guard first (under this lock): the send cannot fail
            // for it. One dropped after this gives the units back (its
            // guard finds it no longer queued).
            let _ = waiter.granted.send(());
        }
    }

    fn give_back(&mut self, tenant: u64, units: u64) {
        self.free_units += units;
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.held = t.held.saturating_sub(units);
        }
        self.forget_if_idle(tenant);
    }

    /// A tenant that is not a member, holds nothing and waits for nothing
    /// is forgotten.
    fn forget_if_idle(&mut self, tenant: u64) {
        let idle = self.tenants.get(&tenant).is_some_and(|t| t.held == 0 && t.members == 0)
            && !self.waiting.iter().any(|w| w.tenant == tenant);
        if idle {
            self.tenants.remove(&tenant);
        }
    }
}

/// A restore's place in the budget's fair share; see [`Budget::join`].
#[derive(Debug)]
pub struct Membership {
    shared: Arc<Shared>,
    tenant: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let Some(t) = state.tenants.get_mut(&self.tenant) {
            t.members = t.members.saturating_sub(1);
        }
        state.forget_if_idle(self.tenant);
    }
}

/// Takes a request out of the queue if its future is dropped while it
/// waits, or gives its units back if they were granted and never taken:
/// only `grant` and this guard take a request out of the queue, so one no
/// longer queued was granted.
struct WaitGuard {
    shared: Arc<Shared>,
    id: u64,
    tenant: u64,
    units: u64,
    claimed: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if self.claimed {
            return;
        }
        let mut state = self.shared.lock();
        match state.waiting.iter().position(|w| w.id == self.id) {
            Some(i) => {
                state.waiting.remove(i);
                state.forget_if_idle(self.tenant);
            }
            None => state.give_back(self.tenant, self.units),
        }
        // Either way the head of the queue may now fit.
        state.grant();
    }
}

impl Budget {
    pub fn new(capacity_bytes: u64) -> Self {
        let units = (capacity_bytes / UNIT_BYTES).max(1);
        // A quarter, and at least DEMAND_RESERVE_MIN_BYTES: room for many
        // blocks read on demand at once, so one wedged on a store (holding
        // its bytes while it waits) never holds up a read of another.
        let demand_capacity_bytes = (capacity_bytes / 4).max(DEMAND_RESERVE_MIN_BYTES);
        let demand_units = (demand_capacity_bytes / UNIT_BYTES) as usize;
        let state = State { free_units: units, tenants: HashMap::new(), waiting: VecDeque::new(), next_id: 0 };
        Self {
            shared: Arc::new(Shared { state: Mutex::new(state) }),
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
        BudgetPermit { held: Held::Demand(permit) }
    }

    /// Wait until `bytes` fit in the budget, for restore `tenant` (see
    /// [`Shared`] for who goes first). A request larger than the whole
    /// budget is clamped to it, so it waits for an empty budget rather than
    /// forever.
    pub async fn acquire(&self, tenant: u64, bytes: u64) -> BudgetPermit {
        let units = bytes.div_ceil(UNIT_BYTES).clamp(1, (self.capacity_bytes / UNIT_BYTES).max(1));
        let (granted, wait) = oneshot::channel();
        let id = {
            let mut state = self.shared.lock();
            let id = state.next_id;
            state.next_id += 1;
            state.enqueue(Waiter { id, tenant, units, granted });
            state.grant();
            id
        };
        let mut guard = WaitGuard { shared: Arc::clone(&self.shared), id, tenant, units, claimed: false };
        // The sender is dropped only once granted (it sends first) or by
        // this request's own guard.
        let _ = wait.await;
        guard.claimed = true;
        BudgetPermit { held: Held::Background { shared: Arc::clone(&self.shared), tenant, units } }
    }

    /// Restore `tenant` takes part until the returned [`Membership`]
    /// drops: its count of bytes granted is kept for that long, even while
    /// it holds none (between two requests). Without it, a restore whose
    /// blocks had all come back before its dispatcher asked again was
    /// forgotten, and came back at the least the others had been given
    /// back, ahead by what they held; each time, so in one worker run one
    /// job of eight finished in 0.86 s and the others in 2.7-2.9 s.
    pub fn join(&self, tenant: u64) -> Membership {
        self.shared.lock().appear(tenant).members += 1;
        Membership { shared: Arc::clone(&self.shared), tenant }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes the demand reserve holds at most.
    pub fn demand_capacity_bytes(&self) -> u64 {
        self.demand_capacity_bytes
    }

    /// Bytes currently held by blocks in flight (the background's).
    pub fn inflight_bytes(&self) -> u64 {
        let free = self.shared.lock().free_units;
        ((self.capacity_bytes / UNIT_BYTES).max(1) - free) * UNIT_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_and_returns_bytes() {
        let budget = Budget::new(4 << 20);
        let a = budget.acquire(1, 3 << 20).await;
        assert_eq!(budget.inflight_bytes(), 3 << 20);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire(1, 2 << 20)).await;
        assert!(waiting.is_err(), "over budget must wait");
        drop(a);
        let _b = budget.acquire(1, 2 << 20).await;
        let _huge = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire(1, 1 << 40)).await;
        assert_eq!(budget.inflight_bytes(), 2 << 20);
    }

    /// Poll `fut` once.
    fn poll_once<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    fn ready<T>(poll: std::task::Poll<T>, why: &str) -> T {
        match poll {
            std::task::Poll::Ready(value) => value,
            std::task::Poll::Pending => panic!("{why}"),
        }
    }

    #[tokio::test]
    async fn freed_bytes_go_to_the_restore_granted_the_fewest_and_a_newcomer_catches_up_only_what_others_hold() {
        // 4 KiB, 1 KiB requests; "granted" counts KiB, held in brackets.
        let budget = Budget::new(4 << 10);
        let b1 = budget.acquire(2, 1024).await; // B 1 [1]
        let b2 = budget.acquire(2, 1024).await; // B 2 [2]
        let a1 = budget.acquire(1, 1024).await; // A starts at B's 2 - 2: A 1 [1]
        let b3 = budget.acquire(2, 1024).await; // B 3 [3]; full
        let mut b = std::pin::pin!(budget.acquire(2, 1024));
        let mut a = std::pin::pin!(budget.acquire(1, 1024));
        assert!(poll_once(b.as_mut()).is_pending() && poll_once(a.as_mut()).is_pending());
        drop(b1);
        assert!(poll_once(b.as_mut()).is_pending(), "B asked first but was granted more: a FIFO would serve it");
        let a2 = ready(poll_once(a.as_mut()), "the freed KiB goes to A, granted the fewest"); // A 2 [2]
        drop(b2);
        let b4 = ready(poll_once(b.as_mut()), "then B"); // B 4 [2]
        // C arrives: A has given back 0 of its 2, B 2 of its 4. C starts at
        // 0: ahead of A by what A holds, not by B's whole history.
        let mut a = std::pin::pin!(budget.acquire(1, 1024));
        let mut c = std::pin::pin!(budget.acquire(3, 1024));
        assert!(poll_once(a.as_mut()).is_pending() && poll_once(c.as_mut()).is_pending());
        drop(a1);
        let c1 = ready(poll_once(c.as_mut()), "C (0) before A (2), though A asked first"); // C 1
        let mut c = std::pin::pin!(budget.acquire(3, 1024));
        assert!(poll_once(c.as_mut()).is_pending());
        drop(b3);
        let c2 = ready(poll_once(c.as_mut()), "C (1) again before A (2)"); // C 2
        // Caught up: they take turns.
        let mut c = std::pin::pin!(budget.acquire(3, 1024));
        assert!(poll_once(c.as_mut()).is_pending());
        drop(c1);
        let a3 = ready(poll_once(a.as_mut()), "A and C at 2: A asked first");
        assert!(poll_once(c.as_mut()).is_pending());
        drop(c2);
        let c3 = ready(poll_once(c.as_mut()), "then C");
        assert_eq!(budget.inflight_bytes(), 4 << 10);
        drop((a2, a3, b4, c3));
        assert_eq!(budget.inflight_bytes(), 0);
    }

    #[tokio::test]
    async fn a_restore_that_joined_keeps_its_count_while_it_holds_nothing() {
        let budget = Budget::new(4 << 10);
        let (_a_share, _b_share) = (budget.join(1), budget.join(2));
        let a: Vec<_> = permits_of(&budget, 1, 3).await; // A 3
        let b1 = budget.acquire(2, 1024).await; // B 1; full
        drop(a); // A holds nothing between requests: still 3, not reset
        let mut b_more: Vec<_> = permits_of(&budget, 2, 3).await; // B 4; full
        let mut b = std::pin::pin!(budget.acquire(2, 1024));
        let mut a = std::pin::pin!(budget.acquire(1, 1024));
        assert!(poll_once(b.as_mut()).is_pending() && poll_once(a.as_mut()).is_pending());
        drop(b1);
        let a4 = ready(poll_once(a.as_mut()), "A (3) before B (4)"); // A 4
        let mut a = std::pin::pin!(budget.acquire(1, 1024));
        assert!(poll_once(a.as_mut()).is_pending());
        drop(b_more.pop());
        let _b =
            ready(poll_once(b.as_mut()), "A and B at 4: B asked first (a forgotten A would be back at 0 and go again)");
        assert!(poll_once(a.as_mut()).is_pending());
        drop(a4);
    }

    async fn permits_of(budget: &Budget, tenant: u64, n: usize) -> Vec<BudgetPermit> {
        let mut permits = Vec::new();
        for _ in 0..n {
            permits.push(budget.acquire(tenant, 1024).await);
        }
        permits
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_or_once_granted_holds_nothing() {
        let budget = Budget::new(2 << 10);
        let all = budget.acquire(1, 2 << 10).await;
        {
            // Dropped while queued.
            let mut waiting = std::pin::pin!(budget.acquire(2, 1024));
            assert!(poll_once(waiting.as_mut()).is_pending());
        }
        let mut granted = Box::pin(budget.acquire(3, 1024));
        assert!(poll_once(granted.as_mut()).is_pending());
        drop(all);
        // Restore 3's request was granted its KiB but never polled again.
        assert_eq!(budget.inflight_bytes(), 1 << 10);
        drop(granted);
        assert_eq!(budget.inflight_bytes(), 0, "the granted KiB came back with the dropped request");
        let whole = tokio::time::timeout(std::time::Duration::from_secs(5), budget.acquire(4, 2 << 10)).await;
        assert!(whole.is_ok(), "nothing leaked: the whole budget is free again");
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
        let _all = budget.acquire(1, 4 << 20).await;
        let demand = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire_demand(1 << 20)).await;
        assert!(demand.is_ok(), "the demand reserve is separate from the background's budget");
        let _held = demand.unwrap();
        let _rest = budget.acquire_demand(DEMAND_RESERVE_MIN_BYTES - (1 << 20)).await;
        let over = tokio::time::timeout(std::time::Duration::from_millis(50), budget.acquire_demand(1 << 20)).await;
        assert!(over.is_err(), "the reserve is bounded too");
    }
}
