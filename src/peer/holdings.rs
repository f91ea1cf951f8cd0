//! What this process holds, for peers: [`Holdings`], one [`Holding`] per
//! restore, and [`Holdings::read`], the one way a block leaves for a peer.
//!
//! In: restores register a holding once their target is allocated (a read
//! handle on the target, the snapshot, and [`SettledBits`] the settler sets
//! after each fdatasync), and withdraw it when they end short of success.
//! A restore that succeeded keeps serving until `peers.holdings_max` newer
//! holdings pushed it out (its handle follows the file through the swap).
//!
//! Out: for a content hash, the decoded block, or `None`. A block is read
//! only when its restore has settled it (written and fdatasynced), from the
//! target at its offset, and is hashed on the way out: bytes that do not
//! hash to the requested content hash are never served ([`ReadError::Mismatch`]).
//! Reads and hashing run on the blocking pool.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::block::{BlockIndex, BlockRange, ContentHash};
use crate::snapshot::Snapshot;

/// Settled blocks of one restore, readable while it runs: one bit per block
/// of its range, set only after the fdatasync that made the block durable.
#[derive(Debug)]
pub struct SettledBits {
    range: BlockRange,
    words: Vec<AtomicU64>,
}

impl SettledBits {
    pub fn new(range: BlockRange) -> Self {
        let words = range.len().div_ceil(64) as usize;
        Self { range, words: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    pub fn set(&self, index: BlockIndex) {
        if self.range.contains(index) {
            let bit = index - self.range.start;
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
        }
    }

    pub fn is_set(&self, index: BlockIndex) -> bool {
        if !self.range.contains(index) {
            return false;
        }
        let bit = index - self.range.start;
        self.words[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }
}

/// One restore's blocks, as peers may read them.
pub struct Holding {
    /// The job (or target) it belongs to, for logs.
    pub label: String,
    snapshot: Arc<dyn Snapshot>,
    /// A read handle on the target (no `O_DIRECT`).
    file: Arc<File>,
    settled: Arc<SettledBits>,
    /// The first block holding each content hash.
    index: HashMap<ContentHash, BlockIndex>,
    withdrawn: AtomicBool,
}

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding").field("label", &self.label).finish_non_exhaustive()
    }
}

impl Holding {
    /// The blocks of `snapshot` within `settled`'s range, read from `file`.
    pub fn new(label: String, snapshot: Arc<dyn Snapshot>, file: File, settled: Arc<SettledBits>) -> Self {
        let range = settled.range;
        let mut index = HashMap::new();
        for block in snapshot.blocks().filter(|b| range.contains(b.index)) {
            index.entry(block.expected.hash).or_insert(block.index);
        }
        Self { label, snapshot, file: Arc::new(file), settled, index, withdrawn: AtomicBool::new(false) }
    }

    /// The settled block holding `hash`, if any. Identical blocks share the
    /// first index: when that one is not settled yet, a later one may be.
    fn settled_block(&self, hash: &ContentHash) -> Option<BlockIndex> {
        let first = *self.index.get(hash)?;
        if self.settled.is_set(first) {
            return Some(first);
        }
        None
    }
}

/// Why a held block was not served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The target no longer holds the block's bytes (overwritten, corrupt):
    /// nothing is served.
    #[error("{label}: block {index} does not hash to {hash} on the target: not served")]
    Mismatch { label: String, index: BlockIndex, hash: String },
    #[error("{label}: reading block {index} from the target failed: {error}")]
    Io { label: String, index: BlockIndex, error: std::io::Error },
}

/// Every holding of the process, newest first, at most `max`.
#[derive(Debug)]
pub struct Holdings {
    list: Mutex<Vec<Arc<Holding>>>,
    max: usize,
    /// Bytes served to peers.
    pub bytes_served: AtomicU64,
    /// Blocks served to peers.
    pub blocks_served: AtomicU64,
}

impl Holdings {
    pub fn new(max: usize) -> Self {
        Self { list: Mutex::new(Vec::new()), max, bytes_served: AtomicU64::new(0), blocks_served: AtomicU64::new(0) }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Holding>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve `holding`'s settled blocks from now on; the oldest beyond the
    /// cap stops being served.
    pub fn hold(&self, holding: Arc<Holding>) {
        let mut list = self.list();
        list.insert(0, holding);
        list.truncate(self.max);
    }

    /// Holdings served now.
    pub fn len(&self) -> usize {
        self.list().len()
    }

    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    /// Stop serving `holding` (its restore ended short: its target may go).
    pub fn withdraw(&self, holding: &Arc<Holding>) {
        holding.withdrawn.store(true, Ordering::Release);
        self.list().retain(|h| !Arc::ptr_eq(h, holding));
    }

    /// The decoded, verified block of content hash `hash`, if a holding has
    /// it settled; `Ok(None)` when none does.
    pub async fn read(&self, hash: ContentHash) -> Result<Option<Bytes>, ReadError> {
        let found = self.list().iter().find_map(|h| Some((Arc::clone(h), h.settled_block(&hash)?)));
        let Some((holding, index)) = found else {
            return Ok(None);
        };
        let read = tokio::task::spawn_blocking(move || read_verified(&holding, index, hash)).await;
        let bytes = match read {
            Ok(result) => result?,
            Err(e) => return Err(ReadError::Io { label: String::new(), index, error: std::io::Error::other(e) }),
        };
        Ok(Some(bytes))
    }

    /// Count a block sent to a peer (a `GET`; a `HEAD` sends no bytes).
    pub fn count_served(&self, bytes: u64) {
        self.blocks_served.fetch_add(1, Ordering::Relaxed);
        self.bytes_served.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Block `index` of `holding` from its target, only if it hashes to `hash`.
fn read_verified(holding: &Holding, index: BlockIndex, hash: ContentHash) -> Result<Bytes, ReadError> {
    let layout = holding.snapshot.layout();
    let mut buf = vec![0u8; layout.len(index) as usize];
    holding.file.read_exact_at(&mut buf, layout.offset(index)).map_err(|error| ReadError::Io {
        label: holding.label.clone(),
        index,
        error,
    })?;
    let algorithm = holding.snapshot.block(index).map(|b| b.expected.algorithm).unwrap_or_default();
    if algorithm.hash(&buf) != hash || holding.withdrawn.load(Ordering::Acquire) {
        return Err(ReadError::Mismatch { label: holding.label.clone(), index, hash: hash.to_hex() });
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockLayout, Compression, HashAlgorithm};
    use crate::manifest::{BlockEntry, ManifestBuilder};

    #[tokio::test]
    async fn only_settled_blocks_that_verify_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let layout = BlockLayout::new(4 * 4096, 4096).unwrap();
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let path = dir.path().join("target");
        std::fs::write(&path, data.concat()).unwrap();
        let mut b = ManifestBuilder::new("vol", layout, HashAlgorithm::Blake3, Compression::None).unwrap();
        let hash = |i: usize| HashAlgorithm::Blake3.hash(&data[i]);
        for i in 0..4 {
            let entry =
                BlockEntry { index: i as u64, hash: hash(i), stored_len_bytes: 4096, compression: Compression::None };
            b.push(entry).unwrap();
        }
        let snapshot: Arc<dyn Snapshot> = Arc::new(b.finish());
        let bits = Arc::new(SettledBits::new(BlockRange::all(&layout)));
        let holdings = Holdings::new(2);
        let holding = Arc::new(Holding::new("t".into(), snapshot, File::open(&path).unwrap(), Arc::clone(&bits)));
        holdings.hold(Arc::clone(&holding));
        assert!(holdings.read(hash(1)).await.unwrap().is_none(), "not settled: not read");
        bits.set(1);
        assert_eq!(holdings.read(hash(1)).await.unwrap().unwrap(), data[1]);
        // The target changed under the block: never its bytes.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0], 4096 + 7).unwrap();
        assert!(matches!(holdings.read(hash(1)).await, Err(ReadError::Mismatch { .. })));
        holdings.withdraw(&holding);
        bits.set(2);
        assert!(holdings.read(hash(2)).await.unwrap().is_none(), "withdrawn: nothing is read");
        assert!(holdings.is_empty());
    }

    #[test]
    fn settled_bits_cover_their_range_only() {
        let bits = SettledBits::new(BlockRange { start: 10, end: 200 });
        assert!(!bits.is_set(10));
        bits.set(10);
        bits.set(199);
        bits.set(5);
        bits.set(200);
        assert!(bits.is_set(10) && bits.is_set(199));
        assert!(!bits.is_set(5) && !bits.is_set(200) && !bits.is_set(11));
    }
}
