//! Fault injection as a decorator of the store trait.
//!
//! [`FaultStore`] forwards every call to the store it wraps, except calls that
//! match a [`FaultRule`]: those hang, fail with a chosen error, come back
//! corrupted or late. It counts every call per key, so tests assert request
//! counts (no retries on 404, never more than the configured attempts) at the
//! store, not through rehydrate's own report. The HTTP-level equivalent for S3
//! is `store/loopback.rs`; both take the one vocabulary defined here
//! ([`Fault`], [`FaultRule`], [`FaultMethod`]).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{BlockStore, BoxFuture, SharedStore, StoreError, StoreUrl};

/// Which calls a [`FaultRule`] applies to: `get` (HTTP GET), `exists`
/// (HEAD), `put` (PUT), or any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMethod {
    Get,
    Head,
    Put,
    Any,
}

impl FaultMethod {
    /// Whether a rule for `self` applies to a call of kind `call`.
    pub fn covers(self, call: FaultMethod) -> bool {
        self == FaultMethod::Any || self == call
    }

    /// The kind of an HTTP request.
    pub fn of_http(method: &hyper::Method) -> FaultMethod {
        match *method {
            hyper::Method::GET => FaultMethod::Get,
            hyper::Method::HEAD => FaultMethod::Head,
            hyper::Method::PUT => FaultMethod::Put,
            _ => FaultMethod::Any,
        }
    }
}

/// What a matching call gets, described by what the client sees. Both fault
/// layers speak this one vocabulary: [`FaultStore`] at the store trait, and
/// the in-process S3 server (`store/loopback.rs`) over HTTP, each as near as
/// its level allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Never finish. Over HTTP: `200` with headers (full `Content-Length`)
    /// and the first `after_bytes` bytes of the body, then nothing, ever;
    /// at the trait, the call never returns.
    Stall { after_bytes: u64 },
    /// The store asks to slow down: `503 SlowDown`, a throttled error.
    SlowDown,
    /// A server error: `500 InternalError`, a transient error.
    InternalError,
    /// The object is not there: `404 NoSuchKey`, a permanent error.
    NotFound,
    /// The credentials may not do this (a read-only key writing): `403
    /// AccessDenied`, a permanent error.
    AccessDenied,
    /// The body cut short after `bytes` (over HTTP: with the full
    /// `Content-Length` advertised).
    Truncate { bytes: u64 },
    /// The body with every bit of its first byte flipped: same length, wrong
    /// bytes.
    Corrupt,
    /// Answer this much later, then normally.
    Latency(Duration),
    /// The body at about this rate (a straggler).
    Trickle { bytes_per_sec: NonZeroU32 },
    /// Fail with this exact error. Over HTTP: the answer of its class
    /// (throttled 503, transient 500, permanent 404, corrupt a flipped body).
    Fail(StoreError),
}

/// One fault injection rule. Rules are tried in the order added; the first
/// that matches and has uses left applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The key (or over HTTP the request path, `/<bucket>/<key>`) must
    /// contain this. Empty matches every call.
    pub path_contains: String,
    /// ... and end with this. Empty matches every call.
    pub path_ends_with: String,
    pub method: FaultMethod,
    /// Apply to the first `n` matching calls, or `None` for every one.
    pub times: Option<u64>,
    pub fault: Fault,
}

impl FaultRule {
    /// `fault` on every call, until narrowed by the builder methods.
    pub fn new(fault: Fault) -> Self {
        Self {
            path_contains: String::new(),
            path_ends_with: String::new(),
            method: FaultMethod::Any,
            times: None,
            fault,
        }
    }

    /// Only calls whose key or path contains `part`.
    pub fn path_contains(mut self, part: &str) -> Self {
        self.path_contains = part.to_owned();
        self
    }

    /// Only calls whose key or path ends with `suffix`.
    pub fn path_ends_with(mut self, suffix: &str) -> Self {
        self.path_ends_with = suffix.to_owned();
        self
    }

    pub fn method(mut self, method: FaultMethod) -> Self {
        self.method = method;
        self
    }

    /// Only the first `n` matching calls.
    pub fn first(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    pub fn matches(&self, call: FaultMethod, path: &str) -> bool {
        self.method.covers(call) && path.contains(&self.path_contains) && path.ends_with(&self.path_ends_with)
    }
}

#[derive(Debug)]
pub struct FaultStore {
    inner: SharedStore,
    /// Rules with the uses they have had.
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
    fn fault_for(&self, call: FaultMethod, key: &str) -> Option<Fault> {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner()).entry(key.to_owned()).or_default() += 1;
        let mut rules = self.rules.lock().unwrap_or_else(|e| e.into_inner());
        for (rule, used) in rules.iter_mut() {
            if rule.matches(call, key) && rule.times.is_none_or(|t| *used < t) {
                *used += 1;
                return Some(rule.fault.clone());
            }
        }
        None
    }
}

/// At the trait: what a fault does before the wrapped call (or instead of
/// it: an error, a stall). Body faults are applied to what the call returns.
async fn before_call(fault: &Fault, key: &str) -> Result<(), StoreError> {
    match fault {
        Fault::Stall { .. } => std::future::pending().await,
        Fault::SlowDown => Err(StoreError::throttled(format!("{key}: 503 SlowDown (injected)"))),
        Fault::InternalError => Err(StoreError::transient(format!("{key}: 500 InternalError (injected)"))),
        Fault::NotFound => Err(StoreError::permanent(format!("{key}: 404 NoSuchKey (injected)"))),
        Fault::AccessDenied => Err(StoreError::permanent(format!("{key}: 403 AccessDenied (injected)"))),
        Fault::Fail(e) => Err(e.clone()),
        Fault::Latency(delay) => {
            tokio::time::sleep(*delay).await;
            Ok(())
        }
        Fault::Truncate { .. } | Fault::Corrupt | Fault::Trickle { .. } => Ok(()),
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
            let Some(fault) = self.fault_for(FaultMethod::Get, key) else {
                return self.inner.get_for(ctx, key, len_max_bytes).await;
            };
            before_call(&fault, key).await?;
            let bytes = self.inner.get_for(ctx, key, len_max_bytes).await?;
            Ok(match fault {
                Fault::Corrupt => {
                    let mut bytes = bytes.to_vec();
                    if let Some(b) = bytes.get_mut(0) {
                        *b ^= 0xFF;
                    }
                    Bytes::from(bytes)
                }
                Fault::Truncate { bytes: len } => {
                    bytes.slice(..usize::try_from(len).unwrap_or(usize::MAX).min(bytes.len()))
                }
                Fault::Trickle { bytes_per_sec } => {
                    tokio::time::sleep(Duration::from_secs_f64(bytes.len() as f64 / f64::from(bytes_per_sec.get())))
                        .await;
                    bytes
                }
                _ => bytes,
            })
        })
    }

    fn put_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(fault) = self.fault_for(FaultMethod::Put, key) {
                before_call(&fault, key).await?;
            }
            self.inner.put_for(ctx, key, bytes).await
        })
    }

    fn exists_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if let Some(fault) = self.fault_for(FaultMethod::Head, key) {
                before_call(&fault, key).await?;
            }
            self.inner.exists_for(ctx, key).await
        })
    }

    fn list_for<'a>(
        &'a self,
        ctx: &'a super::RequestContext,
        dir: &'a str,
    ) -> BoxFuture<'a, Result<Vec<super::ObjectInfo>, StoreError>> {
        Box::pin(async move {
            if let Some(fault) = self.fault_for(FaultMethod::Get, dir) {
                before_call(&fault, dir).await?;
            }
            self.inner.list_for(ctx, dir).await
        })
    }

    fn delete_for<'a>(&'a self, ctx: &'a super::RequestContext, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(fault) = self.fault_for(FaultMethod::Any, key) {
                before_call(&fault, key).await?;
            }
            self.inner.delete_for(ctx, key).await
        })
    }

    fn rate_control(&self) -> Option<std::sync::Arc<super::rate::RateControl>> {
        self.inner.rate_control()
    }
}
