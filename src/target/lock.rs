//! Exclusive ownership of a target between processes.
//!
//! A restore holds its target from the end of validation to its last step
//! (the swap, or the end of a failed run), so a second restore of the same
//! target, from the CLI, another worker, or the same worker, is refused at
//! once instead of writing under the first (`docs/architecture.md`,
//! invariant 8).
//!
//! The lock is an open file description (OFD) write lock (`F_OFD_SETLK`) over
//! a byte range of a lock file, one byte per block: a whole restore locks
//! every byte, a shard (`--blocks`) its own range, so shards of one target run
//! side by side and overlapping ones exclude each other. An OFD lock belongs to
//! the open file, not the process: it goes with its holder's descriptor when
//! the holder ends, however it ends (a kill -9 never leaves a target locked),
//! and two restores in one worker process exclude each other like two
//! processes.
//!
//! Where the lock lives:
//! - a **regular file** target: `.<name>.rehydrate-lock` next to it (beside
//!   the staging file, so every process that can write the target sees it,
//!   across containers sharing the volume). The holder writes a line naming
//!   itself (pid, worker job, blocks, since when) into it, so a refused
//!   restore can say who holds the target; the last holder out removes the
//!   file.
//! - a **block device**: the device node itself (the lock is advisory and
//!   never touches the device's bytes). A whole-device restore also keeps its
//!   `O_EXCL` open (`super::open`), which the kernel enforces across every
//!   process and container on the machine. The holder is found through
//!   `/proc/*/fdinfo`, which lists each descriptor's locks.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Suffix of lock files next to file targets.
pub const LOCK_SUFFIX: &str = ".rehydrate-lock";

/// Attempts at taking a lock file that another holder removes meanwhile.
const TAKE_ATTEMPTS: u32 = 8;

/// Bytes of a lock file read for holder records (a few lines in practice).
const RECORDS_READ_MAX: u64 = 64 * 1024;

/// Who holds a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// The worker job, when a worker holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The blocks held: `None` for the whole target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<(u64, u64)>,
    #[serde(default)]
    pub since_unix_secs: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(job) = &self.job {
            write!(f, ", worker job {job}")?;
        }
        if let Some((start, end)) = self.blocks {
            write!(f, ", blocks {start}..{end}")?;
        }
        if self.since_unix_secs > 0 {
            let age = crate::checkpoint::unix_now_secs().saturating_sub(self.since_unix_secs);
            write!(f, ", for {age} s")?;
        }
        Ok(())
    }
}

/// Why a target could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another restore holds (part of) the target.
    #[error(
        "target {path} is being restored by another process ({}); nothing was written. Wait for that restore to end or stop it{}, then rerun: --restart never takes over a target another restore holds",
        holder_text(.holder), stop_hint(.holder)
    )]
    Busy { path: PathBuf, holder: Option<Holder> },
    #[error("target {path}: cannot take its lock {lock}: {source}")]
    Io { path: PathBuf, lock: PathBuf, source: io::Error },
}

fn holder_text(holder: &Option<Holder>) -> String {
    match holder {
        Some(h) => h.to_string(),
        None => "its pid could not be read".to_owned(),
    }
}

fn stop_hint(holder: &Option<Holder>) -> String {
    match holder {
        Some(Holder { job: Some(job), .. }) => format!(" (cancel job {job} on its worker)"),
        Some(h) => format!(" (kill {})", h.pid),
        None => String::new(),
    }
}

/// A target held by this restore: released when dropped.
#[derive(Debug)]
pub struct TargetLock {
    file: File,
    /// The lock file, removed by the last holder out; `None` for a device.
    lock_path: Option<PathBuf>,
    /// The blocks held (`None`: all).
    blocks: Option<(u64, u64)>,
}

/// The lock file of a regular-file target.
pub fn lock_path(target: &Path) -> Option<PathBuf> {
    let name = target.file_name()?.to_string_lossy();
    Some(target.with_file_name(format!(".{name}{LOCK_SUFFIX}")))
}

/// Take `target` for this restore: all of it, or the blocks `[start, end)` of
/// a shard. `job` names the worker job holding it. Refused at once, naming
/// the holder, when another restore holds an overlapping range.
pub fn acquire(target: &Path, blocks: Option<(u64, u64)>, job: Option<&str>) -> Result<TargetLock, LockError> {
    let me = Holder {
        pid: std::process::id(),
        job: job.map(str::to_owned),
        blocks,
        since_unix_secs: crate::checkpoint::unix_now_secs(),
    };
    let device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    if device {
        return acquire_device(target, &me);
    }
    let lock = lock_path(target).ok_or_else(|| LockError::Io {
        path: target.to_owned(),
        lock: target.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let io_err = |source| LockError::Io { path: target.to_owned(), lock: lock.clone(), source };
    for _ in 0..TAKE_ATTEMPTS {
        let file = open_lock_file(&lock).map_err(io_err)?;
        if !take_range(&file, blocks).map_err(io_err)? {
            return Err(LockError::Busy { path: target.to_owned(), holder: holder_of(&file, &lock, blocks) });
        }
        // A holder that left may have removed the file between our open and
        // our lock: the lock must be on the file the path names now.
        if !super::names_file(&lock, &file) {
            continue;
        }
        write_record(&file, &me, blocks.is_none()).map_err(io_err)?;
        return Ok(TargetLock { file, lock_path: Some(lock), blocks });
    }
    Err(io_err(io::Error::other("the lock file kept being replaced")))
}

/// Who holds `target` (any of it) now, without taking it, as text for a
/// message: `Ok(None)` when nobody does. For a check before a job is
/// queued; [`acquire`] decides.
pub fn holder(target: &Path) -> io::Result<Option<String>> {
    let device = std::fs::metadata(target).is_ok_and(|m| m.file_type().is_block_device());
    let path = if device { Some(target.to_owned()) } else { lock_path(target) };
    let Some(path) = path else { return Ok(None) };
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !crate::sys::ofd_write_lock_conflicts(&file, 0, 0)? {
        return Ok(None);
    }
    let found = if device { holder_by_proc(&file, None) } else { holder_of(&file, &path, None) };
    Ok(Some(holder_text(&found)))
}

fn acquire_device(target: &Path, me: &Holder) -> Result<TargetLock, LockError> {
    let io_err = |source| LockError::Io { path: target.to_owned(), lock: target.to_owned(), source };
    // A write lock needs a descriptor open for writing (no `O_EXCL`: the
    // restore's own open decides that).
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(target).map_err(io_err)?;
    if !take_range(&file, me.blocks).map_err(io_err)? {
        let holder = holder_by_proc(&file, me.blocks);
        return Err(LockError::Busy { path: target.to_owned(), holder });
    }
    Ok(TargetLock { file, lock_path: None, blocks: me.blocks })
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(path)
}

/// The lock's byte range: one byte per block; `None` is everything.
fn range_of(blocks: Option<(u64, u64)>) -> (u64, u64) {
    match blocks {
        // A zero length means "to the end, however far it grows".
        None => (0, 0),
        Some((start, end)) => (start, end.saturating_sub(start).max(1)),
    }
}

fn take_range(file: &File, blocks: Option<(u64, u64)>) -> io::Result<bool> {
    let (start, len) = range_of(blocks);
    crate::sys::ofd_try_write_lock(file, start, len)
}

/// Record this holder in the lock file (opened to append, so shards taking
/// their ranges at once never overwrite each other's lines): a whole-target
/// holder is alone, so it starts the file afresh.
fn write_record(mut file: &File, me: &Holder, alone: bool) -> io::Result<()> {
    let mut line = serde_json::to_string(me).map_err(io::Error::other)?;
    line.push('\n');
    if alone {
        file.set_len(0)?;
    }
    file.write_all(line.as_bytes())
}

/// Who holds the range that refused us: the live holder recorded in the
/// lock file whose blocks overlap it, else the process whose descriptor
/// carries the lock.
fn holder_of(file: &File, lock: &Path, wanted: Option<(u64, u64)>) -> Option<Holder> {
    let recorded =
        read_records(lock).into_iter().rev().find(|h| crate::sys::process_exists(h.pid) && overlaps(h.blocks, wanted));
    recorded.or_else(|| holder_by_proc(file, wanted))
}

fn read_records(lock: &Path) -> Vec<Holder> {
    let mut text = String::new();
    let read = File::open(lock).and_then(|f| f.take(RECORDS_READ_MAX).read_to_string(&mut text));
    if read.is_err() {
        return Vec::new();
    }
    text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn overlaps(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> bool {
    match (a, b) {
        (Some((s1, e1)), Some((s2, e2))) => s1 < e2 && s2 < e1,
        _ => true,
    }
}

/// The holder found by its descriptor: `/proc/<pid>/fdinfo/<fd>` lists the
/// locks taken through each descriptor, with the locked file's inode.
fn holder_by_proc(file: &File, wanted: Option<(u64, u64)>) -> Option<Holder> {
    let meta = file.metadata().ok()?;
    let needle = format!(":{} ", meta.ino());
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else { continue };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else { continue };
            // Our own probe descriptor holds no lock, so a match is the
            // holder (possibly another job of this very worker).
            if info.lines().any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&needle)) {
                return Some(Holder { pid, job: None, blocks: wanted, since_unix_secs: 0 });
            }
        }
    }
    None
}

impl Drop for TargetLock {
    fn drop(&mut self) {
        // The last holder out removes the lock file. It lets its own range
        // go first, then tries for the whole file: that succeeds only when no
        // other restore holds any of it, and of holders leaving at once the
        // last to try always succeeds. Removing while holding is safe: a
        // newcomer checks that its locked file is still the one the path
        // names.
        if let Some(path) = &self.lock_path {
            let (start, len) = range_of(self.blocks);
            let alone = crate::sys::ofd_unlock(&self.file, start, len).is_ok()
                && crate::sys::ofd_try_write_lock(&self.file, 0, 0).unwrap_or(false);
            if alone
                && super::names_file(path, &self.file)
                && let Err(e) = std::fs::remove_file(path)
            {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the target's lock file");
            }
        }
        // Closing the descriptor (dropping `file`) releases what is left.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_whole_restore_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol.img");
        let first = acquire(&target, None, Some("job-1")).unwrap();
        let err = acquire(&target, None, None).unwrap_err();
        let LockError::Busy { holder: Some(holder), .. } = &err else { panic!("{err}") };
        assert_eq!(holder.pid, std::process::id());
        assert_eq!(holder.job.as_deref(), Some("job-1"));
        assert!(err.to_string().contains("worker job job-1"), "{err}");
        drop(first);
        assert!(!lock_path(&target).unwrap().exists(), "the last holder removes the lock file");
        drop(acquire(&target, None, None).unwrap());
    }

    #[test]
    fn shards_exclude_only_overlapping_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol.img");
        let a = acquire(&target, Some((0, 100)), None).unwrap();
        let b = acquire(&target, Some((100, 200)), None).unwrap();
        let err = acquire(&target, Some((150, 160)), None).unwrap_err();
        let LockError::Busy { holder: Some(h), .. } = err else { panic!() };
        assert_eq!(h.blocks, Some((100, 200)), "the overlapping shard is named");
        assert!(matches!(acquire(&target, None, None), Err(LockError::Busy { .. })));
        drop(a);
        assert!(lock_path(&target).unwrap().exists(), "another shard still holds the file");
        drop(b);
        assert!(!lock_path(&target).unwrap().exists());
    }

    #[test]
    fn a_removed_lock_file_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol.img");
        let first = acquire(&target, None, None).unwrap();
        // Someone removes the file under the holder: a newcomer makes a new
        // one and holds it; the first holder's drop leaves the new one alone.
        std::fs::remove_file(lock_path(&target).unwrap()).unwrap();
        let second = acquire(&target, None, None).unwrap();
        drop(first);
        assert!(lock_path(&target).unwrap().exists());
        assert!(matches!(acquire(&target, None, None), Err(LockError::Busy { .. })));
        drop(second);
    }
}
