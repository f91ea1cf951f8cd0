//! The settler: records unit outcomes and turns written blocks into settled
//! ones (fdatasync first, then the checkpoint: `docs/architecture.md`
//! invariant 3), gives each unit's [`UnsettledGate`] permit back only then
//! (so a slow fdatasync holds the dispatcher back instead of letting written,
//! unsettled work pile up: invariant 9), and flags the restore stalled when nothing settles, or when
//! a client read of the exported volume has waited for one block longer
//! than `fetch.stall_after_millis`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::allocate::Durable;
use super::live::{FlushRequest, LiveVolume};
use super::pipeline::{Gates, Reported, UnitContext, UnitOutcome, dispatch};
use super::plan::Plan;
use super::progress::Progress;
use super::report::DamagedBlock;
use super::unsettled::{UnsettledGate, UnsettledPermit};
use super::{Engine, RestoreError};
use crate::block::{BlockIndex, BlockLayout};
use crate::checkpoint::{Checkpoint, SaveCadence, unix_now_secs};
use crate::fetch::FetchTelemetry;
use crate::fetch::budget::Budget;
use crate::metrics as m;
use crate::target::Target;
use crate::write::Writer;

/// How often the settler wakes to check its cadence and for stalls.
const TICK: Duration = Duration::from_millis(200);
/// Unit outcomes waiting for the settler. Units hold no block bytes while they
/// wait here (their budget is already returned), and their written bytes are
/// bounded by the unsettled gate, so this only bounds tasks.
const OUTCOME_QUEUE_MAX: usize = 1024;

/// Records outcomes and turns written blocks into settled ones.
pub(super) struct Settler {
    pub(super) target_path: PathBuf,
    pub(super) layout: BlockLayout,
    pub(super) writer: Writer,
    /// Settled and failed blocks: the ledger, saved when `durable`.
    pub(super) checkpoint: Checkpoint,
    pub(super) durable: Option<Durable>,
    /// Failures recorded since the last save.
    pub(super) dirty: bool,
    /// A checkpoint save failed: the error is the state directory's, not the
    /// target's.
    pub(super) checkpoint_save_failed: bool,
    /// Written, not yet covered by a successful fdatasync.
    pub(super) written: Vec<BlockIndex>,
    pub(super) written_bytes_since_sync: u64,
    /// Bounds what is written and not yet settled.
    pub(super) gate: UnsettledGate,
    /// Permits of the units recorded and not yet settled: given back to the
    /// gate once the checkpoint naming their blocks is saved.
    pub(super) unsettled: Vec<UnsettledPermit>,
    pub(super) unsettled_bytes: u64,
    pub(super) cadence: SaveCadence,
    pub(super) last_settle: Instant,
    pub(super) stall_after: Duration,
    pub(super) damage: Vec<DamagedBlock>,
    pub(super) progress: Arc<Progress>,
    /// When the last block was dispatched (the tail began).
    pub(super) dispatched: Option<Instant>,
    /// When the last block's outcome came in.
    pub(super) transferred: Option<Instant>,
    /// FLUSHes of an exported volume ([`super::live`]).
    pub(super) flushes: Option<mpsc::Receiver<FlushRequest>>,
    /// The exported volume, whose reads waiting for blocks are watched.
    pub(super) live: Option<Arc<LiveVolume>>,
}

/// The next FLUSH, or never when the volume is not exported.
async fn recv_flush(flushes: &mut Option<mpsc::Receiver<FlushRequest>>) -> Option<FlushRequest> {
    match flushes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Settler {
    pub(super) fn new(
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
            gate: UnsettledGate::new(c.checkpoint.unsettled_bytes_max(c.fetch.inflight_bytes_max.get())),
            unsettled: Vec::new(),
            unsettled_bytes: 0,
            cadence: SaveCadence::new(c.checkpoint.interval_millis, c.checkpoint.interval_bytes, Instant::now()),
            last_settle: Instant::now(),
            stall_after: c.fetch.stall_after(),
            damage: Vec::new(),
            progress,
            dispatched: None,
            transferred: None,
            flushes: None,
            live: None,
        }
    }

    pub(super) async fn run(
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
        let gates = Gates { budget, unsettled: self.gate.clone() };
        let dispatcher = tokio::spawn(dispatch(plan.units, gates, Arc::clone(&ctx), tx, stop.clone()));
        let _stop_on_exit = stop.clone().drop_guard();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flushes = self.flushes.take();
        loop {
            tokio::select! {
                // Cancellation first: cancelled units stop without reporting,
                // so the outcome channel can close with blocks not done.
                biased;
                () = cancel.cancelled() => return self.interrupted(&stop).await,
                // A client waits on its FLUSH: before the outcomes.
                Some(flush) = recv_flush(&mut flushes) => self.flush(flush).await,
                outcome = rx.recv() => match outcome {
                    Some(outcome) => self.record(outcome)?,
                    None => {
                        self.transferred = Some(Instant::now());
                        self.dispatched = ctx.reader.fetch().hedger.tail_began();
                        break;
                    }
                },
                _ = tick.tick() => self.watch_stall(&ctx.reader.fetch().telemetry),
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

    /// A client's FLUSH: its blocks settle with everything written so far
    /// (fdatasync, then the checkpoint), then it is answered. A failure
    /// fails the FLUSH; the restore goes on and settles on its cadence.
    async fn flush(&mut self, flush: FlushRequest) {
        self.written.extend(flush.owned);
        let result = if self.written.is_empty() {
            // Nothing to settle, but a FLUSH still means an fdatasync.
            sync_target(&self.writer).await.map_err(|e| e.to_string())
        } else {
            self.settle().await.map_err(|e| e.to_string())
        };
        let _ = flush.done.send(result);
    }

    /// Stop on request: settle what was written, then report how far it got.
    pub(super) async fn interrupted(&mut self, stop: &CancellationToken) -> Result<(), RestoreError> {
        stop.cancel();
        self.settle().await?;
        Err(RestoreError::Interrupted(format!(
            "stopped after settling {} of {} blocks; rerun the same restore to resume",
            self.checkpoint.settled().settled_count(),
            self.checkpoint.settled().block_count()
        )))
    }

    pub(super) fn record(&mut self, (outcome, permit): Reported) -> Result<(), RestoreError> {
        match outcome {
            UnitOutcome::Written { blocks, bytes } => {
                if bytes > 0 {
                    self.unsettled_bytes += permit.bytes();
                    self.unsettled.push(permit);
                }
                self.written_bytes_since_sync += bytes;
                self.progress.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                metrics::counter!(m::WRITTEN_BYTES_TOTAL).increment(bytes);
                self.written.extend(blocks);
            }
            UnitOutcome::Failed { blocks, failures, local } => {
                self.written.extend(local);
                // A block settled meanwhile (the client's, flushed) is not failed.
                let blocks: Vec<_> = blocks.into_iter().filter(|&i| !self.checkpoint.settled().is_settled(i)).collect();
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

    /// On the cadence, counting what units hold in the gate too (a unit
    /// that skipped blocks a client wrote holds more than it wrote); and at
    /// once when the dispatcher waits on a full gate, never for the clock.
    pub(super) fn sync_due(&self) -> bool {
        let bytes = self.written_bytes_since_sync.max(self.unsettled_bytes);
        !self.written.is_empty() && (self.gate.is_waited_on() || self.cadence.due(Instant::now(), bytes))
    }

    /// fdatasync, then count every block written before it as settled, then
    /// save the checkpoint. The order is the invariant: a checkpoint never
    /// names a block that was not durable when it was written.
    pub(super) async fn settle(&mut self) -> Result<(), RestoreError> {
        if self.written.is_empty() {
            return self.save_if_dirty().await;
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
        // A block can be reported twice (written by the client, flushed,
        // then passed by the background restore): count it once.
        let mut blocks = 0;
        let mut bytes = 0;
        for index in std::mem::take(&mut self.written) {
            if self.checkpoint.settle(index) {
                blocks += 1;
                bytes += u64::from(self.layout.len(index));
            }
        }
        metrics::counter!(m::SETTLED_BLOCKS_TOTAL).increment(blocks);
        metrics::counter!(m::SETTLED_BYTES_TOTAL).increment(bytes);
        self.progress.blocks_settled.fetch_add(blocks, Ordering::Relaxed);
        let settled = self.progress.bytes_settled.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let bytes_total = self.checkpoint.settled().blocks().bytes(&self.layout);
        metrics::gauge!(m::PROGRESS_RATIO).set(settled as f64 / bytes_total.max(1) as f64);
        self.written_bytes_since_sync = 0;
        self.last_settle = Instant::now();
        // Settling ends a quiet stall, not a client read's wait.
        self.progress.set_stalled(self.read_stall());
        fail::fail_point!("settle-before-checkpoint");
        self.dirty = true;
        self.save_if_dirty().await?;
        self.release_settled();
        Ok(())
    }

    /// The blocks recorded so far are settled and named by the saved
    /// checkpoint: their units' room in the gate goes back to the dispatcher.
    fn release_settled(&mut self) {
        self.unsettled.clear();
        self.unsettled_bytes = 0;
    }

    pub(super) async fn save_if_dirty(&mut self) -> Result<(), RestoreError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some(durable) = &self.durable {
            self.checkpoint.set_updated_unix_secs(unix_now_secs());
            // A save writes, fsyncs and renames a file: it waits on a
            // blocking thread, not on one of the runtime's workers, which
            // the restore's fetches need (two of them on a 2-core machine).
            let (durable, checkpoint) = (durable.clone(), self.checkpoint.clone());
            let saved = tokio::task::spawn_blocking(move || durable.save(&checkpoint))
                .await
                .unwrap_or_else(|e| Err(RestoreError::Io(format!("saving the checkpoint: {e}"))));
            if let Err(e) = saved {
                self.checkpoint_save_failed = true;
                return Err(e);
            }
        }
        self.cadence.saved(Instant::now());
        self.dirty = false;
        Ok(())
    }

    /// Flag the restore stalled when a client read has waited for a block
    /// longer than the stall threshold (naming it), or when nothing has
    /// settled for that long (naming the oldest block in flight).
    pub(super) fn watch_stall(&self, telemetry: &FetchTelemetry) {
        metrics::gauge!(m::INFLIGHT_ATTEMPTS_MAX).set(f64::from(telemetry.attempts_max_inflight()));
        let reason = self.read_stall().or_else(|| self.quiet_stall(telemetry));
        match reason {
            Some(reason) => {
                if self.progress.stalled().is_none() {
                    tracing::warn!(%reason, "restore stalled");
                }
                self.progress.set_stalled(Some(reason));
            }
            // A read's wait that ended clears its flag; a quiet stall ends
            // when something settles.
            None if (self.quiet_for() < self.stall_after || !self.written.is_empty())
                && self.progress.stalled().is_some_and(|r| r.starts_with(READ_STALL_PREFIX)) =>
            {
                self.progress.set_stalled(None);
            }
            None => {}
        }
    }

    fn quiet_for(&self) -> Duration {
        self.last_settle.elapsed()
    }

    /// A client read waiting on one block longer than the threshold.
    fn read_stall(&self) -> Option<String> {
        let wait = self.live.as_ref()?.oldest_wait().filter(|w| w.waited >= self.stall_after)?;
        Some(format!(
            "{READ_STALL_PREFIX} for block {} (offset {}) for {:.1}s ({} read{} waiting on it); it is being fetched on demand",
            wait.block,
            self.layout.offset(wait.block),
            wait.waited.as_secs_f64(),
            wait.readers,
            if wait.readers == 1 { "" } else { "s" },
        ))
    }

    /// Nothing settled for the threshold, naming the oldest block in flight.
    fn quiet_stall(&self, telemetry: &FetchTelemetry) -> Option<String> {
        let quiet = self.quiet_for();
        if quiet < self.stall_after || !self.written.is_empty() {
            return None;
        }
        Some(match telemetry.oldest_inflight() {
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
        })
    }
}

/// How a stall reason about a client read begins.
const READ_STALL_PREFIX: &str = "a client read has waited";

/// fdatasync of the target, with fail points that inject EIO and a slow
/// disk (`target-sync-slow=return(MILLIS)`: the sync takes that much longer).
pub(super) async fn sync_target(writer: &Writer) -> std::io::Result<()> {
    fail::fail_point!("target-sync-eio", |_| Err(std::io::Error::from_raw_os_error(libc::EIO)));
    #[cfg(feature = "failpoints")]
    if let Some(millis) = fail::eval("target-sync-slow", |arg| arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(1000))
    {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    writer.sync().await
}
