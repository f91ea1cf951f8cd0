//! Plan: the work still to do, as pure computation over the snapshot.
//!
//! Blocks still to do = snapshot blocks − settled. Each distinct block object
//! becomes one [`Unit`], fetched once and written at every block that holds it
//! (identical blocks). Zero blocks are units without a fetch; on a fresh
//! target (all zero by construction) they need no write at all and settle with
//! the first fdatasync. Units come in order of their first block, so the
//! settled cursor advances from the start of the volume (of the shard's range,
//! for `--blocks`).

use std::collections::HashMap;

use crate::block::{BlockIndex, BlockRange, Compression, ContentHash};
use crate::snapshot::Snapshot;
use crate::verify::Expected;

/// Where a unit's bytes come from.
#[derive(Debug, Clone)]
pub enum UnitSource {
    /// A block object, fetched and verified.
    Object { key: String, expected: Expected },
    /// Zeros: nothing to fetch.
    Zeros { len_bytes: u32 },
}

/// One fetch (or zero fill) and the blocks it is written to.
#[derive(Debug, Clone)]
pub struct Unit {
    pub source: UnitSource,
    /// Block indexes to write, ascending; never empty.
    pub blocks: Vec<BlockIndex>,
}

impl Unit {
    /// Bytes this unit holds in flight: the object as received, plus the
    /// decompressed block when it is compressed (a raw block is written from
    /// the very buffer it arrived in), plus what its request holds besides
    /// (`request_overhead_bytes`: the sources' worst,
    /// [`FetchContext::request_overhead_bytes`](crate::fetch::FetchContext::request_overhead_bytes)).
    pub fn inflight_bytes(&self, request_overhead_bytes: u64) -> u64 {
        match &self.source {
            UnitSource::Object { expected, .. } if expected.compression.is_none() => {
                u64::from(expected.len_bytes) + request_overhead_bytes
            }
            UnitSource::Object { expected, .. } => {
                u64::from(expected.stored_len_bytes) + u64::from(expected.len_bytes) + request_overhead_bytes
            }
            UnitSource::Zeros { .. } => 0,
        }
    }

    pub fn first_block(&self) -> BlockIndex {
        self.blocks[0]
    }
}

/// The work of one restore run.
#[derive(Debug, Default)]
pub struct Plan {
    pub units: Vec<Unit>,
    /// Zero blocks on a fresh target: settled by the first fdatasync, no write.
    pub zero_free: Vec<BlockIndex>,
    /// Blocks the plan covers (units' blocks + zero_free).
    pub blocks_planned: u64,
    /// Logical bytes the plan covers.
    pub bytes_planned: u64,
    /// Blocks that are copies of another block's object (fetched once).
    pub blocks_deduplicated: u64,
}

impl Plan {
    /// Distinct block objects to fetch.
    pub fn objects(&self) -> u64 {
        self.units.iter().filter(|u| matches!(u.source, UnitSource::Object { .. })).count() as u64
    }
}

/// Build the plan of the blocks `range` (every block, or one shard's).
/// `settled(i)` tells which blocks are already done.
pub fn plan(snapshot: &dyn Snapshot, range: BlockRange, fresh: bool, settled: impl Fn(BlockIndex) -> bool) -> Plan {
    let layout = snapshot.layout();
    let mut out = Plan::default();
    let mut by_object: HashMap<(ContentHash, Compression), usize> = HashMap::new();
    let mut blocks = snapshot.blocks().skip_while(|b| b.index < range.start).peekable();
    for index in range.start..range.end {
        let block = match blocks.peek() {
            Some(b) if b.index == index => blocks.next(),
            _ => None,
        };
        if settled(index) {
            continue;
        }
        out.blocks_planned += 1;
        out.bytes_planned += u64::from(layout.len(index));
        let Some(block) = block else {
            if fresh {
                out.zero_free.push(index);
            } else {
                out.units
                    .push(Unit { source: UnitSource::Zeros { len_bytes: layout.len(index) }, blocks: vec![index] });
            }
            continue;
        };
        let expected = block.expected;
        let identity = expected.object_identity();
        match identity.and_then(|id| by_object.get(&id)) {
            Some(&u) => {
                out.units[u].blocks.push(index);
                out.blocks_deduplicated += 1;
            }
            None => {
                if let Some(id) = identity {
                    by_object.insert(id, out.units.len());
                }
                let key = snapshot.object_key(&block);
                out.units.push(Unit { source: UnitSource::Object { key, expected }, blocks: vec![index] });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::HashAlgorithm;
    use crate::verify::HashIn;

    fn object(compression: Compression, stored_len_bytes: u32, len_bytes: u32) -> Unit {
        let expected = Expected {
            hash: ContentHash([0; 32]),
            algorithm: HashAlgorithm::Blake3,
            compression,
            stored_len_bytes,
            len_bytes,
            hash_in: HashIn::Snapshot,
        };
        Unit { source: UnitSource::Object { key: "k".into(), expected }, blocks: vec![0] }
    }

    #[test]
    fn a_fetch_charges_its_bytes_and_its_request() {
        use crate::fetch::budget::REQUEST_OVERHEAD_BYTES as HYPER;
        use crate::store::s3::REQUEST_OVERHEAD_BYTES as S3;
        assert_eq!(object(Compression::None, 256 << 10, 256 << 10).inflight_bytes(HYPER), (256 << 10) + HYPER);
        assert_eq!(object(Compression::Zstd, 100, 1 << 20).inflight_bytes(S3), 100 + (1 << 20) + S3);
        let zeros = Unit { source: UnitSource::Zeros { len_bytes: 1 << 20 }, blocks: vec![0] };
        assert_eq!(zeros.inflight_bytes(HYPER), 0, "zeros fetch nothing");
        // A 128 MiB budget admits 170 fetches of 256 KiB through hyper, not
        // 512; 409 through the S3 store's own GET.
        assert_eq!((128u64 << 20) / object(Compression::None, 256 << 10, 256 << 10).inflight_bytes(HYPER), 170);
        assert_eq!((128u64 << 20) / object(Compression::None, 256 << 10, 256 << 10).inflight_bytes(S3), 409);
    }
}
