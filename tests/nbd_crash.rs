//! Writes through the export survive kill -9: the real binary restores from
//! a slowed in-process S3 server with `--export`; each cycle a client writes
//! whole and partial blocks at random (mostly where the restore has not
//! been yet), FLUSHes, and the process is killed with SIGKILL at a random
//! moment; the same command is run again. The client is libnbd's `nbdsh`
//! where it is installed (`.ci/run` installs it), else the suite's own
//! (and the test says so). At the end every flushed write
//! reads back through the export and from the target, and every other byte
//! is the snapshot's: no acknowledged write is ever overwritten by snapshot
//! data.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;
mod nbd_client;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{LoopbackEnv, Reaped, binary, slow_loopback, slow_s3_toml};
use nbd_client::Client;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rehydrate::sample::SampleVolume;
use rehydrate::store::loopback::LoopbackS3;

const BUCKET: &str = "nbd-bucket";
const PREFIX: &str = "vols";
const NAME: &str = "vol";
const BLOCK: u64 = 64 * 1024;
const BLOCKS: u64 = 320;
const CYCLES: usize = 20;

struct Fixture {
    dir: tempfile::TempDir,
    server: LoopbackS3,
    volume: SampleVolume,
    target: PathBuf,
    config: PathBuf,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s3");
        let volume = SampleVolume { size_bytes: BLOCKS * BLOCK + 1000, block_size_bytes: BLOCK as u32, seed: 5 };
        let source = dir.path().join("source.img");
        let (_, server) =
            slow_loopback(&root, &source, &volume, (BUCKET, PREFIX, NAME), Duration::from_millis(300)).await;
        let state = dir.path().join("state");
        let config = dir.path().join("rehydrate.toml");
        std::fs::write(&config, slow_s3_toml(&state, 8 * BLOCK, 2)).unwrap();
        Fixture { target: dir.path().join("vol.img"), dir, server, volume, config }
    }

    /// The exported restore, and the address it serves once it says so.
    fn spawn(&self) -> (Reaped, SocketAddr, std::io::Lines<BufReader<std::process::ChildStderr>>) {
        self.spawn_with(Stdio::null())
    }

    fn spawn_with(&self, stdout: Stdio) -> (Reaped, SocketAddr, std::io::Lines<BufReader<std::process::ChildStderr>>) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(binary())
            .args(["restore", "--json", "--manifest", &format!("s3://{BUCKET}/{PREFIX}/{NAME}.manifest")])
            .args(["--export", &format!("nbd://127.0.0.1:{port}/{NAME}")])
            .arg("--target")
            .arg(&self.target)
            .arg("--config")
            .arg(&self.config)
            .loopback_env(&self.server.endpoint_url(), self.dir.path())
            .env("REHYDRATE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let started = Instant::now();
        loop {
            let line = lines.next().unwrap_or_else(|| panic!("the binary ended before exporting")).unwrap();
            if line.contains("exporting at nbd://") {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no export");
        }
        (Reaped(child), format!("127.0.0.1:{port}").parse().unwrap(), lines)
    }
}

/// A random write: whole blocks or a part of one, anywhere.
fn random_write(rng: &mut SmallRng, size: u64) -> (u64, Vec<u8>) {
    let fill = rng.random::<u8>() | 1;
    if rng.random_bool(0.5) {
        let block = rng.random_range(0..size / BLOCK);
        let n = rng.random_range(1..=2).min(size / BLOCK - block);
        (block * BLOCK, vec![fill; (n * BLOCK) as usize])
    } else {
        let offset = rng.random_range(0..size - 1);
        let len = rng.random_range(1..=(3 * BLOCK / 2).min(size - offset));
        (offset, vec![fill; len as usize])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_kill_9_and_are_never_overwritten() {
    let fx = Fixture::new().await;
    let mut expected = std::fs::read(fx.dir.path().join("source.img")).unwrap();
    let size = fx.volume.size_bytes;
    let mut rng = SmallRng::seed_from_u64(2026);
    let nbdsh = common::installed_tool("nbdsh").filter(|_| common::python_nbd_installed());
    if nbdsh.is_none() {
        eprintln!("the writes go through the suite's own NBD client instead of nbdsh");
    }
    for cycle in 0..CYCLES {
        let (mut child, addr, _stderr) = fx.spawn();
        let (mut c, export_size) = Client::go(addr, NAME).await;
        assert_eq!(export_size, size);
        let writes: Vec<_> = (0..rng.random_range(1..6)).map(|_| random_write(&mut rng, size)).collect();
        match &nbdsh {
            // One nbdsh connection writes them all, then FLUSHes; it exits
            // with an error if any of them failed.
            Some(nbdsh) => {
                let script: String = writes
                    .iter()
                    .map(|(offset, data)| format!("h.pwrite(b'\\x{:02x}' * {}, {offset}); ", data[0], data.len()))
                    .chain(["h.flush()".to_string()])
                    .collect();
                common::run_tool(nbdsh, &["-u", &format!("nbd://{addr}/{NAME}"), "-c", &script]).await;
            }
            None => {
                for (offset, data) in &writes {
                    assert_eq!(c.write(*offset, data).await, 0, "cycle {cycle}: write at {offset}");
                }
                assert_eq!(c.flush().await, 0, "cycle {cycle}: flush");
            }
        }
        for (offset, data) in &writes {
            expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        // A read of a random range agrees with the model at once.
        let offset = rng.random_range(0..size - 4096);
        assert!(c.read(offset, 4096).await.unwrap() == expected[offset as usize..offset as usize + 4096]);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        child.0.kill().unwrap();
        child.0.wait().unwrap();
    }
    // The last run: to the end of the restore, then the whole volume.
    let (mut child, addr, mut stderr) = fx.spawn_with(Stdio::piped());
    let started = Instant::now();
    loop {
        let line = stderr.next().expect("the binary keeps running").unwrap();
        if line.contains("still exporting") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the restore ends");
    }
    let mut report = String::new();
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        report.push_str(&line);
        if line == "}" {
            break;
        }
    }
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    eprintln!(
        "the last run resumed {} of {} blocks after {CYCLES} kills",
        report["blocks_resumed"], report["blocks_total"]
    );
    assert_eq!(report["succeeded"], true, "{report}");
    assert!(
        report["blocks_resumed"].as_u64().unwrap() < report["blocks_total"].as_u64().unwrap(),
        "the kills came while the restore ran: {report}"
    );
    let (mut c, _) = Client::go(addr, NAME).await;
    let mut offset = 0;
    while offset < size {
        let len = (4 * BLOCK).min(size - offset);
        let got = c.read(offset, len as u32).await.unwrap();
        assert!(got == expected[offset as usize..(offset + len) as usize], "bytes at {offset} read over NBD");
        offset += len;
    }
    assert!(std::fs::read(&fx.target).unwrap() == expected, "the target holds every flushed write");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}
