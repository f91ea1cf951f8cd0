//! [`LoopbackS3`]: an S3-compatible endpoint inside this process, over real
//! HTTP on `127.0.0.1:<ephemeral port>`, with a fault layer in front.
//!
//! It serves a directory whose subdirectories are buckets (`<root>/<bucket>/
//! <key>`), exactly the [`FileStore`](super::file::FileStore) layout, through
//! `s3s` + `s3s-fs`, so the real `aws-sdk-s3` client (in [`S3Store`](super::s3::S3Store))
//! is tested over real sockets with nothing installed, and `rehydrate demo`
//! can restore from "S3" on embedded defaults. `s3s-fs` keeps its own
//! metadata as dotfiles in `<root>` (beside the buckets, never inside them).
//!
//! [`LoopbackS3::start_static`] serves the same layout as a plain static
//! HTTP host instead (`GET`/`HEAD` of `/<bucket>/<key>`, no signing, like
//! nginx over the directory), for the `http://` store, behind the same fault
//! layer.
//!
//! Requests are signed normally by the client and checked with SigV4 against
//! one fixed key pair ([`LoopbackS3::credentials`]). Path-style addressing
//! only (`/<bucket>/<key>`); [`LoopbackS3::s3_config`] sets it.
//!
//! The fault layer, in order, for each request:
//! 1. record the arrival (instant, method, path) for server-side accounting
//!    (a bounded log: [`ARRIVAL_LOG_MAX`] entries);
//! 2. the optional token-bucket rate limit ([`ServerRateLimit`]), answering
//!    `503 SlowDown` past it, like the nginx fixture on port 9082;
//! 3. the first [`FaultRule`] that matches (method + path) and has uses
//!    left: an error answer ([`Fault::SlowDown`], [`Fault::InternalError`],
//!    [`Fault::NotFound`], [`Fault::AccessDenied`]), a delay ([`Fault::Latency`]) or a body fault on a
//!    successful GET ([`Fault::Stall`], [`Fault::Truncate`],
//!    [`Fault::Corrupt`], [`Fault::Trickle`]).
//!
//! A request no rule matches is forwarded untouched: its body is passed
//! through frame by frame with no copy, so a clean GET costs what `s3s-fs`
//! costs. The server stops when the [`LoopbackS3`] is dropped or
//! [`shutdown`](LoopbackS3::shutdown); stalled bodies end when their client
//! goes away, or after [`STALL_MAX`] at the latest.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::StoreError;
use super::fault::{Fault, FaultMethod, FaultRule};
use super::s3::{S3Config, S3Store, StaticCredentials};

/// The access key the loopback server accepts (not a secret: loopback only).
pub const LOOPBACK_ACCESS_KEY_ID: &str = "rehydrate-loopback";
/// The secret key the loopback server accepts (not a secret: loopback only).
pub const LOOPBACK_SECRET_ACCESS_KEY: &str = "rehydrate-loopback-secret-key";
/// The region clients should sign for.
pub const LOOPBACK_REGION: &str = "us-east-1";
/// At most this many arrivals are kept in the log; later ones are counted
/// but not logged (a few tens of MiB at most).
pub const ARRIVAL_LOG_MAX: usize = 1 << 18;
/// A stalled body is held open at most this long, so a client without a
/// body deadline cannot leak a server task forever.
pub const STALL_MAX: Duration = Duration::from_secs(300);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server-side token bucket: `requests_per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRateLimit {
    pub requests_per_sec: NonZeroU32,
    pub burst: NonZeroU32,
}

impl ServerRateLimit {
    /// The limit as a governor token bucket (GCRA), full at the start.
    fn bucket(self) -> governor::DefaultDirectRateLimiter {
        governor::RateLimiter::direct(self.quota())
    }

    fn quota(self) -> governor::Quota {
        governor::Quota::per_second(self.requests_per_sec).allow_burst(self.burst)
    }
}

/// One request as the server saw it arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub at: Instant,
    pub method: Method,
    pub path: String,
}

#[derive(Debug)]
struct ActiveRule {
    rule: FaultRule,
    uses_left: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Fast path: no lock when no rule is installed.
    faults_present: AtomicBool,
    faults: Mutex<Vec<ActiveRule>>,
    rate_limit: Mutex<Option<governor::DefaultDirectRateLimiter>>,
    arrivals: Mutex<Vec<Arrival>>,
    /// The path of every `503 SlowDown` answered (bounded like `arrivals`).
    slowdown_paths: Mutex<Vec<String>>,
    requests_total: AtomicU64,
    slowdowns_sent: AtomicU64,
    faults_applied: AtomicU64,
}

/// Lock a mutex, recovering from poisoning: the guarded data (counters,
/// rules) stays consistent even if a holder panicked mid-test.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    fn record(&self, method: &Method, path: &str) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let mut arrivals = lock(&self.arrivals);
        if arrivals.len() < ARRIVAL_LOG_MAX {
            arrivals.push(Arrival { at: Instant::now(), method: method.clone(), path: path.to_owned() });
        }
    }

    fn admit(&self) -> bool {
        lock(&self.rate_limit).as_ref().is_none_or(|bucket| bucket.check().is_ok())
    }

    fn slowdown(&self, path: &str) -> Response<LoopbackBody> {
        self.slowdowns_sent.fetch_add(1, Ordering::Relaxed);
        let mut paths = lock(&self.slowdown_paths);
        if paths.len() < ARRIVAL_LOG_MAX {
            paths.push(path.to_owned());
        }
        error_response(StatusCode::SERVICE_UNAVAILABLE, "SlowDown", "Please reduce your request rate.", path)
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<Fault> {
        if !self.faults_present.load(Ordering::Acquire) {
            return None;
        }
        let mut faults = lock(&self.faults);
        let active =
            faults.iter_mut().find(|a| a.uses_left != Some(0) && a.rule.matches(FaultMethod::of_http(method), path))?;
        if let Some(n) = active.uses_left.as_mut() {
            *n -= 1;
        }
        self.faults_applied.fetch_add(1, Ordering::Relaxed);
        Some(active.rule.fault.clone())
    }
}

/// An in-process S3 endpoint with a fault layer. See the module docs.
pub struct LoopbackS3 {
    addr: SocketAddr,
    root: PathBuf,
    state: Arc<State>,
    /// `None` once shut down.
    server: Option<JoinHandle<()>>,
}

impl fmt::Debug for LoopbackS3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopbackS3").field("addr", &self.addr).field("root", &self.root).finish_non_exhaustive()
    }
}

impl LoopbackS3 {
    /// Serve `root` (an existing directory; each subdirectory is a bucket) on
    /// an ephemeral loopback port. Spawns on the current tokio runtime.
    pub async fn start(root: PathBuf) -> io::Result<LoopbackS3> {
        let fs = s3s_fs::FileSystem::new(&root).map_err(|e| io::Error::other(format!("{}: {e:?}", root.display())))?;
        let s3 = {
            let mut builder = s3s::service::S3ServiceBuilder::new(fs);
            builder.set_auth(s3s::auth::SimpleAuth::from_single(LOOPBACK_ACCESS_KEY_ID, LOOPBACK_SECRET_ACCESS_KEY));
            builder.build()
        };
        Self::serve_origin(root, Origin::S3(s3)).await
    }

    /// Serve `root` as a static HTTP host (`GET`/`HEAD` `/<bucket>/<key>`
    /// answer the file `<root>/<bucket>/<key>`), behind the fault layer.
    pub async fn start_static(root: PathBuf) -> io::Result<LoopbackS3> {
        Self::serve_origin(root.clone(), Origin::Static(root)).await
    }

    async fn serve_origin(root: PathBuf, origin: Origin) -> io::Result<LoopbackS3> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let service = FaultService { inner: origin, state: state.clone() };
        let server = tokio::spawn(serve(listener, service));
        Ok(LoopbackS3 { addr, root, state, server: Some(server) })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The directory served.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// The only credentials this server accepts.
    pub fn credentials() -> StaticCredentials {
        StaticCredentials {
            access_key_id: LOOPBACK_ACCESS_KEY_ID.to_owned(),
            secret_access_key: LOOPBACK_SECRET_ACCESS_KEY.to_owned(),
        }
    }

    /// An [`S3Config`] pointed at this server (endpoint, region, path
    /// style), other fields at their defaults.
    pub fn s3_config(&self) -> S3Config {
        S3Config {
            endpoint_url: Some(self.endpoint_url()),
            region: Some(LOOPBACK_REGION.to_owned()),
            force_path_style: Some(true),
            ..S3Config::default()
        }
    }

    /// An [`S3Store`] on `s3://<bucket>/<prefix>` of this server, with the
    /// default deadlines of [`S3Config`] and the loopback credentials.
    pub async fn connect_store(&self, bucket: &str, prefix: &str) -> Result<S3Store, StoreError> {
        S3Store::connect_with_static_credentials(bucket, prefix, &self.s3_config(), &Self::credentials()).await
    }

    pub fn add_fault(&self, rule: FaultRule) {
        let mut faults = lock(&self.state.faults);
        faults.push(ActiveRule { uses_left: rule.times, rule });
        self.state.faults_present.store(true, Ordering::Release);
    }

    pub fn clear_faults(&self) {
        let mut faults = lock(&self.state.faults);
        faults.clear();
        self.state.faults_present.store(false, Ordering::Release);
    }

    /// Install (or, with `None`, remove) the server-side rate limit. The
    /// bucket starts full.
    pub fn set_rate_limit(&self, limit: Option<ServerRateLimit>) {
        *lock(&self.state.rate_limit) = limit.map(ServerRateLimit::bucket);
    }

    /// Requests whose path contains `path_substring` (logged arrivals only).
    pub fn requests(&self, path_substring: &str) -> u64 {
        lock(&self.state.arrivals).iter().filter(|a| a.path.contains(path_substring)).count() as u64
    }

    /// Every request received, logged or not.
    pub fn requests_total(&self) -> u64 {
        self.state.requests_total.load(Ordering::Relaxed)
    }

    /// `503 SlowDown` answers sent (rate limit and [`Fault::SlowDown`]).
    pub fn slowdowns_sent(&self) -> u64 {
        self.state.slowdowns_sent.load(Ordering::Relaxed)
    }

    /// `503 SlowDown` answers sent for paths containing `path_substring`
    /// (logged ones only, like [`Self::requests`]).
    pub fn slowdowns(&self, path_substring: &str) -> u64 {
        lock(&self.state.slowdown_paths).iter().filter(|p| p.contains(path_substring)).count() as u64
    }

    /// Fault rules applied so far.
    pub fn faults_applied(&self) -> u64 {
        self.state.faults_applied.load(Ordering::Relaxed)
    }

    /// A copy of the arrival log, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.state.arrivals).clone()
    }

    /// Forget the arrival log and counters (rules and rate limit stay).
    pub fn reset_stats(&self) {
        lock(&self.state.arrivals).clear();
        lock(&self.state.slowdown_paths).clear();
        self.state.requests_total.store(0, Ordering::Relaxed);
        self.state.slowdowns_sent.store(0, Ordering::Relaxed);
        self.state.faults_applied.store(0, Ordering::Relaxed);
    }

    /// Stop serving and wait for the server task to end. Open connections
    /// are dropped.
    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            // Cancelled is the expected outcome; nothing else to report.
            let _ = server.await;
        }
    }
}

impl Drop for LoopbackS3 {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every
        // connection task with it.
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The largest number of arrivals inside any window of length `window`
/// (arrivals sorted by time, as the log is). For asserting, at the server,
/// that a client-side rate limit was never exceeded.
pub fn max_arrivals_in_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..arrivals.len() {
        while arrivals[end].saturating_duration_since(arrivals[start]) >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

async fn serve(listener: TcpListener, service: FaultService) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Small responses (errors, HEAD) should not wait on Nagle.
                    let _ = stream.set_nodelay(true);
                    let service = service.clone();
                    connections.spawn(async move {
                        let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                        // A client hanging up mid-body is normal here (faults).
                        let _ = conn.await;
                    });
                }
                // Out of file descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// What answers behind the fault layer.
#[derive(Clone)]
enum Origin {
    S3(s3s::service::S3Service),
    /// A static host over this directory.
    Static(PathBuf),
}

impl Origin {
    async fn call(&self, req: Request<Incoming>) -> Result<Response<s3s::Body>, String> {
        match self {
            Origin::S3(s3) => hyper::service::Service::call(s3, req).await.map_err(|e| format!("s3s failed: {e:?}")),
            Origin::Static(root) => Ok(serve_static(root, req.method(), req.uri().path()).await),
        }
    }
}

/// A static host's answer: the file under `root` at `path`, 404 when there
/// is none (or the path would leave `root`), 405 for anything but GET/HEAD.
async fn serve_static(root: &std::path::Path, method: &Method, path: &str) -> Response<s3s::Body> {
    let status = |code: StatusCode| {
        let mut response = Response::new(s3s::Body::empty());
        *response.status_mut() = code;
        response.headers_mut().insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(0));
        response
    };
    if method != Method::GET && method != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let relative = path.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
        return status(StatusCode::NOT_FOUND);
    }
    let Ok(bytes) = tokio::fs::read(root.join(relative)).await else {
        return status(StatusCode::NOT_FOUND);
    };
    let len = bytes.len();
    let body = if method == Method::GET { s3s::Body::from(Bytes::from(bytes)) } else { s3s::Body::empty() };
    let mut response = Response::new(body);
    response.headers_mut().insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(len));
    response
}

/// The hyper service: the fault layer around the origin (`s3s`, or a static host).
#[derive(Clone)]
struct FaultService {
    inner: Origin,
    state: Arc<State>,
}

/// Response bodies of the loopback server.
type LoopbackBody = UnsyncBoxBody<Bytes, BoxError>;

impl hyper::service::Service<Request<Incoming>> for FaultService {
    type Response = Response<LoopbackBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl FaultService {
    async fn handle(&self, req: Request<Incoming>) -> Response<LoopbackBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        self.state.record(&method, &path);
        if !self.state.admit() {
            return self.state.slowdown(&path);
        }
        let fault = self.state.take_fault(&method, &path).map(over_http);
        match fault {
            Some(Fault::SlowDown) => return self.state.slowdown(&path),
            Some(Fault::InternalError) => {
                return error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                    &path,
                );
            }
            Some(Fault::NotFound) => {
                return error_response(StatusCode::NOT_FOUND, "NoSuchKey", "The specified key does not exist.", &path);
            }
            Some(Fault::AccessDenied) => {
                return error_response(StatusCode::FORBIDDEN, "AccessDenied", "Access Denied", &path);
            }
            Some(Fault::Latency(delay)) => tokio::time::sleep(delay).await,
            _ => {}
        }
        let response = match self.inner.call(req).await {
            Ok(response) => response,
            Err(message) => {
                return error_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", &message, &path);
            }
        };
        let body_fault = fault.filter(|_| method == Method::GET && response.status().is_success());
        match body_fault {
            Some(fault @ (Fault::Stall { .. } | Fault::Truncate { .. } | Fault::Corrupt | Fault::Trickle { .. })) => {
                response.map(|body| shape_body(body, fault))
            }
            _ => response.map(|body| body.boxed_unsync()),
        }
    }
}

/// A [`Fault::Fail`] as the HTTP answer of its class; other faults as they are.
fn over_http(fault: Fault) -> Fault {
    match fault {
        Fault::Fail(e) => match e.class {
            crate::error::ErrorClass::Throttled => Fault::SlowDown,
            crate::error::ErrorClass::Transient => Fault::InternalError,
            crate::error::ErrorClass::Permanent => Fault::NotFound,
            crate::error::ErrorClass::Corrupt => Fault::Corrupt,
        },
        other => other,
    }
}

fn error_response(status: StatusCode, code: &str, message: &str, resource: &str) -> Response<LoopbackBody> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>loopback</RequestId></Error>",
        xml_escape(message),
        xml_escape(resource)
    );
    let len = xml.len();
    let body = http_body_util::Full::new(Bytes::from(xml)).map_err(|never| match never {}).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/xml"));
    headers.insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(len));
    response
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A body fed by a task that reshapes the real one (stall, truncate, corrupt,
/// trickle). The channel is small: the task runs at most a few chunks ahead.
fn shape_body(body: s3s::Body, fault: Fault) -> LoopbackBody {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(shape(Box::pin(body), fault, tx));
    ChannelBody { rx }.boxed_unsync()
}

type Chunks = mpsc::Sender<Result<Bytes, BoxError>>;

async fn shape(mut body: Pin<Box<s3s::Body>>, fault: Fault, tx: Chunks) {
    let mut sent: u64 = 0;
    let mut corrupted = false;
    while let Some(frame) = body.frame().await {
        let mut data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        match fault {
            Fault::Stall { after_bytes: bytes } | Fault::Truncate { bytes } => {
                let room = bytes.saturating_sub(sent);
                if room < data.len() as u64 {
                    data.truncate(room as usize);
                    if !data.is_empty() && tx.send(Ok(data)).await.is_err() {
                        return;
                    }
                    break;
                }
            }
            Fault::Corrupt if !corrupted && !data.is_empty() => {
                let mut copy = BytesMut::from(&data[..]);
                copy[0] ^= 0xff;
                data = copy.freeze();
                corrupted = true;
            }
            Fault::Trickle { bytes_per_sec } => {
                if trickle(&tx, data, bytes_per_sec).await.is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }
        sent += data.len() as u64;
        if tx.send(Ok(data)).await.is_err() {
            return; // the client went away
        }
    }
    if let Fault::Stall { .. } = fault {
        // Hold the response open without another byte until the client
        // gives up (its body deadline) or the cap passes.
        tokio::select! {
            _ = tx.closed() => {}
            _ = tokio::time::sleep(STALL_MAX) => {}
        }
    }
    // Truncate: dropping the sender ends the body short of its
    // Content-Length, and hyper closes the connection.
}

/// Send `data` in pieces of a twentieth of a second's worth each.
async fn trickle(tx: &Chunks, mut data: Bytes, bytes_per_sec: NonZeroU32) -> Result<(), ()> {
    let piece = (bytes_per_sec.get() as usize / 20).max(1);
    let pause = Duration::from_secs_f64(piece as f64 / f64::from(bytes_per_sec.get()));
    while !data.is_empty() {
        let chunk = data.split_to(piece.min(data.len()));
        tx.send(Ok(chunk)).await.map_err(|_| ())?;
        tokio::time::sleep(pause).await;
    }
    Ok(())
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|item| item.map(|result| result.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let limit =
            ServerRateLimit { requests_per_sec: NonZeroU32::new(10).unwrap(), burst: NonZeroU32::new(3).unwrap() };
        let clock = governor::clock::FakeRelativeClock::default();
        let bucket = governor::RateLimiter::direct_with_clock(limit.quota(), clock.clone());
        assert_eq!((0..5).filter(|_| bucket.check().is_ok()).count(), 3);
        clock.advance(Duration::from_millis(50));
        assert!(bucket.check().is_err());
        clock.advance(Duration::from_millis(100));
        assert!(bucket.check().is_ok());
        // Refill never exceeds the burst.
        clock.advance(Duration::from_secs(60));
        assert_eq!((0..10).filter(|_| bucket.check().is_ok()).count(), 3);
    }

    #[test]
    fn rules_match_in_order_and_run_out() {
        let state = State::default();
        assert_eq!(state.take_fault(&Method::GET, "/b/k"), None);
        lock(&state.faults).push(ActiveRule {
            rule: FaultRule::new(Fault::NotFound).path_contains("k1").method(FaultMethod::Get).first(1),
            uses_left: Some(1),
        });
        lock(&state.faults)
            .push(ActiveRule { rule: FaultRule::new(Fault::SlowDown).path_ends_with("1"), uses_left: None });
        state.faults_present.store(true, Ordering::Release);
        assert_eq!(state.take_fault(&Method::HEAD, "/b/k1"), Some(Fault::SlowDown));
        assert_eq!(state.take_fault(&Method::GET, "/b/k1"), Some(Fault::NotFound));
        assert_eq!(state.take_fault(&Method::GET, "/b/k1"), Some(Fault::SlowDown));
        assert_eq!(state.take_fault(&Method::GET, "/b/k2"), None);
    }

    #[test]
    fn window_counting() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let arrivals = [at(0), at(10), at(20), at(500), at(990), at(1000), at(1005)];
        // [10, 1005] spans 995 ms.
        assert_eq!(max_arrivals_in_window(&arrivals, Duration::from_secs(1)), 6);
        assert_eq!(max_arrivals_in_window(&arrivals, Duration::from_millis(30)), 3);
        assert_eq!(max_arrivals_in_window(&[], Duration::from_secs(1)), 0);
    }
}
