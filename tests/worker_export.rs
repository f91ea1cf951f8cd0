//! A worker job with an NBD export, end to end: the real binary
//! (`rehydrate serve`) restores from a slowed in-process S3 server; the job
//! asks for `"export": true` and gets an address from `worker.export_listen`;
//! libnbd's `nbdinfo` and `nbdcopy` (SKIP when missing; `.ci/run` installs
//! `libnbd-bin`) and the suite's own client read and write it during the
//! restore; the export stays up after the restore succeeds, until
//! `POST /v1/jobs/{id}/export/stop`; the job status counts reads, writes,
//! on-demand fetches and their latency, `/metrics` carries the
//! `rehydrate_nbd_*` series, and an address outside the range is refused.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;
mod nbd_client;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{LoopbackEnv, slow_loopback, slow_s3_toml};
use hyper::Method;
use nbd_client::Client;
use rehydrate::api::client::ApiClient;
use rehydrate::sample::SampleVolume;
use serde_json::{Value, json};

const BUCKET: &str = "export-bucket";
const PREFIX: &str = "vols";
const NAME: &str = "vol";
const BLOCK: u64 = 64 * 1024;
const BLOCKS: u64 = 160;
const DEADLINE: Duration = Duration::from_secs(120);

async fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(DEADLINE, tokio::process::Command::new(program).args(args).output())
        .await
        .expect("the tool ends")
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn job(client: &ApiClient, id: &str) -> Value {
    let answer = client.raw(Method::GET, &format!("/v1/jobs/{id}"), None).await.unwrap();
    assert!(answer.status.is_success(), "{}", answer.text);
    answer.body
}

/// Poll the job until `check` holds.
async fn job_until(client: &ApiClient, id: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let job = job(client, id).await;
        if check(&job) {
            return job;
        }
        assert!(started.elapsed() < DEADLINE, "never {what}: {job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the first `name{labels...}` sample containing `label`.
fn sample(metrics: &str, name: &str, label: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(label))
        .find_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_exports_its_volume_during_and_after_the_restore_until_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let volume = SampleVolume { size_bytes: BLOCKS * BLOCK + 1000, block_size_bytes: BLOCK as u32, seed: 8 };
    let source = dir.path().join("source.img");
    let (_, server) =
        slow_loopback(&dir.path().join("s3"), &source, &volume, (BUCKET, PREFIX, NAME), Duration::from_millis(80))
            .await;
    let roots = dir.path().join("targets");
    std::fs::create_dir_all(&roots).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nbd_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "{slow}\n[worker]\nlisten = \"127.0.0.1:{port}\"\ntarget_roots = [{roots:?}]\ntarget_free_bytes_min = 0\n\
         export_listen = \"127.0.0.1:{nbd_port}-{last}\"\n[worker.profiles.main]\nstore = \"s3://{BUCKET}/{PREFIX}\"\n",
        slow = slow_s3_toml(&dir.path().join("state"), 8 * BLOCK, 2),
        roots = roots.display().to_string(),
        last = nbd_port + 3,
    );
    let config_path = dir.path().join("worker.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut command = std::process::Command::new(common::binary());
    command.args(["serve", "--config"]).arg(&config_path).loopback_env(&server.endpoint_url(), dir.path());
    command.env("REHYDRATE_LOG", "info").stderr(log);
    let mut child = tokio::process::Command::from(command).kill_on_drop(true).spawn().unwrap();
    let client = ApiClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
    let started = Instant::now();
    while !client.raw(Method::GET, "/readyz", None).await.is_ok_and(|a| a.status.is_success()) {
        assert!(started.elapsed() < DEADLINE, "the worker never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Outside the range, or without a range: refused, naming the field.
    let spec = |id: &str, export: Value| {
        let target = roots.join(format!("{id}.img"));
        serde_json::to_vec(&json!({"id": id, "profile": "main", "manifest": format!("{NAME}.manifest"),
            "target": target, "export": export}))
        .unwrap()
    };
    let outside = format!("nbd://127.0.0.1:{}/x", nbd_port + 4);
    let refused = client.raw(Method::POST, "/v1/jobs", Some(spec("outside", json!(outside)))).await.unwrap();
    assert_eq!(refused.status.as_u16(), 422, "{}", refused.text);
    assert_eq!(refused.body["field"], json!("export"));
    assert!(refused.text.contains("outside worker.export_listen"), "{}", refused.text);

    let submitted = client.raw(Method::POST, "/v1/jobs", Some(spec("db", json!(true)))).await.unwrap();
    assert_eq!(submitted.status.as_u16(), 201, "{}", submitted.text);
    let serving = job_until(&client, "db", "serving", |j| j["export"]["state"] == json!("serving")).await;
    let url = serving["export"]["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("nbd://127.0.0.1:{nbd_port}/db"), "the first port of the range, named for the job");
    assert_eq!(serving["state"], json!("running"), "served while the restore runs: {serving:#}");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{nbd_port}").parse().unwrap();
    let expected = std::fs::read(&source).unwrap();

    // During the restore: a read far ahead, a whole-block write and FLUSH.
    let (mut c, size) = Client::go(addr, "db").await;
    assert_eq!(size, volume.size_bytes);
    let far = (BLOCKS - 5) * BLOCK;
    assert!(c.read(far, 4096).await.unwrap() == expected[far as usize..far as usize + 4096]);
    let written = vec![0x5a; BLOCK as usize];
    assert_eq!(c.write(BLOCKS / 2 * BLOCK, &written).await, 0);
    assert_eq!(c.flush().await, 0);
    let mut expected = expected;
    expected[(BLOCKS / 2 * BLOCK) as usize..((BLOCKS / 2 + 1) * BLOCK) as usize].copy_from_slice(&written);

    let nbd_tools = (common::installed_tool("nbdinfo"), common::installed_tool("nbdcopy"));
    if let (Some(nbdinfo), Some(nbdcopy)) = &nbd_tools {
        let (ok, info) = run(nbdinfo, &["--json", &url]).await;
        assert!(ok && info.contains(&format!("\"export-size\": {}", volume.size_bytes)), "{info}");
        let copy = dir.path().join("copy.img");
        let (ok, out) = run(nbdcopy, &[&url, &copy.display().to_string()]).await;
        assert!(ok, "{out}");
        assert!(std::fs::read(&copy).unwrap() == expected, "nbdcopy reads the volume, the write included");
    }

    // The restore ends; the export stays up.
    let done = job_until(&client, "db", "succeeded", |j| j["state"] == json!("succeeded")).await;
    assert_eq!(done["export"]["state"], json!("serving"), "{done:#}");
    let export = &done["export"];
    assert!(export["reads"].as_u64().unwrap() >= 1, "{export:#}");
    assert!(export["writes"].as_u64().unwrap() >= 1 && export["blocks_owned"] == json!(1), "{export:#}");
    assert!(export["demand_fetches"].as_u64().unwrap() >= 1, "{export:#}");
    assert_eq!(export["demand_failures"], json!(0));
    let on_demand = &export["read_latency_on_demand"];
    assert!(on_demand["count"].as_u64().unwrap() >= 1, "{export:#}");
    assert!(on_demand["p99_millis"].as_f64().unwrap() >= on_demand["p50_millis"].as_f64().unwrap());
    assert!(on_demand["p50_millis"].as_f64().unwrap() > 0.0);
    let (mut c, _) = Client::go(addr, "db").await;
    assert!(c.read(0, (4 * BLOCK) as u32).await.unwrap() == expected[..(4 * BLOCK) as usize], "served after");
    assert!(std::fs::read(roots.join("db.img")).unwrap() == expected, "the target: the snapshot and the write");

    // The metrics of the session.
    let metrics = client.raw(Method::GET, "/metrics", None).await.unwrap().text;
    assert!(sample(&metrics, "rehydrate_nbd_reads_total", "").unwrap() >= 2.0, "{metrics}");
    assert!(sample(&metrics, "rehydrate_nbd_writes_total", "").unwrap() >= 1.0);
    assert!(sample(&metrics, "rehydrate_nbd_flushes_total", "").unwrap() >= 1.0);
    assert!(sample(&metrics, "rehydrate_nbd_demand_fetches_total", "").unwrap() >= 1.0);
    assert_eq!(sample(&metrics, "rehydrate_nbd_owned_blocks_total", ""), Some(1.0));
    let on_demand_count = sample(&metrics, "rehydrate_nbd_read_latency_seconds_count", "served=\"on_demand\"");
    assert!(on_demand_count.unwrap() >= 1.0, "{metrics}");
    let local_count = sample(&metrics, "rehydrate_nbd_read_latency_seconds_count", "served=\"local\"");
    assert!(local_count.unwrap() >= 1.0, "{metrics}");
    let on_demand_sum = sample(&metrics, "rehydrate_nbd_read_latency_seconds_sum", "served=\"on_demand\"").unwrap();
    assert!(on_demand_sum > 0.0 && on_demand_sum < 600.0, "sane latency: {on_demand_sum} s");

    // Stop it: the job keeps its state, the export is gone, its count kept.
    let stopped = client.raw(Method::POST, "/v1/jobs/db/export/stop", None).await.unwrap();
    assert_eq!(stopped.status.as_u16(), 200, "{}", stopped.text);
    let gone = job_until(&client, "db", "stopped", |j| j["export"]["state"] == json!("stopped")).await;
    assert_eq!(gone["state"], json!("succeeded"));
    assert!(gone["export"]["reads"].as_u64().unwrap() >= 2, "{gone:#}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "nothing listens any more");
    let again = client.raw(Method::POST, "/v1/jobs/db/export/stop", None).await.unwrap();
    assert_eq!(again.status.as_u16(), 409, "{}", again.text);
    assert!(again.text.contains("no-export"), "{}", again.text);
    let missing = client.raw(Method::POST, "/v1/jobs/nope/export/stop", None).await.unwrap();
    assert_eq!(missing.status.as_u16(), 404);

    // A second export job takes the freed port; cancelling it stops it.
    let resubmitted = client.raw(Method::POST, "/v1/jobs", Some(spec("db2", json!(url.replace("/db", "/db2"))))).await;
    assert_eq!(resubmitted.unwrap().status.as_u16(), 201);
    job_until(&client, "db2", "serving", |j| j["export"]["state"] == json!("serving")).await;
    job_until(&client, "db2", "succeeded", |j| j["state"] == json!("succeeded")).await;
    let cancelled = client.raw(Method::POST, "/v1/jobs/db2/cancel", None).await.unwrap();
    assert_eq!(cancelled.status.as_u16(), 200, "cancelling an ended job's export: {}", cancelled.text);
    let ended = job_until(&client, "db2", "stopped", |j| j["export"]["state"] == json!("stopped")).await;
    assert_eq!(ended["state"], json!("succeeded"));

    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert_eq!(status.code(), Some(0));
}
