//! Write: verified blocks to the target at their offsets. (Being implemented
//! by the writer brief; this is the interface the pipeline codes against.)

use std::io;

use crate::verify::VerifiedBlock;

/// Which I/O engine writes the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Probe io_uring at start; fall back to pwrite where it is unavailable.
    #[default]
    Auto,
    Uring,
    Pwrite,
}

/// The backend a writer actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Uring,
    Pwrite,
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub backend: BackendChoice,
    /// Writes queued or in flight per target at most.
    pub queue_depth: std::num::NonZeroUsize,
    /// Threads of the pwrite backend.
    pub pwrite_threads: std::num::NonZeroUsize,
}

/// The writer of one target. Cheap to clone; usable from any async task.
#[derive(Clone, Debug)]
pub struct Writer {}

impl Writer {
    pub fn open(_file: std::fs::File, _config: &WriterConfig) -> io::Result<Writer> {
        Err(io::Error::other("writer not built yet"))
    }
    pub fn backend(&self) -> Backend {
        Backend::Pwrite
    }
    pub async fn write(&self, _offset: u64, _block: &VerifiedBlock) -> io::Result<()> {
        Err(io::Error::other("writer not built yet"))
    }
    pub async fn sync(&self) -> io::Result<()> {
        Err(io::Error::other("writer not built yet"))
    }
    pub async fn close(self) -> io::Result<()> {
        Ok(())
    }
}
