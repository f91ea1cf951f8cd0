//! What a restore reports: the summary of a run ([`RestoreReport`]), where
//! its time went ([`Timings`]) and the blocks no source could serve
//! ([`DamagedBlock`]).

use std::time::Instant;

use serde::Serialize;

use super::phases::RestoreSpec;
use super::progress::{Progress, StallEvent};
use crate::block::{BlockIndex, BlockRange};
use crate::fetch::{FetchCounts, SourceFailure};
use crate::snapshot::Snapshot;
use crate::write::Backend;

/// A block that no source could serve, with each source's last error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DamagedBlock {
    pub index: BlockIndex,
    pub offset_bytes: u64,
    pub failures: Vec<SourceFailure>,
}

/// The summary of a restore run.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub succeeded: bool,
    pub manifest: String,
    pub snapshot_digest: String,
    pub target: String,
    /// The blocks this restore covers (`--blocks`; every block of the volume
    /// otherwise). The counts and bytes below are of these blocks.
    pub block_range: BlockRange,
    /// Whether that is the whole volume.
    pub whole_volume: bool,
    pub writer_backend: Option<Backend>,
    pub blocks_total: u64,
    pub blocks_settled: u64,
    pub blocks_resumed: u64,
    pub blocks_failed: u64,
    pub blocks_zero: u64,
    pub blocks_deduplicated: u64,
    /// Distinct block objects this run set out to fetch.
    pub objects_planned: u64,
    /// Of those, objects the background restore did not fetch because the
    /// volume's client (`--export`) had made every block of them local by
    /// reading or writing it, or read it on demand first. The objects served
    /// (`fetch.served_by_source`), the failed ones and these are the
    /// objects planned. 0 without an export.
    pub objects_from_export: u64,
    pub bytes_total: u64,
    pub bytes_written: u64,
    pub duration_secs: f64,
    pub throughput_bytes_per_sec: f64,
    pub fetch: FetchCounts,
    /// Where the time went.
    pub timings: Timings,
    /// Times the restore was flagged stalled, and why.
    pub stalls: Vec<StallEvent>,
    pub damage: Vec<DamagedBlock>,
}

/// Where a restore's time went, in seconds. `prepare`, `transfer` and
/// `finish` add up to the duration; `tail` is the end of `transfer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Reading the manifest, opening the sources, allocating the target.
    pub prepare_secs: f64,
    /// Fetching, verifying and writing every block.
    pub transfer_secs: f64,
    /// The end of the transfer: from the last block dispatched to the last
    /// one written. A long tail means a few slow blocks held the restore up.
    pub tail_secs: f64,
    /// The last fdatasync, the checkpoint and the swap into place.
    pub finish_secs: f64,
}

impl RestoreReport {
    /// A report of restoring the blocks `blocks` of `snapshot` as `spec`
    /// asks, with nothing done yet.
    pub(super) fn of(spec: &RestoreSpec, snapshot: &dyn Snapshot, blocks: BlockRange) -> Self {
        let layout = snapshot.layout();
        let stored = if blocks.is_all(&layout) {
            snapshot.blocks_stored()
        } else {
            snapshot.blocks().filter(|b| blocks.contains(b.index)).count() as u64
        };
        RestoreReport {
            succeeded: false,
            manifest: spec.manifest_url.clone(),
            snapshot_digest: snapshot.digest().to_hex(),
            target: spec.target.display().to_string(),
            block_range: blocks,
            whole_volume: blocks.is_all(&layout),
            writer_backend: None,
            blocks_total: blocks.len(),
            blocks_settled: 0,
            blocks_resumed: 0,
            blocks_failed: 0,
            blocks_zero: blocks.len() - stored,
            blocks_deduplicated: 0,
            objects_planned: 0,
            objects_from_export: 0,
            bytes_total: blocks.bytes(&layout),
            bytes_written: 0,
            duration_secs: 0.0,
            throughput_bytes_per_sec: 0.0,
            fetch: FetchCounts::default(),
            timings: Timings::default(),
            stalls: vec![],
            damage: vec![],
        }
    }

    /// Stamp how the run ended: its stalls, the finish time, the duration
    /// and the throughput.
    pub(super) fn stamp(&mut self, progress: &Progress, transferred: Instant) {
        self.stalls = progress.stall_events();
        progress.set_stalled(None);
        self.timings.finish_secs = transferred.elapsed().as_secs_f64();
        self.duration_secs = progress.started.elapsed().as_secs_f64();
        self.throughput_bytes_per_sec = self.bytes_total as f64 / self.duration_secs.max(1e-9);
    }
}

/// A crash came between the swap and the final status: the target in place
/// is already the whole restore.
pub(super) fn already_restored_report(
    spec: &RestoreSpec,
    snapshot: &dyn Snapshot,
    progress: &Progress,
) -> RestoreReport {
    let blocks_total = snapshot.layout().block_count();
    let blocks = BlockRange::all(&snapshot.layout());
    RestoreReport {
        succeeded: true,
        blocks_settled: blocks_total,
        blocks_resumed: blocks_total,
        duration_secs: progress.started.elapsed().as_secs_f64(),
        timings: Timings { prepare_secs: progress.started.elapsed().as_secs_f64(), ..Timings::default() },
        ..RestoreReport::of(spec, snapshot, blocks)
    }
}
