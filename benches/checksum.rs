//! Checksum and verification throughput per core: what a restore pays per
//! byte before a block may be written.
//!
//! `cargo bench --bench checksum`. Reports bytes/s for BLAKE3 and SHA-256 over
//! a 1 MiB block, the zero-block test, and the whole `verify` step (hash, and
//! zstd decompression for a compressed block).

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rehydrate::block::{Compression, HashAlgorithm, is_zero};
use rehydrate::sample::SampleVolume;
use rehydrate::verify::{Expected, verify};

const BLOCK_BYTES: usize = 1 << 20;

fn block() -> Vec<u8> {
    SampleVolume { size_bytes: BLOCK_BYTES as u64, block_size_bytes: BLOCK_BYTES as u32, seed: 7 }.block(0)
}

fn hashes(c: &mut Criterion) {
    let data = block();
    let mut group = c.benchmark_group("checksum");
    group.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    group.sample_size(30);
    for algorithm in [HashAlgorithm::Blake3, HashAlgorithm::Sha256] {
        group.bench_function(algorithm.name(), |b| b.iter(|| algorithm.hash(std::hint::black_box(&data))));
    }
    let zeros = vec![0u8; BLOCK_BYTES];
    group.bench_function("is_zero", |b| b.iter(|| is_zero(std::hint::black_box(&zeros))));
    group.finish();
}

fn verification(c: &mut Criterion) {
    let data = block();
    // Half-compressible: a realistic zstd block.
    let mut half = data.clone();
    half[BLOCK_BYTES / 2..].fill(0);
    let packed = zstd::bulk::compress(&half, 3).expect("compresses");
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Bytes(BLOCK_BYTES as u64));
    group.sample_size(30);
    let raw = Bytes::from(data.clone());
    let expected = Expected {
        hash: HashAlgorithm::Blake3.hash(&data),
        algorithm: HashAlgorithm::Blake3,
        compression: Compression::None,
        stored_len_bytes: BLOCK_BYTES as u32,
        len_bytes: BLOCK_BYTES as u32,
        hash_in: rehydrate::verify::HashIn::Snapshot,
    };
    group.bench_function("blake3_raw", |b| b.iter(|| verify(raw.clone(), &expected).expect("verifies")));
    let zst = Bytes::from(packed.clone());
    let expected_zst = Expected {
        hash: HashAlgorithm::Blake3.hash(&half),
        compression: Compression::Zstd,
        stored_len_bytes: packed.len() as u32,
        ..expected
    };
    group.bench_function("blake3_zstd", |b| b.iter(|| verify(zst.clone(), &expected_zst).expect("verifies")));
    group.finish();
}

criterion_group!(benches, hashes, verification);
criterion_main!(benches);
