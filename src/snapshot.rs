//! Snapshots: what is restored.
//!
//! [`Snapshot`] is what a restore needs from one, whoever made it: its
//! identity (a digest: a checkpoint belongs to exactly one snapshot), its
//! layout (block size, volume size) and, per stored block, its index, the key
//! of its object and what that object must decode and hash to
//! ([`Expected`]: stored length, codec, content hash and its algorithm). Blocks
//! a snapshot does not list are zero.
//!
//! How one object is decoded and verified is data, not code: the codec and
//! the hash algorithm are values of [`Expected`], and [`crate::verify`], the
//! only maker of a [`VerifiedBlock`](crate::verify::VerifiedBlock), applies
//! them. A new kind of snapshot (an EBS snapshot, a Longhorn backup) says
//! where its blocks are and what they must be; it never writes bytes itself.
//!
//! The rehydrate manifest ([`Manifest`]) is one implementation; [`create()`]
//! makes one from a file or block device. A Longhorn backup
//! ([`longhorn::LonghornBackup`]) is another.

mod create;
pub mod ebs;
pub mod longhorn;

use crate::block::{BlockIndex, BlockLayout, block_key};
use crate::manifest::{BlockEntry, Manifest, ManifestDigest};
use crate::verify::Expected;

pub use create::{CreateError, CreateReport, CreateSpec, create, default_name};

/// What a restore needs from a snapshot.
pub trait Snapshot: Send + Sync + std::fmt::Debug {
    /// The snapshot's identity. A checkpoint names it, and is refused for any
    /// other snapshot (`docs/architecture.md`, invariant 4).
    fn digest(&self) -> ManifestDigest;

    /// Block size and volume size.
    fn layout(&self) -> BlockLayout;

    /// The stored (non-zero) blocks, in ascending index order.
    fn blocks(&self) -> Box<dyn Iterator<Item = SnapshotBlock> + Send + '_>;

    /// How many blocks are stored (the rest are zero).
    fn blocks_stored(&self) -> u64;

    /// The stored block at `index`; `None` when that block is zero.
    fn block(&self, index: BlockIndex) -> Option<SnapshotBlock>;

    /// The key of a block's object, under the snapshot's store.
    fn object_key(&self, block: &SnapshotBlock) -> String;

    /// Bytes of the stored blocks once decoded: what a sparse target needs.
    fn block_bytes_total(&self) -> u64 {
        self.blocks().map(|b| u64::from(b.expected.len_bytes)).sum()
    }
}

/// One stored block of a snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotBlock {
    pub index: BlockIndex,
    /// What its object must decode and hash to.
    pub expected: Expected,
}

impl Manifest {
    fn snapshot_block(&self, entry: &BlockEntry) -> SnapshotBlock {
        SnapshotBlock {
            index: entry.index,
            expected: Expected {
                hash: entry.hash,
                algorithm: self.hash_algorithm,
                compression: entry.compression,
                stored_len_bytes: entry.stored_len_bytes,
                len_bytes: self.layout.len(entry.index),
                hash_in: crate::verify::HashIn::Snapshot,
            },
        }
    }
}

/// The rehydrate manifest: content-addressed objects under the manifest's
/// store, one hash algorithm for the snapshot, a codec per object.
impl Snapshot for Manifest {
    fn digest(&self) -> ManifestDigest {
        Manifest::digest(self)
    }

    fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn blocks(&self) -> Box<dyn Iterator<Item = SnapshotBlock> + Send + '_> {
        Box::new(self.entries().iter().map(|e| self.snapshot_block(e)))
    }

    fn blocks_stored(&self) -> u64 {
        self.entries().len() as u64
    }

    fn block(&self, index: BlockIndex) -> Option<SnapshotBlock> {
        self.entry(index).map(|e| self.snapshot_block(e))
    }

    fn object_key(&self, block: &SnapshotBlock) -> String {
        block_key(&block.expected.hash, block.expected.compression)
    }

    fn block_bytes_total(&self) -> u64 {
        Manifest::block_bytes_total(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Compression, ContentHash, HashAlgorithm};
    use crate::manifest::ManifestBuilder;

    /// The manifest seen as a snapshot: the same layout, digest, blocks and
    /// object keys as its own accessors give.
    #[test]
    fn a_manifest_is_a_snapshot() {
        let layout = BlockLayout::new(5 * 4096 + 100, 4096).unwrap();
        let mut b = ManifestBuilder::new("vol", layout, HashAlgorithm::Blake3, Compression::Zstd).unwrap();
        let hash = |i: u8| ContentHash([i; 32]);
        for (index, compression) in [(1, Compression::Zstd), (4, Compression::None), (5, Compression::Zstd)] {
            // A raw object is the block itself; a compressed one is shorter.
            let stored_len_bytes = if compression == Compression::None { layout.len(index) } else { 77 };
            let entry = BlockEntry { index, hash: hash(index as u8), stored_len_bytes, compression };
            b.push(entry).unwrap();
        }
        let manifest = b.finish();
        let snapshot: &dyn Snapshot = &manifest;
        assert_eq!(snapshot.digest(), manifest.digest());
        assert_eq!(snapshot.layout(), manifest.layout);
        assert_eq!(snapshot.blocks_stored(), 3);
        let indexes: Vec<BlockIndex> = snapshot.blocks().map(|b| b.index).collect();
        assert_eq!(indexes, vec![1, 4, 5]);
        assert!(snapshot.block(0).is_none() && snapshot.block(2).is_none());
        let last = snapshot.block(5).unwrap();
        assert_eq!(last.expected.len_bytes, 100, "the short tail block");
        assert_eq!(last.expected.algorithm, HashAlgorithm::Blake3);
        assert_eq!(snapshot.object_key(&last), block_key(&hash(5), Compression::Zstd));
        assert_eq!(snapshot.block_bytes_total(), manifest.block_bytes_total());
        let summed: u64 = snapshot.blocks().map(|b| u64::from(b.expected.len_bytes)).sum();
        assert_eq!(summed, 4096 + 4096 + 100);
    }
}
