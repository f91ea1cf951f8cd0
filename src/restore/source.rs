//! Source kinds: the snapshot a `--manifest` URL names, opened.
//!
//! `<store>/<name>.manifest` is a rehydrate manifest; `longhorn+s3://` and
//! `longhorn+file://` name a Longhorn backup (`snapshot/longhorn.rs`). Each
//! kind gives the restore a [`Snapshot`] and the store its blocks live in (the
//! first source); a Longhorn restore also holds Longhorn's restore lock until
//! it ends ([`Opened::lock`]). `restore`, `verify` and the worker all come
//! here, so every kind works the same everywhere.

use std::sync::Arc;

use super::{Engine, RestoreError};
use crate::error::ErrorClass;
use crate::snapshot::Snapshot;
use crate::snapshot::longhorn::{self, LonghornBackup, LonghornUrl, lock};
use crate::store::{SharedStore, StoreUrl};

/// What the snapshot is opened for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A restore reads its blocks: hold off Longhorn's garbage collection.
    Restore,
    /// Only its block list is read (verify, a space estimate).
    Inspect,
}

/// An opened snapshot.
pub struct Opened {
    pub snapshot: Arc<dyn Snapshot>,
    /// The store its blocks are read from first.
    pub primary: SharedStore,
    /// Longhorn's restore lock, to [`release`](lock::RestoreLock::release)
    /// when the restore ends, however it ends.
    pub lock: Option<lock::RestoreLock>,
}

/// Open the snapshot `url` names.
pub async fn open_snapshot(engine: &Engine, url: &str, tenant: u64, purpose: Purpose) -> Result<Opened, RestoreError> {
    if longhorn::is_longhorn_url(url) {
        return open_longhorn(engine, url, tenant, purpose).await;
    }
    let (store_url, key) = StoreUrl::parse_manifest(url).map_err(|e| RestoreError::Usage(e.to_string()))?;
    let primary = engine.open_store(&store_url).await?;
    let manifest = super::load_manifest(engine, &primary, &key, tenant).await?;
    Ok(Opened { snapshot: Arc::new(manifest), primary, lock: None })
}

async fn open_longhorn(engine: &Engine, url: &str, tenant: u64, purpose: Purpose) -> Result<Opened, RestoreError> {
    let parsed = LonghornUrl::parse(url).map_err(|e| RestoreError::Usage(e.to_string()))?;
    let primary = engine.open_store(&parsed.store).await?;
    let lock = match purpose {
        Purpose::Inspect => None,
        Purpose::Restore => take_lock(&primary, &parsed).await?,
    };
    match read_backup(engine, &primary, &parsed, tenant).await {
        Ok(backup) => Ok(Opened { snapshot: Arc::new(backup), primary, lock }),
        Err(e) => {
            if let Some(lock) = lock {
                lock.release().await;
            }
            Err(e)
        }
    }
}

/// Longhorn's restore lock; without it (a read-only store) a warning.
async fn take_lock(store: &SharedStore, url: &LonghornUrl) -> Result<Option<lock::RestoreLock>, RestoreError> {
    match lock::acquire(store, url).await {
        Ok(lock::Acquired::Held(held)) => {
            tracing::info!("holding Longhorn restore lock {}", store.url().join(held.key()));
            Ok(Some(held))
        }
        Ok(lock::Acquired::NotHeld(why)) => {
            tracing::warn!(
                "restoring without Longhorn's restore lock ({why}): Longhorn's garbage collection is NOT held off, so deleting a backup of volume {} while this runs may remove blocks it still reads (those blocks then fail; none is written wrong)",
                url.volume
            );
            Ok(None)
        }
        Err(busy) => Err(RestoreError::Source(busy.to_string())),
    }
}

async fn read_backup(
    engine: &Engine,
    store: &SharedStore,
    url: &LonghornUrl,
    tenant: u64,
) -> Result<LonghornBackup, RestoreError> {
    let volume_cfg = read_cfg(engine, store, &url.volume_cfg_key(), longhorn::VOLUME_CFG_LEN_MAX_BYTES, tenant).await?;
    let backup_cfg = read_cfg(engine, store, &url.backup_cfg_key(), longhorn::BACKUP_CFG_LEN_MAX_BYTES, tenant).await?;
    LonghornBackup::from_cfgs(url, &volume_cfg, &backup_cfg).map_err(|e| RestoreError::Refused(e.to_string()))
}

async fn read_cfg(
    engine: &Engine,
    store: &SharedStore,
    key: &str,
    len_max_bytes: u64,
    tenant: u64,
) -> Result<bytes::Bytes, RestoreError> {
    let policy = crate::fetch::RetryPolicy::from_config(&engine.config.fetch);
    // The restore waits on it: ahead of other restores' queued blocks.
    let ctx = crate::store::RequestContext { tenant, sent: None, demand: true };
    crate::fetch::get_retried(store, &ctx, key, len_max_bytes, &policy).await.map_err(|e| {
        let url = store.url().join(key);
        match e.class {
            ErrorClass::Corrupt => RestoreError::Refused(format!("{url}: {e}")),
            _ => RestoreError::Source(format!(
                "cannot read Longhorn config {url}: {e} (check the volume and backup names and that the store holds backupstore/)"
            )),
        }
    })
}
