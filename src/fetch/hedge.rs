//! Hedged requests: a second request for a block whose first one is slow.
//!
//! Each source keeps a window of its recent successful attempt latencies.
//! Once an attempt has run longer than a high quantile of that window (p95 by
//! default, never less than a floor), a second attempt is sent, to the next
//! source when there is one (a key that is slow on one source is often slow
//! there again) or else to the same source, and the first good answer wins;
//! the loser is dropped, which cancels its request. Hedges go through the
//! same store layers as any attempt, so they count against the rate limits,
//! and they are capped at a share of all requests (5 % by default), so a store
//! that is slow everywhere is not asked twice for everything.
//!
//! The tail: once every block of the restore has been dispatched, the blocks
//! still in flight are all that stand between the restore and its end, and a
//! straggler among them costs the whole restore its wait. From then on an
//! attempt is hedged sooner, past a smaller multiple of the median latency
//! (2 by default), and the slowest attempts go first: an attempt takes a hedge
//! only when the hedges left in the budget cover every eligible attempt that
//! has been running longer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latencies kept per source.
const WINDOW_SAMPLES_MAX: usize = 512;
/// Samples needed before a source's quantile is trusted.
const WINDOW_SAMPLES_MIN: usize = 32;
/// Samples needed before a source's median is trusted for tail hedging: a
/// restore smaller than the window is all tail.
const TAIL_SAMPLES_MIN: usize = 8;
/// Recompute the quantile every this many samples (sorting 512 numbers).
const RECOMPUTE_EVERY: u64 = 16;

/// When to hedge.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HedgeConfig {
    /// Send hedges at all.
    pub enabled: bool,
    /// Hedge an attempt slower than this quantile of recent latencies.
    /// 0.95: one attempt in twenty is slow enough to be worth a second look.
    pub quantile: f64,
    /// Hedges at most this share of requests. 0.05 keeps the extra load
    /// small and bounded even when everything is slow.
    pub ratio_max: f64,
    /// Never hedge sooner than this. 20 ms: below it, a hedge costs more than
    /// the wait it saves.
    pub delay_min_millis: u64,
    /// Never hedge before this multiple of the median latency either. 4: on
    /// a healthy store p95 sits close to the median, and hedging there would
    /// spend the whole budget on ordinary variance, leaving none for the
    /// stragglers (a block 40 times slower than the rest) it exists for.
    pub median_multiple_min: f64,
    /// In the tail (every block dispatched), hedge an attempt slower than
    /// this multiple of the median, slowest first. 2: the blocks left are
    /// the restore's critical path, so waiting out p95 there costs the whole
    /// restore that wait.
    pub tail_median_multiple: f64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            quantile: 0.95,
            ratio_max: 0.05,
            delay_min_millis: 20,
            median_multiple_min: 4.0,
            tail_median_multiple: 2.0,
        }
    }
}

impl HedgeConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.5..1.0).contains(&self.quantile) {
            return Err(format!("hedge.quantile {} must be in [0.5, 1.0)", self.quantile));
        }
        if !(0.0..=0.5).contains(&self.ratio_max) {
            return Err(format!("hedge.ratio_max {} must be in [0, 0.5]", self.ratio_max));
        }
        if !(1.0..=100.0).contains(&self.median_multiple_min) {
            return Err(format!("hedge.median_multiple_min {} must be in [1, 100]", self.median_multiple_min));
        }
        if !(1.0..=100.0).contains(&self.tail_median_multiple) {
            return Err(format!("hedge.tail_median_multiple {} must be in [1, 100]", self.tail_median_multiple));
        }
        Ok(())
    }
}

/// Recent latencies of one source and the hedge delay derived from them.
#[derive(Debug, Default)]
struct Window {
    samples_micros: Mutex<VecDeque<u64>>,
    recorded: AtomicU64,
    /// 0 until enough samples.
    delay_micros: AtomicU64,
    /// The tail's hedge delay; 0 until [`TAIL_SAMPLES_MIN`] samples.
    tail_delay_micros: AtomicU64,
    /// The median latency; 0 until [`TAIL_SAMPLES_MIN`] samples.
    median_micros: AtomicU64,
}

/// Whether an attempt past its hedge delay may send a hedge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Send it: one hedge was taken from the budget.
    Hedge,
    /// Not yet: in the tail, slower attempts come first; look again shortly.
    Later,
    /// No: the budget is spent. Wait for the attempt.
    Never,
}

/// An attempt in flight that has not been hedged, for the tail's
/// slowest-first order. Removed from the hedger when dropped.
#[derive(Debug)]
pub struct Outstanding<'a> {
    hedger: &'a Hedger,
    key: (Instant, u64),
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        self.hedger.outstanding.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.key);
    }
}

/// Hedging state of one restore.
#[derive(Debug)]
pub struct Hedger {
    config: HedgeConfig,
    windows: Vec<Window>,
    requests: AtomicU64,
    hedges: AtomicU64,
    /// Every block has been dispatched: see the module docs.
    tail: AtomicBool,
    tail_began: std::sync::OnceLock<Instant>,
    tail_started: tokio::sync::watch::Sender<bool>,
    /// Unhedged attempts in flight: (start, id) → source.
    outstanding: Mutex<BTreeMap<(Instant, u64), usize>>,
    next_id: AtomicU64,
}

impl Hedger {
    pub fn new(config: HedgeConfig, sources: usize) -> Self {
        Self {
            config,
            windows: (0..sources).map(|_| Window::default()).collect(),
            requests: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            tail: AtomicBool::new(false),
            tail_began: std::sync::OnceLock::new(),
            tail_started: tokio::sync::watch::Sender::new(false),
            outstanding: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    /// Every block has been dispatched: hedge what is left sooner, slowest
    /// first.
    pub fn enter_tail(&self) {
        let _ = self.tail_began.set(Instant::now());
        self.tail.store(true, Ordering::Relaxed);
        self.tail_started.send_replace(true);
    }

    pub fn in_tail(&self) -> bool {
        self.tail.load(Ordering::Relaxed)
    }

    /// When the tail began, if it has.
    pub fn tail_began(&self) -> Option<Instant> {
        self.tail_began.get().copied()
    }

    /// Resolves once the tail has begun (at once if it has).
    pub async fn tail_started(&self) {
        let mut rx = self.tail_started.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|&tail| tail).await;
    }

    /// Register an attempt on `source` that started at `started`, until it
    /// is hedged or done.
    pub fn outstanding(&self, source: usize, started: Instant) -> Outstanding<'_> {
        let key = (started, self.next_id.fetch_add(1, Ordering::Relaxed));
        self.outstanding.lock().unwrap_or_else(|e| e.into_inner()).insert(key, source);
        Outstanding { hedger: self, key }
    }

    /// Whether hedges may be sent at all.
    pub fn enabled(&self) -> bool {
        self.config.enabled && self.config.ratio_max > 0.0
    }

    /// Count one request (hedges included) toward the hedge budget.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a successful attempt's latency on `source`.
    pub fn record(&self, source: usize, latency: Duration) {
        let Some(window) = self.windows.get(source) else { return };
        let recorded = window.recorded.fetch_add(1, Ordering::Relaxed) + 1;
        let mut samples = window.samples_micros.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == WINDOW_SAMPLES_MAX {
            samples.pop_front();
        }
        samples.push_back(latency.as_micros() as u64);
        // Few samples are cheap to sort: then every one counts.
        let due = recorded % RECOMPUTE_EVERY == 0 || samples.len() < WINDOW_SAMPLES_MIN;
        if samples.len() >= TAIL_SAMPLES_MIN && due {
            let mut sorted: Vec<u64> = samples.iter().copied().collect();
            drop(samples);
            sorted.sort_unstable();
            let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
            let delay_min = self.config.delay_min_millis * 1000;
            let median_micros = at(0.5);
            window.median_micros.store(median_micros.max(1), Ordering::Relaxed);
            let median = median_micros as f64;
            let tail = ((median * self.config.tail_median_multiple) as u64).max(delay_min).max(1);
            window.tail_delay_micros.store(tail, Ordering::Relaxed);
            if sorted.len() >= WINDOW_SAMPLES_MIN {
                let floor = delay_min.max((median * self.config.median_multiple_min) as u64);
                window.delay_micros.store(at(self.config.quantile).max(floor).max(1), Ordering::Relaxed);
            }
        }
    }

    /// The median of `source`'s recent successful attempts (hedging on or
    /// off); `None` until it has a few.
    pub fn median(&self, source: usize) -> Option<Duration> {
        let micros = self.windows.get(source)?.median_micros.load(Ordering::Relaxed);
        (micros > 0).then(|| Duration::from_micros(micros))
    }

    /// How long to wait before hedging an attempt on `source`: the tail's
    /// shorter delay once the tail has begun. `None` when hedging is off or
    /// the source has too few samples yet.
    pub fn delay(&self, source: usize) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let window = self.windows.get(source)?;
        let mut micros = window.delay_micros.load(Ordering::Relaxed);
        if self.in_tail() {
            let tail = window.tail_delay_micros.load(Ordering::Relaxed);
            if tail > 0 && (micros == 0 || tail < micros) {
                micros = tail;
            }
        }
        (micros > 0).then(|| Duration::from_micros(micros))
    }

    /// Hedges the cap allows right now.
    fn hedges_left(&self) -> u64 {
        let allowed = (self.requests.load(Ordering::Relaxed) as f64 * self.config.ratio_max) as u64;
        allowed.saturating_sub(self.hedges.load(Ordering::Relaxed))
    }

    /// Take one hedge from the budget, if the cap allows it.
    pub fn try_hedge(&self) -> bool {
        let allowed = (self.requests.load(Ordering::Relaxed) as f64 * self.config.ratio_max) as u64;
        self.hedges.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| (h < allowed).then_some(h + 1)).is_ok()
    }

    /// May `attempt`, which is past its hedge delay, send a hedge? Before the
    /// tail: if the budget allows. In the tail: only when the hedges left
    /// also cover every older attempt that is past its own delay, so the
    /// slowest go first. Takes the hedge from the budget on [`Grant::Hedge`].
    pub fn grant(&self, attempt: &Outstanding<'_>) -> Grant {
        if self.in_tail() {
            let left = self.hedges_left();
            if left == 0 {
                return Grant::Never;
            }
            let now = Instant::now();
            let older_eligible = {
                let outstanding = self.outstanding.lock().unwrap_or_else(|e| e.into_inner());
                outstanding
                    .range(..attempt.key)
                    .filter(|&(&(started, _), &source)| self.delay(source).is_some_and(|d| now - started >= d))
                    .count() as u64
            };
            if older_eligible >= left {
                return Grant::Later;
            }
        }
        if self.try_hedge() { Grant::Hedge } else { Grant::Never }
    }

    pub fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_follows_the_quantile_with_a_floor() {
        let h = Hedger::new(HedgeConfig::default(), 1);
        assert_eq!(h.delay(0), None, "no samples, no hedging");
        for i in 0..100u64 {
            h.record(0, Duration::from_millis(if i % 20 == 0 { 500 } else { 30 }));
        }
        let d = h.delay(0).unwrap();
        assert!(d >= Duration::from_millis(120) && d <= Duration::from_millis(500), "four medians at least: {d:?}");
        let fast = Hedger::new(HedgeConfig::default(), 1);
        for _ in 0..64 {
            fast.record(0, Duration::from_micros(100));
        }
        assert_eq!(fast.delay(0), Some(Duration::from_millis(20)), "the floor holds");
    }

    /// A hedger whose sources have a median of `median` and a p95 of `p95`,
    /// with `requests` requests counted.
    fn with_history(median: Duration, p95: Duration, requests: u64) -> Hedger {
        let h = Hedger::new(HedgeConfig::default(), 1);
        for i in 0..100 {
            h.record(0, if i % 10 == 0 { p95 } else { median });
        }
        for _ in 0..requests {
            h.count_request();
        }
        h
    }

    #[test]
    fn the_tail_hedges_sooner() {
        let h = with_history(Duration::from_millis(30), Duration::from_secs(2), 0);
        assert_eq!(h.delay(0), Some(Duration::from_secs(2)), "p95 before the tail");
        h.enter_tail();
        assert_eq!(h.delay(0), Some(Duration::from_millis(60)), "two medians in the tail");
        let floor = with_history(Duration::from_millis(1), Duration::from_millis(1), 0);
        floor.enter_tail();
        assert_eq!(floor.delay(0), Some(Duration::from_millis(20)), "the floor holds in the tail too");
    }

    #[test]
    fn a_small_restore_is_all_tail_and_needs_few_samples() {
        let h = Hedger::new(HedgeConfig::default(), 1);
        for _ in 0..TAIL_SAMPLES_MIN {
            h.record(0, Duration::from_millis(50));
        }
        assert_eq!(h.delay(0), None, "too few samples for the quantile");
        h.enter_tail();
        assert_eq!(h.delay(0), Some(Duration::from_millis(100)));
    }

    #[test]
    fn in_the_tail_the_slowest_attempts_are_hedged_first() {
        // 40 requests at 5 %: two hedges in the budget.
        let h = with_history(Duration::from_millis(10), Duration::from_millis(10), 40);
        h.enter_tail();
        let now = Instant::now();
        let newest = h.outstanding(0, now - Duration::from_millis(100));
        let middle = h.outstanding(0, now - Duration::from_millis(200));
        let oldest = h.outstanding(0, now - Duration::from_millis(300));
        let fresh = h.outstanding(0, now);
        assert_eq!(h.grant(&newest), Grant::Later, "two older attempts come first");
        assert_eq!(h.grant(&oldest), Grant::Hedge);
        drop(oldest);
        assert_eq!(h.grant(&newest), Grant::Later, "the middle one is still older, and one hedge is left");
        assert_eq!(h.grant(&middle), Grant::Hedge);
        drop(middle);
        assert_eq!(h.grant(&newest), Grant::Never, "the budget is spent");
        drop(fresh);
    }

    #[test]
    fn an_older_attempt_not_yet_due_does_not_hold_up_a_due_one() {
        // Source 0 answers in a second (tail delay 2 s), source 1 in 10 ms
        // (tail delay 20 ms); 20 requests at 5 %: one hedge.
        let h = Hedger::new(HedgeConfig::default(), 2);
        for _ in 0..TAIL_SAMPLES_MIN {
            h.record(0, Duration::from_secs(1));
            h.record(1, Duration::from_millis(10));
        }
        for _ in 0..20 {
            h.count_request();
        }
        h.enter_tail();
        let now = Instant::now();
        let _older_not_due = h.outstanding(0, now - Duration::from_millis(500));
        let due = h.outstanding(1, now - Duration::from_millis(100));
        assert_eq!(h.grant(&due), Grant::Hedge);
    }

    #[test]
    fn hedges_are_capped_at_their_share() {
        let h = Hedger::new(HedgeConfig::default(), 1);
        for _ in 0..100 {
            h.count_request();
        }
        let granted = (0..50).filter(|_| h.try_hedge()).count();
        assert_eq!(granted, 5);
        let off = Hedger::new(HedgeConfig { enabled: false, ..HedgeConfig::default() }, 1);
        for _ in 0..64 {
            off.record(0, Duration::from_millis(1));
        }
        assert_eq!(off.delay(0), None);
    }
}
