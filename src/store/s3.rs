//! `s3://` store: [`S3Store`], a [`BlockStore`] over `aws-sdk-s3`, except
//! for the hot path: a block's GET is signed with SigV4 and sent on a pooled
//! HTTP/1.1 connection of our own, its body read from the socket straight
//! into a pooled aligned buffer (`s3/get.rs`, `s3/h1.rs`: the SDK decides
//! the endpoint and supplies the credentials, once per store, not per
//! request). List, put, head and delete go through the SDK.
//!
//! In: object keys under `<prefix>/` in one bucket. Out: whole objects as
//! [`Bytes`], or a [`StoreError`] whose [`ErrorClass`] was decided here, in
//! one table ([`classify`] for HTTP status + S3 error code, [`classify_sdk_error`]
//! for the SDK's failure kinds), so the fetch stage applies one policy per
//! class.
//!
//! Limits and deadlines, per attempt (see [`S3Config`]):
//! - the SDK's own retries are **off** (`RetryConfig::disabled()`): the fetch
//!   stage owns the only retry loop, so one `get` is exactly one HTTP request
//!   and a 503 storm is never multiplied by a hidden inner loop (the GET
//!   path sends a request again only when a pooled connection turns out to
//!   have been closed by the server before it saw the request);
//! - connect, attempt (request sent .. response headers) and operation
//!   (credentials + the one attempt) timeouts are set on the SDK and kept
//!   the same way on the GET path;
//! - the SDK's timeouts do not cover a streamed body, so the body is read
//!   here chunk by chunk under three guards of our own: a whole-body
//!   deadline, an idle deadline per chunk (a stalled connection) and a minimum
//!   throughput after a grace period (a trickling straggler). A cut body is
//!   `Transient`: another attempt, or another source, may be fast;
//! - `Content-Length` above the caller's `len_max_bytes` is refused as
//!   `Corrupt` before a byte of the body is read, and the body may never grow
//!   past what was advertised; a body shorter than advertised is `Transient`
//!   (truncated in flight);
//! - a body with a `Content-Length` lands in a page-aligned buffer of the
//!   shared pool (`crate::buf`) sized to it: read into from the socket on
//!   the GET path of our own (only the few bytes that came with the
//!   response head are copied), one copy out of the HTTP client's chunks on
//!   the SDK's; no reallocation, and the block can go to the target with
//!   `O_DIRECT`.
//!
//! Integrity of the bytes is checked by the verify stage against the
//! manifest's content hash, so SDK checksums are only computed or validated
//! when S3 requires it (`WhenRequired`): one integrity layer, not two hashes
//! per block on a CPU-bound path.
//!
//! Credentials come from the standard AWS chain (env, profile, SSO, process,
//! IMDS/ECS). [`S3Store::connect_with_static_credentials`] exists only for
//! loopback endpoints (tests, `rehydrate demo` with
//! [`LoopbackS3`](super::loopback::LoopbackS3)).

use std::fmt;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::retry::{ErrorKind, RetryConfig};
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::{Bytes, BytesMut};

use super::{BlockStore, BoxFuture, StoreError, StoreUrl};
use crate::buf::{AlignedBuf, BufPool};
use crate::error::ErrorClass;

mod get;
mod h1;

/// S3 refuses object keys longer than this.
const S3_KEY_LEN_MAX_BYTES: usize = 1024;

/// What one GET holds besides its block's buffer, for the in-flight budget:
/// the response head's buffer (at most `h1::HEAD_LEN_MAX_BYTES`, 4 KiB for
/// an ordinary head) or an error answer's body (at most
/// [`ERROR_BODY_MAX_BYTES`](super::http::ERROR_BODY_MAX_BYTES)), and the
/// request's own state.
pub const REQUEST_OVERHEAD_BYTES: u64 = 64 << 10;

/// [`S3Config::receive_buffer_bytes`]'s default.
pub const RECEIVE_BUFFER_BYTES_DEFAULT: u64 = 2 << 20;
/// The largest receive buffer accepted: the kernel caps it at
/// `net.core.rmem_max` anyway; past this it is a typo.
pub const RECEIVE_BUFFER_BYTES_MAX: u64 = 1 << 30;

/// Configuration of one S3 store. Every field may be omitted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000`. Default: none, so the
    /// standard `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` environment and
    /// profile settings apply, and otherwise the AWS regional endpoint.
    pub endpoint_url: Option<String>,
    /// Region. Default: the standard chain (env, profile, IMDS), else
    /// `us-east-1`, which is also what S3-compatible servers expect.
    pub region: Option<String>,
    /// Address buckets as `/<bucket>/<key>` instead of `<bucket>.<host>`.
    /// Default: true when an endpoint is set (S3-compatible servers and
    /// loopback fixtures rarely have wildcard DNS), false for AWS.
    pub force_path_style: Option<bool>,
    /// A named AWS profile (`~/.aws/config`) for credentials and settings.
    /// Default: none, the standard chain (`AWS_PROFILE`, else `default`).
    /// Credentials never go into rehydrate's own config.
    pub profile: Option<String>,
    /// TCP + TLS connect timeout. Default 3000: a healthy endpoint connects
    /// in milliseconds; a black-holed one should fail fast and be retried.
    pub connect_timeout_millis: u64,
    /// One attempt, from sending the request to the response headers (the
    /// body is covered by the `body_*` guards below). Default 5000: S3's
    /// first-byte latency is tens of milliseconds, p99.9 well under a second.
    pub operation_attempt_timeout_millis: u64,
    /// The whole operation: credential resolution plus the single attempt
    /// (SDK retries are off). Default 10000: leaves room for a first
    /// IMDS/SSO credential fetch on top of one attempt.
    pub operation_timeout_millis: u64,
    /// Deadline for reading the whole body, from the response headers.
    /// Default 30000: a 4 MiB block at the 1 MiB/s floor takes 4 s; far past
    /// that something is wrong and another attempt or source is better.
    pub body_deadline_millis: u64,
    /// No body bytes for this long = a stalled connection, cut as transient.
    /// Default 5000: longer than any healthy pause between TCP segments.
    pub body_idle_timeout_millis: u64,
    /// Minimum average body throughput once the grace period has passed; a
    /// slower body is cut as transient (a straggler that would hold a block
    /// and an in-flight budget slot hostage). Default 1 MiB/s: one S3
    /// connection normally gives 50-100 MB/s. Keep it below link bandwidth
    /// divided by the fetch concurrency.
    pub body_throughput_min_bytes_per_sec: u64,
    /// Time after the headers before the throughput floor applies. Default
    /// 2000: lets TCP slow-start and small objects finish unjudged.
    pub body_throughput_grace_millis: u64,
    /// The most an `s3://` connection's receive buffer (`SO_RCVBUF`) is set
    /// to; 0 leaves it to the kernel. Before a GET of 1 MiB or more the
    /// buffer is sized to hold the whole answer (the object's length and a
    /// head, rounded up to a power of two), at most this; the kernel doubles
    /// it for its bookkeeping and caps it at `net.core.rmem_max`. Smaller
    /// answers are left to the kernel, whose buffer starts at 128 KiB and
    /// grows (a connection sized for a larger answer before keeps that size). Default 2 MiB: a 1 MiB block's answer arrives in one go and is
    /// read in large pieces (2 GiB from the loopback fixture, alternating
    /// runs: 0.89 x the time, 0.68 against 0.79 own CPU s/GiB); 256 KiB
    /// blocks were slower with a sized buffer (1.15 x), hence the floor. At
    /// 30 ms a connection still carries 2 MiB per round trip, about 70 MB/s,
    /// more than one S3 connection gives.
    pub receive_buffer_bytes: u64,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint_url: None,
            region: None,
            force_path_style: None,
            profile: None,
            connect_timeout_millis: 3_000,
            operation_attempt_timeout_millis: 5_000,
            operation_timeout_millis: 10_000,
            body_deadline_millis: 30_000,
            body_idle_timeout_millis: 5_000,
            body_throughput_min_bytes_per_sec: 1024 * 1024,
            body_throughput_grace_millis: 2_000,
            receive_buffer_bytes: RECEIVE_BUFFER_BYTES_DEFAULT,
        }
    }
}

impl S3Config {
    /// Check the relations between fields; the error says which field to fix.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("connect_timeout_millis", self.connect_timeout_millis),
            ("operation_attempt_timeout_millis", self.operation_attempt_timeout_millis),
            ("operation_timeout_millis", self.operation_timeout_millis),
            ("body_deadline_millis", self.body_deadline_millis),
            ("body_idle_timeout_millis", self.body_idle_timeout_millis),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("s3.{name} must be positive"));
            }
        }
        if self.operation_timeout_millis < self.operation_attempt_timeout_millis {
            return Err("s3.operation_timeout_millis must be at least s3.operation_attempt_timeout_millis".into());
        }
        if self.body_idle_timeout_millis > self.body_deadline_millis {
            return Err("s3.body_idle_timeout_millis must not exceed s3.body_deadline_millis".into());
        }
        if self.body_throughput_grace_millis >= self.body_deadline_millis {
            return Err("s3.body_throughput_grace_millis must be below s3.body_deadline_millis".into());
        }
        if self.receive_buffer_bytes > RECEIVE_BUFFER_BYTES_MAX {
            return Err(format!(
                "s3.receive_buffer_bytes {} is above the {RECEIVE_BUFFER_BYTES_MAX} allowed (0: the kernel's own sizing)",
                self.receive_buffer_bytes
            ));
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!("s3.endpoint_url {url:?} must start with http:// or https://"));
        }
        Ok(())
    }

    pub(super) fn body_guard(&self, start: Instant) -> BodyGuard {
        BodyGuard {
            start,
            deadline: Duration::from_millis(self.body_deadline_millis),
            idle: Duration::from_millis(self.body_idle_timeout_millis),
            grace: Duration::from_millis(self.body_throughput_grace_millis),
            throughput_min_bytes_per_sec: self.body_throughput_min_bytes_per_sec,
        }
    }
}

/// Static credentials, for loopback endpoints only (tests and the demo's
/// in-process server). Production uses the standard AWS credential chain.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        f.debug_struct("StaticCredentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

/// A [`BlockStore`] over one bucket and prefix of an S3(-compatible) service.
#[derive(Debug)]
pub struct S3Store {
    client: Client,
    /// The GET path of our own (`s3/get.rs`); `None` only for endpoints it
    /// does not sign (S3 Express, multi-region access points), whose GETs
    /// stay on the SDK.
    signed_get: Option<get::SignedGet>,
    bucket: String,
    prefix: String,
    url: StoreUrl,
    config: S3Config,
}

impl S3Store {
    /// Open `s3://<bucket>/<prefix>` with the standard AWS credential chain.
    /// No request is sent: an unreachable endpoint shows on the first call.
    pub async fn connect(bucket: &str, prefix: &str, config: &S3Config) -> Result<S3Store, StoreError> {
        Self::build(bucket, prefix, config, None).await
    }

    /// Open a store with fixed credentials. **For loopback endpoints only**
    /// (tests, the demo's [`LoopbackS3`](super::loopback::LoopbackS3)):
    /// production credentials come from the standard chain, never from
    /// configuration.
    pub async fn connect_with_static_credentials(
        bucket: &str,
        prefix: &str,
        config: &S3Config,
        credentials: &StaticCredentials,
    ) -> Result<S3Store, StoreError> {
        Self::build(bucket, prefix, config, Some(credentials)).await
    }

    async fn build(
        bucket: &str,
        prefix: &str,
        config: &S3Config,
        credentials: Option<&StaticCredentials>,
    ) -> Result<S3Store, StoreError> {
        config.validate().map_err(StoreError::permanent)?;
        let url =
            StoreUrl::parse(&format!("s3://{bucket}/{prefix}")).map_err(|e| StoreError::permanent(e.to_string()))?;
        let StoreUrl::S3 { bucket, prefix } = url.clone() else {
            return Err(StoreError::permanent(format!("s3://{bucket}/{prefix} is not an S3 URL")));
        };
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(config.connect_timeout_millis))
            .operation_attempt_timeout(Duration::from_millis(config.operation_attempt_timeout_millis))
            .operation_timeout(Duration::from_millis(config.operation_timeout_millis))
            .build();
        let region = match &config.region {
            Some(region) => aws_config::meta::region::RegionProviderChain::first_try(Region::new(region.clone())),
            None => aws_config::meta::region::RegionProviderChain::default_provider(),
        }
        .or_else(Region::from_static("us-east-1"));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            // Our body guards are the one stall detector (configurable, and
            // classified here); the SDK's would be a second, fixed one.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &config.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(Credentials::new(
                &credentials.access_key_id,
                &credentials.secret_access_key,
                None,
                None,
                "rehydrate-static",
            ));
        }
        let sdk_config = loader.load().await;
        let path_style = config.force_path_style.unwrap_or(sdk_config.endpoint_url().is_some());
        let s3_config = aws_sdk_s3::config::Builder::from(&sdk_config).force_path_style(path_style).build();
        let signed_get = get::SignedGet::new(&sdk_config, &bucket, path_style, config).await;
        let client = Client::from_conf(s3_config);
        Ok(S3Store { client, signed_get, bucket, prefix, url, config: config.clone() })
    }

    /// The full object key of `key` under this store's prefix.
    fn object_key(&self, key: &str) -> Result<String, StoreError> {
        let full_len_bytes = if self.prefix.is_empty() { key.len() } else { self.prefix.len() + 1 + key.len() };
        let valid = !key.is_empty()
            && full_len_bytes <= S3_KEY_LEN_MAX_BYTES
            && !key.contains('\0')
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            return Err(StoreError::permanent(format!("{}: invalid object key {key:?}", self.url)));
        }
        Ok(if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) })
    }

    fn describe(&self, object_key: &str) -> String {
        format!("s3://{}/{object_key}", self.bucket)
    }

    async fn get_object(&self, key: &str, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let object_key = self.object_key(key)?;
        let what = self.describe(&object_key);
        if let Some(signed_get) = &self.signed_get {
            return signed_get.get(&what, &object_key, len_max_bytes).await;
        }
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|e| classify_sdk_error(&format!("GET {what}"), &e))?;
        let headers_at = Instant::now();
        let advertised = match output.content_length() {
            Some(len) if len < 0 => {
                return Err(StoreError::transient(format!("GET {what}: negative Content-Length {len}")));
            }
            Some(len) => Some(len as u64),
            None => None,
        };
        if let Some(len) = advertised
            && len > len_max_bytes
        {
            return Err(StoreError::corrupt(format!(
                "GET {what}: object is {len} bytes, more than the {len_max_bytes} expected (refused before reading)"
            )));
        }
        read_body(&what, output.body, advertised, len_max_bytes, self.config.body_guard(headers_at)).await
    }
}

/// A response body, chunk by chunk: what [`read_body`] reads, whichever
/// HTTP client it came from (the SDK's `ByteStream`, hyper's `Incoming` in
/// `store/http.rs`). An error is its message.
pub(super) trait Chunks: Send {
    fn next_chunk(&mut self) -> impl std::future::Future<Output = Option<Result<Bytes, String>>> + Send;
}

impl Chunks for ByteStream {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        self.next().await.map(|r| r.map_err(|e| error_chain(&e)))
    }
}

/// Read a whole body under the [`BodyGuard`]; check its length against the
/// advertised `Content-Length` (or `len_max_bytes` when none was sent).
pub(super) async fn read_body(
    what: &str,
    body: impl Chunks,
    advertised: Option<u64>,
    len_max_bytes: u64,
    guard: BodyGuard,
) -> Result<Bytes, StoreError> {
    read_body_then(what, body, advertised, len_max_bytes, guard, &[]).await
}

/// [`read_body`], then `trailer` appended in the same buffer (an EBS block's
/// checksum, `store/ebs.rs`): no second copy of the block.
pub(super) async fn read_body_then(
    what: &str,
    mut body: impl Chunks,
    advertised: Option<u64>,
    len_max_bytes: u64,
    guard: BodyGuard,
    trailer: &[u8],
) -> Result<Bytes, StoreError> {
    let limit = advertised.unwrap_or(len_max_bytes);
    let mut buf = Assembly::new(advertised.map(|len| len + trailer.len() as u64));
    loop {
        let wait = guard.next_wait(Instant::now()).map_err(|cut| cut.error(what, buf.len() as u64, advertised))?;
        let chunk = match tokio::time::timeout(wait, body.next_chunk()).await {
            Err(_elapsed) => {
                let cut = guard.cut_after_wait(Instant::now());
                return Err(cut.error(what, buf.len() as u64, advertised));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(body_read_failed(what, buf.len(), advertised, &e)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(match advertised {
                Some(len) => StoreError::corrupt(format!("GET {what}: body longer than its Content-Length {len}")),
                None => StoreError::corrupt(format!("GET {what}: body longer than the {len_max_bytes} bytes expected")),
            });
        }
        buf.extend_from_slice(&chunk)?;
        guard
            .check_throughput(Instant::now(), buf.len() as u64)
            .map_err(|cut| cut.error(what, buf.len() as u64, advertised))?;
    }
    check_whole(what, buf.len(), advertised)?;
    buf.extend_from_slice(trailer)?;
    Ok(buf.freeze())
}

/// A body read that broke after `got` bytes (of `advertised`, when known).
fn body_read_failed(what: &str, got: usize, advertised: Option<u64>, e: &dyn std::fmt::Display) -> StoreError {
    let of = advertised.map(|len| format!(" of {len}")).unwrap_or_default();
    StoreError::transient(format!(
        "GET {what}: body read failed after {got}{of} bytes ({e}): connection broke or body truncated; another attempt may pass",
    ))
}

/// A body that ended at `got` bytes is whole: its `Content-Length`, if one
/// was sent, or a truncated body (transient).
fn check_whole(what: &str, got: usize, advertised: Option<u64>) -> Result<(), StoreError> {
    match advertised {
        Some(len) if (got as u64) < len => Err(StoreError::transient(format!(
            "GET {what}: truncated body, {got} of {len} bytes: the connection closed early; another attempt may pass"
        ))),
        _ => Ok(()),
    }
}

/// Where a body's chunks are put together: with a `Content-Length` (already
/// bounded by the caller's maximum), a pooled page-aligned buffer of that
/// size, so the block goes on to the writer (and to `O_DIRECT`) with no
/// further copy; without one, a growing heap buffer.
enum Assembly {
    Pooled(AlignedBuf),
    Heap(BytesMut),
}

impl Assembly {
    fn new(advertised: Option<u64>) -> Self {
        match advertised.and_then(|len| usize::try_from(len).ok()).and_then(|len| BufPool::shared().take(len)) {
            Some(buf) => Assembly::Pooled(buf),
            // Bounded by the caller's maximum, checked before this.
            None => Assembly::Heap(BytesMut::with_capacity(advertised.unwrap_or(0) as usize)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Assembly::Pooled(buf) => buf.len(),
            Assembly::Heap(buf) => buf.len(),
        }
    }

    /// Append a chunk. The caller checked it fits the advertised length, and
    /// the pooled buffer holds at least that.
    fn extend_from_slice(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        match self {
            Assembly::Pooled(buf) => {
                buf.extend_from_slice(chunk).map_err(|e| StoreError::corrupt(format!("body past its length: {e}")))
            }
            Assembly::Heap(buf) => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Assembly::Pooled(buf) => buf.into_bytes(),
            Assembly::Heap(buf) => buf.freeze(),
        }
    }
}

/// The deadlines over one streamed body. Pure: time is passed in, so the
/// rules are unit-tested without sleeping.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyGuard {
    start: Instant,
    deadline: Duration,
    idle: Duration,
    grace: Duration,
    throughput_min_bytes_per_sec: u64,
}

/// Why a body read was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyCut {
    Deadline(Duration),
    Idle(Duration),
    Slow { bytes_per_sec: u64, min_bytes_per_sec: u64 },
}

impl BodyGuard {
    /// How long to wait for the next chunk: the idle timeout, capped by what
    /// is left of the body deadline.
    fn next_wait(&self, now: Instant) -> Result<Duration, BodyCut> {
        let elapsed = now.saturating_duration_since(self.start);
        let left =
            self.deadline.checked_sub(elapsed).filter(|d| !d.is_zero()).ok_or(BodyCut::Deadline(self.deadline))?;
        Ok(left.min(self.idle))
    }

    /// A wait from [`next_wait`](Self::next_wait) expired: which deadline was it.
    fn cut_after_wait(&self, now: Instant) -> BodyCut {
        if now.saturating_duration_since(self.start) >= self.deadline {
            BodyCut::Deadline(self.deadline)
        } else {
            BodyCut::Idle(self.idle)
        }
    }

    /// After the grace period, the average rate since the headers must stay
    /// at or above the floor.
    fn check_throughput(&self, now: Instant, bytes_read: u64) -> Result<(), BodyCut> {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed <= self.grace || self.throughput_min_bytes_per_sec == 0 {
            return Ok(());
        }
        let bytes_per_sec = (bytes_read as f64 / elapsed.as_secs_f64()) as u64;
        if bytes_per_sec < self.throughput_min_bytes_per_sec {
            return Err(BodyCut::Slow { bytes_per_sec, min_bytes_per_sec: self.throughput_min_bytes_per_sec });
        }
        Ok(())
    }
}

impl BodyCut {
    fn error(self, what: &str, bytes_read: u64, advertised: Option<u64>) -> StoreError {
        let of = advertised.map(|len| format!(" of {len}")).unwrap_or_default();
        let why = match self {
            BodyCut::Deadline(d) => format!("body not complete within the {} ms body deadline", d.as_millis()),
            BodyCut::Idle(d) => format!("no body bytes for {} ms (stalled connection)", d.as_millis()),
            BodyCut::Slow { bytes_per_sec, min_bytes_per_sec } => {
                format!("body arriving at {bytes_per_sec} B/s, below the {min_bytes_per_sec} B/s floor (straggler)")
            }
        };
        StoreError::transient(format!("GET {what}: {why} after {bytes_read}{of} bytes; another attempt may be faster"))
    }
}

impl BlockStore for S3Store {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn get_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(self.get_object(key, len_max_bytes))
    }

    fn put_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let object_key = self.object_key(key)?;
            let what = self.describe(&object_key);
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&object_key)
                .content_length(bytes.len() as i64)
                .body(ByteStream::from(bytes))
                .send()
                .await
                .map_err(|e| classify_sdk_error(&format!("PUT {what}"), &e))?;
            Ok(())
        })
    }

    fn exists_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let object_key = self.object_key(key)?;
            let what = self.describe(&object_key);
            match self.client.head_object().bucket(&self.bucket).key(&object_key).send().await {
                Ok(_) => Ok(true),
                // HEAD has no body, so a 404 carries no code: a missing key
                // (or bucket) is simply "not there".
                Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(false),
                Err(e) => Err(classify_sdk_error(&format!("HEAD {what}"), &e)),
            }
        })
    }

    fn list_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        dir: &'a str,
    ) -> BoxFuture<'a, Result<Vec<super::ObjectInfo>, StoreError>> {
        Box::pin(self.list_dir(dir))
    }

    fn delete_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let object_key = self.object_key(key)?;
            let what = self.describe(&object_key);
            match self.client.delete_object().bucket(&self.bucket).key(&object_key).send().await {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 404 => Ok(()),
                Err(e) => Err(classify_sdk_error(&format!("DELETE {what}"), &e)),
            }
        })
    }
}

impl S3Store {
    /// `ListObjectsV2` of the objects directly under `dir` (delimiter `/`),
    /// every page.
    async fn list_dir(&self, dir: &str) -> Result<Vec<super::ObjectInfo>, StoreError> {
        let prefix = format!("{}/", self.object_key(dir.trim_end_matches('/'))?);
        let what = self.describe(&prefix);
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify_sdk_error(&format!("LIST {what}"), &e))?;
            for object in page.contents() {
                let (Some(key), Some(at)) = (object.key(), object.last_modified()) else { continue };
                let modified = std::time::SystemTime::try_from(*at)
                    .map_err(|e| StoreError::transient(format!("LIST {what}: bad LastModified: {e}")))?;
                let name = key.strip_prefix(&prefix).unwrap_or(key).to_owned();
                // A store that ignores the delimiter lists deeper keys too.
                if !name.contains('/') {
                    out.push(super::ObjectInfo { name, modified });
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => return Ok(out),
            }
        }
    }
}

/// S3 error codes that mean "slow down", whatever the status.
const THROTTLE_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded",
    "TransactionInProgressException",
    "EC2ThrottledException",
    "PriorRequestNotComplete",
];

/// S3 error codes that may pass on another attempt, whatever the status.
const TRANSIENT_CODES: &[&str] =
    &["InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException", "IDPCommunicationError"];

/// **The** classification table of S3 answers: an HTTP status (if a response
/// arrived) and an S3 error code (if the body carried one) to a class.
///
/// - throttled: any throttling code (`SlowDown`, `Throttling`, ...), 429, and
///   503 with any or no code: S3 documents 503 as "reduce your request rate",
///   and load balancers in front of S3-compatible stores answer it the same
///   way, so backing off and shrinking concurrency is the right response;
/// - transient: other 5xx, 408 and `RequestTimeout`, `InternalError`; and no
///   response at all (handled by [`classify_sdk_error`]);
/// - permanent: 404 (`NoSuchKey`, `NoSuchBucket`), 403 (`AccessDenied`,
///   signature and clock errors), 400, 401 and every other 4xx: the same
///   request to the same source will get the same answer;
/// - a 2xx/3xx answer that still failed (an unparsable response) is
///   transient. `Corrupt` is never decided from a status: it is a length or
///   content mismatch, decided where the body is read.
pub fn classify(status: Option<u16>, code: Option<&str>) -> ErrorClass {
    if let Some(code) = code {
        if THROTTLE_CODES.contains(&code) {
            return ErrorClass::Throttled;
        }
        if TRANSIENT_CODES.contains(&code) {
            return ErrorClass::Transient;
        }
    }
    match status {
        Some(429 | 503) => ErrorClass::Throttled,
        Some(408) => ErrorClass::Transient,
        Some(400..=499) => ErrorClass::Permanent,
        // 5xx, and answers that failed without an error status.
        Some(_) | None => ErrorClass::Transient,
    }
}

/// What a class means for the block, for error messages.
pub(super) fn meaning(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Throttled => "the store asks us to slow down; back off and retry",
        ErrorClass::Transient => "may pass; retry with backoff",
        ErrorClass::Permanent => "this source will not serve it; try the next source",
        ErrorClass::Corrupt => "the bytes are wrong; try the next source",
    }
}

/// Map an SDK failure to a classified [`StoreError`]: service answers go
/// through [`classify`]; failures without a usable answer by kind:
/// timeouts, I/O and dispatch failures (including credential resolution,
/// which runs at dispatch) are transient; a request that could not even be
/// built (construction failure) or that the HTTP client calls a user error
/// (a malformed endpoint) is permanent, since repeating it builds it the
/// same way.
pub fn classify_sdk_error<E>(what: &str, err: &SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let retry_after = err.raw_response().and_then(|raw| parse_retry_after(raw.headers().get("retry-after")));
    let (class, detail) = match err {
        SdkError::ServiceError(service) => {
            let status = Some(service.raw().status().as_u16());
            let code = service.err().code();
            let class = classify(status, code);
            let status_text = status.map(|s| s.to_string()).unwrap_or_else(|| "no status".into());
            let message = service.err().message().map(|m| format!(" ({m})")).unwrap_or_default();
            (class, format!("HTTP {status_text}, S3 code {}{message}", code.unwrap_or("none")))
        }
        SdkError::ResponseError(response) => {
            let status = Some(response.raw().status().as_u16());
            let class = classify(status, None);
            let status_text = status.map(|s| s.to_string()).unwrap_or_else(|| "no status".into());
            (class, format!("HTTP {status_text}, unreadable response ({})", error_chain(err)))
        }
        SdkError::TimeoutError(_) => (ErrorClass::Transient, "no response within the attempt/operation timeout".into()),
        SdkError::DispatchFailure(dispatch) => {
            let (class, kind) = if dispatch.is_timeout() {
                (ErrorClass::Transient, "connect timeout")
            } else if dispatch.is_io() {
                (ErrorClass::Transient, "connection failed or was reset")
            } else if dispatch.is_user() {
                (ErrorClass::Permanent, "request refused by the HTTP client (bad endpoint or request)")
            } else {
                match dispatch.as_other() {
                    Some(ErrorKind::ThrottlingError) => (ErrorClass::Throttled, "throttled before dispatch"),
                    Some(ErrorKind::ClientError) => (ErrorClass::Permanent, "client error before dispatch"),
                    _ => (ErrorClass::Transient, "dispatch failed (credentials, endpoint or connector)"),
                }
            };
            (class, format!("{kind}: {}", error_chain(err)))
        }
        SdkError::ConstructionFailure(_) => {
            (ErrorClass::Permanent, format!("request could not be built: {}", error_chain(err)))
        }
        _ => (ErrorClass::Transient, format!("unrecognised SDK failure: {}", error_chain(err))),
    };
    let error = StoreError::new(class, format!("{what}: {detail}: {}", meaning(class)));
    if class == ErrorClass::Throttled { error.with_retry_after(retry_after) } else { error }
}

/// An HTTP `Retry-After` given in whole seconds (the form throttling stores
/// send; an HTTP date is ignored, and the fetch stage caps whatever comes).
pub(super) fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// An error and its sources on one line (SDK errors put the useful part in
/// the source chain, e.g. "connection refused").
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    let mut depth = 0;
    while let Some(s) = source {
        if depth == 8 {
            break;
        }
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
        depth += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    #[test]
    fn classification_table() {
        use ErrorClass::*;
        let table: &[(Option<u16>, Option<&str>, ErrorClass)] = &[
            (Some(503), Some("SlowDown"), Throttled),
            (Some(503), None, Throttled),
            (Some(503), Some("ServiceUnavailable"), Transient),
            (Some(429), None, Throttled),
            (Some(400), Some("Throttling"), Throttled),
            (Some(400), Some("ThrottlingException"), Throttled),
            (Some(400), Some("RequestLimitExceeded"), Throttled),
            (Some(429), Some("TooManyRequests"), Throttled),
            (None, Some("SlowDown"), Throttled),
            (Some(500), Some("InternalError"), Transient),
            (Some(500), None, Transient),
            (Some(502), None, Transient),
            (Some(504), None, Transient),
            (Some(400), Some("RequestTimeout"), Transient),
            (Some(408), None, Transient),
            (None, None, Transient),
            (Some(200), None, Transient),
            (Some(404), Some("NoSuchKey"), Permanent),
            (Some(404), Some("NoSuchBucket"), Permanent),
            (Some(404), None, Permanent),
            (Some(403), Some("AccessDenied"), Permanent),
            (Some(403), Some("SignatureDoesNotMatch"), Permanent),
            (Some(400), Some("InvalidArgument"), Permanent),
            (Some(401), None, Permanent),
            (Some(416), Some("InvalidRange"), Permanent),
        ];
        for &(status, code, want) in table {
            assert_eq!(classify(status, code), want, "status {status:?} code {code:?}");
        }
    }

    fn http_response(status: u16) -> Response {
        Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty())
    }

    #[test]
    fn sdk_failures_map_to_classes() {
        type E = SdkError<GetObjectError, Response>;
        let service = |status: u16, code: &str| -> E {
            let meta = ErrorMetadata::builder().code(code).message("msg").build();
            SdkError::service_error(GetObjectError::generic(meta), http_response(status))
        };
        let e = classify_sdk_error("GET s3://b/k", &service(503, "SlowDown"));
        assert_eq!(e.class, ErrorClass::Throttled);
        assert!(
            e.message.contains("GET s3://b/k") && e.message.contains("503") && e.message.contains("SlowDown"),
            "{e}"
        );
        assert_eq!(classify_sdk_error("k", &service(404, "NoSuchKey")).class, ErrorClass::Permanent);
        assert_eq!(classify_sdk_error("k", &service(500, "InternalError")).class, ErrorClass::Transient);
        assert_eq!(classify_sdk_error("k", &service(403, "AccessDenied")).class, ErrorClass::Permanent);

        let timeout: E = SdkError::timeout_error("attempt timeout");
        assert_eq!(classify_sdk_error("k", &timeout).class, ErrorClass::Transient);
        let io: E = SdkError::dispatch_failure(ConnectorError::io("connection reset".into()));
        assert_eq!(classify_sdk_error("k", &io).class, ErrorClass::Transient);
        let connect_timeout: E = SdkError::dispatch_failure(ConnectorError::timeout("connect".into()));
        assert_eq!(classify_sdk_error("k", &connect_timeout).class, ErrorClass::Transient);
        let user: E = SdkError::dispatch_failure(ConnectorError::user("bad uri".into()));
        assert_eq!(classify_sdk_error("k", &user).class, ErrorClass::Permanent);
        let other: E = SdkError::dispatch_failure(ConnectorError::other("no credentials".into(), None));
        assert_eq!(classify_sdk_error("k", &other).class, ErrorClass::Transient);
        let construction: E = SdkError::construction_failure("bad input");
        assert_eq!(classify_sdk_error("k", &construction).class, ErrorClass::Permanent);
        let response: E = SdkError::response_error("garbled xml", http_response(502));
        assert_eq!(classify_sdk_error("k", &response).class, ErrorClass::Transient);
    }

    #[test]
    fn a_throttled_answer_carries_its_retry_after() {
        type E = SdkError<GetObjectError, Response>;
        let answer = |status: u16, code: &str, retry_after: Option<&str>| -> E {
            let mut raw = http_response(status);
            if let Some(value) = retry_after {
                raw.headers_mut().insert("retry-after", value.to_owned());
            }
            let meta = ErrorMetadata::builder().code(code).message("msg").build();
            SdkError::service_error(GetObjectError::generic(meta), raw)
        };
        let e = classify_sdk_error("k", &answer(503, "SlowDown", Some("3")));
        assert_eq!((e.class, e.retry_after()), (ErrorClass::Throttled, Some(Duration::from_secs(3))));
        let e = classify_sdk_error("k", &answer(429, "TooManyRequests", Some(" 1 ")));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(1)));
        // No header, an HTTP date, garbage: no Retry-After.
        for value in [None, Some("Wed, 21 Oct 2026 07:28:00 GMT"), Some("soon")] {
            assert_eq!(classify_sdk_error("k", &answer(503, "SlowDown", value)).retry_after(), None, "{value:?}");
        }
        // Only a throttle carries one.
        assert_eq!(classify_sdk_error("k", &answer(500, "InternalError", Some("3"))).retry_after(), None);
    }

    #[test]
    fn body_guard_rules() {
        let t0 = Instant::now();
        let guard = BodyGuard {
            start: t0,
            deadline: Duration::from_secs(30),
            idle: Duration::from_secs(5),
            grace: Duration::from_secs(2),
            throughput_min_bytes_per_sec: 1 << 20,
        };
        assert_eq!(guard.next_wait(t0), Ok(Duration::from_secs(5)));
        assert_eq!(guard.next_wait(t0 + Duration::from_secs(28)), Ok(Duration::from_secs(2)));
        assert_eq!(guard.next_wait(t0 + Duration::from_secs(30)), Err(BodyCut::Deadline(Duration::from_secs(30))));
        assert_eq!(guard.cut_after_wait(t0 + Duration::from_secs(5)), BodyCut::Idle(Duration::from_secs(5)));
        assert_eq!(guard.cut_after_wait(t0 + Duration::from_secs(31)), BodyCut::Deadline(Duration::from_secs(30)));
        // Within the grace period anything goes; after it, the average rules.
        assert_eq!(guard.check_throughput(t0 + Duration::from_secs(2), 0), Ok(()));
        assert_eq!(guard.check_throughput(t0 + Duration::from_secs(4), 4 << 20), Ok(()));
        assert!(matches!(guard.check_throughput(t0 + Duration::from_secs(4), 1 << 20), Err(BodyCut::Slow { .. })));
        let e = BodyCut::Idle(Duration::from_secs(5)).error("s3://b/k", 10, Some(100));
        assert_eq!(e.class, ErrorClass::Transient);
        assert!(e.message.contains("s3://b/k") && e.message.contains("10 of 100"), "{e}");
    }

    #[tokio::test]
    async fn gets_take_the_signed_path_and_a_wrong_secret_is_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bkt")).unwrap();
        let server = super::super::loopback::LoopbackS3::start(root.path().to_owned()).await.unwrap();
        let store = server.connect_store("bkt", "p").await.unwrap();
        assert!(store.signed_get.is_some(), "a path-style http endpoint is signed here");
        store.put("k", Bytes::from_static(b"block")).await.unwrap();
        assert_eq!(store.get("k", 5).await.unwrap(), Bytes::from_static(b"block"));
        let wrong = StaticCredentials {
            secret_access_key: "wrong".into(),
            ..super::super::loopback::LoopbackS3::credentials()
        };
        let intruder = S3Store::connect_with_static_credentials("bkt", "p", &server.s3_config(), &wrong).await.unwrap();
        assert!(intruder.signed_get.is_some());
        let e = intruder.get("k", 5).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent, "{e}");
        assert!(e.message.contains("HTTP 403, S3 code SignatureDoesNotMatch"), "{e}");
    }

    #[test]
    fn config_defaults_parse_and_validate() {
        let config: S3Config = toml::from_str("endpoint_url = \"http://127.0.0.1:9000\"").unwrap();
        assert_eq!(config.connect_timeout_millis, 3_000);
        config.validate().unwrap();
        assert!(toml::from_str::<S3Config>("no_such_field = 1").is_err());
        let bad = S3Config { operation_timeout_millis: 1, ..S3Config::default() };
        assert!(bad.validate().is_err());
        let bad = S3Config { endpoint_url: Some("127.0.0.1:9000".into()), ..S3Config::default() };
        assert!(bad.validate().is_err());
        assert_eq!(config.receive_buffer_bytes, 2 << 20);
        let kernel = S3Config { receive_buffer_bytes: 0, ..S3Config::default() };
        kernel.validate().unwrap();
        let typo = S3Config { receive_buffer_bytes: 2 << 40, ..S3Config::default() };
        assert!(typo.validate().unwrap_err().contains("s3.receive_buffer_bytes"));
    }
}
