//! Snapshot create: cut a file or block device into blocks and store them
//! as a rehydrate manifest and its block objects.
//!
//! A reader thread reads the source sequentially, one block at a time, skips
//! zero blocks (absent from the manifest) and hashes the rest. Each distinct
//! block is compressed (zstd, kept only when it is smaller) and put under its
//! content address, unless the store already holds it; up to
//! `puts_inflight_max` puts run at once. The manifest is put last, after every
//! block it names is stored, so a manifest never names a missing object.
//! Memory: the blocks queued to the writer plus those being put, each at most
//! one block; the dedup index takes 32 bytes per distinct block.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::block::{BlockIndex, BlockLayout, Compression, ContentHash, HashAlgorithm, block_key, is_zero};
use crate::buf::BufPool;
use crate::manifest::{BlockEntry, ManifestBuilder};
use crate::store::{MANIFEST_SUFFIX, SharedStore};

/// Blocks read ahead of the puts.
const READ_AHEAD_BLOCKS: usize = 8;

#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub source: PathBuf,
    pub name: String,
    pub block_size_bytes: u32,
    pub compression: Compression,
    pub hash_algorithm: HashAlgorithm,
    /// Puts in flight at once.
    pub puts_inflight_max: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct CreateReport {
    pub manifest_url: String,
    pub snapshot_digest: String,
    pub volume_size_bytes: u64,
    pub block_size_bytes: u32,
    pub blocks_total: u64,
    pub blocks_zero: u64,
    pub blocks_deduplicated: u64,
    /// Distinct objects put by this run.
    pub objects_stored: u64,
    /// Distinct objects the store already held.
    pub objects_existing: u64,
    pub bytes_stored: u64,
    pub duration_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(String),
}

/// A block read from the source, hashed.
struct ReadBlock {
    index: BlockIndex,
    hash: ContentHash,
    bytes: Bytes,
}

/// Create a snapshot of `spec.source` in `store`.
pub async fn create(store: SharedStore, spec: &CreateSpec) -> Result<CreateReport, CreateError> {
    let started = Instant::now();
    let (manifest_key, file, layout) = open_source(&store, spec).await?;
    let mut builder = ManifestBuilder::new(&spec.name, layout, spec.hash_algorithm, spec.compression)
        .map_err(|e| CreateError::Usage(e.to_string()))?;
    let stored = store_blocks(&store, spec, file, layout).await?;
    for (index, hash) in &stored.refs {
        let (stored_len_bytes, compression) = stored.objects[hash].expect("every put finished");
        builder
            .push(BlockEntry { index: *index, hash: *hash, stored_len_bytes, compression })
            .map_err(|e| CreateError::Store(format!("internal: {e}")))?;
    }
    let manifest = builder.finish();
    store
        .put(&manifest_key, Bytes::from(manifest.encode()))
        .await
        .map_err(|e| CreateError::Store(format!("putting the manifest: {e}")))?;
    Ok(CreateReport {
        manifest_url: store.url().join(&manifest_key),
        snapshot_digest: manifest.digest().to_hex(),
        volume_size_bytes: layout.volume_size_bytes(),
        block_size_bytes: spec.block_size_bytes,
        blocks_total: layout.block_count(),
        blocks_zero: layout.block_count() - stored.refs.len() as u64,
        blocks_deduplicated: stored.dedup,
        objects_stored: stored.tally.stored,
        objects_existing: stored.tally.existing,
        bytes_stored: stored.tally.bytes_stored,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

/// Check the name (the manifest's own rule, before any block is stored) and
/// that no snapshot has it yet; open the source and find its layout.
async fn open_source(
    store: &SharedStore,
    spec: &CreateSpec,
) -> Result<(String, std::fs::File, BlockLayout), CreateError> {
    crate::manifest::validate_name(spec.name.as_bytes()).map_err(|e| CreateError::Usage(e.to_string()))?;
    let manifest_key = format!("{}{MANIFEST_SUFFIX}", spec.name);
    if store.exists(&manifest_key).await.map_err(|e| CreateError::Store(e.to_string()))? {
        return Err(CreateError::Usage(format!(
            "{} already exists: snapshots are immutable, choose another --name",
            store.url().join(&manifest_key)
        )));
    }
    let file =
        std::fs::File::open(&spec.source).map_err(|source| CreateError::Read { path: spec.source.clone(), source })?;
    let size = crate::target::device_size_bytes(&file)
        .map_err(|source| CreateError::Read { path: spec.source.clone(), source })?;
    let layout = BlockLayout::new(size, spec.block_size_bytes)
        .map_err(|e| CreateError::Usage(format!("{}: {e}", spec.source.display())))?;
    Ok((manifest_key, file, layout))
}

/// The blocks of a source, stored: which hash each non-zero block has, and
/// each distinct object's stored length and compression.
struct Stored {
    refs: Vec<(BlockIndex, ContentHash)>,
    objects: HashMap<ContentHash, Option<(u32, Compression)>>,
    dedup: u64,
    tally: PutTally,
}

/// Read the source block by block (a blocking reader ahead of the puts) and
/// put each distinct non-zero block once, at most `puts_inflight_max` at a
/// time.
async fn store_blocks(
    store: &SharedStore,
    spec: &CreateSpec,
    file: std::fs::File,
    layout: BlockLayout,
) -> Result<Stored, CreateError> {
    let (tx, mut rx) = mpsc::channel::<std::io::Result<ReadBlock>>(READ_AHEAD_BLOCKS);
    let algorithm = spec.hash_algorithm;
    let reader = tokio::task::spawn_blocking(move || read_blocks(&file, layout, algorithm, &tx));

    let puts = Arc::new(Semaphore::new(spec.puts_inflight_max.max(1)));
    let mut tasks: JoinSet<Result<PutDone, CreateError>> = JoinSet::new();
    let mut out = Stored { refs: Vec::new(), objects: HashMap::new(), dedup: 0, tally: PutTally::default() };
    while let Some(read) = rx.recv().await {
        let block = read.map_err(|source| CreateError::Read { path: spec.source.clone(), source })?;
        out.refs.push((block.index, block.hash));
        if out.objects.contains_key(&block.hash) {
            out.dedup += 1;
            continue;
        }
        out.objects.insert(block.hash, None);
        let permit = Arc::clone(&puts).acquire_owned().await.expect("semaphore never closed");
        let store = Arc::clone(store);
        let compression = spec.compression;
        tasks.spawn(async move {
            let out = put_block(&store, block, compression).await;
            drop(permit);
            out
        });
        while let Some(done) = tasks.try_join_next() {
            record_put(&mut out.objects, &mut out.tally, done)?;
        }
    }
    reader.await.map_err(|e| CreateError::Store(format!("reader task failed: {e}")))?;
    while let Some(done) = tasks.join_next().await {
        record_put(&mut out.objects, &mut out.tally, done)?;
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct PutTally {
    stored: u64,
    existing: u64,
    bytes_stored: u64,
}

fn record_put(
    objects: &mut HashMap<ContentHash, Option<(u32, Compression)>>,
    tally: &mut PutTally,
    done: Result<Result<PutDone, CreateError>, tokio::task::JoinError>,
) -> Result<(), CreateError> {
    let PutDone { hash, len, compression, fresh } =
        done.map_err(|e| CreateError::Store(format!("put task failed: {e}")))??;
    objects.insert(hash, Some((len, compression)));
    if fresh {
        tally.stored += 1;
        tally.bytes_stored += u64::from(len);
    } else {
        tally.existing += 1;
    }
    Ok(())
}

/// One distinct block object, stored: its stored length and compression, and
/// whether this run put it (`fresh`) or the store already had it.
struct PutDone {
    hash: ContentHash,
    len: u32,
    compression: Compression,
    fresh: bool,
}

/// Compress (when it pays) and put one block unless the store has it.
async fn put_block(store: &SharedStore, block: ReadBlock, compression: Compression) -> Result<PutDone, CreateError> {
    let (stored, compression) = match compression {
        // Longhorn's codecs are read, never written (`ManifestBuilder` refuses them).
        Compression::None | Compression::Lz4 | Compression::Gzip => (block.bytes, Compression::None),
        Compression::Zstd => {
            let raw = block.bytes;
            let packed = tokio::task::spawn_blocking(move || {
                let packed = zstd::bulk::compress(&raw, 3).ok().filter(|p| p.len() < raw.len());
                (raw, packed)
            })
            .await
            .map_err(|e| CreateError::Store(format!("compress task failed: {e}")))?;
            match packed {
                (_, Some(p)) => (Bytes::from(p), Compression::Zstd),
                (raw, None) => (raw, Compression::None),
            }
        }
    };
    let key = block_key(&block.hash, compression);
    let len = stored.len() as u32;
    let err = |e: crate::error::StoreError| CreateError::Store(format!("{}: {e}", store.url().join(&key)));
    if store.exists(&key).await.map_err(err)? {
        return Ok(PutDone { hash: block.hash, len, compression, fresh: false });
    }
    store.put(&key, stored).await.map_err(err)?;
    Ok(PutDone { hash: block.hash, len, compression, fresh: true })
}

/// The reader thread: sequential reads, zero blocks dropped, others hashed.
fn read_blocks(
    file: &std::fs::File,
    layout: BlockLayout,
    algorithm: HashAlgorithm,
    tx: &mpsc::Sender<std::io::Result<ReadBlock>>,
) {
    for index in 0..layout.block_count() {
        let len = layout.len(index) as usize;
        // A pooled buffer: the put gives it back, so a snapshot of any size
        // cycles through the same few buffers.
        let Some(mut buf) = BufPool::shared().take(len) else {
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("block length {len} exceeds the buffer pool"))));
            return;
        };
        if let Err(e) = file.read_exact_at(&mut buf.spare_mut()[..len], layout.offset(index)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        buf.set_len(len);
        if is_zero(&buf) {
            continue;
        }
        let hash = algorithm.hash(&buf);
        if tx.blocking_send(Ok(ReadBlock { index, hash, bytes: buf.into_bytes() })).is_err() {
            return;
        }
    }
}

/// A default snapshot name from the source path.
pub fn default_name(source: &std::path::Path) -> String {
    let stem = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let clean: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '-' })
        .take(120)
        .collect();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{}-{secs}", if clean.is_empty() { "volume".into() } else { clean })
}
