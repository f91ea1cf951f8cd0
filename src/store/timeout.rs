//! The per-attempt deadline, as a decorator of the store trait.
//!
//! It sits innermost, directly around the backend, so each attempt gets its
//! own deadline covering the whole call, body included, while time spent
//! waiting for a rate-limit token or a concurrency slot (the layers outside
//! it) does not count against the attempt. The retry loop (`fetch.rs`) sits
//! outside everything.
//!
//! Being innermost, it is also where a request leaves the local queues for
//! the store: it marks that moment in the caller's [`SentAt`], if the
//! request's [`RequestContext`] carries one. Fetch measures store latency from there, so a
//! request waiting for a rate-limit token is neither counted slow nor hedged.

use std::time::{Duration, Instant};

use super::{RequestContext, SharedStore, StoreError};

/// When a request went to the store, past every local queue.
#[derive(Debug)]
pub struct SentAt(tokio::sync::watch::Sender<Option<Instant>>);

impl Default for SentAt {
    fn default() -> Self {
        Self(tokio::sync::watch::Sender::new(None))
    }
}

impl SentAt {
    /// When the request was sent; `None` while it waits in a local queue.
    pub fn get(&self) -> Option<Instant> {
        *self.0.borrow()
    }

    /// Mark the request sent at `now`; a later mark (none today) would not
    /// move it.
    pub fn mark(&self, now: Instant) {
        self.0.send_if_modified(|at| at.is_none() && at.replace(now).is_none());
    }

    /// Unmark: the request it marked has been answered, and the next one
    /// (a retry) waits in the local queues again.
    pub fn clear(&self) {
        self.0.send_if_modified(|at| at.take().is_some());
    }

    /// Resolves once the request has been sent (at once if it has).
    pub async fn sent(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

#[derive(Debug)]
pub struct Timeout {
    inner: SharedStore,
    deadline: Duration,
}

impl Timeout {
    pub fn new(inner: SharedStore, deadline: Duration) -> Self {
        Self { inner, deadline }
    }

    async fn run<T>(
        &self,
        ctx: &RequestContext,
        what: &str,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        if let Some(sent) = &ctx.sent {
            sent.mark(Instant::now());
        }
        match tokio::time::timeout(self.deadline, op).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::transient(format!(
                "{what}: no complete answer within the {} ms attempt deadline",
                self.deadline.as_millis()
            ))),
        }
    }
}

crate::store::forward_through_run!(Timeout);
