//! [`EbsServer`]: the read half of the EBS direct APIs inside this process,
//! over real HTTP on `127.0.0.1:<ephemeral port>`, with a fault layer.
//!
//! It serves snapshots made from image files (each non-zero 512 KiB block of
//! the file is a stored block, as `coldsnap upload --omit-zero-blocks` would
//! store it) the way the service answers (`INTEROP.md`):
//! `GET /snapshots/{id}/blocks` (`ListSnapshotBlocks`: sorted, paged by
//! `maxResults` and `pageToken`, `startingBlockIndex`, integer `BlockIndex`,
//! `BlockSize`, `VolumeSize` in GiB, `ExpiryTime`) and
//! `GET /snapshots/{id}/blocks/{index}?blockToken=` (`GetSnapshotBlock`: the
//! bytes with `x-amz-Checksum` (base64 SHA-256), `x-amz-Checksum-Algorithm`,
//! `x-amz-Data-Length`). An unknown snapshot is `404`
//! `ResourceNotFoundException`; a token of an older generation is `400`
//! `ValidationException` `INVALID_BLOCK_TOKEN`. Requests are not
//! authenticated (any signature passes): it is a test and benchmark fixture,
//! bound to loopback.
//!
//! Faults, for each `GetSnapshotBlock` (rules matched on the request path,
//! `/snapshots/<id>/blocks/<index>`, as [`FaultRule`] says): `SlowDown` is
//! `400 RequestThrottledException`, `InternalError` `500
//! InternalServerException`, `NotFound` `404 ResourceNotFoundException`,
//! `Latency` a delay, `Stall` headers and part of the body then nothing,
//! `Truncate` a short body, `Corrupt` a flipped first byte under the true
//! checksum. [`EbsServer::expire_tokens_at_get`] makes every token listed so
//! far invalid when the n-th block request arrives.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::fault::{Fault, FaultMethod, FaultRule};

/// The EBS block size: always 512 KiB.
pub const EBS_BLOCK_SIZE_BYTES: u32 = 512 * 1024;
/// A stalled body is held open at most this long.
const STALL_MAX: Duration = Duration::from_secs(300);
/// How long listed tokens say they live (the service: seven days).
const TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One served snapshot: an image file and its stored blocks.
#[derive(Debug)]
struct Snap {
    file: std::fs::File,
    volume_size_gib: u64,
    /// Stored blocks, ascending, with the SHA-256 of each.
    blocks: Vec<(u64, [u8; 32])>,
}

#[derive(Debug, Default)]
struct ServerState {
    snaps: Mutex<HashMap<String, Arc<Snap>>>,
    rules: Mutex<Vec<(FaultRule, Option<u64>)>>,
    /// Tokens carry the generation they were listed in; older ones are refused.
    generation: AtomicU64,
    /// Bump the generation when this many block requests have arrived (0: never).
    expire_at_get: AtomicU64,
    gets: AtomicU64,
    /// Block requests per block index.
    gets_by_block: Mutex<HashMap<u64, u64>>,
    lists: AtomicU64,
    refused_tokens: AtomicU64,
    /// The largest page served, whatever `maxResults` asks (0: no cap).
    page_blocks_max: AtomicU64,
}

/// An in-process EBS direct APIs endpoint. See the module docs.
#[derive(Debug)]
pub struct EbsServer {
    addr: std::net::SocketAddr,
    state: Arc<ServerState>,
    server: Option<JoinHandle<()>>,
}

impl EbsServer {
    /// Serve on an ephemeral loopback port (`port` 0) or a given one; spawns
    /// on the current tokio runtime.
    pub async fn start(port: u16) -> std::io::Result<EbsServer> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ServerState::default());
        let app = Router::new()
            .route("/snapshots/{id}/blocks", axum::routing::get(list_blocks))
            .route("/snapshots/{id}/blocks/{index}", axum::routing::get(get_block))
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(EbsServer { addr, state, server: Some(server) })
    }

    /// `http://127.0.0.1:<port>`: the `AWS_ENDPOINT_URL` of clients.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serve `image` as snapshot `snapshot_id`: its size rounded up to whole
    /// GiB is the volume, its non-zero 512 KiB blocks the stored ones.
    pub fn add_snapshot(&self, snapshot_id: &str, image: &Path) -> std::io::Result<()> {
        let file = std::fs::File::open(image)?;
        let len_bytes = file.metadata()?.len();
        let volume_size_gib = len_bytes.div_ceil(1 << 30).max(1);
        let mut blocks = Vec::new();
        let mut buf = vec![0u8; EBS_BLOCK_SIZE_BYTES as usize];
        for index in 0..len_bytes.div_ceil(u64::from(EBS_BLOCK_SIZE_BYTES)) {
            read_block(&file, index, &mut buf)?;
            if !crate::block::is_zero(&buf) {
                blocks.push((index, crate::block::HashAlgorithm::Sha256.hash(&buf).0));
            }
        }
        let snap = Arc::new(Snap { file, volume_size_gib, blocks });
        self.state.snaps.lock().unwrap_or_else(|e| e.into_inner()).insert(snapshot_id.to_owned(), snap);
        Ok(())
    }

    /// Apply `rule` to block requests (first match with uses left wins).
    pub fn add_fault(&self, rule: FaultRule) {
        let uses = rule.times;
        self.state.rules.lock().unwrap_or_else(|e| e.into_inner()).push((rule, uses));
    }

    /// Every token listed so far stops working when the `n`-th block request
    /// (from 1) arrives: that request and later ones with old tokens get
    /// `INVALID_BLOCK_TOKEN`.
    pub fn expire_tokens_at_get(&self, n: u64) {
        self.state.expire_at_get.store(n, Ordering::SeqCst);
    }

    /// Serve list pages of at most `n` blocks (the service: up to 10,000).
    pub fn set_page_blocks_max(&self, n: u64) {
        self.state.page_blocks_max.store(n, Ordering::SeqCst);
    }

    /// `GetSnapshotBlock` requests received.
    pub fn block_requests(&self) -> u64 {
        self.state.gets.load(Ordering::SeqCst)
    }

    /// `GetSnapshotBlock` requests received for block `index`.
    pub fn block_requests_of(&self, index: u64) -> u64 {
        self.state.gets_by_block.lock().unwrap_or_else(|e| e.into_inner()).get(&index).copied().unwrap_or(0)
    }

    /// Forget the per-block request counts.
    pub fn reset_block_requests(&self) {
        self.state.gets_by_block.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// `ListSnapshotBlocks` requests received.
    pub fn list_requests(&self) -> u64 {
        self.state.lists.load(Ordering::SeqCst)
    }

    /// Block requests refused for an old token.
    pub fn refused_tokens(&self) -> u64 {
        self.state.refused_tokens.load(Ordering::SeqCst)
    }
}

impl Drop for EbsServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn read_block(file: &std::fs::File, index: u64, buf: &mut [u8]) -> std::io::Result<()> {
    buf.fill(0);
    let offset = index * u64::from(EBS_BLOCK_SIZE_BYTES);
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64)? {
            0 => break, // past the end of the image: zeros
            n => done += n,
        }
    }
    Ok(())
}

/// An error answer as the service gives it (`x-amzn-ErrorType`, JSON body).
fn error(status: StatusCode, code: &str, message: &str, reason: Option<&str>) -> Response {
    let mut body = serde_json::json!({ "message": message });
    if let Some(reason) = reason {
        body["Reason"] = serde_json::Value::from(reason);
    }
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert("x-amzn-ErrorType", HeaderValue::from_str(code).unwrap_or(HeaderValue::from_static("Unknown")));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn no_snapshot(id: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFoundException",
        &format!("The snapshot '{id}' does not exist."),
        Some("SNAPSHOT_NOT_FOUND"),
    )
}

impl ServerState {
    fn snap(&self, id: &str) -> Option<Arc<Snap>> {
        self.snaps.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        let (rule, uses) = rules.iter_mut().find(|(r, uses)| *uses != Some(0) && r.matches(FaultMethod::Get, path))?;
        if let Some(n) = uses.as_mut() {
            *n -= 1;
        }
        Some(rule.fault.clone())
    }
}

async fn list_blocks(
    State(state): State<Arc<ServerState>>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    state.lists.fetch_add(1, Ordering::SeqCst);
    let Some(snap) = state.snap(&id) else { return no_snapshot(&id) };
    let start: u64 = match (query.get("pageToken"), query.get("startingBlockIndex")) {
        (Some(token), _) => match token.strip_prefix('N').and_then(|n| n.parse().ok()) {
            Some(n) => n,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "ValidationException",
                    "bad page token",
                    Some("INVALID_PAGE_TOKEN"),
                );
            }
        },
        (None, Some(start)) => start.parse().unwrap_or(0),
        (None, None) => 0,
    };
    let mut page_max: u64 = query.get("maxResults").and_then(|m| m.parse().ok()).unwrap_or(10_000).clamp(100, 10_000);
    if let Some(cap) = Some(state.page_blocks_max.load(Ordering::SeqCst)).filter(|&c| c > 0) {
        page_max = page_max.min(cap);
    }
    let generation = state.generation.load(Ordering::SeqCst);
    let first = snap.blocks.partition_point(|(i, _)| *i < start);
    let page: Vec<_> = snap.blocks[first..].iter().take(page_max as usize).collect();
    let next = snap.blocks.get(first + page.len()).map(|(i, _)| format!("N{i}"));
    let expiry = (SystemTime::now() + TOKEN_TTL).duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let blocks: Vec<_> = page
        .iter()
        .map(|(i, _)| serde_json::json!({ "BlockIndex": i, "BlockToken": format!("G{generation}I{i}") }))
        .collect();
    let mut body = serde_json::json!({
        "Blocks": blocks,
        "BlockSize": EBS_BLOCK_SIZE_BYTES,
        "VolumeSize": snap.volume_size_gib,
        "ExpiryTime": expiry.as_secs_f64(),
    });
    if let Some(next) = next {
        body["NextToken"] = serde_json::Value::from(next);
    }
    let mut response = body.to_string().into_response();
    response.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    response
}

async fn get_block(
    State(state): State<Arc<ServerState>>,
    UrlPath((id, index)): UrlPath<(String, u64)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let n = state.gets.fetch_add(1, Ordering::SeqCst) + 1;
    *state.gets_by_block.lock().unwrap_or_else(|e| e.into_inner()).entry(index).or_default() += 1;
    if state.expire_at_get.load(Ordering::SeqCst) == n {
        state.generation.fetch_add(1, Ordering::SeqCst);
    }
    let Some(snap) = state.snap(&id) else { return no_snapshot(&id) };
    let path = format!("/snapshots/{id}/blocks/{index}");
    let fault = state.take_fault(&path);
    match fault {
        Some(Fault::SlowDown) => {
            return error(
                StatusCode::BAD_REQUEST,
                "RequestThrottledException",
                "Request throttled",
                Some("ACCOUNT_THROTTLED"),
            );
        }
        Some(Fault::InternalError) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException", "Internal error", None);
        }
        Some(Fault::NotFound) => return no_snapshot(&id),
        Some(Fault::Latency(delay)) => tokio::time::sleep(delay).await,
        _ => {}
    }
    let generation = state.generation.load(Ordering::SeqCst);
    let token_ok = query.get("blockToken").is_some_and(|t| *t == format!("G{generation}I{index}"));
    let Ok(at) = snap.blocks.binary_search_by_key(&index, |(i, _)| *i) else {
        return error(StatusCode::BAD_REQUEST, "ValidationException", "no such block", Some("INVALID_BLOCK"));
    };
    if !token_ok {
        state.refused_tokens.fetch_add(1, Ordering::SeqCst);
        return error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "The block token is not valid.",
            Some("INVALID_BLOCK_TOKEN"),
        );
    }
    let mut buf = vec![0u8; EBS_BLOCK_SIZE_BYTES as usize];
    if let Err(e) = read_block(&snap.file, index, &mut buf) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException", &e.to_string(), None);
    }
    block_response(Bytes::from(buf), &snap.blocks[at].1, fault)
}

/// A block answer, its body shaped by a body fault.
fn block_response(data: Bytes, sha256: &[u8; 32], fault: Option<Fault>) -> Response {
    let len = data.len();
    let body = match fault {
        Some(Fault::Corrupt) => {
            let mut bad = BytesMut::from(&data[..]);
            bad[0] ^= 0xff;
            Body::from(bad.freeze())
        }
        Some(Fault::Truncate { bytes }) => Body::new(Shaped::start(data.slice(..(bytes as usize).min(len)), false)),
        Some(Fault::Stall { after_bytes }) => {
            Body::new(Shaped::start(data.slice(..(after_bytes as usize).min(len)), true))
        }
        _ => Body::from(data),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/octet-stream"));
    headers.insert("content-length", HeaderValue::from(len));
    headers.insert("x-amz-Data-Length", HeaderValue::from(len));
    let checksum = aws_smithy_types::base64::encode(sha256);
    headers.insert("x-amz-Checksum", HeaderValue::from_str(&checksum).unwrap_or(HeaderValue::from_static("")));
    headers.insert("x-amz-Checksum-Algorithm", HeaderValue::from_static("SHA256"));
    response
}

/// A body that sends `head`, then either ends (short of its
/// `Content-Length`: truncated) or sends nothing more until the client goes
/// away or [`STALL_MAX`] passes (stalled).
struct Shaped {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl Shaped {
    fn start(head: Bytes, stall: bool) -> Self {
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            if !head.is_empty() && tx.send(Ok(head)).await.is_err() {
                return;
            }
            if stall {
                tokio::select! {
                    _ = tx.closed() => {}
                    _ = tokio::time::sleep(STALL_MAX) => {}
                }
            } else {
                let _ = tx.send(Err("truncated".into())).await;
            }
        });
        Shaped { rx }
    }
}

impl hyper::body::Body for Shaped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx).map(|item| item.map(|r| r.map(hyper::body::Frame::data)))
    }
}
