//! Bearer tokens: read from `worker.tokens_file` (one per line, `#` comments)
//! and `REHYDRATE_TOKENS` (comma-separated); several at once, for rotation.
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time over
//! every configured token; they are never logged. With no tokens configured,
//! requests pass (the listener is then loopback: `api::serve` refuses
//! anything else).

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Api;
use super::problem::{Problem, ProblemType};
use crate::config::worker::WorkerConfig;

/// Most tokens accepted (rotation needs two or three).
pub const TOKENS_MAX: usize = 64;
/// Shortest token accepted: 16 bytes of secret.
pub const TOKEN_LEN_MIN: usize = 16;
/// The environment variable holding tokens.
pub const TOKENS_ENV: &str = "REHYDRATE_TOKENS";

#[derive(Default, Clone)]
pub struct Tokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.digests.len())
    }
}

impl Tokens {
    /// Tokens from a list (tests, and the two sources below).
    pub fn from_list<S: AsRef<str>>(tokens: &[S]) -> Result<Self, String> {
        let mut digests = Vec::new();
        for token in tokens.iter().map(|t| t.as_ref().trim()).filter(|t| !t.is_empty()) {
            if token.len() < TOKEN_LEN_MIN || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("a token must be at least {TOKEN_LEN_MIN} printable characters"));
            }
            digests.push(digest(token.as_bytes()));
        }
        if digests.len() > TOKENS_MAX {
            return Err(format!("at most {TOKENS_MAX} tokens"));
        }
        Ok(Self { digests })
    }

    /// Tokens from `worker.tokens_file` and `REHYDRATE_TOKENS`.
    pub fn load(config: &WorkerConfig) -> Result<Self, String> {
        let mut list: Vec<String> = Vec::new();
        if let Some(path) = &config.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("tokens file {}: {e}", path.display()))?;
            list.extend(text.lines().filter(|l| !l.trim_start().starts_with('#')).map(str::to_owned));
        }
        if let Ok(env) = std::env::var(TOKENS_ENV) {
            list.extend(env.split(',').map(str::to_owned));
        }
        Self::from_list(&list)
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the tokens, in time independent of
    /// which one (or how much of one) matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let d = digest(presented.as_bytes());
        let mut any = 0u8;
        for t in &self.digests {
            let diff = t.iter().zip(d.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            any |= u8::from(diff == 0);
        }
        any == 1
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Middleware: 401 problem unless the request carries an accepted token.
pub(super) async fn require_token(State(api): State<Api>, request: Request, next: Next) -> Response {
    if api.tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token) if api.tokens.accepts(token) => next.run(request).await,
        _ => {
            let mut response = Problem::new(
                StatusCode::UNAUTHORIZED,
                ProblemType::Unauthorized,
                "a valid bearer token is required (Authorization: Bearer <token>)",
            )
            .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_configured_token_and_nothing_else() {
        let tokens = Tokens::from_list(&["old-token-0123456789", "new-token-0123456789"]).unwrap();
        assert!(tokens.accepts("old-token-0123456789"));
        assert!(tokens.accepts("new-token-0123456789"));
        assert!(!tokens.accepts("new-token-012345678"));
        assert!(!tokens.accepts(""));
        assert!(Tokens::from_list(&["short"]).is_err());
        assert!(format!("{tokens:?}").contains("2 configured"));
    }

    #[test]
    fn tokens_file_skips_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# rotated 2026-11\nfirst-token-0123456789\n\n  second-token-0123456789  \n").unwrap();
        let config = WorkerConfig { tokens_file: Some(path.clone()), ..WorkerConfig::default() };
        let tokens = Tokens::load(&config).unwrap();
        assert!(tokens.accepts("first-token-0123456789") && tokens.accepts("second-token-0123456789"));
        assert!(!tokens.accepts("# rotated 2026-11"));
        std::fs::write(&path, "tiny\n").unwrap();
        assert!(Tokens::load(&config).is_err());
        let missing = WorkerConfig { tokens_file: Some(dir.path().join("none")), ..WorkerConfig::default() };
        assert!(Tokens::load(&missing).is_err(), "a configured but missing tokens file must stop the worker");
    }
}
