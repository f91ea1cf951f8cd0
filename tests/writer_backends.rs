//! One test suite, run against every writer backend on real files.
//!
//! Each backend gets the same tests through `writer_suite!`: concurrent
//! out-of-order writes of mixed sizes read back byte for byte, zero blocks, a
//! queue depth of one, write and sync errors reaching their caller while the
//! writer stays usable, close and drop releasing the threads and the file.
//! Each suite runs twice: with `direct_io` off, and on (aligned blocks from
//! the buffer pool then go through the `O_DIRECT` descriptor, and the
//! unaligned ones through the buffered one, into the same file).
//! The io_uring suites skip (with a message) where a probe finds io_uring
//! unavailable; the pwrite suite always runs.

// A test that meets an unexpected error should stop right there, loudly.
#![allow(clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::buf::BufPool;
use rehydrate::verify::{Expected, VerifiedBlock, verify};
use rehydrate::write::{Backend, BackendChoice, DirectIo, Writer, WriterConfig};

/// The byte every test expects at absolute offset `offset` for `seed`:
/// any byte of the target can be checked without keeping the blocks.
fn byte_at(seed: u64, offset: u64) -> u8 {
    let x = (offset ^ seed.rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// A block of self-describing bytes, passed through the real verifier.
fn block(seed: u64, offset: u64, len_bytes: usize) -> VerifiedBlock {
    let raw: Vec<u8> = (0..len_bytes as u64).map(|i| byte_at(seed, offset + i)).collect();
    let expected = Expected {
        hash: HashAlgorithm::Blake3.hash(&raw),
        algorithm: HashAlgorithm::Blake3,
        compression: Compression::None,
        stored_len_bytes: len_bytes as u32,
        len_bytes: len_bytes as u32,
        hash_in: rehydrate::verify::HashIn::Snapshot,
    };
    // In a pooled, page-aligned buffer, as the stores deliver blocks.
    let mut buf = BufPool::shared().take(len_bytes).unwrap();
    buf.extend_from_slice(&raw).unwrap();
    verify(buf.into_bytes(), &expected).expect("self-made block verifies")
}

fn matches(data: &[u8], seed: u64, offset: u64) -> bool {
    data.iter().enumerate().all(|(i, &b)| b == byte_at(seed, offset + i as u64))
}

fn config(backend: BackendChoice, direct_io: DirectIo, queue_depth: usize, pwrite_threads: usize) -> WriterConfig {
    WriterConfig {
        backend,
        direct_io,
        queue_depth: NonZeroUsize::new(queue_depth).unwrap(),
        pwrite_threads: NonZeroUsize::new(pwrite_threads).unwrap(),
        ..WriterConfig::default()
    }
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
}

/// Whether this process can run an io_uring writer; says why not, so a
/// skipped test is visible in the test output.
fn uring_available(test: &str) -> bool {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    if !matches!(disabled.trim(), "" | "0") {
        eprintln!("SKIP {test}: kernel.io_uring_disabled = {}", disabled.trim());
        return false;
    }
    let dir = tempfile::tempdir().unwrap();
    match Writer::open(open_rw(&dir.path().join("probe")), &config(BackendChoice::Uring, DirectIo::Off, 1, 1)) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("SKIP {test}: io_uring unavailable here: {e}");
            false
        }
    }
}

/// Whether a descriptor of this process still points at `path`.
fn fd_open_on(path: &Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .any(|target| target == path)
}

/// Block sizes of the mixed layout: powers of two, odd multiples of 4 KiB,
/// and sizes that are not multiples of 4096 at all.
const SIZES_BYTES: [usize; 7] = [4096, 65536, 1 << 20, 12288, 131072, 4096 * 3 + 512, 300_000];

macro_rules! writer_suite {
    ($suite:ident, $choice:expr, $direct:expr, $expected_backend:expr) => {
        mod $suite {
            use super::*;

            const CHOICE: BackendChoice = $choice;
            const DIRECT: DirectIo = $direct;

            /// Whether this suite can run here (the uring one needs io_uring).
            fn runnable(test: &str) -> bool {
                CHOICE != BackendChoice::Uring || uring_available(test)
            }

            fn open_writer(path: &Path, queue_depth: usize, pwrite_threads: usize) -> Writer {
                let writer = Writer::open(open_rw(path), &config(CHOICE, DIRECT, queue_depth, pwrite_threads)).unwrap();
                assert_eq!(writer.backend(), $expected_backend);
                // The temp dir is on a filesystem with O_DIRECT (ext4, xfs,
                // tmpfs since Linux 6.6): `On` must have opened it.
                assert_eq!(writer.direct_io(), DIRECT == DirectIo::On);
                writer
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_out_of_order_writes_read_back_byte_for_byte() {
                if !runnable("concurrent_out_of_order_writes_read_back_byte_for_byte") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                // Fewer slots than writer tasks, so callers also wait for room.
                let writer = open_writer(&path, 8, 3);
                let seed = 0x5eed;
                let mut extents = Vec::new();
                let mut offset = 0u64;
                for i in 0..96 {
                    let len = SIZES_BYTES[i % SIZES_BYTES.len()];
                    extents.push((offset, len));
                    offset += len as u64;
                }
                // The short tail: the file must end exactly there.
                extents.push((offset, 1000));
                let file_len_bytes = offset + 1000;
                let aligned_count = extents.iter().filter(|(at, len)| at % 4096 == 0 && len % 4096 == 0).count() as u64;
                extents.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));

                let tasks_count = 16;
                let mut tasks = tokio::task::JoinSet::new();
                for task_index in 0..tasks_count {
                    let mine: Vec<_> = extents.iter().skip(task_index).step_by(tasks_count).copied().collect();
                    let writer = writer.clone();
                    tasks.spawn(async move {
                        for (offset, len) in mine {
                            writer.write(offset, &block(seed, offset, len)).await.unwrap();
                        }
                    });
                }
                while let Some(joined) = tasks.join_next().await {
                    joined.unwrap();
                }
                writer.sync().await.unwrap();
                // Every aligned block went around the page cache (a short
                // write's aligned remainder would count once more), and only
                // when asked to.
                let direct_writes_count = writer.direct_writes_count();
                match DIRECT {
                    DirectIo::On => assert!(
                        aligned_count > 0 && direct_writes_count >= aligned_count,
                        "{direct_writes_count} direct writes for {aligned_count} aligned blocks"
                    ),
                    _ => assert_eq!(direct_writes_count, 0),
                }
                writer.close().await.unwrap();

                let data = std::fs::read(&path).unwrap();
                assert_eq!(data.len() as u64, file_len_bytes);
                if let Some(at) = (0..data.len()).find(|&i| data[i] != byte_at(seed, i as u64)) {
                    panic!("byte {at} differs: {} != {}", data[at], byte_at(seed, at as u64));
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zero_blocks_overwrite_old_data() {
                if !runnable("zero_blocks_overwrite_old_data") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                std::fs::write(&path, vec![0xAB; 3 * 65536]).unwrap();
                let writer = open_writer(&path, 4, 2);
                let zeros = VerifiedBlock::zeros(65536);
                writer.write(0, &zeros).await.unwrap();
                writer.write(2 * 65536, &zeros).await.unwrap();
                // An odd-sized zero block inside the middle one.
                writer.write(65536 + 100, &VerifiedBlock::zeros(5000)).await.unwrap();
                // An empty block is a no-op, not an error.
                writer.write(10, &VerifiedBlock::zeros(0)).await.unwrap();
                writer.sync().await.unwrap();
                writer.close().await.unwrap();

                let data = std::fs::read(&path).unwrap();
                assert_eq!(data.len(), 3 * 65536);
                for (i, &b) in data.iter().enumerate() {
                    let zeroed = !(65536..2 * 65536).contains(&i) || (65536 + 100..65536 + 5100).contains(&i);
                    assert_eq!(b, if zeroed { 0 } else { 0xAB }, "byte {i}");
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn queue_depth_one_still_makes_progress() {
                if !runnable("queue_depth_one_still_makes_progress") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 1, 4);
                let seed = 11;
                let mut tasks = tokio::task::JoinSet::new();
                for task_index in 0..8u64 {
                    let writer = writer.clone();
                    tasks.spawn(async move {
                        for i in 0..25u64 {
                            let offset = (i * 8 + task_index) * 4096;
                            writer.write(offset, &block(seed, offset, 4096)).await.unwrap();
                            if i % 10 == 0 {
                                writer.sync().await.unwrap();
                            }
                        }
                    });
                }
                let all = async {
                    while let Some(joined) = tasks.join_next().await {
                        joined.unwrap();
                    }
                };
                // A deadline so a lost wake-up fails the test instead of hanging it.
                tokio::time::timeout(Duration::from_secs(60), all).await.expect("writes stalled");
                writer.close().await.unwrap();
                let data = std::fs::read(&path).unwrap();
                assert_eq!(data.len(), 200 * 4096);
                assert!(matches(&data, seed, 0));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cancelled_writes_free_their_slots() {
                if !runnable("cancelled_writes_free_their_slots") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 2, 2);
                let big = block(3, 0, 4 << 20);
                for _ in 0..20 {
                    // Dropped at once, whether queued, in flight or waiting for a slot.
                    let _ = tokio::time::timeout(Duration::ZERO, writer.write(0, &big)).await;
                }
                let small = block(3, 0, 4096);
                tokio::time::timeout(Duration::from_secs(60), writer.write(0, &small))
                    .await
                    .expect("a slot leaked")
                    .unwrap();
                writer.sync().await.unwrap();
                writer.close().await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_error_reaches_its_caller_and_the_writer_stays_usable() {
                if !runnable("write_error_reaches_its_caller_and_the_writer_stays_usable") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                std::fs::write(&path, b"").unwrap();
                let read_only = File::open(&path).unwrap();
                let writer = Writer::open(read_only, &config(CHOICE, DIRECT, 4, 2)).unwrap();
                assert_eq!(writer.backend(), $expected_backend);
                for _ in 0..3 {
                    let err = writer.write(0, &block(1, 0, 8192)).await.unwrap_err();
                    assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
                }
                // Still answering: a sync of a read-only descriptor succeeds.
                writer.sync().await.unwrap();
                writer.close().await.unwrap();
                assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn out_of_range_offsets_fail_and_later_writes_land() {
                if !runnable("out_of_range_offsets_fail_and_later_writes_land") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 4, 2);
                // u64::MAX would mean "at the file position" to io_uring.
                for offset in [u64::MAX, i64::MAX as u64 - 100] {
                    let err = writer.write(offset, &block(2, 0, 4096)).await.unwrap_err();
                    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
                }
                // Past the largest file ext4 or xfs holds: the kernel refuses
                // (EFBIG), and the error comes back. Filesystems with 63-bit
                // files (tmpfs) take it as a sparse write instead.
                let far = 1u64 << 62;
                let far_result = writer.write(far, &block(2, far, 4096)).await;
                let far_len = std::fs::metadata(&path).unwrap().len();
                match far_result {
                    Err(e) => {
                        assert_eq!((e.raw_os_error(), far_len), (Some(libc::EFBIG), 0), "{e}")
                    }
                    Ok(()) => assert_eq!(far_len, far + 4096),
                }
                writer.write(8192, &block(2, 8192, 4096)).await.unwrap();
                writer.sync().await.unwrap();
                writer.close().await.unwrap();
                let mut file = File::open(&path).unwrap();
                let mut data = vec![0; 4096];
                std::os::unix::fs::FileExt::read_exact_at(&mut file, &mut data, 8192).unwrap();
                assert!(matches(&data, 2, 8192));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn device_errors_reach_callers_and_a_failed_sync_is_sticky() {
                if !runnable("device_errors_reach_callers_and_a_failed_sync_is_sticky") {
                    return;
                }
                // /dev/full: every write fails with ENOSPC, fdatasync with EINVAL.
                let Ok(full) = OpenOptions::new().write(true).open("/dev/full") else {
                    eprintln!("SKIP device_errors_reach_callers_and_a_failed_sync_is_sticky: no /dev/full");
                    return;
                };
                let writer = Writer::open(full, &config(CHOICE, DIRECT, 4, 2)).unwrap();
                let err = writer.write(0, &block(4, 0, 4096)).await.unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
                let first = writer.sync().await.unwrap_err();
                assert_eq!(first.raw_os_error(), Some(libc::EINVAL), "{first}");
                let later = writer.sync().await.unwrap_err();
                assert!(later.to_string().contains("an earlier fdatasync"), "{later}");
                // Writes are still answered after a failed sync.
                let err = writer.write(4096, &block(4, 4096, 4096)).await.unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
                writer.close().await.unwrap();
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sync_succeeds_with_and_without_writes() {
                if !runnable("sync_succeeds_with_and_without_writes") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 4, 2);
                writer.sync().await.unwrap();
                writer.write(0, &block(5, 0, 65536)).await.unwrap();
                writer.sync().await.unwrap();
                // Concurrent syncs and writes from clones.
                let mut tasks = tokio::task::JoinSet::new();
                for i in 1..9u64 {
                    let writer = writer.clone();
                    tasks.spawn(async move {
                        writer.write(i * 65536, &block(5, i * 65536, 65536)).await?;
                        writer.sync().await
                    });
                }
                while let Some(joined) = tasks.join_next().await {
                    joined.unwrap().unwrap();
                }
                writer.close().await.unwrap();
                let data = std::fs::read(&path).unwrap();
                assert_eq!(data.len(), 9 * 65536);
                assert!(matches(&data, 5, 0));
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn close_drains_joins_and_releases_the_file() {
                if !runnable("close_drains_joins_and_releases_the_file") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 4, 2);
                let other = writer.clone();
                // A write finished before close stays written.
                let done_at = 32 * 65536;
                writer.write(done_at, &block(6, done_at, 65536)).await.unwrap();
                // Writes racing with close: each either lands whole or is
                // refused as closed, never lost half-way.
                let mut racing = tokio::task::JoinSet::new();
                for i in 0..32u64 {
                    let writer = writer.clone();
                    racing.spawn(async move { (i, writer.write(i * 65536, &block(6, i * 65536, 65536)).await) });
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                assert!(fd_open_on(&path));
                writer.close().await.unwrap();
                assert!(!fd_open_on(&path), "close returned with the target still open");

                let err = other.write(0, &block(6, 0, 4096)).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
                assert!(other.sync().await.is_err());
                // A second close, from another clone, is harmless.
                other.close().await.unwrap();

                let data = std::fs::read(&path).unwrap();
                assert!(matches(&data[done_at as usize..], 6, done_at));
                while let Some(joined) = racing.join_next().await {
                    let (i, result) = joined.unwrap();
                    match result {
                        Ok(()) => {
                            let at = (i * 65536) as usize;
                            assert!(matches(&data[at..at + 65536], 6, i * 65536), "block {i}");
                        }
                        Err(e) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}"),
                    }
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dropping_the_last_handle_stops_the_threads() {
                if !runnable("dropping_the_last_handle_stops_the_threads") {
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("target");
                let writer = open_writer(&path, 4, 2);
                writer.write(0, &block(7, 0, 4096)).await.unwrap();
                let clone = writer.clone();
                drop(writer);
                clone.write(4096, &block(7, 4096, 4096)).await.unwrap();
                drop(clone);
                // The threads exit on their own and close the file.
                let deadline = Instant::now() + Duration::from_secs(10);
                while fd_open_on(&path) {
                    assert!(Instant::now() < deadline, "writer threads kept the target open");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                assert!(matches(&std::fs::read(&path).unwrap(), 7, 0));
            }
        }
    };
}

writer_suite!(pwrite, BackendChoice::Pwrite, DirectIo::Off, Backend::Pwrite);
writer_suite!(pwrite_direct, BackendChoice::Pwrite, DirectIo::On, Backend::Pwrite);
writer_suite!(uring, BackendChoice::Uring, DirectIo::Off, Backend::Uring);
writer_suite!(uring_direct, BackendChoice::Uring, DirectIo::On, Backend::Uring);

/// Whatever `direct_io` says, a descriptor opened read-only never gains a
/// writable O_DIRECT twin, and a file type without direct I/O gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_never_widens_access_nor_applies_to_devices_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target");
    std::fs::write(&path, b"").unwrap();
    for direct in [DirectIo::On, DirectIo::Auto] {
        let writer = Writer::open(File::open(&path).unwrap(), &config(BackendChoice::Pwrite, direct, 4, 2)).unwrap();
        assert!(!writer.direct_io(), "{direct:?}: a read-only target got a direct descriptor");
        let err = writer.write(0, &block(9, 0, 4096)).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        writer.close().await.unwrap();
        if let Ok(null) = OpenOptions::new().write(true).open("/dev/null") {
            let writer = Writer::open(null, &config(BackendChoice::Pwrite, direct, 4, 2)).unwrap();
            assert!(!writer.direct_io(), "{direct:?}: a character device got a direct descriptor");
            writer.write(0, &block(9, 0, 4096)).await.unwrap();
            writer.close().await.unwrap();
        }
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

/// Blocks that are not page-aligned in memory (not from the pool) still land
/// byte for byte with direct I/O on: they take the buffered descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_io_writes_unaligned_buffers_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target");
    let writer = Writer::open(open_rw(&path), &config(BackendChoice::Pwrite, DirectIo::On, 4, 2)).unwrap();
    assert!(writer.direct_io());
    let aligned = block(10, 0, 8192);
    // The same kind of block, one byte into a heap buffer: never aligned.
    let mut raw = vec![0u8; 8193];
    raw[1..].iter_mut().enumerate().for_each(|(i, b)| *b = byte_at(10, 8192 + i as u64));
    let unaligned_bytes = Bytes::from(raw).slice(1..);
    let expected = Expected {
        hash: HashAlgorithm::Blake3.hash(&unaligned_bytes),
        algorithm: HashAlgorithm::Blake3,
        compression: Compression::None,
        stored_len_bytes: 8192,
        len_bytes: 8192,
        hash_in: rehydrate::verify::HashIn::Snapshot,
    };
    let unaligned = verify(unaligned_bytes, &expected).unwrap();
    writer.write(0, &aligned).await.unwrap();
    writer.write(8192, &unaligned).await.unwrap();
    writer.sync().await.unwrap();
    assert_eq!(writer.direct_writes_count(), 1, "only the pooled block goes direct");
    writer.close().await.unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 16384);
    assert!(matches(&data, 10, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_uring_where_it_works_and_pwrite_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("target");
    let writer = Writer::open(open_rw(&path), &config(BackendChoice::Auto, DirectIo::Auto, 4, 2)).unwrap();
    let expected = if uring_available("auto (expects pwrite instead)") { Backend::Uring } else { Backend::Pwrite };
    assert_eq!(writer.backend(), expected);
    writer.write(0, &block(8, 0, 4096)).await.unwrap();
    writer.sync().await.unwrap();
    writer.close().await.unwrap();
    // Auto probes with a duplicate descriptor; neither may leak.
    assert!(!fd_open_on(&path), "Auto left a descriptor of the target open");
    assert!(matches(&std::fs::read(&path).unwrap(), 8, 0));
}
