//! The whole restore pipeline, and what checkpointing costs in it.
//!
//! A 256 MiB sample volume in 1 MiB blocks (with its zero and duplicate
//! blocks) is snapshotted once into a `file://` store in a temp dir; each
//! iteration restores it into a new file: manifest, fetch, verify, write,
//! fdatasync, staging file renamed into place. Rows:
//!
//! - `checkpoint_default`: checkpoints at the default cadence (2 s / 1 GiB);
//! - `checkpoint_disabled`: `checkpoint.enabled = false`, the reference;
//! - `checkpoint_disabled_buffered`: the same with `write.direct_io = false`,
//!   to show what writing around the page cache saves;
//! - `checkpoint_every_16MiB`: fdatasync and a checkpoint save every 16 MiB,
//!   to show what a tight cadence costs.
//!
//! The previous iteration's target is removed outside the measurement. The
//! source files are in the page cache after the first iteration, so this
//! measures rehydrate's own work plus the target's disk, not the store's.

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::config::Config;
use rehydrate::restore::Engine;
use rehydrate::restore::progress::Progress;
use rehydrate::sample::SampleVolume;
use rehydrate::store::file::FileStore;
use tokio_util::sync::CancellationToken;

const VOLUME_BYTES: u64 = 256 << 20;
const BLOCK_BYTES: u32 = 1 << 20;

struct Setup {
    dir: tempfile::TempDir,
    manifest_url: String,
}

fn setup(runtime: &tokio::runtime::Runtime) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = SampleVolume { size_bytes: VOLUME_BYTES, block_size_bytes: BLOCK_BYTES, seed: 3 };
    let source = dir.path().join("source.img");
    volume.write_to(&source).expect("write the sample volume");
    let store = Arc::new(FileStore::new(dir.path().join("store/bucket/bench")));
    let spec = rehydrate::snapshot::CreateSpec {
        source,
        name: "bench".into(),
        block_size_bytes: BLOCK_BYTES,
        compression: Compression::None,
        hash_algorithm: HashAlgorithm::Blake3,
        puts_inflight_max: 16,
    };
    let report = runtime.block_on(rehydrate::snapshot::create(store, &spec)).expect("snapshot");
    Setup { dir, manifest_url: report.manifest_url }
}

fn config(state: &Path, checkpoint: Checkpointing) -> Config {
    let mut config = Config::default();
    config.checkpoint.dir = Some(state.to_owned());
    match checkpoint {
        Checkpointing::Default => {}
        Checkpointing::Disabled => config.checkpoint.enabled = false,
        Checkpointing::DisabledBuffered => {
            config.checkpoint.enabled = false;
            config.write.direct_io = rehydrate::write::DirectIo::Off;
        }
        Checkpointing::EveryBytes(bytes) => {
            config.checkpoint.interval_bytes = NonZeroU64::new(bytes).expect("a non-zero interval");
        }
    }
    config
}

#[derive(Debug, Clone, Copy)]
enum Checkpointing {
    Default,
    Disabled,
    DisabledBuffered,
    EveryBytes(u64),
}

/// Restore once into `target` (removed first, outside the timing).
async fn restore_once(setup: &Setup, target: &PathBuf, checkpoint: Checkpointing) -> Duration {
    let _ = std::fs::remove_file(target);
    let engine = Engine::new(config(&setup.dir.path().join("state"), checkpoint));
    let spec = rehydrate::restore::RestoreSpec {
        manifest_url: setup.manifest_url.clone(),
        target: target.clone(),
        secondaries: vec![],
        peers: vec![],
        in_place: false,
        restart: false,
        blocks: None,
        job: None,
    };
    let started = Instant::now();
    let report = rehydrate::restore::restore(&engine, &spec, &Arc::new(Progress::default()), &CancellationToken::new())
        .await
        .expect("bench restore");
    let elapsed = started.elapsed();
    assert!(report.succeeded && report.blocks_settled == report.blocks_total);
    elapsed
}

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let setup = setup(&runtime);
    let target = setup.dir.path().join("out.img");
    let mut group = c.benchmark_group("pipeline/restore_256MiB_1MiB_blocks");
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(12));
    group.throughput(Throughput::Bytes(VOLUME_BYTES));
    for (name, checkpoint) in [
        ("checkpoint_disabled", Checkpointing::Disabled),
        ("checkpoint_disabled_buffered", Checkpointing::DisabledBuffered),
        ("checkpoint_default", Checkpointing::Default),
        ("checkpoint_every_16MiB", Checkpointing::EveryBytes(16 << 20)),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        total += restore_once(&setup, &target, checkpoint).await;
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
