//! Fetch: one block's bytes from the first source that can serve them.
//!
//! In: a block object key, what the manifest says it must be
//! ([`Expected`]), and the ordered sources (primary first). Out: a
//! [`VerifiedBlock`] and the source that served it, or, when every source
//! failed, the last error of each source (the damage report's material).
//!
//! Per source, every attempt has its own deadline (the timeout sits inside the
//! retry), and the retry loop has two bounds: attempts and elapsed time, with
//! decorrelated jitter between attempts. What happens next is decided by the
//! error's class, decided once where the error arose:
//!
//! | class | on this source | then |
//! |---|---|---|
//! | throttled, transient | retry with backoff, within both bounds | next source |
//! | permanent (404, 403) | no retry | next source at once |
//! | corrupt (hash, length) | no retry, never written | next source at once |
//!
//! Fetches of different blocks run concurrently and independently, so one
//! wedged block only holds its own slot of the in-flight budget: it never
//! holds up the others (no head-of-line blocking).

pub mod backoff;
pub mod budget;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::block::BlockIndex;
use crate::error::{ErrorClass, StoreError};
use crate::metrics as m;
use crate::store::SharedStore;
use crate::verify::{Expected, VerifiedBlock, verify};
use backoff::Backoff;

/// A place blocks can come from, with its role in the fallback order.
#[derive(Debug, Clone)]
pub struct Source {
    /// `primary`, `secondary1`, `secondary2`, …: a bounded metric label.
    pub name: String,
    pub store: SharedStore,
}

impl Source {
    /// Name the sources by their order: the first is the primary.
    pub fn ordered(stores: Vec<SharedStore>) -> Vec<Source> {
        stores
            .into_iter()
            .enumerate()
            .map(|(i, store)| Source { name: if i == 0 { "primary".into() } else { format!("secondary{i}") }, store })
            .collect()
    }
}

/// Bounds of the retry loop on one source.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub attempts_max: u32,
    pub elapsed_max: Duration,
    pub attempt_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub jitter_seed: u64,
}

impl RetryPolicy {
    pub fn from_config(config: &crate::config::FetchConfig) -> Self {
        Self {
            attempts_max: config.attempts_max.get(),
            elapsed_max: config.source_elapsed_max(),
            attempt_timeout: config.attempt_timeout(),
            backoff_base: config.backoff_base(),
            backoff_cap: config.backoff_cap(),
            jitter_seed: config.jitter_seed.unwrap_or_else(clock_seed),
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How one source failed one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SourceFailure {
    pub source: String,
    pub attempts: u32,
    pub last_error: StoreError,
}

/// What fetch tells the rest of the job while it works: which blocks are in
/// flight (for stall reasons), and counters per source.
#[derive(Debug)]
pub struct FetchTelemetry {
    sources: Vec<String>,
    served: Vec<AtomicU64>,
    requests: AtomicU64,
    retries: AtomicU64,
    fallbacks: AtomicU64,
    corrupt: AtomicU64,
    inflight: Mutex<HashMap<BlockIndex, InFlight>>,
}

/// A block being fetched right now.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub block: BlockIndex,
    pub source: String,
    pub attempts: u32,
    #[serde(skip)]
    pub started: Instant,
}

/// A snapshot of the counters, for summaries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FetchCounts {
    /// Distinct block objects served, by source name.
    pub served_by_source: Vec<(String, u64)>,
    pub requests: u64,
    pub retries: u64,
    pub fallbacks: u64,
    pub corrupt_responses: u64,
}

impl FetchTelemetry {
    pub fn new(sources: &[Source]) -> Self {
        Self {
            sources: sources.iter().map(|s| s.name.clone()).collect(),
            served: sources.iter().map(|_| AtomicU64::new(0)).collect(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub fn counts(&self) -> FetchCounts {
        FetchCounts {
            served_by_source: self
                .sources
                .iter()
                .zip(&self.served)
                .map(|(name, n)| (name.clone(), n.load(Ordering::Relaxed)))
                .collect(),
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            corrupt_responses: self.corrupt.load(Ordering::Relaxed),
        }
    }

    /// The block that has been in flight the longest.
    pub fn oldest_inflight(&self) -> Option<InFlight> {
        let map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.values().min_by_key(|f| f.started).cloned()
    }

    /// The highest attempt count of any block in flight.
    pub fn attempts_max_inflight(&self) -> u32 {
        let map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|f| f.attempts).max().unwrap_or(0)
    }

    fn track(&self, block: BlockIndex, source: &str, attempts: u32, started: Instant) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(block, InFlight { block, source: source.to_owned(), attempts, started });
    }

    fn untrack(&self, block: BlockIndex) {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&block);
    }
}

/// Fetch and verify one block object, trying each source in order.
///
/// `block` names the block for telemetry (the first index holding this
/// object); the object may be written at several offsets afterwards.
pub async fn fetch_block(
    sources: &[Source],
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    policy: &RetryPolicy,
    telemetry: &FetchTelemetry,
) -> Result<(VerifiedBlock, usize), Vec<SourceFailure>> {
    let started = Instant::now();
    let mut failures = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        if i > 0 {
            telemetry.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FALLBACKS_TOTAL, "source" => source.name.clone()).increment(1);
        }
        let seed = policy.jitter_seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64;
        match fetch_from(source, key, expected, block, policy, seed, started, telemetry).await {
            Ok(verified) => {
                telemetry.untrack(block);
                telemetry.served[i].fetch_add(1, Ordering::Relaxed);
                return Ok((verified, i));
            }
            Err(failure) => failures.push(failure),
        }
    }
    telemetry.untrack(block);
    Err(failures)
}

/// The retry loop on one source.
#[allow(clippy::too_many_arguments)]
async fn fetch_from(
    source: &Source,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    policy: &RetryPolicy,
    seed: u64,
    job_started: Instant,
    telemetry: &FetchTelemetry,
) -> Result<VerifiedBlock, SourceFailure> {
    let source_started = Instant::now();
    let mut backoff = Backoff::new(policy.backoff_base, policy.backoff_cap, seed);
    let mut attempts = 0;
    loop {
        attempts += 1;
        telemetry.track(block, &source.name, attempts, job_started);
        telemetry.requests.fetch_add(1, Ordering::Relaxed);
        let attempt_started = Instant::now();
        let error = match attempt(source, key, expected).await {
            Ok(verified) => {
                record_request(source, "ok", attempt_started);
                return Ok(verified);
            }
            Err(error) => error,
        };
        record_request(source, error.class.name(), attempt_started);
        if error.class == ErrorClass::Corrupt {
            telemetry.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(block, source = %source.name, attempts, %error, "fetch attempt failed");
        let sleep = backoff.next_sleep();
        let out_of_time = source_started.elapsed() + sleep + policy.attempt_timeout > policy.elapsed_max;
        if !error.class.is_retryable() || attempts >= policy.attempts_max || out_of_time {
            return Err(SourceFailure { source: source.name.clone(), attempts, last_error: error });
        }
        telemetry.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::RETRIES_TOTAL, "source" => source.name.clone(), "reason" => error.class.name())
            .increment(1);
        tokio::time::sleep(sleep).await;
    }
}

/// One attempt: get under its own deadline, then verify.
async fn attempt(source: &Source, key: &str, expected: &Expected) -> Result<VerifiedBlock, StoreError> {
    let len_max = u64::from(expected.stored_len_bytes);
    // The attempt deadline is the store's innermost layer (`store/timeout.rs`).
    let raw = source.store.get(key, len_max).await?;
    metrics::counter!(m::FETCHED_BYTES_TOTAL, "source" => source.name.clone()).increment(raw.len() as u64);
    verify(raw, expected).map_err(|e| StoreError::new(e.class, format!("{key}: {}", e.message)))
}

fn record_request(source: &Source, outcome: &'static str, started: Instant) {
    metrics::counter!(m::REQUESTS_TOTAL, "source" => source.name.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(m::FETCH_LATENCY_SECONDS, "source" => source.name.clone())
        .record(started.elapsed().as_secs_f64());
}
