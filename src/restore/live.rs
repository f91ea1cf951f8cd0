//! The volume while it is restored: reads and writes of a target whose
//! blocks are still arriving (what `rehydrate restore --export` serves).
//!
//! In: byte ranges to read or write, from any number of tasks. Out: bytes
//! that are always the snapshot's or the client's, never stale or wrong.
//!
//! Each block is, for the client, either **local** (the target holds its
//! final bytes: restored, or written by the client) or not. Reading a block
//! that is not local fetches it at once through [`Priority::Demand`] (the
//! budget's demand reserve, its own tenant at the stores' gates), verifies
//! it and answers from the verified bytes, while a task of its own writes
//! them to the target (the read does not wait for the target's write queue);
//! a zero block is answered at once. A block being fetched or written is
//! **claimed** (until that write is done): a second reader of it waits for
//! the first and then reads the target, so concurrent reads share one fetch.
//! A block no source can serve answers `EIO`; the background restore names
//! it in the damage report.
//!
//! The background's fetches are shared too ([`SharedFetch`]): a reader of a
//! block whose background request is already on the wire waits for that
//! answer, as long as a fetch on demand usually takes (the demand lane's
//! median), before it asks the store itself; and a block a reader fetched
//! while the background's request still waited in a local queue (the
//! concurrency window, the pacer) is handed to the background, which drops
//! its own request unsent. A reader scanning the volume while it is
//! restored therefore costs the store few extra requests, which on a paced
//! store are the restore's own.
//!
//! Whatever runtime serves the volume (an export runs on one of its own,
//! `nbd::spawn_server`), its fetches on demand run on the restore's, so the
//! store connections they open and pool outlive the export.
//!
//! A client write makes its blocks **owned** by the client. A partial write
//! to a block that is not local restores the block first, then applies the
//! write. The background restore claims each block before writing it and
//! skips a local one, so it never overwrites a client's bytes.
//!
//! FLUSH is an fdatasync of the target, and while the restore runs it goes
//! through the settler: the blocks the client owns are settled with it and
//! recorded in the checkpoint, so a resumed restore never overwrites them
//! (`docs/architecture.md`, "Serving the volume while it is restored").
//!
//! A read that spans several blocks not local fetches them at once (at most
//! [`READ_FETCHES_INFLIGHT_MAX`] at a time), not one after another. Each
//! block a read waits for is registered while it waits, so the settler's
//! stall watchdog can name a block a client has waited on too long
//! ([`LiveVolume::oldest_wait`]).
//!
//! Limits: claims are per block and held only while that block is fetched
//! or written; the callers (the NBD server) bound how many requests are in
//! flight and how long each range is.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::latency::LatencyHistogram;
use super::read::{BlockReader, Priority};
use crate::block::{BlockIndex, BlockLayout};
use crate::fetch::budget::BudgetPermit;
use crate::metrics as m;
use crate::store::timeout::SentAt;
use crate::verify::VerifiedBlock;

/// Blocks one read fetches at once. Each holds its bytes in the demand
/// reserve, which bounds them across reads; this bounds the tasks one
/// request polls.
pub const READ_FETCHES_INFLIGHT_MAX: usize = 16;

/// A FLUSH sent to the settler: settle these client-owned blocks with an
/// fdatasync and save the checkpoint, then answer.
pub(super) struct FlushRequest {
    pub(super) owned: Vec<BlockIndex>,
    pub(super) done: oneshot::Sender<Result<(), String>>,
}

/// Counters of what the volume served.
#[derive(Debug, Default)]
pub struct LiveCounts {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    /// Blocks fetched because a reader (or a partial write) needed them now.
    pub demand_fetches: AtomicU64,
    /// Blocks a read took from the background's fetch of them instead.
    pub shared_fetches: AtomicU64,
    pub demand_failures: AtomicU64,
    /// Blocks the client wrote (its own from then on).
    pub blocks_owned: AtomicU64,
    /// Objects the background restore did not fetch because of the client:
    /// its reads or writes had made every block of the object local, or a
    /// read on demand brought the block while the background's request still
    /// waited (the restore report's `objects_from_export`).
    pub objects_from_export: AtomicU64,
    /// Latency of reads whose every block was local already.
    pub read_latency_local: LatencyHistogram,
    /// Latency of reads that waited for a block to be fetched.
    pub read_latency_on_demand: LatencyHistogram,
}

/// One bit per block.
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(len: u64) -> Self {
        Self(vec![0; len.div_ceil(64) as usize])
    }
    fn get(&self, i: BlockIndex) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Set bit `i`; whether it was clear.
    fn set(&mut self, i: BlockIndex) -> bool {
        let word = &mut self.0[(i / 64) as usize];
        let was_clear = *word & (1 << (i % 64)) == 0;
        *word |= 1 << (i % 64);
        was_clear
    }
}

struct States {
    local: BitSet,
    owned: BitSet,
    /// Blocks being fetched or written, and who waits for them.
    claimed: HashMap<BlockIndex, Arc<Notify>>,
    /// Owned blocks written since the last FLUSH.
    owned_unflushed: Vec<BlockIndex>,
    /// Blocks reads wait for: since when, and how many reads.
    waiting: HashMap<BlockIndex, (Instant, usize)>,
    /// The background's fetches in progress, by each block they restore.
    shared: HashMap<BlockIndex, Arc<SharedFetch>>,
}

/// What came of a shared fetch so far.
#[derive(Clone)]
enum Fetched {
    Pending,
    Ready(VerifiedBlock),
    Failed,
}

/// One background fetch (one object, for every block of its unit) that
/// readers share: whether one of its requests is out now, and the verified
/// block once either side has it.
pub(super) struct SharedFetch {
    sent: Arc<SentAt>,
    fetched: watch::Sender<Fetched>,
}

impl SharedFetch {
    /// The block, if it arrives in time: at once when it is here; not at
    /// all when the background's request waits in a local queue (a fetch on
    /// demand goes ahead of it; a retry waits there too) or failed; else
    /// within `patience`.
    async fn ready_within(&self, patience: Option<Duration>) -> Option<VerifiedBlock> {
        let mut fetched = self.fetched.subscribe();
        match &*fetched.borrow_and_update() {
            Fetched::Ready(block) => return Some(block.clone()),
            Fetched::Failed => return None,
            Fetched::Pending if self.sent.get().is_none() => return None,
            Fetched::Pending => {}
        }
        let ready = fetched.wait_for(|f| !matches!(f, Fetched::Pending));
        match tokio::time::timeout(patience?, ready).await {
            Ok(Ok(f)) => match &*f {
                Fetched::Ready(block) => Some(block.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    /// A reader's verified block, once one arrives while the background's
    /// own request has not gone out (never otherwise: a request on the wire
    /// is answered soon, and dropping it would cost its connection).
    async fn offered(&self) -> VerifiedBlock {
        let mut fetched = self.fetched.subscribe();
        loop {
            if let Fetched::Ready(block) = &*fetched.borrow_and_update()
                && self.sent.get().is_none()
            {
                return block.clone();
            }
            if fetched.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// The first outcome wins.
    fn publish(&self, outcome: Result<&VerifiedBlock, ()>) {
        self.fetched.send_if_modified(|f| {
            if !matches!(f, Fetched::Pending) {
                return false;
            }
            *f = outcome.map_or(Fetched::Failed, |block| Fetched::Ready(block.clone()));
            true
        });
    }
}

/// A background fetch readers may share, registered under its blocks until
/// dropped (once the unit has written them).
pub(super) struct BackgroundFetch<'a> {
    volume: &'a LiveVolume,
    blocks: &'a [BlockIndex],
    shared: Arc<SharedFetch>,
}

impl BackgroundFetch<'_> {
    /// Marked while one of the background's requests for the block is out.
    pub(super) fn sent(&self) -> &Arc<SentAt> {
        &self.shared.sent
    }

    /// Resolves with a reader's block fetched while ours waited unsent
    /// (an object the background then does not fetch: counted).
    pub(super) async fn offered(&self) -> VerifiedBlock {
        let block = self.shared.offered().await;
        self.volume.count_object_from_export();
        block
    }

    /// The background's fetch ended: readers waiting take its block, or
    /// fetch on demand after a failure.
    pub(super) fn publish(&self, outcome: Result<&VerifiedBlock, ()>) {
        self.shared.publish(outcome);
    }
}

impl Drop for BackgroundFetch<'_> {
    fn drop(&mut self) {
        let mut states = self.volume.lock();
        for index in self.blocks {
            if states.shared.get(index).is_some_and(|s| Arc::ptr_eq(s, &self.shared)) {
                states.shared.remove(index);
            }
        }
    }
}

/// A block a client read waits for, the longest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadWait {
    pub block: BlockIndex,
    pub waited: Duration,
    /// Reads waiting for that block.
    pub readers: usize,
}

/// A read waiting for a block; unregistered when dropped.
struct Waiting<'a> {
    volume: &'a LiveVolume,
    index: BlockIndex,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut states = self.volume.lock();
        if let Some((_, readers)) = states.waiting.get_mut(&self.index) {
            *readers -= 1;
            if *readers == 0 {
                states.waiting.remove(&self.index);
            }
        }
    }
}

/// The volume being restored, readable and writable at any moment.
pub struct LiveVolume {
    layout: BlockLayout,
    reader: Arc<BlockReader>,
    file: Arc<File>,
    states: Mutex<States>,
    /// The settler, while the restore runs.
    settler: mpsc::Sender<FlushRequest>,
    /// How the restore's rehydrate phase ended, once it has: `Some(true)`
    /// when every block is settled or failed (an fdatasync is then all a
    /// FLUSH needs), `Some(false)` when it stopped short.
    finished: watch::Sender<Option<bool>>,
    pub counts: LiveCounts,
    /// The target's lock: whoever serves the volume holds the target as long
    /// as it holds the volume, past the end of the restore
    /// (`docs/architecture.md`, invariant 8).
    pub(super) target_lock: Option<Arc<crate::target::TargetLock>>,
    /// This volume, for the tasks that write blocks fetched for a read.
    this: std::sync::Weak<LiveVolume>,
    /// The restore's runtime: fetches on demand run there whatever runtime
    /// serves the volume (an export's own, `nbd::spawn_server`), so the
    /// store connections they open and pool live as long as the process's.
    restore_runtime: tokio::runtime::Handle,
}

/// How long a FLUSH waits for the end of the rehydrate phase once the
/// settler has stopped taking FLUSHes (it is the settler's last fdatasync).
const FINISH_WAIT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for LiveVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVolume").field("layout", &self.layout).finish_non_exhaustive()
    }
}

/// A block claimed for a fetch or a write; released (waking its waiters)
/// when dropped.
pub(super) struct Claim<'a> {
    volume: &'a LiveVolume,
    index: BlockIndex,
}

impl Claim<'_> {
    pub(super) fn is_local(&self) -> bool {
        self.volume.is_local(self.index)
    }

    pub(super) fn set_local(&self) {
        self.volume.lock().local.set(self.index);
    }
}

impl Claim<'_> {
    /// The same claim, held from now on by a task of its own (`volume`:
    /// this claim's volume, as an `Arc` the task can keep).
    fn into_owned(self, volume: Arc<LiveVolume>) -> OwnedClaim {
        let index = self.index;
        // Released by the owned claim instead.
        std::mem::forget(self);
        OwnedClaim { volume, index }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.volume.release(self.index);
    }
}

/// A [`Claim`] held by a task of its own (the write of a block a read was
/// answered from).
struct OwnedClaim {
    volume: Arc<LiveVolume>,
    index: BlockIndex,
}

impl Drop for OwnedClaim {
    fn drop(&mut self) {
        self.volume.release(self.index);
    }
}

impl LiveVolume {
    /// `local(i)`: the target already holds block `i`'s final bytes (settled
    /// by an earlier run, or zeros of a fresh file).
    /// `this`: the `Arc` the volume is built in (`Arc::new_cyclic`).
    pub(super) fn new(
        reader: Arc<BlockReader>,
        file: Arc<File>,
        settler: mpsc::Sender<FlushRequest>,
        local: impl Fn(BlockIndex) -> bool,
        this: std::sync::Weak<LiveVolume>,
    ) -> Self {
        let layout = reader.snapshot().layout();
        let mut states = States {
            local: BitSet::new(layout.block_count()),
            owned: BitSet::new(layout.block_count()),
            claimed: HashMap::new(),
            owned_unflushed: Vec::new(),
            waiting: HashMap::new(),
            shared: HashMap::new(),
        };
        for i in (0..layout.block_count()).filter(|&i| local(i)) {
            states.local.set(i);
        }
        Self {
            layout,
            reader,
            file,
            states: Mutex::new(states),
            settler,
            finished: watch::channel(None).0,
            counts: LiveCounts::default(),
            target_lock: None,
            this,
            restore_runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The rehydrate phase has ended: `settled_all` when every block is
    /// settled or failed.
    pub(super) fn finish(&self, settled_all: bool) {
        self.finished.send_replace(Some(settled_all));
    }

    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, States> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_local(&self, index: BlockIndex) -> bool {
        self.lock().local.get(index)
    }

    pub fn is_owned(&self, index: BlockIndex) -> bool {
        self.lock().owned.get(index)
    }

    fn release(&self, index: BlockIndex) {
        if let Some(notify) = self.lock().claimed.remove(&index) {
            notify.notify_waiters();
        }
    }

    /// Register the background's fetch of the object of `blocks` (one unit)
    /// for readers to share, until the returned guard drops.
    pub(super) fn share_fetch<'a>(&'a self, blocks: &'a [BlockIndex]) -> BackgroundFetch<'a> {
        let shared =
            Arc::new(SharedFetch { sent: Arc::new(SentAt::default()), fetched: watch::channel(Fetched::Pending).0 });
        let mut states = self.lock();
        for &index in blocks {
            states.shared.insert(index, Arc::clone(&shared));
        }
        BackgroundFetch { volume: self, blocks, shared }
    }

    /// The background restore does not fetch an object because of the
    /// client (see [`LiveCounts::objects_from_export`]).
    pub(super) fn count_object_from_export(&self) {
        self.counts.objects_from_export.fetch_add(1, Ordering::Relaxed);
    }

    fn shared_fetch(&self, index: BlockIndex) -> Option<Arc<SharedFetch>> {
        self.lock().shared.get(&index).cloned()
    }

    /// Claim block `index`, waiting while someone else holds it.
    pub(super) async fn claim(&self, index: BlockIndex) -> Claim<'_> {
        loop {
            let waiting = {
                let mut states = self.lock();
                match states.claimed.get(&index) {
                    // Registered before the lock is released: the holder's
                    // notify_waiters cannot be missed.
                    Some(notify) => Arc::clone(notify).notified_owned(),
                    None => {
                        states.claimed.insert(index, Arc::new(Notify::new()));
                        return Claim { volume: self, index };
                    }
                }
            };
            waiting.await;
        }
    }

    /// Read `len` bytes at `offset` (inside the volume): first every block
    /// it touches that is not local is fetched (several at once), then the
    /// bytes are read from the target. A zero block not local reads as zeros.
    pub async fn read(&self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let started = Instant::now();
        self.counts.reads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::NBD_READS_TOTAL).increment(1);
        let segments: Vec<_> = self.segments(offset, u64::from(len)).collect();
        let missing: Vec<BlockIndex> = segments
            .iter()
            .map(|&(index, ..)| index)
            .filter(|&i| !self.is_local(i) && self.reader.snapshot().block(i).is_some())
            .collect();
        let mut fetched = HashMap::new();
        for group in missing.chunks(READ_FETCHES_INFLIGHT_MAX) {
            let blocks = join_all(group.iter().map(|&i| self.fetch_for_read(i)).collect()).await;
            for (&index, block) in group.iter().zip(blocks) {
                if let Some(bytes) = block? {
                    fetched.insert(index, bytes);
                }
            }
        }
        let mut out = vec![0u8; len as usize];
        // Runs of adjacent local blocks are one pread each.
        let mut run: Option<(u64, std::ops::Range<usize>)> = None;
        for (index, within, range) in segments {
            if let Some(bytes) = fetched.get(&index) {
                if let Some((at, r)) = run.take() {
                    self.pread(at, &mut out[r]).await?;
                }
                let within = within as usize;
                out[range.clone()].copy_from_slice(&bytes[within..within + range.len()]);
                continue;
            }
            if !self.is_local(index) {
                // A zero block: zeros (`out` holds them already).
                if let Some((at, r)) = run.take() {
                    self.pread(at, &mut out[r]).await?;
                }
                continue;
            }
            run = match run {
                Some((at, r)) if r.end == range.start => Some((at, r.start..range.end)),
                Some((at, r)) => {
                    self.pread(at, &mut out[r]).await?;
                    Some((self.layout.offset(index) + within, range))
                }
                None => Some((self.layout.offset(index) + within, range)),
            };
        }
        if let Some((at, r)) = run {
            self.pread(at, &mut out[r]).await?;
        }
        self.record_read(started.elapsed(), !missing.is_empty());
        Ok(out)
    }

    fn record_read(&self, latency: Duration, on_demand: bool) {
        let (histogram, served) = if on_demand {
            (&self.counts.read_latency_on_demand, "on_demand")
        } else {
            (&self.counts.read_latency_local, "local")
        };
        histogram.record(latency);
        metrics::histogram!(m::NBD_READ_LATENCY_SECONDS, "served" => served).record(latency.as_secs_f64());
    }

    /// Make block `index` local for a read: fetch it on demand unless
    /// someone else has (or is doing so: then wait for them). `Some`: the
    /// verified bytes fetched here, which a task of its own writes to the
    /// target under the claim while the read answers from them; `None`: the
    /// block is local, read it from the target. Registered as a read
    /// waiting for it meanwhile.
    async fn fetch_for_read(&self, index: BlockIndex) -> io::Result<Option<Bytes>> {
        let _waiting = self.wait_for(index);
        if let Some(shared) = self.shared_fetch(index)
            && let Some(block) = shared.ready_within(self.reader.demand_median()).await
        {
            // A client write may have landed meanwhile: the target has it.
            if self.is_local(index) {
                return Ok(None);
            }
            self.counts.shared_fetches.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::NBD_SHARED_FETCHES_TOTAL).increment(1);
            return Ok(Some(block.bytes().clone()));
        }
        let claim = self.claim(index).await;
        if claim.is_local() {
            return Ok(None);
        }
        let Some(volume) = self.this.upgrade() else {
            // Not built in an Arc (never, but then: write before answering).
            return self.restore_claimed(&claim).await.map(|block| Some(block.bytes().clone()));
        };
        let (block, reserve) = self.fetch_on_demand(index).await?;
        if let Some(shared) = self.shared_fetch(index) {
            // The background's request, if it has not gone out, need not.
            shared.publish(Ok(&block));
        }
        let bytes = block.bytes().clone();
        let claim = claim.into_owned(volume);
        let write = bytes.clone();
        tokio::spawn(async move {
            let volume = &claim.volume;
            match volume.pwrite(volume.layout.offset(index), write).await {
                Ok(()) => {
                    volume.lock().local.set(index);
                }
                // Not local: the next read fetches it again, the background
                // restore writes it (and meets the same error, if it lasts).
                Err(e) => tracing::warn!(block = index, error = %e, "a block read on demand could not be written"),
            }
            drop((reserve, claim));
        });
        Ok(Some(bytes))
    }

    fn wait_for(&self, index: BlockIndex) -> Waiting<'_> {
        let mut states = self.lock();
        states.waiting.entry(index).or_insert((Instant::now(), 0)).1 += 1;
        Waiting { volume: self, index }
    }

    /// The block reads have waited for the longest, if any waits.
    pub fn oldest_wait(&self) -> Option<ReadWait> {
        let states = self.lock();
        let (&block, &(since, readers)) = states.waiting.iter().min_by_key(|(_, (since, _))| *since)?;
        Some(ReadWait { block, waited: since.elapsed(), readers })
    }

    /// Write `data` at `offset` (inside the volume): the blocks it touches
    /// become the client's.
    pub async fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::NBD_WRITES_TOTAL).increment(1);
        for (index, within, range) in self.segments(offset, data.len() as u64) {
            self.write_block(index, within, &data[range]).await?;
        }
        Ok(())
    }

    /// Zeros over `len` bytes at `offset`, block by block (no payload held).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::NBD_WRITES_TOTAL).increment(1);
        for (index, within, range) in self.segments(offset, len) {
            let zeros = VerifiedBlock::zeros(range.len());
            self.write_block(index, within, zeros.bytes()).await?;
        }
        Ok(())
    }

    /// Every write acknowledged before this call is durable when it returns;
    /// while the restore runs, the blocks the client owns are then in the
    /// checkpoint as settled.
    pub async fn flush(&self) -> io::Result<()> {
        self.counts.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::NBD_FLUSHES_TOTAL).increment(1);
        let owned = std::mem::take(&mut self.lock().owned_unflushed);
        let (done, answer) = oneshot::channel();
        if self.settler.send(FlushRequest { owned: owned.clone(), done }).await.is_ok()
            && let Ok(result) = answer.await
        {
            return result.map_err(|e| {
                // Not durable: keep them for the next FLUSH.
                self.lock().owned_unflushed.extend(&owned);
                io::Error::other(e)
            });
        }
        // The settler has stopped taking FLUSHes. Once every block is
        // settled (or failed), an fdatasync is all a FLUSH needs; a restore
        // that stopped short never recorded these blocks, so the FLUSH fails.
        let mut finished = self.finished.subscribe();
        let settled_all = tokio::time::timeout(FINISH_WAIT, finished.wait_for(Option::is_some))
            .await
            .is_ok_and(|ended| ended.is_ok_and(|ended| *ended == Some(true)));
        if !settled_all {
            self.lock().owned_unflushed.extend(&owned);
            return Err(io::Error::from_raw_os_error(libc::ESHUTDOWN));
        }
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(io::Error::other)?
    }

    /// One block's share of a write, under its claim.
    async fn write_block(&self, index: BlockIndex, within: u64, data: &[u8]) -> io::Result<()> {
        let claim = self.claim(index).await;
        let whole = within == 0 && data.len() as u64 == u64::from(self.layout.len(index));
        if !whole && !claim.is_local() {
            // Read-modify-write: the rest of the block must be the snapshot's.
            self.restore_claimed(&claim).await?;
        }
        self.pwrite(self.layout.offset(index) + within, Bytes::copy_from_slice(data)).await?;
        let mut states = self.lock();
        states.local.set(index);
        if states.owned.set(index) {
            self.counts.blocks_owned.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::NBD_OWNED_BLOCKS_TOTAL).increment(1);
        }
        states.owned_unflushed.push(index);
        Ok(())
    }

    /// Fetch and verify block `index` on demand; with the demand reserve's
    /// bytes it holds, to be kept until the block is written.
    async fn fetch_on_demand(&self, index: BlockIndex) -> io::Result<(VerifiedBlock, Option<BudgetPermit>)> {
        self.counts.demand_fetches.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::NBD_DEMAND_FETCHES_TOTAL).increment(1);
        let reader = Arc::clone(&self.reader);
        let fetch = tokio_util::task::AbortOnDropHandle::new(
            self.restore_runtime.spawn(async move { reader.read_held(index, Priority::Demand).await }),
        );
        let fetched = fetch.await.map_err(|e| {
            tracing::error!(block = index, error = %e, "a fetch on demand ended abnormally");
            io::Error::from_raw_os_error(libc::EIO)
        })?;
        fetched.map_err(|failures| {
            self.counts.demand_failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::NBD_DEMAND_FAILURES_TOTAL).increment(1);
            let reason = failures.last().map(|f| format!("{}: {}", f.source, f.last_error)).unwrap_or_default();
            tracing::warn!(block = index, %reason, "a block read on demand failed on every source");
            io::Error::from_raw_os_error(libc::EIO)
        })
    }

    /// Fetch, verify and write a claimed block that is not local; then it is.
    async fn restore_claimed(&self, claim: &Claim<'_>) -> io::Result<VerifiedBlock> {
        let index = claim.index;
        let started = Instant::now();
        let (block, _reserve) = self.fetch_on_demand(index).await?;
        let fetched = started.elapsed();
        self.pwrite(self.layout.offset(index), block.bytes().clone()).await?;
        claim.set_local();
        tracing::debug!(
            block = index,
            fetch_ms = fetched.as_secs_f64() * 1e3,
            write_ms = (started.elapsed() - fetched).as_secs_f64() * 1e3,
            "block restored on demand"
        );
        Ok(block)
    }

    /// The blocks a byte range touches: (block, offset within it, range of
    /// the caller's buffer).
    fn segments(&self, offset: u64, len: u64) -> impl Iterator<Item = (BlockIndex, u64, std::ops::Range<usize>)> {
        let block_size = u64::from(self.layout.block_size_bytes());
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let index = at / block_size;
            let within = at % block_size;
            let n = (block_size - within).min(end - at);
            let range = (at - offset) as usize..(at - offset + n) as usize;
            at += n;
            Some((index, within, range))
        })
    }

    async fn pread(&self, offset: u64, dst: &mut [u8]) -> io::Result<()> {
        let file = Arc::clone(&self.file);
        let len = dst.len();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(io::Error::other)??;
        dst.copy_from_slice(&bytes);
        Ok(())
    }

    async fn pwrite(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset)).await.map_err(io::Error::other)?
    }
}

/// Run `futures` at once, in this task; their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(v) => *output = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
