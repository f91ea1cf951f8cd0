//! Job records in an embedded database (redb) in the worker's state directory.
//!
//! One table, job id → JSON record. Every state change is a compare-and-set:
//! read the record, check it is still in the state (and run) the change was
//! decided in, write, all in one write transaction; otherwise the change is
//! refused with the state found ([`JobDbError::Conflict`]). So a task that was
//! cancelled or replaced can never flip the status of a job it no longer owns.
//! Several jobs' changes can share one transaction (one commit, one sync:
//! [`JobStore::transition_each`]), each still its own compare-and-set.
//!
//! Limits: records are a few hundred bytes plus the damage report (cut to
//! [`DAMAGE_RECORDED_MAX`] blocks); at most `worker.jobs_records_max` are kept,
//! the oldest finished ones pruned on insert. Fails with [`JobDbError`]; a
//! database that cannot be opened stops the worker at startup.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::spec::JobSpec;
use crate::fetch::FetchCounts;
use crate::restore::DamagedBlock;
use crate::restore::progress::Phase;

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Damaged blocks kept in a record; the rest are counted, not listed.
pub const DAMAGE_RECORDED_MAX: usize = 1000;
/// The database file in the state directory.
pub const DATABASE_FILE: &str = "jobs.redb";

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] =
        [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];

    /// The state [`name`](Self::name) names.
    pub fn from_name(name: &str) -> Option<JobState> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn is_active(self) -> bool {
        matches!(self, JobState::Queued | JobState::Running)
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// Counts of a run, kept when it ends.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub blocks_total: u64,
    pub blocks_settled: u64,
    pub blocks_failed: u64,
    pub blocks_resumed: u64,
    pub bytes_total: u64,
    pub bytes_settled: u64,
    pub bytes_written: u64,
    pub duration_secs: f64,
    pub throughput_bytes_per_sec: f64,
    pub fetch: FetchCounts,
}

/// What the database holds per job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub state: JobState,
    /// The next run discards the target's checkpoint first (cleared when
    /// that run starts, so later runs resume).
    #[serde(default)]
    pub restart_pending: bool,
    /// Runs started so far; a runner's changes are compare-and-set on it.
    pub run: u64,
    pub phase: Option<Phase>,
    /// Why the job failed, was cancelled or requeued.
    pub reason: Option<String>,
    pub damage: Vec<DamagedBlock>,
    pub summary: Option<RunSummary>,
    pub created_unix_secs: u64,
    /// When the job last became `queued` (submitted, resubmitted, requeued by
    /// a shutdown or restart); records written before this field use
    /// `created_unix_secs`.
    #[serde(default)]
    pub queued_unix_secs: Option<u64>,
    pub started_unix_secs: Option<u64>,
    pub finished_unix_secs: Option<u64>,
    /// What the job's NBD export served, stored when it stopped.
    #[serde(default)]
    pub export: Option<super::export::ExportStatus>,
}

impl JobRecord {
    pub fn new(spec: JobSpec, now_unix_secs: u64) -> Self {
        Self {
            restart_pending: spec.restart,
            spec: JobSpec { replace: false, restart: false, ..spec },
            state: JobState::Queued,
            run: 0,
            phase: None,
            reason: None,
            damage: Vec::new(),
            summary: None,
            created_unix_secs: now_unix_secs,
            queued_unix_secs: Some(now_unix_secs),
            started_unix_secs: None,
            finished_unix_secs: None,
            export: None,
        }
    }
}

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JobDbError {
    #[error("job {0} not found")]
    NotFound(String),
    /// The record was no longer in the state the change was decided in.
    #[error("job {id} is {found:?}, not in the state this change expected")]
    Conflict { id: String, found: Box<JobRecord> },
    #[error("job database: {0}")]
    Db(String),
}

fn db<E: std::fmt::Display>(e: E) -> JobDbError {
    JobDbError::Db(e.to_string())
}

/// The job table.
#[derive(Clone)]
pub struct JobStore {
    db: Arc<Database>,
    records_max: usize,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").field("records_max", &self.records_max).finish()
    }
}

/// What a submission found and did, decided in one write transaction.
#[derive(Debug)]
pub enum Insert {
    /// A new record was stored.
    Created(JobRecord),
    /// The same spec under the same id was already there (`requeued`: it had
    /// stopped, failed or been cancelled and is queued again to resume).
    Existing { record: JobRecord, requeued: bool },
    /// The same id with a different spec.
    IdConflict(JobRecord),
    /// Another active job holds the target.
    TargetBusy(JobRecord),
    /// The queue is full.
    QueueFull,
}

impl JobStore {
    /// Open (or create) the database in `dir`.
    pub fn open(dir: &Path, records_max: usize) -> Result<Self, JobDbError> {
        std::fs::create_dir_all(dir).map_err(|e| JobDbError::Db(format!("{}: {e}", dir.display())))?;
        let path = dir.join(DATABASE_FILE);
        let db = Database::create(&path).map_err(|e| JobDbError::Db(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(JOBS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db: Arc::new(db), records_max })
    }

    pub fn get(&self, id: &str) -> Result<Option<JobRecord>, JobDbError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(JOBS).map_err(db)?;
        table.get(id).map_err(db)?.map(|v| decode(v.value())).transpose()
    }

    /// Every record, oldest first.
    pub fn list(&self) -> Result<Vec<JobRecord>, JobDbError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = tx.open_table(JOBS).map_err(db)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db)? {
            let (_, v) = entry.map_err(db)?;
            out.push(decode(v.value())?);
        }
        out.sort_by(|a, b| (a.created_unix_secs, &a.spec.id).cmp(&(b.created_unix_secs, &b.spec.id)));
        Ok(out)
    }

    /// Submit `spec`: decide idempotency, target ownership and queue room, and
    /// (with `replace`) cancel the job holding the target, in one transaction.
    pub fn submit(&self, spec: &JobSpec, queued_max: usize, now: u64) -> Result<(Insert, Option<String>), JobDbError> {
        let tx = self.db.begin_write().map_err(db)?;
        let mut replaced = None;
        let outcome = {
            let mut table = tx.open_table(JOBS).map_err(db)?;
            let all = read_all(&table)?;
            let busy = all.iter().find(|r| r.state.is_active() && r.spec.target == spec.target && r.spec.id != spec.id);
            let queued = all.iter().filter(|r| r.state == JobState::Queued).count();
            match all.iter().find(|r| r.spec.id == spec.id) {
                Some(r) if !r.spec.same_job(spec) => Insert::IdConflict(r.clone()),
                Some(r) if r.state.is_active() || r.state == JobState::Succeeded => {
                    Insert::Existing { record: r.clone(), requeued: false }
                }
                Some(_) | None if busy.is_some() && !spec.replace => {
                    Insert::TargetBusy(busy.cloned().expect("checked"))
                }
                _ if queued >= queued_max => Insert::QueueFull,
                existing => {
                    // A replaced job of another snapshot leaves a checkpoint the
                    // new one cannot use.
                    let other_snapshot =
                        busy.is_some_and(|b| (&b.spec.profile, &b.spec.manifest) != (&spec.profile, &spec.manifest));
                    if let Some(old) = busy {
                        let mut old = old.clone();
                        old.state = JobState::Cancelled;
                        old.reason = Some(format!("replaced by job {}", spec.id));
                        old.finished_unix_secs = Some(now);
                        put(&mut table, &old)?;
                        replaced = Some(old.spec.id.clone());
                    }
                    let (record, requeued) = match existing {
                        Some(r) => {
                            let mut r = r.clone();
                            r.state = JobState::Queued;
                            r.reason = Some("resubmitted: resumes from its checkpoint".to_owned());
                            r.finished_unix_secs = None;
                            r.queued_unix_secs = Some(now);
                            r.damage.clear();
                            r.restart_pending = spec.restart;
                            (r, true)
                        }
                        None => (JobRecord::new(spec.clone(), now), false),
                    };
                    let mut record = record;
                    record.restart_pending |= other_snapshot;
                    put(&mut table, &record)?;
                    if requeued {
                        Insert::Existing { record, requeued }
                    } else {
                        prune(&mut table, &all, self.records_max)?;
                        Insert::Created(record)
                    }
                }
            }
        };
        tx.commit().map_err(db)?;
        Ok((outcome, replaced))
    }

    /// Compare-and-set: apply `change` only if the record is in one of `from`
    /// (and, with `run`, still in that run).
    pub fn transition(
        &self,
        id: &str,
        from: &[JobState],
        run: Option<u64>,
        change: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord, JobDbError> {
        let tx = self.db.begin_write().map_err(db)?;
        let record = {
            let mut table = tx.open_table(JOBS).map_err(db)?;
            compare_and_set(&mut table, id, from, run, change)?
        };
        tx.commit().map_err(db)?;
        Ok(record)
    }

    /// [`transition`](Self::transition) for each of `ids` (any run), in one
    /// transaction: one commit, so one sync, for all of them. Each id gets
    /// its own result (`NotFound`, `Conflict`); the outer error is the
    /// database's, and then nothing changed.
    pub fn transition_each(
        &self,
        ids: &[&str],
        from: &[JobState],
        change: impl Fn(&mut JobRecord),
    ) -> Result<Vec<Result<JobRecord, JobDbError>>, JobDbError> {
        let tx = self.db.begin_write().map_err(db)?;
        let results = {
            let mut table = tx.open_table(JOBS).map_err(db)?;
            let mut results = Vec::with_capacity(ids.len());
            for id in ids {
                match compare_and_set(&mut table, id, from, None, &change) {
                    Err(JobDbError::Db(e)) => return Err(JobDbError::Db(e)),
                    result => results.push(result),
                }
            }
            results
        };
        tx.commit().map_err(db)?;
        Ok(results)
    }
}

fn compare_and_set(
    table: &mut redb::Table<&str, &[u8]>,
    id: &str,
    from: &[JobState],
    run: Option<u64>,
    change: impl FnOnce(&mut JobRecord),
) -> Result<JobRecord, JobDbError> {
    let mut record = match table.get(id).map_err(db)? {
        Some(v) => decode(v.value())?,
        None => return Err(JobDbError::NotFound(id.to_owned())),
    };
    if !from.contains(&record.state) || run.is_some_and(|r| r != record.run) {
        return Err(JobDbError::Conflict { id: id.to_owned(), found: Box::new(record) });
    }
    change(&mut record);
    put(table, &record)?;
    Ok(record)
}

fn db_err<E: std::fmt::Display>(e: E) -> JobDbError {
    db(e)
}

fn decode(bytes: &[u8]) -> Result<JobRecord, JobDbError> {
    serde_json::from_slice(bytes).map_err(|e| JobDbError::Db(format!("a job record does not decode: {e}")))
}

fn put(table: &mut redb::Table<&str, &[u8]>, record: &JobRecord) -> Result<(), JobDbError> {
    let bytes = serde_json::to_vec(record).map_err(db)?;
    table.insert(record.spec.id.as_str(), bytes.as_slice()).map_err(db)?;
    Ok(())
}

fn read_all(table: &redb::Table<&str, &[u8]>) -> Result<Vec<JobRecord>, JobDbError> {
    let mut out = Vec::new();
    for entry in table.iter().map_err(db)? {
        let (_, v) = entry.map_err(db)?;
        out.push(decode(v.value())?);
    }
    Ok(out)
}

/// Drop the oldest finished records beyond `records_max` (`all` is the table
/// before the insert that just happened).
fn prune(table: &mut redb::Table<&str, &[u8]>, all: &[JobRecord], records_max: usize) -> Result<(), JobDbError> {
    let excess = (all.len() + 1).saturating_sub(records_max);
    if excess == 0 {
        return Ok(());
    }
    let mut finished: Vec<&JobRecord> = all.iter().filter(|r| !r.state.is_active()).collect();
    finished.sort_by_key(|r| r.finished_unix_secs.unwrap_or(r.created_unix_secs));
    for r in finished.into_iter().take(excess) {
        table.remove(r.spec.id.as_str()).map_err(db)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> JobSpec {
        JobSpec {
            id: id.into(),
            profile: "main".into(),
            manifest: "vol.manifest".into(),
            target: format!("/srv/{id}.img").into(),
            replace: false,
            restart: false,
            export: Default::default(),
        }
    }

    #[test]
    fn transition_each_changes_every_record_it_may_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path(), 100).unwrap();
        for id in ["a", "b", "c"] {
            assert!(matches!(store.submit(&spec(id), 100, 1).unwrap().0, Insert::Created(_)));
        }
        store.transition("b", &[JobState::Queued], None, |r| r.state = JobState::Running).unwrap();
        let results = store
            .transition_each(&["a", "b", "gone", "c"], &[JobState::Queued], |r| {
                r.state = JobState::Running;
                r.run += 1;
            })
            .unwrap();
        assert!(matches!(&results[0], Ok(r) if r.spec.id == "a" && r.run == 1));
        assert!(matches!(&results[1], Err(JobDbError::Conflict { id, .. }) if id == "b"), "{:?}", results[1]);
        assert!(matches!(&results[2], Err(JobDbError::NotFound(id)) if id == "gone"));
        assert!(matches!(&results[3], Ok(r) if r.spec.id == "c" && r.run == 1));
        // Stored: a and c run, b untouched by this change.
        let stored: Vec<(String, JobState, u64)> =
            store.list().unwrap().into_iter().map(|r| (r.spec.id, r.state, r.run)).collect();
        assert_eq!(
            stored,
            [
                ("a".into(), JobState::Running, 1),
                ("b".into(), JobState::Running, 0),
                ("c".into(), JobState::Running, 1)
            ]
        );
    }
}
