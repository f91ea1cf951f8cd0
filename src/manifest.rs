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

// --- placeholder bodies until the manifest branch lands (same signatures) ---
#[derive(Debug)]
pub struct ManifestBuilder {
    m: Manifest,
}

impl ManifestBuilder {
    pub fn new(
        name: &str,
        layout: BlockLayout,
        hash_algorithm: HashAlgorithm,
        _c: Compression,
    ) -> Result<Self, ManifestError> {
        Ok(Self {
            m: Manifest { name: name.into(), layout, hash_algorithm, entries: vec![], digest: ManifestDigest([0; 32]) },
        })
    }
    pub fn push(&mut self, entry: BlockEntry) -> Result<(), ManifestError> {
        self.m.entries.push(entry);
        Ok(())
    }
    pub fn finish(self) -> Manifest {
        self.m
    }
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        unimplemented!()
    }
    pub fn decode(_bytes: &[u8], _limits: &ManifestLimits) -> Result<Manifest, ManifestError> {
        unimplemented!()
    }
    pub fn encoded_len_max(_limits: &ManifestLimits) -> u64 {
        unimplemented!()
    }
    pub fn block_bytes_total(&self) -> u64 {
        unimplemented!()
    }
    pub fn entry(&self, _index: BlockIndex) -> Option<&BlockEntry> {
        unimplemented!()
    }
}
