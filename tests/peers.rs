//! Fleets: a worker serves the blocks it holds (`GET /v1/blocks/{hash}`)
//! and restores list peer workers ahead of their object store.
//!
//! Served blocks: only written ones, verified on the way out (the target
//! corrupted under a block, settled or only written: 500, never the bytes);
//! written is enough, the fdatasync is not waited for; a block the worker is
//! fetching from its store is waited for (`peers.serve_wait_millis`), then
//! served, or 404 when it does not come; behind the worker's token, rate
//! limited. Peers as sources: a worker restores a snapshot from a peer that
//! holds it, asking its store for no block at all; a dead peer ahead of it
//! costs one failed request, then is skipped.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use rehydrate::api::Tokens;
use rehydrate::api::client::ApiClient;
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::config::{Config, ProfileConfig};
use rehydrate::error::ErrorClass;
use rehydrate::manifest::Manifest;
use rehydrate::restore::Engine;
use rehydrate::sample::SampleVolume;
use rehydrate::store::fault::FaultStore;
use rehydrate::store::file::FileStore;
use rehydrate::store::http::HttpStore;
use rehydrate::store::s3::S3Config;
use rehydrate::store::{BlockStore, SharedStore, StoreUrl};
use rehydrate::worker::{JobSpec, Worker};
use rehydrate::write::BackendChoice;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const BLOCKS: u64 = 24;
const TOKEN: &str = "fleet-token-0123456789";

/// A zstd snapshot in a file store (so peers serve decoded blocks of
/// compressed objects), target roots and state directories.
struct Fixture {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
}

impl Fixture {
    async fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let volume = volume(BLOCKS, seed);
        let url = snapshot(dir.path(), &volume, Compression::Zstd, HashAlgorithm::Blake3).await;
        let manifest = load_manifest(&url);
        Self { dir, volume, manifest }
    }

    fn store_root(&self) -> PathBuf {
        store_root(self.dir.path())
    }

    /// A worker's config: its own target root and state, the `main` profile
    /// on the snapshot's store with `peers`.
    fn config(&self, name: &str, peers: Vec<String>) -> Config {
        let mut c = config(BackendChoice::Pwrite, &self.dir.path().join(format!("state-{name}")));
        c.checkpoint.interval_millis = std::num::NonZeroU64::new(20).unwrap();
        c.fetch.attempt_timeout_millis = std::num::NonZeroU64::new(120_000).unwrap();
        c.fetch.source_elapsed_max_millis = std::num::NonZeroU64::new(120_000).unwrap();
        let root = self.dir.path().join(format!("targets-{name}"));
        std::fs::create_dir_all(&root).unwrap();
        c.worker.target_roots = vec![root];
        c.worker.target_free_bytes_min = 0;
        let store = format!("file://{}", self.store_root().display());
        c.worker.profiles.insert("main".into(), ProfileConfig { store, secondaries: vec![], peers });
        c
    }

    fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("targets-{name}/vol.img"))
    }

    fn spec(&self, id: &str, target: &Path) -> JobSpec {
        JobSpec {
            id: id.into(),
            profile: "main".into(),
            manifest: format!("vol-{}.manifest", self.volume.seed),
            target: target.to_owned(),
            replace: false,
            restart: false,
            export: Default::default(),
        }
    }

    /// Three data blocks, each the only holder of its content: one to read,
    /// one to corrupt, one held back from the store (gated).
    fn picks(&self) -> [u64; 3] {
        let entries = self.manifest.entries();
        let unique: Vec<u64> = entries
            .iter()
            .filter(|e| entries.iter().filter(|o| o.hash == e.hash).count() == 1)
            .map(|e| e.index)
            .collect();
        assert!(unique.len() >= 3, "the sample volume has too few distinct data blocks");
        [unique[0], unique[1], unique[unique.len() / 2]]
    }

    /// The decoded key of block `index`, as peers serve it.
    fn decoded_key(&self, index: u64) -> String {
        block_key(&self.manifest.entry(index).expect("a data block").hash, Compression::None)
    }

    /// Block `index`'s bytes in the source volume.
    fn block(&self, index: u64) -> Vec<u8> {
        let layout = self.manifest.layout;
        let source = self.dir.path().join(format!("source-{}.img", self.volume.seed));
        let mut buf = vec![0u8; layout.len(index) as usize];
        std::fs::File::open(source).unwrap().read_exact_at(&mut buf, layout.offset(index)).unwrap();
        buf
    }
}

struct Server {
    base: String,
    worker: Arc<Worker>,
    client: ApiClient,
    stop: CancellationToken,
}

async fn start(engine: Engine, tokens: &[&str]) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let worker = Worker::start(Arc::new(engine)).unwrap();
    let stop = CancellationToken::new();
    let tokens = Tokens::from_list(tokens).unwrap();
    tokio::spawn(rehydrate::api::serve(listener, Arc::clone(&worker), tokens, stop.clone().cancelled_owned()));
    let client = ApiClient::new(&base, Some(TOKEN.to_owned())).unwrap();
    Server { base, worker, client, stop }
}

impl Server {
    async fn stop(self) {
        assert!(self.worker.shutdown(Duration::from_secs(30)).await, "runs did not stop");
        self.stop.cancel();
    }

    /// This worker's blocks, as a peer reads them: the `http://` store at
    /// `<worker>/v1`, with `token`.
    fn blocks(&self, token: Option<&str>) -> HttpStore {
        let url = StoreUrl::parse(&format!("{}/v1", self.base)).unwrap();
        HttpStore::new(&url, &S3Config::default(), token.map(str::to_owned)).unwrap()
    }
}

async fn submit(client: &ApiClient, spec: &JobSpec) {
    let answer = client.raw(Method::POST, "/v1/jobs", Some(serde_json::to_vec(spec).unwrap())).await.unwrap();
    assert_eq!(answer.status.as_u16(), 201, "{}", answer.text);
}

async fn wait_for(client: &ApiClient, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job = client.get(id).await.unwrap().json();
        if done(&job) {
            return job;
        }
        assert!(start.elapsed() < DEADLINE, "job {id} never became {what}: {job:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn succeeded(job: &Value) -> bool {
    job["state"] == "succeeded"
}

/// A worker whose store holds back block `gated`: its job settles every
/// other block and keeps running until the gate opens.
fn gated_engine(f: &Fixture, config: Config, gated: u64) -> (Engine, tokio::sync::watch::Sender<bool>) {
    let engine = Engine::new(config);
    let (open, _) = tokio::sync::watch::channel(false);
    let entry = f.manifest.entry(gated).expect("a data block");
    let key = block_key(&entry.hash, entry.compression);
    let root = f.store_root();
    let gate = GateStore { inner: Arc::new(FileStore::new(root.clone())), key, open: open.clone() };
    engine.register_store(StoreUrl::File { root }, Arc::new(gate));
    (engine, open)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_only_written_verified_blocks_and_only_with_a_token() {
    let f = Fixture::new(71).await;
    let [read, corrupt, gated] = f.picks();
    let (engine, gate) = gated_engine(&f, f.config("a", vec![]), gated);
    let server = start(engine, &[TOKEN]).await;
    let target = f.target("a");
    submit(&server.client, &f.spec("held", &target)).await;
    let total = f.manifest.layout.block_count();
    wait_for(&server.client, "held", "settled but for the gated block", |job| {
        job["blocks"]["settled"].as_u64() == Some(total - 1)
    })
    .await;

    let peer = server.blocks(Some(TOKEN));
    // A settled block of a zstd snapshot: served decoded, under its decoded key.
    assert_eq!(peer.get(&f.decoded_key(read), 1 << 20).await.unwrap(), f.block(read));
    assert!(peer.exists(&f.decoded_key(read)).await.unwrap(), "HEAD");
    // Not written yet (held back from the store past serve_wait_millis): 404.
    let e = peer.get(&f.decoded_key(gated), 1 << 20).await.unwrap_err();
    assert!(e.class == ErrorClass::Permanent && e.message.contains("HTTP 404"), "{e}");
    assert!(!peer.exists(&f.decoded_key(gated)).await.unwrap());
    // The stored (compressed) key form is never served; nor an unknown hash.
    let zst = block_key(&f.manifest.entry(read).unwrap().hash, Compression::Zstd);
    assert!(peer.get(&zst, 1 << 20).await.unwrap_err().message.contains("HTTP 404"));
    let unknown = block_key(&HashAlgorithm::Blake3.hash(b"nobody"), Compression::None);
    assert!(peer.get(&unknown, 1 << 20).await.unwrap_err().message.contains("HTTP 404"));
    // No token, a wrong token: 401.
    for token in [None, Some("wrong-token-0123456789")] {
        let e = server.blocks(token).get(&f.decoded_key(read), 1 << 20).await.unwrap_err();
        assert!(e.message.contains("HTTP 401"), "{token:?}: {e}");
    }

    gate.send_replace(true);
    wait_for(&server.client, "held", "succeeded", succeeded).await;
    check_identical(&f.manifest, &f.volume, &target);
    // Settled now, and still served after the restore ended.
    assert_eq!(peer.get(&f.decoded_key(gated), 1 << 20).await.unwrap(), f.block(gated));

    // Corrupt the target under a block: never the bytes.
    let file = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
    file.write_all_at(&[0xA5; 512], f.manifest.layout.offset(corrupt) + 100).unwrap();
    file.sync_all().unwrap();
    let e = peer.get(&f.decoded_key(corrupt), 1 << 20).await.unwrap_err();
    assert!(e.message.contains("HTTP 500"), "a block failing verification is refused: {e}");

    let served = server.client.raw(Method::GET, "/v1/peers", None).await.unwrap().body;
    assert_eq!(served["blocks_served"], 2, "{served:#}");
    assert_eq!(served["bytes_served"], 2 * u64::from(f.manifest.layout.block_size_bytes()), "{served:#}");
    assert_eq!(served["holdings"], 1, "{served:#}");
    server.stop().await;
}

/// Wait for `peer` to serve block `index` of `f` (a 404 meanwhile: not yet).
async fn served(f: &Fixture, peer: &HttpStore, index: u64) -> bytes::Bytes {
    let start = Instant::now();
    loop {
        match peer.get(&f.decoded_key(index), 1 << 20).await {
            Ok(bytes) => return bytes,
            Err(e) => assert!(e.message.contains("HTTP 404"), "{e}"),
        }
        assert!(start.elapsed() < DEADLINE, "block {index} was never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_blocks_are_served_before_their_fdatasync_and_verified() {
    let f = Fixture::new(74).await;
    let [read, corrupt, gated] = f.picks();
    let mut config = f.config("a", vec![]);
    // No fdatasync before the end: nothing settles while the gate is shut.
    config.checkpoint.interval_millis = std::num::NonZeroU64::new(3_600_000).unwrap();
    config.checkpoint.interval_bytes = std::num::NonZeroU64::new(1 << 40).unwrap();
    let (engine, gate) = gated_engine(&f, config, gated);
    let server = start(engine, &[TOKEN]).await;
    let target = f.target("a");
    submit(&server.client, &f.spec("unsynced", &target)).await;
    let peer = server.blocks(Some(TOKEN));
    assert_eq!(served(&f, &peer, read).await, f.block(read), "written, not synced: served");
    assert_eq!(served(&f, &peer, corrupt).await, f.block(corrupt));
    let job = server.client.get("unsynced").await.unwrap().json();
    assert_eq!(job["blocks"]["settled"], 0, "served before any fdatasync: {job:#}");

    // The written (unsynced) block corrupted on the target: never its bytes.
    let staging = rehydrate::target::staging_path(&target).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&staging).unwrap();
    file.write_all_at(&[0xA5; 512], f.manifest.layout.offset(corrupt) + 100).unwrap();
    let e = peer.get(&f.decoded_key(corrupt), 1 << 20).await.unwrap_err();
    assert!(e.message.contains("HTTP 500"), "a written block failing verification is refused: {e}");
    file.write_all_at(&f.block(corrupt)[100..612], f.manifest.layout.offset(corrupt) + 100).unwrap();

    gate.send_replace(true);
    wait_for(&server.client, "unsynced", "succeeded", succeeded).await;
    check_identical(&f.manifest, &f.volume, &target);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_being_fetched_from_the_store_is_served_once_written() {
    let f = Fixture::new(75).await;
    let [_, _, gated] = f.picks();
    let mut config = f.config("a", vec![]);
    // Long enough that only the write, never the clock, ends the wait.
    config.peers.serve_wait_millis = 120_000;
    let (engine, gate) = gated_engine(&f, config, gated);
    let server = start(engine, &[TOKEN]).await;
    submit(&server.client, &f.spec("fetching", &f.target("a"))).await;
    let total = f.manifest.layout.block_count();
    wait_for(&server.client, "fetching", "settled but for the gated block", |job| {
        job["blocks"]["settled"].as_u64() == Some(total - 1)
    })
    .await;
    let asked = tokio::spawn({
        let peer = server.blocks(Some(TOKEN));
        let key = f.decoded_key(gated);
        async move { peer.get(&key, 1 << 20).await }
    });
    let start = Instant::now();
    loop {
        let serving = server.client.raw(Method::GET, "/v1/peers", None).await.unwrap().body;
        if serving["waiting"] == 1 {
            break;
        }
        if asked.is_finished() {
            panic!("answered without waiting for the block: {:?}", asked.await);
        }
        assert!(start.elapsed() < DEADLINE, "the request never waited: {serving:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.send_replace(true);
    let bytes = asked.await.unwrap().expect("served once its restore wrote it");
    assert_eq!(bytes, f.block(gated));
    wait_for(&server.client, "fetching", "succeeded", succeeded).await;
    check_identical(&f.manifest, &f.volume, &f.target("a"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_peers_is_rate_limited() {
    let f = Fixture::new(72).await;
    let mut config = f.config("a", vec![]);
    config.peers.serve_requests_per_sec = std::num::NonZeroU32::new(2).unwrap();
    let server = start(Engine::new(config), &[TOKEN]).await;
    let peer = server.blocks(Some(TOKEN));
    let mut throttled = 0;
    for n in 0..6u8 {
        let key = block_key(&HashAlgorithm::Blake3.hash(&[n]), Compression::None);
        let e = peer.get(&key, 1 << 20).await.unwrap_err();
        if e.class == ErrorClass::Throttled {
            assert!(e.message.contains("HTTP 429"), "{e}");
            throttled += 1;
        } else {
            assert!(e.message.contains("HTTP 404"), "{e}");
        }
    }
    assert!(throttled >= 3, "6 requests at once past a 2/s limit: {throttled} refused");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restores_from_its_peers_ahead_of_the_store() {
    let f = Fixture::new(73).await;
    let a = start(Engine::new(f.config("a", vec![])), &[TOKEN]).await;
    submit(&a.client, &f.spec("first", &f.target("a"))).await;
    wait_for(&a.client, "first", "succeeded", succeeded).await;

    // B lists a dead peer, then A; its store counts every request.
    let dead = "http://127.0.0.1:9".to_owned();
    let mut config = f.config("b", vec![dead, a.base.clone()]);
    config.peers.token_file = Some(f.dir.path().join("peer-token"));
    std::fs::write(f.dir.path().join("peer-token"), format!("{TOKEN}\n")).unwrap();
    let engine = Engine::new(config);
    let counted = Arc::new(FaultStore::new(Arc::new(FileStore::new(f.store_root()))));
    engine.register_store(StoreUrl::File { root: f.store_root() }, Arc::clone(&counted) as SharedStore);
    let b = start(engine, &[TOKEN]).await;
    submit(&b.client, &f.spec("second", &f.target("b"))).await;
    let job = wait_for(&b.client, "second", "succeeded", succeeded).await;
    check_identical(&f.manifest, &f.volume, &f.target("b"));

    let objects = f.manifest.entries().iter().map(|e| e.hash).collect::<std::collections::HashSet<_>>().len() as u64;
    assert_eq!(job["sources"]["peer2"], objects, "every block came from the live peer: {job:#}");
    assert_eq!(job["sources"]["peer1"], 0, "{job:#}");
    assert_eq!(counted.calls("blocks/"), 0, "the store was asked for no block");
    let served = a.client.raw(Method::GET, "/v1/peers", None).await.unwrap().body;
    assert_eq!(served["blocks_served"], objects, "{served:#}");
    b.stop().await;
    a.stop().await;
}

/// The client's typed answers as JSON, read by key like the body the server
/// sent.
trait AsJson {
    fn json(&self) -> Value;
}

impl<T: serde::Serialize> AsJson for T {
    fn json(&self) -> Value {
        serde_json::to_value(self).unwrap()
    }
}
