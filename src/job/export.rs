//! What a job's NBD export reports ([`ExportStatus`]): in the job's status
//! while it serves, and stored with the job's record when it stops. The
//! export itself is the worker's (`worker/export.rs`).

use serde::{Deserialize, Serialize};

use crate::restore::latency::LatencySummary;

/// Whether an export serves yet, still, or no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportState {
    /// Listening; the volume is served once the manifest is validated and
    /// the target allocated.
    Starting,
    Serving,
    Stopped,
}

/// A job's export as its status reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExportStatus {
    /// The URL a client connects to (`nbd://127.0.0.1:10900/<job id>`).
    pub url: String,
    pub state: ExportState,
    /// READ requests served.
    pub reads: u64,
    /// WRITE, WRITE_ZEROES and TRIM requests served.
    pub writes: u64,
    pub flushes: u64,
    /// Blocks fetched because a read needed them before the restore had
    /// them; and those no source served (the read answered EIO).
    pub demand_fetches: u64,
    pub demand_failures: u64,
    /// Blocks a read took from the background restore's fetch of them,
    /// already on the wire, instead of fetching them itself.
    pub shared_fetches: u64,
    /// Blocks the client wrote: the restore never overwrites them.
    pub blocks_owned: u64,
    /// Latency of reads whose blocks were all local.
    pub read_latency_local: LatencySummary,
    /// Latency of reads that waited for a block fetched on demand.
    pub read_latency_on_demand: LatencySummary,
}
