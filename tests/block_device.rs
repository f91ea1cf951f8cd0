//! Restores into a real block device (a loop device), where the machine
//! allows one: in place, zero blocks written as zeros, a held device refused.
//! Without root or loop devices the tests print SKIP and pass, since nothing
//! here can be checked on such a machine; CI runs as root, where they run.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::os::unix::fs::OpenOptionsExt;

use common::*;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::restore::{Engine, RestoreError};
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
