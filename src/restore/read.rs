//! Verified block *i*, now: the one way the restore engine gets a block's
//! bytes, shared by the rehydrate pipeline and anything that serves reads of
//! a volume while it is restored (a lazy export).
//!
//! In: a block index. The snapshot says whether the block is stored and, if
//! so, where its object is and what it must be; the fetch stage gets the
//! object from the first source that serves it (deadline, bounded retries,
//! fallback, hedging); [`crate::verify`] turns it into a [`VerifiedBlock`].
//! Out: that block, or every source's failure. A zero block needs no fetch.

use std::sync::Arc;

use crate::block::BlockIndex;
use crate::fetch::budget::{Budget, BudgetPermit};
use crate::fetch::{FetchContext, SourceFailure, fetch_block, fetch_block_observed};
use crate::snapshot::Snapshot;
use crate::store::timeout::SentAt;
use crate::verify::{Expected, VerifiedBlock};

/// Who is waiting for a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// The restore's own walk through its plan.
    Background,
    /// A reader blocked on this block now (a read of a volume still being
    /// restored). Its bytes come from the budget's demand reserve, never
    /// behind the background queue, and its store requests queue as a tenant
    /// of their own, so they take turns with the background's at every
    /// store's concurrency gate instead of waiting behind all of it. (A
    /// store's request-rate limiter still has one queue.)
    Demand,
}

/// How demand reads jump the background queue: the budget whose reserve they
/// take, and a fetch stage of their own (the same sources, its own tenant at
/// the stores' gates).
#[derive(Debug)]
pub struct DemandLane {
    pub budget: Budget,
    pub fetch: FetchContext,
}

/// Verified blocks of one snapshot, by index.
pub struct BlockReader {
    snapshot: Arc<dyn Snapshot>,
    fetch: FetchContext,
    demand: Option<DemandLane>,
}

impl BlockReader {
    pub fn new(snapshot: Arc<dyn Snapshot>, fetch: FetchContext) -> Self {
        Self { snapshot, fetch, demand: None }
    }

    /// Serve [`Priority::Demand`] reads through `lane` (without one they
    /// take the caller's path, as background reads do).
    pub fn with_demand_lane(mut self, lane: DemandLane) -> Self {
        self.demand = Some(lane);
        self
    }

    pub fn snapshot(&self) -> &Arc<dyn Snapshot> {
        &self.snapshot
    }

    /// The fetch stage behind the reader: its telemetry and hedger.
    pub fn fetch(&self) -> &FetchContext {
        &self.fetch
    }

    /// Block `index`, verified: looked up in the snapshot, fetched from the
    /// first source that serves it, checked against what the snapshot says.
    pub async fn read(&self, index: BlockIndex, priority: Priority) -> Result<VerifiedBlock, Vec<SourceFailure>> {
        self.read_held(index, priority).await.map(|(block, _bytes)| block)
    }

    /// A [`Priority::Background`] read that marks `on_wire` while one of its
    /// requests is out to a store (see [`fetch_block_observed`]): while it
    /// is not, dropping it costs no request.
    pub async fn read_observed(
        &self,
        index: BlockIndex,
        on_wire: &Arc<SentAt>,
    ) -> Result<VerifiedBlock, Vec<SourceFailure>> {
        self.read_from(index, Priority::Background, Some(on_wire)).await.map(|(block, _bytes)| block)
    }

    /// What a fetch on demand usually takes: the demand lane's median on
    /// its first source, once it has a few. `None` without a lane.
    pub fn demand_median(&self) -> Option<std::time::Duration> {
        self.demand.as_ref().and_then(|lane| lane.fetch.hedger.median(0))
    }

    /// [`read`](Self::read), and for a [`Priority::Demand`] read through the
    /// demand lane, the bytes it holds in the demand reserve: keep them until
    /// the block is written, so the reserve bounds those blocks' memory.
    pub async fn read_held(
        &self,
        index: BlockIndex,
        priority: Priority,
    ) -> Result<(VerifiedBlock, Option<BudgetPermit>), Vec<SourceFailure>> {
        self.read_from(index, priority, None).await
    }

    /// [`read_held`](Self::read_held), a background read marking `on_wire`
    /// when given one.
    async fn read_from(
        &self,
        index: BlockIndex,
        priority: Priority,
        on_wire: Option<&Arc<SentAt>>,
    ) -> Result<(VerifiedBlock, Option<BudgetPermit>), Vec<SourceFailure>> {
        let Some(block) = self.snapshot.block(index) else {
            return Ok((VerifiedBlock::zeros(self.snapshot.layout().len(index) as usize), None));
        };
        let key = self.snapshot.object_key(&block);
        tracing::trace!(block = index, ?priority, %key, "reading block");
        match (&self.demand, priority) {
            (Some(lane), Priority::Demand) => {
                let started = std::time::Instant::now();
                let bytes = lane.budget.acquire_demand(inflight_bytes(&block.expected)).await;
                let budget_ms = started.elapsed().as_secs_f64() * 1e3;
                let (verified, _source) = fetch_block(&lane.fetch, &key, &block.expected, index).await?;
                tracing::debug!(
                    block = index,
                    budget_ms,
                    fetch_ms = started.elapsed().as_secs_f64() * 1e3,
                    "demand read"
                );
                Ok((verified, Some(bytes)))
            }
            _ => fetch_block_observed(&self.fetch, &key, &block.expected, index, on_wire)
                .await
                .map(|(verified, _source)| (verified, None)),
        }
    }
}

/// Bytes a fetch of this object holds: as received, plus the decompressed
/// block when it is compressed.
fn inflight_bytes(expected: &Expected) -> u64 {
    if expected.compression.is_none() {
        u64::from(expected.len_bytes)
    } else {
        u64::from(expected.stored_len_bytes) + u64::from(expected.len_bytes)
    }
}
