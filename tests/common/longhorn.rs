//! A generator of Longhorn backupstores, written the way Longhorn writes
//! them, independently of rehydrate's reader (its own checksum, paths and
//! JSON), from Longhorn's source (repository longhorn/backupstore):
//!
//! - `config.go` `getVolumePath`, `getBackupConfigPath`: the volume at
//!   `backupstore/volumes/<c[0:2]>/<c[2:4]>/<volume>/` with `c` the checksum
//!   of the volume name; `volume.cfg` there; `backups/backup_<name>.cfg`;
//! - `deltablock.go` `backupBlock`, `getBlockFilePath`: each block read from
//!   the snapshot's data extents (so all-zero holes are never listed), its
//!   checksum computed, and written to `blocks/<c[0:2]>/<c[2:4]>/<c>.blk`
//!   unless that object exists (identical blocks stored once);
//!   `performBackup` writes an in-progress config (no `CreatedTime`) first,
//!   then the final one with `Blocks` sorted by offset (`sortBackupBlocks`);
//! - `util/util.go` `GetChecksum` (SHA-512 hex, first 64 digits) and
//!   `CompressData` (`lz4.NewWriter`: an LZ4 frame; `gzip.NewWriter`; or the
//!   block as is for `none`);
//! - `backupstore.go` `Volume`, `Backup`: Go field names, `Size` and
//!   `BlockCount` as JSON strings (`json:",string"`), `Offset` a number.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;

use sha2::Digest;

/// Longhorn's block size.
pub const BLOCK: usize = 2 * 1024 * 1024;

/// `util.GetChecksum`.
pub fn checksum(data: &[u8]) -> String {
    hex::encode(sha2::Sha512::digest(data))[..64].to_owned()
}

pub fn volume_dir(volume: &str) -> String {
    let c = checksum(volume.as_bytes());
    format!("backupstore/volumes/{}/{}/{volume}", &c[..2], &c[2..4])
}

pub fn block_path(volume: &str, c: &str) -> String {
    format!("{}/blocks/{}/{}/{c}.blk", volume_dir(volume), &c[..2], &c[2..4])
}

/// `CompressData(method, data)`.
pub fn compress(method: &str, data: &[u8]) -> Vec<u8> {
    match method {
        "lz4" => {
            let mut w = lz4_flex::frame::FrameEncoder::new(Vec::new());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        // "" is a backup from before compression methods: gzip.
        "gzip" | "" => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            w.write_all(data).unwrap();
            w.finish().unwrap()
        }
        "none" => data.to_vec(),
        other => panic!("not a Longhorn method: {other}"),
    }
}

/// A test volume of `blocks` 2 MiB blocks: data, a copy of an earlier
/// block, and all-zero holes, from `seed`.
pub fn image(blocks: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; blocks * BLOCK];
    for b in 0..blocks {
        let block = &mut out[b * BLOCK..(b + 1) * BLOCK];
        match b % 4 {
            // A hole: never backed up.
            2 => {}
            // The same bytes as block 1: one object, two offsets.
            3 if b > 1 => {
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = fill(seed, 1, i);
                }
            }
            _ => {
                for (i, byte) in block.iter_mut().enumerate() {
                    *byte = fill(seed, b as u64, i);
                }
            }
        }
    }
    out
}

/// Compressible but not trivial bytes.
fn fill(seed: u64, block: u64, i: usize) -> u8 {
    let x = (i as u64 / 16).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_add(block * 0x1000_0001);
    if i.is_multiple_of(7) { (x >> 29) as u8 } else { (i % 251) as u8 }
}

/// What a generated backup holds.
pub struct Written {
    /// `(offset, checksum)` as listed, ascending.
    pub blocks: Vec<(u64, String)>,
}

/// Write backup `backup` of `volume` (the bytes of `image`) with `method`
/// into `root` (the directory holding `backupstore/`). `in_progress`
/// leaves the config `performBackup` writes first.
pub fn write_backup(root: &Path, volume: &str, backup: &str, image: &[u8], method: &str, in_progress: bool) -> Written {
    let mut blocks = Vec::new();
    let mut new_blocks = 0;
    for (b, data) in image.chunks(BLOCK).enumerate() {
        if data.iter().all(|&x| x == 0) {
            continue;
        }
        let c = checksum(data);
        let path = root.join(block_path(volume, &c));
        if !path.exists() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, compress(method, data)).unwrap();
            new_blocks += 1;
        }
        blocks.push(((b * BLOCK) as u64, c));
    }
    let dir = root.join(volume_dir(volume));
    std::fs::create_dir_all(dir.join("backups")).unwrap();
    let volume_cfg = serde_json::json!({
        "Name": volume, "Size": image.len().to_string(), "Labels": {}, "CreatedTime": "2026-12-01T10:00:00Z",
        "LastBackupName": if in_progress { "" } else { backup }, "LastBackupAt": "2026-12-01T10:05:00Z",
        "BlockCount": new_blocks.to_string(), "BackingImageName": "", "BackingImageChecksum": "",
        "CompressionMethod": method, "StorageClassName": "longhorn", "DataEngine": "v1",
    });
    std::fs::write(dir.join("volume.cfg"), serde_json::to_vec(&volume_cfg).unwrap()).unwrap();
    let listed: Vec<_> = blocks.iter().map(|(o, c)| serde_json::json!({"Offset": o, "BlockChecksum": c})).collect();
    let backup_cfg = if in_progress {
        serde_json::json!({"Name": backup, "VolumeName": volume, "CompressionMethod": method, "CreatedTime": ""})
    } else {
        serde_json::json!({
            "Name": backup, "VolumeName": volume, "SnapshotName": "snap-1", "SnapshotCreatedAt": "2026-12-01T10:04:00Z",
            "CreatedTime": "2026-12-01T10:05:00Z", "Size": (blocks.len() * BLOCK).to_string(), "Labels": {},
            "IsIncremental": false, "CompressionMethod": method, "Blocks": listed, "SingleFile": {"FilePath": ""},
            "Deleting": false, "NewlyUploadedDataSize": "0", "ReUploadedDataSize": "0", "Parameters": {},
        })
    };
    let cfg_path = dir.join("backups").join(format!("backup_{backup}.cfg"));
    std::fs::write(cfg_path, serde_json::to_vec(&backup_cfg).unwrap()).unwrap();
    Written { blocks }
}
