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
//! | throttled (paced store) | retry at the store's adapted rate, after its `Retry-After` (capped); bounded by time, attempts not spent | next source |
//! | transient (and throttled on an unpaced store) | retry with backoff, within both bounds | next source |
//! | permanent (404, 403) | no retry | next source at once |
//! | corrupt (hash, length) | no retry, never written | next source at once |
//!
//! Fetches of different blocks run concurrently and independently, so one
//! wedged block only holds its own slot of the in-flight budget: it never
//! holds up the others (no head-of-line blocking).

pub mod backoff;
pub mod budget;
pub mod config;
pub mod hedge;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::block::BlockIndex;
use crate::error::{ErrorClass, StoreError};
use crate::metrics as m;
use crate::store::RequestContext;
use crate::store::SharedStore;
use crate::store::rate::{RateControl, THROTTLING_NOW};
use crate::store::timeout::SentAt;
use crate::verify::{Expected, VerifiedBlock, verify};
use backoff::Backoff;
pub use config::FetchConfig;
pub use hedge::{Grant, HedgeConfig, Hedger};

/// A place blocks can come from, with its role in the fallback order.
#[derive(Debug, Clone)]
pub struct Source {
    /// `primary`, `secondary1`, `secondary2`, …: a bounded metric label.
    pub name: String,
    pub store: SharedStore,
    /// The store's adaptive request rate, when it is paced (`store/rate.rs`).
    pub rate: Option<Arc<RateControl>>,
    /// A snapshot of the same volume that this source holds, when it is not
    /// the restored snapshot's own kind (a rehydrate snapshot as the
    /// secondary of an EBS snapshot): a block is then asked of it by index,
    /// under its own key and verified against its own hash; a block it holds
    /// as zero is zeros. `None`: the same key as the primary's.
    pub snapshot: Option<Arc<dyn crate::snapshot::Snapshot>>,
    /// A peer worker: asked for the decoded key form ([`crate::peer::decoded`]).
    pub peer: bool,
}

impl Source {
    /// Whether the store asked us to slow down just now: no hedge goes to it.
    pub fn throttling_now(&self) -> bool {
        self.rate.as_ref().is_some_and(|rate| rate.throttling_now())
    }
}

impl Source {
    /// Name the sources by their order: the first is the primary.
    pub fn ordered(stores: Vec<SharedStore>) -> Vec<Source> {
        stores
            .into_iter()
            .enumerate()
            .map(|(i, store)| Source {
                name: if i == 0 { "primary".into() } else { format!("secondary{i}") },
                rate: store.rate_control(),
                store,
                snapshot: None,
                peer: false,
            })
            .collect()
    }

    /// Peer workers ahead of `stores`: `peer1`, `peer2`, … then the stores
    /// named as [`Source::ordered`] names them.
    pub fn peers_then(peers: Vec<SharedStore>, stores: Vec<SharedStore>) -> Vec<Source> {
        let peers = peers.into_iter().enumerate().map(|(i, store)| Source {
            name: format!("peer{}", i + 1),
            rate: None,
            store,
            snapshot: None,
            peer: true,
        });
        peers.chain(Self::ordered(stores)).collect()
    }

    /// The key to ask this source for, and what its answer must be: a peer
    /// serves decoded blocks.
    fn request<'k>(&self, key: &'k str, expected: &Expected) -> (std::borrow::Cow<'k, str>, Expected) {
        if self.peer {
            let (key, expected) = crate::peer::decoded(expected);
            (std::borrow::Cow::Owned(key), expected)
        } else {
            (std::borrow::Cow::Borrowed(key), *expected)
        }
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
    pub retry_after_max: Duration,
    pub jitter_seed: u64,
}

impl RetryPolicy {
    pub fn from_config(config: &crate::fetch::FetchConfig) -> Self {
        Self {
            attempts_max: config.attempts_max.get(),
            elapsed_max: config.source_elapsed_max(),
            attempt_timeout: config.attempt_timeout(),
            backoff_base: config.backoff_base(),
            backoff_cap: config.backoff_cap(),
            retry_after_max: config.retry_after_max(),
            jitter_seed: config.jitter_seed.unwrap_or_else(clock_seed),
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// How one source failed one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
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
    /// Which of `sources` are peer workers.
    peers: Vec<bool>,
    served: Vec<AtomicU64>,
    requests: AtomicU64,
    retries: AtomicU64,
    fallbacks: AtomicU64,
    corrupt: AtomicU64,
    hedges: AtomicU64,
    throttled: AtomicU64,
    throttle_clock: Mutex<ThrottleClock>,
    rates: Vec<Option<Arc<RateControl>>>,
    inflight: Mutex<HashMap<BlockIndex, InFlight>>,
}

/// Wall time during which a restore was being throttled: each throttled
/// answer counts as throttling for [`THROTTLING_NOW`] after it, overlapping
/// spells merged.
#[derive(Debug, Default)]
struct ThrottleClock {
    closed: Duration,
    open: Option<(Instant, Instant)>,
}

impl ThrottleClock {
    fn record(&mut self, now: Instant) {
        let until = now + THROTTLING_NOW;
        self.open = match self.open {
            Some((start, end)) if now <= end => Some((start, until)),
            Some((start, end)) => {
                self.closed += end - start;
                Some((now, until))
            }
            None => Some((now, until)),
        };
    }

    fn total(&self, now: Instant) -> Duration {
        self.closed + self.open.map_or(Duration::ZERO, |(start, end)| end.min(now).saturating_duration_since(start))
    }
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
    /// Hedges started for slow attempts. A hedge still waiting for a
    /// rate-limit token or a concurrency slot when the first answer arrives
    /// is dropped unsent, so a store may see fewer extra requests than this.
    pub hedges: u64,
    /// Throttled answers (503 SlowDown, 429) on paced stores; they are
    /// retried at the store's adapted rate and spend no attempt.
    #[serde(default)]
    pub throttled_responses: u64,
    /// How long the restore was being throttled (wall time; each throttled
    /// answer counts for a second after it, spells merged).
    #[serde(default)]
    pub throttled_millis: u64,
    /// The rate each throttling source settled at: its send rate at its
    /// last throttle, the limit learned (requests per second, rounded). Only
    /// sources that throttled are listed.
    #[serde(default)]
    pub request_rate_per_source: Vec<(String, u32)>,
}

impl FetchTelemetry {
    pub fn new(sources: &[Source]) -> Self {
        Self {
            sources: sources.iter().map(|s| s.name.clone()).collect(),
            peers: sources.iter().map(|s| s.peer).collect(),
            served: sources.iter().map(|_| AtomicU64::new(0)).collect(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            throttle_clock: Mutex::new(ThrottleClock::default()),
            rates: sources.iter().map(|s| s.rate.clone()).collect(),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    fn record_throttle(&self, source: &str) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::THROTTLED_TOTAL, "source" => source.to_owned()).increment(1);
        self.throttle_clock.lock().unwrap_or_else(|e| e.into_inner()).record(Instant::now());
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
            hedges: self.hedges.load(Ordering::Relaxed),
            throttled_responses: self.throttled.load(Ordering::Relaxed),
            throttled_millis: self
                .throttle_clock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .total(Instant::now())
                .as_millis() as u64,
            request_rate_per_source: self
                .sources
                .iter()
                .zip(&self.rates)
                .filter_map(|(name, rate)| {
                    let rate = rate.as_ref()?.throttled_rate()?;
                    Some((name.clone(), rate.round().min(f64::from(u32::MAX)) as u32))
                })
                .collect(),
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

    /// Whether block `block` is being asked of a store (not a peer) now: a
    /// peer asking this worker for it is worth keeping waiting
    /// (`crate::peer::holdings`).
    pub fn asking_store(&self, block: BlockIndex) -> bool {
        let map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inflight) = map.get(&block) else { return false };
        self.sources.iter().zip(&self.peers).any(|(name, &peer)| !peer && *name == inflight.source)
    }

    pub(crate) fn track(&self, block: BlockIndex, source: &str, attempts: u32, started: Instant) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(block, InFlight { block, source: source.to_owned(), attempts, started });
    }

    pub(crate) fn untrack(&self, block: BlockIndex) {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(&block);
    }
}

/// What every fetch of one restore shares.
#[derive(Debug)]
pub struct FetchContext {
    /// The restore these fetches work for: its turn at the stores' gates.
    pub tenant: u64,
    /// Fetches for a reader waiting now: their requests go first at the
    /// stores' local queues ([`RequestContext::demand`]).
    pub demand: bool,
    pub sources: Vec<Source>,
    pub policy: RetryPolicy,
    pub telemetry: std::sync::Arc<FetchTelemetry>,
    pub hedger: Hedger,
}

impl FetchContext {
    pub fn new(sources: Vec<Source>, config: &crate::fetch::FetchConfig) -> Self {
        let telemetry = std::sync::Arc::new(FetchTelemetry::new(&sources));
        let hedger = Hedger::new(config.hedge, sources.len());
        Self { tenant: 0, demand: false, policy: RetryPolicy::from_config(config), telemetry, hedger, sources }
    }

    /// What one fetch holds besides its object, at most, whichever source
    /// serves it (a hedge may go to any): the largest of the sources'
    /// [`StoreUrl::request_overhead_bytes`](crate::store::StoreUrl::request_overhead_bytes).
    pub fn request_overhead_bytes(&self) -> u64 {
        self.sources.iter().map(|s| s.store.url().request_overhead_bytes()).max().unwrap_or(0)
    }

    /// The same, with every request made for restore `tenant`.
    pub fn for_tenant(mut self, tenant: u64) -> Self {
        self.tenant = tenant;
        self
    }

    /// The same, for readers waiting now ([`Self::demand`]).
    pub fn for_demand(mut self) -> Self {
        self.demand = true;
        self
    }
}

/// Fetch and verify one block object, trying each source in order.
///
/// `block` names the block for telemetry (the first index holding this
/// object); the object may be written at several offsets afterwards. Returns
/// the block and the index of the source that served it.
pub async fn fetch_block(
    ctx: &FetchContext,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
) -> Result<(VerifiedBlock, usize), Vec<SourceFailure>> {
    fetch_block_observed(ctx, key, expected, block, None).await
}

/// [`fetch_block`], marking `on_wire` while one of its requests is out:
/// from when it leaves the local queues (rate limits, concurrency gate) for
/// a store until its answer failed (then again for the retry). Unmarked,
/// the fetch has nothing out, and dropping it costs no request.
pub async fn fetch_block_observed(
    ctx: &FetchContext,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    on_wire: Option<&Arc<SentAt>>,
) -> Result<(VerifiedBlock, usize), Vec<SourceFailure>> {
    let started = Instant::now();
    let telemetry = &ctx.telemetry;
    let mut failures = Vec::new();
    for (i, source) in ctx.sources.iter().enumerate() {
        if i > 0 {
            telemetry.fallbacks.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FALLBACKS_TOTAL, "source" => source.name.clone()).increment(1);
        }
        match fetch_from(ctx, i, key, expected, block, started, on_wire).await {
            Ok((verified, served_by)) => {
                telemetry.untrack(block);
                telemetry.served[served_by].fetch_add(1, Ordering::Relaxed);
                let name = ctx.sources[served_by].name.clone();
                metrics::counter!(m::SERVED_BLOCKS_TOTAL, "source" => name).increment(1);
                return Ok((verified, served_by));
            }
            Err(failure) => failures.push(failure),
        }
    }
    telemetry.untrack(block);
    Err(failures)
}

/// The retry loop on source `i`.
async fn fetch_from(
    ctx: &FetchContext,
    i: usize,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    block_started: Instant,
    on_wire: Option<&Arc<SentAt>>,
) -> Result<(VerifiedBlock, usize), SourceFailure> {
    let (source, policy, telemetry) = (&ctx.sources[i], &ctx.policy, &ctx.telemetry);
    let seed = policy.jitter_seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64;
    let mut retry = RetryState::new(policy, seed, source.rate.is_some());
    loop {
        telemetry.track(block, &source.name, retry.attempts + 1, block_started);
        let error = match attempt_hedged(ctx, i, key, expected, block, on_wire).await {
            Ok(served) => return Ok(served),
            Err(error) => error,
        };
        // Nothing of this fetch is on the wire until the retry goes out.
        if let Some(sent) = on_wire {
            sent.clear();
        }
        if error.class == ErrorClass::Corrupt {
            telemetry.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(block, source = %source.name, attempts = retry.attempts + 1, %error, "fetch attempt failed");
        let next = retry.after(&error);
        if next.throttled {
            telemetry.record_throttle(&source.name);
        }
        let Some(sleep) = next.sleep else {
            return Err(SourceFailure { source: source.name.clone(), attempts: retry.attempts, last_error: error });
        };
        telemetry.retries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::RETRIES_TOTAL, "source" => source.name.clone(), "reason" => error.class.name())
            .increment(1);
        if next.throttled {
            tokio::time::sleep(sleep).await;
        } else if let Some(served) = backoff_racing_next_source(ctx, i, key, expected, block, sleep).await {
            return Ok(served);
        }
    }
}

/// The retry loop's bookkeeping on one source: the two bounds (failures and
/// elapsed time) and the backoff. A throttle on a paced store is not a
/// failure: the store's rate was cut, and the retry waits its turn at the new
/// rate after the store's `Retry-After` (capped), so only time bounds it.
#[derive(Debug)]
pub struct RetryState<'a> {
    policy: &'a RetryPolicy,
    backoff: Backoff,
    paced: bool,
    started: Instant,
    /// Requests answered so far.
    pub attempts: u32,
    /// Answers that spent an attempt.
    failures: u32,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy)]
pub struct NextStep {
    /// Sleep this long, then try again; `None`: give up on this source.
    pub sleep: Option<Duration>,
    /// The failure was a throttle on a paced store.
    pub throttled: bool,
}

impl<'a> RetryState<'a> {
    pub fn new(policy: &'a RetryPolicy, seed: u64, paced: bool) -> Self {
        let backoff = Backoff::new(policy.backoff_base, policy.backoff_cap, seed);
        Self { policy, backoff, paced, started: Instant::now(), attempts: 0, failures: 0 }
    }

    /// Account one failed attempt and decide the next step.
    pub fn after(&mut self, error: &StoreError) -> NextStep {
        self.attempts += 1;
        let throttled = self.paced && error.class == ErrorClass::Throttled;
        let sleep = if throttled {
            error.retry_after().unwrap_or(Duration::ZERO).min(self.policy.retry_after_max)
        } else {
            self.failures += 1;
            self.backoff.next_sleep()
        };
        let out_of_time = self.started.elapsed() + sleep + self.policy.attempt_timeout > self.policy.elapsed_max;
        let give_up = !error.class.is_retryable() || self.failures >= self.policy.attempts_max || out_of_time;
        NextStep { sleep: (!give_up).then_some(sleep), throttled }
    }
}

/// Read a whole object that is not a block (a manifest) from `store`, with
/// the retry policy's bounds: a throttling store never fails the read, it
/// only slows it down.
pub async fn get_retried(
    store: &SharedStore,
    request: &RequestContext,
    key: &str,
    len_max_bytes: u64,
    policy: &RetryPolicy,
) -> Result<bytes::Bytes, StoreError> {
    let mut retry = RetryState::new(policy, policy.jitter_seed, store.rate_control().is_some());
    loop {
        let error = match store.get_for(request, key, len_max_bytes).await {
            Ok(bytes) => return Ok(bytes),
            Err(error) => error,
        };
        match retry.after(&error).sleep {
            Some(sleep) => tokio::time::sleep(sleep).await,
            None => return Err(error),
        }
    }
}

/// Sleep out a backoff on source `i`. When a later source exists and the
/// hedge budget allows, ask it meanwhile, as a hedge: a key that fails fast
/// on the primary (a cold object answering 500) is then served by the next
/// source during the wait instead of after every retry. Returns the block
/// when that hedge brought a good one; otherwise the retry goes on.
async fn backoff_racing_next_source(
    ctx: &FetchContext,
    i: usize,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    sleep: Duration,
) -> Option<(VerifiedBlock, usize)> {
    let next = i + 1;
    if next >= ctx.sources.len()
        || ctx.sources[next].throttling_now()
        || !ctx.hedger.enabled()
        || !ctx.hedger.try_hedge()
    {
        tokio::time::sleep(sleep).await;
        return None;
    }
    ctx.telemetry.hedges.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::HEDGES_TOTAL, "source" => ctx.sources[next].name.clone()).increment(1);
    let wait = tokio::time::sleep(sleep);
    tokio::pin!(wait);
    tokio::select! {
        result = attempt(ctx, next, key, expected, block, Arc::default()) => match result {
            Ok(block) => Some((block, next)),
            Err(_) => {
                wait.await;
                None
            }
        },
        () = &mut wait => None,
    }
}

/// How often an attempt with no hedge delay known yet looks again.
const HEDGE_RECHECK: Duration = Duration::from_millis(50);
/// How often an attempt in the tail that waits for slower ones to be hedged
/// first looks again.
const TAIL_RECHECK: Duration = Duration::from_millis(5);

/// One attempt on source `i`, hedged when it runs past the source's usual
/// latency (or, in the job's tail, past a smaller multiple of it, slowest
/// first): the first good answer wins. Returns the block and the source that
/// served it; when both fail, the first attempt's error.
async fn attempt_hedged(
    ctx: &FetchContext,
    i: usize,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    on_wire: Option<&Arc<SentAt>>,
) -> Result<(VerifiedBlock, usize), StoreError> {
    // The caller's `on_wire` marks this attempt, unless one is out already
    // (a hedge marks its own).
    let sent = on_wire.filter(|s| s.get().is_none()).map_or_else(Arc::default, Arc::clone);
    let first = attempt(ctx, i, key, expected, block, Arc::clone(&sent));
    if !ctx.hedger.enabled() {
        return first.await.map(|b| (b, i));
    }
    let outstanding = ctx.hedger.outstanding(i, Instant::now());
    // A key slow on one source is often slow there again: prefer the next.
    let j = if i + 1 < ctx.sources.len() { i + 1 } else { i };
    tokio::pin!(first);
    // The clock starts when the request leaves the local queues (rate limit,
    // concurrency gate): waiting there is not the store being slow, and a
    // hedge would only queue behind it. Attempts that start before the
    // source has a latency history (the first hundred or so of a restore)
    // look again as the history fills, so a straggler among them is hedged
    // too; and every attempt looks again when the tail begins, since its
    // delay shrinks then.
    loop {
        let Some(started) = sent.get() else {
            tokio::select! {
                result = &mut first => return result.map(|b| (b, i)),
                () = sent.sent() => continue,
            }
        };
        let in_tail = ctx.hedger.in_tail();
        let wait = match ctx.hedger.delay(i) {
            // Never hedge to a store that asks us to slow down.
            Some(delay) if started.elapsed() >= delay && ctx.sources[j].throttling_now() => HEDGE_RECHECK,
            Some(delay) if started.elapsed() >= delay => match ctx.hedger.grant(&outstanding) {
                Grant::Hedge => break,
                Grant::Later => TAIL_RECHECK,
                Grant::Never if in_tail => return first.await.map(|b| (b, i)),
                // The budget is spent for now; the tail may still grant one.
                Grant::Never => tokio::select! {
                    result = &mut first => return result.map(|b| (b, i)),
                    () = ctx.hedger.tail_started() => continue,
                },
            },

            Some(delay) => delay - started.elapsed(),
            None => HEDGE_RECHECK,
        };
        tokio::select! {
            result = &mut first => return result.map(|b| (b, i)),
            () = tokio::time::sleep(wait) => {}
            () = ctx.hedger.tail_started(), if !in_tail => {}
        }
    }
    drop(outstanding);
    ctx.telemetry.hedges.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::HEDGES_TOTAL, "source" => ctx.sources[j].name.clone()).increment(1);
    let second = attempt(ctx, j, key, expected, block, Arc::default());
    tokio::pin!(second);
    tokio::select! {
        result = &mut first => match result {
            Ok(b) => Ok((b, i)),
            Err(e) => second.await.map(|b| (b, j)).map_err(|_| e),
        },
        result = &mut second => match result {
            Ok(b) => Ok((b, j)),
            Err(_) => first.await.map(|b| (b, i)),
        },
    }
}

/// One request to source `i`, then verify. `sent` learns when the request
/// left the local queues; latency is measured from there. A source with a
/// snapshot of its own is asked for block `block` by its own key.
async fn attempt(
    ctx: &FetchContext,
    i: usize,
    key: &str,
    expected: &Expected,
    block: BlockIndex,
    sent: Arc<SentAt>,
) -> Result<VerifiedBlock, StoreError> {
    let source = &ctx.sources[i];
    let own;
    let (key, expected) = match &source.snapshot {
        None => (key, expected),
        Some(snapshot) => match snapshot.block(block) {
            Some(held) => {
                own = (snapshot.object_key(&held), held.expected);
                (own.0.as_str(), &own.1)
            }
            // Its snapshot says the block is zero: so do its bytes.
            None => return Ok(VerifiedBlock::zeros(snapshot.layout().len(block) as usize)),
        },
    };
    let (key, expected) = source.request(key, expected);
    let (key, expected) = (key.as_ref(), &expected);
    ctx.telemetry.requests.fetch_add(1, Ordering::Relaxed);
    ctx.hedger.count_request();
    let queued = Instant::now();
    // The attempt deadline is the store's innermost layer (`store/timeout.rs`).
    let request = RequestContext { tenant: ctx.tenant, sent: Some(Arc::clone(&sent)), demand: ctx.demand };
    let result = match source.store.get_for(&request, key, u64::from(expected.stored_len_bytes)).await {
        Ok(raw) => {
            metrics::counter!(m::FETCHED_BYTES_TOTAL, "source" => source.name.clone()).increment(raw.len() as u64);
            let arrived = Instant::now();
            let verified = verify(raw, expected).map_err(|e| StoreError::new(e.class, format!("{key}: {}", e.message)));
            if ctx.demand {
                let sent_at = sent.get().unwrap_or(queued);
                tracing::debug!(
                    block,
                    source = %source.name,
                    queued_ms = (sent_at - queued).as_secs_f64() * 1e3,
                    store_ms = (arrived - sent_at).as_secs_f64() * 1e3,
                    verify_ms = arrived.elapsed().as_secs_f64() * 1e3,
                    "demand attempt"
                );
            }
            verified
        }
        Err(e) => Err(e),
    };
    let latency = sent.get().unwrap_or(queued).elapsed();
    let outcome = match &result {
        Ok(_) => {
            ctx.hedger.record(i, latency);
            "ok"
        }
        Err(e) => e.class.name(),
    };
    metrics::counter!(m::REQUESTS_TOTAL, "source" => source.name.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!(m::FETCH_LATENCY_SECONDS, "source" => source.name.clone()).record(latency.as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::block::{Compression, HashAlgorithm, block_key};
    use crate::store::BlockStore;
    use crate::store::fault::{Fault, FaultRule, FaultStore};
    use crate::store::file::FileStore;

    /// A store holding one block object, behind a fault layer.
    async fn store_with_block(dir: &std::path::Path, data: &[u8]) -> (Arc<FaultStore>, String, Expected) {
        let hash = HashAlgorithm::Blake3.hash(data);
        let key = block_key(&hash, Compression::None);
        let file = FileStore::new(dir.to_owned());
        file.put(&key, Bytes::copy_from_slice(data)).await.unwrap();
        let expected = Expected {
            hash,
            algorithm: HashAlgorithm::Blake3,
            compression: Compression::None,
            stored_len_bytes: data.len() as u32,
            len_bytes: data.len() as u32,
            hash_in: crate::verify::HashIn::Snapshot,
        };
        (Arc::new(FaultStore::new(Arc::new(file))), key, expected)
    }

    /// [`store_with_block`] whose first request for the block waits a minute
    /// (any later one is fast).
    async fn store_with_slow_first_request(dir: &std::path::Path, data: &[u8]) -> (Arc<FaultStore>, String, Expected) {
        let (store, key, expected) = store_with_block(dir, data).await;
        store.add(FaultRule::new(Fault::Latency(Duration::from_secs(60))).path_contains(&key).first(1));
        (store, key, expected)
    }

    /// The sources as a restore has them: every store inside its attempt
    /// deadline layer, which is also where a request is marked sent.
    fn sources(stores: Vec<crate::store::SharedStore>) -> Vec<Source> {
        let options = crate::store::StoreOptions { attempt_timeout: Duration::from_secs(120), ..Default::default() };
        let local = |s| crate::store::stack(crate::store::Backend::Local(s), &options).unwrap();
        Source::ordered(stores.into_iter().map(local).collect())
    }

    fn context(stores: Vec<crate::store::SharedStore>) -> FetchContext {
        context_of(sources(stores))
    }

    fn context_of(sources: Vec<Source>) -> FetchContext {
        let ctx = FetchContext::new(sources, &crate::fetch::FetchConfig::default());
        // A history of fast answers, so a slow one stands out; enough
        // requests that the 5 % cap allows a hedge.
        for i in 0..ctx.sources.len() {
            for _ in 0..64 {
                ctx.hedger.record(i, Duration::from_millis(1));
                ctx.hedger.count_request();
            }
        }
        ctx
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_attempt_is_hedged_and_the_first_good_answer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, expected) = store_with_slow_first_request(dir.path(), &[9u8; 8192]).await;
        let ctx = context(vec![store.clone()]);
        let (block, served_by) = fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(block.len(), 8192);
        assert_eq!(served_by, 0);
        assert_eq!(store.calls(&key), 2, "one hedge, no more");
        assert_eq!(ctx.telemetry.counts().hedges, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hedge_goes_to_the_next_source() {
        let dir = tempfile::tempdir().unwrap();
        let data = [5u8; 4096];
        let (slow, key, expected) = store_with_block(&dir.path().join("a"), &data).await;
        let (fast, _, _) = store_with_block(&dir.path().join("b"), &data).await;
        slow.add(FaultRule::new(Fault::Stall { after_bytes: 0 }).path_contains(&key));
        let ctx = context(vec![slow.clone(), fast.clone()]);
        let (_, served_by) = fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(served_by, 1, "the secondary's hedge won");
        assert_eq!((slow.calls(&key), fast.calls(&key)), (1, 1));
        assert_eq!(ctx.telemetry.counts().served_by_source[1].1, 1);
    }

    /// A remote store's production stack (with its adaptive rate) around
    /// `store`, short deadlines.
    fn paced(store: crate::store::SharedStore) -> crate::store::SharedStore {
        let options = crate::store::StoreOptions { attempt_timeout: Duration::from_secs(120), ..Default::default() };
        crate::store::stack(crate::store::Backend::Remote(store), &options).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_hedge_goes_to_a_store_that_is_throttling() {
        let dir = tempfile::tempdir().unwrap();
        let data = [6u8; 4096];
        let (slow, key, expected) = store_with_block(&dir.path().join("a"), &data).await;
        let (mirror, _, _) = store_with_block(&dir.path().join("b"), &data).await;
        slow.add(FaultRule::new(Fault::Latency(Duration::from_millis(500))).path_contains(&key).first(1));
        let mirror_stack = paced(mirror.clone());
        // The mirror just answered 503 SlowDown: it is throttling now.
        mirror_stack.rate_control().unwrap().on_response(Instant::now(), true);
        let ctx =
            context_of(vec![sources(vec![slow.clone()]).remove(0), Source::ordered(vec![mirror_stack]).remove(0)]);
        assert!(ctx.sources[1].throttling_now());
        let (_, served_by) = fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(served_by, 0, "the slow primary answered; nothing went to the throttling mirror");
        assert_eq!((slow.calls(&key), mirror.calls(&key)), (1, 0));
        assert_eq!(ctx.telemetry.counts().hedges, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn throttles_spend_no_attempt_and_their_retry_after_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, expected) = store_with_block(dir.path(), &[7u8; 4096]).await;
        // Three throttles, each asking for 200 ms, against one attempt.
        let slow_down = StoreError::throttled("503 SlowDown").with_retry_after(Some(Duration::from_millis(200)));
        store.add(FaultRule::new(Fault::Fail(slow_down)).path_contains(&key).first(3));
        let config =
            crate::fetch::FetchConfig { attempts_max: std::num::NonZeroU32::new(1).unwrap(), ..Default::default() };
        let ctx = FetchContext::new(Source::ordered(vec![paced(store.clone())]), &config);
        let started = Instant::now();
        fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(600), "three Retry-After waits: {:?}", started.elapsed());
        assert_eq!(store.calls(&key), 4);
        let counts = ctx.telemetry.counts();
        assert_eq!((counts.throttled_responses, counts.retries), (3, 3));
        assert!(counts.throttled_millis > 0);

        // A Retry-After beyond the cap waits only the cap.
        let (store, key, expected) = store_with_block(&dir.path().join("c"), &[8u8; 4096]).await;
        let slow_down = StoreError::throttled("503 SlowDown").with_retry_after(Some(Duration::from_secs(3600)));
        store.add(FaultRule::new(Fault::Fail(slow_down)).path_contains(&key).first(1));
        let config = crate::fetch::FetchConfig {
            retry_after_max_millis: std::num::NonZeroU64::new(100).unwrap(),
            ..Default::default()
        };
        let ctx = FetchContext::new(Source::ordered(vec![paced(store.clone())]), &config);
        tokio::time::timeout(Duration::from_secs(30), fetch_block(&ctx, &key, &expected, 0))
            .await
            .expect("capped at 100 ms, not an hour")
            .unwrap();
        assert_eq!(store.calls(&key), 2);

        // On a store that is not paced, a throttle is an ordinary failure.
        let (store, key, expected) = store_with_block(&dir.path().join("d"), &[9u8; 4096]).await;
        store.add(FaultRule::new(Fault::SlowDown).path_contains(&key));
        let config =
            crate::fetch::FetchConfig { attempts_max: std::num::NonZeroU32::new(2).unwrap(), ..Default::default() };
        let ctx = FetchContext::new(sources(vec![store.clone()]), &config);
        assert!(fetch_block(&ctx, &key, &expected, 0).await.is_err());
        assert_eq!(store.calls(&key), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_started_before_any_history_is_hedged_once_it_fills() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, expected) = store_with_slow_first_request(dir.path(), &[4u8; 4096]).await;
        let ctx = Arc::new(FetchContext::new(sources(vec![store.clone()]), &crate::fetch::FetchConfig::default()));
        let fetch = tokio::spawn({
            let (ctx, key) = (Arc::clone(&ctx), key.clone());
            async move { fetch_block(&ctx, &key, &expected, 0).await.map(|(_, served_by)| served_by) }
        });
        // The attempt is in flight with no history; then other blocks answer fast.
        while store.calls(&key) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..64 {
            ctx.hedger.record(0, Duration::from_millis(1));
            ctx.hedger.count_request();
        }
        assert_eq!(fetch.await.unwrap().unwrap(), 0);
        assert_eq!(store.calls(&key), 2, "the slow attempt was hedged once the history came");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backoff_after_a_fast_failure_asks_the_next_source() {
        let dir = tempfile::tempdir().unwrap();
        let data = [6u8; 4096];
        let (cold, key, expected) = store_with_block(&dir.path().join("a"), &data).await;
        let (mirror, _, _) = store_with_block(&dir.path().join("b"), &data).await;
        let error = StoreError::transient("500 InternalError");
        cold.add(FaultRule::new(Fault::Fail(error)).path_contains(&key));
        // A long backoff: without the hedge, the fallback would take seconds.
        let config = crate::fetch::FetchConfig {
            backoff_base_millis: std::num::NonZeroU64::new(2_000).unwrap(),
            backoff_cap_millis: std::num::NonZeroU64::new(2_000).unwrap(),
            ..Default::default()
        };
        let ctx = FetchContext::new(sources(vec![cold.clone(), mirror.clone()]), &config);
        for _ in 0..100 {
            ctx.hedger.count_request();
        }
        let (_, served_by) = fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(served_by, 1);
        // One call on the primary: the mirror answered during the first
        // backoff, so no retry was sent.
        assert_eq!((cold.calls(&key), mirror.calls(&key)), (1, 1));

        assert_eq!(ctx.telemetry.counts().hedges, 1);

        // Without hedge budget the retry policy runs its course first.
        let ctx = FetchContext::new(
            Source::ordered(vec![cold.clone(), mirror.clone()]),
            &crate::fetch::FetchConfig { backoff_base_millis: std::num::NonZeroU64::new(1).unwrap(), ..config },
        );
        let (_, served_by) = fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(served_by, 1);
        assert_eq!(cold.calls(&key), 1 + 4, "all attempts on the primary, then the fallback");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_attempt_waiting_out_a_long_delay_is_hedged_when_the_tail_begins() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, expected) = store_with_slow_first_request(dir.path(), &[3u8; 4096]).await;
        let ctx = Arc::new(FetchContext::new(sources(vec![store.clone()]), &crate::fetch::FetchConfig::default()));
        // Median 5 ms, p95 a minute: before the tail, a minute's wait.
        for n in 0..100 {
            ctx.hedger.record(0, if n % 10 == 0 { Duration::from_secs(60) } else { Duration::from_millis(5) });
            ctx.hedger.count_request();
        }
        let fetch = tokio::spawn({
            let (ctx, key) = (Arc::clone(&ctx), key.clone());
            async move { fetch_block(&ctx, &key, &expected, 0).await.map(|(_, served_by)| served_by) }
        });
        while store.calls(&key) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(store.calls(&key), 1, "not hedged before the tail");
        ctx.hedger.enter_tail();
        let served_by = tokio::time::timeout(Duration::from_secs(20), fetch).await.expect("hedged in the tail");
        assert_eq!(served_by.unwrap().unwrap(), 0);
        assert_eq!(store.calls(&key), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_rate_limit_token_is_not_slowness() {
        // Four blocks through a 2 requests/s limit with a burst of 1: the
        // last waits about 1.5 s for its token, 7.5 times the 200 ms hedge
        // delay a history of 50 ms answers sets (a 4 KiB file read on a
        // loaded machine stays well under it). Hedging it would only queue a
        // second request behind the same limit.
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(FileStore::new(dir.path().to_owned()));
        let mut blocks = Vec::new();
        for n in 0..4u8 {
            let data = vec![n; 4096];
            let hash = HashAlgorithm::Blake3.hash(&data);
            let key = block_key(&hash, Compression::None);
            file.put(&key, Bytes::from(data)).await.unwrap();
            let expected = Expected {
                hash,
                algorithm: HashAlgorithm::Blake3,
                compression: Compression::None,
                stored_len_bytes: 4096,
                len_bytes: 4096,
                hash_in: crate::verify::HashIn::Snapshot,
            };
            blocks.push((key, expected));
        }
        let counted = Arc::new(FaultStore::new(file));
        let limits = crate::store::limit::RateLimitConfig {
            requests_per_sec: std::num::NonZeroU32::new(2),
            request_burst: std::num::NonZeroU32::new(1),
            ..Default::default()
        };
        let options = crate::store::StoreOptions {
            attempt_timeout: Duration::from_secs(30),
            rate_limit: limits,
            ..Default::default()
        };
        // The production stack: the limit outside the deadline.
        let limited = crate::store::stack(crate::store::Backend::Remote(counted.clone()), &options).unwrap();
        let ctx = FetchContext::new(Source::ordered(vec![limited]), &crate::fetch::FetchConfig::default());
        for _ in 0..64 {
            ctx.hedger.record(0, Duration::from_millis(50));
            ctx.hedger.count_request();
        }
        let ctx = Arc::new(ctx);
        let started = Instant::now();
        let fetches: Vec<_> = blocks
            .iter()
            .enumerate()
            .map(|(n, (key, expected))| {
                let (ctx, key, expected) = (Arc::clone(&ctx), key.clone(), *expected);
                tokio::spawn(async move { fetch_block(&ctx, &key, &expected, n as u64).await.map(|_| ()) })
            })
            .collect();
        for fetch in fetches {
            fetch.await.unwrap().unwrap();
        }
        assert!(started.elapsed() >= Duration::from_millis(1000), "the limit held the last blocks back");
        assert_eq!(ctx.telemetry.counts().hedges, 0);
        for (key, _) in &blocks {
            assert_eq!(counted.calls(key), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_hedge_without_history_or_budget() {
        let dir = tempfile::tempdir().unwrap();
        let (store, key, expected) = store_with_block(dir.path(), &[1u8; 4096]).await;
        store.add(FaultRule::new(Fault::Latency(Duration::from_millis(200))).path_contains(&key));
        let ctx = FetchContext::new(sources(vec![store.clone()]), &crate::fetch::FetchConfig::default());
        fetch_block(&ctx, &key, &expected, 0).await.unwrap();
        assert_eq!(store.calls(&key), 1);
        assert_eq!(ctx.telemetry.counts().hedges, 0);
    }
}
