//! Stores: where snapshot objects live.
//!
//! A [`BlockStore`] is a small object-safe trait over a flat key space under
//! one prefix: get a whole object (bounded in length), put one, ask whether
//! one exists. Backends: `file://` ([`file::FileStore`], a directory laid out
//! exactly as the same snapshot would be in a bucket), `s3://`
//! (`store/s3.rs`) and, read-only, `http://` / `https://` (`store/http.rs`:
//! any static host, or a peer worker). Every policy (rate limit, retry, timeout, fallback, fault
//! injection, metrics) wraps this same trait and forwards every method.
//!
//! Errors are classified where they arise ([`StoreError`] carries its
//! [`ErrorClass`](crate::error::ErrorClass)).

pub mod delay;
pub mod ebs;
pub mod ebs_server;
pub mod fault;
pub mod file;
pub mod http;
pub mod limit;
pub mod loopback;
pub mod options;
pub mod rate;
pub mod s3;
pub mod timeout;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

pub use crate::error::StoreError;

/// A boxed future, so the store trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Who a store request is for, and what its caller wants to learn of it:
/// passed down through every layer explicitly (no task-local state that a
/// spawned task would have to re-apply).
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// The restore the request works for (0: none). Requests waiting at a
    /// store's concurrency gate queue per tenant and take turns
    /// (`store/limit.rs`).
    pub tenant: u64,
    /// Told when the request leaves the local queues (rate limit, gate,
    /// pace) for the store, by the innermost layer (`store/timeout.rs`).
    /// Fetch measures store latency from there.
    pub sent: Option<Arc<timeout::SentAt>>,
    /// A reader is blocked on this request now (a read of a volume still
    /// being restored, or a manifest a restore cannot start without): the
    /// stores' local queues let it go first (`store/limit.rs`,
    /// `store/rate.rs`).
    pub demand: bool,
}

impl RequestContext {
    /// A request outside any restore, whose send time nobody watches.
    pub const NONE: RequestContext = RequestContext { tenant: 0, sent: None, demand: false };
}

/// [`RequestContext::NONE`] with a `'static` address, for the context-free
/// methods.
static NO_CONTEXT: RequestContext = RequestContext::NONE;

/// A store of snapshot objects under one prefix.
///
/// Backends and decorators implement the `*_for` methods, which carry the
/// [`RequestContext`]; `get`, `put` and `exists` are the same calls outside
/// any restore ([`RequestContext::NONE`]).
pub trait BlockStore: Send + Sync + fmt::Debug {
    /// Where this store points (for reports; never carries credentials).
    fn url(&self) -> &StoreUrl;

    /// Read the whole object `key`. An object longer than `len_max_bytes` is
    /// refused as corrupt without reading it all: a store cannot make us
    /// buffer more than the caller budgeted.
    fn get_for<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>>;

    /// Write the whole object `key` atomically: readers see all of it or none.
    fn put_for<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Whether object `key` exists.
    fn exists_for<'a>(&'a self, ctx: &'a RequestContext, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// The objects directly under `dir` (a key prefix ending in `/`), with
    /// their names relative to it and their modification times; an absent
    /// `dir` lists nothing. Only Longhorn's restore lock lists
    /// (`snapshot/longhorn/lock.rs`); a store that cannot says so.
    fn list_for<'a>(
        &'a self,
        _ctx: &'a RequestContext,
        dir: &'a str,
    ) -> BoxFuture<'a, Result<Vec<ObjectInfo>, StoreError>> {
        Box::pin(async move { Err(StoreError::permanent(format!("{}: this store cannot list {dir}", self.url()))) })
    }

    /// Delete object `key`; an absent object is not an error. Only Longhorn's
    /// restore lock deletes (its own lock file).
    fn delete_for<'a>(&'a self, _ctx: &'a RequestContext, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { Err(StoreError::permanent(format!("{}: this store cannot delete {key}", self.url()))) })
    }

    /// The adaptive request rate this store is paced by, if it is (see
    /// `store/rate.rs`): fetch asks it whether the store is throttling now,
    /// and reports read the rate from it. Decorators forward it.
    fn rate_control(&self) -> Option<Arc<rate::RateControl>> {
        None
    }

    /// A restore charges each request it sends here `overhead_bytes` beyond
    /// its body against its in-flight budget (the largest of its sources'
    /// [`StoreUrl::request_overhead_bytes`]): a concurrency window with a
    /// byte budget sizes its ceiling by the largest charge it has been told
    /// of, so it never grows past what the budget admits (`store/limit.rs`,
    /// `Aimd::ceiling`). Decorators forward it.
    fn charge_requests(&self, _overhead_bytes: u64) {}

    /// [`get_for`](Self::get_for) outside any restore.
    fn get<'a>(&'a self, key: &'a str, len_max_bytes: u64) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        self.get_for(&NO_CONTEXT, key, len_max_bytes)
    }

    /// [`put_for`](Self::put_for) outside any restore.
    fn put<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        self.put_for(&NO_CONTEXT, key, bytes)
    }

    /// [`exists_for`](Self::exists_for) outside any restore.
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.exists_for(&NO_CONTEXT, key)
    }
}

/// One object a [`BlockStore::list_for`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its name relative to the listed directory.
    pub name: String,
    /// When it was last written, by the store's clock.
    pub modified: std::time::SystemTime,
}

/// Implement [`BlockStore`] for a decorator with an `inner: SharedStore` and
/// an `async fn run(&self, ctx: &RequestContext, what: &str, op) ->
/// Result<T, StoreError>` that wraps every call (a deadline, a concurrency
/// slot, a pace).
macro_rules! forward_through_run {
    ($decorator:ty) => {
        $crate::store::forward_through_run!($decorator, |_| None);
    };
    ($decorator:ty, $here:expr) => {
        $crate::store::forward_through_run!($decorator, $here, |_, _| {});
    };
    // `$here`: the decorator's own rate control, if it has one; `$charge`:
    // what it does with a restore's request charge before passing it on.
    ($decorator:ty, $here:expr, $charge:expr) => {
        impl $crate::store::BlockStore for $decorator {
            fn url(&self) -> &$crate::store::StoreUrl {
                self.inner.url()
            }

            fn get_for<'a>(
                &'a self,
                ctx: &'a $crate::store::RequestContext,
                key: &'a str,
                len_max_bytes: u64,
            ) -> $crate::store::BoxFuture<'a, Result<bytes::Bytes, $crate::store::StoreError>> {
                Box::pin(self.run(ctx, key, self.inner.get_for(ctx, key, len_max_bytes)))
            }

            fn put_for<'a>(
                &'a self,
                ctx: &'a $crate::store::RequestContext,
                key: &'a str,
                bytes: bytes::Bytes,
            ) -> $crate::store::BoxFuture<'a, Result<(), $crate::store::StoreError>> {
                Box::pin(self.run(ctx, key, self.inner.put_for(ctx, key, bytes)))
            }

            fn exists_for<'a>(
                &'a self,
                ctx: &'a $crate::store::RequestContext,
                key: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<bool, $crate::store::StoreError>> {
                Box::pin(self.run(ctx, key, self.inner.exists_for(ctx, key)))
            }

            fn list_for<'a>(
                &'a self,
                ctx: &'a $crate::store::RequestContext,
                dir: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<Vec<$crate::store::ObjectInfo>, $crate::store::StoreError>> {
                Box::pin(self.run(ctx, dir, self.inner.list_for(ctx, dir)))
            }

            fn delete_for<'a>(
                &'a self,
                ctx: &'a $crate::store::RequestContext,
                key: &'a str,
            ) -> $crate::store::BoxFuture<'a, Result<(), $crate::store::StoreError>> {
                Box::pin(self.run(ctx, key, self.inner.delete_for(ctx, key)))
            }

            fn rate_control(&self) -> Option<std::sync::Arc<$crate::store::rate::RateControl>> {
                let here: fn(&$decorator) -> Option<std::sync::Arc<$crate::store::rate::RateControl>> = $here;
                here(self).or_else(|| self.inner.rate_control())
            }

            fn charge_requests(&self, overhead_bytes: u64) {
                let charge: fn(&$decorator, u64) = $charge;
                charge(self, overhead_bytes);
                self.inner.charge_requests(overhead_bytes);
            }
        }
    };
}
pub(crate) use forward_through_run;

/// A shared store handle.
pub type SharedStore = Arc<dyn BlockStore>;

/// Where a store lives: `file:///abs/dir`, `s3://bucket/prefix`,
/// `http(s)://host[:port][/prefix]`, or `ebs://snap-...` (an EBS snapshot
/// through the EBS direct APIs; an empty id only as a `[[store]]` prefix
/// covering every snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoreUrl {
    File {
        root: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: String,
    },
    /// `base`: scheme, host and prefix, no trailing slash.
    Http {
        base: String,
    },
    Ebs {
        snapshot_id: String,
    },
}

/// Why a URL is not a store or manifest URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid URL {url:?}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl StoreUrl {
    /// What one request to this store holds besides its object's bytes, for
    /// the in-flight budget: the S3 store's GET reads the body into the
    /// block's own buffer and keeps only a response head
    /// ([`s3::REQUEST_OVERHEAD_BYTES`]); the stores on hyper keep its read
    /// buffer ([`crate::fetch::budget::REQUEST_OVERHEAD_BYTES`]); a file
    /// store keeps the same bound (its reads are not where memory goes).
    pub fn request_overhead_bytes(&self) -> u64 {
        match self {
            StoreUrl::S3 { .. } => s3::REQUEST_OVERHEAD_BYTES,
            StoreUrl::File { .. } | StoreUrl::Http { .. } | StoreUrl::Ebs { .. } => {
                crate::fetch::budget::REQUEST_OVERHEAD_BYTES
            }
        }
    }

    /// Parse `file:///abs/dir` (or a bare absolute path) or
    /// `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let err = |reason: &str| UrlError { url: url.to_owned(), reason: reason.to_owned() };
        if url.contains('\0') {
            return Err(err("contains a NUL byte"));
        }
        if let Some(id) = url.strip_prefix(EBS_SCHEME) {
            let id = id.trim_end_matches('/');
            if !(id.is_empty() || ebs::valid_snapshot_id(id)) {
                return Err(err("an EBS snapshot id is snap- and 1-59 hex digits (ebs://snap-0123456789abcdef0)"));
            }
            return Ok(StoreUrl::Ebs { snapshot_id: id.to_owned() });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if !valid_bucket(bucket) {
                return Err(err("bucket names are 3-63 characters of a-z, 0-9, '.', '-'"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == "." || part == "..") {
                return Err(err("a prefix may not contain '.' or '..' segments"));
            }
            return Ok(StoreUrl::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() });
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            return parse_http(url).map_err(err);
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !path.starts_with('/') {
            return Err(err("use file:///absolute/path, s3://bucket/prefix or http(s)://host/prefix"));
        }
        let root = PathBuf::from(path);
        if root.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(err("a path may not contain '..'"));
        }
        Ok(StoreUrl::File { root })
    }

    /// Split a manifest URL into its store (the manifest's parent) and the
    /// manifest's key within it.
    pub fn parse_manifest(url: &str) -> Result<(Self, String), UrlError> {
        let err = |reason: &str| UrlError { url: url.to_owned(), reason: reason.to_owned() };
        let trimmed = url.trim_end_matches('/');
        let (parent, key) = trimmed.rsplit_once('/').ok_or_else(|| err("no manifest name in the URL"))?;
        if key.is_empty() || !key.ends_with(MANIFEST_SUFFIX) {
            return Err(err(&format!("a manifest URL ends in <name>{MANIFEST_SUFFIX}")));
        }
        let parent = if parent == "file://" || parent.is_empty() { "/" } else { parent };
        let parent = if parent == "s3:/" {
            return Err(err("no bucket in the URL"));
        } else {
            parent
        };
        Ok((Self::parse(parent)?, key.to_owned()))
    }

    /// The URL of object `key` in this store.
    pub fn join(&self, key: &str) -> String {
        let base = self.to_string();
        format!("{}/{}", base.trim_end_matches('/'), key)
    }
}

/// An `http://` or `https://` base URL: a host, an optional port, an
/// optional prefix of plain path segments; no query, fragment or user info.
fn parse_http(url: &str) -> Result<StoreUrl, &'static str> {
    let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
    let rest = rest.trim_end_matches('/');
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') {
        return Err("an http store URL needs a host (and no user info): http://host[:port]/prefix");
    }
    if url.contains(['?', '#', ' ']) {
        return Err("an http store URL has no query, fragment or spaces");
    }
    if !path.is_empty() && path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("a prefix may not contain empty, '.' or '..' segments");
    }
    let base =
        if path.is_empty() { format!("{scheme}://{authority}") } else { format!("{scheme}://{authority}/{path}") };
    base.parse::<hyper::Uri>().map_err(|_| "not a valid http URL")?;
    Ok(StoreUrl::Http { base })
}

/// Manifests are stored as `<store>/<name>.manifest`.
pub const MANIFEST_SUFFIX: &str = ".manifest";

/// The scheme of an EBS snapshot given as a manifest: `ebs://snap-...`.
pub const EBS_SCHEME: &str = "ebs://";

fn valid_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File { root } => write!(f, "file://{}", root.display()),
            StoreUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUrl::Ebs { snapshot_id } => write!(f, "{EBS_SCHEME}{snapshot_id}"),
            StoreUrl::Http { base } => f.write_str(base),
        }
    }
}

/// How one store is opened: the backend settings and the policies that wrap
/// it. The config resolves one per store URL (`[[store]]`, `store/options.rs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreOptions {
    pub s3: s3::S3Config,
    pub rate_limit: limit::RateLimitConfig,
    pub concurrency: limit::AdaptiveConcurrencyConfig,
    pub adaptive_rate: rate::AdaptiveRateConfig,
    /// The deadline of one attempt, body included.
    pub attempt_timeout: std::time::Duration,
    /// The in-flight byte budget (`fetch.inflight_bytes_max`) the store's
    /// requests share: it bounds the concurrency window. None: unbounded.
    pub inflight_bytes_max: Option<u64>,
}

impl StoreOptions {
    /// Check each part; the error names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        self.s3.validate()?;
        self.rate_limit.validate().map_err(|e| format!("rate_limit: {e}"))?;
        self.concurrency.validate().map_err(|e| format!("concurrency: {e}"))?;
        self.adaptive_rate.validate()?;
        if self.attempt_timeout.is_zero() {
            return Err("attempt_timeout_millis must be positive".into());
        }
        Ok(())
    }
}

/// What sits under a store's policies.
#[derive(Debug)]
pub enum Backend {
    /// A store across a network (S3, an in-process S3 endpoint): every
    /// policy goes around it.
    Remote(SharedStore),
    /// A store on this machine (a directory, a test double): only the
    /// attempt deadline goes around it; it has no rate to learn and no
    /// request budget to share.
    Local(SharedStore),
}

/// Put the policies around a backend. This is the one place a store stack
/// is built (the CLI, the worker, the demo and the tests all come here), so
/// the order is code, not a rule in comments. From the outside in:
///
/// 1. (the retry loop, `fetch.rs`, around all of it);
/// 2. the configured rate limit (`RateLimited`): a hard ceiling, every
///    attempt counted;
/// 3. the adaptive concurrency window (`AdaptiveConcurrency`): requests
///    queue per restore and take turns;
/// 4. the adaptive request rate (`rate::AdaptiveRate`), inside the slot, so
///    the send rate it measures is when requests really go;
/// 5. the attempt deadline (`timeout::Timeout`), innermost, so waiting in 2-4
///    never counts against an attempt; it marks when a request was sent;
/// 6. the backend.
pub fn stack(backend: Backend, options: &StoreOptions) -> Result<SharedStore, StoreError> {
    let remote = match backend {
        Backend::Local(store) => return Ok(with_deadline(store, options)),
        Backend::Remote(store) => store,
    };
    options.validate().map_err(|e| StoreError::permanent(format!("store options: {e}")))?;
    let label = remote.url().to_string();
    let request_overhead_bytes = remote.url().request_overhead_bytes();
    let timed = with_deadline(remote, options);
    let paced: SharedStore = if options.adaptive_rate.enabled {
        let ceiling = options.rate_limit.requests_per_sec.map(|r| f64::from(r.get()));
        let control = Arc::new(rate::RateControl::new(&options.adaptive_rate, ceiling, Some(label.clone())));
        Arc::new(rate::AdaptiveRate::new(timed, control))
    } else {
        timed
    };
    let mut gated = limit::AdaptiveConcurrency::new(paced, &options.concurrency)
        .map_err(|e| StoreError::permanent(format!("concurrency config: {e}")))?;
    if let Some(bytes) = options.inflight_bytes_max {
        gated = gated.with_budget_bytes(bytes, request_overhead_bytes);
    }
    let gated = gated.with_metric_label(label);
    let limited = limit::RateLimited::new(Arc::new(gated), &options.rate_limit)
        .map_err(|e| StoreError::permanent(format!("rate_limit config: {e}")))?;
    Ok(Arc::new(limited))
}

fn with_deadline(backend: SharedStore, options: &StoreOptions) -> SharedStore {
    Arc::new(timeout::Timeout::new(backend, options.attempt_timeout))
}

/// Open the store a URL names with its options: an `s3://` or `http(s)://`
/// store as a [`Backend::Remote`], a `file://` store as a [`Backend::Local`].
pub async fn open(url: &StoreUrl, options: &StoreOptions) -> Result<SharedStore, StoreError> {
    let backend = match url {
        StoreUrl::File { root } => Backend::Local(Arc::new(file::FileStore::new(root.clone()))),
        StoreUrl::S3 { bucket, prefix } => {
            Backend::Remote(Arc::new(s3::S3Store::connect(bucket, prefix, &options.s3).await?))
        }
        StoreUrl::Ebs { snapshot_id } => {
            Backend::Remote(Arc::new(ebs::EbsStore::connect(snapshot_id, &options.s3).await?))
        }
        StoreUrl::Http { .. } => Backend::Remote(Arc::new(http::HttpStore::new(url, &options.s3, None)?)),
    };
    stack(backend, options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_and_manifest_urls() {
        assert_eq!(StoreUrl::parse("file:///a/b").unwrap(), StoreUrl::File { root: "/a/b".into() });
        assert_eq!(
            StoreUrl::parse("s3://bucket/x/y/").unwrap(),
            StoreUrl::S3 { bucket: "bucket".into(), prefix: "x/y".into() }
        );
        let (store, key) = StoreUrl::parse_manifest("s3://bucket/p/vol.manifest").unwrap();
        assert_eq!(store.join(&key), "s3://bucket/p/vol.manifest");
        let (store, key) = StoreUrl::parse_manifest("file:///srv/vol.manifest").unwrap();
        assert_eq!((store.to_string(), key.as_str()), ("file:///srv".to_owned(), "vol.manifest"));
        let (store, key) = StoreUrl::parse_manifest("http://10.0.0.5:8080/snaps/vol.manifest").unwrap();
        assert_eq!(store, StoreUrl::Http { base: "http://10.0.0.5:8080/snaps".into() });
        assert_eq!(store.join(&key), "http://10.0.0.5:8080/snaps/vol.manifest");
        let (store, _) = StoreUrl::parse_manifest("https://cdn.example/vol.manifest").unwrap();
        assert_eq!(store.to_string(), "https://cdn.example");
    }

    #[test]
    fn rejects_hostile_urls() {
        assert_eq!(
            StoreUrl::parse("ebs://snap-0123456789abcdef0").unwrap(),
            StoreUrl::Ebs { snapshot_id: "snap-0123456789abcdef0".into() }
        );
        assert_eq!(StoreUrl::parse("ebs://snap-0a").unwrap().to_string(), "ebs://snap-0a");
        for bad in ["ebs://vol-0a", "ebs://snap-", "ebs://snap-xyz", "ebs://snap-0a/x"] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} accepted");
        }
        for bad in [
            "relative/path",
            "file://../x",
            "/a/../b",
            "s3://B/x",
            "s3://bu",
            "s3://bucket/../x",
            "/a\0b",
            "http://",
            "http:///x",
            "http://u:p@host/x",
            "http://host/a/../b",
            "http://host/a//b",
            "http://host/x?q=1",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(StoreUrl::parse_manifest("s3://bucket/p/vol.txt").is_err());
    }
}
