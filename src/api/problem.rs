//! RFC 9457 problem details: every API error is one JSON object with `type`,
//! `title`, `status` and `detail`, served as `application/problem+json`.
//!
//! The problem types are one enum ([`ProblemType`]), so the handlers can only
//! answer with a type the OpenAPI document lists, and the body is one struct
//! ([`ProblemDetails`]), the schema the document gives every error.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Problem types are `urn:rehydrate:problem:<kind>`.
pub const TYPE_PREFIX: &str = "urn:rehydrate:problem:";
pub const CONTENT_TYPE: &str = "application/problem+json";

/// Every kind of problem the API answers with, as its `type` URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub enum ProblemType {
    /// The body could not be read (too large: 413).
    #[serde(rename = "urn:rehydrate:problem:bad-body")]
    BadBody,
    /// The body is not JSON.
    #[serde(rename = "urn:rehydrate:problem:bad-json")]
    BadJson,
    /// The body is JSON but not a job spec, or a spec outside the worker's
    /// configuration (`field` names the field at fault).
    #[serde(rename = "urn:rehydrate:problem:invalid-spec")]
    InvalidSpec,
    /// The id names a job with another spec.
    #[serde(rename = "urn:rehydrate:problem:id-conflict")]
    IdConflict,
    /// Another active job holds the target (`holder` names it).
    #[serde(rename = "urn:rehydrate:problem:target-busy")]
    TargetBusy,
    /// Another process (a CLI restore, another worker) holds the target's
    /// lock: `replace` cannot take it over (`holder` names the process).
    #[serde(rename = "urn:rehydrate:problem:target-locked")]
    TargetLocked,
    /// The job queue is full.
    #[serde(rename = "urn:rehydrate:problem:queue-full")]
    QueueFull,
    /// The worker is shutting down.
    #[serde(rename = "urn:rehydrate:problem:shutting-down")]
    ShuttingDown,
    /// A query parameter is wrong (the detail names it).
    #[serde(rename = "urn:rehydrate:problem:bad-query")]
    BadQuery,
    /// No job has that id.
    #[serde(rename = "urn:rehydrate:problem:no-such-job")]
    NoSuchJob,
    /// The job already ended: there is nothing to cancel.
    #[serde(rename = "urn:rehydrate:problem:job-finished")]
    JobFinished,
    /// The job serves no export (it never asked for one, or it stopped).
    #[serde(rename = "urn:rehydrate:problem:no-export")]
    NoExport,
    /// No bearer token, or none of the configured ones.
    #[serde(rename = "urn:rehydrate:problem:unauthorized")]
    Unauthorized,
    /// The request was not received and handled within
    /// `worker.request_timeout_millis`.
    #[serde(rename = "urn:rehydrate:problem:request-timeout")]
    RequestTimeout,
    /// No such route.
    #[serde(rename = "urn:rehydrate:problem:not-found")]
    NotFound,
    /// The route does not take that method.
    #[serde(rename = "urn:rehydrate:problem:method-not-allowed")]
    MethodNotAllowed,
    /// The worker failed (its log says more).
    #[serde(rename = "urn:rehydrate:problem:internal")]
    Internal,
    /// This worker holds no settled block of that key (`/v1/blocks`).
    #[serde(rename = "urn:rehydrate:problem:no-such-block")]
    NoSuchBlock,
    /// Serving peers is at its rate or concurrency limit: ask the next source.
    #[serde(rename = "urn:rehydrate:problem:busy")]
    Busy,
    /// The target's bytes did not hash to the block's content hash: nothing
    /// was served.
    #[serde(rename = "urn:rehydrate:problem:block-unverified")]
    BlockUnverified,
}

/// An error answer's body (RFC 9457).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ProblemDetails {
    #[serde(rename = "type")]
    pub problem_type: ProblemType,
    /// The status code's reason phrase.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// `invalid-spec`: the field of the job spec at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// `target-busy`: the id of the active job holding the target;
    /// `target-locked`: the process holding it (pid, job, blocks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    body: ProblemDetails,
}

impl Problem {
    pub fn new(status: StatusCode, problem_type: ProblemType, detail: &str) -> Self {
        let body = ProblemDetails {
            problem_type,
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            detail: detail.to_owned(),
            field: None,
            holder: None,
        };
        Self { status, body }
    }

    pub fn internal(detail: &str) -> Self {
        tracing::error!(%detail, "internal error answering a request");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, ProblemType::Internal, detail)
    }

    /// `invalid-spec`: the field at fault.
    pub fn with_field(mut self, field: &str) -> Self {
        self.body.field = Some(field.to_owned());
        self
    }

    /// `target-busy`: the job holding the target.
    pub fn with_holder(mut self, holder: &str) -> Self {
        self.body.holder = Some(holder.to_owned());
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&self.body).unwrap_or_default();
        (self.status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_rfc_9457_json_with_its_type_uri() {
        let problem = Problem::new(StatusCode::CONFLICT, ProblemType::TargetBusy, "held").with_holder("db-1");
        let json = serde_json::to_value(&problem.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": format!("{TYPE_PREFIX}target-busy"), "title": "Conflict", "status": 409,
                "detail": "held", "holder": "db-1"
            })
        );
    }
}
