//! Interop: an EBS snapshot written through the EBS direct APIs by a client
//! that is not rehydrate (boto3: `StartSnapshot`, `PutSnapshotBlock`,
//! `CompleteSnapshot`), held by `moto_server` (PyPI `moto[server]`, with the
//! answers `tests/moto_ebs.py` corrects, see `INTEROP.md`), restored by the
//! rehydrate binary: byte-identical, `verify` passes, a missing snapshot is a
//! clear error and leaves no target.
//!
//! Needs `python3` with `moto[server]` (and its boto3); prints `SKIP` without
//! it (`.ci/run` installs it).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{LoopbackEnv, Reaped, binary};
use rehydrate::sample::SampleVolume;

const BLOCK: u32 = 512 * 1024;

fn launcher() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/moto_ebs.py")
}

fn moto_available() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server, moto.ebs, boto3, flask"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The corrected moto_server on a free port, once it accepts connections.
fn start_moto(dir: &Path) -> (Reaped, String) {
    let port = free_port();
    let log = std::fs::File::create(dir.join("moto.log")).unwrap();
    let child = Command::new("python3")
        .arg(launcher())
        .args(["serve", &port.to_string()])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not start: {}",
            std::fs::read_to_string(dir.join("moto.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, format!("http://127.0.0.1:{port}"))
}

fn rehydrate(endpoint: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .loopback_env(endpoint, dir)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_snapshot_written_by_boto3_to_moto_restores_byte_identical() {
    if !moto_available() {
        println!("SKIP: python3 with moto[server] and boto3 is not installed (pip install 'moto[server]')");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_moto, endpoint) = start_moto(dir.path());
    // 40 blocks of 512 KiB, some zero (not written), some identical.
    let image = dir.path().join("image.raw");
    SampleVolume { size_bytes: 40 * u64::from(BLOCK), block_size_bytes: BLOCK, seed: 21 }.write_to(&image).unwrap();
    let out = Command::new("python3").arg(launcher()).args(["write", &endpoint]).arg(&image).output().unwrap();
    assert!(out.status.success(), "boto3 writer: {}", String::from_utf8_lossy(&out.stderr));
    let snapshot_id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(snapshot_id.starts_with("snap-"), "{snapshot_id}");

    let target = dir.path().join("restored.img");
    let manifest = format!("ebs://{snapshot_id}");
    let t = target.to_str().unwrap();
    let out = rehydrate(&endpoint, dir.path(), &["restore", "--manifest", &manifest, "--target", t]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = std::fs::read(&target).unwrap();
    let want = std::fs::read(&image).unwrap();
    assert_eq!(got.len() as u64, 1 << 30, "a 1 GiB volume");
    assert!(got[..want.len()] == want[..], "the image's bytes");
    let zeros = vec![0u8; 1 << 20];
    assert!(got[want.len()..].chunks(1 << 20).all(|c| c == &zeros[..c.len()]), "then zeros");
    drop(got);

    let out = rehydrate(&endpoint, dir.path(), &["verify", "--manifest", &manifest, "--target", t]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let missing = dir.path().join("missing.img");
    let out = rehydrate(
        &endpoint,
        dir.path(),
        &["restore", "--manifest", "ebs://snap-0123456789abcdef0", "--target", missing.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("snap-0123456789abcdef0") && said.contains("no such snapshot"), "{said}");
    assert!(!missing.exists(), "no target for a missing snapshot");
}
