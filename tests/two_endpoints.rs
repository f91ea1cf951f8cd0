//! A primary and a secondary on two different S3 endpoints, each with its own
//! `[[store]]` entry, through the real binary: a one-shot `restore` and a
//! job on `rehydrate serve` whose profile names both stores.
//!
//! Two in-process S3 servers ([`LoopbackS3`]) serve the same snapshot under
//! two bucket names; the primary answers 404 for a few block objects, so the
//! restore is only byte-identical if the secondary's endpoint (known only
//! from its own `[[store]]` entry) served them. Requests are counted at each
//! server.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use rehydrate::api::client::ApiClient;
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::job::{JobSpec, JobState};
use rehydrate::manifest::Manifest;
use rehydrate::sample::SampleVolume;
use rehydrate::store::fault::{Fault, FaultMethod, FaultRule};
use rehydrate::store::loopback::LoopbackS3;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);

struct Fixture {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    primary: LoopbackS3,
    mirror: LoopbackS3,
    /// The block objects the primary answers 404 for.
    missing: Vec<String>,
}

async fn fixture(seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let volume = volume(48, seed);
    let url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
    let manifest = load_manifest(&url);
    // The mirror: the same objects, as bucket "mirror" on another server.
    let mirror_root = dir.path().join("mirror-root");
    rehydrate::store::file::copy_tree(&store_root(dir.path()), &mirror_root.join("mirror/snap")).unwrap();
    let primary = LoopbackS3::start(dir.path().join("store")).await.unwrap();
    let mirror = LoopbackS3::start(mirror_root).await.unwrap();
    let missing: Vec<String> = [3u64, 17, 30]
        .iter()
        .map(|&i| {
            let e = manifest.entry(i).expect("a data block");
            block_key(&e.hash, e.compression)
        })
        .collect();
    for key in &missing {
        primary.add_fault(FaultRule::new(Fault::NotFound).method(FaultMethod::Get).path_contains(key));
    }
    // And the primary throttles one present object three times: the report
    // and the job status say so.
    let present = manifest.entry(6).expect("a data block");
    let present = block_key(&present.hash, present.compression);
    primary.add_fault(FaultRule::new(Fault::SlowDown).method(FaultMethod::Get).path_contains(&present).first(3));
    Fixture { dir, volume, manifest, primary, mirror, missing }
}

impl Fixture {
    /// The config: each store on its own endpoint, through `[[store]]` only
    /// (no top-level `[s3]` endpoint), plus `extra`. No hedging: requests are
    /// counted exactly at each server (a tail hedge would ask the mirror for
    /// a present object; hedging has its own tests in `src/fetch.rs`).
    fn config_file(&self, extra: &str) -> PathBuf {
        let path = self.dir.path().join("rehydrate.toml");
        let text = format!(
            "[checkpoint]\ndir = {state:?}\n\n[fetch.hedge]\nenabled = false\n\n\
             [[store]]\nurl = \"s3://bucket\"\nendpoint_url = {primary:?}\nregion = \"us-east-1\"\n\n\
             [[store]]\nurl = \"s3://mirror/snap\"\nendpoint_url = {mirror:?}\nregion = \"us-east-1\"\n\
             rate_limit = {{ requests_per_sec = 500 }}\n\n{extra}",
            state = self.dir.path().join("state").display().to_string(),
            primary = self.primary.endpoint_url(),
            mirror = self.mirror.endpoint_url(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn manifest_url(&self) -> String {
        format!("s3://bucket/snap/vol-{}.manifest", self.volume.seed)
    }

    /// Each missing object came from the mirror, once; nothing else did.
    fn check_served(&self, target: &Path) {
        check_identical(&self.manifest, &self.volume, target);
        for key in &self.missing {
            assert_eq!(self.primary.requests(key), 1, "{key}: a 404 is not retried");
            assert_eq!(self.mirror.requests(key), 1, "{key} came from the mirror's endpoint");
        }
        assert_eq!(self.mirror.requests("/blocks/"), self.missing.len() as u64, "only the missing objects");
    }
}

/// SlowDown answers the primary sent for the one throttled object.
const THROTTLED: u64 = 3;

/// The binary with the loopback servers' credentials in its environment
/// (the standard chain reads them; rehydrate's config never holds any).
fn binary_cmd() -> tokio::process::Command {
    let credentials = LoopbackS3::credentials();
    let mut cmd = tokio::process::Command::new(binary());
    cmd.env("AWS_ACCESS_KEY_ID", credentials.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .kill_on_drop(true);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_restore_with_primary_and_secondary_on_two_endpoints() {
    let f = fixture(61).await;
    let config = f.config_file("");
    let target = f.dir.path().join("vol.img");
    let out = binary_cmd()
        .args(["restore", "--manifest", &f.manifest_url(), "--secondary", "s3://mirror/snap", "--json"])
        .arg("--target")
        .arg(&target)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let out = tokio::time::timeout(DEADLINE, out).await.expect("the restore ends").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["succeeded"], Value::Bool(true), "{report:#}");
    let served: Vec<(String, u64)> = serde_json::from_value(report["fetch"]["served_by_source"].clone()).unwrap();
    assert!(served.contains(&("secondary1".to_owned(), f.missing.len() as u64)), "{served:?}");
    assert_eq!(report["fetch"]["throttled_responses"], Value::from(THROTTLED), "{report:#}");
    assert_eq!(f.primary.slowdowns_sent(), THROTTLED);
    f.check_served(&target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_profile_with_primary_and_secondary_on_two_endpoints() {
    let f = fixture(62).await;
    let targets = f.dir.path().join("targets");
    std::fs::create_dir_all(&targets).unwrap();
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let config = f.config_file(&format!(
        "[worker]\nlisten = \"127.0.0.1:{port}\"\ntarget_roots = [{targets:?}]\ntarget_free_bytes_min = 0\n\n\
         [worker.profiles.main]\nstore = \"s3://bucket/snap\"\nsecondaries = [\"s3://mirror/snap\"]\n",
        targets = targets.display().to_string(),
    ));
    let mut worker = binary_cmd().arg("serve").arg("--config").arg(&config).stderr(Stdio::null()).spawn().unwrap();
    let client = ApiClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let target = targets.join("vol.img");
    let spec = JobSpec {
        id: "two-endpoints".into(),
        profile: "main".into(),
        manifest: format!("vol-{}.manifest", f.volume.seed),
        target: target.clone(),
        replace: false,
        restart: false,
        export: Default::default(),
    };
    let started = Instant::now();
    let body = serde_json::to_vec(&spec).unwrap();
    loop {
        match client.raw(hyper::Method::POST, "/v1/jobs", Some(body.clone())).await {
            Ok(answer) if answer.status.is_success() => break,
            Ok(answer) => panic!("submit refused: {}", answer.text),
            Err(_) => {
                assert!(started.elapsed() < DEADLINE, "the worker never listened");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let job = loop {
        let job = client.get("two-endpoints").await.unwrap();
        if !matches!(job.state, JobState::Queued | JobState::Running) {
            break job;
        }
        assert!(started.elapsed() < DEADLINE, "the job never finished: {job:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    assert_eq!(job.state, JobState::Succeeded, "{job:#?}");
    assert_eq!(job.sources.get("secondary1"), Some(&(f.missing.len() as u64)), "{job:#?}");
    assert_eq!(job.throttling.throttled_responses, THROTTLED, "{job:#?}");
    assert!(job.throttling.throttled_millis > 0, "{job:#?}");
    assert!(job.throttling.requests_per_sec.contains_key("primary"), "{job:#?}");
    assert_eq!(f.primary.slowdowns_sent(), THROTTLED);
    f.check_served(&target);
}
