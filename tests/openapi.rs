//! The worker API's OpenAPI 3.1 document against the code and the router.
//!
//! - `docs/openapi.json` is the document the code generates now: a route, a
//!   parameter, a status code or a field of a body type that changed without
//!   regenerating it fails here, saying how to regenerate it.
//! - It is OpenAPI 3.1: `openapi-spec-validator` (PyPI) accepts it where
//!   installed (`.ci/run` installs it); elsewhere that check says SKIP.
//! - The router serves exactly the documented operations: each documented
//!   operation answers (over real HTTP) with one of its documented status
//!   codes, never the router's "no such route" or "method not allowed"; every
//!   other method on a documented path is refused as not allowed; no route is
//!   registered past the documentation (`.route(` is not used in `src/api`);
//!   `GET /openapi.json` needs no token and serves the document.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns fail the test by panicking

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use hyper::Method;
use rehydrate::api::Tokens;
use rehydrate::api::client::{Answer, ApiClient};
use rehydrate::restore::Engine;
use rehydrate::worker::Worker;
use rehydrate::write::BackendChoice;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TOKEN: &str = "openapi-test-token-0123456789";
const REGENERATE: &str = "cargo run -- openapi > docs/openapi.json";

fn checked_in_path() -> PathBuf {
    Path::new(ROOT).join("docs/openapi.json")
}

fn document() -> Value {
    serde_json::from_str(&rehydrate::api::openapi_json_text()).unwrap()
}

#[test]
fn the_checked_in_document_is_the_one_the_code_generates() {
    let generated = rehydrate::api::openapi_json_text();
    let checked_in = std::fs::read_to_string(checked_in_path()).unwrap_or_default();
    if checked_in != generated {
        let fresh = std::env::temp_dir().join(format!("rehydrate-openapi-{}.json", std::process::id()));
        let _ = std::fs::write(&fresh, &generated);
        panic!(
            "docs/openapi.json is not the document the code generates (a route, parameter, status or field changed): regenerate it with `{REGENERATE}` (the generated one is at {} for a diff)",
            fresh.display()
        );
    }
    // `rehydrate openapi` prints the same bytes.
    let out = Command::new(env!("CARGO_BIN_EXE_rehydrate")).arg("openapi").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), generated);
}

#[test]
fn the_document_is_openapi_3_1_with_every_operation_described() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1."), "{}", doc["openapi"]);
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: no responses"));
            assert!(responses.keys().any(|s| s.starts_with('2')), "{method} {path}: no success status");
            for (status, response) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
                let problem = &response["content"]["application/problem+json"]["schema"]["$ref"];
                assert_eq!(problem, "#/components/schemas/ProblemDetails", "{method} {path} {status}");
            }
            let guarded = path.starts_with("/v1/");
            assert_eq!(op["security"].is_array(), guarded, "{method} {path}: bearer security only on /v1");
            if guarded {
                assert!(responses.contains_key("401"), "{method} {path}: a guarded route answers 401");
            }
        }
    }
    assert_eq!(
        operations, 11,
        "submit, list, get, cancel, export stop, blocks, peers, metrics, healthz, readyz, openapi.json"
    );
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "JobSpec",
        "JobStatus",
        "JobPage",
        "JobState",
        "Phase",
        "DamagedBlock",
        "ProblemDetails",
        "ProblemType",
        "JobExport",
        "ExportStatus",
        "PeerServing",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    // Every problem type the API can answer with is listed.
    let types: Vec<&str> = schemas["ProblemType"]["enum"]
        .as_array()
        .or_else(|| schemas["ProblemType"]["oneOf"].as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().or_else(|| v["enum"][0].as_str())).collect())
        .unwrap_or_default();
    assert!(
        types.len() >= 15 && types.iter().all(|t| t.starts_with(rehydrate::api::problem::TYPE_PREFIX)),
        "{types:?}"
    );
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
}

#[test]
fn openapi_spec_validator_accepts_the_document() {
    let out = match Command::new("openapi-spec-validator").arg(checked_in_path()).output() {
        Ok(out) => out,
        Err(_) => {
            println!("SKIP: openapi-spec-validator is not installed (pip install openapi-spec-validator)");
            return;
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openapi-spec-validator refuses docs/openapi.json:\n{text}");
    assert!(text.contains("OK"), "{text}");
}

/// No route is registered with plain axum `.route(`: every one goes through
/// a documented handler (`routes!`).
#[test]
fn no_route_bypasses_the_documentation() {
    let api = Path::new(ROOT).join("src/api");
    let files = std::fs::read_dir(&api).unwrap().map(|e| e.unwrap().path()).chain([Path::new(ROOT).join("src/api.rs")]);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(".route("), "{}: a route registered outside routes!()", file.display());
    }
}

struct Server {
    base: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(BackendChoice::Pwrite, &dir.path().join("state"));
    std::fs::create_dir_all(dir.path().join("targets")).unwrap();
    config.worker.target_roots = vec![dir.path().join("targets")];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let worker = Worker::start(Arc::new(Engine::new(config))).unwrap();
    let stop = CancellationToken::new();
    let tokens = Tokens::from_list(&[TOKEN]).unwrap();
    tokio::spawn(rehydrate::api::serve(listener, worker, tokens, stop.clone().cancelled_owned()));
    Server { base, stop, _dir: dir }
}

/// A concrete path for a templated one (`{id}` → a job that does not exist).
fn concrete(path: &str) -> String {
    path.replace("{id}", "no-such-job")
}

fn problem_type(answer: &Answer) -> String {
    answer.body["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_serves_exactly_the_documented_operations() {
    let server = start().await;
    let doc = document();
    let client = ApiClient::new(&server.base, Some(TOKEN.to_owned())).unwrap();
    let anonymous = ApiClient::new(&server.base, None).unwrap();
    let prefix = rehydrate::api::problem::TYPE_PREFIX;
    let all = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH];
    for (path, item) in doc["paths"].as_object().unwrap() {
        let documented: BTreeSet<String> = item.as_object().unwrap().keys().cloned().collect();
        for method in &all {
            let name = method.as_str().to_lowercase();
            let body = (*method == Method::POST).then(|| b"{}".to_vec());
            let answer = client.raw(method.clone(), &concrete(path), body).await.unwrap();
            let kind = problem_type(&answer);
            if !documented.contains(&name) {
                assert_eq!(answer.status, 405, "{method} {path} is served but not documented: {}", answer.text);
                assert_eq!(kind, format!("{prefix}method-not-allowed"));
                continue;
            }
            assert!(
                kind != format!("{prefix}not-found") && kind != format!("{prefix}method-not-allowed"),
                "{method} {path} is documented but not routed: {}",
                answer.text
            );
            let statuses = item[&name]["responses"].as_object().unwrap();
            assert!(
                statuses.contains_key(answer.status.as_str()),
                "{method} {path} answered {}, not a documented status ({:?}): {}",
                answer.status,
                statuses.keys().collect::<Vec<_>>(),
                answer.text
            );
            // Without a token: 401 on /v1, served as usual elsewhere.
            let answer = anonymous.raw(method.clone(), &concrete(path), None).await.unwrap();
            if path.starts_with("/v1/") {
                assert_eq!(answer.status, 401, "{method} {path} without a token");
            } else {
                assert!(answer.status.is_success(), "{method} {path} without a token: {}", answer.status);
            }
        }
    }
    // The served document is the generated one, with no token.
    let served = anonymous.raw(Method::GET, "/openapi.json", None).await.unwrap();
    assert_eq!(served.content_type, "application/json");
    assert_eq!(served.text, rehydrate::api::openapi_json_text());
    // An empty list page has exactly the documented fields.
    let page = client.raw(Method::GET, "/v1/jobs", None).await.unwrap();
    let fields: BTreeSet<&String> = page.body.as_object().unwrap().keys().collect();
    let schema: BTreeSet<&String> =
        doc["components"]["schemas"]["JobPage"]["properties"].as_object().unwrap().keys().collect();
    assert_eq!(fields, schema);
    server.stop.cancel();
}
