//! The rehydrate pipeline's dispatcher and units: the dispatcher walks the
//! plan in block order, takes each unit's bytes from the process-wide
//! in-flight budget (waiting when it is spent) and spawns the unit; a unit
//! gets its block verified, writes it at every offset that holds it, gives
//! its bytes back and reports the outcome to the settler.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plan::{Unit, UnitSource};
use super::read::{BlockReader, Priority};
use crate::block::{BlockIndex, BlockLayout};
use crate::fetch::SourceFailure;
use crate::fetch::budget::Budget;
use crate::metrics as m;
use crate::verify::VerifiedBlock;
use crate::write::Writer;

/// What every unit task shares.
pub(super) struct UnitContext {
    /// Verified blocks by index: lookup, fetch, verify.
    pub(super) reader: BlockReader,
    pub(super) writer: Writer,
    pub(super) layout: BlockLayout,
}

/// How one unit ended.
pub(super) enum UnitOutcome {
    Written { blocks: Vec<BlockIndex>, bytes: u64 },
    Failed { blocks: Vec<BlockIndex>, failures: Vec<SourceFailure> },
    WriteFailed { block: BlockIndex, error: std::io::Error },
}

/// One write, with a fail point that injects ENOSPC.
pub(super) async fn write_block(writer: &Writer, offset: u64, block: &VerifiedBlock) -> std::io::Result<()> {
    fail::fail_point!("target-write-enospc", |_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
    writer.write(offset, block).await
}

pub(super) async fn run_unit(ctx: &UnitContext, unit: Unit) -> UnitOutcome {
    let block = match &unit.source {
        // Zeros need no lookup: the plan knows the block's length.
        UnitSource::Zeros { len_bytes } => VerifiedBlock::zeros(*len_bytes as usize),
        UnitSource::Object { .. } => match ctx.reader.read(unit.first_block(), Priority::Background).await {
            Ok(block) => block,
            Err(failures) => return UnitOutcome::Failed { blocks: unit.blocks, failures },
        },
    };
    let mut bytes = 0;
    for &index in &unit.blocks {
        if let Err(error) = write_block(&ctx.writer, ctx.layout.offset(index), &block).await {
            return UnitOutcome::WriteFailed { block: index, error };
        }
        bytes += block.len() as u64;
    }
    UnitOutcome::Written { blocks: unit.blocks, bytes }
}

/// Walk the plan in order, each unit waiting for its bytes in the budget.
pub(super) async fn dispatch(
    units: Vec<Unit>,
    budget: Budget,
    ctx: Arc<UnitContext>,
    outcomes: mpsc::Sender<UnitOutcome>,
    cancel: CancellationToken,
) {
    for unit in units {
        let charge = unit.inflight_bytes().max(u64::from(ctx.layout.len(unit.first_block())));
        let permit = tokio::select! {
            permit = budget.acquire(charge) => permit,
            () = cancel.cancelled() => return,
        };
        metrics::gauge!(m::INFLIGHT_BYTES).set(budget.inflight_bytes() as f64);
        let ctx = Arc::clone(&ctx);
        let outcomes = outcomes.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = run_unit(&ctx, unit) => outcome,
                () = cancel.cancelled() => return,
            };
            drop(permit);
            // The settler has gone only when the restore stopped: nothing to report to.
            let _ = outcomes.send(outcome).await;
        });
    }
    // Every block is in flight or done: what is left is the critical path.
    ctx.reader.fetch().hedger.enter_tail();
}
