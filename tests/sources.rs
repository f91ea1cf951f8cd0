//! Sources that never wedge: end-to-end restores over real HTTP.
//!
//! Each test snapshots a sample volume into `<dir>/store/bucket/snap`, serves
//! `<dir>/store` with [`LoopbackS3`] (the real `aws-sdk-s3` client in
//! [`S3Store`], wrapped in the production policies: rate limit, adaptive
//! concurrency, attempt deadline) as `s3://bucket/snap`, and restores from it
//! with a `file://` secondary holding the same objects. One test per row of
//! the fault table in TESTING.md that concerns sources. Every test ends with
//! the ledger oracle and with request counts taken at the server (and at the
//! secondary, through a counting [`FaultStore`]), never only from
//! rehydrate's own report: exact counts per faulted key, and never more than
//! `attempts_max` unthrottled requests per block per source.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rehydrate::block::{BlockIndex, Compression, HashAlgorithm, block_key};
use rehydrate::config::Config;
use rehydrate::error::ErrorClass;
use rehydrate::manifest::Manifest;
use rehydrate::restore::progress::Progress;
use rehydrate::restore::{Engine, RestoreError, RestoreReport, RestoreSpec};
use rehydrate::sample::SampleVolume;
use rehydrate::store::StoreUrl;
use rehydrate::store::fault::FaultStore;
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::file::FileStore;
use rehydrate::store::loopback::{LoopbackS3, ServerRateLimit, max_arrivals_in_window};
use rehydrate::store::s3::S3Config;
use rehydrate::write::BackendChoice;
use tokio_util::sync::CancellationToken;

/// Attempts per block per source in every test.
const ATTEMPTS_MAX: u32 = 3;
/// The per-attempt deadline (body included) in every test.
const ATTEMPT_TIMEOUT_MILLIS: u64 = 1_000;

/// A restore wired to a loopback S3 primary and a counted file secondary.
struct Fixture {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    server: LoopbackS3,
    engine: Arc<Engine>,
    /// Where the secondary reads: the primary's own objects unless the test
    /// asked for a separate mirror.
    secondary_root: PathBuf,
    secondary: Arc<FaultStore>,
}

/// What differs between tests.
struct Setup {
    blocks: u64,
    seed: u64,
    /// The secondary is a copy of the store (so it can differ), not the
    /// store's own directory.
    mirror: bool,
    tune: fn(&mut Config),
}

impl Setup {
    fn new(blocks: u64, seed: u64) -> Self {
        Setup { blocks, seed, mirror: false, tune: |_| {} }
    }
}

/// Small deadlines so every cut fires in about a second: S3 body idle 300 ms,
/// attempt 1 s, 3 attempts, backoff 5-20 ms, fdatasync + checkpoint every
/// 50 ms. No hedging: these tests count the retry policy's requests exactly
/// (hedging has its own tests in `src/fetch.rs`).
fn test_config(state: &Path, server: &LoopbackS3) -> Config {
    let mut c = config(BackendChoice::Pwrite, state);
    c.fetch.hedge.enabled = false;

    c.fetch.attempt_timeout_millis = NonZeroU64::new(ATTEMPT_TIMEOUT_MILLIS).unwrap();
    c.fetch.attempts_max = NonZeroU32::new(ATTEMPTS_MAX).unwrap();
    c.fetch.backoff_base_millis = NonZeroU64::new(5).unwrap();
    c.fetch.backoff_cap_millis = NonZeroU64::new(20).unwrap();
    c.checkpoint.interval_millis = NonZeroU64::new(50).unwrap();
    c.s3 = S3Config {
        connect_timeout_millis: 1_000,
        operation_attempt_timeout_millis: 1_000,
        operation_timeout_millis: 2_000,
        body_deadline_millis: 2_000,
        body_idle_timeout_millis: 300,
        body_throughput_min_bytes_per_sec: 64 * 1024,
        body_throughput_grace_millis: 500,
        ..server.s3_config()
    };
    c
}

async fn fixture(setup: Setup) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(setup.blocks, setup.seed);
    let file_url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&file_url);
    let server = LoopbackS3::start(dir.path().join("store")).await.unwrap();
    let mut config = test_config(&dir.path().join("state"), &server);
    (setup.tune)(&mut config);
    config.validate().unwrap();

    let engine = engine_on_loopback(config, "snap").await;

    let secondary_root = if setup.mirror {
        let mirror = dir.path().join("mirror");
        rehydrate::store::file::copy_tree(&store_root(dir.path()), &mirror).unwrap();
        mirror
    } else {
        store_root(dir.path())
    };
    let mut f = Fixture {
        secondary: Arc::new(FaultStore::new(Arc::new(FileStore::new(secondary_root.clone())))),
        dir,
        volume,
        manifest,
        server,
        engine,
        secondary_root,
    };
    f.fresh_counters();
    f
}

impl Fixture {
    fn manifest_url(&self) -> String {
        format!("s3://bucket/snap/vol-{}.manifest", self.volume.seed)
    }

    fn target(&self) -> PathBuf {
        let out = self.dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        out.join("vol.img")
    }

    /// Restore into [`Self::target`] with the file secondary.
    fn spec(&self) -> RestoreSpec {
        let mut s = spec(&self.manifest_url(), &self.target());
        s.secondaries = vec![format!("file://{}", self.secondary_root.display())];
        s
    }

    /// Forget the server's arrival log and count the secondary's calls
    /// afresh (a new counting store replaces the old one in the engine).
    fn fresh_counters(&mut self) {
        self.server.reset_stats();
        self.secondary = Arc::new(FaultStore::new(Arc::new(FileStore::new(self.secondary_root.clone()))));
        self.engine.register_store(StoreUrl::File { root: self.secondary_root.clone() }, self.secondary.clone());
    }

    async fn restore(&self, spec: &RestoreSpec) -> Result<RestoreReport, RestoreError> {
        run_restore(&self.engine, spec, &Arc::new(Progress::default())).await
    }

    /// The object key of the block at `index`.
    fn key(&self, index: BlockIndex) -> String {
        let e = self.manifest.entry(index).expect("a data block");
        block_key(&e.hash, e.compression)
    }

    /// The blocks that hold the object of the block at `index` (duplicates).
    fn blocks_of(&self, index: BlockIndex) -> Vec<BlockIndex> {
        let e = self.manifest.entry(index).expect("a data block");
        self.manifest
            .entries()
            .iter()
            .filter(|o| (o.hash, o.compression) == (e.hash, e.compression))
            .map(|o| o.index)
            .collect()
    }

    fn object_path(&self, root: &Path, index: BlockIndex) -> PathBuf {
        root.join(self.key(index))
    }

    /// Distinct object keys of the manifest.
    fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.manifest.entries().iter().map(|e| block_key(&e.hash, e.compression)).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// GETs of block objects the server saw, by object key.
    fn server_gets(&self) -> HashMap<String, u64> {
        let mut gets = HashMap::new();
        for a in self.server.arrivals() {
            if a.method == hyper::Method::GET
                && let Some((_, key)) = a.path.split_once("/snap/")
                && key.starts_with("blocks/")
            {
                *gets.entry(key.to_owned()).or_default() += 1;
            }
        }
        gets
    }

    /// Requests the server saw for one object key.
    fn server_requests(&self, key: &str) -> u64 {
        self.server.requests(&format!("/snap/{key}"))
    }

    /// Invariant of every test: never more than `attempts_max` requests per
    /// block object per source in one run that the store did not answer
    /// `503 SlowDown` (a throttled answer spends no attempt: the retry waits
    /// for the store's adapted rate instead), counted at the server and at
    /// the secondary.
    fn check_attempts_bounded(&self) {
        let keys = self.keys();
        for (key, n) in self.server_gets() {
            assert!(keys.contains(&key), "the primary was asked for {key}, which the manifest does not name");
            let spent = n - self.server.slowdowns(&format!("/snap/{key}"));
            assert!(
                spent <= u64::from(ATTEMPTS_MAX),
                "{key}: {spent} unthrottled requests on the primary, limit {ATTEMPTS_MAX}"
            );
        }
        for key in &keys {
            let n = self.secondary.calls(key);
            assert!(n <= u64::from(ATTEMPTS_MAX), "{key}: {n} requests on the secondary, limit {ATTEMPTS_MAX}");
        }
    }

    /// The ledger, byte-identity, and the bound on attempts.
    fn check_success(&self, report: &RestoreReport) {
        check_ledger(report, &self.manifest);
        assert!(report.succeeded, "{report:#?}");
        check_identical(&self.manifest, &self.volume, &self.target());
        self.check_attempts_bounded();
    }
}

async fn run_restore(
    engine: &Engine,
    spec: &RestoreSpec,
    progress: &Arc<Progress>,
) -> Result<RestoreReport, RestoreError> {
    rehydrate::restore::restore(engine, spec, progress, &CancellationToken::new()).await
}

fn served(report: &RestoreReport) -> HashMap<String, u64> {
    report.fetch.served_by_source.iter().cloned().collect()
}

/// A block whose object no other block shares (`i % 8` is 0, 1, 2, 4 or 6
/// in a sample volume).
const UNIQUE_BLOCK: BlockIndex = 9;
/// A block whose object is shared by a duplicate (`i % 8 == 3`; block
/// `i + 4` repeats it).
const SHARED_BLOCK: BlockIndex = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_is_cut_by_the_attempt_deadline_and_never_holds_up_other_blocks() {
    let f = fixture(Setup {
        // Only the attempt deadline (1 s) can cut a stall here: the S3
        // client's own body guards are set far beyond it.
        tune: |c| {
            c.s3.body_idle_timeout_millis = 20_000;
            c.s3.body_deadline_millis = 30_000;
            c.s3.body_throughput_grace_millis = 20_000;
        },
        ..Setup::new(40, 31)
    })
    .await;
    let victim = UNIQUE_BLOCK;
    assert_eq!(f.blocks_of(victim), vec![victim], "the victim must not share its object");
    let key = f.key(victim);
    f.server.add_fault(FaultRule::new(Fault::Stall { after_bytes: 1000 }).path_contains(&key));

    let progress = Arc::new(Progress::default());
    let task = {
        let (engine, spec, progress) = (f.engine.clone(), f.spec(), progress.clone());
        tokio::spawn(async move { run_restore(&engine, &spec, &progress).await })
    };
    // Head of line: while the victim is wedged on the primary, every other
    // block settles. Polled until the restore ends (bounded by its own
    // deadlines: 3 attempts of 1 s, then the secondary).
    let mut seen_everything_else_settled = false;
    let mut seen_wedged = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !task.is_finished() {
        assert!(Instant::now() < deadline, "the restore did not end");
        let total = progress.blocks_total.load(std::sync::atomic::Ordering::Relaxed);
        let settled = progress.blocks_settled.load(std::sync::atomic::Ordering::Relaxed);
        let oldest = progress.telemetry().and_then(|t| t.oldest_inflight());
        if let Some(inflight) = &oldest
            && inflight.block == victim
            && inflight.source == "primary"
        {
            seen_wedged = true;
            if total > 0 && settled == total - 1 {
                seen_everything_else_settled = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = task.await.unwrap().unwrap();
    assert!(seen_wedged, "the victim was never seen in flight on the primary");
    assert!(seen_everything_else_settled, "other blocks did not all settle while the victim was wedged on the primary");

    f.check_success(&report);
    assert_eq!(f.server_requests(&key), u64::from(ATTEMPTS_MAX), "requests for the stalled key");
    assert_eq!(f.secondary.calls(&key), 1);
    assert_eq!(served(&report)["secondary1"], 1, "{report:#?}");
    assert_eq!(served(&report)["primary"], report.objects_planned - 1);
    assert_eq!(report.fetch.retries, u64::from(ATTEMPTS_MAX) - 1);
    assert_eq!(report.fetch.fallbacks, 1);
    // Every other object took exactly one request.
    for (k, n) in f.server_gets() {
        if k != key {
            assert_eq!(n, 1, "{k}");
        }
    }

    // What cut each attempt: the attempt deadline, through the same store.
    let primary = f.engine.open_store(&StoreUrl::S3 { bucket: "bucket".into(), prefix: "snap".into() }).await.unwrap();
    let e = primary.get(&key, 1 << 20).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Transient, "{e}");
    assert!(e.message.contains("attempt deadline"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_on_the_primary_goes_straight_to_the_secondary() {
    let f = fixture(Setup::new(24, 32)).await;
    let victims: Vec<String> = [1, 4, 10].iter().map(|&i| f.key(i)).collect();
    for key in &victims {
        f.server.add_fault(FaultRule::new(Fault::NotFound).path_contains(key));
    }
    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    for key in &victims {
        assert_eq!(f.server_requests(key), 1, "{key}: a 404 is not retried");
        assert_eq!(f.secondary.calls(key), 1, "{key}");
    }
    assert_eq!(served(&report)["secondary1"], 3);
    assert_eq!(report.fetch.fallbacks, 3);
    assert_eq!(report.fetch.retries, 0);
    assert_eq!(f.secondary.calls("blocks/"), 3, "only the 404 keys reached the secondary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowdown_storm_completes_and_the_request_rate_holds_at_the_server() {
    const RATE: u32 = 30;
    const BURST: u32 = 3;
    let f = fixture(Setup {
        tune: |c| {
            c.rate_limit.requests_per_sec = NonZeroU32::new(RATE);
            c.rate_limit.request_burst = NonZeroU32::new(BURST);
        },
        ..Setup::new(48, 33)
    })
    .await;
    // The server admits less than the client sends (a storm that lasts the
    // whole restore), and the first requests for blocks are all refused. The
    // queue at the client's limiter (about 60 requests at 30/s) is longer
    // than the attempt deadline: waiting for a token must not count against
    // an attempt, or healthy blocks time out before they are even sent.
    f.server.set_rate_limit(Some(ServerRateLimit {
        requests_per_sec: NonZeroU32::new(24).unwrap(),
        burst: NonZeroU32::new(3).unwrap(),
    }));
    f.server.add_fault(FaultRule::new(Fault::SlowDown).method(FaultMethod::Get).path_contains("/blocks/").first(8));

    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    let slowdowns = f.server.slowdowns_sent();
    eprintln!(
        "DEBUG slowdowns {slowdowns} gets {} total {} fetch {:?}",
        f.server_gets().values().sum::<u64>(),
        f.server.requests_total(),
        report.fetch
    );
    assert!(slowdowns >= 8, "{slowdowns} SlowDown answers");
    // Every SlowDown was answered by a retry on the primary, or, after the
    // last attempt, by the secondary; nothing else failed.
    assert_eq!(slowdowns, report.fetch.retries + report.fetch.fallbacks, "{report:#?}");
    assert_eq!(f.secondary.calls("blocks/"), report.fetch.fallbacks);
    // Requests at the server: every attempt on the primary, and the manifest.
    let block_gets: u64 = f.server_gets().values().sum();
    assert_eq!(block_gets, report.fetch.requests - report.fetch.fallbacks);
    assert_eq!(f.server.requests_total(), block_gets + 1);

    // The client's limit held at the server, retries included: in any window
    // at most burst + rate x window arrived (+1 for the window edge, +1 for
    // the jitter between the limiter's clock and the server's arrival stamp).
    let arrivals: Vec<Instant> = f.server.arrivals().iter().map(|a| a.at).collect();
    for window_ms in [100u64, 250, 500, 1000] {
        let window = Duration::from_millis(window_ms);
        let seen = max_arrivals_in_window(&arrivals, window);
        let allowed = BURST as usize + (f64::from(RATE) * window.as_secs_f64()).ceil() as usize + 2;
        assert!(seen <= allowed, "{seen} requests in {window_ms} ms, limit {allowed}");
    }
    eprintln!(
        "storm: {} requests, {} SlowDown, {} retries, {} fallbacks in {:.2}s",
        f.server.requests_total(),
        slowdowns,
        report.fetch.retries,
        report.fetch.fallbacks,
        report.duration_secs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_are_retried_and_served_by_the_primary() {
    const K: u64 = 2;
    assert!(K < u64::from(ATTEMPTS_MAX));
    let f = fixture(Setup::new(24, 34)).await;
    let victims: Vec<String> = [0, 6, 12].iter().map(|&i| f.key(i)).collect();
    for key in &victims {
        f.server.add_fault(FaultRule::new(Fault::InternalError).path_contains(key).first(K));
    }
    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    for key in &victims {
        assert_eq!(f.server_requests(key), K + 1, "{key}");
    }
    assert_eq!(served(&report)["primary"], report.objects_planned);
    assert_eq!(served(&report)["secondary1"], 0);
    assert_eq!(report.fetch.retries, K * victims.len() as u64);
    assert_eq!(report.fetch.fallbacks, 0);
    assert_eq!(f.secondary.calls("blocks/"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_body_is_never_written_and_comes_from_the_next_source() {
    let mut f = fixture(Setup { mirror: true, ..Setup::new(24, 35) }).await;
    let victim = UNIQUE_BLOCK;
    let key = f.key(victim);
    f.server.add_fault(FaultRule::new(Fault::Corrupt).path_contains(&key));
    // The mirror's copy is damaged too at first, so the block stays
    // unwritten and the marker shows whether corrupt bytes ever landed.
    let mirror_object = f.object_path(&f.secondary_root, victim);
    let good = std::fs::read(&mirror_object).unwrap();
    let mut bad = good.clone();
    bad[500] ^= 0x10;
    std::fs::write(&mirror_object, &bad).unwrap();

    let target = f.target();
    std::fs::write(&target, vec![0xCD; f.volume.size_bytes as usize]).unwrap();
    let mut s = f.spec();
    s.in_place = true;
    let err = f.restore(&s).await.unwrap_err();
    let RestoreError::BlocksFailed(report) = &err else { panic!("expected BlocksFailed, got {err}") };
    check_ledger(report, &f.manifest);
    assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), vec![victim]);
    let failures = &report.damage[0].failures;
    assert_eq!(failures.iter().map(|x| x.source.as_str()).collect::<Vec<_>>(), ["primary", "secondary1"]);
    for failure in failures {
        assert_eq!(failure.last_error.class, ErrorClass::Corrupt, "{failure:?}");
        assert_eq!(failure.attempts, 1, "a corrupt answer is not retried: {failure:?}");
    }
    assert_eq!(f.server_requests(&key), 1, "a corrupt key is not retried on the primary");
    assert_eq!(f.secondary.calls(&key), 1);
    f.check_attempts_bounded();
    let data = std::fs::read(&target).unwrap();
    let offset = f.manifest.layout.offset(victim) as usize;
    assert!(data[offset..offset + BLOCK as usize].iter().all(|&b| b == 0xCD), "corrupt bytes reached the target");
    let readback = rehydrate::restore::readback::readback(&f.manifest, &target).unwrap();
    assert_eq!(readback.mismatched, vec![victim], "everything else was restored");

    // The mirror is repaired: the rerun resumes, asks the primary once more
    // (still corrupt), and the secondary serves the block.
    std::fs::write(&mirror_object, &good).unwrap();
    f.fresh_counters();
    let report = f.restore(&s).await.unwrap();
    f.check_success(&report);
    assert_eq!(report.blocks_resumed, report.blocks_total - 1);
    assert_eq!(report.objects_planned, 1);
    assert_eq!(f.server_requests(&key), 1);
    assert_eq!(f.server_gets().values().sum::<u64>(), 1, "the rerun fetched more than the failed block");
    assert_eq!(served(&report)["secondary1"], 1);
    assert_eq!(report.fetch.corrupt_responses, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_retried_then_served_by_the_next_source() {
    let f = fixture(Setup::new(24, 36)).await;
    // Once: a retry on the primary serves it. Always: the secondary does.
    let (once, always) = (f.key(2), f.key(UNIQUE_BLOCK));
    f.server.add_fault(FaultRule::new(Fault::Truncate { bytes: 1000 }).path_contains(&once).first(1));
    f.server.add_fault(FaultRule::new(Fault::Truncate { bytes: 20_000 }).path_contains(&always));
    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    assert_eq!(f.server_requests(&once), 2);
    assert_eq!(f.server_requests(&always), u64::from(ATTEMPTS_MAX));
    assert_eq!(f.secondary.calls(&once), 0);
    assert_eq!(f.secondary.calls(&always), 1);
    assert_eq!(served(&report)["secondary1"], 1);
    assert_eq!(report.fetch.retries, 1 + u64::from(ATTEMPTS_MAX) - 1);
    assert_eq!(report.fetch.fallbacks, 1);
    assert_eq!(report.fetch.corrupt_responses, 0, "a short body is transient, not corrupt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_on_every_request_completes() {
    let f = fixture(Setup::new(24, 37)).await;
    f.server.add_fault(FaultRule::new(Fault::Latency(Duration::from_millis(150))));
    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    assert_eq!(served(&report)["primary"], report.objects_planned);
    assert_eq!(report.fetch.retries, 0);
    let gets = f.server_gets();
    assert_eq!(gets.len() as u64, report.objects_planned);
    assert!(gets.values().all(|&n| n == 1), "{gets:?}");
    assert_eq!(f.server.faults_applied(), f.server.requests_total(), "every request was delayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_missing_everywhere_fails_the_job_and_a_rerun_fetches_only_it() {
    let mut f = fixture(Setup::new(32, 38)).await;
    let victim = SHARED_BLOCK;
    let victims = f.blocks_of(victim);
    assert_eq!(victims, vec![victim, victim + 4]);
    let key = f.key(victim);
    // Primary and secondary read the same directory: gone from both.
    let object = f.object_path(&store_root(f.dir.path()), victim);
    let saved = std::fs::read(&object).unwrap();
    std::fs::remove_file(&object).unwrap();

    let target = f.target();
    let err = f.restore(&f.spec()).await.unwrap_err();
    let RestoreError::BlocksFailed(report) = &err else { panic!("expected BlocksFailed, got {err}") };
    check_ledger(report, &f.manifest);
    assert!(err.to_string().contains(&format!("block {victim}")), "{err}");
    assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), victims);
    for damaged in &report.damage {
        let sources: Vec<&str> = damaged.failures.iter().map(|x| x.source.as_str()).collect();
        assert_eq!(sources, ["primary", "secondary1"], "{damaged:?}");
        for failure in &damaged.failures {
            assert_eq!(failure.last_error.class, ErrorClass::Permanent, "{failure:?}");
            assert_eq!(failure.attempts, 1, "{failure:?}");
            assert!(failure.last_error.message.contains(key.trim_start_matches("blocks/")), "{failure:?}");
        }
        assert!(damaged.failures[0].last_error.message.contains("404"), "{damaged:?}");
    }
    assert_eq!(report.blocks_settled, report.blocks_total - victims.len() as u64);
    assert_eq!(f.server_requests(&key), 1);
    assert_eq!(f.secondary.calls(&key), 1);
    f.check_attempts_bounded();
    // Everything else is in the (kept) staging file.
    assert!(!target.exists(), "a failed restore was swapped into place");
    let staging = rehydrate::target::staging_path(&target).unwrap();
    let readback = rehydrate::restore::readback::readback(&f.manifest, &staging).unwrap();
    assert_eq!(readback.mismatched, victims);

    // The object comes back: the rerun fetches it and nothing else.
    std::fs::write(&object, &saved).unwrap();
    f.fresh_counters();
    let report = f.restore(&f.spec()).await.unwrap();
    f.check_success(&report);
    assert_eq!(report.blocks_resumed, report.blocks_total - victims.len() as u64);
    assert_eq!(f.server_gets(), HashMap::from([(key.clone(), 1)]), "the rerun fetched more than the failed block");
    assert_eq!(f.secondary.calls("blocks/"), 0);
    assert_eq!(served(&report)["primary"], 1);
}
