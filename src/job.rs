//! Jobs: what a client submits to a worker and what the worker records of it.
//!
//! In: a [`JobSpec`] from a request body, checked against the worker's
//! configuration by [`spec::resolve`]. Out: a [`JobRecord`] per job in the job
//! database ([`db`]), changed only by compare-and-set, so a task that was
//! cancelled or replaced never flips the status of a job it no longer owns
//! (`docs/architecture.md`, "Job phases and states").
//!
//! The restore a job runs is the restore engine's ([`crate::restore`]); the
//! worker ([`crate::worker`]) schedules jobs and reports them.

pub mod db;
pub mod export;
pub mod spec;

pub use db::{DAMAGE_RECORDED_MAX, DATABASE_FILE, Insert, JobDbError, JobRecord, JobState, JobStore, RunSummary};
pub use spec::{JobSpec, ResolvedSpec, SpecError};
