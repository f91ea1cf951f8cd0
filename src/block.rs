//! The block: the unit a snapshot is cut into, fetched, verified, written and
//! settled.
//!
//! All offset math lives here ([`BlockLayout`]), so no other module computes
//! `index * block_size` or the length of the short tail block on its own. A
//! block is named by its index; its bytes are named by their [`ContentHash`]
//! (of the uncompressed bytes), which is also the key of the block object in a
//! store ([`block_key`]).

use std::fmt;
use std::num::NonZeroU32;

/// Index of a block in a volume: block `i` covers
/// `[i * block_size, min((i + 1) * block_size, volume_size))`.
pub type BlockIndex = u64;

/// Smallest block size accepted. 4 KiB keeps every block offset aligned for
/// O_DIRECT and block devices.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 4096;
/// Largest block size accepted: bounds the memory one block can take in
/// flight and the length one object read can claim.
pub const BLOCK_SIZE_MAX_BYTES: u32 = 64 * 1024 * 1024;
/// Largest volume accepted (1 PiB): keeps every offset and count far from
/// overflow and rejects absurd headers before anything is allocated.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;

/// Why a layout is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "block size {0} bytes is not a multiple of {BLOCK_SIZE_MIN_BYTES} between {BLOCK_SIZE_MIN_BYTES} and {BLOCK_SIZE_MAX_BYTES}"
    )]
    BlockSize(u32),
    #[error("volume size {0} bytes is zero or larger than the {VOLUME_SIZE_MAX_BYTES}-byte limit")]
    VolumeSize(u64),
}

/// The geometry of a volume: its size and the size of its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockLayout {
    volume_size_bytes: u64,
    block_size_bytes: NonZeroU32,
}

impl BlockLayout {
    pub fn new(volume_size_bytes: u64, block_size_bytes: u32) -> Result<Self, LayoutError> {
        if !(BLOCK_SIZE_MIN_BYTES..=BLOCK_SIZE_MAX_BYTES).contains(&block_size_bytes)
            || !block_size_bytes.is_multiple_of(BLOCK_SIZE_MIN_BYTES)
        {
            return Err(LayoutError::BlockSize(block_size_bytes));
        }
        if volume_size_bytes == 0 || volume_size_bytes > VOLUME_SIZE_MAX_BYTES {
            return Err(LayoutError::VolumeSize(volume_size_bytes));
        }
        let block_size_bytes = NonZeroU32::new(block_size_bytes).ok_or(LayoutError::BlockSize(0))?;
        Ok(Self { volume_size_bytes, block_size_bytes })
    }

    pub fn volume_size_bytes(&self) -> u64 {
        self.volume_size_bytes
    }

    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_bytes.get()
    }

    /// Number of blocks, the short tail included.
    pub fn block_count(&self) -> u64 {
        self.volume_size_bytes.div_ceil(u64::from(self.block_size_bytes.get()))
    }

    /// Byte offset of block `index` in the volume.
    pub fn offset(&self, index: BlockIndex) -> u64 {
        debug_assert!(index < self.block_count(), "block {index} out of layout");
        index * u64::from(self.block_size_bytes.get())
    }

    /// Length in bytes of block `index`: the block size, except for a short
    /// tail block.
    pub fn len(&self, index: BlockIndex) -> u32 {
        let offset = self.offset(index);
        let remaining = self.volume_size_bytes - offset;
        // Fits: remaining < block size for the tail, else capped to it.
        remaining.min(u64::from(self.block_size_bytes.get())) as u32
    }

    /// Whether `index` names a block of this layout.
    pub fn contains(&self, index: BlockIndex) -> bool {
        index < self.block_count()
    }
}

/// The blocks `start..end` (end exclusive) of a layout: what one restore,
/// checkpoint or read-back covers. A whole-volume restore covers
/// [`BlockRange::all`]; a shard (`--blocks`) a part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BlockRange {
    pub start: BlockIndex,
    pub end: BlockIndex,
}

impl BlockRange {
    /// Every block of `layout`.
    pub fn all(layout: &BlockLayout) -> Self {
        Self { start: 0, end: layout.block_count() }
    }

    /// How many blocks it holds.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, index: BlockIndex) -> bool {
        (self.start..self.end).contains(&index)
    }

    /// Whether it is every block of `layout`.
    pub fn is_all(&self, layout: &BlockLayout) -> bool {
        *self == Self::all(layout)
    }

    /// Bytes of the volume its blocks cover (a short tail block counts its
    /// real length). It must lie within `layout`.
    pub fn bytes(&self, layout: &BlockLayout) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let end_bytes = layout.offset(self.end - 1) + u64::from(layout.len(self.end - 1));
        end_bytes - layout.offset(self.start)
    }
}

impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Most shards `--blocks I/N` splits a volume into.
pub const SHARD_COUNT_MAX: u64 = 1 << 20;

/// Which blocks a command covers, as written on its command line
/// (`--blocks`): `START..END` (block indexes, end exclusive) or `I/N`, the
/// `I`-th (from 0) of `N` contiguous shards of near-equal size (the first
/// `block count % N` one block longer), for orchestrators that hand out an
/// index and cannot do arithmetic (a Kubernetes Indexed Job). It becomes a
/// [`BlockRange`] once the layout is known ([`resolve`](Self::resolve)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSelection {
    Range(BlockRange),
    Shard { index: u64, count: u64 },
}

impl BlockSelection {
    /// The range this selects in `layout`; `Err` says why there is none (past
    /// the volume's end, an empty shard).
    pub fn resolve(self, layout: &BlockLayout) -> Result<BlockRange, String> {
        let block_count = layout.block_count();
        match self {
            BlockSelection::Range(range) if range.end > block_count => Err(format!(
                "--blocks {range} reaches past the volume's {block_count} blocks (the last is {})",
                block_count - 1
            )),
            BlockSelection::Range(range) => Ok(range),
            BlockSelection::Shard { index, count } => {
                let (base, extra) = (block_count / count, block_count % count);
                let start_of = |i: u64| i * base + i.min(extra);
                let range = BlockRange { start: start_of(index), end: start_of(index + 1) };
                if range.is_empty() {
                    return Err(format!(
                        "--blocks {index}/{count}: the volume has {block_count} blocks, fewer than {count} shards"
                    ));
                }
                Ok(range)
            }
        }
    }
}

impl std::str::FromStr for BlockSelection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |word: &str, what: &str| -> Result<u64, String> {
            word.trim().parse().map_err(|_| format!("{what} {word:?} in {s:?} is not a whole number"))
        };
        if let Some((start, end)) = s.split_once("..") {
            let range = BlockRange { start: number(start, "START")?, end: number(end, "END")? };
            if range.is_empty() {
                return Err(format!("{s:?} is empty: END is exclusive and must be above START"));
            }
            return Ok(BlockSelection::Range(range));
        }
        if let Some((index, count)) = s.split_once('/') {
            let (index, count) = (number(index, "I")?, number(count, "N")?);
            if count == 0 || count > SHARD_COUNT_MAX || index >= count {
                return Err(format!("{s:?}: shard I/N needs 0 <= I < N <= {SHARD_COUNT_MAX}"));
            }
            return Ok(BlockSelection::Shard { index, count });
        }
        Err(format!("{s:?}: give START..END (block indexes, END exclusive) or I/N (shard I of N, from 0)"))
    }
}

/// Hash algorithm of block contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgorithm {
    /// BLAKE3: about 2.3 GiB/s per core here, the default.
    #[default]
    Blake3,
    /// SHA-256: about 1.0 GiB/s per core here, for stores that require it.
    Sha256,
    /// SHA-512 truncated to its first 32 bytes (64 hex digits): Longhorn's
    /// block checksum (`util.GetChecksum` in longhorn/backupstore
    /// `util/util.go`, `PreservedChecksumLength = 64`). Not SHA-512/256,
    /// which starts from other initial values. Only Longhorn backups use it.
    #[serde(rename = "sha512-trunc256")]
    Sha512Trunc256,
}

impl HashAlgorithm {
    pub fn hash(self, bytes: &[u8]) -> ContentHash {
        match self {
            HashAlgorithm::Blake3 => ContentHash(*blake3::hash(bytes).as_bytes()),
            HashAlgorithm::Sha256 => {
                use sha2::Digest;
                ContentHash(sha2::Sha256::digest(bytes).into())
            }
            HashAlgorithm::Sha512Trunc256 => {
                use sha2::Digest;
                let full = sha2::Sha512::digest(bytes);
                let mut prefix = [0u8; 32];
                prefix.copy_from_slice(&full[..32]);
                ContentHash(prefix)
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Blake3 => "blake3",
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha512Trunc256 => "sha512-trunc256",
        }
    }
}

impl std::str::FromStr for HashAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blake3" => Ok(Self::Blake3),
            "sha256" => Ok(Self::Sha256),
            other => Err(format!("unknown hash algorithm {other:?}: use blake3 or sha256")),
        }
    }
}

/// How a block object's bytes are stored.
///
/// `none` and `zstd` are rehydrate's own; `lz4` (an LZ4 frame) and `gzip`
/// are what Longhorn writes (`newCompressionWriter` in longhorn/backupstore
/// `util/util.go`) and are only read, never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
    Lz4,
    Gzip,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Gzip => "gzip",
        }
    }

    /// Whether objects are stored as the block itself.
    pub fn is_none(self) -> bool {
        self == Compression::None
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!("unknown compression {other:?}: use none or zstd")),
        }
    }
}

/// Content hash of a block's uncompressed bytes (BLAKE3 or SHA-256, both 32
/// bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Key of a block object relative to the snapshot's store prefix:
/// `blocks/<hex hash>` or `blocks/<hex hash>.zst`.
/// (Longhorn's codecs never name a rehydrate object: a Longhorn backup keys
/// its blocks itself.)
pub fn block_key(hash: &ContentHash, compression: Compression) -> String {
    match compression {
        Compression::Zstd => format!("blocks/{}.zst", hash.to_hex()),
        _ => format!("blocks/{}", hash.to_hex()),
    }
}

/// Whether `bytes` are all zero (a block that a snapshot leaves absent).
pub fn is_zero(bytes: &[u8]) -> bool {
    // OR-folding 64-byte chunks vectorises; an early `all` per byte does not.
    // This runs over every byte of a snapshot source.
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_and_tail() {
        let l = BlockLayout::new(10 * 4096 + 100, 4096).unwrap();
        assert_eq!(l.block_count(), 11);
        assert_eq!(l.offset(10), 40960);
        assert_eq!(l.len(9), 4096);
        assert_eq!(l.len(10), 100);
        assert!(l.contains(10) && !l.contains(11));
    }

    #[test]
    fn block_selections_parse_and_resolve() {
        let layout = BlockLayout::new(10 * 4096 + 100, 4096).unwrap(); // 11 blocks
        let resolve = |s: &str| s.parse::<BlockSelection>().and_then(|b| b.resolve(&layout));
        assert_eq!(resolve("0..11"), Ok(BlockRange { start: 0, end: 11 }));
        assert_eq!(resolve("3..5").map(|r| r.bytes(&layout)), Ok(2 * 4096));
        assert_eq!(resolve("10..11").map(|r| r.bytes(&layout)), Ok(100));
        assert!(BlockRange::all(&layout).is_all(&layout));
        // 11 blocks in 3 shards: 4, 4, 3, contiguous and covering everything.
        let shards: Vec<BlockRange> = (0..3).map(|i| resolve(&format!("{i}/3")).unwrap()).collect();
        assert_eq!(shards.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>(), vec![(0, 4), (4, 8), (8, 11)]);
        let total: u64 = shards.iter().map(|r| r.bytes(&layout)).sum();
        assert_eq!(total, layout.volume_size_bytes());
        for (bad, says) in [
            ("0..12", "past the volume"),
            ("5..5", "empty"),
            ("6..2", "empty"),
            ("a..3", "not a whole number"),
            ("1..", "not a whole number"),
            ("3/3", "I < N"),
            ("0/0", "I < N"),
            ("11/12", "fewer than 12 shards"),
            ("-1..3", "not a whole number"),
            ("7", "START..END"),
            ("", "START..END"),
        ] {
            let error = resolve(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn layout_rejects_bad_geometry() {
        assert!(BlockLayout::new(1, 1000).is_err());
        assert!(BlockLayout::new(0, 4096).is_err());
        assert!(BlockLayout::new(VOLUME_SIZE_MAX_BYTES + 1, 4096).is_err());
        assert!(BlockLayout::new(4096, BLOCK_SIZE_MAX_BYTES * 2).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }
}
