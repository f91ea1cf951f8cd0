//! `http://` and `https://` stores: [`HttpStore`], a read-only [`BlockStore`]
//! over any static S3-style host (nginx over a snapshot directory, a CDN, a
//! peer worker's `/v1/blocks`).
//!
//! In: object keys under a base URL. `get` is `GET <base>/<key>`, `exists`
//! is `HEAD <base>/<key>`; `put` is refused (permanent): snapshots are
//! written to `file://` or `s3://` stores. Out: whole objects as [`Bytes`],
//! or a [`StoreError`] classified here, with the S3 store's table
//! ([`super::s3::classify`] by status): 404 and other 4xx permanent, 429 and
//! 503 throttled (with their `Retry-After`), other 5xx and failures without
//! an answer transient.
//!
//! Deadlines and body guards are the S3 store's, from the same [`S3Config`]
//! keys (`[s3]` or the `[[store]]` entry of the URL): connect timeout,
//! headers within `operation_attempt_timeout_millis`, and the body read
//! chunk by chunk under the whole-body deadline, the idle timeout and the
//! throughput floor ([`super::s3::read_body`]). A `Content-Length` above the
//! caller's bound is refused as corrupt before the body is read; a longer
//! body is corrupt, a shorter one transient (truncated in flight). The
//! endpoint-only keys (`endpoint_url`, `region`, `force_path_style`,
//! `profile`) do not apply. Rate limits, adaptive limits and hedging come
//! from `store::stack`, as for every remote store.
//!
//! The connection pool keeps connections open between requests: an error
//! answer's small body is read (up to [`ERROR_BODY_MAX_BYTES`]) so its
//! connection goes back to the pool, which matters for a peer answering
//! many 404s. `https://` uses rustls with the system's root certificates.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::s3::{Chunks, S3Config, classify, error_chain, meaning, parse_retry_after, read_body};
use super::{BlockStore, BoxFuture, RequestContext, StoreError, StoreUrl};
use crate::error::ErrorClass;

/// An error answer's body is read up to this, so the connection is reused.
pub const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
/// A pooled connection idle this long is closed.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Keys longer than this are refused (S3's own key limit).
const KEY_LEN_MAX_BYTES: usize = 1024;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// A read-only store over `GET`/`HEAD` of `<base>/<key>`.
pub struct HttpStore {
    client: Client<Connector, Empty<Bytes>>,
    base: String,
    url: StoreUrl,
    config: S3Config,
    /// Sent as `Authorization: Bearer <token>` (a peer worker's token).
    bearer: Option<String>,
}

impl std::fmt::Debug for HttpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("HttpStore").field("base", &self.base).finish_non_exhaustive()
    }
}

impl HttpStore {
    /// A store at `url` (an [`StoreUrl::Http`]) with the deadlines and body
    /// guards of `config`, sending `bearer` as a bearer token when given. No
    /// request is sent: an unreachable host shows on the first call.
    pub fn new(url: &StoreUrl, config: &S3Config, bearer: Option<String>) -> Result<HttpStore, StoreError> {
        let StoreUrl::Http { base } = url else {
            return Err(StoreError::permanent(format!("{url} is not an http:// or https:// URL")));
        };
        config.validate().map_err(StoreError::permanent)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_millis)));
        http.set_nodelay(true);
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let roots = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| StoreError::permanent(format!("{url}: no usable system root certificates: {e}")))?;
        let connector = roots.https_or_http().enable_http1().wrap_connector(http);
        // Idle connections are dropped before a server's own idle timeout
        // would close them under a request (the worker API closes at 10 s).
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Ok(HttpStore { client, base: base.clone(), url: url.clone(), config: config.clone(), bearer })
    }

    /// The URL of `key`, refusing keys that would leave the base.
    fn object_url(&self, key: &str) -> Result<String, StoreError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/');
        let valid = !key.is_empty()
            && key.len() <= KEY_LEN_MAX_BYTES
            && key.bytes().all(allowed)
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            return Err(StoreError::permanent(format!("{}: invalid object key {key:?}", self.url)));
        }
        Ok(format!("{}/{key}", self.base))
    }

    /// Send one request; its answer's headers within the attempt timeout.
    async fn send(&self, method: Method, url: &str) -> Result<Response<Incoming>, StoreError> {
        let what = format!("{method} {url}");
        let mut request = Request::builder().method(method).uri(url);
        if let Some(token) = &self.bearer {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request =
            request.body(Empty::new()).map_err(|e| StoreError::permanent(format!("{what}: bad request: {e}")))?;
        let headers_within = Duration::from_millis(self.config.operation_attempt_timeout_millis);
        match tokio::time::timeout(headers_within, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => {
                let kind = if e.is_connect() { "connect failed" } else { "connection failed or was reset" };
                let class = ErrorClass::Transient;
                Err(StoreError::new(class, format!("{what}: {kind}: {}: {}", error_chain(&e), meaning(class))))
            }
            Err(_) => Err(StoreError::transient(format!(
                "{what}: no response headers within {} ms: {}",
                headers_within.as_millis(),
                meaning(ErrorClass::Transient)
            ))),
        }
    }

    async fn get_object(&self, key: &str, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let url = self.object_url(key)?;
        let response = self.send(Method::GET, &url).await?;
        let headers_at = Instant::now();
        if response.status() != StatusCode::OK {
            return Err(self.answer_error("GET", &url, response).await);
        }
        let advertised = content_length(&response)
            .map_err(|e| StoreError::transient(format!("GET {url}: {e}: another attempt may pass")))?;
        if let Some(len) = advertised
            && len > len_max_bytes
        {
            return Err(StoreError::corrupt(format!(
                "GET {url}: object is {len} bytes, more than the {len_max_bytes} expected (refused before reading)"
            )));
        }
        let body = IncomingChunks(response.into_body());
        read_body(&url, body, advertised, len_max_bytes, self.config.body_guard(headers_at)).await
    }

    /// A non-200 answer as a classified error; its small body is read so
    /// the connection goes back to the pool.
    async fn answer_error(&self, method: &str, url: &str, response: Response<Incoming>) -> StoreError {
        let status = response.status().as_u16();
        let retry_after = parse_retry_after(response.headers().get("retry-after").and_then(|v| v.to_str().ok()));
        let class = classify(Some(status), None);
        let small = content_length(&response).ok().flatten().is_some_and(|len| len <= ERROR_BODY_MAX_BYTES as u64);
        if small {
            let idle = Duration::from_millis(self.config.body_idle_timeout_millis);
            let _ = tokio::time::timeout(idle, response.into_body().collect()).await;
        }
        let error = StoreError::new(class, format!("{method} {url}: HTTP {status}: {}", meaning(class)));
        if class == ErrorClass::Throttled { error.with_retry_after(retry_after) } else { error }
    }

    async fn head_object(&self, key: &str) -> Result<bool, StoreError> {
        let url = self.object_url(key)?;
        let response = self.send(Method::HEAD, &url).await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.answer_error("HEAD", &url, response).await),
        }
    }
}

/// The `Content-Length` header, if any; a malformed one is an error.
fn content_length(response: &Response<Incoming>) -> Result<Option<u64>, String> {
    let Some(value) = response.headers().get(hyper::header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| "unreadable Content-Length".to_owned())?;
    text.trim().parse::<u64>().map(Some).map_err(|_| format!("malformed Content-Length {text:?}"))
}

/// hyper's body as [`Chunks`]: data frames, trailers skipped.
struct IncomingChunks(Incoming);

impl Chunks for IncomingChunks {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            match self.0.frame().await? {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => return Some(Ok(data)),
                    Err(_trailers) => continue,
                },
                Err(e) => return Some(Err(error_chain(&e))),
            }
        }
    }
}

impl BlockStore for HttpStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn get_for<'a>(
        &'a self,
        _ctx: &'a RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(self.get_object(key, len_max_bytes))
    }

    fn put_for<'a>(
        &'a self,
        _ctx: &'a RequestContext,
        key: &'a str,
        _: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // The key is checked first, so a bad one is named as such.
            self.object_url(key)?;
            Err(StoreError::permanent(format!(
                "{}: an http store is read-only (PUT {key} refused): write snapshots to a file:// or s3:// store",
                self.url
            )))
        })
    }

    fn exists_for<'a>(&'a self, _ctx: &'a RequestContext, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.head_object(key))
    }
}
