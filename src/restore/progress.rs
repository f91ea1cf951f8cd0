//! Progress of one running restore, shared between the pipeline (which
//! updates it) and whoever watches (the CLI's progress bar, the worker's job
//! status). Plain atomics: reading it never slows the pipeline.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::Serialize;

use crate::fetch::FetchTelemetry;

/// Phases of a restore, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum Phase {
    Validate = 0,
    Allocate = 1,
    Rehydrate = 2,
    Swap = 3,
    Online = 4,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Validate => "validate",
            Phase::Allocate => "allocate",
            Phase::Rehydrate => "rehydrate",
            Phase::Swap => "swap",
            Phase::Online => "online",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Validate,
            1 => Phase::Allocate,
            2 => Phase::Rehydrate,
            3 => Phase::Swap,
            _ => Phase::Online,
        }
    }
}

#[derive(Debug)]
pub struct Progress {
    phase: AtomicU8,
    pub started: Instant,
    pub blocks_total: AtomicU64,
    pub bytes_total: AtomicU64,
    /// Blocks settled before this run started (resumed from a checkpoint).
    pub blocks_resumed: AtomicU64,
    pub blocks_settled: AtomicU64,
    pub bytes_settled: AtomicU64,
    pub blocks_failed: AtomicU64,
    pub bytes_written: AtomicU64,
    stalled: Mutex<Option<String>>,
    /// Each time the restore became stalled, oldest first, at most
    /// [`STALL_EVENTS_MAX`].
    stall_events: Mutex<Vec<StallEvent>>,
    telemetry: OnceLock<Arc<FetchTelemetry>>,
}

/// Stall episodes kept per restore (the first ones: they explain the rest).
pub const STALL_EVENTS_MAX: usize = 16;

/// A moment the restore was flagged stalled, and why.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StallEvent {
    pub at_secs: f64,
    pub reason: String,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Validate as u8),
            started: Instant::now(),
            blocks_total: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            blocks_resumed: AtomicU64::new(0),
            blocks_settled: AtomicU64::new(0),
            bytes_settled: AtomicU64::new(0),
            blocks_failed: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            stalled: Mutex::new(None),
            stall_events: Mutex::new(Vec::new()),
            telemetry: OnceLock::new(),
        }
    }
}

/// A consistent-enough copy of the progress, for display and JSON.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressSnapshot {
    pub phase: Phase,
    pub blocks_total: u64,
    pub blocks_settled: u64,
    pub blocks_failed: u64,
    pub bytes_total: u64,
    pub bytes_settled: u64,
    pub bytes_written: u64,
    pub elapsed_secs: f64,
    pub stalled: Option<String>,
}

impl Progress {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    /// Set or clear the stalled flag; entering a stall is recorded as an
    /// event and counted in the stalled-restores gauge.
    pub fn set_stalled(&self, reason: Option<String>) {
        let mut stalled = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        match (&*stalled, &reason) {
            (None, Some(reason)) => {
                metrics::gauge!(crate::metrics::STALLED_RESTORES).increment(1.0);
                let mut events = self.stall_events.lock().unwrap_or_else(|e| e.into_inner());
                if events.len() < STALL_EVENTS_MAX {
                    events.push(StallEvent { at_secs: self.started.elapsed().as_secs_f64(), reason: reason.clone() });
                }
            }
            (Some(_), None) => metrics::gauge!(crate::metrics::STALLED_RESTORES).decrement(1.0),
            _ => {}
        }
        *stalled = reason;
    }

    pub fn stall_events(&self) -> Vec<StallEvent> {
        self.stall_events.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stalled(&self) -> Option<String> {
        self.stalled.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn attach_telemetry(&self, telemetry: Arc<FetchTelemetry>) {
        let _ = self.telemetry.set(telemetry);
    }

    pub fn telemetry(&self) -> Option<&Arc<FetchTelemetry>> {
        self.telemetry.get()
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            phase: self.phase(),
            blocks_total: get(&self.blocks_total),
            blocks_settled: get(&self.blocks_settled),
            blocks_failed: get(&self.blocks_failed),
            bytes_total: get(&self.bytes_total),
            bytes_settled: get(&self.bytes_settled),
            bytes_written: get(&self.bytes_written),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            stalled: self.stalled(),
        }
    }
}
