//! Target: the file or block device a restore writes.
//!
//! A **file** target is written as a staging file next to it
//! (`.<name>.rehydrate-staging`), created sparse at the volume's size, so the
//! blocks a snapshot leaves absent are already zero and need no write. Only
//! after every block is settled is it fsynced and atomically renamed into
//! place, and the directory fsynced (phase `swap`): a reader of the target path
//! sees the old file or the whole restored one, never a partial one. A
//! **block device** (or a file given with `--in-place`) is written in place
//! after a size check; a device is opened with `O_EXCL`, so one that is
//! mounted or held by another process is refused. A shard (`--blocks`) shares
//! its target with the other shards: the device is checked with an `O_EXCL`
//! open (refused while mounted or held) and then written through a plain one,
//! so shards on one machine can write one device at once.
//!
//! A target belongs to one restore at a time ([`lock()`], `lock.rs`): a second
//! restore of it is refused while the first runs. The swap renames the
//! staging file only while its path still names the file this restore wrote
//! ([`swap`]), and [`StagingGuard`] removes only that file.
//!
//! Nothing is written outside the target but the staging file and the lock
//! file (a line naming the holder, removed by the last holder out); the
//! staging file is removed on error by [`StagingGuard`], and staging files
//! leaked by a crash are recognised by their name ([`is_staging_name`]).

mod lock;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use lock::{Holder, LOCK_SUFFIX, LockError, TargetLock, acquire as lock, holder, lock_path};

/// Suffix of staging files; a sweep removes only files whose names end so.
pub const STAGING_SUFFIX: &str = ".rehydrate-staging";

pub use crate::checkpoint::{TargetIdentity, TargetKind};

/// An opened target.
#[derive(Debug)]
pub struct Target {
    /// The path the user named.
    pub path: PathBuf,
    /// The path written: the staging file for a file target, else `path`.
    pub write_path: PathBuf,
    /// Written as a staging file next to `path` and swapped into place at the
    /// end (a regular file not written `--in-place`).
    pub staged: bool,
    pub file: File,
    /// Whether every byte is known to be zero (a staging file this restore
    /// just created): zero blocks then need no write.
    pub fresh: bool,
    pub identity: TargetIdentity,
}

/// Why a target cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {path}: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("target {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl TargetError {
    fn refused(path: &Path, message: impl Into<String>) -> Self {
        Self::Refused { path: path.to_owned(), message: message.into() }
    }
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
}

/// How to open a target.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptionsSpec {
    pub volume_size_bytes: u64,
    /// Write an existing regular file in place instead of staging it.
    pub in_place: bool,
    /// Reopen an existing staging file (a resumed restore) instead of
    /// replacing it.
    pub reuse_staging: bool,
    /// Other writers (the other shards of a `--blocks` restore) write other
    /// blocks of this target at the same time: a device is not held with
    /// `O_EXCL` while it is written.
    pub shared: bool,
}

/// The staging path of a file target.
pub fn staging_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    Some(path.with_file_name(format!(".{name}{STAGING_SUFFIX}")))
}

/// Whether a file name is one of our staging files.
pub fn is_staging_name(name: &str) -> bool {
    // `.` + at least one character of the target's name + the suffix.
    name.len() > STAGING_SUFFIX.len() + 1 && name.starts_with('.') && name.ends_with(STAGING_SUFFIX)
}

/// Open (or create) the target for writing.
pub fn open(path: &Path, spec: OpenOptionsSpec) -> Result<Target, TargetError> {
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().contains(&0) {
        return Err(TargetError::refused(path, "not a file path"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => open_device(path, spec),
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(TargetError::refused(path, "is a symbolic link: name the file or device it points to"))
        }
        Ok(meta) if meta.is_file() && spec.in_place => open_in_place(path, spec),
        Ok(meta) if meta.is_file() => open_staging(path, spec),
        Ok(_) => Err(TargetError::refused(path, "is neither a regular file nor a block device")),
        Err(e) if e.kind() == io::ErrorKind::NotFound && spec.in_place => {
            Err(TargetError::refused(path, "does not exist: --in-place writes an existing file"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => open_staging(path, spec),
        Err(e) => Err(TargetError::io(path, e)),
    }
}

/// Attempts at the `O_EXCL` check of a shared device: another shard's check
/// holds the device for an instant, a mount for good.
const SHARED_CHECK_ATTEMPTS: u32 = 20;
/// Pause between those attempts: 20 of them span a second.
const SHARED_CHECK_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

fn open_device(path: &Path, spec: OpenOptionsSpec) -> Result<Target, TargetError> {
    let file = if spec.shared { open_device_shared(path)? } else { open_device_excl(path)? };
    let size = device_size_bytes(&file).map_err(|e| TargetError::io(path, e))?;
    check_capacity(path, size, spec.volume_size_bytes)?;
    let identity = identity_of(&file).map_err(|e| TargetError::io(path, e))?;
    Ok(Target { path: path.to_owned(), write_path: path.to_owned(), staged: false, file, fresh: false, identity })
}

/// O_EXCL on a block device: refused while it is mounted or held open
/// exclusively by anyone else.
fn open_device_excl(path: &Path) -> Result<File, TargetError> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(path).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::EBUSY) => {
                TargetError::refused(path, "the device is mounted or in use (EBUSY): unmount it first")
            }
            _ => TargetError::io(path, e),
        }
    })
}

/// A device other shards write too: refused while mounted or held (an
/// `O_EXCL` open succeeds, retried while another shard's own check holds it),
/// then opened without holding it.
fn open_device_shared(path: &Path) -> Result<File, TargetError> {
    let mut attempt = 1;
    loop {
        match open_device_excl(path) {
            Ok(check) => {
                drop(check);
                break;
            }
            Err(TargetError::Refused { .. }) if attempt < SHARED_CHECK_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(SHARED_CHECK_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| TargetError::io(path, e))
}

fn open_in_place(path: &Path, spec: OpenOptionsSpec) -> Result<Target, TargetError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| TargetError::io(path, e))?;
    let len = file.metadata().map_err(|e| TargetError::io(path, e))?.len();
    if len < spec.volume_size_bytes {
        file.set_len(spec.volume_size_bytes).map_err(|e| TargetError::io(path, e))?;
    }
    let identity = identity_of(&file).map_err(|e| TargetError::io(path, e))?;
    Ok(Target { path: path.to_owned(), write_path: path.to_owned(), staged: false, file, fresh: false, identity })
}

fn open_staging(path: &Path, spec: OpenOptionsSpec) -> Result<Target, TargetError> {
    let staging = staging_path(path).ok_or_else(|| TargetError::refused(path, "not a file path"))?;
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(TargetError::refused(path, format!("directory {} does not exist", dir.display())));
    }
    let reuse = spec.reuse_staging && staging.is_file();
    if !reuse {
        match std::fs::remove_file(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(TargetError::io(&staging, e)),
        }
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(!reuse)
        .create_new(!reuse)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(&staging)
        .map_err(|e| TargetError::io(&staging, e))?;
    let len = file.metadata().map_err(|e| TargetError::io(&staging, e))?.len();
    if len != spec.volume_size_bytes {
        if reuse {
            return Err(TargetError::refused(
                &staging,
                format!("staging file is {len} bytes, the volume {}: rerun with --restart", spec.volume_size_bytes),
            ));
        }
        file.set_len(spec.volume_size_bytes).map_err(|e| TargetError::io(&staging, e))?;
    }
    let identity = identity_of(&file).map_err(|e| TargetError::io(&staging, e))?;
    Ok(Target { path: path.to_owned(), write_path: staging, staged: true, file, fresh: !reuse, identity })
}

fn check_capacity(path: &Path, size: u64, volume: u64) -> Result<(), TargetError> {
    if size < volume {
        return Err(TargetError::refused(
            path,
            format!("holds {size} bytes, the snapshot's volume is {volume} bytes: use a device at least that large"),
        ));
    }
    Ok(())
}

fn identity_of(file: &File) -> io::Result<TargetIdentity> {
    TargetIdentity::of_file(file)
}

/// Size of a block device (BLKGETSIZE64) or a regular file.
pub fn device_size_bytes(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    crate::sys::block_device_size_bytes(file)
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    Ok(crate::sys::filesystem_space(path)?.available_bytes)
}

/// The directory a file target lives in.
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Make the target whole: fsync, then (file targets) rename the staging file
/// into place and fsync the directory. The rename happens only while the
/// staging path still names the file this restore wrote (same device and
/// inode as its open descriptor): a staging file replaced under the restore
/// is never renamed over the target.
pub fn swap(target: &Target) -> io::Result<()> {
    target.file.sync_all()?;
    if target.staged {
        if !names_file(&target.write_path, &target.file) {
            return Err(io::Error::other(format!(
                "{} is no longer the file this restore wrote (another process replaced or removed it): not renaming it over {}",
                target.write_path.display(),
                target.path.display()
            )));
        }
        std::fs::rename(&target.write_path, &target.path)?;
        File::open(parent_dir(&target.path))?.sync_all()?;
    }
    Ok(())
}

/// Whether `path` names the open `file` (same device and inode).
pub fn names_file(path: &Path, file: &File) -> bool {
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Directory levels a staging sweep descends below a root.
pub const SWEEP_DEPTH_MAX: usize = 8;

/// Remove staging files under `root` (a directory rehydrate owns, such as a
/// worker's target root) that no checkpoint in `checkpoints` owns and no
/// running restore holds: partial files of crashed restores that cannot be
/// resumed. Only files named like
/// staging files are touched; symlinks are not followed. Returns the paths
/// removed.
pub fn sweep_staging(root: &Path, checkpoints: &crate::checkpoint::CheckpointDir) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    sweep_dir(root, checkpoints, SWEEP_DEPTH_MAX, &mut removed)?;
    Ok(removed)
}

fn sweep_dir(
    dir: &Path,
    checkpoints: &crate::checkpoint::CheckpointDir,
    depth_left: usize,
    removed: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        let path = entry.path();
        if file_type.is_dir() && depth_left > 0 {
            sweep_dir(&path, checkpoints, depth_left - 1, removed)?;
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !file_type.is_file() || !is_staging_name(&name) {
            continue;
        }
        let target_name = &name[1..name.len() - STAGING_SUFFIX.len()];
        let key = crate::checkpoint::checkpoint_key(&dir.join(target_name));
        // A restore running now (another process, with its checkpoints
        // elsewhere) owns its staging file whatever our checkpoints say.
        let held = !matches!(holder(&dir.join(target_name)), Ok(None));
        if !held && !checkpoints.file_path(&key).exists() {
            std::fs::remove_file(&path)?;
            tracing::info!(path = %path.display(), "swept a staging file no checkpoint owns");
            removed.push(path);
        }
    }
    Ok(())
}

/// Removes a staging file when dropped, unless disarmed: a failed restore
/// leaves nothing behind. Only the file this restore wrote: when the path
/// names another file by then, it is left alone.
#[derive(Debug)]
pub struct StagingGuard {
    path: Option<PathBuf>,
    /// Device and inode of the staging file this restore wrote.
    file_id: Option<(u64, u64)>,
}

impl StagingGuard {
    pub fn new(target: &Target) -> Self {
        let file_id = target.file.metadata().ok().map(|m| (m.dev(), m.ino()));
        Self { path: target.staged.then(|| target.write_path.clone()), file_id }
    }

    /// Keep the staging file (it was swapped into place, or a checkpoint
    /// owns it for a resume).
    pub fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let ours = std::fs::symlink_metadata(&path).is_ok_and(|m| Some((m.dev(), m.ino())) == self.file_id);
            if !ours {
                tracing::warn!(path = %path.display(), "the staging file was replaced by another process: left alone");
                return;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed staging file"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove staging file")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64) -> OpenOptionsSpec {
        OpenOptionsSpec { volume_size_bytes: size, in_place: false, reuse_staging: false, shared: false }
    }

    #[test]
    fn file_target_stages_and_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        std::fs::write(&path, b"old").unwrap();
        let t = open(&path, spec(8192)).unwrap();
        assert!(t.staged);
        assert_eq!(t.identity.kind, TargetKind::File);
        assert!(t.fresh);
        assert!(is_staging_name(&t.write_path.file_name().unwrap().to_string_lossy()));
        assert_eq!(std::fs::metadata(&t.write_path).unwrap().len(), 8192);
        swap(&t).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        assert!(!t.write_path.exists());
    }

    #[test]
    fn guard_removes_staging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let t = open(&path, spec(4096)).unwrap();
        let staging = t.write_path.clone();
        drop(StagingGuard::new(&t));
        assert!(!staging.exists());
        assert!(!path.exists());
    }

    #[test]
    fn sweep_removes_only_unowned_staging_files() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let checkpoints = crate::checkpoint::CheckpointDir::open(state.path().to_owned()).unwrap();
        let sub = root.path().join("vms");
        std::fs::create_dir_all(&sub).unwrap();
        let orphan = staging_path(&sub.join("a.img")).unwrap();
        let owned = staging_path(&sub.join("b.img")).unwrap();
        let bare = sub.join(STAGING_SUFFIX);
        for f in [&orphan, &owned, &sub.join("a.img"), &sub.join(".hidden"), &sub.join("x.rehydrate-staging"), &bare] {
            std::fs::write(f, b"data").unwrap();
        }
        // A checkpoint file owns b.img's staging file.
        let key = crate::checkpoint::checkpoint_key(&sub.join("b.img"));
        std::fs::write(checkpoints.file_path(&key), b"owned").unwrap();
        let removed = sweep_staging(root.path(), &checkpoints).unwrap();
        assert_eq!(removed, vec![orphan.clone()]);
        assert!(!orphan.exists());
        for kept in [&owned, &sub.join("a.img"), &sub.join(".hidden"), &sub.join("x.rehydrate-staging")] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
    }

    #[test]
    fn sweep_keeps_the_staging_file_of_a_running_restore() {
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let checkpoints = crate::checkpoint::CheckpointDir::open(state.path().to_owned()).unwrap();
        let target = root.path().join("busy.img");
        let staging = staging_path(&target).unwrap();
        std::fs::write(&staging, b"being written").unwrap();
        let held = lock(&target, None, None).unwrap();
        assert!(sweep_staging(root.path(), &checkpoints).unwrap().is_empty());
        assert!(staging.exists());
        drop(held);
        assert_eq!(sweep_staging(root.path(), &checkpoints).unwrap(), vec![staging]);
    }

    #[test]
    fn swap_refuses_a_replaced_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.img");
        let t = open(&path, spec(4096)).unwrap();
        let other = dir.path().join("other");
        std::fs::write(&other, b"someone else's").unwrap();
        std::fs::rename(&other, &t.write_path).unwrap();
        let err = swap(&t).unwrap_err();
        assert!(err.to_string().contains("no longer the file this restore wrote"), "{err}");
        assert!(!path.exists());
        drop(StagingGuard::new(&t));
        assert_eq!(std::fs::read(&t.write_path).unwrap(), b"someone else's", "the guard removed another's file");
    }

    #[test]
    fn refuses_symlinks_and_missing_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert!(matches!(open(&link, spec(4096)), Err(TargetError::Refused { .. })));
        assert!(open(&dir.path().join("nope/vol"), spec(4096)).is_err());
    }
}
