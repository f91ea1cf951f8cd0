//! The scheduler: starts queued jobs that pass their gates, runs each as a
//! restore, stores how each run ended (compare-and-set on the run), and
//! publishes the job gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::checkpoint::unix_now_secs;
use crate::job::{JobDbError, JobRecord, JobState, RunSummary};
use crate::restore::progress::{Phase, Progress};
use crate::restore::{RestoreError, RestoreReport, RestoreSpec};

impl Worker {
    pub(super) async fn schedule_loop(self: Arc<Self>) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            if let Err(e) = self.schedule_once().await {
                tracing::error!(error = %e, "scheduling failed; retrying");
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(SCHEDULE_TICK) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Start every queued job that passes its gates, while there is room,
    /// oldest first. The manifests the gates need are read a round's worth
    /// at once and the jobs that pass start in one commit: a burst of
    /// submissions starts together, not one store round trip and one sync
    /// apart.
    pub(super) async fn schedule_once(self: &Arc<Self>) -> Result<(), JobDbError> {
        // A removed target's space is freed before the gates look at it.
        self.engine.holdings.drop_unlinked();
        let records = self.store.list()?;
        self.publish_gauges(&records);
        let now = Instant::now();
        let mut queued = records.into_iter().filter(|r| {
            r.state == JobState::Queued && self.live().held.get(&r.spec.id).is_none_or(|h| h.next_try <= now)
        });
        let mut starting: Vec<JobRecord> = Vec::new();
        let mut reserved = Vec::new();
        let mut never = Vec::new();
        loop {
            let room = self.config.jobs_running_max.get().saturating_sub(self.live().running.len() + starting.len());
            let round: Vec<JobRecord> = queued.by_ref().take(room).collect();
            if self.shutdown.is_cancelled() || round.is_empty() {
                break;
            }
            self.learn_needs(&round).await;
            for record in round {
                match self.gate(&record, &mut reserved) {
                    Gate::Pass => starting.push(record),
                    Gate::Hold(reason) => self.hold(&record.spec.id, reason),
                    Gate::Never(reason) => never.push((record, reason)),
                }
            }
        }
        if self.shutdown.is_cancelled() || (starting.is_empty() && never.is_empty()) {
            return Ok(());
        }
        // Record changes commit with fsync: off the async threads.
        let worker = Arc::clone(self);
        let _ = tokio::task::spawn_blocking(move || {
            for (record, reason) in never {
                worker.fail_queued(&record, reason);
            }
            worker.start_runs(starting);
        })
        .await;
        Ok(())
    }

    /// Set the gauges an operator watches from the job table and the running
    /// restores (the scheduler does so every tick; `/metrics` just before it
    /// renders).
    pub fn publish_metrics(&self) -> Result<(), JobDbError> {
        let records = self.store.list()?;
        self.publish_gauges(&records);
        Ok(())
    }

    /// Settled over total bytes of each running job, by job id (0 until its
    /// manifest is read). Bounded by `jobs_running_max`.
    pub fn running_progress(&self) -> Vec<RunningGauges> {
        let live = self.live();
        let mut out: Vec<RunningGauges> = live
            .running
            .iter()
            .map(|(id, run)| {
                let p = run.progress.snapshot();
                let throughput = p.bytes_written as f64 / p.elapsed_secs.max(1e-3);
                let left = p.bytes_total.saturating_sub(p.bytes_settled) as f64;
                RunningGauges {
                    job: id.clone(),
                    progress_ratio: progress_ratio(&run.progress),
                    elapsed_secs: p.elapsed_secs,
                    eta_secs: (throughput > 0.0).then(|| left / throughput),
                }
            })
            .collect();
        out.sort_by(|a, b| a.job.cmp(&b.job));
        out
    }

    /// Jobs by state, the queue's oldest job, and over running restores: the
    /// stalled ones, blocks still pending, the oldest block in flight.
    pub(super) fn publish_gauges(&self, records: &[JobRecord]) {
        use crate::metrics as m;
        for state in [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
            let n = records.iter().filter(|r| r.state == state).count();
            metrics::gauge!(m::JOBS, "state" => state.name()).set(n as f64);
        }
        let now = unix_now_secs();
        let oldest_queued_secs = records
            .iter()
            .filter(|r| r.state == JobState::Queued)
            .map(|r| now.saturating_sub(r.queued_unix_secs.unwrap_or(r.created_unix_secs)))
            .max()
            .unwrap_or(0);
        metrics::gauge!(m::OLDEST_QUEUED_JOB_AGE_SECONDS).set(oldest_queued_secs as f64);
        let live = self.live();
        let running = || live.running.values().map(|r| &r.progress);
        let stalled = running().filter(|p| p.stalled().is_some()).count();
        metrics::gauge!(m::STALLED_RESTORES).set(stalled as f64);
        metrics::gauge!(m::PENDING_BLOCKS).set(running().map(|p| pending_blocks(p)).sum::<u64>() as f64);
        let oldest_inflight = running()
            .filter_map(|p| p.telemetry().and_then(|t| t.oldest_inflight()))
            .map(|f| f.started.elapsed())
            .max()
            .unwrap_or_default();
        metrics::gauge!(m::OLDEST_INFLIGHT_BLOCK_AGE_SECONDS).set(oldest_inflight.as_secs_f64());
    }

    pub(super) fn hold(&self, id: &str, reason: String) {
        let base = Duration::from_millis(self.config.gate_backoff_millis.get());
        let cap = Duration::from_millis(self.config.gate_backoff_max_millis.get());
        let mut live = self.live();
        let backoff = live.held.get(id).map_or(base, |h| (h.backoff * 2).min(cap));
        if live.held.get(id).is_none_or(|h| h.reason != reason) {
            tracing::info!(job = %id, %reason, "job held by a gate");
        }
        live.held.insert(id.to_owned(), Hold { reason, next_try: Instant::now() + backoff, backoff });
    }

    pub(super) fn fail_queued(&self, record: &JobRecord, reason: String) {
        let mut live = self.live();
        let id = &record.spec.id;
        let result = self.store.transition(id, &[JobState::Queued], None, |r| {
            r.state = JobState::Failed;
            r.reason = Some(reason.clone());
            r.finished_unix_secs = Some(unix_now_secs());
        });
        live.held.remove(id);
        live.needs.remove(id);
        match result {
            Ok(_) => tracing::warn!(job = %id, %reason, "job failed before it started"),
            Err(e) => tracing::info!(job = %id, error = %e, "job changed before it could be failed"),
        }
    }

    /// Queued → running (compare-and-set, one commit for all of them), then
    /// spawn their runs.
    pub(super) fn start_runs(self: &Arc<Self>, records: Vec<JobRecord>) {
        let records: Vec<_> = records
            .into_iter()
            .filter_map(|r| Some((crate::job::spec::resolve(&r.spec, &self.config).ok()?, r)))
            .collect();
        if records.is_empty() {
            return;
        }
        let ids: Vec<&str> = records.iter().map(|(_, r)| r.spec.id.as_str()).collect();
        let mut live = self.live();
        let started = self.store.transition_each(&ids, &[JobState::Queued], |r| {
            r.state = JobState::Running;
            r.run += 1;
            r.restart_pending = false;
            r.phase = Some(Phase::Validate);
            r.reason = None;
            r.started_unix_secs = Some(unix_now_secs());
        });
        let started = match started {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(error = %e, jobs = ?ids, "jobs could not start; retrying");
                return;
            }
        };
        let mut launches = Vec::new();
        for ((resolved, queued), started) in records.iter().zip(started) {
            let id = &queued.spec.id;
            let record = match started {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(job = %id, error = %e, "job changed before it could start");
                    continue;
                }
            };
            let run = Running {
                run: record.run,
                cancel: self.shutdown.child_token(),
                progress: Arc::new(Progress::default()),
                target: record.spec.target.clone(),
                needs: live.needs.remove(id),
            };
            live.held.remove(id);
            live.busy_targets.insert(record.spec.target.clone(), id.clone());
            launches.push((
                record,
                resolved.clone(),
                queued.restart_pending,
                run.cancel.clone(),
                Arc::clone(&run.progress),
            ));
            live.running.insert(id.clone(), run);
        }
        drop(live);
        for (record, resolved, restart, cancel, progress) in launches {
            self.launch(record, resolved, restart, cancel, progress);
        }
    }

    fn launch(
        self: &Arc<Self>,
        record: JobRecord,
        resolved: crate::job::spec::ResolvedSpec,
        restart: bool,
        cancel: CancellationToken,
        progress: Arc<Progress>,
    ) {
        let id = record.spec.id.clone();
        tracing::info!(job = %id, run = record.run, target = %record.spec.target.display(), "job started");
        let spec = RestoreSpec {
            manifest_url: resolved.manifest_url,
            target: resolved.target,
            secondaries: resolved.secondaries,
            peers: resolved.peers,
            in_place: false,
            restart,
            blocks: None,
            job: Some(id),
        };
        let worker = Arc::clone(self);
        if let Some(plan) = resolved.export {
            self.tasks.spawn(worker.run_exported(record, spec, plan, progress, cancel));
            return;
        }
        self.tasks.spawn(async move {
            // Its own task, so a panic in the restore still ends the run
            // (the job fails, the target is released) instead of the worker.
            let engine = Arc::clone(&worker.engine);
            let watched = Arc::clone(&progress);
            let result = tokio::spawn(async move { crate::restore::restore(&engine, &spec, &watched, &cancel).await })
                .await
                .map_err(|e| format!("internal error: the restore task ended abnormally: {e}"));
            worker.finish_blocking(record, result, progress, false).await;
        });
    }

    /// Store a run's outcome, compare-and-set on the run: if the job was
    /// cancelled or replaced meanwhile, its status stays what that decided.
    /// `keep_target`: the target stays busy (its export serves on).
    pub(super) fn finish_run(
        &self,
        record: &JobRecord,
        result: Result<Result<RestoreReport, RestoreError>, String>,
        progress: &Progress,
        keep_target: bool,
    ) {
        let id = &record.spec.id;
        let shutting_down = self.shutdown.is_cancelled();
        let phase = progress.phase();
        let result = match result {
            Ok(result) => result,
            Err(internal) => {
                tracing::error!(job = %id, error = %internal, "restore task failed");
                Err(RestoreError::Io(internal))
            }
        };
        let (state, reason, summary, damage) = match result {
            Ok(report) => (JobState::Succeeded, None, Some(summary_of(&report)), Vec::new()),
            Err(RestoreError::BlocksFailed(report)) => {
                let reason = RestoreError::BlocksFailed(report.clone()).to_string();
                let mut damage = report.damage.clone();
                damage.truncate(crate::job::DAMAGE_RECORDED_MAX);
                (JobState::Failed, Some(reason), Some(summary_of(&report)), damage)
            }
            Err(RestoreError::Interrupted(why)) if shutting_down => (
                JobState::Queued,
                Some(format!("the worker shut down ({why}); resumes at the next start")),
                None,
                Vec::new(),
            ),
            Err(RestoreError::Interrupted(why)) => (JobState::Cancelled, Some(why), None, Vec::new()),
            Err(e) => (JobState::Failed, Some(e.to_string()), None, Vec::new()),
        };
        let mut live = self.live();
        let stored = self.store.transition(id, &[JobState::Running], Some(record.run), |r| {
            r.state = state;
            r.phase = Some(phase);
            r.reason = reason.clone();
            r.damage = damage;
            if summary.is_some() {
                r.summary = summary;
            }
            if state == JobState::Queued {
                r.queued_unix_secs = Some(unix_now_secs());
            } else {
                r.finished_unix_secs = Some(unix_now_secs());
            }
        });
        if live.running.get(id).is_some_and(|r| r.run == record.run) {
            live.running.remove(id);
        }
        if !keep_target && live.busy_targets.get(&record.spec.target) == Some(id) {
            live.busy_targets.remove(&record.spec.target);
        }
        drop(live);
        match stored {
            Ok(_) => tracing::info!(job = %id, run = record.run, state = state.name(), reason = ?reason, "run ended"),
            Err(e) => {
                tracing::info!(job = %id, run = record.run, error = %e, "run ended; its job had changed, status kept")
            }
        }
        self.wake.notify_one();
    }
}

/// The per-job series of one running job.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningGauges {
    pub job: String,
    pub progress_ratio: f64,
    pub elapsed_secs: f64,
    /// `None` until the job has written a byte.
    pub eta_secs: Option<f64>,
}

pub(super) fn progress_ratio(progress: &Progress) -> f64 {
    let total = progress.bytes_total.load(Ordering::Relaxed);
    let settled = progress.bytes_settled.load(Ordering::Relaxed);
    if total == 0 { 0.0 } else { (settled as f64 / total as f64).min(1.0) }
}

/// Blocks of a running restore neither settled nor failed yet.
pub(super) fn pending_blocks(progress: &Progress) -> u64 {
    let total = progress.blocks_total.load(Ordering::Relaxed);
    let done = progress.blocks_settled.load(Ordering::Relaxed) + progress.blocks_failed.load(Ordering::Relaxed);
    total.saturating_sub(done)
}

pub(super) fn summary_of(report: &RestoreReport) -> RunSummary {
    let bytes_settled = if report.blocks_settled == report.blocks_total { report.bytes_total } else { 0 };
    RunSummary {
        blocks_total: report.blocks_total,
        blocks_settled: report.blocks_settled,
        blocks_failed: report.blocks_failed,
        blocks_resumed: report.blocks_resumed,
        bytes_total: report.bytes_total,
        bytes_settled,
        bytes_written: report.bytes_written,
        duration_secs: report.duration_secs,
        throughput_bytes_per_sec: report.throughput_bytes_per_sec,
        fetch: report.fetch.clone(),
    }
}
