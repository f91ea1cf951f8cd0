//! Fleets: workers that feed each other.
//!
//! Block objects are content-addressed and verified on arrival, so any peer
//! is a safe source: a wrong byte from a peer is caught exactly like a wrong
//! byte from S3. Two halves:
//!
//! - **serving** ([`holdings`]): a restore registers what it holds (its
//!   target, its snapshot, the blocks it has written); the worker's
//!   `GET /v1/blocks/{key}` answers a block from there, read from the target
//!   at its offset and verified against its content hash on the way out (a
//!   block the restore is fetching from its store now is waited for, up to
//!   `peers.serve_wait_millis`);
//! - **asking** ([`sources`]): a restore lists peer workers as sources ahead
//!   of its object store ([`fleet_order`]), each behind a short deadline and
//!   a skip: a peer that does not hold a block answers 404, a dead one costs
//!   one short timeout and is then skipped for a while.
//!
//! **What a peer serves for a key.** A peer holds decoded blocks (the target
//! has no compressed bytes), so it serves every block under its decoded key
//! form, `blocks/<content hash>` (the key of an uncompressed object), whatever
//! codec the snapshot stored it with; a `.zst` key is never served. A
//! restore asks its peers for that form and verifies the answer as an
//! uncompressed block of the same content hash ([`decoded`]). Re-encoding
//! would not give the stored bytes back (zstd output depends on the level
//! and the library version), and would spend CPU on both sides for a LAN hop.
//!
//! Configuration: `[peers]` ([`PeersConfig`]); a worker profile (or
//! `restore --peer`) lists the peers.

pub mod holdings;
pub mod sources;

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use crate::block::{Compression, ContentHash, block_key};
use crate::verify::Expected;

/// `[peers]`: how peers are asked, and how this worker serves them.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    /// The bearer token sent to peers (one line; the peers' `worker.tokens_file`
    /// holds it). `REHYDRATE_PEER_TOKEN` overrides it. Default: none (peers
    /// listening on loopback without tokens).
    pub token_file: Option<PathBuf>,
    /// A peer connects and answers (headers) within this, and sends the
    /// body within as long again. 1000: a peer reads a block from its local
    /// disk in milliseconds; one slower than this is better left for the
    /// object store.
    pub attempt_timeout_millis: NonZeroU64,
    /// A peer that could not be reached (no connection, no answer within the
    /// deadline) is skipped this long. 10000: a dead peer costs one timeout
    /// per 10 s, not one per block.
    pub skip_millis: NonZeroU64,
    /// Requests in flight to one peer at most; a block waits for one up to
    /// `attempt_timeout_millis`, then goes to the next source. 16: a peer answers from memory or local disk in
    /// milliseconds, and three peers at 16 each stay well under a worker's
    /// `worker.connections_max` (128).
    pub inflight_max: NonZeroUsize,
    /// This worker's place in its fleet (0 ..= number of peers): its restores
    /// start at that fraction of the volume, so a fleet started together
    /// fetches different blocks from the object store first and then feeds
    /// each other. Default 0 (the volume's start, as without peers).
    pub fleet_index: u32,
    /// Serve `GET /v1/blocks` to peers. Default true.
    pub serve: bool,
    /// Block requests served per second at most (more get 429). 2000.
    pub serve_requests_per_sec: NonZeroU32,
    /// Block requests served at once at most: serving never takes more than
    /// this many threads of disk reads and hashing from this worker's own
    /// restores. 16: three peers asking at `inflight_max` each are mostly
    /// served without queueing, and a 1 MiB block takes about a millisecond
    /// to hash, so 16 at once still leave the worker's own restores most of
    /// a core.
    pub serve_concurrency_max: NonZeroUsize,
    /// A request waits at most this long for one of those slots, then gets
    /// 429 (the peer asks its next source). 400: a peer's store request takes
    /// about as long, so a block found here is still the cheaper source; with
    /// `serve_wait_millis`, the peer's answer stays within its
    /// `attempt_timeout_millis` (1000).
    pub serve_queue_millis: u64,
    /// A block this worker's own restore is fetching from its store right
    /// now (asked, not yet written) is waited for up to this long, then 404:
    /// a fleet started together asks for the same blocks at about the same
    /// time, and one store request serving two workers is the point. Blocks
    /// asked of a peer are not waited for (no chains of waits). 400: about
    /// one store round trip of a 1 MiB block; 0 answers 404 at once.
    pub serve_wait_millis: u64,
    /// Restores whose blocks are served, the newest first: a finished
    /// restore keeps serving until this many newer ones replaced it. 16.
    pub holdings_max: NonZeroUsize,
}

/// Where the peer token may come from besides `token_file`.
pub const PEER_TOKEN_ENV: &str = "REHYDRATE_PEER_TOKEN";

impl Default for PeersConfig {
    fn default() -> Self {
        Self {
            token_file: None,
            attempt_timeout_millis: NonZeroU64::new(1_000).expect("non-zero"),
            skip_millis: NonZeroU64::new(10_000).expect("non-zero"),
            inflight_max: NonZeroUsize::new(16).expect("non-zero"),
            fleet_index: 0,
            serve: true,
            serve_requests_per_sec: NonZeroU32::new(2_000).expect("non-zero"),
            serve_concurrency_max: NonZeroUsize::new(16).expect("non-zero"),
            serve_queue_millis: 400,
            serve_wait_millis: 400,
            holdings_max: NonZeroUsize::new(16).expect("non-zero"),
        }
    }
}

impl PeersConfig {
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_millis.get())
    }

    pub fn skip(&self) -> Duration {
        Duration::from_millis(self.skip_millis.get())
    }

    /// The token to send: `REHYDRATE_PEER_TOKEN`, else `token_file`.
    pub fn token(&self) -> Result<Option<String>, String> {
        if let Ok(token) = std::env::var(PEER_TOKEN_ENV)
            && !token.trim().is_empty()
        {
            return Ok(Some(token.trim().to_owned()));
        }
        let Some(path) = &self.token_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|e| format!("peers.token_file {}: {e}", path.display()))?;
        let token = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
        token.map(|t| Some(t.to_owned())).ok_or_else(|| format!("peers.token_file {}: no token in it", path.display()))
    }
}

/// The key and expectation of a block as a peer serves it: decoded.
pub fn decoded(expected: &Expected) -> (String, Expected) {
    let decoded = Expected { compression: Compression::None, stored_len_bytes: expected.len_bytes, ..*expected };
    (block_key(&expected.hash, Compression::None), decoded)
}

/// The content hash a peer request names: `blocks/<64 hex digits>`, the
/// decoded key form; `None` for anything else (a `.zst` key, a manifest).
pub fn requested_hash(key: &str) -> Option<ContentHash> {
    let hex = key.strip_prefix("blocks/")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex, &mut hash).ok()?;
    Some(ContentHash(hash))
}

/// Where a restore of `units` work items starts, for fleet member `index`
/// of `members`: an even share of the volume in.
pub fn fleet_start(units: usize, index: u32, members: usize) -> usize {
    if members <= 1 {
        return 0;
    }
    let index = (index as usize).min(members - 1);
    units * index / members
}

/// The order fleet member `index` asks `peers` in: the fleet's other
/// members listed in fleet order (by `fleet_index`, this node left out),
/// asked from the next member on (`index + 1`, `index + 2`, … wrapping), so
/// each member first asks the one whose share of the volume it reaches
/// next, and a fleet does not all ask the same member first.
pub fn fleet_order<T>(peers: &[T], index: u32) -> Vec<&T> {
    let mut order: Vec<&T> = peers.iter().collect();
    if !order.is_empty() {
        order.rotate_left(index as usize % peers.len());
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::HashAlgorithm;

    #[test]
    fn peers_serve_the_decoded_key_form() {
        let hash = HashAlgorithm::Blake3.hash(b"x");
        let stored = Expected {
            hash,
            algorithm: HashAlgorithm::Blake3,
            compression: Compression::Zstd,
            stored_len_bytes: 10,
            len_bytes: 4096,
            hash_in: crate::verify::HashIn::Snapshot,
        };
        let (key, expected) = decoded(&stored);
        assert_eq!(key, format!("blocks/{}", hash.to_hex()));
        assert_eq!((expected.compression, expected.stored_len_bytes), (Compression::None, 4096));
        assert_eq!(requested_hash(&key), Some(hash));
        for bad in [format!("{key}.zst"), "blocks/xyz".into(), "vol.manifest".into(), key.to_uppercase()] {
            assert_eq!(requested_hash(&bad), None, "{bad}");
        }
    }

    #[test]
    fn each_fleet_member_asks_the_next_member_first() {
        // Four members; each lists the other three in fleet order.
        let others = |me: u32| (0..4u32).filter(|&m| m != me).collect::<Vec<_>>();
        for me in 0..4u32 {
            let order: Vec<u32> = fleet_order(&others(me), me).into_iter().copied().collect();
            let next: Vec<u32> = (1..4).map(|k| (me + k) % 4).collect();
            assert_eq!(order, next, "member {me}");
        }
        assert!(fleet_order::<u32>(&[], 3).is_empty());
        assert_eq!(fleet_order(&["a"], 5), [&"a"]);
    }

    #[test]
    fn fleet_members_start_spread_over_the_volume() {
        assert_eq!(fleet_start(100, 0, 4), 0);
        assert_eq!(fleet_start(100, 3, 4), 75);
        assert_eq!(fleet_start(100, 9, 4), 75, "an index past the fleet is its last member");
        assert_eq!(fleet_start(100, 2, 1), 0, "no peers: the start of the volume");
    }
}
