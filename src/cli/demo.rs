//! `rehydrate demo`: the whole story on embedded defaults, in a temporary
//! directory, with nothing to install.
//!
//! It builds a sample volume (zero blocks, duplicate blocks, a short tail) and
//! snapshots it. An in-process S3-compatible endpoint (real HTTP, the real AWS
//! SDK on the client side) serves the snapshot as the primary, with the faults
//! this tool exists for: one block whose body stalls forever after the
//! headers, and a burst of `503 SlowDown`. A local mirror is the secondary.
//! The restore climbs while the wedged block is cut by its deadline, retried a
//! bounded number of times, flagged as the stall's reason, and served by the
//! secondary; then the target is read back and compared, byte for byte.
//! The temporary directory is removed at the end.

use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::commands::restore_with_progress;
use super::output::{human_bytes, print_restore_result};
use crate::block::{BlockIndex, Compression, HashAlgorithm, block_key};
use crate::config::Config;
use crate::error::ExitCode;
use crate::manifest::{Manifest, ManifestLimits};
use crate::restore::{Engine, RestoreSpec};
use crate::sample::SampleVolume;
use crate::store::StoreUrl;
use crate::store::fault::{Fault, FaultRule};
use crate::store::loopback::LoopbackS3;
use crate::store::s3::{S3Config, S3Store};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Size of the sample volume.
    #[arg(long, default_value = "64MiB")]
    pub size: String,
    /// Work in this directory (kept) instead of a temporary one (removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: DemoArgs) -> ExitCode {
    match demo(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::Internal
        }
    }
}

/// The demo's config: the defaults, with deadlines short enough that the
/// wedged block's story takes seconds, not minutes.
fn demo_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.checkpoint.dir = Some(dir.join("state"));
    config.checkpoint.interval_millis = nz64(250);
    config.fetch.attempt_timeout_millis = nz64(3_000);
    config.fetch.attempts_max = NonZeroU32::new(3).expect("non-zero");
    config.fetch.stall_after_millis = nz64(1_500);
    config.s3.body_idle_timeout_millis = 1_000;
    // Hedging would send the wedged block to the mirror within milliseconds;
    // the demo shows the deadline, the bounded retries and the fallback.
    config.fetch.hedge.enabled = false;
    config
}

/// Where the demo keeps its files.
struct Paths {
    source: PathBuf,
    bucket_root: PathBuf,
    store_dir: PathBuf,
    mirror_dir: PathBuf,
    target: PathBuf,
}

impl Paths {
    fn under(dir: &Path) -> Self {
        let bucket_root = dir.join("store");
        Self {
            source: dir.join("source.img"),
            store_dir: bucket_root.join("bucket/demo"),
            bucket_root,
            mirror_dir: dir.join("mirror/bucket/demo"),
            target: dir.join("restored/volume.img"),
        }
    }
}

async fn demo(args: DemoArgs) -> Result<ExitCode, String> {
    // An odd size: the last block is short.
    let size = crate::config::parse_size_bytes(&args.size)? + 12_345;
    let tmp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
            tmp.path().to_owned()
        }
    };
    let say = |line: String| {
        if !args.json {
            println!("{line}")
        }
    };
    let volume = SampleVolume { size_bytes: size, block_size_bytes: 1 << 20, seed: 0x5EED };
    let paths = Paths::under(&dir);
    std::fs::create_dir_all(paths.target.parent().expect("has parent")).map_err(|e| e.to_string())?;
    say(format!(
        "1. sample volume: {} ({} blocks of 1 MiB: every 8th zero, every 8th a duplicate, a short tail)",
        human_bytes(size),
        volume.block_count()
    ));
    volume.write_to(&paths.source).map_err(|e| format!("writing {}: {e}", paths.source.display()))?;

    let config = demo_config(&dir);
    let engine = Engine::new(config.clone());
    say(snapshot_and_mirror(&engine, &volume, &paths).await?);
    let server =
        LoopbackS3::start(paths.bucket_root.clone()).await.map_err(|e| format!("starting the S3 endpoint: {e}"))?;
    let manifest = local_manifest(&paths.store_dir)?;
    let (wedged, wedged_key) = pick_wedged_block(&manifest);
    serve_primary(&engine, &config, &server, &wedged_key).await?;
    say(format!(
        "3. primary: s3://bucket/demo at {} (in-process, real HTTP); block {wedged} stalls after its headers, \
         the first 12 block requests get 503 SlowDown; secondary: file://{}",
        server.endpoint_url(),
        paths.mirror_dir.display()
    ));

    say(format!("4. restore into {}", paths.target.display()));
    let spec = RestoreSpec {
        manifest_url: "s3://bucket/demo/demo.manifest".into(),
        target: paths.target.clone(),
        secondaries: vec![format!("file://{}", paths.mirror_dir.display())],
        peers: vec![],
        in_place: false,
        restart: true,
        blocks: None,
        job: None,
    };
    let result = restore_with_progress(&engine, &spec, !args.json).await;
    let code = print_restore_result(&result, args.json);
    if let Ok(report) = &result {
        for stall in &report.stalls {
            say(format!("   stalled at {:.1}s: {}", stall.at_secs, stall.reason));
        }
        say(format!(
            "   the server saw {} requests for block {wedged}'s object and sent {} SlowDown answers",
            server.requests(&wedged_key),
            server.slowdowns_sent()
        ));
    }
    server.shutdown().await;
    if code != ExitCode::Success {
        return Ok(code);
    }
    verify_restored(&manifest, &volume, &paths.target, say)
}

/// Snapshot the sample volume into the local store and mirror the store.
async fn snapshot_and_mirror(engine: &Engine, volume: &SampleVolume, paths: &Paths) -> Result<String, String> {
    let local =
        engine.open_store(&StoreUrl::File { root: paths.store_dir.clone() }).await.map_err(|e| e.to_string())?;
    let spec = crate::snapshot::CreateSpec {
        source: paths.source.clone(),
        name: "demo".into(),
        block_size_bytes: volume.block_size_bytes,
        compression: Compression::Zstd,
        hash_algorithm: HashAlgorithm::Blake3,
        puts_inflight_max: 16,
    };
    let created = crate::snapshot::create(local, &spec).await.map_err(|e| e.to_string())?;
    crate::store::file::copy_tree(&paths.store_dir, &paths.mirror_dir)
        .map_err(|e| format!("mirroring the store: {e}"))?;
    Ok(format!(
        "2. snapshot {}: {} objects stored ({} zero blocks left out, {} duplicates stored once), mirrored to {}",
        &created.snapshot_digest[..16],
        created.objects_stored,
        created.blocks_zero,
        created.blocks_deduplicated,
        paths.mirror_dir.display()
    ))
}

/// Serve `s3://bucket/demo` from the in-process endpoint, with its faults:
/// the wedged block's body stalls after the headers, and the first 12 block
/// requests get `503 SlowDown`.
async fn serve_primary(engine: &Engine, config: &Config, server: &LoopbackS3, wedged_key: &str) -> Result<(), String> {
    server.add_fault(FaultRule::new(Fault::Stall { after_bytes: 4096 }).path_contains(wedged_key));
    server.add_fault(FaultRule::new(Fault::SlowDown).path_contains("/blocks/").first(12));
    let s3_config = S3Config { body_idle_timeout_millis: config.s3.body_idle_timeout_millis, ..server.s3_config() };
    let primary = S3Store::connect_with_static_credentials("bucket", "demo", &s3_config, &LoopbackS3::credentials())
        .await
        .map_err(|e| e.to_string())?;
    // Every production policy around it, in the one order `store::stack` builds.
    engine
        .register_remote_store(StoreUrl::S3 { bucket: "bucket".into(), prefix: "demo".into() }, Arc::new(primary))
        .map_err(|e| e.to_string())
}

/// Read the target back against the manifest and the sample's pattern.
fn verify_restored(
    manifest: &Manifest,
    volume: &SampleVolume,
    target: &Path,
    say: impl Fn(String),
) -> Result<ExitCode, String> {
    let readback = crate::restore::readback::readback(manifest, target).map_err(|e| e.to_string())?;
    let pattern = volume.mismatches(target).map_err(|e| e.to_string())?;
    if !readback.matches() || !pattern.is_empty() {
        say(format!(
            "5. verify FAILED: manifest mismatches {:?}, pattern mismatches {:?}",
            readback.mismatched, pattern
        ));
        return Ok(ExitCode::DataFailure);
    }
    say(format!("5. verified: all {} blocks match the manifest and the source, byte for byte", readback.blocks_total));
    Ok(ExitCode::Success)
}

fn local_manifest(store_dir: &Path) -> Result<Manifest, String> {
    let bytes = std::fs::read(store_dir.join("demo.manifest")).map_err(|e| e.to_string())?;
    Manifest::decode(&bytes, &ManifestLimits::default()).map_err(|e| e.to_string())
}

/// A block about a sixth into the volume whose object no other block shares.
fn pick_wedged_block(manifest: &Manifest) -> (BlockIndex, String) {
    let entries = manifest.entries();
    let shared = |i: usize| entries.iter().filter(|e| e.hash == entries[i].hash).count() > 1;
    let i = (entries.len() / 6..entries.len()).find(|&i| !shared(i)).unwrap_or(0);
    (entries[i].index, block_key(&entries[i].hash, entries[i].compression))
}

fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("non-zero")
}
