//! The worker service's configuration (`[worker]`): the listener, the job
//! limits, the gates' backoff, the target roots and the store profiles jobs
//! name. It is the application's own section, so it lives with the loader
//! rather than in the worker, which runs the restore engine (and the engine
//! is built from the whole [`Config`](super::Config)).

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use crate::store::StoreUrl;

/// Longest job id, profile name.
pub const NAME_LEN_MAX: usize = 64;

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
    /// Where jobs that ask for an NBD export (`"export"` in the spec) may
    /// listen: `127.0.0.1:10900-10999` (loopback TCP ports; `"export": true`
    /// takes the first free one) or `unix:/run/rehydrate/nbd` (unix sockets
    /// in that directory; `"export": true` gets `<dir>/<job id>.sock`).
    /// Unset: jobs may not export. Loopback only: NBD has no authentication.
    pub export_listen: Option<String>,
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
            export_listen: None,
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
    /// Peer workers (`http://host:port`, their listeners) asked for each
    /// block before the store, in order (`[peers]`).
    #[serde(default)]
    pub peers: Vec<String>,
}

impl WorkerConfig {
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_millis.get())
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_millis.get())
    }

    /// The export range, when jobs may export (validated at load).
    pub fn export_range(&self) -> Option<Result<ExportRange, String>> {
        self.export_listen.as_deref().map(ExportRange::parse)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_millis.get())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
        if let Some(range) = &self.export_listen
            && let Err(e) = ExportRange::parse(range)
        {
            return bad(format!("export_listen: {e}"));
        }
        if self.gate_backoff_millis > self.gate_backoff_max_millis {
            return bad("gate_backoff_millis is larger than gate_backoff_max_millis".to_owned());
        }
        for (name, profile) in &self.profiles {
            if !valid_name(name) {
                return bad(format!("profiles.{name}: profile names are 1-64 of A-Z a-z 0-9 _ -"));
            }
            for url in std::iter::once(&profile.store).chain(&profile.secondaries) {
                let parsed = match crate::snapshot::longhorn::is_longhorn_url(url) {
                    true => crate::snapshot::longhorn::LonghornUrl::parse_profile_store(url),
                    false => StoreUrl::parse(url),
                };
                if let Err(e) = parsed {
                    return bad(format!("profiles.{name}: {e}"));
                }
            }
        }
        Ok(())
    }
}

/// Where job exports may listen (`worker.export_listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportRange {
    /// Loopback TCP ports, both ends included.
    Tcp { ip: std::net::IpAddr, ports: std::ops::RangeInclusive<u16> },
    /// Unix sockets directly in this directory.
    UnixDir(PathBuf),
}

impl ExportRange {
    /// `IP:PORT`, `IP:FIRST-LAST` (`[::1]:...` for IPv6) or `unix:/DIR`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = "give a loopback address and port range (127.0.0.1:10900-10999) or a socket directory (unix:/run/rehydrate/nbd)";
        if let Some(dir) = text.strip_prefix("unix:") {
            let dir = PathBuf::from(dir);
            if !dir.is_absolute() {
                return Err(format!("{text:?}: the socket directory must be an absolute path; {usage}"));
            }
            return Ok(ExportRange::UnixDir(dir));
        }
        let (host, ports) = text.rsplit_once(':').ok_or_else(|| format!("{text:?}: {usage}"))?;
        let ip: std::net::IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{text:?}: {host:?} is not an IP address; {usage}"))?;
        if !ip.is_loopback() {
            return Err(format!(
                "{text:?}: {ip} is not a loopback address; NBD has no authentication here, so exports listen on loopback or unix sockets only"
            ));
        }
        let (first, last) = ports.split_once('-').unwrap_or((ports, ports));
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
        match (port(first), port(last)) {
            (Some(first), Some(last)) if first <= last => Ok(ExportRange::Tcp { ip, ports: first..=last }),
            _ => Err(format!("{text:?}: {ports:?} is not a port or a range FIRST-LAST of ports 1-65535; {usage}")),
        }
    }
}

impl std::fmt::Display for ExportRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportRange::Tcp { ip: ip @ std::net::IpAddr::V6(_), ports } => {
                write!(f, "[{ip}]:{}-{}", ports.start(), ports.end())
            }
            ExportRange::Tcp { ip, ports } => write!(f, "{ip}:{}-{}", ports.start(), ports.end()),
            ExportRange::UnixDir(dir) => write!(f, "unix:{}", dir.display()),
        }
    }
}

/// `[A-Za-z0-9_-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=NAME_LEN_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("default is non-zero")
}

fn nzu(v: usize) -> NonZeroUsize {
    NonZeroUsize::new(v).expect("default is non-zero")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ranges_parse_or_say_what_is_wrong() {
        let tcp = ExportRange::parse("127.0.0.1:10900-10909").unwrap();
        assert_eq!(tcp.to_string(), "127.0.0.1:10900-10909");
        assert_eq!(ExportRange::parse("[::1]:10900").unwrap().to_string(), "[::1]:10900-10900");
        assert_eq!(ExportRange::parse("unix:/run/rehydrate/nbd").unwrap().to_string(), "unix:/run/rehydrate/nbd");
        for (bad, says) in [
            ("10.0.0.1:10900-10999", "not a loopback"),
            ("127.0.0.1:10999-10900", "not a port"),
            ("127.0.0.1:0", "not a port"),
            ("localhost:10900", "not an IP"),
            ("unix:relative", "absolute"),
            ("10900", "loopback address and port range"),
        ] {
            let e = ExportRange::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
