//! Snapshot manifest, format v1. (Being implemented: see the helper brief.)

use crate::block::{BlockIndex, BlockLayout, Compression, ContentHash, HashAlgorithm};

/// Limits a manifest must stay within before anything is allocated for it.
#[derive(Debug, Clone, Copy)]
pub struct ManifestLimits {
    /// Most block entries accepted (default 16 Mi: a 64 TiB volume in 4 MiB blocks).
    pub entries_max: u64,
}

impl Default for ManifestLimits {
    fn default() -> Self {
        Self { entries_max: 16 << 20 }
    }
}

/// One stored (non-zero) block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    pub index: BlockIndex,
    pub hash: ContentHash,
    /// Length of the stored object (compressed length when compressed).
    pub stored_len_bytes: u32,
    pub compression: Compression,
}

/// The digest of a manifest's encoding: the snapshot's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ManifestDigest(pub [u8; 32]);

impl ManifestDigest {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed manifest: {0}")]
pub struct ManifestError(pub String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub layout: BlockLayout,
    pub hash_algorithm: HashAlgorithm,
    entries: Vec<BlockEntry>,
    digest: ManifestDigest,
}

impl Manifest {
    pub fn entries(&self) -> &[BlockEntry] {
        &self.entries
    }
    pub fn digest(&self) -> ManifestDigest {
        self.digest
    }
}
