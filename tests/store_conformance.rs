//! The store conformance suite: what every [`BlockStore`] backend promises,
//! checked the same way for each (the `file://` store, the S3 store over real
//! HTTP against the in-process server) and for each through the production
//! policy stack (`store::stack`), so a decorator that forgets to forward a
//! method or changes an answer fails here too. A backend added later gets one
//! more `#[tokio::test]` calling [`conformance`].
//!
//! The promises: a whole object comes back as written; a read bounded below
//! the object's length is refused as corrupt (never a truncated success);
//! a missing key is permanent for `get` and `false` for `exists`; a key that
//! would escape the store is refused as permanent; a put replaces an object
//! atomically (concurrent readers see the old or the new bytes, never a mix).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rehydrate::error::ErrorClass;
use rehydrate::store::file::FileStore;
use rehydrate::store::loopback::LoopbackS3;
use rehydrate::store::{Backend, SharedStore, StoreOptions, stack};

/// Every byte derived from `seed` and its offset.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

fn options() -> StoreOptions {
    StoreOptions { attempt_timeout: Duration::from_secs(30), ..StoreOptions::default() }
}

/// The suite. `name` says which backend failed.
async fn conformance(name: &str, store: SharedStore) {
    // A whole object comes back as written; exists says so.
    let small = pattern(1000, 1);
    store.put("blocks/a", small.clone()).await.unwrap();
    assert_eq!(store.get("blocks/a", 1000).await.unwrap(), small, "{name}: get");
    assert_eq!(store.get("blocks/a", 1 << 20).await.unwrap(), small, "{name}: get with room to spare");
    assert!(store.exists("blocks/a").await.unwrap(), "{name}: exists");
    // An empty object is an object.
    store.put("blocks/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("blocks/empty", 0).await.unwrap().len(), 0, "{name}: empty object");

    // Bounded: one byte more than allowed is refused, never cut short.
    let e = store.get("blocks/a", 999).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Corrupt, "{name}: over the bound: {e}");

    // Missing: permanent for get, false for exists.
    let e = store.get("blocks/none", 1000).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{name}: missing key: {e}");
    assert!(!store.exists("blocks/none").await.unwrap(), "{name}: exists on a missing key");

    // Keys that would leave the store are refused, not resolved.
    for bad in ["../escape", "blocks/../../escape", "/abs", ""] {
        let e = store.get(bad, 10).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent, "{name}: key {bad:?}: {e}");
        assert_eq!(
            store.put(bad, pattern(4, 2)).await.unwrap_err().class,
            ErrorClass::Permanent,
            "{name}: put {bad:?}"
        );
    }

    // A put replaces atomically: readers racing a writer that flips an
    // object between two patterns see one of them, whole, every time.
    let (a, b) = (pattern(256 * 1024, 3), pattern(256 * 1024, 4));
    store.put("blocks/flip", a.clone()).await.unwrap();
    let writer = {
        let (store, a, b) = (Arc::clone(&store), a.clone(), b.clone());
        tokio::spawn(async move {
            for n in 0..20 {
                store.put("blocks/flip", if n % 2 == 0 { b.clone() } else { a.clone() }).await.unwrap();
            }
        })
    };
    let mut reads = 0;
    while !writer.is_finished() || reads < 20 {
        let got = store.get("blocks/flip", 256 * 1024).await.unwrap();
        assert!(got == a || got == b, "{name}: a reader saw a mix of two puts");
        reads += 1;
    }
    writer.await.unwrap();
}

fn file_store(dir: &std::path::Path) -> SharedStore {
    Arc::new(FileStore::new(dir.join("bucket/conformance")))
}

async fn s3_store(server: &LoopbackS3) -> SharedStore {
    Arc::new(server.connect_store("bucket", "conformance").await.unwrap())
}

async fn s3_server(dir: &std::path::Path) -> LoopbackS3 {
    std::fs::create_dir_all(dir.join("bucket")).unwrap();
    LoopbackS3::start(dir.to_owned()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance("file", file_store(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_in_its_stack_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance("file stack", stack(Backend::Local(file_store(dir.path())), &options()).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(dir.path()).await;
    conformance("s3", s3_store(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_in_the_full_stack_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(dir.path()).await;
    let mut options = options();
    options.rate_limit.requests_per_sec = std::num::NonZeroU32::new(10_000);
    options.rate_limit.bytes_per_sec = std::num::NonZeroU64::new(1 << 30);
    let store = stack(Backend::Remote(s3_store(&server).await), &options).unwrap();
    assert!(store.rate_control().is_some(), "the adaptive rate is part of a remote stack");
    conformance("s3 stack", store).await;
}
