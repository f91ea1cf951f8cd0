//! A small client of the worker API, over plain `http://` (hyper-util's
//! client): what `rehydrate job …` and the tests use.
//!
//! Every request has a deadline ([`REQUEST_TIMEOUT`]) and a response body is
//! read up to [`RESPONSE_BYTES_MAX`]. Answers come back as the types the
//! server serializes ([`JobStatus`], [`JobPage`]); errors carry the HTTP
//! status and the problem details the server sent.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::job::JobSpec;
use crate::worker::{JobPage, JobStatus};

/// Deadline of one request, response body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read (a job list of the default record cap fits).
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad server URL {0:?}: use http://host:port")]
    Url(String),
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    /// The server answered with an error (the body is its problem details).
    #[error("{status}: {}", .body.get("detail").and_then(Value::as_str).unwrap_or("(no detail)"))]
    Status { status: StatusCode, body: Value },
    /// A 2xx answer whose body is not what the API documents.
    #[error("the answer from {url} is not a {what}: {message}")]
    Body { url: String, what: &'static str, message: String },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A response: status, content type and the JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Value,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(server: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(ClientError::Url(server.to_owned()));
        }
        // Idle connections are dropped before the worker's default header
        // read timeout (10 s) would close them under a request.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(5))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build_http();
        Ok(Self { base, token, client })
    }

    /// Any request; answers of every status come back as `Ok`.
    pub async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let transport = |message: String| ClientError::Transport { url: url.clone(), message };
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request =
            request.body(Full::new(Bytes::from(body.unwrap_or_default()))).map_err(|e| transport(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| transport(e.to_string()))?;
            let status = response.status();
            let content_type =
                response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            let bytes = Limited::new(response.into_body(), RESPONSE_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            Ok(Answer { status, content_type, body, text })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())))?
    }

    /// A JSON request whose non-2xx answers are errors.
    async fn call(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer, ClientError> {
        let answer = self.raw(method, path, body).await?;
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(ClientError::Status { status: answer.status, body: answer.body })
        }
    }

    /// Submit a job: 201 for a new one, 200 for the same job again.
    pub async fn submit(&self, spec: &JobSpec) -> Result<Submission, ClientError> {
        let body = serde_json::to_vec(spec).map_err(|e| ClientError::Url(e.to_string()))?;
        let answer = self.call(Method::POST, "/v1/jobs", Some(body)).await?;
        Ok(Submission { created: answer.status == StatusCode::CREATED, job: self.decode(answer, "job status")? })
    }

    pub async fn get(&self, id: &str) -> Result<JobStatus, ClientError> {
        let answer = self.call(Method::GET, &format!("/v1/jobs/{id}"), None).await?;
        self.decode(answer, "job status")
    }

    /// One page of `GET /v1/jobs`: jobs in any of `states` (all when empty),
    /// at most `limit`, after the cursor `after`.
    pub async fn list(
        &self,
        states: &[String],
        limit: Option<usize>,
        after: Option<&str>,
    ) -> Result<JobPage, ClientError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if !states.is_empty() {
            params.push(("state", states.join(",")));
        }
        params.extend(limit.map(|n| ("limit", n.to_string())));
        params.extend(after.map(|a| ("after", a.to_owned())));
        let query = serde_urlencoded::to_string(&params).map_err(|e| ClientError::Url(e.to_string()))?;
        let path = if query.is_empty() { "/v1/jobs".to_owned() } else { format!("/v1/jobs?{query}") };
        let answer = self.call(Method::GET, &path, None).await?;
        self.decode(answer, "job page")
    }

    pub async fn cancel(&self, id: &str) -> Result<JobStatus, ClientError> {
        let answer = self.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None).await?;
        self.decode(answer, "job status")
    }

    /// The typed body of a 2xx answer.
    fn decode<T: serde::de::DeserializeOwned>(&self, answer: Answer, what: &'static str) -> Result<T, ClientError> {
        serde_json::from_str(&answer.text).map_err(|e| ClientError::Body {
            url: self.base.clone(),
            what,
            message: e.to_string(),
        })
    }
}

/// What a submission returned.
#[derive(Debug, Clone)]
pub struct Submission {
    /// A new job (201), not the same job again (200).
    pub created: bool,
    pub job: JobStatus,
}
