//! Shards: one volume restored by several `rehydrate restore --blocks`
//! processes (the real binary) into one target, side by side, each killed
//! with SIGKILL part way and restarted.
//!
//! The snapshot is served over real HTTP by [`LoopbackS3`] in this process,
//! each block GET slowed at the server, so a shard runs long enough to be
//! killed. The target is a file created beforehand at the volume's size and
//! filled with non-zero bytes, written `--in-place` (as a block device would
//! be), so zero blocks must be written too. Shards are given both ways the
//! flag takes: `START..END` and `I/N`.
//!
//! Checked: each shard keeps its own checkpoint (its key and identity name
//! its range); after the kill every block that checkpoint names as settled
//! holds the snapshot's bytes; the restart resumes exactly from it; the
//! summaries name their ranges; the target ends byte-identical, `verify`
//! and `verify --blocks` agree, and no checkpoint or staging file is left.
//! A `--blocks` restore that would stage its target, or whose range lies
//! past the volume, is refused with exit 2 and writes nothing.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{LoopbackEnv, Reaped, binary, slow_loopback, slow_s3_toml};
use rehydrate::block::{BlockRange, BlockSelection};
use rehydrate::checkpoint::{Checkpoint, shard_checkpoint_key};
use rehydrate::manifest::Manifest;
use rehydrate::sample::SampleVolume;
use rehydrate::store::loopback::LoopbackS3;

const BUCKET: &str = "shard-bucket";
const PREFIX: &str = "vols";
const NAME: &str = "vol";
const BLOCK_BYTES: u32 = 64 * 1024;
/// 240 full blocks and a short tail: 241 blocks.
const BLOCKS: u64 = 240;
const BLOCK_LATENCY: Duration = Duration::from_millis(60);
const INFLIGHT_REQUESTS_MAX: u64 = 4;
const INTERVAL_BLOCKS: u64 = 8;
/// Kill a shard once its checkpoint holds this many settled blocks.
const SETTLED_BEFORE_KILL: u64 = 12;
const CHILD_DEADLINE: Duration = Duration::from_secs(60);
/// What the target holds before the restore.
const FILL: u8 = 0xEE;
/// The shards, as given on the command line: they cover the 241 blocks.
const SHARDS: [&str; 3] = ["0..81", "81..161", "2/3"];

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
            seed: 91,
        };
        let source = dir.path().join("source.img");
        let (manifest, server) = slow_loopback(&root, &source, &volume, (BUCKET, PREFIX, NAME), BLOCK_LATENCY).await;
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let target = out.join("vol.img");
        std::fs::write(&target, vec![FILL; volume.size_bytes as usize]).unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("rehydrate.toml");
        std::fs::write(&config, slow_s3_toml(&state, INTERVAL_BLOCKS * u64::from(BLOCK_BYTES), INFLIGHT_REQUESTS_MAX))
            .unwrap();
        Fixture { dir, server, volume, manifest, target, state, config }
    }

    /// `rehydrate <args> --manifest … --target … --config …` against the server.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .args(["--manifest", &format!("s3://{BUCKET}/{PREFIX}/{NAME}.manifest"), "--target"])
            .arg(&self.target)
            .arg("--config")
            .arg(&self.config)
            .loopback_env(&self.server.endpoint_url(), self.dir.path())
            .env("REHYDRATE_LOG", "warn")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null());
        cmd
    }

    /// Start shard `shard` (`--blocks shard --in-place --json`), its output in files.
    fn spawn_shard(&self, shard: &str, run: &str) -> Reaped {
        let log = |what: &str| std::fs::File::create(self.log_path(shard, run, what)).unwrap();
        let mut cmd = self.command(&["restore", "--json", "--in-place", "--blocks", shard]);
        cmd.stdout(log("stdout")).stderr(log("stderr"));
        Reaped(cmd.spawn().unwrap())
    }

    fn log_path(&self, shard: &str, run: &str, what: &str) -> PathBuf {
        self.dir.path().join(format!("shard-{}.{run}.{what}", shard.replace('/', "-of-")))
    }

    fn output(&self, shard: &str, run: &str, what: &str) -> String {
        std::fs::read_to_string(self.log_path(shard, run, what)).unwrap_or_default()
    }

    fn range(&self, shard: &str) -> BlockRange {
        shard.parse::<BlockSelection>().unwrap().resolve(&self.manifest.layout).unwrap()
    }

    fn checkpoint_path(&self, shard: &str) -> PathBuf {
        let key = shard_checkpoint_key(&self.target, Some(self.range(shard)));
        self.state.join(format!("{key}.ckpt"))
    }

    fn checkpoint(&self, shard: &str) -> Option<Checkpoint> {
        Checkpoint::decode(&std::fs::read(self.checkpoint_path(shard)).ok()?).ok()
    }

    /// Run `rehydrate <args>` to its end: (exit code, stdout).
    fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.command(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// SIGKILL `child` once its shard's checkpoint holds some settled blocks;
/// returns that checkpoint as the dead child left it.
async fn kill_part_way(fx: &Fixture, shard: &str, child: &mut Reaped) -> Checkpoint {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("shard {shard} exited ({status}) before it could be killed: {}", fx.output(shard, "1", "stderr"));
        }
        if fx.checkpoint(shard).is_some_and(|c| c.settled().settled_count() >= SETTLED_BEFORE_KILL) {
            break;
        }
        assert!(started.elapsed() < CHILD_DEADLINE, "shard {shard}: no progress within {CHILD_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pid = i32::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = child.0.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{shard}: {status}");
    fx.checkpoint(shard).unwrap_or_else(|| panic!("shard {shard}: no readable checkpoint after the kill"))
}

/// The checkpoint a killed shard left belongs to its range, and every block
/// it names as settled holds the snapshot's bytes in the target.
fn check_killed_checkpoint(fx: &Fixture, shard: &str, checkpoint: &Checkpoint) {
    let range = fx.range(shard);
    assert_eq!(checkpoint.identity().blocks, range, "shard {shard}: the checkpoint names other blocks");
    assert_eq!(checkpoint.identity().manifest_digest, fx.manifest.digest());
    assert!(!checkpoint.settled().is_complete(), "shard {shard} finished before the kill");
    let data = std::fs::read(&fx.target).unwrap();
    for index in (0..fx.volume.block_count()).filter(|&i| checkpoint.settled().is_settled(i)) {
        assert!(range.contains(index), "shard {shard} settled block {index}, outside {range}");
        let want = fx.volume.block(index);
        let offset = (index * u64::from(BLOCK_BYTES)) as usize;
        assert_eq!(
            &data[offset..offset + want.len()],
            &want[..],
            "shard {shard}: settled block {index} is not on disk"
        );
    }
}

async fn wait_exit(child: &mut Reaped) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < CHILD_DEADLINE, "a shard did not exit within {CHILD_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_killed_and_resumed_restore_one_volume_byte_identical() {
    let fx = Fixture::new().await;
    let ranges: Vec<BlockRange> = SHARDS.iter().map(|s| fx.range(s)).collect();
    assert_eq!(ranges.first().unwrap().start, 0);
    assert_eq!(ranges.last().unwrap().end, fx.manifest.layout.block_count());
    assert!(ranges.windows(2).all(|w| w[0].end == w[1].start), "the shards cover the volume: {ranges:?}");

    // Every shard at once, each killed part way.
    let mut children: Vec<Reaped> = SHARDS.iter().map(|s| fx.spawn_shard(s, "1")).collect();
    let mut at_kill = Vec::new();
    for (shard, child) in SHARDS.iter().zip(&mut children) {
        let checkpoint = kill_part_way(&fx, shard, child).await;
        check_killed_checkpoint(&fx, shard, &checkpoint);
        at_kill.push(checkpoint.settled().settled_count());
    }

    // Restarted, every shard at once: each resumes from its own checkpoint.
    let mut children: Vec<Reaped> = SHARDS.iter().map(|s| fx.spawn_shard(s, "2")).collect();
    for ((shard, child), (range, resumed)) in SHARDS.iter().zip(&mut children).zip(ranges.iter().zip(&at_kill)) {
        let status = wait_exit(child).await;
        assert_eq!(status.code(), Some(0), "shard {shard}: {status}\n{}", fx.output(shard, "2", "stderr"));
        let summary: serde_json::Value = serde_json::from_str(&fx.output(shard, "2", "stdout")).unwrap();
        assert_eq!(summary["succeeded"], true, "{summary}");
        assert_eq!(summary["whole_volume"], false, "{summary}");
        assert_eq!(summary["block_range"], serde_json::json!({"start": range.start, "end": range.end}));
        assert_eq!(summary["blocks_total"], range.len(), "{summary}");
        assert_eq!(summary["blocks_settled"], range.len(), "{summary}");
        assert_eq!(summary["blocks_resumed"], *resumed, "shard {shard} did not resume from its checkpoint");
        assert!(!fx.checkpoint_path(shard).exists(), "shard {shard}: the checkpoint outlived its success");
    }

    assert_eq!(fx.volume.mismatches(&fx.target).unwrap(), Vec::<u64>::new(), "the target is not the volume");
    let leftovers: Vec<_> =
        std::fs::read_dir(fx.target.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("vol.img")], "files left beside the target");
    let state_files: Vec<_> = std::fs::read_dir(&fx.state).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(state_files.is_empty(), "files left in the checkpoint directory: {state_files:?}");

    // verify, whole and by shard; a damaged block shows in its shard only.
    assert_eq!(fx.run(&["verify"]).0, Some(0));
    let (code, out) = fx.run(&["verify", "--json", "--blocks", "81..161"]);
    assert_eq!(code, Some(0), "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["block_range"], serde_json::json!({"start": 81, "end": 161}));
    assert_eq!(report["blocks_checked"], 80);
    let mut data = std::fs::read(&fx.target).unwrap();
    data[100 * BLOCK_BYTES as usize + 7] ^= 0xff;
    std::fs::write(&fx.target, &data).unwrap();
    assert_eq!(fx.run(&["verify", "--blocks", "0/3"]).0, Some(0), "block 100 is not in shard 0");
    let (code, out) = fx.run(&["verify", "--blocks", "1/3"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("[100]"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_would_stage_or_reaches_past_the_volume_is_refused_untouched() {
    let fx = Fixture::new().await;
    let before = std::fs::read(&fx.target).unwrap();
    for (args, says) in [
        (vec!["restore", "--blocks", "0..10"], "in place"),
        (vec!["restore", "--in-place", "--blocks", "0..242"], "past the volume"),
        (vec!["restore", "--in-place", "--blocks", "300/301"], "fewer than 301 shards"),
        (vec!["restore", "--in-place", "--blocks", "10..5"], "empty"),
        (vec!["verify", "--blocks", "0..999"], "past the volume"),
    ] {
        let out = fx.command(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(std::fs::read(&fx.target).unwrap() == before, "a refused shard wrote the target");
    assert!(!fx.state.exists() || std::fs::read_dir(&fx.state).unwrap().next().is_none(), "a refused shard left state");
    assert!(fx.server.arrivals().iter().all(|a| !a.path.contains("/blocks/")), "a refused shard fetched blocks");
}
