//! Restores into a real block device (a loop device), where the machine
//! allows one: in place, zero blocks written as zeros, a held device refused;
//! a restore resumes through another node of the same device (a retried
//! Kubernetes pod gets a new one) and is refused on another device.
//! Without root or loop devices the tests print SKIP and pass, since nothing
//! here can be checked on such a machine; CI runs as root, where they run.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use common::*;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::error::StoreError;
use rehydrate::restore::{Engine, RestoreError};
use rehydrate::store::StoreUrl;
use rehydrate::store::fault::{Fault, FaultRule, FaultStore};
use rehydrate::store::file::FileStore;
use rehydrate::write::BackendChoice;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_into_a_loop_device_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(40, 17);
    let url = snapshot(dir.path(), &vol, Compression::Zstd, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    // Larger than the volume, pre-filled with non-zero bytes.
    let Some(dev) = loop_device(dir.path(), 4 << 20, 0xAB) else { return };
    for backend in [BackendChoice::Pwrite, BackendChoice::Auto] {
        let state = dir.path().join(format!("state-{backend:?}"));
        let report = restore(&Engine::new(config(backend, &state)), &spec(&url, &dev.device)).await.unwrap();
        check_ledger(&report, &manifest);
        assert!(report.succeeded);
        let readback = rehydrate::restore::readback::readback(&manifest, &dev.device).unwrap();
        assert!(readback.matches(), "{backend:?}: mismatched blocks {:?}", readback.mismatched);
        // Bytes past the volume are the device's own, untouched.
        let data = std::fs::read(&dev.device).unwrap();
        assert!(data[vol.size_bytes as usize..].iter().all(|&b| b == 0xAB), "wrote past the volume");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_or_small_device_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(40, 18);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let Some(dev) = loop_device(dir.path(), 4 << 20, 0xAB) else { return };
    // Another holder with O_EXCL (as a mount would): refused.
    let holder = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&dev.device).unwrap();
    let engine = Engine::new(config(BackendChoice::Pwrite, &dir.path().join("state")));
    let err = restore(&engine, &spec(&url, &dev.device)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(holder);
    assert!(std::fs::read(&dev.device).unwrap().iter().all(|&b| b == 0xAB), "a refused device was written");

    // Smaller than the volume: refused, untouched.
    let small_dir = dir.path().join("small");
    std::fs::create_dir_all(&small_dir).unwrap();
    let Some(small) = loop_device(&small_dir, 1 << 20, 0xCD) else { return };
    let err = restore(&engine, &spec(&url, &small.device)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "{err}");
    assert!(std::fs::read(&small.device).unwrap().iter().all(|&b| b == 0xCD));
}

/// Replace `node` with a new device node (a new inode) for the device of
/// `device`, as a new pod's `/dev/...` is: made beside it while the old one
/// still exists (so its inode number cannot be reused), then renamed over it.
/// `false` where mknod is not allowed.
fn mknod_like(device: &Path, node: &Path) -> bool {
    let fresh = node.with_extension("new");
    let rdev = std::fs::metadata(device).unwrap().rdev();
    let made = rustix::fs::mknodat(
        rustix::fs::CWD,
        &fresh,
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rdev,
    );
    if let Err(e) = made {
        println!("SKIP: mknod of a block device node is not allowed here: {e}");
        return false;
    }
    std::fs::rename(&fresh, node).unwrap();
    true
}

/// An engine whose file store fails every GET of `failing_key` (when given).
fn engine_failing(state: &Path, url: &str, failing_key: Option<&str>) -> Engine {
    let root = Path::new(url.strip_prefix("file://").unwrap()).parent().unwrap().to_owned();
    let store = Arc::new(FaultStore::new(Arc::new(FileStore::new(root.clone()))));
    if let Some(key) = failing_key {
        let fault = Fault::Fail(StoreError::permanent("test: this block is missing"));
        store.add(FaultRule::new(fault).path_contains(key));
    }
    let engine = Engine::new(config(BackendChoice::Pwrite, state));
    engine.register_store(StoreUrl::File { root }, store);
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_of_the_same_device_resumes_and_another_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vol = volume(40, 19);
    let url = snapshot(dir.path(), &vol, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let Some(dev) = loop_device(dir.path(), 4 << 20, 0xAB) else { return };
    let pod = dir.path().join("pod-dev");
    std::fs::create_dir_all(&pod).unwrap();
    let node = pod.join("target");
    if !mknod_like(&dev.device, &node) {
        return;
    }
    let state = dir.path().join("state");
    // The first pod: one block no source serves; the rest settles and the
    // checkpoint stays.
    let entry = manifest.entries()[5];
    let key = rehydrate::block::block_key(&entry.hash, entry.compression);
    let err = restore(&engine_failing(&state, &url, Some(&key)), &spec(&url, &node)).await.unwrap_err();
    let RestoreError::BlocksFailed(report) = err else { panic!("expected a damage report: {err}") };
    let holding: Vec<u64> = manifest.entries().iter().filter(|e| e.hash == entry.hash).map(|e| e.index).collect();
    assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), holding);

    // The next pod: the same device behind a new node (a new inode).
    let inode_before = std::fs::metadata(&node).unwrap().ino();
    assert!(mknod_like(&dev.device, &node));
    assert_ne!(std::fs::metadata(&node).unwrap().ino(), inode_before, "the node was not replaced");
    // Another device behind the same path: refused, untouched.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let Some(other) = loop_device(&other_dir, 4 << 20, 0xCD) else { return };
    assert!(mknod_like(&other.device, &node));
    let err = restore(&engine_failing(&state, &url, None), &spec(&url, &node)).await.unwrap_err();
    assert!(matches!(err, RestoreError::Refused(_)), "{err}");
    assert!(err.to_string().contains("belongs to another restore") && err.to_string().contains("target device"));
    assert!(std::fs::read(&other.device).unwrap().iter().all(|&b| b == 0xCD), "another device was written");

    // Back to the first device, through yet another node: resumes.
    assert!(mknod_like(&dev.device, &node));
    let report = restore(&engine_failing(&state, &url, None), &spec(&url, &node)).await.unwrap();
    check_ledger(&report, &manifest);
    assert!(report.succeeded);
    let left = holding.len() as u64;
    assert_eq!(report.blocks_resumed, report.blocks_total - left, "only the failed blocks were left: {report:#?}");
    assert_eq!(report.objects_planned, 1, "the resume fetched only the failed block's object");
    let readback = rehydrate::restore::readback::readback(&manifest, &dev.device).unwrap();
    assert!(readback.matches(), "mismatched blocks {:?}", readback.mismatched);
    let data = std::fs::read(&dev.device).unwrap();
    assert!(data[vol.size_bytes as usize..].iter().all(|&b| b == 0xAB), "wrote past the volume");
}
