//! rehydrate: restore volumes from block snapshots in object stores.
//!
//! A block flows snapshot → store → fetch → verify → write → checkpoint, with
//! the restore engine (`restore`) running one restore through its phases,
//! `job` and `worker` as the control plane (a worker runs many jobs) and
//! `api`, `cli`, `metrics`, `config` at the edges. The design, the ledger
//! invariants the comments cite by number, and one line per module are in
//! `docs/architecture.md`.

pub mod api;
pub mod block;
pub mod buf;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod error;
pub mod fetch;
pub mod job;
pub mod manifest;
pub mod metrics;
pub mod nbd;
pub mod peer;
pub mod restore;
pub mod sample;
pub mod snapshot;
pub mod store;
pub mod sys;
pub mod target;
pub mod verify;
pub mod worker;
pub mod write;
