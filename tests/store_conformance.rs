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
//!
//! A read-only backend (`http://`) is checked with the objects put through a
//! writable store over the same directory ([`Writes::Through`]); its own put
//! must be refused as permanent. The `http://` store also meets the fault
//! layer here (stall, 404, 5xx, 503, corrupt, truncated) against an
//! in-process static HTTP server.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rehydrate::error::ErrorClass;
use rehydrate::store::fault::{Fault, FaultRule};
use rehydrate::store::file::FileStore;
use rehydrate::store::http::HttpStore;
use rehydrate::store::loopback::LoopbackS3;
use rehydrate::store::s3::S3Config;
use rehydrate::store::{Backend, BlockStore, SharedStore, StoreOptions, StoreUrl, stack};

/// Every byte derived from `seed` and its offset.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
}

fn options() -> StoreOptions {
    StoreOptions { attempt_timeout: Duration::from_secs(30), ..StoreOptions::default() }
}

/// Where the suite's objects are written.
enum Writes {
    /// Through the store under test.
    Itself,
    /// Through this store over the same objects: the one under test is
    /// read-only and must refuse puts.
    Through(SharedStore),
}

/// The suite. `name` says which backend failed.
async fn conformance(name: &str, store: SharedStore, writes: Writes) {
    let writer = match writes {
        Writes::Itself => Arc::clone(&store),
        Writes::Through(writer) => {
            let e = store.put("blocks/ro", pattern(4, 9)).await.unwrap_err();
            assert_eq!(e.class, ErrorClass::Permanent, "{name}: a read-only store refuses puts: {e}");
            assert!(!store.exists("blocks/ro").await.unwrap(), "{name}: a refused put wrote nothing");
            writer
        }
    };
    // A whole object comes back as written; exists says so.
    let small = pattern(1000, 1);
    writer.put("blocks/a", small.clone()).await.unwrap();
    assert_eq!(store.get("blocks/a", 1000).await.unwrap(), small, "{name}: get");
    assert_eq!(store.get("blocks/a", 1 << 20).await.unwrap(), small, "{name}: get with room to spare");
    assert!(store.exists("blocks/a").await.unwrap(), "{name}: exists");
    // An empty object is an object.
    writer.put("blocks/empty", Bytes::new()).await.unwrap();
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
    writer.put("blocks/flip", a.clone()).await.unwrap();
    let writer = {
        let (store, a, b) = (Arc::clone(&writer), a.clone(), b.clone());
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
    conformance("file", file_store(dir.path()), Writes::Itself).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_in_its_stack_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = stack(Backend::Local(file_store(dir.path())), &options()).unwrap();
    conformance("file stack", store, Writes::Itself).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3_server(dir.path()).await;
    conformance("s3", s3_store(&server).await, Writes::Itself).await;
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
    conformance("s3 stack", store, Writes::Itself).await;
}

/// A static HTTP host over `dir` (the file layout, `/<bucket>/<prefix>/<key>`).
async fn http_server(dir: &std::path::Path) -> LoopbackS3 {
    std::fs::create_dir_all(dir.join("bucket/conformance")).unwrap();
    LoopbackS3::start_static(dir.to_owned()).await.unwrap()
}

/// Short guards, so the fault tests end quickly.
fn http_config() -> S3Config {
    S3Config {
        operation_attempt_timeout_millis: 2_000,
        body_deadline_millis: 3_000,
        body_idle_timeout_millis: 300,
        body_throughput_grace_millis: 1_000,
        ..S3Config::default()
    }
}

fn http_store(server: &LoopbackS3) -> SharedStore {
    let url = StoreUrl::parse(&format!("{}/bucket/conformance", server.endpoint_url())).unwrap();
    Arc::new(HttpStore::new(&url, &http_config(), None).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = http_server(dir.path()).await;
    conformance("http", http_store(&server), Writes::Through(file_store(dir.path()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_store_in_the_full_stack_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let server = http_server(dir.path()).await;
    let mut options = options();
    options.rate_limit.requests_per_sec = std::num::NonZeroU32::new(10_000);
    let store = stack(Backend::Remote(http_store(&server)), &options).unwrap();
    assert!(store.rate_control().is_some(), "the adaptive rate is part of a remote stack");
    conformance("http stack", store, Writes::Through(file_store(dir.path()))).await;
}

/// The fault layer over HTTP: every fault gets its class, and the next
/// request (the rule used up) gets the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_store_classifies_every_fault() {
    let dir = tempfile::tempdir().unwrap();
    let server = http_server(dir.path()).await;
    let store = http_store(&server);
    let object = pattern(200_000, 7);
    file_store(dir.path()).put("blocks/f", object.clone()).await.unwrap();
    let cases = [
        (Fault::NotFound, ErrorClass::Permanent),
        (Fault::InternalError, ErrorClass::Transient),
        (Fault::SlowDown, ErrorClass::Throttled),
        (Fault::Stall { after_bytes: 1000 }, ErrorClass::Transient),
        (Fault::Truncate { bytes: 1000 }, ErrorClass::Transient),
    ];
    for (fault, class) in cases {
        server.add_fault(FaultRule::new(fault.clone()).path_ends_with("/blocks/f").first(1));
        let e = store.get("blocks/f", 1 << 20).await.unwrap_err();
        assert_eq!(e.class, class, "{fault:?}: {e}");
        assert_eq!(store.get("blocks/f", 1 << 20).await.unwrap(), object, "{fault:?}: the next request");
    }
    // Corrupt bytes arrive whole: the store cannot know, the content hash
    // (verify) does. The length is still checked here.
    server.add_fault(FaultRule::new(Fault::Corrupt).path_ends_with("/blocks/f").first(1));
    let got = store.get("blocks/f", 1 << 20).await.unwrap();
    assert_eq!(got.len(), object.len());
    assert_ne!(got, object, "the corrupt fault flipped a byte");
    // A dead host: transient, and quickly (connection refused).
    let dead = StoreUrl::parse("http://127.0.0.1:9/x").unwrap();
    let e = HttpStore::new(&dead, &http_config(), None).unwrap().get("k", 10).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
}

/// HEAD: present true, missing false, a 5xx an error (not "missing").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_store_head() {
    let dir = tempfile::tempdir().unwrap();
    let server = http_server(dir.path()).await;
    let store = http_store(&server);
    file_store(dir.path()).put("blocks/h", pattern(10, 1)).await.unwrap();
    assert!(store.exists("blocks/h").await.unwrap());
    assert!(!store.exists("blocks/none").await.unwrap());
    server.add_fault(FaultRule::new(Fault::InternalError).path_ends_with("/blocks/h").first(1));
    assert_eq!(store.exists("blocks/h").await.unwrap_err().class, ErrorClass::Transient);
    assert!(store.exists("blocks/h").await.unwrap());
}
