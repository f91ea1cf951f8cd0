//! The volume exported over NBD while it is restored (`restore_live`): reads
//! during the restore are the snapshot's bytes, concurrent reads of a block
//! share one fetch, a block no source serves answers EIO and is in the
//! damage report, writes made during the restore survive it (and a rerun),
//! and the clients people use (libnbd's nbdinfo, nbdcopy, nbdsh; qemu-img,
//! qemu-io) work against it. Tests that need those tools print SKIP when they
//! are missing (`.ci/run` installs them).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;
mod nbd_client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, installed_tool, load_manifest, python_nbd_installed, run_tool, snapshot, store_root, volume};
use nbd_client::Client;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::manifest::Manifest;
use rehydrate::nbd::{Export, ExportAddr, Limits, Listener, proto, serve};
use rehydrate::restore::live::LiveVolume;
use rehydrate::restore::progress::Progress;
use rehydrate::restore::{Engine, Publish, RestoreError, RestoreReport, restore_live};
use rehydrate::sample::SampleVolume;
use rehydrate::snapshot::Snapshot;
use rehydrate::store::StoreUrl;
use rehydrate::store::fault::{Fault, FaultRule, FaultStore};
use rehydrate::store::file::FileStore;
use rehydrate::write::{BackendChoice, DirectIo};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAME: &str = "vol";
const BLOCK: u64 = common::BLOCK as u64;

struct Live {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    store: Arc<FaultStore>,
    engine: Arc<Engine>,
    addr: SocketAddr,
    live: Arc<LiveVolume>,
    progress: Arc<Progress>,
    restore: JoinHandle<Result<RestoreReport, RestoreError>>,
    /// Stops the restore.
    cancel: CancellationToken,
    /// Stops the export.
    stop: CancellationToken,
}

/// Snapshot a sample volume of `blocks` blocks into a file store whose every
/// request takes `delay`, and start restoring it, exported. `budget_blocks`
/// blocks in flight in the background.
async fn start(blocks: u64, delay: Duration, budget_blocks: u64, faults: impl Fn(&Manifest) -> Vec<FaultRule>) -> Live {
    start_with(blocks, delay, budget_blocks, faults, |_| {}, false).await
}

/// [`start`], with the engine's configuration changed by `tune` first;
/// `remote`: the store gets every policy a remote store gets (deadline,
/// pacer, concurrency window), as S3 does.
async fn start_with(
    blocks: u64,
    delay: Duration,
    budget_blocks: u64,
    faults: impl Fn(&Manifest) -> Vec<FaultRule>,
    tune: impl FnOnce(&mut rehydrate::config::Config),
    remote: bool,
) -> Live {
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(blocks, 41);
    let url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    let mut c = config(BackendChoice::Auto, &dir.path().join("state"));
    c.fetch.inflight_bytes_max = std::num::NonZeroU64::new(budget_blocks * BLOCK).unwrap();
    c.write.direct_io = DirectIo::Off;
    tune(&mut c);
    let engine = Arc::new(Engine::new(c));
    let store = Arc::new(FaultStore::new(Arc::new(FileStore::new(store_root(dir.path())))));
    for rule in faults(&manifest) {
        store.add(rule);
    }
    store.add(FaultRule::new(Fault::Latency(delay)).path_contains("blocks/"));
    let url = StoreUrl::File { root: store_root(dir.path()) };
    if remote {
        engine.register_remote_store(url, store.clone()).unwrap();
    } else {
        engine.register_store(url, store.clone());
    }
    launch(dir, volume, manifest, store, engine).await
}

fn no_faults(_: &Manifest) -> Vec<FaultRule> {
    Vec::new()
}

/// Start (or rerun) the exported restore of `fx`'s snapshot.
async fn launch(
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    store: Arc<FaultStore>,
    engine: Arc<Engine>,
) -> Live {
    let listener = Listener::bind(&ExportAddr::parse("nbd://127.0.0.1:0/vol").unwrap()).await.unwrap();
    let addr = listener.local_tcp_addr().unwrap();
    let (tx, mut rx) = watch::channel::<Option<Arc<LiveVolume>>>(None);
    let publish: Publish = Arc::new(move |v| {
        tx.send_replace(Some(v));
    });
    let progress = Arc::new(Progress::default());
    let spec = common::spec(&format!("file://{}/vol-41.manifest", store_root(dir.path()).display()), &target(&dir));
    let cancel = CancellationToken::new();
    let restore = tokio::spawn({
        let (engine, progress, cancel) = (Arc::clone(&engine), Arc::clone(&progress), cancel.clone());
        async move { restore_live(&engine, &spec, &progress, &cancel, publish).await }
    });
    let live = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some))
        .await
        .expect("the volume is published")
        .unwrap()
        .clone()
        .unwrap();
    let stop = CancellationToken::new();
    let export = Export { name: NAME.into(), volume: Arc::clone(&live), limits: Limits::default() };
    tokio::spawn(serve(listener, export, stop.clone()));
    Live { dir, volume, manifest, store, engine, addr, live, progress, restore, cancel, stop }
}

fn target(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vol.img")
}

impl Live {
    fn source(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("source-41.img")).unwrap()
    }

    fn size(&self) -> u64 {
        self.volume.size_bytes
    }

    fn block_key(&self, index: u64) -> String {
        self.manifest.object_key(&self.manifest.block(index).unwrap())
    }

    fn restore_running(&self) -> bool {
        self.progress.blocks_settled.load(Ordering::Relaxed) < self.volume.block_count()
    }

    async fn finish(&mut self) -> Result<RestoreReport, RestoreError> {
        tokio::time::timeout(Duration::from_secs(120), &mut self.restore).await.expect("the restore ends").unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_during_the_restore_are_the_snapshot_and_share_fetches() {
    let mut fx = start(96, Duration::from_millis(100), 4, no_faults).await;
    let source = fx.source();
    // Eight readers of one far block at once: one fetch between them.
    let far = 90;
    let mut readers = Vec::new();
    for _ in 0..8 {
        let addr = fx.addr;
        readers.push(tokio::spawn(async move {
            let (mut c, _) = Client::go(addr, NAME).await;
            c.read(far * BLOCK + 100, 5000).await.unwrap()
        }));
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), source[(far * BLOCK + 100) as usize..(far * BLOCK + 5100) as usize]);
    }
    assert!(fx.restore_running(), "the reads were served while the restore ran");
    assert_eq!(fx.live.counts.demand_fetches.load(Ordering::Relaxed), 1, "concurrent reads share one fetch");
    // Unaligned reads across block boundaries, everywhere, while it runs.
    let (mut c, size) = Client::go(fx.addr, NAME).await;
    assert_eq!(size, fx.size());
    let mut offset = 12_345u64;
    while offset < fx.size() {
        let len = (3 * BLOCK + 777).min(fx.size() - offset) as u32;
        let got = c.read(offset, len).await.unwrap();
        assert!(got == source[offset as usize..(offset + u64::from(len)) as usize], "bytes at {offset}");
        offset += 7 * BLOCK + 4321;
    }
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded);
    assert!(std::fs::read(target(&fx.dir)).unwrap() == source, "the target is the snapshot");
    assert!(fx.store.calls(&fx.block_key(far)) <= 2, "the background restore does not fetch it again for nothing");
    common::check_ledger(&report, &fx.manifest);
    assert!(report.objects_from_export > 0, "the reads restored blocks the background then skipped: {report:#?}");
}

/// Wait until no one holds `target` (a stopped export lets it go once its
/// connections have closed).
async fn released(target: &std::path::Path) {
    let started = std::time::Instant::now();
    while rehydrate::target::holder(target).unwrap().is_some() {
        assert!(started.elapsed() < Duration::from_secs(10), "the stopped export still holds the target");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_during_the_restore_survive_it_and_a_rerun() {
    let mut fx = start(64, Duration::from_millis(100), 2, no_faults).await;
    let mut expected = fx.source();
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    // Whole blocks, partial blocks (read-modify-write), a range across a
    // boundary, and zeros: all near the end, not restored yet.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (60 * BLOCK, vec![0xa1; BLOCK as usize]),
        (58 * BLOCK + 10, vec![0xb2; 100]),
        (55 * BLOCK - 50, vec![0xc3; 200]),
        (fx.size() - 10, vec![0xd4; 10]),
    ];
    for (offset, data) in &writes {
        assert_eq!(c.write(*offset, data).await, 0);
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    c.request(proto::CMD_WRITE_ZEROES, 0, 5, 50 * BLOCK + 1, 2 * BLOCK as u32, &[]).await;
    assert_eq!(c.reply(0).await.unwrap().0, 0);
    expected[(50 * BLOCK + 1) as usize..(52 * BLOCK + 1) as usize].fill(0);
    assert!(fx.restore_running(), "the writes were made while the restore ran");
    assert_eq!(c.flush().await, 0);
    for (offset, data) in &writes {
        assert_eq!(&c.read(*offset, data.len() as u32).await.unwrap(), data, "read back at {offset}");
    }
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded, "{report:?}");
    assert!(std::fs::read(target(&fx.dir)).unwrap() == expected, "every write survived the background restore");
    assert!(fx.live.counts.blocks_owned.load(Ordering::Relaxed) >= 6);

    // A rerun of the same export resumes from the kept checkpoint: it
    // restores nothing over the client's writes. The first export holds the
    // target while it serves: stop it first.
    fx.stop.cancel();
    drop(c);
    let Live { dir, volume, manifest, store, engine, live, .. } = fx;
    drop(live);
    released(&target(&dir)).await;
    let mut again = launch(dir, volume, manifest, store, engine).await;
    let report = again.finish().await.unwrap();
    assert_eq!(report.blocks_resumed, report.blocks_total);
    assert!(std::fs::read(target(&again.dir)).unwrap() == expected, "the rerun kept every write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_after_the_restore_stopped_short_fails_and_a_rerun_keeps_the_flushed_writes() {
    let mut fx = start(64, Duration::from_millis(100), 2, no_faults).await;
    let mut expected = fx.source();
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    assert_eq!(c.write(60 * BLOCK, &vec![0x11; BLOCK as usize]).await, 0);
    assert_eq!(c.flush().await, 0);
    expected[(60 * BLOCK) as usize..(61 * BLOCK) as usize].fill(0x11);
    // Stop the restore (SIGINT), then write and FLUSH again: the FLUSH
    // cannot be recorded any more and must not claim it was.
    fx.cancel.cancel();
    assert!(matches!(fx.finish().await, Err(RestoreError::Interrupted(_))));
    assert_eq!(c.write(61 * BLOCK, &vec![0x22; BLOCK as usize]).await, 0);
    assert_eq!(c.flush().await, proto::ESHUTDOWN, "no FLUSH succeeds after the restore stopped short");
    fx.stop.cancel();
    drop(c);
    // The rerun resumes and keeps the write flushed before the stop, once
    // the first export, which holds the target while it serves, has stopped.
    let Live { dir, volume, manifest, store, engine, live, .. } = fx;
    drop(live);
    released(&target(&dir)).await;
    let mut again = launch(dir, volume, manifest, store, engine).await;
    assert!(again.finish().await.unwrap().succeeded);
    let got = std::fs::read(target(&again.dir)).unwrap();
    assert!(
        got[(60 * BLOCK) as usize..(61 * BLOCK) as usize] == expected[(60 * BLOCK) as usize..(61 * BLOCK) as usize]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_block_no_source_serves_answers_eio_and_is_reported() {
    // Block 9 is gone from the only source.
    let missing =
        |m: &Manifest| vec![FaultRule::new(Fault::NotFound).path_contains(&m.object_key(&m.block(9).unwrap()))];
    let mut fx = start(16, Duration::from_millis(50), 2, missing).await;
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    assert_eq!(c.read(9 * BLOCK + 5, 10).await, Err(proto::EIO), "never wrong bytes");
    assert_eq!(c.read(8 * BLOCK, BLOCK as u32).await.unwrap(), fx.source()[(8 * BLOCK) as usize..(9 * BLOCK) as usize]);
    match fx.finish().await {
        Err(RestoreError::BlocksFailed(report)) => {
            assert_eq!(report.damage.iter().map(|d| d.index).collect::<Vec<_>>(), vec![9]);
        }
        other => panic!("expected the damage report, got {other:?}"),
    }
    assert_eq!(c.read(9 * BLOCK, 1).await, Err(proto::EIO), "still EIO after the restore");
}

/// Block `index` of the primary never answers (a wedged GET: the attempt
/// deadline is far beyond the test).
fn wedged(index: u64) -> impl Fn(&Manifest) -> Vec<FaultRule> {
    move |m: &Manifest| {
        vec![FaultRule::new(Fault::Stall { after_bytes: 0 }).path_contains(&m.object_key(&m.block(index).unwrap()))]
    }
}

fn wedge_tolerant(c: &mut rehydrate::config::Config) {
    c.fetch.attempt_timeout_millis = std::num::NonZeroU64::new(600_000).unwrap();
    c.fetch.source_elapsed_max_millis = std::num::NonZeroU64::new(600_000).unwrap();
    c.fetch.stall_after_millis = std::num::NonZeroU64::new(300).unwrap();
}

/// Poll `check` every 20 ms until it holds, for at most 30 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wedged_block_never_delays_a_read_of_another_and_the_watchdog_names_it() {
    let wedge = 70;
    let mut fx = start_with(96, Duration::from_millis(200), 2, wedged(wedge), wedge_tolerant, false).await;
    let source = fx.source();
    let addr = fx.addr;
    let stuck = tokio::spawn(async move {
        let (mut c, _) = Client::go(addr, NAME).await;
        c.read(wedge * BLOCK, 10).await
    });
    let store = Arc::clone(&fx.store);
    let wedged_key = fx.block_key(wedge);
    eventually("the wedged block is asked for", || store.calls(&wedged_key) >= 1).await;
    // Another block (holding data, of another object), far from the
    // background restore: answered while the wedged one still hangs.
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    let other = (76..96).find(|&i| fx.manifest.block(i).is_some() && fx.block_key(i) != wedged_key).unwrap() * BLOCK;
    assert_eq!(c.read(other, BLOCK as u32).await.unwrap(), source[other as usize..(other + BLOCK) as usize]);
    assert!(!stuck.is_finished(), "the wedged read is still waiting");
    // The watchdog names the block a client read waits on.
    let progress = Arc::clone(&fx.progress);
    eventually("the restore is flagged stalled on the read", || {
        progress.stalled().is_some_and(|r| r.contains(&format!("block {wedge} ")) && r.contains("client read"))
    })
    .await;
    let reason = fx.progress.stalled().unwrap();
    assert!(reason.contains(&format!("offset {}", wedge * BLOCK)), "{reason}");
    assert!(fx.live.oldest_wait().is_some_and(|w| w.block == wedge && w.readers >= 1));
    fx.cancel.cancel();
    stuck.abort();
    let _ = fx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_across_blocks_not_restored_fetches_them_at_once() {
    // The read's first block is wedged: fetched one after another, the
    // others would never be asked for while it hangs.
    let first = 60;
    let fx = start_with(96, Duration::from_millis(200), 2, wedged(first), wedge_tolerant, false).await;
    let addr = fx.addr;
    let read = tokio::spawn(async move {
        let (mut c, _) = Client::go(addr, NAME).await;
        c.read(first * BLOCK + 10, (4 * BLOCK) as u32).await
    });
    let store = Arc::clone(&fx.store);
    let wedged_key = fx.block_key(first);
    // The read's other blocks that hold data of other objects.
    let keys: Vec<String> = (first + 1..=first + 4)
        .filter(|&i| fx.manifest.block(i).is_some())
        .map(|i| fx.block_key(i))
        .filter(|k| *k != wedged_key)
        .collect();
    assert!(keys.len() >= 2, "the sample volume has data there");
    eventually("every other block of the read is asked for", || keys.iter().all(|k| store.calls(k) >= 1)).await;
    assert!(!read.is_finished(), "the read waits for its wedged block");
    assert!(
        fx.progress.blocks_settled.load(Ordering::Relaxed) < first,
        "the background restore has not reached those blocks: the read asked for them"
    );
    fx.cancel.cancel();
    read.abort();
}

/// Blocks holding data of an object no other block holds, in order.
fn unique_data_blocks(manifest: &Manifest, blocks: u64) -> Vec<u64> {
    let keys: Vec<Option<String>> = (0..blocks).map(|i| manifest.block(i).map(|b| manifest.object_key(&b))).collect();
    (0..blocks)
        .filter(|&i| {
            keys[i as usize].as_ref().is_some_and(|k| keys.iter().filter(|o| o.as_ref() == Some(k)).count() == 1)
        })
        .collect()
}

fn unhedged(c: &mut rehydrate::config::Config) {
    c.fetch.hedge.enabled = false;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_of_a_block_the_background_has_on_the_wire_shares_that_fetch() {
    // The background's request for `slow` takes 3 s; eight reads of far
    // blocks taking 2 s each teach the export that a fetch on demand takes
    // 2 s. Then `slow` is read about 1 s before its answer is due: the read
    // waits for it rather than asking the store again. (1 s of slack either
    // way on a slow machine.)
    let blocks = 48;
    // The slow block and the far ones, from the snapshot's manifest.
    let pick = move |m: &Manifest| {
        let unique = unique_data_blocks(m, blocks);
        let far: Vec<u64> = unique.iter().copied().filter(|&i| i >= 30).take(8).collect();
        assert_eq!(far.len(), 8, "the sample volume has unique data blocks far away");
        (unique[0], far)
    };
    let faults = move |m: &Manifest| {
        let (slow, far) = pick(m);
        let key = |i: u64| m.object_key(&m.block(i).unwrap());
        let mut rules =
            vec![FaultRule::new(Fault::Latency(Duration::from_millis(3000))).path_contains(&key(slow)).first(1)];
        for i in far {
            rules.push(FaultRule::new(Fault::Latency(Duration::from_millis(2000))).path_contains(&key(i)).first(1));
        }
        rules
    };
    let mut fx = start_with(blocks, Duration::from_millis(10), 4, faults, unhedged, false).await;
    let (slow, far) = pick(&fx.manifest);
    let source = fx.source();
    let slow_key = fx.block_key(slow);
    let mut readers = Vec::new();
    for &i in &far {
        let addr = fx.addr;
        readers.push(tokio::spawn(async move {
            let (mut c, _) = Client::go(addr, NAME).await;
            c.read(i * BLOCK, 4096).await.unwrap()
        }));
    }
    for (r, &i) in readers.into_iter().zip(&far) {
        assert_eq!(r.await.unwrap(), source[(i * BLOCK) as usize..(i * BLOCK + 4096) as usize]);
    }
    assert_eq!(fx.live.counts.demand_fetches.load(Ordering::Relaxed), 8);
    assert_eq!(fx.store.calls(&slow_key), 1, "the background asked for the slow block once");
    assert!(!fx.live.is_local(slow), "its answer is not in yet");
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    let at = slow * BLOCK + 1000;
    assert_eq!(c.read(at, 5000).await.unwrap(), source[at as usize..(at + 5000) as usize]);
    assert_eq!(fx.live.counts.shared_fetches.load(Ordering::Relaxed), 1, "the read took the background's block");
    assert_eq!(fx.live.counts.demand_fetches.load(Ordering::Relaxed), 8, "and fetched nothing itself");
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded);
    assert!(std::fs::read(target(&fx.dir)).unwrap() == source, "the target is the snapshot");
    assert_eq!(fx.store.calls(&slow_key), 1, "one request for the slow block in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_block_a_reader_fetched_while_the_background_request_queued_is_not_asked_again() {
    // One request on the wire at a time: the background's next requests
    // wait at the store's gate, which a reader's request passes.
    let one_at_a_time = |c: &mut rehydrate::config::Config| {
        c.concurrency.concurrency_min = std::num::NonZeroUsize::MIN;
        c.concurrency.concurrency_max = std::num::NonZeroUsize::MIN;
        c.fetch.hedge.enabled = false;
    };
    // Room for eight requests (a file store's are charged 512 KiB each
    // beside the block); the first one the background sends takes 3 s, so
    // the other seven dispatched wait at the gate that long, whatever order
    // their tasks reached it in; the reader's request takes 100 ms.
    let first_slow =
        |_: &Manifest| vec![FaultRule::new(Fault::Latency(Duration::from_secs(3))).path_contains("blocks/").first(1)];
    let mut fx = start_with(48, Duration::from_millis(100), 80, first_slow, one_at_a_time, true).await;
    let source = fx.source();
    let store = Arc::clone(&fx.store);
    eventually("the first background request is out", || store.calls("blocks/") >= 1).await;
    // A block of the first eight objects (dispatched at once) not asked for.
    let mut order: Vec<String> = Vec::new();
    for i in 0..48 {
        if let Some(block) = fx.manifest.block(i) {
            let key = fx.manifest.object_key(&block);
            if !order.contains(&key) {
                order.push(key);
            }
        }
    }
    let queued = unique_data_blocks(&fx.manifest, 48)
        .into_iter()
        .find(|&i| order[..8].contains(&fx.block_key(i)) && fx.store.calls(&fx.block_key(i)) == 0)
        .expect("a unique block among the first eight objects, waiting at the gate");
    let key = fx.block_key(queued);
    let (mut c, _) = Client::go(fx.addr, NAME).await;
    let at = queued * BLOCK;
    assert_eq!(c.read(at, 4096).await.unwrap(), source[at as usize..(at + 4096) as usize]);
    assert_eq!(fx.live.counts.demand_fetches.load(Ordering::Relaxed), 1);
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded);
    assert!(std::fs::read(target(&fx.dir)).unwrap() == source, "the target is the snapshot");
    assert_eq!(fx.store.calls(&key), 1, "the background took the reader's block and sent nothing");
    // The background fetched every object but that one: the ledger says so.
    common::check_ledger(&report, &fx.manifest);
    assert_eq!(report.objects_from_export, 1, "{report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libnbd_tools_see_copy_and_write_the_volume_during_the_restore() {
    let (Some(nbdinfo), Some(nbdcopy), Some(nbdsh)) =
        (installed_tool("nbdinfo"), installed_tool("nbdcopy"), installed_tool("nbdsh"))
    else {
        return;
    };
    let mut fx = start(128, Duration::from_millis(100), 4, no_faults).await;
    let url = format!("nbd://{}/{NAME}", fx.addr);
    let info = run_tool(&nbdinfo, &["--json", &url]).await;
    assert!(info.contains(&format!("\"export-size\": {}", fx.size())), "{info}");
    let copy = fx.dir.path().join("copy.img");
    assert!(fx.restore_running(), "nbdcopy starts while the restore runs");
    run_tool(&nbdcopy, &[&url, copy.to_str().unwrap()]).await;
    assert!(std::fs::read(&copy).unwrap() == fx.source(), "nbdcopy got the volume byte for byte");
    let script = format!("h.pwrite(b'\\x5e' * 3000, {}); h.flush()", 100 * BLOCK + 17);
    let wrote = python_nbd_installed();
    if wrote {
        run_tool(&nbdsh, &["-u", &url, "-c", &script]).await;
    }
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded);
    let mut expected = fx.source();
    if wrote {
        expected[(100 * BLOCK + 17) as usize..(100 * BLOCK + 3017) as usize].fill(0x5e);
    }
    assert!(std::fs::read(target(&fx.dir)).unwrap() == expected, "nbdsh's write survived the restore");
}

/// The same volume exported on a unix socket (`nbd+unix://`), read by
/// libnbd's tools while the restore runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn libnbd_tools_read_a_unix_socket_export_during_the_restore() {
    let (Some(nbdinfo), Some(nbdcopy)) = (installed_tool("nbdinfo"), installed_tool("nbdcopy")) else {
        return;
    };
    let mut fx = start(64, Duration::from_millis(100), 4, no_faults).await;
    let socket = fx.dir.path().join("vol.sock");
    let url = format!("nbd+unix:///{NAME}?socket={}", socket.display());
    let listener = Listener::bind(&ExportAddr::parse(&url).unwrap()).await.unwrap();
    let export = Export { name: NAME.into(), volume: Arc::clone(&fx.live), limits: Limits::default() };
    tokio::spawn(serve(listener, export, fx.stop.clone()));
    let info = run_tool(&nbdinfo, &["--json", &url]).await;
    assert!(info.contains(&format!("\"export-size\": {}", fx.size())), "{info}");
    assert!(fx.restore_running(), "nbdcopy starts while the restore runs");
    let copy = fx.dir.path().join("copy.img");
    run_tool(&nbdcopy, &[&url, copy.to_str().unwrap()]).await;
    assert!(std::fs::read(&copy).unwrap() == fx.source(), "nbdcopy got the volume byte for byte over the socket");
    assert!(fx.finish().await.unwrap().succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_compares_reads_and_writes_the_volume_during_the_restore() {
    let (Some(qemu_img), Some(qemu_io)) = (installed_tool("qemu-img"), installed_tool("qemu-io")) else {
        return;
    };
    let mut fx = start(128, Duration::from_millis(100), 4, no_faults).await;
    let url = format!("nbd://{}/{NAME}", fx.addr);
    let source = fx.dir.path().join("source-41.img");
    assert!(fx.restore_running(), "qemu-img compare starts while the restore runs");
    run_tool(&qemu_img, &["compare", "-f", "raw", "-F", "raw", source.to_str().unwrap(), &url]).await;
    let writes = format!("write -P 0x6b {} 4096", 120 * BLOCK + 512);
    let whole = format!("write -P 0x7c {} {BLOCK}", 110 * BLOCK);
    run_tool(&qemu_io, &["-f", "raw", "-c", &writes, "-c", &whole, "-c", "flush", &url]).await;
    let check = format!("read -P 0x6b {} 4096", 120 * BLOCK + 512);
    run_tool(&qemu_io, &["-f", "raw", "-c", &check, &url]).await;
    let report = fx.finish().await.unwrap();
    assert!(report.succeeded);
    let mut expected = fx.source();
    expected[(120 * BLOCK + 512) as usize..(120 * BLOCK + 4608) as usize].fill(0x6b);
    expected[(110 * BLOCK) as usize..(111 * BLOCK) as usize].fill(0x7c);
    assert!(std::fs::read(target(&fx.dir)).unwrap() == expected, "qemu-io's writes survived the restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exports_during_the_restore_and_serves_until_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(24, 41);
    let url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let config = dir.path().join("rehydrate.toml");
    std::fs::write(&config, format!("[checkpoint]\ndir = \"{}\"\n", dir.path().join("state").display())).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let target = dir.path().join("vol.img");
    let mut child = tokio::process::Command::new(common::binary())
        .args(["restore", "--json", "--manifest", &url, "--export", &format!("nbd://127.0.0.1:{port}/{NAME}")])
        .arg("--target")
        .arg(&target)
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for needle in ["exporting at nbd://", "still exporting"] {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), stderr.next_line()).await.unwrap().unwrap();
            let line = line.unwrap_or_else(|| panic!("the binary ended before {needle:?}: {seen:?}"));
            seen.push(line.clone());
            if line.contains(needle) {
                break;
            }
        }
        // The export serves at each stage: during and after the restore.
        let (mut c, size) = Client::go(format!("127.0.0.1:{port}").parse().unwrap(), NAME).await;
        assert_eq!(size, volume.size_bytes);
        let source = std::fs::read(dir.path().join("source-41.img")).unwrap();
        assert_eq!(
            c.read(3 * BLOCK - 7, 100).await.unwrap(),
            source[(3 * BLOCK - 7) as usize..(3 * BLOCK + 93) as usize]
        );
    }
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{seen:?}");
    assert!(std::fs::read(&target).unwrap() == std::fs::read(dir.path().join("source-41.img")).unwrap());
}
