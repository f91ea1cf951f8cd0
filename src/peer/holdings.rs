//! What this process holds, for peers: [`Holdings`], one [`Holding`] per
//! restore, and [`Holdings::find`] then [`Holdings::read_found`], the one way
//! a block leaves for a peer.
//!
//! In: restores register a holding once their target is allocated (a read
//! handle on the target, the snapshot, and [`HeldBits`] each unit sets as
//! soon as its write of a block completed), and withdraw it when they end
//! short of success. A restore that succeeded keeps serving until
//! `peers.holdings_max` newer holdings pushed it out (its handle follows the
//! file through the swap) or its target file is removed
//! ([`Holdings::drop_unlinked`]: its handles close, so its space is freed).
//!
//! Out: for a content hash, the decoded block, or `None`. A block is read
//! only once its restore has written it (not waiting for the fdatasync of
//! the checkpoint cadence), from the target at its offset, and is hashed on
//! the way out: bytes that do not hash to the requested content hash (torn,
//! unwritten, overwritten) are never served ([`ReadError::Mismatch`]). A
//! block the restore is fetching from its store right now is waited for, up
//! to `peers.serve_wait_millis`; anything else is `None` at once. Reads and
//! hashing run on the blocking pool.
//!
//! Why written is enough: the fdatasync protects the restore's own
//! checkpoint against a crash of this machine (a checkpoint never names a
//! block that was not durable). A peer does not need that: what it gets was
//! hashed here on the way out and is hashed again on arrival, and a crash of
//! this machine after sending cannot make a byte already sent and verified
//! wrong. A restore that ends short (an fdatasync failed, cancelled) is
//! withdrawn at once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::block::{BlockIndex, BlockRange, ContentHash};
use crate::fetch::FetchTelemetry;
use crate::snapshot::Snapshot;

/// Blocks of one restore that peers may read, readable while it runs: one
/// bit per block of its range, set once the block's write completed (or it
/// was settled before this run), and a wake-up for requests waiting on one.
#[derive(Debug)]
pub struct HeldBits {
    range: BlockRange,
    words: Vec<AtomicU64>,
    written: tokio::sync::Notify,
}

impl HeldBits {
    pub fn new(range: BlockRange) -> Self {
        let words = range.len().div_ceil(64) as usize;
        Self { range, words: (0..words).map(|_| AtomicU64::new(0)).collect(), written: tokio::sync::Notify::new() }
    }

    /// Block `index` is on the target: peers may read it (and requests
    /// waiting for one look again).
    pub fn set(&self, index: BlockIndex) {
        if self.range.contains(index) {
            let bit = index - self.range.start;
            self.words[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
            self.written.notify_waiters();
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
    /// The same with `O_DIRECT`, where the target takes it: whole 4 KiB
    /// blocks are read with it, straight into a pooled buffer.
    direct: Option<File>,
    held: Arc<HeldBits>,
    /// The restore's fetches: which blocks it is asking its store for now.
    fetches: Option<Arc<FetchTelemetry>>,
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
    /// The blocks of `snapshot` within `held`'s range, read from `file`.
    pub fn new(label: String, snapshot: Arc<dyn Snapshot>, file: File, held: Arc<HeldBits>) -> Self {
        let range = held.range;
        let mut index = HashMap::new();
        for block in snapshot.blocks().filter(|b| range.contains(b.index)) {
            index.entry(block.expected.hash).or_insert(block.index);
        }
        let file = Arc::new(file);
        Self { label, snapshot, file, direct: None, held, fetches: None, index, withdrawn: AtomicBool::new(false) }
    }

    /// Read aligned blocks through `direct`, a handle on the same target
    /// opened with `O_DIRECT`: the target's blocks were written with
    /// `O_DIRECT`, so a buffered read would fetch each one into the page
    /// cache and copy it out (measured: 18 % of a 2-core machine's time in a
    /// fleet of 4 serving each other, 2026-12-03); a direct read lands in
    /// the buffer the answer is sent from. (A direct read writes back any
    /// page-cache pages of its range first, so an export's client writes
    /// are seen.)
    pub fn with_direct(mut self, direct: File) -> Self {
        self.direct = Some(direct);
        self
    }

    /// The same, with the restore's fetches: a block it is asking its store
    /// for is worth waiting for.
    pub fn with_fetches(mut self, fetches: Arc<FetchTelemetry>) -> Self {
        self.fetches = Some(fetches);
        self
    }

    /// Whether the target file it reads has no name left (its handle keeps
    /// the file's space allocated while it is open).
    fn is_unlinked(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().is_ok_and(|m| m.nlink() == 0)
    }

    /// The written block holding `hash`, if any. Identical blocks share the
    /// first index.
    fn held_block(&self, hash: &ContentHash) -> Option<BlockIndex> {
        let first = *self.index.get(hash)?;
        self.held.is_set(first).then_some(first)
    }

    /// Whether this restore is asking its store (not a peer) for `hash` now.
    fn fetching_from_store(&self, hash: &ContentHash) -> bool {
        let (Some(first), Some(fetches)) = (self.index.get(hash), &self.fetches) else { return false };
        fetches.asking_store(*first)
    }

    /// Wait up to `wait` for `hash`'s block to be written (`None`: not
    /// written by then, or the holding was withdrawn).
    async fn wait_written(&self, hash: &ContentHash, wait: Duration) -> Option<BlockIndex> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let written = self.held.written.notified();
            tokio::pin!(written);
            // Registered before the look, so a write in between wakes it.
            written.as_mut().enable();
            if self.withdrawn.load(Ordering::Acquire) {
                return None;
            }
            if let Some(index) = self.held_block(hash) {
                return Some(index);
            }
            tokio::time::timeout_at(deadline, written).await.ok()?;
        }
    }
}

/// A held block found for a request: read it with [`Holdings::read_found`].
#[derive(Debug)]
pub struct Found {
    holding: Arc<Holding>,
    index: BlockIndex,
    hash: ContentHash,
}

/// Why a held block was not served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The target does not hold the block's bytes (torn, overwritten,
    /// corrupt): nothing is served.
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
    /// Requests waiting now for a block their holding is fetching.
    pub waiting: AtomicU64,
}

impl Holdings {
    pub fn new(max: usize) -> Self {
        Self {
            list: Mutex::new(Vec::new()),
            max,
            bytes_served: AtomicU64::new(0),
            blocks_served: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Holding>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve `holding`'s written blocks from now on; the oldest beyond the
    /// cap stops being served.
    pub fn hold(&self, holding: Arc<Holding>) {
        self.drop_unlinked();
        let mut list = self.list();
        list.insert(0, holding);
        list.truncate(self.max);
    }

    /// Stop serving the holdings whose target file is gone (removed, or
    /// replaced by another file): their handles are closed, so the space
    /// the file took is freed, not kept until newer restores push them out.
    /// Returns how many went. The worker calls it on every scheduling tick.
    pub fn drop_unlinked(&self) -> usize {
        let gone: Vec<Arc<Holding>> = self.list().iter().filter(|h| h.is_unlinked()).cloned().collect();
        for holding in &gone {
            tracing::info!(target = %holding.label, "its target file was removed: no longer served to peers");
            self.withdraw(holding);
        }
        gone.len()
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
        holding.held.written.notify_waiters();
        self.list().retain(|h| !Arc::ptr_eq(h, holding));
    }

    /// The written block of content hash `hash`: at once when a holding has
    /// it written; when none has but one is fetching it from its store now,
    /// after waiting up to `wait` for that write; otherwise `None` at once.
    pub async fn find(&self, hash: ContentHash, wait: Duration) -> Option<Found> {
        let holders: Vec<Arc<Holding>> = self.list().iter().filter(|h| h.index.contains_key(&hash)).cloned().collect();
        if let Some((holding, index)) = holders.iter().find_map(|h| Some((Arc::clone(h), h.held_block(&hash)?))) {
            return Some(Found { holding, index, hash });
        }
        let holding = holders.into_iter().find(|h| h.fetching_from_store(&hash))?;
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let index = holding.wait_written(&hash, wait).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        Some(Found { holding, index: index?, hash })
    }

    /// The decoded, verified bytes of a block [`find`](Self::find) found.
    pub async fn read_found(&self, found: Found) -> Result<Bytes, ReadError> {
        let index = found.index;
        match tokio::task::spawn_blocking(move || read_verified(&found.holding, found.index, found.hash)).await {
            Ok(result) => result,
            Err(e) => Err(ReadError::Io { label: String::new(), index, error: std::io::Error::other(e) }),
        }
    }

    /// [`find`](Self::find) then [`read_found`](Self::read_found):
    /// `Ok(None)` when no holding has the block written.
    pub async fn read(&self, hash: ContentHash, wait: Duration) -> Result<Option<Bytes>, ReadError> {
        let Some(found) = self.find(hash, wait).await else { return Ok(None) };
        self.read_found(found).await.map(Some)
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
    let (offset, len) = (layout.offset(index), layout.len(index) as usize);
    let io_error = |error| ReadError::Io { label: holding.label.clone(), index, error };
    let bytes = match read_direct(holding, offset, len) {
        Some(read) => read.map_err(io_error)?,
        None => {
            let mut buf = vec![0u8; len];
            holding.file.read_exact_at(&mut buf, offset).map_err(io_error)?;
            Bytes::from(buf)
        }
    };
    let algorithm = holding.snapshot.block(index).map(|b| b.expected.algorithm).unwrap_or_default();
    if algorithm.hash(&bytes) != hash || holding.withdrawn.load(Ordering::Acquire) {
        return Err(ReadError::Mismatch { label: holding.label.clone(), index, hash: hash.to_hex() });
    }
    Ok(bytes)
}

/// `len` bytes at `offset` through the holding's `O_DIRECT` handle, into a
/// pooled aligned buffer; `None` when there is no such handle or the block
/// is not whole 4 KiB pages (the last block of an odd-sized volume: it
/// reads buffered).
fn read_direct(holding: &Holding, offset: u64, len: usize) -> Option<std::io::Result<Bytes>> {
    let direct = holding.direct.as_ref()?;
    let align = crate::buf::ALIGN_BYTES;
    if !offset.is_multiple_of(align as u64) || !len.is_multiple_of(align) || len == 0 {
        return None;
    }
    let mut buf = crate::buf::BufPool::shared().take(len)?;
    let read = direct.read_exact_at(&mut buf.spare_mut()[..len], offset);
    Some(read.map(|()| {
        buf.set_len(len);
        buf.into_bytes()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockLayout, Compression, HashAlgorithm};
    use crate::manifest::{BlockEntry, ManifestBuilder};

    const WAIT: Duration = Duration::from_secs(30);

    /// Four distinct 4 KiB blocks on a target file, their snapshot, and a
    /// holding of them registered with no block written yet.
    struct Held {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        data: Vec<Vec<u8>>,
        bits: Arc<HeldBits>,
        holding: Arc<Holding>,
        holdings: Holdings,
    }

    fn held(fetches: Option<Arc<FetchTelemetry>>) -> Held {
        held_with(fetches, false).expect("a buffered holding")
    }

    /// `direct`: blocks are read through an `O_DIRECT` handle (`None` when
    /// the temporary directory's filesystem refuses it).
    fn held_with(fetches: Option<Arc<FetchTelemetry>>, direct: bool) -> Option<Held> {
        let dir = tempfile::tempdir().unwrap();
        let layout = BlockLayout::new(4 * 4096, 4096).unwrap();
        let data: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i + 1; 4096]).collect();
        let path = dir.path().join("target");
        std::fs::write(&path, data.concat()).unwrap();
        let mut b = ManifestBuilder::new("vol", layout, HashAlgorithm::Blake3, Compression::None).unwrap();
        for (i, block) in data.iter().enumerate() {
            let hash = HashAlgorithm::Blake3.hash(block);
            let entry = BlockEntry { index: i as u64, hash, stored_len_bytes: 4096, compression: Compression::None };
            b.push(entry).unwrap();
        }
        let snapshot: Arc<dyn Snapshot> = Arc::new(b.finish());
        let bits = Arc::new(HeldBits::new(BlockRange::all(&layout)));
        let mut holding = Holding::new("t".into(), snapshot, File::open(&path).unwrap(), Arc::clone(&bits));
        if let Some(fetches) = fetches {
            holding = holding.with_fetches(fetches);
        }
        if direct {
            use std::os::unix::fs::OpenOptionsExt;
            let opened = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path);
            holding = holding.with_direct(opened.ok()?);
        }
        let holding = Arc::new(holding);
        let holdings = Holdings::new(2);
        holdings.hold(Arc::clone(&holding));
        Some(Held { _dir: dir, path, data, bits, holding, holdings })
    }

    impl Held {
        fn hash(&self, i: usize) -> ContentHash {
            HashAlgorithm::Blake3.hash(&self.data[i])
        }
    }

    #[tokio::test]
    async fn a_removed_target_is_no_longer_held_and_its_space_is_freed() {
        let h = held(None);
        h.bits.set(1);
        assert_eq!(h.holdings.drop_unlinked(), 0, "its target is still there");
        assert!(h.holdings.read(h.hash(1), WAIT).await.unwrap().is_some());
        // Replaced by another file under the same name: the old one has no
        // name left.
        let replacement = h.path.with_extension("new");
        std::fs::write(&replacement, h.data.concat()).unwrap();
        std::fs::rename(&replacement, &h.path).unwrap();
        assert_eq!(h.holdings.drop_unlinked(), 1);
        assert!(h.holdings.is_empty());
        assert!(h.holdings.read(h.hash(1), WAIT).await.unwrap().is_none(), "a dropped holding serves nothing");
        // The holdings list no longer keeps its handle open.
        let Held { holding, .. } = h;
        assert_eq!(Arc::strong_count(&holding), 1);
    }

    #[tokio::test]
    async fn only_written_blocks_that_verify_are_read() {
        only_written_blocks_that_verify_are_read_from(held(None)).await;
    }

    #[tokio::test]
    async fn only_written_blocks_that_verify_are_read_with_o_direct() {
        let Some(h) = held_with(None, true) else {
            eprintln!("SKIP: the temporary directory's filesystem refuses O_DIRECT");
            return;
        };
        // Whole 4 KiB blocks go through the direct handle, into an aligned
        // buffer.
        let read = read_direct(&h.holding, 4096, 4096).expect("read directly").unwrap();
        assert_eq!(read, h.data[1]);
        assert!(read.as_ptr().addr().is_multiple_of(crate::buf::ALIGN_BYTES));
        assert!(read_direct(&h.holding, 100, 4096).is_none(), "an unaligned range reads buffered");
        only_written_blocks_that_verify_are_read_from(h).await;
    }

    async fn only_written_blocks_that_verify_are_read_from(h: Held) {
        assert!(h.holdings.read(h.hash(1), WAIT).await.unwrap().is_none(), "not written: not read");
        h.bits.set(1);
        assert_eq!(h.holdings.read(h.hash(1), WAIT).await.unwrap().unwrap(), h.data[1]);
        // The target changed under the block: never its bytes.
        let file = std::fs::OpenOptions::new().write(true).open(&h.path).unwrap();
        file.write_all_at(&[0], 4096 + 7).unwrap();
        assert!(matches!(h.holdings.read(h.hash(1), WAIT).await, Err(ReadError::Mismatch { .. })));
        h.holdings.withdraw(&h.holding);
        h.bits.set(2);
        assert!(h.holdings.read(h.hash(2), WAIT).await.unwrap().is_none(), "withdrawn: nothing is read");
        assert!(h.holdings.is_empty());
    }

    /// A fetch context's telemetry with a peer ahead of the store.
    fn fetches() -> Arc<FetchTelemetry> {
        let store: crate::store::SharedStore = Arc::new(crate::store::file::FileStore::new("/nonexistent".into()));
        let sources = crate::fetch::Source::peers_then(vec![Arc::clone(&store)], vec![store]);
        Arc::new(FetchTelemetry::new(&sources))
    }

    #[tokio::test]
    async fn a_block_fetched_from_the_store_now_is_waited_for() {
        let telemetry = fetches();
        let h = Arc::new(held(Some(Arc::clone(&telemetry))));
        let now = std::time::Instant::now();
        telemetry.track(1, "primary", 1, now);
        telemetry.track(2, "peer1", 1, now);
        telemetry.track(3, "primary", 1, now);
        let waiting = tokio::spawn({
            let h = Arc::clone(&h);
            async move { h.holdings.read(h.hash(1), WAIT).await.unwrap() }
        });
        while h.holdings.waiting.load(Ordering::Relaxed) == 0 {
            assert!(!waiting.is_finished(), "answered without waiting");
            tokio::task::yield_now().await;
        }
        h.bits.set(1);
        assert_eq!(waiting.await.unwrap().unwrap(), h.data[1], "served once written");
        // Asked of a peer, not the store: not waited for (no chains of waits).
        assert!(!h.holding.fetching_from_store(&h.hash(2)));
        assert!(h.holding.fetching_from_store(&h.hash(3)));
        telemetry.untrack(3);
        assert!(!h.holding.fetching_from_store(&h.hash(3)), "fetched (or given up): not waited for");
        assert!(!h.holding.fetching_from_store(&h.hash(0)), "never asked for");
        // Fetched from the store but not written within the wait: not served.
        telemetry.track(3, "primary", 1, now);
        assert!(h.holdings.read(h.hash(3), Duration::from_millis(10)).await.unwrap().is_none());
        assert_eq!(h.holdings.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn held_bits_cover_their_range_only() {
        let bits = HeldBits::new(BlockRange { start: 10, end: 200 });
        assert!(!bits.is_set(10));
        bits.set(10);
        bits.set(199);
        bits.set(5);
        bits.set(200);
        assert!(bits.is_set(10) && bits.is_set(199));
        assert!(!bits.is_set(5) && !bits.is_set(200) && !bits.is_set(11));
    }
}
