//! Errors, classified once at the edge where they arise.
//!
//! A source error carries its [`ErrorClass`], decided in one table per store
//! (for S3: `store/s3.rs`), so the fetch stage applies one policy per class and
//! no layer retries what another layer already retried. A restore's outcome
//! maps to one documented process [`ExitCode`] an orchestrator can act on.

use std::fmt;

/// What a failed source operation means for the block being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The source asked us to slow down (503 SlowDown, 429): retry at the
    /// store's adapted rate (`store/rate.rs`), bounded by time, not attempts;
    /// shrink this source's concurrency.
    Throttled,
    /// A fault that may pass (5xx, timeouts, resets, truncated bodies): retry
    /// with backoff.
    Transient,
    /// This source will never serve this object (404, 403): go to the next
    /// source at once, without retrying.
    Permanent,
    /// The bytes arrived but are wrong (checksum mismatch, wrong length, bad
    /// compression): never written; go to the next source.
    Corrupt,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Throttled => "throttled",
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Corrupt => "corrupt",
        }
    }

    /// Whether another attempt on the same source may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Throttled | ErrorClass::Transient)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed operation on a store, with its class.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[error("{class}: {message}")]
pub struct StoreError {
    pub class: ErrorClass,
    pub message: String,
    /// How long the store asked us to wait before asking again (an HTTP
    /// `Retry-After` in seconds, on a throttled answer), if it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_millis: Option<u64>,
}

impl StoreError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self { class, message: message.into(), retry_after_millis: None }
    }

    /// The same error, carrying the store's `Retry-After`.
    pub fn with_retry_after(mut self, retry_after: Option<std::time::Duration>) -> Self {
        self.retry_after_millis = retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The store's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after_millis.map(std::time::Duration::from_millis)
    }

    pub fn throttled(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Throttled, message)
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Transient, message)
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Permanent, message)
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorClass::Corrupt, message)
    }

    /// Classify a local I/O error: missing or forbidden objects are permanent,
    /// everything else may pass.
    pub fn from_io(context: &str, err: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        let class = match err.kind() {
            NotFound | PermissionDenied | ReadOnlyFilesystem | IsADirectory | InvalidInput => ErrorClass::Permanent,
            _ => ErrorClass::Transient,
        };
        Self::new(class, format!("{context}: {err}"))
    }
}

/// Process exit codes of the CLI, stable for orchestrators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The restore (or command) succeeded.
    Success = 0,
    /// An unexpected internal error: report it.
    Internal = 1,
    /// Bad flags, a bad config file, a bad URL: fix the invocation.
    Usage = 2,
    /// Some blocks could not be restored from any source, or a verify found
    /// mismatches: the damage report names them; a rerun fetches only those.
    DataFailure = 3,
    /// Writing or syncing the target failed (EIO, ENOSPC, permissions): fix
    /// the target, then rerun.
    IoFailure = 4,
    /// The input was refused: a malformed manifest, or a checkpoint that
    /// belongs to another restore. Retrying the same thing will not help.
    Refused = 5,
    /// Interrupted (SIGINT/SIGTERM) after checkpointing: rerun to resume.
    Interrupted = 6,
    /// Another restore holds the target (a second restore of it, or one that
    /// replaced this one's files): nothing was written over the other's work.
    /// Rerun once the other has ended.
    TargetBusy = 7,
}

impl ExitCode {
    /// Every code, in order: the table the README documents and orchestrator
    /// manifests (`deploy/kubernetes/`) map.
    pub const ALL: [ExitCode; 8] = [
        ExitCode::Success,
        ExitCode::Internal,
        ExitCode::Usage,
        ExitCode::DataFailure,
        ExitCode::IoFailure,
        ExitCode::Refused,
        ExitCode::Interrupted,
        ExitCode::TargetBusy,
    ];

    /// Whether an orchestrator should run the same command again, unchanged,
    /// after this failure (a Kubernetes Job's `podFailurePolicy` counts these
    /// against its retry limit and fails the Job at once on the others). A
    /// rerun resumes from the checkpoint, so it redoes at most one checkpoint
    /// interval of work.
    ///
    /// - `Internal`, `IoFailure`, `Interrupted`: may pass on another try (a
    ///   crash, an EIO of a flaky path, a node drained under the restore).
    /// - `TargetBusy`: passes once the restore holding the target has ended
    ///   (an old pod still stopping when its replacement starts).
    /// - `Usage`, `Refused`: the same invocation fails the same way.
    /// - `DataFailure`: every source was already tried with bounded retries;
    ///   the damage report needs a person (fix the sources, then rerun).
    /// - `Success`: nothing to retry.
    pub fn retry_as_is(self) -> bool {
        match self {
            ExitCode::Internal | ExitCode::IoFailure | ExitCode::Interrupted | ExitCode::TargetBusy => true,
            ExitCode::Success | ExitCode::Usage | ExitCode::DataFailure | ExitCode::Refused => false,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> Self {
        std::process::ExitCode::from(code as u8)
    }
}
