//! The rehydrate pipeline's dispatcher and units: the dispatcher walks the
//! plan in block order, takes each unit's write bytes from the run's
//! [`UnsettledGate`] and its in-flight bytes from the process-wide budget
//! (waiting when either is spent) and spawns the unit; a unit gets its block
//! verified, writes it at every offset that holds it (marking each block
//! held for peers as its write completes), gives its in-flight bytes back
//! and reports the outcome, with its unsettled permit, to the settler (which
//! holds the permit until the blocks are settled).
//!
//! While the volume is exported ([`super::live`]), a unit claims each block
//! before writing it and skips a block that is local already (read on
//! demand, or written by the client): the background restore never
//! overwrites a client's bytes. A unit whose blocks are all local fetches
//! nothing.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::live::LiveVolume;
use super::plan::{Unit, UnitSource};
use super::read::{BlockReader, Priority};
use super::unsettled::{UnsettledGate, UnsettledPermit};
use crate::block::{BlockIndex, BlockLayout};
use crate::fetch::SourceFailure;
use crate::fetch::budget::Budget;
use crate::metrics as m;
use crate::peer::holdings::HeldBits;
use crate::verify::VerifiedBlock;
use crate::write::Writer;

/// What every unit task shares.
pub(super) struct UnitContext {
    /// Verified blocks by index: lookup, fetch, verify.
    pub(super) reader: Arc<BlockReader>,
    /// The exported volume, when there is one.
    pub(super) live: Option<Arc<LiveVolume>>,
    pub(super) writer: Writer,
    pub(super) layout: BlockLayout,
    /// The bits peers read this restore's blocks by (`crate::peer`): set as
    /// each write completes, before its fdatasync.
    pub(super) held: Option<Arc<HeldBits>>,
}

/// How one unit ended.
pub(super) enum UnitOutcome {
    Written {
        blocks: Vec<BlockIndex>,
        bytes: u64,
    },
    /// `local`: blocks of the unit the target holds anyway (the client's, or
    /// read on demand): written, not failed.
    Failed {
        blocks: Vec<BlockIndex>,
        failures: Vec<SourceFailure>,
        local: Vec<BlockIndex>,
    },
    WriteFailed {
        block: BlockIndex,
        error: std::io::Error,
    },
}

/// One write, with a fail point that injects ENOSPC.
pub(super) async fn write_block(writer: &Writer, offset: u64, block: &VerifiedBlock) -> std::io::Result<()> {
    fail::fail_point!("target-write-enospc", |_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
    writer.write(offset, block).await
}

pub(super) async fn run_unit(ctx: &UnitContext, unit: Unit) -> UnitOutcome {
    if let Some(live) = &ctx.live
        && unit.blocks.iter().all(|&i| live.is_local(i))
    {
        if matches!(unit.source, UnitSource::Object { .. }) {
            live.count_object_from_export();
        }
        return UnitOutcome::Written { blocks: unit.blocks, bytes: 0 };
    }
    let shared = match (&ctx.live, &unit.source) {
        (Some(live), UnitSource::Object { .. }) => Some(live.share_fetch(&unit.blocks)),
        _ => None,
    };
    let block = match (&unit.source, &shared) {
        // Zeros need no lookup: the plan knows the block's length.
        (UnitSource::Zeros { len_bytes }, _) => VerifiedBlock::zeros(*len_bytes as usize),
        (UnitSource::Object { .. }, None) => match ctx.reader.read(unit.first_block(), Priority::Background).await {
            Ok(block) => block,
            Err(failures) => return failed(ctx, unit.blocks.clone(), failures),
        },
        // Exported: readers share this fetch, and a reader's fetch of the
        // block, while ours still waits in a local queue, replaces ours.
        (UnitSource::Object { .. }, Some(shared)) => {
            let read = tokio::select! {
                read = ctx.reader.read_observed(unit.first_block(), shared.sent()) => read,
                block = shared.offered() => Ok(block),
            };
            shared.publish(read.as_ref().map_err(|_| ()));
            match read {
                Ok(block) => block,
                Err(failures) => return failed(ctx, unit.blocks.clone(), failures),
            }
        }
    };
    let mut bytes = 0;
    for &index in &unit.blocks {
        let claim = match &ctx.live {
            Some(live) => Some(live.claim(index).await),
            None => None,
        };
        if claim.as_ref().is_some_and(|c| c.is_local()) {
            continue;
        }
        if let Err(error) = write_block(&ctx.writer, ctx.layout.offset(index), &block).await {
            return UnitOutcome::WriteFailed { block: index, error };
        }
        if let Some(claim) = claim {
            claim.set_local();
        }
        if let Some(held) = &ctx.held {
            held.set(index);
        }
        bytes += block.len() as u64;
    }
    drop(shared);
    UnitOutcome::Written { blocks: unit.blocks, bytes }
}

/// A unit no source could serve: its blocks the target holds anyway are not
/// failed.
fn failed(ctx: &UnitContext, blocks: Vec<BlockIndex>, failures: Vec<SourceFailure>) -> UnitOutcome {
    let Some(live) = &ctx.live else {
        return UnitOutcome::Failed { blocks, failures, local: Vec::new() };
    };
    let (local, blocks): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|&i| live.is_local(i));
    if blocks.is_empty() {
        // The client made every block local meanwhile: nothing failed.
        live.count_object_from_export();
    }
    UnitOutcome::Failed { blocks, failures, local }
}

/// A unit's outcome and the write bytes it holds until they settle.
pub(super) type Reported = (UnitOutcome, UnsettledPermit);

/// Where the dispatcher takes each unit's bytes from.
pub(super) struct Gates {
    /// The process's in-flight budget.
    pub(super) budget: Budget,
    /// The run's written-not-settled bound.
    pub(super) unsettled: UnsettledGate,
}

/// Walk the plan in order, each unit waiting for room in the unsettled gate
/// and then for its bytes in the budget.
pub(super) async fn dispatch(
    units: Vec<Unit>,
    gates: Gates,
    ctx: Arc<UnitContext>,
    outcomes: mpsc::Sender<Reported>,
    cancel: CancellationToken,
) {
    let Gates { budget, unsettled } = gates;
    // Its share of the budget is kept until every unit is dispatched.
    let _share = budget.join(ctx.reader.fetch().tenant);
    let request_overhead_bytes = ctx.reader.fetch().request_overhead_bytes();
    // Each source's window learns what a request of this restore is charged.
    for source in &ctx.reader.fetch().sources {
        source.store.charge_requests(request_overhead_bytes);
    }
    for unit in units {
        let writes: u64 = unit.blocks.iter().map(|&i| u64::from(ctx.layout.len(i))).sum();
        let unsettled = tokio::select! {
            permit = unsettled.acquire(writes) => permit,
            () = cancel.cancelled() => return,
        };
        let charge = unit.inflight_bytes(request_overhead_bytes).max(u64::from(ctx.layout.len(unit.first_block())));
        let permit = tokio::select! {
            permit = budget.acquire(ctx.reader.fetch().tenant, charge) => permit,
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
            let _ = outcomes.send((outcome, unsettled)).await;
        });
    }
    // Every block is in flight or done: what is left is the critical path.
    ctx.reader.fetch().hedger.enter_tail();
}
