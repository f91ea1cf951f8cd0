//! The S3 store's GET, without the SDK's per-request machinery:
//! [`SignedGet`] signs each GET with SigV4 (`aws-sigv4`, the SDK's own
//! signer) and sends it on a pooled HTTP/1.1 connection of our own
//! (`h1.rs`), whose body goes from the socket straight into a pooled aligned
//! block buffer when its `Content-Length` is known.
//!
//! Why: a GET through the SDK costs about 150 µs of CPU before a byte of the
//! body moves (endpoint rules, config bag, interceptors, signing), 13 % of the
//! process's CPU for 1 MiB blocks and 27 % for 256 KiB ones; the SDK's hyper
//! client then grows a read buffer per connection (fresh pages the kernel
//! zeroes) and hands out chunks that must be copied into the block buffer.
//!
//! What the SDK still decides, once per store: the endpoint (its own rules,
//! `DefaultResolver`, for this bucket, region, FIPS / dual-stack, path-style
//! and the configured or `AWS_ENDPOINT_URL(_S3)` endpoint, exactly as its
//! client reads them), the signing name and region the endpoint names, and
//! the credentials (the loaded config's provider: environment, profile,
//! SSO, process, IMDS/ECS), cached here until shortly before they expire.
//! An endpoint that needs another auth scheme than SigV4 (S3 Express
//! directory buckets, multi-region access points) keeps the SDK's GET.
//!
//! Errors are the SDK path's: the same [`classify`] table by status and the
//! S3 error code read from the XML body, the same messages, `Retry-After` on
//! a throttle; the body is read under the same [`BodyGuard`].

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sdk_s3::config::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::Document;
use bytes::Bytes;

use super::h1::{self, Origin, SendError};
use super::{Assembly, BodyGuard, S3Config, body_read_failed, check_whole, classify, meaning, parse_retry_after};
use crate::error::{ErrorClass, StoreError};
use crate::store::http::ERROR_BODY_MAX_BYTES;

/// Credentials without an expiry are fetched again after this (the SDK's
/// identity cache does the same).
const CREDENTIALS_TTL_DEFAULT: Duration = Duration::from_secs(15 * 60);
/// Credentials are fetched again this long before they expire, so no request
/// is signed with ones that lapse in flight.
const CREDENTIALS_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// A body without a `Content-Length` grows by at most this per read.
const HEAP_READ_BYTES: usize = 256 * 1024;

/// Everything but the key of a signed GET, decided once per store.
#[derive(Debug)]
pub(super) struct SignedGet {
    client: h1::Client,
    /// `Host` header, also the signed one.
    host: String,
    /// The bucket's path on the endpoint (`/bucket` path-style, empty for a
    /// virtual host), already percent-encoded, no trailing `/`.
    base_path: String,
    signing_region: String,
    signing_name: String,
    /// Whether the endpoint wants the path encoded once (S3) or twice.
    double_encode: bool,
    credentials: CredentialCache,
    config: S3Config,
}

impl SignedGet {
    /// The GET path for `bucket` under `sdk_config`, or `None` when the SDK's
    /// GET must stay (no credentials provider, an endpoint that is not
    /// SigV4 over http(s), or one the SDK's own rules refuse: its GET then
    /// reports that error).
    pub(super) async fn new(
        sdk_config: &aws_types::SdkConfig,
        bucket: &str,
        path_style: bool,
        config: &S3Config,
    ) -> Option<SignedGet> {
        let provider = sdk_config.credentials_provider()?;
        let region = sdk_config.region()?.to_string();
        let params = Params::builder()
            .bucket(bucket)
            .region(region.clone())
            .set_use_fips(sdk_config.use_fips())
            .set_use_dual_stack(sdk_config.use_dual_stack())
            .set_endpoint(configured_endpoint(sdk_config))
            .force_path_style(path_style)
            .build()
            .ok()?;
        let endpoint = DefaultResolver::new().resolve_endpoint(&params).await.ok()?;
        // The resolver names its auth schemes in a typed list (older ones
        // in the `authSchemes` property).
        let typed: Vec<Document> = endpoint.auth_schemes().iter().map(|s| s.as_document()).collect();
        let schemes = if typed.is_empty() {
            endpoint.properties().get("authSchemes").cloned()
        } else {
            Some(Document::Array(typed))
        };
        let auth = sigv4_scheme(schemes.as_ref())?;
        let uri: hyper::Uri = endpoint.url().parse().ok()?;
        let tls = match uri.scheme_str()? {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host_in_uri = uri.host()?;
        let host = host_in_uri.trim_start_matches('[').trim_end_matches(']').to_owned();
        if uri.query().is_some() {
            return None;
        }
        let origin = Origin { tls, host, port };
        let host = origin.host_header();
        let client = h1::Client::new(origin, Duration::from_millis(config.connect_timeout_millis))
            .ok()?
            .with_receive_buffer(usize::try_from(config.receive_buffer_bytes).ok().filter(|&n| n > 0));
        Some(SignedGet {
            client,
            host,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            signing_region: auth.region.unwrap_or(region),
            signing_name: auth.name,
            double_encode: auth.double_encode,
            credentials: CredentialCache::new(provider),
            config: config.clone(),
        })
    }

    /// GET `object_key` (`what` names it in errors): the whole object, at most
    /// `len_max_bytes`, under the store's deadlines and body guards.
    pub(super) async fn get(&self, what: &str, object_key: &str, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let operation = Duration::from_millis(self.config.operation_timeout_millis);
        let response = match tokio::time::timeout(operation, self.send(what, object_key, len_max_bytes)).await {
            Ok(sent) => sent?,
            Err(_) => return Err(no_answer(what)),
        };
        let headers_at = Instant::now();
        let mut response = response;
        let status = response.head().status;
        if status != 200 {
            return Err(self.answer_error(what, response).await);
        }
        let advertised = response.head().content_length;
        if let Some(len) = advertised
            && len > len_max_bytes
        {
            return Err(StoreError::corrupt(format!(
                "GET {what}: object is {len} bytes, more than the {len_max_bytes} expected (refused before reading)"
            )));
        }
        let guard = self.config.body_guard(headers_at);
        let body = read_body_into(what, &mut response, advertised, len_max_bytes, guard).await?;
        self.client.release(response);
        Ok(body)
    }

    /// Sign and send; the answer's head within the attempt timeout.
    async fn send(&self, what: &str, object_key: &str, answer_len_bytes: u64) -> Result<h1::Response, StoreError> {
        let identity = self.credentials.identity(what).await?;
        let target = format!("{}/{}", self.base_path, encode_key(object_key));
        let request = self.request_head(&target, &identity).map_err(|e| {
            let class = ErrorClass::Permanent;
            StoreError::new(class, format!("GET {what}: request could not be built: {e}: {}", meaning(class)))
        })?;
        let attempt = Duration::from_millis(self.config.operation_attempt_timeout_millis);
        let sent = tokio::time::timeout(attempt, self.client.send(&request, answer_len_bytes))
            .await
            .map_err(|_| no_answer(what))?;
        sent.map_err(|e| {
            let class = ErrorClass::Transient;
            let detail = match e {
                SendError::Connect(e) | SendError::Io(e) => format!("connection failed or was reset: {e}"),
                SendError::Malformed(e) => format!("no status, unreadable response ({e})"),
            };
            StoreError::new(class, format!("GET {what}: {detail}: {}", meaning(class)))
        })
    }

    /// The whole request head: `GET`, `Host` and the SigV4 headers.
    fn request_head(&self, target: &str, identity: &Identity) -> Result<Vec<u8>, String> {
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode =
            if self.double_encode { PercentEncodingMode::Double } else { PercentEncodingMode::Single };
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(identity)
            .region(&self.signing_region)
            .name(&self.signing_name)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| e.to_string())?
            .into();
        let scheme = if self.client.origin().tls { "https" } else { "http" };
        let uri = format!("{scheme}://{}{target}", self.host);
        let headers = [("host", self.host.as_str())];
        let signable = SignableRequest::new("GET", Cow::Owned(uri), headers.into_iter(), SignableBody::Bytes(&[]))
            .map_err(|e| e.to_string())?;
        let (instructions, _signature) = sign(signable, &params).map_err(|e| e.to_string())?.into_parts();
        let mut head = format!("GET {target} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (name, value) in instructions.headers() {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("user-agent: rehydrate\r\n\r\n");
        Ok(head.into_bytes())
    }

    /// A non-200 answer as the SDK path classifies it: status and the S3
    /// error code of its XML body. A body read to its end lets the
    /// connection go back to the pool.
    async fn answer_error(&self, what: &str, mut response: h1::Response) -> StoreError {
        let head = response.head().clone();
        let idle = Duration::from_millis(self.config.body_idle_timeout_millis);
        let mut body = vec![0; ERROR_BODY_MAX_BYTES];
        let mut filled = 0;
        let read_all = tokio::time::timeout(idle, async {
            while filled < body.len() {
                match response.read(&mut body[filled..]).await {
                    Ok(0) => return true,
                    Ok(n) => filled += n,
                    Err(_) => return false,
                }
            }
            false
        });
        if read_all.await == Ok(true) {
            self.client.release(response);
        }
        let text = String::from_utf8_lossy(&body[..filled]);
        let code = xml_element(&text, "Code");
        let class = classify(Some(head.status), code.as_deref());
        let message = xml_element(&text, "Message").map(|m| format!(" ({m})")).unwrap_or_default();
        let code = code.as_deref().unwrap_or("none");
        let detail = format!("HTTP {}, S3 code {code}{message}", head.status);
        let error = StoreError::new(class, format!("GET {what}: {detail}: {}", meaning(class)));
        if class == ErrorClass::Throttled {
            error.with_retry_after(parse_retry_after(head.retry_after.as_deref()))
        } else {
            error
        }
    }
}

fn no_answer(what: &str) -> StoreError {
    let class = ErrorClass::Transient;
    StoreError::new(class, format!("GET {what}: no response within the attempt/operation timeout: {}", meaning(class)))
}

/// The endpoint URL the SDK's S3 client would use: a service-specific
/// setting (`AWS_ENDPOINT_URL_S3`, a profile's `s3 = endpoint_url`) unless
/// the endpoint was set in code, then the general one (the same precedence
/// as `aws_sdk_s3::config::Builder::from(&SdkConfig)`).
fn configured_endpoint(sdk_config: &aws_types::SdkConfig) -> Option<String> {
    if sdk_config.get_origin("endpoint_url").is_client_config() {
        return sdk_config.endpoint_url().map(str::to_owned);
    }
    let key = aws_types::service_config::ServiceConfigKey::builder()
        .service_id("S3")
        .env("AWS_ENDPOINT_URL")
        .profile("endpoint_url")
        .build()
        .ok();
    let service = key.and_then(|key| sdk_config.service_config().and_then(|conf| conf.load_config(key)));
    service.or_else(|| sdk_config.endpoint_url().map(str::to_owned))
}

/// The SigV4 scheme an endpoint names.
#[derive(Debug, PartialEq, Eq)]
struct AuthScheme {
    name: String,
    region: Option<String>,
    double_encode: bool,
}

/// The endpoint's first auth scheme if it is plain SigV4 (`None` for
/// `sigv4a`, `sigv4-s3express` and the like, which the SDK's GET signs).
fn sigv4_scheme(schemes: Option<&Document>) -> Option<AuthScheme> {
    let Some(Document::Array(schemes)) = schemes else {
        // No auth schemes named: SigV4 for "s3" in the client's region.
        return Some(AuthScheme { name: "s3".into(), region: None, double_encode: false });
    };
    let Document::Object(scheme) = schemes.first()? else { return None };
    let text = |key: &str| match scheme.get(key) {
        Some(Document::String(value)) => Some(value.clone()),
        _ => None,
    };
    if text("name")?.as_str() != "sigv4" {
        return None;
    }
    let disable_double = matches!(scheme.get("disableDoubleEncoding"), Some(Document::Bool(true)));
    Some(AuthScheme {
        name: text("signingName").unwrap_or_else(|| "s3".into()),
        region: text("signingRegion"),
        double_encode: !disable_double,
    })
}

/// An object key as a URI path: every byte but the unreserved ones and `/`
/// percent-encoded (the SDK's greedy label encoding).
fn encode_key(key: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The text of the first `<name>...</name>` in an S3 error body, unescaped.
fn xml_element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    let text = xml[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(text).filter(|t| !t.is_empty())
}

/// Credentials from the config's provider, kept until shortly before they
/// expire; one fetch at a time, the others wait for it.
#[derive(Debug)]
struct CredentialCache {
    provider: SharedCredentialsProvider,
    current: Mutex<Option<(Identity, Instant)>>,
    refresh: tokio::sync::Mutex<()>,
}

impl CredentialCache {
    fn new(provider: SharedCredentialsProvider) -> Self {
        CredentialCache { provider, current: Mutex::new(None), refresh: tokio::sync::Mutex::new(()) }
    }

    fn fresh(&self) -> Option<Identity> {
        let current = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        current.as_ref().filter(|(_, refresh_at)| Instant::now() < *refresh_at).map(|(id, _)| id.clone())
    }

    async fn identity(&self, what: &str) -> Result<Identity, StoreError> {
        if let Some(identity) = self.fresh() {
            return Ok(identity);
        }
        let _one_fetch = self.refresh.lock().await;
        if let Some(identity) = self.fresh() {
            return Ok(identity);
        }
        let credentials = self.provider.provide_credentials().await.map_err(|e| {
            let class = ErrorClass::Transient;
            let chain = super::error_chain(&e);
            StoreError::new(class, format!("GET {what}: dispatch failed (credentials): {chain}: {}", meaning(class)))
        })?;
        let now = Instant::now();
        let refresh_at = match credentials.expiry() {
            Some(expiry) => {
                let left = expiry.duration_since(SystemTime::now()).unwrap_or_default();
                now + left.saturating_sub(CREDENTIALS_REFRESH_BEFORE)
            }
            None => now + CREDENTIALS_TTL_DEFAULT,
        };
        let identity = Identity::from(credentials);
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((identity.clone(), refresh_at));
        Ok(identity)
    }
}

/// Read a whole body under the guard: with a `Content-Length`, from the
/// socket into a pooled aligned buffer of that size; without, into a heap
/// buffer bounded by `len_max_bytes`. The length checks and messages are
/// [`super::read_body`]'s.
async fn read_body_into(
    what: &str,
    response: &mut h1::Response,
    advertised: Option<u64>,
    len_max_bytes: u64,
    guard: BodyGuard,
) -> Result<Bytes, StoreError> {
    let limit = advertised.unwrap_or(len_max_bytes);
    let mut sink = Assembly::new(advertised);
    while advertised != Some(sink.len() as u64) {
        let wait = guard.next_wait(Instant::now()).map_err(|cut| cut.error(what, sink.len() as u64, advertised))?;
        match tokio::time::timeout(wait, sink.read_from(response, limit)).await {
            Err(_elapsed) => {
                let cut = guard.cut_after_wait(Instant::now());
                return Err(cut.error(what, sink.len() as u64, advertised));
            }
            Ok(Ok(0)) => break,
            // Cut short of its Content-Length: the check below says so.
            Ok(Err(e)) if advertised.is_some() && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Ok(Err(e)) => return Err(body_read_failed(what, sink.len(), advertised, &e)),
            Ok(Ok(_)) => {}
        }
        if sink.len() as u64 > limit {
            return Err(StoreError::corrupt(format!(
                "GET {what}: body longer than the {len_max_bytes} bytes expected"
            )));
        }
        guard
            .check_throughput(Instant::now(), sink.len() as u64)
            .map_err(|cut| cut.error(what, sink.len() as u64, advertised))?;
    }
    check_whole(what, sink.len(), advertised)?;
    Ok(sink.freeze())
}

/// The body is read into the same [`Assembly`] `read_body` fills chunk by
/// chunk (a pooled aligned buffer sized to the `Content-Length`, or a heap
/// buffer when none was sent), but straight from the socket.
impl Assembly {
    /// One read of at most `limit - len` bytes; at the limit, one byte more
    /// is asked for, so a body longer than the limit shows.
    async fn read_from(&mut self, response: &mut h1::Response, limit: u64) -> std::io::Result<usize> {
        let len = self.len();
        let room = usize::try_from(limit.saturating_sub(len as u64)).unwrap_or(usize::MAX);
        match self {
            Assembly::Pooled(buf) => {
                // Sized to the Content-Length, which is the limit here.
                let spare = buf.spare_mut();
                let want = room.min(spare.len());
                let n = response.read(&mut spare[..want]).await?;
                buf.set_len(len + n);
                Ok(n)
            }
            Assembly::Heap(buf) => {
                buf.resize(len + room.clamp(1, HEAP_READ_BYTES), 0);
                let read = response.read(&mut buf[len..]).await;
                buf.truncate(len + *read.as_ref().unwrap_or(&0));
                read
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn keys_are_encoded_like_the_sdk() {
        assert_eq!(encode_key("snap/blocks/ab-cd_e.f~g"), "snap/blocks/ab-cd_e.f~g");
        assert_eq!(encode_key("a b+c"), "a%20b%2Bc");
        assert_eq!(encode_key("é/%"), "%C3%A9/%25");
    }

    #[test]
    fn error_bodies_give_code_and_message() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>Please &amp; reduce</Message></Error>";
        assert_eq!(xml_element(xml, "Code").as_deref(), Some("SlowDown"));
        assert_eq!(xml_element(xml, "Message").as_deref(), Some("Please & reduce"));
        assert_eq!(xml_element(xml, "RequestId"), None);
        assert_eq!(xml_element("<html>502 Bad Gateway</html>", "Code"), None);
        assert_eq!(xml_element("<Code></Code>", "Code"), None);
    }

    #[test]
    fn only_plain_sigv4_endpoints_are_signed_here() {
        let scheme = |pairs: &[(&str, Document)]| {
            let object: HashMap<String, Document> = pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
            Document::Array(vec![Document::Object(object)])
        };
        let s = |text: &str| Document::String(text.into());
        let sigv4 = scheme(&[
            ("name", s("sigv4")),
            ("signingName", s("s3")),
            ("signingRegion", s("eu-west-1")),
            ("disableDoubleEncoding", Document::Bool(true)),
        ]);
        let want = AuthScheme { name: "s3".into(), region: Some("eu-west-1".into()), double_encode: false };
        assert_eq!(sigv4_scheme(Some(&sigv4)), Some(want));
        assert_eq!(sigv4_scheme(Some(&scheme(&[("name", s("sigv4-s3express"))]))), None);
        assert_eq!(sigv4_scheme(Some(&scheme(&[("name", s("sigv4a"))]))), None);
        assert!(sigv4_scheme(None).is_some());
    }

    async fn resolved(bucket: &str, endpoint: Option<&str>, path_style: bool) -> Option<SignedGet> {
        let credentials = aws_sdk_s3::config::Credentials::new("id", "secret", None, None, "test");
        let mut sdk_config = aws_types::SdkConfig::builder()
            .region(aws_sdk_s3::config::Region::new("eu-west-1"))
            .credentials_provider(SharedCredentialsProvider::new(credentials));
        if let Some(url) = endpoint {
            sdk_config = sdk_config.endpoint_url(url);
        }
        SignedGet::new(&sdk_config.build(), bucket, path_style, &S3Config::default()).await
    }

    #[tokio::test]
    async fn endpoints_are_the_sdks() {
        let aws = resolved("bkt", None, false).await.unwrap();
        assert_eq!((aws.host.as_str(), aws.base_path.as_str()), ("bkt.s3.eu-west-1.amazonaws.com", ""));
        assert!(aws.client.origin().tls && aws.client.origin().port == 443);
        assert_eq!((aws.signing_name.as_str(), aws.signing_region.as_str()), ("s3", "eu-west-1"));
        let path = resolved("bkt", None, true).await.unwrap();
        assert_eq!((path.host.as_str(), path.base_path.as_str()), ("s3.eu-west-1.amazonaws.com", "/bkt"));
        let local = resolved("bkt", Some("http://127.0.0.1:9000"), true).await.unwrap();
        assert_eq!((local.host.as_str(), local.base_path.as_str()), ("127.0.0.1:9000", "/bkt"));
        assert!(!local.client.origin().tls);
        // S3 Express directory buckets sign with their own scheme: the SDK's GET.
        let express = resolved("dir--euw1-az1--x-s3", None, false).await;
        assert!(express.is_none(), "{express:?}");
    }
}
