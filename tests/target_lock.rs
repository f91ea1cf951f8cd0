//! One restore per target (`docs/architecture.md`, invariant 8), tried with
//! two real processes of the binary on one target, the second started at a
//! seeded-random moment while the first runs, 20 tries per case:
//!
//! - the same snapshot twice;
//! - another snapshot, the second with `--restart`;
//! - another snapshot, both `--in-place` on a dirty preallocated file;
//! - a CLI restore against a job of a running worker (`rehydrate serve`).
//!
//! In every try at most one restore proceeds at a time: the other is refused
//! with exit 7 naming the holder's pid (and the worker's job id), or ends
//! before the other starts (both succeed, one after the other). The target
//! ends byte-identical to the snapshot of the restore that reported success
//! last, and nothing else is left: no staging file, no lock file, no
//! checkpoint. A kill -9 holder does not block the resume; a staging file or
//! checkpoint replaced under a running restore makes it stop without
//! renaming or overwriting anything.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use common::{LoopbackEnv, Reaped, binary, slow_s3_toml, snapshot_into};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rehydrate::api::client::ApiClient;
use rehydrate::block::{Compression, HashAlgorithm};
use rehydrate::manifest::Manifest;
use rehydrate::sample::SampleVolume;
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::loopback::LoopbackS3;
use rehydrate::worker::{JobSpec, JobState};

const BUCKET: &str = "lock-bucket";
const PREFIX: &str = "vols";
const BLOCK_BYTES: u32 = 16 * 1024;
/// 96 blocks at 4 in flight and the latency below: a restore of about half
/// a second, so a second one started within [`OFFSET_MAX`] mostly overlaps.
const BLOCKS: u64 = 96;
const BLOCK_LATENCY: Duration = Duration::from_millis(15);
const INFLIGHT_REQUESTS_MAX: u64 = 4;
/// The second restore starts this long after the first, at most.
const OFFSET_MAX: Duration = Duration::from_millis(450);
const TRIES: usize = 20;
/// No child may live longer than this (it would be a hang).
const DEADLINE: Duration = Duration::from_secs(60);
/// Exit code of a restore refused because another holds the target.
const BUSY: i32 = 7;

struct Snap {
    name: String,
    /// The image the snapshot was made from.
    source: PathBuf,
    manifest: Manifest,
}

impl Snap {
    fn url(&self) -> String {
        format!("s3://{BUCKET}/{PREFIX}/{}.manifest", self.name)
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    server: LoopbackS3,
    snaps: Vec<Snap>,
    out: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let prefix_dir = base.join("s3").join(BUCKET).join(PREFIX);
        let mut snaps = Vec::new();
        for seed in [11, 12] {
            let name = format!("vol-{seed}");
            let volume =
                SampleVolume { size_bytes: BLOCKS * u64::from(BLOCK_BYTES) + 100, block_size_bytes: BLOCK_BYTES, seed };
            let source = base.join(format!("{name}.img"));
            let manifest =
                snapshot_into(&prefix_dir, &source, &volume, &name, Compression::None, HashAlgorithm::Blake3).await;
            snaps.push(Snap { name, source, manifest });
        }
        let server = LoopbackS3::start(base.join("s3")).await.unwrap();
        server.add_fault(
            FaultRule::new(Fault::Latency(BLOCK_LATENCY)).path_contains("/blocks/").method(FaultMethod::Get),
        );
        let out = base.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let state = base.join("state");
        let config = base.join("rehydrate.toml");
        let toml = format!(
            "{common}\n[worker]\ntarget_roots = [\"{out}\"]\ntarget_free_bytes_min = 0\ngate_backoff_millis = 20\n\n[worker.profiles.main]\nstore = \"s3://{BUCKET}/{PREFIX}\"\n",
            common = slow_s3_toml(&state, 8 * u64::from(BLOCK_BYTES), INFLIGHT_REQUESTS_MAX),
            out = out.display()
        );
        std::fs::write(&config, toml).unwrap();
        Fixture { dir, server, snaps, out, state, config }
    }

    /// `rehydrate restore` of snapshot `snap` into `target`, its output in
    /// `<tag>.stdout` / `<tag>.stderr`.
    fn restore(&self, snap: usize, target: &Path, extra: &[&str], tag: &str) -> Reaped {
        let log = |what: &str| std::fs::File::create(self.dir.path().join(format!("{tag}.{what}"))).unwrap();
        let child = Command::new(binary())
            .args(["restore", "--manifest", &self.snaps[snap].url(), "--target"])
            .arg(target)
            .args(extra)
            .arg("--config")
            .arg(&self.config)
            .loopback_env(&self.server.endpoint_url(), self.dir.path())
            .env("REHYDRATE_LOG", "warn")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(log("stderr"))
            .spawn()
            .unwrap();
        Reaped(child)
    }

    fn stderr(&self, tag: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{tag}.stderr"))).unwrap_or_default()
    }

    /// The target holds exactly snapshot `snap`'s volume.
    fn check_holds(&self, target: &Path, snap: usize, context: &str) {
        let want = std::fs::read(&self.snaps[snap].source).unwrap();
        let got = std::fs::read(target).unwrap_or_else(|e| panic!("{context}: cannot read the target: {e}"));
        assert!(got == want, "{context}: the target is not snapshot {}", self.snaps[snap].name);
    }

    /// Nothing but the targets in the output directory (no staging or lock
    /// file) and no checkpoint in the state directory.
    fn check_nothing_left(&self, context: &str) {
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default()
        };
        let strays: Vec<_> = names(&self.out).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(strays.is_empty(), "{context}: left in the target directory: {strays:?}");
        let checkpoints: Vec<_> = names(&self.state).into_iter().filter(|n| n.ends_with(".ckpt")).collect();
        assert!(checkpoints.is_empty(), "{context}: checkpoints left: {checkpoints:?}");
    }
}

/// How one child ended.
struct Ended {
    code: i32,
    at: Instant,
}

fn code_of(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| panic!("the child was killed by a signal: {status}"))
}

/// Wait for both children, noting when each ended.
async fn wait_both(a: &mut Reaped, b: &mut Reaped) -> (Ended, Ended) {
    let started = Instant::now();
    let (mut ea, mut eb) = (None, None);
    while ea.is_none() || eb.is_none() {
        for (child, ended) in [(&mut *a, &mut ea), (&mut *b, &mut eb)] {
            if ended.is_none()
                && let Some(status) = child.0.try_wait().unwrap()
            {
                *ended = Some(Ended { code: code_of(status), at: Instant::now() });
            }
        }
        assert!(started.elapsed() < DEADLINE, "a restore did not end within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (ea.unwrap(), eb.unwrap())
}

/// One case: restore `a` (snapshot, flags), then `b` after a random offset,
/// on one target; check the outcome [`TRIES`] times.
async fn race_cli(fx: &Fixture, case: &str, a: (usize, &[&str]), b: (usize, &[&str]), prepare: impl Fn(&Path)) {
    let mut rng = SmallRng::seed_from_u64(case.len() as u64 * 7919);
    let (mut exclusions, mut sequential) = (0, 0);
    for attempt in 0..TRIES {
        let target = fx.out.join(format!("{case}-{attempt}.img"));
        prepare(&target);
        let offset = Duration::from_millis(rng.random_range(0..=OFFSET_MAX.as_millis() as u64));
        let (ta, tb) = (format!("{case}-{attempt}-a"), format!("{case}-{attempt}-b"));
        let mut first = fx.restore(a.0, &target, a.1, &ta);
        tokio::time::sleep(offset).await;
        let mut second = fx.restore(b.0, &target, b.1, &tb);
        let (pa, pb) = (first.0.id(), second.0.id());
        let (ea, eb) = wait_both(&mut first, &mut second).await;
        let context = format!("{case} try {attempt} (offset {offset:?}): exit {} and {}", ea.code, eb.code);
        let winner = match (ea.code, eb.code) {
            (0, BUSY) => refused_naming(fx, &tb, pa, &context).then_some(a.0),
            (BUSY, 0) => refused_naming(fx, &ta, pb, &context).then_some(b.0),
            // One after the other: the one that ended last wrote last.
            (0, 0) => {
                sequential += 1;
                Some(if eb.at >= ea.at { b.0 } else { a.0 })
            }
            _ => panic!("{context}\n--- a:\n{}\n--- b:\n{}", fx.stderr(&ta), fx.stderr(&tb)),
        };
        if ea.code == BUSY || eb.code == BUSY {
            exclusions += 1;
        }
        fx.check_holds(&target, winner.unwrap(), &context);
        std::fs::remove_file(&target).unwrap();
        fx.check_nothing_left(&context);
    }
    println!(
        "{case}: {exclusions} of {TRIES} tries overlapped and one was refused, {sequential} ran one after the other"
    );
    assert!(exclusions >= TRIES / 2, "{case}: too few tries overlapped to test anything ({exclusions} of {TRIES})");
}

/// The refused restore's message names the holder's pid; it says so, and
/// what to do.
fn refused_naming(fx: &Fixture, refused: &str, holder_pid: u32, context: &str) -> bool {
    let stderr = fx.stderr(refused);
    assert!(
        stderr.contains(&format!("pid {holder_pid}")),
        "{context}: the refusal does not name pid {holder_pid}: {stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{context}: {stderr}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_snapshot_twice_runs_once_at_a_time() {
    let fx = Fixture::new().await;
    race_cli(&fx, "same", (0, &[]), (0, &[]), |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_never_takes_over_a_running_restore() {
    let fx = Fixture::new().await;
    race_cli(&fx, "restart", (0, &[]), (1, &["--restart"]), |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_restores_exclude_each_other() {
    let fx = Fixture::new().await;
    let size = fx.snaps[0].manifest.layout.volume_size_bytes() as usize;
    // A dirty preallocated file: every byte the winner does not write stays
    // 0xAB and fails the comparison.
    let prepare = |target: &Path| std::fs::write(target, vec![0xAB; size]).unwrap();
    race_cli(&fx, "inplace", (0, &["--in-place"]), (1, &["--in-place", "--restart"]), prepare).await;
}

/// Poll until `done` holds, within [`DEADLINE`].
async fn until(what: &str, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < DEADLINE, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_one(child: &mut Reaped) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return code_of(status);
        }
        assert!(started.elapsed() < DEADLINE, "the restore did not end within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn staging_of(target: &Path) -> PathBuf {
    rehydrate::target::staging_path(target).unwrap()
}

fn checkpoint_of(fx: &Fixture, target: &Path) -> PathBuf {
    fx.state.join(format!("{}.ckpt", rehydrate::checkpoint::checkpoint_key(target)))
}

/// Put a new file (a new inode) with `bytes` at `path`, as another process
/// would: written beside it, then renamed over it.
fn replace_file(path: &Path, bytes: &[u8]) {
    let temp = path.with_extension("replacement");
    std::fs::write(&temp, bytes).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_does_not_block_the_resume() {
    let fx = Fixture::new().await;
    let target = fx.out.join("killed.img");
    let mut first = fx.restore(0, &target, &[], "killed");
    let (staging, checkpoint) = (staging_of(&target), checkpoint_of(&fx, &target));
    until("the restore has started", || std::fs::metadata(&checkpoint).is_ok_and(|m| m.len() > 0)).await;
    // The first save names nothing settled; a checkpoint saved again (a new
    // file) has settled blocks.
    let first_save = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&checkpoint).unwrap());
    until("the restore has settled some blocks", || {
        std::fs::metadata(&checkpoint).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) != first_save)
            && staging.exists()
    })
    .await;
    first.0.kill().unwrap();
    let status = first.0.wait().unwrap();
    assert!(status.code().is_none(), "the restore ended before it was killed: {status}");
    let lock = rehydrate::target::lock_path(&target).unwrap();
    assert!(lock.exists(), "the killed holder's lock file stays behind (the lock itself went with it)");

    let mut resumed = fx.restore(0, &target, &["--json"], "resumed");
    let code = wait_one(&mut resumed).await;
    assert_eq!(code, 0, "the resume was blocked: {}", fx.stderr("resumed"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.dir.path().join("resumed.stdout")).unwrap()).unwrap();
    assert!(report["blocks_resumed"].as_u64().unwrap() > 0, "it did not resume: {report}");
    fx.check_holds(&target, 0, "resumed after kill -9");
    std::fs::remove_file(&target).unwrap();
    fx.check_nothing_left("resumed after kill -9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_staging_file_is_never_swapped_into_place() {
    let fx = Fixture::new().await;
    let target = fx.out.join("swap.img");
    let mut restore = fx.restore(0, &target, &[], "swap");
    let staging = staging_of(&target);
    until("the staging file exists", || staging.exists()).await;
    let replacement = std::fs::read(&fx.snaps[1].source).unwrap();
    replace_file(&staging, &replacement);
    let code = wait_one(&mut restore).await;
    let stderr = fx.stderr("swap");
    assert_eq!(code, BUSY, "{stderr}");
    assert!(stderr.contains("no longer the file this restore wrote"), "{stderr}");
    assert!(!target.exists(), "the replaced staging file was renamed into place");
    assert!(std::fs::read(&staging).unwrap() == replacement, "the other process's file was touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_checkpoint_is_never_overwritten() {
    let fx = Fixture::new().await;
    let target = fx.out.join("ckpt.img");
    let mut restore = fx.restore(0, &target, &[], "ckpt");
    let checkpoint = checkpoint_of(&fx, &target);
    until("the checkpoint exists", || std::fs::metadata(&checkpoint).is_ok_and(|m| m.len() > 0)).await;
    let theirs = b"another process's checkpoint".to_vec();
    replace_file(&checkpoint, &theirs);
    let code = wait_one(&mut restore).await;
    let stderr = fx.stderr("ckpt");
    assert_eq!(code, BUSY, "{stderr}");
    assert!(stderr.contains("was replaced or removed by another process"), "{stderr}");
    assert_eq!(std::fs::read(&checkpoint).unwrap(), theirs, "the other checkpoint was overwritten or removed");
    assert!(!target.exists(), "a restore that lost its checkpoint swapped its target into place");
}

/// A running `rehydrate serve` on the fixture's config.
async fn serve(fx: &Fixture) -> (Reaped, ApiClient) {
    let log = fx.dir.path().join("serve.log");
    common::serve_worker(&fx.config, Some(&fx.server.endpoint_url()), fx.dir.path(), &log).await
}

/// How a worker job ended, or that its submission was refused (the problem
/// details).
enum JobEnd {
    Refused(serde_json::Value),
    Ended { state: JobState, reason: Option<String> },
}

async fn run_job(client: &ApiClient, spec: &JobSpec) -> JobEnd {
    match client.submit(spec).await {
        Err(rehydrate::api::client::ClientError::Status { body, .. }) => return JobEnd::Refused(body),
        Err(e) => panic!("submit: {e}"),
        Ok(_) => {}
    }
    let job = common::job_ended(client, &spec.id).await;
    JobEnd::Ended { state: job.state, reason: job.reason }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_restore_and_a_worker_job_exclude_each_other() {
    let fx = Fixture::new().await;
    let (worker, client) = serve(&fx).await;
    let worker_pid = worker.0.id();
    let mut rng = SmallRng::seed_from_u64(4242);
    let (mut exclusions, mut sequential) = (0, 0);
    for attempt in 0..TRIES {
        let target = fx.out.join(format!("worker-{attempt}.img"));
        let spec = JobSpec {
            id: format!("job-{attempt}"),
            profile: "main".into(),
            manifest: format!("{}.manifest", fx.snaps[0].name),
            target: target.clone(),
            replace: false,
            restart: false,
            export: Default::default(),
        };
        let cli_first = rng.random_bool(0.5);
        let offset = Duration::from_millis(rng.random_range(0..=OFFSET_MAX.as_millis() as u64));
        let tag = format!("worker-{attempt}-cli");
        let (job, mut cli) = if cli_first {
            let cli = fx.restore(1, &target, &[], &tag);
            tokio::time::sleep(offset).await;
            (run_job(&client, &spec).await, cli)
        } else {
            let job = run_job(&client, &spec);
            let cli = async {
                tokio::time::sleep(offset).await;
                fx.restore(1, &target, &[], &tag)
            };
            tokio::join!(job, cli)
        };
        let cli_pid = cli.0.id();
        let cli_code = wait_one(&mut cli).await;
        let stderr = fx.stderr(&tag);
        let context = format!("try {attempt} (cli first: {cli_first}, offset {offset:?}): cli exit {cli_code}");
        let winner = match (&job, cli_code) {
            (JobEnd::Refused(problem), 0) => {
                assert_eq!(problem["type"], "urn:rehydrate:problem:target-locked", "{context}: {problem}");
                let holder = problem["holder"].as_str().unwrap_or_default();
                assert!(holder.contains(&format!("pid {cli_pid}")), "{context}: {problem}");
                1
            }
            (JobEnd::Ended { state: JobState::Succeeded, .. }, BUSY) => {
                assert!(stderr.contains(&format!("pid {worker_pid}")), "{context}: {stderr}");
                assert!(stderr.contains(&format!("worker job {}", spec.id)), "{context}: {stderr}");
                0
            }
            (JobEnd::Ended { state: JobState::Failed, reason }, 0) => {
                let reason = reason.clone().unwrap_or_default();
                assert!(reason.contains(&format!("pid {cli_pid}")), "{context}: {reason}");
                1
            }
            (JobEnd::Ended { state: JobState::Succeeded, .. }, 0) => {
                sequential += 1;
                // One after the other: the one started second wrote last.
                if cli_first { 0 } else { 1 }
            }
            _ => panic!("{context}: job {:?}\n{stderr}", matches!(job, JobEnd::Refused(_))),
        };
        if cli_code == BUSY || !matches!(job, JobEnd::Ended { state: JobState::Succeeded, .. }) {
            exclusions += 1;
        }
        fx.check_holds(&target, winner, &context);
        std::fs::remove_file(&target).unwrap();
        fx.check_nothing_left(&context);
    }
    println!(
        "cli against worker: {exclusions} of {TRIES} tries overlapped and one was refused, {sequential} sequential"
    );
    assert!(exclusions >= TRIES / 2, "too few tries overlapped to test anything ({exclusions} of {TRIES})");
}
