//! Stores that throttle at limits nobody configured.
//!
//! Each test restores, with the default configuration (no `rate_limit`, the
//! default `attempts_max` of 4, hedging on), from the in-process S3 server
//! whose own token bucket answers `503 SlowDown` past a limit the client is
//! not told. The restore must complete byte-identical with no failed block:
//! it slows down to the store's rate instead of spending its attempts on
//! throttles. What the store saw is counted at the server.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::config::Config;
use rehydrate::manifest::Manifest;
use rehydrate::restore::{Engine, RestoreReport};
use rehydrate::sample::SampleVolume;
use rehydrate::store::loopback::{LoopbackS3, ServerRateLimit};

/// Small blocks, so a test sends many requests without moving many bytes.
const BLOCK_BYTES: u32 = 16 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    server: LoopbackS3,
    engine: Arc<Engine>,
}

async fn fixture(blocks: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let volume = SampleVolume { size_bytes: blocks * u64::from(BLOCK_BYTES), block_size_bytes: BLOCK_BYTES, seed };
    let file_url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&file_url);
    let server = LoopbackS3::start(dir.path().join("store")).await.unwrap();
    let mut config = Config::default();
    config.checkpoint.dir = Some(dir.path().join("state"));
    config.s3 = server.s3_config();
    config.validate().unwrap();
    let engine = engine_on_loopback(config, "snap").await;
    Fixture { dir, volume, manifest, server, engine }
}

fn limit(requests_per_sec: u32) -> Option<ServerRateLimit> {
    Some(ServerRateLimit {
        requests_per_sec: NonZeroU32::new(requests_per_sec).unwrap(),
        burst: NonZeroU32::new((requests_per_sec / 10).max(1)).unwrap(),
    })
}

impl Fixture {
    async fn restore(&self) -> RestoreReport {
        let manifest_url = format!("s3://bucket/snap/vol-{}.manifest", self.volume.seed);
        let target = self.dir.path().join("vol.img");
        let report = restore(&self.engine, &spec(&manifest_url, &target)).await.unwrap();
        check_ledger(&report, &self.manifest);
        assert!(report.succeeded, "{report:#?}");
        assert_eq!(report.blocks_failed, 0);
        check_identical(&self.manifest, &self.volume, &target);
        // The client's account of the throttles is the server's.
        assert_eq!(report.fetch.throttled_responses, self.server.slowdowns("/blocks/"), "{:?}", report.fetch);
        assert_eq!(report.fetch.fallbacks, 0, "no secondary: nothing fell through");
        eprintln!(
            "{} blocks in {:.2}s: {} requests at the server, {} SlowDown, throttled {} ms, rate {:?}",
            report.blocks_total,
            report.duration_secs,
            self.server.requests_total(),
            self.server.slowdowns_sent(),
            report.fetch.throttled_millis,
            report.fetch.request_rate_per_source
        );
        report
    }

    /// Requests that arrived at the server within `[from, to)`.
    fn arrivals_between(&self, from: Instant, to: Instant) -> usize {
        self.server.arrivals().iter().filter(|a| a.at >= from && a.at < to).count()
    }
}

/// Restore under a fixed server-side limit the client does not know.
async fn completes_under(requests_per_sec: u32, blocks: u64, seed: u64) -> (Fixture, RestoreReport) {
    let f = fixture(blocks, seed).await;
    f.server.set_rate_limit(limit(requests_per_sec));
    let report = f.restore().await;
    (f, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_under_an_unknown_limit_of_40_per_sec() {
    let (f, report) = completes_under(40, 160, 401).await;
    assert!(f.server.slowdowns_sent() > 0, "the limit was never reached: the test tests nothing");
    assert!(report.fetch.throttled_millis > 0);
    let (_, rate) = &report.fetch.request_rate_per_source[0];
    assert!(*rate <= 80, "settled at {rate} req/s against a limit of 40");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_under_an_unknown_limit_of_300_per_sec() {
    let (f, _) = completes_under(300, 900, 402).await;
    assert!(f.server.slowdowns_sent() > 0, "the limit was never reached: the test tests nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_under_an_unknown_limit_of_2000_per_sec() {
    // A debug build on two shared cores may not reach 2,000 requests per
    // second; whether or not it does, the restore completes.
    completes_under(2000, 3000, 403).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_a_limit_that_drops_and_comes_back() {
    let f = Arc::new(fixture(2000, 404).await);
    f.server.set_rate_limit(limit(300));
    let started = Instant::now();
    let (drop_at, rise_at) = (started + Duration::from_secs(2), started + Duration::from_secs(10));
    let schedule = {
        let f = Arc::clone(&f);
        tokio::spawn(async move {
            tokio::time::sleep_until(drop_at.into()).await;
            f.server.set_rate_limit(limit(60));
            tokio::time::sleep_until(rise_at.into()).await;
            f.server.set_rate_limit(limit(300));
        })
    };
    let report = f.restore().await;
    schedule.abort();
    assert!(report.duration_secs > 10.0, "the restore outlived the low limit: {report:#?}");
    assert!(f.server.slowdowns_sent() > 0);
    // Five seconds after the drop the client is back under the new limit:
    // what arrived at the server (throttled requests included) in the last
    // three seconds of the low spell is near 60 per second, not 300.
    let arrived = f.arrivals_between(drop_at + Duration::from_secs(5), rise_at);
    assert!(arrived <= 3 * 78, "{arrived} requests in 3 s against a limit of 60/s");
}
