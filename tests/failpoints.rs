//! I/O failures at the durability edges, injected with fail points (and
//! real ENOSPC on a small tmpfs): the restore fails clearly, counts nothing
//! as settled past the last successful fdatasync, leaves nothing behind, and
//! a rerun succeeds.
//!
//! The `fail` registry is global to the process: every test holds [`SERIAL`]
//! and a [`fail::FailScenario`] for its whole run.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking
#![cfg(feature = "failpoints")]
// Each test runs its own runtime on its own thread: holding the serializing
// guard across awaits is the point, and cannot deadlock.
#![allow(clippy::await_holding_lock)]

mod common;

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::checkpoint::{Checkpoint, checkpoint_key};
use rehydrate::manifest::Manifest;
use rehydrate::restore::progress::Progress;
use rehydrate::restore::{Engine, RestoreError, RestoreReport};
use rehydrate::sample::SampleVolume;
use rehydrate::store::StoreUrl;
use rehydrate::store::fault::{Fault, FaultRule, FaultStore};
use rehydrate::store::file::FileStore;
use rehydrate::store::limit::AdaptiveConcurrencyConfig;
use rehydrate::write::BackendChoice;
use tokio_util::sync::CancellationToken;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const BLOCKS: u64 = 96;
const BLOCK_DELAY: Duration = Duration::from_millis(10);

struct Fixture {
    dir: tempfile::TempDir,
    engine: Engine,
    /// The engine's config and the slow store, for another engine over the
    /// same snapshot and state ([`Fixture::engine_with`]).
    config: rehydrate::config::Config,
    root: PathBuf,
    slow: Arc<FaultStore>,
    state: PathBuf,
    url: String,
    manifest: Manifest,
    vol: SampleVolume,
}

impl Fixture {
    /// A snapshot in a slow file store (two blocks at a time, each late) and
    /// an engine that settles every 4 blocks.
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(BLOCKS, 5);
        let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
        let manifest = load_manifest(&url);
        let state = dir.path().join("state");
        let mut config = config(BackendChoice::Auto, &state);
        config.checkpoint.interval_millis = NonZeroU64::new(20).unwrap();
        config.checkpoint.interval_bytes = NonZeroU64::new(4 * u64::from(BLOCK)).unwrap();
        let root = store_root(dir.path());
        let slow = Arc::new(FaultStore::new(Arc::new(FileStore::new(root.clone()))));
        slow.add(FaultRule::new(Fault::Latency(BLOCK_DELAY)).path_contains("blocks/"));
        // Two blocks at a time, through the production stack.
        config.concurrency = AdaptiveConcurrencyConfig {
            concurrency_min: NonZeroUsize::new(1).unwrap(),
            concurrency_max: NonZeroUsize::new(2).unwrap(),
            ..AdaptiveConcurrencyConfig::default()
        };
        let engine = Engine::new(config.clone());
        engine.register_remote_store(StoreUrl::File { root: root.clone() }, slow.clone()).unwrap();
        Fixture { dir, engine, config, root, slow, state, url, manifest, vol }
    }

    /// An 8 MiB tmpfs (room for the volume and a third) and a target on it;
    /// `None` (the test skips) where mount is not allowed.
    fn small_filesystem(&self) -> Option<(Tmpfs, PathBuf)> {
        let tmpfs = Tmpfs::mount(&self.dir.path().join("small"), "8m")?;
        let target = tmpfs.0.join("vol.img");
        Some((tmpfs, target))
    }

    /// An engine like the fixture's, with `write.preallocate` as given.
    fn engine_with(&self, preallocate: bool) -> Engine {
        let mut config = self.config.clone();
        config.write.preallocate = preallocate;
        let engine = Engine::new(config);
        engine.register_remote_store(StoreUrl::File { root: self.root.clone() }, self.slow.clone()).unwrap();
        engine
    }

    fn out(&self) -> PathBuf {
        let out = self.dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        out
    }

    fn checkpoint_path(&self, target: &Path) -> PathBuf {
        self.state.join(format!("{}.ckpt", checkpoint_key(target)))
    }

    async fn restore(&self, target: &Path, progress: &Arc<Progress>) -> Result<RestoreReport, RestoreError> {
        rehydrate::restore::restore(&self.engine, &spec(&self.url, target), progress, &CancellationToken::new()).await
    }

    /// After the fail point is cleared, the rerun restores the whole volume.
    async fn rerun_succeeds(&self, target: &Path) -> RestoreReport {
        let report = self.restore(target, &Arc::new(Progress::default())).await.unwrap();
        check_ledger(&report, &self.manifest);
        check_identical(&self.manifest, &self.vol, target);
        assert_eq!(staging_files(target.parent().unwrap()), Vec::<String>::new());
        assert!(!self.checkpoint_path(target).exists());
        report
    }
}

/// Record `progress.blocks_settled` each time a settle got past its
/// fdatasync: the last value is what was settled before a failure.
fn record_settles(progress: &Arc<Progress>) -> Arc<AtomicU64> {
    let settled = Arc::new(AtomicU64::new(0));
    let (seen, progress) = (settled.clone(), progress.clone());
    fail::cfg_callback("settle-before-checkpoint", move || {
        seen.store(progress.blocks_settled.load(Ordering::Relaxed), Ordering::Relaxed);
    })
    .unwrap();
    settled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fdatasync_eio_fails_the_restore_and_settles_nothing_past_the_last_sync() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let target = fx.out().join("vol.img");
    let progress = Arc::new(Progress::default());
    let settled_before_failure = record_settles(&progress);
    // Three syncs succeed, the fourth returns EIO.
    fail::cfg("target-sync-eio", "3*off->return").unwrap();

    let err = fx.restore(&target, &progress).await.unwrap_err();
    assert!(matches!(err, RestoreError::Io(_)), "expected Io, got {err}");
    let message = err.to_string();
    assert!(message.contains("fdatasync failed"), "{message}");
    assert!(message.contains("Input/output error"), "{message}");
    let settled = progress.blocks_settled.load(Ordering::Relaxed);
    assert!(settled > 0, "three syncs succeeded before the failure");
    assert_eq!(settled, settled_before_failure.load(Ordering::Relaxed), "blocks counted settled after a failed sync");
    assert!(settled < BLOCKS, "the failure came before the end");
    assert_eq!(staging_files(&fx.out()), Vec::<String>::new(), "the suspect staging file is removed");
    assert!(!target.exists());
    assert!(!fx.checkpoint_path(&target).exists(), "the checkpoint naming the staging file is removed");

    fail::remove("target-sync-eio");
    fail::remove("settle-before-checkpoint");
    let report = fx.rerun_succeeds(&target).await;
    assert_eq!(report.blocks_resumed, 0, "nothing to resume once the staging file is gone");
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_enospc_fails_the_restore_and_leaves_nothing_behind() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let target = fx.out().join("vol.img");
    let progress = Arc::new(Progress::default());
    let settled_before_failure = record_settles(&progress);
    fail::cfg("target-write-enospc", "20*off->return").unwrap();

    let err = fx.restore(&target, &progress).await.unwrap_err();
    assert!(matches!(err, RestoreError::Io(_)), "expected Io, got {err}");
    let message = err.to_string();
    assert!(message.contains("No space left on device"), "{message}");
    assert!(message.contains("writing block"), "{message}");
    assert_eq!(progress.blocks_settled.load(Ordering::Relaxed), settled_before_failure.load(Ordering::Relaxed));
    assert_eq!(staging_files(&fx.out()), Vec::<String>::new());
    assert!(!target.exists());
    assert!(!fx.checkpoint_path(&target).exists());

    fail::remove("target-write-enospc");
    fail::remove("settle-before-checkpoint");
    fx.rerun_succeeds(&target).await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkpoint_save_fails_clearly_and_keeps_the_previous_checkpoint() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let target = fx.out().join("vol.img");
    let checkpoint_path = fx.checkpoint_path(&target);
    // Keep a copy of the checkpoint each time a save has been renamed into
    // place: after the failure, the file must be the last one that succeeded.
    let last_good = Arc::new(Mutex::new(None::<Vec<u8>>));
    {
        let (path, last_good) = (checkpoint_path.clone(), last_good.clone());
        fail::cfg_callback("checkpoint-before-dir-sync", move || {
            *last_good.lock().unwrap() = std::fs::read(&path).ok();
        })
        .unwrap();
    }
    // The first save (the new checkpoint) and two settles' saves succeed.
    fail::cfg("checkpoint-before-rename", "3*off->return").unwrap();

    let progress = Arc::new(Progress::default());
    let err = fx.restore(&target, &progress).await.unwrap_err();
    assert!(matches!(err, RestoreError::Io(_)), "expected Io, got {err}");
    let message = err.to_string();
    assert!(message.contains("saving the checkpoint"), "{message}");
    assert!(message.contains("checkpoint-before-rename"), "{message}");
    let on_disk = std::fs::read(&checkpoint_path).expect("the previous checkpoint is kept");
    assert_eq!(Some(on_disk.clone()), *last_good.lock().unwrap(), "the checkpoint on disk is not the last good one");
    let previous = Checkpoint::decode(&on_disk).unwrap();
    assert!(previous.settled().settled_count() > 0);
    assert!(previous.settled().settled_count() <= progress.blocks_settled.load(Ordering::Relaxed));
    assert_eq!(staging_files(&fx.out()).len(), 1, "the staging file the checkpoint names is kept");

    // The rerun resumes from it.
    fail::remove("checkpoint-before-rename");
    fail::remove("checkpoint-before-dir-sync");
    let report = fx.rerun_succeeds(&target).await;
    assert_eq!(report.blocks_resumed, previous.settled().settled_count());
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_first_checkpoint_save_leaves_no_staging_file() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let target = fx.out().join("vol.img");
    fail::cfg("checkpoint-before-rename", "return").unwrap();
    let err = fx.restore(&target, &Arc::new(Progress::default())).await.unwrap_err();
    assert!(matches!(err, RestoreError::Io(_)), "expected Io, got {err}");
    assert!(err.to_string().contains("saving the checkpoint"), "{err}");
    assert_eq!(std::fs::read_dir(fx.out()).unwrap().count(), 0, "something was left in the target directory");
    assert!(!fx.checkpoint_path(&target).exists());
    fail::remove("checkpoint-before-rename");
    fx.rerun_succeeds(&target).await;
    scenario.teardown();
}

/// A tmpfs mounted for one test, unmounted however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        out.status.success().then(|| Tmpfs(dir.to_owned())).or_else(|| {
            println!("SKIP real ENOSPC: mount tmpfs failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            None
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Restore into `target` while another writer fills its filesystem, once
/// the restore has written something.
async fn restore_while_filling(
    engine: &Engine,
    url: &str,
    target: &Path,
    filler: &Path,
) -> Result<RestoreReport, RestoreError> {
    let progress = Arc::new(Progress::default());
    let (spec, cancel) = (spec(url, target), CancellationToken::new());
    let restore = rehydrate::restore::restore(engine, &spec, &progress, &cancel);
    let fill = async {
        let started = Instant::now();
        while progress.bytes_written.load(Ordering::Relaxed) == 0 {
            assert!(started.elapsed() < Duration::from_secs(60), "nothing written");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        fill_up(filler);
    };
    tokio::join!(restore, fill).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_enospc_on_a_full_filesystem_fails_cleanly_and_a_rerun_succeeds() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    // Room for the restore when it starts (its free-space check passes),
    // then the filesystem fills up under it: without preallocation (off, or
    // a filesystem without fallocate) a write meets ENOSPC.
    let Some((tmpfs, target)) = fx.small_filesystem() else {
        return;
    };
    let result = restore_while_filling(&fx.engine_with(false), &fx.url, &target, &tmpfs.0.join("filler")).await;
    let err = result.unwrap_err();
    assert!(matches!(err, RestoreError::Io(_)), "expected Io, got {err}");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&tmpfs.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("filler")], "the staging file is removed");
    assert!(!fx.checkpoint_path(&target).exists());

    std::fs::remove_file(tmpfs.0.join("filler")).unwrap();
    fx.rerun_succeeds(&target).await;
    drop(tmpfs);
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_filling_up_under_a_preallocated_restore_does_not_fail_it() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    assert!(fx.config.write.preallocate, "preallocation is the default");
    let Some((tmpfs, target)) = fx.small_filesystem() else {
        return;
    };
    let filler = tmpfs.0.join("filler");
    let report = restore_while_filling(&fx.engine, &fx.url, &target, &filler).await.unwrap();
    check_ledger(&report, &fx.manifest);
    check_identical(&fx.manifest, &fx.vol, &target);
    // The filler did fill the filesystem: the restore's room was taken first.
    let free = rehydrate::sys::filesystem_space(&tmpfs.0).unwrap().available_bytes;
    assert!(free < 64 * 1024, "{free} bytes still free: the filler stopped early");
    assert!(std::fs::metadata(&filler).unwrap().len() > 0);
    drop(tmpfs);
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_restore_without_room_is_refused_before_it_fetches_and_keeps_its_progress() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let Some((tmpfs, target)) = fx.small_filesystem() else {
        return;
    };
    // A first run without preallocation stops after a few settles: its
    // staging file holds only what it wrote.
    let sparse = fx.engine_with(false);
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let stop = async {
        while progress.blocks_settled.load(Ordering::Relaxed) < 8 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cancel.cancel();
    };
    let first_spec = spec(&fx.url, &target);
    let (first, ()) = tokio::join!(rehydrate::restore::restore(&sparse, &first_spec, &progress, &cancel), stop);
    assert!(matches!(first, Err(RestoreError::Interrupted(_))), "{first:?}");
    let staging = staging_files(&tmpfs.0);
    assert_eq!(staging.len(), 1);
    let checkpoint = std::fs::read(fx.checkpoint_path(&target)).unwrap();
    let settled = Checkpoint::decode(&checkpoint).unwrap().settled().settled_count();
    assert!((8..BLOCKS).contains(&settled), "{settled} blocks settled");

    // The filesystem fills up; the resumed run cannot take the room for the
    // rest: a real ENOSPC from fallocate, before any block is fetched.
    // (Two blocks' worth stays free: room for its lock file, not its blocks.)
    let filler = tmpfs.0.join("filler");
    fill_up_leaving(&filler, 2 * u64::from(BLOCK));
    let progress = Arc::new(Progress::default());
    let err = fx.restore(&target, &progress).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "expected Refused, got {err}");
    let message = err.to_string();
    assert!(message.contains("no room for the restore's blocks") && message.contains("free space"), "{message}");
    assert_eq!(progress.bytes_written.load(Ordering::Relaxed), 0, "nothing written");
    // Its progress is kept: the same staging file, the same checkpoint.
    assert_eq!(staging_files(&tmpfs.0), staging);
    assert_eq!(std::fs::read(fx.checkpoint_path(&target)).unwrap(), checkpoint);

    // Room again: the rerun resumes and finishes.
    std::fs::remove_file(&filler).unwrap();
    let report = fx.rerun_succeeds(&target).await;
    assert!(report.blocks_resumed >= settled, "{} resumed, {settled} settled", report.blocks_resumed);
    drop(tmpfs);
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_restore_without_room_is_refused_and_leaves_no_checkpoint() {
    let _serial = serial();
    let scenario = fail::FailScenario::setup();
    let fx = Fixture::new().await;
    let Some((tmpfs, target)) = fx.small_filesystem() else {
        return;
    };
    // Two blocks' worth free: room for the lock file, not for the volume.
    let filler = tmpfs.0.join("filler");
    fill_up_leaving(&filler, 2 * u64::from(BLOCK));
    let progress = Arc::new(Progress::default());
    let err = fx.restore(&target, &progress).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "expected Refused, got {err}");
    assert!(err.to_string().contains("free space"), "{err}");
    assert_eq!(progress.bytes_written.load(Ordering::Relaxed), 0, "nothing written");
    assert_eq!(staging_files(&tmpfs.0), Vec::<String>::new());
    // No checkpoint either: the rerun is not told its staging file is gone.
    assert!(!fx.checkpoint_path(&target).exists(), "a refused fresh restore left its checkpoint");
    std::fs::remove_file(&filler).unwrap();
    fx.rerun_succeeds(&target).await;
    drop(tmpfs);
    scenario.teardown();
}

/// Fill the filesystem with `path`, then give back `free_bytes` of it.
fn fill_up_leaving(path: &Path, free_bytes: u64) {
    fill_up(path);
    let filled = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(filled - free_bytes).unwrap();
}

/// Write to `path` until the filesystem is full.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}
