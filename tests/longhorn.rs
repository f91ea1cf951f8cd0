//! Longhorn backups restored by the real binary: `--manifest
//! 'longhorn+file:///DIR?volume=V&backup=B'` and `longhorn+s3://`, from
//! backupstores the generator in `common/longhorn.rs` writes as Longhorn does
//! (lz4, gzip, none and the legacy empty method), into a directory and into
//! the in-process S3 server.
//!
//! Each test checks the restored bytes against the image the backup was
//! made of, and Longhorn's lock directory after the run: the restore lock
//! was taken (two PUTs: unacquired then acquired) and released (a DELETE, an
//! empty `locks/`).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/longhorn.rs"]
mod longhorn_store;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{LoopbackEnv, Reaped, binary, slow_s3_toml};
use longhorn_store::{BLOCK, block_path, image, volume_dir, write_backup};
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::loopback::LoopbackS3;

const VOLUME: &str = "pvc-0a1b2c3d";
const BACKUP: &str = "backup-5f6e7d8c9b0a1234";
const BUCKET: &str = "lh-bucket";
const PREFIX: &str = "target";

struct Fixture {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rehydrate.toml");
        std::fs::write(&config, slow_s3_toml(&dir.path().join("state"), 4 * BLOCK as u64, 8)).unwrap();
        Fixture { dir, config }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The binary with this fixture's config (and the S3 server's endpoint).
    fn command(&self, args: &[&str], server: Option<&LoopbackS3>) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args).arg("--config").arg(&self.config).env("REHYDRATE_LOG", "warn").env_remove("FAILPOINTS");
        if let Some(server) = server {
            cmd.loopback_env(&server.endpoint_url(), self.dir.path());
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str], server: Option<&LoopbackS3>) -> Output {
        self.command(args, server).output().unwrap()
    }
}

fn file_url(root: &Path) -> String {
    format!("longhorn+file://{}?volume={VOLUME}&backup={BACKUP}", root.display())
}

fn s3_url() -> String {
    format!("longhorn+s3://{BUCKET}/{PREFIX}?volume={VOLUME}&backup={BACKUP}")
}

fn text(out: &Output) -> String {
    format!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn locks_left(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join(volume_dir(VOLUME)).join("locks")) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Restore `url` into a new target, check it byte for byte against `want`,
/// and verify it with the binary.
fn restore_and_verify(fx: &Fixture, url: &str, want: &[u8], server: Option<&LoopbackS3>, name: &str) -> Output {
    let target = fx.path(name);
    let target = target.to_str().unwrap();
    let out = fx.run(&["restore", "--manifest", url, "--target", target], server);
    assert!(out.status.success(), "restore of {url} failed: {}", text(&out));
    assert!(std::fs::read(target).unwrap() == want, "{url}: restored bytes differ from the backed-up volume");
    let verified = fx.run(&["verify", "--manifest", url, "--target", target], server);
    assert!(verified.status.success(), "verify of {url} failed: {}", text(&verified));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compression_restores_identical_from_a_directory_and_from_s3() {
    let fx = Fixture::new();
    let s3_root = fx.path("s3");
    std::fs::create_dir_all(s3_root.join(BUCKET)).unwrap();
    let server = LoopbackS3::start(s3_root.clone()).await.unwrap();
    for (n, method) in ["lz4", "gzip", "none", ""].into_iter().enumerate() {
        let want = image(6, n as u64);
        let dir = fx.path(&format!("nfs-{n}"));
        let written = write_backup(&dir, VOLUME, BACKUP, &want, method, false);
        // Identical blocks are listed at each offset and stored once.
        assert!(written.blocks.len() > 4, "{method}: the generator lists its blocks");
        restore_and_verify(&fx, &file_url(&dir), &want, None, &format!("file-{n}.img"));
        assert!(locks_left(&dir).is_empty(), "{method}: the lock was not released: {:?}", locks_left(&dir));

        let bucket_dir = s3_root.join(BUCKET).join(PREFIX);
        let _ = std::fs::remove_dir_all(&bucket_dir);
        write_backup(&bucket_dir, VOLUME, BACKUP, &want, method, false);
        server.reset_stats();
        restore_and_verify(&fx, &s3_url(), &want, Some(&server), &format!("s3-{n}.img"));
        let lock_puts =
            server.arrivals().iter().filter(|a| a.method == hyper::Method::PUT && a.path.contains("/locks/")).count();
        let lock_deletes = server
            .arrivals()
            .iter()
            .filter(|a| a.method == hyper::Method::DELETE && a.path.contains("/locks/"))
            .count();
        assert_eq!((lock_puts, lock_deletes), (2, 1), "{method}: the lock is written, acquired, then deleted");
        assert!(locks_left(&bucket_dir).is_empty(), "{method}: lock left in the bucket");
        // The duplicate blocks' object was fetched once.
        let dup = longhorn_store::checksum(&want[BLOCK..2 * BLOCK]);
        assert_eq!(server.requests(&format!("{dup}.blk")), 1, "{method}: an identical block is fetched once");
    }
}

#[test]
fn blocks_absent_from_the_list_read_back_as_zeros_on_a_dirty_in_place_target() {
    let fx = Fixture::new();
    let want = image(8, 11);
    let dir = fx.path("nfs");
    write_backup(&dir, VOLUME, BACKUP, &want, "lz4", false);
    let target = fx.path("dirty.img");
    std::fs::write(&target, vec![0xA5u8; want.len()]).unwrap();
    let args = ["restore", "--in-place", "--manifest", &file_url(&dir), "--target", target.to_str().unwrap()];
    let out = fx.run(&args, None);
    assert!(out.status.success(), "{}", text(&out));
    let got = std::fs::read(&target).unwrap();
    assert!(got[2 * BLOCK..3 * BLOCK].iter().all(|&b| b == 0), "a hole left the old bytes");
    assert!(got == want);
}

#[test]
fn a_corrupt_block_object_is_never_written_and_comes_from_the_secondary() {
    let fx = Fixture::new();
    let want = image(6, 21);
    let (primary, mirror) = (fx.path("primary"), fx.path("mirror"));
    let written = write_backup(&primary, VOLUME, BACKUP, &want, "gzip", false);
    // The secondary: another backupstore holding the same blocks (a copy of
    // the backup target, as `rclone sync` or S3 replication keep one).
    rehydrate::store::file::copy_tree(&primary, &mirror).unwrap();
    let (offset, checksum) = written.blocks[0].clone();
    let object = primary.join(block_path(VOLUME, &checksum));
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5A;
    std::fs::write(&object, bytes).unwrap();

    // Alone, the primary fails that block: exit 3, nothing in place.
    let target = fx.path("restored.img");
    let args = ["restore", "--manifest", &file_url(&primary), "--target", target.to_str().unwrap()];
    let out = fx.run(&args, None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(!target.exists(), "a failed restore swapped its target into place");
    assert!(text(&out).contains(&format!("first: block {}", offset / BLOCK as u64)), "{}", text(&out));
    assert!(locks_left(&primary).is_empty(), "the lock outlived a failed restore");

    // With the mirror as secondary, the block comes from there.
    let secondary = format!("file://{}", mirror.display());
    let args = [
        "restore",
        "--restart",
        "--manifest",
        &file_url(&primary),
        "--secondary",
        &secondary,
        "--target",
        target.to_str().unwrap(),
    ];
    let out = fx.run(&args, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&target).unwrap() == want);
}

#[test]
fn a_backup_still_in_progress_is_refused_and_nothing_is_written() {
    let fx = Fixture::new();
    let dir = fx.path("nfs");
    write_backup(&dir, VOLUME, BACKUP, &image(4, 3), "lz4", true);
    let target = fx.path("never.img");
    let out = fx.run(&["restore", "--manifest", &file_url(&dir), "--target", target.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    assert!(text(&out).contains("still in progress"), "{}", text(&out));
    assert!(!target.exists());
    assert!(locks_left(&dir).is_empty(), "the lock outlived a refused restore");
    // A missing backup names what it looked for.
    let missing = format!("longhorn+file://{}?volume={VOLUME}&backup=backup-nope", dir.display());
    let out = fx.run(&["restore", "--manifest", &missing, "--target", target.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("backup_backup-nope.cfg"), "{}", text(&out));
    assert!(!target.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_credentials_restore_with_a_warning() {
    let fx = Fixture::new();
    let s3_root = fx.path("s3");
    let want = image(4, 5);
    write_backup(&s3_root.join(BUCKET).join(PREFIX), VOLUME, BACKUP, &want, "lz4", false);
    let server = LoopbackS3::start(s3_root.clone()).await.unwrap();
    server.add_fault(FaultRule::new(Fault::AccessDenied).method(FaultMethod::Put));
    let out = restore_and_verify(&fx, &s3_url(), &want, Some(&server), "ro.img");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("garbage collection is NOT held off"), "no warning: {stderr}");
    assert!(stderr.contains("403"), "the warning says why: {stderr}");
}

/// Block GETs the server received for `.blk` objects, from arrival `from`.
fn block_gets(server: &LoopbackS3, from: usize) -> Vec<String> {
    let arrivals = server.arrivals();
    arrivals
        .into_iter()
        .skip(from)
        .filter(|a| a.method == hyper::Method::GET && a.path.ends_with(".blk"))
        .map(|a| a.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_sigkill_it_resumes_without_refetching_settled_blocks() {
    let fx = Fixture::new();
    let s3_root = fx.path("s3");
    let bucket_dir = s3_root.join(BUCKET).join(PREFIX);
    // Distinct blocks (no holes or copies) so each object is one block.
    let want: Vec<u8> = (0..24 * BLOCK).map(|i| ((i / 4096) as u8) ^ ((i % 253) as u8)).collect();
    let written = write_backup(&bucket_dir, VOLUME, BACKUP, &want, "lz4", false);
    let server = LoopbackS3::start(s3_root.clone()).await.unwrap();
    let latency = FaultRule::new(Fault::Latency(Duration::from_millis(300))).path_contains(".blk");
    server.add_fault(latency.method(FaultMethod::Get));
    let target = fx.path("killed.img");
    let args = ["restore", "--manifest", &s3_url(), "--target", target.to_str().unwrap()];
    let mut child =
        Reaped(fx.command(&args, Some(&server)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    // Kill it once its checkpoint names some blocks settled, not all.
    let ckpt = fx.path("state").join(format!("{}.ckpt", rehydrate::checkpoint::checkpoint_key(&target)));
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint with settled blocks appeared");
        assert!(child.0.try_wait().unwrap().is_none(), "the restore ended before it could be killed");
        let decoded = std::fs::read(&ckpt).ok().and_then(|b| rehydrate::checkpoint::Checkpoint::decode(&b).ok());
        if decoded.is_some_and(|c| c.settled().settled_count() > 0) {
            child.0.kill().unwrap();
            child.0.wait().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // kill -9 leaves Longhorn's lock, which expires as Longhorn's do.
    assert_eq!(locks_left(&bucket_dir).len(), 1, "a killed restore leaves its lock to expire");
    let checkpoint = rehydrate::checkpoint::Checkpoint::decode(&std::fs::read(&ckpt).unwrap()).unwrap();
    let settled: Vec<u64> = (0..24).filter(|&i| checkpoint.settled().is_settled(i)).collect();
    assert!(!settled.is_empty() && settled.len() < 24, "settled before the kill: {settled:?}");

    let from = server.arrivals().len();
    let out = fx.run(&args, Some(&server));
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&target).unwrap() == want);
    let refetched = block_gets(&server, from);
    for index in settled {
        let (_, checksum) = &written.blocks[index as usize];
        assert!(!refetched.iter().any(|p| p.contains(checksum.as_str())), "settled block {index} was fetched again");
    }
    // Our own stale lock (same type) never blocks us; the new one is released.
    assert_eq!(locks_left(&bucket_dir).len(), 1, "only the killed run's lock remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_restore_releases_the_lock() {
    let fx = Fixture::new();
    let s3_root = fx.path("s3");
    let bucket_dir = s3_root.join(BUCKET).join(PREFIX);
    write_backup(&bucket_dir, VOLUME, BACKUP, &image(8, 9), "gzip", false);
    let server = LoopbackS3::start(s3_root.clone()).await.unwrap();
    let latency = FaultRule::new(Fault::Latency(Duration::from_millis(500))).path_contains(".blk");
    server.add_fault(latency.method(FaultMethod::Get));
    let target = fx.path("cancelled.img");
    let args = ["restore", "--manifest", &s3_url(), "--target", target.to_str().unwrap()];
    let mut child =
        Reaped(fx.command(&args, Some(&server)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let started = Instant::now();
    while block_gets(&server, 0).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "the restore never got going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(locks_left(&bucket_dir).len(), 1, "the lock is held while blocks are read");
    // SIGTERM: settle what is written, checkpoint, exit 6, and let go.
    let pid = i32::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) of our own child, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(6), "a cancelled restore exits 6 (interrupted)");
    assert!(locks_left(&bucket_dir).is_empty(), "the lock outlived a cancelled restore: {:?}", locks_left(&bucket_dir));
}

/// Write a Longhorn lock file of `lock_type` into the volume's `locks/`,
/// last written `age` ago.
fn put_lock(root: &Path, name: &str, lock_type: u8, age: Duration) {
    let dir = root.join(volume_dir(VOLUME)).join("locks");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.lck"));
    let json = format!(r#"{{"Name":"{name}","Type":{lock_type},"Acquired":true}}"#);
    std::fs::write(&path, json).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(std::time::SystemTime::now() - age).unwrap();
}

#[test]
fn a_live_deletion_lock_holds_the_restore_off_and_an_expired_one_does_not() {
    let fx = Fixture::new();
    let dir = fx.path("nfs");
    let want = image(4, 13);
    write_backup(&dir, VOLUME, BACKUP, &want, "lz4", false);
    // A crashed deletion's lock, 200 s old (Longhorn's expire after 150 s).
    put_lock(&dir, "lock-0000000000000000", 2, Duration::from_secs(200));
    restore_and_verify(&fx, &file_url(&dir), &want, None, "after-expired.img");
    assert_eq!(locks_left(&dir), vec!["lock-0000000000000000.lck".to_owned()]);
    // A deletion in progress: Longhorn's lock rules make us wait, then give up.
    put_lock(&dir, "lock-ffffffffffffffff", 2, Duration::ZERO);
    let target = fx.path("held-off.img");
    // Longhorn's wait is on the wall clock (lock files' times), so it is
    // timed here on the wall clock too: a step of this VM's clock between
    // two monotonic readings is not the restore giving up early.
    let started = std::time::SystemTime::now();
    let out = fx.run(&["restore", "--manifest", &file_url(&dir), "--target", target.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("lock-ffffffffffffffff"), "{}", text(&out));
    let waited = std::time::SystemTime::now().duration_since(started).unwrap_or_default();
    assert!(waited >= Duration::from_secs(30), "gave up after {waited:?}, before Longhorn's 30 s wait");
    assert!(!target.exists());
    let mut left = locks_left(&dir);
    left.sort();
    assert_eq!(left, vec!["lock-0000000000000000.lck".to_owned(), "lock-ffffffffffffffff.lck".to_owned()]);
}

/// A worker profile whose store is a Longhorn backup target takes the backup
/// as its job's manifest (`volume=V&backup=B`): the same restore as the
/// CLI's, the lock released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_job_restores_a_longhorn_backup() {
    let fx = Fixture::new();
    let want = image(6, 31);
    let root = fx.path("nfs");
    write_backup(&root, VOLUME, BACKUP, &want, "lz4", false);
    let roots = fx.path("targets");
    std::fs::create_dir_all(&roots).unwrap();
    let mut toml = std::fs::read_to_string(&fx.config).unwrap();
    toml.push_str(&format!(
        "\n[worker]\ntarget_roots = [\"{}\"]\ntarget_free_bytes_min = 0\n\n[worker.profiles.lh]\nstore = \"longhorn+file://{}\"\n",
        roots.display(),
        root.display()
    ));
    std::fs::write(&fx.config, toml).unwrap();
    let log = fx.path("serve.log");
    let (_worker, client) = common::serve_worker(&fx.config, None, fx.dir.path(), &log).await;
    let target = roots.join("lh.img");
    let spec = rehydrate::worker::JobSpec {
        id: "lh-1".into(),
        profile: "lh".into(),
        manifest: format!("volume={VOLUME}&backup={BACKUP}"),
        target: target.clone(),
        replace: false,
        restart: false,
        export: Default::default(),
    };
    client.submit(&spec).await.unwrap();
    let job = common::job_ended(&client, "lh-1").await;
    assert_eq!(job.state, rehydrate::worker::JobState::Succeeded, "{job:?}");
    assert!(std::fs::read(&target).unwrap() == want, "the job's target differs from the backed-up volume");
    assert!(locks_left(&root).is_empty(), "the job left Longhorn's lock: {:?}", locks_left(&root));
}
