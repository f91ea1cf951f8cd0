//! Decorrelated-jitter backoff with an injectable random source.
//!
//! `sleep = min(cap, uniform(base, previous * 3))` (the AWS architecture
//! blog's "decorrelated jitter"): sleeps spread out so retries from many
//! blocks do not arrive in waves, and grow quickly toward the cap. The random
//! source is a seedable [`SmallRng`], so a test that fixes the seed gets the
//! same schedule every run.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    previous: Duration,
    rng: SmallRng,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        debug_assert!(base <= cap, "backoff base above cap");
        Self { base, cap, previous: base, rng: SmallRng::seed_from_u64(seed) }
    }

    /// The next sleep.
    pub fn next_sleep(&mut self) -> Duration {
        let low = self.base.as_micros() as u64;
        let high = (self.previous.as_micros() as u64).saturating_mul(3).max(low + 1);
        let sleep = Duration::from_micros(self.rng.random_range(low..high)).min(self.cap);
        self.previous = sleep;
        sleep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_deterministic() {
        let mut a = Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 7);
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2), 7);
        let sa: Vec<_> = (0..50).map(|_| a.next_sleep()).collect();
        let sb: Vec<_> = (0..50).map(|_| b.next_sleep()).collect();
        assert_eq!(sa, sb);
        assert!(sa.iter().all(|s| *s >= Duration::from_millis(50) && *s <= Duration::from_secs(2)));
        assert!(sa.iter().any(|s| *s > Duration::from_millis(500)), "grows toward the cap: {sa:?}");
    }
}
