//! The allocate phase and resume: open the target, find the checkpoint that
//! belongs to it (resume from it, or start a new one; a checkpoint of another
//! restore is refused, `docs/architecture.md` invariant 4), check there is
//! room for what is left to write, and take that room (`write.preallocate`).
//!
//! Preallocation: a staging file gets its blocks (the snapshot's stored
//! blocks in the restore's range; zero blocks stay holes) with one
//! `fallocate` per run of adjacent blocks before anything is written. The
//! room is the restore's from the start, so another writer filling the
//! filesystem cannot fail it halfway; and a direct write into an allocated
//! extent is issued inline by io_uring, where one into a hole (which ext4
//! and xfs must allocate, and so may block) is handed to a kernel worker
//! thread: a wake-up and two context switches per block (at 256 KiB blocks,
//! 1,613 of the restore's 7,900 context switches per GiB). A filesystem
//! without `fallocate` is written as before; one without the room refuses
//! the restore before a block is fetched, keeping a resumed staging file and
//! its checkpoint, removing a fresh one and the checkpoint saved for it.

use std::sync::Arc;

use super::phases::RestoreSpec;
use super::{Engine, RestoreError};
use crate::block::{BlockIndex, BlockLayout, BlockRange};
use crate::checkpoint::{
    Checkpoint, CheckpointDir, CheckpointKey, FileId, JobIdentity, TargetIdentity, file_id, shard_checkpoint_key,
    unix_now_secs,
};
use crate::snapshot::Snapshot;
use crate::target::{self, OpenOptionsSpec, StagingGuard, Target};
use crate::write::Writer;

/// Where this restore's checkpoint lives, when checkpoints are on.
#[derive(Debug, Clone)]
pub(super) struct Durable {
    pub(super) dir: Arc<CheckpointDir>,
    pub(super) key: CheckpointKey,
    /// Device and inode of the checkpoint file this restore last wrote or
    /// resumed from; `None` before it has one. A save or removal finding
    /// another file at the path stops instead: a restore never overwrites a
    /// checkpoint it does not own.
    owned: Arc<std::sync::Mutex<Option<FileId>>>,
}

impl Durable {
    /// Open the checkpoint directory, sweep temporaries of crashed writers,
    /// and discard this target's checkpoint on `--restart`. A shard's
    /// checkpoint is its own: its key names its range.
    pub(super) fn open(
        engine: &Engine,
        spec: &RestoreSpec,
        blocks: BlockRange,
        layout: &BlockLayout,
    ) -> Result<Option<Durable>, RestoreError> {
        if !engine.config.checkpoint.enabled {
            return Ok(None);
        }
        let path = engine.config.checkpoint.resolved_dir();
        let dir = CheckpointDir::open(path.clone()).map_err(|e| {
            RestoreError::Io(format!(
                "checkpoint directory {}: {e}: set checkpoint.dir to a writable directory",
                path.display()
            ))
        })?;
        if let Err(e) = dir.sweep_temporaries() {
            tracing::warn!(dir = %path.display(), error = %e, "could not sweep checkpoint temporaries");
        }
        let shard = (!blocks.is_all(layout)).then_some(blocks);
        let durable =
            Durable { dir: Arc::new(dir), key: shard_checkpoint_key(&spec.target, shard), owned: Default::default() };
        if spec.restart {
            durable
                .dir
                .remove(&durable.key)
                .map_err(|e| RestoreError::Io(format!("discarding the checkpoint: {e}")))?;
        }
        Ok(Some(durable))
    }

    pub(super) fn exists(&self) -> bool {
        self.dir.file_path(&self.key).exists()
    }

    /// Save over the checkpoint this restore owns (none, before its first
    /// save); a file another process put there stops the restore instead.
    pub(super) fn save(&self, checkpoint: &Checkpoint) -> Result<(), RestoreError> {
        let path = self.dir.file_path(&self.key);
        let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
        match self.dir.save_over(&self.key, checkpoint, Some(*owned)) {
            Ok(written) => {
                *owned = Some(written);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(RestoreError::Busy(format!(
                "the checkpoint {} was replaced or removed by another process: this restore stops without overwriting it (another restore of the same target may be running)",
                path.display()
            ))),
            Err(e) => Err(RestoreError::Io(format!("saving the checkpoint {}: {e}", path.display()))),
        }
    }

    /// This restore resumes from the checkpoint at the path: it owns it.
    pub(super) fn claim(&self) {
        *self.owned.lock().unwrap_or_else(|e| e.into_inner()) = file_id(&self.dir.file_path(&self.key)).ok().flatten();
    }

    /// Remove the checkpoint, unless the file at the path is not this
    /// restore's (when it has one).
    pub(super) fn remove(&self) {
        let path = self.dir.file_path(&self.key);
        let owned = *self.owned.lock().unwrap_or_else(|e| e.into_inner());
        if owned.is_some() && file_id(&path).ok().flatten() != owned {
            tracing::warn!(path = %path.display(), "the checkpoint is not this restore's: left alone");
            return;
        }
        if let Err(e) = self.dir.remove(&self.key) {
            tracing::warn!(error = %e, "could not remove the checkpoint");
        }
    }
}

pub(super) enum Allocation {
    Ready {
        target: Target,
        checkpoint: Box<Checkpoint>,
    },
    /// A crash came between the swap and the final status: the target in
    /// place is the whole restore the checkpoint describes.
    AlreadyRestored,
}

/// Open the target and find the checkpoint that belongs to it: resume from
/// it, or start a new one. A checkpoint of another restore is refused and the
/// target left as it was.
pub(super) fn allocate(
    spec: &RestoreSpec,
    snapshot: &dyn Snapshot,
    blocks: BlockRange,
    durable: Option<&Durable>,
) -> Result<Allocation, RestoreError> {
    let layout = snapshot.layout();
    let has_checkpoint = durable.is_some_and(Durable::exists);
    let identity_of =
        |target: TargetIdentity| JobIdentity { manifest_digest: snapshot.digest(), target, layout, blocks };
    let staged = !spec.in_place && std::fs::symlink_metadata(&spec.target).map(|m| m.is_file()).unwrap_or(true);
    if let (Some(d), true, true) = (durable, has_checkpoint, staged) {
        let staging_gone = target::staging_path(&spec.target).is_some_and(|p| !p.exists());
        if staging_gone {
            return already_restored_or_refuse(spec, d, &identity_of);
        }
    }
    let target = target::open(
        &spec.target,
        OpenOptionsSpec {
            volume_size_bytes: layout.volume_size_bytes(),
            in_place: spec.in_place,
            reuse_staging: has_checkpoint,
            shared: spec.blocks.is_some(),
        },
    )?;
    let identity = identity_of(target.identity);
    let checkpoint = match durable {
        Some(d) if has_checkpoint => match d.dir.load(&d.key, &identity) {
            Ok(Some(checkpoint)) => {
                d.claim();
                checkpoint
            }
            Ok(None) => Checkpoint::new(identity, unix_now_secs()),
            Err(e) => return Err(RestoreError::Refused(e.to_string())),
        },
        _ => Checkpoint::new(identity, unix_now_secs()),
    };
    if let Some(d) = durable
        && !has_checkpoint
    {
        // From now on the staging file is owned by this checkpoint; if that
        // cannot be recorded, the new staging file goes.
        if let Err(e) = d.save(&checkpoint) {
            if target.staged && target.fresh {
                let _ = std::fs::remove_file(&target.write_path);
            }
            return Err(e);
        }
    }
    Ok(Allocation::Ready { target, checkpoint: Box::new(checkpoint) })
}

pub(super) fn already_restored_or_refuse(
    spec: &RestoreSpec,
    durable: &Durable,
    identity_of: &dyn Fn(TargetIdentity) -> JobIdentity,
) -> Result<Allocation, RestoreError> {
    let in_place = std::fs::File::open(&spec.target).and_then(|f| TargetIdentity::of_file(&f));
    if let Ok(found) = in_place
        && let Ok(Some(checkpoint)) = durable.dir.load(&durable.key, &identity_of(found))
        && checkpoint.settled().is_complete()
    {
        return Ok(Allocation::AlreadyRestored);
    }
    Err(RestoreError::Refused(format!(
        "a checkpoint for {} exists ({}) but its staging file is gone, so its progress cannot be resumed: rerun with --restart to restore from the beginning",
        spec.target.display(),
        durable.dir.file_path(&durable.key).display()
    )))
}

pub(super) fn io_error(target: &Target, what: &str, e: std::io::Error) -> RestoreError {
    io_error_at(&target.write_path, what, e)
}

/// [`io_error`] where only the written path is at hand (a blocking thread's).
fn io_error_at(write_path: &std::path::Path, what: &str, e: std::io::Error) -> RestoreError {
    RestoreError::Io(format!("{}: {what}: {e}", write_path.display()))
}

/// A fresh file target is sparse: it needs room for the non-zero blocks.
pub(super) fn check_free_space(target: &Target, snapshot: &dyn Snapshot) -> Result<(), RestoreError> {
    if !target.staged {
        return Ok(());
    }
    let needed = snapshot.block_bytes_total();
    let free = target::free_bytes(&target::parent_dir(&target.path))
        .map_err(|e| io_error(target, "cannot read free space", e))?;
    if free < needed {
        return Err(RestoreError::Refused(format!(
            "{}: the restore needs {needed} bytes of free space, the filesystem has {free}: free space or choose another target",
            target.path.display()
        )));
    }
    Ok(())
}

/// Allocate the staging file's blocks this restore will write (see the
/// module doc). The calls wait on a blocking thread: one `fallocate` of 16 GiB took
/// 80 ms on ext4 here, and a volume whose stored blocks alternate with zero
/// ones takes a call per block (12 µs each).
async fn preallocate(target: &Target, snapshot: &dyn Snapshot, blocks: BlockRange) -> Result<(), RestoreError> {
    let layout = snapshot.layout();
    let runs: Vec<_> = block_runs(layout, snapshot.blocks().map(|b| b.index).filter(|&i| blocks.contains(i))).collect();
    let file = target.file.try_clone().map_err(|e| io_error(target, "cannot duplicate the target handle", e))?;
    let (path, write_path) = (target.path.clone(), target.write_path.clone());
    let allocate = move || allocate_runs(&file, &runs, &path, &write_path);
    tokio::task::spawn_blocking(allocate)
        .await
        .unwrap_or_else(|e| Err(RestoreError::Io(format!("allocating the blocks to write: {e}"))))
}

fn allocate_runs(
    file: &std::fs::File,
    runs: &[(u64, u64)],
    path: &std::path::Path,
    write_path: &std::path::Path,
) -> Result<(), RestoreError> {
    let started = std::time::Instant::now();
    let mut runs_count = 0_u64;
    for &(offset, len) in runs {
        match crate::sys::allocate_range(file, offset, len) {
            Ok(()) => runs_count += 1,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                tracing::debug!(error = %e, "the target's filesystem cannot preallocate: blocks are allocated as written");
                return Ok(());
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                return Err(RestoreError::Refused(format!(
                    "{}: the filesystem has no room for the restore's blocks ({e} allocating {len} bytes at offset {offset}): free space or choose another target",
                    path.display()
                )));
            }
            Err(e) => return Err(io_error_at(write_path, "cannot allocate the blocks to write", e)),
        }
    }
    tracing::debug!(runs_count, elapsed_ms = started.elapsed().as_millis() as u64, "preallocated the blocks to write");
    Ok(())
}

/// Byte ranges `(offset, len)` of the blocks `indexes` (ascending), adjacent
/// blocks merged into one range.
fn block_runs(layout: BlockLayout, indexes: impl Iterator<Item = BlockIndex>) -> impl Iterator<Item = (u64, u64)> {
    let mut indexes = indexes.peekable();
    std::iter::from_fn(move || {
        let first = indexes.next()?;
        let offset = layout.offset(first);
        let mut end = offset + u64::from(layout.len(first));
        while let Some(&next) = indexes.peek()
            && layout.offset(next) == end
        {
            end += u64::from(layout.len(next));
            indexes.next();
        }
        Some((offset, end - offset))
    })
}

/// What the allocate phase hands the rehydrate phase.
pub(super) struct Allocated {
    pub(super) target: Target,
    pub(super) checkpoint: Checkpoint,
    /// Removes a staging file no checkpoint can resume, unless disarmed.
    pub(super) staging: StagingGuard,
    pub(super) writer: Writer,
}

/// Allocate: open the target and the checkpoint that belongs to it, check
/// the room a restore from the beginning needs, take it, start the writer
/// (`live`: for a volume served while it is restored). `None`: the target in
/// place is already the whole restore. When a step after the opening fails,
/// a fresh staging file goes (the guard) and so does the checkpoint saved
/// for it, so a rerun starts clean; a resumed one keeps its staging file and
/// checkpoint for the rerun.
pub(super) async fn allocate_phase(
    engine: &Engine,
    spec: &RestoreSpec,
    snapshot: &dyn Snapshot,
    blocks: BlockRange,
    durable: Option<&Durable>,
    live: bool,
) -> Result<Option<Allocated>, RestoreError> {
    let (target, checkpoint) = match allocate(spec, snapshot, blocks, durable)? {
        Allocation::Ready { target, checkpoint } => (target, *checkpoint),
        Allocation::AlreadyRestored => return Ok(None),
    };
    let mut staging = StagingGuard::new(&target);
    match prepare(engine, &target, &checkpoint, snapshot, blocks, live).await {
        Ok(writer) => Ok(Some(Allocated { target, checkpoint, staging, writer })),
        Err(e) => {
            match (target.fresh, durable) {
                (true, Some(d)) => d.remove(),
                (true, None) => {}
                (false, _) => staging.disarm(),
            }
            Err(e)
        }
    }
}

/// The opened target's room (checked from the beginning, taken when
/// preallocating) and its writer.
async fn prepare(
    engine: &Engine,
    target: &Target,
    checkpoint: &Checkpoint,
    snapshot: &dyn Snapshot,
    blocks: BlockRange,
    live: bool,
) -> Result<Writer, RestoreError> {
    let blocks_resumed = checkpoint.settled().settled_count();
    if blocks_resumed == 0 {
        check_free_space(target, snapshot)?;
    } else {
        tracing::info!(
            blocks_resumed,
            percent = 100.0 * blocks_resumed as f64 / blocks.len() as f64,
            "resuming from checkpoint"
        );
    }
    if engine.config.write.preallocate && target.staged {
        preallocate(target, snapshot, blocks).await?;
    }
    let writer_file = target.file.try_clone().map_err(|e| io_error(target, "cannot duplicate the target handle", e))?;
    let mut write = engine.config.write.clone();
    if live && !crate::sys::blocks_are_whole_pages() {
        // The export reads and writes the target through the page cache;
        // O_DIRECT writes beside it are coherent only when no page holds
        // parts of two blocks (docs/architecture.md, "Serving the volume
        // while it is restored").
        write.direct_io = crate::write::DirectIo::Off;
    }
    Writer::open(writer_file, &write).map_err(|e| io_error(target, "cannot start the writer", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_runs_merge_adjacent_blocks_and_keep_the_short_last_one() {
        // Ten blocks of 4 KiB, the last 1 KiB long.
        let layout = BlockLayout::new(9 * 4096 + 1024, 4096).unwrap();
        let runs: Vec<_> = block_runs(layout, [0, 1, 2, 5, 7, 8, 9].into_iter()).collect();
        assert_eq!(runs, vec![(0, 3 * 4096), (5 * 4096, 4096), (7 * 4096, 2 * 4096 + 1024)]);
        assert_eq!(block_runs(layout, std::iter::empty()).count(), 0);
    }
}
