//! The checkpoint files of a state directory.
//!
//! One file per job, `<key>.ckpt`, where the key is derived from the target
//! path ([`checkpoint_key`]). The directory is the one the configuration
//! names; nothing here picks a directory on its own, and nothing outside it
//! is touched.
//!
//! A save is atomic: the bytes go to `<key>.ckpt.tmp-<pid>-<nonce>-<seq>`,
//! which is fsynced, renamed over `<key>.ckpt`, and then the directory is
//! fsynced so the rename itself is durable. A crash at any point leaves
//! either the previous checkpoint or the new one, never a mix; what it can
//! leave behind is a temp file, which [`CheckpointDir::sweep_temporaries`]
//! removes once its writer is dead.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::format::CHECKPOINT_SIZE_MAX_BYTES;
use super::{Checkpoint, CheckpointError, JobIdentity};
use crate::block::BlockRange;

const EXTENSION: &str = ".ckpt";
const TEMP_MARKER: &str = ".ckpt.tmp-";
const KEY_HEX_CHARS: usize = 32;

/// The name of one job's checkpoint: 32 lowercase hex characters, so it can
/// never name a path outside the directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointKey(String);

impl CheckpointKey {
    /// A key as [`checkpoint_key`] makes them; `None` for anything else.
    pub fn parse(key: &str) -> Option<Self> {
        let valid = key.len() == KEY_HEX_CHARS && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The checkpoint key of a target: the first 32 hex characters (128 bits) of
/// the BLAKE3 of its canonical path, so `/dev/disk/by-id/x` and the `/dev/sdb`
/// it links to share one checkpoint. A target that does not exist yet (a file
/// target before its first run) is canonicalized through its parent
/// directory; if that fails too, the path is hashed as given.
pub fn checkpoint_key(target_path: &Path) -> CheckpointKey {
    shard_checkpoint_key(target_path, None)
}

/// The checkpoint key of a restore of one shard (`--blocks`) of a target:
/// its range is hashed with the path, so shards writing one target keep
/// separate checkpoints. `None` (a whole volume) is [`checkpoint_key`].
pub fn shard_checkpoint_key(target_path: &Path, shard: Option<BlockRange>) -> CheckpointKey {
    let canonical = fs::canonicalize(target_path)
        .or_else(|_| match (target_path.parent(), target_path.file_name()) {
            (Some(parent), Some(name)) => {
                let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
                fs::canonicalize(parent).map(|parent| parent.join(name))
            }
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        })
        .unwrap_or_else(|_| target_path.to_path_buf());
    let mut hasher = blake3::Hasher::new();
    hasher.update(canonical.as_os_str().as_bytes());
    if let Some(range) = shard {
        // A path holds no NUL byte, so no path collides with a shard's key.
        hasher.update(format!("\0blocks {range}").as_bytes());
    }
    let hex = hasher.finalize().to_hex();
    CheckpointKey(hex[..KEY_HEX_CHARS].to_owned())
}

/// The state directory holding checkpoint files.
#[derive(Debug)]
pub struct CheckpointDir {
    dir: PathBuf,
    /// The highest cursor this handle saved or loaded per key: a save below
    /// it is refused (invariant 3, the cursor only moves forward). Cleared by
    /// [`remove`](Self::remove), which is how `--restart` starts over.
    cursors: Mutex<HashMap<CheckpointKey, u64>>,
}

impl CheckpointDir {
    /// Open (creating if needed) the state directory `dir` given by the
    /// configuration.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        let existed = dir.is_dir();
        fs::create_dir_all(&dir)?;
        if !existed {
            // A checkpoint in a directory whose own entry is not durable could
            // vanish with it in a crash.
            if let Some(parent) = dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(Self { dir, cursors: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the checkpoint of `key` lives.
    pub fn file_path(&self, key: &CheckpointKey) -> PathBuf {
        self.dir.join(format!("{key}{EXTENSION}"))
    }

    /// The checkpoint of `key`, if one exists. `None` only when there is no
    /// file; a file that is corrupt or belongs to another job is an error,
    /// never "start from zero".
    pub fn load(&self, key: &CheckpointKey, expected: &JobIdentity) -> Result<Option<Checkpoint>, CheckpointError> {
        let path = self.file_path(key);
        let bytes = match read_bounded(&path) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, op: "read", source }),
        };
        if bytes.len() > CHECKPOINT_SIZE_MAX_BYTES {
            let detail = format!("larger than the {CHECKPOINT_SIZE_MAX_BYTES}-byte limit");
            return Err(CheckpointError::Corrupt { path, detail });
        }
        let checkpoint = Checkpoint::decode(&bytes).map_err(|error| error.at(&path))?;
        if let Err(what) = checkpoint.check_identity(expected) {
            return Err(CheckpointError::Mismatch { path, what });
        }
        self.record_cursor(key, checkpoint.settled().cursor());
        Ok(Some(checkpoint))
    }

    /// Persist `checkpoint` as the checkpoint of `key`, atomically. On error
    /// the previous checkpoint is intact.
    ///
    /// Refused (`InvalidInput`) when its cursor is below the one this handle
    /// last saved or loaded for `key`: call [`remove`](Self::remove) first to
    /// start a job over.
    pub fn save(&self, key: &CheckpointKey, checkpoint: &Checkpoint) -> io::Result<()> {
        self.save_over(key, checkpoint, None).map(drop)
    }

    /// [`save`](Self::save), but only over the file it expects: with
    /// `Some(expected)`, the file at the checkpoint's path must be `expected`
    /// (`None`: there must be none) when the new one is about to replace it,
    /// else nothing is replaced and the error is [`io::ErrorKind::AlreadyExists`].
    /// Returns the device and inode of the file written.
    pub fn save_over(
        &self,
        key: &CheckpointKey,
        checkpoint: &Checkpoint,
        expected: Option<Option<FileId>>,
    ) -> io::Result<FileId> {
        let cursor = checkpoint.settled().cursor();
        if let Some(&previous) = self.lock_cursors().get(key)
            && cursor < previous
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to move the checkpoint cursor of {key} back from block {previous} to block {cursor}"),
            ));
        }
        let bytes = checkpoint.encode();
        if bytes.len() > CHECKPOINT_SIZE_MAX_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the checkpoint of {key} would take {} bytes, over the {CHECKPOINT_SIZE_MAX_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let temp = self.dir.join(temp_name(key));
        let result = self.replace_with(&temp, &self.file_path(key), &bytes, expected);
        if result.is_err() {
            // Best effort: after a failed rename the temp file is litter. (A
            // crash leaves it to sweep_temporaries.)
            let _ = fs::remove_file(&temp);
        } else {
            self.record_cursor(key, cursor);
        }
        result
    }

    /// Delete the checkpoint of `key` (a finished job, or `--restart`), and
    /// make the deletion durable. Returns whether a file existed.
    pub fn remove(&self, key: &CheckpointKey) -> io::Result<bool> {
        let existed = match fs::remove_file(self.file_path(key)) {
            Ok(()) => true,
            Err(error) if error.kind() == io::ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        self.lock_cursors().remove(key);
        if existed {
            sync_dir(&self.dir)?;
        }
        Ok(existed)
    }

    /// Remove leftover temp files (`<key>.ckpt.tmp-<pid>-<nonce>-<seq>`) whose
    /// writer is dead: another process that no longer runs, or an earlier
    /// process that had our pid (pid 1 in a container, every time). Only
    /// regular files of exactly that name form, in this directory, are
    /// touched. Returns how many were removed.
    pub fn sweep_temporaries(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(parse_temp_name) else { continue };
            if owner.is_live() || !entry.file_type()?.is_file() {
                continue;
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                // Its writer finished it after all, or another sweep won.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    fn replace_with(
        &self,
        temp: &Path,
        path: &Path,
        bytes: &[u8],
        expected: Option<Option<FileId>>,
    ) -> io::Result<FileId> {
        let written = write_synced(temp, bytes)?;
        fail::fail_point!("checkpoint-before-rename", |_| Err(fail_point_error("checkpoint-before-rename")));
        if let Some(expected) = expected
            && file_id(path)? != expected
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is not the checkpoint this restore wrote or resumed from", path.display()),
            ));
        }
        fs::rename(temp, path)?;
        fail::fail_point!("checkpoint-before-dir-sync", |_| Err(fail_point_error("checkpoint-before-dir-sync")));
        sync_dir(&self.dir)?;
        Ok(written)
    }

    fn record_cursor(&self, key: &CheckpointKey, cursor: u64) {
        let mut cursors = self.lock_cursors();
        let recorded = cursors.entry(key.clone()).or_insert(cursor);
        *recorded = (*recorded).max(cursor);
    }

    fn lock_cursors(&self) -> std::sync::MutexGuard<'_, HashMap<CheckpointKey, u64>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.cursors.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The whole file at `path`, reading at most one byte past the size limit;
/// `None` if it does not exist.
fn read_bounded(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let mut bytes = Vec::new();
    file.take(CHECKPOINT_SIZE_MAX_BYTES as u64 + 1).read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<FileId> {
    let mut file = OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    let meta = file.metadata()?;
    Ok(FileId { dev: meta.dev(), ino: meta.ino() })
}

/// Which file a path names: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// The file at `path` now; `None` when there is none.
pub fn file_id(path: &Path) -> io::Result<Option<FileId>> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(FileId { dev: meta.dev(), ino: meta.ino() })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
fn fail_point_error(name: &str) -> io::Error {
    io::Error::other(format!("injected failure at fail point {name}"))
}

/// This process: its pid and a random nonce drawn once, so a temp file left by
/// an earlier process that had the same pid is told apart from ours.
fn this_process() -> (u32, u64) {
    static NONCE: OnceLock<u64> = OnceLock::new();
    (std::process::id(), *NONCE.get_or_init(rand::random))
}

fn temp_name(key: &CheckpointKey) -> String {
    // Unique per save, so two saves never share a temp file.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let (pid, nonce) = this_process();
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{key}{TEMP_MARKER}{pid}-{nonce:016x}-{seq}")
}

/// Who wrote a temp file, from its name.
#[derive(Debug, PartialEq, Eq)]
struct TempOwner {
    pid: u32,
    nonce: u64,
}

impl TempOwner {
    /// Whether the writer may still be running: this process, or another
    /// live process.
    fn is_live(&self) -> bool {
        let (pid, nonce) = this_process();
        if self.pid == pid {
            return self.nonce == nonce;
        }
        crate::sys::process_exists(self.pid)
    }
}

/// The owner of a temp file name, or `None` for any other name (those are
/// never touched).
fn parse_temp_name(name: &str) -> Option<TempOwner> {
    let (key, suffix) = name.split_once(TEMP_MARKER)?;
    CheckpointKey::parse(key)?;
    let mut parts = suffix.split('-');
    let (pid, nonce, seq) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |part: &str, hex: bool| {
        !part.is_empty() && part.bytes().all(|b| if hex { b.is_ascii_hexdigit() } else { b.is_ascii_digit() })
    };
    if parts.next().is_some() || nonce.len() != 16 || !digits(nonce, true) || !digits(pid, false) || !digits(seq, false)
    {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    // 0 and values past i32::MAX are not pids (kill would signal groups).
    if pid == 0 || pid > i32::MAX as u32 {
        return None;
    }
    Some(TempOwner { pid, nonce: u64::from_str_radix(nonce, 16).ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_hex_and_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("volume.img");
        let before = checkpoint_key(&target);
        fs::write(&target, b"x").unwrap();
        assert_eq!(checkpoint_key(&target), before, "same key before and after the file exists");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(checkpoint_key(&link), before);
        assert_ne!(checkpoint_key(&dir.path().join("other.img")), before);
        // Shards of one target: a key each, none the whole volume's.
        let shard = |start, end| shard_checkpoint_key(&link, Some(BlockRange { start, end }));
        assert_eq!(shard(0, 10), shard_checkpoint_key(&target, Some(BlockRange { start: 0, end: 10 })));
        let keys: std::collections::HashSet<_> = [before.clone(), shard(0, 10), shard(10, 20), shard(0, 20)].into();
        assert_eq!(keys.len(), 4);
        assert_eq!(CheckpointKey::parse(before.as_str()), Some(before));
        assert_eq!(CheckpointKey::parse("../../etc/passwd"), None);
    }

    #[test]
    fn temp_names_parse_only_in_their_exact_form() {
        let key = checkpoint_key(Path::new("/dev/sdz"));
        let name = temp_name(&key);
        let (pid, nonce) = this_process();
        assert_eq!(parse_temp_name(&name), Some(TempOwner { pid, nonce }));
        assert!(TempOwner { pid, nonce }.is_live());
        assert!(!TempOwner { pid, nonce: nonce ^ 1 }.is_live(), "an earlier process with our pid");
        for other in [
            format!("{key}.ckpt"),
            format!("{key}.ckpt.tmp-0-{nonce:016x}-1"),
            format!("{key}.ckpt.tmp-12-{nonce:016x}"),
            format!("{key}.ckpt.tmp-12-{nonce:016x}-1-2"),
            format!("{key}.ckpt.tmp-x-{nonce:016x}-1"),
            format!("{key}.ckpt.tmp-+12-{nonce:016x}-1"),
            format!("{key}.ckpt.tmp-12-+{:015x}-1", nonce >> 4),
            format!("notakey.ckpt.tmp-12-{nonce:016x}-1"),
            "job.db".to_owned(),
        ] {
            assert_eq!(parse_temp_name(&other), None, "{other}");
        }
    }
}

/// Fail points at the durability edges of a save: whatever fails there, the
/// previous or the new checkpoint is whole and readable.
#[cfg(test)]
#[cfg(feature = "failpoints")]
mod failpoint_tests {
    use super::*;
    use crate::block::BlockLayout;
    use crate::checkpoint::{TargetIdentity, TargetKind};
    use crate::manifest::ManifestDigest;

    fn identity() -> JobIdentity {
        JobIdentity {
            manifest_digest: ManifestDigest([3; 32]),
            target: TargetIdentity { kind: TargetKind::File, dev: 1, ino: 2, size_bytes: 64 * 4096 },
            layout: BlockLayout::new(64 * 4096, 4096).unwrap(),
            blocks: crate::block::BlockRange { start: 0, end: 64 },
        }
    }

    fn checkpoint_settled_to(cursor: u64) -> Checkpoint {
        let mut checkpoint = Checkpoint::new(identity(), 1);
        checkpoint.settle_many(0..cursor);
        checkpoint
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn failure_before_rename_keeps_the_previous_checkpoint() {
        let scenario = fail::FailScenario::setup();
        let state = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(state.path().to_path_buf()).unwrap();
        let key = checkpoint_key(Path::new("/dev/fail-before-rename"));
        dir.save(&key, &checkpoint_settled_to(1)).unwrap();

        fail::cfg("checkpoint-before-rename", "return").unwrap();
        let error = dir.save(&key, &checkpoint_settled_to(5)).unwrap_err();
        assert!(error.to_string().contains("checkpoint-before-rename"), "{error}");
        fail::remove("checkpoint-before-rename");

        let loaded = dir.load(&key, &identity()).unwrap().unwrap();
        assert_eq!(loaded.settled().cursor(), 1, "the previous checkpoint is intact");
        assert_eq!(file_names(state.path()), vec![format!("{key}.ckpt")], "no temp file left");
        dir.save(&key, &checkpoint_settled_to(5)).unwrap();
        assert_eq!(dir.load(&key, &identity()).unwrap().unwrap().settled().cursor(), 5);
        scenario.teardown();
    }

    #[test]
    fn failure_before_dir_sync_leaves_the_new_checkpoint_whole() {
        let scenario = fail::FailScenario::setup();
        let state = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(state.path().to_path_buf()).unwrap();
        let key = checkpoint_key(Path::new("/dev/fail-before-dir-sync"));
        dir.save(&key, &checkpoint_settled_to(1)).unwrap();

        fail::cfg("checkpoint-before-dir-sync", "return").unwrap();
        assert!(dir.save(&key, &checkpoint_settled_to(7)).is_err());
        fail::remove("checkpoint-before-dir-sync");

        // The rename happened; only its durability is in doubt. Either file is
        // acceptable after a crash, and here the new one is in place, whole.
        let loaded = dir.load(&key, &identity()).unwrap().unwrap();
        assert_eq!(loaded.settled().cursor(), 7);
        assert_eq!(file_names(state.path()), vec![format!("{key}.ckpt")]);
        scenario.teardown();
    }
}
