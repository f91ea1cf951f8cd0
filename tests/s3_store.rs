//! The S3 store over real HTTP: the real `aws-sdk-s3` client in [`S3Store`]
//! against [`LoopbackS3`] (s3s + s3s-fs in this process) with its fault
//! layer. Each fault must come back as the right [`ErrorClass`] after exactly
//! one request at the server (the SDK's retries are off), every body
//! deadline must fire, and a rate limit must hold as measured at the server.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rehydrate::error::ErrorClass;
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::file::FileStore;
use rehydrate::store::limit::{AdaptiveConcurrency, AdaptiveConcurrencyConfig, RateLimitConfig, RateLimited};
use rehydrate::store::loopback::{LoopbackS3, ServerRateLimit, max_arrivals_in_window};
use rehydrate::store::s3::{S3Config, S3Store};
use rehydrate::store::{BlockStore, SharedStore};

const BUCKET: &str = "snapshots";
const PREFIX: &str = "vol-1";

struct Fixture {
    root: tempfile::TempDir,
    server: LoopbackS3,
    store: Arc<S3Store>,
}

/// Tight deadlines so every cut fires in well under a second.
fn test_config(server: &LoopbackS3) -> S3Config {
    S3Config {
        connect_timeout_millis: 1_000,
        operation_attempt_timeout_millis: 1_000,
        operation_timeout_millis: 2_000,
        body_deadline_millis: 1_500,
        body_idle_timeout_millis: 300,
        body_throughput_min_bytes_per_sec: 256 * 1024,
        body_throughput_grace_millis: 300,
        ..server.s3_config()
    }
}

async fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join(BUCKET)).unwrap();
    let server = LoopbackS3::start(root.path().to_owned()).await.unwrap();
    let store =
        S3Store::connect_with_static_credentials(BUCKET, PREFIX, &test_config(&server), &LoopbackS3::credentials())
            .await
            .unwrap();
    Fixture { root, server, store: Arc::new(store) }
}

/// Self-describing bytes: each byte derived from its offset and a seed.
fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_exists_roundtrip_in_the_file_store_layout() {
    let f = fixture().await;
    let block = pattern(1 << 20, 7);
    f.store.put("blocks/aa/one", block.clone()).await.unwrap();
    // Stored exactly where a file:// store of the same bucket would look.
    let on_disk = std::fs::read(f.root.path().join(BUCKET).join(PREFIX).join("blocks/aa/one")).unwrap();
    assert_eq!(on_disk, block);
    assert!(f.store.exists("blocks/aa/one").await.unwrap());
    assert!(!f.store.exists("blocks/aa/two").await.unwrap());

    let started = Instant::now();
    let got = f.store.get("blocks/aa/one", 1 << 20).await.unwrap();
    eprintln!("1 MiB GET over loopback: {:?}", started.elapsed());
    assert_eq!(got, block);
    // Put together in a page-aligned pooled buffer, ready for O_DIRECT.
    assert!((got.as_ptr() as usize).is_multiple_of(rehydrate::buf::ALIGN_BYTES));

    // And the other way round: what a FileStore writes, S3 serves.
    let file = FileStore::new(f.root.path().join(BUCKET).join(PREFIX));
    let small = pattern(5000, 3);
    file.put("blocks/bb/three", small.clone()).await.unwrap();
    assert_eq!(f.store.get("blocks/bb/three", 5000).await.unwrap(), small);
    // The one-line way the demo gets a store on the loopback server.
    let demo_store = f.server.connect_store(BUCKET, PREFIX).await.unwrap();
    assert_eq!(demo_store.get("blocks/bb/three", 5000).await.unwrap(), small);
    assert_eq!(f.store.url().to_string(), format!("s3://{BUCKET}/{PREFIX}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn len_max_is_enforced_before_the_body_is_read() {
    let f = fixture().await;
    f.store.put("blocks/big", pattern(64 * 1024, 1)).await.unwrap();
    let e = f.store.get("blocks/big", 64 * 1024 - 1).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Corrupt, "{e}");
    assert!(e.message.contains("65536") && e.message.contains("blocks/big"), "{e}");
    assert_eq!(f.store.get("blocks/big", 64 * 1024).await.unwrap().len(), 64 * 1024);
    // Hostile keys never reach the wire.
    let before = f.server.requests_total();
    for bad in ["", "../x", "a//b", "/abs", "a/./b"] {
        assert_eq!(f.store.get(bad, 10).await.unwrap_err().class, ErrorClass::Permanent, "{bad:?}");
    }
    assert_eq!(f.server.requests_total(), before);
}

/// Install `rule`, GET `key`, and check the class and that the server saw
/// exactly one request for it (no hidden SDK retry).
async fn get_with_fault(f: &Fixture, key: &str, rule: FaultRule) -> Result<Bytes, rehydrate::error::StoreError> {
    get_with_fault_on(f, &f.store, key, rule).await
}

async fn get_with_fault_on(
    f: &Fixture,
    store: &S3Store,
    key: &str,
    rule: FaultRule,
) -> Result<Bytes, rehydrate::error::StoreError> {
    f.server.clear_faults();
    f.server.add_fault(rule.path_contains(key));
    let result = store.get(&format!("blocks/{key}"), 1 << 20).await;
    assert_eq!(f.server.requests(key), 1, "{key}: requests at the server");
    if let Err(e) = &result {
        eprintln!("{key}: {e}");
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_is_classified_after_exactly_one_request() {
    let f = fixture().await;
    let block = pattern(256 * 1024, 9);
    let keys = ["k404", "k503", "k500", "ktrunc", "kcorrupt", "klatency", "kgone"];
    for key in keys {
        f.store.put(&format!("blocks/{key}"), block.clone()).await.unwrap();
    }
    f.server.reset_stats();

    let e = get_with_fault(&f, "k404", FaultRule::new(Fault::NotFound)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("404") && e.message.contains("NoSuchKey") && e.message.contains("k404"), "{e}");

    let e = get_with_fault(&f, "k503", FaultRule::new(Fault::SlowDown)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Throttled, "{e}");
    assert!(e.message.contains("503") && e.message.contains("SlowDown"), "{e}");

    let e = get_with_fault(&f, "k500", FaultRule::new(Fault::InternalError)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(e.message.contains("500") && e.message.contains("InternalError"), "{e}");

    let e = get_with_fault(&f, "ktrunc", FaultRule::new(Fault::Truncate { bytes: 100_000 })).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");

    // Corrupt bytes come back as bytes: the verify stage judges them.
    let got = get_with_fault(&f, "kcorrupt", FaultRule::new(Fault::Corrupt)).await.unwrap();
    assert_eq!(got.len(), block.len());
    assert_ne!(got, block);
    assert_eq!(got[1..], block[1..]);

    let started = Instant::now();
    let got = get_with_fault(&f, "klatency", FaultRule::new(Fault::Latency(Duration::from_millis(200)))).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(got, block);

    // A key that really is missing: s3s-fs answers 404 NoSuchKey.
    std::fs::remove_file(f.root.path().join(BUCKET).join(PREFIX).join("blocks/kgone")).unwrap();
    f.server.clear_faults();
    let e = f.store.get("blocks/kgone", 1 << 20).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert_eq!(f.server.requests("kgone"), 1);

    // Rules run out: the first N matching requests only.
    f.server.add_fault(FaultRule::new(Fault::SlowDown).path_contains("k503").first(1));
    assert_eq!(f.store.get("blocks/k503", 1 << 20).await.unwrap_err().class, ErrorClass::Throttled);
    assert_eq!(f.store.get("blocks/k503", 1 << 20).await.unwrap(), block);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_cut_stalled_slow_and_late_answers() {
    let f = fixture().await;
    let block = pattern(256 * 1024, 5);
    for key in ["kstall", "kstall0", "ktrickle", "klate"] {
        f.store.put(&format!("blocks/{key}"), block.clone()).await.unwrap();
    }
    f.server.reset_stats();

    // Headers and some bytes, then nothing: the idle deadline (300 ms) fires.
    let started = Instant::now();
    let e = get_with_fault(&f, "kstall", FaultRule::new(Fault::Stall { after_bytes: 10_000 })).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(e.message.contains("stalled") && e.message.contains("10000 of 262144"), "{e}");
    assert!(took < Duration::from_secs(3), "stall cut after {took:?}");

    // Headers only.
    let started = Instant::now();
    let e = get_with_fault(&f, "kstall0", FaultRule::new(Fault::Stall { after_bytes: 0 })).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // 256 KiB at 32 KiB/s, floor 256 KiB/s after 300 ms: cut as a straggler.
    let started = Instant::now();
    let trickle = Fault::Trickle { bytes_per_sec: NonZeroU32::new(32 * 1024).unwrap() };
    // A generous idle timeout, so only the throughput floor can cut it.
    let patient = S3Config { body_idle_timeout_millis: 1_000, ..test_config(&f.server) };
    let store =
        S3Store::connect_with_static_credentials(BUCKET, PREFIX, &patient, &LoopbackS3::credentials()).await.unwrap();
    let e = get_with_fault_on(&f, &store, "ktrickle", FaultRule::new(trickle)).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(e.message.contains("floor"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // No headers within the attempt timeout (1 s).
    let started = Instant::now();
    let late = FaultRule::new(Fault::Latency(Duration::from_secs(5)));
    let e = get_with_fault(&f, "klate", late).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_faults_and_server_rate_limit() {
    let f = fixture().await;
    f.store.put("blocks/h", pattern(1000, 2)).await.unwrap();
    f.server.add_fault(FaultRule::new(Fault::NotFound).method(FaultMethod::Head).first(1));
    assert!(!f.store.exists("blocks/h").await.unwrap());
    assert!(f.store.exists("blocks/h").await.unwrap());
    f.server.add_fault(FaultRule::new(Fault::SlowDown).method(FaultMethod::Head).first(1));
    assert_eq!(f.store.exists("blocks/h").await.unwrap_err().class, ErrorClass::Throttled);
    f.server.add_fault(FaultRule::new(Fault::InternalError).method(FaultMethod::Put).first(1));
    assert_eq!(f.store.put("blocks/p", pattern(10, 1)).await.unwrap_err().class, ErrorClass::Transient);
    f.server.clear_faults();

    // The server's own token bucket answers 503 SlowDown past its burst.
    f.server.reset_stats();
    f.server.set_rate_limit(Some(ServerRateLimit {
        requests_per_sec: NonZeroU32::new(5).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
    }));
    let mut throttled = 0;
    for _ in 0..10 {
        match f.store.get("blocks/h", 1000).await {
            Ok(bytes) => assert_eq!(bytes.len(), 1000),
            Err(e) => {
                assert_eq!(e.class, ErrorClass::Throttled, "{e}");
                throttled += 1;
            }
        }
    }
    assert!(throttled >= 5, "{throttled} throttled");
    assert_eq!(f.server.slowdowns_sent(), throttled);
    assert_eq!(f.server.requests_total(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_at_the_server() {
    let f = fixture().await;
    f.store.put("blocks/r", pattern(4096, 4)).await.unwrap();
    f.server.reset_stats();
    let (rate, burst, n) = (40u32, 4u32, 60usize);
    let config = RateLimitConfig {
        requests_per_sec: NonZeroU32::new(rate),
        request_burst: NonZeroU32::new(burst),
        bytes_per_sec: NonZeroU64::new(64 << 20),
    };
    let inner: SharedStore = f.store.clone();
    let limited = Arc::new(RateLimited::new(inner, &config).unwrap());
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let store = limited.clone();
        tasks.spawn(async move { store.get("blocks/r", 4096).await.map(|b| b.len()) });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap(), 4096);
    }
    let elapsed = started.elapsed();
    let arrivals: Vec<Instant> = f.server.arrivals().iter().map(|a| a.at).collect();
    assert_eq!(arrivals.len(), n);
    // The limiter cannot be beaten: n requests take at least (n - burst)/rate.
    assert!(elapsed >= Duration::from_secs_f64((n as f64 - f64::from(burst)) / f64::from(rate)), "{elapsed:?}");
    // In any window, at most burst + rate × window arrived (+1 for the
    // window edge, +1 for arrival jitter between client and server).
    for window_ms in [100u64, 250, 500, 1000] {
        let window = Duration::from_millis(window_ms);
        let seen = max_arrivals_in_window(&arrivals, window);
        let allowed = burst as usize + (f64::from(rate) * window.as_secs_f64()).ceil() as usize + 2;
        assert!(seen <= allowed, "{seen} requests in {window_ms} ms, limit {allowed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_concurrency_shrinks_under_a_slowdown_storm() {
    let f = fixture().await;
    f.store.put("blocks/s", pattern(1000, 8)).await.unwrap();
    f.server.add_fault(FaultRule::new(Fault::SlowDown).method(FaultMethod::Get));
    let config = AdaptiveConcurrencyConfig {
        concurrency_min: std::num::NonZeroUsize::new(2).unwrap(),
        concurrency_max: std::num::NonZeroUsize::new(16).unwrap(),
        decrease_cooldown_millis: 0,
        ..AdaptiveConcurrencyConfig::default()
    };
    let inner: SharedStore = f.store.clone();
    let store = Arc::new(AdaptiveConcurrency::new(inner, &config).unwrap());
    for _ in 0..8 {
        assert_eq!(store.get("blocks/s", 1000).await.unwrap_err().class, ErrorClass::Throttled);
    }
    assert_eq!(store.current_limit(), 2);
    f.server.clear_faults();
    for _ in 0..40 {
        store.get("blocks/s", 1000).await.unwrap();
    }
    assert!(store.current_limit() > 2, "window did not grow back: {}", store.current_limit());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_permanent_and_a_dead_endpoint_is_transient() {
    let f = fixture().await;
    f.store.put("blocks/c", pattern(100, 6)).await.unwrap();
    let wrong = rehydrate::store::s3::StaticCredentials {
        access_key_id: LoopbackS3::credentials().access_key_id,
        secret_access_key: "not-the-secret".into(),
    };
    let intruder =
        S3Store::connect_with_static_credentials(BUCKET, PREFIX, &test_config(&f.server), &wrong).await.unwrap();
    let e = intruder.get("blocks/c", 100).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent, "{e}");
    assert!(e.message.contains("403"), "{e}");

    // Once the server is gone, connections are refused: worth a retry.
    let config = test_config(&f.server);
    f.server.shutdown().await;
    let e = f.store.get("blocks/c", 100).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    let store =
        S3Store::connect_with_static_credentials(BUCKET, PREFIX, &config, &LoopbackS3::credentials()).await.unwrap();
    let e = store.exists("blocks/c").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    eprintln!("dead endpoint: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_need_encoding_round_trip() {
    let f = fixture().await;
    let keys =
        ["blocks/with space", "blocks/plus+sign", "blocks/ünïcödé-€", "blocks/a=b&c;d,e:f@g", "blocks/%41-percent"];
    for (i, key) in keys.iter().enumerate() {
        let block = pattern(1000 + i, i as u8);
        f.store.put(key, block.clone()).await.unwrap();
        assert_eq!(f.store.get(key, 1 << 20).await.unwrap(), block, "{key}");
        assert!(f.store.exists(key).await.unwrap(), "{key}");
    }
    // "%41" is three characters of the key, not an escaped "A".
    assert!(f.store.get("blocks/A-percent", 1 << 20).await.is_err());
}
