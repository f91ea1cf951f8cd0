//! Peers as sources: a peer worker's `/v1/blocks` as a store, behind its
//! short deadline and a skip.
//!
//! In: a peer's base URL (`http://host:port`, the worker's listener; its
//! blocks are the `http://` store at `<url>/v1`), the
//! `[peers]` settings. Out: a [`SharedStore`] that fetch puts ahead of the
//! object store. One request per block per peer, never retried on it:
//!
//! - 404 (the peer does not hold it, or did not write it in time): permanent, the
//!   next source at once;
//! - no answer (no connection, or no response headers within
//!   `peers.attempt_timeout_millis`): the peer is skipped for
//!   `peers.skip_millis` (each request meanwhile fails at once, without a
//!   packet), then asked again;
//! - a 5xx, a reset connection, a body not complete within twice the
//!   deadline: the next source at once, no skip;
//! - 429 (the peer is busy serving): the next source at once, no skip;
//! - corrupt bytes stay corrupt (fetch counts them and moves on).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::PeersConfig;
use crate::error::ErrorClass;
use crate::store::http::HttpStore;
use crate::store::{Backend, BoxFuture, RequestContext, SharedStore, StoreError, StoreOptions, StoreUrl};

/// The base under a worker's listener of the blocks it serves: a block's
/// decoded key `blocks/<hash>` under it is `GET /v1/blocks/<hash>`.
pub const BLOCKS_PATH: &str = "/v1";

/// Open peer `url` (a worker's base URL) as a store.
pub fn open(url: &str, config: &PeersConfig, options: &StoreOptions) -> Result<SharedStore, StoreError> {
    let bad = |reason: String| StoreError::permanent(format!("peer {url:?}: {reason}"));
    let base =
        StoreUrl::parse(&format!("{}{BLOCKS_PATH}", url.trim_end_matches('/'))).map_err(|e| bad(e.to_string()))?;
    if !matches!(base, StoreUrl::Http { .. }) {
        return Err(bad("a peer is a worker's http:// or https:// address".into()));
    }
    let token = config.token().map_err(bad)?;
    // Connected and answering within the short deadline, or unreachable;
    // the body then has as long again.
    let short = config.attempt_timeout_millis.get();
    let s3 = crate::store::s3::S3Config {
        connect_timeout_millis: options.s3.connect_timeout_millis.min(short),
        operation_attempt_timeout_millis: short,
        operation_timeout_millis: options.s3.operation_timeout_millis.max(short),
        ..options.s3.clone()
    };
    let http = HttpStore::new(&base, &s3, token)?;
    let options = StoreOptions { attempt_timeout: 2 * config.attempt_timeout(), ..options.clone() };
    let timed = crate::store::stack(Backend::Local(Arc::new(http)), &options)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(config.inflight_max.get()));
    let slot_wait = config.attempt_timeout();
    Ok(Arc::new(Skipping { inner: timed, skip: config.skip(), dead_until: Mutex::new(None), slots, slot_wait }))
}

/// What the http store says of a peer that cannot be reached: no
/// connection, or no answer's headers within the short deadline
/// (`store/http.rs`). A body slower than that is one request's bad luck.
const DEAD_SIGNS: &[&str] = &["connect failed", "no response headers within"];

/// A peer that costs one failure, then is skipped for a while.
#[derive(Debug)]
pub struct Skipping {
    inner: SharedStore,
    skip: std::time::Duration,
    /// Skipped until then, and why.
    dead_until: Mutex<Option<(Instant, String)>>,
    /// Requests in flight to this peer (`peers.inflight_max`): a request
    /// waits for one up to the short deadline, then asks the next source, so
    /// a fleet never queues on a peer's listener (and never mistakes that
    /// queue for a dead peer).
    slots: Arc<tokio::sync::Semaphore>,
    /// How long a request waits for one of them (the short deadline).
    slot_wait: std::time::Duration,
}

impl Skipping {
    fn skipped(&self) -> Option<StoreError> {
        let dead = self.dead_until.lock().unwrap_or_else(|e| e.into_inner());
        match &*dead {
            Some((until, why)) if Instant::now() < *until => Some(StoreError::permanent(format!(
                "{}: skipped for {} ms after: {why}",
                self.inner.url(),
                self.skip.as_millis()
            ))),
            _ => None,
        }
    }

    /// One answer's verdict: never retried on the peer. Only a peer that
    /// cannot be reached (refused, or silent past the deadline) is skipped:
    /// a reset pooled connection or a 5xx is one request's bad luck.
    fn judge(&self, error: StoreError) -> StoreError {
        let unreachable = DEAD_SIGNS.iter().any(|sign| error.message.contains(sign));
        match error.class {
            ErrorClass::Transient if unreachable => {
                *self.dead_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Instant::now() + self.skip, error.message.clone()));
                StoreError::permanent(error.message)
            }
            ErrorClass::Transient => StoreError::permanent(error.message),
            ErrorClass::Throttled => StoreError::permanent(format!("{} (peer busy)", error.message)),
            ErrorClass::Permanent | ErrorClass::Corrupt => error,
        }
    }
}

impl crate::store::BlockStore for Skipping {
    fn url(&self) -> &StoreUrl {
        self.inner.url()
    }

    fn charge_requests(&self, overhead_bytes: u64) {
        self.inner.charge_requests(overhead_bytes);
    }

    fn get_for<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            if let Some(e) = self.skipped() {
                return Err(e);
            }
            let slot = tokio::time::timeout(self.slot_wait, Arc::clone(&self.slots).acquire_owned()).await;
            let Ok(Ok(_slot)) = slot else {
                return Err(StoreError::permanent(format!("{}: busy (peers.inflight_max in flight)", self.url())));
            };
            self.inner.get_for(ctx, key, len_max_bytes).await.map_err(|e| self.judge(e))
        })
    }

    fn put_for<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.put_for(ctx, key, bytes)
    }

    fn exists_for<'a>(&'a self, ctx: &'a RequestContext, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if let Some(e) = self.skipped() {
                return Err(e);
            }
            self.inner.exists_for(ctx, key).await.map_err(|e| self.judge(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_peer_costs_one_timeout_then_is_skipped() {
        // Nothing listens on port 9 of loopback: refused at once.
        let config = PeersConfig::default();
        let options = StoreOptions { attempt_timeout: std::time::Duration::from_secs(5), ..Default::default() };
        let peer = open("http://127.0.0.1:9", &config, &options).unwrap();
        let first = peer.get("blocks/00", 10).await.unwrap_err();
        assert_eq!(first.class, ErrorClass::Permanent, "never retried on the peer: {first}");
        assert!(!first.message.contains("skipped"), "{first}");
        let second = peer.get("blocks/00", 10).await.unwrap_err();
        assert!(second.message.contains("skipped for 10000 ms"), "{second}");
        assert!(open("s3://bucket/x", &config, &options).is_err());
    }

    /// A peer that answers every request with `status` and an empty body,
    /// counting them.
    async fn answering(status: &'static str) -> (String, Arc<std::sync::atomic::AtomicU32>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n");
                        if conn.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn a_peer_that_answers_is_never_skipped() {
        let options = StoreOptions { attempt_timeout: std::time::Duration::from_secs(5), ..Default::default() };
        for status in ["404 Not Found", "429 Too Many Requests", "500 Internal Server Error"] {
            let (url, count) = answering(status).await;
            let peer = open(&url, &PeersConfig::default(), &options).unwrap();
            for _ in 0..3 {
                let e = peer.get("blocks/00", 10).await.unwrap_err();
                assert_eq!(e.class, ErrorClass::Permanent, "{status}: never retried on the peer: {e}");
                assert!(!e.message.contains("skipped"), "{status}: {e}");
            }
            let asked = count.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(asked, 3, "{status}: every request reached the peer");
        }
    }
}
