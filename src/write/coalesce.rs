//! Adjacent writes merged into one vectored write.
//!
//! Why: on a virtual disk every write request costs a notification of the
//! device (a VM exit) and a completion interrupt, whatever its size, and on a
//! filesystem an allocating `O_DIRECT` write is handed to a kernel worker
//! thread one request at a time. Blocks of 256 KiB are four times the
//! requests of 1 MiB blocks for the same bytes: in a profile of a 256 KiB
//! restore those per-request costs were most of the kernel time the larger
//! blocks do not pay. A restore's blocks mostly arrive in volume order, so the
//! writes queued at one moment often sit end to end; and a small one that
//! arrives alone is held a few milliseconds for its neighbours ([`Held`]).
//!
//! In: the write requests the ring thread found queued together, and those
//! it held. Out: groups of requests, each written with one `writev`
//! ([`group_adjacent`]), and for a group the result of each of its blocks
//! ([`write_group`]). Only writes that may go direct are merged (an aligned
//! buffer, length and offset, see `write.rs`), and a group is at most
//! [`GROUP_BYTES_MAX`] and [`GROUP_BLOCKS_MAX`] blocks. Only writes smaller
//! than [`RUN_BYTES`] are held, each at most [`HOLD_MAX`].
//!
//! Failure: a block is done only when the vectored write covered every byte
//! of it. A short vectored write leaves the blocks it did not cover whole to
//! the single-block path (which resubmits short writes, see `progress.rs`);
//! a failed one (an error, `EINVAL` from a device that refuses the vector)
//! sends every block of the group down that path, so each gets its own
//! result, exactly as if it had never been merged. Writing a block's bytes
//! again at its offset is harmless: they are the same bytes.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes one merged write carries at most: the block layer splits larger
/// requests anyway, and a block's reply waits for its whole group.
pub(super) const GROUP_BYTES_MAX: usize = 4 << 20;
/// Blocks one merged write carries at most (well under `IOV_MAX`, 1024).
pub(super) const GROUP_BLOCKS_MAX: usize = 64;

/// Group `writes` for submission: runs of mergeable writes that sit end to
/// end (by offset), each at most [`GROUP_BYTES_MAX`] and
/// [`GROUP_BLOCKS_MAX`]; every other write alone. `span` gives a write's
/// offset and length when it may be merged, `None` when it must go alone.
pub(super) fn group_adjacent<W>(writes: Vec<W>, span: impl Fn(&W) -> Option<(u64, usize)>) -> Vec<Vec<W>> {
    let mut groups = Vec::new();
    let mut mergeable = Vec::new();
    for write in writes {
        match span(&write) {
            Some((offset, len)) => mergeable.push((offset, len, write)),
            None => groups.push(vec![write]),
        }
    }
    mergeable.sort_by_key(|&(offset, _, _)| offset);
    let mut run: Vec<W> = Vec::new();
    let mut run_end = 0;
    let mut run_bytes = 0;
    for (offset, len, write) in mergeable {
        let extends =
            !run.is_empty() && offset == run_end && run_bytes + len <= GROUP_BYTES_MAX && run.len() < GROUP_BLOCKS_MAX;
        if !extends && !run.is_empty() {
            groups.push(std::mem::take(&mut run));
            run_bytes = 0;
        }
        run.push(write);
        run_end = offset + len as u64;
        run_bytes += len;
    }
    if !run.is_empty() {
        groups.push(run);
    }
    groups
}

/// Held writes are released once they sit end to end over this many bytes:
/// a request this large costs a disk little more than per-request overhead
/// against a larger one (the 1 MiB blocks' writes of the benchmark).
pub(super) const RUN_BYTES: usize = 1 << 20;
/// A held write goes, whatever else, this long after it arrived. Blocks
/// fetched in volume order arrive a fraction of a millisecond apart; a
/// neighbour that is not here by then is slow (retried, from a fallback) or
/// will not come (a hole, a block settled before a resume).
pub(super) const HOLD_MAX: Duration = Duration::from_millis(3);

/// Small direct writes held back until their neighbours arrive, so they go
/// to the disk as one request.
///
/// Why: blocks smaller than [`RUN_BYTES`] that arrive one at a time each
/// went to the disk alone, and a virtual disk absorbed 256 KiB requests
/// 10-17 % more slowly than 1 MiB ones (fio, same bytes). Blocks come back
/// from the store a fraction of a millisecond apart and in about volume
/// order, so a few milliseconds' wait finds most neighbours: on a 2 GiB
/// restore of 256 KiB blocks on such a disk, 80-86 % of the blocks went
/// merged (26-32 % without holding), for 4-8 % less CPU and a fifth fewer
/// context switches (the time was the disk's either way). Holding only
/// while the ring had 4 writes in flight merged 45-57 %: the disk was
/// seldom that far behind. What a held write costs is its wait, at most
/// [`HOLD_MAX`], and its queue slot: past half the queue
/// held, every held write goes.
///
/// In: writes with their offset and length. Out: writes to submit, in offset
/// order, for [`group_adjacent`] to merge: each run of held writes end to end
/// once it reaches [`RUN_BYTES`] ([`take_runs`](Self::take_runs)), and every
/// held write once half the queue is held, the oldest has waited
/// [`HOLD_MAX`], or the queue closes ([`take_all`](Self::take_all)). Writes do not overlap (a
/// restore writes each block once), so one offset holds at most one write; a
/// second at the same offset releases the first.
pub(super) struct Held<W> {
    /// By offset: the write's length, when it arrived, and the write.
    writes: BTreeMap<u64, (usize, Instant, W)>,
    /// How long a write is held at most: [`HOLD_MAX`] (tests lengthen it).
    hold_max: Duration,
}

impl<W> Held<W> {
    pub(super) fn new(hold_max: Duration) -> Self {
        Held { writes: BTreeMap::new(), hold_max }
    }

    pub(super) fn len(&self) -> usize {
        self.writes.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Hold `write` (at `offset`, `len` bytes) from `now`. Returns a write it
    /// displaced at the same offset, to submit as it is.
    pub(super) fn hold(&mut self, offset: u64, len: usize, write: W, now: Instant) -> Option<W> {
        self.writes.insert(offset, (len, now, write)).map(|(_, _, displaced)| displaced)
    }

    /// When the oldest held write has waited its longest.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.writes.values().map(|&(_, arrived, _)| arrived + self.hold_max).min()
    }

    /// The held writes of every run end to end that reached [`RUN_BYTES`],
    /// in offset order; shorter runs stay held.
    pub(super) fn take_runs(&mut self) -> Vec<W> {
        let mut full = Vec::new();
        let mut run: Vec<u64> = Vec::new();
        let mut run_end = 0;
        let mut run_bytes = 0;
        for (&offset, &(len, _, _)) in &self.writes {
            if run.is_empty() || offset != run_end {
                if run_bytes >= RUN_BYTES {
                    full.append(&mut run);
                }
                run.clear();
                run_bytes = 0;
            }
            run.push(offset);
            run_end = offset + len as u64;
            run_bytes += len;
        }
        if run_bytes >= RUN_BYTES {
            full.append(&mut run);
        }
        full.into_iter().filter_map(|offset| self.writes.remove(&offset)).map(|(_, _, write)| write).collect()
    }

    /// Every held write, in offset order.
    pub(super) fn take_all(&mut self) -> Vec<W> {
        std::mem::take(&mut self.writes).into_values().map(|(_, _, write)| write).collect()
    }
}

/// Write the blocks of one group, `(offset, bytes)` in offset order and end
/// to end: one `vectored` write of them all, then `single` (a whole-block
/// write that finishes short writes) for every block the vectored write did
/// not cover. Returns each block's result, in the group's order, and how
/// many blocks the vectored write covered.
pub(super) async fn write_group<V, VFut, S, SFut>(
    blocks: &[(u64, Bytes)],
    vectored: V,
    mut single: S,
) -> (Vec<io::Result<()>>, usize)
where
    V: FnOnce(Vec<Bytes>, u64) -> VFut,
    VFut: Future<Output = io::Result<usize>>,
    S: FnMut(Bytes, u64) -> SFut,
    SFut: Future<Output = io::Result<()>>,
{
    let Some(&(first_offset, _)) = blocks.first() else {
        return (Vec::new(), 0);
    };
    let written = vectored(blocks.iter().map(|(_, bytes)| bytes.clone()).collect(), first_offset).await.unwrap_or(0);
    let mut results = Vec::with_capacity(blocks.len());
    let mut covered = 0;
    let mut end = 0;
    for (offset, bytes) in blocks {
        end += bytes.len();
        if end <= written {
            covered += 1;
            results.push(Ok(()));
        } else {
            results.push(single(bytes.clone(), *offset).await);
        }
    }
    (results, covered)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test stops loudly at an unexpected error
mod tests {
    use std::cell::RefCell;

    use super::*;

    const K: u64 = 1024;

    fn spans(groups: &[Vec<(u64, usize, bool)>]) -> Vec<Vec<u64>> {
        groups.iter().map(|g| g.iter().map(|&(offset, _, _)| offset).collect()).collect()
    }

    #[test]
    fn end_to_end_writes_group_in_offset_order_and_the_rest_go_alone() {
        // (offset, len, mergeable), queued out of order.
        let writes = vec![
            (512 * K, 256 * 1024, true),
            (0, 256 * 1024, true),
            (256 * K, 256 * 1024, true),
            (2048 * K, 256 * 1024, true), // a gap before it
            (768 * K, 4096, false),       // not mergeable (unaligned, say)
            (2304 * K, 256 * 1024, true),
        ];
        let groups = group_adjacent(writes, |&(offset, len, ok)| ok.then_some((offset, len)));
        assert_eq!(spans(&groups), vec![vec![768 * K], vec![0, 256 * K, 512 * K], vec![2048 * K, 2304 * K]]);
    }

    #[test]
    fn a_group_stops_at_its_byte_and_block_bounds() {
        let mib = 1usize << 20;
        let big: Vec<_> = (0..6u64).map(|i| (i * mib as u64, mib, true)).collect();
        let groups = group_adjacent(big, |&(offset, len, ok)| ok.then_some((offset, len)));
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 2], "4 MiB per group");

        let small: Vec<_> = (0..GROUP_BLOCKS_MAX as u64 + 3).map(|i| (i * 4096, 4096, true)).collect();
        let groups = group_adjacent(small, |&(offset, len, ok)| ok.then_some((offset, len)));
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![GROUP_BLOCKS_MAX, 3]);
    }

    #[test]
    fn held_writes_go_once_a_run_end_to_end_reaches_run_bytes() {
        let quarter = RUN_BYTES / 4;
        let at = |i: u64| i * quarter as u64;
        let now = Instant::now();
        let mut held = Held::new(HOLD_MAX);
        assert_eq!(held.deadline(), None);
        // Blocks 1, 0, 2 of the first run and 5 of the next: no run is
        // whole, nothing goes.
        for i in [1, 0, 2, 5] {
            assert!(held.hold(at(i), quarter, i, now + Duration::from_micros(i)).is_none());
        }
        assert!(held.take_runs().is_empty());
        assert_eq!(held.len(), 4);
        assert_eq!(held.deadline(), Some(now + HOLD_MAX), "the oldest held write's");
        // Block 3 completes blocks 0-3: they go, in offset order; 5 stays.
        held.hold(at(3), quarter, 3, now);
        assert_eq!(held.take_runs(), vec![0, 1, 2, 3]);
        assert_eq!(held.len(), 1);
        assert_eq!(held.deadline(), Some(now + Duration::from_micros(5) + HOLD_MAX));
        // A run longer than RUN_BYTES goes whole; a gap ends a run.
        for i in [6, 7, 8, 10, 11] {
            held.hold(at(i), quarter, i, now);
        }
        assert_eq!(held.take_runs(), vec![5, 6, 7, 8]);
        assert_eq!(held.take_all(), vec![10, 11]);
        assert!(held.is_empty());
        assert_eq!(held.deadline(), None);
    }

    #[test]
    fn a_second_write_at_a_held_offset_displaces_the_first() {
        let mut held = Held::new(HOLD_MAX);
        let now = Instant::now();
        assert!(held.hold(0, 4096, "first", now).is_none());
        assert_eq!(held.hold(0, 4096, "second", now), Some("first"));
        assert_eq!(held.take_all(), vec!["second"]);
    }

    /// A file as a byte vector: the vectored write takes at most `take`
    /// bytes (or fails), the single write takes everything.
    struct Fake {
        data: RefCell<Vec<u8>>,
        singles: RefCell<Vec<u64>>,
    }

    impl Fake {
        fn new() -> Self {
            Fake { data: RefCell::new(vec![0; 64 * 1024]), singles: RefCell::new(Vec::new()) }
        }

        fn put(&self, offset: u64, bytes: &[u8]) {
            let at = offset as usize;
            self.data.borrow_mut()[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }

    fn blocks() -> Vec<(u64, Bytes)> {
        (0..4u64).map(|i| (8192 + i * 4096, Bytes::from(vec![i as u8 + 1; 4096]))).collect()
    }

    async fn run(fake: &Fake, take: io::Result<usize>) -> (Vec<io::Result<()>>, usize) {
        let blocks = blocks();
        let vectored = |bufs: Vec<Bytes>, offset: u64| {
            let result = match &take {
                Ok(n) => {
                    let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                    let n = (*n).min(all.len());
                    fake.put(offset, &all[..n]);
                    Ok(n)
                }
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            async move { result }
        };
        let single = |bytes: Bytes, offset: u64| {
            fake.singles.borrow_mut().push(offset);
            fake.put(offset, &bytes);
            async { Ok(()) }
        };
        write_group(&blocks, vectored, single).await
    }

    fn landed(fake: &Fake) -> bool {
        blocks().iter().all(|(offset, bytes)| {
            let at = *offset as usize;
            fake.data.borrow()[at..at + bytes.len()] == bytes[..]
        })
    }

    #[tokio::test]
    async fn a_whole_vectored_write_finishes_every_block_at_once() {
        let fake = Fake::new();
        let (results, covered) = run(&fake, Ok(4 * 4096)).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(covered, 4);
        assert!(fake.singles.borrow().is_empty());
        assert!(landed(&fake));
    }

    #[tokio::test]
    async fn a_short_vectored_write_leaves_the_blocks_it_did_not_cover_to_single_writes() {
        let fake = Fake::new();
        // Two blocks and half of the third.
        let (results, covered) = run(&fake, Ok(2 * 4096 + 2048)).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(covered, 2);
        assert_eq!(*fake.singles.borrow(), vec![8192 + 2 * 4096, 8192 + 3 * 4096]);
        assert!(landed(&fake));
    }

    #[tokio::test]
    async fn a_failed_vectored_write_writes_every_block_alone_with_its_own_result() {
        let fake = Fake::new();
        let (results, covered) = run(&fake, Err(io::Error::from_raw_os_error(libc::EINVAL))).await;
        assert_eq!(covered, 0);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(fake.singles.borrow().len(), 4);
        assert!(landed(&fake));

        // A single write's error reaches that block only.
        let blocks = blocks();
        let failing = blocks[1].0;
        let (results, _) = write_group(
            &blocks,
            |_, _| async { Err(io::Error::from_raw_os_error(libc::EIO)) },
            |_, offset| async move {
                if offset == failing { Err(io::Error::from_raw_os_error(libc::ENOSPC)) } else { Ok(()) }
            },
        )
        .await;
        let failed: Vec<bool> = results.iter().map(Result::is_err).collect();
        assert_eq!(failed, vec![false, true, false, false]);
    }
}
