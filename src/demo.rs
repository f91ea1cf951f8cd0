//! `rehydrate demo`: the whole story on embedded defaults, in a temporary
//! directory, with nothing to install.
//!
//! It builds a sample volume (zero blocks, duplicate blocks, a short tail),
//! snapshots it into a `file://` store, restores it into a new file, reads it
//! back against the manifest and against the volume's own pattern, and prints
//! the summary. The temporary directory is removed at the end.

use std::path::PathBuf;

use clap::Args;

use crate::block::{Compression, HashAlgorithm};
use crate::cli::{human_bytes, print_restore_result, restore_with_progress};
use crate::config::Config;
use crate::error::ExitCode;
use crate::job::{Engine, RestoreSpec};
use crate::sample::SampleVolume;
use crate::store::StoreUrl;

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
    let source = dir.join("source.img");
    let store_root = dir.join("store/bucket/demo");
    let target = dir.join("restored/volume.img");
    std::fs::create_dir_all(target.parent().expect("has parent")).map_err(|e| e.to_string())?;
    say(format!(
        "1. sample volume: {} ({} blocks of 1 MiB: every 8th zero, every 8th a duplicate, short tail)",
        human_bytes(size),
        volume.block_count()
    ));
    volume.write_to(&source).map_err(|e| format!("writing {}: {e}", source.display()))?;

    let mut config = Config::default();
    config.checkpoint.dir = Some(dir.join("state"));
    let engine = Engine::new(config);
    let store = engine.open_store(&StoreUrl::File { root: store_root.clone() }).await.map_err(|e| e.to_string())?;
    let spec = crate::snapshot::CreateSpec {
        source: source.clone(),
        name: "demo".into(),
        block_size_bytes: volume.block_size_bytes,
        compression: Compression::Zstd,
        hash_algorithm: HashAlgorithm::Blake3,
        puts_inflight_max: 16,
    };
    let created = crate::snapshot::create(store, &spec).await.map_err(|e| e.to_string())?;
    say(format!(
        "2. snapshot {}: {} objects stored ({} zero blocks left out, {} duplicates stored once)\n   {}",
        &created.snapshot_digest[..16],
        created.objects_stored,
        created.blocks_zero,
        created.blocks_deduplicated,
        created.manifest_url
    ));

    say(format!("3. restore into {}", target.display()));
    let spec = RestoreSpec {
        manifest_url: created.manifest_url.clone(),
        target: target.clone(),
        secondaries: vec![],
        in_place: false,
        restart: false,
    };
    let result = restore_with_progress(&engine, &spec, !args.json).await;
    let code = print_restore_result(&result, args.json);
    if code != ExitCode::Success {
        return Ok(code);
    }

    let (url, key) = StoreUrl::parse_manifest(&created.manifest_url).map_err(|e| e.to_string())?;
    let store = engine.open_store(&url).await.map_err(|e| e.to_string())?;
    let manifest = crate::job::load_manifest(&engine, &store, &key).await.map_err(|e| e.to_string())?;
    let readback = crate::job::readback::readback(&manifest, &target).map_err(|e| e.to_string())?;
    let pattern = volume.mismatches(&target).map_err(|e| e.to_string())?;
    if !readback.matches() || !pattern.is_empty() {
        say(format!(
            "4. verify FAILED: manifest mismatches {:?}, pattern mismatches {:?}",
            readback.mismatched, pattern
        ));
        return Ok(ExitCode::DataFailure);
    }
    say(format!("4. verified: all {} blocks match the manifest and the source, byte for byte", readback.blocks_total));
    Ok(ExitCode::Success)
}
