//! Worker: many restores at once, submitted over HTTP (`api.rs`), recorded in
//! a job database, resumed after a restart.
//!
//! In: [`JobSpec`]s (checked against the configuration by [`spec`]) and cancel
//! requests. Out: restores run through one shared [`Engine`] (so the in-flight
//! byte budget and per-store rate limits hold across jobs) and a
//! [`JobStatus`] per job.
//!
//! - **Records**: every state change is a compare-and-set on the stored record
//!   ([`store`]). A runner's final status is compare-and-set on the run it
//!   started, so a cancelled or replaced run never sets a status.
//! - **Scheduling**: one loop starts queued jobs, oldest first, up to
//!   `worker.jobs_running_max`. Before a job starts it must pass its gates:
//!   the previous run on its target has stopped, and the target's filesystem
//!   has room for what is still to be written plus `worker.target_free_bytes_min`.
//!   A held job is skipped (the jobs behind it go on) and looked at again with
//!   doubling backoff; its status names the gate. A job that can never fit
//!   (needs more than the filesystem's size) fails at once.
//! - **Replacement and resume**: a restore derives its work from its target's
//!   checkpoint, so a replacing job, a resubmitted cancelled job and a job
//!   resumed after a restart all take over what earlier runs settled.
//! - **Startup sweep**: before the scheduler starts, staging files under the
//!   target roots that no checkpoint owns (leaked by crashed restores that
//!   cannot resume) are removed; staging files a checkpoint owns are kept
//!   for the job that resumes them.
//! - **Shutdown**: [`Worker::shutdown`] stops taking jobs, cancels running ones
//!   (they settle and checkpoint) and stores them as `queued`, so the next
//!   start resumes them.
//!
//! Limits: `jobs_queued_max` (submissions beyond it are refused),
//! `jobs_running_max`, `jobs_records_max`; every wait is bounded (the
//! scheduler wakes at least every [`SCHEDULE_TICK`]).

pub mod spec;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checkpoint::unix_now_secs;
use crate::config::WorkerConfig;
use crate::job::progress::{Phase, Progress};
use crate::job::{DamagedBlock, Engine, RestoreError, RestoreReport, RestoreSpec};
pub use spec::{JobSpec, SpecError};
pub use store::{JobRecord, JobState, JobStore, RunSummary, StoreError};

/// The scheduler looks at the queue at least this often (held jobs' backoff
/// is checked on this tick).
pub const SCHEDULE_TICK: Duration = Duration::from_millis(250);

/// The worker: the job table, the scheduler and the running restores.
pub struct Worker {
    engine: Arc<Engine>,
    config: WorkerConfig,
    store: JobStore,
    /// What runs now. Every record write happens under this lock, so a state
    /// change and the matching change of `Live` are one step.
    live: Mutex<Live>,
    wake: Notify,
    accepting: AtomicBool,
    /// Parent of every run's cancellation token.
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("store", &self.store).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Live {
    running: HashMap<String, Running>,
    /// Targets a runner task still writes (it may outlive its job's state:
    /// a cancelled run settles before it stops).
    busy_targets: HashMap<PathBuf, String>,
    held: HashMap<String, Hold>,
    /// Bytes a queued job's restore needs, from its manifest, by job id.
    needs: HashMap<String, u64>,
}

struct Running {
    run: u64,
    cancel: CancellationToken,
    progress: Arc<Progress>,
}

struct Hold {
    reason: String,
    next_try: Instant,
    backoff: Duration,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid job spec: {0}")]
    Invalid(SpecError),
    #[error("job {id} exists with a different spec")]
    IdConflict { id: String },
    #[error("target {target} is held by active job {holder}; submit with \"replace\": true to take it over")]
    TargetBusy { target: String, holder: String },
    #[error("the queue is full ({0} jobs waiting); retry later")]
    QueueFull(usize),
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(StoreError),
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    Created,
    /// The same job already existed (possibly requeued to resume).
    Existing,
}

/// Why a cancel did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("job {id} is already {state}")]
    Finished { id: String, state: &'static str },
    #[error(transparent)]
    Store(StoreError),
}

/// A job as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub phase: Option<Phase>,
    pub profile: String,
    pub manifest: String,
    pub target: String,
    /// Runs started so far (resumes and restarts count).
    pub run: u64,
    pub blocks: BlockCounts,
    pub bytes: ByteCounts,
    pub throughput_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub stalled: bool,
    pub stalled_reason: Option<String>,
    /// The gate a queued job waits on.
    pub held_by: Option<String>,
    /// Distinct block objects served, by source (`primary`, `secondary1`, …).
    pub sources: std::collections::BTreeMap<String, u64>,
    pub reason: Option<String>,
    pub damage: Vec<DamagedBlock>,
    pub created_unix_secs: u64,
    pub started_unix_secs: Option<u64>,
    pub finished_unix_secs: Option<u64>,
    /// The same instants in RFC 3339, UTC, to the second.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

/// Which jobs a list returns: in creation order, strictly after the cursor
/// `after` (a `next` from an earlier page), in one of `states` (any when
/// empty), at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    pub states: Vec<JobState>,
    pub after: Option<ListCursor>,
    pub limit: usize,
}

impl ListQuery {
    /// The page size when a request names none.
    pub const LIMIT_DEFAULT: usize = 100;
    /// The largest page a request may ask for.
    pub const LIMIT_MAX: usize = 1000;
}

impl Default for ListQuery {
    fn default() -> Self {
        Self { states: Vec::new(), after: None, limit: Self::LIMIT_DEFAULT }
    }
}

/// A position in the list's order (creation time, then id). Written as
/// `<created_unix_secs>-<id>`: it stays valid when the job it names has since
/// been pruned from the records.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListCursor {
    pub created_unix_secs: u64,
    pub id: String,
}

impl std::fmt::Display for ListCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.created_unix_secs, self.id)
    }
}

impl std::str::FromStr for ListCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("cursor {s:?} is not one this worker wrote: pass back the \"next\" of the previous page");
        let (secs, id) = s.split_once('-').ok_or_else(bad)?;
        let created_unix_secs = secs.parse().map_err(|_| bad())?;
        if id.is_empty() {
            return Err(bad());
        }
        Ok(Self { created_unix_secs, id: id.to_owned() })
    }
}

/// One page of a list: `next` is the cursor for the page after it, `None`
/// on the last page.
#[derive(Debug, Clone, Serialize)]
pub struct JobPage {
    pub jobs: Vec<JobStatus>,
    pub next: Option<String>,
}

/// `secs` since the epoch as RFC 3339 (`2026-12-01T01:55:00Z`).
fn rfc3339(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    aws_smithy_types::DateTime::from_secs(secs)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| format!("@{secs}"))
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BlockCounts {
    pub total: u64,
    pub settled: u64,
    pub failed: u64,
    pub resumed: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ByteCounts {
    pub total: u64,
    pub settled: u64,
    pub written: u64,
}

impl Worker {
    /// Open the job database in the configured state directory, requeue the
    /// jobs a previous process left running, and start the scheduler.
    pub fn start(engine: Arc<Engine>) -> Result<Arc<Worker>, StoreError> {
        let config = engine.config.worker.clone();
        let store = JobStore::open(&engine.config.worker_state_dir(), config.jobs_records_max.get())?;
        for record in store.list()? {
            if record.state == JobState::Running {
                let id = record.spec.id.clone();
                store.transition(&id, &[JobState::Running], Some(record.run), |r| {
                    r.state = JobState::Queued;
                    r.queued_unix_secs = Some(unix_now_secs());
                    r.reason = Some("the worker restarted: resumes from its checkpoint".to_owned());
                })?;
                tracing::info!(job = %id, "requeued a job the previous worker left running");
            }
        }
        sweep_target_roots(&engine);
        let worker = Arc::new(Worker {
            engine,
            config,
            store,
            live: Mutex::new(Live::default()),
            wake: Notify::new(),
            accepting: AtomicBool::new(true),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        worker.tasks.spawn(Arc::clone(&worker).schedule_loop());
        Ok(worker)
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Whether new jobs are taken (false once shutdown began).
    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Relaxed)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submit a job (idempotent on its id).
    pub fn submit(&self, spec: JobSpec) -> Result<(Submitted, JobStatus), SubmitError> {
        if !self.is_accepting() {
            return Err(SubmitError::ShuttingDown);
        }
        let resolved = spec::resolve(&spec, &self.config).map_err(SubmitError::Invalid)?;
        let spec = JobSpec { target: resolved.target, ..spec };
        let queued_max = self.config.jobs_queued_max.get();
        let mut live = self.live();
        let (outcome, replaced) = self.store.submit(&spec, queued_max, unix_now_secs()).map_err(SubmitError::Store)?;
        if let Some(old) = replaced {
            tracing::info!(job = %old, by = %spec.id, "job replaced");
            if let Some(run) = live.running.get(&old) {
                run.cancel.cancel();
            }
            live.held.remove(&old);
        }
        drop(live);
        let (submitted, record) = match outcome {
            store::Insert::Created(record) => (Submitted::Created, record),
            store::Insert::Existing { record, requeued } => {
                if requeued {
                    tracing::info!(job = %record.spec.id, "job resubmitted: queued to resume");
                }
                (Submitted::Existing, record)
            }
            store::Insert::IdConflict(_) => return Err(SubmitError::IdConflict { id: spec.id }),
            store::Insert::TargetBusy(holder) => {
                return Err(SubmitError::TargetBusy {
                    target: spec.target.display().to_string(),
                    holder: holder.spec.id,
                });
            }
            store::Insert::QueueFull => return Err(SubmitError::QueueFull(queued_max)),
        };
        self.wake.notify_one();
        Ok((submitted, self.status_of(&record)))
    }

    /// Cancel a queued or running job. A running one settles and checkpoints
    /// before its run ends; resubmitting it resumes.
    pub fn cancel(&self, id: &str) -> Result<JobStatus, CancelError> {
        let mut live = self.live();
        let record = self
            .store
            .transition(id, &[JobState::Queued, JobState::Running], None, |r| {
                r.state = JobState::Cancelled;
                r.reason = Some("cancelled by request".to_owned());
                r.finished_unix_secs = Some(unix_now_secs());
            })
            .map_err(|e| match e {
                StoreError::NotFound(id) => CancelError::NotFound(id),
                StoreError::Conflict { id, found } => CancelError::Finished { id, state: found.state.name() },
                e => CancelError::Store(e),
            })?;
        if let Some(run) = live.running.get(id) {
            run.cancel.cancel();
        }
        live.held.remove(id);
        drop(live);
        tracing::info!(job = %id, "job cancelled");
        Ok(self.status_of(&record))
    }

    pub fn get(&self, id: &str) -> Result<Option<JobStatus>, StoreError> {
        Ok(self.store.get(id)?.map(|r| self.status_of(&r)))
    }

    /// One page of jobs, in creation order.
    pub fn list(&self, query: &ListQuery) -> Result<JobPage, StoreError> {
        // The store lists by (creation time, id), the order a cursor names.
        let after = query.after.as_ref().map(|a| (a.created_unix_secs, a.id.as_str()));
        let mut matching = self.store.list()?.into_iter().filter(|r| {
            (query.states.is_empty() || query.states.contains(&r.state))
                && after.is_none_or(|after| (r.created_unix_secs, r.spec.id.as_str()) > after)
        });
        let page: Vec<JobRecord> = matching.by_ref().take(query.limit).collect();
        let next = match (page.last(), matching.next()) {
            (Some(last), Some(_)) => {
                Some(ListCursor { created_unix_secs: last.created_unix_secs, id: last.spec.id.clone() }.to_string())
            }
            _ => None,
        };
        Ok(JobPage { jobs: page.iter().map(|r| self.status_of(r)).collect(), next })
    }

    /// Stop taking jobs, cancel running ones (stored as `queued` again, to be
    /// resumed by the next start), and wait for them up to `grace`. Returns
    /// whether everything stopped in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.accepting.store(false, Ordering::Relaxed);
        self.shutdown.cancel();
        self.wake.notify_one();
        self.tasks.close();
        let stopped = tokio::time::timeout(grace, self.tasks.wait()).await.is_ok();
        if !stopped {
            tracing::warn!(
                grace_millis = grace.as_millis() as u64,
                "runs still stopping at the end of the grace period"
            );
        }
        stopped
    }

    fn status_of(&self, record: &JobRecord) -> JobStatus {
        let live = self.live();
        let id = record.spec.id.clone();
        let mut status = JobStatus {
            id: id.clone(),
            state: record.state,
            phase: record.phase,
            profile: record.spec.profile.clone(),
            manifest: record.spec.manifest.clone(),
            target: record.spec.target.display().to_string(),
            run: record.run,
            blocks: BlockCounts::default(),
            bytes: ByteCounts::default(),
            throughput_bytes_per_sec: 0.0,
            eta_secs: None,
            stalled: false,
            stalled_reason: None,
            held_by: None,
            sources: Default::default(),
            reason: record.reason.clone(),
            damage: record.damage.clone(),
            created_unix_secs: record.created_unix_secs,
            started_unix_secs: record.started_unix_secs,
            finished_unix_secs: record.finished_unix_secs,
            created_at: rfc3339(record.created_unix_secs),
            started_at: record.started_unix_secs.map(rfc3339),
            finished_at: record.finished_unix_secs.map(rfc3339),
        };
        if let Some(s) = &record.summary {
            status.blocks = BlockCounts {
                total: s.blocks_total,
                settled: s.blocks_settled,
                failed: s.blocks_failed,
                resumed: s.blocks_resumed,
            };
            status.bytes = ByteCounts { total: s.bytes_total, settled: s.bytes_settled, written: s.bytes_written };
            status.throughput_bytes_per_sec = s.throughput_bytes_per_sec;
            status.sources = s.fetch.served_by_source.iter().cloned().collect();
        }
        match (record.state, live.running.get(&id)) {
            (JobState::Running, Some(run)) if run.run == record.run => fill_live(&mut status, &run.progress),
            (JobState::Queued, _) => status.held_by = live.held.get(&id).map(|h| h.reason.clone()),
            _ => {}
        }
        status
    }

    async fn schedule_loop(self: Arc<Self>) {
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

    /// Start every queued job that passes its gates, while there is room.
    async fn schedule_once(self: &Arc<Self>) -> Result<(), StoreError> {
        let records = self.store.list()?;
        self.publish_gauges(&records);
        let queued: Vec<JobRecord> = records.into_iter().filter(|r| r.state == JobState::Queued).collect();
        for record in queued {
            if self.shutdown.is_cancelled() || self.live().running.len() >= self.config.jobs_running_max.get() {
                return Ok(());
            }
            let id = record.spec.id.clone();
            if self.live().held.get(&id).is_some_and(|h| h.next_try > Instant::now()) {
                continue;
            }
            // Record changes commit with fsync: off the async threads.
            let worker = Arc::clone(self);
            let _ = match self.gate(&record).await {
                Gate::Pass => tokio::task::spawn_blocking(move || worker.start_run(record)).await,
                Gate::Hold(reason) => {
                    self.hold(&id, reason);
                    Ok(())
                }
                Gate::Never(reason) => tokio::task::spawn_blocking(move || worker.fail_queued(&record, reason)).await,
            };
        }
        Ok(())
    }

    /// Set the gauges an operator watches from the job table and the running
    /// restores (the scheduler does so every tick; `/metrics` just before it
    /// renders).
    pub fn publish_metrics(&self) -> Result<(), StoreError> {
        let records = self.store.list()?;
        self.publish_gauges(&records);
        Ok(())
    }

    /// Settled over total bytes of each running job, by job id (0 until its
    /// manifest is read). Bounded by `jobs_running_max`.
    pub fn running_progress(&self) -> Vec<(String, f64)> {
        let live = self.live();
        let mut out: Vec<(String, f64)> =
            live.running.iter().map(|(id, run)| (id.clone(), progress_ratio(&run.progress))).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Jobs by state, the queue's oldest job, and over running restores: the
    /// stalled ones, blocks still pending, the oldest block in flight.
    fn publish_gauges(&self, records: &[JobRecord]) {
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

    fn hold(&self, id: &str, reason: String) {
        let base = Duration::from_millis(self.config.gate_backoff_millis.get());
        let cap = Duration::from_millis(self.config.gate_backoff_max_millis.get());
        let mut live = self.live();
        let backoff = live.held.get(id).map_or(base, |h| (h.backoff * 2).min(cap));
        if live.held.get(id).is_none_or(|h| h.reason != reason) {
            tracing::info!(job = %id, %reason, "job held by a gate");
        }
        live.held.insert(id.to_owned(), Hold { reason, next_try: Instant::now() + backoff, backoff });
    }

    fn fail_queued(&self, record: &JobRecord, reason: String) {
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

    /// The gates a queued job passes before it starts.
    async fn gate(&self, record: &JobRecord) -> Gate {
        let id = &record.spec.id;
        let holder = self.live().busy_targets.get(&record.spec.target).cloned();
        if let Some(holder) = holder {
            return Gate::Hold(format!("target busy: run of job {holder} on this target is still stopping"));
        }
        let resolved = match spec::resolve(&record.spec, &self.config) {
            Ok(r) => r,
            Err(e) => return Gate::Never(format!("the job no longer fits the worker's configuration: {e}")),
        };
        if is_block_device(&resolved.target) {
            // Written in place: its size is checked when it is opened.
            return Gate::Pass;
        }
        let known = self.live().needs.get(id).copied();
        let needed = match known {
            Some(n) => n,
            // A manifest that cannot be read is the restore's to report (with
            // its classified error), not a gate's.
            None => match self.manifest_bytes(&resolved.manifest_url).await {
                Some(n) => {
                    self.live().needs.insert(id.clone(), n);
                    n
                }
                None => return Gate::Pass,
            },
        };
        let dir = crate::target::parent_dir(&record.spec.target);
        let already = staged_bytes(&record.spec.target);
        match filesystem_bytes(&dir) {
            Ok((free, total)) => space_gate(needed, already, free, total, self.config.target_free_bytes_min),
            Err(e) => Gate::Hold(format!("free space of {}: {e}", dir.display())),
        }
    }

    async fn manifest_bytes(&self, manifest_url: &str) -> Option<u64> {
        let (url, key) = crate::store::StoreUrl::parse_manifest(manifest_url).ok()?;
        let store = self.engine.open_store(&url).await.ok()?;
        let manifest = crate::job::load_manifest(&self.engine, &store, &key).await.ok()?;
        Some(manifest.block_bytes_total())
    }

    /// Queued → running (compare-and-set), then spawn the run.
    fn start_run(self: &Arc<Self>, record: JobRecord) {
        let id = record.spec.id.clone();
        let Ok(resolved) = spec::resolve(&record.spec, &self.config) else { return };
        let cancel = self.shutdown.child_token();
        let progress = Arc::new(Progress::default());
        let mut live = self.live();
        let started = self.store.transition(&id, &[JobState::Queued], None, |r| {
            r.state = JobState::Running;
            r.run += 1;
            r.restart_pending = false;
            r.phase = Some(Phase::Validate);
            r.reason = None;
            r.started_unix_secs = Some(unix_now_secs());
        });
        let restart_pending = record.restart_pending;
        let record = match started {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(job = %id, error = %e, "job changed before it could start");
                return;
            }
        };
        live.held.remove(&id);
        live.needs.remove(&id);
        live.busy_targets.insert(record.spec.target.clone(), id.clone());
        live.running
            .insert(id.clone(), Running { run: record.run, cancel: cancel.clone(), progress: Arc::clone(&progress) });
        drop(live);
        tracing::info!(job = %id, run = record.run, target = %record.spec.target.display(), "job started");
        let spec = RestoreSpec {
            manifest_url: resolved.manifest_url,
            target: resolved.target,
            secondaries: resolved.secondaries,
            in_place: false,
            restart: restart_pending,
        };
        let worker = Arc::clone(self);
        self.tasks.spawn(async move {
            // Its own task, so a panic in the restore still ends the run
            // (the job fails, the target is released) instead of the worker.
            let engine = Arc::clone(&worker.engine);
            let watched = Arc::clone(&progress);
            let result =
                tokio::spawn(async move { crate::job::restore::restore(&engine, &spec, &watched, &cancel).await })
                    .await
                    .map_err(|e| format!("internal error: the restore task ended abnormally: {e}"));
            let _ = tokio::task::spawn_blocking(move || worker.finish_run(&record, result, &progress)).await;
        });
    }

    /// Store a run's outcome, compare-and-set on the run: if the job was
    /// cancelled or replaced meanwhile, its status stays what that decided.
    fn finish_run(
        &self,
        record: &JobRecord,
        result: Result<Result<RestoreReport, RestoreError>, String>,
        progress: &Progress,
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
                damage.truncate(store::DAMAGE_RECORDED_MAX);
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
        if live.busy_targets.get(&record.spec.target) == Some(id) {
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

fn fill_live(status: &mut JobStatus, progress: &Progress) {
    let p = progress.snapshot();
    status.phase = Some(p.phase);
    let resumed = progress.blocks_resumed.load(Ordering::Relaxed);
    status.blocks = BlockCounts { total: p.blocks_total, settled: p.blocks_settled, failed: p.blocks_failed, resumed };
    status.bytes = ByteCounts { total: p.bytes_total, settled: p.bytes_settled, written: p.bytes_written };
    status.throughput_bytes_per_sec = p.bytes_written as f64 / p.elapsed_secs.max(1e-3);
    let left = p.bytes_total.saturating_sub(p.bytes_settled);
    status.eta_secs = (status.throughput_bytes_per_sec > 0.0).then(|| left as f64 / status.throughput_bytes_per_sec);
    status.stalled = p.stalled.is_some();
    status.stalled_reason = p.stalled;
    if let Some(t) = progress.telemetry() {
        status.sources = t.counts().served_by_source.into_iter().collect();
    }
}

/// Remove staging files under each `worker.target_roots` that no checkpoint
/// owns: partial files of crashed restores, which cannot be resumed. Runs
/// before the scheduler starts, so no run of this worker is writing one.
/// Roots are canonicalized first (checkpoints are keyed by the resolved
/// target path, so a root reached through a symlink must not look unowned).
/// A root that cannot be swept is logged and skipped: the worker still starts.
fn sweep_target_roots(engine: &Engine) {
    let config = &engine.config;
    if !config.checkpoint.enabled {
        tracing::info!("checkpoints disabled: staging files under the target roots are not swept");
        return;
    }
    let dir = match crate::checkpoint::CheckpointDir::open(config.checkpoint_dir()) {
        Ok(dir) => dir,
        Err(e) => {
            tracing::warn!(dir = %config.checkpoint_dir().display(), error = %e, "staging sweep skipped");
            return;
        }
    };
    for root in &config.worker.target_roots {
        match root.canonicalize().and_then(|root| crate::target::sweep_staging(&root, &dir)) {
            Ok(paths) if paths.is_empty() => {}
            Ok(paths) => {
                tracing::info!(root = %root.display(), files = paths.len(), "swept staging files no checkpoint owns")
            }
            Err(e) => tracing::warn!(root = %root.display(), error = %e, "staging sweep of a target root failed"),
        }
    }
}

fn progress_ratio(progress: &Progress) -> f64 {
    let total = progress.bytes_total.load(Ordering::Relaxed);
    let settled = progress.bytes_settled.load(Ordering::Relaxed);
    if total == 0 { 0.0 } else { (settled as f64 / total as f64).min(1.0) }
}

/// Blocks of a running restore neither settled nor failed yet.
fn pending_blocks(progress: &Progress) -> u64 {
    let total = progress.blocks_total.load(Ordering::Relaxed);
    let done = progress.blocks_settled.load(Ordering::Relaxed) + progress.blocks_failed.load(Ordering::Relaxed);
    total.saturating_sub(done)
}

fn summary_of(report: &RestoreReport) -> RunSummary {
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

/// What a gate decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Not now; the reason is shown in the job's status.
    Hold(String),
    /// Never: the job fails with this reason.
    Never(String),
}

/// The free-space gate: `needed` bytes of blocks, `already` of them allocated
/// by an earlier run's staging file, on a filesystem of `total` bytes with
/// `free` available, keeping `floor` free.
pub fn space_gate(needed: u64, already: u64, free: u64, total: u64, floor: u64) -> Gate {
    if needed > total {
        return Gate::Never(format!(
            "the restore needs {needed} bytes, more than the target filesystem's whole size ({total} bytes)"
        ));
    }
    let remaining = needed.saturating_sub(already);
    if free < remaining.saturating_add(floor) {
        return Gate::Hold(format!(
            "free space: the restore needs {remaining} more bytes and worker.target_free_bytes_min keeps {floor} free; the filesystem has {free}"
        ));
    }
    Gate::Pass
}

/// Bytes a staging file of an earlier run already allocates.
fn staged_bytes(target: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    crate::target::staging_path(target)
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.blocks().saturating_mul(512))
}

/// (available, total) bytes of the filesystem holding `path`.
pub fn filesystem_bytes(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain old data; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

fn is_block_device(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_553_500), "2025-12-01T01:45:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn cursors_round_trip_and_order_like_the_list() {
        let cursor = ListCursor { created_unix_secs: 1_764_553_500, id: "db-1-restore".into() };
        assert_eq!(cursor.to_string(), "1764553500-db-1-restore");
        assert_eq!(cursor.to_string().parse::<ListCursor>(), Ok(cursor.clone()));
        let later_same_second = ListCursor { id: "db-2".into(), ..cursor.clone() };
        let next_second = ListCursor { created_unix_secs: 1_764_553_501, id: "a".into() };
        assert!(cursor < later_same_second && later_same_second < next_second);
        for bad in ["", "db-1", "-db-1", "12-", "x1-db", "1764553500"] {
            let e = bad.parse::<ListCursor>().unwrap_err();
            assert!(e.contains("next"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn space_gate_holds_fails_and_passes() {
        assert_eq!(space_gate(100, 0, 1000, 10_000, 0), Gate::Pass);
        assert!(matches!(space_gate(100, 0, 150, 10_000, 100), Gate::Hold(r) if r.contains("target_free_bytes_min")));
        // An earlier run's staging file already holds most of it.
        assert_eq!(space_gate(100, 80, 150, 10_000, 100), Gate::Pass);
        assert!(matches!(space_gate(20_000, 0, 150, 10_000, 0), Gate::Never(r) if r.contains("whole size")));
    }
}
