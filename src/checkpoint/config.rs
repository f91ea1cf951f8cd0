//! The checkpoint cadence and directory (`[checkpoint]`).

use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// When written blocks are made durable (fdatasync) and the checkpoint saved.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save checkpoints. Off: blocks still settle (fdatasync) on the same
    /// cadence, but a crashed restore starts over.
    pub enabled: bool,
    /// Where checkpoints live. Unset: `$STATE_DIRECTORY`, else
    /// `$XDG_STATE_HOME/rehydrate`, else `~/.local/state/rehydrate`.
    pub dir: Option<PathBuf>,
    /// fdatasync + checkpoint at least this often. 2 s bounds the work a crash
    /// can lose to two seconds of throughput.
    pub interval_millis: NonZeroU64,
    /// ... or after this many newly written bytes, whichever comes first.
    /// 1 GiB: one fdatasync per GiB costs well under 1 % of a restore.
    pub interval_bytes: NonZeroU64,
    /// Most bytes of blocks requested or written and not yet settled (fdatasync
    /// and checkpoint): the work one crash can throw away, however slow the
    /// target's fdatasync. Unset: `interval_bytes` + `fetch.inflight_bytes_max`
    /// (one interval plus the blocks in flight; never binds while fdatasync
    /// keeps up). Smaller bounds the rework tighter at the cost of throughput.
    pub unsettled_bytes_max: Option<NonZeroU64>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: None,
            interval_millis: nz64(2_000),
            interval_bytes: nz64(1 << 30),
            unsettled_bytes_max: None,
        }
    }
}

impl CheckpointConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_millis.get())
    }

    /// The bound on requested-or-written, unsettled bytes for a process whose
    /// in-flight budget is `inflight_bytes_max`.
    pub fn unsettled_bytes_max(&self, inflight_bytes_max: u64) -> u64 {
        self.unsettled_bytes_max.map_or(self.interval_bytes.get().saturating_add(inflight_bytes_max), NonZeroU64::get)
    }

    /// The checkpoint directory, resolved from the config or the environment.
    pub fn resolved_dir(&self) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("rehydrate");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/lib"));
        home.join(".local/state/rehydrate")
    }
}

fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("default is non-zero")
}
