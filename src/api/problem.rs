//! RFC 9457 problem details: every API error is one JSON object with `type`,
//! `title`, `status` and `detail`, served as `application/problem+json`.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// Problem types are `urn:rehydrate:problem:<kind>`.
pub const TYPE_PREFIX: &str = "urn:rehydrate:problem:";
pub const CONTENT_TYPE: &str = "application/problem+json";

#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    body: Map<String, Value>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: &str) -> Self {
        let mut body = Map::new();
        body.insert("type".into(), Value::from(format!("{TYPE_PREFIX}{kind}")));
        body.insert("title".into(), Value::from(status.canonical_reason().unwrap_or("error")));
        body.insert("status".into(), Value::from(status.as_u16()));
        body.insert("detail".into(), Value::from(detail));
        Self { status, body }
    }

    pub fn internal(detail: &str) -> Self {
        tracing::error!(%detail, "internal error answering a request");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    /// An extension member.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.body.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = Value::Object(self.body).to_string();
        (self.status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
    }
}
