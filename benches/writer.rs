//! Writer throughput: 256 MiB into a temp file in 1 MiB and 64 KiB blocks,
//! then one fdatasync, through each backend.
//!
//! Each iteration truncates the file first (outside the measurement), so
//! every run allocates its blocks like a restore into a fresh staging file,
//! and the fdatasync is inside the measurement: what is timed is data made
//! durable, not data copied into the page cache. Writes come from as many
//! tasks as the queue is deep, as the restore pipeline's fetch tasks would.
//! The io_uring rows are skipped, with a message, where io_uring is
//! unavailable.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rand::RngCore;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::verify::{Expected, VerifiedBlock, verify};
use rehydrate::write::{BackendChoice, Writer, WriterConfig};

const TOTAL_BYTES: u64 = 256 << 20;
const BLOCK_SIZES_BYTES: [usize; 2] = [1 << 20, 64 << 10];

fn random_block(len_bytes: usize) -> VerifiedBlock {
    let mut raw = vec![0u8; len_bytes];
    rand::rng().fill_bytes(&mut raw);
    let expected = Expected {
        hash: HashAlgorithm::Blake3.hash(&raw),
        algorithm: HashAlgorithm::Blake3,
        compression: Compression::None,
        stored_len_bytes: len_bytes as u32,
        len_bytes: len_bytes as u32,
        hash_in: rehydrate::verify::HashIn::Snapshot,
    };
    verify(Bytes::from(raw), &expected).expect("a block verifies against its own hash")
}

/// Write TOTAL_BYTES of `block` from `tasks_count` tasks, then fdatasync.
async fn fill_and_sync(writer: &Writer, block: &VerifiedBlock, tasks_count: usize) {
    let blocks_count = TOTAL_BYTES / block.len() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for task_index in 0..tasks_count as u64 {
        let (writer, block) = (writer.clone(), block.clone());
        tasks.spawn(async move {
            let mut index = task_index;
            while index < blocks_count {
                writer.write(index * block.len() as u64, &block).await.expect("bench write");
                index += tasks_count as u64;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("bench writer task");
    }
    writer.sync().await.expect("bench fdatasync");
}

fn writer_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = WriterConfig::default();
    let tasks_count = config.queue_depth.get();

    let mut group = c.benchmark_group("writer");
    group.throughput(Throughput::Bytes(TOTAL_BYTES));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));

    for choice in [BackendChoice::Uring, BackendChoice::Pwrite] {
        let path = dir.path().join(format!("{choice:?}"));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path);
        let file = Arc::new(file.expect("bench target"));
        let config = WriterConfig { backend: choice, ..config.clone() };
        let writer = match Writer::open(file.try_clone().expect("dup"), &config) {
            Ok(writer) => writer,
            Err(e) => {
                eprintln!("skipping {choice:?}: {e}");
                continue;
            }
        };
        for block_len_bytes in BLOCK_SIZES_BYTES {
            let block = random_block(block_len_bytes);
            let name = format!("{}/{}KiB", writer.backend().name(), block_len_bytes >> 10);
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        file.set_len(0).expect("truncate");
                        let start = Instant::now();
                        runtime.block_on(fill_and_sync(&writer, black_box(&block), tasks_count));
                        elapsed += start.elapsed();
                    }
                    elapsed
                })
            });
        }
        runtime.block_on(writer.close()).expect("close");
    }
    group.finish();
}

criterion_group!(benches, writer_throughput);
criterion_main!(benches);
