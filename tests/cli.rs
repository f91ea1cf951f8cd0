//! The binary as users and orchestrators drive it: output contracts and exit
//! codes.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

use std::process::Command;

use rehydrate::sample::SampleVolume;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rehydrate"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command) -> Run {
    let out = cmd.env("REHYDRATE_LOG", "error").output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn create(dir: &std::path::Path) -> String {
    let vol = SampleVolume { size_bytes: 10 * 65536 + 17, block_size_bytes: 65536, seed: 4 };
    let source = dir.join("src.img");
    vol.write_to(&source).unwrap();
    let store = format!("file://{}/store/bucket/p", dir.display());
    let r = run(bin().args(["snapshot", "create", "--source"]).arg(&source).args([
        "--store",
        &store,
        "--name",
        "vol",
        "--block-size",
        "64KiB",
        "--compression",
        "zstd",
    ]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let last = r.stdout.lines().last().unwrap().to_owned();
    assert_eq!(last, format!("{store}/vol.manifest"));
    last
}

#[test]
fn create_restore_verify_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = create(dir.path());
    let target = dir.path().join("out.img");

    let r = run(bin().args(["restore", "--json", "--manifest", &manifest, "--target"]).arg(&target));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let summary: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(summary["succeeded"], true);
    assert_eq!(summary["blocks_total"], 11);
    assert_eq!(summary["blocks_failed"], 0);

    let r = run(bin().args(["verify", "--manifest", &manifest, "--target"]).arg(&target));
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // Damage one block of the target: verify names it and exits 3.
    let mut data = std::fs::read(&target).unwrap();
    data[2 * 65536 + 5] ^= 1;
    std::fs::write(&target, &data).unwrap();
    let r = run(bin().args(["verify", "--json", "--manifest", &manifest, "--target"]).arg(&target));
    assert_eq!(r.code, 3);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["mismatched"], serde_json::json!([2]));

    // The same name twice is refused: snapshots are immutable.
    let r = run(bin().args(["snapshot", "create", "--source"]).arg(dir.path().join("src.img")).args([
        "--store",
        manifest.trim_end_matches("/vol.manifest"),
        "--name",
        "vol",
        "--block-size",
        "64KiB",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
}

#[test]
fn usage_and_config_errors_exit_2_and_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[fetch]\nattempts_mx = 3\n").unwrap();
    let r = run(bin()
        .args(["restore", "--manifest", "file:///x/y.manifest", "--target", "/tmp/x", "--config"])
        .arg(&config));
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("attempts_mx"), "{}", r.stderr);

    let r = run(bin().args([
        "snapshot",
        "create",
        "--source",
        "/dev/null",
        "--store",
        "file:///tmp/s",
        "--block-size",
        "1000",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);

    let r = run(bin().args(["restore", "--manifest", "relative/x.manifest", "--target", "/tmp/x"]));
    assert_eq!(r.code, 2, "{}", r.stderr);

    // A manifest that does not exist: a data failure (3), nothing written.
    let target = dir.path().join("never.img");
    let r = run(bin()
        .args(["restore", "--manifest"])
        .arg(format!("file://{}/nope.manifest", dir.path().display()))
        .arg("--target")
        .arg(&target));
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(!target.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only bad.toml");
}
