//! Checkpoint files on a real filesystem: atomic save and load, refusal of
//! corrupt and foreign checkpoints, and the temp-file sweep.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use rehydrate::block::{BlockLayout, BlockRange};
use rehydrate::checkpoint::{
    Checkpoint, CheckpointDir, CheckpointError, JobIdentity, TargetIdentity, TargetKind, checkpoint_key,
};
use rehydrate::manifest::ManifestDigest;

const BLOCK_SIZE_BYTES: u32 = 4096;
const BLOCK_COUNT: u64 = 100;

/// A real staging file and the identity of a job writing it.
fn staging_target(dir: &Path) -> (std::path::PathBuf, JobIdentity) {
    let path = dir.join("volume.img.staging");
    let file = fs::File::create(&path).unwrap();
    file.set_len(BLOCK_COUNT * u64::from(BLOCK_SIZE_BYTES)).unwrap();
    let target = TargetIdentity::of_file(&file).unwrap();
    let layout = BlockLayout::new(BLOCK_COUNT * u64::from(BLOCK_SIZE_BYTES), BLOCK_SIZE_BYTES).unwrap();
    let blocks = BlockRange::all(&layout);
    (path, JobIdentity { manifest_digest: ManifestDigest([0xab; 32]), target, layout, blocks })
}

fn progress(identity: JobIdentity) -> Checkpoint {
    let mut checkpoint = Checkpoint::new(identity, 1_700_000_000);
    checkpoint.settle_many((0..40).chain([45, 46, 90]));
    checkpoint.fail(41, "404 on s3-primary; 404 on mirror");
    checkpoint
}

#[test]
fn target_identity_names_the_file_actually_written() {
    let state = tempfile::tempdir().unwrap();
    let (path, identity) = staging_target(state.path());
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(identity.target.kind, TargetKind::File);
    assert_eq!((identity.target.dev, identity.target.ino), (metadata.dev(), metadata.ino()));
    assert_eq!(identity.target.size_bytes, BLOCK_COUNT * u64::from(BLOCK_SIZE_BYTES));
    let not_a_target = fs::File::open(state.path()).unwrap();
    assert!(TargetIdentity::of_file(&not_a_target).is_err(), "a directory is not a target");
}

#[test]
fn save_then_load_roundtrips_and_a_save_replaces_the_previous_one() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);

    assert!(dir.load(&key, &identity).unwrap().is_none(), "no file: nothing to resume");
    let mut checkpoint = progress(identity);
    dir.save(&key, &checkpoint).unwrap();
    assert_eq!(dir.load(&key, &identity).unwrap().as_ref(), Some(&checkpoint));

    checkpoint.settle_many(40..50);
    checkpoint.set_updated_unix_secs(1_700_000_005);
    dir.save(&key, &checkpoint).unwrap();
    let loaded = CheckpointDir::open(dir.path().to_path_buf()).unwrap().load(&key, &identity).unwrap().unwrap();
    assert_eq!(loaded, checkpoint);
    assert_eq!(loaded.settled().cursor(), 50);
    assert!(loaded.failed().is_empty(), "block 41 settled on the rerun");
    assert!(loaded.ledger().is_consistent());
    let names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, vec![format!("{key}.ckpt")], "exactly one file, no temp left");
}

#[test]
fn the_cursor_never_moves_back_without_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);
    dir.save(&key, &progress(identity)).unwrap();

    let behind = Checkpoint::new(identity, 1_700_000_100);
    let error = dir.save(&key, &behind).unwrap_err();
    assert!(error.to_string().contains("back from block 40 to block 0"), "{error}");
    assert_eq!(dir.load(&key, &identity).unwrap().unwrap().settled().cursor(), 40);

    // --restart: discard, then start over.
    assert!(dir.remove(&key).unwrap());
    assert!(!dir.remove(&key).unwrap());
    dir.save(&key, &behind).unwrap();
    assert_eq!(dir.load(&key, &identity).unwrap().unwrap().settled().cursor(), 0);
}

#[test]
fn torn_or_damaged_files_are_corrupt_never_a_fresh_start() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);
    dir.save(&key, &progress(identity)).unwrap();
    let path = dir.file_path(&key);
    let bytes = fs::read(&path).unwrap();

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x10;
    for damaged in [bytes[..bytes.len() - 1].to_vec(), bytes[..10].to_vec(), flipped, Vec::new()] {
        fs::write(&path, &damaged).unwrap();
        let error = dir.load(&key, &identity).unwrap_err();
        assert!(matches!(&error, CheckpointError::Corrupt { path: p, .. } if *p == path), "{error:?}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()) && message.contains("--restart"), "{message}");
        assert_eq!(fs::read(&path).unwrap(), damaged, "a refused checkpoint is left as it was");
    }
}

#[test]
fn a_checkpoint_of_another_restore_is_refused_naming_what_differs() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);
    dir.save(&key, &progress(identity)).unwrap();

    let mut other_snapshot = identity;
    other_snapshot.manifest_digest = ManifestDigest([0xcd; 32]);
    let mut recreated_target = identity;
    recreated_target.target.ino += 1;
    let mut other_layout = identity;
    other_layout.layout = BlockLayout::new(identity.layout.volume_size_bytes(), 8192).unwrap();

    for (expected, names) in [
        (other_snapshot, vec!["manifest digest"]),
        (recreated_target, vec!["target inode"]),
        (other_layout, vec!["block size"]),
    ] {
        let error = dir.load(&key, &expected).unwrap_err();
        let CheckpointError::Mismatch { what, .. } = &error else { panic!("{error:?}") };
        let named: Vec<&str> = what.iter().map(|w| w.split(':').next().unwrap()).collect();
        assert_eq!(named, names, "{what:?}");
        let message = error.to_string();
        assert!(message.contains("belongs to another restore") && message.contains("--restart"), "{message}");
    }
    let error = dir.load(&key, &other_snapshot).unwrap_err().to_string();
    assert!(error.contains(&format!("expected {}", "cd".repeat(32))) && error.contains(&"ab".repeat(32)), "{error}");
    assert!(dir.load(&key, &identity).unwrap().is_some(), "the file was not discarded");
}

#[test]
fn a_newer_format_version_is_unsupported() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);
    let mut bytes = progress(identity).encode();
    bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
    let body_len = bytes.len() - 32;
    let checksum = *blake3::hash(&bytes[..body_len]).as_bytes();
    bytes[body_len..].copy_from_slice(&checksum);
    fs::write(dir.file_path(&key), bytes).unwrap();
    let error = dir.load(&key, &identity).unwrap_err();
    assert!(matches!(error, CheckpointError::UnsupportedVersion { found: 9, supported: 2, .. }), "{error:?}");
}

/// The pid of a process that has exited.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn sweep_removes_only_temp_files_of_dead_writers() {
    let state = tempfile::tempdir().unwrap();
    let (target, identity) = staging_target(state.path());
    let dir = CheckpointDir::open(state.path().join("state")).unwrap();
    let key = checkpoint_key(&target);
    dir.save(&key, &progress(identity)).unwrap();

    let mut live = Command::new("sleep").arg("30").spawn().unwrap();
    let nonce = "0123456789abcdef";
    let dead = [
        format!("{key}.ckpt.tmp-{}-{nonce}-0", dead_pid()),
        // An earlier process that had our pid (pid 1 in a container): its
        // nonce differs from ours.
        format!("{key}.ckpt.tmp-{}-{nonce}-3", std::process::id()),
    ];
    let kept = [
        format!("{key}.ckpt.tmp-{}-{nonce}-0", live.id()),
        format!("{key}.ckpt.tmp-garbage"),
        "jobs.redb".to_owned(),
        "notes.ckpt.tmp-1-0123456789abcdef-0".to_owned(),
    ];
    for name in dead.iter().chain(&kept) {
        fs::write(dir.path().join(name), b"partial").unwrap();
    }
    let dead_dir_name = format!("{key}.ckpt.tmp-{}-{nonce}-9", dead_pid());
    fs::create_dir(dir.path().join(&dead_dir_name)).unwrap();

    let removed = dir.sweep_temporaries().unwrap();
    live.kill().unwrap();
    live.wait().unwrap();

    assert_eq!(removed, dead.len());
    for name in &dead {
        assert!(!dir.path().join(name).exists(), "{name} should be swept");
    }
    for name in kept.iter().chain([&dead_dir_name]) {
        assert!(dir.path().join(name).exists(), "{name} must be left alone");
    }
    assert!(dir.load(&key, &identity).unwrap().is_some(), "the checkpoint itself is untouched");
    // The live writer has been killed since: now its temp file goes too.
    assert_eq!(dir.sweep_temporaries().unwrap(), 1);
    assert!(!dir.path().join(&kept[0]).exists());
    assert_eq!(dir.sweep_temporaries().unwrap(), 0);
}
