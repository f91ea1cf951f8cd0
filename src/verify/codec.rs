//! Longhorn's block codecs, read side: an LZ4 frame or a gzip stream,
//! decoded into a pooled page-aligned buffer and never past the block's
//! length (a bomb stops there and is refused as corrupt).
//!
//! Longhorn writes a block object with `newCompressionWriter` (longhorn/backupstore
//! `util/util.go`: `lz4.NewWriter`, a frame, or `gzip.NewWriter`), and on
//! restore falls back to the other of the two when the first fails on its
//! header (`DecompressAndVerifyWithFallback` in `deltablock.go`, for
//! longhorn/longhorn#7687: objects written with a method other than the one
//! the backup names). The same fallback is here, decided by the object's
//! magic bytes; the content hash still decides whether the block is good.

use std::io::Read;

use bytes::Bytes;

use crate::block::Compression;
use crate::buf::BufPool;
use crate::error::StoreError;

/// The magic number that opens an LZ4 frame (little-endian 0x184D2204).
const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
/// The two bytes that open a gzip member.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Decode `raw`, named `compression` (lz4 or gzip), to exactly `len_bytes`.
pub(super) fn decode_longhorn(raw: &[u8], compression: Compression, len_bytes: usize) -> Result<Bytes, StoreError> {
    let codec = match compression {
        Compression::Lz4 if raw.starts_with(&GZIP_MAGIC) => Compression::Gzip,
        Compression::Gzip if raw.starts_with(&LZ4_FRAME_MAGIC) => Compression::Lz4,
        other => other,
    };
    match codec {
        Compression::Lz4 => read_bounded(lz4_flex::frame::FrameDecoder::new(raw), "lz4", len_bytes),
        Compression::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(raw), "gzip", len_bytes),
        other => Err(StoreError::corrupt(format!("{} is not a Longhorn codec", other.name()))),
    }
}

/// Read `reader` to its end into a pooled buffer of `len_bytes`; more than
/// that is corrupt (a short result is left for the caller's length check).
fn read_bounded(mut reader: impl Read, codec: &str, len_bytes: usize) -> Result<Bytes, StoreError> {
    let error = |e: std::io::Error| StoreError::corrupt(format!("{codec}: {e}"));
    let mut pooled = BufPool::shared().take(len_bytes);
    let mut fallback = Vec::new();
    let out: &mut [u8] = match pooled.as_mut() {
        Some(buf) => &mut buf.spare_mut()[..len_bytes],
        None => {
            fallback.resize(len_bytes, 0);
            &mut fallback
        }
    };
    let mut filled = 0;
    while filled < len_bytes {
        match reader.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(error(e)),
        }
    }
    let mut probe = [0u8; 1];
    if filled == len_bytes && reader.read(&mut probe).map_err(error)? > 0 {
        return Err(StoreError::corrupt(format!("{codec}: decodes to more than the block's {len_bytes} bytes")));
    }
    match pooled {
        Some(mut buf) => {
            buf.set_len(filled);
            Ok(buf.into_bytes())
        }
        None => {
            fallback.truncate(filled);
            Ok(Bytes::from(fallback))
        }
    }
}

/// The largest object a Longhorn codec can make of a block of `len_bytes`:
/// LZ4's worst case is `n + n/255 + 16` per block plus frame and block
/// headers; deflate's stored blocks add 5 bytes per 16 KiB plus the gzip
/// header and trailer. `n/64 + 4096` covers both with room.
pub fn stored_len_bound(len_bytes: u32) -> u32 {
    len_bytes + len_bytes / 64 + 4096
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use std::io::Write;

    fn lz4(data: &[u8]) -> Vec<u8> {
        let mut w = lz4_flex::frame::FrameEncoder::new(Vec::new());
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn decodes_both_codecs_and_falls_back_on_the_magic() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for (named, packed) in [(Compression::Lz4, lz4(&data)), (Compression::Gzip, gzip(&data))] {
            let out = decode_longhorn(&packed, named, data.len()).unwrap();
            assert_eq!(out[..], data[..]);
            assert!((out.as_ptr() as usize).is_multiple_of(crate::buf::ALIGN_BYTES));
            // Named the other codec (longhorn#7687): the magic decides.
            let other = if named == Compression::Lz4 { Compression::Gzip } else { Compression::Lz4 };
            assert_eq!(decode_longhorn(&packed, other, data.len()).unwrap()[..], data[..]);
            assert!(packed.len() <= stored_len_bound(data.len() as u32) as usize);
        }
    }

    #[test]
    fn bombs_and_garbage_are_corrupt() {
        let big = vec![0u8; 1 << 20];
        for packed in [lz4(&big), gzip(&big)] {
            let e = decode_longhorn(&packed, Compression::Lz4, 4096).unwrap_err();
            assert_eq!(e.class, ErrorClass::Corrupt, "{e}");
        }
        let mut torn = lz4(&big);
        torn.truncate(torn.len() / 2);
        assert_eq!(decode_longhorn(&torn, Compression::Lz4, 1 << 20).unwrap_err().class, ErrorClass::Corrupt);
        assert!(decode_longhorn(b"not a frame at all", Compression::Gzip, 4096).is_err());
        // Worst-case input (incompressible) stays under the bound.
        let noise: Vec<u8> = (0..(2u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for packed in [lz4(&noise), gzip(&noise)] {
            assert!(packed.len() <= stored_len_bound(noise.len() as u32) as usize);
        }
    }
}
