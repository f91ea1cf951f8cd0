//! The adaptive request rate of one store: [`AdaptiveRate`], a decorator
//! that paces requests at a rate it learns from the store's throttles.
//!
//! Real stores throttle at limits nobody configured (S3 at 5,500 GET/s per
//! prefix, lower while a prefix is being partitioned; gateways at their own
//! limits, per bucket or account, changing over a day). The concurrency
//! window ([`super::limit::AdaptiveConcurrency`]) cannot get under such a
//! limit when requests are fast: four requests of a millisecond each are
//! already 4,000 per second. This layer limits the *rate*.
//!
//! The rule is the one of the AWS SDKs' adaptive retry mode (a client-side
//! token bucket whose fill rate follows CUBIC), see [`Cubic`]:
//!
//! - until the store first throttles, nothing is paced (a healthy store is
//!   never slowed down);
//! - on a throttled answer the rate drops to `decrease_factor` (0.8) of the
//!   rate measured just before it, or, when most recent answers were
//!   throttles, to the share that got through (at most a cut to half),
//!   and that rate is remembered as the last one that was throttled;
//! - between throttles it grows back along a cubic curve: quickly while far
//!   below the last throttled rate, flat near it, then probing above it;
//!   never above twice the rate actually measured (a restore that sends
//!   little does not build up a rate it never tried).
//!
//! One throttling episode is one signal: a throttle counts only when its
//! request was sent once the last decrease had taken effect, one interval
//! of the new rate after it. Requests already in flight when the rate was
//! cut were sent at the old rate; their 503s say nothing new. A cut also
//! takes the pacer's burst credit away (the next request goes one new
//! interval later), so no request after it goes at the old rate's pace.
//! Counting the old rate's 503s (with readers' requests sent on slots
//! reserved at the old rate, and the burst credit spent at once after each
//! cut) cut the rate of a 40 req/s store 17 times within 300 ms of one
//! opening burst, to the floor.
//!
//! Pacing is a GCRA (virtual scheduling) behind a FIFO turnstile: requests
//! wait in arrival order, and the one at the head sleeps until its slot,
//! looking at the current rate again at least every [`RECHECK`]. So after a
//! throttle the requests already waiting are spread out by the new rate
//! instead of all going again after the same backoff. Demand requests (a
//! reader of an exported volume waits for each) queue apart, ahead of the
//! others: the background's head takes no slot while one waits. They are
//! paced like the rest, at the current rate: a slot reserved ahead at the
//! rate of the moment was kept after a cut (readers of a 40 req/s store
//! went at one per second for 30 s after a cut to the floor, on slots
//! reserved then, while the rate had grown back). A reader that never
//! stops therefore holds the background at the pacer; it cannot do so for
//! long, since each of its requests restores a block the background then
//! skips.
//!
//! One [`RateControl`] per store is shared by every restore in the process
//! (stores are opened once per URL). A configured `rate_limit` is a separate,
//! outer layer and stays a hard ceiling; the learned rate never reports
//! above it. The rate is exported as the `rehydrate_source_request_rate`
//! gauge (0 while unpaced).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{SharedStore, StoreError};
use crate::error::ErrorClass;

/// The head of the pacing queue looks at the rate again at least this often,
/// so a rate cut applies to requests already waiting.
pub const RECHECK: Duration = Duration::from_millis(20);
/// A store that throttled within this long is "throttling now": no hedge is
/// sent to it.
pub const THROTTLING_NOW: Duration = Duration::from_secs(1);

/// The adaptive request rate of one store. Every field may be omitted.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveRateConfig {
    /// Learn the store's rate from its throttles. Default true. Off, a
    /// throttled answer is retried with backoff and spends an attempt, as
    /// any transient error does.
    pub enabled: bool,
    /// The rate after a throttle, as a fraction of the send rate measured
    /// just before it. Default 0.8 (the AWS SDKs use 0.7): against a fixed
    /// limit L the store then admits 1.00 L at L = 40/s, 0.97 L at 300/s and
    /// 0.90 L at 2,000/s, with 1.4 %, 0.08 % and 0.01 % of requests
    /// throttled (`cubic_finds_an_unknown_limit_and_stays_near_it`, a
    /// simulated minute); with the SDKs' 0.7 and 0.4, 0.89 L at 300/s.
    pub decrease_factor: f64,
    /// How fast the rate grows back: the cubic curve's scale, in requests per
    /// second per second cubed. Default 1.0 (the AWS SDKs use 0.4): back to
    /// the throttled rate R after (R × (1 - decrease_factor) / scale)^(1/3)
    /// seconds, 3.9 s for R = 300 and 7.4 s for R = 2,000.
    pub cubic_scale: f64,
    /// The slowest the rate goes, requests per second. Default 1: a store
    /// that throttles everything is still asked once a second.
    pub requests_per_sec_min: f64,
    /// Requests that may go at once when the pacer has been idle, in seconds
    /// of the current rate. Default 0.05 (at least one request): 15 at 300/s,
    /// well inside the burst any token-bucket server of that rate admits.
    pub burst_secs: f64,
}

impl Default for AdaptiveRateConfig {
    fn default() -> Self {
        Self { enabled: true, decrease_factor: 0.8, cubic_scale: 1.0, requests_per_sec_min: 1.0, burst_secs: 0.05 }
    }
}

impl AdaptiveRateConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            return Err(format!("adaptive_rate.decrease_factor {} must be in (0, 1)", self.decrease_factor));
        }
        if !(self.cubic_scale > 0.0 && self.cubic_scale.is_finite()) {
            return Err(format!("adaptive_rate.cubic_scale {} must be positive", self.cubic_scale));
        }
        if !(self.requests_per_sec_min >= 0.01 && self.requests_per_sec_min.is_finite()) {
            return Err(format!(
                "adaptive_rate.requests_per_sec_min {} must be at least 0.01",
                self.requests_per_sec_min
            ));
        }
        if !(self.burst_secs >= 0.0 && self.burst_secs <= 10.0) {
            return Err(format!("adaptive_rate.burst_secs {} must be in [0, 10]", self.burst_secs));
        }
        Ok(())
    }
}

/// Events (requests sent) per second, measured over the last
/// [`RateMeter::SAMPLES`] of them within the last [`RateMeter::WINDOW`]: a short
/// window at a high rate, the whole second at a low one. A burst after a
/// lull (the first block requests after the manifest) reads as the burst's
/// rate, not as an average over the lull.
#[derive(Debug, Clone, Default)]
pub struct RateMeter {
    recent: std::collections::VecDeque<Instant>,
}

impl RateMeter {
    pub const SAMPLES: usize = 256;
    pub const WINDOW: Duration = Duration::from_secs(1);
    /// A rate is never measured over less than this, so a handful of
    /// responses in the same instant do not read as an absurd rate.
    const SPAN_MIN: Duration = Duration::from_millis(10);

    pub fn record(&mut self, now: Instant) {
        if self.recent.len() == Self::SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
    }

    /// Events per second (see the type's docs): the highest rate over the
    /// last 16, 64 and 256 events in the window, so one event before a lull
    /// does not dilute the burst after it. Erring high costs one more cut;
    /// erring low would drop the rate far below what the store allows.
    pub fn rate(&self, now: Instant) -> f64 {
        let mut best = 0.0f64;
        let mut count = 0u32;
        for &at in self.recent.iter().rev() {
            if now.saturating_duration_since(at) >= Self::WINDOW {
                break;
            }
            count += 1;
            if matches!(count, 16 | 64 | 256) {
                best = best.max(Self::per_sec(count, now.saturating_duration_since(at)));
            }
        }
        let oldest = self.recent.iter().rev().nth(count.saturating_sub(1) as usize);
        match oldest {
            Some(&at) if count > 0 => best.max(Self::per_sec(count, now.saturating_duration_since(at))),
            _ => best,
        }
    }

    fn per_sec(count: u32, span: Duration) -> f64 {
        f64::from(count) / span.max(Self::SPAN_MIN).as_secs_f64()
    }
}

/// The CUBIC rule of the AWS SDKs' adaptive retry mode, pure (time is
/// passed in). See the module docs.
#[derive(Debug, Clone)]
pub struct Cubic {
    decrease_factor: f64,
    scale: f64,
    rate_min: f64,
    /// A configured rate limit: the learned rate never goes above it.
    ceiling: Option<f64>,
    meter: RateMeter,
    /// The pacing rate; `None` until the first throttle (unpaced).
    fill_rate: Option<f64>,
    last_max_rate: f64,
    last_throttle: Option<Instant>,
    /// Seconds from a throttle until the curve is back at `last_max_rate`.
    time_window_secs: f64,
    /// Throttles of requests sent before this are the last cut's episode.
    settled_at: Option<Instant>,
    /// The share of recent answers that were throttles (a moving average
    /// over about [`SHARE_WINDOW`] answers).
    throttled_share: f64,
}

/// Answers the throttled share is averaged over.
const SHARE_WINDOW: f64 = 16.0;
/// The deepest one cut goes: to half the rate (as deep as TCP's halving;
/// deeper cuts overshoot while the storm's last 503s are still arriving).
const DEEPEST_CUT: f64 = 0.5;

impl Cubic {
    pub fn new(config: &AdaptiveRateConfig, ceiling: Option<f64>) -> Self {
        Self {
            decrease_factor: config.decrease_factor,
            scale: config.cubic_scale,
            rate_min: config.requests_per_sec_min,
            ceiling,
            meter: RateMeter::default(),
            fill_rate: None,
            last_max_rate: 0.0,
            last_throttle: None,
            time_window_secs: 0.0,
            settled_at: None,
            throttled_share: 0.0,
        }
    }

    /// The pacing rate in requests per second; `None` while unpaced.
    pub fn fill_rate(&self) -> Option<f64> {
        self.fill_rate
    }

    /// When the store last throttled a request.
    pub fn last_throttle(&self) -> Option<Instant> {
        self.last_throttle
    }

    /// The send rate at the store's last throttle: the limit learned, in
    /// requests per second; `None` while it never throttled.
    pub fn throttled_rate(&self) -> Option<f64> {
        self.last_throttle.map(|_| self.last_max_rate)
    }

    /// A request is being sent at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        self.meter.record(now);
    }

    /// A response to a request sent at `sent` arrived at `now`. Returns
    /// whether the rate was cut.
    pub fn on_response(&mut self, sent: Instant, now: Instant, throttled: bool) -> bool {
        // `meter` measures the send rate, read only when it is needed: a
        // store's first 503s come back before most of the answers they were
        // sent with (an error is short), so the answers alone would read as a
        // rate of almost nothing.
        self.throttled_share += (f64::from(u8::from(throttled)) - self.throttled_share) / SHARE_WINDOW;
        if throttled {
            // A request sent before the last cut took effect was paced at
            // the old rate: the cut already answered its throttle.
            if self.settled_at.is_some_and(|settled| sent < settled) {
                return false;
            }
            let measured = self.meter.rate(now);
            let rate = self.fill_rate.map_or(measured, |fill| fill.min(measured)).max(self.rate_min);
            // When most answers are throttles (a burst far above the limit,
            // a limit that dropped), cut to the share that got through rather
            // than by `decrease_factor` one round trip at a time: each round
            // trip at a rate far above the limit is another burst of 503s.
            let factor = self.decrease_factor.min(1.0 - self.throttled_share).max(DEEPEST_CUT);
            self.last_max_rate = rate;
            self.time_window_secs = (rate * (1.0 - factor) / self.scale).cbrt();
            self.last_throttle = Some(now);
            let fill = self.bounded(rate * factor);
            self.fill_rate = Some(fill);
            // The pacer sends the next request one interval of `fill` from
            // now ([`RateControl::on_response`]): the first paced at it.
            self.settled_at = Some(now + Duration::from_secs_f64(1.0 / fill));
            return true;
        }
        if let (Some(_), Some(cut)) = (self.fill_rate, self.last_throttle) {
            let t = now.saturating_duration_since(cut).as_secs_f64() - self.time_window_secs;
            let cubic = self.scale * t * t * t + self.last_max_rate;
            self.fill_rate = Some(self.bounded(cubic.min(2.0 * self.meter.rate(now))));
        }
        false
    }

    fn bounded(&self, rate: f64) -> f64 {
        let rate = rate.max(self.rate_min);
        self.ceiling.map_or(rate, |ceiling| rate.min(ceiling.max(self.rate_min)))
    }
}

/// The state one store's adaptive rate shares with everyone using the store:
/// the controller, the pacer, and what reports read.
#[derive(Debug)]
pub struct RateControl {
    cubic: Mutex<Cubic>,
    /// The fill rate's bits (0.0: unpaced), readable without the lock.
    fill_rate_bits: AtomicU64,
    /// The pacer's theoretical arrival time (GCRA).
    next_slot: Mutex<Instant>,
    /// Requests wait here in arrival order; the holder sleeps for its slot.
    turnstile: tokio::sync::Mutex<()>,
    /// Demand requests wait here, ahead of the other turnstile's holder.
    demand_turnstile: tokio::sync::Mutex<()>,
    waiting: AtomicUsize,
    demand_waiting: AtomicUsize,
    /// Told when the last demand request waiting has its slot.
    demand_admitted: tokio::sync::Notify,
    burst_secs: f64,
    metric_label: Option<String>,
}

impl RateControl {
    pub fn new(config: &AdaptiveRateConfig, ceiling: Option<f64>, metric_label: Option<String>) -> Self {
        let now = Instant::now();
        let control = Self {
            cubic: Mutex::new(Cubic::new(config, ceiling)),
            fill_rate_bits: AtomicU64::new(0f64.to_bits()),
            next_slot: Mutex::new(now),
            turnstile: tokio::sync::Mutex::new(()),
            demand_turnstile: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            demand_waiting: AtomicUsize::new(0),
            demand_admitted: tokio::sync::Notify::new(),
            burst_secs: config.burst_secs,
            metric_label,
        };
        control.publish(None);
        control
    }

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pacing rate in requests per second; `None` while unpaced (the
    /// store has never throttled).
    pub fn requests_per_sec(&self) -> Option<f64> {
        let rate = f64::from_bits(self.fill_rate_bits.load(Ordering::Relaxed));
        (rate > 0.0).then_some(rate)
    }

    /// The send rate at the store's last throttle (the limit learned); `None`
    /// while it never throttled. Unlike the pace, which decays toward twice
    /// what a restore sends, this stays what the store allowed.
    pub fn throttled_rate(&self) -> Option<f64> {
        Self::lock(&self.cubic).throttled_rate()
    }

    /// Whether the store is throttling now: it throttled within
    /// [`THROTTLING_NOW`], or requests are waiting for their pace. A hedge
    /// sent to it would only add load or queue behind the others.
    pub fn throttling_now(&self) -> bool {
        if self.waiting.load(Ordering::Relaxed) + self.demand_waiting.load(Ordering::Relaxed) > 0 {
            return true;
        }
        Self::lock(&self.cubic).last_throttle().is_some_and(|at| at.elapsed() < THROTTLING_NOW)
    }

    fn publish(&self, rate: Option<f64>) {
        self.fill_rate_bits.store(rate.unwrap_or(0.0).to_bits(), Ordering::Relaxed);
        if let Some(label) = &self.metric_label {
            metrics::gauge!(crate::metrics::SOURCE_REQUEST_RATE, "store" => label.clone()).set(rate.unwrap_or(0.0));
        }
    }

    /// A request leaves for the store now; returns the instant.
    pub fn on_sent(&self) -> Instant {
        let now = Instant::now();
        Self::lock(&self.cubic).on_sent(now);
        now
    }

    /// Feed one response back (see [`Cubic::on_response`]).
    pub fn on_response(&self, sent: Instant, throttled: bool) {
        let now = Instant::now();
        let rate = {
            let mut cubic = Self::lock(&self.cubic);
            if cubic.on_response(sent, now, throttled) {
                // No burst credit after a cut: the next request goes one
                // interval of the new rate from now.
                if let Some(rate) = cubic.fill_rate() {
                    let tolerance = Duration::from_secs_f64(self.burst_secs.max(rate.recip()));
                    let mut next = Self::lock(&self.next_slot);
                    *next = (*next).max(now + tolerance);
                }
                tracing::debug!(
                    store = self.metric_label.as_deref().unwrap_or(""),
                    requests_per_sec = cubic.fill_rate().unwrap_or(0.0),
                    "the store throttled: request rate cut"
                );
            }
            cubic.fill_rate()
        };
        if rate != self.requests_per_sec() {
            self.publish(rate);
        }
    }

    /// Wait for this request's turn at the current rate (at once while
    /// unpaced). A `demand` request (a reader blocked on it) waits in the
    /// demand queue, which goes first: the other queue's head takes no slot
    /// while a demand request waits.
    /// Cancel-safe: a waiter that goes away leaves the queue.
    pub async fn admit(&self, demand: bool) {
        if self.requests_per_sec().is_none() {
            return;
        }
        if demand {
            self.demand_waiting.fetch_add(1, Ordering::Relaxed);
            let _leave = scopeguard(|| {
                if self.demand_waiting.fetch_sub(1, Ordering::Relaxed) == 1 {
                    self.demand_admitted.notify_waiters();
                }
            });
            let _turn = self.demand_turnstile.lock().await;
            return self.take_next_slot(true).await;
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _leave = scopeguard(|| {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
        });
        let _turn = self.turnstile.lock().await;
        self.take_next_slot(false).await
    }

    /// Sleep until a slot at the current rate is due and take it; a request
    /// that is not `demand` first lets every demand request waiting go.
    async fn take_next_slot(&self, demand: bool) {
        loop {
            let Some(rate) = self.requests_per_sec() else { return };
            if !demand && self.demand_waiting.load(Ordering::Relaxed) > 0 {
                let admitted = self.demand_admitted.notified();
                tokio::pin!(admitted);
                admitted.as_mut().enable();
                if self.demand_waiting.load(Ordering::Relaxed) > 0 {
                    let _ = tokio::time::timeout(RECHECK, admitted).await;
                }
                continue;
            }
            match self.take_slot(rate, Instant::now()) {
                None => return,
                Some(wait) => tokio::time::sleep(wait.min(RECHECK)).await,
            }
        }
    }

    /// GCRA: take the next slot at `rate` if it is due within the burst
    /// tolerance, or say how long until it is.
    fn take_slot(&self, rate: f64, now: Instant) -> Option<Duration> {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let tolerance = Duration::from_secs_f64(self.burst_secs).max(interval);
        let mut next = Self::lock(&self.next_slot);
        let due = (*next).max(now);
        let early = due.saturating_duration_since(now);
        if early + interval <= tolerance {
            *next = due + interval;
            None
        } else {
            Some(early + interval - tolerance)
        }
    }
}

/// Run `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A store whose requests are paced by its [`RateControl`].
#[derive(Debug)]
pub struct AdaptiveRate {
    inner: SharedStore,
    control: Arc<RateControl>,
}

impl AdaptiveRate {
    pub fn new(inner: SharedStore, control: Arc<RateControl>) -> Self {
        Self { inner, control }
    }

    async fn run<T>(
        &self,
        ctx: &super::RequestContext,
        _what: &str,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.control.admit(ctx.demand).await;
        let sent = self.control.on_sent();
        let result = op.await;
        let throttled = matches!(&result, Err(e) if e.class == ErrorClass::Throttled);
        self.control.on_response(sent, throttled);
        result
    }
}

crate::store::forward_through_run!(AdaptiveRate, |this| Some(Arc::clone(&this.control)));

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, millis: u64) -> Instant {
        t0 + Duration::from_millis(millis)
    }

    #[test]
    fn meter_reads_bursts_after_a_lull_and_forgets_old_responses() {
        let t0 = Instant::now();
        let mut meter = RateMeter::default();
        assert_eq!(meter.rate(t0), 0.0);
        // One response (a manifest), half a second of nothing, then 1,000/s.
        meter.record(t0);
        for ms in 0..100 {
            meter.record(at(t0, 500 + ms));
        }
        let rate = meter.rate(at(t0, 600));
        assert!((900.0..=1100.0).contains(&rate), "{rate}");
        // A burst of 64 in 8 ms reads as its own rate.
        for n in 0..64 {
            meter.record(at(t0, 600) + Duration::from_micros(n * 125));
        }
        let rate = meter.rate(at(t0, 608));
        assert!(rate >= 6_000.0, "{rate}");
        // 5 per second for a while: measured over the whole second.
        for n in 0..20 {
            meter.record(at(t0, 2_000 + n * 200));
        }
        let rate = meter.rate(at(t0, 5_900));
        assert!((4.0..=6.0).contains(&rate), "{rate}");
        // Two seconds of silence later, nothing is left in the window.
        assert_eq!(meter.rate(at(t0, 8_000)), 0.0);
    }

    /// Drive a [`Cubic`] as a store of limit `limit` would: every 1 ms, send
    /// if the fill rate allows (a simple GCRA), answer throttled if over the
    /// store's own token bucket (burst `limit / 10`).
    fn simulate(cubic: &mut Cubic, t0: Instant, from_ms: u64, to_ms: u64, limit: f64, bucket: &mut f64) -> (u64, u64) {
        let (mut sent, mut throttled) = (0, 0);
        let mut credit = 0.0;
        for ms in from_ms..to_ms {
            let now = at(t0, ms);
            *bucket = (*bucket + limit / 1000.0).min(limit / 10.0);
            // Unpaced: 20 requests per ms (a fast store).
            credit += cubic.fill_rate().map_or(20.0, |rate| rate / 1000.0);
            while credit >= 1.0 {
                credit -= 1.0;
                sent += 1;
                cubic.on_sent(now);
                let ok = *bucket >= 1.0;
                if ok {
                    *bucket -= 1.0;
                } else {
                    throttled += 1;
                }
                cubic.on_response(now, now, !ok);
            }
        }
        (sent, throttled)
    }

    #[test]
    fn cubic_finds_an_unknown_limit_and_stays_near_it() {
        // (limit, share of it admitted at least): the README's figures.
        for (limit, share) in [(40.0, 0.95), (300.0, 0.95), (2000.0, 0.85)] {
            let t0 = Instant::now();
            let mut cubic = Cubic::new(&AdaptiveRateConfig::default(), None);
            let mut bucket = limit / 10.0;
            // Warm up for 5 s, then measure a minute.
            simulate(&mut cubic, t0, 0, 5_000, limit, &mut bucket);
            let (sent, throttled) = simulate(&mut cubic, t0, 5_000, 65_000, limit, &mut bucket);
            let admitted = (sent - throttled) as f64 / 60.0;
            assert!(admitted >= share * limit, "admitted {admitted}/s of {limit}");
            // The benchmark's bound (issue 13): at most 5 % throttled.
            assert!((throttled as f64) < 0.05 * sent as f64, "{throttled} of {sent} throttled at {limit}/s");
            eprintln!(
                "limit {limit}/s: {:.3} of it admitted, {:.4} throttled",
                admitted / limit,
                throttled as f64 / sent as f64
            );
        }
    }

    #[test]
    fn the_sdk_constants_work_too() {
        let config = AdaptiveRateConfig { decrease_factor: 0.7, cubic_scale: 0.4, ..AdaptiveRateConfig::default() };
        let t0 = Instant::now();
        let mut cubic = Cubic::new(&config, None);
        let mut bucket = 30.0;
        simulate(&mut cubic, t0, 0, 5_000, 300.0, &mut bucket);
        let (sent, throttled) = simulate(&mut cubic, t0, 5_000, 65_000, 300.0, &mut bucket);
        assert!((sent - throttled) as f64 / 60.0 >= 0.85 * 300.0);
    }

    #[test]
    fn cubic_follows_a_limit_that_drops_then_rises() {
        let t0 = Instant::now();
        let mut cubic = Cubic::new(&AdaptiveRateConfig::default(), None);
        let mut bucket = 30.0;
        simulate(&mut cubic, t0, 0, 10_000, 300.0, &mut bucket);
        // The limit drops to 60: within 5 s the rate is back under it.
        simulate(&mut cubic, t0, 10_000, 15_000, 60.0, &mut bucket);
        let rate = cubic.fill_rate().unwrap();
        assert!(rate <= 66.0, "rate {rate} after 5 s at a limit of 60");
        let (sent, throttled) = simulate(&mut cubic, t0, 15_000, 35_000, 60.0, &mut bucket);
        assert!((sent - throttled) as f64 / 20.0 >= 0.85 * 60.0);
        // Back to 300: the rate grows to it again.
        simulate(&mut cubic, t0, 35_000, 55_000, 300.0, &mut bucket);
        let (sent, throttled) = simulate(&mut cubic, t0, 55_000, 75_000, 300.0, &mut bucket);
        let admitted = (sent - throttled) as f64 / 20.0;
        assert!(admitted >= 0.85 * 300.0, "admitted {admitted}/s of 300 after recovery");
    }

    #[test]
    fn throttles_of_requests_sent_before_the_cut_are_one_signal() {
        let t0 = Instant::now();
        let mut cubic = Cubic::new(&AdaptiveRateConfig::default(), None);
        for ms in 0..1000 {
            cubic.on_sent(at(t0, ms));
            cubic.on_response(at(t0, ms), at(t0, ms), false);
        }
        // 64 requests in flight, all sent before the first throttle, all 503.
        assert!(cubic.on_response(at(t0, 990), at(t0, 1000), true));
        let after_first = cubic.fill_rate().unwrap();
        for n in 0..63 {
            assert!(!cubic.on_response(at(t0, 990), at(t0, 1000 + n), true));
        }
        assert_eq!(cubic.fill_rate().unwrap(), after_first);
        // 0.8 of the ~1000/s measured.
        assert!((750.0..=850.0).contains(&after_first), "{after_first}");
        // Sent after the cut but before one interval of the new rate (about
        // 1.25 ms): not paced at it yet, the same episode.
        assert!(!cubic.on_response(at(t0, 1001), at(t0, 1002), true));
        assert_eq!(cubic.fill_rate().unwrap(), after_first);
        // Sent once the cut took effect and throttled again: it cuts again.
        assert!(cubic.on_response(at(t0, 1002), at(t0, 1003), true));
        assert!(cubic.fill_rate().unwrap() < after_first);
    }

    #[test]
    fn a_cut_takes_the_pacers_burst_credit_away() {
        let config = AdaptiveRateConfig::default();
        let control = RateControl::new(&config, None, None);
        pin_rate(&control, &config, 1000.0);
        let now = Instant::now();
        {
            let mut cubic = RateControl::lock(&control.cubic);
            for ms in 0..1000 {
                cubic.on_sent(now - Duration::from_millis(1000 - ms));
            }
        }
        // An idle pacer at 1,000/s lets 50 requests go at once (50 ms) ...
        assert_eq!(control.take_slot(1000.0, Instant::now()), None);
        // ... until the store throttles: the cut (to 0.8 of the ~1,000/s
        // sent) leaves no credit, the next request waits its interval.
        control.on_response(Instant::now(), true);
        let rate = control.requests_per_sec().unwrap();
        assert!((700.0..=900.0).contains(&rate), "{rate}");
        let wait = control.take_slot(rate, Instant::now()).expect("no request goes at once after a cut");
        assert!(wait <= Duration::from_secs_f64(1.0 / rate), "{wait:?}");
    }

    #[test]
    fn the_ceiling_and_floor_bound_the_rate() {
        let t0 = Instant::now();
        let config = AdaptiveRateConfig { requests_per_sec_min: 5.0, ..AdaptiveRateConfig::default() };
        let mut cubic = Cubic::new(&config, Some(100.0));
        assert_eq!(cubic.fill_rate(), None, "unpaced until the first throttle");
        for ms in 0..1000 {
            cubic.on_sent(at(t0, ms));
            cubic.on_response(at(t0, ms), at(t0, ms), false);
        }
        assert_eq!(cubic.fill_rate(), None);
        cubic.on_response(at(t0, 1000), at(t0, 1000), true);
        assert!(cubic.fill_rate().unwrap() <= 100.0);
        let mut t = 1001;
        // Each cut takes effect one interval of its rate later.
        for _ in 0..300 {
            cubic.on_response(at(t0, t), at(t0, t), true);
            t += 10;
        }
        assert_eq!(cubic.fill_rate(), Some(5.0));
    }

    #[test]
    fn config_validates() {
        AdaptiveRateConfig::default().validate().unwrap();
        assert!(AdaptiveRateConfig { decrease_factor: 1.0, ..Default::default() }.validate().is_err());
        assert!(AdaptiveRateConfig { cubic_scale: 0.0, ..Default::default() }.validate().is_err());
        assert!(AdaptiveRateConfig { requests_per_sec_min: 0.0, ..Default::default() }.validate().is_err());
        let parsed: AdaptiveRateConfig = toml::from_str("enabled = false").unwrap();
        assert!(!parsed.enabled);
        assert!(toml::from_str::<AdaptiveRateConfig>("rate = 3").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_requests_are_spread_by_the_rate() {
        let config = AdaptiveRateConfig { burst_secs: 0.0, ..AdaptiveRateConfig::default() };
        let control = Arc::new(RateControl::new(&config, None, None));
        control.admit(false).await;
        let sent = Instant::now();
        control.on_response(sent, true);
        // Measured ~0 before the throttle: the floor (1/s) applies at first;
        // pin a known rate instead.
        pin_rate(&control, &config, 50.0);
        assert!(control.throttling_now());
        let started = Instant::now();
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..11 {
            let control = Arc::clone(&control);
            waiters.spawn(async move {
                control.admit(false).await;
                Instant::now()
            });
        }
        let mut times = Vec::new();
        while let Some(t) = waiters.join_next().await {
            times.push(t.unwrap());
        }
        times.sort();
        // Eleven requests at 50/s: the last goes about 200 ms after the first.
        let spread = times[10].duration_since(times[0]);
        assert!(spread >= Duration::from_millis(180), "{spread:?}");
        assert!(started.elapsed() >= Duration::from_millis(180));
        assert_eq!(control.waiting.load(Ordering::Relaxed), 0);
    }

    /// Pace `control` at `rate` as if the store had just throttled there.
    fn pin_rate(control: &RateControl, config: &AdaptiveRateConfig, rate: f64) {
        *RateControl::lock(&control.cubic) = {
            let mut cubic = Cubic::new(config, Some(rate));
            cubic.fill_rate = Some(rate);
            cubic.last_throttle = Some(Instant::now());
            cubic.last_max_rate = rate;
            cubic
        };
        control.publish(Some(rate));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn demand_requests_waiting_are_paced_at_the_rate_after_a_cut() {
        let config = AdaptiveRateConfig { burst_secs: 0.0, ..AdaptiveRateConfig::default() };
        let control = Arc::new(RateControl::new(&config, None, None));
        pin_rate(&control, &config, 100.0);
        let started = Instant::now();
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let control = Arc::clone(&control);
            waiters.spawn(async move {
                control.admit(true).await;
                Instant::now()
            });
        }
        // At 100/s two go in the first 15 ms; then the store throttles and
        // the rate is cut to 5/s (one per 200 ms).
        tokio::time::sleep(Duration::from_millis(15)).await;
        pin_rate(&control, &config, 5.0);
        tokio::time::sleep(Duration::from_millis(300).saturating_sub(started.elapsed())).await;
        let mut admitted = 0;
        while let Some(done) = waiters.try_join_next() {
            assert!(done.unwrap() < started + Duration::from_millis(300));
            admitted += 1;
        }
        // Slots reserved at 100/s would have let all six go within 60 ms.
        assert!(admitted <= 4, "{admitted} of 6 demand requests went within 300 ms, past a cut to 5/s");
        waiters.abort_all();
        while waiters.join_next().await.is_some() {}
        assert_eq!(control.demand_waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_demand_request_does_not_wait_behind_the_queue() {
        let config = AdaptiveRateConfig { burst_secs: 0.0, ..AdaptiveRateConfig::default() };
        let control = Arc::new(RateControl::new(&config, None, None));
        pin_rate(&control, &config, 20.0);
        // Eight background requests queue at 20/s (one per 50 ms) ...
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (control, order) = (Arc::clone(&control), Arc::clone(&order));
            waiters.spawn(async move {
                control.admit(false).await;
                order.lock().unwrap().push("background");
            });
        }
        // (The first may have gone already: the pacer was idle.)
        while control.waiting.load(Ordering::Relaxed) + order.lock().unwrap().len() < 8 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // ... then a reader's: it goes at once, not after the eight (400 ms).
        control.admit(true).await;
        order.lock().unwrap().push("demand");
        while let Some(done) = waiters.join_next().await {
            done.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let position = order.iter().position(|&o| o == "demand").unwrap();
        assert!(position <= 2, "the demand request went {position}th: {order:?}");
    }
}
