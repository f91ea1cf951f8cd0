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

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latencies kept per source.
const WINDOW_SAMPLES_MAX: usize = 512;
/// Samples needed before a source's quantile is trusted.
const WINDOW_SAMPLES_MIN: usize = 32;
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
}

impl Default for HedgeConfig {
    fn default() -> Self {
        Self { enabled: true, quantile: 0.95, ratio_max: 0.05, delay_min_millis: 20, median_multiple_min: 4.0 }
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
}

/// Hedging state of one restore.
#[derive(Debug)]
pub struct Hedger {
    config: HedgeConfig,
    windows: Vec<Window>,
    requests: AtomicU64,
    hedges: AtomicU64,
}

impl Hedger {
    pub fn new(config: HedgeConfig, sources: usize) -> Self {
        Self {
            config,
            windows: (0..sources).map(|_| Window::default()).collect(),
            requests: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
        }
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
        if samples.len() >= WINDOW_SAMPLES_MIN && recorded % RECOMPUTE_EVERY == 0 {
            let mut sorted: Vec<u64> = samples.iter().copied().collect();
            drop(samples);
            sorted.sort_unstable();
            let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
            let median_floor = (at(0.5) as f64 * self.config.median_multiple_min) as u64;
            let floor = (self.config.delay_min_millis * 1000).max(median_floor);
            window.delay_micros.store(at(self.config.quantile).max(floor).max(1), Ordering::Relaxed);
        }
    }

    /// How long to wait before hedging an attempt on `source`; `None` when
    /// hedging is off or the source has too few samples yet.
    pub fn delay(&self, source: usize) -> Option<Duration> {
        if !self.config.enabled || self.config.ratio_max <= 0.0 {
            return None;
        }
        let micros = self.windows.get(source)?.delay_micros.load(Ordering::Relaxed);
        (micros > 0).then(|| Duration::from_micros(micros))
    }

    /// Take one hedge from the budget, if the cap allows it.
    pub fn try_hedge(&self) -> bool {
        let allowed = (self.requests.load(Ordering::Relaxed) as f64 * self.config.ratio_max) as u64;
        self.hedges.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| (h < allowed).then_some(h + 1)).is_ok()
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
