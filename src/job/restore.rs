//! One restore, phase by phase: validate → allocate → rehydrate → swap →
//! online.
//!
//! The rehydrate phase is three loops joined by bounded queues:
//!
//! - the **dispatcher** walks the plan in block order, takes each unit's bytes
//!   from the process-wide in-flight budget (waiting when it is spent) and
//!   spawns the unit;
//! - each **unit** task fetches its object from the first source that serves
//!   it ([`crate::fetch`]), verifies it, writes it at every offset that holds
//!   it, gives its bytes back to the budget and reports the outcome;
//! - the **settler** (this function's loop) records outcomes, and on its
//!   cadence calls fdatasync and only then counts the written blocks as
//!   settled. It also watches for stalls.
//!
//! A unit that fails on every source is recorded in the damage report and the
//! rest of the restore goes on; the job fails at the end, naming those
//! blocks, and the target is not swapped into place. A failed write or
//! fdatasync stops the restore at once: nothing written since the last
//! successful fdatasync is counted as settled.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plan::{self, Plan, Unit, UnitSource};
use super::progress::{Phase, Progress};
use super::{Engine, RestoreError};
use crate::block::{BlockIndex, BlockLayout};
use crate::checkpoint::SettledSet;
use crate::fetch::budget::Budget;
use crate::fetch::{FetchCounts, FetchTelemetry, RetryPolicy, Source, SourceFailure, fetch_block};
use crate::manifest::Manifest;
use crate::metrics as m;
use crate::store::StoreUrl;
use crate::target::{self, OpenOptionsSpec, StagingGuard, Target, TargetKind};
use crate::verify::VerifiedBlock;
use crate::write::{Backend, Writer};

/// What to restore, where from, where to.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    pub manifest_url: String,
    pub target: PathBuf,
    /// Fallback sources in order, after the manifest's own store.
    pub secondaries: Vec<String>,
    /// Write an existing regular file in place instead of staging it.
    pub in_place: bool,
    /// Discard a checkpoint of an earlier run instead of resuming it.
    pub restart: bool,
}

/// A block that no source could serve, with each source's last error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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
    pub writer_backend: Option<Backend>,
    pub blocks_total: u64,
    pub blocks_settled: u64,
    pub blocks_resumed: u64,
    pub blocks_failed: u64,
    pub blocks_zero: u64,
    pub blocks_deduplicated: u64,
    pub bytes_total: u64,
    pub bytes_written: u64,
    pub duration_secs: f64,
    pub throughput_bytes_per_sec: f64,
    pub fetch: FetchCounts,
    pub damage: Vec<DamagedBlock>,
}

/// How often the settler wakes to check its cadence and for stalls.
const TICK: Duration = Duration::from_millis(200);
/// Unit outcomes waiting for the settler. Units hold no block bytes while they
/// wait here (their budget is already returned), so this only bounds tasks.
const OUTCOME_QUEUE_MAX: usize = 1024;

/// Run one restore to its end.
pub async fn restore(
    engine: &Engine,
    spec: &RestoreSpec,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<RestoreReport, RestoreError> {
    progress.set_phase(Phase::Validate);
    let (store_url, manifest_key) =
        StoreUrl::parse_manifest(&spec.manifest_url).map_err(|e| RestoreError::Usage(e.to_string()))?;
    let primary = engine.open_store(&store_url).await?;
    let manifest = super::load_manifest(engine, &primary, &manifest_key).await?;
    let mut stores = vec![primary];
    for url in &spec.secondaries {
        let url = StoreUrl::parse(url).map_err(|e| RestoreError::Usage(e.to_string()))?;
        stores.push(engine.open_store(&url).await?);
    }
    let sources = Source::ordered(stores);

    progress.set_phase(Phase::Allocate);
    let layout = manifest.layout;
    let target = target::open(
        &spec.target,
        OpenOptionsSpec {
            volume_size_bytes: layout.volume_size_bytes(),
            in_place: spec.in_place,
            reuse_staging: false,
        },
    )?;
    let mut staging = StagingGuard::new(&target);
    check_free_space(&target, &manifest)?;
    let writer_file =
        target.file.try_clone().map_err(|e| io_error(&target, "cannot duplicate the target handle", e))?;
    let writer = Writer::open(writer_file, &engine.config.writer())
        .map_err(|e| io_error(&target, "cannot start the writer", e))?;

    progress.set_phase(Phase::Rehydrate);
    let settled = SettledSet::new(layout.block_count());
    let plan = plan::plan(&manifest, target.fresh, |i| settled.is_settled(i));
    progress.blocks_total.store(layout.block_count(), Ordering::Relaxed);
    progress.bytes_total.store(layout.volume_size_bytes(), Ordering::Relaxed);
    let telemetry = Arc::new(FetchTelemetry::new(&sources));
    progress.attach_telemetry(Arc::clone(&telemetry));
    let blocks_zero = (layout.block_count() - manifest.entries().len() as u64) as u64;
    let blocks_deduplicated = plan.blocks_deduplicated;

    let mut settler = Settler::new(engine, &target, layout, writer.clone(), settled, Arc::clone(progress));
    let units = UnitContext {
        sources,
        policy: RetryPolicy::from_config(&engine.config.fetch),
        telemetry: Arc::clone(&telemetry),
        writer: writer.clone(),
        layout,
    };
    let run = settler.run(plan, units, engine.budget.clone(), cancel).await;
    let backend = writer.backend();
    let closed = writer.close().await;
    run?;
    closed.map_err(|e| io_error(&target, "closing the writer failed", e))?;

    let mut report = RestoreReport {
        succeeded: false,
        manifest: spec.manifest_url.clone(),
        snapshot_digest: manifest.digest().to_hex(),
        target: spec.target.display().to_string(),
        writer_backend: Some(backend),
        blocks_total: layout.block_count(),
        blocks_settled: settler.settled.settled_count(),
        blocks_resumed: 0,
        blocks_failed: settler.damage.len() as u64,
        blocks_zero,
        blocks_deduplicated,
        bytes_total: layout.volume_size_bytes(),
        bytes_written: progress.bytes_written.load(Ordering::Relaxed),
        duration_secs: 0.0,
        throughput_bytes_per_sec: 0.0,
        fetch: telemetry.counts(),
        damage: std::mem::take(&mut settler.damage),
    };
    report.damage.sort_by_key(|d| d.index);
    let finish = |report: &mut RestoreReport| {
        report.duration_secs = progress.started.elapsed().as_secs_f64();
        report.throughput_bytes_per_sec = report.bytes_total as f64 / report.duration_secs.max(1e-9);
    };
    if !report.damage.is_empty() {
        finish(&mut report);
        return Err(RestoreError::BlocksFailed(Box::new(report)));
    }
    debug_assert_eq!(report.blocks_settled, report.blocks_total, "succeeded with blocks unsettled");

    progress.set_phase(Phase::Swap);
    target::swap(&target).map_err(|e| io_error(&target, "swap (fsync and rename into place) failed", e))?;
    staging.disarm();
    progress.set_phase(Phase::Online);
    report.succeeded = true;
    finish(&mut report);
    Ok(report)
}

fn io_error(target: &Target, what: &str, e: std::io::Error) -> RestoreError {
    RestoreError::Io(format!("{}: {what}: {e}", target.write_path.display()))
}

/// A fresh file target is sparse: it needs room for the non-zero blocks.
fn check_free_space(target: &Target, manifest: &Manifest) -> Result<(), RestoreError> {
    if target.kind != TargetKind::File {
        return Ok(());
    }
    let needed = manifest.block_bytes_total();
    let free = target::free_bytes(&target::parent_dir(&target.path))
        .map_err(|e| io_error(target, "cannot read free space", e))?;
    if free < needed {
        return Err(RestoreError::Refused(format!(
            "{}: the restore needs {needed} bytes of free space, the filesystem has {free}: free space or choose another target",
            target.path.display()
        )));
    }
    Ok(())
}

/// What every unit task shares.
struct UnitContext {
    sources: Vec<Source>,
    policy: RetryPolicy,
    telemetry: Arc<FetchTelemetry>,
    writer: Writer,
    layout: BlockLayout,
}

/// How one unit ended.
enum UnitOutcome {
    Written { blocks: Vec<BlockIndex>, bytes: u64 },
    Failed { blocks: Vec<BlockIndex>, failures: Vec<SourceFailure> },
    WriteFailed { block: BlockIndex, error: std::io::Error },
}

async fn run_unit(ctx: &UnitContext, unit: Unit) -> UnitOutcome {
    let block = match &unit.source {
        UnitSource::Zeros { len_bytes } => VerifiedBlock::zeros(*len_bytes as usize),
        UnitSource::Object { key, expected } => {
            match fetch_block(&ctx.sources, key, expected, unit.first_block(), &ctx.policy, &ctx.telemetry).await {
                Ok((block, _source)) => block,
                Err(failures) => {
                    return UnitOutcome::Failed { blocks: unit.blocks, failures };
                }
            }
        }
    };
    let mut bytes = 0;
    for &index in &unit.blocks {
        if let Err(error) = ctx.writer.write(ctx.layout.offset(index), &block).await {
            return UnitOutcome::WriteFailed { block: index, error };
        }
        bytes += block.len() as u64;
    }
    UnitOutcome::Written { blocks: unit.blocks, bytes }
}

/// Walk the plan in order, each unit waiting for its bytes in the budget.
async fn dispatch(
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
}

/// Records outcomes and turns written blocks into settled ones.
struct Settler {
    target_path: PathBuf,
    layout: BlockLayout,
    writer: Writer,
    settled: SettledSet,
    /// Written, not yet covered by a successful fdatasync.
    written: Vec<BlockIndex>,
    written_bytes_since_sync: u64,
    last_sync: Instant,
    last_settle: Instant,
    sync_interval: Duration,
    sync_interval_bytes: u64,
    stall_after: Duration,
    damage: Vec<DamagedBlock>,
    progress: Arc<Progress>,
}

impl Settler {
    fn new(
        engine: &Engine,
        target: &Target,
        layout: BlockLayout,
        writer: Writer,
        settled: SettledSet,
        progress: Arc<Progress>,
    ) -> Self {
        let c = &engine.config;
        Self {
            target_path: target.write_path.clone(),
            layout,
            writer,
            settled,
            written: Vec::new(),
            written_bytes_since_sync: 0,
            last_sync: Instant::now(),
            last_settle: Instant::now(),
            sync_interval: c.checkpoint.interval(),
            sync_interval_bytes: c.checkpoint.interval_bytes.get(),
            stall_after: c.fetch.stall_after(),
            damage: Vec::new(),
            progress,
        }
    }

    async fn run(
        &mut self,
        plan: Plan,
        units: UnitContext,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(), RestoreError> {
        // A fresh target holds zeros already: those blocks settle with the
        // first fdatasync, which also makes the file's size durable.
        self.written.extend(plan.zero_free.iter().copied());
        let ctx = Arc::new(units);
        let (tx, mut rx) = mpsc::channel(OUTCOME_QUEUE_MAX);
        let stop = cancel.child_token();
        let dispatcher = tokio::spawn(dispatch(plan.units, budget, Arc::clone(&ctx), tx, stop.clone()));
        let _stop_on_exit = stop.clone().drop_guard();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                outcome = rx.recv() => match outcome {
                    Some(outcome) => self.record(outcome)?,
                    None => break,
                },
                _ = tick.tick() => self.watch_stall(&ctx.telemetry),
                () = cancel.cancelled() => {
                    stop.cancel();
                    self.settle().await?;
                    return Err(RestoreError::Interrupted(format!(
                        "stopped after settling {} of {} blocks; rerun the same restore to resume",
                        self.settled.settled_count(),
                        self.layout.block_count()
                    )));
                }
            }
            if self.sync_due() {
                self.settle().await?;
            }
        }
        let _ = dispatcher.await;
        self.settle().await
    }

    fn record(&mut self, outcome: UnitOutcome) -> Result<(), RestoreError> {
        match outcome {
            UnitOutcome::Written { blocks, bytes } => {
                self.written_bytes_since_sync += bytes;
                self.progress.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                metrics::counter!(m::WRITTEN_BYTES_TOTAL).increment(bytes);
                self.written.extend(blocks);
            }
            UnitOutcome::Failed { blocks, failures } => {
                metrics::counter!(m::FAILED_BLOCKS_TOTAL).increment(blocks.len() as u64);
                self.progress.blocks_failed.fetch_add(blocks.len() as u64, Ordering::Relaxed);
                for index in blocks {
                    tracing::warn!(block = index, "block failed on every source");
                    let offset_bytes = self.layout.offset(index);
                    self.damage.push(DamagedBlock { index, offset_bytes, failures: failures.clone() });
                }
            }
            UnitOutcome::WriteFailed { block, error } => {
                return Err(RestoreError::Io(format!(
                    "{}: writing block {block} at offset {} failed: {error}",
                    self.target_path.display(),
                    self.layout.offset(block)
                )));
            }
        }
        Ok(())
    }

    fn sync_due(&self) -> bool {
        !self.written.is_empty()
            && (self.written_bytes_since_sync >= self.sync_interval_bytes
                || self.last_sync.elapsed() >= self.sync_interval)
    }

    /// fdatasync, then count every block written before it as settled.
    async fn settle(&mut self) -> Result<(), RestoreError> {
        if self.written.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        self.writer.sync().await.map_err(|e| {
            RestoreError::Io(format!(
                "{}: fdatasync failed: {e}; blocks written since the last successful sync are not counted as restored",
                self.target_path.display()
            ))
        })?;
        metrics::counter!(m::SYNCS_TOTAL).increment(1);
        metrics::histogram!(m::SYNC_LATENCY_SECONDS).record(started.elapsed().as_secs_f64());
        let mut bytes = 0;
        let blocks = self.written.len() as u64;
        for index in self.written.drain(..) {
            self.settled.settle(index);
            bytes += u64::from(self.layout.len(index));
        }
        metrics::counter!(m::SETTLED_BLOCKS_TOTAL).increment(blocks);
        metrics::counter!(m::SETTLED_BYTES_TOTAL).increment(bytes);
        self.progress.blocks_settled.fetch_add(blocks, Ordering::Relaxed);
        self.progress.bytes_settled.fetch_add(bytes, Ordering::Relaxed);
        self.written_bytes_since_sync = 0;
        self.last_sync = Instant::now();
        self.last_settle = self.last_sync;
        self.progress.set_stalled(None);
        Ok(())
    }

    /// Flag the restore stalled when nothing has settled for a while, naming
    /// the oldest block in flight.
    fn watch_stall(&self, telemetry: &FetchTelemetry) {
        metrics::gauge!(m::INFLIGHT_ATTEMPTS_MAX).set(f64::from(telemetry.attempts_max_inflight()));
        let quiet = self.last_settle.elapsed();
        if quiet < self.stall_after || !self.written.is_empty() {
            return;
        }
        let reason = match telemetry.oldest_inflight() {
            Some(f) => format!(
                "nothing settled for {}s; oldest block in flight: {} on {} (attempt {}, for {}s)",
                quiet.as_secs(),
                f.block,
                f.source,
                f.attempts,
                f.started.elapsed().as_secs()
            ),
            None => {
                format!("nothing settled for {}s; no block in flight (waiting on budget or writer)", quiet.as_secs())
            }
        };
        if self.progress.stalled().is_none() {
            tracing::warn!(%reason, "restore stalled");
        }
        self.progress.set_stalled(Some(reason));
    }
}
