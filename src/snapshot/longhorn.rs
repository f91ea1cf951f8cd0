//! Longhorn backups as snapshots: `longhorn+s3://BUCKET/PREFIX?volume=V&backup=B`
//! and `longhorn+file:///DIR?volume=V&backup=B`.
//!
//! PREFIX (DIR) holds the `backupstore/` folder exactly as Longhorn writes it
//! to an S3 or NFS backup target. The format, from Longhorn's own source
//! (repository longhorn/backupstore):
//!
//! - `config.go` `getVolumePath`: a volume lives at
//!   `backupstore/volumes/<xx>/<yy>/<volume>/`, where `xx` and `yy` are the
//!   first two and next two hex digits of the volume name's checksum
//!   (`util.GetChecksum`, below); `volume.cfg` there, and each backup at
//!   `backups/backup_<name>.cfg` (`getBackupConfigPath`);
//! - `deltablock.go` `getBlockFilePath`: block objects at
//!   `<volume dir>/blocks/<c[0:2]>/<c[2:4]>/<c>.blk`, named by their checksum
//!   `c`: one object per distinct content, so identical blocks are stored
//!   once and a backup lists the same checksum at every offset that holds it;
//! - `util/util.go` `GetChecksum`: SHA-512 of the uncompressed block, hex,
//!   cut to its first 64 digits (`PreservedChecksumLength`), i.e. the first
//!   32 bytes ([`HashAlgorithm::Sha512Trunc256`]);
//! - `backupstore.go` `Volume`/`Backup`: JSON with Go field names; `Size`
//!   and `BlockCount` are numbers stored as JSON strings (`json:",string"`);
//!   `Blocks` is a list of `{"Offset": <number>, "BlockChecksum": "<c>"}`
//!   in ascending offset (`sortBackupBlocks`); offsets not listed are zero
//!   (only changed extents are backed up, and the incremental merge keeps
//!   every block of the chain);
//! - `deltablock.go` `DEFAULT_BLOCK_SIZE = 2097152`: every block is 2 MiB
//!   unless a `BlockSize` in the backup or volume config says otherwise
//!   (newer Longhorn records one); the volume size must be a multiple of it
//!   (`RestoreDeltaBlockBackup` refuses others, and so do we);
//! - `CompressionMethod` of the backup: `lz4` (an LZ4 frame), `gzip` or
//!   `none`; empty in backups written before the field existed, which were
//!   all gzip (the old `util.CompressData`);
//! - `config.go` `isBackupInProgress`: a backup config without a
//!   `CreatedTime` is still being written (`performBackup` saves one first):
//!   refused, its block list is not final.
//!
//! The snapshot's identity (for checkpoints) is a SHA-256 over the volume
//! name, the backup name, the layout, the codec and the block list, so a
//! checkpoint never resumes into another backup or a rewritten config.
//!
//! Taking Longhorn's restore lock, so its garbage collection keeps the
//! blocks while they are read, is [`lock`]'s.

pub mod lock;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::block::{BlockIndex, BlockLayout, Compression, ContentHash, HashAlgorithm};
use crate::manifest::ManifestDigest;
use crate::snapshot::{Snapshot, SnapshotBlock};
use crate::store::{StoreUrl, UrlError};
use crate::verify::Expected;

/// Longhorn's fixed block size (`DEFAULT_BLOCK_SIZE`, `deltablock.go`).
pub const DEFAULT_BLOCK_SIZE_BYTES: u32 = 2 * 1024 * 1024;
/// Largest `volume.cfg` read.
pub const VOLUME_CFG_LEN_MAX_BYTES: u64 = 1 << 20;
/// Largest backup config read: about 100 bytes per block, so 2 million
/// blocks (4 TiB of 2 MiB blocks) per 256 MiB.
pub const BACKUP_CFG_LEN_MAX_BYTES: u64 = 256 << 20;

/// URL schemes of Longhorn backups.
const SCHEMES: [(&str, &str); 2] = [("longhorn+s3://", "s3://"), ("longhorn+file://", "file://")];

/// Whether `url` names a Longhorn backup.
pub fn is_longhorn_url(url: &str) -> bool {
    SCHEMES.iter().any(|(scheme, _)| url.starts_with(scheme))
}

/// A parsed Longhorn backup URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LonghornUrl {
    /// The store holding `backupstore/`.
    pub store: StoreUrl,
    pub volume: String,
    pub backup: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    volume: String,
    backup: String,
}

impl LonghornUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let err = |reason: String| UrlError { url: url.to_owned(), reason };
        let (scheme, store_scheme) = SCHEMES
            .iter()
            .find(|(scheme, _)| url.starts_with(scheme))
            .ok_or_else(|| err("a Longhorn backup URL starts with longhorn+s3:// or longhorn+file://".into()))?;
        let rest = &url[scheme.len()..];
        let (location, query) = rest
            .split_once('?')
            .ok_or_else(|| err("add ?volume=<volume>&backup=<backup name> (as in Longhorn's backup URL)".into()))?;
        let query: Query = serde_urlencoded::from_str(query)
            .map_err(|e| err(format!("the query must be volume=<volume>&backup=<backup name>: {e}")))?;
        for (what, name) in [("volume", &query.volume), ("backup", &query.backup)] {
            if !valid_name(name) {
                return Err(err(format!(
                    "{what} name {name:?} is not a Longhorn name (a letter or digit, then letters, digits, '_', '.', '-')"
                )));
            }
        }
        let store = StoreUrl::parse(&format!("{store_scheme}{location}")).map_err(|e| err(e.reason))?;
        Ok(Self { store, volume: query.volume, backup: query.backup })
    }

    /// A worker profile's store for Longhorn backups: the URL without its
    /// query (`longhorn+s3://BUCKET/PREFIX`); a job names the backup with
    /// `volume=V&backup=B`.
    pub fn parse_profile_store(url: &str) -> Result<StoreUrl, UrlError> {
        let err = |reason: String| UrlError { url: url.to_owned(), reason };
        if url.contains('?') {
            return Err(err("a profile's Longhorn store has no query: jobs name volume=...&backup=...".into()));
        }
        Ok(Self::parse(&format!("{url}?volume=vv&backup=bb"))?.store)
    }

    /// `backupstore/volumes/<xx>/<yy>/<volume>` (`getVolumePath`).
    pub fn volume_dir(&self) -> String {
        let checksum = longhorn_checksum(self.volume.as_bytes());
        format!("backupstore/volumes/{}/{}/{}", &checksum[0..2], &checksum[2..4], self.volume)
    }

    pub fn volume_cfg_key(&self) -> String {
        format!("{}/volume.cfg", self.volume_dir())
    }

    pub fn backup_cfg_key(&self) -> String {
        format!("{}/backups/backup_{}.cfg", self.volume_dir(), self.backup)
    }

    /// `<volume dir>/locks/` (`getLockPath`, `lock.go`).
    pub fn locks_dir(&self) -> String {
        format!("{}/locks/", self.volume_dir())
    }

    /// `<volume dir>/blocks/<c[0:2]>/<c[2:4]>/<c>.blk` (`getBlockFilePath`).
    pub fn block_key(&self, checksum_hex: &str) -> String {
        format!("{}/blocks/{}/{}/{checksum_hex}.blk", self.volume_dir(), &checksum_hex[0..2], &checksum_hex[2..4])
    }
}

/// Longhorn's `util.ValidateName`: `^[a-zA-Z0-9][a-zA-Z0-9_.-]+$`.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.len() >= 2
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Longhorn's `util.GetChecksum`: SHA-512, hex, first 64 digits.
pub fn longhorn_checksum(bytes: &[u8]) -> String {
    HashAlgorithm::Sha512Trunc256.hash(bytes).to_hex()
}

/// A JSON number, or a number in a JSON string (Go's `json:",string"`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum JsonInt {
    Number(i64),
    Text(#[serde(deserialize_with = "int_in_string")] i64),
}

impl JsonInt {
    fn get(self) -> i64 {
        match self {
            JsonInt::Number(n) | JsonInt::Text(n) => n,
        }
    }
}

fn int_in_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let text = String::deserialize(d)?;
    text.trim().parse().map_err(serde::de::Error::custom)
}

/// The fields of `volume.cfg` a restore reads; others are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VolumeCfg {
    name: String,
    size: JsonInt,
    #[serde(default)]
    block_size: Option<JsonInt>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BlockMapping {
    offset: JsonInt,
    block_checksum: String,
}

/// The fields of `backup_<name>.cfg` a restore reads; others are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BackupCfg {
    name: String,
    volume_name: String,
    #[serde(default)]
    created_time: String,
    #[serde(default)]
    compression_method: String,
    #[serde(default)]
    block_size: Option<JsonInt>,
    #[serde(default)]
    blocks: Vec<BlockMapping>,
}

/// Why a backup cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LonghornError {
    #[error("{key}: not a Longhorn config: {reason}")]
    Json { key: String, reason: String },
    #[error(
        "backup {backup} of volume {volume} is still in progress (its config has no CreatedTime): wait until Longhorn marks it Completed, or restore another backup"
    )]
    InProgress { volume: String, backup: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// A Longhorn backup, read and checked: a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct LonghornBackup {
    url: LonghornUrl,
    layout: BlockLayout,
    compression: Compression,
    /// Stored blocks in ascending index, with their content hash.
    blocks: Vec<(BlockIndex, ContentHash)>,
    digest: ManifestDigest,
}

impl LonghornBackup {
    /// Check the two configs of `url` and build the snapshot.
    pub fn from_cfgs(url: &LonghornUrl, volume_cfg: &[u8], backup_cfg: &[u8]) -> Result<Self, LonghornError> {
        let json = |key: String, e: serde_json::Error| LonghornError::Json { key, reason: e.to_string() };
        let volume: VolumeCfg = serde_json::from_slice(volume_cfg).map_err(|e| json(url.volume_cfg_key(), e))?;
        let backup: BackupCfg = serde_json::from_slice(backup_cfg).map_err(|e| json(url.backup_cfg_key(), e))?;
        let invalid = |key: String, reason: String| LonghornError::Invalid { key, reason };
        if volume.name != url.volume || backup.volume_name != url.volume || backup.name != url.backup {
            return Err(invalid(
                url.backup_cfg_key(),
                format!(
                    "names volume {:?} / backup {:?} of volume {:?}, not {} / {}",
                    volume.name, backup.name, backup.volume_name, url.volume, url.backup
                ),
            ));
        }
        if backup.created_time.is_empty() {
            return Err(LonghornError::InProgress { volume: url.volume.clone(), backup: url.backup.clone() });
        }
        let layout = layout_of(url, &volume, &backup)?;
        let compression = compression_of(&backup.compression_method).ok_or_else(|| {
            invalid(url.backup_cfg_key(), format!("unknown CompressionMethod {:?}", backup.compression_method))
        })?;
        let blocks = block_list(url, &layout, &backup.blocks)?;
        let digest = identity(url, &layout, compression, &blocks);
        Ok(Self { url: url.clone(), layout, compression, blocks, digest })
    }

    pub fn url(&self) -> &LonghornUrl {
        &self.url
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    fn snapshot_block(&self, (index, hash): (BlockIndex, ContentHash)) -> SnapshotBlock {
        let len_bytes = self.layout.len(index);
        let stored_len_bytes = match self.compression {
            Compression::None => len_bytes,
            _ => crate::verify::stored_len_bound(len_bytes),
        };
        let expected = Expected {
            hash,
            algorithm: HashAlgorithm::Sha512Trunc256,
            compression: self.compression,
            stored_len_bytes,
            len_bytes,
            hash_in: crate::verify::HashIn::Snapshot,
        };
        SnapshotBlock { index, expected }
    }
}

/// The layout: the volume's size in `volume.cfg`, Longhorn's block size
/// unless a config records another.
fn layout_of(url: &LonghornUrl, volume: &VolumeCfg, backup: &BackupCfg) -> Result<BlockLayout, LonghornError> {
    let invalid = |key: String, reason: String| LonghornError::Invalid { key, reason };
    let block_size = backup.block_size.or(volume.block_size).map_or(i64::from(DEFAULT_BLOCK_SIZE_BYTES), JsonInt::get);
    let block_size = u32::try_from(block_size)
        .map_err(|_| invalid(url.backup_cfg_key(), format!("BlockSize {block_size} is out of range")))?;
    let size = volume.size.get();
    let size = u64::try_from(size).map_err(|_| invalid(url.volume_cfg_key(), format!("Size {size} is negative")))?;
    if size == 0 || !size.is_multiple_of(u64::from(block_size.max(1))) {
        return Err(invalid(
            url.volume_cfg_key(),
            format!("Size {size} is not a positive multiple of the {block_size}-byte block (Longhorn refuses it too)"),
        ));
    }
    BlockLayout::new(size, block_size).map_err(|e| invalid(url.volume_cfg_key(), e.to_string()))
}

/// `""` is the legacy method, gzip (`util.CompressData` before methods).
fn compression_of(method: &str) -> Option<Compression> {
    match method {
        "" | "gzip" => Some(Compression::Gzip),
        "lz4" => Some(Compression::Lz4),
        "none" => Some(Compression::None),
        _ => None,
    }
}

/// The block list, checked: offsets on block boundaries inside the volume,
/// checksums of 64 hex digits, one checksum per offset; sorted by index.
fn block_list(
    url: &LonghornUrl,
    layout: &BlockLayout,
    mappings: &[BlockMapping],
) -> Result<Vec<(BlockIndex, ContentHash)>, LonghornError> {
    let invalid = |reason: String| LonghornError::Invalid { key: url.backup_cfg_key(), reason };
    let block_size = u64::from(layout.block_size_bytes());
    let mut by_index: BTreeMap<BlockIndex, ContentHash> = BTreeMap::new();
    for (i, mapping) in mappings.iter().enumerate() {
        let offset = mapping.offset.get();
        let index = u64::try_from(offset)
            .ok()
            .filter(|o| o.is_multiple_of(block_size))
            .map(|o| o / block_size)
            .filter(|&index| layout.contains(index))
            .ok_or_else(|| invalid(format!("block {i}: Offset {offset} is not a block boundary inside the volume")))?;
        let hash = parse_checksum(&mapping.block_checksum).ok_or_else(|| {
            invalid(format!("block {i}: BlockChecksum {:?} is not 64 hex digits", mapping.block_checksum))
        })?;
        if by_index.insert(index, hash).is_some_and(|other| other != hash) {
            return Err(invalid(format!("Offset {offset} is listed twice with different checksums")));
        }
    }
    Ok(by_index.into_iter().collect())
}

fn parse_checksum(text: &str) -> Option<ContentHash> {
    let mut bytes = [0u8; 32];
    let lower = text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (lower && hex::decode_to_slice(text, &mut bytes).is_ok()).then_some(ContentHash(bytes))
}

/// The backup's identity: SHA-256 of a tagged, length-prefixed encoding of
/// what the restore depends on.
fn identity(
    url: &LonghornUrl,
    layout: &BlockLayout,
    compression: Compression,
    blocks: &[(BlockIndex, ContentHash)],
) -> ManifestDigest {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"rehydrate longhorn backup v1\0");
    for text in [url.volume.as_str(), url.backup.as_str(), compression.name()] {
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    h.update(layout.volume_size_bytes().to_le_bytes());
    h.update(layout.block_size_bytes().to_le_bytes());
    h.update((blocks.len() as u64).to_le_bytes());
    for (index, hash) in blocks {
        h.update(index.to_le_bytes());
        h.update(hash.0);
    }
    ManifestDigest(h.finalize().into())
}

impl Snapshot for LonghornBackup {
    fn digest(&self) -> ManifestDigest {
        self.digest
    }

    fn layout(&self) -> BlockLayout {
        self.layout
    }

    fn blocks(&self) -> Box<dyn Iterator<Item = SnapshotBlock> + Send + '_> {
        Box::new(self.blocks.iter().map(|&b| self.snapshot_block(b)))
    }

    fn blocks_stored(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn block(&self, index: BlockIndex) -> Option<SnapshotBlock> {
        let at = self.blocks.binary_search_by_key(&index, |(i, _)| *i).ok()?;
        Some(self.snapshot_block(self.blocks[at]))
    }

    fn object_key(&self, block: &SnapshotBlock) -> String {
        self.url.block_key(&block.expected.hash.to_hex())
    }
}

#[cfg(test)]
mod tests;
