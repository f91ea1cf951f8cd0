//! The fetch stage's configuration (`[fetch]`): the in-flight byte budget,
//! the attempt deadline, the retry bounds and the hedge.

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use serde::Deserialize;

/// How blocks are fetched: in-flight budget, deadlines, retry bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// Bytes of block data fetched but not yet written, over ALL restores in
    /// the process. 128 MiB: 128 blocks of 1 MiB in flight restore as fast as
    /// 256 here (4 GiB in 3.1-3.5 s either way) and peak RSS stays near
    /// 200 MiB; memory does not grow with the number of jobs.
    pub inflight_bytes_max: NonZeroU64,
    /// Deadline of one attempt to fetch one block, body included. 10 s: a
    /// 4 MiB block at 1 MiB/s still fits; a stalled body is cut well before a
    /// human notices the restore is stuck.
    pub attempt_timeout_millis: NonZeroU64,
    /// Attempts per block per source before going to the next source. 4: three
    /// retries ride out a brief 503 storm; more only delays the fallback.
    pub attempts_max: NonZeroU32,
    /// Time per block per source, backoff included, before going to the next
    /// source. 60 s bounds how long one cold block can hold its budget.
    pub source_elapsed_max_millis: NonZeroU64,
    /// Decorrelated-jitter backoff: first sleep at least this. 50 ms.
    pub backoff_base_millis: NonZeroU64,
    /// Decorrelated-jitter backoff: no sleep longer than this. 2 s keeps a
    /// throttled source probed often enough to recover quickly.
    pub backoff_cap_millis: NonZeroU64,
    /// A store's `Retry-After` on a throttled answer is honoured up to this.
    /// 5 s: a store asking for a minute is still asked again within
    /// `source_elapsed_max_millis`, at the rate it is paced at.
    pub retry_after_max_millis: NonZeroU64,
    /// Seed of the jitter's random source. Unset in production (seeded from
    /// the clock); tests set it so backoff schedules repeat exactly.
    pub jitter_seed: Option<u64>,
    /// A running restore with nothing settled for this long is flagged
    /// stalled. 30 s: three times the attempt deadline.
    pub stall_after_millis: NonZeroU64,
    /// Hedged requests for slow attempts (`[fetch.hedge]`).
    pub hedge: super::HedgeConfig,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            inflight_bytes_max: nz64(128 << 20),

            attempt_timeout_millis: nz64(10_000),
            attempts_max: NonZeroU32::new(4).expect("non-zero"),
            source_elapsed_max_millis: nz64(60_000),
            backoff_base_millis: nz64(50),
            backoff_cap_millis: nz64(2_000),
            retry_after_max_millis: nz64(5_000),
            jitter_seed: None,
            stall_after_millis: nz64(30_000),
            hedge: super::HedgeConfig::default(),
        }
    }
}

impl FetchConfig {
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_millis.get())
    }
    pub fn source_elapsed_max(&self) -> Duration {
        Duration::from_millis(self.source_elapsed_max_millis.get())
    }
    pub fn backoff_base(&self) -> Duration {
        Duration::from_millis(self.backoff_base_millis.get())
    }
    pub fn backoff_cap(&self) -> Duration {
        Duration::from_millis(self.backoff_cap_millis.get())
    }
    pub fn retry_after_max(&self) -> Duration {
        Duration::from_millis(self.retry_after_max_millis.get())
    }
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_millis.get())
    }
}

fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("default is non-zero")
}
