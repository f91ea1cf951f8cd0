//! Fault injection as a decorator of the store trait.
//!
//! [`FaultStore`] forwards every call to the store it wraps, except calls that
//! match a [`FaultRule`]: those hang, fail with a chosen error, come back
//! corrupted or late. It counts every call per key, so tests assert request
//! counts (no retries on 404, never more than the configured attempts) at the
//! store, not through rehydrate's own report. The HTTP-level equivalent for S3
//! is `store/loopback.rs`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{BlockStore, BoxFuture, SharedStore, StoreError, StoreUrl};

/// What a matching call does instead of (or besides) the real call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Never answer.
    Hang,
    /// Fail with this error.
    Fail(StoreError),
    /// Answer with the real bytes, one byte flipped.
    Corrupt,
    /// Answer with the real bytes cut to this length.
    Truncate(usize),
    /// Answer late.
    Delay(Duration),
}

/// Which calls a fault applies to.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// Calls whose key contains this.
    pub key_contains: String,
    pub fault: Fault,
    /// Applies to the first this-many matching calls; `None`: to all.
    pub times: Option<u64>,
}

#[derive(Debug)]
pub struct FaultStore {
    inner: SharedStore,
    rules: Mutex<Vec<(FaultRule, u64)>>,
    calls: Mutex<HashMap<String, u64>>,
}

impl FaultStore {
    pub fn new(inner: SharedStore) -> Self {
        Self { inner, rules: Mutex::new(Vec::new()), calls: Mutex::new(HashMap::new()) }
    }

    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().unwrap_or_else(|e| e.into_inner()).push((rule, 0));
    }

    /// Calls (get, put, exists) made for keys containing `key_contains`.
    pub fn calls(&self, key_contains: &str) -> u64 {
        let calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.iter().filter(|(k, _)| k.contains(key_contains)).map(|(_, n)| n).sum()
    }

    /// Count the call and pick the fault that applies to it, if any.
    fn fault_for(&self, key: &str) -> Option<Fault> {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_owned()).or_default() += 1;
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for (rule, used) in rules.iter_mut() {
            if key.contains(&rule.key_contains) && rule.times.is_none_or(|t| *used < t) {
                *used += 1;
                return Some(rule.fault.clone());
            }
        }
        None
    }
}

impl BlockStore for FaultStore {
    fn url(&self) -> &StoreUrl {
        self.inner.url()
    }

    fn get_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            match self.fault_for(key) {
                None => self.inner.get_for(ctx, key, len_max_bytes).await,
                Some(Fault::Hang) => std::future::pending().await,
                Some(Fault::Fail(e)) => Err(e),
                Some(Fault::Delay(d)) => {
                    tokio::time::sleep(d).await;
                    self.inner.get_for(ctx, key, len_max_bytes).await
                }
                Some(Fault::Corrupt) => {
                    let mut bytes = self.inner.get_for(ctx, key, len_max_bytes).await?.to_vec();
                    if let Some(b) = bytes.get_mut(0) {
                        *b ^= 0xFF;
                    }
                    Ok(Bytes::from(bytes))
                }
                Some(Fault::Truncate(len)) => {
                    let bytes = self.inner.get_for(ctx, key, len_max_bytes).await?;
                    Ok(bytes.slice(..len.min(bytes.len())))
                }
            }
        })
    }

    fn put_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self.fault_for(key) {
                Some(Fault::Fail(e)) => Err(e),
                Some(Fault::Hang) => std::future::pending().await,
                _ => self.inner.put_for(ctx, key, bytes).await,
            }
        })
    }

    fn exists_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            match self.fault_for(key) {
                Some(Fault::Fail(e)) => Err(e),
                Some(Fault::Hang) => std::future::pending().await,
                _ => self.inner.exists_for(ctx, key).await,
            }
        })
    }

    fn rate_control(&self) -> Option<std::sync::Arc<super::rate::RateControl>> {
        self.inner.rate_control()
    }
}
