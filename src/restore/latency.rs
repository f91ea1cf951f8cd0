//! A latency histogram small enough to keep per exported volume, for the
//! quantiles a job status reports (the Prometheus histogram is process-wide
//! and cannot be read back per job).
//!
//! Log-linear buckets: four per doubling of microseconds, so a quantile is
//! its bucket's upper bound, at most 19 % above the true value. Fixed size
//! (128 atomics, from 1 µs to beyond an hour); recording is one atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per doubling.
const STEPS_PER_OCTAVE: f64 = 4.0;
/// 2^(128/4) µs is 71 minutes: every latency a read can have.
const BUCKETS: usize = 128;

/// Counts of latencies by bucket.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { buckets: std::array::from_fn(|_| AtomicU64::new(0)) }
    }
}

/// What a status reports of a histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LatencySummary {
    /// Latencies recorded.
    pub count: u64,
    /// Upper bounds of the median and the 99th percentile, in milliseconds
    /// (0 when nothing was recorded).
    pub p50_millis: f64,
    pub p99_millis: f64,
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); zero when
    /// empty.
    pub fn quantile(&self, q: f64) -> Duration {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper_bound(i);
            }
        }
        upper_bound(BUCKETS - 1)
    }

    pub fn summary(&self) -> LatencySummary {
        let millis = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        LatencySummary {
            count: self.count(),
            p50_millis: millis(self.quantile(0.5)),
            p99_millis: millis(self.quantile(0.99)),
        }
    }
}

fn bucket_of(latency: Duration) -> usize {
    let micros = latency.as_micros().max(1) as f64;
    ((micros.log2() * STEPS_PER_OCTAVE).floor() as usize).min(BUCKETS - 1)
}

fn upper_bound(bucket: usize) -> Duration {
    Duration::from_secs_f64(2f64.powf((bucket + 1) as f64 / STEPS_PER_OCTAVE) / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_bound_the_true_value_within_a_bucket() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 100);
        for (q, truth) in [(0.5, 50.0), (0.99, 99.0), (1.0, 100.0)] {
            let got = h.quantile(q).as_secs_f64() * 1e3;
            assert!(got >= truth && got <= truth * 1.2, "q{q}: {got} ms for {truth} ms");
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert!(s.p50_millis >= 50.0 && s.p99_millis >= s.p50_millis);
    }

    #[test]
    fn extremes_land_in_the_end_buckets() {
        let h = LatencyHistogram::default();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(100_000));
        assert_eq!(h.quantile(0.0), upper_bound(0));
        assert_eq!(h.quantile(1.0), upper_bound(BUCKETS - 1));
    }
}
