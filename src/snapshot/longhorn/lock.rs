//! Longhorn's restore lock, taken the way Longhorn takes it (longhorn/backupstore
//! `lock.go`), so Longhorn's backup deletion and its garbage collection of
//! unreferenced blocks (`DeleteDeltaBlockBackup`, under a `DELETION_LOCK`)
//! wait while we read the blocks.
//!
//! - A lock is a file `<volume dir>/locks/<name>.lck` holding the JSON of
//!   `FileLock`'s exported fields: `{"Name":"lock-<16 hex>","Type":1,"Acquired":false}`.
//!   Type 1 is `RESTORE_LOCK` (equal to `BACKUP_LOCK`: backups and restores
//!   share; only a deletion, type 2, excludes them).
//! - Its time is the store's modification time of the file (`FileTime`).
//! - Taking it (`Lock`): write it unacquired; wait `LOCK_CHECK_WAIT_TIME`
//!   (2 s, for clock skew and one-second mtimes); then list the volume's
//!   locks: it may be acquired unless a lock of another type that is not
//!   expired comes first (`compareLocks`: acquired before not, then older
//!   time, then name). If it may, write it again acquired. If not, look
//!   again every `LOCK_CHECK_INTERVAL` (10 s) and give up (deleting it)
//!   `LOCK_MAX_WAIT_TIME` (30 s) after its time.
//! - Held: rewritten every `LOCK_REFRESH_INTERVAL` (60 s), which renews its
//!   time; another process counts it expired `LOCK_DURATION` (150 s) after
//!   its time. So a restore killed with `kill -9` leaves a lock that stops
//!   holding deletions off 150 s later, exactly as a crashed Longhorn
//!   engine's does.
//! - Released (`Unlock`): the file is deleted. [`RestoreLock::release`] is
//!   called on every exit of a restore (success, failure, cancel); a lock
//!   dropped without it is deleted by a task on the runtime, best effort.
//!
//! Restore credentials are often read-only. When the store refuses the
//! lock's write (403, 405, a read-only filesystem), or cannot list the
//! locks, the restore goes on without it ([`Acquired::NotHeld`]) and says so:
//! Longhorn's garbage collection is then not held off, and a block deleted
//! mid-restore fails that block (never a wrong write).

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::LonghornUrl;
use crate::store::{ObjectInfo, SharedStore, StoreError};

/// `LOCK_DURATION`: a lock not refreshed for this long is expired.
pub const LOCK_DURATION: Duration = Duration::from_secs(150);
/// `LOCK_MAX_WAIT_TIME`: give up this long after writing an unacquired lock.
pub const LOCK_MAX_WAIT_TIME: Duration = Duration::from_secs(30);
/// `LOCK_REFRESH_INTERVAL`: rewrite a held lock this often.
pub const LOCK_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// `LOCK_CHECK_INTERVAL`: look at the other locks again this often.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// `LOCK_CHECK_WAIT_TIME`: wait this long after the first write.
pub const LOCK_CHECK_WAIT_TIME: Duration = Duration::from_secs(2);
/// `RESTORE_LOCK` (= `BACKUP_LOCK`).
pub const RESTORE_LOCK: u8 = 1;
/// `LOCK_SUFFIX`.
const LOCK_SUFFIX: &str = ".lck";
/// A lock file is a few dozen bytes; anything past this is not one.
const LOCK_LEN_MAX_BYTES: u64 = 4096;

/// The JSON of a lock file (`FileLock`'s exported fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LockFile {
    pub name: String,
    #[serde(rename = "Type")]
    pub lock_type: u8,
    pub acquired: bool,
}

/// A lock as seen in the store: its file and its time.
#[derive(Debug, Clone)]
pub struct SeenLock {
    pub file: LockFile,
    pub time: SystemTime,
}

/// `compareLocks(a, b) < 0`: `a` comes first.
fn comes_first(a: &SeenLock, b: &SeenLock) -> bool {
    match (a.file.acquired, b.file.acquired) {
        (true, false) => true,
        (false, true) => false,
        _ => (a.time, &a.file.name) < (b.time, &b.file.name),
    }
}

/// `canAcquire`: no other lock of another type, not expired, comes first.
/// Returns the lock in the way, if any.
pub fn blocker<'a>(ours: &SeenLock, others: &'a [SeenLock], now: SystemTime) -> Option<&'a SeenLock> {
    others.iter().find(|other| {
        let expired = now.duration_since(other.time).is_ok_and(|age| age > LOCK_DURATION);
        other.file.name != ours.file.name
            && other.file.lock_type != ours.file.lock_type
            && comes_first(other, ours)
            && !expired
    })
}

/// How taking the lock ended, when the restore may go on.
#[derive(Debug)]
pub enum Acquired {
    Held(RestoreLock),
    /// The store would not take it: why, for the warning.
    NotHeld(String),
}

/// Why the restore may not go on.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "Longhorn's lock {holder} (type {lock_type}, a backup deletion) holds volume {volume} in the backupstore, and did not let go within {}s: retry when Longhorn has finished deleting",
    LOCK_MAX_WAIT_TIME.as_secs()
)]
pub struct Busy {
    pub volume: String,
    pub holder: String,
    pub lock_type: u8,
}

/// A held restore lock, refreshed until released.
#[derive(Debug)]
pub struct RestoreLock {
    store: SharedStore,
    key: String,
    refresher: Option<JoinHandle<()>>,
}

/// Take the restore lock of `url`'s volume, the way `FileLock.Lock` does.
pub async fn acquire(store: &SharedStore, url: &LonghornUrl) -> Result<Acquired, Busy> {
    let name = format!("lock-{}", &hex::encode(rand::random::<[u8; 8]>()));
    let key = format!("{}{name}{LOCK_SUFFIX}", url.locks_dir());
    let mut file = LockFile { name, lock_type: RESTORE_LOCK, acquired: false };
    if let Err(e) = save(store, &key, &file).await {
        return Ok(Acquired::NotHeld(format!("writing {}: {e}", store.url().join(&key))));
    }
    tokio::time::sleep(LOCK_CHECK_WAIT_TIME).await;
    loop {
        let (ours, others) = match seen(store, url, &file).await {
            Ok(seen) => seen,
            Err(e) => {
                remove(store, &key).await;
                return Ok(Acquired::NotHeld(format!("listing {}: {e}", store.url().join(&url.locks_dir()))));
            }
        };
        let now = SystemTime::now();
        let Some(blocking) = blocker(&ours, &others, now) else {
            file.acquired = true;
            if let Err(e) = save(store, &key, &file).await {
                remove(store, &key).await;
                return Ok(Acquired::NotHeld(format!("writing {}: {e}", store.url().join(&key))));
            }
            let refresher = tokio::spawn(refresh(store.clone(), key.clone(), file));
            return Ok(Acquired::Held(RestoreLock { store: store.clone(), key, refresher: Some(refresher) }));
        };
        if now.duration_since(ours.time).is_ok_and(|waited| waited > LOCK_MAX_WAIT_TIME) {
            remove(store, &key).await;
            let (holder, lock_type) = (blocking.file.name.clone(), blocking.file.lock_type);
            return Err(Busy { volume: url.volume.clone(), holder, lock_type });
        }
        tokio::time::sleep(LOCK_CHECK_INTERVAL).await;
    }
}

impl RestoreLock {
    /// The key of the lock file under the store.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stop refreshing and delete the lock file (`Unlock`). A failure is
    /// logged: the lock then expires on its own after [`LOCK_DURATION`].
    pub async fn release(mut self) {
        if let Some(refresher) = self.refresher.take() {
            refresher.abort();
        }
        remove(&self.store, &self.key).await;
    }
}

impl Drop for RestoreLock {
    fn drop(&mut self) {
        let Some(refresher) = self.refresher.take() else { return };
        refresher.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, key) = (self.store.clone(), std::mem::take(&mut self.key));
            runtime.spawn(async move { remove(&store, &key).await });
        }
    }
}

async fn save(store: &SharedStore, key: &str, file: &LockFile) -> Result<(), StoreError> {
    let json = serde_json::to_vec(file).map_err(|e| StoreError::permanent(format!("lock JSON: {e}")))?;
    store.put(key, Bytes::from(json)).await
}

async fn remove(store: &SharedStore, key: &str) {
    if let Err(e) = store.delete_for(&crate::store::RequestContext::NONE, key).await {
        tracing::warn!(
            "could not delete Longhorn lock {}: {e}; it expires {}s after its last refresh",
            store.url().join(key),
            LOCK_DURATION.as_secs()
        );
    }
}

/// Rewrite the held lock every [`LOCK_REFRESH_INTERVAL`] (renewing its time).
async fn refresh(store: SharedStore, key: String, file: LockFile) {
    let mut ticks = tokio::time::interval(LOCK_REFRESH_INTERVAL);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if let Err(e) = save(&store, &key, &file).await {
            tracing::warn!("could not refresh Longhorn lock {}: {e}", store.url().join(&key));
        }
    }
}

/// Our lock and every other lock of the volume, as the store has them.
async fn seen(
    store: &SharedStore,
    url: &LonghornUrl,
    ours: &LockFile,
) -> Result<(SeenLock, Vec<SeenLock>), StoreError> {
    let dir = url.locks_dir();
    let listed = store.list_for(&crate::store::RequestContext::NONE, &dir).await?;
    let own_name = format!("{}{LOCK_SUFFIX}", ours.name);
    let mut own_time = SystemTime::now();
    let mut others = Vec::new();
    for ObjectInfo { name, modified } in listed {
        if name == own_name {
            own_time = modified;
            continue;
        }
        if !name.ends_with(LOCK_SUFFIX) {
            continue;
        }
        // Like `getLocksForVolume`: a lock that cannot be read is skipped.
        let key = format!("{dir}{name}");
        match store.get(&key, LOCK_LEN_MAX_BYTES).await.map(|b| serde_json::from_slice::<LockFile>(&b)) {
            Ok(Ok(file)) => others.push(SeenLock { file, time: modified }),
            Ok(Err(e)) => tracing::warn!("skipping Longhorn lock {key}: not a lock: {e}"),
            Err(e) => tracing::warn!("skipping Longhorn lock {key}: {e}"),
        }
    }
    Ok((SeenLock { file: ours.clone(), time: own_time }, others))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(name: &str, lock_type: u8, acquired: bool, age_secs: u64, now: SystemTime) -> SeenLock {
        SeenLock {
            file: LockFile { name: name.into(), lock_type, acquired },
            time: now - Duration::from_secs(age_secs),
        }
    }

    #[test]
    fn lock_json_is_longhorns() {
        let file = LockFile { name: "lock-0123456789abcdef".into(), lock_type: RESTORE_LOCK, acquired: true };
        let json = serde_json::to_string(&file).unwrap();
        assert_eq!(json, r#"{"Name":"lock-0123456789abcdef","Type":1,"Acquired":true}"#);
        assert_eq!(serde_json::from_str::<LockFile>(&json).unwrap(), file);
    }

    #[test]
    fn only_a_live_earlier_deletion_blocks_a_restore() {
        let now = SystemTime::now();
        let ours = lock("lock-b", RESTORE_LOCK, false, 2, now);
        // Another restore or a backup (same type) never blocks.
        assert!(blocker(&ours, &[lock("lock-a", 1, true, 10, now)], now).is_none());
        // A held deletion does.
        let deletion = [lock("lock-z", 2, true, 10, now)];
        assert_eq!(blocker(&ours, &deletion, now).unwrap().file.name, "lock-z");
        // An expired one does not (a crashed process's lock).
        assert!(blocker(&ours, &[lock("lock-z", 2, true, 151, now)], now).is_none());
        // An unacquired deletion written after ours comes second.
        assert!(blocker(&ours, &[lock("lock-z", 2, false, 1, now)], now).is_none());
        // ... written before ours, it comes first; at the same time, by name.
        assert!(blocker(&ours, &[lock("lock-z", 2, false, 3, now)], now).is_some());
        assert!(blocker(&ours, &[lock("lock-a", 2, false, 2, now)], now).is_some());
        assert!(blocker(&ours, &[lock("lock-c", 2, false, 2, now)], now).is_none());
    }
}
