//! `file://` store: a directory laid out exactly as the same snapshot would be
//! in a bucket (`<root>/<key>`), so a static HTTP server pointed at the
//! directory above it serves it S3-style (`GET /<bucket>/<key>`).
//!
//! Writes are staged (`.<name>.rhtmp-<pid>-<n>`), fsynced, renamed into place
//! and the directory fsynced, so a reader never sees a partial object and a
//! crash never leaves one under its final name.
//!
//! Reads go straight into a page-aligned buffer of the shared pool
//! (`crate::buf`): one copy out of the page cache, and the block can go on to
//! the target with `O_DIRECT`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::{BlockStore, BoxFuture, StoreError, StoreUrl};
use crate::buf::BufPool;

#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    url: StoreUrl,
    tmp_counter: AtomicU64,
}

/// Marker in the names of staged object files, so a sweep can recognise them.
pub const STAGING_MARKER: &str = ".rhtmp-";

impl FileStore {
    pub fn new(root: PathBuf) -> Self {
        let url = StoreUrl::File { root: root.clone() };
        Self { root, url, tmp_counter: AtomicU64::new(0) }
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let valid = !key.is_empty()
            && !key.starts_with('/')
            && !key.contains('\0')
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if !valid {
            return Err(StoreError::permanent(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }

    /// Read the object into a buffer of the shared pool (page-aligned, so
    /// the writer can hand it to `O_DIRECT`): one copy, from the page cache
    /// straight into the block's buffer.
    fn get_blocking(path: &Path, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let ctx = path.display().to_string();
        let mut file = std::fs::File::open(path).map_err(|e| StoreError::from_io(&ctx, &e))?;
        let len = file.metadata().map_err(|e| StoreError::from_io(&ctx, &e))?.len();
        if len > len_max_bytes {
            return Err(StoreError::corrupt(format!(
                "{ctx}: object is {len} bytes, more than the {len_max_bytes} expected"
            )));
        }
        let Some(mut buf) = usize::try_from(len).ok().and_then(|len| BufPool::shared().take(len)) else {
            return Self::get_blocking_heap(file, &ctx, len, len_max_bytes);
        };
        let read_bytes = buf.read_to_len(&mut file, len as usize).map_err(|e| StoreError::from_io(&ctx, &e))?;
        // A file that grows while we read cannot make us read more: one byte
        // past the length it had is enough to know it changed.
        let mut probe = [0u8; 1];
        if read_bytes as u64 == len && file.read(&mut probe).map_err(|e| StoreError::from_io(&ctx, &e))? > 0 {
            return Err(StoreError::corrupt(format!("{ctx}: object grew past {len} bytes while read")));
        }
        // Shorter than its length (shrunk while read): returned as read; the
        // verifier refuses it by length.
        Ok(buf.into_bytes())
    }

    /// Objects larger than a pooled buffer (a manifest can be): one heap read.
    fn get_blocking_heap(file: std::fs::File, ctx: &str, len: u64, len_max_bytes: u64) -> Result<Bytes, StoreError> {
        let mut buf = Vec::with_capacity(len as usize);
        // take(): a file that grows while we read cannot make us read more.
        file.take(len_max_bytes + 1).read_to_end(&mut buf).map_err(|e| StoreError::from_io(ctx, &e))?;
        if buf.len() as u64 > len_max_bytes {
            return Err(StoreError::corrupt(format!("{ctx}: object grew past {len_max_bytes} bytes while read")));
        }
        Ok(Bytes::from(buf))
    }

    fn put_blocking(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let ctx = path.display().to_string();
        let io = |e: std::io::Error| StoreError::from_io(&ctx, &e);
        let dir = path.parent().ok_or_else(|| StoreError::permanent(format!("{ctx}: no parent directory")))?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}{STAGING_MARKER}{}-{n}", std::process::id()));
        let result = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }
}

/// Copy a directory tree (a file store, to make a mirror of it). Symlinks
/// are not followed.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else if file_type.is_file() {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

impl BlockStore for FileStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn get_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> BoxFuture<'a, Result<Bytes, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            tokio::task::spawn_blocking(move || Self::get_blocking(&path, len_max_bytes))
                .await
                .map_err(|e| StoreError::transient(format!("read task failed: {e}")))?
        })
    }

    fn put_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
        bytes: Bytes,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            tokio::task::block_in_place(|| self.put_blocking(&path, &bytes))
        })
    }

    fn exists_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::metadata(&path).await {
                Ok(meta) => Ok(meta.is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(StoreError::from_io(&path.display().to_string(), &e)),
            }
        })
    }

    fn list_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        dir: &'a str,
    ) -> BoxFuture<'a, Result<Vec<super::ObjectInfo>, StoreError>> {
        Box::pin(async move {
            let path = self.path(dir.trim_end_matches('/'))?;
            tokio::task::spawn_blocking(move || list_blocking(&path))
                .await
                .map_err(|e| StoreError::transient(format!("list task failed: {e}")))?
        })
    }

    fn delete_for<'a>(
        &'a self,
        _ctx: &'a super::RequestContext,
        key: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(StoreError::from_io(&path.display().to_string(), &e))
                }
                _ => Ok(()),
            }
        })
    }
}

/// The files directly in `dir` (staged writes excluded), with their mtimes.
fn list_blocking(dir: &Path) -> Result<Vec<super::ObjectInfo>, StoreError> {
    let ctx = dir.display().to_string();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::from_io(&ctx, &e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::from_io(&ctx, &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() || name.contains(STAGING_MARKER) {
            continue;
        }
        let modified = meta.modified().map_err(|e| StoreError::from_io(&ctx, &e))?;
        out.push(super::ObjectInfo { name, modified });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn put_get_exists_and_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("bucket/prefix"));
        store.put("blocks/abc", Bytes::from_static(b"hello")).await.unwrap();
        assert!(store.exists("blocks/abc").await.unwrap());
        assert!(!store.exists("blocks/abd").await.unwrap());
        let got = store.get("blocks/abc", 5).await.unwrap();
        assert_eq!(&got[..], b"hello");
        // Read into a page-aligned pooled buffer, ready for O_DIRECT.
        assert!((got.as_ptr() as usize).is_multiple_of(crate::buf::ALIGN_BYTES));
        assert_eq!(store.get("blocks/abc", 4).await.unwrap_err().class, ErrorClass::Corrupt);
        assert_eq!(store.get("blocks/nope", 4).await.unwrap_err().class, ErrorClass::Permanent);
        assert_eq!(store.get("../escape", 4).await.unwrap_err().class, ErrorClass::Permanent);
        // No staging leftovers.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("bucket/prefix/blocks"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("abc")]);
    }
}
