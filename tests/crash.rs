//! Crash test: the real binary, killed again and again, resumes from its
//! checkpoint and ends byte-identical.
//!
//! A snapshot is served over real HTTP by [`LoopbackS3`] in this process; the
//! child `rehydrate restore` reads it as `s3://bucket/prefix` through the AWS
//! SDK's standard environment chain. Every block GET waits a fixed latency at
//! the server and the child is held to a few requests in flight, so a restore
//! takes seconds and can be stopped part way.
//!
//! Each cycle runs the child until it dies:
//! - **kill**: SIGKILL once the child has requested a seeded-random number of
//!   blocks nobody requested before (a random moment, measured in progress);
//! - **fail point** (with the `failpoints` feature): `FAILPOINTS=<name>=N*off->panic`
//!   crashes the child at the N+1-th pass through a named durability edge
//!   (the binary turns that panic into an abort: no cleanup runs);
//! - **kill during a slow fdatasync** (with the `failpoints` feature): every
//!   fdatasync takes 1.5 s longer, and SIGKILL comes late in one: the work
//!   lost must not grow with the disk's latency.
//!
//! After every crash the checkpoint on disk is checked against the staging
//! file: every block it names as settled holds the snapshot's bytes there, and
//! the settled count never goes down. Rework is measured at the server, from
//! its request log, in two parts that together bound it:
//! - a restart requests no object its checkpoint names as settled (zero);
//! - a crash loses at most [`lost_bound_objects`] of the objects its run
//!   requested (those its checkpoint does not name as settled).
//!
//! The last run
//! goes to completion: exit 0, target byte-identical, checkpoint removed, no
//! staging or temporary file left.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use common::{LoopbackEnv, Reaped, binary, slow_loopback, slow_s3_toml};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rehydrate::block::block_key;
use rehydrate::checkpoint::{Checkpoint, checkpoint_key};
use rehydrate::manifest::Manifest;
use rehydrate::sample::SampleVolume;
use rehydrate::store::loopback::LoopbackS3;

const BUCKET: &str = "crash-bucket";
const PREFIX: &str = "vols";
const NAME: &str = "vol";
const BLOCK_BYTES: u32 = 64 * 1024;
/// 480 blocks of 64 KiB: 360 distinct objects (the sample volume has zero and
/// duplicate blocks), enough for twenty crashes that each make some progress.
const BLOCKS: u64 = 480;
/// Server-side latency of every block GET: slow enough that a restore takes
/// seconds and can be stopped part way.
const BLOCK_LATENCY: Duration = Duration::from_millis(40);
/// How much longer every fdatasync takes in the slow-disk crashes: long
/// enough for the child to fetch ~150 blocks meanwhile (4 in flight at 40 ms)
/// if nothing held it back.
const SLOW_SYNC_MILLIS: u64 = 1500;
/// `concurrency.concurrency_max` of the child: block requests in flight.
const INFLIGHT_REQUESTS_MAX: u64 = 4;
/// `checkpoint.interval_bytes` of the child, in blocks.
const INTERVAL_BLOCKS: u64 = 8;
/// Crash cycles before the final ones (swap, status, completion).
const CYCLES: usize = 20;
/// No single child may live longer than this (it would be a hang).
const CHILD_DEADLINE: Duration = Duration::from_secs(60);

/// The most block objects one crash may throw away: objects the crashed run
/// requested that the checkpoint it left does not name as settled.
///
/// Every object is fetched by a unit that took its blocks' bytes from the
/// run's unsettled gate before asking for it, and gives them back only once
/// its blocks are fdatasynced **and** the checkpoint naming them is saved.
/// The gate holds twice the byte interval (`checkpoint.unsettled_bytes_max`
/// in [`slow_s3_toml`]), so whatever moment the crash
/// comes (mid-request, mid-fdatasync however slow, between the fdatasync and
/// the checkpoint's rename), the objects requested and not named by the
/// checkpoint are at most `2 * INTERVAL_BLOCKS`: 16 of the 361 objects, the
/// requests in flight included. Together with the other check (a restart
/// requests nothing its checkpoint names as settled), the work a crash makes
/// the job redo is at most this, and it does not depend on the disk.
fn lost_bound_objects() -> u64 {
    2 * INTERVAL_BLOCKS
}

#[derive(Debug, Clone)]
enum Crash {
    /// SIGKILL once this many never-requested blocks were requested, plus a
    /// random few milliseconds.
    Kill { fresh_requests: u64, extra_millis: u64 },
    /// Crash at the `skip + 1`-th pass through this fail point.
    FailPoint { name: &'static str, skip: u32 },
    /// Every fdatasync takes [`SLOW_SYNC_MILLIS`] longer (a disk busy with
    /// writeback); SIGKILL once this many never-requested blocks were
    /// requested, plus most of one slow sync.
    KillDuringSlowSync { fresh_requests: u64 },
    /// Run to completion.
    Complete,
}

const SETTLE_FAIL_POINTS: [&str; 4] =
    ["settle-before-sync", "settle-before-checkpoint", "checkpoint-before-rename", "checkpoint-before-dir-sync"];

fn plan(rng: &mut SmallRng) -> Vec<Crash> {
    let mut plan = Vec::new();
    for cycle in 0..CYCLES {
        let fail_points = cfg!(feature = "failpoints");
        if cycle % 2 == 0 || !fail_points {
            plan.push(Crash::Kill { fresh_requests: rng.random_range(2..=12), extra_millis: rng.random_range(0..30) });
        } else {
            let name = SETTLE_FAIL_POINTS[(cycle / 2) % SETTLE_FAIL_POINTS.len()];
            plan.push(Crash::FailPoint { name, skip: rng.random_range(0..=2) });
        }
    }
    if cfg!(feature = "failpoints") {
        for _ in 0..2 {
            plan.push(Crash::KillDuringSlowSync { fresh_requests: rng.random_range(2..=12) });
        }
        plan.push(Crash::FailPoint { name: "restore-before-swap", skip: 0 });
        plan.push(Crash::FailPoint { name: "restore-before-status", skip: 0 });
    } else {
        println!("SKIP: fail point crashes (build with --features failpoints)");
    }
    plan.push(Crash::Complete);
    plan
}

struct Fixture {
    dir: tempfile::TempDir,
    server: LoopbackS3,
    volume: SampleVolume,
    manifest: Manifest,
    target: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s3");
        let volume = SampleVolume {
            size_bytes: BLOCKS * u64::from(BLOCK_BYTES) + 1000,
            block_size_bytes: BLOCK_BYTES,
            seed: 77,
        };
        // A file store writes exactly the layout the S3 server serves.
        let source = dir.path().join("source.img");
        let (manifest, server) = slow_loopback(&root, &source, &volume, (BUCKET, PREFIX, NAME), BLOCK_LATENCY).await;
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("rehydrate.toml");
        std::fs::write(&config, slow_s3_toml(&state, INTERVAL_BLOCKS * u64::from(BLOCK_BYTES), INFLIGHT_REQUESTS_MAX))
            .unwrap();
        Fixture { target: out.join("restored.img"), dir, server, volume, manifest, state, config }
    }

    fn spawn(&self, cycle: usize, failpoints: Option<String>) -> Reaped {
        let log = |what: &str| std::fs::File::create(self.dir.path().join(format!("cycle-{cycle}.{what}"))).unwrap();
        let mut cmd = Command::new(binary());
        cmd.args(["restore", "--json", "--manifest", &format!("s3://{BUCKET}/{PREFIX}/{NAME}.manifest"), "--target"])
            .arg(&self.target)
            .arg("--config")
            .arg(&self.config)
            .loopback_env(&self.server.endpoint_url(), self.dir.path())
            .env("REHYDRATE_LOG", "warn")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"));
        if let Some(fp) = failpoints {
            cmd.env("FAILPOINTS", fp);
        }
        Reaped(cmd.spawn().unwrap())
    }

    fn output(&self, cycle: usize, what: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("cycle-{cycle}.{what}"))).unwrap_or_default()
    }

    fn checkpoint_path(&self) -> PathBuf {
        self.state.join(format!("{}.ckpt", checkpoint_key(&self.target)))
    }

    /// Keys of block GETs the server received, from arrival `from` on.
    fn block_requests(&self, from: usize) -> Vec<String> {
        self.server
            .arrivals()
            .into_iter()
            .skip(from)
            .filter(|a| a.method == hyper::Method::GET && a.path.contains("/blocks/"))
            .map(|a| a.path)
            .collect()
    }
}

/// A SIGKILL once a run has requested `fresh_requests` blocks no earlier run
/// requested, plus `extra_millis`.
struct KillAt {
    cycle: usize,
    /// The server's arrivals before this run.
    mark: usize,
    fresh_requests: u64,
    extra_millis: u64,
}

impl KillAt {
    async fn run(&self, fx: &Fixture, child: &mut Reaped, requested_before: &HashSet<String>) -> ExitStatus {
        let cycle = self.cycle;
        let deadline = Instant::now() + CHILD_DEADLINE;
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                panic!(
                    "cycle {cycle}: the child exited ({status}) before it could be killed: {}",
                    fx.output(cycle, "stderr")
                );
            }
            let fresh = fx.block_requests(self.mark).iter().filter(|k| !requested_before.contains(*k)).count() as u64;
            if fresh >= self.fresh_requests {
                break;
            }
            assert!(Instant::now() < deadline, "cycle {cycle}: no progress within {CHILD_DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(self.extra_millis)).await;
        let pid = i32::try_from(child.0.id()).unwrap();
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let status = child.0.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "cycle {cycle}: {status}");
        status
    }
}

/// Wait for the child to exit on its own, within [`CHILD_DEADLINE`].
async fn wait_exit(child: &mut Reaped) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < CHILD_DEADLINE, "the child did not exit within {CHILD_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The checkpoint on disk names only blocks whose bytes are in `file`, and
/// has no failed blocks.
fn check_checkpoint_against(fx: &Fixture, file: &Path) -> Checkpoint {
    let bytes = std::fs::read(fx.checkpoint_path()).expect("a crashed restore keeps its checkpoint");
    let checkpoint = Checkpoint::decode(&bytes).expect("the checkpoint on disk decodes");
    assert_eq!(checkpoint.identity().manifest_digest, fx.manifest.digest());
    assert!(checkpoint.failed().is_empty(), "blocks recorded failed: {:?}", checkpoint.failed());
    let data = std::fs::read(file).unwrap();
    let block = u64::from(BLOCK_BYTES);
    for index in (0..fx.volume.block_count()).filter(|&i| checkpoint.settled().is_settled(i)) {
        let want = fx.volume.block(index);
        let offset = (index * block) as usize;
        assert_eq!(
            data.get(offset..offset + want.len()),
            Some(&want[..]),
            "the checkpoint names block {index} as settled but {} does not hold its bytes",
            file.display()
        );
    }
    checkpoint
}

/// The server path of every block object, with the blocks it holds.
fn blocks_by_path(manifest: &Manifest) -> HashMap<String, Vec<u64>> {
    let mut by_path: HashMap<String, Vec<u64>> = HashMap::new();
    for entry in manifest.entries() {
        let path = format!("/{BUCKET}/{PREFIX}/{}", block_key(&entry.hash, entry.compression));
        by_path.entry(path).or_default().push(entry.index);
    }
    by_path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_again_and_again_resumes_with_bounded_rework_and_ends_identical() {
    let seed = std::env::var("CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    println!("crash test seed {seed} (rerun with CRASH_SEED={seed})");
    let mut rng = SmallRng::seed_from_u64(seed);
    let fx = Fixture::new().await;
    let staging = rehydrate::target::staging_path(&fx.target).unwrap();
    let bound = lost_bound_objects();
    let objects = blocks_by_path(&fx.manifest);
    let fully_settled = |checkpoint: &Checkpoint, path: &String| {
        objects[path].iter().all(|&index| checkpoint.settled().is_settled(index))
    };
    println!("{} objects, at most {bound} objects lost per crash", objects.len());

    let mut requested_before: HashSet<String> = HashSet::new();
    // The checkpoint the next run resumes from.
    let mut resumed_from: Option<Checkpoint> = None;
    let (mut lost_max, mut rework_max, mut resumed_settled_max) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let plan = plan(&mut rng);
    let crashes = plan.len() - 1;
    for (cycle, crash) in plan.into_iter().enumerate() {
        let mark = fx.server.arrivals().len();
        let failpoints = match &crash {
            Crash::FailPoint { name, skip } if *skip == 0 => Some(format!("{name}=panic")),
            Crash::FailPoint { name, skip } => Some(format!("{name}={skip}*off->panic")),
            Crash::KillDuringSlowSync { .. } => Some(format!("target-sync-slow=return({SLOW_SYNC_MILLIS})")),
            _ => None,
        };
        let mut child = fx.spawn(cycle, failpoints);
        let kill = |fresh_requests, extra_millis| KillAt { cycle, mark, fresh_requests, extra_millis };
        let status = match &crash {
            Crash::Kill { fresh_requests, extra_millis } => {
                kill(*fresh_requests, *extra_millis).run(&fx, &mut child, &requested_before).await
            }
            Crash::KillDuringSlowSync { fresh_requests } => {
                // The first sync starts after INTERVAL_BLOCKS blocks: kill
                // late in it, when units have had most of it to run ahead.
                kill(*fresh_requests, SLOW_SYNC_MILLIS * 4 / 5).run(&fx, &mut child, &requested_before).await
            }
            Crash::FailPoint { name, .. } => {
                let status = wait_exit(&mut child).await;
                let stderr = fx.output(cycle, "stderr");
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGABRT),
                    "cycle {cycle}: expected a crash at {name} (is the binary built with --features failpoints?): {status}\n{stderr}"
                );
                assert!(stderr.contains(name), "cycle {cycle}: crashed elsewhere than {name}:\n{stderr}");
                status
            }
            Crash::Complete => wait_exit(&mut child).await,
        };
        // A request the dead child wrote may still be read by the server.
        tokio::time::sleep(Duration::from_millis(50)).await;

        // The restart used its checkpoint: nothing it names as settled was
        // requested again, not one object.
        let requested: HashSet<String> = fx.block_requests(mark).into_iter().collect();
        if let Some(checkpoint) = &resumed_from {
            let refetched: Vec<_> = requested.iter().filter(|p| fully_settled(checkpoint, p)).collect();
            assert!(
                refetched.is_empty(),
                "cycle {cycle}: the restart requested {} objects its checkpoint names as settled, e.g. {:?}",
                refetched.len(),
                refetched.first()
            );
            resumed_settled_max = resumed_settled_max.max(checkpoint.settled().settled_count());
        }
        let rework = requested.intersection(&requested_before).count() as u64;
        rework_max = rework_max.max(rework);
        requested_before.extend(requested.iter().cloned());

        resumed_from = match crash {
            Crash::Complete => {
                assert_eq!(status.code(), Some(0), "final run: {}", fx.output(cycle, "stderr"));
                let summary: serde_json::Value = serde_json::from_str(&fx.output(cycle, "stdout")).unwrap();
                assert_eq!(summary["succeeded"], true, "{summary}");
                assert_eq!(summary["blocks_settled"], summary["blocks_total"], "{summary}");
                assert_eq!(summary["blocks_failed"], 0, "{summary}");
                println!(
                    "cycle {cycle:2} {crash:?}: {status}; requested again {rework}, new {}",
                    requested.len() as u64 - rework
                );
                None
            }
            crash => {
                let file = match crash {
                    // Swapped into place, status not reported: the checkpoint
                    // names the file now in place.
                    Crash::FailPoint { name: "restore-before-status", .. } => {
                        assert!(!staging.exists());
                        &fx.target
                    }
                    _ => &staging,
                };
                let checkpoint = check_checkpoint_against(&fx, file);
                if let Some(before) = &resumed_from {
                    let (was, is) = (before.settled().settled_count(), checkpoint.settled().settled_count());
                    assert!(is >= was, "cycle {cycle}: settled went from {was} to {is}");
                }
                // What this crash threw away: objects this run requested
                // that its checkpoint does not hold.
                let lost = requested.iter().filter(|p| !fully_settled(&checkpoint, p)).count() as u64;
                println!(
                    "cycle {cycle:2} {crash:?}: {status}; requested again {rework}, new {}, lost {lost}, settled {}",
                    requested.len() as u64 - rework,
                    checkpoint.settled().settled_count()
                );
                assert!(lost <= bound, "cycle {cycle}: the crash lost {lost} objects of work (bound {bound})");
                lost_max = lost_max.max(lost);
                Some(checkpoint)
            }
        };
    }
    println!(
        "{crashes} crashes in {:.1}s; lost per crash max {lost_max} objects (bound {bound}); requested again per restart max {rework_max}",
        started.elapsed().as_secs_f64()
    );
    // The refetch check had teeth: some restart resumed from a checkpoint
    // holding most of the volume, which a restart from zero would refetch.
    assert!(resumed_settled_max > fx.volume.block_count() / 2, "no restart resumed from much progress");
    assert_eq!(requested_before.len(), objects.len(), "every object was requested at least once");

    assert_eq!(fx.volume.mismatches(&fx.target).unwrap(), Vec::<u64>::new());
    let readback = rehydrate::restore::readback::readback(&fx.manifest, &fx.target).unwrap();
    assert!(readback.matches(), "read-back mismatches: {:?}", readback.mismatched);
    let out = fx.target.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("restored.img")], "staging files left behind");
    assert!(!fx.checkpoint_path().exists(), "the checkpoint outlived a successful restore");
    let state_files: Vec<_> = std::fs::read_dir(&fx.state).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(state_files.is_empty(), "files left in the checkpoint directory: {state_files:?}");
}
