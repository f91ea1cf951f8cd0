//! The binary under a seccomp filter that refuses io_uring the way the
//! default profiles of Docker, containerd and CRI-O do: `io_uring_setup`,
//! `io_uring_enter` and `io_uring_register` fail with EPERM (those profiles
//! leave the three out of their allow list, and Docker's default action
//! answers EPERM). The writer's `auto` backend must fall back to pwrite and
//! restore the volume byte for byte.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::*;
use rehydrate::block::{Compression, HashAlgorithm};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};
use serde_json::Value;

/// A filter that makes the io_uring syscalls fail with EPERM and allows
/// every other.
fn deny_io_uring() -> BpfProgram {
    let rules = [libc::SYS_io_uring_setup, libc::SYS_io_uring_enter, libc::SYS_io_uring_register]
        .into_iter()
        .map(|nr| (nr, vec![]))
        .collect();
    let arch = std::env::consts::ARCH.try_into().unwrap();
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).unwrap();
    filter.try_into().unwrap()
}

struct Run {
    code: i32,
    summary: Value,
    stderr: String,
}

/// `rehydrate restore --json` of `manifest` into `target`, with `config`,
/// under `filter` when given.
fn restore(manifest: &str, target: &Path, config: &Path, filter: Option<BpfProgram>) -> Run {
    let mut command = Command::new(binary());
    command
        .args(["restore", "--json", "--manifest", manifest, "--config"])
        .arg(config)
        .arg("--target")
        .arg(target)
        .env("REHYDRATE_LOG", "warn");
    if let Some(filter) = filter {
        // SAFETY: between fork and exec the hook only calls prctl and
        // seccomp on a program built before the fork: no allocation, no lock.
        unsafe {
            command.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
        }
    }
    let out = command.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        summary: serde_json::from_slice(&out.stdout).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write_config(dir: &Path, name: &str, backend: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let state = dir.join(format!("state-{backend}"));
    std::fs::write(
        &path,
        format!("[checkpoint]\ndir = {:?}\n[write]\nbackend = {backend:?}\n", state.display().to_string()),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_pwrite_when_seccomp_refuses_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(24, 15);
    let manifest_url = snapshot(dir.path(), &volume, Compression::Zstd, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&manifest_url);
    let auto = write_config(dir.path(), "auto.toml", "auto");

    // Under the filter: `auto` restores with pwrite, byte for byte, and says why.
    let target = dir.path().join("filtered.img");
    let r = restore(&manifest_url, &target, &auto, Some(deny_io_uring()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.summary["succeeded"], true, "{:#}", r.summary);
    assert_eq!(r.summary["writer_backend"], "pwrite", "{:#}", r.summary);
    assert_eq!(r.summary["blocks_settled"], r.summary["blocks_total"], "{:#}", r.summary);
    assert_eq!(r.summary["blocks_total"], manifest.layout.block_count());
    assert!(r.stderr.contains("io_uring unavailable"), "the fallback is not logged: {}", r.stderr);
    check_identical(&manifest, &volume, &target);

    // The filter is what refused io_uring, with EPERM: an explicit `uring`
    // backend cannot start under it, and nothing is left behind.
    let uring = write_config(dir.path(), "uring.toml", "uring");
    let refused = dir.path().join("refused.img");
    let r = restore(&manifest_url, &refused, &uring, Some(deny_io_uring()));
    assert_ne!(r.code, 0, "io_uring started under the filter: {:#}", r.summary);
    assert!(r.stderr.contains("io_uring") && r.stderr.contains("Operation not permitted"), "{}", r.stderr);
    assert!(!refused.exists());
    assert_eq!(staging_files(dir.path()), Vec::<String>::new());

    // Without the filter, where the kernel allows io_uring, `auto` takes it.
    let open = dir.path().join("open.img");
    let r = restore(&manifest_url, &open, &auto, None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    match r.summary["writer_backend"].as_str() {
        Some("uring") => {}
        Some("pwrite") => eprintln!("SKIP: io_uring is unavailable here even without the filter: {}", r.stderr),
        other => panic!("writer_backend {other:?}: {:#}", r.summary),
    }
    check_identical(&manifest, &volume, &open);
}
