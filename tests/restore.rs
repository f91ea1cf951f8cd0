//! End-to-end restores from file stores into real files, checked with the
//! ledger oracle, on both writer backends.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use common::*;
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::restore::{Engine, RestoreError};
use std::sync::Arc;

use rehydrate::store::StoreUrl;
use rehydrate::store::fault::FaultStore;
use rehydrate::store::file::FileStore;
use rehydrate::write::BackendChoice;

async fn roundtrip(backend: BackendChoice, compression: Compression, hash: HashAlgorithm) {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(37, 11);
    let url = snapshot(dir.path(), &vol, compression, hash).await;
    let manifest = load_manifest(&url);
    let target = dir.path().join("out/restored.img");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let engine = Engine::new(config(backend, &dir.path().join("state")));
    let report = restore(&engine, &spec(&url, &target)).await.unwrap();
    check_ledger(&report, &manifest);
    assert!(report.succeeded);
    assert!(report.blocks_zero > 0 && report.blocks_deduplicated > 0, "{report:#?}");
    check_identical(&manifest, &vol, &target);
    assert_eq!(staging_files(target.parent().unwrap()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_is_byte_identical_with_pwrite() {
    roundtrip(BackendChoice::Pwrite, Compression::None, HashAlgorithm::Blake3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_is_byte_identical_with_uring_or_auto() {
    // `auto` is io_uring where the kernel allows it, pwrite elsewhere.
    roundtrip(BackendChoice::Auto, Compression::Zstd, HashAlgorithm::Sha256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_existing_file_zeroes_zero_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(20, 3);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let target = dir.path().join("existing.img");
    std::fs::write(&target, vec![0xAB; vol.size_bytes as usize + 4096]).unwrap();
    let mut s = spec(&url, &target);
    s.in_place = true;
    let report = restore(&Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state"))), &s).await.unwrap();
    check_ledger(&report, &manifest);
    let readback = rehydrate::restore::readback::readback(&manifest, &target).unwrap();
    assert!(readback.matches(), "zero blocks not zeroed: {:?}", readback.mismatched);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_block_is_never_written_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(16, 5);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let victim = manifest.entries()[2];
    let object = store_root(dir.path()).join(block_key(&victim.hash, victim.compression));
    let mut bytes = std::fs::read(&object).unwrap();
    bytes[100] ^= 0xFF;
    std::fs::write(&object, &bytes).unwrap();

    // In place over a marker pattern, so "never written" is visible.
    let target = dir.path().join("marked.img");
    std::fs::write(&target, vec![0xCD; vol.size_bytes as usize]).unwrap();
    let mut s = spec(&url, &target);
    s.in_place = true;
    let err = restore(&Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state"))), &s).await.unwrap_err();
    let RestoreError::BlocksFailed(report) = &err else { panic!("expected BlocksFailed, got {err}") };
    check_ledger(report, &manifest);
    assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), vec![victim.index]);
    assert_eq!(report.damage[0].failures[0].last_error.class, rehydrate::error::ErrorClass::Corrupt);
    assert!(err.to_string().contains(&format!("block {}", victim.index)), "{err}");
    let data = std::fs::read(&target).unwrap();
    let offset = manifest.layout.offset(victim.index) as usize;
    assert!(data[offset..offset + 65536].iter().all(|&b| b == 0xCD), "corrupt bytes reached the target");
    // Everything else was restored.
    let readback = rehydrate::restore::readback::readback(&manifest, &target).unwrap();
    assert_eq!(readback.mismatched, vec![victim.index]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restore_without_checkpoints_is_not_swapped_and_leaves_no_staging() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(8, 9);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let victim = manifest.entries()[0];
    std::fs::remove_file(store_root(dir.path()).join(block_key(&victim.hash, victim.compression))).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("vol.img");
    let mut c = config(BackendChoice::Pwrite, &dir.path().join("state"));
    c.checkpoint.enabled = false;
    let err = restore(&Engine::new(c), &spec(&url, &target)).await.unwrap_err();
    assert!(matches!(err, RestoreError::BlocksFailed(_)), "{err}");
    assert!(!target.exists(), "a failed restore was swapped into place");
    assert_eq!(staging_files(&out), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_missing_everywhere_fails_the_job_and_a_rerun_fetches_only_it() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(30, 13);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let victim = manifest.entries()[7];
    let victim_key = block_key(&victim.hash, victim.compression);
    let object = store_root(dir.path()).join(&victim_key);
    let saved = std::fs::read(&object).unwrap();
    std::fs::remove_file(&object).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("vol.img");

    // Count requests at the store, not through rehydrate's report.
    let store_url = StoreUrl::File { root: store_root(dir.path()) };
    let counted = Arc::new(FaultStore::new(Arc::new(FileStore::new(store_root(dir.path())))));
    let engine = Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state")));
    engine.register_store(store_url, counted.clone());
    let err = restore(&engine, &spec(&url, &target)).await.unwrap_err();
    let RestoreError::BlocksFailed(report) = &err else { panic!("expected BlocksFailed, got {err}") };
    check_ledger(report, &manifest);
    assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), vec![victim.index]);
    assert_eq!(counted.calls(&victim_key), 1, "a 404 is not retried");
    assert!(!target.exists(), "not swapped into place");
    assert_eq!(staging_files(&out).len(), 1, "the staging file is kept for the rerun");

    // The object comes back; the rerun fetches it and nothing else.
    std::fs::write(&object, &saved).unwrap();
    let blocks_before = counted.calls("blocks/");
    let report = restore(&engine, &spec(&url, &target)).await.unwrap();
    check_ledger(&report, &manifest);
    assert_eq!(counted.calls("blocks/") - blocks_before, 1, "the rerun fetched more than the failed block");
    assert_eq!(report.blocks_resumed, report.blocks_total - 1);
    check_identical(&manifest, &vol, &target);
    assert_eq!(staging_files(&out), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_serves_what_the_primary_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(24, 21);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    // The secondary is a full copy; the primary loses two objects.
    let secondary = dir.path().join("mirror");
    rehydrate::store::file::copy_tree(&store_root(dir.path()), &secondary).unwrap();
    for e in &manifest.entries()[3..5] {
        std::fs::remove_file(store_root(dir.path()).join(block_key(&e.hash, e.compression))).unwrap();
    }
    let target = dir.path().join("vol.img");
    let mut s = spec(&url, &target);
    s.secondaries = vec![format!("file://{}", secondary.display())];
    let report = restore(&Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state"))), &s).await.unwrap();
    check_ledger(&report, &manifest);
    check_identical(&manifest, &vol, &target);
    let served: std::collections::HashMap<_, _> = report.fetch.served_by_source.iter().cloned().collect();
    assert_eq!(served["secondary1"], 2);
    assert_eq!(report.fetch.fallbacks, 2);
    // 404 is permanent: one request on the primary, no retries.
    assert_eq!(report.fetch.retries, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifest_is_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(4, 1);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let path = std::path::PathBuf::from(url.strip_prefix("file://").unwrap());
    let good = std::fs::read(&path).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("vol.img");
    let engine = Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state")));
    for (what, bytes) in [
        ("truncated", good[..good.len() - 7].to_vec()),
        ("bit flip", {
            let mut b = good.clone();
            b[20] ^= 4;
            b
        }),
        ("empty", vec![]),
        ("garbage", vec![0xFF; 4096]),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let err = restore(&engine, &spec(&url, &target)).await.unwrap_err();
        assert!(matches!(err, RestoreError::Refused(_)), "{what}: {err}");
        assert!(err.to_string().contains("manifest"), "{what}: {err}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "{what}: something was written");
    }
}
