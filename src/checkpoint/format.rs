//! The checkpoint of one job and its file format, version 2 (version 1 is
//! still read).
//!
//! Little-endian binary, laid out as:
//!
//! ```text
//! magic            8   "RHYDCKPT"
//! version          u32 FORMAT_VERSION
//! manifest digest  32
//! target           kind u8 (1 file, 2 block device), dev u64, ino u64, size_bytes u64
//!                  (a file: st_dev and inode; a block device: st_rdev and 0)
//! layout           volume_size_bytes u64, block_size_bytes u32
//! blocks           start u64, end u64 (version 2): the blocks the restore
//!                  covers, end exclusive; version 1 covers the whole layout
//! bookkeeping      created_unix_secs u64, updated_unix_secs u64, bytes_settled u64
//! cursor           u64 (from `start` to `end`)
//! ranges           count u64, then per settled range above the cursor:
//!                  varint gap from the previous range's end (the cursor for the
//!                  first; at least 1), varint length (at least 1)
//! failed           count u64, then per failed block: varint index delta (the
//!                  index itself for the first; at least 1 after), varint
//!                  reason length, reason bytes (UTF-8)
//! checksum         32  BLAKE3 of every byte before it
//! ```
//!
//! Every version ends with the BLAKE3 of everything before it, so a torn
//! write or any flipped bit is reported as corrupt before the version is even
//! read. Version 1 (no `blocks`) reads as a whole-volume checkpoint. A
//! mostly sequential restore has few ranges above its cursor, so its
//! checkpoint is a couple of hundred bytes.
//!
//! [`Checkpoint::decode`] is safe on hostile bytes: it never panics, and it
//! allocates only as it consumes input (no count read from the file sizes an
//! allocation), so memory is bounded by the input length.

use crate::block::{BlockIndex, BlockLayout, BlockRange};
use crate::manifest::ManifestDigest;

use super::settled::{FAILURE_REASON_MAX_BYTES, FailedSet, Ledger, SettledSet};
use super::{CheckpointError, JobIdentity, TargetIdentity, TargetKind};

/// The format version this build writes. It reads this one and version 1.
pub const FORMAT_VERSION: u32 = 2;
/// The first version, without `blocks`: read as a whole-volume checkpoint.
const FORMAT_VERSION_WHOLE: u32 = 1;

/// Largest checkpoint file written or read. The worst fragmentation (every
/// other block settled) costs 2 bytes per 2 blocks, so this covers 64 Mi
/// blocks at their worst; real checkpoints are far smaller.
pub const CHECKPOINT_SIZE_MAX_BYTES: usize = 64 << 20;

const MAGIC: &[u8; 8] = b"RHYDCKPT";
const CHECKSUM_BYTES: usize = 32;
/// Everything up to and including the two counts.
const FIXED_BYTES: usize = 8 + 4 + 32 + (1 + 8 + 8 + 8) + (8 + 4) + (8 + 8) + (8 + 8 + 8) + 8 + 8 + 8;
/// The shortest file of any version read (version 1 has no `blocks`).
const MIN_BYTES: usize = FIXED_BYTES - 16 + CHECKSUM_BYTES;
/// A LEB128 u64 takes at most 10 bytes.
const VARINT_MAX_BYTES: usize = 10;

const KIND_FILE: u8 = 1;
const KIND_BLOCK_DEVICE: u8 = 2;

/// Why bytes are not a checkpoint this build can use. Carries no path:
/// [`at`](Self::at) names the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("corrupt checkpoint: {0}")]
    Corrupt(String),
    #[error("checkpoint format version {found}, this build reads versions 1 and {FORMAT_VERSION}")]
    UnsupportedVersion { found: u32 },
}

impl FormatError {
    /// The operator-facing error for the checkpoint file at `path`.
    pub fn at(self, path: impl Into<std::path::PathBuf>) -> CheckpointError {
        let path = path.into();
        match self {
            FormatError::Corrupt(detail) => CheckpointError::Corrupt { path, detail },
            FormatError::UnsupportedVersion { found } => {
                CheckpointError::UnsupportedVersion { path, found, supported: FORMAT_VERSION }
            }
        }
    }
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
pub fn unix_now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The restore progress of one job: who it belongs to, what is settled, what
/// failed. Blocks are settled and failed through this type so the ledger
/// stays disjoint (invariant 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    identity: JobIdentity,
    settled: SettledSet,
    failed: FailedSet,
    created_unix_secs: u64,
    updated_unix_secs: u64,
}

impl Checkpoint {
    /// A checkpoint of a job with nothing settled yet.
    pub fn new(identity: JobIdentity, now_unix_secs: u64) -> Self {
        Self {
            settled: SettledSet::over(identity.blocks),
            failed: FailedSet::new(),
            identity,
            created_unix_secs: now_unix_secs,
            updated_unix_secs: now_unix_secs,
        }
    }

    pub fn identity(&self) -> &JobIdentity {
        &self.identity
    }

    pub fn settled(&self) -> &SettledSet {
        &self.settled
    }

    pub fn failed(&self) -> &FailedSet {
        &self.failed
    }

    pub fn created_unix_secs(&self) -> u64 {
        self.created_unix_secs
    }

    pub fn updated_unix_secs(&self) -> u64 {
        self.updated_unix_secs
    }

    /// Stamp the time of this state, before saving it.
    pub fn set_updated_unix_secs(&mut self, now_unix_secs: u64) {
        self.updated_unix_secs = now_unix_secs;
    }

    /// Settle `index` (its write completed and a later fdatasync succeeded);
    /// a block that failed on an earlier run leaves the failed set. Returns
    /// whether it was newly settled.
    pub fn settle(&mut self, index: BlockIndex) -> bool {
        self.failed.remove(index);
        self.settled.settle(index)
    }

    /// Settle every index of `indexes`; returns how many were newly settled.
    pub fn settle_many(&mut self, indexes: impl IntoIterator<Item = BlockIndex>) -> u64 {
        indexes.into_iter().map(|index| u64::from(self.settle(index))).sum()
    }

    /// Record that `index` failed on every source. A settled block's data is
    /// on disk, so recording it as failed is a caller bug: it is refused
    /// (`false`, and a debug assertion).
    ///
    /// # Panics
    /// If `index` is outside the layout.
    pub fn fail(&mut self, index: BlockIndex, reason: &str) -> bool {
        assert!(
            self.settled.blocks().contains(index),
            "failing block {index} outside the blocks {} of the checkpoint",
            self.settled.blocks()
        );
        let settled = self.settled.is_settled(index);
        debug_assert!(!settled, "block {index} is settled and cannot fail");
        if settled {
            return false;
        }
        self.failed.fail(index, reason);
        true
    }

    pub fn ledger(&self) -> Ledger {
        self.settled.ledger(&self.failed)
    }

    /// Bytes of the volume covered by settled blocks (the short tail block
    /// counts its real length).
    pub fn bytes_settled(&self) -> u64 {
        bytes_settled(&self.identity.layout, &self.settled)
    }

    /// Whether this checkpoint belongs to the job `expected`; `Err` names
    /// every field that differs, as "what: expected X, found Y".
    pub fn check_identity(&self, expected: &JobIdentity) -> Result<(), Vec<String>> {
        let what = expected.differences(&self.identity);
        if what.is_empty() { Ok(()) } else { Err(what) }
    }

    /// The file bytes of this checkpoint.
    pub fn encode(&self) -> Vec<u8> {
        // What is persisted must satisfy invariant 1; O(ranges + failed), small
        // next to the two fsyncs of a save.
        debug_assert!(self.ledger().is_consistent(), "ledger broken: {:?}", self.ledger());
        debug_assert_eq!(self.settled.check_invariants(), Ok(()));
        let identity = &self.identity;
        let mut out = Vec::with_capacity(MIN_BYTES + 4 * self.settled.range_count() + 64 * self.failed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&identity.manifest_digest.0);
        out.push(match identity.target.kind {
            TargetKind::File => KIND_FILE,
            TargetKind::BlockDevice => KIND_BLOCK_DEVICE,
        });
        for value in [identity.target.dev, identity.target.ino, identity.target.size_bytes] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&identity.layout.volume_size_bytes().to_le_bytes());
        out.extend_from_slice(&identity.layout.block_size_bytes().to_le_bytes());
        out.extend_from_slice(&identity.blocks.start.to_le_bytes());
        out.extend_from_slice(&identity.blocks.end.to_le_bytes());
        for value in [self.created_unix_secs, self.updated_unix_secs, self.bytes_settled(), self.settled.cursor()] {
            out.extend_from_slice(&value.to_le_bytes());
        }

        out.extend_from_slice(&(self.settled.range_count() as u64).to_le_bytes());
        let mut previous_end = self.settled.cursor();
        for (start, end) in self.settled.ranges_above_cursor() {
            put_varint(&mut out, start - previous_end);
            put_varint(&mut out, end - start);
            previous_end = end;
        }

        out.extend_from_slice(&(self.failed.len() as u64).to_le_bytes());
        let mut previous_index = 0;
        for (index, reason) in self.failed.iter() {
            put_varint(&mut out, index - previous_index);
            put_varint(&mut out, reason.len() as u64);
            out.extend_from_slice(reason.as_bytes());
            previous_index = index;
        }

        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        out
    }

    /// Parse checkpoint bytes. Never panics; memory is bounded by the input
    /// length. Torn, truncated, flipped or impossible content is
    /// [`FormatError::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, FormatError> {
        if bytes.len() < MIN_BYTES {
            return Err(corrupt(format!("truncated: {} bytes, a checkpoint has at least {MIN_BYTES}", bytes.len())));
        }
        if bytes.len() > CHECKPOINT_SIZE_MAX_BYTES {
            return Err(corrupt(format!(
                "{} bytes, more than the {CHECKPOINT_SIZE_MAX_BYTES}-byte limit",
                bytes.len()
            )));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("not a rehydrate checkpoint (bad magic)".into()));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
        if blake3::hash(body).as_bytes() != checksum {
            return Err(corrupt("checksum mismatch: the file is torn or damaged".into()));
        }
        let mut reader = Reader { bytes: body, pos: MAGIC.len() };
        let version = reader.u32()?;
        if version != FORMAT_VERSION && version != FORMAT_VERSION_WHOLE {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        let checkpoint = decode_body(&mut reader, version)?;
        if reader.remaining() != 0 {
            return Err(corrupt(format!("{} unexpected bytes after the failed blocks", reader.remaining())));
        }
        Ok(checkpoint)
    }
}

fn decode_body(reader: &mut Reader<'_>, version: u32) -> Result<Checkpoint, FormatError> {
    let identity = decode_identity(reader, version)?;
    let created_unix_secs = reader.u64()?;
    let updated_unix_secs = reader.u64()?;
    let bytes_settled_stored = reader.u64()?;
    let cursor = reader.u64()?;

    let range_count = reader.count("settled ranges")?;
    let mut previous_end = cursor;
    // Ranges are checked one by one as they are read, so a hostile count
    // allocates nothing it does not also find bytes for.
    let ranges = (0..range_count).map(|_| {
        let start = previous_end.checked_add(reader.varint().map_err(detail)?).ok_or("settled range overflows")?;
        let end = start.checked_add(reader.varint().map_err(detail)?).ok_or("settled range overflows")?;
        previous_end = end;
        Ok((start, end))
    });
    let settled = SettledSet::from_parts(identity.blocks, cursor, ranges).map_err(corrupt)?;

    let failed = decode_failed(reader, &settled)?;
    let bytes_settled_computed = bytes_settled(&identity.layout, &settled);
    if bytes_settled_stored != bytes_settled_computed {
        return Err(corrupt(format!(
            "it records {bytes_settled_stored} bytes settled but its blocks cover {bytes_settled_computed}"
        )));
    }
    Ok(Checkpoint { identity, settled, failed, created_unix_secs, updated_unix_secs })
}

fn decode_identity(reader: &mut Reader<'_>, version: u32) -> Result<JobIdentity, FormatError> {
    let manifest_digest = ManifestDigest(reader.array()?);
    let kind = match reader.u8()? {
        KIND_FILE => TargetKind::File,
        KIND_BLOCK_DEVICE => TargetKind::BlockDevice,
        other => return Err(corrupt(format!("unknown target kind {other}"))),
    };
    let target = TargetIdentity { kind, dev: reader.u64()?, ino: reader.u64()?, size_bytes: reader.u64()? };
    let volume_size_bytes = reader.u64()?;
    let block_size_bytes = reader.u32()?;
    let layout = BlockLayout::new(volume_size_bytes, block_size_bytes)
        .map_err(|error| corrupt(format!("impossible block layout: {error}")))?;
    let blocks = if version == FORMAT_VERSION_WHOLE {
        BlockRange::all(&layout)
    } else {
        BlockRange { start: reader.u64()?, end: reader.u64()? }
    };
    if blocks.is_empty() || blocks.end > layout.block_count() {
        return Err(corrupt(format!(
            "blocks {blocks} are empty or outside the {} of the layout",
            layout.block_count()
        )));
    }
    Ok(JobIdentity { manifest_digest, target, layout, blocks })
}

fn decode_failed(reader: &mut Reader<'_>, settled: &SettledSet) -> Result<FailedSet, FormatError> {
    let count = reader.count("failed blocks")?;
    let mut failed = FailedSet::new();
    let mut previous: Option<BlockIndex> = None;
    for _ in 0..count {
        let delta = reader.varint()?;
        let index = match previous {
            None => delta,
            Some(_) if delta == 0 => return Err(corrupt("failed blocks repeat or are out of order".into())),
            Some(previous) => previous.checked_add(delta).ok_or_else(|| overflow("failed block index"))?,
        };
        if !settled.blocks().contains(index) {
            return Err(corrupt(format!("failed block {index} is outside the blocks {}", settled.blocks())));
        }
        if settled.is_settled(index) {
            return Err(corrupt(format!("block {index} is recorded both settled and failed")));
        }
        let reason_len = reader.varint()?;
        if reason_len > FAILURE_REASON_MAX_BYTES as u64 {
            return Err(corrupt(format!("failure reason of block {index} is {reason_len} bytes long")));
        }
        let reason = std::str::from_utf8(reader.take(reason_len as usize)?)
            .map_err(|_| corrupt(format!("failure reason of block {index} is not UTF-8")))?;
        failed.fail(index, reason);
        previous = Some(index);
    }
    Ok(failed)
}

fn bytes_settled(layout: &BlockLayout, settled: &SettledSet) -> u64 {
    let block_count = layout.block_count();
    let block_size_bytes = u64::from(layout.block_size_bytes());
    let full = settled.settled_count() * block_size_bytes;
    // The short tail block covers less than a whole block.
    if block_count > 0 && settled.is_settled(block_count - 1) {
        full - (block_size_bytes - u64::from(layout.len(block_count - 1)))
    } else {
        full
    }
}

fn corrupt(detail: String) -> FormatError {
    FormatError::Corrupt(detail)
}

fn detail(error: FormatError) -> String {
    match error {
        FormatError::Corrupt(detail) => detail,
        other => other.to_string(),
    }
}

fn overflow(what: &str) -> FormatError {
    corrupt(format!("{what} overflows a 64-bit index"))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A cursor over untrusted bytes: every read is bounds-checked and fails as
/// "truncated" instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        if len > self.remaining() {
            return Err(corrupt(format!("truncated: needs {len} bytes at offset {}", self.pos)));
        }
        let slice = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of entries that take at least 2 bytes each: refused if the
    /// rest of the input cannot hold that many.
    fn count(&mut self, what: &str) -> Result<u64, FormatError> {
        let count = self.u64()?;
        if count > (self.remaining() / 2) as u64 {
            return Err(corrupt(format!("claims {count} {what} but only {} bytes remain", self.remaining())));
        }
        Ok(count)
    }

    /// LEB128, canonical (no redundant trailing zero groups), at most 64 bits.
    fn varint(&mut self) -> Result<u64, FormatError> {
        let mut value = 0u64;
        for group in 0..VARINT_MAX_BYTES {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if group == VARINT_MAX_BYTES - 1 && byte > 1 {
                return Err(corrupt("varint overflows 64 bits".into()));
            }
            value |= bits << (7 * group);
            if byte & 0x80 == 0 {
                if byte == 0 && group > 0 {
                    return Err(corrupt("non-canonical varint".into()));
                }
                return Ok(value);
            }
        }
        Err(corrupt("varint longer than 10 bytes".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn identity(volume_size_bytes: u64) -> JobIdentity {
        JobIdentity {
            manifest_digest: ManifestDigest([7; 32]),
            target: TargetIdentity { kind: TargetKind::File, dev: 2049, ino: 1234, size_bytes: volume_size_bytes },
            layout: BlockLayout::new(volume_size_bytes, 4096).unwrap(),
            blocks: BlockRange::all(&BlockLayout::new(volume_size_bytes, 4096).unwrap()),
        }
    }

    fn sample() -> Checkpoint {
        let mut checkpoint = Checkpoint::new(identity(10 * 4096 + 100), 1_700_000_000);
        checkpoint.settle_many([0, 1, 2, 5, 6, 10]);
        checkpoint.fail(3, "404 on every source");
        checkpoint.fail(8, "checksum mismatch on s3, timeout on mirror");
        checkpoint.set_updated_unix_secs(1_700_000_060);
        checkpoint
    }

    #[test]
    fn roundtrip_and_bookkeeping() {
        let checkpoint = sample();
        let bytes = checkpoint.encode();
        let decoded = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(decoded, checkpoint);
        assert_eq!(decoded.settled().cursor(), 3);
        assert_eq!(decoded.bytes_settled(), 5 * 4096 + 100, "the tail block counts 100 bytes");
        assert_eq!(decoded.failed().reason(3), Some("404 on every source"));
        assert_eq!(decoded.updated_unix_secs(), 1_700_000_060);
        assert!(decoded.ledger().is_consistent());
        assert!(bytes.len() < 300, "a small checkpoint stays small: {} bytes", bytes.len());
    }

    #[test]
    fn settling_a_failed_block_removes_it_from_failed() {
        let mut checkpoint = sample();
        assert!(checkpoint.settle(3));
        assert!(!checkpoint.failed().contains(3));
        assert_eq!(checkpoint.settled().cursor(), 4, "block 4 still holds the cursor");
        checkpoint.settle(4);
        assert_eq!(checkpoint.settled().cursor(), 7);
        let ledger = checkpoint.ledger();
        assert!(ledger.is_consistent());
        assert_eq!((ledger.settled, ledger.failed, ledger.pending), (8, 1, 2));
    }

    #[test]
    fn every_truncation_is_corrupt() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            match Checkpoint::decode(&bytes[..len]) {
                Err(FormatError::Corrupt(_)) => {}
                other => panic!("truncated to {len} bytes: {other:?}"),
            }
        }
    }

    #[test]
    fn every_bit_flip_is_corrupt() {
        let bytes = sample().encode();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            match Checkpoint::decode(&flipped) {
                Err(FormatError::Corrupt(_)) => {}
                other => panic!("bit {bit} flipped: {other:?}"),
            }
        }
    }

    /// Bytes with a valid checksum, so the structural checks are reached.
    fn resealed(mut body: Vec<u8>) -> Vec<u8> {
        body.truncate(body.len() - CHECKSUM_BYTES);
        let checksum = blake3::hash(&body);
        body.extend_from_slice(checksum.as_bytes());
        body
    }

    #[test]
    fn other_versions_are_refused_as_unsupported() {
        let mut bytes = sample().encode();
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(Checkpoint::decode(&resealed(bytes)), Err(FormatError::UnsupportedVersion { found: 3 }));
    }

    #[test]
    fn impossible_content_with_a_good_checksum_is_corrupt() {
        let bytes = sample().encode();
        let cursor_at = FIXED_BYTES - 24;
        // Cursor beyond the layout.
        let mut beyond = bytes.clone();
        beyond[cursor_at..cursor_at + 8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(
            matches!(Checkpoint::decode(&resealed(beyond)), Err(FormatError::Corrupt(d)) if d.contains("cursor 1000"))
        );
        // A range count the file cannot hold.
        let mut count = bytes.clone();
        count[cursor_at + 8..cursor_at + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Checkpoint::decode(&resealed(count)), Err(FormatError::Corrupt(d)) if d.contains("claims")));
        // Trailing garbage before the checksum.
        let mut trailing = bytes.clone();
        trailing.insert(bytes.len() - CHECKSUM_BYTES, 0);
        assert!(
            matches!(Checkpoint::decode(&resealed(trailing)), Err(FormatError::Corrupt(d)) if d.contains("unexpected bytes"))
        );
    }

    /// Where `blocks` sits: after magic, version, digest, target and layout.
    const BLOCKS_AT: usize = 8 + 4 + 32 + 25 + 12;

    #[test]
    fn version_1_reads_as_a_whole_volume_checkpoint() {
        let checkpoint = sample();
        let mut v1 = checkpoint.encode();
        v1.drain(BLOCKS_AT..BLOCKS_AT + 16);
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let decoded = Checkpoint::decode(&resealed(v1)).unwrap();
        assert_eq!(decoded, checkpoint);
        assert!(decoded.identity().blocks.is_all(&decoded.identity().layout));
    }

    #[test]
    fn a_range_checkpoint_roundtrips_and_is_another_job() {
        let whole = identity(10 * 4096 + 100);
        let shard = JobIdentity { blocks: BlockRange { start: 4, end: 8 }, ..whole };
        let mut checkpoint = Checkpoint::new(shard, 1);
        checkpoint.settle_many([4, 5, 7]);
        checkpoint.fail(6, "404");
        assert_eq!(checkpoint.bytes_settled(), 3 * 4096);
        let ledger = checkpoint.ledger();
        assert_eq!((ledger.block_count, ledger.settled, ledger.failed, ledger.pending), (4, 3, 1, 0));
        let decoded = Checkpoint::decode(&checkpoint.encode()).unwrap();
        assert_eq!(decoded, checkpoint);
        assert_eq!(decoded.settled().cursor(), 6);
        let what = decoded.check_identity(&whole).unwrap_err();
        assert_eq!(what, vec!["blocks: expected 0..11, found 4..8".to_owned()]);
        // A range outside the layout, with a good checksum: corrupt.
        let mut bytes = checkpoint.encode();
        bytes[BLOCKS_AT + 8..BLOCKS_AT + 16].copy_from_slice(&12u64.to_le_bytes());
        assert!(matches!(Checkpoint::decode(&resealed(bytes)), Err(FormatError::Corrupt(d)) if d.contains("outside")));
    }

    #[test]
    fn varints_are_canonical_and_bounded() {
        let decode = |bytes: &[u8]| Reader { bytes, pos: 0 }.varint();
        for value in [0, 1, 127, 128, 300, u64::MAX / 3, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(decode(&out), Ok(value));
        }
        assert!(decode(&[0x80, 0x00]).is_err(), "redundant zero group");
        assert!(decode(&[0xff; 10]).is_err(), "over 64 bits");
        assert!(decode(&[0x80]).is_err(), "truncated");
    }

    proptest! {
        #[test]
        fn roundtrip_random_progress(
            block_count in 1u64..2000,
            settle in proptest::collection::vec(any::<prop::sample::Index>(), 0..500),
            fail in proptest::collection::vec((any::<prop::sample::Index>(), ".{0,300}"), 0..40),
        ) {
            let mut checkpoint = Checkpoint::new(identity(block_count * 4096 - 1), 42);
            for pick in settle {
                checkpoint.settle(pick.index(block_count as usize) as u64);
            }
            for (pick, reason) in fail {
                let index = pick.index(block_count as usize) as u64;
                if !checkpoint.settled().is_settled(index) {
                    checkpoint.fail(index, &reason);
                }
            }
            let bytes = checkpoint.encode();
            let decoded = Checkpoint::decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(decoded.ledger().is_consistent());
            prop_assert_eq!(decoded.encode(), bytes);
            prop_assert_eq!(decoded, checkpoint);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Checkpoint::decode(&bytes);
        }

        /// Random edits of a valid checkpoint, resealed so the checksum
        /// passes: the structural checks must hold without a panic, and
        /// whatever decodes must be self-consistent.
        #[test]
        fn resealed_edits_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = sample().encode();
            let body_len = bytes.len() - CHECKSUM_BYTES;
            for (at, value) in edits {
                let at = at.index(body_len - 12) + 12; // keep magic and version
                bytes[at] = value;
            }
            if let Ok(decoded) = Checkpoint::decode(&resealed(bytes)) {
                prop_assert!(decoded.ledger().is_consistent());
                decoded.settled().check_invariants().map_err(TestCaseError::fail)?;
            }
        }
    }
}
