//! EBS snapshots (`--manifest ebs://snap-...`): the real binary against the
//! in-process EBS direct APIs server ([`EbsServer`]) over real HTTP, through
//! `aws-sdk-ebs` and the standard AWS environment chain.
//!
//! Each test serves a sample image (512 KiB blocks, some zero, some
//! identical) as a snapshot of a 1 GiB volume, restores it, and checks the
//! ledger: the target holds the image and zeros after it, `verify` agrees,
//! and the server saw what the fault calls for.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{LoopbackEnv, Reaped, binary};
use rehydrate::checkpoint::{Checkpoint, checkpoint_key};
use rehydrate::sample::SampleVolume;
use rehydrate::store::ebs_server::{EBS_BLOCK_SIZE_BYTES, EbsServer};
use rehydrate::store::fault::{Fault, FaultRule};

const SNAP: &str = "snap-0123456789abcdef0";
const GIB: u64 = 1 << 30;

/// A sample image of `blocks` EBS blocks under `dir`, served as [`SNAP`].
async fn serve(dir: &Path, blocks: u64, seed: u64) -> (EbsServer, PathBuf) {
    let image = dir.join("image.raw");
    let volume = SampleVolume {
        size_bytes: blocks * u64::from(EBS_BLOCK_SIZE_BYTES),
        block_size_bytes: EBS_BLOCK_SIZE_BYTES,
        seed,
    };
    volume.write_to(&image).unwrap();
    let server = EbsServer::start(0).await.unwrap();
    server.add_snapshot(SNAP, &image).unwrap();
    (server, image)
}

/// A config for the child: short deadlines and backoff, checkpoints in
/// `<dir>/state`, `requests_max` requests in flight.
fn config(dir: &Path, requests_max: u64) -> PathBuf {
    let path = dir.join("rehydrate.toml");
    let toml = format!(
        r#"
[fetch]
attempt_timeout_millis = 5000
backoff_base_millis = 5
backoff_cap_millis = 50
jitter_seed = 7

[checkpoint]
dir = "{state}"
interval_millis = 100
interval_bytes = 2097152

[concurrency]
concurrency_min = 1
concurrency_max = {requests_max}

[s3]
connect_timeout_millis = 1000
operation_attempt_timeout_millis = 3000
operation_timeout_millis = 5000
body_deadline_millis = 4000
body_idle_timeout_millis = 500
"#,
        state = dir.join("state").display()
    );
    std::fs::write(&path, toml).unwrap();
    path
}

fn command(server: &EbsServer, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args).loopback_env(&server.endpoint_url(), dir).stdin(Stdio::null());
    cmd
}

async fn run(server: &EbsServer, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = command(server, dir, args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

async fn restore(server: &EbsServer, dir: &Path, target: &Path, snapshot: &str) -> (Output, serde_json::Value) {
    let config = config(dir, 8);
    let manifest = format!("ebs://{snapshot}");
    let args = [
        "restore",
        "--manifest",
        &manifest,
        "--target",
        target.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--json",
    ];
    let out = run(server, dir, &args).await;
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

async fn verify(server: &EbsServer, dir: &Path, target: &Path) -> Output {
    let config = config(dir, 8);
    let manifest = format!("ebs://{SNAP}");
    run(
        server,
        dir,
        &[
            "verify",
            "--manifest",
            &manifest,
            "--target",
            target.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await
}

/// The target is the image, then zeros to the end of the 1 GiB volume.
fn assert_restored(target: &Path, image: &Path) {
    let got = std::fs::read(target).unwrap();
    let want = std::fs::read(image).unwrap();
    assert_eq!(got.len() as u64, GIB, "the volume is VolumeSize GiB");
    assert!(got[..want.len()] == want[..], "the image's bytes");
    let zeros = vec![0u8; 1 << 20];
    assert!(got[want.len()..].chunks(1 << 20).all(|c| c == &zeros[..c.len()]), "unlisted blocks are zeros");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn counts(report: &serde_json::Value, key: &str) -> u64 {
    report["fetch"][key].as_u64().unwrap_or_else(|| panic!("no fetch.{key} in {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_byte_identical_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 24, 11).await;
    // Small pages, so the listing is paged as a large snapshot's would be.
    server.set_page_blocks_max(5);
    let target = dir.path().join("restored.img");
    let (out, report) = restore(&server, dir.path(), &target, SNAP).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_restored(&target, &image);
    assert!(server.list_requests() >= 4, "paged: {} list requests", server.list_requests());
    let stored = report["objects_planned"].as_u64().unwrap();
    // Each stored block fetched once (plus any hedge), zero blocks never.
    let hedges = counts(&report, "hedges");
    assert!(
        (stored..=stored + hedges).contains(&server.block_requests()),
        "{} requests: {report}",
        server.block_requests()
    );
    assert_eq!(report["blocks_total"].as_u64(), Some(GIB / u64::from(EBS_BLOCK_SIZE_BYTES)));

    let out = verify(&server, dir.path(), &target).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified"));
    // One flipped byte, in a stored block and in a zero one: verify names both.
    let file = std::fs::OpenOptions::new().write(true).open(&target).unwrap();
    use std::os::unix::fs::FileExt;
    file.write_at(&[0xAA], 3 * u64::from(EBS_BLOCK_SIZE_BYTES) + 5).unwrap();
    file.write_at(&[0xAA], 100 * u64::from(EBS_BLOCK_SIZE_BYTES)).unwrap();
    let out = verify(&server, dir.path(), &target).await;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("MISMATCH") && said.contains("3") && said.contains("100"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_server_errors_stalls_and_expired_tokens_are_survived() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 16, 12).await;
    let block = |i: u64| format!("/blocks/{i}");
    server.add_fault(FaultRule::new(Fault::SlowDown).path_ends_with(&block(1)).first(3));
    server.add_fault(FaultRule::new(Fault::InternalError).path_ends_with(&block(2)).first(2));
    server.add_fault(FaultRule::new(Fault::Stall { after_bytes: 1000 }).path_ends_with(&block(4)).first(1));
    // Every token listed at the start dies at the 6th block request.
    server.expire_tokens_at_get(6);
    let target = dir.path().join("restored.img");
    let started = Instant::now();
    let (out, report) = restore(&server, dir.path(), &target, SNAP).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_restored(&target, &image);
    assert!(counts(&report, "throttled_responses") >= 3, "throttles backed off and retried: {report}");
    assert!(counts(&report, "retries") > 2, "5xx (twice) and the stall retried: {report}");
    assert!(started.elapsed() < Duration::from_secs(30), "the stall was cut by the body deadline");
    assert!(server.refused_tokens() >= 1, "tokens did expire");
    assert!(server.list_requests() >= 2, "and the range was listed again");
    assert_eq!(server.block_requests_of(4), 2, "stalled once, then served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_checksum_is_never_written_and_a_rerun_fetches_only_that_block() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 12, 13).await;
    let stored: Vec<u64> = (0..12)
        .filter(|&i| {
            let bytes = std::fs::read(&image).unwrap();
            let at = (i * u64::from(EBS_BLOCK_SIZE_BYTES)) as usize;
            bytes[at..at + EBS_BLOCK_SIZE_BYTES as usize].iter().any(|&b| b != 0)
        })
        .collect();
    let bad = stored[2];
    server.add_fault(FaultRule::new(Fault::Corrupt).path_ends_with(&format!("/blocks/{bad}")).first(1));
    let target = dir.path().join("restored.img");
    let (out, report) = restore(&server, dir.path(), &target, SNAP).await;
    assert!(!out.status.success(), "the block has no other source");
    assert!(!target.exists(), "a target with a failed block is not swapped into place");
    assert_eq!(report["damage"][0]["index"].as_u64(), Some(bad), "{report}");
    assert!(counts(&report, "corrupt_responses") >= 1);
    server.reset_block_requests();
    let (out, _) = restore(&server, dir.path(), &target, SNAP).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_restored(&target, &image);
    for &i in &stored {
        assert_eq!(server.block_requests_of(i), u64::from(i == bad), "block {i} on the rerun");
    }
}

/// A rehydrate snapshot of the same volume as the secondary: a block whose
/// EBS answer is corrupt comes from it, matched by index and verified by its
/// own manifest's hash; a secondary of another layout is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rehydrate_snapshot_of_the_same_volume_serves_as_the_secondary() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 12, 16).await;
    // The same volume, 1 GiB, snapshotted by rehydrate in 512 KiB blocks.
    let volume = dir.path().join("volume.raw");
    std::fs::copy(&image, &volume).unwrap();
    std::fs::OpenOptions::new().write(true).open(&volume).unwrap().set_len(GIB).unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let spec = rehydrate::snapshot::CreateSpec {
        source: volume.clone(),
        name: "same".into(),
        block_size_bytes: EBS_BLOCK_SIZE_BYTES,
        compression: rehydrate::block::Compression::Zstd,
        hash_algorithm: rehydrate::block::HashAlgorithm::Blake3,
        puts_inflight_max: 8,
    };
    let store = std::sync::Arc::new(rehydrate::store::file::FileStore::new(mirror.clone()));
    rehydrate::snapshot::create(store, &spec).await.unwrap();
    std::fs::remove_file(&volume).unwrap();
    let secondary = format!("file://{}/same.manifest", mirror.display());
    server.add_fault(FaultRule::new(Fault::Corrupt).path_ends_with("/blocks/1"));
    server.add_fault(FaultRule::new(Fault::NotFound).path_ends_with("/blocks/3"));

    let target = dir.path().join("restored.img");
    let config = config(dir.path(), 8);
    let manifest = format!("ebs://{SNAP}");
    let t = target.to_str().unwrap();
    let c = config.to_str().unwrap();
    let args = ["restore", "--manifest", &manifest, "--target", t, "--secondary", &secondary, "--config", c, "--json"];
    let out = run(&server, dir.path(), &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_restored(&target, &image);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let served = &report["fetch"]["served_by_source"];
    assert_eq!(served[1][1].as_u64(), Some(2), "blocks 1 and 3 from the secondary: {report}");

    // A secondary of another layout is not the same volume.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let small = dir.path().join("small.raw");
    std::fs::copy(&image, &small).unwrap();
    let spec = rehydrate::snapshot::CreateSpec { source: small, name: "small".into(), ..spec };
    rehydrate::snapshot::create(std::sync::Arc::new(rehydrate::store::file::FileStore::new(other.clone())), &spec)
        .await
        .unwrap();
    let wrong = format!("file://{}/small.manifest", other.display());
    let t2 = dir.path().join("second.img");
    let args =
        ["restore", "--manifest", &manifest, "--target", t2.to_str().unwrap(), "--secondary", &wrong, "--config", c];
    let out = run(&server, dir.path(), &args).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a snapshot of the same volume"), "{}", stderr(&out));
    assert!(!t2.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_is_a_clear_error_and_no_target() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = serve(dir.path(), 2, 14).await;
    let target = dir.path().join("restored.img");
    let (out, _) = restore(&server, dir.path(), &target, "snap-0badbadbadbadbad0").await;
    assert!(!out.status.success());
    let said = stderr(&out);
    assert!(said.contains("snap-0badbadbadbadbad0") && said.contains("no such snapshot"), "{said}");
    assert!(!target.exists(), "nothing written");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!leftovers.iter().any(|n| n.to_string_lossy().contains("restored")), "{leftovers:?}");
    assert_eq!(server.block_requests(), 0);
}

/// SIGKILL part way, then rerun: the rerun requests no block the checkpoint
/// named settled, and ends byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_restore_resumes_without_refetching_settled_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 40, 15).await;
    server.add_fault(FaultRule::new(Fault::Latency(Duration::from_millis(60))).path_contains("/blocks/"));
    let target = dir.path().join("restored.img");
    let config = config(dir.path(), 2);
    let manifest = format!("ebs://{SNAP}");
    let args = [
        "restore",
        "--manifest",
        &manifest,
        "--target",
        target.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ];
    let mut child =
        Reaped(command(&server, dir.path(), &args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.block_requests() < 16 {
        assert!(Instant::now() < deadline, "the child made no progress");
        assert!(child.0.try_wait().unwrap().is_none(), "the child ended before it was killed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let ckpt = dir.path().join("state").join(format!("{}.ckpt", checkpoint_key(&target)));
    let checkpoint = Checkpoint::decode(&std::fs::read(&ckpt).unwrap()).unwrap();
    let settled: Vec<u64> = (0..40).filter(|&i| checkpoint.settled().is_settled(i)).collect();
    let requested: Vec<u64> = (0..40).filter(|&i| server.block_requests_of(i) > 0).collect();
    assert!(settled.iter().any(|i| requested.contains(i)), "some fetched blocks were settled before the kill");
    server.reset_block_requests();
    let out = run(&server, dir.path(), &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_restored(&target, &image);
    for i in settled {
        assert_eq!(server.block_requests_of(i), 0, "block {i} was settled, yet fetched again");
    }
    assert!(!ckpt.exists(), "the checkpoint goes with the completed restore");
}

/// A worker job names the snapshot whole (`"manifest": "ebs://snap-..."`)
/// under any profile: the same restore as the CLI's, reported in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_job_restores_an_ebs_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (server, image) = serve(dir.path(), 12, 23).await;
    let config = config(dir.path(), 8);
    let roots = dir.path().join("targets");
    std::fs::create_dir_all(&roots).unwrap();
    let worker = format!(
        "\n[worker]\ntarget_roots = [\"{}\"]\ntarget_free_bytes_min = 0\n\n[worker.profiles.main]\nstore = \"file://{}\"\n",
        roots.display(),
        dir.path().display()
    );
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&worker);
    std::fs::write(&config, toml).unwrap();
    let log = dir.path().join("serve.log");
    let (_worker, client) = common::serve_worker(&config, Some(&server.endpoint_url()), dir.path(), &log).await;
    let target = roots.join("ebs.img");
    let spec = rehydrate::worker::JobSpec {
        id: "ebs-1".into(),
        profile: "main".into(),
        manifest: format!("ebs://{SNAP}"),
        target: target.clone(),
        replace: false,
        restart: false,
        export: Default::default(),
    };
    client.submit(&spec).await.unwrap();
    let job = common::job_ended(&client, "ebs-1").await;
    assert_eq!(job.state, rehydrate::worker::JobState::Succeeded, "{job:?}");
    assert_restored(&target, &image);
    assert_eq!(job.sources.get("primary").copied(), Some(server.block_requests()), "{job:?}");
    let out = verify(&server, dir.path(), &target).await;
    assert!(out.status.success(), "{}", stderr(&out));
}
