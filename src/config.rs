//! Configuration: read raw from TOML, resolved to typed values, validated.
//!
//! Every section may be given partially (serde defaults fill the rest) and an
//! unknown key is an error that names it. Sizes are whole bytes in keys ending
//! `_bytes`, durations whole milliseconds in keys ending `_millis`: one
//! convention everywhere. Each default says why it is that value; the same
//! text is in `config/rehydrate.toml`.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::write::{BackendChoice, DirectIo, WriterConfig};

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub fetch: FetchConfig,
    /// The S3 client: endpoint, region, timeouts, body guards.
    pub s3: crate::store::s3::S3Config,
    /// Per-store request and byte rate limits (S3 stores), shared by every
    /// restore in the process.
    pub rate_limit: crate::store::limit::RateLimitConfig,
    /// Per-store adaptive concurrency (S3 stores).
    pub concurrency: crate::store::limit::AdaptiveConcurrencyConfig,
    /// Per-store adaptive request rate, learned from throttles (S3 stores).
    pub adaptive_rate: crate::store::rate::AdaptiveRateConfig,
    /// `[[store]]`: options of the stores under one URL prefix, laid over
    /// the sections above (`store/options.rs`).
    pub store: Vec<crate::store::options::StoreSection>,
    pub write: WriteConfig,
    pub checkpoint: CheckpointConfig,
    pub manifest: ManifestConfig,
    /// `rehydrate serve`: listener, job limits, gates, store profiles.
    pub worker: WorkerConfig,
}

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
    pub hedge: crate::fetch::HedgeConfig,
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
            hedge: crate::fetch::HedgeConfig::default(),
        }
    }
}

/// How the target is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteConfig {
    /// `auto` probes io_uring and falls back to pwrite (old kernels, seccomp).
    pub backend: BackendChoice,
    /// `true`, `false` or `"auto"`: aligned block writes through an
    /// `O_DIRECT` descriptor. `auto` (the default: it saves the page-cache
    /// copy, the largest CPU cost of a restore) falls back to buffered writes
    /// where the filesystem refuses `O_DIRECT` (tmpfs).
    pub direct_io: DirectIo,
    /// Writes queued or in flight per target. 64 keeps NVMe queues fed.
    pub queue_depth: NonZeroUsize,
    /// Threads of the pwrite backend. 4 overlaps writes on 2 cores.
    pub pwrite_threads: NonZeroUsize,
}

impl Default for WriteConfig {
    fn default() -> Self {
        Self { backend: BackendChoice::Auto, direct_io: DirectIo::Auto, queue_depth: nzu(64), pwrite_threads: nzu(4) }
    }
}

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
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { enabled: true, dir: None, interval_millis: nz64(2_000), interval_bytes: nz64(1 << 30) }
    }
}

/// Limits on manifests read.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManifestConfig {
    /// Most block entries in a manifest. 16 Mi: a 64 TiB volume in 4 MiB
    /// blocks; 768 MiB of entries in memory at most.
    pub entries_max: NonZeroU64,
}

impl Default for ManifestConfig {
    fn default() -> Self {
        Self { entries_max: nz64(16 << 20) }
    }
}

/// The worker service (`rehydrate serve`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Where the HTTP API listens. Loopback by default: a worker is reachable
    /// from elsewhere only when someone chose so (and then tokens are required).
    pub listen: String,
    /// Where the job database lives. Unset: the checkpoint directory.
    pub state_dir: Option<PathBuf>,
    /// Directories targets must resolve under. Empty: every submission is
    /// refused (a worker writes nowhere it was not told it may).
    pub target_roots: Vec<PathBuf>,
    /// Block devices jobs may restore into, by exact path (e.g.
    /// `/dev/vdb`), written in place. Default: none. A device that is mounted
    /// or held open exclusively when its job starts is refused.
    pub block_devices: Vec<PathBuf>,
    /// Restores running at once. 4 keeps 2 cores and one disk busy; they all
    /// share one in-flight byte budget and per-store rate limits.
    pub jobs_running_max: NonZeroUsize,
    /// Jobs waiting to run; beyond this a submission gets 429. 64 is far more
    /// than one node's volumes.
    pub jobs_queued_max: NonZeroUsize,
    /// Job records kept; the oldest finished ones are pruned beyond this.
    pub jobs_records_max: NonZeroUsize,
    /// Free bytes a file target's filesystem must keep after the restore's
    /// need, before the job may start. 256 MiB leaves room for logs and the
    /// checkpoint files themselves.
    pub target_free_bytes_min: u64,
    /// A job held by a gate is looked at again after this, doubling up to
    /// `gate_backoff_max_millis`. 500 ms / 30 s.
    pub gate_backoff_millis: NonZeroU64,
    pub gate_backoff_max_millis: NonZeroU64,
    /// On SIGTERM, running jobs are cancelled (they checkpoint) and the process
    /// exits within this. 10 s is well inside Kubernetes' default 30 s.
    pub shutdown_grace_millis: NonZeroU64,
    /// Bearer tokens, one per line (`#` comments). Also `REHYDRATE_TOKENS`
    /// (comma-separated). Required when `listen` is not loopback.
    pub tokens_file: Option<PathBuf>,
    /// Largest request body. 64 KiB: a job spec is a few hundred bytes.
    pub request_body_bytes_max: NonZeroUsize,
    /// A connection that has not sent a whole request head within this is
    /// closed (a silent or trickling client, or an idle keep-alive one).
    /// 10 s: orchestrators on a data-center network send a head in
    /// milliseconds, and a slow client must not hold a connection slot.
    pub header_read_timeout_millis: NonZeroU64,
    /// A request, its body read included, gets 408 when it is not received
    /// and handled within this. 30 s: a body is at most
    /// `request_body_bytes_max` and handling commits one record.
    pub request_timeout_millis: NonZeroU64,
    /// Connections served at once; further ones wait in the listen backlog.
    /// 128: a worker has a handful of orchestrator and scraper clients.
    pub connections_max: NonZeroUsize,
    /// `text` or `json` (one JSON object per line, for log shippers).
    pub log_format: LogFormat,
    /// Store profiles jobs name: `[worker.profiles.NAME]`.
    pub profiles: std::collections::BTreeMap<String, ProfileConfig>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7878".to_owned(),
            state_dir: None,
            target_roots: Vec::new(),
            block_devices: Vec::new(),
            jobs_running_max: nzu(4),
            jobs_queued_max: nzu(64),
            jobs_records_max: nzu(10_000),
            target_free_bytes_min: 256 << 20,
            gate_backoff_millis: nz64(500),
            gate_backoff_max_millis: nz64(30_000),
            shutdown_grace_millis: nz64(10_000),
            tokens_file: None,
            request_body_bytes_max: nzu(64 << 10),
            header_read_timeout_millis: nz64(10_000),
            request_timeout_millis: nz64(30_000),
            connections_max: nzu(128),
            log_format: LogFormat::Text,
            profiles: std::collections::BTreeMap::new(),
        }
    }
}

/// How the worker writes its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A store a job may name: where snapshots live, and fallbacks. Credentials
/// never appear here (S3 takes them from the standard AWS chain).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Store URL prefix: `s3://bucket/prefix` or `file:///dir`.
    pub store: String,
    /// Fallback stores holding the same block objects, in order.
    #[serde(default)]
    pub secondaries: Vec<String>,
}

impl WorkerConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_millis.get())
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_millis.get())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_millis.get())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("worker.{m}")));
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!("listen {:?} is not an address:port (example: 127.0.0.1:7878)", self.listen));
        }
        for root in &self.target_roots {
            if !root.is_absolute() {
                return bad(format!("target_roots: {} must be an absolute path", root.display()));
            }
        }
        if let Some(dir) = &self.state_dir
            && !dir.is_absolute()
        {
            return bad(format!("state_dir {} must be an absolute path", dir.display()));
        }
        if self.gate_backoff_millis > self.gate_backoff_max_millis {
            return bad("gate_backoff_millis is larger than gate_backoff_max_millis".to_owned());
        }
        for (name, profile) in &self.profiles {
            if !crate::worker::spec::valid_name(name) {
                return bad(format!("profiles.{name}: profile names are 1-64 of A-Z a-z 0-9 _ -"));
            }
            for url in std::iter::once(&profile.store).chain(&profile.secondaries) {
                if let Err(e) = crate::store::StoreUrl::parse(url) {
                    return bad(format!("profiles.{name}: {e}"));
                }
            }
        }
        Ok(())
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_owned(), message },
            other => other,
        })
    }

    /// Parse and validate config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: PathBuf::from("<text>"), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Check relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = &self.fetch;
        if f.backoff_base_millis > f.backoff_cap_millis {
            return Err(ConfigError::Invalid(format!(
                "fetch.backoff_base_millis ({}) is larger than fetch.backoff_cap_millis ({})",
                f.backoff_base_millis, f.backoff_cap_millis
            )));
        }
        if f.inflight_bytes_max.get() < u64::from(crate::block::BLOCK_SIZE_MAX_BYTES) {
            return Err(ConfigError::Invalid(format!(
                "fetch.inflight_bytes_max ({}) must hold at least one block of the largest size ({} bytes)",
                f.inflight_bytes_max,
                crate::block::BLOCK_SIZE_MAX_BYTES
            )));
        }
        if f.attempt_timeout_millis.get() > f.source_elapsed_max_millis.get() {
            return Err(ConfigError::Invalid(format!(
                "fetch.attempt_timeout_millis ({}) is longer than fetch.source_elapsed_max_millis ({}): no attempt could finish",
                f.attempt_timeout_millis, f.source_elapsed_max_millis
            )));
        }
        f.hedge.validate().map_err(|e| ConfigError::Invalid(format!("fetch.{e}")))?;
        self.s3.validate().map_err(|e| ConfigError::Invalid(format!("s3: {e}")))?;
        self.rate_limit.validate().map_err(|e| ConfigError::Invalid(format!("rate_limit: {e}")))?;
        self.concurrency.validate().map_err(|e| ConfigError::Invalid(format!("concurrency: {e}")))?;
        self.adaptive_rate.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        crate::store::options::validate(&self.store_defaults(), &self.store).map_err(ConfigError::Invalid)?;
        if let Some(dir) = &self.checkpoint.dir
            && !dir.is_absolute()
        {
            return Err(ConfigError::Invalid(format!("checkpoint.dir {} must be an absolute path", dir.display())));
        }
        self.worker.validate()
    }

    pub fn writer(&self) -> WriterConfig {
        WriterConfig {
            backend: self.write.backend,
            direct_io: self.write.direct_io,
            queue_depth: self.write.queue_depth,
            pwrite_threads: self.write.pwrite_threads,
        }
    }

    /// How the store at `url` is opened: the top-level sections overlaid
    /// with its `[[store]]` entry, if one covers it.
    pub fn store_options(&self, url: &crate::store::StoreUrl) -> Result<crate::store::StoreOptions, ConfigError> {
        crate::store::options::resolve(&self.store_defaults(), &self.store, url).map_err(ConfigError::Invalid)
    }

    /// The options of a store no `[[store]]` entry covers.
    fn store_defaults(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            s3: self.s3.clone(),
            rate_limit: self.rate_limit.clone(),
            concurrency: self.concurrency.clone(),
            adaptive_rate: self.adaptive_rate.clone(),
            attempt_timeout: self.fetch.attempt_timeout(),
        }
    }

    /// Where the worker keeps its job database.
    pub fn worker_state_dir(&self) -> PathBuf {
        self.worker.state_dir.clone().unwrap_or_else(|| self.checkpoint_dir())
    }

    /// The checkpoint directory, resolved from the config or the environment.
    pub fn checkpoint_dir(&self) -> PathBuf {
        if let Some(dir) = &self.checkpoint.dir {
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

impl CheckpointConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_millis.get())
    }
}

fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("default is non-zero")
}

fn nzu(v: usize) -> NonZeroUsize {
    NonZeroUsize::new(v).expect("default is non-zero")
}

/// Parse a human size: `4096`, `64KiB`, `1MiB`, `4M`, `1GiB`.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (examples: 4096, 64KiB, 1MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(format!("unknown size unit {other:?} in {text:?}: use KiB, MiB, GiB or TiB"));
        }
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {text:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sections_and_unknown_keys() {
        let c = Config::parse("[fetch]\nattempts_max = 2\n").unwrap();
        assert_eq!(c.fetch.attempts_max.get(), 2);
        assert_eq!(c.fetch.backoff_cap_millis.get(), 2000);
        let err = Config::parse("[fetch]\nattempts = 2\n").unwrap_err().to_string();
        assert!(err.contains("attempts"), "{err}");
        let err = Config::parse("[fetch]\nattempts_max = 0\n").unwrap_err().to_string();
        assert!(err.contains("attempts_max") || err.contains("zero"), "{err}");
        let err = Config::parse("[fetch]\nbackoff_base_millis = 5000\n").unwrap_err().to_string();
        assert!(err.contains("backoff_cap_millis"), "{err}");
    }

    #[test]
    fn the_shipped_config_is_valid_and_matches_defaults() {
        let text = include_str!("../config/rehydrate.toml");
        let c = Config::parse(text).unwrap();
        let d = Config::default();
        assert_eq!(c.fetch.inflight_bytes_max, d.fetch.inflight_bytes_max);
        assert_eq!(c.fetch.attempts_max, d.fetch.attempts_max);
        assert_eq!(c.checkpoint.interval_bytes, d.checkpoint.interval_bytes);
        assert_eq!(c.write.queue_depth, d.write.queue_depth);
        assert_eq!(c.worker.listen, d.worker.listen);
        assert_eq!(c.worker.jobs_queued_max, d.worker.jobs_queued_max);
        assert_eq!(c.worker.target_free_bytes_min, d.worker.target_free_bytes_min);
        assert_eq!(c.worker.request_body_bytes_max, d.worker.request_body_bytes_max);
    }

    #[test]
    fn worker_section() {
        let c =
            Config::parse("[worker]\nlisten = \"0.0.0.0:80\"\n[worker.profiles.main]\nstore = \"s3://bucket/vols\"\n")
                .unwrap();
        assert_eq!(c.worker.profiles["main"].store, "s3://bucket/vols");
        for bad in [
            "[worker]\nlisten = \"nowhere\"\n",
            "[worker]\ntarget_roots = [\"relative\"]\n",
            "[worker.profiles.main]\nstore = \"relative\"\n",
            "[worker.profiles.main]\nstore = \"s3://bucket\"\nkey = \"secret\"\n",
            "[worker]\nlog_format = \"xml\"\n",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size_bytes("4096").unwrap(), 4096);
        assert!(parse_size_bytes("1XB").is_err());
        assert!(parse_size_bytes("99999999999999999999T").is_err());
    }

    /// Values that stress parsing and validation: zero, negatives, overflow,
    /// wrong types, odd strings.
    fn hostile_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("9223372036854775807".to_owned()),
            Just("1e400".to_owned()),
            Just("nan".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"99999999999999999999T\"".to_owned()),
            any::<u64>().prop_map(|n| n.to_string()),
            "\"\\PC{0,12}\"",
        ]
    }

    proptest::proptest! {
        /// Arbitrary text: a config or an error, never a panic; an accepted
        /// config validates again.
        #[test]
        fn parse_never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
            if let Ok(c) = Config::parse(&text) {
                proptest::prop_assert!(c.validate().is_ok());
            }
        }

        /// The shipped config with values replaced by hostile ones and lines
        /// dropped: a config or a clear error, never a panic.
        #[test]
        fn parse_never_panics_on_mutated_configs(
            edits in proptest::collection::vec((0usize..200, 0u8..4, hostile_value()), 1..8),
        ) {
            let mut lines: Vec<String> = include_str!("../config/rehydrate.toml").lines().map(str::to_owned).collect();
            for (at, op, value) in edits {
                let at = at % lines.len();
                let line = lines[at].trim_start_matches("# ").to_owned();
                match (op, line.split_once(" = ")) {
                    (0, _) => lines[at].clear(),
                    (_, Some((key, _))) if !key.contains(' ') => lines[at] = format!("{key} = {value}"),
                    _ => {}
                }
            }
            if let Ok(c) = Config::parse(&lines.join("\n")) {
                proptest::prop_assert!(c.validate().is_ok());
            }
        }
    }
}
