//! The worker through its real HTTP API on 127.0.0.1:0 and the real client:
//! submit and poll, idempotency, busy targets and replacement, cancel and
//! resume, hostile specs, tokens, metrics, restart. Every restore ends with a
//! read-back of the target; replacement and resume check the ledger the
//! finishing job reports (every block settled, the earlier run's work resumed).
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use rehydrate::api::Tokens;
use rehydrate::api::client::{Answer, ApiClient};
use rehydrate::block::{Compression, HashAlgorithm, block_key};
use rehydrate::config::{Config, ProfileConfig};
use rehydrate::manifest::Manifest;
use rehydrate::restore::Engine;
use rehydrate::sample::SampleVolume;
use rehydrate::store::StoreUrl;
use rehydrate::store::file::FileStore;
use rehydrate::worker::{JobSpec, Worker};
use rehydrate::write::BackendChoice;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Generous: polls end as soon as the condition holds.
const DEADLINE: Duration = Duration::from_secs(60);
const BLOCKS: u64 = 37;

/// A snapshot in a file store, a target root and a state directory.
struct Fixture {
    dir: tempfile::TempDir,
    volume: SampleVolume,
    manifest: Manifest,
    manifest_key: String,
}

impl Fixture {
    async fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let volume = volume(BLOCKS, seed);
        let url = snapshot(dir.path(), &volume, Compression::None, HashAlgorithm::Blake3).await;
        let manifest = load_manifest(&url);
        std::fs::create_dir_all(dir.path().join("targets")).unwrap();
        Self { dir, volume, manifest, manifest_key: format!("vol-{seed}.manifest") }
    }

    fn roots(&self) -> PathBuf {
        self.dir.path().join("targets")
    }

    fn target(&self, name: &str) -> PathBuf {
        self.roots().join(name)
    }

    fn config(&self) -> Config {
        let mut c = config(BackendChoice::Pwrite, &self.dir.path().join("state"));
        c.checkpoint.interval_millis = std::num::NonZeroU64::new(20).unwrap();
        // A gated block waits; it must not time out meanwhile.
        c.fetch.attempt_timeout_millis = std::num::NonZeroU64::new(120_000).unwrap();
        c.fetch.source_elapsed_max_millis = std::num::NonZeroU64::new(120_000).unwrap();
        c.worker.target_roots = vec![self.roots()];
        c.worker.target_free_bytes_min = 0;
        c.worker.gate_backoff_millis = std::num::NonZeroU64::new(20).unwrap();
        c.worker.gate_backoff_max_millis = std::num::NonZeroU64::new(200).unwrap();
        let store = format!("file://{}", store_root(self.dir.path()).display());
        c.worker.profiles.insert("main".into(), ProfileConfig { store, secondaries: vec![], peers: vec![] });
        c
    }

    /// The object of block 16 (no duplicates, not zero).
    fn gated_key(&self) -> String {
        let e = self.manifest.entry(16).expect("block 16 holds data");
        block_key(&e.hash, e.compression)
    }

    /// An engine whose store holds back the gated block until opened.
    fn gated_engine(&self, config: Config) -> (Engine, tokio::sync::watch::Sender<bool>) {
        let engine = Engine::new(config);
        let (open, _) = tokio::sync::watch::channel(false);
        let root = store_root(self.dir.path());
        let gate =
            GateStore { inner: Arc::new(FileStore::new(root.clone())), key: self.gated_key(), open: open.clone() };
        engine.register_store(StoreUrl::File { root }, Arc::new(gate));
        (engine, open)
    }

    fn spec(&self, id: &str, target: &Path) -> JobSpec {
        JobSpec {
            id: id.into(),
            profile: "main".into(),
            manifest: self.manifest_key.clone(),
            target: target.to_owned(),
            replace: false,
            restart: false,
            export: Default::default(),
        }
    }

    fn check_target(&self, target: &Path) {
        check_identical(&self.manifest, &self.volume, target);
    }
}

struct Server {
    base: String,
    worker: Arc<Worker>,
    client: ApiClient,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(engine: Engine, tokens: Tokens, token: Option<&str>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let worker = Worker::start(Arc::new(engine)).unwrap();
    let stop = CancellationToken::new();
    let handle =
        tokio::spawn(rehydrate::api::serve(listener, Arc::clone(&worker), tokens, stop.clone().cancelled_owned()));
    let base = format!("http://{addr}");
    let client = ApiClient::new(&base, token.map(str::to_owned)).unwrap();
    Server { base, worker, client, stop, handle }
}

impl Server {
    /// Graceful stop: running jobs checkpoint and are stored as queued.
    async fn stop(self) {
        assert!(self.worker.shutdown(Duration::from_secs(30)).await, "runs did not stop");
        self.stop.cancel();
        drop(self.client);
        tokio::time::timeout(DEADLINE, self.handle).await.expect("server stops").unwrap().unwrap();
        // Connection tasks drop their router (and its worker handle) just
        // after the server returns; the job database closes with the last one.
        let start = Instant::now();
        while Arc::strong_count(&self.worker) > 1 {
            assert!(start.elapsed() < DEADLINE, "something still holds the worker");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn post(client: &ApiClient, body: Vec<u8>) -> Answer {
    client.raw(Method::POST, "/v1/jobs", Some(body)).await.unwrap()
}

async fn submit(client: &ApiClient, spec: &JobSpec) -> Answer {
    post(client, serde_json::to_vec(spec).unwrap()).await
}

/// Poll a job until `done` holds, within the deadline.
async fn wait_for(client: &ApiClient, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let job = client.get(id).await.unwrap().json();
        if done(&job) {
            return job;
        }
        assert!(start.elapsed() < DEADLINE, "job {id} never became {what}: {job:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state(job: &Value) -> &str {
    job["state"].as_str().unwrap_or("?")
}

fn is_problem(answer: &Answer, status: u16) {
    assert_eq!(answer.status.as_u16(), status, "{}", answer.text);
    assert_eq!(answer.content_type, "application/problem+json", "{}", answer.text);
    assert_eq!(answer.body["status"], json!(status), "{}", answer.text);
    assert!(answer.body["type"].as_str().is_some_and(|t| t.starts_with("urn:rehydrate:problem:")));
    assert!(answer.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

/// Every block is settled and the target reads back identical.
fn check_succeeded(f: &Fixture, job: &Value, target: &Path) {
    assert_eq!(state(job), "succeeded", "{job:#}");
    assert_eq!(job["blocks"]["total"], json!(f.manifest.layout.block_count()), "{job:#}");
    assert_eq!(job["blocks"]["settled"], job["blocks"]["total"], "{job:#}");
    assert_eq!(job["blocks"]["failed"], json!(0), "{job:#}");
    assert!(job["finished_unix_secs"].as_u64().is_some(), "{job:#}");
    f.check_target(target);
    let staging = rehydrate::target::staging_path(target).unwrap();
    assert!(!staging.exists(), "staging file left: {}", staging.display());
}

/// Every job of `states` through pages of `limit`, following `next`.
async fn list_all(client: &ApiClient, states: &[&str], limit: usize) -> (Vec<String>, usize) {
    let states: Vec<String> = states.iter().map(|s| s.to_string()).collect();
    let (mut ids, mut pages, mut after) = (Vec::new(), 0, None::<String>);
    loop {
        let page = client.list(&states, Some(limit), after.as_deref()).await.unwrap().json();
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= limit, "{page:#}");
        ids.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_owned()));
        pages += 1;
        assert!(pages <= 1000, "paging never ends: {page:#}");
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(jobs.len(), limit, "only a full page has a next: {page:#}");
                after = Some(next.to_owned());
            }
            None => return (ids, pages),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_list_pages_filters_and_refuses_bad_queries() {
    let f = Fixture::new(29).await;
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let ids: Vec<String> = (0..5).map(|n| format!("page-{n}")).collect();
    for id in &ids {
        let answer = submit(&server.client, &f.spec(id, &f.target(&format!("{id}.img")))).await;
        assert_eq!(answer.status.as_u16(), 201, "{}", answer.text);
    }
    for id in &ids {
        let job = wait_for(&server.client, id, "finished", |j| state(j) != "queued" && state(j) != "running").await;
        check_succeeded(&f, &job, &f.target(&format!("{id}.img")));
        let created = job["created_unix_secs"].as_u64().unwrap();
        let at = job["created_at"].as_str().unwrap();
        assert_eq!(at.len(), "2026-12-01T01:55:00Z".len(), "{job:#}");
        assert!(at.ends_with('Z') && at.as_bytes()[10] == b'T', "{job:#}");
        assert!(job["finished_at"].as_str().is_some(), "{job:#}");
        assert!(job["started_at"].as_str().unwrap() <= job["finished_at"].as_str().unwrap(), "{job:#}");
        // The same second (the calendar date itself is checked in the unit test).
        assert_eq!(
            at[11..19],
            format!("{:02}:{:02}:{:02}", created % 86_400 / 3600, created % 3600 / 60, created % 60)
        );
    }
    // Oldest first (submission order here), each once, whatever the page size.
    for limit in [1, 2, 5, 100] {
        let (listed, pages) = list_all(&server.client, &[], limit).await;
        assert_eq!(listed, ids, "limit {limit}");
        assert_eq!(pages, ids.len().div_ceil(limit), "limit {limit}");
    }
    // A failed job, to filter on.
    let bad = JobSpec { manifest: "no-such.manifest".into(), ..f.spec("page-bad", &f.target("bad.img")) };
    assert_eq!(submit(&server.client, &bad).await.status.as_u16(), 201);
    wait_for(&server.client, "page-bad", "failed", |j| state(j) == "failed").await;
    assert_eq!(list_all(&server.client, &["failed"], 2).await.0, vec!["page-bad".to_owned()]);
    assert_eq!(list_all(&server.client, &["succeeded"], 2).await.0, ids);
    assert_eq!(list_all(&server.client, &["failed", "succeeded"], 4).await.0.len(), 6);
    assert!(list_all(&server.client, &["running", "queued"], 3).await.0.is_empty());
    // A cursor stays valid on its own: it names a position, not a record.
    let page = server.client.list(&[], Some(2), None).await.unwrap().json();
    let next = page["next"].as_str().unwrap();
    let cursor_secs = next.split_once('-').unwrap().0;
    let later = server.client.list(&[], None, Some(&format!("{cursor_secs}-page-1~"))).await.unwrap().json();
    assert_eq!(later["jobs"][0]["id"], json!("page-2"), "{later:#}");
    for query in
        ["state=done", "limit=0", "limit=1001", "limit=ten", "after=page-2", "after=12", "sort=id", "state=running&x=1"]
    {
        let answer = server.client.raw(Method::GET, &format!("/v1/jobs?{query}"), None).await.unwrap();
        is_problem(&answer, 400);
        assert!(answer.body["type"].as_str().unwrap().ends_with("bad-query"), "{query}: {}", answer.text);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_poll_and_idempotent_resubmission() {
    let f = Fixture::new(21).await;
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let target = f.target("a.img");
    let spec = f.spec("job-a", &target);
    let first = submit(&server.client, &spec).await;
    assert_eq!(first.status.as_u16(), 201, "{}", first.text);
    assert_eq!(first.body["id"], json!("job-a"));
    let again = submit(&server.client, &spec).await;
    assert_eq!(again.status.as_u16(), 200, "{}", again.text);
    let job = wait_for(&server.client, "job-a", "finished", |j| state(j) != "queued" && state(j) != "running").await;
    check_succeeded(&f, &job, &target);
    assert_eq!(job["run"], json!(1), "one job, one run: {job:#}");
    assert!(job["throughput_bytes_per_sec"].as_f64().unwrap() > 0.0);
    let served = f.manifest.entries().iter().map(|e| e.hash).collect::<std::collections::HashSet<_>>().len();
    assert_eq!(job["sources"]["primary"], json!(served), "every distinct object once, from the primary: {job:#}");
    // The same spec once more: the same finished job, not a new run.
    let after = submit(&server.client, &spec).await;
    assert_eq!(after.status.as_u16(), 200);
    assert_eq!((after.body["state"].clone(), after.body["run"].clone()), (json!("succeeded"), json!(1)));
    // The same id with another spec is a conflict.
    let other = f.spec("job-a", &f.target("b.img"));
    is_problem(&submit(&server.client, &other).await, 409);
    let list = server.client.list(&[], None, None).await.unwrap().json();
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    is_problem(&server.client.raw(Method::GET, "/v1/jobs/nope", None).await.unwrap(), 404);
    is_problem(&server.client.raw(Method::DELETE, "/v1/jobs", None).await.unwrap(), 405);
    is_problem(&server.client.raw(Method::GET, "/v2/jobs", None).await.unwrap(), 404);
    is_problem(&server.client.raw(Method::POST, "/v1/jobs/job-a/cancel", None).await.unwrap(), 409);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_target_is_refused_and_replacement_adopts_the_work() {
    let f = Fixture::new(22).await;
    let (engine, gate) = f.gated_engine(f.config());
    let server = start(engine, Tokens::default(), None).await;
    let total = f.manifest.layout.block_count();
    let target = f.target("shared.img");
    assert_eq!(submit(&server.client, &f.spec("old", &target)).await.status.as_u16(), 201);
    // Everything but the gated block settles; the job keeps running.
    wait_for(&server.client, "old", "settled but one block", |j| {
        state(j) == "running" && j["blocks"]["settled"] == json!(total - 1)
    })
    .await;

    let busy = submit(&server.client, &f.spec("new", &target)).await;
    is_problem(&busy, 409);
    assert_eq!(busy.body["holder"], json!("old"));

    let mut replace = f.spec("new", &target);
    replace.replace = true;
    assert_eq!(submit(&server.client, &replace).await.status.as_u16(), 201);
    let old = server.client.get("old").await.unwrap().json();
    assert_eq!(state(&old), "cancelled", "{old:#}");
    assert!(old["reason"].as_str().unwrap().contains("replaced by job new"), "{old:#}");

    gate.send_replace(true);
    let new = wait_for(&server.client, "new", "finished", |j| state(j) == "succeeded" || state(j) == "failed").await;
    check_succeeded(&f, &new, &target);
    // The replacement's ledger covers every block, and it took over every
    // block the replaced job had settled.
    assert_eq!(new["blocks"]["resumed"], json!(total - 1), "{new:#}");
    let old = server.client.get("old").await.unwrap().json();
    assert_eq!(state(&old), "cancelled", "the replaced run set a status: {old:#}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_then_resubmit_resumes() {
    let f = Fixture::new(23).await;
    let mut config = f.config();
    config.fetch.stall_after_millis = std::num::NonZeroU64::new(200).unwrap();
    let (engine, gate) = f.gated_engine(config);
    let server = start(engine, Tokens::default(), None).await;
    let total = f.manifest.layout.block_count();
    let target = f.target("c.img");
    let spec = f.spec("job-c", &target);
    assert_eq!(submit(&server.client, &spec).await.status.as_u16(), 201);
    wait_for(&server.client, "job-c", "settled but one block", |j| j["blocks"]["settled"] == json!(total - 1)).await;
    // Nothing settles while block 16 is held: the job is flagged stalled and
    // the reason names that block.
    let stalled = wait_for(&server.client, "job-c", "stalled", |j| j["stalled"] == json!(true)).await;
    assert_eq!(state(&stalled), "running");
    let reason = stalled["stalled_reason"].as_str().unwrap();
    assert!(reason.contains("oldest block in flight: 16"), "{reason}");
    assert!(stalled.get("eta_secs").is_some() && stalled["bytes"]["total"].as_u64() > Some(0), "{stalled:#}");
    let cancelled = server.client.cancel("job-c").await.unwrap().json();
    assert_eq!(state(&cancelled), "cancelled", "{cancelled:#}");
    assert!(!target.exists(), "a cancelled restore was swapped into place");
    is_problem(&server.client.raw(Method::POST, "/v1/jobs/job-c/cancel", None).await.unwrap(), 409);

    gate.send_replace(true);
    let again = submit(&server.client, &spec).await;
    assert_eq!(again.status.as_u16(), 200, "{}", again.text);
    let job = wait_for(&server.client, "job-c", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &target);
    assert_eq!(job["run"], json!(2), "{job:#}");
    assert_eq!(job["blocks"]["resumed"], json!(total - 1), "the resumed run redid settled work: {job:#}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_specs_get_problems_and_write_nothing() {
    let f = Fixture::new(24).await;
    let outside = f.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, f.roots().join("escape")).unwrap();
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let root = f.roots().display().to_string();
    let good = json!({ "id": "h", "profile": "main", "manifest": f.manifest_key, "target": format!("{root}/x.img") });
    let with = |key: &str, value: Value| {
        let mut spec = good.clone();
        spec[key] = value;
        serde_json::to_vec(&spec).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("dotdot target", with("target", json!(format!("{root}/../outside/x.img"))), 422),
        ("dotdot manifest", with("manifest", json!("../other/vol.manifest")), 422),
        ("absolute manifest", with("manifest", json!("/etc/vol.manifest")), 422),
        ("outside roots", with("target", json!(outside.join("x.img"))), 422),
        ("symlink escape", with("target", json!(format!("{root}/escape/x.img"))), 422),
        ("NUL", with("target", json!(format!("{root}/x\u{0}.img"))), 422),
        ("unknown field", with("credentials", json!("AKIA...")), 422),
        ("unknown profile", with("profile", json!("other")), 422),
        ("bad id", with("id", json!("a/b")), 422),
        ("missing field", serde_json::to_vec(&json!({ "id": "h" })).unwrap(), 422),
        ("not JSON", b"{ nope".to_vec(), 400),
        ("huge body", with("manifest", json!("a".repeat(100 << 10))), 413),
    ];
    for (name, body, status) in cases {
        let answer = post(&server.client, body).await;
        assert_eq!(answer.status.as_u16(), status, "{name}: {}", answer.text);
        is_problem(&answer, status);
    }
    assert_eq!(server.client.list(&[], None, None).await.unwrap().json()["jobs"], json!([]));
    let written = |dir: &Path| std::fs::read_dir(dir).unwrap().count();
    assert_eq!(written(&outside), 0, "something was written outside the roots");
    assert_eq!(written(&f.roots()), 1, "only the symlink the test made");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_enforced_when_configured() {
    let f = Fixture::new(25).await;
    let tokens = Tokens::from_list(&["old-token-0123456789", "new-token-0123456789"]).unwrap();
    let server = start(Engine::new(f.config()), tokens.clone(), None).await;
    is_problem(&server.client.raw(Method::GET, "/v1/jobs", None).await.unwrap(), 401);
    let spec = serde_json::to_vec(&f.spec("t", &f.target("t.img"))).unwrap();
    is_problem(&post(&server.client, spec).await, 401);
    // Health and metrics stay open; both tokens work.
    assert_eq!(server.client.raw(Method::GET, "/healthz", None).await.unwrap().status.as_u16(), 200);
    let base = server.base.clone();
    for token in ["old-token-0123456789", "new-token-0123456789"] {
        let client = ApiClient::new(&base, Some(token.into())).unwrap();
        assert_eq!(client.list(&[], None, None).await.unwrap().json()["jobs"], json!([]));
    }
    let wrong = ApiClient::new(&base, Some("new-token-012345678X".into())).unwrap();
    is_problem(&wrong.raw(Method::GET, "/v1/jobs", None).await.unwrap(), 401);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_a_public_listener_without_tokens() {
    let f = Fixture::new(26).await;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let worker = Worker::start(Arc::new(Engine::new(f.config()))).unwrap();
    let err = rehydrate::api::serve(listener, Arc::clone(&worker), Tokens::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("without bearer tokens"), "{err}");
    worker.shutdown(Duration::from_secs(5)).await;
}

/// Read from `stream` until the server closes it (EOF or reset), within the
/// deadline; returns how long that took.
async fn closed_by_server(stream: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept a silent connection open for {DEADLINE:?}"),
            Ok(Ok(0) | Err(_)) => return start.elapsed(),
            // A 408 or similar before closing is fine; keep reading to EOF.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_or_trickling_client_is_disconnected_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::new(40).await;
    let mut config = f.config();
    let timeout = Duration::from_millis(300);
    config.worker.header_read_timeout_millis = std::num::NonZeroU64::new(300).unwrap();
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let addr = server.base.trim_start_matches("http://").to_owned();

    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let took = closed_by_server(&mut silent).await;
    // A bound, not a speed claim: well under the 10 s default, so it is the
    // configured timeout that closed it, and not before it.
    assert!(took >= timeout - Duration::from_millis(50), "closed before the timeout: {took:?}");
    assert!(took < Duration::from_secs(5), "closed long after the timeout: {took:?}");
    println!("a silent connection was closed after {took:?} (timeout {timeout:?})");

    let mut trickling = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickling.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    closed_by_server(&mut trickling).await;

    // A client that sends its request is served as before.
    assert_eq!(server.client.raw(Method::GET, "/healthz", None).await.unwrap().status.as_u16(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_body_gets_408_after_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::new(43).await;
    let mut config = f.config();
    config.worker.request_timeout_millis = std::num::NonZeroU64::new(300).unwrap();
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head =
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a withheld body held the request for {DEADLINE:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(server.worker.get("x").unwrap().is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_slot() {
    let f = Fixture::new(41).await;
    let mut config = f.config();
    config.worker.connections_max = std::num::NonZeroUsize::new(1).unwrap();
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let addr = server.base.trim_start_matches("http://").to_owned();

    // One silent connection holds the only slot.
    let holder = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = ApiClient::new(&server.base, None).unwrap();
    let mut waiting = tokio::spawn(async move { client.raw(Method::GET, "/healthz", None).await });
    // Not served while the slot is held (if the cap did not hold, it would
    // be answered at once and this fails).
    assert!(tokio::time::timeout(Duration::from_millis(500), &mut waiting).await.is_err(), "served beyond the cap");
    drop(holder);
    let answer = tokio::time::timeout(DEADLINE, waiting).await.expect("served once the slot is free").unwrap().unwrap();
    assert_eq!(answer.status.as_u16(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    let f = Fixture::new(27).await;
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let target = f.target("m.img");
    submit(&server.client, &f.spec("m", &target)).await;
    let job = wait_for(&server.client, "m", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &target);
    let answer = server.client.raw(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(answer.status.as_u16(), 200);
    assert!(answer.content_type.starts_with("text/plain"), "{}", answer.content_type);
    let mut names = std::collections::BTreeSet::new();
    for line in answer.text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        names.insert(parse_sample(line).unwrap_or_else(|| panic!("not a Prometheus sample: {line:?}")));
    }
    assert!(names.contains("rehydrate_settled_blocks_total"), "{names:?}");
    assert!(answer.text.contains("rehydrate_jobs{state=\"succeeded\"}"), "{}", answer.text);
    assert!(answer.text.contains("# HELP rehydrate_settled_blocks_total"), "help texts are registered");
    assert_eq!(server.client.raw(Method::GET, "/readyz", None).await.unwrap().status.as_u16(), 200);
    server.stop().await;
}

/// `name{labels} value`: the metric name, if the line is one sample.
fn parse_sample(line: &str) -> Option<String> {
    let (series, value) = line.rsplit_once(' ')?;
    value.parse::<f64>().ok().or_else(|| ["+Inf", "-Inf", "NaN"].contains(&value).then_some(0.0))?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, Some(rest.strip_suffix('}')?)),
        None => (series, None),
    };
    let valid_name = |n: &str| {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    if !valid_name(name) {
        return None;
    }
    if let Some(labels) = labels {
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once("=\"")?;
            if !valid_name(key) || value.trim_end_matches('"').contains('"') {
                return None;
            }
        }
    }
    Some(name.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_resumes_unfinished_jobs() {
    let f = Fixture::new(28).await;
    let total = f.manifest.layout.block_count();
    let target = f.target("r.img");
    let (engine, _closed) = f.gated_engine(f.config());
    let server = start(engine, Tokens::default(), None).await;
    assert_eq!(submit(&server.client, &f.spec("r", &target)).await.status.as_u16(), 201);
    wait_for(&server.client, "r", "settled but one block", |j| j["blocks"]["settled"] == json!(total - 1)).await;
    // While it runs, the job has its own series: progress, elapsed, and the
    // estimate left at its throughput (it has written bytes).
    let scrape = server.client.raw(Method::GET, "/metrics", None).await.unwrap().text;
    for name in ["rehydrate_job_progress_ratio", "rehydrate_job_elapsed_seconds", "rehydrate_job_eta_seconds"] {
        let line = scrape
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{job=\"r\"}} ")))
            .unwrap_or_else(|| panic!("no {name} for job r"));
        assert!(parse_sample(line).is_some(), "{line}");
    }

    // SIGTERM's path: stop taking jobs, checkpoint, store the job as queued.
    assert!(server.worker.shutdown(Duration::from_secs(30)).await);
    is_problem(&server.client.raw(Method::GET, "/readyz", None).await.unwrap(), 503);
    is_problem(&submit(&server.client, &f.spec("late", &f.target("late.img"))).await, 503);
    let job = server.client.get("r").await.unwrap().json();
    assert_eq!(state(&job), "queued", "a job stopped by shutdown is resumed, not cancelled: {job:#}");
    server.stop().await;

    // A new worker on the same state directory, its store serving everything.
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let job = wait_for(&server.client, "r", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &target);
    assert_eq!(job["blocks"]["resumed"], json!(total - 1), "the restart redid settled work: {job:#}");
    assert_eq!(job["run"], json!(2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_jobs_complete_byte_identical() {
    let f = Fixture::new(29).await;
    let mut config = f.config();
    config.worker.jobs_running_max = std::num::NonZeroUsize::new(4).unwrap();
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let targets: Vec<PathBuf> = (0..10).map(|i| f.target(&format!("many-{i}.img"))).collect();
    for (i, target) in targets.iter().enumerate() {
        let answer = submit(&server.client, &f.spec(&format!("many-{i}"), target)).await;
        assert_eq!(answer.status.as_u16(), 201, "{}", answer.text);
    }
    for (i, target) in targets.iter().enumerate() {
        let job = wait_for(&server.client, &format!("many-{i}"), "succeeded", |j| state(j) == "succeeded").await;
        check_succeeded(&f, &job, target);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_can_never_fit_fails_at_once() {
    let f = Fixture::new(30).await;
    let (_, total) = rehydrate::worker::filesystem_bytes(&f.roots()).unwrap();
    let block = 64u32 << 20;
    let blocks = total / u64::from(block) + 16;
    let layout = rehydrate::block::BlockLayout::new(blocks * u64::from(block), block).unwrap();
    let mut builder =
        rehydrate::manifest::ManifestBuilder::new("huge", layout, HashAlgorithm::Blake3, Compression::None).unwrap();
    for index in 0..blocks {
        let hash = rehydrate::block::ContentHash(*blake3::hash(&index.to_le_bytes()).as_bytes());
        let entry =
            rehydrate::manifest::BlockEntry { index, hash, stored_len_bytes: block, compression: Compression::None };
        builder.push(entry).unwrap();
    }
    std::fs::write(store_root(f.dir.path()).join("huge.manifest"), builder.finish().encode()).unwrap();
    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    let target = f.target("huge.img");
    let mut spec = f.spec("huge", &target);
    spec.manifest = "huge.manifest".into();
    assert_eq!(submit(&server.client, &spec).await.status.as_u16(), 201);
    let job = wait_for(&server.client, "huge", "failed", |j| state(j) == "failed").await;
    assert!(job["reason"].as_str().unwrap().contains("whole size"), "{job:#}");
    assert_eq!(job["run"], json!(0), "it never started: {job:#}");
    assert_eq!(std::fs::read_dir(f.roots()).unwrap().count(), 0, "nothing written");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_by_free_space_does_not_block_the_jobs_behind_it() {
    let f = Fixture::new(31).await;
    // Two target roots on two filesystems (tmpfs and the disk); the floor sits
    // between their free space, so one of them cannot take any job.
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("skipped: no /dev/shm to put a second filesystem's root on");
        return;
    };
    let (free_disk, _) = rehydrate::worker::filesystem_bytes(&f.roots()).unwrap();
    let (free_shm, _) = rehydrate::worker::filesystem_bytes(shm.path()).unwrap();
    let (small, large) =
        if free_shm < free_disk { (shm.path().to_owned(), f.roots()) } else { (f.roots(), shm.path().to_owned()) };
    if free_shm.abs_diff(free_disk) < 1 << 30 {
        eprintln!("skipped: /dev/shm and the disk have about the same free space");
        return;
    }
    let mut config = f.config();
    config.worker.target_roots = vec![f.roots(), shm.path().to_owned()];
    config.worker.target_free_bytes_min = free_shm.min(free_disk) + free_shm.abs_diff(free_disk) / 2;
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let held_target = small.join("held.img");
    let free_target = large.join("free.img");
    assert_eq!(submit(&server.client, &f.spec("held", &held_target)).await.status.as_u16(), 201);
    assert_eq!(submit(&server.client, &f.spec("behind", &free_target)).await.status.as_u16(), 201);
    let job = wait_for(&server.client, "behind", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &free_target);
    let held = wait_for(&server.client, "held", "held", |j| j["held_by"].is_string()).await;
    assert_eq!(state(&held), "queued", "{held:#}");
    assert!(held["held_by"].as_str().unwrap().contains("free space"), "{held:#}");
    assert!(!held_target.exists());
    assert_eq!(state(&server.client.cancel("held").await.unwrap().json()), "cancelled");
    server.stop().await;
}

/// Run `rehydrate job …` against `server`: exit code and stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_sweeps_staging_files_no_checkpoint_owns() {
    let f = Fixture::new(42).await;
    let total = f.manifest.layout.block_count();
    let target = f.target("owned.img");
    let (engine, _closed) = f.gated_engine(f.config());
    let server = start(engine, Tokens::default(), None).await;
    assert_eq!(submit(&server.client, &f.spec("owned", &target)).await.status.as_u16(), 201);
    wait_for(&server.client, "owned", "settled but one block", |j| j["blocks"]["settled"] == json!(total - 1)).await;
    server.stop().await;
    let owned = rehydrate::target::staging_path(&target).unwrap();
    assert!(owned.exists(), "a stopped job keeps its staging file");

    // Leaked by crashes that left no checkpoint: at the root and deeper.
    std::fs::create_dir_all(f.roots().join("sub/deeper")).unwrap();
    let orphans = [
        rehydrate::target::staging_path(&f.target("crashed.img")).unwrap(),
        rehydrate::target::staging_path(&f.roots().join("sub/deeper/other.img")).unwrap(),
    ];
    for orphan in &orphans {
        std::fs::write(orphan, b"partial").unwrap();
    }
    let unrelated = f.roots().join("sub/keep.img");
    std::fs::write(&unrelated, b"not a staging file").unwrap();

    let server = start(Engine::new(f.config()), Tokens::default(), None).await;
    for orphan in &orphans {
        assert!(!orphan.exists(), "not swept: {}", orphan.display());
    }
    assert!(unrelated.exists(), "the sweep removed a file that is not a staging file");
    let job = wait_for(&server.client, "owned", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &target);
    assert_eq!(job["blocks"]["resumed"], json!(total - 1), "the owned staging file was kept and resumed: {job:#}");
    server.stop().await;
}

async fn job_cli(server: &str, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rehydrate"))
        .arg("job")
        .args(args)
        .args(["--server", server, "--json"])
        .env("REHYDRATE_LOG", "error")
        .output()
        .await
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_jobs_and_stops_on_sigterm() {
    let f = Fixture::new(32).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config_path = f.dir.path().join("worker.toml");
    let config = format!(
        "[checkpoint]\ndir = {state:?}\n[worker]\nlisten = \"127.0.0.1:{port}\"\ntarget_roots = [{roots:?}]\n\
         target_free_bytes_min = 0\nshutdown_grace_millis = 10000\nlog_format = \"json\"\n\
         [worker.profiles.main]\nstore = \"file://{store}\"\n",
        state = f.dir.path().join("state").display().to_string(),
        roots = f.roots().display().to_string(),
        store = store_root(f.dir.path()).display(),
    );
    std::fs::write(&config_path, config).unwrap();
    let stderr = std::fs::File::create(f.dir.path().join("serve.log")).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rehydrate"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("REHYDRATE_LOG", "info")
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let server = format!("http://127.0.0.1:{port}");
    let client = ApiClient::new(&server, None).unwrap();
    let start = Instant::now();
    while !client.raw(Method::GET, "/readyz", None).await.is_ok_and(|a| a.status.is_success()) {
        assert!(start.elapsed() < DEADLINE, "the worker never became ready");
        assert!(child.try_wait().unwrap().is_none(), "the worker exited at startup");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let target = f.target("cli.img");
    let target_arg = target.display().to_string();
    let submit_args =
        ["submit", "--id", "cli", "--profile", "main", "--manifest", &f.manifest_key, "--target", &target_arg];
    let (code, out) = job_cli(&server, &submit_args).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["id"], json!("cli"));
    let start = Instant::now();
    loop {
        let (code, out) = job_cli(&server, &["get", "cli"]).await;
        assert_eq!(code, 0, "{out}");
        let job: Value = serde_json::from_str(&out).unwrap();
        if state(&job) == "succeeded" {
            check_succeeded(&f, &job, &target);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "never succeeded: {job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out) = job_cli(&server, &["get", "nope"]).await;
    assert_eq!(code, 2, "a missing job is a usage error: {out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], json!(404));
    let (code, out) = job_cli(&server, &["list"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["jobs"][0]["id"], json!("cli"));
    let (code, out) = job_cli(&server, &["list", "--state", "failed,queued", "--limit", "5"]).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["jobs"], json!([]));
    let (code, out) = job_cli(&server, &["list", "--state", "done"]).await;
    assert_eq!(code, 2, "a bad state is a usage error: {out}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], json!(400));

    // SIGTERM: the process exits, successfully, within its grace period.
    let pid = child.id().unwrap() as libc::pid_t;
    // SAFETY: sending a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(f.dir.path().join("serve.log")).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_with_another_snapshot_restarts_the_target() {
    let f = Fixture::new(33).await;
    let other = volume(BLOCKS + 3, 34);
    snapshot(f.dir.path(), &other, Compression::None, HashAlgorithm::Blake3).await;
    let other_manifest = load_manifest(&format!("file://{}/vol-34.manifest", store_root(f.dir.path()).display()));
    let (engine, gate) = f.gated_engine(f.config());
    let server = start(engine, Tokens::default(), None).await;
    let target = f.target("swap.img");
    assert_eq!(submit(&server.client, &f.spec("first", &target)).await.status.as_u16(), 201);
    wait_for(&server.client, "first", "settled some", |j| j["blocks"]["settled"].as_u64() > Some(0)).await;
    let mut second = f.spec("second", &target);
    second.manifest = "vol-34.manifest".into();
    second.replace = true;
    assert_eq!(submit(&server.client, &second).await.status.as_u16(), 201);
    gate.send_replace(true);
    let job = wait_for(&server.client, "second", "finished", |j| state(j) == "succeeded" || state(j) == "failed").await;
    assert_eq!(state(&job), "succeeded", "{job:#}");
    assert_eq!(job["blocks"]["resumed"], json!(0), "another snapshot's progress was reused: {job:#}");
    check_identical(&other_manifest, &other, &target);
    assert_eq!(state(&server.client.get("first").await.unwrap().json()), "cancelled");
    server.stop().await;
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        if !status.success() {
            eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_starts_once_space_is_freed() {
    let f = Fixture::new(43).await;
    let Some(small) = Tmpfs::mount("8m") else { return };
    // Leave about 1 MiB free on the small filesystem: less than the job needs.
    let balloon = small.dir.path().join("balloon");
    std::fs::write(&balloon, vec![1u8; 7 << 20]).unwrap();
    let mut config = f.config();
    config.worker.target_roots = vec![f.roots(), small.dir.path().to_owned()];
    config.worker.gate_backoff_millis = std::num::NonZeroU64::new(20).unwrap();
    config.worker.gate_backoff_max_millis = std::num::NonZeroU64::new(100).unwrap();
    let server = start(Engine::new(config), Tokens::default(), None).await;
    let held_target = small.dir.path().join("held.img");
    let free_target = f.target("free.img");
    assert_eq!(submit(&server.client, &f.spec("held", &held_target)).await.status.as_u16(), 201);
    assert_eq!(submit(&server.client, &f.spec("behind", &free_target)).await.status.as_u16(), 201);
    // The job behind the held one runs and finishes while it waits.
    let job = wait_for(&server.client, "behind", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &free_target);
    let held = wait_for(&server.client, "held", "held", |j| j["held_by"].is_string()).await;
    assert_eq!(state(&held), "queued", "{held:#}");
    assert!(held["held_by"].as_str().unwrap().contains("free space"), "{held:#}");
    assert!(!held_target.exists(), "a held job wrote its target");
    // Space is freed: the held job starts and completes.
    std::fs::remove_file(&balloon).unwrap();
    let job = wait_for(&server.client, "held", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &held_target);
    server.stop().await;
}

/// Without preallocation (off, or a filesystem without `fallocate`) a
/// running restore's target is sparse until written: the gate counts what it
/// will still write, not the free space it has not taken yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_the_space_a_running_restore_will_still_write() {
    second_job_waits_for_the_space_of_the_first(false).await;
}

/// With preallocation the running restore has taken its room at its start:
/// the free space says so, and it will write nothing more than it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waits_for_the_space_a_running_restore_took() {
    second_job_waits_for_the_space_of_the_first(true).await;
}

async fn second_job_waits_for_the_space_of_the_first(preallocate: bool) {
    let f = Fixture::new(45).await;
    let needs = f.manifest.block_bytes_total();
    // Room for one restore of this snapshot and a half.
    let Some(small) = Tmpfs::mount(&format!("{}k", needs * 3 / 2 / 1024)) else { return };
    let mut config = f.config();
    config.worker.target_roots = vec![f.roots(), small.dir.path().to_owned()];
    config.write.preallocate = preallocate;
    // Every block waits until opened: the first restore runs, having
    // written nothing yet.
    let engine = Engine::new(config);
    let (open, _) = tokio::sync::watch::channel(false);
    let root = store_root(f.dir.path());
    let gate = GateStore { inner: Arc::new(FileStore::new(root.clone())), key: "blocks/".into(), open: open.clone() };
    engine.register_store(StoreUrl::File { root }, Arc::new(gate));
    let server = start(engine, Tokens::default(), None).await;
    let first = small.dir.path().join("first.img");
    let second = small.dir.path().join("second.img");
    assert_eq!(submit(&server.client, &f.spec("first", &first)).await.status.as_u16(), 201);
    wait_for(&server.client, "first", "running", |j| state(j) == "running").await;
    let (free, _) = rehydrate::worker::filesystem_bytes(small.dir.path()).unwrap();
    // Without preallocation the free space would hold the second one now,
    // but not once the first has written its blocks; with it, the first's
    // room is gone already.
    let still_write = if preallocate {
        assert!(free < needs, "the tmpfs has {free} bytes free: the first restore took no room ({needs})");
        0
    } else {
        assert!(free >= needs, "the tmpfs has {free} bytes free, less than one restore ({needs})");
        needs
    };
    assert_eq!(submit(&server.client, &f.spec("second", &second)).await.status.as_u16(), 201);
    let held = wait_for(&server.client, "second", "held", |j| j["held_by"].is_string()).await;
    assert_eq!(state(&held), "queued", "{held:#}");
    let reason = held["held_by"].as_str().unwrap();
    assert!(reason.contains(&format!("will still write {still_write} ")), "{held:#}");
    // The first finishes whole; the second still does not fit beside it.
    open.send_replace(true);
    let job = wait_for(&server.client, "first", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &first);
    let held = server.client.get("second").await.unwrap().json();
    assert_eq!(state(&held), "queued", "{held:#}");
    assert!(!second.exists(), "a held job wrote its target");
    // Its space freed (the finished restore's handles on it, kept to serve
    // peers, close once it is removed), the second starts and completes.
    std::fs::remove_file(&first).unwrap();
    let job = wait_for(&server.client, "second", "succeeded", |j| state(j) == "succeeded").await;
    check_succeeded(&f, &job, &second);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_block_device_is_restored_in_place_and_a_held_one_refused() {
    let f = Fixture::new(44).await;
    // Larger than the volume, pre-filled with non-zero bytes.
    let Some(dev) = loop_device(f.dir.path(), 4 << 20, 0xAB) else { return };
    let held_dir = f.dir.path().join("held-device");
    std::fs::create_dir_all(&held_dir).unwrap();
    let Some(held) = loop_device(&held_dir, 4 << 20, 0xCD) else { return };
    let mut config = f.config();
    config.worker.block_devices = vec![dev.device.clone(), held.device.clone()];
    let server = start(Engine::new(config), Tokens::default(), None).await;

    assert_eq!(submit(&server.client, &f.spec("dev", &dev.device)).await.status.as_u16(), 201);
    let job = wait_for(&server.client, "dev", "finished", |j| matches!(state(j), "succeeded" | "failed")).await;
    assert_eq!(state(&job), "succeeded", "{job:#}");
    let readback = rehydrate::restore::readback::readback(&f.manifest, &dev.device).unwrap();
    assert!(readback.matches(), "mismatched blocks {:?}", readback.mismatched);

    // Held open exclusively (as a mount would): the job fails, the device untouched.
    use std::os::unix::fs::OpenOptionsExt;
    let holder = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&held.device).unwrap();
    assert_eq!(submit(&server.client, &f.spec("held", &held.device)).await.status.as_u16(), 201);
    let job = wait_for(&server.client, "held", "failed", |j| state(j) == "failed").await;
    assert!(job["reason"].as_str().unwrap().contains("in use"), "{job:#}");
    drop(holder);
    assert!(std::fs::read(&held.device).unwrap().iter().all(|&b| b == 0xCD), "a refused device was written");

    // A device not on the list is refused at submission.
    let unlisted = f.spec("unlisted", std::path::Path::new("/dev/null"));
    assert_eq!(submit(&server.client, &unlisted).await.status.as_u16(), 422);
    server.stop().await;
}

/// The client's typed answers as JSON, read by key like the body the server
/// sent.
trait AsJson {
    fn json(&self) -> Value;
}

impl<T: serde::Serialize> AsJson for T {
    fn json(&self) -> Value {
        serde_json::to_value(self).unwrap()
    }
}
