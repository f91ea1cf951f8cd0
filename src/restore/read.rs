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
use crate::fetch::{FetchContext, SourceFailure, fetch_block};
use crate::snapshot::Snapshot;
use crate::verify::VerifiedBlock;

/// Who is waiting for a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// The restore's own walk through its plan.
    Background,
    /// A reader blocked on this block now (a read of a volume still being
    /// restored). Today it takes the same path: the in-flight budget and the
    /// stores' gates have one queue each.
    Demand,
}

/// Verified blocks of one snapshot, by index.
pub struct BlockReader {
    snapshot: Arc<dyn Snapshot>,
    fetch: FetchContext,
}

impl BlockReader {
    pub fn new(snapshot: Arc<dyn Snapshot>, fetch: FetchContext) -> Self {
        Self { snapshot, fetch }
    }

    /// The fetch stage behind the reader: its telemetry and hedger.
    pub fn fetch(&self) -> &FetchContext {
        &self.fetch
    }

    /// Block `index`, verified: looked up in the snapshot, fetched from the
    /// first source that serves it, checked against what the snapshot says.
    pub async fn read(&self, index: BlockIndex, priority: Priority) -> Result<VerifiedBlock, Vec<SourceFailure>> {
        let Some(block) = self.snapshot.block(index) else {
            return Ok(VerifiedBlock::zeros(self.snapshot.layout().len(index) as usize));
        };
        let key = self.snapshot.object_key(&block);
        tracing::trace!(block = index, ?priority, %key, "reading block");
        fetch_block(&self.fetch, &key, &block.expected, index).await.map(|(verified, _source)| verified)
    }
}
