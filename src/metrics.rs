//! Metric names, in one place, with base units last in the name.
//!
//! Recorded through the `metrics` facade; `rehydrate serve` installs the
//! Prometheus exporter and [`describe`] registers the help texts at startup.
//! Label sets are bounded: `source` is `peerN`/`primary`/`secondaryN`, `outcome` and
//! `reason` are error classes, `served` is `local`/`on_demand`, `state` is a job state, `job` (on
//! [`JOB_PROGRESS_RATIO`], [`JOB_ELAPSED_SECONDS`] and [`JOB_ETA_SECONDS`]
//! only) a running job's id, so at most
//! `worker.jobs_running_max` series.

pub const REQUESTS_TOTAL: &str = "rehydrate_fetch_requests_total";
pub const RETRIES_TOTAL: &str = "rehydrate_fetch_retries_total";
pub const FALLBACKS_TOTAL: &str = "rehydrate_fetch_fallbacks_total";
pub const HEDGES_TOTAL: &str = "rehydrate_fetch_hedges_total";
pub const FETCH_LATENCY_SECONDS: &str = "rehydrate_fetch_latency_seconds";
pub const FETCHED_BYTES_TOTAL: &str = "rehydrate_fetched_bytes_total";
pub const SERVED_BLOCKS_TOTAL: &str = "rehydrate_blocks_by_source_total";
pub const PEER_SERVED_BLOCKS_TOTAL: &str = "rehydrate_peer_served_blocks_total";
pub const PEER_SERVED_BYTES_TOTAL: &str = "rehydrate_peer_served_bytes_total";
pub const PEER_REFUSED_TOTAL: &str = "rehydrate_peer_refused_total";
pub const WRITTEN_BYTES_TOTAL: &str = "rehydrate_written_bytes_total";
pub const SETTLED_BLOCKS_TOTAL: &str = "rehydrate_settled_blocks_total";
pub const SETTLED_BYTES_TOTAL: &str = "rehydrate_settled_bytes_total";
pub const FAILED_BLOCKS_TOTAL: &str = "rehydrate_failed_blocks_total";
pub const INFLIGHT_BYTES: &str = "rehydrate_inflight_bytes";
pub const INFLIGHT_ATTEMPTS_MAX: &str = "rehydrate_inflight_attempts_max";
pub const SOURCE_CONCURRENCY_LIMIT: &str = "rehydrate_source_concurrency_limit";
pub const SOURCE_REQUEST_RATE: &str = "rehydrate_source_request_rate";
pub const THROTTLED_TOTAL: &str = "rehydrate_fetch_throttled_total";
pub const STALLED_RESTORES: &str = "rehydrate_stalled_restores";
pub const PROGRESS_RATIO: &str = "rehydrate_restore_progress_ratio";
pub const SYNCS_TOTAL: &str = "rehydrate_target_syncs_total";
pub const SYNC_LATENCY_SECONDS: &str = "rehydrate_target_sync_latency_seconds";
pub const JOBS: &str = "rehydrate_jobs";
/// Labelled `job`, one series per running job only: rendered by the API at
/// each scrape from the running jobs (not through the facade, which cannot
/// drop a series when its job ends).
pub const JOB_PROGRESS_RATIO: &str = "rehydrate_job_progress_ratio";
pub const OLDEST_QUEUED_JOB_AGE_SECONDS: &str = "rehydrate_oldest_queued_job_age_seconds";
pub const OLDEST_INFLIGHT_BLOCK_AGE_SECONDS: &str = "rehydrate_oldest_inflight_block_age_seconds";
pub const PENDING_BLOCKS: &str = "rehydrate_pending_blocks";

/// NBD exports of volumes being restored (`--export`, jobs with `export`).
pub const NBD_READS_TOTAL: &str = "rehydrate_nbd_reads_total";
pub const NBD_WRITES_TOTAL: &str = "rehydrate_nbd_writes_total";
pub const NBD_FLUSHES_TOTAL: &str = "rehydrate_nbd_flushes_total";
pub const NBD_DEMAND_FETCHES_TOTAL: &str = "rehydrate_nbd_demand_fetches_total";
pub const NBD_DEMAND_FAILURES_TOTAL: &str = "rehydrate_nbd_demand_failures_total";
pub const NBD_SHARED_FETCHES_TOTAL: &str = "rehydrate_nbd_shared_fetches_total";
/// Labelled `served`: `local` (every block was on the target) or
/// `on_demand` (the read waited for a block to be fetched).
pub const NBD_READ_LATENCY_SECONDS: &str = "rehydrate_nbd_read_latency_seconds";
pub const NBD_OWNED_BLOCKS_TOTAL: &str = "rehydrate_nbd_owned_blocks_total";

pub const JOB_ELAPSED_SECONDS: &str = "rehydrate_job_elapsed_seconds";
pub const JOB_ETA_SECONDS: &str = "rehydrate_job_eta_seconds";
/// Help text of [`JOB_ELAPSED_SECONDS`].
pub const JOB_ELAPSED_SECONDS_HELP: &str = "Seconds each running job has been running (this run), by job.";
/// Help text of [`JOB_ETA_SECONDS`].
pub const JOB_ETA_SECONDS_HELP: &str =
    "Seconds each running job still needs at its throughput so far, by job (absent until it has written a byte).";
/// Help text of [`JOB_PROGRESS_RATIO`].
pub const JOB_PROGRESS_RATIO_HELP: &str = "Settled bytes over total bytes of each running job, by job.";

/// Register help texts and units with whatever recorder is installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS_TOTAL, "Block object requests sent, by source and outcome (ok or error class).");
    describe_counter!(RETRIES_TOTAL, "Retries of block fetches on the same source, by source and error class.");
    describe_counter!(FALLBACKS_TOTAL, "Blocks that went to a later source, by the source they went to.");
    describe_counter!(
        HEDGES_TOTAL,
        "Hedges started for slow attempts, by the source they went to (one still waiting for a rate-limit token or slot when the first answer arrives is dropped unsent)."
    );
    describe_histogram!(
        FETCH_LATENCY_SECONDS,
        Unit::Seconds,
        "Latency of one fetch attempt, from the request leaving the local queues (rate limit, concurrency gate) to its body verified."
    );
    describe_counter!(FETCHED_BYTES_TOTAL, Unit::Bytes, "Bytes of block objects received, by source.");
    describe_counter!(
        SERVED_BLOCKS_TOTAL,
        "Distinct block objects fetched, by the source that served them (peerN, primary, secondaryN)."
    );
    describe_counter!(PEER_SERVED_BLOCKS_TOTAL, "Blocks this worker served to peers (GET /v1/blocks, verified).");
    describe_counter!(PEER_SERVED_BYTES_TOTAL, Unit::Bytes, "Bytes this worker served to peers.");
    describe_counter!(PEER_REFUSED_TOTAL, "Peer block requests not served, by reason (not_held, busy, mismatch, io).");
    describe_counter!(WRITTEN_BYTES_TOTAL, Unit::Bytes, "Bytes written to targets (not yet durable).");
    describe_counter!(SETTLED_BLOCKS_TOTAL, "Blocks written and made durable by fdatasync.");
    describe_counter!(SETTLED_BYTES_TOTAL, Unit::Bytes, "Bytes written and made durable by fdatasync.");
    describe_counter!(FAILED_BLOCKS_TOTAL, "Blocks that failed on every source.");
    describe_gauge!(INFLIGHT_BYTES, Unit::Bytes, "Bytes of block data held between fetch and write, all jobs.");
    describe_gauge!(INFLIGHT_ATTEMPTS_MAX, "The highest attempt count of any block in flight.");
    describe_gauge!(
        SOURCE_CONCURRENCY_LIMIT,
        "Requests a source may have in flight now (AIMD: shrinks on throttling, grows on success)."
    );
    describe_gauge!(
        SOURCE_REQUEST_RATE,
        "Requests per second a store is paced at, learned from its throttles (0: unpaced, it never throttled)."
    );
    describe_counter!(
        THROTTLED_TOTAL,
        "Throttled answers (503 SlowDown, 429), by source; retried at the adapted rate."
    );
    describe_gauge!(STALLED_RESTORES, "Running restores with nothing settled for fetch.stall_after_millis.");
    describe_gauge!(
        PROGRESS_RATIO,
        "Settled bytes over total bytes, of the last restore that settled blocks (one-shot CLI: its only restore)."
    );
    describe_counter!(SYNCS_TOTAL, "fdatasync calls on targets.");
    describe_histogram!(SYNC_LATENCY_SECONDS, Unit::Seconds, "Latency of fdatasync on targets.");
    describe_gauge!(JOBS, "Jobs in the worker's job table, by state (state=\"queued\" is the queue depth).");
    describe_gauge!(
        OLDEST_QUEUED_JOB_AGE_SECONDS,
        Unit::Seconds,
        "How long the longest-waiting queued job has waited (0 with an empty queue)."
    );
    describe_gauge!(
        OLDEST_INFLIGHT_BLOCK_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest block fetch in flight over running jobs (0 with none)."
    );
    describe_gauge!(PENDING_BLOCKS, "Blocks of running jobs neither settled nor failed yet.");
    describe_nbd();
}

fn describe_nbd() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(NBD_READS_TOTAL, "READ requests served by NBD exports.");
    describe_counter!(NBD_WRITES_TOTAL, "WRITE, WRITE_ZEROES and TRIM requests served by NBD exports.");
    describe_counter!(NBD_FLUSHES_TOTAL, "FLUSH requests (and FUA writes) served by NBD exports.");
    describe_counter!(
        NBD_DEMAND_FETCHES_TOTAL,
        "Blocks fetched on demand because a client read (or a partial write) needed them before the background restore had them."
    );
    describe_counter!(
        NBD_SHARED_FETCHES_TOTAL,
        "Blocks a client read took from the background restore's fetch of them, already on the wire, instead of fetching them on demand."
    );
    describe_counter!(
        NBD_DEMAND_FAILURES_TOTAL,
        "Blocks fetched on demand that no source served (the read answered EIO)."
    );
    describe_histogram!(
        NBD_READ_LATENCY_SECONDS,
        Unit::Seconds,
        "Latency of NBD reads, by served: local (every block on the target already) or on_demand (waited for a fetch)."
    );
    describe_counter!(
        NBD_OWNED_BLOCKS_TOTAL,
        "Blocks that became the client's by a write (the restore never overwrites them)."
    );
}
