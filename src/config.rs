//! Configuration: read raw from TOML, resolved to typed values, validated.
//!
//! Every section may be given partially (serde defaults fill the rest) and an
//! unknown key is an error that names it. Sizes are whole bytes in keys ending
//! `_bytes`, durations whole milliseconds in keys ending `_millis`: one
//! convention everywhere. Each default says why it is that value; the same
//! text is in `config/rehydrate.toml`.
//!
//! Each section's type belongs to the component it configures (`[fetch]` to
//! [`crate::fetch`], `[write]` to [`crate::write`], `[checkpoint]` to
//! [`crate::checkpoint`], `[manifest]` to [`crate::manifest`], the store
//! sections to [`crate::store`]); this module reads them together, checks the
//! relations between sections, and holds the worker service's own section
//! ([`worker`]). Nothing below the edges imports it but the restore engine,
//! which is built from a whole [`Config`].

pub mod worker;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::checkpoint::CheckpointConfig;
pub use crate::fetch::FetchConfig;
pub use crate::manifest::ManifestConfig;
pub use crate::write::WriterConfig;
pub use worker::{LogFormat, ProfileConfig, WorkerConfig};

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
    pub write: WriterConfig,
    pub checkpoint: CheckpointConfig,
    pub manifest: ManifestConfig,
    /// `rehydrate serve`: listener, job limits, gates, store profiles.
    pub worker: WorkerConfig,
    /// `[peers]`: asking peer workers for blocks, and serving them.
    pub peers: crate::peer::PeersConfig,
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
        for (name, profile) in &self.worker.profiles {
            for peer in &profile.peers {
                if !matches!(crate::store::StoreUrl::parse(peer), Ok(crate::store::StoreUrl::Http { .. })) {
                    return Err(ConfigError::Invalid(format!(
                        "worker.profiles.{name}.peers: {peer:?} is not a worker's http(s)://host:port"
                    )));
                }
            }
        }
        self.worker.validate()
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
            inflight_bytes_max: Some(self.fetch.inflight_bytes_max.get()),
        }
    }

    /// The checkpoint directory, resolved from the config or the environment.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.checkpoint.resolved_dir()
    }

    /// Where the worker keeps its job database.
    pub fn worker_state_dir(&self) -> PathBuf {
        self.worker.state_dir.clone().unwrap_or_else(|| self.checkpoint_dir())
    }
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
        assert_eq!(c.concurrency, d.concurrency);
        assert_eq!(c.worker.listen, d.worker.listen);
        assert_eq!(c.worker.jobs_queued_max, d.worker.jobs_queued_max);
        assert_eq!(c.worker.target_free_bytes_min, d.worker.target_free_bytes_min);
        assert_eq!(c.worker.request_body_bytes_max, d.worker.request_body_bytes_max);
        assert_eq!(c.peers, d.peers);
    }

    #[test]
    fn profile_peers_are_http_urls() {
        let ok = "[worker.profiles.main]\nstore = \"s3://bucket/v\"\npeers = [\"http://10.0.0.2:7878\"]\n";
        assert_eq!(Config::parse(ok).unwrap().worker.profiles["main"].peers, vec!["http://10.0.0.2:7878"]);
        let bad = "[worker.profiles.main]\nstore = \"s3://bucket/v\"\npeers = [\"s3://bucket/p\"]\n";
        assert!(Config::parse(bad).unwrap_err().to_string().contains("peers"));
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
