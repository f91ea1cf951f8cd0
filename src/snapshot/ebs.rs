//! An EBS snapshot as a [`Snapshot`]: `--manifest ebs://snap-...`.
//!
//! The layout is the listing's (`BlockSize`, `VolumeSize` GiB); the stored
//! blocks are the listed indexes; every other block is zero. A block's object
//! key is its index under the snapshot's [`EbsStore`](crate::store::ebs::EbsStore),
//! which fetches it with its token and appends the SHA-256 the answer
//! carried: the block's [`Expected`] says so ([`HashIn::Trailer`]), and
//! [`crate::verify`] checks it. There is no content hash before the fetch, so
//! identical blocks are not deduplicated (each is fetched at its index).
//!
//! Identity ([`Snapshot::digest`]): SHA-256 over the snapshot id, the layout
//! and the listed indexes, not the tokens (they change on every listing), so a
//! checkpoint resumes against the same snapshot listed again.

use crate::block::{BlockIndex, BlockLayout, Compression, ContentHash, HashAlgorithm};
use crate::manifest::ManifestDigest;
use crate::snapshot::{Snapshot, SnapshotBlock};
use crate::store::ebs::Listing;
use crate::verify::{Expected, HashIn, TRAILER_LEN_BYTES};

/// Bytes in one `VolumeSize` unit (the API's "GB" is GiB).
const GIB_BYTES: u64 = 1 << 30;

/// An EBS snapshot's block list. See the module docs.
#[derive(Debug, Clone)]
pub struct EbsSnapshot {
    snapshot_id: String,
    layout: BlockLayout,
    /// Stored blocks, ascending, unique, all inside the layout.
    blocks: Vec<BlockIndex>,
    digest: ManifestDigest,
}

impl EbsSnapshot {
    /// The snapshot `snapshot_id` as `listing` describes it. A listing whose
    /// layout is not one rehydrate can restore, or that names blocks past the
    /// volume's end, is refused.
    pub fn new(snapshot_id: &str, listing: Listing) -> Result<Self, String> {
        let volume_size_bytes = listing
            .volume_size_gib
            .checked_mul(GIB_BYTES)
            .ok_or_else(|| format!("ebs://{snapshot_id}: VolumeSize {} GiB is too large", listing.volume_size_gib))?;
        let layout = BlockLayout::new(volume_size_bytes, listing.block_size_bytes)
            .map_err(|e| format!("ebs://{snapshot_id}: {e}"))?;
        let mut blocks = listing.blocks;
        blocks.sort_unstable();
        blocks.dedup();
        if let Some(&last) = blocks.last()
            && last >= layout.block_count()
        {
            return Err(format!(
                "ebs://{snapshot_id}: block {last} listed, past the volume's {} blocks",
                layout.block_count()
            ));
        }
        let digest = digest_of(snapshot_id, &layout, &blocks);
        Ok(Self { snapshot_id: snapshot_id.to_owned(), layout, blocks, digest })
    }

    pub fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }

    fn snapshot_block(&self, index: BlockIndex) -> SnapshotBlock {
        let len_bytes = self.layout.len(index);
        SnapshotBlock {
            index,
            expected: Expected {
                hash: ContentHash([0; 32]),
                algorithm: HashAlgorithm::Sha256,
                compression: Compression::None,
                stored_len_bytes: len_bytes + TRAILER_LEN_BYTES as u32,
                len_bytes,
                hash_in: HashIn::Trailer,
            },
        }
    }
}

/// The identity of a listing: what it restores, never how it is accessed.
fn digest_of(snapshot_id: &str, layout: &BlockLayout, blocks: &[BlockIndex]) -> ManifestDigest {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"rehydrate-ebs-snapshot-v1\0");
    hasher.update(snapshot_id.as_bytes());
    hasher.update([0]);
    hasher.update(layout.volume_size_bytes().to_le_bytes());
    hasher.update(layout.block_size_bytes().to_le_bytes());
    for index in blocks {
        hasher.update(index.to_le_bytes());
    }
    ManifestDigest(hasher.finalize().into())
}

impl Snapshot for EbsSnapshot {
    fn digest(&self) -> ManifestDigest {
        self.digest
    }

    fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn blocks(&self) -> Box<dyn Iterator<Item = SnapshotBlock> + Send + '_> {
        Box::new(self.blocks.iter().map(|&i| self.snapshot_block(i)))
    }

    fn blocks_stored(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn block(&self, index: BlockIndex) -> Option<SnapshotBlock> {
        self.blocks.binary_search(&index).ok().map(|_| self.snapshot_block(index))
    }

    fn object_key(&self, block: &SnapshotBlock) -> String {
        block.index.to_string()
    }

    fn block_bytes_total(&self) -> u64 {
        self.blocks.iter().map(|&i| u64::from(self.layout.len(i))).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(blocks: Vec<BlockIndex>) -> Listing {
        Listing { block_size_bytes: 512 * 1024, volume_size_gib: 1, blocks }
    }

    #[test]
    fn layout_blocks_and_identity() {
        let snap = EbsSnapshot::new("snap-0a", listing(vec![7, 3, 3, 2047])).unwrap();
        assert_eq!(snap.layout().block_count(), 2048);
        let indexes: Vec<_> = snap.blocks().map(|b| b.index).collect();
        assert_eq!(indexes, vec![3, 7, 2047], "sorted, unique");
        assert!(snap.block(4).is_none());
        let block = snap.block(7).unwrap();
        assert_eq!(block.expected.hash_in, HashIn::Trailer);
        assert_eq!(block.expected.stored_len_bytes, 512 * 1024 + 32);
        assert_eq!(snap.object_key(&block), "7");
        assert_eq!(snap.block_bytes_total(), 3 * 512 * 1024);
        // The same list is the same snapshot; another list or id is not.
        let again = EbsSnapshot::new("snap-0a", listing(vec![2047, 7, 3])).unwrap();
        assert_eq!(again.digest(), snap.digest());
        assert_ne!(EbsSnapshot::new("snap-0a", listing(vec![3, 7])).unwrap().digest(), snap.digest());
        assert_ne!(EbsSnapshot::new("snap-0b", listing(vec![3, 7, 2047])).unwrap().digest(), snap.digest());
    }

    #[test]
    fn bad_listings_are_refused() {
        assert!(EbsSnapshot::new("snap-0a", listing(vec![2048])).unwrap_err().contains("past the volume"));
        let odd = Listing { block_size_bytes: 512, volume_size_gib: 1, blocks: vec![] };
        assert!(EbsSnapshot::new("snap-0a", odd).is_err(), "moto's uncorrected 512-byte block size");
    }
}
