//! The worker's HTTP API (axum), versioned under `/v1`.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/jobs` | submit a [`JobSpec`](crate::job::JobSpec): 201 new, 200 the same job again |
//! | `GET /v1/jobs` | every job's status |
//! | `GET /v1/jobs/{id}` | one job's status |
//! | `POST /v1/jobs/{id}/cancel` | cancel a queued or running job (or stop an ended job's export) |
//! | `POST /v1/jobs/{id}/export/stop` | stop a job's NBD export |
//! | `GET`/`HEAD /v1/blocks/{hash}` | a block this worker holds settled, for peers ([`blocks`]) |
//! | `GET /v1/peers` | blocks and bytes served to peers |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz`, `GET /readyz` | liveness; readiness (503 once shutdown began) |
//! | `GET /openapi.json` | this API as an OpenAPI 3.1 document |
//!
//! Every route is registered through its handler's `#[utoipa::path]`
//! ([`routes`]), so the OpenAPI document ([`openapi`], `docs/openapi.json`)
//! describes exactly what the router serves, with the same types the
//! handlers use.
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
mod blocks;
pub mod client;
mod doc;
pub mod problem;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::job::spec::BodyError;
use crate::job::{JobSpec, JobState};
use crate::worker::{CancelError, ListCursor, ListQuery, StopExportError, SubmitError, Submitted, Worker};
use crate::worker::{JobPage, JobStatus};
pub use auth::Tokens;
use problem::ProblemDetails;
use problem::{Problem, ProblemType};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What every handler shares.
#[derive(Clone)]
struct Api {
    worker: Arc<Worker>,
    tokens: Arc<Tokens>,
    metrics: PrometheusHandle,
    /// The OpenAPI document, rendered once.
    document: Arc<str>,
    /// `/v1/blocks`' limits.
    serving: Arc<blocks::Serving>,
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

/// Every route, each registered through the `#[utoipa::path]` of its
/// handler, so the router serves exactly the routes the OpenAPI document
/// describes: the `/v1` routes (behind the token) and the open ones.
fn routes() -> (OpenApiRouter<Api>, OpenApiRouter<Api>) {
    let v1 = OpenApiRouter::new()
        .routes(routes!(submit, list))
        .routes(routes!(get_job))
        .routes(routes!(cancel))
        .routes(routes!(stop_export))
        .routes(routes!(blocks::peers))
        .routes(routes!(blocks::get_block));
    let open = OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json));
    (v1, open)
}

/// The OpenAPI 3.1 document of the API, as `GET /openapi.json` serves it
/// and `rehydrate openapi` prints it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (v1, open) = routes();
    doc::document(v1.split_for_parts().1, open.split_for_parts().1)
}

/// [`openapi`] as pretty JSON, ending in a newline: the bytes of
/// `docs/openapi.json`.
pub fn openapi_json_text() -> String {
    doc::to_json(&openapi())
}

/// The router, with its body limit and authentication.
pub fn router(worker: Arc<Worker>, tokens: Tokens) -> Result<Router, String> {
    let body_max = worker.config().request_body_bytes_max.get();
    let document: Arc<str> = openapi_json_text().into();
    let serving = Arc::new(blocks::Serving::new(&worker.engine().config.peers));
    let api = Api { worker, tokens: Arc::new(tokens), metrics: metrics_handle()?, document, serving };
    let (v1, open) = routes();
    let v1 = v1.split_for_parts().0.route_layer(axum::middleware::from_fn_with_state(api.clone(), auth::require_token));
    Ok(Router::new()
        .merge(v1)
        .merge(open.split_for_parts().0)
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, ProblemType::NotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ProblemType::MethodNotAllowed,
                "this route does not take that method",
            )
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
            ProblemType::RequestTimeout,
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

/// Submit a restore job. Idempotent on its id: the same spec again returns
/// the same job (a cancelled or failed one is requeued and resumes).
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = JobSpec, security(("bearer" = [])),
    responses(
        (status = 201, description = "a new job, queued", body = JobStatus),
        (status = 200, description = "the same job again", body = JobStatus),
        (status = 400, description = "bad-json: the body is not JSON", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "id-conflict: the id names a job with another spec; target-busy: another active job holds the target (holder names it; submit with replace to take over); target-locked: another process (a CLI restore, another worker) holds the target (holder names it)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "bad-body: the body is larger than worker.request_body_bytes_max", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 422, description = "invalid-spec: not a job spec, or one outside the worker's configuration (field names the field)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "queue-full: worker.jobs_queued_max jobs wait already", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "internal: the worker failed; its log says more", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "shutting-down: the worker takes no new jobs", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn submit(State(api): State<Api>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return Problem::new(e.status(), ProblemType::BadBody, &e.body_text()).into_response(),
    };
    let spec = match crate::job::spec::parse_body(&body) {
        Ok(spec) => spec,
        Err(e @ BodyError::NotJson(_)) => {
            return Problem::new(StatusCode::BAD_REQUEST, ProblemType::BadJson, &e.to_string()).into_response();
        }
        Err(e @ BodyError::NotASpec(_)) => {
            return Problem::new(StatusCode::UNPROCESSABLE_ENTITY, ProblemType::InvalidSpec, &e.to_string())
                .into_response();
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
            Problem::new(StatusCode::UNPROCESSABLE_ENTITY, ProblemType::InvalidSpec, &detail).with_field(spec.field)
        }
        SubmitError::IdConflict { .. } => Problem::new(StatusCode::CONFLICT, ProblemType::IdConflict, &detail),
        SubmitError::TargetBusy { holder, .. } => {
            Problem::new(StatusCode::CONFLICT, ProblemType::TargetBusy, &detail).with_holder(holder.as_str())
        }
        SubmitError::TargetHeldElsewhere { holder, .. } => {
            Problem::new(StatusCode::CONFLICT, ProblemType::TargetLocked, &detail).with_holder(holder.as_str())
        }
        SubmitError::QueueFull(_) => Problem::new(StatusCode::TOO_MANY_REQUESTS, ProblemType::QueueFull, &detail),
        SubmitError::ShuttingDown => Problem::new(StatusCode::SERVICE_UNAVAILABLE, ProblemType::ShuttingDown, &detail),
        SubmitError::Store(_) => Problem::internal(&detail),
    }
}

/// List jobs, oldest first (creation time, then id), a page at a time.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", security(("bearer" = [])),
    params(
        ("state" = Option<String>, Query, description = "only jobs in these states, comma-separated: queued, running, succeeded, failed, cancelled"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "at most this many jobs (default 100)"),
        ("after" = Option<String>, Query, description = "the next of an earlier page: start after it"),
    ),
    responses(
        (status = 200, description = "one page of jobs; next is null on the last page", body = JobPage),
        (status = 400, description = "bad-query: a parameter is wrong (the detail names it)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "internal: the worker failed; its log says more", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn list(State(api): State<Api>, query: Result<Query<Vec<(String, String)>>, QueryRejection>) -> Response {
    let query = match query.map_err(|e| e.body_text()).and_then(|Query(pairs)| list_query(&pairs)) {
        Ok(query) => query,
        Err(detail) => return Problem::new(StatusCode::BAD_REQUEST, ProblemType::BadQuery, &detail).into_response(),
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

/// One job's status: state, phase, blocks, bytes, ETA, stalled, damage.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job's id")),
    responses(
        (status = 200, description = "the job", body = JobStatus),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no-such-job: no job has that id", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "internal: the worker failed; its log says more", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn get_job(State(api): State<Api>, Path(id): Path<String>) -> Response {
    match api.worker.get(&id) {
        Ok(Some(status)) => axum::Json(status).into_response(),
        Ok(None) => {
            Problem::new(StatusCode::NOT_FOUND, ProblemType::NoSuchJob, &format!("no job {id:?}")).into_response()
        }
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

/// Cancel a queued or running job: it checkpoints, and resubmitting it
/// resumes. A job whose restore has ended but whose export still serves:
/// the export stops (the job keeps its state).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job's id")),
    responses(
        (status = 200, description = "the job, cancelled (or its export stopping)", body = JobStatus),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no-such-job: no job has that id", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "job-finished: the job already ended", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "internal: the worker failed; its log says more", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn cancel(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let worker = Arc::clone(&api.worker);
    let result = tokio::task::spawn_blocking(move || worker.cancel(&id)).await;
    match result {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(e @ CancelError::NotFound(_))) => {
            Problem::new(StatusCode::NOT_FOUND, ProblemType::NoSuchJob, &e.to_string()).into_response()
        }
        Ok(Err(e @ CancelError::Finished { .. })) => {
            Problem::new(StatusCode::CONFLICT, ProblemType::JobFinished, &e.to_string()).into_response()
        }
        Ok(Err(e)) => Problem::internal(&e.to_string()).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

/// Stop a job's NBD export: open connections finish the requests in
/// flight, then close. A restore still running goes on without it.
#[utoipa::path(post, path = "/v1/jobs/{id}/export/stop", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job's id")),
    responses(
        (status = 200, description = "the job; its export stopping", body = JobStatus),
        (status = 401, description = "unauthorized: no bearer token, or not one of the configured tokens", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "no-such-job: no job has that id", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "no-export: the job serves no export (never asked for one, or it stopped)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 500, description = "internal: the worker failed; its log says more", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn stop_export(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let worker = Arc::clone(&api.worker);
    let result = tokio::task::spawn_blocking(move || worker.stop_export(&id)).await;
    match result {
        Ok(Ok(status)) => axum::Json(status).into_response(),
        Ok(Err(e @ StopExportError::NotFound(_))) => {
            Problem::new(StatusCode::NOT_FOUND, ProblemType::NoSuchJob, &e.to_string()).into_response()
        }
        Ok(Err(e @ StopExportError::NoExport(_))) => {
            Problem::new(StatusCode::CONFLICT, ProblemType::NoExport, &e.to_string()).into_response()
        }
        Ok(Err(e)) => Problem::internal(&e.to_string()).into_response(),
        Err(e) => Problem::internal(&e.to_string()).into_response(),
    }
}

/// Prometheus metrics, text exposition format 0.0.4. No token needed.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "the metrics", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn metrics(State(api): State<Api>) -> Response {
    if let Err(e) = api.worker.publish_metrics() {
        tracing::warn!(error = %e, "job gauges not refreshed for this scrape");
    }
    let mut text = api.metrics.render();
    render_job_progress(&mut text, &api.worker.running_progress());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The per-job series (progress, elapsed, estimate left), one each per
/// running job: a job that ended has none (job ids are `[A-Za-z0-9_-]`,
/// nothing to escape).
fn render_job_progress(text: &mut String, running: &[crate::worker::RunningGauges]) {
    use crate::metrics as m;
    use std::fmt::Write;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    type Value = fn(&crate::worker::RunningGauges) -> Option<f64>;
    let families: [(&str, &str, Value); 3] = [
        (m::JOB_PROGRESS_RATIO, m::JOB_PROGRESS_RATIO_HELP, |g| Some(g.progress_ratio)),
        (m::JOB_ELAPSED_SECONDS, m::JOB_ELAPSED_SECONDS_HELP, |g| Some(g.elapsed_secs)),
        (m::JOB_ETA_SECONDS, m::JOB_ETA_SECONDS_HELP, |g| g.eta_secs),
    ];
    for (name, help, value) in families {
        let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} gauge");
        for g in running {
            if let Some(v) = value(g) {
                let _ = writeln!(text, "{name}{{job=\"{}\"}} {v}", g.job);
            }
        }
    }
}

/// Liveness: 200 while the process serves requests. No token needed.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "ok", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn healthz() -> &'static str {
    "ok\n"
}

/// This document: the API as OpenAPI 3.1 JSON. No token needed.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses(
        (status = 200, description = "the OpenAPI document", body = Object, content_type = "application/json"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn openapi_json(State(api): State<Api>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], api.document.to_string()).into_response()
}

/// Readiness: 200 while the worker takes jobs, 503 once it is shutting
/// down. No token needed.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "ready", body = String, content_type = "text/plain; charset=utf-8"),
        (status = 408, description = "request-timeout: not received and handled within worker.request_timeout_millis", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "shutting-down: the worker is shutting down", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
async fn readyz(State(api): State<Api>) -> Response {
    if api.worker.is_accepting() {
        "ready\n".into_response()
    } else {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, ProblemType::ShuttingDown, "the worker is shutting down")
            .into_response()
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
