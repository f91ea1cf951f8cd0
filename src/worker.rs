//! Worker: many restores at once, submitted over HTTP (`api.rs`), recorded in
//! a job database, resumed after a restart.
//!
//! In: [`JobSpec`]s (checked against the configuration by [`crate::job::spec`]) and cancel
//! requests. Out: restores run through one shared [`Engine`] (so the in-flight
//! byte budget and per-store rate limits hold across jobs) and a
//! [`JobStatus`] per job.
//!
//! - **Records**: every state change is a compare-and-set on the stored record
//!   ([`crate::job::db`]). A runner's final status is compare-and-set on the run it
//!   started, so a cancelled or replaced run never sets a status.
//! - **Scheduling**: one loop starts queued jobs, oldest first, up to
//!   `worker.jobs_running_max`. Before a job starts it must pass its gates:
//!   the previous run on its target has stopped, and the target's filesystem
//!   has room for what is still to be written plus `worker.target_free_bytes_min`,
//!   beyond what the restores running there (or starting in the same round)
//!   will still write. A held job is skipped (the jobs behind it go on) and
//!   looked at again with doubling backoff; its status names the gate. A job
//!   that can never fit (needs more than the filesystem's size) fails at
//!   once. The manifests a round's gates need are read at once and the jobs
//!   that pass start in one commit, so jobs submitted together start
//!   together.
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
//! - **Exports**: a job may ask for an NBD export of its volume
//!   (`export.rs`): served while it is restored and after, until the job is
//!   cancelled or the export stopped; its target stays busy until then.
//!
//! Parts: `status.rs` (what the API reports, and paging), `scheduler.rs`
//! (starting, finishing and publishing runs), `export.rs`, `gates.rs`,
//! `sweep.rs`.
//!
//! Limits: `jobs_queued_max` (submissions beyond it are refused),
//! `jobs_running_max`, `jobs_records_max`; every wait is bounded (the
//! scheduler wakes at least every [`SCHEDULE_TICK`]).

mod export;
mod gates;
mod scheduler;
mod status;
mod sweep;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::checkpoint::unix_now_secs;
use crate::config::worker::WorkerConfig;
pub use crate::job::export::{ExportState, ExportStatus};
pub use crate::job::{JobDbError, JobRecord, JobSpec, JobState, JobStore, RunSummary, SpecError};
use crate::restore::Engine;
use crate::restore::progress::Progress;
pub use export::StopExportError;
pub use gates::{Gate, filesystem_bytes, space_gate};
pub use scheduler::RunningGauges;
pub use status::{BlockCounts, ByteCounts, JobPage, JobStatus, ListCursor, ListQuery, Throttling};

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
    /// Job exports up (or stopping), by job id.
    exports: HashMap<String, Arc<export::ExportHandle>>,
}

struct Running {
    run: u64,
    cancel: CancellationToken,
    progress: Arc<Progress>,
    target: PathBuf,
    /// Bytes of blocks its restore writes, when its gate read them (not for
    /// block devices): what it still writes is reserved on its filesystem.
    needs: Option<u64>,
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
    #[error(
        "target {target} is being restored by another process ({holder}), not by a job of this worker; wait for that restore to end or stop it, then submit again"
    )]
    TargetHeldElsewhere { target: String, holder: String },
    #[error("the queue is full ({0} jobs waiting); retry later")]
    QueueFull(usize),
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(JobDbError),
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
    Store(JobDbError),
}

impl Worker {
    /// Open the job database in the configured state directory, requeue the
    /// jobs a previous process left running, and start the scheduler.
    pub fn start(engine: Arc<Engine>) -> Result<Arc<Worker>, JobDbError> {
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
        sweep::sweep_target_roots(&engine);
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

    /// The engine every restore of this worker runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
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
        let resolved = crate::job::spec::resolve(&spec, &self.config).map_err(SubmitError::Invalid)?;
        let spec = JobSpec { target: resolved.target, ..spec };
        let queued_max = self.config.jobs_queued_max.get();
        // Probed before taking the job table's lock: it reads the lock file
        // (and /proc when the file names no live holder).
        let held_by = crate::target::holder(&spec.target).ok().flatten();
        let mut live = self.live();
        // A job of this worker holding the target is the job table's to
        // judge (replace); anyone else's lock refuses the job at once.
        if !live.busy_targets.contains_key(&spec.target)
            && let Some(holder) = held_by
        {
            return Err(SubmitError::TargetHeldElsewhere { target: spec.target.display().to_string(), holder });
        }
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
            crate::job::Insert::Created(record) => (Submitted::Created, record),
            crate::job::Insert::Existing { record, requeued } => {
                if requeued {
                    tracing::info!(job = %record.spec.id, "job resubmitted: queued to resume");
                }
                (Submitted::Existing, record)
            }
            crate::job::Insert::IdConflict(_) => return Err(SubmitError::IdConflict { id: spec.id }),
            crate::job::Insert::TargetBusy(holder) => {
                return Err(SubmitError::TargetBusy {
                    target: spec.target.display().to_string(),
                    holder: holder.spec.id,
                });
            }
            crate::job::Insert::QueueFull => return Err(SubmitError::QueueFull(queued_max)),
        };
        self.wake.notify_one();
        Ok((submitted, self.status_of(&record)))
    }

    /// Cancel a queued or running job. A running one settles and checkpoints
    /// before its run ends; resubmitting it resumes. A job that has ended
    /// but still serves its export: the export stops (its state stays).
    pub fn cancel(&self, id: &str) -> Result<JobStatus, CancelError> {
        let mut live = self.live();
        let transition = self.store.transition(id, &[JobState::Queued, JobState::Running], None, |r| {
            r.state = JobState::Cancelled;
            r.reason = Some("cancelled by request".to_owned());
            r.finished_unix_secs = Some(unix_now_secs());
        });
        let record = match transition {
            Ok(record) => record,
            Err(JobDbError::Conflict { found, .. }) if live.exports.get(id).is_some_and(|h| !h.stop.is_cancelled()) => {
                if let Some(export) = live.exports.get(id) {
                    export.stop.cancel();
                }
                drop(live);
                tracing::info!(job = %id, "job cancelled after its restore: its export stops");
                return Ok(self.status_of(&found));
            }
            Err(JobDbError::NotFound(id)) => return Err(CancelError::NotFound(id)),
            Err(JobDbError::Conflict { id, found }) => {
                return Err(CancelError::Finished { id, state: found.state.name() });
            }
            Err(e) => return Err(CancelError::Store(e)),
        };
        if let Some(run) = live.running.get(id) {
            run.cancel.cancel();
        }
        live.held.remove(id);
        live.needs.remove(id);
        drop(live);
        tracing::info!(job = %id, "job cancelled");
        Ok(self.status_of(&record))
    }

    pub fn get(&self, id: &str) -> Result<Option<JobStatus>, JobDbError> {
        Ok(self.store.get(id)?.map(|r| self.status_of(&r)))
    }

    /// One page of jobs, in creation order.
    pub fn list(&self, query: &ListQuery) -> Result<JobPage, JobDbError> {
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
}
