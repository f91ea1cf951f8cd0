//! The per-attempt deadline, as a decorator of the store trait.
//!
//! It sits innermost, directly around the backend, so each attempt gets its
//! own deadline covering the whole call, body included, while time spent
//! waiting for a rate-limit token or a concurrency slot (the layers outside
//! it) does not count against the attempt. The retry loop (`fetch.rs`) sits
//! outside everything.

use std::time::Duration;

use bytes::Bytes;

use super::{BlockStore, BoxFuture, SharedStore, StoreError, StoreUrl};

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

impl BlockStore for Timeout {
    fn url(&self) -> &StoreUrl {
        self.inner.url()
    }

    fn get<'a>(&'a self, key: &'a str, len_max_bytes: u64) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(self.run(key, self.inner.get(key, len_max_bytes)))
    }

    fn put<'a>(&'a self, key: &'a str, bytes: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.run(key, self.inner.put(key, bytes)))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.run(key, self.inner.exists(key)))
    }
}
