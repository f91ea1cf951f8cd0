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
use super::progress::{Phase, Progress, StallEvent};
use super::{Engine, RestoreError};
use crate::block::{BlockIndex, BlockLayout};
use crate::checkpoint::{
    Checkpoint, CheckpointDir, CheckpointKey, JobIdentity, SaveCadence, TargetIdentity, checkpoint_key, unix_now_secs,
};
use crate::fetch::budget::Budget;
use crate::fetch::{FetchContext, FetchCounts, FetchTelemetry, Source, SourceFailure, fetch_block};
use crate::manifest::Manifest;
use crate::metrics as m;
use crate::store::StoreUrl;
use crate::store::limit::with_tenant;
use crate::target::{self, OpenOptionsSpec, StagingGuard, Target};

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
    /// Distinct block objects this run set out to fetch.
    pub objects_planned: u64,
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

/// How often the settler wakes to check its cadence and for stalls.
const TICK: Duration = Duration::from_millis(200);
/// Unit outcomes waiting for the settler. Units hold no block bytes while they
/// wait here (their budget is already returned), so this only bounds tasks.
const OUTCOME_QUEUE_MAX: usize = 1024;

/// Run one restore to its end.
///
/// Its store requests queue for concurrency slots as one tenant, taking turns
/// with every other restore in the process.
pub async fn restore(
    engine: &Engine,
    spec: &RestoreSpec,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<RestoreReport, RestoreError> {
    let tenant = engine.next_tenant();
    with_tenant(tenant, restore_as(engine, spec, progress, cancel, tenant)).await
}

async fn restore_as(
    engine: &Engine,
    spec: &RestoreSpec,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
    tenant: u64,
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
    let durable = Durable::open(engine, spec)?;
    let (target, checkpoint) = match allocate(spec, &manifest, durable.as_ref())? {
        Allocation::Ready { target, checkpoint } => (target, *checkpoint),
        Allocation::AlreadyRestored => {
            if let Some(d) = &durable {
                d.remove();
            }
            progress.set_phase(Phase::Online);
            return Ok(already_restored_report(spec, &manifest, progress));
        }
    };
    let mut staging = StagingGuard::new(&target);
    let blocks_resumed = checkpoint.settled().settled_count();
    if blocks_resumed == 0 {
        check_free_space(&target, &manifest)?;
    } else {
        tracing::info!(
            blocks_resumed,
            percent = 100.0 * blocks_resumed as f64 / layout.block_count() as f64,
            "resuming from checkpoint"
        );
    }
    let writer_file =
        target.file.try_clone().map_err(|e| io_error(&target, "cannot duplicate the target handle", e))?;
    let writer =
        Writer::open(writer_file, &engine.config.write).map_err(|e| io_error(&target, "cannot start the writer", e))?;

    progress.set_phase(Phase::Rehydrate);
    let plan = plan::plan(&manifest, target.fresh, |i| checkpoint.settled().is_settled(i));
    progress.blocks_total.store(layout.block_count(), Ordering::Relaxed);
    progress.bytes_total.store(layout.volume_size_bytes(), Ordering::Relaxed);
    progress.blocks_resumed.store(blocks_resumed, Ordering::Relaxed);
    progress.blocks_settled.store(blocks_resumed, Ordering::Relaxed);
    progress.bytes_settled.store(checkpoint.bytes_settled(), Ordering::Relaxed);
    let fetch = FetchContext::new(sources, &engine.config.fetch);
    let telemetry = Arc::clone(&fetch.telemetry);
    progress.attach_telemetry(Arc::clone(&telemetry));
    let blocks_zero = layout.block_count() - manifest.entries().len() as u64;
    let blocks_deduplicated = plan.blocks_deduplicated;
    let objects_planned = plan.objects();

    let mut settler =
        Settler::new(engine, &target, layout, writer.clone(), checkpoint, durable.clone(), Arc::clone(progress));
    let units = UnitContext { fetch, writer: writer.clone(), layout, tenant };
    let transfer_started = Instant::now();
    let run = settler.run(plan, units, engine.budget.clone(), cancel).await;
    let transferred = settler.transferred.unwrap_or_else(Instant::now);
    let timings = Timings {
        prepare_secs: transfer_started.duration_since(progress.started).as_secs_f64(),
        transfer_secs: transferred.duration_since(transfer_started).as_secs_f64(),
        tail_secs: settler.dispatched.map_or(0.0, |at| transferred.saturating_duration_since(at).as_secs_f64()),
        finish_secs: 0.0,
    };
    let backend = writer.backend();
    let closed = writer.close().await;
    let run = run.and_then(|()| closed.map_err(|e| io_error(&target, "closing the writer failed", e)));
    if let Err(e) = run {
        match &e {
            // Progress is real and the staging file is what the checkpoint
            // names: keep both, so a rerun resumes.
            RestoreError::Interrupted(_) if durable.is_some() => staging.disarm(),
            // Saving a checkpoint failed (the state directory, not the
            // target): the previous checkpoint names only blocks that are
            // durable in the staging file, so both stay for a rerun.
            RestoreError::Io(_) if settler.checkpoint_save_failed && durable.is_some() => staging.disarm(),
            // After EIO/ENOSPC the staging file is suspect: it goes (the guard
            // removes it) and so does the checkpoint naming it.
            RestoreError::Io(_) if target.staged => {
                if let Some(d) = &durable {
                    d.remove();
                }
            }
            _ => {}
        }
        return Err(e);
    }

    let mut report = RestoreReport {
        succeeded: false,
        manifest: spec.manifest_url.clone(),
        snapshot_digest: manifest.digest().to_hex(),
        target: spec.target.display().to_string(),
        writer_backend: Some(backend),
        blocks_total: layout.block_count(),
        blocks_settled: settler.checkpoint.settled().settled_count(),
        blocks_resumed,
        blocks_failed: settler.damage.len() as u64,
        blocks_zero,
        blocks_deduplicated,
        objects_planned,
        bytes_total: layout.volume_size_bytes(),
        bytes_written: progress.bytes_written.load(Ordering::Relaxed),
        duration_secs: 0.0,
        throughput_bytes_per_sec: 0.0,
        fetch: telemetry.counts(),
        timings,
        stalls: vec![],
        damage: std::mem::take(&mut settler.damage),
    };
    report.damage.sort_by_key(|d| d.index);
    let finish = |report: &mut RestoreReport| {
        report.stalls = progress.stall_events();
        progress.set_stalled(None);
        report.timings.finish_secs = transferred.elapsed().as_secs_f64();
        report.duration_secs = progress.started.elapsed().as_secs_f64();
        report.throughput_bytes_per_sec = report.bytes_total as f64 / report.duration_secs.max(1e-9);
    };
    if !report.damage.is_empty() {
        finish(&mut report);
        if durable.is_some() {
            // The checkpoint holds the settled and the failed blocks: a rerun
            // fetches only what is not settled.
            staging.disarm();
        }
        return Err(RestoreError::BlocksFailed(Box::new(report)));
    }
    if !settler.checkpoint.settled().is_complete() {
        // Every unit reports an outcome unless it was cancelled; whatever the
        // cause, a target with blocks neither settled nor failed is never
        // swapped into place or reported restored.
        if durable.is_some() {
            staging.disarm();
        }
        return Err(RestoreError::Interrupted(format!(
            "stopped with {} of {} blocks settled; rerun the same restore to resume",
            settler.checkpoint.settled().settled_count(),
            layout.block_count()
        )));
    }

    progress.set_phase(Phase::Swap);
    fail::fail_point!("restore-before-swap");
    target::swap(&target).map_err(|e| io_error(&target, "swap (fsync and rename into place) failed", e))?;
    staging.disarm();
    fail::fail_point!("restore-before-status");
    if let Some(d) = &durable {
        d.remove();
    }
    progress.set_phase(Phase::Online);
    report.succeeded = true;
    finish(&mut report);
    Ok(report)
}

/// Where this restore's checkpoint lives, when checkpoints are on.
#[derive(Debug, Clone)]
struct Durable {
    dir: Arc<CheckpointDir>,
    key: CheckpointKey,
}

impl Durable {
    /// Open the checkpoint directory, sweep temporaries of crashed writers,
    /// and discard this target's checkpoint on `--restart`.
    fn open(engine: &Engine, spec: &RestoreSpec) -> Result<Option<Durable>, RestoreError> {
        if !engine.config.checkpoint.enabled {
            return Ok(None);
        }
        let path = engine.config.checkpoint.resolved_dir();
        let dir = CheckpointDir::open(path.clone()).map_err(|e| {
            RestoreError::Io(format!(
                "checkpoint directory {}: {e}: set checkpoint.dir to a writable directory",
                path.display()
            ))
        })?;
        if let Err(e) = dir.sweep_temporaries() {
            tracing::warn!(dir = %path.display(), error = %e, "could not sweep checkpoint temporaries");
        }
        let durable = Durable { dir: Arc::new(dir), key: checkpoint_key(&spec.target) };
        if spec.restart {
            durable
                .dir
                .remove(&durable.key)
                .map_err(|e| RestoreError::Io(format!("discarding the checkpoint: {e}")))?;
        }
        Ok(Some(durable))
    }

    fn exists(&self) -> bool {
        self.dir.file_path(&self.key).exists()
    }

    fn save(&self, checkpoint: &Checkpoint) -> Result<(), RestoreError> {
        self.dir.save(&self.key, checkpoint).map_err(|e| {
            RestoreError::Io(format!("saving the checkpoint {}: {e}", self.dir.file_path(&self.key).display()))
        })
    }

    fn remove(&self) {
        if let Err(e) = self.dir.remove(&self.key) {
            tracing::warn!(error = %e, "could not remove the checkpoint");
        }
    }
}

enum Allocation {
    Ready {
        target: Target,
        checkpoint: Box<Checkpoint>,
    },
    /// A crash came between the swap and the final status: the target in
    /// place is the whole restore the checkpoint describes.
    AlreadyRestored,
}

/// Open the target and find the checkpoint that belongs to it: resume from
/// it, or start a new one. A checkpoint of another restore is refused and the
/// target left as it was.
fn allocate(spec: &RestoreSpec, manifest: &Manifest, durable: Option<&Durable>) -> Result<Allocation, RestoreError> {
    let layout = manifest.layout;
    let has_checkpoint = durable.is_some_and(Durable::exists);
    let identity_of = |target: TargetIdentity| JobIdentity { manifest_digest: manifest.digest(), target, layout };
    let staged = !spec.in_place && std::fs::symlink_metadata(&spec.target).map(|m| m.is_file()).unwrap_or(true);
    if let (Some(d), true, true) = (durable, has_checkpoint, staged) {
        let staging_gone = target::staging_path(&spec.target).is_some_and(|p| !p.exists());
        if staging_gone {
            return already_restored_or_refuse(spec, d, &identity_of);
        }
    }
    let target = target::open(
        &spec.target,
        OpenOptionsSpec {
            volume_size_bytes: layout.volume_size_bytes(),
            in_place: spec.in_place,
            reuse_staging: has_checkpoint,
        },
    )?;
    let identity = identity_of(target.identity);
    let checkpoint = match durable {
        Some(d) if has_checkpoint => match d.dir.load(&d.key, &identity) {
            Ok(Some(checkpoint)) => checkpoint,
            Ok(None) => Checkpoint::new(identity, unix_now_secs()),
            Err(e) => return Err(RestoreError::Refused(e.to_string())),
        },
        _ => Checkpoint::new(identity, unix_now_secs()),
    };
    if let Some(d) = durable
        && !has_checkpoint
    {
        // From now on the staging file is owned by this checkpoint; if that
        // cannot be recorded, the new staging file goes.
        if let Err(e) = d.save(&checkpoint) {
            if target.staged && target.fresh {
                let _ = std::fs::remove_file(&target.write_path);
            }
            return Err(e);
        }
    }
    Ok(Allocation::Ready { target, checkpoint: Box::new(checkpoint) })
}

fn already_restored_or_refuse(
    spec: &RestoreSpec,
    durable: &Durable,
    identity_of: &dyn Fn(TargetIdentity) -> JobIdentity,
) -> Result<Allocation, RestoreError> {
    let in_place = std::fs::File::open(&spec.target).and_then(|f| TargetIdentity::of_file(&f));
    if let Ok(found) = in_place
        && let Ok(Some(checkpoint)) = durable.dir.load(&durable.key, &identity_of(found))
        && checkpoint.settled().is_complete()
    {
        return Ok(Allocation::AlreadyRestored);
    }
    Err(RestoreError::Refused(format!(
        "a checkpoint for {} exists ({}) but its staging file is gone, so its progress cannot be resumed: rerun with --restart to restore from the beginning",
        spec.target.display(),
        durable.dir.file_path(&durable.key).display()
    )))
}

fn already_restored_report(spec: &RestoreSpec, manifest: &Manifest, progress: &Progress) -> RestoreReport {
    let layout = manifest.layout;
    RestoreReport {
        succeeded: true,
        manifest: spec.manifest_url.clone(),
        snapshot_digest: manifest.digest().to_hex(),
        target: spec.target.display().to_string(),
        writer_backend: None,
        blocks_total: layout.block_count(),
        blocks_settled: layout.block_count(),
        blocks_resumed: layout.block_count(),
        blocks_failed: 0,
        blocks_zero: layout.block_count() - manifest.entries().len() as u64,
        blocks_deduplicated: 0,
        objects_planned: 0,
        bytes_total: layout.volume_size_bytes(),
        bytes_written: 0,
        duration_secs: progress.started.elapsed().as_secs_f64(),
        throughput_bytes_per_sec: 0.0,
        fetch: FetchCounts::default(),
        timings: Timings { prepare_secs: progress.started.elapsed().as_secs_f64(), ..Timings::default() },
        stalls: vec![],
        damage: vec![],
    }
}

fn io_error(target: &Target, what: &str, e: std::io::Error) -> RestoreError {
    RestoreError::Io(format!("{}: {what}: {e}", target.write_path.display()))
}

/// A fresh file target is sparse: it needs room for the non-zero blocks.
fn check_free_space(target: &Target, manifest: &Manifest) -> Result<(), RestoreError> {
    if !target.staged {
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
    fetch: FetchContext,
    writer: Writer,
    layout: BlockLayout,
    /// The restore's tenant at the stores' concurrency gates.
    tenant: u64,
}

/// How one unit ended.
enum UnitOutcome {
    Written { blocks: Vec<BlockIndex>, bytes: u64 },
    Failed { blocks: Vec<BlockIndex>, failures: Vec<SourceFailure> },
    WriteFailed { block: BlockIndex, error: std::io::Error },
}

/// fdatasync of the target, with a fail point that injects EIO.
async fn sync_target(writer: &Writer) -> std::io::Result<()> {
    fail::fail_point!("target-sync-eio", |_| Err(std::io::Error::from_raw_os_error(libc::EIO)));
    writer.sync().await
}

/// One write, with a fail point that injects ENOSPC.
async fn write_block(writer: &Writer, offset: u64, block: &VerifiedBlock) -> std::io::Result<()> {
    fail::fail_point!("target-write-enospc", |_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
    writer.write(offset, block).await
}

async fn run_unit(ctx: &UnitContext, unit: Unit) -> UnitOutcome {
    let block = match &unit.source {
        UnitSource::Zeros { len_bytes } => VerifiedBlock::zeros(*len_bytes as usize),
        UnitSource::Object { key, expected } => {
            match fetch_block(&ctx.fetch, key, expected, unit.first_block()).await {
                Ok((block, _source)) => block,
                Err(failures) => {
                    return UnitOutcome::Failed { blocks: unit.blocks, failures };
                }
            }
        }
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
        let tenant = ctx.tenant;
        tokio::spawn(with_tenant(tenant, async move {
            let outcome = tokio::select! {
                outcome = run_unit(&ctx, unit) => outcome,
                () = cancel.cancelled() => return,
            };
            drop(permit);
            // The settler has gone only when the restore stopped: nothing to report to.
            let _ = outcomes.send(outcome).await;
        }));
    }
    // Every block is in flight or done: what is left is the critical path.
    ctx.fetch.hedger.enter_tail();
}

/// Records outcomes and turns written blocks into settled ones.
struct Settler {
    target_path: PathBuf,
    layout: BlockLayout,
    writer: Writer,
    /// Settled and failed blocks: the ledger, saved when `durable`.
    checkpoint: Checkpoint,
    durable: Option<Durable>,
    /// Failures recorded since the last save.
    dirty: bool,
    /// A checkpoint save failed: the error is the state directory's, not the
    /// target's.
    checkpoint_save_failed: bool,
    /// Written, not yet covered by a successful fdatasync.
    written: Vec<BlockIndex>,
    written_bytes_since_sync: u64,
    cadence: SaveCadence,
    last_settle: Instant,
    stall_after: Duration,
    damage: Vec<DamagedBlock>,
    progress: Arc<Progress>,
    /// When the last block was dispatched (the tail began).
    dispatched: Option<Instant>,
    /// When the last block's outcome came in.
    transferred: Option<Instant>,
}

impl Settler {
    fn new(
        engine: &Engine,
        target: &Target,
        layout: BlockLayout,
        writer: Writer,
        checkpoint: Checkpoint,
        durable: Option<Durable>,
        progress: Arc<Progress>,
    ) -> Self {
        let c = &engine.config;
        Self {
            target_path: target.write_path.clone(),
            layout,
            writer,
            checkpoint,
            durable,
            dirty: false,
            checkpoint_save_failed: false,
            written: Vec::new(),
            written_bytes_since_sync: 0,
            cadence: SaveCadence::new(c.checkpoint.interval_millis, c.checkpoint.interval_bytes, Instant::now()),
            last_settle: Instant::now(),
            stall_after: c.fetch.stall_after(),
            damage: Vec::new(),
            progress,
            dispatched: None,
            transferred: None,
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
                // Cancellation first: cancelled units stop without reporting,
                // so the outcome channel can close with blocks not done.
                biased;
                () = cancel.cancelled() => return self.interrupted(&stop).await,
                outcome = rx.recv() => match outcome {
                    Some(outcome) => self.record(outcome)?,
                    None => {
                        self.transferred = Some(Instant::now());
                        self.dispatched = ctx.fetch.hedger.tail_began();
                        break;
                    }
                },
                _ = tick.tick() => self.watch_stall(&ctx.fetch.telemetry),
            }
            if self.sync_due() {
                self.settle().await?;
            }
        }
        // Units that see the cancellation drop their outcome, and the queue
        // closes: a cancellation that races the end of the plan lands here,
        // not in the branch above, and must not pass for the end.
        if cancel.is_cancelled() {
            return self.interrupted(&stop).await;
        }
        let _ = dispatcher.await;
        if cancel.is_cancelled() {
            // Units cancelled between the last outcome and here never
            // reported: the restore is not complete.
            return self.interrupted(&stop).await;
        }
        self.settle().await
    }

    /// Stop on request: settle what was written, then report how far it got.
    async fn interrupted(&mut self, stop: &CancellationToken) -> Result<(), RestoreError> {
        stop.cancel();
        self.settle().await?;
        Err(RestoreError::Interrupted(format!(
            "stopped after settling {} of {} blocks; rerun the same restore to resume",
            self.checkpoint.settled().settled_count(),
            self.layout.block_count()
        )))
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
                let reason = failures.last().map(|f| format!("{}: {}", f.source, f.last_error)).unwrap_or_default();
                for index in blocks {
                    tracing::warn!(block = index, %reason, "block failed on every source");
                    let offset_bytes = self.layout.offset(index);
                    self.checkpoint.fail(index, &reason);
                    self.damage.push(DamagedBlock { index, offset_bytes, failures: failures.clone() });
                }
                self.dirty = true;
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
        !self.written.is_empty() && self.cadence.due(Instant::now(), self.written_bytes_since_sync)
    }

    /// fdatasync, then count every block written before it as settled, then
    /// save the checkpoint. The order is the invariant: a checkpoint never
    /// names a block that was not durable when it was written.
    async fn settle(&mut self) -> Result<(), RestoreError> {
        if self.written.is_empty() {
            return self.save_if_dirty();
        }
        fail::fail_point!("settle-before-sync");
        let started = Instant::now();
        sync_target(&self.writer).await.map_err(|e| {
            RestoreError::Io(format!(
                "{}: fdatasync failed: {e}; blocks written since the last successful sync are not counted as restored",
                self.target_path.display()
            ))
        })?;
        metrics::counter!(m::SYNCS_TOTAL).increment(1);
        metrics::histogram!(m::SYNC_LATENCY_SECONDS).record(started.elapsed().as_secs_f64());
        let blocks = self.written.len() as u64;
        let bytes: u64 = self.written.iter().map(|&i| u64::from(self.layout.len(i))).sum();
        self.checkpoint.settle_many(self.written.drain(..));
        metrics::counter!(m::SETTLED_BLOCKS_TOTAL).increment(blocks);
        metrics::counter!(m::SETTLED_BYTES_TOTAL).increment(bytes);
        self.progress.blocks_settled.fetch_add(blocks, Ordering::Relaxed);
        let settled = self.progress.bytes_settled.fetch_add(bytes, Ordering::Relaxed) + bytes;
        metrics::gauge!(m::PROGRESS_RATIO).set(settled as f64 / self.layout.volume_size_bytes() as f64);
        self.written_bytes_since_sync = 0;
        self.last_settle = Instant::now();
        self.progress.set_stalled(None);
        fail::fail_point!("settle-before-checkpoint");
        self.dirty = true;
        self.save_if_dirty()
    }

    fn save_if_dirty(&mut self) -> Result<(), RestoreError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(durable) = &self.durable {
            self.checkpoint.set_updated_unix_secs(unix_now_secs());
            if let Err(e) = durable.save(&self.checkpoint) {
                self.checkpoint_save_failed = true;
                return Err(e);
            }
        }
        self.cadence.saved(Instant::now());
        self.dirty = false;
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
                "nothing settled for {:.1}s; oldest block in flight: {} on {} (attempt {}, for {:.1}s)",
                quiet.as_secs_f64(),
                f.block,
                f.source,
                f.attempts,
                f.started.elapsed().as_secs_f64()
            ),
            None => {
                format!(
                    "nothing settled for {:.1}s; no block in flight (waiting on budget or writer)",
                    quiet.as_secs_f64()
                )
            }
        };
        if self.progress.stalled().is_none() {
            tracing::warn!(%reason, "restore stalled");
        }
        self.progress.set_stalled(Some(reason));
    }
}
