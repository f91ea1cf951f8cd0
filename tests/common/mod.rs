//! Shared test fixtures: sample volumes, snapshots in file stores, configs,
//! and the ledger oracle every restore test ends with.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rehydrate::block::{BlockRange, Compression, HashAlgorithm};
use rehydrate::config::Config;
use rehydrate::manifest::{Manifest, ManifestLimits};
use rehydrate::restore::progress::Progress;
use rehydrate::restore::{Engine, RestoreError, RestoreReport, RestoreSpec};
use rehydrate::sample::SampleVolume;
use rehydrate::store::file::FileStore;
use rehydrate::write::BackendChoice;
use tokio_util::sync::CancellationToken;

pub const BLOCK: u32 = 64 * 1024;

/// A sample volume of `blocks` full blocks plus a short tail.
pub fn volume(blocks: u64, seed: u64) -> SampleVolume {
    SampleVolume { size_bytes: blocks * u64::from(BLOCK) + 1000, block_size_bytes: BLOCK, seed }
}

/// Write `volume` under `dir` and snapshot it into `<dir>/store/bucket/snap`.
pub async fn snapshot(dir: &Path, volume: &SampleVolume, compression: Compression, hash: HashAlgorithm) -> String {
    let name = format!("vol-{}", volume.seed);
    snapshot_into(&store_root(dir), &dir.join(format!("source-{}.img", volume.seed)), volume, &name, compression, hash)
        .await;
    format!("file://{}/{name}.manifest", store_root(dir).display())
}

/// Write `volume` to `source`, snapshot it as `name` into the file store at
/// `prefix_dir` (the layout an S3 server over its parent serves), and return
/// the manifest.
pub async fn snapshot_into(
    prefix_dir: &Path,
    source: &Path,
    volume: &SampleVolume,
    name: &str,
    compression: Compression,
    hash: HashAlgorithm,
) -> Manifest {
    std::fs::create_dir_all(prefix_dir).unwrap();
    volume.write_to(source).unwrap();
    let spec = rehydrate::snapshot::CreateSpec {
        source: source.to_owned(),
        name: name.to_owned(),
        block_size_bytes: volume.block_size_bytes,
        compression,
        hash_algorithm: hash,
        puts_inflight_max: 8,
    };
    rehydrate::snapshot::create(Arc::new(FileStore::new(prefix_dir.to_owned())), &spec).await.unwrap();
    let bytes = std::fs::read(prefix_dir.join(format!("{name}.manifest"))).unwrap();
    Manifest::decode(&bytes, &ManifestLimits::default()).unwrap()
}

pub fn store_root(dir: &Path) -> PathBuf {
    dir.join("store/bucket/snap")
}

/// A config for tests: fixed jitter, short backoff, checkpoints in `state`,
/// no hedging (tests count requests exactly; hedging is tested in
/// `src/fetch.rs`).
pub fn config(backend: BackendChoice, state: &Path) -> Config {
    let mut c = Config::default();
    c.fetch.hedge.enabled = false;

    c.checkpoint.dir = Some(state.to_owned());
    c.write.backend = backend;
    c.fetch.jitter_seed = Some(1);
    c.fetch.backoff_base_millis = std::num::NonZeroU64::new(1).unwrap();
    c.fetch.backoff_cap_millis = std::num::NonZeroU64::new(5).unwrap();
    c
}

pub fn spec(manifest_url: &str, target: &Path) -> RestoreSpec {
    RestoreSpec {
        manifest_url: manifest_url.to_owned(),
        target: target.to_owned(),
        secondaries: vec![],
        peers: vec![],
        in_place: false,
        restart: false,
        blocks: None,
        job: None,
    }
}

pub async fn restore(engine: &Engine, spec: &RestoreSpec) -> Result<RestoreReport, RestoreError> {
    rehydrate::restore::restore(engine, spec, &Arc::new(Progress::default()), &CancellationToken::new()).await
}

pub fn load_manifest(url: &str) -> Manifest {
    let path = url.strip_prefix("file://").unwrap();
    Manifest::decode(&std::fs::read(path).unwrap(), &ManifestLimits::default()).unwrap()
}

/// The ledger oracle: every block settled or failed, never neither; counts add
/// up; a success reads back byte-identical.
pub fn check_ledger(report: &RestoreReport, manifest: &Manifest) {
    assert!(report.whole_volume, "a whole-volume restore reports a shard: {report:#?}");
    check_shard_ledger(report, manifest, BlockRange::all(&manifest.layout));
}

/// The ledger oracle of a restore of the blocks `blocks` (a shard, or the
/// whole volume): as [`check_ledger`], over those blocks.
pub fn check_shard_ledger(report: &RestoreReport, manifest: &Manifest, blocks: BlockRange) {
    assert_eq!(report.block_range, blocks, "the report names other blocks");
    let failed: std::collections::BTreeSet<u64> = report.damage.iter().map(|d| d.index).collect();
    assert_eq!(failed.len() as u64, report.blocks_failed, "damage report and failed count disagree");
    assert_eq!(
        report.blocks_settled + report.blocks_failed,
        report.blocks_total,
        "a block is neither settled nor failed: {report:#?}"
    );
    assert_eq!(report.blocks_total, blocks.len());
    assert_eq!(report.bytes_total, blocks.bytes(&manifest.layout));
    assert!(failed.iter().all(|&index| blocks.contains(index)), "a block outside {blocks} failed");
    assert_eq!(report.succeeded, failed.is_empty(), "succeeded with failed blocks");
    // Metrics add up: every distinct object was served by one source or failed.
    let distinct: std::collections::HashSet<_> =
        manifest.entries().iter().filter(|e| blocks.contains(e.index)).map(|e| (e.hash, e.compression)).collect();
    let served: u64 = report.fetch.served_by_source.iter().map(|(_, n)| n).sum();
    let failed_objects: std::collections::HashSet<_> = report
        .damage
        .iter()
        .map(|d| manifest.entry(d.index).map(|e| (e.hash, e.compression)).expect("a damaged block has an object"))
        .collect();
    assert_eq!(
        served + failed_objects.len() as u64 + report.objects_from_export,
        report.objects_planned,
        "served + failed + from the export's client != planned objects"
    );
    if report.blocks_resumed == 0 {
        assert_eq!(report.objects_planned, distinct.len() as u64, "a fresh run plans every distinct object");
    }
    // The timings are parts of the duration, and the tail is part of the transfer.
    let t = &report.timings;
    let parts = [t.prepare_secs, t.transfer_secs, t.tail_secs, t.finish_secs];
    assert!(parts.iter().all(|s| s.is_finite() && *s >= 0.0), "{t:?}");
    assert!(t.prepare_secs + t.transfer_secs + t.finish_secs <= report.duration_secs + 1e-6, "{t:?} {report:#?}");
    assert!(t.tail_secs <= t.transfer_secs, "{t:?}");
}

/// Read the target back independently and against the volume's pattern.
pub fn check_identical(manifest: &Manifest, volume: &SampleVolume, target: &Path) {
    let readback = rehydrate::restore::readback::readback(manifest, target).unwrap();
    assert!(readback.matches(), "read-back mismatches: {:?}", readback.mismatched);
    assert_eq!(volume.mismatches(target).unwrap(), Vec::<u64>::new());
}

/// Files in a directory whose names look like rehydrate's staging files.
pub fn staging_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| rehydrate::target::is_staging_name(n))
                .collect()
        })
        .unwrap_or_default()
}

/// A loop device over a file, detached when dropped.
pub struct Loop {
    pub device: PathBuf,
}

impl Loop {
    pub fn attach(backing: &Path) -> Option<Loop> {
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(backing).output().ok()?;
        if !out.status.success() {
            eprintln!("SKIP: losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Loop { device: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()) })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// A loop device over a new file of `size_bytes` bytes of `fill` in `dir`
/// (None, with a SKIP line, where loop devices are not available).
pub fn loop_device(dir: &Path, size_bytes: u64, fill: u8) -> Option<Loop> {
    let backing = dir.join("device.img");
    std::fs::write(&backing, vec![fill; size_bytes as usize]).unwrap();
    Loop::attach(&backing)
}

/// A child process killed and reaped however the test ends.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // Already dead and reaped in the normal path; these then fail harmlessly.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The binary under test: this package's, or `REHYDRATE_BIN` (another build
/// of it, such as a release build or a copy that a concurrent build into the
/// same target directory cannot replace mid-test).
pub fn binary() -> PathBuf {
    std::env::var_os("REHYDRATE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_rehydrate")), PathBuf::from)
}

/// Config sections for a child reading a slowed in-process S3 server: short
/// backoff, fixed jitter, checkpoints in `state` every 100 ms or
/// `interval_bytes`, at most twice `interval_bytes` requested or written and
/// not yet settled, at most `requests_max` requests in flight, S3 deadlines
/// of a few seconds.
pub fn slow_s3_toml(state: &Path, interval_bytes: u64, requests_max: u64) -> String {
    format!(
        r#"
[fetch]
attempt_timeout_millis = 5000
backoff_base_millis = 5
backoff_cap_millis = 50
jitter_seed = 7

[checkpoint]
dir = "{state}"
interval_millis = 100
interval_bytes = {interval_bytes}
unsettled_bytes_max = {unsettled_bytes_max}

[concurrency]
concurrency_min = 2
concurrency_max = {requests_max}

[s3]
connect_timeout_millis = 1000
operation_attempt_timeout_millis = 3000
operation_timeout_millis = 5000
body_deadline_millis = 5000
body_idle_timeout_millis = 2000
"#,
        state = state.display(),
        unsettled_bytes_max = 2 * interval_bytes,
    )
}

/// An engine whose `s3://bucket/<prefix>` is an in-process S3 server
/// (`config.s3` says where: `LoopbackS3::s3_config`), with every production
/// policy around it (`store::stack`, as `store::open` gives an S3 store).
pub async fn engine_on_loopback(config: Config, prefix: &str) -> Arc<Engine> {
    use rehydrate::store::loopback::LoopbackS3;
    let s3 = rehydrate::store::s3::S3Store::connect_with_static_credentials(
        "bucket",
        prefix,
        &config.s3,
        &LoopbackS3::credentials(),
    )
    .await
    .unwrap();
    let engine = Arc::new(Engine::new(config));
    let url = rehydrate::store::StoreUrl::S3 { bucket: "bucket".into(), prefix: prefix.into() };
    engine.register_remote_store(url, Arc::new(s3)).unwrap();
    engine
}

/// Point a command (the real binary) at the in-process S3 server at
/// `endpoint`: its credentials and region through the standard environment,
/// and no AWS config, profile or credentials file of the machine (`scratch`
/// holds the missing stand-ins), so the test sees only what it set.
pub trait LoopbackEnv {
    fn loopback_env(&mut self, endpoint: &str, scratch: &Path) -> &mut Self;
}

impl LoopbackEnv for std::process::Command {
    fn loopback_env(&mut self, endpoint: &str, scratch: &Path) -> &mut Self {
        use rehydrate::store::loopback::{LOOPBACK_ACCESS_KEY_ID, LOOPBACK_REGION, LOOPBACK_SECRET_ACCESS_KEY};
        self.env("AWS_ENDPOINT_URL", endpoint)
            .env("AWS_ACCESS_KEY_ID", LOOPBACK_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", LOOPBACK_SECRET_ACCESS_KEY)
            .env("AWS_REGION", LOOPBACK_REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", scratch.join("no-aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", scratch.join("no-aws-credentials"))
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
    }
}

/// A snapshot of `volume` named `name` under `<root>/<bucket>/<prefix>` (its
/// source image written to `source`), served by an in-process S3 server over
/// `root` whose block GETs each take `latency`: a restore slow enough to be
/// killed part way.
pub async fn slow_loopback(
    root: &Path,
    source: &Path,
    volume: &SampleVolume,
    (bucket, prefix, name): (&str, &str, &str),
    latency: std::time::Duration,
) -> (Manifest, rehydrate::store::loopback::LoopbackS3) {
    use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
    let prefix_dir = root.join(bucket).join(prefix);
    let manifest = snapshot_into(&prefix_dir, source, volume, name, Compression::None, HashAlgorithm::Blake3).await;
    let server = rehydrate::store::loopback::LoopbackS3::start(root.to_owned()).await.unwrap();
    server.add_fault(FaultRule::new(Fault::Latency(latency)).path_contains("/blocks/").method(FaultMethod::Get));
    (manifest, server)
}

/// `rehydrate serve` with `config` on a free loopback port, pointed at the
/// in-process server at `endpoint` (when given; `scratch` holds the AWS
/// stand-ins), once it answers `/readyz`; its stderr in `log`.
pub async fn serve_worker(
    config: &Path,
    endpoint: Option<&str>,
    scratch: &Path,
    log: &Path,
) -> (Reaped, rehydrate::api::client::ApiClient) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = std::process::Command::new(binary());
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
        .arg(config)
        .env_remove("REHYDRATE_TOKENS")
        .env_remove("FAILPOINTS")
        .env("REHYDRATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    if let Some(endpoint) = endpoint {
        cmd.loopback_env(endpoint, scratch);
    }
    let mut child = Reaped(cmd.spawn().unwrap());
    let client = rehydrate::api::client::ApiClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let started = std::time::Instant::now();
    while !client.raw(hyper::Method::GET, "/readyz", None).await.is_ok_and(|a| a.status.is_success()) {
        let exited = child.0.try_wait().unwrap();
        assert!(exited.is_none(), "the worker exited at startup: {}", std::fs::read_to_string(log).unwrap_or_default());
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "the worker never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (child, client)
}

/// Poll job `id` until it has ended (succeeded, failed or cancelled).
pub async fn job_ended(client: &rehydrate::api::client::ApiClient, id: &str) -> rehydrate::worker::JobStatus {
    use rehydrate::worker::JobState;
    let started = std::time::Instant::now();
    loop {
        let job = client.get(id).await.unwrap();
        if matches!(job.state, JobState::Succeeded | JobState::Failed | JobState::Cancelled) {
            return job;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "job {id} did not end: {job:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// A store whose gets of the objects whose keys contain `key` wait until the
/// test opens the gate (`open.send_replace(true)`): a restore then settles
/// everything but those blocks and stays running.
#[derive(Debug)]
pub struct GateStore {
    pub inner: rehydrate::store::SharedStore,
    pub key: String,
    pub open: tokio::sync::watch::Sender<bool>,
}

impl rehydrate::store::BlockStore for GateStore {
    fn url(&self) -> &rehydrate::store::StoreUrl {
        self.inner.url()
    }
    fn get_for<'a>(
        &'a self,
        _ctx: &'a rehydrate::store::RequestContext,
        key: &'a str,
        len_max_bytes: u64,
    ) -> rehydrate::store::BoxFuture<'a, Result<bytes::Bytes, rehydrate::store::StoreError>> {
        Box::pin(async move {
            if key.contains(&self.key) {
                let mut rx = self.open.subscribe();
                let _ = rx.wait_for(|open| *open).await;
            }
            self.inner.get(key, len_max_bytes).await
        })
    }
    fn put_for<'a>(
        &'a self,
        _ctx: &'a rehydrate::store::RequestContext,
        key: &'a str,
        bytes: bytes::Bytes,
    ) -> rehydrate::store::BoxFuture<'a, Result<(), rehydrate::store::StoreError>> {
        self.inner.put(key, bytes)
    }
    fn exists_for<'a>(
        &'a self,
        _ctx: &'a rehydrate::store::RequestContext,
        key: &'a str,
    ) -> rehydrate::store::BoxFuture<'a, Result<bool, rehydrate::store::StoreError>> {
        self.inner.exists(key)
    }
}

/// An outside tool the suite drives (libnbd's, QEMU's), if installed; when
/// not, says SKIP and why (`.ci/run` installs them).
pub fn installed_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!("SKIP: {name} is not installed (Debian: libnbd-bin / qemu-utils); .ci/run installs it");
    }
    found
}

/// Whether libnbd's python3 module (which `nbdsh` is) is installed; when
/// not, says SKIP.
pub fn python_nbd_installed() -> bool {
    let found = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIP: nbdsh needs the python3 module nbd (Debian: python3-libnbd); .ci/run installs it");
    }
    found
}

/// Run an outside tool (`installed_tool`) with `args`, at most 120 s; its
/// output, stdout then stderr. Fails the test if it fails.
pub async fn run_tool(program: &Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(program)
            .args(args)
            // nbdsh is a python3 script: the system's python3 has the module.
            .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
            .output(),
    )
    .await
    .expect("the tool ends")
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} {args:?} failed: {text}", program.display());
    text
}
