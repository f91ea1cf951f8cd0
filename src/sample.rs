//! Self-describing sample volumes, for the demo, tests and benchmarks.
//!
//! Every byte is derived from the volume's seed and the index of the block
//! that holds it, so any byte at any offset can be checked without keeping a
//! copy. The pattern has what a real volume has and a restore must handle:
//! zero blocks (every block with `i % 8 == 5`), duplicate blocks (`i % 8 == 7`
//! repeats block `i - 4`), and a tail shorter than a block when the size is
//! not a multiple of the block size.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::block::BlockIndex;

#[derive(Debug, Clone, Copy)]
pub struct SampleVolume {
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    pub seed: u64,
}

/// What a sample block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Zero,
    /// Pseudo-random bytes of this content id (duplicates share an id).
    Data(u64),
}

impl SampleVolume {
    pub fn block_count(&self) -> u64 {
        self.size_bytes.div_ceil(u64::from(self.block_size_bytes))
    }

    pub fn content(&self, index: BlockIndex) -> Content {
        match index % 8 {
            5 => Content::Zero,
            7 => Content::Data(index - 4),
            _ => Content::Data(index),
        }
    }

    fn block_len(&self, index: BlockIndex) -> usize {
        let offset = index * u64::from(self.block_size_bytes);
        (self.size_bytes - offset).min(u64::from(self.block_size_bytes)) as usize
    }

    /// The bytes of block `index`.
    pub fn block(&self, index: BlockIndex) -> Vec<u8> {
        let mut buf = vec![0u8; self.block_len(index)];
        if let Content::Data(id) = self.content(index) {
            // A full block of content `id`, cut to this block's length, so a
            // duplicate in the tail would still match its prefix.
            let mut rng = SmallRng::seed_from_u64(self.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            rng.fill_bytes(&mut buf);
        }
        buf
    }

    /// Write the whole volume to a new file.
    pub fn write_to(&self, path: &Path) -> io::Result<()> {
        let mut file = io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        for index in 0..self.block_count() {
            file.write_all(&self.block(index))?;
        }
        file.into_inner().map_err(|e| e.into_error())?.sync_all()
    }

    /// Blocks of the file at `path` that differ from the volume (all of them
    /// past the file's end).
    pub fn mismatches(&self, path: &Path) -> io::Result<Vec<BlockIndex>> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let mut bad = Vec::new();
        let mut buf = vec![0u8; self.block_size_bytes as usize];
        for index in 0..self.block_count() {
            let want = self.block(index);
            let offset = index * u64::from(self.block_size_bytes);
            if offset + want.len() as u64 > len {
                bad.push(index);
                continue;
            }
            file.read_exact_at(&mut buf[..want.len()], offset)?;
            if buf[..want.len()] != want[..] {
                bad.push(index);
            }
        }
        if len != self.size_bytes && bad.is_empty() {
            bad.push(self.block_count());
        }
        Ok(bad)
    }
}
