//! A snapshot written to a real file store as `rehydrate snapshot create`
//! lays it out (`<name>.manifest`, `blocks/<hex hash>[.zst]`), read back the
//! way a restore reads it (manifest bounded by `encoded_len_max`, each block
//! bounded by its stored length), and hostile manifest objects in that store
//! refused before anything is trusted.

#![allow(clippy::unwrap_used, reason = "a test that unwraps fails loudly, which is the point")]

use bytes::Bytes;
use rehydrate::block::{BlockLayout, Compression, HashAlgorithm, block_key, is_zero};
use rehydrate::error::ErrorClass;
use rehydrate::manifest::{BlockEntry, Manifest, ManifestBuilder, ManifestError, ManifestLimits};
use rehydrate::store::BlockStore;
use rehydrate::store::file::FileStore;

const NAME: &str = "db-volume-1";

/// Self-describing volume: block 1 is zero, block 2 compresses well, block 3
/// is noise (does not shrink: stored raw), the rest derive from their index.
fn volume(layout: &BlockLayout) -> Vec<u8> {
    let mut bytes = vec![0u8; layout.volume_size_bytes() as usize];
    for index in 0..layout.block_count() {
        let start = layout.offset(index) as usize;
        let block = &mut bytes[start..start + layout.len(index) as usize];
        match index {
            1 => {}
            2 => block.iter_mut().enumerate().for_each(|(i, b)| *b = (i % 7) as u8 + 1),
            _ => {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ index;
                for b in block.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
        }
    }
    bytes
}

/// Write a snapshot of `data` into `store`, as `snapshot create` does.
async fn write_snapshot(store: &FileStore, layout: BlockLayout, data: &[u8], algorithm: HashAlgorithm) -> Manifest {
    let mut builder =
        ManifestBuilder::new(NAME, layout, algorithm, Compression::Zstd).unwrap().created_unix_secs(1_750_000_000);
    for index in 0..layout.block_count() {
        let start = layout.offset(index) as usize;
        let block = &data[start..start + layout.len(index) as usize];
        if is_zero(block) {
            continue;
        }
        let hash = algorithm.hash(block);
        let compressed = zstd::bulk::compress(block, 3).unwrap();
        let (stored, compression) = if compressed.len() < block.len() {
            (compressed, Compression::Zstd)
        } else {
            (block.to_vec(), Compression::None)
        };
        let entry = BlockEntry { index, hash, stored_len_bytes: stored.len() as u32, compression };
        store.put(&block_key(&hash, compression), Bytes::from(stored)).await.unwrap();
        builder.push(entry).unwrap();
    }
    let manifest = builder.finish();
    store.put(&format!("{NAME}.manifest"), Bytes::from(manifest.encode())).await.unwrap();
    manifest
}

/// Read the manifest object back, bounded, and decode it.
async fn read_manifest(store: &FileStore, limits: &ManifestLimits) -> Result<Manifest, String> {
    let bytes = store
        .get(&format!("{NAME}.manifest"), Manifest::encoded_len_max(limits))
        .await
        .map_err(|e| format!("store: {e}"))?;
    Manifest::decode(&bytes, limits).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_roundtrips_through_a_file_store() {
    for algorithm in [HashAlgorithm::Blake3, HashAlgorithm::Sha256] {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().to_path_buf());
        // 5 blocks of 8 KiB, the last one short (5096 bytes).
        let layout = BlockLayout::new(4 * 8192 + 5096, 8192).unwrap();
        let data = volume(&layout);
        let written = write_snapshot(&store, layout, &data, algorithm).await;

        let manifest = read_manifest(&store, &ManifestLimits::default()).await.unwrap();
        assert_eq!(manifest, written);
        assert_eq!(manifest.digest(), written.digest());
        assert!(manifest.entry(1).is_none(), "the zero block is absent");
        assert_eq!(manifest.entry(2).unwrap().compression, Compression::Zstd);
        assert_eq!(manifest.entry(3).unwrap().compression, Compression::None);
        assert_eq!(manifest.block_bytes_total(), layout.volume_size_bytes() - 8192);

        // Rebuild the volume from the store alone and compare every byte.
        let mut restored = vec![0u8; layout.volume_size_bytes() as usize];
        for entry in manifest.entries() {
            let object =
                store.get(&block_key(&entry.hash, entry.compression), u64::from(entry.stored_len_bytes)).await.unwrap();
            assert_eq!(object.len() as u32, entry.stored_len_bytes);
            let len = layout.len(entry.index) as usize;
            let block = match entry.compression {
                Compression::None => object.to_vec(),
                Compression::Zstd => zstd::bulk::decompress(&object, len).unwrap(),
                other => panic!("{} is never in a rehydrate manifest", other.name()),
            };
            assert_eq!(manifest.hash_algorithm.hash(&block), entry.hash);
            let start = layout.offset(entry.index) as usize;
            restored[start..start + len].copy_from_slice(&block);
        }
        assert!(restored == data, "restored volume differs ({})", algorithm.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_manifest_objects_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().to_path_buf());
    let layout = BlockLayout::new(4 * 8192 + 5096, 8192).unwrap();
    let manifest = write_snapshot(&store, layout, &volume(&layout), HashAlgorithm::Blake3).await;
    let key = format!("{NAME}.manifest");
    let good = manifest.encode();

    // A torn upload: half the object.
    store.put(&key, Bytes::copy_from_slice(&good[..good.len() / 2])).await.unwrap();
    let err = read_manifest(&store, &ManifestLimits::default()).await.unwrap_err();
    assert!(err.contains("truncated or corrupt: re-create or re-download it"), "{err}");

    // Bit rot in one block hash.
    let mut rotten = good.clone();
    rotten[good.len() - 40] ^= 0x10;
    store.put(&key, Bytes::from(rotten)).await.unwrap();
    let err = read_manifest(&store, &ManifestLimits::default()).await.unwrap_err();
    assert!(err.contains("trailer digest"), "{err}");

    // An object larger than any manifest within the limits is refused by the
    // store read itself, before a byte is decoded.
    let limits = ManifestLimits { entries_max: 2 };
    let bound = Manifest::encoded_len_max(&limits);
    let mut padded = good.clone();
    padded.resize(bound as usize + 1, 0);
    store.put(&key, Bytes::from(padded)).await.unwrap();
    let over = store.get(&key, bound).await.unwrap_err();
    assert_eq!(over.class, ErrorClass::Corrupt);
    store.put(&key, Bytes::from(good.clone())).await.unwrap();
    // Within the byte bound but over the entry limit: refused by decode.
    let err = read_manifest(&store, &limits).await.unwrap_err();
    assert!(err.contains("more than the limit of 2"), "{err}");

    // Not a manifest at all.
    store.put(&key, Bytes::from_static(b"<?xml version=\"1.0\"?><Error/>")).await.unwrap();
    let err = Manifest::decode(&store.get(&key, 1 << 20).await.unwrap(), &ManifestLimits::default()).unwrap_err();
    assert!(matches!(err, ManifestError::BadMagic { .. }), "{err}");

    // The good manifest still reads back.
    store.put(&key, Bytes::from(good)).await.unwrap();
    assert_eq!(read_manifest(&store, &ManifestLimits::default()).await.unwrap(), manifest);
}
