//! When to save a checkpoint.
//!
//! Every `checkpoint_interval_millis` of time or `checkpoint_interval_bytes`
//! of newly settled bytes, whichever comes first, plus at the end of each
//! phase (the caller just saves). The two bounds cap the work a crash makes a
//! job redo: at most one interval of time at full speed, and at most one
//! interval of bytes however fast the restore runs. Pure: the caller passes
//! the clock in, so tests need no sleeping.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

/// Default time between checkpoints: a crash redoes at most ~5 s of work,
/// while a save (a few hundred bytes, two fsyncs) every 5 s costs nothing
/// next to the fdatasyncs of the target.
pub const CHECKPOINT_INTERVAL_MILLIS_DEFAULT: NonZeroU64 = NonZeroU64::new(5_000).expect("non-zero");

/// Default settled bytes between checkpoints: 1 GiB, about a second of a fast
/// restore, so rework stays bounded even when time-based saves are far apart.
pub const CHECKPOINT_INTERVAL_BYTES_DEFAULT: NonZeroU64 = NonZeroU64::new(1 << 30).expect("non-zero");

/// Decides when a checkpoint is due.
#[derive(Debug, Clone)]
pub struct SaveCadence {
    interval: Duration,
    interval_bytes: NonZeroU64,
    last_saved: Instant,
}

impl SaveCadence {
    /// A cadence whose first interval starts at `now` (the job start, or the
    /// load of its checkpoint).
    pub fn new(interval_millis: NonZeroU64, interval_bytes: NonZeroU64, now: Instant) -> Self {
        Self { interval: Duration::from_millis(interval_millis.get()), interval_bytes, last_saved: now }
    }

    /// Whether a save is due, given the bytes settled since the last save.
    pub fn due(&self, now: Instant, settled_bytes_since_last: u64) -> bool {
        settled_bytes_since_last >= self.interval_bytes.get()
            || now.saturating_duration_since(self.last_saved) >= self.interval
    }

    /// Record a save at `now`. Time never runs backwards here: an earlier
    /// `now` keeps the later mark.
    pub fn saved(&mut self, now: Instant) {
        self.last_saved = self.last_saved.max(now);
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn interval_bytes(&self) -> NonZeroU64 {
        self.interval_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(start: Instant) -> SaveCadence {
        SaveCadence::new(NonZeroU64::new(1_000).unwrap(), NonZeroU64::new(1 << 20).unwrap(), start)
    }

    #[test]
    fn due_on_time_or_bytes_whichever_first() {
        let start = Instant::now();
        let mut cadence = cadence(start);
        assert!(!cadence.due(start, 0));
        assert!(!cadence.due(start + Duration::from_millis(999), (1 << 20) - 1));
        assert!(cadence.due(start + Duration::from_millis(1_000), 0), "time bound");
        assert!(cadence.due(start, 1 << 20), "byte bound");
        cadence.saved(start + Duration::from_millis(1_000));
        assert!(!cadence.due(start + Duration::from_millis(1_500), 0));
        assert!(cadence.due(start + Duration::from_millis(2_000), 0));
    }

    #[test]
    fn an_earlier_clock_reading_never_moves_the_mark_back() {
        let start = Instant::now();
        let mut cadence = cadence(start + Duration::from_secs(10));
        cadence.saved(start);
        assert!(!cadence.due(start + Duration::from_secs(10), 0));
        assert!(!cadence.due(start, 0), "a clock reading before the mark is not due");
    }
}
