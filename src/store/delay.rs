//! The latency rule of a store's concurrency window
//! ([`super::limit::Aimd`]): never hold more requests in flight than the
//! store's throughput needs.
//!
//! Past the bandwidth-delay product, one more request in flight adds no
//! throughput: it only waits (on the link, in the store, in the pacer), and
//! so does every request behind it, a reader's demand fetch included
//! (bufferbloat). The rule, in the manner of TCP Vegas and BBR's min-RTT
//! probe:
//!
//! - **base**: the store's median request time with the window held at its
//!   floor, measured over [`PROBE_SAMPLES`] requests sent during the probe
//!   (the requests sent before it, at the full window, are not counted).
//!   The first probe starts with the first answer that carries a body; the
//!   next [`PROBE_INTERVAL_FIRST`] after it, then at doubling intervals up
//!   to [`PROBE_INTERVAL`], so a store whose latency changed (farther away,
//!   busier) gets a new base;
//! - **rounds**: between probes, the median time of each round trip's
//!   requests (a window's worth of answers, at least [`PROBE_SAMPLES`]) is
//!   compared with the base. Above `ratio_max` × base the requests are
//!   queueing, not working: the window shrinks in proportion (to the
//!   window that would hold the median at `ratio_max` × base, at most
//!   halving per round) and does not grow until a round is back under it.
//!   The next round counts only requests sent after that verdict (as TCP
//!   reacts once per round trip), so one queue is not judged twice.
//!
//! Medians, not means, so a store's own long tail (S3's p99 is several times
//! its p50 at any load) is not taken for queueing. Time is passed in: the
//! rule is pure and its tests simulate a store.

use std::time::{Duration, Instant};

/// How often the base is measured again, at most.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// The second probe's interval after the first; it doubles from there up
/// to [`PROBE_INTERVAL`]. The first base is measured as the restore starts
/// (connections opening, the machine busy setting up), often high: a second
/// look soon after corrects it before a short restore is over.
pub const PROBE_INTERVAL_FIRST: Duration = Duration::from_secs(1);
/// Requests a probe, or a round, needs at least.
pub const PROBE_SAMPLES: usize = 8;
/// The most one round shrinks the window by.
const SHRINK_MAX: f64 = 0.5;

/// What one answer told the rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// A round queued: shrink the window by this factor (below 1).
    Shrink(f64),
    /// A probe measured a new base: the window may grow fast again.
    NewBase,
}

#[derive(Debug, Clone)]
pub struct DelayRule {
    ratio_max: f64,
    /// The store's median request time at the floor, and when measured.
    base: Option<(Duration, Instant)>,
    /// A probe runs since then: requests sent from then on measure the base.
    probe_since: Option<Instant>,
    probe: Vec<Duration>,
    round: Vec<Duration>,
    /// Rounds count requests sent from then on: those sent before the last
    /// verdict went at the window before it, and were judged with it.
    round_since: Option<Instant>,
    /// The last round's median was above `ratio_max` × base.
    queueing: bool,
    /// Probes done.
    probes: u32,
}

impl DelayRule {
    pub fn new(ratio_max: f64) -> Self {
        Self {
            ratio_max,
            base: None,
            probe_since: None,
            probe: Vec::new(),
            round: Vec::new(),
            round_since: None,
            queueing: false,
            probes: 0,
        }
    }

    /// A probe runs: the window is held at its floor.
    pub fn probing(&self) -> bool {
        self.probe_since.is_some()
    }

    /// The last round trip queued: the window must not grow.
    pub fn queueing(&self) -> bool {
        self.queueing
    }

    /// The base, once measured.
    pub fn base(&self) -> Option<Duration> {
        self.base.map(|(base, _)| base)
    }

    /// A request sent at `sent` was answered `rtt` after it, at `now`, with
    /// the window at `limit`; `full`: the window was full when it was sent.
    /// Returns what the window must do, when this answer ends a probe or a
    /// round that queued. Only requests sent with the window full make up
    /// rounds: a slow answer with the window not full is the store's or the
    /// machine's doing, not the window's.
    pub fn on_sample(
        &mut self,
        rtt: Duration,
        sent: Instant,
        now: Instant,
        limit: usize,
        full: bool,
    ) -> Option<Verdict> {
        if let Some(since) = self.probe_since {
            if sent >= since {
                self.probe.push(rtt);
                if self.probe.len() >= PROBE_SAMPLES {
                    self.base = Some((median(&mut self.probe), now));
                    self.probe_since = None;
                    self.probe.clear();
                    self.round.clear();
                    self.round_since = Some(now);
                    self.queueing = false;
                    self.probes += 1;
                    return Some(Verdict::NewBase);
                }
            }
            return None;
        }
        let Some((base, measured)) = self.base else {
            self.start_probe(now);
            return None;
        };
        if now.saturating_duration_since(measured) >= self.probe_interval() {
            self.start_probe(now);
            return None;
        }
        if !full || self.round_since.is_some_and(|since| sent < since) {
            return None;
        }
        self.round.push(rtt);
        if self.round.len() < limit.max(PROBE_SAMPLES) {
            return None;
        }
        let round = median(&mut self.round);
        self.round.clear();
        let allowed = base.as_secs_f64() * self.ratio_max;
        self.queueing = round.as_secs_f64() > allowed;
        if !self.queueing {
            return None;
        }
        self.round_since = Some(now);
        Some(Verdict::Shrink((allowed / round.as_secs_f64()).max(SHRINK_MAX)))
    }

    /// The time from one base to the next probe.
    fn probe_interval(&self) -> Duration {
        PROBE_INTERVAL_FIRST.saturating_mul(1 << self.probes.saturating_sub(1).min(4)).min(PROBE_INTERVAL)
    }

    fn start_probe(&mut self, now: Instant) {
        self.probe_since = Some(now);
        self.probe.clear();
        self.round.clear();
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_answer_starts_a_probe_and_only_requests_sent_during_it_count() {
        let t0 = Instant::now();
        let mut rule = DelayRule::new(1.5);
        assert!(!rule.probing(), "no probe before any answer: the window starts as configured");
        assert_eq!(rule.on_sample(ms(60), t0, t0 + ms(60), 64, true), None);
        assert!(rule.probing());
        let since = t0 + ms(60);
        // The full window's requests, sent before the probe, drain: ignored.
        for i in 0..63 {
            rule.on_sample(ms(60), t0, since + ms(i), 64, true);
        }
        assert!(rule.probing() && rule.base().is_none());
        for i in 0..PROBE_SAMPLES as u64 {
            rule.on_sample(ms(4 + i % 2), since + ms(i), since + ms(10 + i), 64, true);
        }
        assert!(!rule.probing());
        assert_eq!(rule.base(), Some(ms(5)));
    }

    fn probed(rule: &mut DelayRule, base: Duration, at: Instant) {
        rule.on_sample(base, at, at, 4, true);
        for _ in 0..PROBE_SAMPLES {
            rule.on_sample(base, at, at, 4, true);
        }
        assert_eq!(rule.base(), Some(base));
    }

    #[test]
    fn a_round_above_the_ratio_shrinks_the_window_in_proportion_and_at_most_by_half() {
        let t0 = Instant::now();
        let mut rule = DelayRule::new(1.5);
        probed(&mut rule, ms(10), t0);
        // 14 ms medians: within 1.5 x 10 ms, nothing to do.
        for _ in 0..32 {
            assert_eq!(rule.on_sample(ms(14), t0, t0 + ms(1), 32, true), None);
        }
        assert!(!rule.queueing());
        // 20 ms: the window that holds 15 ms is 3/4 of this one; the
        // verdict comes once per round (32 answers).
        let verdicts: Vec<_> = (0..32).filter_map(|_| rule.on_sample(ms(20), t0, t0 + ms(2), 32, true)).collect();
        assert_eq!(verdicts, vec![Verdict::Shrink(0.75)]);
        assert!(rule.queueing());
        // Requests sent before that verdict went at the old window: not
        // judged again.
        assert!((0..64).all(|_| rule.on_sample(ms(20), t0, t0 + ms(3), 32, true).is_none()));
        // 100 ms: at most halved.
        let sent = t0 + ms(2);
        let verdicts: Vec<_> = (0..8).filter_map(|_| rule.on_sample(ms(100), sent, t0 + ms(3), 4, true)).collect();
        assert_eq!(verdicts, vec![Verdict::Shrink(SHRINK_MAX)]);
        // A long tail is not queueing: the median decides.
        let mut tail = vec![ms(12); 6];
        tail.extend([ms(300), ms(900)]);
        let sent = t0 + ms(3);
        let verdicts: Vec<_> =
            tail.into_iter().filter_map(|rtt| rule.on_sample(rtt, sent, t0 + ms(4), 8, true)).collect();
        assert!(verdicts.is_empty() && !rule.queueing());
    }

    #[test]
    fn the_base_is_measured_again_after_the_interval() {
        let t0 = Instant::now();
        let mut rule = DelayRule::new(1.5);
        probed(&mut rule, ms(1), t0);
        // The store moved farther away: 30 ms at any window.
        let later = t0 + PROBE_INTERVAL;
        assert_eq!(rule.on_sample(ms(30), t0, later, 64, true), None);
        assert!(rule.probing());
        let verdicts: Vec<_> = (0..PROBE_SAMPLES as u64)
            .filter_map(|i| rule.on_sample(ms(30), later + ms(i), later + ms(30 + i), 64, true))
            .collect();
        assert_eq!(verdicts, vec![Verdict::NewBase]);
        assert_eq!(rule.base(), Some(ms(30)));
        assert!(!rule.probing() && !rule.queueing());
    }
}
