//! One restore, phase by phase: validate → allocate → rehydrate → swap →
//! online.
//!
//! The rehydrate phase is three loops joined by bounded queues:
//!
//! - the **dispatcher** ([`super::pipeline`]) walks the plan in block order,
//!   takes each unit's bytes from the process-wide in-flight budget (waiting
//!   when it is spent) and spawns the unit;
//! - each **unit** task gets its block through [`super::read::BlockReader`]
//!   (snapshot lookup, fetch from the first source that serves it, verify),
//!   writes it at every offset that holds it, gives its bytes back to the
//!   budget and reports the outcome;
//! - the **settler** ([`super::settler`]) records outcomes, and on its
//!   cadence calls fdatasync and only then counts the written blocks as
//!   settled (`docs/architecture.md`, invariant 3). It also watches for
//!   stalls.
//!
//! The allocate phase and resuming from a checkpoint are
//! [`super::allocate`]'s; what a run reports is [`super::report`]'s.
//!
//! A unit that fails on every source is recorded in the damage report and the
//! rest of the restore goes on; the job fails at the end, naming those
//! blocks, and the target is not swapped into place. A failed write or
//! fdatasync stops the restore at once: nothing written since the last
//! successful fdatasync is counted as settled.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::plan::{self};
use super::progress::{Phase, Progress};
use super::source::{Purpose, open_snapshot};
use super::{Engine, RestoreError};
use crate::block::{BlockIndex, BlockRange, BlockSelection};
use crate::checkpoint::Checkpoint;
use crate::fetch::{FetchContext, FetchTelemetry, Source};
use crate::peer::holdings::{HeldBits, Holding};
use crate::snapshot::Snapshot;
use crate::snapshot::longhorn::lock::RestoreLock;
use crate::store::StoreUrl;
use crate::target::{self, StagingGuard, Target};
use crate::write::{Backend, Writer};

use super::allocate::{Allocated, Durable, allocate_phase, io_error};
use super::live::{FlushRequest, LiveVolume};
use super::pipeline::UnitContext;
use super::read::{BlockReader, DemandLane};
use super::report::{RestoreReport, Timings, already_restored_report};
use super::settler::Settler;

/// What to restore, where from, where to.
#[derive(Debug, Clone)]
pub struct RestoreSpec {
    pub manifest_url: String,
    pub target: PathBuf,
    /// Fallback sources in order, after the manifest's own store.
    pub secondaries: Vec<String>,
    /// Peer workers (`http://host:port`), asked for each block before the
    /// stores (`crate::peer`).
    pub peers: Vec<String>,
    /// Write an existing regular file in place instead of staging it.
    pub in_place: bool,
    /// Discard a checkpoint of an earlier run instead of resuming it.
    pub restart: bool,
    /// Restore only these blocks (a shard, `--blocks`), in place: the target
    /// must be a block device or `in_place`. `None`: the whole volume.
    pub blocks: Option<BlockSelection>,
    /// The worker job this restore runs for, named to a second restore of
    /// the same target when it is refused.
    pub job: Option<String>,
}

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
    let run =
        Run { engine, progress, cancel, tenant: engine.next_tenant(), publish: None, live_file: None, held: None };
    restore_as(spec, run).await
}

/// Hands the volume being restored to whoever serves it (an NBD export).
pub type Publish = Arc<dyn Fn(Arc<LiveVolume>) + Send + Sync>;

/// Run one restore to its end, serving the volume while it runs: `publish`
/// gets the [`LiveVolume`] once the manifest is validated and the target
/// allocated, before any block is fetched.
///
/// A file target is written in place (created when missing): the client
/// writes it, so there is no staging file to swap. The checkpoint stays
/// after the restore completes: it records that every block is the
/// snapshot's or the client's, so a rerun never restores over the client's
/// writes (`--restart` discards it).
pub async fn restore_live(
    engine: &Engine,
    spec: &RestoreSpec,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
    publish: Publish,
) -> Result<RestoreReport, RestoreError> {
    let spec = RestoreSpec { in_place: true, ..spec.clone() };
    let run = Run {
        engine,
        progress,
        cancel,
        tenant: engine.next_tenant(),
        publish: Some(publish),
        live_file: None,
        held: None,
    };
    restore_as(&spec, run).await
}

async fn restore_as(spec: &RestoreSpec, run: Run<'_>) -> Result<RestoreReport, RestoreError> {
    run.progress.set_phase(Phase::Validate);
    let (validated, lock) = validate(run.engine, spec, run.tenant).await?;
    let result = restore_validated(spec, run, validated).await;
    // Longhorn's restore lock goes on every exit: done, failed, cancelled.
    if let Some(lock) = lock {
        lock.release().await;
    }
    result
}

/// What validate found: the snapshot, its sources and the blocks to restore.
type Validated = (Arc<dyn Snapshot>, Vec<Source>, BlockRange);

async fn restore_validated(
    spec: &RestoreSpec,
    mut run: Run<'_>,
    (snapshot, sources, blocks): Validated,
) -> Result<RestoreReport, RestoreError> {
    let (engine, progress) = (run.engine, run.progress);
    // Held to the end of this function, whichever way it ends.
    // A served volume holds it too, for as long as it is served.
    let held = Arc::new(lock_target(spec, blocks, &snapshot.layout())?);
    run.held = Some(Arc::clone(&held));
    if run.publish.is_some() && std::fs::symlink_metadata(&spec.target).is_err() {
        // An exported file is written in place: create it (allocate sizes it).
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&spec.target)
            .map_err(|e| RestoreError::Io(format!("{}: cannot create the target: {e}", spec.target.display())))?;
    }

    progress.set_phase(Phase::Allocate);
    let durable = Durable::open(engine, spec, blocks, &snapshot.layout())?;
    let Some(Allocated { target, checkpoint, mut staging, writer }) =
        allocate_phase(engine, spec, &*snapshot, blocks, durable.as_ref(), run.publish.is_some()).await?
    else {
        if let Some(d) = &durable {
            d.remove();
        }
        progress.set_phase(Phase::Online);
        return Ok(already_restored_report(spec, &*snapshot, progress));
    };

    if run.publish.is_some() {
        let file = target.file.try_clone().map_err(|e| io_error(&target, "cannot duplicate the target handle", e))?;
        run.live_file = Some(Arc::new(file));
    }
    progress.set_phase(Phase::Rehydrate);
    let blocks_resumed = checkpoint.settled().settled_count();
    let mut transfer = rehydrate(&run, &snapshot, sources, &target, checkpoint, writer, durable.clone()).await;
    if let Err(e) = std::mem::replace(&mut transfer.result, Ok(())) {
        keep_or_discard(&e, &transfer.settler, durable.as_ref(), &mut staging, &target);
        return Err(e);
    }
    let report = report_of(spec, &*snapshot, progress, &mut transfer, blocks_resumed);
    // An exported volume keeps its checkpoint: see `restore_live`.
    let durable = durable.filter(|_| run.publish.is_none());
    conclude(report, &transfer, &target, staging, durable.as_ref(), progress)
}

/// What the rehydrate phase reads of the restore it belongs to.
struct Run<'a> {
    engine: &'a Engine,
    progress: &'a Arc<Progress>,
    cancel: &'a CancellationToken,
    /// The restore's tenant at the stores' concurrency gates.
    tenant: u64,
    /// Serve the volume while it is restored.
    publish: Option<Publish>,
    /// The target, for the served volume's reads and writes.
    live_file: Option<Arc<File>>,
    /// The target's lock, handed to the served volume.
    held: Option<Arc<target::TargetLock>>,
}

/// Validate: open the snapshot the URL names (a rehydrate manifest, a
/// Longhorn backup: `super::source`) and its store, open the secondaries,
/// and find the blocks to restore. From here on the restore sees a
/// [`Snapshot`]. A Longhorn restore also gets Longhorn's restore lock, to
/// release when it ends.
async fn validate(
    engine: &Engine,
    spec: &RestoreSpec,
    tenant: u64,
) -> Result<(Validated, Option<RestoreLock>), RestoreError> {
    if spec.blocks.is_some() {
        check_shard_target(spec)?;
    }
    if spec.manifest_url.starts_with(crate::store::EBS_SCHEME) {
        return Ok((validate_ebs(engine, spec, tenant).await?, None));
    }
    let opened = open_snapshot(engine, &spec.manifest_url, tenant, Purpose::Restore).await?;
    let lock = opened.lock;
    let sources = async {
        let layout = opened.snapshot.layout();
        let blocks = match spec.blocks {
            Some(selection) => selection.resolve(&layout).map_err(RestoreError::Usage)?,
            None => BlockRange::all(&layout),
        };
        let mut stores = vec![opened.primary];
        for url in &spec.secondaries {
            let url = StoreUrl::parse(url).map_err(|e| RestoreError::Usage(e.to_string()))?;
            stores.push(engine.open_store(&url).await?);
        }
        let order = crate::peer::fleet_order(&spec.peers, engine.config.peers.fleet_index);
        let peers = order.iter().map(|url| engine.open_peer(url)).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, RestoreError>((Source::peers_then(peers, stores), blocks))
    };
    match sources.await {
        Ok((sources, blocks)) => Ok(((opened.snapshot, sources, blocks), lock)),
        Err(e) => {
            if let Some(lock) = lock {
                lock.release().await;
            }
            Err(e)
        }
    }
}

/// Take the target for this restore (its blocks, for a shard) before
/// anything is written or discarded: a second restore of it is refused here,
/// and so is `--restart` while another restore holds it.
fn lock_target(
    spec: &RestoreSpec,
    blocks: BlockRange,
    layout: &crate::block::BlockLayout,
) -> Result<target::TargetLock, RestoreError> {
    let shard = (!blocks.is_all(layout)).then_some((blocks.start, blocks.end));
    target::lock(&spec.target, shard, spec.job.as_deref()).map_err(|e| match e {
        target::LockError::Busy { .. } => RestoreError::Busy(e.to_string()),
        target::LockError::Io { .. } => RestoreError::Io(e.to_string()),
    })
}

/// Validate an EBS snapshot (`super::ebs`): list it. Its secondaries are
/// rehydrate snapshots of the same volume (`super::ebs::secondary`).
async fn validate_ebs(
    engine: &Engine,
    spec: &RestoreSpec,
    tenant: u64,
) -> Result<(Arc<dyn Snapshot>, Vec<Source>, BlockRange), RestoreError> {
    let (snapshot, store) = super::ebs::open(engine, &spec.manifest_url).await?;
    let blocks = match spec.blocks {
        Some(selection) => selection.resolve(&snapshot.layout()).map_err(RestoreError::Usage)?,
        None => BlockRange::all(&snapshot.layout()),
    };
    let mut sources = Source::ordered(vec![store]);
    for url in &spec.secondaries {
        sources.push(super::ebs::secondary(engine, &snapshot, url, sources.len(), tenant).await?);
    }
    Ok((snapshot, sources, blocks))
}

/// Shards (`--blocks`) write one target side by side, so none may stage it
/// and swap it into place under the others: the target must be a block
/// device, or an existing file written `--in-place`.
fn check_shard_target(spec: &RestoreSpec) -> Result<(), RestoreError> {
    use std::os::unix::fs::FileTypeExt;
    let device = std::fs::metadata(&spec.target).is_ok_and(|m| m.file_type().is_block_device());
    if spec.in_place || device {
        return Ok(());
    }
    Err(RestoreError::Usage(format!(
        "--blocks restores {} in place, beside the other shards: give a block device, or --in-place with a file created beforehand (truncate -s <volume size>)",
        spec.target.display()
    )))
}

/// How the rehydrate phase ended.
struct Transfer {
    result: Result<(), RestoreError>,
    settler: Settler,
    timings: Timings,
    backend: Backend,
    telemetry: Arc<FetchTelemetry>,
    blocks_deduplicated: u64,
    objects_planned: u64,
    /// When the last block's outcome came in.
    transferred: Instant,
}

/// Rehydrate: fetch, verify and write every block not settled yet, settling
/// on the checkpoint's cadence; then close the writer.
async fn rehydrate(
    run: &Run<'_>,
    snapshot: &Arc<dyn Snapshot>,
    sources: Vec<Source>,
    target: &Target,
    checkpoint: Checkpoint,
    writer: Writer,
    durable: Option<Durable>,
) -> Transfer {
    let (engine, progress) = (run.engine, run.progress);
    let layout = snapshot.layout();
    let blocks = checkpoint.settled().blocks();
    let mut plan = plan::plan(&**snapshot, blocks, target.fresh, |i| checkpoint.settled().is_settled(i));
    let peers = sources.iter().filter(|s| s.peer).count();
    if peers > 0 {
        // A fleet started together fetches different blocks first.
        let start = crate::peer::fleet_start(plan.units.len(), engine.config.peers.fleet_index, peers + 1);
        plan.units.rotate_left(start);
    }
    progress.blocks_total.store(blocks.len(), Ordering::Relaxed);
    progress.bytes_total.store(blocks.bytes(&layout), Ordering::Relaxed);
    let blocks_resumed = checkpoint.settled().settled_count();
    progress.blocks_resumed.store(blocks_resumed, Ordering::Relaxed);
    progress.blocks_settled.store(blocks_resumed, Ordering::Relaxed);
    progress.bytes_settled.store(checkpoint.bytes_settled(), Ordering::Relaxed);
    let fetch = FetchContext::new(sources, &engine.config.fetch).for_tenant(run.tenant);
    let telemetry = Arc::clone(&fetch.telemetry);
    progress.attach_telemetry(Arc::clone(&telemetry));
    let (blocks_deduplicated, objects_planned) = (plan.blocks_deduplicated, plan.objects());

    let reader = BlockReader::new(Arc::clone(snapshot), fetch);
    let (reader, live, flushes) = match (&run.publish, &run.live_file) {
        (Some(publish), Some(file)) => {
            let (reader, live, flushes) = go_live(run, reader, target, file, &checkpoint, publish);
            (reader, Some(live), Some(flushes))
        }
        _ => (Arc::new(reader), None, None),
    };
    // An exported volume's blocks may become the client's: never served.
    let holding = match run.publish {
        None => hold(engine, snapshot, target, &checkpoint, &plan.zero_free, &telemetry),
        Some(_) => None,
    };
    let mut settler = Settler::new(engine, target, layout, writer.clone(), checkpoint, durable, Arc::clone(progress));
    settler.flushes = flushes;
    settler.live = live.clone();
    let held = holding.as_ref().map(|(_, bits)| Arc::clone(bits));
    let units = UnitContext { reader, live: live.clone(), writer: writer.clone(), layout, held };
    let transfer_started = Instant::now();
    let result = settler.run(plan, units, engine.budget.clone(), run.cancel).await;
    let complete = result.is_ok() && settler.damage.is_empty() && settler.checkpoint.settled().is_complete();
    if let Some((holding, _)) = holding.filter(|_| !complete) {
        // Ended short: its target may be swept or replaced.
        engine.holdings.withdraw(&holding);
    }
    if let Some(live) = live {
        live.finish(result.is_ok());
    }
    let transferred = settler.transferred.unwrap_or_else(Instant::now);
    let timings = Timings {
        prepare_secs: transfer_started.duration_since(progress.started).as_secs_f64(),
        transfer_secs: transferred.duration_since(transfer_started).as_secs_f64(),
        tail_secs: settler.dispatched.map_or(0.0, |at| transferred.saturating_duration_since(at).as_secs_f64()),
        finish_secs: 0.0,
    };
    let backend = writer.backend();
    let closed = writer.close().await;
    let result = result.and_then(|()| closed.map_err(|e| io_error(target, "closing the writer failed", e)));
    Transfer { result, settler, timings, backend, telemetry, blocks_deduplicated, objects_planned, transferred }
}

/// Offer this restore's blocks to peers (`crate::peer::holdings`): a read
/// handle on the target and the held bits, set here for the blocks settled
/// before (and the zeros a fresh target holds), then by each unit as its
/// write completes; a block it is fetching from its store is waited for.
fn hold(
    engine: &Engine,
    snapshot: &Arc<dyn Snapshot>,
    target: &Target,
    checkpoint: &Checkpoint,
    zeros: &[BlockIndex],
    fetches: &Arc<FetchTelemetry>,
) -> Option<(Arc<Holding>, Arc<HeldBits>)> {
    if !engine.config.peers.serve {
        return None;
    }
    let file = match File::open(&target.write_path) {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(target = %target.write_path.display(), error = %e, "not served to peers: cannot open the target to read");
            return None;
        }
    };
    let settled = checkpoint.settled();
    let bits = Arc::new(HeldBits::new(settled.blocks()));
    for index in settled.blocks().start..settled.blocks().end {
        if settled.is_settled(index) {
            bits.set(index);
        }
    }
    zeros.iter().for_each(|&index| bits.set(index));
    let label = target.write_path.display().to_string();
    let mut holding =
        Holding::new(label, Arc::clone(snapshot), file, Arc::clone(&bits)).with_fetches(Arc::clone(fetches));
    if let Some(direct) = open_direct_reads(&target.write_path) {
        holding = holding.with_direct(direct);
    }
    let holding = Arc::new(holding);
    engine.holdings.hold(Arc::clone(&holding));
    Some((holding, bits))
}

/// `path` opened for reading with `O_DIRECT`, where its filesystem allows
/// (not tmpfs): peers' reads of whole blocks then skip the page cache.
fn open_direct_reads(path: &std::path::Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT | libc::O_CLOEXEC).open(path).ok()
}

/// Make the volume live: demand reads get their lane, the volume is built
/// over the target (local: what is settled, and zero blocks of a fresh
/// file) and handed to `publish`.
fn go_live(
    run: &Run<'_>,
    reader: BlockReader,
    target: &Target,
    file: &Arc<File>,
    checkpoint: &Checkpoint,
    publish: &Publish,
) -> (Arc<BlockReader>, Arc<LiveVolume>, mpsc::Receiver<FlushRequest>) {
    // Demand fetches are a tenant of their own at the stores' gates.
    let fetch = FetchContext::new(reader.fetch().sources.clone(), &run.engine.config.fetch)
        .for_tenant(run.engine.next_tenant())
        .for_demand();
    let lane = DemandLane { budget: run.engine.budget.clone(), fetch };
    let reader = Arc::new(reader.with_demand_lane(lane));
    // A FLUSH waits for its answer: a short queue is enough.
    let (tx, rx) = mpsc::channel(16);
    let snapshot = Arc::clone(reader.snapshot());
    let settled = checkpoint.settled();
    let local = |i| settled.is_settled(i) || (target.fresh && snapshot.block(i).is_none());
    let live = Arc::new_cyclic(|this| {
        let mut live = LiveVolume::new(Arc::clone(&reader), Arc::clone(file), tx, local, this.clone());
        live.target_lock = run.held.clone();
        live
    });
    publish(Arc::clone(&live));
    (reader, live, rx)
}

/// A failed rehydrate phase: keep the staging file and the checkpoint when
/// they can be resumed, discard them when they are suspect.
fn keep_or_discard(
    e: &RestoreError,
    settler: &Settler,
    durable: Option<&Durable>,
    staging: &mut StagingGuard,
    target: &Target,
) {
    match e {
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
            if let Some(d) = durable {
                d.remove();
            }
        }
        _ => {}
    }
}

/// The end of a rehydrate phase that ran to completion: fail with the damage
/// report, or stop short, or swap the target into place and go online.
fn conclude(
    mut report: RestoreReport,
    transfer: &Transfer,
    target: &Target,
    mut staging: StagingGuard,
    durable: Option<&Durable>,
    progress: &Progress,
) -> Result<RestoreReport, RestoreError> {
    if !report.damage.is_empty() {
        report.stamp(progress, transfer.transferred);
        if durable.is_some() {
            // The checkpoint holds the settled and the failed blocks: a rerun
            // fetches only what is not settled.
            staging.disarm();
        }
        return Err(RestoreError::BlocksFailed(Box::new(report)));
    }
    let settled = transfer.settler.checkpoint.settled();
    if !settled.is_complete() {
        // Every unit reports an outcome unless it was cancelled; whatever the
        // cause, a target with blocks neither settled nor failed is never
        // swapped into place or reported restored.
        if durable.is_some() {
            staging.disarm();
        }
        return Err(RestoreError::Interrupted(format!(
            "stopped with {} of {} blocks settled; rerun the same restore to resume",
            settled.settled_count(),
            report.blocks_total
        )));
    }

    progress.set_phase(Phase::Swap);
    fail::fail_point!("restore-before-swap");
    if target.staged && !target::names_file(&target.write_path, &target.file) {
        // Another process replaced the staging file: renaming the path now
        // would put its bytes in place under this restore's report.
        return Err(RestoreError::Busy(format!(
            "{} is no longer the file this restore wrote (another process replaced or removed it): the target {} was not swapped into place and this restore reports nothing restored",
            target.write_path.display(),
            target.path.display()
        )));
    }
    target::swap(target).map_err(|e| io_error(target, "swap (fsync and rename into place) failed", e))?;
    staging.disarm();
    fail::fail_point!("restore-before-status");
    if let Some(d) = durable {
        d.remove();
    }
    progress.set_phase(Phase::Online);
    report.succeeded = true;
    report.stamp(progress, transfer.transferred);
    Ok(report)
}

/// The report of a rehydrate phase that ran to completion, before
/// [`RestoreReport::stamp`].
fn report_of(
    spec: &RestoreSpec,
    snapshot: &dyn Snapshot,
    progress: &Progress,
    transfer: &mut Transfer,
    blocks_resumed: u64,
) -> RestoreReport {
    let blocks = transfer.settler.checkpoint.settled().blocks();
    let mut report = RestoreReport {
        writer_backend: Some(transfer.backend),
        blocks_settled: transfer.settler.checkpoint.settled().settled_count(),
        blocks_resumed,
        blocks_failed: transfer.settler.damage.len() as u64,
        blocks_deduplicated: transfer.blocks_deduplicated,
        objects_planned: transfer.objects_planned,
        objects_from_export: transfer
            .settler
            .live
            .as_ref()
            .map_or(0, |live| live.counts.objects_from_export.load(Ordering::Relaxed)),
        bytes_written: progress.bytes_written.load(Ordering::Relaxed),
        fetch: transfer.telemetry.counts(),
        timings: transfer.timings,
        damage: std::mem::take(&mut transfer.settler.damage),
        ..RestoreReport::of(spec, snapshot, blocks)
    };
    report.damage.sort_by_key(|d| d.index);
    report
}
