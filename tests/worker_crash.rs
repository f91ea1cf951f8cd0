//! The real worker binary (`rehydrate serve`), stopped mid-job and started
//! again on the same state directory.
//!
//! A snapshot is served over real HTTP by [`LoopbackS3`] in this process; the
//! worker's profile points at `s3://bucket/prefix` and the child reads it
//! through the AWS SDK's standard environment chain. Every block GET waits a
//! fixed latency at the server and the child is held to a few requests in
//! flight, so a job takes seconds and can be stopped part way.
//!
//! - **SIGKILL**: the worker dies with no cleanup. The next start requeues the
//!   job, which resumes from the checkpoint on disk: it ends byte-identical,
//!   every block settled, the blocks the checkpoint named counted as resumed,
//!   and not one object the checkpoint names as settled is requested again
//!   (counted at the server).
//! - **SIGTERM under load**: two jobs run; the process exits within its grace
//!   period plus a small margin (a bound on shutdown, not a speed claim), and
//!   both jobs resume and complete on the next start.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use common::{LoopbackEnv, Reaped, binary, slow_s3_toml, snapshot_into};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use rehydrate::api::client::ApiClient;
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::checkpoint::{Checkpoint, checkpoint_key};
use rehydrate::manifest::Manifest;
use rehydrate::sample::SampleVolume;
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::loopback::LoopbackS3;
use rehydrate::worker::{JobRecord, JobSpec, JobState, JobStore};
use serde_json::{Value, json};

const BUCKET: &str = "worker-bucket";
const PREFIX: &str = "vols";
const BLOCK_BYTES: u32 = 64 * 1024;
/// 480 blocks of 64 KiB (360 distinct objects): seconds of work at the
/// latency below, so a job is still running when it is stopped.
const BLOCKS: u64 = 480;
/// Server-side latency of every block GET.
const BLOCK_LATENCY: Duration = Duration::from_millis(40);
/// `concurrency.concurrency_max` of the child: block requests in flight.
const INFLIGHT_REQUESTS_MAX: u64 = 4;
/// `checkpoint.interval_bytes` of the child, in blocks.
const INTERVAL_BLOCKS: u64 = 8;
/// `worker.shutdown_grace_millis` of the child.
const GRACE: Duration = Duration::from_millis(3000);
/// What the exit may take beyond the grace period: the HTTP server's and the
/// runtime's own bounded closes (1 s each) and process teardown on a loaded
/// machine.
const EXIT_MARGIN: Duration = Duration::from_secs(4);
/// Generous: polls end as soon as the condition holds.
const DEADLINE: Duration = Duration::from_secs(90);

/// A running `rehydrate serve` and a client for it.
struct Served {
    child: Reaped,
    client: ApiClient,
    log: PathBuf,
}

/// One snapshot in the bucket, each under its own prefix and store profile
/// (each seed its own data, so no two share an object and the server's
/// request log tells their jobs apart).
///
/// Separate prefixes are separate stores, each with its own concurrency
/// window: jobs on one store queue behind each other's requests (FIFO), so
/// two jobs of one store would not both be mid-way at once here.
struct Snap {
    name: String,
    prefix: String,
    profile: String,
    volume: SampleVolume,
    manifest: Manifest,
}

struct Fixture {
    dir: tempfile::TempDir,
    server: LoopbackS3,
    snaps: Vec<Snap>,
    roots: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Fixture {
    async fn new(seeds: &[u64], worker_extra: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let mut snaps = Vec::new();
        let mut profiles = String::new();
        for (i, &seed) in seeds.iter().enumerate() {
            let (prefix, profile) = (format!("{PREFIX}-{i}"), format!("p{i}"));
            profiles.push_str(&format!("[worker.profiles.{profile}]\nstore = \"s3://{BUCKET}/{prefix}\"\n"));
            let prefix_dir = base.join("s3").join(BUCKET).join(&prefix);
            let name = format!("vol-{seed}");
            let size_bytes = BLOCKS * u64::from(BLOCK_BYTES) + 1000;
            let volume = SampleVolume { size_bytes, block_size_bytes: BLOCK_BYTES, seed };
            // A file store writes exactly the layout the S3 server serves.
            let source = base.join(format!("{name}.img"));
            let manifest =
                snapshot_into(&prefix_dir, &source, &volume, &name, Compression::None, HashAlgorithm::Blake3).await;
            snaps.push(Snap { name, prefix, profile, volume, manifest });
        }

        let server = LoopbackS3::start(base.join("s3")).await.unwrap();
        server.add_fault(
            FaultRule::new(Fault::Latency(BLOCK_LATENCY)).path_contains("/blocks/").method(FaultMethod::Get),
        );
        let roots = base.join("targets");
        std::fs::create_dir_all(&roots).unwrap();
        let state = base.join("state");
        let config = base.join("worker.toml");
        std::fs::write(
            &config,
            format!(
                r#"{common}
[worker]
target_roots = ["{roots}"]
target_free_bytes_min = 0
gate_backoff_millis = 20
gate_backoff_max_millis = 200
shutdown_grace_millis = {grace}
{worker_extra}

{profiles}"#,
                roots = roots.display(),
                common = slow_s3_toml(&state, INTERVAL_BLOCKS * u64::from(BLOCK_BYTES), INFLIGHT_REQUESTS_MAX),
                grace = GRACE.as_millis(),
            ),
        )
        .unwrap();
        Fixture { dir, server, snaps, roots, state, config }
    }

    fn target(&self, name: &str) -> PathBuf {
        self.roots.join(name)
    }

    fn spec(&self, id: &str, snap: &Snap, target: &Path) -> JobSpec {
        JobSpec {
            id: id.into(),
            profile: snap.profile.clone(),
            manifest: format!("{}.manifest", snap.name),
            target: target.to_owned(),
            replace: false,
            restart: false,
            export: Default::default(),
        }
    }

    /// Start `rehydrate serve` on a free port and wait until it is ready.
    async fn serve(&self, run: &str) -> Served {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = self.dir.path().join(format!("serve-{run}.log"));
        let child = Command::new(binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&self.config)
            .loopback_env(&self.server.endpoint_url(), self.dir.path())
            .env_remove("REHYDRATE_TOKENS")
            .env_remove("FAILPOINTS")
            .env("REHYDRATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut served = Served {
            child: Reaped(child),
            client: ApiClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap(),
            log,
        };
        let start = Instant::now();
        while !served.client.raw(Method::GET, "/readyz", None).await.is_ok_and(|a| a.status.is_success()) {
            if let Some(status) = served.child.0.try_wait().unwrap() {
                panic!("the worker exited at startup ({status}): {}", served.log());
            }
            assert!(start.elapsed() < DEADLINE, "the worker never became ready: {}", served.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        served
    }

    fn checkpoint(&self, snap: &Snap, target: &Path) -> Checkpoint {
        let path = self.state.join(format!("{}.ckpt", checkpoint_key(target)));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let checkpoint = Checkpoint::decode(&bytes).expect("the checkpoint on disk decodes");
        assert_eq!(checkpoint.identity().manifest_digest, snap.manifest.digest());
        assert!(checkpoint.failed().is_empty(), "blocks recorded failed: {:?}", checkpoint.failed());
        // Every block it names as settled holds the snapshot's bytes.
        let staging = rehydrate::target::staging_path(target).unwrap();
        let data = std::fs::read(&staging).unwrap();
        let block = u64::from(BLOCK_BYTES);
        for index in (0..snap.volume.block_count()).filter(|&i| checkpoint.settled().is_settled(i)) {
            let want = snap.volume.block(index);
            let offset = (index * block) as usize;
            assert_eq!(data.get(offset..offset + want.len()), Some(&want[..]), "block {index} named settled");
        }
        checkpoint
    }

    /// A job's record as the stopped worker left it in its job database.
    fn stored(&self, id: &str) -> JobRecord {
        let store = JobStore::open(&self.state, 10_000).unwrap();
        store.get(id).unwrap().unwrap_or_else(|| panic!("no record of job {id}"))
    }

    /// Server paths of block objects requested from arrival `from` on.
    fn block_requests(&self, from: usize) -> Vec<String> {
        self.server
            .arrivals()
            .into_iter()
            .skip(from)
            .filter(|a| a.method == hyper::Method::GET && a.path.contains("/blocks/"))
            .map(|a| a.path)
            .collect()
    }

    /// The server path of every block object, with the blocks it holds.
    fn blocks_by_path(snap: &Snap) -> HashMap<String, Vec<u64>> {
        let mut by_path: HashMap<String, Vec<u64>> = HashMap::new();
        for entry in snap.manifest.entries() {
            let path = format!("/{BUCKET}/{}/{}", snap.prefix, block_key(&entry.hash, entry.compression));
            by_path.entry(path).or_default().push(entry.index);
        }
        by_path
    }

    /// Objects of `snap` requested since `from`.
    fn requested(&self, snap: &Snap, from: usize) -> HashSet<String> {
        let objects = Self::blocks_by_path(snap);
        self.block_requests(from).into_iter().filter(|p| objects.contains_key(p)).collect()
    }

    /// Objects of `snap` requested since `from` that `checkpoint` names as
    /// wholly settled.
    fn refetched(&self, snap: &Snap, from: usize, checkpoint: &Checkpoint) -> Vec<String> {
        let objects = Self::blocks_by_path(snap);
        self.requested(snap, from)
            .into_iter()
            .filter(|p| objects[p].iter().all(|&index| checkpoint.settled().is_settled(index)))
            .collect()
    }

    /// The finished job's ledger: every block settled, what the checkpoint
    /// held counted as resumed, the objects its run was served add up to the
    /// distinct objects the server saw requested since `from`, and the target
    /// reads back byte-identical with nothing left behind.
    fn check_finished(&self, snap: &Snap, job: &Value, target: &Path, resumed_from: &Checkpoint, from: usize) {
        let refetched = self.refetched(snap, from, resumed_from);
        assert!(
            refetched.is_empty(),
            "the restart requested {} settled objects, e.g. {:?}",
            refetched.len(),
            refetched.first()
        );
        assert_eq!(job["state"], json!("succeeded"), "{job:#}");
        assert_eq!(job["run"], json!(2), "one run before the stop, one after: {job:#}");
        assert_eq!(job["blocks"]["total"], json!(BLOCKS + 1), "{job:#}");
        assert_eq!(job["blocks"]["settled"], job["blocks"]["total"], "{job:#}");
        assert_eq!(job["blocks"]["failed"], json!(0), "{job:#}");
        assert_eq!(job["blocks"]["resumed"], json!(resumed_from.settled().settled_count()), "{job:#}");
        let served: u64 = job["sources"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
        let requested = self.requested(snap, from);
        assert_eq!(served, requested.len() as u64, "objects served != distinct objects requested: {job:#}");
        let readback = rehydrate::restore::readback::readback(&snap.manifest, target).unwrap();
        assert!(readback.matches(), "read-back mismatches: {:?}", readback.mismatched);
        assert_eq!(snap.volume.mismatches(target).unwrap(), Vec::<u64>::new());
        let staging = rehydrate::target::staging_path(target).unwrap();
        assert!(!staging.exists(), "staging file left behind: {}", staging.display());
        let checkpoint = self.state.join(format!("{}.ckpt", checkpoint_key(target)));
        assert!(!checkpoint.exists(), "the checkpoint outlived a successful restore");
    }
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn job(&self, id: &str) -> Value {
        self.client.get(id).await.unwrap().json()
    }

    /// Poll a job until `done` holds, within the deadline.
    async fn wait_for(&mut self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            if let Some(status) = self.child.0.try_wait().unwrap() {
                panic!("the worker exited ({status}) before job {id} was {what}: {}", self.log());
            }
            assert!(start.elapsed() < DEADLINE, "job {id} never became {what}: {job:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every sample of `/metrics`, by series (`name{labels}`).
    async fn metrics(&self) -> HashMap<String, f64> {
        let answer = self.client.raw(Method::GET, "/metrics", None).await.unwrap();
        assert_eq!(answer.status.as_u16(), 200, "{}", answer.text);
        let mut samples = HashMap::new();
        for line in answer.text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
            samples.insert(series.to_owned(), value.parse::<f64>().unwrap_or_else(|e| panic!("{line:?}: {e}")));
        }
        samples
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = i32::try_from(self.child.0.id()).unwrap();
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Wait for the child to exit, within `limit`.
    async fn exit_within(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(start.elapsed() < limit, "the worker did not exit within {limit:?}: {}", self.log());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Settled blocks a job reports, once it is running.
fn settled(job: &Value) -> u64 {
    job["blocks"]["settled"].as_u64().unwrap_or(0)
}

fn finished(job: &Value) -> bool {
    ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or(""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_resumes_its_job_without_refetching_settled_blocks() {
    let fx = Fixture::new(&[91], "").await;
    let snap = &fx.snaps[0];
    let target = fx.target("killed.img");
    let mut served = fx.serve("first").await;
    let answer = served.client.submit(&fx.spec("k", snap, &target)).await.unwrap();
    assert!(answer.created, "{:?}", answer.job);
    // Mid-way: a quarter settled and checkpointed, far from done.
    served.wait_for("k", "a quarter settled", |j| j["state"] == json!("running") && settled(j) >= BLOCKS / 4).await;
    served.signal(libc::SIGKILL);
    let (status, _) = served.exit_within(DEADLINE).await;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    drop(served);
    // A request the dead child wrote may still be read by the server.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let checkpoint = fx.checkpoint(snap, &target);
    let at_kill = checkpoint.settled().settled_count();
    assert!(at_kill > 0 && at_kill < BLOCKS, "killed mid-job: {at_kill} blocks in the checkpoint");
    // No cleanup ran: the record still says running; the next start requeues it.
    let record = fx.stored("k");
    assert_eq!((record.state, record.run), (JobState::Running, 1), "{record:?}");

    let mark = fx.server.arrivals().len();
    let mut served = fx.serve("second").await;
    let job = served.wait_for("k", "finished", finished).await;
    println!("killed with {at_kill} blocks checkpointed; the restart resumed {}", job["blocks"]["resumed"]);
    fx.check_finished(snap, &job, &target, &checkpoint, mark);
    served.signal(libc::SIGTERM);
    let (status, _) = served.exit_within(GRACE + EXIT_MARGIN).await;
    assert_eq!(status.code(), Some(0), "{}", served.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_within_the_grace_period_and_jobs_resume() {
    let fx = Fixture::new(&[92, 93], "").await;
    let targets = [fx.target("a.img"), fx.target("b.img")];
    let ids = ["a", "b"];
    let mut served = fx.serve("first").await;
    for ((id, target), snap) in ids.iter().zip(&targets).zip(&fx.snaps) {
        let answer = served.client.submit(&fx.spec(id, snap, target)).await.unwrap();
        assert!(answer.created, "{:?}", answer.job);
    }
    for id in ids {
        served.wait_for(id, "running with progress", |j| j["state"] == json!("running") && settled(j) >= 16).await;
    }
    served.signal(libc::SIGTERM);
    let (status, took) = served.exit_within(GRACE + EXIT_MARGIN).await;
    println!("SIGTERM with two jobs running: exited in {:.2}s (grace {GRACE:?})", took.as_secs_f64());
    assert_eq!(status.code(), Some(0), "runs stopped within the grace period: {}", served.log());
    drop(served);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let checkpoints: Vec<Checkpoint> = targets.iter().zip(&fx.snaps).map(|(t, snap)| fx.checkpoint(snap, t)).collect();
    for (id, checkpoint) in ids.iter().zip(&checkpoints) {
        let n = checkpoint.settled().settled_count();
        assert!(n > 0 && n < BLOCKS, "job {id} stopped mid-way: {n} blocks in its checkpoint");
        // Drained: stored as queued, to resume at the next start.
        let record = fx.stored(id);
        assert_eq!((record.state, record.run), (JobState::Queued, 1), "{record:?}");
        assert!(record.reason.as_deref().is_some_and(|r| r.contains("shut down")), "{record:?}");
    }

    let mark = fx.server.arrivals().len();
    let mut served = fx.serve("second").await;
    for (((id, target), snap), checkpoint) in ids.iter().zip(&targets).zip(&fx.snaps).zip(&checkpoints) {
        let job = served.wait_for(id, "finished", finished).await;
        fx.check_finished(snap, &job, target, checkpoint, mark);
    }
    served.signal(libc::SIGTERM);
    let (status, _) = served.exit_within(GRACE + EXIT_MARGIN).await;
    assert_eq!(status.code(), Some(0), "{}", served.log());
    assert!(common::staging_files(&fx.roots).is_empty(), "staging files left behind");
}

/// The sum of every series of metric `name` whose labels contain `label`.
fn sum(samples: &HashMap<String, f64>, name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
        .map(|(_, v)| v)
        .sum()
}

fn sample(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| panic!("no series {series} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_of_the_worker_add_up() {
    let fx = Fixture::new(&[94, 95], "jobs_running_max = 1").await;
    let targets = [fx.target("a.img"), fx.target("b.img")];
    let ids = ["a", "b"];
    let mut served = fx.serve("metrics").await;
    for ((id, target), snap) in ids.iter().zip(&targets).zip(&fx.snaps) {
        let answer = served.client.submit(&fx.spec(id, snap, target)).await.unwrap();
        assert!(answer.created, "{:?}", answer.job);
    }
    // During: one job runs, the other waits for a running slot.
    served.wait_for("a", "running with progress", |j| j["state"] == json!("running") && settled(j) >= 16).await;
    let during = served.metrics().await;
    let ratio = sample(&during, "rehydrate_job_progress_ratio{job=\"a\"}");
    assert!(ratio > 0.0 && ratio < 1.0, "progress of a running job: {ratio}");
    assert!(!during.keys().any(|k| k.contains("job=\"b\"")), "a queued job has no progress series");
    assert_eq!(sample(&during, "rehydrate_jobs{state=\"queued\"}"), 1.0);
    assert_eq!(sample(&during, "rehydrate_jobs{state=\"running\"}"), 1.0);
    let pending = sample(&during, "rehydrate_pending_blocks");
    assert!(pending > 0.0 && pending <= (BLOCKS + 1) as f64, "pending blocks of the running job: {pending}");
    assert!(sample(&during, "rehydrate_oldest_queued_job_age_seconds") >= 0.0);
    assert!(sample(&during, "rehydrate_oldest_inflight_block_age_seconds") >= 0.0);

    let mut jobs = Vec::new();
    for id in ids {
        jobs.push(served.wait_for(id, "finished", finished).await);
    }
    let after = served.metrics().await;
    for job in &jobs {
        assert_eq!(job["state"], json!("succeeded"), "{job:#}");
    }
    assert!(!after.keys().any(|k| k.starts_with("rehydrate_job_progress_ratio")), "ended jobs keep no progress series");
    assert_eq!(sample(&after, "rehydrate_jobs{state=\"succeeded\"}"), 2.0);
    assert_eq!(sample(&after, "rehydrate_jobs{state=\"queued\"}"), 0.0);
    assert_eq!(sample(&after, "rehydrate_pending_blocks"), 0.0);
    assert_eq!(sample(&after, "rehydrate_oldest_queued_job_age_seconds"), 0.0);
    // The counters add up: blocks settled are the finished jobs' blocks;
    // requests answered ok are the objects the jobs report served, which are
    // the distinct block objects the server saw requested.
    let settled_by_jobs: u64 = jobs.iter().map(|j| settled(j) - j["blocks"]["resumed"].as_u64().unwrap()).sum();
    assert_eq!(settled_by_jobs, 2 * (BLOCKS + 1));
    assert_eq!(sample(&after, "rehydrate_settled_blocks_total"), settled_by_jobs as f64);
    let served_by_jobs: u64 = jobs
        .iter()
        .flat_map(|j| j["sources"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).collect::<Vec<_>>())
        .sum();
    let requested: HashSet<String> = fx.block_requests(0).into_iter().collect();
    assert_eq!(served_by_jobs, requested.len() as u64);
    assert_eq!(sum(&after, "rehydrate_fetch_requests_total", "outcome=\"ok\""), served_by_jobs as f64);
    assert_eq!(sum(&after, "rehydrate_fetch_requests_total", ""), served_by_jobs as f64, "no request failed");
    served.signal(libc::SIGTERM);
    let (status, _) = served.exit_within(GRACE + EXIT_MARGIN).await;
    assert_eq!(status.code(), Some(0), "{}", served.log());
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
