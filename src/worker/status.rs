//! What the API reports of jobs: [`JobStatus`], and listing them a page at a
//! time ([`ListQuery`], [`ListCursor`], [`JobPage`]).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::*;
use crate::job::{JobRecord, JobState};
use crate::restore::DamagedBlock;
use crate::restore::progress::{Phase, Progress};

/// A job as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// How much the stores throttled this restore (issue 13).
    #[serde(default)]
    pub throttling: Throttling,
    pub reason: Option<String>,
    pub damage: Vec<DamagedBlock>,
    /// The job's NBD export, when its spec asks for one: where, whether it
    /// serves, and what it served (kept after it stopped).
    #[serde(default)]
    pub export: Option<ExportStatus>,
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
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobPage {
    pub jobs: Vec<JobStatus>,
    pub next: Option<String>,
}

/// `secs` since the epoch as RFC 3339 (`2026-12-01T01:55:00Z`).
pub(super) fn rfc3339(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    aws_smithy_types::DateTime::from_secs(secs)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| format!("@{secs}"))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BlockCounts {
    pub total: u64,
    pub settled: u64,
    pub failed: u64,
    pub resumed: u64,
}

/// How a restore was throttled: the answers, the wall time, and the request
/// rate each throttling store is paced at now (or was when the run ended).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Throttling {
    pub throttled_responses: u64,
    pub throttled_millis: u64,
    pub requests_per_sec: std::collections::BTreeMap<String, u32>,
}

impl Throttling {
    fn of(fetch: &crate::fetch::FetchCounts) -> Self {
        Self {
            throttled_responses: fetch.throttled_responses,
            throttled_millis: fetch.throttled_millis,
            requests_per_sec: fetch.request_rate_per_source.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ByteCounts {
    pub total: u64,
    pub settled: u64,
    pub written: u64,
}

pub(super) fn fill_live(status: &mut JobStatus, progress: &Progress) {
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
        let counts = t.counts();
        status.throttling = Throttling::of(&counts);
        status.sources = counts.served_by_source.into_iter().collect();
    }
}

impl Worker {
    pub(super) fn status_of(&self, record: &JobRecord) -> JobStatus {
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
            throttling: Throttling::default(),
            reason: record.reason.clone(),
            damage: record.damage.clone(),
            export: live.exports.get(&id).map(|h| h.status()).or_else(|| record.export.clone()),
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
            status.throttling = Throttling::of(&s.fetch);
        }
        match (record.state, live.running.get(&id)) {
            (JobState::Running, Some(run)) if run.run == record.run => fill_live(&mut status, &run.progress),
            (JobState::Queued, _) => status.held_by = live.held.get(&id).map(|h| h.reason.clone()),
            _ => {}
        }
        status
    }
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
}
