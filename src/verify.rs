//! Verify: the only way bytes become writable.
//!
//! In: the raw bytes of a block object as a source returned them, and what the
//! manifest says they must be. Out: a [`VerifiedBlock`], whose constructor is
//! private to this module, so an unverified block cannot reach the writer: the
//! writer only accepts `VerifiedBlock`s. Decompression is bounded by the
//! block's length (a zstd bomb cannot make us allocate more), into a
//! page-aligned buffer of the shared pool (`crate::buf`), and any mismatch
//! (length, hash, compression) is a [`Corrupt`](crate::error::ErrorClass::Corrupt)
//! fault of the source that sent the bytes.

use bytes::Bytes;

use crate::block::{Compression, ContentHash, HashAlgorithm};
use crate::buf::BufPool;
use crate::error::StoreError;

mod codec;

pub use codec::stored_len_bound;

/// What a block object must turn out to be.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    pub hash: ContentHash,
    pub algorithm: HashAlgorithm,
    pub compression: Compression,
    /// Length of the stored object.
    pub stored_len_bytes: u32,
    /// Length of the block once decompressed.
    pub len_bytes: u32,
    /// Where the hash the block must match comes from.
    pub hash_in: HashIn,
}

/// Where a block's expected hash comes from: data, so a kind of snapshot
/// that learns a block's checksum only with the block (an EBS snapshot:
/// `GetSnapshotBlock` answers the SHA-256 in `x-amz-Checksum`) is verified
/// here like any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashIn {
    /// [`Expected::hash`], known before the fetch (a rehydrate manifest).
    #[default]
    Snapshot,
    /// The object's last [`TRAILER_LEN_BYTES`] bytes, which its store
    /// appended from the answer's checksum header; the block is the bytes
    /// before them, and [`Expected::hash`] is unused. `stored_len_bytes`
    /// counts the trailer.
    Trailer,
}

/// Length of a [`HashIn::Trailer`] checksum: one SHA-256 or BLAKE3 digest.
pub const TRAILER_LEN_BYTES: usize = 32;

impl Expected {
    /// The identity of the block's object before it is fetched, when known:
    /// blocks with equal keys are one object, fetched once. A hash that comes
    /// with the answer identifies nothing in advance.
    pub fn object_identity(&self) -> Option<(ContentHash, Compression)> {
        (self.hash_in == HashIn::Snapshot).then_some((self.hash, self.compression))
    }
}

/// Bytes whose length and content hash matched the manifest.
#[derive(Debug, Clone)]
pub struct VerifiedBlock {
    bytes: Bytes,
}

impl VerifiedBlock {
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// A block of zeros: what the manifest says an absent block holds, so it
    /// needs no check.
    pub fn zeros(len_bytes: usize) -> Self {
        Self { bytes: zero_bytes(len_bytes) }
    }
}

/// A shared zero buffer: zero blocks are written from one allocation, which
/// starts page-aligned so they can go to the target with `O_DIRECT`. It is
/// `calloc`ed and only ever read, so its pages stay the kernel's shared zero
/// page: it costs address space, not memory.
fn zero_bytes(len_bytes: usize) -> Bytes {
    use std::sync::OnceLock;
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| {
        let len_max_bytes = crate::block::BLOCK_SIZE_MAX_BYTES as usize;
        let padded = Bytes::from(vec![0u8; len_max_bytes + crate::buf::ALIGN_BYTES]);
        let skip_bytes = padded.as_ptr().align_offset(crate::buf::ALIGN_BYTES);
        padded.slice(skip_bytes..skip_bytes + len_max_bytes)
    });
    debug_assert!(len_bytes <= zeros.len());
    zeros.slice(..len_bytes.min(zeros.len()))
}

/// Check `raw` against `expected`; decompress when the object is compressed.
///
/// The stored length is exact for rehydrate's own codecs (none, zstd: the
/// manifest records it) and a bound for Longhorn's (lz4, gzip: a Longhorn
/// backup records no object length, so the snapshot gives the codec's worst
/// case and the decoded length and hash decide).
pub fn verify(mut raw: Bytes, expected: &Expected) -> Result<VerifiedBlock, StoreError> {
    let exact = matches!(expected.compression, Compression::None | Compression::Zstd);
    if (exact && raw.len() != expected.stored_len_bytes as usize) || raw.len() > expected.stored_len_bytes as usize {
        let relation = if exact { "" } else { "at most " };
        return Err(StoreError::corrupt(format!(
            "object is {} bytes, the snapshot says {relation}{}",
            raw.len(),
            expected.stored_len_bytes
        )));
    }
    let len_bytes = expected.len_bytes as usize;
    let want = match expected.hash_in {
        HashIn::Snapshot => expected.hash,
        HashIn::Trailer => {
            let Some(at) = raw.len().checked_sub(TRAILER_LEN_BYTES) else {
                return Err(StoreError::corrupt("object shorter than its checksum trailer"));
            };
            let trailer = raw.split_off(at);
            ContentHash(trailer[..].try_into().expect("split at the trailer length"))
        }
    };
    let bytes = match expected.compression {
        Compression::None => raw,
        Compression::Zstd => decompress(&raw, len_bytes)?,
        Compression::Lz4 | Compression::Gzip => codec::decode_longhorn(&raw, expected.compression, len_bytes)?,
    };
    if bytes.len() != len_bytes {
        return Err(StoreError::corrupt(format!("block is {} bytes, the snapshot says {}", bytes.len(), len_bytes)));
    }
    let actual = expected.algorithm.hash(&bytes);
    if actual != want {
        return Err(StoreError::corrupt(format!(
            "{} mismatch: got {}, the {} says {}",
            expected.algorithm.name(),
            actual.to_hex(),
            if expected.hash_in == HashIn::Trailer { "answer's checksum" } else { "snapshot" },
            want.to_hex()
        )));
    }
    Ok(VerifiedBlock { bytes })
}

/// zstd-decompress `raw` into a pooled page-aligned buffer of `len_bytes`
/// (so the block can go to the target with `O_DIRECT`). Output that does not
/// fit `len_bytes` is refused by zstd (destination too small): a bomb stops
/// at the block's length.
fn decompress(raw: &[u8], len_bytes: usize) -> Result<Bytes, StoreError> {
    let zstd_error = |e: std::io::Error| StoreError::corrupt(format!("zstd: {e}"));
    let Some(mut out) = BufPool::shared().take(len_bytes) else {
        // Unreachable for a block (at most 64 MiB); bounded all the same.
        return zstd::bulk::decompress(raw, len_bytes).map(Bytes::from).map_err(zstd_error);
    };
    let written_bytes = decompress_to_buffer(raw, &mut out.spare_mut()[..len_bytes]).map_err(zstd_error)?;
    out.set_len(written_bytes);
    Ok(out.into_bytes())
}

thread_local! {
    /// This thread's zstd decompression context, made on first use and kept:
    /// making one per block (zstd's workspace, about 100 KiB, allocated and
    /// set up each time) was 3 % of a zstd restore's samples.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// [`zstd::bulk::decompress_to_buffer`] with this thread's context (each
/// frame is decoded from a fresh start: nothing carries over between
/// blocks).
fn decompress_to_buffer(raw: &[u8], destination: &mut [u8]) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match &mut *cell {
            Some(decompressor) => decompressor,
            empty => empty.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress_to_buffer(raw, destination)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    fn expected_for(data: &[u8], compression: Compression, stored: &[u8]) -> Expected {
        Expected {
            hash: HashAlgorithm::Blake3.hash(data),
            algorithm: HashAlgorithm::Blake3,
            compression,
            stored_len_bytes: stored.len() as u32,
            len_bytes: data.len() as u32,
            hash_in: HashIn::Snapshot,
        }
    }

    /// A checksum that came with the answer, as a trailer: checked like a
    /// manifest's hash, and the block is the bytes before it.
    #[test]
    fn a_trailer_checksum_is_checked() {
        let data = vec![4u8; 8192];
        let mut object = data.clone();
        object.extend_from_slice(&HashAlgorithm::Sha256.hash(&data).0);
        let exp = Expected {
            hash: ContentHash([0; 32]),
            algorithm: HashAlgorithm::Sha256,
            compression: Compression::None,
            stored_len_bytes: object.len() as u32,
            len_bytes: data.len() as u32,
            hash_in: HashIn::Trailer,
        };
        assert_eq!(exp.object_identity(), None, "nothing to deduplicate by");
        assert_eq!(verify(Bytes::from(object.clone()), &exp).unwrap().bytes()[..], data[..]);
        let mut bad = object.clone();
        bad[10] ^= 1;
        assert_eq!(verify(Bytes::from(bad), &exp).unwrap_err().class, ErrorClass::Corrupt);
        let mut bad_sum = object;
        *bad_sum.last_mut().unwrap() ^= 1;
        assert_eq!(verify(Bytes::from(bad_sum), &exp).unwrap_err().class, ErrorClass::Corrupt);
    }

    #[test]
    fn accepts_good_and_rejects_corrupt() {
        let data = vec![7u8; 8192];
        let exp = expected_for(&data, Compression::None, &data);
        assert_eq!(verify(Bytes::from(data.clone()), &exp).unwrap().bytes()[..], data[..]);
        let mut bad = data.clone();
        bad[100] ^= 1;
        assert_eq!(verify(Bytes::from(bad), &exp).unwrap_err().class, ErrorClass::Corrupt);
        assert_eq!(verify(Bytes::from(data[..100].to_vec()), &exp).unwrap_err().class, ErrorClass::Corrupt);
    }

    #[test]
    fn zero_blocks_are_page_aligned() {
        let zeros = VerifiedBlock::zeros(1 << 20);
        assert_eq!(zeros.len(), 1 << 20);
        assert!(zeros.bytes().iter().all(|&b| b == 0));
        assert!((zeros.bytes().as_ptr() as usize).is_multiple_of(crate::buf::ALIGN_BYTES));
    }

    #[test]
    fn zstd_is_bounded_and_checked() {
        let data = vec![3u8; 8192];
        let packed = zstd::bulk::compress(&data, 3).unwrap();
        let exp = expected_for(&data, Compression::Zstd, &packed);
        let unpacked = verify(Bytes::from(packed.clone()), &exp).unwrap();
        assert_eq!(unpacked.bytes()[..], data[..]);
        // Decompressed into a page-aligned pooled buffer, ready for O_DIRECT.
        assert!((unpacked.bytes().as_ptr() as usize).is_multiple_of(crate::buf::ALIGN_BYTES));
        // A bomb: claims a small block but decompresses larger.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let mut bomb = exp;
        bomb.stored_len_bytes = big.len() as u32;
        assert_eq!(verify(Bytes::from(big), &bomb).unwrap_err().class, ErrorClass::Corrupt);
        // This thread's context, reused after a failed frame and a garbage
        // one, decodes each block from a fresh start.
        let garbage = expected_for(&data, Compression::Zstd, &[0xAB; 64]);
        assert_eq!(verify(Bytes::from(vec![0xABu8; 64]), &garbage).unwrap_err().class, ErrorClass::Corrupt);
        let other: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        let other_packed = zstd::bulk::compress(&other, 3).unwrap();
        let other_exp = expected_for(&other, Compression::Zstd, &other_packed);
        assert_eq!(verify(Bytes::from(other_packed), &other_exp).unwrap().bytes()[..], other[..]);
        let again = expected_for(&data, Compression::Zstd, &packed);
        assert_eq!(verify(Bytes::from(packed), &again).unwrap().bytes()[..], data[..]);
    }
}
