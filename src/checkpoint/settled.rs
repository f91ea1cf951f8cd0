//! Which blocks are settled, which failed, and the ledger over both.
//!
//! [`SettledSet`] is a cursor plus the settled ranges above it. Blocks settle
//! out of order (many fetches in flight), but the plan hands them out in index
//! order, so the gaps above the cursor are the blocks still in flight plus the
//! blocks that failed: the range map stays small in a restore, and its memory
//! is proportional to that fragmentation, never to the block count. (A bitmap
//! of the whole layout would cost `block_count / 8` bytes: 32 GiB for the
//! largest layout [`BlockLayout`](crate::block::BlockLayout) accepts.)
//!
//! [`FailedSet`] holds the blocks that failed on every source with a short
//! reason each, bounded by [`FAILURE_REASON_MAX_BYTES`]. Pure data, no I/O.

use std::collections::BTreeMap;

use crate::block::{BlockIndex, BlockRange};

/// Longest failure reason kept per block. Reasons are for an operator reading a
/// damage report; a bound keeps a million failed blocks from holding a million
/// long error chains, and keeps the checkpoint file small.
pub const FAILURE_REASON_MAX_BYTES: usize = 256;

/// The settled blocks of a range of a layout (`start..end`; every block of a
/// whole-volume restore, `0..block_count`): every block of the range below
/// [`cursor`](Self::cursor) is settled; above it, settled blocks are kept as
/// disjoint, non-adjacent ranges. Blocks outside the range belong to no one
/// here: they are never settled, failed or pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledSet {
    /// The blocks this set covers.
    blocks: BlockRange,
    /// First block of the range that is not settled. Only moves forward.
    cursor: BlockIndex,
    /// Settled ranges above the cursor, `start -> end` (end exclusive), with
    /// `cursor < start < end <= blocks.end` and a gap of at least one block
    /// between neighbours: a range touching the cursor is folded into it, and
    /// touching ranges are merged.
    ranges: BTreeMap<BlockIndex, BlockIndex>,
    /// `cursor - blocks.start + sum(end - start)`, kept so counting is O(1).
    settled_count: u64,
}

impl SettledSet {
    /// Nothing settled yet, of the blocks `0..block_count`.
    pub fn new(block_count: u64) -> Self {
        Self::over(BlockRange { start: 0, end: block_count })
    }

    /// Nothing settled yet, of the blocks of `blocks`.
    pub fn over(blocks: BlockRange) -> Self {
        Self { blocks, cursor: blocks.start, ranges: BTreeMap::new(), settled_count: 0 }
    }

    /// How many blocks the set covers.
    pub fn block_count(&self) -> u64 {
        self.blocks.len()
    }

    /// The blocks the set covers.
    pub fn blocks(&self) -> BlockRange {
        self.blocks
    }

    /// The first block of the range that is not settled: every block of the
    /// range below it is settled. Equals the range's end once everything is
    /// settled.
    pub fn cursor(&self) -> BlockIndex {
        self.cursor
    }

    pub fn settled_count(&self) -> u64 {
        self.settled_count
    }

    pub fn is_complete(&self) -> bool {
        self.cursor == self.blocks.end
    }

    pub fn is_settled(&self, index: BlockIndex) -> bool {
        if index < self.blocks.start {
            return false;
        }
        if index < self.cursor {
            return true;
        }
        match self.ranges.range(..=index).next_back() {
            Some((_, &end)) => index < end,
            None => false,
        }
    }

    /// Mark `index` settled. Idempotent: returns whether it was newly settled.
    ///
    /// Call this only once the block's write completed AND a later fdatasync
    /// of the target returned success (invariant 3): this set is what the
    /// checkpoint names as durable.
    ///
    /// # Panics
    /// If `index` is outside the range: that is a bug in the caller, and
    /// settling it would corrupt the ledger.
    pub fn settle(&mut self, index: BlockIndex) -> bool {
        assert!(self.blocks.contains(index), "settling block {index} outside a layout's blocks {}", self.blocks);
        if self.is_settled(index) {
            return false;
        }
        let cursor_before = self.cursor;
        if index == self.cursor {
            self.cursor += 1;
            // The range right above may now touch the cursor: fold it in.
            if let Some(end) = self.ranges.remove(&self.cursor) {
                self.cursor = end;
            }
        } else {
            self.insert_above_cursor(index);
        }
        self.settled_count += 1;
        debug_assert!(self.cursor >= cursor_before, "the cursor moved backwards");
        debug_assert!(self.settled_count <= self.blocks.len());
        debug_assert!(self.ranges.keys().next().is_none_or(|&start| start > self.cursor));
        true
    }

    /// Settle every index of `indexes`; returns how many were newly settled.
    pub fn settle_many(&mut self, indexes: impl IntoIterator<Item = BlockIndex>) -> u64 {
        indexes.into_iter().map(|index| u64::from(self.settle(index))).sum()
    }

    /// The blocks not settled, in index order. Whole settled ranges are
    /// skipped in one step.
    pub fn unsettled(&self) -> impl Iterator<Item = BlockIndex> + '_ {
        Unsettled { next: self.cursor, block_count: self.blocks.end, ranges: self.ranges.iter().peekable() }
    }

    /// The settled ranges above the cursor, `(start, end)` with `end`
    /// exclusive, in index order.
    pub fn ranges_above_cursor(&self) -> impl Iterator<Item = (BlockIndex, BlockIndex)> + '_ {
        self.ranges.iter().map(|(&start, &end)| (start, end))
    }

    /// How many ranges are kept above the cursor (a measure of fragmentation).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Counts of settled, failed and pending blocks: for tests and reports to
    /// check invariant 1.
    pub fn ledger(&self, failed: &FailedSet) -> Ledger {
        let stray_failed =
            failed.iter().filter(|&(index, _)| !self.blocks.contains(index) || self.is_settled(index)).count() as u64;
        let failed_count = failed.len() as u64 - stray_failed;
        Ledger {
            block_count: self.blocks.len(),
            settled: self.settled_count,
            failed: failed_count,
            pending: self.blocks.len() - self.settled_count - failed_count,
            stray_failed,
        }
    }

    /// Build a set from a cursor and ranges read from a checkpoint, checking
    /// every structural rule. Never panics; the error says what is wrong.
    pub(crate) fn from_parts(
        blocks: BlockRange,
        cursor: BlockIndex,
        ranges: impl IntoIterator<Item = Result<(BlockIndex, BlockIndex), String>>,
    ) -> Result<Self, String> {
        if !(blocks.start..=blocks.end).contains(&cursor) {
            return Err(format!("cursor {cursor} is outside the blocks {blocks} of the checkpoint"));
        }
        let block_count = blocks.end;
        let mut set = Self { blocks, cursor, ranges: BTreeMap::new(), settled_count: cursor - blocks.start };
        let mut previous_end = cursor;
        for range in ranges {
            let (start, end) = range?;
            if start <= previous_end {
                return Err(format!(
                    "settled range {start}..{end} touches or overlaps the one before it (ending at {previous_end})"
                ));
            }
            if end <= start || end > block_count {
                return Err(format!("settled range {start}..{end} is empty or outside {block_count} blocks"));
            }
            set.ranges.insert(start, end);
            set.settled_count += end - start;
            previous_end = end;
        }
        Ok(set)
    }

    /// Check every structural rule; `Err` names the first one broken. Used by
    /// tests and debug checks.
    pub fn check_invariants(&self) -> Result<(), String> {
        let rebuilt = Self::from_parts(self.blocks, self.cursor, self.ranges_above_cursor().map(Ok))?;
        if rebuilt.settled_count != self.settled_count {
            return Err(format!(
                "settled count {} disagrees with the ranges ({})",
                self.settled_count, rebuilt.settled_count
            ));
        }
        Ok(())
    }

    fn insert_above_cursor(&mut self, index: BlockIndex) {
        debug_assert!(index > self.cursor);
        // Extend the range ending right below `index`, or start a new one.
        let start = match self.ranges.range_mut(..index).next_back() {
            Some((&start, end)) if *end == index => {
                *end = index + 1;
                start
            }
            _ => {
                self.ranges.insert(index, index + 1);
                index
            }
        };
        // Merge with the range starting right above, if any.
        if let Some(next_end) = self.ranges.remove(&(index + 1)) {
            self.ranges.insert(start, next_end);
        }
    }
}

struct Unsettled<'a> {
    next: BlockIndex,
    block_count: u64,
    ranges: std::iter::Peekable<std::collections::btree_map::Iter<'a, BlockIndex, BlockIndex>>,
}

impl Iterator for Unsettled<'_> {
    type Item = BlockIndex;

    fn next(&mut self) -> Option<BlockIndex> {
        while let Some(&(&start, &end)) = self.ranges.peek() {
            if self.next < start {
                break;
            }
            self.next = self.next.max(end);
            self.ranges.next();
        }
        if self.next >= self.block_count {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(index)
    }
}

/// Counts over a layout's blocks. Invariant 1 holds when
/// [`is_consistent`](Self::is_consistent): settled, failed and pending are
/// disjoint and add up to the block count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    pub block_count: u64,
    pub settled: u64,
    /// Failed blocks that are not settled.
    pub failed: u64,
    /// Neither settled nor failed.
    pub pending: u64,
    /// Failed entries that are also settled or outside the layout: a broken
    /// invariant when not zero.
    pub stray_failed: u64,
}

impl Ledger {
    pub fn is_consistent(&self) -> bool {
        self.stray_failed == 0 && self.settled + self.failed + self.pending == self.block_count
    }
}

/// Blocks that failed on every source, with why. A failed block may settle on
/// a later run; settling it through [`Checkpoint`](super::Checkpoint) removes
/// it from here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedSet {
    reasons: BTreeMap<BlockIndex, String>,
}

impl FailedSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `index` as failed; a later failure of the same block replaces its
    /// reason. The reason is cut to [`FAILURE_REASON_MAX_BYTES`] on a character
    /// boundary.
    pub fn fail(&mut self, index: BlockIndex, reason: &str) {
        self.reasons.insert(index, bounded_reason(reason).to_owned());
    }

    /// Forget `index` (it settled on a rerun); returns whether it was failed.
    pub fn remove(&mut self, index: BlockIndex) -> bool {
        self.reasons.remove(&index).is_some()
    }

    pub fn contains(&self, index: BlockIndex) -> bool {
        self.reasons.contains_key(&index)
    }

    pub fn reason(&self, index: BlockIndex) -> Option<&str> {
        self.reasons.get(&index).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.reasons.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reasons.is_empty()
    }

    /// Failed blocks and their reasons, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (BlockIndex, &str)> + '_ {
        self.reasons.iter().map(|(&index, reason)| (index, reason.as_str()))
    }
}

/// `reason` cut to at most [`FAILURE_REASON_MAX_BYTES`], on a char boundary.
pub(crate) fn bounded_reason(reason: &str) -> &str {
    if reason.len() <= FAILURE_REASON_MAX_BYTES {
        return reason;
    }
    let mut end = FAILURE_REASON_MAX_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_settling_moves_the_cursor() {
        let mut set = SettledSet::new(4);
        assert_eq!(set.cursor(), 0);
        assert!(set.settle(0));
        assert!(!set.settle(0), "settling twice is a no-op");
        assert_eq!(set.cursor(), 1);
        set.settle_many([1, 2, 3]);
        assert!(set.is_complete());
        assert_eq!(set.unsettled().count(), 0);
    }

    #[test]
    fn out_of_order_settling_keeps_ranges_and_folds_them_into_the_cursor() {
        let mut set = SettledSet::new(10);
        set.settle_many([5, 3, 7, 6]);
        assert_eq!(set.cursor(), 0);
        assert_eq!(set.ranges_above_cursor().collect::<Vec<_>>(), vec![(3, 4), (5, 8)]);
        set.settle(4);
        assert_eq!(set.ranges_above_cursor().collect::<Vec<_>>(), vec![(3, 8)]);
        set.settle_many([0, 1]);
        assert_eq!(set.cursor(), 2);
        set.settle(2);
        assert_eq!(set.cursor(), 8, "the range above folds into the cursor");
        assert_eq!(set.range_count(), 0);
        assert_eq!(set.unsettled().collect::<Vec<_>>(), vec![8, 9]);
        set.check_invariants().unwrap();
    }

    #[test]
    fn a_range_settles_only_its_blocks() {
        let mut set = SettledSet::over(BlockRange { start: 10, end: 20 });
        assert_eq!((set.cursor(), set.block_count()), (10, 10));
        set.settle_many([12, 10, 11]);
        assert_eq!(set.cursor(), 13);
        assert!(!set.is_settled(5), "below the range is not settled");
        assert!(set.is_settled(10) && set.is_settled(12) && !set.is_settled(13));
        assert_eq!(set.unsettled().collect::<Vec<_>>(), (13..20).collect::<Vec<_>>());
        let mut failed = FailedSet::new();
        failed.fail(15, "404");
        assert_eq!(set.ledger(&failed), Ledger { block_count: 10, settled: 3, failed: 1, pending: 6, stray_failed: 0 });
        failed.fail(3, "outside the range");
        assert_eq!(set.ledger(&failed).stray_failed, 1);
        set.settle_many(13..20);
        assert!(set.is_complete());
        set.check_invariants().unwrap();
        assert!(std::panic::catch_unwind(move || set.clone().settle(9)).is_err(), "below the range");
    }

    #[test]
    #[should_panic(expected = "outside a layout")]
    fn settling_outside_the_layout_is_a_bug() {
        SettledSet::new(3).settle(3);
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let mut failed = FailedSet::new();
        let reason = "é".repeat(FAILURE_REASON_MAX_BYTES); // 2 bytes each
        failed.fail(1, &reason);
        let kept = failed.reason(1).unwrap();
        assert!(kept.len() <= FAILURE_REASON_MAX_BYTES);
        assert!(reason.starts_with(kept) && !kept.is_empty());
    }

    #[test]
    fn ledger_counts_stray_failed_blocks() {
        let mut set = SettledSet::new(5);
        let mut failed = FailedSet::new();
        set.settle_many([0, 3]);
        failed.fail(1, "404 on every source");
        assert_eq!(set.ledger(&failed), Ledger { block_count: 5, settled: 2, failed: 1, pending: 2, stray_failed: 0 });
        failed.fail(3, "settled and failed: a bug");
        let ledger = set.ledger(&failed);
        assert_eq!(ledger.stray_failed, 1);
        assert!(!ledger.is_consistent());
    }

    /// The memory claim of this module: with blocks handed out in index order
    /// and at most `window` in flight, completing in any order, the ranges
    /// above the cursor never outnumber the blocks in flight.
    #[test]
    fn fragmentation_is_bounded_by_the_blocks_in_flight() {
        use rand::{Rng, SeedableRng};
        let (block_count, window) = (65_536u64, 64usize);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut set = SettledSet::new(block_count);
        let mut in_flight: Vec<u64> = Vec::with_capacity(window);
        let mut next = 0;
        let mut range_count_max = 0;
        while !set.is_complete() {
            while in_flight.len() < window && next < block_count {
                in_flight.push(next);
                next += 1;
            }
            let done = in_flight.swap_remove(rng.random_range(0..in_flight.len()));
            assert!(set.settle(done));
            range_count_max = range_count_max.max(set.range_count());
        }
        assert!(range_count_max <= window, "{range_count_max} ranges for {window} blocks in flight");
        assert!(range_count_max > 1, "the test did complete out of order");
        assert_eq!(set.settled_count(), block_count);
    }

    proptest! {
        /// Whatever the settle order: cursor == first unsettled, the cursor
        /// never moves back, unsettled() is the exact complement, counts add up.
        #[test]
        fn settle_in_any_order(
            block_count in 1u64..300,
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..400),
        ) {
            let mut set = SettledSet::new(block_count);
            let mut model = BTreeSet::new();
            for pick in picks {
                let index = pick.index(block_count as usize) as u64;
                let cursor_before = set.cursor();
                prop_assert_eq!(set.settle(index), model.insert(index));
                prop_assert!(set.cursor() >= cursor_before);
                let first_unsettled = (0..block_count).find(|i| !model.contains(i)).unwrap_or(block_count);
                prop_assert_eq!(set.cursor(), first_unsettled);
            }
            set.check_invariants().map_err(TestCaseError::fail)?;
            prop_assert_eq!(set.settled_count(), model.len() as u64);
            let unsettled: Vec<u64> = set.unsettled().collect();
            let expected: Vec<u64> = (0..block_count).filter(|i| !model.contains(i)).collect();
            prop_assert_eq!(&unsettled, &expected);
            for index in 0..block_count {
                prop_assert_eq!(set.is_settled(index), model.contains(&index));
            }
            let ledger = set.ledger(&FailedSet::new());
            prop_assert!(ledger.is_consistent());
            prop_assert_eq!(ledger.pending, unsettled.len() as u64);
            prop_assert_eq!(set.is_complete(), unsettled.is_empty());
        }
    }
}
