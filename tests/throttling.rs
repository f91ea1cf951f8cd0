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
    fixture_with(blocks, seed, |_| {}).await
}

/// [`fixture`], with the default configuration changed by `tune`.
async fn fixture_with(blocks: u64, seed: u64, tune: impl FnOnce(&mut Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let volume = SampleVolume { size_bytes: blocks * u64::from(BLOCK_BYTES), block_size_bytes: BLOCK_BYTES, seed };
    let file_url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&file_url);
    let server = LoopbackS3::start(dir.path().join("store")).await.unwrap();
    let mut config = Config::default();
    config.checkpoint.dir = Some(dir.path().join("state"));
    config.s3 = server.s3_config();
    tune(&mut config);
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
        // The client's account of the throttles is the server's, but for
        // the answers of hedge losers: a losing attempt is dropped, which
        // cancels it, and a SlowDown the server had already sent it is never
        // read. At most one per hedge.
        let sent = self.server.slowdowns("/blocks/");
        let seen = report.fetch.throttled_responses;
        assert!(
            seen <= sent && sent - seen <= report.fetch.hedges,
            "{sent} SlowDowns sent, {seen} seen: {:?}",
            report.fetch
        );
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

/// A reader that scans a volume exported while it is restored (as `nbdcopy`
/// does: many reads in flight, ahead of the background) from a store that
/// throttles at 40 requests per second. Its requests go first; the
/// background waits behind them, longer than the acquire timeout (here
/// 500 ms), and must not count that as a saturated store: before, the
/// background failed blocks with "no concurrency slot", and readers'
/// requests, sent on pacer slots reserved before the rate was cut, kept the
/// learned rate at its floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_scanning_an_exported_volume_never_fail_the_background() {
    use rehydrate::restore::live::LiveVolume;
    use rehydrate::restore::progress::Progress;
    use rehydrate::restore::{Publish, restore_live};
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    let blocks = 160;
    let f = fixture_with(blocks, 405, |c| c.concurrency.acquire_timeout_millis = 500).await;
    let Fixture { dir, volume, manifest, server, engine } = &f;
    server.set_rate_limit(limit(40));

    let target = dir.path().join("vol.img");
    let spec = spec(&format!("s3://bucket/snap/vol-{}.manifest", volume.seed), &target);
    let engine = Arc::clone(engine);
    let (tx, mut rx) = watch::channel::<Option<Arc<LiveVolume>>>(None);
    let publish: Publish = Arc::new(move |v| {
        tx.send_replace(Some(v));
    });
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let restore = tokio::spawn(async move { restore_live(&engine, &spec, &progress, &cancel, publish).await });
    let live = rx.wait_for(Option::is_some).await.unwrap().clone().unwrap();
    // 32 readers, each reading every 32nd block in order.
    let source = Arc::new(std::fs::read(dir.path().join(format!("source-{}.img", volume.seed))).unwrap());
    let mut readers = tokio::task::JoinSet::new();
    for first in 0..32 {
        let (live, source) = (Arc::clone(&live), Arc::clone(&source));
        readers.spawn(async move {
            for index in (first..blocks).step_by(32) {
                let at = index * u64::from(BLOCK_BYTES);
                let got = live.read(at, BLOCK_BYTES).await.unwrap();
                assert!(got == source[at as usize..(at + u64::from(BLOCK_BYTES)) as usize], "block {index}");
            }
        });
    }
    while let Some(done) = readers.join_next().await {
        done.unwrap();
    }
    let report = match tokio::time::timeout(Duration::from_secs(120), restore).await.unwrap().unwrap() {
        Ok(report) => report,
        Err(e) => panic!("the restore failed while readers scanned the volume: {e}"),
    };
    check_ledger(&report, manifest);
    assert!(report.objects_from_export > 0, "{report:#?}");
    assert!(server.slowdowns_sent() > 0, "the limit was never reached: the test tests nothing");
    assert_eq!(report.blocks_failed, 0, "{report:#?}");
    assert!(report.succeeded);
    check_identical(manifest, volume, &target);
    let on_demand = live.counts.demand_fetches.load(std::sync::atomic::Ordering::Relaxed);
    assert!(on_demand > 0, "no read went ahead of the background: the test tests nothing");
    eprintln!(
        "{blocks} blocks in {:.2}s, {on_demand} on demand: {} requests at the server, {} SlowDown",
        report.duration_secs,
        server.requests_total(),
        server.slowdowns_sent()
    );
}
