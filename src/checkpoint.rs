//! Checkpoint: restore progress that survives a crash.
//!
//! # Invariants
//!
//! These are the ledger invariants of `docs/architecture.md` (numbered as
//! there) that this module owns;
//! the code asserts them and the tests check them.
//!
//! 1. **The ledger is complete and disjoint.** Every block of the layout is
//!    exactly one of settled, failed or pending ([`Ledger::is_consistent`]).
//!    Settling a failed block (a rerun that succeeded) removes it from the
//!    failed set; a settled block is never recorded as failed.
//! 3. **A checkpoint names only durable blocks, and its cursor only moves
//!    forward.** A block is settled only after its write completed AND a later
//!    fdatasync of the target returned success: the caller settles, this
//!    module persists exactly what was settled and nothing else. The cursor of
//!    a [`SettledSet`] never decreases (asserted), and [`CheckpointDir::save`]
//!    refuses to replace a checkpoint with one whose cursor is lower than the
//!    one it last saved or loaded for that key.
//! 4. **A checkpoint is used only by the job it belongs to.** It carries the
//!    job's [`JobIdentity`]: manifest digest, target identity (for a file,
//!    the device and inode of the file actually written; for a block device,
//!    its device number, whichever node names it; and the size), block
//!    layout, and the blocks it covers (all, or one shard's range).
//!    [`CheckpointDir::load`] refuses a checkpoint whose identity differs
//!    ([`CheckpointError::Mismatch`], naming every field that differs) and a
//!    torn or corrupt one ([`CheckpointError::Corrupt`]). Neither is ever
//!    silently reused, and neither is ever silently treated as "start from
//!    zero": the operator discards it with `--restart`.
//!
//! # What flows in and out
//!
//! In: settled and failed block indexes from the write stage (after each
//! successful fdatasync), and the job identity. Out: a small versioned binary
//! file per job in the state directory the configuration names, written
//! atomically (temp file, fsync, rename, fsync the directory), and on resume
//! the [`SettledSet`] the planner subtracts from the manifest.
//!
//! # Limits
//!
//! - Memory: the cursor plus settled ranges above it, proportional to how
//!   fragmented the settled blocks are (in a restore: blocks in flight plus
//!   failed blocks), never to the block count. See [`settled`].
//! - File: the ranges and failed blocks as varints, with failure reasons cut
//!   to [`FAILURE_REASON_MAX_BYTES`]; a file over [`CHECKPOINT_SIZE_MAX_BYTES`]
//!   is neither written nor read.
//! - Cadence: [`SaveCadence`] saves every interval of time or of newly
//!   settled bytes, whichever comes first, which bounds the work a crash can
//!   make a job redo.
//!
//! # How it fails
//!
//! Loading fails with a [`CheckpointError`] an operator can act on: `Corrupt`
//! (torn, truncated, checksum mismatch, impossible content), `Mismatch`
//! (belongs to another restore), `UnsupportedVersion`, or `Io`. Saving fails
//! with an `io::Error` and leaves the previous checkpoint intact.

use std::fmt;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use crate::block::{BlockLayout, BlockRange};
use crate::manifest::ManifestDigest;

mod cadence;
mod config;
mod dir;
mod format;
pub mod settled;

pub use cadence::{CHECKPOINT_INTERVAL_BYTES_DEFAULT, CHECKPOINT_INTERVAL_MILLIS_DEFAULT, SaveCadence};
pub use config::CheckpointConfig;
pub use dir::{CheckpointDir, CheckpointKey, FileId, checkpoint_key, file_id, shard_checkpoint_key};
pub use format::{CHECKPOINT_SIZE_MAX_BYTES, Checkpoint, FORMAT_VERSION, FormatError, unix_now_secs};
pub use settled::{FAILURE_REASON_MAX_BYTES, FailedSet, Ledger, SettledSet};

/// What kind of target a restore writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    /// A regular file (for a file target: the staging file).
    File,
    BlockDevice,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::File => "file",
            TargetKind::BlockDevice => "block device",
        }
    }
}

/// Which file or device is actually being written: a path can be replaced
/// under us, a device and inode cannot.
///
/// A **file** is its filesystem's device (`st_dev`) and its inode. A **block
/// device** is its own device number (`st_rdev`, major:minor) and `ino` is 0:
/// the node that names it is not the device. Another node of the same device
/// (a new pod's `/dev/...`, a `mknod`) is the same target, so a retried pod
/// resumes; another device is not, so its checkpoint is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetIdentity {
    pub kind: TargetKind,
    /// A file: `st_dev` of its filesystem. A block device: its `st_rdev`.
    pub dev: u64,
    /// A file: its inode. A block device: 0.
    pub ino: u64,
    pub size_bytes: u64,
}

impl TargetIdentity {
    /// The identity of an open target. A block device's size is found by
    /// seeking to its end (its metadata says 0); the writer uses positioned
    /// writes, so the file position does not matter.
    pub fn of_file(file: &File) -> io::Result<Self> {
        let metadata = file.metadata()?;
        let file_type = metadata.file_type();
        if file_type.is_block_device() {
            let mut handle = file;
            let size_bytes = handle.seek(SeekFrom::End(0))?;
            return Ok(Self { kind: TargetKind::BlockDevice, dev: metadata.rdev(), ino: 0, size_bytes });
        }
        if !file_type.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a restore target must be a regular file or a block device",
            ));
        }
        Ok(Self { kind: TargetKind::File, dev: metadata.dev(), ino: metadata.ino(), size_bytes: metadata.len() })
    }

    /// `major:minor` of a device number.
    fn device_number(dev: u64) -> String {
        format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
    }
}

impl fmt::Display for TargetIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            TargetKind::File => write!(f, "file dev {} inode {} of {} bytes", self.dev, self.ino, self.size_bytes),
            TargetKind::BlockDevice => {
                write!(f, "block device {} of {} bytes", Self::device_number(self.dev), self.size_bytes)
            }
        }
    }
}

/// What a checkpoint belongs to (invariant 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobIdentity {
    pub manifest_digest: ManifestDigest,
    pub target: TargetIdentity,
    pub layout: BlockLayout,
    /// The blocks the restore covers: every block of the layout, or one
    /// shard's range (`--blocks`). Shards of one volume never share or
    /// mistake each other's checkpoints.
    pub blocks: BlockRange,
}

impl JobIdentity {
    /// Every field of `found` that differs from `self`, as
    /// "what: expected X, found Y" lines. Empty when they are the same job.
    pub fn differences(&self, found: &JobIdentity) -> Vec<String> {
        let mut what = Vec::new();
        let mut compare = |name: &str, expected: String, found: String| {
            if expected != found {
                what.push(format!("{name}: expected {expected}, found {found}"));
            }
        };
        compare("manifest digest", self.manifest_digest.to_hex(), found.manifest_digest.to_hex());
        compare("target kind", self.target.kind.name().into(), found.target.kind.name().into());
        let device = |target: &TargetIdentity| match target.kind {
            TargetKind::File => target.dev.to_string(),
            TargetKind::BlockDevice => TargetIdentity::device_number(target.dev),
        };
        compare("target device", device(&self.target), device(&found.target));
        compare("target inode", self.target.ino.to_string(), found.target.ino.to_string());
        compare("target size", bytes(self.target.size_bytes), bytes(found.target.size_bytes));
        compare("volume size", bytes(self.layout.volume_size_bytes()), bytes(found.layout.volume_size_bytes()));
        compare(
            "block size",
            bytes(self.layout.block_size_bytes().into()),
            bytes(found.layout.block_size_bytes().into()),
        );
        compare("blocks", self.blocks.to_string(), found.blocks.to_string());
        what
    }
}

fn bytes(count: u64) -> String {
    format!("{count} bytes")
}

/// Why a checkpoint could not be used. Each variant says what the operator
/// can do about it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "the checkpoint at {} is corrupt ({detail}). rehydrate will not guess: rerun with --restart to discard it and restore from the beginning",
        path.display()
    )]
    Corrupt { path: PathBuf, detail: String },

    #[error(
        "the checkpoint at {} belongs to another restore ({}). rehydrate will neither reuse nor discard it: check the job's snapshot and target, or rerun with --restart to discard it and restore from the beginning",
        path.display(),
        what.join("; ")
    )]
    Mismatch { path: PathBuf, what: Vec<String> },

    #[error(
        "the checkpoint at {} has format version {found}, this rehydrate reads versions 1 to {supported}: resume with the rehydrate that wrote it, or rerun with --restart to discard it",
        path.display()
    )]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },

    #[error("cannot {op} the checkpoint at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}
