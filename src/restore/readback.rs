//! Read-back: compare a target, block by block, against a snapshot (a
//! rehydrate manifest, a Longhorn backup).
//!
//! Independent of the restore path: it reads the target with plain reads and
//! hashes each block (zero blocks must read back as zeros), so a bug in the
//! pipeline cannot hide itself. Memory: one block buffer.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::Serialize;

use crate::block::{BlockIndex, BlockRange, is_zero};
use crate::snapshot::Snapshot;

/// What a read-back found.
#[derive(Debug, Clone, Serialize)]
pub struct ReadbackReport {
    /// The blocks read back (`--blocks`; every block otherwise).
    pub block_range: BlockRange,
    pub blocks_total: u64,
    pub blocks_checked: u64,
    pub mismatched: Vec<BlockIndex>,
}

impl ReadbackReport {
    pub fn matches(&self) -> bool {
        self.mismatched.is_empty() && self.blocks_checked == self.blocks_total
    }
}

/// Read `target` and compare every block with `manifest`.
pub fn readback(manifest: &dyn Snapshot, target: &Path) -> std::io::Result<ReadbackReport> {
    readback_blocks(manifest, target, BlockRange::all(&manifest.layout()))
}

/// Read the blocks `blocks` of `target` and compare each with `manifest`.
pub fn readback_blocks(manifest: &dyn Snapshot, target: &Path, blocks: BlockRange) -> std::io::Result<ReadbackReport> {
    let file = std::fs::File::open(target)?;
    let size = crate::target::device_size_bytes(&file)?;
    let layout = manifest.layout();
    if size < layout.volume_size_bytes() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} holds {size} bytes, the volume {}", target.display(), layout.volume_size_bytes()),
        ));
    }
    let mut buf = vec![0u8; layout.block_size_bytes() as usize];
    let mut mismatched = Vec::new();
    let mut entries = manifest.blocks().skip_while(|e| e.index < blocks.start).peekable();
    for index in blocks.start..blocks.end.min(layout.block_count()) {
        let len = layout.len(index) as usize;
        file.read_exact_at(&mut buf[..len], layout.offset(index))?;
        let ok = match entries.peek() {
            Some(e) if e.index == index => {
                let e = entries.next().expect("peeked");
                e.expected.algorithm.hash(&buf[..len]) == e.expected.hash
            }
            _ => is_zero(&buf[..len]),
        };
        if !ok {
            mismatched.push(index);
        }
    }
    let blocks_checked = blocks.end.min(layout.block_count()).saturating_sub(blocks.start);
    Ok(ReadbackReport { block_range: blocks, blocks_total: blocks.len(), blocks_checked, mismatched })
}
