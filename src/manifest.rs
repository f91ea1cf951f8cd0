//! The snapshot manifest, format v1: what a snapshot holds, and its identity.
//!
//! In: the bytes of a `<name>.manifest` object, read from a store with at most
//! [`Manifest::encoded_len_max`] bytes. Out: a [`Manifest`]: the volume's
//! [`BlockLayout`], the hash algorithm, and one [`BlockEntry`] per non-zero
//! block in block order, plus the [`ManifestDigest`] that names the snapshot
//! (a checkpoint belongs to exactly one digest). `rehydrate snapshot create`
//! builds one with [`ManifestBuilder`] and writes [`Manifest::encode`].
//!
//! # Objects in a store
//!
//! A snapshot lives under a store prefix (a directory or an S3 prefix):
//!
//! ```text
//! <store>/<name>.manifest            this format
//! <store>/blocks/<hex hash>          a block stored as is (compression none)
//! <store>/blocks/<hex hash>.zst      a block stored as one zstd frame
//! ```
//!
//! `<hex hash>` is the 64-digit lowercase hex of the block's content hash,
//! always of the *uncompressed* bytes ([`crate::block::block_key`]). Blocks
//! are content-addressed, so identical blocks are stored once and snapshots
//! under one prefix share them. Zero blocks are not stored and not listed:
//! a block missing from the manifest is all zeros.
//!
//! # Format v1, byte by byte
//!
//! All integers are little-endian. Reserved bytes are written as zero and a
//! manifest with a non-zero reserved byte is refused, so a later version can
//! give them a meaning.
//!
//! | offset   | size | field                                                         |
//! |----------|------|---------------------------------------------------------------|
//! | 0        | 8    | magic `RHYDMAN1` (ASCII)                                      |
//! | 8        | 4    | `format_version` u32 = 1                                      |
//! | 12       | 1    | `hash_algorithm` u8: 1 = BLAKE3, 2 = SHA-256                  |
//! | 13       | 1    | `compression` u8, the snapshot's: 0 = none, 1 = zstd          |
//! | 14       | 1    | `name_len` u8, 1 to 255                                       |
//! | 15       | 1    | reserved, 0                                                   |
//! | 16       | 4    | `block_size_bytes` u32: a multiple of 4096, 4 KiB to 64 MiB   |
//! | 20       | 4    | reserved, 0                                                   |
//! | 24       | 8    | `volume_size_bytes` u64: 1 byte to 1 PiB                      |
//! | 32       | 8    | `created_unix_secs` u64: creation time, seconds since 1970    |
//! | 40       | 8    | `entry_count` u64                                             |
//! | 48       | n    | `name`: `name_len` bytes of UTF-8                             |
//! | 48 + n   | 48×c | `entry_count` block entries, strictly increasing block index  |
//! | end − 32 | 32   | trailer: BLAKE3 of every byte before it                       |
//!
//! A block entry is 48 bytes:
//!
//! | offset | size | field                                                           |
//! |--------|------|-----------------------------------------------------------------|
//! | 0      | 8    | `index` u64: the block covers `[index × block_size, …)`         |
//! | 8      | 4    | `stored_len_bytes` u32: length of the block object              |
//! | 12     | 1    | `compression` u8 of this block object: 0 = none, 1 = zstd       |
//! | 13     | 3    | reserved, 0                                                     |
//! | 16     | 32   | content hash of the uncompressed block bytes                    |
//!
//! The total length is exactly `48 + name_len + 48 × entry_count + 32`.
//!
//! The trailer is the [`ManifestDigest`]: the snapshot's identity. It covers
//! every field, so any change to a manifest (a bit of one hash, the name, the
//! creation time) makes a different snapshot.
//!
//! The name is what the manifest object is called in its store, so it is 1 to
//! 255 bytes of UTF-8 without `/`, NUL or other control characters, and does
//! not start with `.` (dot files are hidden, and staged objects are dot files
//! that a startup sweep removes).
//!
//! An entry's stored length is checked against what the block can be: a block
//! stored as is is exactly its length in the layout (the tail block may be
//! short); a zstd block is 1 byte up to zstd's compress bound of that length.
//! In a snapshot whose compression is zstd, a block that did not shrink may be
//! stored as is (compression none); a snapshot whose compression is none holds
//! no zstd block.
//!
//! # Limits and failure
//!
//! Decoding never panics and never allocates from a count it has not checked:
//! the entry count is checked against [`ManifestLimits::entries_max`] and the
//! exact total length against the bytes actually present *before* anything is
//! allocated, then the trailer is checked, then every field. Memory is the
//! input plus 48 bytes per entry (a 16 TiB volume in 4 MiB blocks: 4 Mi
//! entries, 192 MiB of manifest, 192 MiB decoded). Every refusal is a
//! [`ManifestError`] that names the offending field, value or entry and says
//! what to do; truncation and bit rot are reported as such. Retrying a
//! refused manifest does not help: it is a [`crate::error::ExitCode::Refused`].

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::block::{
    BLOCK_SIZE_MIN_BYTES, BlockIndex, BlockLayout, Compression, ContentHash, HashAlgorithm, LayoutError,
    VOLUME_SIZE_MAX_BYTES,
};

/// First 8 bytes of every manifest.
pub const MAGIC: [u8; 8] = *b"RHYDMAN1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the header before the name.
pub const HEADER_FIXED_LEN_BYTES: u64 = 48;
/// Bytes of one block entry.
pub const ENTRY_LEN_BYTES: u64 = 48;
/// Bytes of the BLAKE3 trailer.
pub const TRAILER_LEN_BYTES: u64 = 32;
/// Longest snapshot name: it must fit the `name_len` byte, and it is an
/// object name in a store.
pub const NAME_LEN_MAX_BYTES: usize = 255;
/// Most blocks any valid layout has (1 PiB in 4 KiB blocks): bounds a
/// manifest's entries whatever the configured limit.
const BLOCK_COUNT_MAX: u64 = VOLUME_SIZE_MAX_BYTES / BLOCK_SIZE_MIN_BYTES as u64;

/// Said by every refusal that only a new copy of the manifest can fix.
const CORRUPT_ADVICE: &str = "the manifest is truncated or corrupt: re-create or re-download it";
/// Said by refusals that are either a newer writer or corruption.
const NEWER_ADVICE: &str =
    "it was written by a newer rehydrate (upgrade) or it is corrupt (re-create or re-download it)";

/// Byte offsets of the header fields (see the module docs).
mod at {
    pub const VERSION: usize = 8;
    pub const HASH_ALGORITHM: usize = 12;
    pub const COMPRESSION: usize = 13;
    pub const NAME_LEN: usize = 14;
    pub const RESERVED_15: usize = 15;
    pub const BLOCK_SIZE: usize = 16;
    pub const RESERVED_20: usize = 20;
    pub const VOLUME_SIZE: usize = 24;
    pub const CREATED: usize = 32;
    pub const ENTRY_COUNT: usize = 40;
    pub const NAME: usize = 48;
}

/// Byte offsets inside one block entry.
mod entry_at {
    pub const INDEX: usize = 0;
    pub const STORED_LEN: usize = 8;
    pub const COMPRESSION: usize = 12;
    pub const RESERVED: usize = 13;
    pub const HASH: usize = 16;
}

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

/// Limits on manifests read (`[manifest]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManifestConfig {
    /// Most block entries in a manifest. 16 Mi: a 64 TiB volume in 4 MiB
    /// blocks; 768 MiB of entries in memory at most.
    pub entries_max: std::num::NonZeroU64,
}

impl Default for ManifestConfig {
    fn default() -> Self {
        Self { entries_max: std::num::NonZeroU64::new(16 << 20).expect("non-zero") }
    }
}

impl ManifestConfig {
    /// The limits a manifest is decoded within.
    pub fn limits(&self) -> ManifestLimits {
        ManifestLimits { entries_max: self.entries_max.get() }
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

impl fmt::Display for ManifestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Why a manifest (or an entry offered to a [`ManifestBuilder`]) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("a rehydrate manifest holds blake3 or sha256 hashes and none or zstd objects, not {0} (a Longhorn codec)")]
    ForeignCodec(&'static str),
    #[error("manifest is {len_bytes} bytes, shorter than the {needed_bytes} bytes expected: {CORRUPT_ADVICE}")]
    Truncated { len_bytes: u64, needed_bytes: u64 },
    #[error(
        "manifest is {len_bytes} bytes, longer than the {expected_bytes} bytes its header describes: {CORRUPT_ADVICE}"
    )]
    TrailingBytes { len_bytes: u64, expected_bytes: u64 },
    #[error(
        "not a rehydrate manifest: it starts with {found_hex} instead of the magic \"RHYDMAN1\": check the manifest URL, or re-create the manifest if it is corrupt"
    )]
    BadMagic { found_hex: String },
    #[error(
        "manifest format version {version} is not supported (this build reads version {FORMAT_VERSION}): {NEWER_ADVICE}"
    )]
    UnsupportedVersion { version: u32 },
    #[error("manifest trailer digest {stored} does not match the digest of its contents {computed}: {CORRUPT_ADVICE}")]
    DigestMismatch { stored: ManifestDigest, computed: ManifestDigest },
    #[error(
        "manifest declares {entry_count} block entries, more than the limit of {entries_max}: if the snapshot really has that many non-zero blocks, raise the manifest entries limit or snapshot with larger blocks; otherwise {CORRUPT_ADVICE}"
    )]
    TooManyEntries { entry_count: u64, entries_max: u64 },
    #[error(
        "manifest declares {entry_count} block entries but its volume has only {block_count} blocks: {CORRUPT_ADVICE}"
    )]
    EntriesExceedBlocks { entry_count: u64, block_count: u64 },
    #[error("manifest hash algorithm code {code} is unknown (1 = blake3, 2 = sha256): {NEWER_ADVICE}")]
    UnknownHashAlgorithm { code: u8 },
    #[error("manifest compression code {code} is unknown (0 = none, 1 = zstd): {NEWER_ADVICE}")]
    UnknownCompression { code: u8 },
    #[error("manifest byte {offset} is reserved and must be 0 but is {value:#04x}: {NEWER_ADVICE}")]
    ReservedNotZero { offset: u64, value: u8 },
    #[error("manifest header has an invalid layout: {0}: {CORRUPT_ADVICE}")]
    Layout(LayoutError),
    #[error(
        "snapshot name {name:?} is refused: {reason}; use 1 to {NAME_LEN_MAX_BYTES} bytes of UTF-8 without '/', NUL or control characters, not starting with '.' (a manifest that carries such a name is corrupt: re-create it)"
    )]
    Name { name: String, reason: NameProblem },
    #[error("manifest entry {position} (block {index}) is invalid: {problem}: {CORRUPT_ADVICE}")]
    Entry { position: u64, index: BlockIndex, problem: EntryProblem },
    #[error(
        "cannot add block {index} to snapshot {name:?}: {problem} (the snapshot writer produced a bad entry: this is a bug, report it)"
    )]
    Push { name: String, index: BlockIndex, problem: EntryProblem },
}

/// What is wrong with a snapshot name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    #[error("it is empty")]
    Empty,
    #[error("it is {0} bytes long")]
    TooLong(usize),
    #[error("it is not valid UTF-8")]
    NotUtf8,
    #[error("it contains '/'")]
    Slash,
    #[error("it contains the control character {0:?}")]
    Control(char),
    #[error("it starts with '.'")]
    LeadingDot,
}

/// What is wrong with one block entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error(
        "its index is not greater than the previous entry's block {previous} (entries are in strictly increasing block order, each block once)"
    )]
    NotIncreasing { previous: BlockIndex },
    #[error("its index is past the end of the volume, which has {block_count} blocks")]
    OutOfVolume { block_count: u64 },
    #[error("its stored length is 0 (a stored block has at least one byte; zero blocks are left out)")]
    StoredLenZero,
    #[error("it is stored uncompressed in {stored_len_bytes} bytes but the block is {block_len_bytes} bytes")]
    StoredLenNotBlockLen { stored_len_bytes: u32, block_len_bytes: u32 },
    #[error(
        "its zstd stored length {stored_len_bytes} bytes is over zstd's bound of {bound_bytes} bytes for a {block_len_bytes}-byte block"
    )]
    StoredLenOverBound { stored_len_bytes: u32, bound_bytes: u64, block_len_bytes: u32 },
    #[error("its compression code {code} is unknown (0 = none, 1 = zstd)")]
    UnknownCompression { code: u8 },
    #[error("it is zstd-compressed but the snapshot's compression is none")]
    ZstdInUncompressedSnapshot,
    #[error("its compression {0} is a Longhorn codec, never in a rehydrate manifest")]
    ForeignCompression(&'static str),
    #[error("its reserved bytes are {0:02x?}, not zero")]
    ReservedNotZero([u8; 3]),
}

/// A decoded or freshly built snapshot manifest.
///
/// `name`, `layout` and `hash_algorithm` are public to read; changing them
/// after [`ManifestBuilder::finish`] or [`Manifest::decode`] leaves
/// [`Manifest::digest`] describing the manifest as it was built, not as it was
/// changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub layout: BlockLayout,
    pub hash_algorithm: HashAlgorithm,
    compression: Compression,
    created_unix_secs: u64,
    entries: Vec<BlockEntry>,
    digest: ManifestDigest,
}

impl Manifest {
    /// The stored blocks, in strictly increasing block order.
    pub fn entries(&self) -> &[BlockEntry] {
        &self.entries
    }

    /// The snapshot's identity: BLAKE3 of the encoding before its trailer.
    pub fn digest(&self) -> ManifestDigest {
        self.digest
    }

    /// The snapshot's compression (what blocks were offered to; a block that
    /// did not shrink may still be stored as is).
    pub fn compression(&self) -> Compression {
        self.compression
    }

    pub fn created_unix_secs(&self) -> u64 {
        self.created_unix_secs
    }

    /// The entry of block `index`, or `None` for a zero block.
    pub fn entry(&self, index: BlockIndex) -> Option<&BlockEntry> {
        self.entries.binary_search_by_key(&index, |e| e.index).ok().map(|at| &self.entries[at])
    }

    /// Bytes of all block objects the manifest names (compressed lengths),
    /// counting a block listed twice under one hash twice.
    pub fn stored_bytes_total(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(e.stored_len_bytes)).sum()
    }

    /// Logical bytes of the non-zero blocks (the bytes a restore writes from
    /// fetched data).
    pub fn block_bytes_total(&self) -> u64 {
        self.entries.iter().map(|e| u64::from(self.layout.len(e.index))).sum()
    }

    /// Exact length of this manifest's encoding.
    pub fn encoded_len(&self) -> u64 {
        encoded_len(self.name.len() as u64, self.entries.len() as u64)
    }

    /// The most bytes a manifest within `limits` can take: the longest name
    /// and `entries_max` entries (or the most blocks any layout has, if that
    /// is fewer). Bound a store read of a manifest with this.
    pub fn encoded_len_max(limits: &ManifestLimits) -> u64 {
        encoded_len(NAME_LEN_MAX_BYTES as u64, limits.entries_max.min(BLOCK_COUNT_MAX))
    }

    /// Refuse a manifest with more entries than `limits` allow, so a writer
    /// does not publish a manifest its readers will refuse.
    pub fn check_limits(&self, limits: &ManifestLimits) -> Result<(), ManifestError> {
        let entry_count = self.entries.len() as u64;
        if entry_count > limits.entries_max {
            return Err(ManifestError::TooManyEntries { entry_count, entries_max: limits.entries_max });
        }
        Ok(())
    }

    /// The manifest in format v1, trailer included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = encode_body(self);
        let trailer = blake3::hash(&out);
        out.extend_from_slice(trailer.as_bytes());
        out
    }

    /// Parse and check a manifest; see the module docs for what is checked
    /// and in which order.
    pub fn decode(bytes: &[u8], limits: &ManifestLimits) -> Result<Manifest, ManifestError> {
        let header = Header::read(bytes, limits)?;
        let digest = check_trailer(bytes)?;
        let fields = header.validate()?;
        let entries_bytes = &bytes[header.entries_start()..bytes.len() - TRAILER_LEN_BYTES as usize];
        let entries = decode_entries(entries_bytes, &fields)?;
        Ok(Manifest {
            name: fields.name,
            layout: fields.layout,
            hash_algorithm: fields.hash_algorithm,
            compression: fields.compression,
            created_unix_secs: fields.created_unix_secs,
            entries,
            digest,
        })
    }
}

/// Builds a manifest from blocks offered in increasing order, checking each.
#[derive(Debug)]
pub struct ManifestBuilder {
    name: String,
    layout: BlockLayout,
    hash_algorithm: HashAlgorithm,
    compression: Compression,
    created_unix_secs: u64,
    entries: Vec<BlockEntry>,
}

impl ManifestBuilder {
    /// Start a manifest created now. The name must be valid (see
    /// [`validate_name`]).
    pub fn new(
        name: &str,
        layout: BlockLayout,
        hash_algorithm: HashAlgorithm,
        compression: Compression,
    ) -> Result<Self, ManifestError> {
        validate_name(name.as_bytes())?;
        if hash_algorithm == HashAlgorithm::Sha512Trunc256 {
            return Err(ManifestError::ForeignCodec(hash_algorithm.name()));
        }
        if matches!(compression, Compression::Lz4 | Compression::Gzip) {
            return Err(ManifestError::ForeignCodec(compression.name()));
        }
        // A clock before 1970 is recorded as 0 rather than refusing to snapshot.
        let created_unix_secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Ok(Self { name: name.to_owned(), layout, hash_algorithm, compression, created_unix_secs, entries: Vec::new() })
    }

    /// Record another creation time (for reproducible snapshots and tests).
    pub fn created_unix_secs(mut self, created_unix_secs: u64) -> Self {
        self.created_unix_secs = created_unix_secs;
        self
    }

    /// Add a stored block. Blocks come in strictly increasing index order,
    /// inside the layout, with a stored length the block can have.
    pub fn push(&mut self, entry: BlockEntry) -> Result<(), ManifestError> {
        let previous = self.entries.last().map(|e| e.index);
        check_entry(&self.layout, self.compression, previous, &entry).map_err(|problem| ManifestError::Push {
            name: self.name.clone(),
            index: entry.index,
            problem,
        })?;
        self.entries.push(entry);
        Ok(())
    }

    /// Seal the manifest: compute its digest.
    pub fn finish(self) -> Manifest {
        let mut manifest = Manifest {
            name: self.name,
            layout: self.layout,
            hash_algorithm: self.hash_algorithm,
            compression: self.compression,
            created_unix_secs: self.created_unix_secs,
            entries: self.entries,
            digest: ManifestDigest([0; 32]),
        };
        manifest.digest = ManifestDigest(*blake3::hash(&encode_body(&manifest)).as_bytes());
        manifest
    }
}

/// Check a snapshot name: 1 to 255 bytes of UTF-8, no '/', NUL or control
/// characters, not starting with '.' (it names an object in a store and
/// shows up in logs).
pub fn validate_name(name: &[u8]) -> Result<&str, ManifestError> {
    let lossy = || String::from_utf8_lossy(name).into_owned();
    let refuse = |reason| Err(ManifestError::Name { name: lossy(), reason });
    if name.is_empty() {
        return refuse(NameProblem::Empty);
    }
    if name.len() > NAME_LEN_MAX_BYTES {
        return refuse(NameProblem::TooLong(name.len()));
    }
    let Ok(text) = std::str::from_utf8(name) else {
        return refuse(NameProblem::NotUtf8);
    };
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return refuse(NameProblem::Control(c));
    }
    if text.contains('/') {
        return refuse(NameProblem::Slash);
    }
    // A leading dot makes a hidden file in a directory store, and staged
    // objects are dot files that a startup sweep removes.
    if text.starts_with('.') {
        return refuse(NameProblem::LeadingDot);
    }
    Ok(text)
}

/// Exact encoded length for a name of `name_len` bytes and `entry_count`
/// entries; saturates instead of overflowing (a saturated length never
/// matches a real buffer).
fn encoded_len(name_len: u64, entry_count: u64) -> u64 {
    entry_count.saturating_mul(ENTRY_LEN_BYTES).saturating_add(HEADER_FIXED_LEN_BYTES + name_len + TRAILER_LEN_BYTES)
}

/// Check `entry` against the layout, the snapshot's compression and the
/// previous entry's index. Shared by the builder and the decoder so both
/// accept exactly the same manifests.
fn check_entry(
    layout: &BlockLayout,
    snapshot_compression: Compression,
    previous: Option<BlockIndex>,
    entry: &BlockEntry,
) -> Result<(), EntryProblem> {
    if let Some(previous) = previous
        && entry.index <= previous
    {
        return Err(EntryProblem::NotIncreasing { previous });
    }
    if !layout.contains(entry.index) {
        return Err(EntryProblem::OutOfVolume { block_count: layout.block_count() });
    }
    if entry.stored_len_bytes == 0 {
        return Err(EntryProblem::StoredLenZero);
    }
    let block_len_bytes = layout.len(entry.index);
    match (snapshot_compression, entry.compression) {
        (_, Compression::None) if entry.stored_len_bytes != block_len_bytes => {
            Err(EntryProblem::StoredLenNotBlockLen { stored_len_bytes: entry.stored_len_bytes, block_len_bytes })
        }
        (_, Compression::None) => Ok(()),
        (_, Compression::Lz4 | Compression::Gzip) => Err(EntryProblem::ForeignCompression(entry.compression.name())),
        (Compression::None | Compression::Lz4 | Compression::Gzip, Compression::Zstd) => {
            Err(EntryProblem::ZstdInUncompressedSnapshot)
        }
        (Compression::Zstd, Compression::Zstd) => {
            // Block length ≤ 64 MiB, so the bound fits usize and u64 anywhere.
            let bound_bytes = zstd::zstd_safe::compress_bound(block_len_bytes as usize) as u64;
            if u64::from(entry.stored_len_bytes) > bound_bytes {
                return Err(EntryProblem::StoredLenOverBound {
                    stored_len_bytes: entry.stored_len_bytes,
                    bound_bytes,
                    block_len_bytes,
                });
            }
            Ok(())
        }
    }
}

fn hash_algorithm_code(algorithm: HashAlgorithm) -> u8 {
    match algorithm {
        HashAlgorithm::Blake3 => 1,
        HashAlgorithm::Sha256 => 2,
        // Refused by `ManifestBuilder::new`; never decoded.
        HashAlgorithm::Sha512Trunc256 => 0xff,
    }
}

fn hash_algorithm_from_code(code: u8) -> Option<HashAlgorithm> {
    match code {
        1 => Some(HashAlgorithm::Blake3),
        2 => Some(HashAlgorithm::Sha256),
        _ => None,
    }
}

fn compression_code(compression: Compression) -> u8 {
    match compression {
        Compression::None => 0,
        Compression::Zstd => 1,
        // Refused by `ManifestBuilder::new` and `check_entry`; never decoded.
        Compression::Lz4 | Compression::Gzip => 0xff,
    }
}

fn compression_from_code(code: u8) -> Option<Compression> {
    match code {
        0 => Some(Compression::None),
        1 => Some(Compression::Zstd),
        _ => None,
    }
}

/// Header, name and entries: everything the trailer covers.
fn encode_body(m: &Manifest) -> Vec<u8> {
    let name = m.name.as_bytes();
    debug_assert!(!name.is_empty() && name.len() <= NAME_LEN_MAX_BYTES, "name checked by the builder");
    // The length was bounded by the builder (≤ block_count entries); the
    // capacity avoids regrowing a 200 MB buffer.
    let mut out = Vec::with_capacity(m.encoded_len() as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(hash_algorithm_code(m.hash_algorithm));
    out.push(compression_code(m.compression));
    out.push(name.len() as u8);
    out.push(0);
    out.extend_from_slice(&m.layout.block_size_bytes().to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&m.layout.volume_size_bytes().to_le_bytes());
    out.extend_from_slice(&m.created_unix_secs.to_le_bytes());
    out.extend_from_slice(&(m.entries.len() as u64).to_le_bytes());
    debug_assert_eq!(out.len() as u64, HEADER_FIXED_LEN_BYTES);
    out.extend_from_slice(name);
    for e in &m.entries {
        out.extend_from_slice(&e.index.to_le_bytes());
        out.extend_from_slice(&e.stored_len_bytes.to_le_bytes());
        out.push(compression_code(e.compression));
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&e.hash.0);
    }
    out
}

/// Read `N` bytes at `at`. Callers have checked the length first; the
/// fallback zeros can never be observed.
fn array_at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes.get(at..at + N).and_then(|s| s.try_into().ok()).unwrap_or([0; N])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array_at(bytes, at))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array_at(bytes, at))
}

/// The header as read, before its fields are checked. Holds a borrowed name.
struct Header<'a> {
    hash_algorithm_code: u8,
    compression_code: u8,
    reserved: [(usize, u8); 5],
    block_size_bytes: u32,
    volume_size_bytes: u64,
    created_unix_secs: u64,
    entry_count: u64,
    name: &'a [u8],
}

/// Checked header fields.
struct Fields {
    name: String,
    layout: BlockLayout,
    hash_algorithm: HashAlgorithm,
    compression: Compression,
    created_unix_secs: u64,
    entry_count: u64,
}

impl<'a> Header<'a> {
    /// Read the header and check what bounds the rest: magic, version, entry
    /// count against the limit, exact total length against `bytes`.
    fn read(bytes: &'a [u8], limits: &ManifestLimits) -> Result<Self, ManifestError> {
        let len_bytes = bytes.len() as u64;
        let truncated = |needed_bytes| ManifestError::Truncated { len_bytes, needed_bytes };
        let magic_seen = bytes.len().min(MAGIC.len());
        if bytes[..magic_seen] != MAGIC[..magic_seen] {
            return Err(ManifestError::BadMagic { found_hex: hex::encode(&bytes[..magic_seen]) });
        }
        if bytes.len() < at::VERSION + 4 {
            return Err(truncated(encoded_len(1, 0)));
        }
        let version = u32_at(bytes, at::VERSION);
        if version != FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion { version });
        }
        if len_bytes < HEADER_FIXED_LEN_BYTES {
            return Err(truncated(encoded_len(1, 0)));
        }
        let name_len = bytes[at::NAME_LEN];
        let entry_count = u64_at(bytes, at::ENTRY_COUNT);
        if entry_count > limits.entries_max {
            return Err(ManifestError::TooManyEntries { entry_count, entries_max: limits.entries_max });
        }
        let expected_bytes = encoded_len(u64::from(name_len), entry_count);
        if len_bytes < expected_bytes {
            return Err(truncated(expected_bytes));
        }
        if len_bytes > expected_bytes {
            return Err(ManifestError::TrailingBytes { len_bytes, expected_bytes });
        }
        Ok(Self {
            hash_algorithm_code: bytes[at::HASH_ALGORITHM],
            compression_code: bytes[at::COMPRESSION],
            reserved: [
                (at::RESERVED_15, bytes[at::RESERVED_15]),
                (at::RESERVED_20, bytes[at::RESERVED_20]),
                (at::RESERVED_20 + 1, bytes[at::RESERVED_20 + 1]),
                (at::RESERVED_20 + 2, bytes[at::RESERVED_20 + 2]),
                (at::RESERVED_20 + 3, bytes[at::RESERVED_20 + 3]),
            ],
            block_size_bytes: u32_at(bytes, at::BLOCK_SIZE),
            volume_size_bytes: u64_at(bytes, at::VOLUME_SIZE),
            created_unix_secs: u64_at(bytes, at::CREATED),
            entry_count,
            name: &bytes[at::NAME..at::NAME + usize::from(name_len)],
        })
    }

    fn entries_start(&self) -> usize {
        at::NAME + self.name.len()
    }

    /// Check every header field, and the entry count against the layout.
    fn validate(&self) -> Result<Fields, ManifestError> {
        let hash_algorithm = hash_algorithm_from_code(self.hash_algorithm_code)
            .ok_or(ManifestError::UnknownHashAlgorithm { code: self.hash_algorithm_code })?;
        let compression = compression_from_code(self.compression_code)
            .ok_or(ManifestError::UnknownCompression { code: self.compression_code })?;
        if let Some(&(offset, value)) = self.reserved.iter().find(|(_, value)| *value != 0) {
            return Err(ManifestError::ReservedNotZero { offset: offset as u64, value });
        }
        let layout = BlockLayout::new(self.volume_size_bytes, self.block_size_bytes).map_err(ManifestError::Layout)?;
        let name = validate_name(self.name)?.to_owned();
        let block_count = layout.block_count();
        if self.entry_count > block_count {
            return Err(ManifestError::EntriesExceedBlocks { entry_count: self.entry_count, block_count });
        }
        Ok(Fields {
            name,
            layout,
            hash_algorithm,
            compression,
            created_unix_secs: self.created_unix_secs,
            entry_count: self.entry_count,
        })
    }
}

/// Check the BLAKE3 trailer over everything before it; the trailer is the
/// digest. `bytes` is at least header + trailer long (checked by `Header::read`).
fn check_trailer(bytes: &[u8]) -> Result<ManifestDigest, ManifestError> {
    let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN_BYTES as usize);
    let stored = ManifestDigest(array_at(trailer, 0));
    let computed = ManifestDigest(*blake3::hash(body).as_bytes());
    if stored != computed {
        return Err(ManifestError::DigestMismatch { stored, computed });
    }
    Ok(computed)
}

/// Decode and check the entries; `bytes` is exactly `entry_count` entries.
fn decode_entries(bytes: &[u8], fields: &Fields) -> Result<Vec<BlockEntry>, ManifestError> {
    debug_assert_eq!(bytes.len() as u64, fields.entry_count * ENTRY_LEN_BYTES);
    // Bounded: the count was checked against the limit, the layout and the
    // bytes actually present.
    let mut entries = Vec::with_capacity(fields.entry_count as usize);
    let mut previous = None;
    for (position, raw) in bytes.chunks_exact(ENTRY_LEN_BYTES as usize).enumerate() {
        let position = position as u64;
        let index = u64_at(raw, entry_at::INDEX);
        let refuse = |problem| ManifestError::Entry { position, index, problem };
        let compression_code = raw[entry_at::COMPRESSION];
        let compression = compression_from_code(compression_code)
            .ok_or(refuse(EntryProblem::UnknownCompression { code: compression_code }))?;
        let reserved: [u8; 3] = array_at(raw, entry_at::RESERVED);
        if reserved != [0; 3] {
            return Err(refuse(EntryProblem::ReservedNotZero(reserved)));
        }
        let entry = BlockEntry {
            index,
            hash: ContentHash(array_at(raw, entry_at::HASH)),
            stored_len_bytes: u32_at(raw, entry_at::STORED_LEN),
            compression,
        };
        check_entry(&fields.layout, fields.compression, previous, &entry).map_err(refuse)?;
        previous = Some(index);
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests;
