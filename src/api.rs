//! The worker's HTTP API (axum), versioned under `/v1`.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/jobs` | submit a [`JobSpec`](crate::job::JobSpec): 201 new, 200 the same job again |
//! | `GET /v1/jobs` | every job's status |
//! | `GET /v1/jobs/{id}` | one job's status |
//! | `POST /v1/jobs/{id}/cancel` | cancel a queued or running job |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz`, `GET /readyz` | liveness; readiness (503 once shutdown began) |
//!
//! In: HTTP/1 connections, at most `worker.connections_max` at once (more
//! wait in the listen backlog), each closed when it has not sent a request
//! head within `worker.header_read_timeout_millis` (silent, trickling or idle
//! clients) and each request answered 408 when it is not received and
//! handled within `worker.request_timeout_millis`; JSON bodies of at most
//! `worker.request_body_bytes_max` bytes,
//! unknown fields refused ([`crate::job::spec::parse_body`]). Out: JSON, and every error as an RFC 9457 problem
//! ([`problem::Problem`], `application/problem+json`). `/v1` routes need a
//! bearer token when tokens are configured ([`auth`]); a listener that is not
//! loopback refuses to start without them.

pub mod auth;
pub mod client;
pub mod problem;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::job::JobState;
use crate::job::spec::BodyError;
use crate::worker::{CancelError, ListCursor, ListQuery, SubmitError, Submitted, Worker};
pub use auth::Tokens;
use problem::Problem;

/// What every handler shares.
#[derive(Clone)]
struct Api {
    worker: Arc<Worker>,
    tokens: Arc<Tokens>,
    metrics: PrometheusHandle,
}

/// The process's Prometheus recorder, installed on first use (a process has
/// one global recorder; every server in it renders the same one).
pub fn metrics_handle() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new().install_recorder().map_err(|e| e.to_string())?;
            crate::metrics::describe();
            Ok(handle)
        })
        .clone()
}

/// The router, with its body limit and authentication.
pub fn router(worker: Arc<Worker>, tokens: Tokens) -> Result<Router, String> {
    let body_max = worker.config().request_body_bytes_max.get();
    let api = Api { worker, tokens: Arc::new(tokens), metrics: metrics_handle()? };
    let v1 = Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), auth::require_token));
    Ok(Router::new()
        .merge(v1)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "not-found", "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", "this route does not take that method")
        })
        .layer(DefaultBodyLimit::max(body_max))
        .layer(axum::middleware::from_fn_with_state(api.clone(), bounded))
        .with_state(api))
}

/// Every request, its body read included, completes within
/// `worker.request_timeout_millis` or gets 408: a client that sends a head
/// and then trickles (or withholds) its body does not hold a connection slot.
/// A submission whose commit already began still commits (it runs on its own
/// thread); resubmitting it returns the same job.
async fn bounded(State(api): State<Api>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let limit = api.worker.config().request_timeout();
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            &format!("the request was not received and handled within {} ms", limit.as_millis()),
        )
        .into_response(),
    }
}

/// Serve the API on `listener` until `shutdown` resolves, then stop
/// accepting, let open connections finish their request in flight, and return
/// once they closed.
///
/// Each connection is HTTP/1 with `worker.header_read_timeout_millis` to send
/// a request head (a silent client is disconnected), and at most
/// `worker.connections_max` connections are served at once: the next accept
/// waits for a slot, so further clients wait in the kernel's listen backlog.
pub async fn serve(
    listener: tokio::net::TcpListener,
    worker: Arc<Worker>,
    tokens: Tokens,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() && tokens.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing to listen on {local} without bearer tokens: set worker.tokens_file or REHYDRATE_TOKENS, or listen on 127.0.0.1"
            ),
        ));
    }
    let limits = ConnectionLimits {
        header_read_timeout: worker.config().header_read_timeout(),
        connections_max: worker.config().connections_max.get(),
    };
    let app = router(worker, tokens).map_err(std::io::Error::other)?;
    tracing::info!(%local, connections_max = limits.connections_max, "worker API listening");
    serve_connections(listener, app, limits, shutdown).await;
    Ok(())
}

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: std::time::Duration,
    connections_max: usize,
}

/// Accept loop: one task per connection, each holding a slot of the cap.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let stop = tokio_util::sync::CancellationToken::new();
    let connections = tokio_util::task::TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let service = hyper_util::service::TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    connections.wait().await;
}

async fn submit(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return Problem::new(e.status(), "bad-body", &e.body_text()).into_response(),
    };
    let spec = match crate::job::spec::parse_body(&body) {
        Ok(spec) => spec,
        Err(e @ BodyError::NotJson(_)) => {
            return Problem::new(StatusCode::BAD_REQUEST, "bad-json", &e.to_string()).into_response();
        }
        Err(e @ BodyError::NotASpec(_)) => {
            return Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec", &e.to_string()).into_response();
        }
    };
    let worker = Arc::clone(&api.worker);
    // The job database commits with fsync: off the async threads.
    let result = tokio::task::spawn_blocking(move || worker.submit(spec)).await;
    match result {
        Ok(Ok((Submitted::Created, status))) => (StatusCode::CREATED, axum::Json(status)).into_response(),
        Ok(Ok((Submitted::Existing, status))) => (StatusCode::OK, axum::Json(status)).into_response(),
        Ok(Err(e)) => submit_problem(&e).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

fn submit_problem(e: &SubmitError) -> Problem {
    let detail = e.to_string();
    match e {
        SubmitError::Invalid(spec) => {
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec", &detail).with("field", spec.field)
        }
        SubmitError::IdConflict { .. } => Problem::new(StatusCode::CONFLICT, "id-conflict", &detail),
        SubmitError::TargetBusy { holder, .. } => {
            Problem::new(StatusCode::CONFLICT, "target-busy", &detail).with("holder", holder.as_str())
        }
        SubmitError::QueueFull(_) => Problem::new(StatusCode::TOO_MANY_REQUESTS, "queue-full", &detail),
        SubmitError::ShuttingDown => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", &detail),
        SubmitError::Store(_) => Problem::internal(&detail),
    }
}

async fn list(State(api): State<Api>, query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Response {
    let query = match query.map_err(|e| e.body_text()).and_then(|Query(pairs)| list_query(&pairs)) {
        Ok(query) => query,
        Err(detail) => return Problem::new(StatusCode::BAD_REQUEST, "bad-query", &detail).into_response(),
    };
    match api.worker.list(&query) {
        Ok(page) => axum::Json(page).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

/// `?state=running,failed&limit=50&after=<next>` as a [`ListQuery`]; a
/// parameter given twice takes its last value (`state` adds up).
fn list_query(pairs: &[(String, String)]) -> Result<ListQuery, String> {
    let mut query = ListQuery::default();
    for (name, value) in pairs {
        match name.as_str() {
            "state" => {
                for word in value.split(',').filter(|w| !w.is_empty()) {
                    let state = JobState::from_name(word).ok_or_else(|| {
                        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.name()).collect();
                        format!("state {word:?} is not one of {}", names.join(", "))
                    })?;
                    if !query.states.contains(&state) {
                        query.states.push(state);
                    }
                }
            }
            "limit" => {
                query.limit =
                    value.parse().ok().filter(|n| (1..=ListQuery::LIMIT_MAX).contains(n)).ok_or_else(|| {
                        format!("limit {value:?} is not a whole number from 1 to {}", ListQuery::LIMIT_MAX)
                    })?;
            }
            "after" => query.after = Some(value.parse::<ListCursor>()?),
            other => return Err(format!("unknown parameter {other:?}: the job list takes state, limit and after")),
        }
    }
    Ok(query)
}

async fn get_job(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.worker.get(&id) {
        Ok(Some(status)) => axum::Json(status).into_response(),
        Ok(None) => Problem::new(StatusCode::NOT_FOUND, "no-such-job", &format!("no job {id:?}")).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

async fn cancel(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let worker = Arc::clone(&api.worker);
    let result = tokio::task::spawn_blocking(move || worker.cancel(&id)).await;
    match result {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(e @ CancelError::NotFound(_))) => {
            Problem::new(StatusCode::NOT_FOUND, "no-such-job", &e.to_string()).into_response()
        }
        Ok(Err(e @ CancelError::Finished { .. })) => {
            Problem::new(StatusCode::CONFLICT, "job-finished", &e.to_string()).into_response()
        }
        Ok(Err(e)) => Problem::internal(&e.to_string()).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    if let Err(e) = api.worker.publish_metrics() {
        tracing::warn!(error = %e, "job gauges not refreshed for this scrape");
    }
    let mut text = api.metrics.render();
    render_job_progress(&mut text, &api.worker.running_progress());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The per-job progress series, one per running job: a job that ended has
/// none (job ids are `[A-Za-z0-9_-]`, nothing to escape).
fn render_job_progress(text: &mut String, running: &[(String, f64)]) {
    use crate::metrics::{JOB_PROGRESS_RATIO as NAME, JOB_PROGRESS_RATIO_HELP as HELP};
    use std::fmt::Write;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = writeln!(text, "# HELP {NAME} {HELP}\n# TYPE {NAME} gauge");
    for (job, ratio) in running {
        let _ = writeln!(text, "{NAME}{{job=\"{job}\"}} {ratio}");
    }
}

async fn readyz(State(api): State<Api>) -> Response {
    if api.worker.is_accepting() {
        "ready\n".into_response()
    } else {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "shutting-down", "the worker is shutting down").into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(query: &str) -> Vec<(String, String)> {
        serde_urlencoded::from_str(query).unwrap()
    }

    #[test]
    fn list_queries_parse_or_say_what_is_wrong() {
        assert_eq!(list_query(&pairs("")), Ok(ListQuery::default()));
        let query = list_query(&pairs("state=failed,running&state=failed&limit=7&after=12-db-1")).unwrap();
        assert_eq!(query.states, vec![JobState::Failed, JobState::Running]);
        assert_eq!(query.limit, 7);
        assert_eq!(query.after, Some(ListCursor { created_unix_secs: 12, id: "db-1".into() }));
        for (bad, says) in [
            ("state=done", "not one of queued, running, succeeded, failed, cancelled"),
            ("limit=0", "from 1 to 1000"),
            ("limit=1001", "from 1 to 1000"),
            ("limit=-3", "from 1 to 1000"),
            ("after=db-1", "previous page"),
            ("order=id", "takes state, limit and after"),
        ] {
            let e = list_query(&pairs(bad)).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
