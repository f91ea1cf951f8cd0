//! The durable settled cursor, library level: an interrupted restore resumes
//! from its checkpoint and fetches nothing it had settled; a checkpoint that
//! belongs to another restore, names another file, is torn or corrupt, or
//! whose staging file is gone is refused with a message saying what to do,
//! and nothing is modified.
//!
//! Fetches are counted at the store ([`FaultStore`]), not through rehydrate's
//! report. The store answers each block late and at most two at a time, so a
//! restore lasts long enough to be interrupted part way.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::collections::HashMap;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::checkpoint::{Checkpoint, checkpoint_key};
use rehydrate::manifest::Manifest;
use rehydrate::restore::progress::Progress;
use rehydrate::restore::{Engine, RestoreError};
use rehydrate::store::StoreUrl;
use rehydrate::store::fault::{Fault, FaultRule, FaultStore};
use rehydrate::store::file::FileStore;
use rehydrate::store::limit::AdaptiveConcurrencyConfig;
use rehydrate::write::BackendChoice;
use tokio_util::sync::CancellationToken;

/// Blocks in the test volumes (plus a short tail).
const BLOCKS: u64 = 160;
/// Every block GET waits this long at the store.
const BLOCK_DELAY: Duration = Duration::from_millis(15);
/// Interrupt once at least this many blocks are settled.
const SETTLED_BEFORE_INTERRUPT: u64 = 30;
/// Longest a test waits for a restore to reach that point.
const DEADLINE: Duration = Duration::from_secs(60);

struct Fixture {
    dir: tempfile::TempDir,
    engine: Arc<Engine>,
    counted: Arc<FaultStore>,
    target: PathBuf,
    state: PathBuf,
}

impl Fixture {
    /// A slow, counting store and an engine with a small checkpoint interval.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = store_root(dir.path());
        std::fs::create_dir_all(&root).unwrap();
        let state = dir.path().join("state");
        let mut config = config(BackendChoice::Auto, &state);
        config.checkpoint.interval_millis = NonZeroU64::new(20).unwrap();
        config.checkpoint.interval_bytes = NonZeroU64::new(4 * u64::from(BLOCK)).unwrap();
        let counted = Arc::new(FaultStore::new(Arc::new(FileStore::new(root.clone()))));
        counted.add(FaultRule::new(Fault::Latency(BLOCK_DELAY)).path_contains("blocks/"));
        // Two blocks at a time, through the production stack.
        config.concurrency = AdaptiveConcurrencyConfig {
            concurrency_min: NonZeroUsize::new(1).unwrap(),
            concurrency_max: NonZeroUsize::new(2).unwrap(),
            ..AdaptiveConcurrencyConfig::default()
        };
        let engine = Engine::new(config);
        engine.register_remote_store(StoreUrl::File { root }, counted.clone()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        Fixture { target: out.join("vol.img"), dir, engine: Arc::new(engine), counted, state }
    }

    async fn snapshot(&self, seed: u64) -> (String, Manifest, rehydrate::sample::SampleVolume) {
        let vol = volume(BLOCKS, seed);
        let url = snapshot(self.dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
        let manifest = load_manifest(&url);
        (url, manifest, vol)
    }

    fn staging(&self) -> PathBuf {
        rehydrate::target::staging_path(&self.target).unwrap()
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.state.join(format!("{}.ckpt", checkpoint_key(&self.target)))
    }

    /// Fetches at the store so far, per block object key.
    fn calls_per_key(&self, manifest: &Manifest) -> HashMap<String, u64> {
        manifest
            .entries()
            .iter()
            .map(|e| block_key(&e.hash, e.compression))
            .map(|key| {
                let calls = self.counted.calls(&key);
                (key, calls)
            })
            .collect()
    }

    /// Start a restore, cancel it once some blocks are settled, and expect it
    /// to stop as interrupted, keeping its staging file and checkpoint.
    async fn interrupt(&self, url: &str) -> Arc<Progress> {
        let progress = Arc::new(Progress::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let (engine, spec, progress, cancel) =
                (self.engine.clone(), spec(url, &self.target), progress.clone(), cancel.clone());
            async move { rehydrate::restore::restore(&engine, &spec, &progress, &cancel).await }
        });
        let started = Instant::now();
        while progress.blocks_settled.load(Ordering::Relaxed) < SETTLED_BEFORE_INTERRUPT {
            assert!(!task.is_finished(), "the restore ended before it could be interrupted");
            assert!(started.elapsed() < DEADLINE, "nothing settled within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cancel.cancel();
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(err, RestoreError::Interrupted(_)), "expected Interrupted, got {err}");
        assert!(err.to_string().contains("rerun"), "{err}");
        let settled = progress.blocks_settled.load(Ordering::Relaxed);
        assert!(settled < progress.blocks_total.load(Ordering::Relaxed), "interrupted after the end");
        assert!(self.staging().is_file(), "the staging file of an interrupted restore is kept");
        let checkpoint = self.read_checkpoint();
        assert_eq!(checkpoint.settled().settled_count(), settled, "the checkpoint holds what was settled");
        progress
    }

    fn read_checkpoint(&self) -> Checkpoint {
        Checkpoint::decode(&std::fs::read(self.checkpoint_path()).expect("the checkpoint is kept")).unwrap()
    }
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_restore_resumes_and_refetches_nothing_settled() {
    let fx = Fixture::new();
    let (url, manifest, vol) = fx.snapshot(1).await;
    fx.interrupt(&url).await;
    let checkpoint = fx.read_checkpoint();
    let settled_at_interrupt = checkpoint.settled().settled_count();
    let before = fx.calls_per_key(&manifest);

    let report = restore(&fx.engine, &spec(&url, &fx.target)).await.unwrap();
    check_ledger(&report, &manifest);
    assert!(report.succeeded);
    assert_eq!(report.blocks_resumed, settled_at_interrupt);
    assert!(report.blocks_resumed > 0);
    check_identical(&manifest, &vol, &fx.target);
    assert_eq!(staging_files(fx.target.parent().unwrap()), Vec::<String>::new());
    assert!(!fx.checkpoint_path().exists(), "the checkpoint outlived the restore");

    // Counted at the store: an object whose blocks were all settled at the
    // interruption is not fetched again; each other object once.
    let after = fx.calls_per_key(&manifest);
    let mut unsettled_objects: HashMap<&str, bool> = HashMap::new();
    for entry in manifest.entries() {
        let key = block_key(&entry.hash, entry.compression);
        let key = after.get_key_value(&key).unwrap().0.as_str();
        *unsettled_objects.entry(key).or_default() |= !checkpoint.settled().is_settled(entry.index);
    }
    let mut refetched = 0;
    for (key, unsettled) in &unsettled_objects {
        let again = after[*key] - before[*key];
        assert!(*unsettled || again == 0, "{key}: settled at the interruption, fetched {again} times again");
        assert!(again <= 1, "{key}: fetched {again} times in the rerun");
        refetched += again;
    }
    let unsettled = unsettled_objects.values().filter(|u| **u).count() as u64;
    assert_eq!(refetched, unsettled, "the rerun fetched {refetched} objects, {unsettled} were not settled");
    assert!(unsettled < unsettled_objects.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_of_another_snapshot_is_refused_until_restart() {
    let fx = Fixture::new();
    let (url_a, _, _) = fx.snapshot(1).await;
    let (url_b, manifest_b, vol_b) = fx.snapshot(2).await;
    fx.interrupt(&url_a).await;
    let (staging, checkpoint) = (file_hash(&fx.staging()), file_hash(&fx.checkpoint_path()));

    let err = restore(&fx.engine, &spec(&url_b, &fx.target)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "expected Refused, got {err}");
    let message = err.to_string();
    assert!(message.contains("manifest digest"), "{message}");
    assert!(message.contains(&manifest_b.digest().to_hex()), "{message}");
    assert!(message.contains("--restart"), "{message}");
    assert_eq!(file_hash(&fx.staging()), staging, "the staging file was modified");
    assert_eq!(file_hash(&fx.checkpoint_path()), checkpoint, "the checkpoint was modified");
    assert!(!fx.target.exists());

    let mut restart = spec(&url_b, &fx.target);
    restart.restart = true;
    let report = restore(&fx.engine, &restart).await.unwrap();
    check_ledger(&report, &manifest_b);
    assert_eq!(report.blocks_resumed, 0);
    check_identical(&manifest_b, &vol_b, &fx.target);
    assert!(!fx.checkpoint_path().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_file_replaced_by_another_file_is_refused() {
    let fx = Fixture::new();
    let (url, _, _) = fx.snapshot(1).await;
    fx.interrupt(&url).await;
    // Same size, same bytes, another inode.
    let staging = fx.staging();
    let impostor = fx.dir.path().join("out/impostor");
    std::fs::copy(&staging, &impostor).unwrap();
    std::fs::rename(&impostor, &staging).unwrap();
    let (staging_hash, checkpoint) = (file_hash(&staging), file_hash(&fx.checkpoint_path()));

    let err = restore(&fx.engine, &spec(&url, &fx.target)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "expected Refused, got {err}");
    let message = err.to_string();
    assert!(message.contains("target inode"), "{message}");
    assert!(message.contains("--restart"), "{message}");
    assert_eq!(file_hash(&staging), staging_hash, "the staging file was modified");
    assert_eq!(file_hash(&fx.checkpoint_path()), checkpoint, "the checkpoint was modified");
    assert!(!fx.target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_or_corrupt_checkpoint_is_refused_never_restarted_from_zero() {
    let fx = Fixture::new();
    let (url, manifest, vol) = fx.snapshot(1).await;
    fx.interrupt(&url).await;
    let good = std::fs::read(fx.checkpoint_path()).unwrap();
    let staging = file_hash(&fx.staging());
    let calls = fx.counted.calls("blocks/");

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    for (what, bytes) in [("truncated", good[..good.len() / 2].to_vec()), ("bit-flipped", flipped), ("empty", vec![])] {
        std::fs::write(fx.checkpoint_path(), &bytes).unwrap();
        let err = restore(&fx.engine, &spec(&url, &fx.target)).await.unwrap_err();
        assert!(matches!(err, RestoreError::Refused(_)), "{what}: expected Refused, got {err}");
        let message = err.to_string();
        assert!(message.contains("corrupt"), "{what}: {message}");
        assert!(message.contains("--restart"), "{what}: {message}");
        assert_eq!(file_hash(&fx.staging()), staging, "{what}: the staging file was modified");
        assert_eq!(std::fs::read(fx.checkpoint_path()).unwrap(), bytes, "{what}: the checkpoint was touched");
        assert_eq!(fx.counted.calls("blocks/"), calls, "{what}: blocks were fetched");
    }

    // Put back, the checkpoint resumes: nothing was lost by the refusals.
    std::fs::write(fx.checkpoint_path(), &good).unwrap();
    let report = restore(&fx.engine, &spec(&url, &fx.target)).await.unwrap();
    assert!(report.blocks_resumed > 0);
    check_ledger(&report, &manifest);
    check_identical(&manifest, &vol, &fx.target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_whose_staging_file_is_gone_is_refused() {
    let fx = Fixture::new();
    let (url, manifest, vol) = fx.snapshot(1).await;
    fx.interrupt(&url).await;
    std::fs::remove_file(fx.staging()).unwrap();
    let checkpoint = file_hash(&fx.checkpoint_path());

    let err = restore(&fx.engine, &spec(&url, &fx.target)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "expected Refused, got {err}");
    let message = err.to_string();
    assert!(message.contains("staging file is gone"), "{message}");
    assert!(message.contains("--restart"), "{message}");
    assert_eq!(file_hash(&fx.checkpoint_path()), checkpoint);
    assert_eq!(std::fs::read_dir(fx.target.parent().unwrap()).unwrap().count(), 0, "something was written");

    let mut restart = spec(&url, &fx.target);
    restart.restart = true;
    let report = restore(&fx.engine, &restart).await.unwrap();
    check_ledger(&report, &manifest);
    check_identical(&manifest, &vol, &fx.target);
}
