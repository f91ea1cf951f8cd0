//! Manifest tests: roundtrips, digest identity, and every hostile input the
//! decoder must refuse with the right error (never a panic).

#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

use super::*;
use proptest::prelude::*;

const LIMITS: ManifestLimits = ManifestLimits { entries_max: 16 << 20 };

fn hash_of(index: u64, seed: u8) -> ContentHash {
    let mut h = [seed; 32];
    h[..8].copy_from_slice(&index.to_le_bytes());
    ContentHash(h)
}

/// A small zstd manifest: 4 blocks of 4 KiB plus a 100-byte tail; block 1 is
/// zero (absent), block 2 stored raw, the tail compressed.
fn small() -> Manifest {
    let layout = BlockLayout::new(4 * 4096 + 100, 4096).unwrap();
    let mut b = ManifestBuilder::new("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd)
        .unwrap()
        .created_unix_secs(1_700_000_000);
    for (index, stored_len_bytes, compression) in [
        (0, 1000, Compression::Zstd),
        (2, 4096, Compression::None),
        (3, 4096, Compression::Zstd),
        (4, 57, Compression::Zstd),
    ] {
        b.push(BlockEntry { index, hash: hash_of(index, 7), stored_len_bytes, compression }).unwrap();
    }
    b.finish()
}

/// Recompute the trailer so a crafted change reaches field validation.
fn reseal(bytes: &mut [u8]) {
    let body_len = bytes.len() - 32;
    let digest = blake3::hash(&bytes[..body_len]);
    bytes[body_len..].copy_from_slice(digest.as_bytes());
}

fn set_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn set_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Offset of entry `position` in the encoding of a manifest named `name_len` bytes.
fn entry_offset(name_len: usize, position: usize) -> usize {
    48 + name_len + 48 * position
}

/// Apply `change` to the encoding of `small()`, reseal, decode.
fn decode_crafted(change: impl FnOnce(&mut Vec<u8>)) -> ManifestError {
    let mut bytes = small().encode();
    change(&mut bytes);
    reseal(&mut bytes);
    Manifest::decode(&bytes, &LIMITS).expect_err("crafted manifest must be refused")
}

fn assert_says(err: &ManifestError, needles: &[&str]) {
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "{text:?} should mention {needle:?}");
    }
}

#[test]
fn small_roundtrip_and_accessors() {
    let m = small();
    let bytes = m.encode();
    assert_eq!(bytes.len() as u64, m.encoded_len());
    assert_eq!(bytes.len(), 48 + 5 + 4 * 48 + 32);
    assert_eq!(&bytes[..8], b"RHYDMAN1");
    assert_eq!(m.digest().0, bytes[bytes.len() - 32..]);
    let back = Manifest::decode(&bytes, &LIMITS).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.compression(), Compression::Zstd);
    assert_eq!(back.created_unix_secs(), 1_700_000_000);
    assert_eq!(back.entry(1), None);
    assert_eq!(back.entry(2).unwrap().stored_len_bytes, 4096);
    assert_eq!(back.entry(5), None);
    assert_eq!(back.stored_bytes_total(), 1000 + 4096 + 4096 + 57);
    assert_eq!(back.block_bytes_total(), 3 * 4096 + 100);
}

#[test]
fn entries_take_at_most_48_bytes_in_memory() {
    assert!(std::mem::size_of::<BlockEntry>() <= 48);
}

#[test]
fn encoded_len_max_bounds_every_manifest_within_limits() {
    let limits = ManifestLimits { entries_max: 3 };
    assert_eq!(Manifest::encoded_len_max(&limits), 48 + 255 + 3 * 48 + 32);
    assert!(small().encoded_len() <= Manifest::encoded_len_max(&ManifestLimits { entries_max: 4 }));
    // An absurd limit is capped by the most blocks a layout can have.
    let huge = Manifest::encoded_len_max(&ManifestLimits { entries_max: u64::MAX });
    assert_eq!(huge, 48 + 255 + (1u64 << 38) * 48 + 32);
}

#[test]
fn entries_over_the_limit_are_refused_before_anything_else() {
    let bytes = small().encode();
    let err = Manifest::decode(&bytes, &ManifestLimits { entries_max: 3 }).unwrap_err();
    assert_eq!(err, ManifestError::TooManyEntries { entry_count: 4, entries_max: 3 });
    assert_says(&err, &["4 block entries", "limit of 3"]);
    assert!(small().check_limits(&ManifestLimits { entries_max: 3 }).is_err());
    assert!(small().check_limits(&ManifestLimits { entries_max: 4 }).is_ok());
}

#[test]
fn truncation_at_every_length_is_reported_as_truncation() {
    let bytes = small().encode();
    for len in 0..bytes.len() {
        let err = Manifest::decode(&bytes[..len], &LIMITS).unwrap_err();
        assert!(matches!(err, ManifestError::Truncated { len_bytes, .. } if len_bytes == len as u64), "{len}: {err}");
        assert_says(&err, &["truncated or corrupt", "re-create or re-download"]);
    }
}

#[test]
fn trailing_bytes_are_refused() {
    let mut bytes = small().encode();
    bytes.push(0);
    let err = Manifest::decode(&bytes, &LIMITS).unwrap_err();
    assert!(matches!(err, ManifestError::TrailingBytes { .. }), "{err}");
}

#[test]
fn every_single_bit_flip_is_refused() {
    let bytes = small().encode();
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        let err = Manifest::decode(&flipped, &LIMITS).expect_err("a flipped bit must be caught");
        // Outside magic, version, name length and count, the trailer catches it.
        let byte = bit / 8;
        if (16..40).contains(&byte) || byte >= 48 {
            assert!(matches!(err, ManifestError::DigestMismatch { .. }), "byte {byte}: {err}");
            assert_says(&err, &["truncated or corrupt"]);
        }
    }
}

#[test]
fn digest_changes_with_any_field() {
    let base = small();
    let layout = base.layout;
    let build = |name: &str, layout: BlockLayout, alg, comp, created, entries: &[BlockEntry]| {
        let mut b = ManifestBuilder::new(name, layout, alg, comp).unwrap().created_unix_secs(created);
        for e in entries {
            b.push(*e).unwrap();
        }
        b.finish()
    };
    let entries = base.entries().to_vec();
    let same = build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &entries);
    assert_eq!(same.digest(), base.digest());
    let mut hash_bit = entries.clone();
    hash_bit[1].hash.0[31] ^= 1;
    let mut stored_len = entries.clone();
    stored_len[0].stored_len_bytes += 1;
    let mut index = entries.clone();
    index[0].index = 1;
    let mut comp = entries.clone();
    comp[1].compression = Compression::Zstd;
    let variants = [
        build("vol-2", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &entries),
        build("vol-1", layout, HashAlgorithm::Sha256, Compression::Zstd, 1_700_000_000, &entries),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_001, &entries),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &entries[..3]),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &hash_bit),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &stored_len),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &index),
        build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &comp),
        build(
            "vol-1",
            BlockLayout::new(layout.volume_size_bytes() + 1, 4096).unwrap(),
            HashAlgorithm::Blake3,
            Compression::Zstd,
            1_700_000_000,
            &entries[..3],
        ),
    ];
    let mut seen = vec![base.digest()];
    for v in &variants {
        assert!(!seen.contains(&v.digest()), "{v:?} collides");
        seen.push(v.digest());
    }
    // The uncompressed-snapshot variant (no zstd entries allowed there).
    let raw = build("vol-1", layout, HashAlgorithm::Blake3, Compression::None, 1_700_000_000, &entries[1..2]);
    let raw_zstd = build("vol-1", layout, HashAlgorithm::Blake3, Compression::Zstd, 1_700_000_000, &entries[1..2]);
    assert_ne!(raw.digest(), raw_zstd.digest());
}

#[test]
fn bad_magic_is_not_a_manifest() {
    let mut bytes = small().encode();
    bytes[0] = b'X';
    let err = Manifest::decode(&bytes, &LIMITS).unwrap_err();
    assert!(matches!(err, ManifestError::BadMagic { .. }), "{err}");
    assert_says(&err, &["not a rehydrate manifest", "RHYDMAN1"]);
    let err = Manifest::decode(b"{\"json\": true}", &LIMITS).unwrap_err();
    assert!(matches!(err, ManifestError::BadMagic { .. }), "{err}");
}

#[test]
fn future_version_is_refused_with_upgrade_advice() {
    let err = decode_crafted(|b| set_u32(b, 8, 2));
    assert_eq!(err, ManifestError::UnsupportedVersion { version: 2 });
    assert_says(&err, &["version 2", "upgrade"]);
    // Even when the rest of a future format is shorter than v1's header.
    let mut short = b"RHYDMAN1".to_vec();
    short.extend_from_slice(&7u32.to_le_bytes());
    assert_eq!(Manifest::decode(&short, &LIMITS).unwrap_err(), ManifestError::UnsupportedVersion { version: 7 });
}

#[test]
fn entry_count_overflow_is_refused_without_allocating() {
    let mut bytes = small().encode();
    set_u64(&mut bytes, 40, u64::MAX);
    let err = Manifest::decode(&bytes, &LIMITS).unwrap_err();
    assert_eq!(err, ManifestError::TooManyEntries { entry_count: u64::MAX, entries_max: LIMITS.entries_max });
    // With no limit at all, the length check still refuses it: the count
    // times 48 would overflow, and saturates to a length no buffer has.
    let err = Manifest::decode(&bytes, &ManifestLimits { entries_max: u64::MAX }).unwrap_err();
    assert!(matches!(err, ManifestError::Truncated { needed_bytes: u64::MAX, .. }), "{err}");
    // A count that does not overflow but is far beyond the bytes present.
    set_u64(&mut bytes, 40, 1 << 40);
    let err = Manifest::decode(&bytes, &ManifestLimits { entries_max: u64::MAX }).unwrap_err();
    assert!(matches!(err, ManifestError::Truncated { .. }), "{err}");
}

#[test]
fn more_entries_than_blocks_is_refused() {
    // Shrink the volume to 3 blocks while 4 entries remain.
    let err = decode_crafted(|b| set_u64(b, 24, 3 * 4096));
    assert_eq!(err, ManifestError::EntriesExceedBlocks { entry_count: 4, block_count: 3 });
    assert_says(&err, &["4 block entries", "only 3 blocks", "re-create"]);
}

#[test]
fn out_of_order_and_duplicate_indexes_are_refused() {
    let err = decode_crafted(|b| set_u64(b, entry_offset(5, 1), 0));
    assert_eq!(
        err,
        ManifestError::Entry { position: 1, index: 0, problem: EntryProblem::NotIncreasing { previous: 0 } }
    );
    assert_says(&err, &["entry 1 (block 0)", "previous entry's block 0", "re-create"]);
    let err = decode_crafted(|b| {
        set_u64(b, entry_offset(5, 2), 2);
    });
    assert!(
        matches!(
            err,
            ManifestError::Entry { position: 2, index: 2, problem: EntryProblem::NotIncreasing { previous: 2 } }
        ),
        "{err}"
    );
    // Swapped order: entry 1 names block 3, entry 2 names block 2.
    let err = decode_crafted(|b| {
        set_u64(b, entry_offset(5, 1), 3);
        set_u64(b, entry_offset(5, 2), 2);
    });
    assert!(matches!(err, ManifestError::Entry { position: 2, index: 2, .. }), "{err}");
}

#[test]
fn index_past_the_volume_is_refused() {
    let err = decode_crafted(|b| set_u64(b, entry_offset(5, 3), 5));
    assert_eq!(
        err,
        ManifestError::Entry { position: 3, index: 5, problem: EntryProblem::OutOfVolume { block_count: 5 } }
    );
    assert_says(&err, &["block 5", "past the end of the volume", "5 blocks"]);
    let err = decode_crafted(|b| set_u64(b, entry_offset(5, 3), u64::MAX));
    assert!(matches!(err, ManifestError::Entry { problem: EntryProblem::OutOfVolume { .. }, .. }), "{err}");
}

#[test]
fn bad_stored_lengths_are_refused() {
    let err = decode_crafted(|b| set_u32(b, entry_offset(5, 0) + 8, 0));
    assert!(matches!(err, ManifestError::Entry { position: 0, problem: EntryProblem::StoredLenZero, .. }), "{err}");
    assert_says(&err, &["stored length is 0"]);
    let err = decode_crafted(|b| set_u32(b, entry_offset(5, 0) + 8, u32::MAX));
    assert!(
        matches!(
            err,
            ManifestError::Entry { problem: EntryProblem::StoredLenOverBound { stored_len_bytes: u32::MAX, .. }, .. }
        ),
        "{err}"
    );
    assert_says(&err, &["4294967295", "zstd's bound"]);
    // Raw block 2 must be exactly 4096 bytes.
    let err = decode_crafted(|b| set_u32(b, entry_offset(5, 1) + 8, 4095));
    assert_eq!(
        err,
        ManifestError::Entry {
            position: 1,
            index: 2,
            problem: EntryProblem::StoredLenNotBlockLen { stored_len_bytes: 4095, block_len_bytes: 4096 }
        }
    );
    // The tail block stored raw must be its short length (100), not a full block.
    let err = decode_crafted(|b| {
        b[entry_offset(5, 3) + 12] = 0;
        set_u32(b, entry_offset(5, 3) + 8, 4096);
    });
    assert!(
        matches!(
            err,
            ManifestError::Entry { problem: EntryProblem::StoredLenNotBlockLen { block_len_bytes: 100, .. }, .. }
        ),
        "{err}"
    );
}

#[test]
fn unknown_codes_and_reserved_bytes_are_refused() {
    let err = decode_crafted(|b| b[12] = 3);
    assert_eq!(err, ManifestError::UnknownHashAlgorithm { code: 3 });
    let err = decode_crafted(|b| b[13] = 2);
    assert_eq!(err, ManifestError::UnknownCompression { code: 2 });
    for offset in [15, 20, 23] {
        let err = decode_crafted(|b| b[offset] = 0x80);
        assert_eq!(err, ManifestError::ReservedNotZero { offset: offset as u64, value: 0x80 });
        assert_says(&err, &[&format!("byte {offset}"), "0x80"]);
    }
    let err = decode_crafted(|b| b[entry_offset(5, 2) + 12] = 9);
    assert!(
        matches!(err, ManifestError::Entry { position: 2, problem: EntryProblem::UnknownCompression { code: 9 }, .. }),
        "{err}"
    );
    let err = decode_crafted(|b| b[entry_offset(5, 2) + 15] = 1);
    assert!(
        matches!(err, ManifestError::Entry { position: 2, problem: EntryProblem::ReservedNotZero([0, 0, 1]), .. }),
        "{err}"
    );
}

#[test]
fn zstd_block_in_an_uncompressed_snapshot_is_refused() {
    let err = decode_crafted(|b| b[13] = 0);
    assert!(
        matches!(err, ManifestError::Entry { position: 0, problem: EntryProblem::ZstdInUncompressedSnapshot, .. }),
        "{err}"
    );
}

#[test]
fn bad_layouts_are_refused_with_the_layout_error() {
    let err = decode_crafted(|b| set_u32(b, 16, 4097));
    assert_eq!(err, ManifestError::Layout(LayoutError::BlockSize(4097)));
    assert_says(&err, &["block size 4097", "multiple of 4096"]);
    let err = decode_crafted(|b| set_u64(b, 24, 0));
    assert_eq!(err, ManifestError::Layout(LayoutError::VolumeSize(0)));
    assert_says(&err, &["volume size 0"]);
    let err = decode_crafted(|b| set_u64(b, 24, u64::MAX));
    assert_eq!(err, ManifestError::Layout(LayoutError::VolumeSize(u64::MAX)));
}

#[test]
fn bad_names_are_refused_by_builder_and_decoder() {
    let layout = BlockLayout::new(4096, 4096).unwrap();
    let new = |name: &str| ManifestBuilder::new(name, layout, HashAlgorithm::Blake3, Compression::None).map(|_| ());
    for (name, problem) in [
        ("", NameProblem::Empty),
        ("a/b", NameProblem::Slash),
        ("a\0b", NameProblem::Control('\0')),
        ("line\nbreak", NameProblem::Control('\n')),
        ("del\u{7f}", NameProblem::Control('\u{7f}')),
        ("..", NameProblem::LeadingDot),
        (".hidden", NameProblem::LeadingDot),
    ] {
        let err = new(name).unwrap_err();
        assert_eq!(err, ManifestError::Name { name: name.to_owned(), reason: problem });
    }
    assert!(new(&"é".repeat(127)).is_ok()); // 254 bytes
    assert!(new(&"x".repeat(255)).is_ok());
    assert!(matches!(
        new(&"x".repeat(256)).unwrap_err(),
        ManifestError::Name { reason: NameProblem::TooLong(256), .. }
    ));
    assert!(new("snapshot 2024-01-01 ünïcode ✓").is_ok());

    // "vol-1" is at bytes 48..53 of small().
    let err = decode_crafted(|b| b[50] = b'/');
    assert_eq!(err, ManifestError::Name { name: "vo/-1".to_owned(), reason: NameProblem::Slash });
    assert_says(&err, &["\"vo/-1\"", "'/'"]);
    let err = decode_crafted(|b| b[50] = 0);
    assert_says(&err, &["control character '\\0'"]);
    let err = decode_crafted(|b| b[50] = 0xff);
    assert!(matches!(err, ManifestError::Name { reason: NameProblem::NotUtf8, .. }), "{err}");
    // A zero name length: the whole encoding shifts, so rebuild it by hand.
    let mut bytes = small().encode();
    bytes[14] = 0;
    bytes.drain(48..53);
    reseal(&mut bytes);
    let err = Manifest::decode(&bytes, &LIMITS).unwrap_err();
    assert!(matches!(err, ManifestError::Name { reason: NameProblem::Empty, .. }), "{err}");
}

#[test]
fn builder_refuses_bad_entries() {
    let layout = BlockLayout::new(2 * 4096 + 10, 4096).unwrap();
    let mut b = ManifestBuilder::new("v", layout, HashAlgorithm::Sha256, Compression::None).unwrap();
    let entry = |index, stored_len_bytes, compression| BlockEntry {
        index,
        hash: hash_of(index, 1),
        stored_len_bytes,
        compression,
    };
    b.push(entry(1, 4096, Compression::None)).unwrap();
    let err = b.push(entry(1, 4096, Compression::None)).unwrap_err();
    assert_eq!(
        err,
        ManifestError::Push { name: "v".into(), index: 1, problem: EntryProblem::NotIncreasing { previous: 1 } }
    );
    assert_says(&err, &["cannot add block 1", "bug"]);
    assert!(b.push(entry(0, 4096, Compression::None)).is_err());
    assert!(b.push(entry(3, 10, Compression::None)).is_err());
    assert!(b.push(entry(2, 4096, Compression::None)).is_err());
    assert!(b.push(entry(2, 0, Compression::None)).is_err());
    assert!(b.push(entry(2, 5, Compression::Zstd)).is_err());
    b.push(entry(2, 10, Compression::None)).unwrap();
    let m = b.finish();
    assert_eq!(m.entries().len(), 2);
    assert_eq!(m.block_bytes_total(), 4106);
    // Rejected pushes left nothing behind.
    assert_eq!(Manifest::decode(&m.encode(), &LIMITS).unwrap(), m);
}

#[test]
fn zstd_bound_is_zstds_own() {
    let layout = BlockLayout::new(4096, 4096).unwrap();
    let bound = zstd::zstd_safe::compress_bound(4096) as u32;
    let mut b = ManifestBuilder::new("v", layout, HashAlgorithm::Blake3, Compression::Zstd).unwrap();
    let entry = |stored_len_bytes| BlockEntry {
        index: 0,
        hash: hash_of(0, 0),
        stored_len_bytes,
        compression: Compression::Zstd,
    };
    assert!(b.push(entry(bound + 1)).is_err());
    b.push(entry(bound)).unwrap();
    // A real compressed block of incompressible bytes fits the bound.
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let compressed = zstd::bulk::compress(&noise, 19).unwrap();
    assert!(compressed.len() as u32 <= bound);
}

#[test]
fn many_entries_decode_in_bounded_memory() {
    // 256 Ki entries (a 1 TiB volume in 4 MiB blocks has this many).
    let count = 256 * 1024u64;
    let layout = BlockLayout::new(count * 4 * 1024 * 1024, 4 * 1024 * 1024).unwrap();
    let mut b = ManifestBuilder::new("big", layout, HashAlgorithm::Blake3, Compression::None).unwrap();
    for index in 0..count {
        b.push(BlockEntry {
            index,
            hash: hash_of(index, 3),
            stored_len_bytes: 4 << 20,
            compression: Compression::None,
        })
        .unwrap();
    }
    let m = b.finish();
    let bytes = m.encode();
    assert_eq!(bytes.len() as u64, 48 + 3 + count * 48 + 32);
    let back = Manifest::decode(&bytes, &LIMITS).unwrap();
    assert_eq!(back.digest(), m.digest());
    assert_eq!(back.entry(count - 1).unwrap().index, count - 1);
    assert_eq!(back.block_bytes_total(), layout.volume_size_bytes());
}

/// A random valid manifest: any layout shape (short tail or not), both hash
/// algorithms, both compressions, a random subset of blocks.
fn arb_manifest() -> impl Strategy<Value = Manifest> {
    (
        1u32..=16,
        1u64..=64,
        0u32..4096,
        any::<bool>(),
        any::<bool>(),
        "[a-zA-Z0-9é€][a-zA-Z0-9 ._é€-]{0,59}",
        any::<u64>(),
    )
        .prop_flat_map(|(blocks_4k, full_blocks, tail_bytes, sha, zstd, name, created)| {
            let block_size = blocks_4k * 4096;
            let volume = u64::from(block_size) * full_blocks + u64::from(tail_bytes);
            let layout = BlockLayout::new(volume, block_size).unwrap();
            let block_count = layout.block_count() as usize;
            let picks =
                proptest::collection::vec((any::<bool>(), any::<bool>(), any::<u32>(), any::<[u8; 32]>()), block_count);
            (Just((layout, sha, zstd, name, created)), picks)
        })
        .prop_map(|((layout, sha, zstd, name, created), picks)| {
            let alg = if sha { HashAlgorithm::Sha256 } else { HashAlgorithm::Blake3 };
            let comp = if zstd { Compression::Zstd } else { Compression::None };
            let mut b = ManifestBuilder::new(&name, layout, alg, comp).unwrap().created_unix_secs(created);
            for (index, (present, compress, len_seed, hash)) in picks.into_iter().enumerate() {
                let index = index as u64;
                if !present {
                    continue;
                }
                let block_len = layout.len(index);
                let (stored_len_bytes, compression) = if zstd && compress {
                    let bound = zstd::zstd_safe::compress_bound(block_len as usize) as u32;
                    (1 + len_seed % bound, Compression::Zstd)
                } else {
                    (block_len, Compression::None)
                };
                b.push(BlockEntry { index, hash: ContentHash(hash), stored_len_bytes, compression }).unwrap();
            }
            b.finish()
        })
}

/// Edits of a valid encoding: a byte set, a truncation, an insertion.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, u8),
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, v)| Edit::Set(at, v)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(at, v)| Edit::Insert(at, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let len = bytes.len();
    match *edit {
        Edit::Set(at, v) => bytes[at % len] = v,
        Edit::Truncate(at) => bytes.truncate(at % len),
        Edit::Insert(at, v) => bytes.insert(at % len, v),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn roundtrip_is_exact(m in arb_manifest()) {
        let bytes = m.encode();
        prop_assert_eq!(bytes.len() as u64, m.encoded_len());
        prop_assert!(m.encoded_len() <= Manifest::encoded_len_max(&LIMITS));
        let back = Manifest::decode(&bytes, &LIMITS).unwrap();
        prop_assert_eq!(&back, &m);
        // The encoding is canonical: decoding then encoding gives the same bytes.
        prop_assert_eq!(back.encode(), bytes);
        for e in m.entries() {
            prop_assert_eq!(m.entry(e.index), Some(e));
        }
        let stored: u64 = m.entries().iter().map(|e| u64::from(e.stored_len_bytes)).sum();
        prop_assert_eq!(m.stored_bytes_total(), stored);
    }

    #[test]
    fn different_manifests_have_different_digests(a in arb_manifest(), b in arb_manifest()) {
        prop_assert_eq!(a == b, a.digest() == b.digest());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::decode(&bytes, &LIMITS);
        let mut with_magic = b"RHYDMAN1\x01\0\0\0".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Manifest::decode(&with_magic, &LIMITS);
    }

    #[test]
    fn mutated_manifests_never_panic(m in arb_manifest(), edits in proptest::collection::vec(arb_edit(), 1..6), sealed in any::<bool>()) {
        let original = m.encode();
        let mut bytes = original.clone();
        for edit in &edits {
            if bytes.is_empty() {
                break;
            }
            apply(&mut bytes, edit);
        }
        // Resealing lets the change past the trailer into field validation.
        if sealed && bytes.len() >= 32 {
            reseal(&mut bytes);
        }
        match Manifest::decode(&bytes, &LIMITS) {
            // Only an edit that changed nothing (or a resealed edit that kept
            // a valid manifest) decodes, and then it roundtrips exactly.
            Ok(decoded) => {
                prop_assert_eq!(decoded.encode(), bytes.clone());
                if !sealed {
                    prop_assert_eq!(bytes, original);
                }
            }
            Err(err) => prop_assert!(err.to_string().len() > 20),
        }
    }
}
