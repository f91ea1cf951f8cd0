//! rehydrate: restore volumes from block snapshots in object stores.
//!
//! A block flows manifest → store → fetch → verify → write → checkpoint, with
//! `job` as the control plane (`worker` runs many jobs) and `api`, `cli`,
//! `metrics`, `config` at the edges.

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
pub mod restore;
pub mod sample;
pub mod snapshot;
pub mod store;
pub mod target;
pub mod verify;
pub mod worker;
pub mod write;
