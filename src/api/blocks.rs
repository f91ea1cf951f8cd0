//! `GET`/`HEAD /v1/blocks/{hash}`: the blocks this worker holds, for peers;
//! `GET /v1/peers`: what it served them.
//!
//! The path is `/v1/` and a block's decoded key `blocks/<content hash>`
//! (`crate::peer`), so a peer is an `http://` store at `<worker>/v1`: the
//! answer is the block's decoded bytes, read from a target that has it
//! written and hashed on the way out
//! ([`Holdings::read_found`](crate::peer::holdings::Holdings::read_found)).
//! A block this worker's restore is fetching from its store right now is
//! waited for up to `peers.serve_wait_millis` (taking no serving slot while
//! it waits). 404 for anything not held written (then); 500 (and no byte)
//! when the target's bytes fail verification; 429 past
//! `peers.serve_requests_per_sec`, or when no one of
//! `peers.serve_concurrency_max` slots frees within
//! `peers.serve_queue_millis`, so serving peers never takes more than that
//! from this worker's own restores. Behind the same bearer tokens as every
//! `/v1` route.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Api;
use super::problem::{Problem, ProblemDetails, ProblemType};
use crate::metrics as m;
use crate::peer::holdings::{Holdings, ReadError};

/// The serving side's limits, shared by every request.
pub(super) struct Serving {
    enabled: bool,
    rate: governor::DefaultDirectRateLimiter,
    slots: Arc<tokio::sync::Semaphore>,
    /// How long a request waits for a slot.
    queue: std::time::Duration,
    /// How long a request waits for a block being fetched here.
    wait: std::time::Duration,
}

impl Serving {
    pub(super) fn new(config: &crate::peer::PeersConfig) -> Self {
        let quota = governor::Quota::per_second(config.serve_requests_per_sec);
        Self {
            enabled: config.serve,
            rate: governor::RateLimiter::direct(quota),
            slots: Arc::new(tokio::sync::Semaphore::new(config.serve_concurrency_max.get())),
            queue: std::time::Duration::from_millis(config.serve_queue_millis),
            wait: std::time::Duration::from_millis(config.serve_wait_millis),
        }
    }
}

/// What this worker served to peers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PeerServing {
    /// `peers.serve`.
    pub serving: bool,
    /// Restores whose written blocks are served now.
    pub holdings: u64,
    /// Requests waiting now for a block this worker is fetching from its
    /// store (`peers.serve_wait_millis`).
    pub waiting: u64,
    /// Blocks served to peers since the worker started.
    pub blocks_served: u64,
    /// Bytes served to peers since the worker started.
    pub bytes_served: u64,
}

fn refuse(reason: &'static str, status: StatusCode, problem: ProblemType, detail: &str) -> Response {
    metrics::counter!(m::PEER_REFUSED_TOTAL, "reason" => reason).increment(1);
    Problem::new(status, problem, detail).into_response()
}

/// A block this worker holds written, decoded and verified, for a peer.
/// `HEAD` answers the same without the body.
#[utoipa::path(get, path = "/v1/blocks/{hash}", tag = "peers", security(("bearer" = [])),
    params(("hash" = String, Path, description = "the block's content hash, 64 lowercase hex digits: its decoded key blocks/<hash>, whatever codec the snapshot stored it with")),
    responses(
        (status = 200, description = "the block's decoded bytes, read from a target that has it written and verified against its content hash on the way out", body = Vec<u8>, content_type = "application/octet-stream"),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no-such-block: no restore here has that block written, nor wrote it within peers.serve_wait_millis while fetching it from its store (or the key is not a decoded block key)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "busy: past peers.serve_requests_per_sec or peers.serve_concurrency_max; ask another source", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "block-unverified: the target's bytes do not hash to the key (nothing served); internal: reading the target failed", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub(super) async fn get_block(State(api): State<Api>, method: Method, Path(hash): Path<String>) -> Response {
    let serving = &api.serving;
    let key = format!("blocks/{hash}");
    let Some(hash) = crate::peer::requested_hash(&key).filter(|_| serving.enabled) else {
        let detail = format!("{key:?} is not served here (GET /v1/blocks/<content hash>, peers.serve)");
        return refuse("not_held", StatusCode::NOT_FOUND, ProblemType::NoSuchBlock, &detail);
    };
    if serving.rate.check().is_err() {
        return refuse("busy", StatusCode::TOO_MANY_REQUESTS, ProblemType::Busy, "past peers.serve_requests_per_sec");
    }
    let holdings = &api.worker.engine().holdings;
    // Waiting for a block being fetched costs no slot: slots bound reads.
    let Some(found) = holdings.find(hash, serving.wait).await else {
        let detail = format!("{key}: not held written here");
        return refuse("not_held", StatusCode::NOT_FOUND, ProblemType::NoSuchBlock, &detail);
    };
    let slot = tokio::time::timeout(serving.queue, Arc::clone(&serving.slots).acquire_owned()).await;
    let Ok(Ok(_slot)) = slot else {
        return refuse("busy", StatusCode::TOO_MANY_REQUESTS, ProblemType::Busy, "past peers.serve_concurrency_max");
    };
    match holdings.read_found(found).await {
        Ok(bytes) => send_block(holdings, &method, bytes),
        Err(e @ ReadError::Mismatch { .. }) => {
            tracing::warn!(error = %e, "a held block failed verification: not served");
            refuse("mismatch", StatusCode::INTERNAL_SERVER_ERROR, ProblemType::BlockUnverified, &e.to_string())
        }
        Err(e @ ReadError::Io { .. }) => {
            metrics::counter!(m::PEER_REFUSED_TOTAL, "reason" => "io").increment(1);
            Problem::internal(&e.to_string()).into_response()
        }
    }
}

/// A verified block's answer (its headers only for `HEAD`), counted.
fn send_block(holdings: &Holdings, method: &Method, bytes: bytes::Bytes) -> Response {
    let len = bytes.len();
    let headers =
        [(header::CONTENT_TYPE, "application/octet-stream".to_owned()), (header::CONTENT_LENGTH, len.to_string())];
    if method == Method::HEAD {
        return (headers, ()).into_response();
    }
    holdings.count_served(len as u64);
    metrics::counter!(m::PEER_SERVED_BLOCKS_TOTAL).increment(1);
    metrics::counter!(m::PEER_SERVED_BYTES_TOTAL).increment(len as u64);
    (headers, bytes).into_response()
}

/// What this worker served to peers, and how many restores it serves from.
#[utoipa::path(get, path = "/v1/peers", tag = "peers", security(("bearer" = [])),
    responses(
        (status = 200, description = "the serving side's counters", body = PeerServing),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub(super) async fn peers(State(api): State<Api>) -> Response {
    let holdings = &api.worker.engine().holdings;
    axum::Json(PeerServing {
        serving: api.serving.enabled,
        holdings: holdings.len() as u64,
        waiting: holdings.waiting.load(Ordering::Relaxed),
        blocks_served: holdings.blocks_served.load(Ordering::Relaxed),
        bytes_served: holdings.bytes_served.load(Ordering::Relaxed),
    })
    .into_response()
}
