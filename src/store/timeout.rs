//! The per-attempt deadline, as a decorator of the store trait.
//!
//! It sits innermost, directly around the backend, so each attempt gets its
//! own deadline covering the whole call, body included, while time spent
//! waiting for a rate-limit token or a concurrency slot (the layers outside
//! it) does not count against the attempt. The retry loop (`fetch.rs`) sits
//! outside everything.

use std::time::Duration;

use super::{SharedStore, StoreError};

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
        what: &str,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
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
